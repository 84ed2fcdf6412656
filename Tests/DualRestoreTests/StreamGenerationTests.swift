// The GENERATION record: which tracking generations a stream carries (the
// writes since a change map's start, as of its end). The parser returns a
// good one and refuses each bad form and each bad place with one sentence
// naming the record; the writer puts it after the HEADER, not critical; a
// flipped byte anywhere in it is caught; and a reader that does not know the
// type skips it.
//
// Hand-built streams use StreamParserTests' independent encoders (the format
// table, a bit-by-bit CRC-32C, OpenSSL's SHA-256).

import Foundation
import XCTest

@testable import DualRestore

final class StreamGenerationTests: XCTestCase {
  typealias P = StreamParserTests
  typealias L = StreamLineageTests

  static let generationBytes: [UInt8] = Array(0xC0...0xCF)
  static let since: Int64 = 1_700_000_000_000_000_011
  static let asOf: Int64 = 1_700_000_100_000_000_013

  /// A GENERATION body by the table: map id, changes since, as of, reserved.
  static func generationBody(
    id: [UInt8] = generationBytes, since: Int64 = since, asOf: Int64 = asOf, reserved: UInt64 = 0
  ) -> [UInt8] {
    id + P.le(UInt64(bitPattern: since), 8) + P.le(UInt64(bitPattern: asOf), 8) + P.le(reserved, 8)
  }

  /// A GENERATION record: type 9, flags 0 (not critical).
  static func generationRecord(seq: UInt64, body: [UInt8] = generationBody(), flags: UInt16 = 0) -> [UInt8] {
    P.record(type: 9, flags: flags, seq: seq, body: body)
  }

  func testAGoodGenerationIsReturnedBeforeTheBlocks() throws {
    let start = P.handStart()
    let s = L.finish(start + Self.generationRecord(seq: 1), records: 2)
    let p = P.parseWhole(s)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "G", "D0:4096:raw", "E"])
    guard case .generation(let g) = p.records[2] else { return XCTFail("no generation: \(p.records)") }
    XCTAssertEqual(g.generation, ID128(bytes: Self.generationBytes[...]))
    XCTAssertEqual(g.changesSince.nanosecondsSinceEpoch, Self.since)
    XCTAssertEqual(g.asOf.nanosecondsSinceEpoch, Self.asOf)
    XCTAssertEqual(p.parser.generation, g)
    XCTAssertNil(P.readWithReader(s).error)
    // The library's encoder produces the table's bytes, framing flags 0.
    XCTAssertEqual(
      StreamFormat.record(.generation, sequence: 1, body: StreamFormat.generationBody(g)),
      Self.generationRecord(seq: 1))
    // After a LINEAGE record, and a full stream's (changes since 0).
    let full = Self.generationBody(since: 0)
    let afterLineage = start + L.lineageRecord(seq: 1) + Self.generationRecord(seq: 2, body: full)
    let q = P.parseWhole(L.finish(afterLineage, records: 3))
    XCTAssertNil(q.error)
    XCTAssertEqual(q.records.map(\.shape), ["P", "H", "L", "G", "D0:4096:raw", "E"])
    // Changes since and as of may be the same instant (an empty generation).
    XCTAssertNil(
      P.parseWhole(
        L.finish(start + Self.generationRecord(seq: 1, body: Self.generationBody(since: Self.asOf)), records: 2)
      ).error)
  }

  func testAReaderThatDoesNotKnowTheTypeSkipsIt() {
    // An older build skips type 9 as any unknown type not marked critical;
    // shown with a type this build does not know either.
    let s = L.finish(P.handStart() + P.record(type: 61, flags: 0, seq: 1, body: Self.generationBody()), records: 2)
    let p = P.parseWhole(s)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "S61", "D0:4096:raw", "E"])
    XCTAssertFalse(StreamFormat.RecordType.generation.isCritical)
  }

  func testEachBadGenerationIsRefusedWithASentence() {
    let start = P.handStart()
    func refused(_ s: [UInt8], _ needles: [String], good: Int = 0, _ line: UInt = #line) {
      let p = P.parseWhole(s)
      guard let error = p.error else { return XCTFail("accepted", line: line) }
      for n in needles { XCTAssertTrue(error.contains(n), "\(error) lacks \(n)", line: line) }
      XCTAssertEqual(p.records.filter { $0.shape == "G" }.count, good, "returned the bad record", line: line)
    }
    func one(_ body: [UInt8]) -> [UInt8] { L.finish(start + Self.generationRecord(seq: 1, body: body), records: 2) }
    let at = "record 1 at byte \(start.count)"
    refused(one(Self.generationBody() + [0]), [at, "GENERATION record has 41 bytes, not 40"])
    refused(one(Array(Self.generationBody().prefix(39))), [at, "39 bytes"])
    refused(one(Self.generationBody(reserved: 1)), [at, "reserved bytes"])
    refused(one(Self.generationBody(asOf: 0)), [at, "no instant"])
    refused(one(Self.generationBody(since: Self.asOf + 1)), [at, "before they started"])
    refused(one(Self.generationBody(since: -5)), [at, "before they started"])
    // A second one.
    let twice = start + Self.generationRecord(seq: 1) + Self.generationRecord(seq: 2)
    refused(L.finish(twice, records: 3), ["record 2", "a second GENERATION record"], good: 1)
    // After a block record.
    let payload = P.randomBytes(4096, seed: 3)
    var late = start + P.record(type: 2, seq: 1, body: P.dataBody(block: 0, length: 4096, payload: payload))
    late += Self.generationRecord(seq: 2)
    refused(late, ["record 2", "after block records"])
    // A LINEAGE record after it: the LINEAGE must follow the HEADER directly.
    let before = start + Self.generationRecord(seq: 1) + L.lineageRecord(seq: 2)
    let p = P.parseWhole(L.finish(before, records: 3))
    XCTAssertTrue(p.error?.contains("it must follow the HEADER directly") ?? false, "\(p.error ?? "accepted")")
    // Before the HEADER.
    let first = P.preamble() + Self.generationRecord(seq: 0)
    XCTAssertTrue(P.parseWhole(first).error?.contains("the first record is not a HEADER") ?? false)
  }

  /// A small stream written by SnapshotWriter with a GENERATION record.
  func writtenStream(generation: StreamFormat.Generation) throws -> [UInt8] {
    let dir = NSTemporaryDirectory() + "sgt-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    try P.makeImage(
      dir + "/t.img", size: 3 * 512 + 100,
      parts: [(0, P.randomBytes(512, seed: 3)), (2 * 512, P.randomBytes(612, seed: 4))])
    let device = try Device(path: dir + "/t.img")
    let sink = try OutputSink(.file(dir + "/t.stream"), what: "stream")
    var options = SnapshotWriter.Options(blockSize: 512, workers: 1)
    options.generation = generation
    _ = try SnapshotWriter.write(device, to: sink, options: options)
    try sink.finish()
    return Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/t.stream")))
  }

  func testTheWriterPutsItAfterTheHeaderAndEveryFlippedByteOfItIsCaught() throws {
    let g = StreamFormat.Generation(
      generation: ID128(bytes: Self.generationBytes[...]), changesSince: .unset,
      asOf: Instant(nanosecondsSinceEpoch: Self.asOf))
    let stream = try writtenStream(generation: g)
    let whole = P.parseWhole(stream)
    XCTAssertNil(whole.error)
    XCTAssertEqual(whole.records.map(\.shape), ["P", "H", "G", "D0:512:raw", "Z1+1", "D2:512:raw", "D3:100:raw", "E"])
    XCTAssertEqual(whole.parser.generation, g)
    // Every byte of the GENERATION record, framing, body and CRC: a flip is
    // caught and named as that record, and nothing from it on is returned.
    let from = whole.starts[2]
    let to = whole.starts[3]
    XCTAssertEqual(to - from, 16 + 40 + 4)
    for offset in from..<to {
      for mask: UInt8 in [0x01, 0x80] {
        var bad = stream
        bad[offset] ^= mask
        let r = P.readWithReader(bad)
        guard let error = r.error else {
          XCTFail("flip 0x\(String(mask, radix: 16)) at byte \(offset) read as a complete, clean stream")
          continue
        }
        XCTAssertTrue(error.contains("record 1 at byte \(from)"), "flip at \(offset): \(error)")
        XCTAssertEqual(r.records.map(\.shape), ["P", "H"], "flip at \(offset)")
      }
    }
    // The writer refuses a record the parser would refuse.
    let backwards = StreamFormat.Generation(
      generation: .none, changesSince: Instant(nanosecondsSinceEpoch: Self.asOf + 1),
      asOf: Instant(nanosecondsSinceEpoch: Self.asOf))
    XCTAssertThrowsError(try writtenStream(generation: backwards))
  }
}
