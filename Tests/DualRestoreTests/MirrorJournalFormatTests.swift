// The mirror journal's format (dualrestore-journal(5)): the header and each
// record type round trip, records decode fed a byte at a time, every
// refusal is its own kind, a torn tail is told from damage, and a seeded
// random journal scans back as it was written.

import CShim
import DualRestoreFuzz
import TestSupport
import XCTest

@testable import DualRestore

final class MirrorJournalFormatTests: XCTestCase {
  let header = MirrorJournalHeader(
    journal: ID128(high: 0x0123_4567_89ab_cdef, low: 0xfedc_ba98_7654_3210), map: ID128(high: 7, low: 9),
    deviceSize: 1 << 20, blockSize: 4096, created: Instant(nanosecondsSinceEpoch: 1_764_000_000_123_456_789))
  var decoder: MirrorJournalDecoder { MirrorJournalDecoder(deviceSize: header.deviceSize) }

  func decode(_ bytes: [UInt8]) -> MirrorJournalDecoded {
    bytes.withUnsafeBytes { decoder.decode($0) }
  }

  func scan(_ bytes: [UInt8]) throws(MirrorJournalDamage) -> MirrorJournalScan {
    let result = bytes.withUnsafeBytes { p in
      Result { () throws(MirrorJournalDamage) in try MirrorJournalFormat.scan(p) }
    }
    return try result.get()
  }

  /// Sets a little-endian field and, for a record at `record`, its CRC again.
  func patch(_ bytes: inout [UInt8], at: Int, _ value: UInt64, width: Int, recrc record: Int? = nil) {
    for i in 0..<width { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    if let record {
      let payload =
        Int(bytes[record + 8]) | Int(bytes[record + 9]) << 8 | Int(bytes[record + 10]) << 16
        | Int(bytes[record + 11]) << 24
      let checked = MirrorJournalFormat.recordHeaderLength + payload
      let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + record, checked) }
      for i in 0..<4 { bytes[record + checked + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    }
  }

  // MARK: Header

  func testHeaderRoundTripsAndLayout() throws {
    let bytes = header.encoded
    XCTAssertEqual(bytes.count, 4096)
    XCTAssertEqual(Array(bytes[0..<8]), Array("DRMIRJNL".utf8))
    XCTAssertEqual(Array(bytes[8..<12]), [1, 0, 0, 0])
    XCTAssertEqual(Array(bytes[52..<56]), [0, 0x10, 0, 0])
    XCTAssertTrue(bytes[68...].allSatisfy { $0 == 0 })
    XCTAssertEqual(try MirrorJournalHeader(decoding: bytes[...]), header)
  }

  func headerRefusal(_ change: (inout [UInt8]) -> Void, recrc: Bool = true) -> String? {
    var bytes = header.encoded
    change(&bytes)
    if recrc {
      let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 64) }
      for i in 0..<4 { bytes[64 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    }
    do {
      _ = try MirrorJournalHeader(decoding: bytes[...])
      return nil
    } catch {
      return error.message
    }
  }

  func testHeaderRefusals() {
    XCTAssertEqual(
      headerRefusal({ $0[0] = UInt8(ascii: "X") }),
      "the mirror journal's header does not start with the magic DRMIRJNL")
    XCTAssertEqual(
      headerRefusal({ $0[8] = 2 }), "the mirror journal's format version is 2, newer than this build's 1")
    XCTAssertEqual(headerRefusal({ $0[8] = 0 }), "the mirror journal's format version is 0, which no build wrote")
    XCTAssertEqual(
      headerRefusal({ $0[44] ^= 1 }, recrc: false), "the mirror journal's header checksum does not match its bytes")
    XCTAssertEqual(
      headerRefusal({ $0[4000] = 1 }), "the mirror journal's header has non-zero bytes after its checksum")
    XCTAssertEqual(
      headerRefusal({
        $0[52] = 0; $0[53] = 0
      }), "the mirror journal's block size is 0")
    XCTAssertEqual(
      headerRefusal({
        $0[52] = 0; $0[53] = 1
      }),
      "the mirror journal's block size 256 is not a power of two of at least 512")
    XCTAssertEqual(
      headerRefusal({
        $0[52] = 0; $0[53] = 0x30
      }),
      "the mirror journal's block size 12288 is not a power of two of at least 512")
    XCTAssertEqual(headerRefusal({ for i in 12..<28 { $0[i] = 0 } }), "the mirror journal's id is zero")
    XCTAssertEqual(
      headerRefusal({ for i in 28..<44 { $0[i] = 0 } }), "the mirror journal's overwrite map id is zero")
    XCTAssertEqual(
      (try? MirrorJournalHeader(decoding: header.encoded[0..<4095])).map { _ in "accepted" }, nil)
    XCTAssertNil(headerRefusal({ _ in }))
  }

  // MARK: Records

  func testEachRecordTypeRoundTrips() {
    let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
    let records: [(MirrorJournalRecord, [UInt8])] = [
      (MirrorJournalRecord(type: .write, interval: 3, sequence: 10, offset: 4096, length: 1000), data),
      (MirrorJournalRecord(type: .zero, interval: 3, sequence: 11, offset: 0, length: 1 << 20), []),
      (MirrorJournalRecord(type: .trim, interval: 3, sequence: 12, offset: 512, length: 512), []),
      (MirrorJournalRecord(type: .intervalEnd, interval: 3, sequence: 13), []),
    ]
    for (record, payload) in records {
      let bytes = MirrorJournalFormat.encode(record, payload: payload)
      XCTAssertEqual(bytes.count % 8, 0)
      XCTAssertEqual(bytes.count, MirrorJournalFormat.recordSize(payload: payload.count))
      var expected = record
      expected.payload = 44..<44 + payload.count
      XCTAssertEqual(decode(bytes), .record(expected, size: bytes.count), "\(record.type)")
      XCTAssertEqual(Array(bytes[44..<44 + payload.count]), payload)
    }
    // The magic is "DRJR" in the file.
    XCTAssertEqual(Array(MirrorJournalFormat.encode(records[3].0)[0..<4]), Array("DRJR".utf8))
  }

  func testFramingLeavesThePayloadInPlace() {
    let data = [UInt8](repeating: 0xA5, count: 4096)
    let record = MirrorJournalRecord(type: .write, interval: 1, sequence: 1, offset: 8192, length: 4096)
    var header = [UInt8](repeating: 0xFF, count: 44)
    var trailer = [UInt8](repeating: 0xFF, count: 11)
    let used = data.withUnsafeBytes { p in
      header.withUnsafeMutableBytes { h in
        trailer.withUnsafeMutableBytes { t in MirrorJournalFormat.frame(record, payload: p, header: h, trailer: t) }
      }
    }
    XCTAssertEqual(used, 4)
    XCTAssertEqual(header + data + trailer[0..<used], MirrorJournalFormat.encode(record, payload: data))
  }

  func testDecodingFedOneByteAtATime() {
    let data = (0..<37).map { UInt8($0) }
    var stream = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .write, interval: 1, sequence: 1, offset: 100, length: 37), payload: data)
    stream += MirrorJournalFormat.encode(MirrorJournalRecord(type: .intervalEnd, interval: 1, sequence: 2))
    var fed: [UInt8] = []
    var decoded: [MirrorJournalRecord] = []
    var consumed = 0
    for byte in stream {
      fed.append(byte)
      while true {
        let result = fed.withUnsafeBytes { decoder.decode(UnsafeRawBufferPointer(rebasing: $0[consumed...])) }
        switch result {
        case .record(let r, let size):
          XCTAssertEqual(size, MirrorJournalFormat.recordSize(payload: Int(r.type == .write ? r.length : 0)))
          decoded.append(r)
          consumed += size
          continue
        case .needMoreBytes(let needed):
          XCTAssertGreaterThan(needed, fed.count - consumed)
        case .refused(let e):
          XCTFail("refused \(e) after \(fed.count) bytes")
        }
        break
      }
    }
    XCTAssertEqual(consumed, stream.count)
    XCTAssertEqual(decoded.map(\.type), [.write, .intervalEnd])
    XCTAssertEqual(decoded.map(\.sequence), [1, 2])
    XCTAssertEqual(Array(stream[decoded[0].payload]), data)
  }

  func testEveryRecordRefusal() {
    let write = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .write, interval: 1, sequence: 1, offset: 0, length: 8),
      payload: [1, 2, 3, 4, 5, 6, 7, 8])
    let zero = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .zero, interval: 1, sequence: 1, offset: 0, length: 8))
    let end = MirrorJournalFormat.encode(MirrorJournalRecord(type: .intervalEnd, interval: 1, sequence: 2))
    func patched(_ base: [UInt8], at: Int, _ value: UInt64, width: Int, recrc: Bool = true) -> [UInt8] {
      var b = base
      patch(&b, at: at, value, width: width, recrc: recrc ? 0 : nil)
      return b
    }
    func refused(_ base: [UInt8], at: Int, _ value: UInt64, width: Int, recrc: Bool = true) -> MirrorJournalDecoded {
      decode(patched(base, at: at, value, width: width, recrc: recrc))
    }
    XCTAssertEqual(refused(write, at: 0, 0x524A_5245, width: 4), .refused(.badMagic(0x524A_5245)))
    XCTAssertEqual(refused(write, at: 4, 5, width: 1), .refused(.unknownType(5)))
    XCTAssertEqual(refused(write, at: 4, 0, width: 1), .refused(.unknownType(0)))
    XCTAssertEqual(refused(write, at: 5, 0x80, width: 1), .refused(.unknownFlags(0x80)))
    XCTAssertEqual(refused(write, at: 6, 1, width: 2), .refused(.reservedNotZero(1)))
    // A length past the limit is refused before the bytes are waited for.
    XCTAssertEqual(
      decode(Array(patched(write, at: 8, (64 << 20) + 1, width: 4, recrc: false)[0..<44])),
      .refused(.payloadTooLong((64 << 20) + 1)))
    XCTAssertEqual(
      decode(Array(patched(write, at: 8, 64 << 20, width: 4, recrc: false)[0..<44])),
      .refused(.payloadMismatch(.write, payload: 64 << 20, length: 8)))
    XCTAssertEqual(refused(write, at: 36, 9, width: 8), .refused(.payloadMismatch(.write, payload: 8, length: 9)))
    XCTAssertEqual(
      refused(zero, at: 8, 8, width: 4, recrc: false), .refused(.payloadMismatch(.zero, payload: 8, length: 8)))
    XCTAssertEqual(refused(zero, at: 36, 0, width: 8), .refused(.emptyRange(.zero)))
    XCTAssertEqual(refused(end, at: 28, 4096, width: 8), .refused(.intervalEndWithRange))
    XCTAssertEqual(refused(end, at: 36, 1, width: 8), .refused(.intervalEndWithRange))
    XCTAssertEqual(
      refused(zero, at: 28, UInt64.max - 3, width: 8), .refused(.rangeOverflows(offset: UInt64.max - 3, length: 8)))
    XCTAssertEqual(
      refused(zero, at: 28, (1 << 20) - 7, width: 8),
      .refused(.beyondDevice(offset: (1 << 20) - 7, length: 8, deviceSize: 1 << 20)))
    XCTAssertEqual(
      decode(patched(zero, at: 28, (1 << 20) - 8, width: 8)),
      .record(
        MirrorJournalRecord(type: .zero, interval: 1, sequence: 1, offset: (1 << 20) - 8, length: 8, payload: 44..<44),
        size: 48))
    XCTAssertEqual(refused(write, at: 44, 0xFF, width: 1, recrc: false), .refused(.badChecksum))
    var padded = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .write, interval: 1, sequence: 1, offset: 0, length: 1), payload: [7])
    XCTAssertEqual(padded.count, 56)  // 44 + 1 + 4 CRC, padded from 49
    XCTAssertEqual(decode(padded).isRecord, true)
    padded[50] = 1
    XCTAssertEqual(decode(padded), .refused(.paddingNotZero))
    XCTAssertEqual(decode(Array(write[0..<55])), .needMoreBytes(needed: 56))
    XCTAssertEqual(decode(Array(write[0..<3])), .needMoreBytes(needed: 44))
    XCTAssertEqual(decode(write).isRecord, true)
  }

  // MARK: Scan

  /// A journal: header, interval 1 (write, zero), its end, interval 2
  /// (trim, write), its end; and the positions of its records.
  func journal() -> (bytes: [UInt8], positions: [Int]) {
    var bytes = header.encoded
    var positions: [Int] = []
    func add(_ r: MirrorJournalRecord, _ payload: [UInt8] = []) {
      positions.append(bytes.count)
      bytes += MirrorJournalFormat.encode(r, payload: payload)
    }
    add(MirrorJournalRecord(type: .write, interval: 1, sequence: 1, offset: 0, length: 5), [1, 2, 3, 4, 5])
    add(MirrorJournalRecord(type: .zero, interval: 1, sequence: 2, offset: 4096, length: 4096))
    add(MirrorJournalRecord(type: .intervalEnd, interval: 1, sequence: 3))
    add(MirrorJournalRecord(type: .trim, interval: 2, sequence: 4, offset: 0, length: 512))
    add(MirrorJournalRecord(type: .write, interval: 2, sequence: 5, offset: 512, length: 3), [9, 9, 9])
    add(MirrorJournalRecord(type: .intervalEnd, interval: 2, sequence: 6))
    return (bytes, positions)
  }

  func testCleanJournalScans() throws {
    let (bytes, positions) = journal()
    let s = try scan(bytes)
    XCTAssertEqual(s.header, header)
    XCTAssertEqual(s.end, bytes.count)
    XCTAssertNil(s.torn)
    XCTAssertEqual(s.intervals.map(\.interval), [1, 2])
    XCTAssertEqual(
      s.intervals.map { $0.records.map(\.position) }, [[positions[0], positions[1]], [positions[3], positions[4]]])
    XCTAssertEqual(s.intervals.map(\.endPosition), [positions[2], positions[5]])
    XCTAssertEqual(Array(bytes[s.intervals[0].records[0].record.payload]), [1, 2, 3, 4, 5])
    XCTAssertTrue(s.open.isEmpty)
  }

  func testTornTailIsCutNotDamage() throws {
    var (bytes, _) = journal()
    let good = bytes.count
    // An open interval's good record, then one cut short at every length.
    let open = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .trim, interval: 3, sequence: 7, offset: 0, length: 512))
    let last = MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .write, interval: 3, sequence: 8, offset: 0, length: 100),
      payload: .init(repeating: 4, count: 100))
    bytes += open
    for cut in 1..<last.count {
      let s = try scan(bytes + last[0..<cut])
      XCTAssertEqual(s.end, good + open.count, "cut \(cut)")
      XCTAssertEqual(s.intervals.count, 2)
      XCTAssertEqual(s.open.map(\.position), [good])
      XCTAssertNotNil(s.torn)
    }
    // A complete last record whose CRC is wrong is torn too.
    var bad = last
    bad[50] ^= 1
    XCTAssertEqual(try scan(bytes + bad).torn, .refused(.badChecksum))
    XCTAssertEqual(try scan(bytes + bad).end, good + open.count)
    // So is a garbage tail right after the last interval end.
    let s = try scan(Array(bytes[0..<good]) + [0, 0, 0, 0, 0, 0, 0, 0])
    XCTAssertEqual(s.end, good)
    XCTAssertEqual(s.torn, .refused(.badMagic(0)))
  }

  func testBadRecordBeforeTheLastIntervalEndIsDamage() {
    let (clean, positions) = journal()
    var bytes = clean
    bytes[positions[1] + 30] ^= 1  // the zero record of interval 1
    XCTAssertThrowsError(try scan(bytes)) {
      XCTAssertEqual($0 as? MirrorJournalDamage, .badRecord(at: positions[1], .badChecksum))
      XCTAssertTrue("\($0)".contains("offset \(positions[1])"), "\($0)")
    }
    // A damaged length that reaches past the end of the journal hides no
    // interval end: the one it reaches over still makes it damage.
    bytes = clean
    patch(&bytes, at: positions[4] + 36, 64, width: 8)
    patch(&bytes, at: positions[4] + 8, 64, width: 4)
    XCTAssertThrowsError(try scan(bytes)) {
      XCTAssertEqual($0 as? MirrorJournalDamage, .shortRecord(at: positions[4]))
    }
    // A bad record in the last interval, before its end, is damage too.
    bytes = clean
    bytes[positions[4] + 44] ^= 1
    XCTAssertThrowsError(try scan(bytes)) {
      XCTAssertEqual($0 as? MirrorJournalDamage, .badRecord(at: positions[4], .badChecksum))
    }
  }

  func testOrderDamage() {
    let (clean, positions) = journal()
    func damage(_ change: (inout [UInt8]) -> Void) -> MirrorJournalDamage? {
      var b = clean
      change(&b)
      do {
        _ = try scan(b)
        return nil
      } catch {
        return error
      }
    }
    XCTAssertNil(damage { _ in })
    XCTAssertEqual(
      damage { patch(&$0, at: positions[1] + 20, 1, width: 8, recrc: positions[1]) },
      .sequenceNotIncreasing(at: positions[1], previous: 1, found: 1))
    XCTAssertEqual(
      damage { patch(&$0, at: positions[4] + 12, 0, width: 8, recrc: positions[4]) },
      .intervalWentDown(at: positions[4], previous: 2, found: 0))
    XCTAssertEqual(
      damage { patch(&$0, at: positions[3] + 12, 1, width: 8, recrc: positions[3]) },
      .afterIntervalEnd(at: positions[3], interval: 1))
    XCTAssertEqual(
      damage { patch(&$0, at: positions[1] + 12, 2, width: 8, recrc: positions[1]) },
      .intervalNotEnded(at: positions[1], open: 1, found: 2))
    XCTAssertEqual(
      damage { patch(&$0, at: positions[0] + 12, 2, width: 8, recrc: positions[0]) },
      .intervalWentDown(at: positions[1], previous: 2, found: 1))
    // Order damage in the tail is damage too: the records there are good.
    var tail = clean
    tail += MirrorJournalFormat.encode(
      MirrorJournalRecord(type: .trim, interval: 3, sequence: 6, offset: 0, length: 512))
    XCTAssertThrowsError(try scan(tail)) {
      XCTAssertEqual($0 as? MirrorJournalDamage, .sequenceNotIncreasing(at: clean.count, previous: 6, found: 6))
    }
    var header = clean
    header[0] = 0
    XCTAssertThrowsError(try scan(header)) {
      guard case .header(let e) = $0 as? MirrorJournalDamage else { return XCTFail("\($0)") }
      XCTAssertTrue(e.message.contains("magic"))
    }
  }

  func testSeededRandomJournalScansBackEqual() throws {
    var rng = SplitMix64(seed: testSeed(0x6a6e_6c))
    var bytes = header.encoded
    var expected: [MirrorJournalInterval] = []
    var open: [(position: Int, record: MirrorJournalRecord)] = []
    var payloads: [Int: [UInt8]] = [:]
    var sequence = rng.next() % 1000
    var interval = rng.next() % 1000
    for _ in 0..<2000 {
      sequence += 1 + rng.next() % 3
      let position = bytes.count
      let pick = rng.next() % 10
      if pick == 0 {
        let r = MirrorJournalRecord(type: .intervalEnd, interval: interval, sequence: sequence)
        bytes += MirrorJournalFormat.encode(r)
        expected.append(MirrorJournalInterval(interval: interval, records: open, endPosition: position))
        open = []
        interval += 1 + rng.next() % 2
        continue
      }
      let type: MirrorJournalRecordType = pick < 7 ? .write : pick < 9 ? .zero : .trim
      let length = type == .write ? 1 + rng.next() % 9000 : 1 + rng.next() % (1 << 19)
      let offset = rng.next() % (header.deviceSize - length + 1)
      let payload = type == .write ? rng.bytes(Int(length)) : []
      var r = MirrorJournalRecord(type: type, interval: interval, sequence: sequence, offset: offset, length: length)
      bytes += MirrorJournalFormat.encode(r, payload: payload)
      r.payload = position + 44..<position + 44 + payload.count
      open.append((position, r))
      payloads[position] = payload
    }
    let s = try scan(bytes)
    XCTAssertGreaterThan(expected.count, 100)
    XCTAssertEqual(s.intervals, expected)
    XCTAssertEqual(s.open.map(\.position), open.map(\.position))
    XCTAssertEqual(s.end, bytes.count)
    XCTAssertNil(s.torn)
    for interval in s.intervals {
      for (position, record) in interval.records {
        XCTAssertEqual(Array(bytes[record.payload]), payloads[position])
      }
    }
  }

  func testFuzzEntryPointsScanAndRepair() {
    let (clean, positions) = journal()
    XCTAssertNil(FuzzEntryPoints.scanMirrorJournal(clean))
    // With every checksum zeroed the first record starts a torn tail; the
    // repair makes the journal whole again.
    var zeroed = clean
    for i in 64..<68 { zeroed[i] = 0 }
    for (n, p) in positions.enumerated() {
      let end = n + 1 < positions.count ? positions[n + 1] : clean.count
      let payload = Int(clean[p + 8])
      let crc = p + 44 + payload
      XCTAssertLessThanOrEqual(crc + 4, end)
      for i in crc..<crc + 4 { zeroed[i] = 0 }
    }
    XCTAssertNotNil(FuzzEntryPoints.scanMirrorJournal(zeroed))
    XCTAssertEqual(FuzzEntryPoints.repairMirrorJournalChecksums(zeroed), clean)
    XCTAssertEqual(
      FuzzEntryPoints.scanMirrorJournal(clean + [1, 2, 3]), "torn at \(clean.count): needMoreBytes(needed: 44)")
  }
}

extension MirrorJournalDecoded {
  var isRecord: Bool {
    if case .record = self { return true }
    return false
  }
}
