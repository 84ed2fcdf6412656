// snapshot and merge-snapshot as users run them: pipes between the two,
// bitmap-diff selections, the overwrite map that keeps newer blocks (the
// six-block example of Figures 3A/3B), refusals before any write, damaged and
// truncated streams, --check and --dry-run, terminals, loop devices.
//
// Offsets in expectations come from the stream format table
// (StreamFormat.swift): a 16-byte preamble, a HEADER record of 16 + 98 + N + 4
// bytes (N the source name's length), DATA records of 16 + 16 + payload + 4.

import Foundation
import TestSupport
import XCTest

final class StreamCLITests: XCTestCase {

  // MARK: Helpers

  func json(_ data: Data, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: data) as? [String: Any], "not JSON: \(String(decoding: data, as: UTF8.self))",
      file: file, line: line)
  }

  func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try json(Data(text.utf8), file: file, line: line)
  }

  /// `overwrite-map stats --json MAP`.
  func mapStats(_ map: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    let r = try RRTCommand.run("overwrite-map", ["stats", "--json", map])
    XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
    return try json(r.data, file: file, line: line)
  }

  func extents(_ map: String) throws -> [String] { try RRTCommand.run("overwrite-map", ["extents", map]).lines }

  /// Runs a shell script in the scratch directory and asserts it succeeded.
  @discardableResult
  func sh(_ s: Scratch, _ script: String, file: StaticString = #filePath, line: UInt = #line) throws
    -> RRTCommand.Result
  {
    let r = try RRTCommand.shell(script, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, "\(script): \(r.stderr)", file: file, line: line)
    return r
  }

  /// A snapshot to a file; returns its stream id (from --json on stdout).
  @discardableResult
  func snapshot(
    _ s: Scratch, _ source: String, to stream: String, _ extra: [String] = [], file: StaticString = #filePath,
    line: UInt = #line
  )
    throws -> String
  {
    let r = try RRTCommand.run("snapshot", extra + ["--json", "-o", s.path(stream), source], cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
    let id = try json(r.data, file: file, line: line)["stream_id"] as? String
    XCTAssertEqual(id?.count, 32, file: file, line: line)
    return id ?? ""
  }

  /// An image of `size` bytes: random data, a run of zeros written densely,
  /// a hole (never written), compressible text, and a partial last block
  /// when `size` is not a multiple of the block size.
  @discardableResult
  func makeImage(_ s: Scratch, _ name: String, size: Int, seed: UInt64) throws -> Data {
    var rng = SplitMix64(seed: seed)
    var data = Data(count: size)
    data.withUnsafeMutableBytes { raw in
      for i in 0..<(size / 8) { raw.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
      for i in (size / 8 * 8)..<size { raw[i] = UInt8(truncatingIfNeeded: rng.next()) }
    }
    let zeroRun = (size / 6)..<(size / 6 + size / 12)
    let hole = (size / 3)..<(size / 3 + size / 4)
    let text = (size * 2 / 3)..<(size * 2 / 3 + size / 10)
    data.replaceSubrange(zeroRun, with: Data(count: zeroRun.count))
    data.replaceSubrange(hole, with: Data(count: hole.count))
    let unit = Array("block streams compress text like this line. ".utf8)
    data.replaceSubrange(text, with: Data((0..<text.count).map { unit[$0 % unit.count] }))
    // Written around the hole, so the file system keeps it a hole.
    let path = s.path(name)
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.truncate(atOffset: UInt64(size))
    try h.seek(toOffset: 0)
    try h.write(contentsOf: data[0..<hole.lowerBound])
    try h.seek(toOffset: UInt64(hole.upperBound))
    try h.write(contentsOf: data[hole.upperBound..<size])
    try h.close()
    return data
  }

  func block(_ data: Data, _ index: Int, _ size: Int) -> Data {
    data[(index * size)..<min((index + 1) * size, data.count)]
  }

  /// The stream layout of a source named `name` (as given on the command
  /// line) in blocks of 64 KiB of random (incompressible) data.
  func dataRecordStart(_ k: Int, nameLength: Int) -> Int { 16 + (16 + 98 + nameLength + 4) + k * (16 + 16 + 65536 + 4) }

  // MARK: (1) Round trips

  func testSnapshotPipedToMergeMakesTheTargetIdentical() throws {
    let s = try Scratch()
    let size = 6 << 20 + 12345
    let a = try makeImage(s, "a.img", size: size, seed: 1)
    // 8M: one record larger than merge-snapshot's 4 MiB read buffer.
    for (i, bs) in ["4K", "64K", "1M", "8M"].enumerated() {
      try s.randomFile("b.img", size: size, seed: 100 + UInt64(i))
      XCTAssertNotEqual(try s.read("b.img"), a)
      let r = try sh(s, "snapshot --quiet --block-size \(bs) a.img | merge-snapshot --quiet b.img")
      XCTAssertEqual(r.stderr, "", "--quiet prints nothing")
      XCTAssertTrue(try s.read("b.img") == a, "block size \(bs): the target differs from the source")
      let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("a.img"), s.path("b.img")])
      XCTAssertEqual(diff.status, 0, "block size \(bs): \(diff.stdout) \(diff.stderr)")
    }
    // Into a sparse target of the right size, without compression, through -i and -o.
    XCTAssertEqual(try RRTCommand.shell("truncate -s \(size) c.img", cwd: s.url.path).status, 0)
    try sh(s, "snapshot --quiet --no-compress -o full.stream a.img && merge-snapshot --quiet -i full.stream c.img")
    XCTAssertTrue(try s.read("c.img") == a)
    // The uncompressed stream carries every non-zero byte; the compressed one less.
    try sh(s, "snapshot --quiet -o lz4.stream a.img")
    let full = try s.read("full.stream").count
    let lz4 = try s.read("lz4.stream").count
    XCTAssertLessThan(lz4, full)
    XCTAssertLessThan(full, size, "zero blocks and the hole are ZERO records")
    // One thread or many: the same records in the same order (only the
    // HEADER's id and instant and the END's digest differ).
    try sh(
      s,
      "snapshot --quiet --threads 1 --block-size 4K -o t1.stream a.img && snapshot --quiet --threads 7 --block-size 4K -o t7.stream a.img"
    )
    let t1 = try s.read("t1.stream")
    let t7 = try s.read("t7.stream")
    XCTAssertEqual(t1.count, t7.count)
    let headerEnd = 16 + 16 + 98 + "a.img".utf8.count + 4
    XCTAssertTrue(
      t1[headerEnd..<(t1.count - 84 + 16 + 32)] == t7[headerEnd..<(t7.count - 84 + 16 + 32)],
      "records differ between 1 and 7 threads")
  }

  /// -o naming a FIFO (or a device such as /dev/null) writes through it
  /// in place: renaming a temporary file over it would replace the node.
  func testOutputToAFIFOWritesInPlace() throws {
    let s = try Scratch()
    let a = try makeImage(s, "a.img", size: 1 << 20, seed: 7)
    try sh(
      s,
      "mkfifo pipe && { timeout 20 cat pipe > copy.stream & } && snapshot --quiet -o pipe a.img && wait && test -p pipe"
    )
    let r = try RRTCommand.run("merge-snapshot", ["--quiet", "--check", "-i", s.path("copy.stream")])
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertEqual(try RRTCommand.shell("truncate -s 1M b.img", cwd: s.url.path).status, 0)
    try sh(s, "merge-snapshot --quiet -i copy.stream b.img")
    XCTAssertTrue(try s.read("b.img") == a)
    let leftovers = try RRTCommand.shell("ls -a | grep -c '^\\.pipe\\.' || true", cwd: s.url.path)
    XCTAssertEqual(leftovers.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "0", "no temporary file left")
  }

  /// A mirror's first merge creates its map; catch-ups then chain on the
  /// recorded stream and replace what earlier streams wrote.
  func testMirrorMergeCreatesItsMapAndChainsCatchUps() throws {
    let s = try Scratch()
    let a = try makeImage(s, "a.img", size: 4 << 20, seed: 21)
    XCTAssertEqual(try RRTCommand.shell("truncate -s 4M m.img", cwd: s.url.path).status, 0)
    let first = try snapshot(s, "a.img", to: "s1.stream")
    let r = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", "m.map", "-i", "s1.stream", "m.img"], cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertTrue(r.stderr.contains("creating the mirror's map m.map"), r.stderr)
    XCTAssertTrue(try s.read("m.img") == a)
    let stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["last_merged_stream"] as? String, first)
    XCTAssertEqual(stats["set_blocks"] as? Int, 0, "a mirror's merges mark nothing current")
    // The source changes; the catch-up carries the changed blocks and lands.
    try s.patch("a.img", at: 3 << 16, [1, 2, 3, 4])
    let changed = try s.read("a.img")
    try sh(s, "bitmap-diff --quiet a.img m.img > d.map || true")
    try sh(s, "snapshot --quiet --map d.map --base \(first) -o c1.stream a.img")
    let c = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", "m.map", "-i", "c1.stream", "m.img"], cwd: s.url.path)
    XCTAssertEqual(c.status, 0, c.stderr)
    XCTAssertTrue(try s.read("m.img") == changed)
    // The same catch-up again no longer fits: its base is not the last merged.
    let again = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", "m.map", "-i", "c1.stream", "m.img"], cwd: s.url.path)
    XCTAssertEqual(again.status, 1, again.stderr)
    XCTAssertTrue(again.stderr.contains("but the last stream merged into this device is"), again.stderr)
  }

  func testSnapshotSummaryCounts() throws {
    let s = try Scratch()
    // 5 blocks of 64 KiB and 100 bytes: random, zero, zero, text, random, random tail.
    var data = Data()
    var rng = SplitMix64(seed: 5)
    data += Data((0..<65536).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
    data += Data(count: 2 * 65536)
    data += Data((0..<65536).map { UInt8(ascii: "a") + UInt8($0 % 7) })
    data += Data((0..<65536 + 100).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
    try s.file("a.img", data)
    let r = try RRTCommand.run("snapshot", ["--json", "-o", s.path("a.stream"), "a.img"], cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    let o = try json(r.data)
    XCTAssertEqual(o["block_size"] as? Int, 65536)
    XCTAssertEqual(o["device_size"] as? Int, 5 * 65536 + 100)
    XCTAssertEqual(o["covered_blocks"] as? Int, 6)
    XCTAssertEqual(o["data_blocks"] as? Int, 4)
    XCTAssertEqual(o["compressed_blocks"] as? Int, 1)
    XCTAssertEqual(o["zero_blocks"] as? Int, 2)
    XCTAssertEqual(o["bytes_in"] as? Int, 5 * 65536 + 100)
    XCTAssertEqual(o["bytes_out"] as? Int, try s.read("a.stream").count)
    XCTAssertEqual(o["source"] as? String, "a.img")
    XCTAssertTrue(o["base_stream_id"] is NSNull)
    // The JSON goes to stderr when the stream is on stdout.
    let piped = try RRTCommand.shell("snapshot --json a.img > p.stream", cwd: s.url.path)
    XCTAssertEqual(piped.status, 0, piped.stderr)
    XCTAssertEqual(try json(piped.stderr)["data_blocks"] as? Int, 4)
  }

  // MARK: (2) bitmap-diff selections

  func testBitmapDiffSelectionSendsOnlyTheDifferingBlocks() throws {
    let s = try Scratch()
    try s.randomFile("a.img", size: 4 << 20, seed: 2)
    var b = try s.read("a.img")
    let changed = [0, 7, 8, 40, 63]
    for k in changed { b[k * 65536 + 1234] ^= 0x5A }
    try s.file("b.img", b)
    let r = try sh(
      s,
      "{ bitmap-diff a.img b.img; test $? -eq 1; } | snapshot --quiet --map - a.img | tee delta.stream | merge-snapshot --json b.img"
    )
    let o = try json(r.data)
    XCTAssertEqual(o["written_blocks"] as? Int, changed.count)
    XCTAssertEqual(o["zero_blocks"] as? Int, 0)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertTrue(try s.read("b.img") == s.read("a.img"))
    XCTAssertEqual(
      try RRTCommand.run("bitmap-diff", [s.path("a.img"), s.path("b.img"), "-o", s.path("after.map")]).status, 0)
    try sh(s, "snapshot --quiet a.img > full.stream")
    let delta = try s.read("delta.stream").count
    let full = try s.read("full.stream").count
    XCTAssertGreaterThan(full, 4 << 20, "random data does not compress")
    XCTAssertLessThan(delta, full / 10, "delta \(delta) bytes vs full \(full)")
    XCTAssertGreaterThan(delta, changed.count * 65536, "each changed block is carried")
    // A map of another block size than --block-size is refused.
    try sh(s, "bitmap-diff --block-size 4K a.img a.img > m4k.map")
    assertFails(
      try RRTCommand.run("snapshot", ["--map", "m4k.map", "--block-size", "64K", "a.img"], cwd: s.url.path), status: 1,
      mentioning: "block size 4096")
  }

  // MARK: (3) The six-block example of Figures 3A and 3B

  func testSixBlockExampleOfFigures3AAnd3B() throws {
    let s = try Scratch()
    let bs = 4096
    func content(_ label: String) -> Data {
      // A recognisable, incompressible block per version ("3b", "6a", …).
      var rng = SplitMix64(seed: label.utf8.reduce(UInt64(17)) { $0 &* 31 &+ UInt64($1) })
      var d = Data(label.utf8)
      while d.count < bs { d.append(UInt8(truncatingIfNeeded: rng.next())) }
      return d
    }
    func write(_ image: String, _ seedBlock: Int, _ label: String) throws {
      try s.patch(image, at: (seedBlock - 1) * bs, Array(content(label)))
    }
    func markCurrent(_ seedBlock: Int) throws {
      let r = try RRTCommand.run(
        "overwrite-map", ["set", s.path("primary.map"), String((seedBlock - 1) * bs), String(bs)])
      XCTAssertEqual(r.status, 0, r.stderr)
    }
    /// A write request of the primary system: to both sites, marked current at the primary.
    func writeBoth(_ blocks: [(Int, String)]) throws {
      for (b, label) in blocks {
        try write("primary.img", b, label)
        try write("backup.img", b, label)
        try markCurrent(b)
      }
    }

    // T0: the backup holds blocks 1-6; the primary has lost them (garbage).
    var backup = Data()
    for b in 1...6 { backup += content("\(b)") }
    try s.file("backup.img", backup)
    try s.randomFile("primary.img", size: 6 * bs, seed: 666)
    // Tracking starts: the overwrite map 114, all clear.
    try sh(s, "overwrite-map create --like primary.img --block-size 4K primary.map")
    XCTAssertEqual(try mapStats(s.path("primary.map"))["set_blocks"] as? Int, 0)

    // Read request 347: block 1 comes from the backup (channel 1) and is current.
    try s.patch("primary.img", at: 0, Array(block(backup, 0, bs)))
    try markCurrent(1)
    // Write requests 340 (3a, 4a) and 342 (3b, 4b, 6a).
    try writeBoth([(3, "3a"), (4, "4a")])
    try writeBoth([(3, "3b"), (4, "4b"), (6, "6a")])
    XCTAssertEqual(
      try extents(s.path("primary.map")), ["0 4096", "8192 8192", "20480 4096"], "blocks 1, 3, 4, 6 current")

    // T1: the snapshot of the backup (channel 2), carried on media.
    let snapID = try snapshot(s, "backup.img", to: "snap.stream", ["--block-size", "4K"])
    let atT1 = try s.read("backup.img")

    // Write requests 344 (1a, 3c) and 346 (1b, 4c, 6b), after the snapshot.
    try writeBoth([(1, "1a"), (3, "3c")])
    try writeBoth([(1, "1b"), (4, "4c"), (6, "6b")])
    let beforeMerge = try s.read("primary.img")
    XCTAssertNotEqual(beforeMerge, try s.read("backup.img"))

    // T2: merge the snapshot through the overwrite map.
    let r = try sh(s, "merge-snapshot --json --map primary.map primary.img < snap.stream")
    let o = try json(r.data)
    XCTAssertEqual(o["written_blocks"] as? Int, 2, "only blocks 2 and 5")
    XCTAssertEqual(o["skipped_current_blocks"] as? Int, 4, "blocks 1, 3, 4, 6 are current")
    XCTAssertEqual(o["zero_blocks"] as? Int, 0)
    XCTAssertEqual(o["bytes_written"] as? Int, 2 * bs)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertEqual(o["stream_id"] as? String, snapID)

    let primary = try s.read("primary.img")
    for b in [1, 3, 4, 6] {
      XCTAssertEqual(block(primary, b - 1, bs), block(beforeMerge, b - 1, bs), "current block \(b) was overwritten")
    }
    XCTAssertEqual(block(primary, 0, bs), content("1b"))
    XCTAssertEqual(block(primary, 2, bs), content("3c"))
    XCTAssertEqual(block(primary, 3, bs), content("4c"))
    XCTAssertEqual(block(primary, 5, bs), content("6b"))
    XCTAssertEqual(block(primary, 1, bs), content("2"))
    XCTAssertEqual(block(primary, 4, bs), content("5"))
    // Mirrored again: the primary equals the backup, and every block is current.
    XCTAssertTrue(primary == (try s.read("backup.img")))
    XCTAssertEqual(
      try RRTCommand.run("bitmap-diff", ["--block-size", "4K", s.path("primary.img"), s.path("backup.img")]).status, 0)
    let stats = try mapStats(s.path("primary.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, 6)
    XCTAssertEqual(stats["last_merged_stream"] as? String, snapID)
    XCTAssertEqual(try extents(s.path("primary.map")), ["0 24576"])

    // Without the map, the same snapshot would bring back older data (3b, 4b, 6a, 1).
    try s.file("copy.img", beforeMerge)
    try sh(s, "merge-snapshot --quiet copy.img < snap.stream")
    let copy = try s.read("copy.img")
    XCTAssertEqual(copy, atT1)
    XCTAssertEqual(block(copy, 2, bs), content("3b"))
    XCTAssertNotEqual(copy, try s.read("backup.img"))
  }

  // MARK: (4) Refusals before any write

  func testSizeMismatchesAreRefusedBeforeWriting() throws {
    let s = try Scratch()
    let size = 2 << 20 + 5000
    try makeImage(s, "a.img", size: size, seed: 3)
    try s.randomFile("b.img", size: size, seed: 4)
    try s.randomFile("c.img", size: size + 65536, seed: 5)
    let b0 = try s.read("b.img")
    let c0 = try s.read("c.img")
    try sh(s, "overwrite-map create --like b.img m.map")
    try sh(s, "overwrite-map create --size \(size + 65536) other-size.map")
    try sh(s, "overwrite-map create --like b.img --block-size 4K other-bs.map")
    try snapshot(s, "a.img", to: "a.stream")
    let maps = ["m.map", "other-size.map", "other-bs.map"]
    let before = try maps.map { try s.read($0) }

    // A target of another size, with and without a map.
    assertFails(
      try RRTCommand.shell("merge-snapshot c.img < a.stream", cwd: s.url.path), status: 1,
      mentioning: "\(size)-byte device but c.img has \(size + 65536) bytes")
    assertFails(
      try RRTCommand.shell("merge-snapshot --force c.img < a.stream", cwd: s.url.path), status: 1,
      mentioning: "c.img has")
    assertFails(
      try RRTCommand.shell("merge-snapshot --map other-size.map c.img < a.stream", cwd: s.url.path), status: 1,
      mentioning: "bytes")
    XCTAssertTrue(try s.read("c.img") == c0)
    // A map of another size or block size; --force does not override sizes.
    for force in [[], ["--force"]] {
      assertFails(
        try RRTCommand.run(
          "merge-snapshot", force + ["--map", "other-size.map", "-i", "a.stream", "b.img"], cwd: s.url.path),
        status: 1,
        mentioning: "describes \(size + 65536) bytes")
      assertFails(
        try RRTCommand.run(
          "merge-snapshot", force + ["--map", "other-bs.map", "-i", "a.stream", "b.img"], cwd: s.url.path),
        status: 1,
        mentioning: "block size 4096")
    }
    // A stream in other blocks than the map: 4 KiB stream, 64 KiB map.
    try snapshot(s, "a.img", to: "a4k.stream", ["--block-size", "4K"])
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--map", "m.map", "-i", "a4k.stream", "b.img"], cwd: s.url.path), status: 1,
      mentioning: "block size 65536")
    XCTAssertTrue(try s.read("b.img") == b0, "a refused merge wrote the target")
    XCTAssertEqual(try maps.map { try s.read($0) }, before, "a refused merge changed a map")
    // And the good map does merge.
    try sh(s, "merge-snapshot --quiet --map m.map b.img < a.stream")
    XCTAssertTrue(try s.read("b.img") == (try s.read("a.img")))
  }

  func testStreamOlderThanTheMapIsRefusedUnlessForced() throws {
    let s = try Scratch()
    let size = 1 << 20
    try makeImage(s, "a.img", size: size, seed: 6)
    try s.randomFile("b.img", size: size, seed: 7)
    let b0 = try s.read("b.img")
    // The snapshot first, then the map: the stream could undo writes the map never saw.
    let early = try snapshot(s, "a.img", to: "early.stream")
    usleep(2000)
    try sh(s, "overwrite-map create --like b.img m.map")
    let map0 = try s.read("m.map")
    let refused = try RRTCommand.shell("merge-snapshot --map m.map b.img < early.stream", cwd: s.url.path)
    assertFails(refused, status: 1, mentioning: "before the map started tracking")
    XCTAssertTrue(refused.stderr.contains("--force"), refused.stderr)
    XCTAssertTrue(try s.read("b.img") == b0)
    XCTAssertEqual(try s.read("m.map"), map0)
    // A later stream, but not later by the allowed clock skew.
    let late = try snapshot(s, "a.img", to: "late.stream")
    assertFails(
      try RRTCommand.shell("merge-snapshot --clock-skew 3600 --map m.map b.img < late.stream", cwd: s.url.path),
      status: 1,
      mentioning: "clock skew")
    XCTAssertTrue(try s.read("b.img") == b0)
    XCTAssertEqual(try s.read("m.map"), map0)
    // --force merges the early stream, with a warning.
    let forced = try RRTCommand.shell("merge-snapshot --force --json --map m.map b.img < early.stream", cwd: s.url.path)
    XCTAssertEqual(forced.status, 0, forced.stderr)
    XCTAssertTrue(forced.stderr.contains("warning"), forced.stderr)
    XCTAssertTrue(forced.stderr.contains("before the map started tracking"), forced.stderr)
    XCTAssertTrue(try s.read("b.img") == (try s.read("a.img")))
    let stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, 16)
    XCTAssertEqual(stats["last_merged_stream"] as? String, early)
    XCTAssertNotEqual(early, late)
  }

  func testIncrementalStreamNeedsItsBaseMergedLast() throws {
    let s = try Scratch()
    let size = 1 << 20 + 777
    try makeImage(s, "a.img", size: size, seed: 8)
    try s.randomFile("b.img", size: size, seed: 9)
    let b0 = try s.read("b.img")
    try sh(s, "overwrite-map create --like b.img m.map")
    let full = try snapshot(s, "a.img", to: "full.stream")
    let inc = try snapshot(s, "a.img", to: "inc.stream", ["--base", full])
    try snapshot(s, "a.img", to: "stray.stream", ["--base", "0123456789abcdef0123456789abcdef"])
    let map0 = try s.read("m.map")

    // Nothing merged yet: the incremental stream has no base here.
    let refused = try RRTCommand.shell("merge-snapshot --map m.map b.img < inc.stream", cwd: s.url.path)
    assertFails(refused, status: 1, mentioning: "applies on top of stream \(full)")
    XCTAssertTrue(refused.stderr.contains("none"), refused.stderr)
    // Without a map its base cannot be checked at all.
    assertFails(
      try RRTCommand.shell("merge-snapshot b.img < inc.stream", cwd: s.url.path), status: 1, mentioning: "without --map"
    )
    XCTAssertTrue(try s.read("b.img") == b0)
    XCTAssertEqual(try s.read("m.map"), map0)

    // The full stream first: the map records it as the last merged stream.
    try sh(s, "merge-snapshot --quiet --map m.map b.img < full.stream")
    XCTAssertEqual(try mapStats(s.path("m.map"))["last_merged_stream"] as? String, full)
    // A stream on another base is still refused; the map is unchanged.
    let map1 = try s.read("m.map")
    assertFails(
      try RRTCommand.shell("merge-snapshot --map m.map b.img < stray.stream", cwd: s.url.path), status: 1,
      mentioning: "the last stream merged into this device is \(full)")
    XCTAssertEqual(try s.read("m.map"), map1)
    // The incremental stream on that base is accepted and becomes the last merged one.
    let r = try sh(s, "merge-snapshot --json --map m.map b.img < inc.stream")
    let o = try json(r.data)
    XCTAssertEqual(o["base_stream_id"] as? String, full)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertEqual(try mapStats(s.path("m.map"))["last_merged_stream"] as? String, inc)
    // --check verifies an incremental stream alone.
    try sh(s, "merge-snapshot --check --quiet < inc.stream")
  }

  // MARK: (5)-(7) Damaged and truncated streams, --check, --dry-run

  /// 4 MiB of random data in 64 KiB blocks (every block a raw DATA record),
  /// a target of other random data, and a map of the target made before the stream.
  func damageSetup(_ s: Scratch) throws -> (a: Data, b: Data, id: String, stream: Data) {
    try s.randomFile("a.img", size: 4 << 20, seed: 10)
    try s.randomFile("b.img", size: 4 << 20, seed: 11)
    try sh(s, "overwrite-map create --like b.img m.map")
    let id = try snapshot(s, "a.img", to: "good.stream")
    let stream = try s.read("good.stream")
    XCTAssertEqual(stream.count, dataRecordStart(64, nameLength: 5) + 84, "64 raw DATA records and END")
    return (try s.read("a.img"), try s.read("b.img"), id, stream)
  }

  func testDamagedStreamStopsAndAGoodCopyFinishes() throws {
    let s = try Scratch()
    let (a, b0, id, good) = try damageSetup(s)
    let damagedAt = dataRecordStart(30, nameLength: 5)  // block 30, record 31
    var bad = good
    bad[damagedAt + 16 + 16 + 1000] ^= 0x20
    try s.file("bad.stream", bad)

    let r = try RRTCommand.shell("merge-snapshot --map m.map b.img < bad.stream", cwd: s.url.path)
    assertFails(r, status: 1, mentioning: "record 31 at byte \(damagedAt)")
    XCTAssertTrue(r.stderr.contains("record") && r.stderr.contains("byte"), r.stderr)
    XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr)")
    // Blocks 0-29 applied and current; 30-63 untouched and not current.
    let b1 = try s.read("b.img")
    XCTAssertTrue(b1.prefix(30 * 65536) == a.prefix(30 * 65536), "blocks before the damage were not applied")
    XCTAssertTrue(b1.suffix(from: 30 * 65536) == b0.suffix(from: 30 * 65536), "blocks from the damage on were written")
    XCTAssertEqual(try extents(s.path("m.map")), ["0 1966080"])
    var stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, 30)
    XCTAssertTrue(stats["last_merged_stream"] is NSNull, "an incomplete merge is not recorded as merged")

    // The good copy: skips what is current, writes the rest.
    let again = try sh(s, "merge-snapshot --json --map m.map b.img < good.stream")
    let o = try json(again.data)
    XCTAssertEqual(o["skipped_current_blocks"] as? Int, 30)
    XCTAssertEqual(o["written_blocks"] as? Int, 34)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertTrue(try s.read("b.img") == a)
    stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, 64)
    XCTAssertEqual(stats["last_merged_stream"] as? String, id)
  }

  func testTruncatedStreamIsIncomplete() throws {
    let s = try Scratch()
    let (a, b0, id, good) = try damageSetup(s)
    let cut = dataRecordStart(20, nameLength: 5)  // a record boundary: blocks 0-19 complete
    try s.file("cut.stream", good.prefix(cut))
    let r = try RRTCommand.shell("merge-snapshot --map m.map b.img < cut.stream", cwd: s.url.path)
    assertFails(r, status: 1, mentioning: "truncated")
    XCTAssertTrue(r.stderr.contains("record 21 at byte \(cut)"), r.stderr)
    let b1 = try s.read("b.img")
    XCTAssertTrue(b1.prefix(20 * 65536) == a.prefix(20 * 65536))
    XCTAssertTrue(b1.suffix(from: 20 * 65536) == b0.suffix(from: 20 * 65536))
    var stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, 20)
    XCTAssertTrue(stats["last_merged_stream"] is NSNull, "a truncated stream is not recorded as merged")
    // Cut inside a record, and just before the END record's last byte.
    for at in [cut + 100, good.count - 1, good.count - 84] {
      try s.file("cut2.stream", good.prefix(at))
      assertFails(
        try RRTCommand.shell("merge-snapshot --map m.map b.img < cut2.stream", cwd: s.url.path), status: 1,
        mentioning: "truncated")
      XCTAssertTrue(try mapStats(s.path("m.map"))["last_merged_stream"] is NSNull, "cut at \(at)")
    }
    // Empty input.
    assertFails(
      try RRTCommand.shell("merge-snapshot --map m.map b.img < /dev/null", cwd: s.url.path), status: 1,
      mentioning: "empty input")
    // The whole stream completes it.
    try sh(s, "merge-snapshot --quiet --map m.map b.img < good.stream")
    stats = try mapStats(s.path("m.map"))
    XCTAssertEqual(stats["last_merged_stream"] as? String, id)
    XCTAssertTrue(try s.read("b.img") == a)
  }

  func testCheckVerifiesAStreamAlone() throws {
    let s = try Scratch()
    let (_, b0, id, good) = try damageSetup(s)
    let ok = try sh(s, "merge-snapshot --check --json < good.stream")
    let o = try json(ok.data)
    XCTAssertEqual(o["mode"] as? String, "check")
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertEqual(o["written_blocks"] as? Int, 64)
    XCTAssertEqual(o["stream_id"] as? String, id)
    XCTAssertEqual(o["stream_bytes"] as? Int, good.count)
    try sh(s, "merge-snapshot --check -i good.stream")
    var bad = good
    let damagedAt = dataRecordStart(40, nameLength: 5)
    bad[damagedAt + 5000] ^= 0x01
    try s.file("bad.stream", bad)
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--check", "-i", "bad.stream"], cwd: s.url.path), status: 1,
      mentioning: "record 41 at byte \(damagedAt)")
    try s.file("cut.stream", good.prefix(dataRecordStart(10, nameLength: 5)))
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--check", "-i", "cut.stream"], cwd: s.url.path), status: 1,
      mentioning: "truncated")
    // The END record's digest: one byte of the preamble's reserved field only the SHA-256 covers.
    var reserved = good
    reserved[14] ^= 0x01
    try s.file("reserved.stream", reserved)
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--check", "-i", "reserved.stream"], cwd: s.url.path), status: 1,
      mentioning: "digest"
    )
    // Not a stream at all.
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--check", "-i", "b.img"], cwd: s.url.path), status: 1,
      mentioning: "bad magic")
    XCTAssertTrue(try s.read("b.img") == b0)
  }

  func testDryRunWritesNothingAndCounts() throws {
    let s = try Scratch()
    // 64 blocks of 64 KiB: blocks 10-12 zero, the rest random.
    try s.randomFile("a.img", size: 4 << 20, seed: 12)
    var a = try s.read("a.img")
    a.replaceSubrange(10 * 65536..<13 * 65536, with: Data(count: 3 * 65536))
    try s.file("a.img", a)
    try s.randomFile("b.img", size: 4 << 20, seed: 13)
    let b0 = try s.read("b.img")
    try sh(
      s, "overwrite-map create --like b.img m.map && overwrite-map set m.map 0 128K && overwrite-map set m.map 640K 64K"
    )
    try snapshot(s, "a.img", to: "a.stream")
    let map0 = try s.read("m.map")

    let dry = try sh(s, "merge-snapshot --dry-run --json --map m.map b.img < a.stream")
    let o = try json(dry.data)
    XCTAssertEqual(o["mode"] as? String, "dry-run")
    XCTAssertEqual(o["written_blocks"] as? Int, 59, "61 data blocks less 2 current")
    XCTAssertEqual(o["zero_blocks"] as? Int, 2, "3 zero blocks less 1 current")
    XCTAssertEqual(o["skipped_current_blocks"] as? Int, 3)
    XCTAssertEqual(o["bytes_written"] as? Int, 61 * 65536)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertTrue(try s.read("b.img") == b0, "--dry-run wrote the target")
    XCTAssertEqual(try s.read("m.map"), map0, "--dry-run changed the map")
    // Human summary says "would write".
    let text = try sh(s, "merge-snapshot --dry-run --map m.map b.img < a.stream")
    XCTAssertTrue(text.stderr.contains("would write 59 blocks"), text.stderr)
    XCTAssertTrue(try s.read("b.img") == b0)

    // The real merge does what the dry run said.
    let real = try sh(s, "merge-snapshot --json --map m.map b.img < a.stream")
    let r = try json(real.data)
    for key in ["written_blocks", "zero_blocks", "skipped_current_blocks", "bytes_written"] {
      XCTAssertEqual(r[key] as? Int, o[key] as? Int, key)
    }
    let b1 = try s.read("b.img")
    XCTAssertTrue(b1.prefix(2 * 65536) == b0.prefix(2 * 65536), "current blocks 0-1 overwritten")
    XCTAssertTrue(block(b1, 10, 65536) == block(b0, 10, 65536), "current block 10 overwritten")
    XCTAssertTrue(b1[(2 * 65536)..<(10 * 65536)] == a[(2 * 65536)..<(10 * 65536)])
    XCTAssertTrue(b1[(11 * 65536)...] == a[(11 * 65536)...])
    XCTAssertEqual(try mapStats(s.path("m.map"))["set_blocks"] as? Int, 64)
  }

  // MARK: (8) Terminals and usage

  func testTerminalsAndUsageErrors() throws {
    let s = try Scratch()
    try s.randomFile("a.img", size: 1 << 20, seed: 14)
    try s.randomFile("b.img", size: 1 << 20, seed: 15)
    let b0 = try s.read("b.img")
    if RRTEnv.have("script") {
      let snap = try RRTCommand.shell("script -qec '\(Tools.path("snapshot")) a.img' /dev/null", cwd: s.url.path)
      XCTAssertTrue(snap.stdout.contains("refusing to write a binary stream to a terminal"), snap.stdout)
      XCTAssertLessThan(snap.data.count, 1000, "stream bytes reached the terminal")
      XCTAssertNotEqual(snap.status, 0)
      let merge = try RRTCommand.shell("script -qec '\(Tools.path("merge-snapshot")) b.img' /dev/null", cwd: s.url.path)
      XCTAssertTrue(merge.stdout.contains("refusing to read a binary stream from a terminal"), merge.stdout)
      // -o FILE is fine from a terminal.
      let toFile = try RRTCommand.shell(
        "script -qec '\(Tools.path("snapshot")) --quiet -o t.stream a.img' /dev/null", cwd: s.url.path)
      XCTAssertEqual(toFile.status, 0, toFile.stdout)
      XCTAssertGreaterThan(try s.read("t.stream").count, 1 << 20)
    }
    try sh(s, "snapshot --quiet a.img > a.stream")
    let usage: [([String], String)] = [
      ([], "give the TARGET"),
      (["--check", "b.img"], "drop TARGET"),
      (["--check", "--map", "m.map"], "drop --map"),
      (["--check", "--dry-run"], "one of --check and --dry-run"),
      (["--map", "-", "b.img"], "map"),
      (["--clock-skew", "-5", "b.img"], "clock-skew"),
    ]
    for (args, fragment) in usage {
      let r = try RRTCommand.run("merge-snapshot", args, stdin: try s.read("a.stream"), cwd: s.url.path)
      XCTAssertEqual(r.status, 64, "\(args): \(r.stderr)")
      XCTAssertTrue(r.stderr.contains(fragment), "\(args): \(r.stderr)")
    }
    XCTAssertTrue(try s.read("b.img") == b0)
    XCTAssertEqual(try RRTCommand.run("snapshot", ["--threads", "0", "a.img"]).status, 64)
    XCTAssertEqual(try RRTCommand.run("snapshot", ["--base", "xyz", "a.img"]).status, 64)
    XCTAssertEqual(try RRTCommand.run("snapshot", ["--block-size", "1000", "a.img"]).status, 64)
    assertFails(
      try RRTCommand.run("snapshot", ["-o", s.path("x.stream"), s.path("missing.img")]), status: 1,
      mentioning: "missing.img"
    )
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("x.stream")))
    assertFails(
      try RRTCommand.run("merge-snapshot", ["-i", s.path("a.stream"), s.path("missing.img")]), status: 1,
      mentioning: "missing.img")
  }

  // MARK: Adversarial streams

  /// CRC-32C (Castagnoli), bit by bit, for streams built by hand.
  func crc32c(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes {
      crc ^= UInt32(b)
      for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
  }

  func le(_ v: UInt64, _ width: Int) -> [UInt8] { (0..<width).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

  func record(_ type: UInt16, seq: UInt64, body: [UInt8]) -> [UInt8] {
    let head = le(UInt64(type), 2) + le(1, 2) + le(UInt64(body.count), 4) + le(seq, 8)
    return head + body + le(UInt64(crc32c(head + body)), 4)
  }

  /// Preamble and a HEADER record, fields as the format table lays them out.
  func handHeader(blockSize: UInt32 = 4096, deviceSize: UInt64, blockCount: UInt64) -> [UInt8] {
    var h = le(UInt64(blockSize), 4) + le(0, 4) + le(deviceSize, 8) + le(blockCount, 8)
    h += Array(1...16) + [UInt8](repeating: 0, count: 16) + le(UInt64(Date().timeIntervalSince1970 * 1e9), 8)
    h += [0, 1, 1, 0, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 16) + le(blockCount, 8) + le(1, 2) + [0x78]
    return Array("DRSTR\r\n\u{1A}".utf8) + le(1, 2) + le(0, 2) + le(0, 4) + record(1, seq: 0, body: h)
  }

  /// Streams with valid checksums but impossible contents are refused with a
  /// message, never a crash.
  func testAdversarialStreamsAreRefusedWithoutACrash() throws {
    let s = try Scratch()
    let cases: [(String, [UInt8], String)] = [
      // A device of 0 bytes (0 blocks) and a DATA record for block 0.
      (
        "empty-device DATA",
        handHeader(deviceSize: 0, blockCount: 0)
          + record(2, seq: 1, body: le(0, 8) + le(4096, 4) + [0, 0, 0, 0] + [UInt8](repeating: 7, count: 4096)),
        "record 1 at byte 135"
      ),
      // A device of 0 bytes and a ZERO record.
      (
        "empty-device ZERO", handHeader(deviceSize: 0, blockCount: 0) + record(3, seq: 1, body: le(0, 8) + le(1, 8)),
        "record 1 at byte 135"
      ),
      // A device of 2^64 - 1 bytes and a ZERO record for its (partial) last block.
      (
        "huge-device ZERO",
        handHeader(deviceSize: UInt64.max, blockCount: 1 << 52)
          + record(3, seq: 1, body: le((1 << 52) - 1, 8) + le(1, 8)),
        // Refused at its header: no device size that large is supported.
        "record 0 at byte 16"
      ),
    ]
    for (name, bytes, position) in cases {
      try s.file("adv.stream", Data(bytes))
      let r = try RRTCommand.run("merge-snapshot", ["--check", "-i", "adv.stream"], cwd: s.url.path)
      let crash = r.stderr.split(separator: "\n").first { $0.contains("runtime failure") || $0.contains("Fatal error") }
      if let crash {
        XCTFail("\(name): merge-snapshot crashed (status \(r.status)) instead of refusing the stream: \(crash)")
        continue
      }
      assertFails(r, status: 1, mentioning: position)
    }
  }

  /// A DATA record whose checksum is right but whose LZ4 payload does not
  /// decode: the merge stops there, naming that record; its block is not written.
  func testUndecodableLZ4BlockNamesItsRecord() throws {
    let s = try Scratch()
    var rng = SplitMix64(seed: 31)
    let garbage = (0..<100).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    let raw = (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    let header = handHeader(deviceSize: 8192, blockCount: 2)
    XCTAssertEqual(header.count, 135, "preamble 16 + HEADER 16 + 98 + 1 + 4")
    let first = record(2, seq: 1, body: le(0, 8) + le(4096, 4) + [0, 0, 0, 0] + raw)
    let bad = record(2, seq: 2, body: le(1, 8) + le(4096, 4) + [1, 0, 0, 0] + garbage)
    try s.file("lz4.stream", Data(header + first + bad))
    let badAt = 135 + first.count
    let check = try RRTCommand.run("merge-snapshot", ["--check", "-i", "lz4.stream"], cwd: s.url.path)
    assertFails(check, status: 1, mentioning: "block 1 does not decompress")
    XCTAssertTrue(
      check.stderr.contains("record 2 at byte \(badAt)"),
      "the damaged record is record 2 at byte \(badAt): \(check.stderr)")
    // Merging: block 0 (before the damage) is applied, block 1 is not.
    let target = Data(repeating: 0xEE, count: 8192)
    try s.file("t.img", target)
    let merge = try RRTCommand.run("merge-snapshot", ["-i", "lz4.stream", "t.img"], cwd: s.url.path)
    assertFails(merge, status: 1, mentioning: "does not decompress")
    let t = try s.read("t.img")
    XCTAssertEqual(Array(t.prefix(4096)), raw)
    XCTAssertEqual(t.suffix(from: 4096), target.suffix(from: 4096))
  }

  /// A stream whose END digest does not match: the merge fails and the
  /// stream is not recorded as merged.
  func testDigestMismatchIsNotRecordedAsMerged() throws {
    let s = try Scratch()
    let (_, _, _, good) = try damageSetup(s)
    var bad = good
    bad[13] ^= 0x01  // the preamble's reserved bytes: only the SHA-256 covers them
    try s.file("bad.stream", bad)
    let r = try RRTCommand.shell("merge-snapshot --map m.map b.img < bad.stream", cwd: s.url.path)
    assertFails(r, status: 1, mentioning: "digest does not match")
    XCTAssertTrue(try mapStats(s.path("m.map"))["last_merged_stream"] is NSNull)
    // Trailing bytes after a good END record are refused too.
    try s.file("tail.stream", good + Data([0]))
    assertFails(
      try RRTCommand.run("merge-snapshot", ["--check", "-i", "tail.stream"], cwd: s.url.path), status: 1,
      mentioning: "after the END record")
  }

  // MARK: (9) Loop devices

  func testLoopDeviceAsTargetAndAsSource() throws {
    let s = try Scratch()
    let size = 4 << 20
    let a = try makeImage(s, "a.img", size: size, seed: 16)
    try s.randomFile("t.img", size: size, seed: 17)
    try LoopDevice.with(image: s.path("t.img")) { device in
      let r = try sh(s, "snapshot --quiet --block-size 4K a.img | merge-snapshot --json \(device)")
      let o = try json(r.data)
      XCTAssertEqual(o["complete"] as? Bool, true)
      XCTAssertGreaterThan(o["zero_blocks"] as? Int ?? 0, 0, "the zero run and the hole are zeroed on the device")
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", [s.path("a.img"), device]).status, 0)
      // The device as a source, into an image file.
      try s.randomFile("c.img", size: size, seed: 18)
      try sh(s, "snapshot --quiet \(device) | merge-snapshot --quiet c.img")
      XCTAssertTrue(try s.read("c.img") == a)
      // Through a map of the device.
      try sh(s, "overwrite-map create --like \(device) dev.map")
      try s.randomFile("d.img", size: size, seed: 19)
      try sh(s, "snapshot --quiet -o d.stream d.img && merge-snapshot --quiet --map dev.map -i d.stream \(device)")
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", [s.path("d.img"), device]).status, 0)
      XCTAssertEqual(try mapStats(s.path("dev.map"))["set_blocks"] as? Int, 64)
    }
    XCTAssertTrue(try s.read("t.img") == (try s.read("d.img")), "the backing file holds what was merged")
  }
}
