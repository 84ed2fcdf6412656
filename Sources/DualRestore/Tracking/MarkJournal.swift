// The journal of a change map: block ranges marked since the map file was
// last saved, appended in place and made durable with one fdatasync per
// group commit — much cheaper than rewriting the map (temporary file,
// fsync, rename, directory fsync) before every write to a new block.
//
// The file is allocated once (written with zeros, so later writes change no
// metadata) and laid out as:
//   0      4096  header: "DRMARKJ1", journal id (8 bytes), CRC-32C of both
//   4096   48·n  records: journal id 8, map id 16, first block 8, block
//                count 8, sequence 4, CRC-32C of the 44 bytes before it 4
// Integers little-endian. A record counts only when its journal id is the
// header's, its sequence follows the previous one and its CRC holds; the
// first that fails ends the journal. A record applies only to the map (the
// generation) whose id it carries. When the map file is saved, the journal
// starts again under a new id, which orphans every older record at once.

import CShim
import Glibc

final class MarkJournal {
  static let headerLength = 4096
  static let recordLength = 48
  static let magic = Array("DRMARKJ1".utf8)
  let path: String
  let capacity: Int
  private let fd: Int32
  private var journalID: UInt64 = 0
  private var sequence: UInt32 = 0
  private var position: Int
  private var scratch: [UInt8]

  /// Opens the journal at `path` (allocating it when missing) and returns
  /// the ranges its records name for the map `mapID`.
  init(path: String, records: Int = 16384) throws {
    self.path = path
    capacity = MarkJournal.headerLength + records * MarkJournal.recordLength
    position = MarkJournal.headerLength
    scratch = [UInt8](repeating: 0, count: 256 * MarkJournal.recordLength)
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

  /// The ranges recorded for `mapID` since the journal last started.
  func recovered(for mapID: ID128) throws -> [Range<UInt64>] {
    var bytes = [UInt8](repeating: 0, count: capacity)
    let read = bytes.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, capacity, 0) }
    guard case .success(let n) = read, n == capacity else { return [] }
    guard Array(bytes[0..<8]) == MarkJournal.magic else { return [] }
    let id = bytes.loadLE(UInt64.self, at: 8)
    guard bytes.loadLE(UInt32.self, at: 16) == crc(bytes, 0, 16) else { return [] }
    var ranges: [Range<UInt64>] = []
    var expected: UInt32 = 0
    var at = MarkJournal.headerLength
    while at + MarkJournal.recordLength <= capacity {
      guard bytes.loadLE(UInt64.self, at: at) == id,
        bytes.loadLE(UInt32.self, at: at + 40) == expected,
        bytes.loadLE(UInt32.self, at: at + 44) == crc(bytes, at, 44)
      else { break }
      let map = ID128(high: bytes.loadLE(UInt64.self, at: at + 8), low: bytes.loadLE(UInt64.self, at: at + 16))
      let first = bytes.loadLE(UInt64.self, at: at + 24)
      let count = bytes.loadLE(UInt64.self, at: at + 32)
      if map == mapID, count > 0, first <= UInt64.max - count { ranges.append(first..<first + count) }
      expected &+= 1
      at += MarkJournal.recordLength
    }
    return ranges
  }

  /// Starts the journal again under a new id (after the map was saved).
  func restart() throws {
    var header = [UInt8](repeating: 0, count: MarkJournal.headerLength)
    header.replaceSubrange(0..<8, with: MarkJournal.magic)
    var id: UInt64 = 0
    repeat { id = ID128.random().low } while id == journalID || id == 0
    header.storeLE(id, at: 8)
    header.storeLE(crc(header, 0, 16), at: 16)
    try write(header, count: header.count, at: 0)
    try sync()
    journalID = id
    sequence = 0
    position = MarkJournal.headerLength
  }

  /// Whether `count` more records fit.
  func hasRoom(_ count: Int) -> Bool { position + count * MarkJournal.recordLength <= capacity }

  /// Appends records for `ranges` of the map `mapID` and makes them durable.
  func append(_ ranges: [Range<UInt64>], mapID: ID128) throws {
    var done = 0
    while done < ranges.count {
      let batch = min(ranges.count - done, scratch.count / MarkJournal.recordLength)
      for i in 0..<batch {
        let r = ranges[done + i]
        let at = i * MarkJournal.recordLength
        scratch.storeLE(journalID, at: at)
        scratch.storeLE(mapID.high, at: at + 8)
        scratch.storeLE(mapID.low, at: at + 16)
        scratch.storeLE(r.lowerBound, at: at + 24)
        scratch.storeLE(UInt64(r.count), at: at + 32)
        scratch.storeLE(sequence, at: at + 40)
        scratch.storeLE(crc(scratch, at, 44), at: at + 44)
        sequence &+= 1
      }
      try write(scratch, count: batch * MarkJournal.recordLength, at: position)
      position += batch * MarkJournal.recordLength
      done += batch
    }
    try sync()
  }

  private func write(_ bytes: [UInt8], count: Int, at offset: Int) throws {
    if case .failure(let e) = bytes.withUnsafeBytes({ pwriteFull(fd, $0.baseAddress!, count, UInt64(offset)) }) {
      throw ToolkitError.path(path, "cannot write the change map's journal: \(e)")
    }
  }

  private func sync() throws {
    if case .failure(let e) = Sys.fdatasync(fd) {
      throw ToolkitError.path(path, "cannot make the change map's journal durable: \(e)")
    }
  }

  private func crc(_ bytes: [UInt8], _ at: Int, _ count: Int) -> UInt32 {
    bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + at, count) }
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
}
