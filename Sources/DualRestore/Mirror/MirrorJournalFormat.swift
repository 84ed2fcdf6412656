// The mirror journal (dualrestore-journal(5)): the local, crash-safe log that
// asynchronous mirroring appends every client write, zero and trim to, and
// an interval-end record at every client flush. The format lives here; the
// journal file as it is kept is MirrorJournal.
//
// Invariants the reader keeps: it never reads past the bytes it is given,
// never trusts a length before checking it against a limit (64 MiB of
// payload, the device's size), and never calls a record good unless its
// CRC-32C holds. A scan tells a torn tail (a bad or incomplete record with no
// good interval-end record after it: the append a crash cut, to be
// truncated) from damage (anything wrong before the last interval end, or
// records out of order), which it refuses. Only complete intervals are
// handed on; a writer never copies a write's payload to frame it.
//
// All integers are little-endian. The header is 4096 bytes:
//   offset size  field
//        0    8  magic "DRMIRJNL"
//        8    4  version, 1
//       12   16  journal id
//       28   16  overwrite map id
//       44    8  device size in bytes
//       52    4  block size in bytes (a power of two, at least 512)
//       56    8  creation instant, nanoseconds since the Unix epoch
//       64    4  CRC-32C of bytes 0..<64
//       68 4028  zero
// Records follow from offset 4096, each at an 8-byte-aligned offset:
//        0    4  magic "DRJR"
//        4    1  type: 1 write, 2 zero, 3 trim, 4 interval end
//        5    1  flags, 0
//        6    2  reserved, 0
//        8    4  payload length (write: the length; otherwise 0)
//       12    8  interval
//       20    8  sequence (strictly increasing through the journal)
//       28    8  device offset (interval end: 0)
//       36    8  length in bytes (interval end: 0)
//       44    P  payload
//     44+P    4  CRC-32C of bytes 0..<44+P
//     48+P    -  zero padding to the next multiple of 8

import CShim

// MARK: Header

/// The header of a mirror journal.
public struct MirrorJournalHeader: Equatable, Sendable {
  public var journal: ID128
  /// The overwrite map the journal belongs to.
  public var map: ID128
  public var deviceSize: UInt64
  public var blockSize: UInt32
  public var created: Instant

  public static let magic: [UInt8] = Array("DRMIRJNL".utf8)
  public static let version: UInt32 = 1
  public static let length = 4096
  /// The bytes the CRC-32C covers; the CRC follows them.
  static let checkedLength = 64

  /// The 4096 bytes of the header.
  public var encoded: [UInt8] {
    var w = ByteWriter()
    w.raw(Self.magic)
    w.u32(Self.version)
    w.id(journal)
    w.id(map)
    w.u64(deviceSize)
    w.u32(blockSize)
    w.i64(created.nanosecondsSinceEpoch)
    let crc = w.bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
    w.u32(crc)
    w.zeros(Self.length - w.bytes.count)
    return w.bytes
  }
}

extension MirrorJournalHeader {
  /// Reads a header; the error names the field that is wrong.
  public init(decoding bytes: ArraySlice<UInt8>) throws(ToolkitError) {
    guard bytes.count >= Self.length else {
      throw ToolkitError(
        "the mirror journal's header has \(bytes.count) bytes, fewer than \(Self.length)")
    }
    var r = ByteReader(bytes.prefix(Self.length))
    guard let magic = r.take(8), magic.elementsEqual(Self.magic) else {
      throw ToolkitError("the mirror journal's header does not start with the magic DRMIRJNL")
    }
    // Every read below is within the 4096 bytes just checked.
    let version = r.u32() ?? 0
    guard version <= Self.version else {
      throw ToolkitError(
        "the mirror journal's format version is \(version), newer than this build's \(Self.version)")
    }
    guard version == Self.version else {
      throw ToolkitError("the mirror journal's format version is \(version), which no build wrote")
    }
    let journal = r.id() ?? .none
    let map = r.id() ?? .none
    let deviceSize = r.u64() ?? 0
    let blockSize = r.u32() ?? 0
    let created = r.i64() ?? 0
    let stored = r.u32() ?? 0
    let crc =
      bytes.withContiguousStorageIfAvailable { dr_crc32c(0, $0.baseAddress, Self.checkedLength) }
      ?? Array(bytes.prefix(Self.checkedLength)).withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
    guard crc == stored else {
      throw ToolkitError("the mirror journal's header checksum does not match its bytes")
    }
    guard let rest = r.take(r.remaining), rest.allSatisfy({ $0 == 0 }) else {
      throw ToolkitError("the mirror journal's header has non-zero bytes after its checksum")
    }
    guard blockSize != 0 else { throw ToolkitError("the mirror journal's block size is 0") }
    guard blockSize >= 512, blockSize & (blockSize - 1) == 0 else {
      throw ToolkitError("the mirror journal's block size \(blockSize) is not a power of two of at least 512")
    }
    guard !journal.isNone else { throw ToolkitError("the mirror journal's id is zero") }
    guard !map.isNone else { throw ToolkitError("the mirror journal's overwrite map id is zero") }
    self.init(
      journal: journal, map: map, deviceSize: deviceSize, blockSize: blockSize,
      created: Instant(nanosecondsSinceEpoch: created))
  }
}

// MARK: Records

/// What a record records.
public enum MirrorJournalRecordType: UInt8, Sendable, CaseIterable {
  case write = 1
  case zero = 2
  case trim = 3
  case intervalEnd = 4
}

/// One record's fields; a write's data stays where it is, at `payload`.
public struct MirrorJournalRecord: Equatable, Sendable {
  public var type: MirrorJournalRecordType
  public var interval: UInt64
  public var sequence: UInt64
  public var offset: UInt64 = 0
  public var length: UInt64 = 0
  /// Where the payload is in the bytes decoded (empty but for writes).
  public var payload: Range<Int> = 0..<0

  /// A write, zero or trim of `length` bytes at `offset`.
  public static func change(
    _ type: MirrorJournalRecordType, interval: UInt64, sequence: UInt64, offset: UInt64, length: UInt64
  ) -> MirrorJournalRecord {
    MirrorJournalRecord(type: type, interval: interval, sequence: sequence, offset: offset, length: length)
  }

  /// The record that closes `interval`.
  public static func intervalEnd(_ interval: UInt64, sequence: UInt64) -> MirrorJournalRecord {
    MirrorJournalRecord(type: .intervalEnd, interval: interval, sequence: sequence, offset: 0, length: 0)
  }
}

/// Why a record was refused.
public enum MirrorJournalRecordError: Error, Equatable, Sendable, CustomStringConvertible {
  case badMagic(UInt32)
  case unknownType(UInt8)
  case unknownFlags(UInt8)
  case reservedNotZero(UInt16)
  case payloadTooLong(UInt32)
  /// A write whose payload is not its length, or another record with one.
  case payloadMismatch(MirrorJournalRecordType, payload: UInt32, length: UInt64)
  case emptyRange(MirrorJournalRecordType)
  case intervalEndWithRange
  case rangeOverflows(offset: UInt64, length: UInt64)
  case beyondDevice(offset: UInt64, length: UInt64, deviceSize: UInt64)
  case badChecksum
  case paddingNotZero

  public var description: String {
    switch self {
    case .badMagic(let v): return "does not start with the record magic DRJR (found 0x\(String(v, radix: 16)))"
    case .unknownType(let t): return "has type \(t), which is not write, zero, trim or interval end"
    case .unknownFlags(let f): return "has flags 0x\(String(f, radix: 16)), which this build does not know"
    case .reservedNotZero(let v): return "has \(v) in its reserved field, not 0"
    case .payloadTooLong(let n):
      return "has a payload of \(n) bytes, more than \(MirrorJournalFormat.maximumPayload)"
    case .payloadMismatch(let t, let p, let l): return "is a \(t) record of \(l) bytes with a payload of \(p) bytes"
    case .emptyRange(let t): return "is a \(t) record of no bytes"
    case .intervalEndWithRange: return "is an interval end that names a range of the device"
    case .rangeOverflows(let o, let l): return "names \(l) bytes at offset \(o), past 2^64"
    case .beyondDevice(let o, let l, let s): return "names \(l) bytes at offset \(o), past the device's \(s) bytes"
    case .badChecksum: return "has a checksum that does not match its bytes"
    case .paddingNotZero: return "has non-zero padding"
    }
  }
}

/// What decoding the bytes at a position gave.
public enum MirrorJournalDecoded: Equatable, Sendable {
  /// A good record and the bytes it takes, padding included.
  case record(MirrorJournalRecord, size: Int)
  /// The bytes end inside the record (at least `needed` bytes are needed).
  case needMoreBytes(needed: Int)
  case refused(MirrorJournalRecordError)
}

public enum MirrorJournalFormat {
  /// "DRJR" read as a little-endian 32-bit word.
  public static let recordMagic: UInt32 = 0x524A_5244
  public static let recordHeaderLength = 44
  public static let checksumLength = 4
  public static let alignment = 8
  /// The most payload one record may carry: 64 MiB.
  public static let maximumPayload: UInt32 = 64 << 20

  /// The bytes a record with `payload` bytes of payload takes, padding included.
  public static func recordSize(payload: Int) -> Int {
    (recordHeaderLength + payload + checksumLength + alignment - 1) & ~(alignment - 1)
  }

  /// Writes a record's 44-byte header into `header` and its CRC-32C and zero
  /// padding into `trailer` (at least 11 bytes), computing the CRC over the
  /// header and then `payload` where it lies: the payload is never copied.
  /// Returns how many bytes of `trailer` belong to the record.
  public static func frame(
    _ record: MirrorJournalRecord, payload: UnsafeRawBufferPointer,
    header: UnsafeMutableRawBufferPointer, trailer: UnsafeMutableRawBufferPointer
  ) -> Int {
    precondition(header.count >= recordHeaderLength && trailer.count >= checksumLength + alignment - 1)
    precondition(record.type == .write ? UInt64(payload.count) == record.length : payload.isEmpty)
    func put(_ v: UInt64, _ at: Int, _ width: Int) {
      for i in 0..<width { header[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
    }
    put(UInt64(recordMagic), 0, 4)
    put(UInt64(record.type.rawValue), 4, 1)
    put(0, 5, 1)
    put(0, 6, 2)
    put(UInt64(payload.count), 8, 4)
    put(record.interval, 12, 8)
    put(record.sequence, 20, 8)
    put(record.offset, 28, 8)
    put(record.length, 36, 8)
    var crc = dr_crc32c(0, header.baseAddress, recordHeaderLength)
    if !payload.isEmpty { crc = dr_crc32c(crc, payload.baseAddress, payload.count) }
    let size = recordSize(payload: payload.count) - recordHeaderLength - payload.count
    for i in 0..<size { trailer[i] = i < 4 ? UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) : 0 }
    return size
  }

  /// A whole record as bytes, for records without payload and for tests;
  /// the write path frames the payload in place with `frame`.
  public static func encode(_ record: MirrorJournalRecord, payload: [UInt8] = []) -> [UInt8] {
    var header = [UInt8](repeating: 0, count: recordHeaderLength)
    var trailer = [UInt8](repeating: 0, count: checksumLength + alignment - 1)
    let used = payload.withUnsafeBytes { p in
      header.withUnsafeMutableBytes { h in
        trailer.withUnsafeMutableBytes { t in frame(record, payload: p, header: h, trailer: t) }
      }
    }
    return header + payload + trailer[0..<used]
  }
}

/// Decodes records for a device of a given size.
public struct MirrorJournalDecoder: Sendable {
  public let deviceSize: UInt64

  public init(deviceSize: UInt64) { self.deviceSize = deviceSize }

  /// The record at the start of `bytes`. The record's payload range is
  /// relative to `bytes`' start plus `base`.
  public func decode(_ bytes: UnsafeRawBufferPointer, base: Int = 0) -> MirrorJournalDecoded {
    typealias F = MirrorJournalFormat
    func le(_ at: Int, _ width: Int) -> UInt64 {
      var v: UInt64 = 0
      for i in 0..<width { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
      return v
    }
    // Each check reads only bytes already known to be there.
    if bytes.count < 4 { return .needMoreBytes(needed: F.recordHeaderLength) }
    let magic = UInt32(le(0, 4))
    guard magic == F.recordMagic else { return .refused(.badMagic(magic)) }
    if bytes.count < F.recordHeaderLength { return .needMoreBytes(needed: F.recordHeaderLength) }
    guard let type = MirrorJournalRecordType(rawValue: bytes[4]) else { return .refused(.unknownType(bytes[4])) }
    guard bytes[5] == 0 else { return .refused(.unknownFlags(bytes[5])) }
    let reserved = UInt16(le(6, 2))
    guard reserved == 0 else { return .refused(.reservedNotZero(reserved)) }
    let payloadLength = UInt32(le(8, 4))
    guard payloadLength <= F.maximumPayload else { return .refused(.payloadTooLong(payloadLength)) }
    let interval = le(12, 8)
    let sequence = le(20, 8)
    let offset = le(28, 8)
    let length = le(36, 8)
    switch type {
    case .write:
      guard UInt64(payloadLength) == length else {
        return .refused(.payloadMismatch(type, payload: payloadLength, length: length))
      }
    case .zero, .trim, .intervalEnd:
      guard payloadLength == 0 else { return .refused(.payloadMismatch(type, payload: payloadLength, length: length)) }
    }
    if type == .intervalEnd {
      guard offset == 0 && length == 0 else { return .refused(.intervalEndWithRange) }
    } else {
      guard length > 0 else { return .refused(.emptyRange(type)) }
      let (end, overflow) = offset.addingReportingOverflow(length)
      guard !overflow else { return .refused(.rangeOverflows(offset: offset, length: length)) }
      guard end <= deviceSize else {
        return .refused(.beyondDevice(offset: offset, length: length, deviceSize: deviceSize))
      }
    }
    // The payload is at most 64 MiB, so none of these sums overflow.
    let payload = Int(payloadLength)
    let size = F.recordSize(payload: payload)
    if bytes.count < size { return .needMoreBytes(needed: size) }
    let checked = F.recordHeaderLength + payload
    let stored = UInt32(le(checked, 4))
    guard dr_crc32c(0, bytes.baseAddress, checked) == stored else { return .refused(.badChecksum) }
    for i in checked + 4..<size where bytes[i] != 0 { return .refused(.paddingNotZero) }
    let record = MirrorJournalRecord(
      type: type, interval: interval, sequence: sequence, offset: offset, length: length,
      payload: base + F.recordHeaderLength..<base + checked)
    return .record(record, size: size)
  }
}

// MARK: Scan

/// One complete interval: its records in journal order and its end.
public struct MirrorJournalInterval: Equatable, Sendable {
  public var interval: UInt64
  /// Where each record (not the end) starts in the journal, with its fields.
  public var records: [(position: Int, record: MirrorJournalRecord)]
  /// Where the interval-end record starts.
  public var endPosition: Int

  public static func == (a: Self, b: Self) -> Bool {
    a.interval == b.interval && a.endPosition == b.endPosition && a.records.count == b.records.count
      && zip(a.records, b.records).allSatisfy { $0.position == $1.position && $0.record == $1.record }
  }
}

/// What a scan of a whole journal found.
public struct MirrorJournalScan: Equatable, Sendable {
  public var header: MirrorJournalHeader
  public var intervals: [MirrorJournalInterval]
  /// Good records after the last interval end: an interval not yet closed
  /// by a flush, never to be sent to a far copy as it is.
  public var open: [(position: Int, record: MirrorJournalRecord)]
  /// Where the good records end: the length of the journal when it ends
  /// cleanly, else where its torn tail starts (truncate it there).
  public var end: Int
  /// The journal's tail is torn at `end`: why the record there was not good.
  public var torn: MirrorJournalDecoded?

  public static func == (a: Self, b: Self) -> Bool {
    a.header == b.header && a.intervals == b.intervals && a.end == b.end && a.torn == b.torn
      && a.open.count == b.open.count
      && zip(a.open, b.open).allSatisfy { $0.position == $1.position && $0.record == $1.record }
  }
}

/// Why a journal was refused: one kind each, with the offset of the record.
public enum MirrorJournalDamage: Error, Equatable, Sendable, CustomStringConvertible {
  case header(ToolkitError)
  /// A bad record with a good interval-end record after it.
  case badRecord(at: Int, MirrorJournalRecordError)
  /// A record cut short with a good interval-end record after it.
  case shortRecord(at: Int)
  case sequenceNotIncreasing(at: Int, previous: UInt64, found: UInt64)
  case intervalWentDown(at: Int, previous: UInt64, found: UInt64)
  /// A record of an interval whose end record came before it.
  case afterIntervalEnd(at: Int, interval: UInt64)
  /// A record of a later interval before the current one's end.
  case intervalNotEnded(at: Int, open: UInt64, found: UInt64)

  public var description: String {
    switch self {
    case .header(let e): return e.message
    case .badRecord(let at, let e):
      return "the mirror journal is damaged: the record at offset \(at) \(e), and a good interval end follows it"
    case .shortRecord(let at):
      return
        "the mirror journal is damaged: the record at offset \(at) is cut short, and a good interval end follows it"
    case .sequenceNotIncreasing(let at, let p, let f):
      return "the mirror journal is damaged: the record at offset \(at) has sequence \(f), not above \(p)"
    case .intervalWentDown(let at, let p, let f):
      return "the mirror journal is damaged: the record at offset \(at) is of interval \(f), below \(p)"
    case .afterIntervalEnd(let at, let i):
      return "the mirror journal is damaged: the record at offset \(at) is of interval \(i), which had ended"
    case .intervalNotEnded(let at, let o, let f):
      return "the mirror journal is damaged: the record at offset \(at) is of interval \(f) before interval \(o) ended"
    }
  }

  public var toolkitError: ToolkitError { ToolkitError(description) }
}

extension MirrorJournalFormat {
  /// Scans a whole journal. Good records up to the last good interval end
  /// must all be good and in order; a bad or short record with no good
  /// interval end after it starts a torn tail, which the scan reports and
  /// does not count as damage. Records start at `start` (the header's end
  /// unless the journal's consumed start was cut away).
  public static func scan(_ bytes: UnsafeRawBufferPointer, from start: Int = MirrorJournalHeader.length)
    throws(MirrorJournalDamage) -> MirrorJournalScan
  {
    let all = UnsafeRawBufferPointer(rebasing: bytes[...])
    let header: MirrorJournalHeader
    do {
      header = try MirrorJournalHeader(
        decoding: all.count >= MirrorJournalHeader.length
          ? Array(all[0..<MirrorJournalHeader.length])[...] : Array(all)[...])
    } catch {
      throw .header(error)
    }
    let decoder = MirrorJournalDecoder(deviceSize: header.deviceSize)
    var result = MirrorJournalScan(header: header, intervals: [], open: [], end: all.count, torn: nil)
    var position = max(start, MirrorJournalHeader.length)
    var lastSequence: UInt64? = nil
    var current: UInt64? = nil  // the interval of the open records, if any
    var ended: UInt64? = nil  // the last interval that ended
    while position < all.count {
      let decoded = decoder.decode(UnsafeRawBufferPointer(rebasing: all[position...]), base: position)
      guard case .record(let record, let size) = decoded else {
        // Torn tail, unless a good interval end comes after this point.
        if goodIntervalEnd(in: all, after: position, above: lastSequence, decoder: decoder) != nil {
          if case .refused(let e) = decoded { throw .badRecord(at: position, e) }
          throw .shortRecord(at: position)
        }
        result.end = position
        result.torn = decoded
        return result
      }
      if let last = lastSequence, record.sequence <= last {
        throw .sequenceNotIncreasing(at: position, previous: last, found: record.sequence)
      }
      // An open interval is above the last ended one; the later of them is
      // the one to compare with.
      if let c = current {
        if record.interval < c { throw .intervalWentDown(at: position, previous: c, found: record.interval) }
        if record.interval > c { throw .intervalNotEnded(at: position, open: c, found: record.interval) }
      } else if let e = ended {
        if record.interval < e { throw .intervalWentDown(at: position, previous: e, found: record.interval) }
        if record.interval == e { throw .afterIntervalEnd(at: position, interval: e) }
      }
      lastSequence = record.sequence
      if record.type == .intervalEnd {
        result.intervals.append(
          MirrorJournalInterval(interval: record.interval, records: result.open, endPosition: position))
        result.open = []
        ended = record.interval
        current = nil
      } else {
        result.open.append((position, record))
        current = record.interval
      }
      position += size
    }
    return result
  }

  /// The first 8-byte-aligned position after `position` holding a good
  /// interval-end record whose sequence is above `above`.
  private static func goodIntervalEnd(
    in all: UnsafeRawBufferPointer, after position: Int, above: UInt64?, decoder: MirrorJournalDecoder
  ) -> Int? {
    var q = position + alignment
    while q + recordSize(payload: 0) <= all.count {
      // Only an interval end's type byte is worth a decode.
      if all[q + 4] == MirrorJournalRecordType.intervalEnd.rawValue,
        case .record(let r, _) = decoder.decode(UnsafeRawBufferPointer(rebasing: all[q...]), base: q),
        r.type == .intervalEnd, above.map({ r.sequence > $0 }) ?? true
      {
        return q
      }
      q += alignment
    }
    return nil
  }
}
