// The point-in-time history's format (dualrestore-history(5)): a file's
// header slots and each record type round trip; every refusal is its own
// sentence, a header whose fields would overflow included; a scan stops at
// a torn or damaged record with the good ones before it, keeps the order of
// segments and points, and checks blocks against their CRCs when asked;
// file names and RFC 3339 instants read back, and an instant a nanosecond
// count cannot hold is refused rather than trapping.

import CShim
import XCTest

@testable import DualRestore

final class HistoryFormatTests: XCTestCase {
  let id = ID128(high: 0x0123_4567_89ab_cdef, low: 0xfedc_ba98_7654_3210)

  func header(updates: UInt32 = 1, position: UInt64 = 0, open: UInt64 = 1, live: UInt64? = nil)
    -> HistoryFormat.FileHeader
  {
    HistoryFormat.FileHeader(
      updates: updates, historyID: id, deviceSize: 10 * 4096 + 1000, blockSize: 4096, continues: false,
      position: position, openSegment: open, previousPoint: open - 1,
      previousInstant: 1_764_000_000_123_456_789, live: live ?? position + 4096)
  }

  /// A slot's bytes with a field set and the CRC made right again.
  func slot(_ h: HistoryFormat.FileHeader, at offset: Int, _ value: UInt64, width: Int) -> [UInt8] {
    var b = h.encoded()
    for i in 0..<width { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    let crc = b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, HistoryFormat.slotFields) }
    for i in 0..<4 { b[88 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    return b
  }

  func decodeSlot(_ b: [UInt8]) -> String? {
    switch HistoryFormat.FileHeader.decode(slot: b[...]) {
    case .success: return nil
    case .failure(let e): return e.sentence
    }
  }

  func recordBytes(_ r: HistoryFormat.Record) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: HistoryFormat.recordHeaderLength)
    b.withUnsafeMutableBytes { r.encodeHeader(into: $0.baseAddress!) }
    return b
  }

  func decodeRecord(_ b: [UInt8]) -> Result<HistoryFormat.Record, HistoryFormatError> {
    b.withUnsafeBytes { HistoryFormat.Record.decodeHeader($0) }
  }

  /// A record's header with a field set and its CRC made right again.
  func record(_ r: HistoryFormat.Record, at offset: Int, _ value: UInt64, width: Int) -> [UInt8] {
    var b = recordBytes(r)
    for i in 0..<width { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    let crc = b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 44) }
    for i in 0..<4 { b[44 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    return b
  }

  /// A before-image record with its CRCs and blocks.
  func before(segment: UInt64, first: UInt64, blocks: [[UInt8]]) -> [UInt8] {
    var out = recordBytes(.before(segment: segment, first: first, count: UInt32(blocks.count), zero: false))
    for b in blocks {
      let crc = b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
      for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i)))) }
    }
    for b in blocks { out += b }
    return out
  }

  func block(_ seed: UInt8) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7 + Int(seed)) } }

  /// A file: header, segment 1 (two blocks, a zero run), point 1, segment 2
  /// (one block), point 2, then segment 3 left open (one block).
  func file() -> (bytes: [UInt8], at: [Int]) {
    var out = header().encoded() + header().encoded()
    var at: [Int] = []
    func add(_ b: [UInt8]) {
      at.append(out.count)
      out += b
    }
    add(before(segment: 1, first: 3, blocks: [block(1), block(2)]))
    add(recordBytes(.before(segment: 1, first: 8, count: 2, zero: true)))
    add(recordBytes(.point(segment: 1, instant: 5, bytes: 100)))
    add(before(segment: 2, first: 10, blocks: [block(3)]))
    add(recordBytes(.point(segment: 2, instant: 6, bytes: 200)))
    add(before(segment: 3, first: 0, blocks: [block(4)]))
    return (out, at)
  }

  func scan(_ bytes: [UInt8], open: UInt64 = 1, checkData: Bool = true, blockCount: UInt64 = 11)
    -> HistoryFormat.Scan
  {
    HistoryFormat.scan(
      from: 4096, length: UInt64(bytes.count), blockCount: blockCount, openSegment: open,
      checkData: { _ in checkData },
      read: { offset, count in
        XCTAssertLessThanOrEqual(offset + UInt64(count), UInt64(bytes.count), "the scan read past its bytes")
        guard offset + UInt64(count) <= UInt64(bytes.count) else { return nil }
        return Array(bytes[Int(offset)..<Int(offset) + count])
      })
  }

  // MARK: Headers

  func testHeaderRoundTripsAndTheNewerGoodSlotIsCurrent() throws {
    let h = header(updates: 7, position: 1 << 28, open: 4, live: (1 << 28) + 9000)
    let b = h.encoded()
    XCTAssertEqual(b.count, 2048)
    XCTAssertEqual(Array(b[0..<8]), Array("DRHIST01".utf8))
    XCTAssertEqual(Array(b[92...]), [UInt8](repeating: 0, count: 1956))
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(slot: b[...]).get(), h)
    var c = h
    c.continues = true
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(slot: c.encoded()[...]).get(), c)

    var newer = h
    newer.updates = 8
    newer.live += 4096
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(file: (h.encoded() + newer.encoded())[...]).get(), newer)
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(file: (newer.encoded() + h.encoded())[...]).get(), newer)
    // A slot torn by a crash: the other one is current.
    var torn = newer.encoded()
    torn[80] ^= 1
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(file: (h.encoded() + torn)[...]).get(), h)
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(file: (torn + h.encoded())[...]).get(), h)
    // A slice not starting at index 0, as a file read into a larger buffer.
    let padded = [UInt8](repeating: 9, count: 100) + h.encoded() + newer.encoded()
    XCTAssertEqual(try HistoryFormat.FileHeader.decode(file: padded[100...]).get(), newer)
  }

  func testHeaderRefusals() {
    let h = header()
    let b = h.encoded()
    var crc = b
    crc[40] ^= 0x10
    XCTAssertEqual(decodeSlot(crc), "has a header whose CRC does not match")
    var magic = b
    magic[0] = UInt8(ascii: "X")
    XCTAssertEqual(decodeSlot(magic), "is not a history file (no DRHIST01 magic)")
    XCTAssertEqual(decodeSlot(Array(b.prefix(91))), "is too short for a header")
    XCTAssertEqual(decodeSlot(slot(h, at: 8, 2, width: 4)), "is history format version 2; this version reads version 1")
    XCTAssertEqual(decodeSlot(slot(h, at: 40, 512, width: 4)), "has block size 512, not 4096")
    XCTAssertEqual(decodeSlot(slot(h, at: 44, 2, width: 4)), "has unknown header flags 2")
    let disagree = "has a header whose positions or segments do not agree"
    XCTAssertEqual(decodeSlot(slot(h, at: 80, 4095, width: 8)), disagree)
    XCTAssertEqual(decodeSlot(slot(slot(h, at: 56, 0, width: 8)[...].decodedHeader(), at: 64, 0, width: 8)), disagree)
    XCTAssertEqual(decodeSlot(slot(h, at: 56, 0, width: 8)), disagree)
    XCTAssertEqual(decodeSlot(slot(h, at: 64, 1, width: 8)), disagree)

    // Both slots bad: the first one's reason; slots of two files: refused.
    XCTAssertEqual(
      HistoryFormat.FileHeader.decode(file: (crc + magic)[...]).failureSentence, "has a header whose CRC does not match"
    )
    var other = h
    other.historyID = ID128(high: 1, low: 1)
    XCTAssertEqual(
      HistoryFormat.FileHeader.decode(file: (b + other.encoded())[...]).failureSentence,
      "has two header slots of different files")
    var moved = h
    moved.position = 1 << 28
    moved.live = moved.position + 4096
    XCTAssertEqual(
      HistoryFormat.FileHeader.decode(file: (b + moved.encoded())[...]).failureSentence,
      "has two header slots of different files")
    XCTAssertEqual(
      HistoryFormat.FileHeader.decode(file: b[...]).failureSentence, "is shorter than a history file's header")
  }

  /// A file position so high that the header's length added to it does not
  /// fit 64 bits: refused, not a trap (the check added them unguarded).
  func testHeaderWhosePositionWouldOverflowIsRefused() {
    let h = header()
    let high = slot(h, at: 48, UInt64.max - 100, width: 8)
    XCTAssertEqual(decodeSlot(high), "has a header whose positions or segments do not agree")
    let both = slot(slot(h, at: 48, UInt64.max - 100, width: 8)[...].decodedHeader(), at: 80, UInt64.max, width: 8)
    XCTAssertEqual(decodeSlot(both), "has a header whose positions or segments do not agree")
  }

  // MARK: Records

  func testRecordsRoundTrip() throws {
    let records: [HistoryFormat.Record] = [
      .before(segment: 1, first: 0, count: 1, zero: false),
      .before(segment: 9, first: 1 << 40, count: 8192, zero: true),
      .point(segment: 3, instant: 1_764_000_000_123_456_789, bytes: 1 << 33),
      .point(segment: 4, instant: -5, bytes: 48),
    ]
    for r in records {
      let b = recordBytes(r)
      XCTAssertEqual(Array(b[0..<4]), Array("DRPH".utf8))
      XCTAssertEqual(try decodeRecord(b).get(), r)
    }
    XCTAssertEqual(records[0].length, 48 + 4100)
    XCTAssertEqual(records[1].bodyLength, 0)
    XCTAssertEqual(records[2].length, 48)
    XCTAssertEqual(HistoryFormat.Record.before(segment: 1, first: 0, count: 3, zero: false).bodyLength, 3 * 4100)
  }

  func testRecordRefusals() {
    let before = HistoryFormat.Record.before(segment: 2, first: 5, count: 4, zero: false)
    let point = HistoryFormat.Record.point(segment: 2, instant: 7, bytes: 96)
    func why(_ b: [UInt8]) -> String? {
      switch decodeRecord(b) {
      case .success: return nil
      case .failure(let e): return e.sentence
      }
    }
    var crc = recordBytes(before)
    crc[17] ^= 4
    XCTAssertEqual(why(crc), "a record header's CRC does not match")
    XCTAssertEqual(why(Array(recordBytes(before).prefix(47))), "a record is cut short")
    XCTAssertEqual(why(record(before, at: 0, 0x4850_5245, width: 4)), "a record has no DRPH magic")
    XCTAssertEqual(why(record(before, at: 6, 1, width: 1)), "a record has reserved fields set")
    XCTAssertEqual(why(record(before, at: 28, 1, width: 4)), "a record has reserved fields set")
    XCTAssertEqual(why(record(point, at: 40, 1, width: 4)), "a record has reserved fields set")
    XCTAssertEqual(why(record(before, at: 8, 0, width: 8)), "a record names segment 0")
    XCTAssertEqual(why(record(before, at: 4, 3, width: 1)), "a record has unknown type 3")
    XCTAssertEqual(why(record(before, at: 5, 2, width: 1)), "a before-image record has unknown flags")
    XCTAssertEqual(why(record(before, at: 32, 1, width: 8)), "a before-image record has unknown flags")
    XCTAssertEqual(why(record(before, at: 24, 0, width: 4)), "a before-image record holds 0 blocks (1 to 8192)")
    XCTAssertEqual(why(record(before, at: 24, 8193, width: 4)), "a before-image record holds 8193 blocks (1 to 8192)")
    XCTAssertEqual(why(record(point, at: 5, 1, width: 1)), "a point record has unknown fields set")
    XCTAssertEqual(why(record(point, at: 24, 1, width: 4)), "a point record has unknown fields set")
  }

  // MARK: Scans

  func testScanReadsEveryRecordInOrder() {
    let (bytes, at) = file()
    let s = scan(bytes)
    XCTAssertNil(s.stopped)
    XCTAssertEqual(s.end, UInt64(bytes.count))
    XCTAssertEqual(s.records.map(\.offset), at.map(UInt64.init))
    XCTAssertEqual(
      s.records.map(\.record),
      [
        .before(segment: 1, first: 3, count: 2, zero: false), .before(segment: 1, first: 8, count: 2, zero: true),
        .point(segment: 1, instant: 5, bytes: 100), .before(segment: 2, first: 10, count: 1, zero: false),
        .point(segment: 2, instant: 6, bytes: 200), .before(segment: 3, first: 0, count: 1, zero: false),
      ])
    // An empty log: nothing, no reason.
    let empty = scan(Array(bytes.prefix(4096)))
    XCTAssertEqual(empty.records.count, 0)
    XCTAssertEqual(empty.end, 4096)
    XCTAssertNil(empty.stopped)
  }

  /// Cut anywhere, a scan keeps the whole records before the cut and says
  /// why it stopped; it never reads past the bytes it has.
  func testScanStopsAtATornRecord() {
    let (bytes, at) = file()
    for cut in Set(at.flatMap { [$0 + 1, $0 + 47, $0 + 48, $0 + 60, $0 + 4147] } + [bytes.count - 1]) {
      guard cut < bytes.count else { continue }
      let s = scan(Array(bytes.prefix(cut)))
      let whole = at.indices.filter { i in (i + 1 < at.count ? at[i + 1] : bytes.count) <= cut }
      XCTAssertEqual(s.records.count, whole.count, "cut at \(cut)")
      XCTAssertEqual(s.end, UInt64(whole.last.map { i in i + 1 < at.count ? at[i + 1] : bytes.count } ?? 4096))
      if Int(s.end) == cut {
        XCTAssertNil(s.stopped, "cut at \(cut), a record boundary")
      } else {
        XCTAssertNotNil(s.stopped, "cut at \(cut)")
        XCTAssertTrue(s.cutShort, "cut at \(cut)")
        XCTAssertTrue(s.stopped?.sentence.contains("cut short at offset \(s.end)") == true, "\(s.stopped!)")
      }
    }
    // Garbage after the last record: stopped there, the records kept.
    let garbage = scan(bytes + [UInt8](repeating: 0xA5, count: 100))
    XCTAssertEqual(garbage.records.count, at.count)
    XCTAssertEqual(garbage.end, UInt64(bytes.count))
    XCTAssertEqual(garbage.stopped?.sentence, "a record has no DRPH magic at offset \(bytes.count)")
    XCTAssertFalse(garbage.cutShort)
  }

  func testScanRefusesRecordsOutOfOrderOrPastTheDevice() {
    let (bytes, at) = file()
    // The point of segment 1 claiming segment 2: the scan stops before it.
    var wrong = bytes
    wrong.replaceSubrange(at[2]..<at[2] + 48, with: recordBytes(.point(segment: 2, instant: 5, bytes: 100)))
    var s = scan(wrong)
    XCTAssertEqual(s.records.count, 2)
    XCTAssertEqual(s.stopped?.sentence, "a record of segment 2 follows segment 1 at offset \(at[2])")
    // The open segment given is 2: the first record (segment 1) is refused.
    s = scan(bytes, open: 2)
    XCTAssertEqual(s.records.count, 0)
    XCTAssertEqual(s.stopped?.sentence, "a record of segment 1 follows segment 2 at offset 4096")
    // A segment skipped after a point.
    wrong = bytes
    wrong.replaceSubrange(at[5]..<at[5] + 48, with: recordBytes(.before(segment: 4, first: 0, count: 1, zero: false)))
    s = scan(wrong)
    XCTAssertEqual(s.records.count, 5)
    XCTAssertEqual(s.stopped?.sentence, "a record of segment 4 follows segment 2 at offset \(at[5])")
    // Blocks 10 and 11 on a device of 11 blocks; then the first block past it.
    s = scan(bytes, blockCount: 10)
    XCTAssertEqual(s.records.count, 3)
    XCTAssertEqual(s.stopped?.sentence, "a before-image at offset \(at[3]) lies past the device's end")
    wrong = bytes
    wrong.replaceSubrange(
      at[1]..<at[1] + 48, with: recordBytes(.before(segment: 1, first: UInt64.max, count: 2, zero: true)))
    s = scan(wrong)
    XCTAssertEqual(s.records.count, 1)
    XCTAssertEqual(s.stopped?.sentence, "a before-image at offset \(at[1]) lies past the device's end")
  }

  func testScanChecksBlocksOnlyWhenAsked() {
    var (bytes, at) = file()
    bytes[at[3] + 48 + 4 + 100] ^= 1
    let checked = scan(bytes)
    XCTAssertEqual(checked.records.count, 3)
    XCTAssertEqual(checked.end, UInt64(at[3]))
    XCTAssertEqual(
      checked.stopped?.sentence, "a before-image's blocks do not match their CRCs at offset \(at[3])")
    let unchecked = scan(bytes, checkData: false)
    XCTAssertEqual(unchecked.records.count, at.count)
    XCTAssertNil(unchecked.stopped)
    // A CRC itself damaged is found the same way.
    var (crcs, at2) = file()
    crcs[at2[0] + 48 + 5] ^= 0x80
    XCTAssertEqual(scan(crcs).records.count, 0)
  }

  // MARK: Names and instants

  func testFileNames() {
    XCTAssertEqual(HistoryFormat.fileName(0), "0000000000000000.points")
    XCTAssertEqual(HistoryFormat.fileName(0x1000_4000), "0000000010004000.points")
    XCTAssertEqual(HistoryFormat.fileName(.max), "ffffffffffffffff.points")
    for p: UInt64 in [0, 4096, 0x1000_4000, .max] {
      XCTAssertEqual(HistoryFormat.position(ofFileName: HistoryFormat.fileName(p)), p)
    }
    XCTAssertNil(HistoryFormat.position(ofFileName: "lock"))
    XCTAssertNil(HistoryFormat.position(ofFileName: "000000000000000.points"))
    XCTAssertNil(HistoryFormat.position(ofFileName: "000000000000000g.points"))
    XCTAssertNil(HistoryFormat.position(ofFileName: "0000000000000000.point"))
  }

  func testInstantsInRFC3339() {
    func ns(_ text: String) -> Int64? { Instant(rfc3339: text)?.nanosecondsSinceEpoch }
    XCTAssertEqual(ns("1970-01-01T00:00:00Z"), 0)
    XCTAssertEqual(ns("2026-12-07T01:30:00Z"), 1_796_607_000_000_000_000)
    XCTAssertEqual(ns("2026-12-07t01:30:00Z"), 1_796_607_000_000_000_000)
    XCTAssertEqual(ns("2026-12-07T01:30:00.5Z"), 1_796_607_000_500_000_000)
    XCTAssertEqual(ns("2026-12-07T01:30:00.123456789Z"), 1_796_607_000_123_456_789)
    XCTAssertEqual(ns("1969-12-31T23:59:59.25Z"), -750_000_000)
    // What the toolkit prints reads back (to the millisecond it prints).
    let now = Instant(nanosecondsSinceEpoch: 1_796_607_000_123_000_000)
    XCTAssertEqual(Instant(rfc3339: now.description), now)
    for bad in [
      "", "garbage", "2026-12-07", "2026-12-07T01:30:00", "2026-12-07T01:30:00+01:00", "2026-12-07 01:30:00Z",
      "2026-13-07T01:30:00Z", "2026-00-07T01:30:00Z", "2026-12-32T01:30:00Z", "2026-12-07T24:00:00Z",
      "2026-12-07T01:60:00Z", "2026-12-07T01:30:61Z", "2026-12-07T01:30:00.Z", "2026-12-07T01:30:00.1234567891Z",
      "2026-12-07T01:30:00,5Z", "2026-12-07T01:30:0xZ", "2026-12-07T01:30:00ZZ", "-026-12-07T01:30:00Z",
    ] {
      XCTAssertNil(Instant(rfc3339: bad), bad)
    }
  }

  /// Nanoseconds since 1970 in 64 bits reach from 1677 to 2262: an instant
  /// outside is refused, not a trap (it came from a client's export name).
  func testInstantsANanosecondCountCannotHoldAreRefused() {
    XCTAssertNil(Instant(rfc3339: "9999-12-31T23:59:59Z"))
    XCTAssertNil(Instant(rfc3339: "2263-01-01T00:00:00Z"))
    XCTAssertNil(Instant(rfc3339: "0000-01-01T00:00:00Z"))
    XCTAssertNil(Instant(rfc3339: "1677-01-01T00:00:00Z"))
    XCTAssertNotNil(Instant(rfc3339: "2262-01-01T00:00:00Z"))
    XCTAssertNotNil(Instant(rfc3339: "1678-01-01T00:00:00.999999999Z"))
  }
}

extension Result where Failure == HistoryFormatError {
  var failureSentence: String? {
    if case .failure(let e) = self { return e.sentence }
    return nil
  }
}

extension ArraySlice where Element == UInt8 {
  /// The header these slot bytes hold, trusting them (for patching a
  /// second field after a first).
  func decodedHeader() -> HistoryFormat.FileHeader {
    var r = ByteReader(self)
    _ = r.take(12)
    let updates = r.u32() ?? 0
    let id = r.id() ?? .none
    let size = r.u64() ?? 0
    let bs = r.u32() ?? 0
    let flags = r.u32() ?? 0
    let position = r.u64() ?? 0
    let open = r.u64() ?? 0
    let previous = r.u64() ?? 0
    let instant = r.i64() ?? 0
    let live = r.u64() ?? 0
    return HistoryFormat.FileHeader(
      updates: updates, historyID: id, deviceSize: size, blockSize: bs, continues: flags & 1 != 0, position: position,
      openSegment: open, previousPoint: previous, previousInstant: instant, live: live)
  }
}
