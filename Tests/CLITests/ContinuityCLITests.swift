// Continuity of catch-ups, as README's "Seeding a new mirror" runs them
// against a real tracking-server: each `freeze --changes-out gN.map` saves
// the generation that ends with the instant it ended; `snapshot --as-of
// g0.map` (the seed) and `snapshot --map gN.map` (a catch-up) record in a
// GENERATION record the writes they carry, as of when; merge-snapshot
// --mirror records the instant the mirror is as of, and refuses a catch-up
// whose writes start later: a generation whose stream was never made. The
// mirror is then untouched; --force merges with a warning (and the mirror
// really lacks the writes left out); maps and streams without the fields
// still merge, unchecked.

import DualRestore
import Foundation
import Glibc
import TestSupport
import XCTest

final class ContinuityCLITests: CLITestCase {
  private var children: [RRTChild] = []
  private var scratches: [Scratch] = []

  override func tearDown() {
    for c in children.reversed() { c.stop(grace: 5) }
    children = []
    scratches = []
    super.tearDown()
  }

  private let blockSize = 65536

  /// A tracking-server over a 16 MiB source, a sparse mirror and its map.
  private func rig() throws -> (Scratch, TUTrackingServer) {
    try require("nbdsh", "nbdinfo")
    let s = try Scratch()
    scratches.append(s)
    let size = 16 << 20
    try TUImage.make(s.path("source.img"), size: size, seed: 91, holes: [(20 * blockSize)..<(30 * blockSize)])
    let source = try TUTrackingServer(
      device: s.path("source.img"), changes: s.path("source.changes"), socket: s.path("s.sock"),
      log: s.path("tracking.log"))
    children.append(source.child)
    try TUImage.sparse(s.path("mirror.img"), size: size)
    let create = try RRTCommand.run("overwrite-map", ["create", "--like", s.path("mirror.img"), s.path("mirror.map")])
    XCTAssertEqual(create.status, 0, create.summary)
    return (s, source)
  }

  /// Writes to the source between two views: different blocks each round.
  private func write(_ source: TUTrackingServer, round: Int) throws {
    let w = try RRTCommand.run(
      "/usr/bin/nbdsh",
      [
        "-u", source.deviceURI, "-c",
        "import os\nfor b in range(\(round), 240, 5):\n    h.pwrite(os.urandom(3000), b * 65536 + 100 * \(round))\nh.flush()",
      ], timeout: 60)
    XCTAssertEqual(w.status, 0, w.summary)
  }

  /// The seed (round 0, `--as-of g0.map`) and catch-ups 1…3 (`--map gN.map
  /// --base` the previous stream made), one freeze each; `skip` is a round
  /// whose map is saved but whose stream is never made. Returns the stream
  /// ids by round.
  private func makeStreams(_ s: Scratch, _ source: TUTrackingServer, skip: Int? = nil) throws -> [Int: String] {
    var ids: [Int: String] = [:]
    var previous: String?
    for round in 0...3 {
      if round > 0 { try write(source, round: round) }
      _ = try source.freeze(changesOut: s.path("g\(round).map"))
      let g = try tuMapStats(s.path("g\(round).map"))
      let ended = try XCTUnwrap(g["tracking_ended"] as? String, "the saved change map has no end: \(g)")
      if round != skip {
        var args = ["-o", s.path("c\(round).stream"), source.viewURI]
        if let previous {
          args = ["--map", s.path("g\(round).map"), "--base", previous] + args
        } else {
          args = ["--as-of", s.path("g0.map")] + args
        }
        let o = try snapshotJSON(args)
        XCTAssertEqual(o["as_of"] as? String, ended, "\(o)")
        XCTAssertEqual(o["generation"] as? String, g["map_id"] as? String, "\(o)")
        XCTAssertEqual(
          o["changes_since"] as? String, round == 0 ? "start" : g["tracking_started"] as? String, "\(o)")
        previous = try XCTUnwrap(o["stream_id"] as? String)
        ids[round] = previous
      }
      try source.drop()
    }
    // Each generation starts at the instant the one before ended.
    for round in 1...3 {
      XCTAssertEqual(
        try tuMapStats(s.path("g\(round).map"))["tracking_started"] as? String,
        try tuMapStats(s.path("g\(round - 1).map"))["tracking_ended"] as? String, "generation \(round)")
    }
    return ids
  }

  func testTheSeedingFlowWithThreeCatchUpsMerges() throws {
    let (s, source) = try rig()
    let ids = try makeStreams(s, source)
    for round in 0...3 {
      let r = try merge(s, "c\(round).stream")
      XCTAssertEqual(r.status, 0, "round \(round): \(r.summary)")
      XCTAssertFalse(r.stderr.contains("warning"), r.summary)
      let m = try tuMapStats(s.path("mirror.map"))
      XCTAssertEqual(m["last_merged_stream"] as? String, ids[round])
      let g = try tuMapStats(s.path("g\(round).map"))
      XCTAssertEqual(m["merged_as_of"] as? String, g["tracking_ended"] as? String, "round \(round): \(m)")
      XCTAssertEqual(m["merged_as_of_generation"] as? String, g["map_id"] as? String, "round \(round): \(m)")
    }
    source.stop()
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 0, "the source and the mirror are not mirrors: \(diff.summary)")
  }

  func testACatchUpThatLeavesAGenerationOutIsRefusedAndForceMergesIt() throws {
    let (s, source) = try rig()
    // Generation 2's map is saved, but no stream is made from it; the
    // catch-up of generation 3 is made on top of generation 1's stream.
    let ids = try makeStreams(s, source, skip: 2)
    XCTAssertNil(ids[2])
    for round in 0...1 { XCTAssertEqual(try merge(s, "c\(round).stream").status, 0) }
    let mirrorBefore = try TUImage.read(s.path("mirror.img"))
    let mapBefore = try TUImage.read(s.path("mirror.map"))

    let g2 = try tuMapStats(s.path("g2.map"))
    let g1 = try tuMapStats(s.path("g1.map"))
    let g3 = try tuMapStats(s.path("g3.map"))
    let from = try XCTUnwrap(g2["tracking_started"] as? String)
    let to = try XCTUnwrap(g2["tracking_ended"] as? String)
    let refused = try merge(s, "c3.stream")
    XCTAssertEqual(refused.status, 1, refused.summary)
    // The span left out is exactly generation 2's, between the ends it joins.
    XCTAssertTrue(refused.stderr.contains("the writes from \(from) to \(to)"), refused.summary)
    XCTAssertTrue(
      refused.stderr.contains("(the end of generation \(try XCTUnwrap(g1["map_id"] as? String)))"), refused.summary)
    XCTAssertTrue(
      refused.stderr.contains("(the start of generation \(try XCTUnwrap(g3["map_id"] as? String)))"), refused.summary)
    XCTAssertTrue(refused.stderr.contains("--force merges it anyway"), refused.summary)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, "one sentence: \(refused.stderr)")
    XCTAssertTrue(try TUImage.read(s.path("mirror.img")) == mirrorBefore, "the refused merge wrote the mirror")
    XCTAssertTrue(try TUImage.read(s.path("mirror.map")) == mapBefore, "the refused merge changed the map")

    // --force merges it, with the sentence as a warning; the mirror then
    // really lacks generation 2's writes.
    let forced = try merge(s, "c3.stream", ["--force"])
    XCTAssertEqual(forced.status, 0, forced.summary)
    XCTAssertTrue(forced.stderr.contains("warning: "), forced.summary)
    XCTAssertTrue(forced.stderr.contains("the writes from \(from) to \(to)"), forced.summary)
    XCTAssertEqual(try tuMapStats(s.path("mirror.map"))["last_merged_stream"] as? String, ids[3])
    source.stop()
    let diff = try RRTCommand.run("bitmap-diff", ["--quiet", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 1, "the mirror should lack generation 2's writes: \(diff.summary)")
  }

  /// dualrestore(7)'s remedy for a lost round: the union of the generations
  /// since the last stream merged spans them all and merges; a union of
  /// generations that do not touch claims no end.
  func testTheUnionOfTheGenerationsLeftOutMerges() throws {
    let (s, source) = try rig()
    _ = try makeStreams(s, source, skip: 2)
    for round in 0...1 { XCTAssertEqual(try merge(s, "c\(round).stream").status, 0) }
    let union = try RRTCommand.run(
      "overwrite-map", ["union", s.path("g2.map"), s.path("g3.map"), "-o", s.path("g23.map")])
    XCTAssertEqual(union.status, 0, union.summary)
    let g23 = try tuMapStats(s.path("g23.map"))
    XCTAssertEqual(g23["tracking_started"] as? String, try tuMapStats(s.path("g2.map"))["tracking_started"] as? String)
    let end = try XCTUnwrap(try tuMapStats(s.path("g3.map"))["tracking_ended"] as? String)
    XCTAssertEqual(g23["tracking_ended"] as? String, end)
    // Nothing was written since the last freeze: the device is the view at g3's end.
    let c1 = try XCTUnwrap(try tuMapStats(s.path("mirror.map"))["last_merged_stream"] as? String)
    _ = try snapshotJSON(["--map", s.path("g23.map"), "--base", c1, "-o", s.path("c23.stream"), source.deviceURI])
    let r = try merge(s, "c23.stream")
    XCTAssertEqual(r.status, 0, r.summary)
    XCTAssertEqual(try tuMapStats(s.path("mirror.map"))["merged_as_of"] as? String, end)
    source.stop()
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 0, "the source and the mirror are not mirrors: \(diff.summary)")
    // Generations 1 and 3 do not touch: their union names no whole span.
    let gappy = try RRTCommand.run(
      "overwrite-map", ["union", s.path("g1.map"), s.path("g3.map"), "-o", s.path("g13.map")])
    XCTAssertEqual(gappy.status, 0, gappy.summary)
    XCTAssertNil(try tuMapStats(s.path("g13.map"))["tracking_ended"] as? String)
  }

  /// snapshot-server compact of the seed and two catch-ups: the compacted
  /// stream is the device as of the second catch-up's end and says so
  /// (GENERATION, every write), so a mirror seeded from it takes the third
  /// catch-up unwarned and records its end; and a catch-up that leaves out
  /// a generation is refused after it as after the chain.
  func testACompactedChainCarriesTheInstantOfItsEnd() throws {
    let (s, source) = try rig()
    let ids = try makeStreams(s, source)
    let compact = try RRTCommand.run(
      "snapshot-server",
      ["compact", "-o", s.path("c012.stream")]
        + (0...2).map { s.path("c\($0).stream") }, timeout: 120)
    XCTAssertEqual(compact.status, 0, compact.summary)
    let g2 = try tuMapStats(s.path("g2.map"))
    let generation = try XCTUnwrap(try generationRecord(s.path("c012.stream")), "the compacted stream has none")
    XCTAssertEqual(generation.generation.description, g2["map_id"] as? String)
    XCTAssertEqual(generation.changesSince, .unset)
    XCTAssertEqual(generation.asOf.description, g2["tracking_ended"] as? String)
    // A compaction of that compaction (LINEAGE, then GENERATION) keeps it.
    let again = try RRTCommand.run(
      "snapshot-server", ["compact", "-o", s.path("again.stream"), s.path("c012.stream")], timeout: 120)
    XCTAssertEqual(again.status, 0, again.summary)
    XCTAssertEqual(try generationRecord(s.path("again.stream")), generation)
    let seeded = try merge(s, "c012.stream")
    XCTAssertEqual(seeded.status, 0, seeded.summary)
    XCTAssertEqual(try tuMapStats(s.path("mirror.map"))["merged_as_of"] as? String, g2["tracking_ended"] as? String)
    let next = try merge(s, "c3.stream")
    XCTAssertEqual(next.status, 0, next.summary)
    XCTAssertFalse(next.stderr.contains("warning"), next.summary)
    XCTAssertEqual(try tuMapStats(s.path("mirror.map"))["last_merged_stream"] as? String, ids[3])
    source.stop()
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 0, "the source and the mirror are not mirrors: \(diff.summary)")
  }

  func testMapsAndStreamsWithoutTheFieldsStillMerge() throws {
    let (s, source) = try rig()
    _ = try makeStreams(s, source, skip: 2)
    XCTAssertEqual(try merge(s, "c0.stream").status, 0)
    // A mirror map of an older build: no instant recorded, so no check.
    try stripGenerationFields(s.path("mirror.map"))
    XCTAssertNil(try tuMapStats(s.path("mirror.map"))["merged_as_of"] as? String)
    XCTAssertEqual(try merge(s, "c1.stream").status, 0)
    XCTAssertNotNil(try tuMapStats(s.path("mirror.map"))["merged_as_of"] as? String)
    // A catch-up made from a change map of an older build (no end): no
    // GENERATION record, so it merges unchecked though it leaves
    // generation 2 out, and the instant the mirror is as of is unknown after.
    try stripGenerationFields(s.path("g3.map"))
    let c1 = try XCTUnwrap(try tuMapStats(s.path("mirror.map"))["last_merged_stream"] as? String)
    let o = try snapshotJSON([
      "--map", s.path("g3.map"), "--base", c1, "-o", s.path("old3.stream"), s.path("source.img"),
    ])
    XCTAssertNil(o["as_of"] as? String, "\(o)")
    let r = try merge(s, "old3.stream")
    XCTAssertEqual(r.status, 0, r.summary)
    XCTAssertFalse(r.stderr.contains("warning"), r.summary)
    XCTAssertNil(try tuMapStats(s.path("mirror.map"))["merged_as_of"] as? String)
  }

  // MARK: Helpers

  /// The GENERATION record of a stream file, by the library's reader.
  private func generationRecord(_ path: String) throws -> StreamFormat.Generation? {
    let fd = open(path, O_RDONLY)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    let reader = StreamReader(fd: fd, name: path)
    while let r = try reader.next() {
      switch r {
      case .generation(let g): return g
      case .data, .zero, .end: return nil
      default: continue
      }
    }
    return nil
  }

  /// merge-snapshot --mirror of a stream of the scratch directory into mirror.img.
  private func merge(_ s: Scratch, _ stream: String, _ extra: [String] = []) throws -> RRTCommand.Result {
    try RRTCommand.run(
      "merge-snapshot",
      ["--mirror", "--map", s.path("mirror.map")] + extra + ["-i", s.path(stream), s.path("mirror.img")],
      timeout: 120)
  }

  /// snapshot --json; the summary object.
  private func snapshotJSON(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws
    -> [String: Any]
  {
    let r = try RRTCommand.run("snapshot", ["--json"] + args, timeout: 120)
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    return try tuLastJSON(r.stdout + "\n" + r.stderr, file: file, line: line)
  }

  /// Rewrites a map as an older build wrote it: the header ends at the
  /// device name (H = 90 + N), without the 32 bytes of generation fields,
  /// the SHA-256 made again. Independent of the library: Python by the table.
  private func stripGenerationFields(_ path: String) throws {
    let code = """
      import hashlib, struct, sys
      p = sys.argv[1]
      b = open(p, 'rb').read()
      h = struct.unpack_from('<I', b, 12)[0]
      n = struct.unpack_from('<H', b, 88)[0]
      assert h == 90 + n + 32, (h, n)
      out = b[:12] + struct.pack('<I', 90 + n) + b[16:90 + n] + b[h:-32]
      open(p, 'wb').write(out + hashlib.sha256(out).digest())
      """
    let r = try RRTCommand.run("/usr/bin/python3", ["-c", code, path])
    XCTAssertEqual(r.status, 0, r.summary)
  }
}
