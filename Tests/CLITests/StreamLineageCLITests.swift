// merge-snapshot and a compacted full stream: a mirror seeded from the
// compaction of a full stream and its first incremental (made here by the
// library's writer, as no command makes one yet) records the incremental it
// stands for, so the next incremental of the chain merges on top of it
// without --force; the same blocks without the LINEAGE record do not let it.

import DualRestore
import Foundation
import TestSupport
import XCTest

final class StreamLineageCLITests: XCTestCase {
  func json(_ r: RRTCommand.Result, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: r.data) as? [String: Any], "not JSON: \(r.stdout)", file: file, line: line)
  }

  func run(_ s: Scratch, _ tool: String, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws
    -> RRTCommand.Result
  {
    let r = try RRTCommand.run(tool, args, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, "\(tool) \(args): \(r.stderr)", file: file, line: line)
    return r
  }

  /// The stream's id from snapshot --json.
  func snapshot(_ s: Scratch, _ args: [String]) throws -> String {
    try json(try run(s, "snapshot", ["--json", "--block-size", "4K"] + args))["stream_id"] as? String ?? ""
  }

  func lastMerged(_ s: Scratch, _ map: String) throws -> String? {
    try json(try run(s, "overwrite-map", ["stats", "--json", map]))["last_merged_stream"] as? String
  }

  /// The HEADER of a stream file, by the library's reader.
  func header(_ path: String) throws -> StreamFormat.Header {
    let fd = open(path, O_RDONLY)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    let reader = StreamReader(fd: fd, name: path)
    while let r = try reader.next() { if case .header(let h) = r { return h } }
    throw ToolkitError("\(path) has no header")
  }

  /// Changes the 4 KiB blocks `blocks` of a.img and returns a map selecting them.
  func change(_ s: Scratch, _ blocks: [Int], map: String, seed: UInt64) throws {
    var rng = SplitMix64(seed: seed)
    _ = try run(s, "overwrite-map", ["create", "--like", "a.img", "--block-size", "4K", map])
    for b in blocks {
      try s.patch("a.img", at: b * 4096, rng.bytes(4096))
      _ = try run(s, "overwrite-map", ["set", map, "\(b * 4096)", "4096"])
    }
  }

  func testTheIncrementalAfterTheCompactedPartMergesNextWithoutForce() throws {
    let s = try Scratch()
    let size = 64 * 4096
    try s.randomFile("a.img", size: size, seed: 41)
    let f0 = try snapshot(s, ["-o", "f0.stream", "a.img"])
    try change(s, [2, 9, 40], map: "d1.map", seed: 42)
    let i1 = try snapshot(s, ["--map", "d1.map", "--base", f0, "-o", "i1.stream", "a.img"])
    let i1Header = try header(s.path("i1.stream"))
    XCTAssertEqual(i1Header.streamID.description, i1)

    // The compaction of F0 and I1: the device as it is after I1.
    let sink = try OutputSink(.file(s.path("c.stream")), what: "stream")
    let lineage = StreamFormat.Lineage(
      standsFor: i1Header.streamID, standsForStarted: i1Header.started,
      firstCompacted: try XCTUnwrap(ID128(hex: f0)), compactedCount: 2)
    let written = try SnapshotWriter.write(
      try Device(path: s.path("a.img")), to: sink, options: SnapshotWriter.Options(blockSize: 4096, lineage: lineage))
    try sink.finish()
    let c = written.header.streamID.description
    let plain = try snapshot(s, ["-o", "plain.stream", "a.img"])
    let afterI1 = try s.read("a.img")

    try change(s, [0, 9, 63], map: "d2.map", seed: 43)
    _ = try snapshot(s, ["--map", "d2.map", "--base", i1, "-o", "i2.stream", "a.img"])
    let afterI2 = try s.read("a.img")
    XCTAssertNotEqual(afterI1, afterI2)

    // C into a fresh mirror: recorded as I1; the summary says so.
    _ = try RRTCommand.shell("truncate -s \(size) t.img p.img", cwd: s.url.path)
    let merged = try json(
      try run(s, "merge-snapshot", ["--json", "--mirror", "--map", "t.map", "-i", "c.stream", "t.img"]))
    XCTAssertEqual(merged["stream_id"] as? String, c)
    XCTAssertEqual(merged["stands_for"] as? String, i1)
    XCTAssertEqual(merged["complete"] as? Bool, true)
    XCTAssertEqual(try lastMerged(s, "t.map"), i1)
    XCTAssertTrue(try s.read("t.img") == afterI1)
    // --check reads it too, and says what it stands for.
    let check = try run(s, "merge-snapshot", ["--check", "-i", "c.stream"])
    XCTAssertTrue(check.stderr.contains("stream \(c) (standing for \(i1)) verified"), check.stderr)
    // I2 on I1 merges next, without --force, and the mirror is the device.
    let next = try run(s, "merge-snapshot", ["--mirror", "--map", "t.map", "-i", "i2.stream", "t.img"])
    XCTAssertFalse(next.stderr.contains("warning"), next.stderr)
    XCTAssertTrue(try s.read("t.img") == afterI2)

    // The same blocks without a lineage: I2 is refused as before, nothing written.
    let p = try json(
      try run(s, "merge-snapshot", ["--json", "--mirror", "--map", "p.map", "-i", "plain.stream", "p.img"]))
    XCTAssertTrue(p["stands_for"] is NSNull, "\(p)")
    let mapBefore = try s.read("p.map")
    let refused = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", "p.map", "-i", "i2.stream", "p.img"], cwd: s.url.path)
    assertFails(
      refused, status: 1,
      mentioning: "applies on top of stream \(i1), but the last stream merged into this device is \(plain)")
    XCTAssertTrue(try s.read("p.img") == afterI1)
    XCTAssertEqual(try s.read("p.map"), mapBefore)
  }
}
