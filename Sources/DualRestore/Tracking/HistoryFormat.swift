// The point-in-time history's files (dualrestore-history(5)): the format
// lives here; the store as it is kept is PointHistory.
//
// A history is a directory of log files, each named by the log position of
// its first byte (16 hexadecimal digits, then ".points"). The log is one
// sequence of records through the files in that order: the before-images
// of the blocks each segment (the writes between two points) overwrote,
// and a point record closing each segment.
//
// Invariants the reader keeps: it never reads past the bytes it is given,
// never trusts a count before checking it against a limit, and never calls
// a header good unless its CRC-32C holds. A before-image's blocks each have
// their own CRC-32C, checked whenever the block is read.
//
// All integers are little-endian. A file starts with 4096 bytes: two
// header slots of 2048 bytes (the one with the good CRC and the higher
// update count is current; an update writes the other):
//   offset size  field
//        0    8  magic "DRHIST01"
//        8    4  version, 1
//       12    4  update count (the slot's; higher is newer)
//       16   16  history id
//       32    8  device size in bytes
//       40    4  block size in bytes (4096)
//       44    4  flags: bit 0, the first segment began in an earlier file
//       48    8  this file's log position (its first byte's)
//       56    8  the segment open at `live`
//       64    8  the point before that segment (its number)
//       72    8  that point's instant, nanoseconds since the Unix epoch
//       80    8  live: the log position of the first record kept (the
//                records before it belong to trimmed segments; their bytes
//                are punched out)
//       88    4  CRC-32C of bytes 0..<88
//       92 1956  zero
// Records follow from file offset 4096:
//        0    4  magic "DRPH"
//        4    1  type: 1 before-image, 2 point
//        5    1  flags: before-image bit 0, the blocks were zeros (no
//                CRCs, no data follow)
//        6    2  reserved, 0
//        8    8  segment
//       16    8  before-image: first block; point: instant (ns)
//       24    4  before-image: block count (1 to 8192); point: 0
//       28    4  reserved, 0
//       32    8  point: bytes of the segment's records; before-image: 0
//       40    4  reserved, 0
//       44    4  CRC-32C of bytes 0..<44
// A before-image with data is followed by one CRC-32C per block, then the
// blocks (4096 bytes each; a block past the device's end is padded with
// zeros).

import CShim

public enum HistoryFormat {
  public static let fileMagic = Array("DRHIST01".utf8)
  public static let recordMagic: UInt32 = 0x4850_5244  // "DRPH"
  public static let version: UInt32 = 1
  public static let fileHeaderLength = 4096
  public static let slotLength = 2048
  public static let slotFields = 88
  public static let recordHeaderLength = 48
  public static let blockSize: UInt32 = 4096
  public static let maximumRecordBlocks: UInt32 = 8192
  public static let typeBefore: UInt8 = 1
  public static let typePoint: UInt8 = 2
  public static let flagZero: UInt8 = 1

  public struct FileHeader: Equatable, Sendable {
    public var updates: UInt32
    public var historyID: ID128
    public var deviceSize: UInt64
    public var blockSize: UInt32
    public var continues: Bool
    public var position: UInt64
    public var openSegment: UInt64
    public var previousPoint: UInt64
    public var previousInstant: Int64
    public var live: UInt64

    public init(
      updates: UInt32, historyID: ID128, deviceSize: UInt64, blockSize: UInt32, continues: Bool, position: UInt64,
      openSegment: UInt64, previousPoint: UInt64, previousInstant: Int64, live: UInt64
    ) {
      self.updates = updates
      self.historyID = historyID
      self.deviceSize = deviceSize
      self.blockSize = blockSize
      self.continues = continues
      self.position = position
      self.openSegment = openSegment
      self.previousPoint = previousPoint
      self.previousInstant = previousInstant
      self.live = live
    }

    /// One slot's 2048 bytes.
    public func encoded() -> [UInt8] {
      var w = ByteWriter()
      w.raw(HistoryFormat.fileMagic)
      w.u32(HistoryFormat.version)
      w.u32(updates)
      w.id(historyID)
      w.u64(deviceSize)
      w.u32(blockSize)
      w.u32(continues ? 1 : 0)
      w.u64(position)
      w.u64(openSegment)
      w.u64(previousPoint)
      w.i64(previousInstant)
      w.u64(live)
      let crc = w.bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
      w.u32(crc)
      w.zeros(HistoryFormat.slotLength - w.bytes.count)
      return w.bytes
    }

    /// The slot's header, or why it is not one.
    public static func decode(slot bytes: ArraySlice<UInt8>) -> Result<FileHeader, HistoryFormatError> {
      guard bytes.count >= HistoryFormat.slotFields + 4 else { return .failure(.init("is too short for a header")) }
      guard bytes.prefix(8).elementsEqual(HistoryFormat.fileMagic) else {
        return .failure(.init("is not a history file (no DRHIST01 magic)"))
      }
      var r = ByteReader(bytes)
      _ = r.take(8)
      guard let version = r.u32(), let updates = r.u32(), let id = r.id(), let size = r.u64(), let bs = r.u32(),
        let flags = r.u32(), let position = r.u64(), let open = r.u64(), let previous = r.u64(),
        let instant = r.i64(), let live = r.u64(), let crc = r.u32()
      else { return .failure(.init("is too short for a header")) }
      let want = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, HistoryFormat.slotFields) }
      guard crc == want else { return .failure(.init("has a header whose CRC does not match")) }
      guard version == HistoryFormat.version else {
        return .failure(.init("is history format version \(version); this version reads version 1"))
      }
      guard bs == HistoryFormat.blockSize else { return .failure(.init("has block size \(bs), not 4096")) }
      guard flags & ~1 == 0 else { return .failure(.init("has unknown header flags \(flags)")) }
      guard position <= UInt64.max - UInt64(HistoryFormat.fileHeaderLength),
        live >= position + UInt64(HistoryFormat.fileHeaderLength), open >= 1, previous == open - 1
      else {
        return .failure(.init("has a header whose positions or segments do not agree"))
      }
      return .success(
        FileHeader(
          updates: updates, historyID: id, deviceSize: size, blockSize: bs, continues: flags & 1 != 0,
          position: position, openSegment: open, previousPoint: previous, previousInstant: instant, live: live))
    }

    /// The current header of a file's first 4096 bytes: the good slot with
    /// the higher update count.
    public static func decode(file bytes: ArraySlice<UInt8>) -> Result<FileHeader, HistoryFormatError> {
      guard bytes.count >= HistoryFormat.fileHeaderLength else {
        return .failure(.init("is shorter than a history file's header"))
      }
      let s = bytes.startIndex
      let a = decode(slot: bytes[s..<s + HistoryFormat.slotLength])
      let b = decode(slot: bytes[s + HistoryFormat.slotLength..<s + HistoryFormat.fileHeaderLength])
      switch (a, b) {
      case (.success(let x), .success(let y)):
        guard x.historyID == y.historyID, x.position == y.position else {
          return .failure(.init("has two header slots of different files"))
        }
        return .success(x.updates >= y.updates ? x : y)
      case (.success(let x), .failure): return .success(x)
      case (.failure, .success(let y)): return .success(y)
      case (.failure(let e), .failure): return .failure(e)
      }
    }
  }

  public enum Record: Equatable, Sendable {
    case before(segment: UInt64, first: UInt64, count: UInt32, zero: Bool)
    case point(segment: UInt64, instant: Int64, bytes: UInt64)

    public var segment: UInt64 {
      switch self {
      case .before(let s, _, _, _): return s
      case .point(let s, _, _): return s
      }
    }

    /// Bytes after the header: the CRCs and the blocks.
    public var bodyLength: UInt64 {
      guard case .before(_, _, let count, let zero) = self, !zero else { return 0 }
      return UInt64(count) * (4 + UInt64(HistoryFormat.blockSize))
    }

    public var length: UInt64 { UInt64(HistoryFormat.recordHeaderLength) + bodyLength }

    /// The 48-byte header, written into `to`.
    public func encodeHeader(into to: UnsafeMutableRawPointer) {
      var w = ByteWriter()
      w.u32(HistoryFormat.recordMagic)
      switch self {
      case .before(let segment, let first, let count, let zero):
        w.u8(HistoryFormat.typeBefore)
        w.u8(zero ? HistoryFormat.flagZero : 0)
        w.u16(0)
        w.u64(segment)
        w.u64(first)
        w.u32(count)
        w.u32(0)
        w.u64(0)
      case .point(let segment, let instant, let bytes):
        w.u8(HistoryFormat.typePoint)
        w.u8(0)
        w.u16(0)
        w.u64(segment)
        w.i64(instant)
        w.u32(0)
        w.u32(0)
        w.u64(bytes)
      }
      w.u32(0)
      let crc = w.bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
      w.u32(crc)
      w.bytes.withUnsafeBytes { to.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    /// The record whose header is `bytes` (48 bytes), or why it is none.
    public static func decodeHeader(_ bytes: UnsafeRawBufferPointer) -> Result<Record, HistoryFormatError> {
      guard bytes.count >= HistoryFormat.recordHeaderLength else { return .failure(.init("a record is cut short")) }
      func u32(_ at: Int) -> UInt32 { bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self).littleEndian }
      func u64(_ at: Int) -> UInt64 { bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian }
      guard u32(0) == HistoryFormat.recordMagic else { return .failure(.init("a record has no DRPH magic")) }
      guard dr_crc32c(0, bytes.baseAddress, 44) == u32(44) else {
        return .failure(.init("a record header's CRC does not match"))
      }
      let type = bytes[4]
      let flags = bytes[5]
      guard bytes[6] == 0, bytes[7] == 0, u32(28) == 0, u32(40) == 0 else {
        return .failure(.init("a record has reserved fields set"))
      }
      let segment = u64(8)
      guard segment >= 1 else { return .failure(.init("a record names segment 0")) }
      switch type {
      case HistoryFormat.typeBefore:
        let count = u32(24)
        guard flags & ~HistoryFormat.flagZero == 0, u64(32) == 0 else {
          return .failure(.init("a before-image record has unknown flags"))
        }
        guard count >= 1, count <= HistoryFormat.maximumRecordBlocks else {
          return .failure(.init("a before-image record holds \(count) blocks (1 to 8192)"))
        }
        return .success(.before(segment: segment, first: u64(16), count: count, zero: flags & 1 != 0))
      case HistoryFormat.typePoint:
        guard flags == 0, u32(24) == 0 else { return .failure(.init("a point record has unknown fields set")) }
        return .success(.point(segment: segment, instant: Int64(bitPattern: u64(16)), bytes: u64(32)))
      default:
        return .failure(.init("a record has unknown type \(type)"))
      }
    }
  }

  /// What a scan of one file's records found.
  public struct Scan: Sendable {
    /// Each good record and its offset in the file.
    public var records: [(offset: UInt64, record: Record)] = []
    /// Where the good records end (the file is cut here after a crash).
    public var end: UInt64
    /// Why the scan stopped before the file's end, or nil.
    public var stopped: HistoryFormatError?
    /// Whether it stopped at a record that runs past the file's end (one a
    /// crash cut short), rather than at bytes that are no good record.
    public var cutShort = false
  }

  /// Scans records from `start` to `length` in a file read through `read`
  /// (offset, count → bytes, or nil on an error). Record headers are
  /// checked; a before-image's blocks are checked when `checkData` is set
  /// (the tail a crash may have torn). Records must go on in order: a
  /// segment never goes down, a point closes the segment it names, blocks
  /// lie inside `blockCount`.
  public static func scan(
    from start: UInt64, length: UInt64, blockCount: UInt64, openSegment: UInt64, checkData: (UInt64) -> Bool,
    read: (UInt64, Int) -> [UInt8]?
  ) -> Scan {
    var scan = Scan(end: start)
    var at = start
    var segment = openSegment
    var closed = false
    while at < length {
      guard length - at >= UInt64(recordHeaderLength) else {
        scan.stopped = .init("a record is cut short at offset \(at)")
        scan.cutShort = true
        break
      }
      guard let header = read(at, recordHeaderLength) else {
        scan.stopped = .init("cannot read offset \(at)")
        break
      }
      let decoded = header.withUnsafeBytes { Record.decodeHeader($0) }
      guard case .success(let record) = decoded else {
        if case .failure(let e) = decoded { scan.stopped = .init("\(e.sentence) at offset \(at)") }
        break
      }
      // A segment's records, then its point; then the next segment's.
      guard record.segment == (closed ? segment + 1 : segment) else {
        scan.stopped = .init("a record of segment \(record.segment) follows segment \(segment) at offset \(at)")
        break
      }
      if case .before(_, let first, let count, let zero) = record {
        guard first < blockCount, UInt64(count) <= blockCount - first else {
          scan.stopped = .init("a before-image at offset \(at) lies past the device's end")
          break
        }
        guard length - at >= record.length else {
          scan.stopped = .init("a before-image is cut short at offset \(at)")
          scan.cutShort = true
          break
        }
        if !zero && checkData(at) {
          guard verifyBlocks(at: at, count: Int(count), read: read) else {
            scan.stopped = .init("a before-image's blocks do not match their CRCs at offset \(at)")
            break
          }
        }
      }
      segment = record.segment
      if case .point = record { closed = true } else { closed = false }
      scan.records.append((at, record))
      at += record.length
      scan.end = at
    }
    return scan
  }

  /// Whether every block of the before-image at `at` matches its CRC.
  static func verifyBlocks(at: UInt64, count: Int, read: (UInt64, Int) -> [UInt8]?) -> Bool {
    let crcAt = at + UInt64(recordHeaderLength)
    guard let crcs = read(crcAt, 4 * count) else { return false }
    let dataAt = crcAt + UInt64(4 * count)
    var i = 0
    while i < count {
      let n = min(count - i, 256)
      guard let data = read(dataAt + UInt64(i) * UInt64(blockSize), n * Int(blockSize)) else { return false }
      let good = data.withUnsafeBytes { d in
        crcs.withUnsafeBytes { c in
          (0..<n).allSatisfy { k in
            dr_crc32c(0, d.baseAddress! + k * Int(blockSize), Int(blockSize))
              == c.loadUnaligned(fromByteOffset: 4 * (i + k), as: UInt32.self).littleEndian
          }
        }
      }
      guard good else { return false }
      i += n
    }
    return true
  }

  /// The file name of the log file starting at `position`.
  public static func fileName(_ position: UInt64) -> String {
    let hex = String(position, radix: 16)
    return String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".points"
  }

  /// The log position a file name stands for, or nil when it is not one.
  public static func position(ofFileName name: String) -> UInt64? {
    guard name.hasSuffix(".points"), name.utf8.count == 23 else { return nil }
    return UInt64(name.prefix(16), radix: 16)
  }
}

public struct HistoryFormatError: Error, Sendable, Equatable, CustomStringConvertible {
  public var sentence: String
  public init(_ sentence: String) { self.sentence = sentence }
  public var description: String { sentence }
}
