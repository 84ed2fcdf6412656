// The journal of a change map (dualrestore-map(5), "THE CHANGE MAP'S
// JOURNAL"): block ranges marked since the map file was last saved,
// appended in place and made durable with one fdatasync per group commit —
// much cheaper than rewriting the map (temporary file, fsync, rename,
// directory fsync) before every write to a new block. It also holds the
// latest generation cut since then, so that a new generation starts with
// one small synchronous write while writes are held, and the map files are
// rewritten after the release.
//
// The file is allocated once (written with zeros, so later writes change no
// metadata) and laid out as:
//   0      512    header: "DRMARKJ2", journal id 8, CRC-32C of both 4
//   512    1792   cut slot 0 } "DRMARKC2", journal id 8, cut number 8,
//   2304   1792   cut slot 1 } ending generation id 16 and start 8, new
//                   generation id 16 and start 8, output path length 4,
//                   path, CRC-32C of all before it 4 (cut N in slot N % 2)
//   4096   48·n   records: journal id 8, map id 16, first block 8, block
//                   count 8, sequence 4, CRC-32C of the 44 bytes before it 4
// Integers little-endian. A record counts only when its journal id is the
// header's, its sequence follows the previous one and its CRC holds; the
// first that fails ends the journal. A record applies only to the map (the
// generation) whose id it carries. The cut that counts is the slot with the
// header's journal id, a good CRC and the higher number. When the map file
// is saved, the journal starts again under a new id, which orphans every
// older record and cut at once. A version-1 journal ("DRMARKJ1") has the
// same header and records and no cuts; it is read, never written.

import CShim
import Glibc

/// A generation cut kept in a change map's journal: the generation `ending`
/// (started at `endingStarted`) ended at `startedAt`, when `started`
/// began; its change map goes to `output`.
public struct MarkJournalCut: Equatable, Sendable {
  public var number: UInt64
  public var ending: ID128
  public var endingStarted: Instant
  public var started: ID128
  public var startedAt: Instant
  public var output: String

  public init(
    number: UInt64, ending: ID128, endingStarted: Instant, started: ID128, startedAt: Instant, output: String
  ) {
    self.number = number
    self.ending = ending
    self.endingStarted = endingStarted
    self.started = started
    self.startedAt = startedAt
    self.output = output
  }
}

/// What a change map's journal holds.
public struct MarkJournalContents: Equatable, Sendable {
  public var version: Int
  public var journalID: UInt64
  public var cut: MarkJournalCut?
  /// The good records, in order: the map each names and its blocks.
  public var records: [(map: ID128, blocks: Range<UInt64>)]
  /// Where the good records end (the first that failed, or the file's end).
  public var end: Int

  public static func == (a: Self, b: Self) -> Bool {
    a.version == b.version && a.journalID == b.journalID && a.cut == b.cut && a.end == b.end
      && a.records.elementsEqual(b.records) { $0.map == $1.map && $0.blocks == $1.blocks }
  }
}

public enum MarkJournalFormat {
  public static let headerLength = 4096
  public static let recordLength = 48
  public static let magic = Array("DRMARKJ2".utf8)
  public static let magicV1 = Array("DRMARKJ1".utf8)
  public static let cutMagic = Array("DRMARKC2".utf8)
  public static let cutSlots = [512, 2304]
  public static let cutSlotLength = 1792
  /// The fixed part of a cut, before its path (and the CRC after it).
  package static let cutFixedLength = 76
  /// The longest output path a cut keeps.
  public static let maximumOutputPath = cutSlotLength - cutFixedLength - 4

  /// The header block (cut slots empty) of a journal `id`.
  public static func header(journalID id: UInt64) -> [UInt8] {
    var h = [UInt8](repeating: 0, count: headerLength)
    h.replaceSubrange(0..<8, with: magic)
    h.storeLE(id, at: 8)
    h.storeLE(h.crc(0, 16), at: 16)
    return h
  }

  /// A cut slot's bytes; nil when the output path is too long to keep.
  public static func encode(_ cut: MarkJournalCut, journalID: UInt64) -> [UInt8]? {
    let path = Array(cut.output.utf8)
    guard path.count <= maximumOutputPath else { return nil }
    var b = [UInt8](repeating: 0, count: cutFixedLength + path.count + 4)
    b.replaceSubrange(0..<8, with: cutMagic)
    b.storeLE(journalID, at: 8)
    b.storeLE(cut.number, at: 16)
    b.storeLE(cut.ending.high, at: 24)
    b.storeLE(cut.ending.low, at: 32)
    b.storeLE(UInt64(bitPattern: cut.endingStarted.nanosecondsSinceEpoch), at: 40)
    b.storeLE(cut.started.high, at: 48)
    b.storeLE(cut.started.low, at: 56)
    b.storeLE(UInt64(bitPattern: cut.startedAt.nanosecondsSinceEpoch), at: 64)
    b.storeLE(UInt32(path.count), at: 72)
    b.replaceSubrange(cutFixedLength..<cutFixedLength + path.count, with: path)
    b.storeLE(b.crc(0, cutFixedLength + path.count), at: cutFixedLength + path.count)
    return b
  }

  /// Encodes one record into `out` at `at` (any range the scan reads: its
  /// count may pass Int.max).
  package static func encodeRecord(
    into out: inout [UInt8], at: Int, journalID: UInt64, map: ID128, blocks: Range<UInt64>, sequence: UInt32
  ) {
    out.storeLE(journalID, at: at)
    out.storeLE(map.high, at: at + 8)
    out.storeLE(map.low, at: at + 16)
    out.storeLE(blocks.lowerBound, at: at + 24)
    out.storeLE(blocks.upperBound - blocks.lowerBound, at: at + 32)
    out.storeLE(sequence, at: at + 40)
    out.storeLE(out.crc(at, 44), at: at + 44)
  }

  /// Reads a journal's bytes; nil when they are no journal (too short, an
  /// unknown magic, a bad header CRC): then nothing in them counts.
  public static func scan(_ bytes: [UInt8]) -> MarkJournalContents? {
    guard bytes.count >= headerLength else { return nil }
    let m = Array(bytes[0..<8])
    let version: Int
    if m == magic {
      version = 2
    } else if m == magicV1 {
      version = 1
    } else {
      return nil
    }
    let id = bytes.loadLE(UInt64.self, at: 8)
    guard bytes.loadLE(UInt32.self, at: 16) == bytes.crc(0, 16) else { return nil }
    var cut: MarkJournalCut?
    if version == 2 {
      for slot in cutSlots {
        guard let c = decodeCut(bytes, at: slot, journalID: id) else { continue }
        if cut == nil || c.number > cut!.number { cut = c }
      }
    }
    var records: [(map: ID128, blocks: Range<UInt64>)] = []
    var expected: UInt32 = 0
    var at = headerLength
    while at + recordLength <= bytes.count {
      guard bytes.loadLE(UInt64.self, at: at) == id,
        bytes.loadLE(UInt32.self, at: at + 40) == expected,
        bytes.loadLE(UInt32.self, at: at + 44) == bytes.crc(at, 44)
      else { break }
      let map = ID128(high: bytes.loadLE(UInt64.self, at: at + 8), low: bytes.loadLE(UInt64.self, at: at + 16))
      let first = bytes.loadLE(UInt64.self, at: at + 24)
      let count = bytes.loadLE(UInt64.self, at: at + 32)
      if count > 0, first <= UInt64.max - count { records.append((map, first..<first + count)) }
      expected &+= 1
      at += recordLength
    }
    return MarkJournalContents(version: version, journalID: id, cut: cut, records: records, end: at)
  }

  private static func decodeCut(_ bytes: [UInt8], at slot: Int, journalID: UInt64) -> MarkJournalCut? {
    guard Array(bytes[slot..<slot + 8]) == cutMagic, bytes.loadLE(UInt64.self, at: slot + 8) == journalID else {
      return nil
    }
    let length = Int(bytes.loadLE(UInt32.self, at: slot + 72))
    guard length <= maximumOutputPath else { return nil }
    let pathStart = slot + cutFixedLength
    guard bytes.loadLE(UInt32.self, at: pathStart + length) == bytes.crc(slot, cutFixedLength + length),
      let output = String(validating: bytes[pathStart..<pathStart + length], as: UTF8.self), !output.isEmpty
    else { return nil }
    return MarkJournalCut(
      number: bytes.loadLE(UInt64.self, at: slot + 16),
      ending: ID128(high: bytes.loadLE(UInt64.self, at: slot + 24), low: bytes.loadLE(UInt64.self, at: slot + 32)),
      endingStarted: Instant(nanosecondsSinceEpoch: Int64(bitPattern: bytes.loadLE(UInt64.self, at: slot + 40))),
      started: ID128(high: bytes.loadLE(UInt64.self, at: slot + 48), low: bytes.loadLE(UInt64.self, at: slot + 56)),
      startedAt: Instant(nanosecondsSinceEpoch: Int64(bitPattern: bytes.loadLE(UInt64.self, at: slot + 64))),
      output: output)
  }
}

final class MarkJournal {
  let path: String
  let capacity: Int
  private let fd: Int32
  private var journalID: UInt64 = 0
  private var sequence: UInt32 = 0
  private var position: Int
  private var scratch: [UInt8]
  /// The number of the last cut written since the journal started (0: none).
  private(set) var cuts: UInt64 = 0

  /// Opens the journal at `path`, allocating it when missing, and locks it.
  init(path: String, records: Int = 16384) throws {
    self.path = path
    capacity = MarkJournalFormat.headerLength + records * MarkJournalFormat.recordLength
    position = MarkJournalFormat.headerLength
    scratch = [UInt8](repeating: 0, count: 256 * MarkJournalFormat.recordLength)
    switch Sys.open(path, flags: O_RDWR | O_CREAT, mode: 0o600) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, "cannot open the change map's journal: \(e)")
    }
    // One server per change map: the lock goes with the process.
    if flock(fd, LOCK_EX | LOCK_NB) != 0 {
      let e = Errno.current
      Sys.close(fd)
      if e.rawValue == EWOULDBLOCK {
        throw ToolkitError("\(path) is locked: another server keeps this change map")
      }
      throw ToolkitError.path(path, "cannot lock the change map's journal: \(e)")
    }
    var st = stat()
    fstat(fd, &st)
    if Int(st.st_size) < capacity {
      // Real blocks, so that overwriting them later changes no metadata.
      let zeros = [UInt8](repeating: 0, count: 1 << 16)
      var at = Int(st.st_size)
      while at < capacity {
        let n = min(zeros.count, capacity - at)
        if case .failure(let e) = zeros.withUnsafeBytes({ pwriteFull(fd, $0.baseAddress!, n, UInt64(at)) }) {
          Sys.close(fd)
          throw ToolkitError.path(path, "cannot allocate the change map's journal: \(e)")
        }
        at += n
      }
      if case .failure(let e) = Sys.fsync(fd) {
        Sys.close(fd)
        throw ToolkitError.path(path, "cannot allocate the change map's journal: \(e)")
      }
    }
  }

  deinit { Sys.close(fd) }

  /// What the journal holds since it last started (nil: nothing counts).
  func recovered() -> MarkJournalContents? {
    var bytes = [UInt8](repeating: 0, count: capacity)
    let read = bytes.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, capacity, 0) }
    guard case .success(let n) = read, n == capacity else { return nil }
    return MarkJournalFormat.scan(bytes)
  }

  /// Starts the journal again under a new id (after the map was saved).
  func restart() throws {
    var id: UInt64 = 0
    repeat { id = ID128.random().low } while id == journalID || id == 0
    try write(MarkJournalFormat.header(journalID: id), at: 0)
    try sync()
    journalID = id
    sequence = 0
    cuts = 0
    position = MarkJournalFormat.headerLength
  }

  /// Whether `count` more records fit.
  func hasRoom(_ count: Int) -> Bool { position + count * MarkJournalFormat.recordLength <= capacity }

  /// Keeps a generation cut (numbered after the last) and makes it durable:
  /// records that follow name the new generation.
  func cut(_ cut: MarkJournalCut) throws {
    var c = cut
    c.number = cuts + 1
    guard let bytes = MarkJournalFormat.encode(c, journalID: journalID) else {
      throw ToolkitError(
        "\(c.output): a path longer than \(MarkJournalFormat.maximumOutputPath) bytes cannot be kept in the journal")
    }
    try write(bytes, at: MarkJournalFormat.cutSlots[Int(c.number % 2)])
    try sync()
    cuts = c.number
  }

  /// Appends records for `ranges` of the map `mapID` and makes them durable.
  func append(_ ranges: [Range<UInt64>], mapID: ID128) throws {
    var done = 0
    while done < ranges.count {
      let batch = min(ranges.count - done, scratch.count / MarkJournalFormat.recordLength)
      for i in 0..<batch {
        MarkJournalFormat.encodeRecord(
          into: &scratch, at: i * MarkJournalFormat.recordLength, journalID: journalID, map: mapID,
          blocks: ranges[done + i], sequence: sequence)
        sequence &+= 1
      }
      try write(scratch, count: batch * MarkJournalFormat.recordLength, at: position)
      position += batch * MarkJournalFormat.recordLength
      done += batch
    }
    try sync()
  }

  private func write(_ bytes: [UInt8], count: Int? = nil, at offset: Int) throws {
    let n = count ?? bytes.count
    if case .failure(let e) = bytes.withUnsafeBytes({ pwriteFull(fd, $0.baseAddress!, n, UInt64(offset)) }) {
      throw ToolkitError.path(path, "cannot write the change map's journal: \(e)")
    }
  }

  private func sync() throws {
    if case .failure(let e) = Sys.fdatasync(fd) {
      throw ToolkitError.path(path, "cannot make the change map's journal durable: \(e)")
    }
  }
}

extension Array where Element == UInt8 {
  fileprivate func loadLE<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
    var v: T = 0
    for i in 0..<MemoryLayout<T>.size { v |= T(self[offset + i]) << (8 * i) }
    return v
  }

  fileprivate mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    for i in 0..<MemoryLayout<T>.size { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
  }

  fileprivate func crc(_ at: Int, _ count: Int) -> UInt32 {
    withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + at, count) }
  }
}
