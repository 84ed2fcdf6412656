// The positions file of a mirror journal (dualrestore-journal(5), "The
// positions file"): how far each far copy has been brought, so that the
// journal is kept until every copy has what it holds and each copy resumes
// from its own place after a stop or a crash.
//
// Invariants:
// - A copy's position names the last interval whose writes, and the flush
//   after them, the copy acknowledged; it never runs ahead of the copy.
// - The file is replaced atomically (temporary file, fsync, rename, fsync
//   of the directory): a crash leaves the old positions or the new ones.
// - It is checksummed and names its journal: positions of another journal
//   are refused, never applied.
//
// All integers are little-endian:
//   offset size  field
//        0    8  magic "DRMIRPOS"
//        8    4  version, 1
//       12   16  journal id
//       28    8  next interval the journal opens
//       36    8  next sequence the journal gives
//       44    4  number of copies, N (at most 64)
//       48    -  N entries, each:
//                  8  last interval the copy has (0: none)
//                  8  journal offset where the copy's next record starts
//                  8  instant of that interval's flush on the copy, ns
//                  2  name length L (1 to 1024)
//                  L  name: the copy's URI, UTF-8
//                  -  zero padding to a multiple of 8
//        -    4  CRC-32C of every byte before it

import CShim

/// Where one far copy stands in the journal.
public struct MirrorPosition: Equatable, Sendable {
  /// The copy's URI as given on the command line.
  public var name: String
  /// The last interval the copy holds and has flushed (0: none yet).
  public var interval: UInt64
  /// Where, in the journal, the first record the copy lacks starts.
  public var offset: UInt64
  /// When the copy flushed that interval.
  public var shipped: Instant
}

/// The positions file's content.
public struct MirrorPositions: Equatable, Sendable {
  public var journal: ID128
  public var nextInterval: UInt64
  public var nextSequence: UInt64
  public var copies: [MirrorPosition]

  public static let magic: [UInt8] = Array("DRMIRPOS".utf8)
  public static let version: UInt32 = 1
  public static let maximumCopies = 64
  public static let maximumName = 1024

  public var encoded: [UInt8] {
    var w = ByteWriter()
    w.raw(Self.magic)
    w.u32(Self.version)
    w.id(journal)
    w.u64(nextInterval)
    w.u64(nextSequence)
    w.u32(UInt32(copies.count))
    for c in copies {
      w.u64(c.interval)
      w.u64(c.offset)
      w.i64(c.shipped.nanosecondsSinceEpoch)
      let name = Array(c.name.utf8)
      w.u16(UInt16(name.count))
      w.raw(name)
      w.zeros((8 - (26 + name.count) % 8) % 8)
    }
    let crc = w.bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
    w.u32(crc)
    return w.bytes
  }

  public init(journal: ID128, nextInterval: UInt64, nextSequence: UInt64, copies: [MirrorPosition]) {
    self.journal = journal
    self.nextInterval = nextInterval
    self.nextSequence = nextSequence
    self.copies = copies
  }

  /// Reads a positions file's bytes; the error names what is wrong.
  public init(decoding bytes: [UInt8], path: String) throws(ToolkitError) {
    func refuse(_ what: String) -> ToolkitError { ToolkitError("\(path) is not a usable positions file: \(what)") }
    guard bytes.count >= 52 else { throw refuse("it has \(bytes.count) bytes, fewer than the 52 of an empty one") }
    let stored = bytes[bytes.count - 4..<bytes.count].enumerated().reduce(UInt32(0)) {
      $0 | UInt32($1.element) << (8 * UInt32($1.offset))
    }
    let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, bytes.count - 4) }
    guard Array(bytes[0..<8]) == Self.magic else { throw refuse("it does not start with DRMIRPOS") }
    guard crc == stored else { throw refuse("its checksum does not match its bytes") }
    var r = ByteReader(bytes[8..<bytes.count - 4])
    let short = refuse("it ends inside a field")
    guard let version = r.u32() else { throw short }
    guard version == Self.version else { throw refuse("it is of version \(version); this build reads version 1") }
    guard let journal = r.id(), let nextInterval = r.u64(), let nextSequence = r.u64(), let count = r.u32() else {
      throw short
    }
    guard count <= Self.maximumCopies else { throw refuse("it names \(count) copies, more than 64") }
    var copies: [MirrorPosition] = []
    for _ in 0..<count {
      guard let interval = r.u64(), let offset = r.u64(), let shipped = r.i64(), let length = r.u16() else {
        throw short
      }
      guard length >= 1 && Int(length) <= Self.maximumName else {
        throw refuse("a copy's name has \(length) bytes")
      }
      guard let name = r.take(Int(length)), let padding = r.take((8 - (26 + Int(length)) % 8) % 8) else { throw short }
      guard padding.allSatisfy({ $0 == 0 }) else { throw refuse("a copy's name is followed by non-zero padding") }
      guard let text = String(validating: Array(name), as: UTF8.self) else {
        throw refuse("a copy's name is not UTF-8")
      }
      copies.append(
        MirrorPosition(
          name: text, interval: interval, offset: offset, shipped: Instant(nanosecondsSinceEpoch: shipped)))
    }
    guard r.remaining == 0 else { throw refuse("it has bytes after its last copy") }
    self.init(journal: journal, nextInterval: nextInterval, nextSequence: nextSequence, copies: copies)
  }

  /// Loads `path`; nil when there is no such file.
  public static func load(_ path: String) throws -> MirrorPositions? {
    guard pathExists(path) else { return nil }
    return try MirrorPositions(decoding: try readWholeFile(path, limit: 1 << 20), path: path)
  }

  /// Refuses copy names the file cannot hold: more than 64, an empty or
  /// too long one, or one twice (positions are found again by name).
  public static func check(names: [String]) throws(ToolkitError) {
    guard names.count <= maximumCopies else {
      throw ToolkitError(
        "\(names.count) far copies are more than the \(maximumCopies) a mirror journal keeps positions for")
    }
    var seen = Set<String>()
    for name in names {
      let length = name.utf8.count
      guard length > 0 else { throw ToolkitError("a far copy's name is empty") }
      guard length <= maximumName else {
        throw ToolkitError(
          "the far copy name \(name.prefix(40))… has \(length) bytes, more than the \(maximumName) "
            + "a mirror journal's positions file holds")
      }
      guard seen.insert(name).inserted else { throw ToolkitError("the far copy \(name) is named twice") }
    }
  }

  /// Replaces `path` atomically; refuses copies the file cannot hold.
  public func save(to path: String) throws {
    try Self.check(names: copies.map(\.name))
    let bytes = encoded
    try bytes.withUnsafeBytes { try writeFileAtomically(path, [$0]) }
  }
}
