// The LINEAGE record of a compacted full stream: the parser returns a good
// one and refuses each bad form with one sentence naming the record; the
// writer puts it right after the HEADER, not critical, in plaintext and
// encrypted streams alike; and a merge records a compacted stream as the
// stream it stands for, so the incremental that followed that stream merges
// next, while the time check takes the older of the two instants.
//
// Hand-built streams use StreamParserTests' independent encoders (the format
// table, a bit-by-bit CRC-32C, OpenSSL's SHA-256).

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class StreamLineageTests: XCTestCase {
  typealias P = StreamParserTests

  static let standsForBytes: [UInt8] = Array(0xA0...0xAF)
  static let firstBytes: [UInt8] = Array(0xB0...0xBF)

  /// A LINEAGE body by the table: stands-for id, its instant, first id, count, reserved.
  static func lineageBody(
    standsFor: [UInt8] = standsForBytes, started: Int64 = 1_690_000_000_000_000_007, first: [UInt8] = firstBytes,
    count: UInt32 = 3, reserved: UInt32 = 0
  ) -> [UInt8] {
    standsFor + P.le(UInt64(bitPattern: started), 8) + first + P.le(UInt64(count), 4) + P.le(UInt64(reserved), 4)
  }

  /// A LINEAGE record: type 6, flags 0 (not critical).
  static func lineageRecord(seq: UInt64, body: [UInt8] = lineageBody(), flags: UInt16 = 0) -> [UInt8] {
    P.record(type: 6, flags: flags, seq: seq, body: body)
  }

  /// Closes `s` (whose last record has sequence `records - 1`) with one DATA
  /// record of block 0 and a correct END.
  static func finish(_ s: [UInt8], records: UInt64) -> [UInt8] {
    let payload = P.randomBytes(4096, seed: 11)
    var out = s + P.record(type: 2, seq: records, body: P.dataBody(block: 0, length: 4096, payload: payload))
    let digest = P.sha256(out)
    out += P.record(
      type: 4, seq: records + 1, body: P.endBody(data: 1, zero: 0, bytes: 4096, records: records + 1, digest: digest))
    return out
  }

  // MARK: The parser

  func testAGoodLineageIsReturnedRightAfterTheHeader() throws {
    let start = P.handStart()
    let s = Self.finish(start + Self.lineageRecord(seq: 1), records: 2)
    let p = P.parseWhole(s)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "L", "D0:4096:raw", "E"])
    XCTAssertEqual(p.starts[2], start.count)
    guard case .lineage(let l) = p.records[2] else { return XCTFail("no lineage: \(p.records)") }
    XCTAssertEqual(l.standsFor, ID128(bytes: Self.standsForBytes[...]))
    XCTAssertEqual(l.standsForStarted.nanosecondsSinceEpoch, 1_690_000_000_000_000_007)
    XCTAssertEqual(l.firstCompacted, ID128(bytes: Self.firstBytes[...]))
    XCTAssertEqual(l.compactedCount, 3)
    XCTAssertEqual(p.parser.lineage, l)
    // The END counts it and the digest covers it: the reader checks both.
    XCTAssertNil(P.readWithReader(s).error)
    // The library's encoder produces the table's bytes, framing flags 0.
    XCTAssertEqual(
      StreamFormat.record(.lineage, sequence: 1, body: StreamFormat.lineageBody(l)), Self.lineageRecord(seq: 1))
    // One stream compacted: it is the one stood for.
    let one = Self.lineageBody(first: Self.standsForBytes, count: 1)
    XCTAssertNil(P.parseWhole(Self.finish(start + Self.lineageRecord(seq: 1, body: one), records: 2)).error)
  }

  func testAReaderThatDoesNotKnowTheTypeSkipsIt() {
    // What an older build does with type 6: it is not critical, so it is
    // skipped as any unknown type is. Shown with a type this build does not know.
    let start = P.handStart()
    let unknown = P.record(type: 60, flags: 0, seq: 1, body: Self.lineageBody())
    let p = P.parseWhole(Self.finish(start + unknown, records: 2))
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "S60", "D0:4096:raw", "E"])
    XCTAssertFalse(StreamFormat.RecordType.lineage.isCritical)
    XCTAssertTrue(StreamFormat.RecordType.header.isCritical)
  }

  func assertRefused(
    _ s: [UInt8], _ needles: [String], file: StaticString = #filePath, line: UInt = #line
  ) {
    let p = P.parseWhole(s)
    guard let error = p.error else { return XCTFail("accepted: \(p.records)", file: file, line: line) }
    for n in needles { XCTAssertTrue(error.contains(n), "\"\(error)\" lacks \"\(n)\"", file: file, line: line) }
    XCTAssertFalse(
      p.records.contains { $0.shape == "E" }, "a refused stream was taken as whole", file: file, line: line)
  }

  func testEachBadLineageIsRefusedWithASentence() {
    let start = P.handStart()
    let at = start.count
    let l = Self.lineageRecord(seq: 1)
    // Twice.
    assertRefused(
      Self.finish(start + l + Self.lineageRecord(seq: 2), records: 3),
      ["record 2 at byte \(at + l.count)", "a second LINEAGE record"])
    // After a DATA record.
    let data = P.record(
      type: 2, seq: 1, body: P.dataBody(block: 0, length: 4096, payload: P.randomBytes(4096, seed: 1)))
    assertRefused(
      start + data + Self.lineageRecord(seq: 2),
      ["record 2 at byte \(at + data.count)", "after other records", "must follow the HEADER directly"])
    // After a ZERO record.
    let zero = P.record(type: 3, seq: 1, body: P.zeroBody(first: 0, count: 1))
    assertRefused(start + zero + Self.lineageRecord(seq: 2), ["record 2", "after other records"])
    // Before the HEADER.
    assertRefused(
      P.preamble() + Self.lineageRecord(seq: 0), ["record 0 at byte 16", "the first record is not a HEADER"])
    // In an incremental stream.
    let base = [UInt8](repeating: 0xEE, count: 16)
    let incremental = P.preamble() + P.record(type: 1, seq: 0, body: P.headerBody(deviceSize: 8192, base: base))
    assertRefused(
      incremental + Self.lineageRecord(seq: 1),
      ["record 1 at byte \(incremental.count)", "incremental stream", String(repeating: "ee", count: 16)])
    // Wrong sizes.
    for body in [Array(Self.lineageBody().dropLast()), Self.lineageBody() + [0], []] {
      assertRefused(
        start + Self.lineageRecord(seq: 1, body: body),
        ["record 1 at byte \(at)", "LINEAGE record has \(body.count) bytes, not 48"])
    }
    // The stream's own id, as the stream stood for or the first compacted.
    assertRefused(
      start + Self.lineageRecord(seq: 1, body: Self.lineageBody(standsFor: P.streamIDBytes)),
      ["record 1", "own id \(P.streamIDHex)", "cannot compact itself"])
    assertRefused(
      start + Self.lineageRecord(seq: 1, body: Self.lineageBody(first: P.streamIDBytes)), ["own id \(P.streamIDHex)"])
    // Fields out of range.
    let zeros = [UInt8](repeating: 0, count: 16)
    assertRefused(start + Self.lineageRecord(seq: 1, body: Self.lineageBody(standsFor: zeros)), ["names no stream"])
    assertRefused(start + Self.lineageRecord(seq: 1, body: Self.lineageBody(first: zeros)), ["names no stream"])
    assertRefused(start + Self.lineageRecord(seq: 1, body: Self.lineageBody(count: 0)), ["compacts 0 streams"])
    assertRefused(
      start + Self.lineageRecord(seq: 1, body: Self.lineageBody(count: 1)), ["compacts 1 stream but names two"])
    assertRefused(
      start + Self.lineageRecord(seq: 1, body: Self.lineageBody(first: Self.standsForBytes, count: 2)),
      ["compacts 2 streams but the first is the one it stands for"])
    assertRefused(start + Self.lineageRecord(seq: 1, body: Self.lineageBody(reserved: 1)), ["reserved bytes"])
    // A LINEAGE the END does not count.
    var s = start + l
    let digest = P.sha256(s)
    s += P.record(type: 4, seq: 2, body: P.endBody(data: 0, zero: 0, bytes: 0, records: 1, digest: digest))
    assertRefused(s, ["END record counts", "in 1", "in 2"])
  }

  // MARK: The writer

  func image(_ dir: String, _ name: String, _ content: [UInt8]) throws -> String {
    let path = "\(dir)/\(name)"
    XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(content)))
    return path
  }

  /// A stream of `source` by the library writer, with its summary.
  func write(
    _ dir: String, _ source: String, base: ID128 = .none, selection: BlockMap? = nil,
    lineage: StreamFormat.Lineage? = nil, secret: StreamSecret? = nil
  ) throws -> (bytes: [UInt8], header: StreamFormat.Header) {
    let out = "\(dir)/\(UUID().uuidString).stream"
    let sink = try OutputSink(.file(out), what: "stream")
    let summary = try SnapshotWriter.write(
      try Device(path: source), to: sink,
      options: SnapshotWriter.Options(
        blockSize: 4096, selection: selection, baseStreamID: base, workers: 2, encryption: secret, lineage: lineage))
    try sink.finish()
    return (Array(try Data(contentsOf: URL(fileURLWithPath: out))), summary.header)
  }

  static let lineage = StreamFormat.Lineage(
    standsFor: ID128(bytes: standsForBytes[...]),
    standsForStarted: Instant(nanosecondsSinceEpoch: 1_690_000_000_000_000_007),
    firstCompacted: ID128(bytes: firstBytes[...]), compactedCount: 3)

  func testAStreamWrittenWithALineageRoundTripsPlainAndEncrypted() throws {
    let dir = try makeTempDirectory()
    var rng = SplitMix64(seed: 3)
    let content = rng.bytes(5 * 4096 + 300) + [UInt8](repeating: 0, count: 3 * 4096)
    let source = try image(dir, "src.img", content)

    let plain = try write(dir, source, lineage: Self.lineage)
    let p = P.parseWhole(plain.bytes)
    XCTAssertNil(p.error)
    XCTAssertEqual(Array(p.records.map(\.shape).prefix(3)), ["P", "H", "L"])
    XCTAssertEqual(p.records.last?.shape, "E")
    XCTAssertEqual(p.records[2], .lineage(Self.lineage))
    // Framed as record 1, right after the HEADER, with flags 0.
    let at = p.starts[2]
    XCTAssertEqual(Array(plain.bytes[at..<at + 16]), P.le(6, 2) + P.le(0, 2) + P.le(48, 4) + P.le(1, 8))
    XCTAssertNil(P.readWithReader(plain.bytes).error)

    let secret = EncryptedStreamTests.secret()
    let sealed = try write(dir, source, lineage: Self.lineage, secret: secret)
    let e = EncryptedStreamTests.parse(sealed.bytes, secret: secret)
    XCTAssertNil(e.error)
    XCTAssertEqual(Array(e.records.map(\.shape).prefix(4)), ["P", "S5", "H", "L"])
    XCTAssertEqual(e.records.last?.shape, "E")
    // Its body is sealed: the plaintext ids are nowhere in the stream.
    let ranges = EncryptedStreamTests.recordRanges(sealed.bytes)
    let record2 = Array(sealed.bytes[ranges[2]])
    XCTAssertEqual(Array(record2[0..<16]), P.le(6, 2) + P.le(0, 2) + P.le(48 + 16, 4) + P.le(2, 8))
    XCTAssertFalse((0...(record2.count - 16)).contains { Array(record2[$0..<$0 + 16]) == Self.standsForBytes })
    var parser = StreamParser(secret: secret)
    try sealed.bytes.withUnsafeBytes { raw in
      var offset = 0
      while let (_, n) = try parser.next(UnsafeRawBufferPointer(rebasing: raw[offset...])) { offset += n }
    }
    XCTAssertEqual(parser.lineage, Self.lineage)
    // Through the reader (a pipeline for encrypted streams) as a merge reads it.
    let path = "\(dir)/sealed.stream"
    XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(sealed.bytes)))
    let fd = open(path, O_RDONLY)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    let reader = StreamReader(fd: fd, name: "sealed.stream", bufferSize: 4096, secret: secret)
    var shapes: [String] = []
    while let r = try reader.next() { shapes.append(EncryptedStreamTests.Rec(r).shape) }
    XCTAssertEqual(shapes, e.records.map(\.shape))

    // The blocks are those of the stream without a lineage.
    let bare = P.parseWhole(try write(dir, source).bytes)
    XCTAssertEqual(
      p.records.filter { $0.shape.hasPrefix("D") || $0.shape.hasPrefix("Z") },
      bare.records.filter { $0.shape.hasPrefix("D") || $0.shape.hasPrefix("Z") })

    // The writer refuses what a reader would.
    XCTAssertThrowsError(try write(dir, source, base: ID128(high: 1, low: 2), lineage: Self.lineage)) {
      XCTAssertTrue("\($0)".contains("cannot carry a lineage"), "\($0)")
    }
    var bad = Self.lineage
    bad.compactedCount = 0
    XCTAssertThrowsError(try write(dir, source, lineage: bad)) {
      XCTAssertTrue("\($0)".contains("compacts 0 streams"), "\($0)")
    }
  }

  // MARK: Merging

  /// A merge target that keeps its own map, as the merge export does: it
  /// says what it was asked to admit and to record.
  final class RecordingSession: MergeSession {
    let device: Device
    var admitted: StreamFormat.Header?
    var recorded: ID128?
    init(_ device: Device) { self.device = device }
    func open(for header: StreamFormat.Header, options: Merger.Options) throws -> BlockDevice {
      admitted = header
      return device
    }
    func finish(stream: ID128, complete: Bool) throws -> MergeReport? {
      if complete { recorded = stream }
      return nil
    }
  }

  struct Chain {
    var f0: (bytes: [UInt8], header: StreamFormat.Header)
    var i1: (bytes: [UInt8], header: StreamFormat.Header)
    var i2: (bytes: [UInt8], header: StreamFormat.Header)
    /// Full streams of the device after I1: with a lineage standing for I1, and without.
    var c: (bytes: [UInt8], header: StreamFormat.Header)
    var plainC: (bytes: [UInt8], header: StreamFormat.Header)
    var after1: [UInt8]
    var after2: [UInt8]
  }

  static let blockSize = 4096
  static let size = 12 * 4096 + 1000

  /// F0 of a device, I1 and I2 of the blocks changed since, and C, the
  /// compaction of F0 and I1.
  func makeChain(_ dir: String) throws -> Chain {
    var rng = SplitMix64(seed: 17)
    var content = rng.bytes(Self.size)
    let source = try image(dir, "src.img", content)
    let geometry = try BlockGeometry(blockSize: UInt32(Self.blockSize), deviceSize: UInt64(Self.size))
    func change(_ blocks: [Int]) throws -> BlockMap {
      var selection = BlockMap(geometry: geometry, meaning: .selected)
      for b in blocks {
        let range = b * Self.blockSize..<min((b + 1) * Self.blockSize, Self.size)
        content.replaceSubrange(range, with: rng.bytes(range.count))
        selection.bits.set(UInt64(b)..<UInt64(b + 1))
      }
      _ = try image(dir, "src.img", content)
      return selection
    }
    let f0 = try write(dir, source)
    let i1 = try write(dir, source, base: f0.header.streamID, selection: try change([1, 4, 12]))
    let after1 = content
    let lineage = StreamFormat.Lineage(
      standsFor: i1.header.streamID, standsForStarted: i1.header.started, firstCompacted: f0.header.streamID,
      compactedCount: 2)
    let c = try write(dir, source, lineage: lineage)
    let plainC = try write(dir, source)
    let i2 = try write(dir, source, base: i1.header.streamID, selection: try change([0, 4, 7]))
    XCTAssertNotEqual(after1, content)
    return Chain(f0: f0, i1: i1, i2: i2, c: c, plainC: plainC, after1: after1, after2: content)
  }

  /// A fresh target of other bytes and its overwrite map, tracking since `since`.
  func target(_ dir: String, _ name: String, since: Instant = Instant(nanosecondsSinceEpoch: 1)) throws -> (
    device: Device, mapPath: String
  ) {
    var rng = SplitMix64(seed: 99)
    let path = try image(dir, "\(name).img", rng.bytes(Self.size))
    let geometry = try BlockGeometry(blockSize: UInt32(Self.blockSize), deviceSize: UInt64(Self.size))
    let mapPath = "\(dir)/\(name).map"
    try MapFile.save(BlockMap(geometry: geometry, trackingStarted: since), to: mapPath)
    return (try Device(path: path, options: DeviceOpenOptions(writable: true)), mapPath)
  }

  /// Merges as a mirror by default: a chain of streams replaces what earlier
  /// ones wrote (a restore's map would hold the first stream's blocks back).
  @discardableResult
  func merge(
    _ stream: [UInt8], into t: (device: Device, mapPath: String), mirror: Bool = true
  ) throws -> Merger.Summary {
    var map: BlockMap? = try MapFile.load(t.mapPath)
    var options = Merger.Options()
    options.mirror = mirror
    return try Merger.merge(
      StreamReader(bytes: stream, name: "test.stream", chunk: 3000), into: t.device, map: &map, mapPath: t.mapPath,
      options: options, warn: { _ in })
  }

  func contents(_ d: Device) throws -> [UInt8] {
    Array(try Data(contentsOf: URL(fileURLWithPath: d.path)))
  }

  func testACompactedStreamIsRecordedAsTheStreamItStandsFor() throws {
    let dir = try makeTempDirectory()
    let chain = try makeChain(dir)

    // The chain as it was: F0, then I1 on F0, then I2 on I1.
    let a = try target(dir, "a")
    try merge(chain.f0.bytes, into: a)
    try merge(chain.i1.bytes, into: a)
    XCTAssertEqual(try MapFile.load(a.mapPath).lastMergedStream, chain.i1.header.streamID)
    XCTAssertEqual(try contents(a.device), chain.after1)
    try merge(chain.i2.bytes, into: a)
    XCTAssertEqual(try contents(a.device), chain.after2)

    // C alone, into a fresh target: recorded as I1, so I2 merges next without --force.
    let b = try target(dir, "b")
    let summary = try merge(chain.c.bytes, into: b)
    XCTAssertEqual(summary.lineage?.standsFor, chain.i1.header.streamID)
    XCTAssertEqual(summary.header?.streamID, chain.c.header.streamID)
    XCTAssertTrue(summary.complete)
    XCTAssertEqual(try MapFile.load(b.mapPath).lastMergedStream, chain.i1.header.streamID)
    XCTAssertEqual(try contents(b.device), chain.after1)
    let second = try merge(chain.i2.bytes, into: b)
    XCTAssertTrue(second.complete)
    XCTAssertEqual(try contents(b.device), chain.after2)
    XCTAssertEqual(try MapFile.load(b.mapPath).lastMergedStream, chain.i2.header.streamID)

    // The same blocks without a lineage: I2 is refused as before, nothing written.
    let c = try target(dir, "c")
    try merge(chain.plainC.bytes, into: c)
    XCTAssertEqual(try MapFile.load(c.mapPath).lastMergedStream, chain.plainC.header.streamID)
    let before = try contents(c.device)
    XCTAssertThrowsError(try merge(chain.i2.bytes, into: c)) {
      XCTAssertTrue(
        "\($0)".contains(
          "applies on top of stream \(chain.i1.header.streamID), but the last stream merged into this device is "
            + "\(chain.plainC.header.streamID)"), "\($0)")
    }
    XCTAssertEqual(try contents(c.device), before)
    XCTAssertEqual(try MapFile.load(c.mapPath).lastMergedStream, chain.plainC.header.streamID)
  }

  func testTheTimeCheckTakesTheInstantOfTheStreamStoodFor() throws {
    let dir = try makeTempDirectory()
    let chain = try makeChain(dir)
    // Tracking started after I1 read its blocks but by the time C was written:
    // C's blocks are I1's, older than writes the map never saw.
    XCTAssertLessThan(chain.i1.header.started, chain.c.header.started)
    let t = try target(dir, "t", since: chain.c.header.started)
    let before = try contents(t.device)
    XCTAssertThrowsError(try merge(chain.c.bytes, into: t, mirror: false)) {
      XCTAssertTrue("\($0)".contains("the stream started reading at \(chain.i1.header.started)"), "\($0)")
    }
    XCTAssertEqual(try contents(t.device), before)
    // The same blocks as a plain full stream of that instant pass the check: the lineage is what refused it.
    let u = try target(dir, "u", since: chain.plainC.header.started)
    try merge(chain.plainC.bytes, into: u, mirror: false)
    XCTAssertEqual(try contents(u.device), chain.after1)
  }

  func testATargetKeepingItsOwnMapIsAskedToAdmitAndRecordTheStreamStoodFor() throws {
    let dir = try makeTempDirectory()
    let chain = try makeChain(dir)
    var rng = SplitMix64(seed: 5)
    let session = RecordingSession(
      try Device(path: try image(dir, "s.img", rng.bytes(Self.size)), options: DeviceOpenOptions(writable: true)))
    var map: BlockMap? = nil
    let summary = try Merger.merge(
      StreamReader(bytes: chain.c.bytes, name: "c.stream"), into: nil, map: &map, mapPath: nil,
      options: Merger.Options(),
      session: session, warn: { _ in })
    XCTAssertTrue(summary.complete)
    XCTAssertEqual(session.admitted?.streamID, chain.i1.header.streamID)
    XCTAssertEqual(session.admitted?.started, chain.i1.header.started)
    XCTAssertEqual(session.recorded, chain.i1.header.streamID)
    XCTAssertEqual(try contents(session.device), chain.after1)
  }
}
