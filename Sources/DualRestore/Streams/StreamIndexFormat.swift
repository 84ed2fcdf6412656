// The stream index format, version 1 (man/dualrestore-index.5): where each
// block's record lies in one block stream, so that a stream kept at rest (a
// file, an object behind HTTP) can be read at random, one record per block,
// without reading it whole. An index describes exactly one stream, which it
// names by id, length and the CRC of its END record: an index that does not
// match its stream is stale and is built again. All integers little-endian.
//
// Header, 128 bytes:
//   0   8  magic: 44 52 49 44 58 0D 0A 1A ("DRIDX\r\n\x1a")
//   8   2  format version: 1
//   10  2  flags: bit 0 the stream is encrypted; others 0
//   12  4  entry length: 40
//   16  16 stream id; 32 16 base stream id (zeros: a full stream)
//   48  8  stream length in bytes, preamble to END record
//   56  4  block size; 60 4 the CRC-32C that ends the stream's END record
//   64  8  device size; 72 8 the stream's instant (ns since the epoch)
//   80  8  entry count; 88 8 data blocks; 96 8 zero blocks
//   104 16 the stream whose end this full stream stands for (a LINEAGE
//          record), zeros when none
//   120 4  reserved, 0; 124 4 CRC-32C of bytes 0 to 123
// Entries, 40 bytes each, in increasing block order, not overlapping:
//   0 8 first block; 8 8 block count (1 for DATA); 16 8 the record's offset
//   in the stream; 24 8 its sequence number; 32 4 its length (framing, body
//   and CRC); 36 1 its type (2 DATA, 3 ZERO); 37 3 reserved, 0
// Trailer: 4 bytes, CRC-32C of every entry byte.
//
// The index holds no block data, but it does say which blocks each record
// carries. It is checked, not authenticated: a reader checks every record
// it reads against the entry (type, sequence, length, CRC, tag, block
// number), so an entry naming another of the stream's records makes its
// reads fail; but an index that leaves an entry out makes those blocks read
// from an older stream or as zeros, and in a stream that is not encrypted an
// entry may name bytes inside a stored block that frame a record of their
// own (dualrestore-index(5), "Checked, not authenticated").

import CShim

public enum StreamIndexFormat {
  public static let magic: [UInt8] = [0x44, 0x52, 0x49, 0x44, 0x58, 0x0D, 0x0A, 0x1A]
  public static let version: UInt16 = 1
  public static let headerLength = 128
  public static let entryLength = 40
  public static let trailerLength = 4
  static let encryptedFlag: UInt16 = 1

  /// One run of blocks and the record that holds it.
  public struct Entry: Equatable, Sendable {
    public var firstBlock: UInt64
    public var blockCount: UInt64
    public var offset: UInt64
    public var sequence: UInt64
    public var length: UInt32
    public var type: StreamFormat.RecordType

    public init(
      firstBlock: UInt64, blockCount: UInt64, offset: UInt64, sequence: UInt64, length: UInt32,
      type: StreamFormat.RecordType
    ) {
      self.firstBlock = firstBlock
      self.blockCount = blockCount
      self.offset = offset
      self.sequence = sequence
      self.length = length
      self.type = type
    }

    public var endBlock: UInt64 { firstBlock + blockCount }
  }

  /// What an index says of its stream, and how it recognises it.
  public struct Identity: Equatable, Sendable {
    public var streamID: ID128
    public var baseStreamID: ID128
    public var streamLength: UInt64
    public var endCRC: UInt32
    public var geometry: BlockGeometry
    public var started: Instant
    public var encrypted: Bool
    public var standsFor: ID128

    public init(
      streamID: ID128, baseStreamID: ID128, streamLength: UInt64, endCRC: UInt32, geometry: BlockGeometry,
      started: Instant, encrypted: Bool, standsFor: ID128 = .none
    ) {
      self.streamID = streamID
      self.baseStreamID = baseStreamID
      self.streamLength = streamLength
      self.endCRC = endCRC
      self.geometry = geometry
      self.started = started
      self.encrypted = encrypted
      self.standsFor = standsFor
    }
  }

  public struct Index: Equatable, Sendable {
    public var identity: Identity
    public var entries: [Entry]
    public var dataBlocks: UInt64
    public var zeroBlocks: UInt64

    public init(identity: Identity, entries: [Entry], dataBlocks: UInt64, zeroBlocks: UInt64) {
      self.identity = identity
      self.entries = entries
      self.dataBlocks = dataBlocks
      self.zeroBlocks = zeroBlocks
    }
  }

  // MARK: Writing

  public static func encode(_ index: Index) -> [UInt8] {
    let id = index.identity
    var w = ByteWriter()
    w.raw(magic)
    w.u16(version)
    w.u16(id.encrypted ? encryptedFlag : 0)
    w.u32(UInt32(entryLength))
    w.id(id.streamID)
    w.id(id.baseStreamID)
    w.u64(id.streamLength)
    w.u32(id.geometry.blockSize)
    w.u32(id.endCRC)
    w.u64(id.geometry.deviceSize)
    w.i64(id.started.nanosecondsSinceEpoch)
    w.u64(UInt64(index.entries.count))
    w.u64(index.dataBlocks)
    w.u64(index.zeroBlocks)
    w.id(id.standsFor)
    w.u32(0)
    var out = w.bytes
    let headerCRC = out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, headerLength - 4) }
    out.reserveCapacity(headerLength + index.entries.count * entryLength + trailerLength)
    appendLE(&out, UInt64(headerCRC), 4)
    let entriesStart = out.count
    for e in index.entries {
      appendLE(&out, e.firstBlock, 8)
      appendLE(&out, e.blockCount, 8)
      appendLE(&out, e.offset, 8)
      appendLE(&out, e.sequence, 8)
      appendLE(&out, UInt64(e.length), 4)
      out.append(UInt8(e.type.rawValue))
      out.append(contentsOf: [0, 0, 0])
    }
    let entriesCRC = out.withUnsafeBytes {
      dr_crc32c(0, $0.baseAddress.map { $0 + entriesStart }, out.count - entriesStart)
    }
    appendLE(&out, UInt64(entriesCRC), 4)
    return out
  }

  private static func appendLE(_ out: inout [UInt8], _ v: UInt64, _ width: Int) {
    for i in 0..<width { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
  }

  // MARK: Reading

  /// Decodes and checks a whole index file: magic, version, both CRCs, the
  /// entry count against the length, and every entry (in order, inside the
  /// device and the stream, of a known type). Throws one sentence.
  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> Index {
    guard bytes.count >= headerLength + trailerLength, let base = bytes.baseAddress else {
      throw ToolkitError("the index is \(bytes.count) bytes, shorter than its header")
    }
    for i in 0..<magic.count where bytes[i] != magic[i] {
      throw ToolkitError("not a dualrestore stream index (bad magic)")
    }
    func u16(_ at: Int) -> UInt16 { bytes.loadUnaligned(fromByteOffset: at, as: UInt16.self).littleEndian }
    func u32(_ at: Int) -> UInt32 { bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self).littleEndian }
    func u64(_ at: Int) -> UInt64 { bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian }
    func id(_ at: Int) -> ID128 {
      ID128(bytes: ArraySlice(UnsafeRawBufferPointer(rebasing: bytes[at..<at + 16])))
    }
    guard u16(8) == version else {
      throw ToolkitError("index format version \(u16(8)) is not supported (this build reads version \(version))")
    }
    guard dr_crc32c(0, base, headerLength - 4) == u32(124) else {
      throw ToolkitError("the index header's checksum does not match: the index is damaged")
    }
    let flags = u16(10)
    guard flags & ~encryptedFlag == 0 else {
      throw ToolkitError("the index uses flags 0x\(String(flags, radix: 16)) this build does not know")
    }
    guard Int(u32(12)) == entryLength else {
      throw ToolkitError("the index's entries are \(u32(12)) bytes, not \(entryLength)")
    }
    guard u32(120) == 0 else { throw ToolkitError("the index header's reserved bytes are not zero") }
    let count = u64(80)
    guard count <= UInt64(bytes.count - headerLength - trailerLength) / UInt64(entryLength),
      headerLength + Int(count) * entryLength + trailerLength == bytes.count
    else {
      throw ToolkitError("the index says \(count) entries but is \(bytes.count) bytes long")
    }
    let n = Int(count)
    let entriesCRC = dr_crc32c(0, base + headerLength, n * entryLength)
    guard entriesCRC == u32(headerLength + n * entryLength) else {
      throw ToolkitError("the index entries' checksum does not match: the index is damaged")
    }
    let geometry: BlockGeometry
    do {
      geometry = try BlockGeometry(blockSize: u32(56), deviceSize: u64(64))
    } catch {
      throw ToolkitError("the index names a device the toolkit cannot have: \(error)")
    }
    let streamID = id(16)
    guard !streamID.isNone else { throw ToolkitError("the index names no stream id") }
    let identity = Identity(
      streamID: streamID, baseStreamID: id(32), streamLength: u64(48), endCRC: u32(60), geometry: geometry,
      started: Instant(nanosecondsSinceEpoch: Int64(bitPattern: u64(72))), encrypted: flags & encryptedFlag != 0,
      standsFor: id(104))
    var entries: [Entry] = []
    entries.reserveCapacity(n)
    var next: UInt64 = 0
    var data: UInt64 = 0
    var zero: UInt64 = 0
    let blockCount = geometry.blockCount
    for i in 0..<n {
      let at = headerLength + i * entryLength
      let first = u64(at)
      let blocks = u64(at + 8)
      let offset = u64(at + 16)
      let sequence = u64(at + 24)
      let length = u32(at + 32)
      let typeRaw = bytes[at + 36]
      guard bytes[at + 37] == 0, bytes[at + 38] == 0, bytes[at + 39] == 0 else {
        throw ToolkitError("index entry \(i) has reserved bytes that are not zero")
      }
      guard first >= next, blocks > 0, first < blockCount, blocks <= blockCount - first else {
        throw ToolkitError("index entry \(i) (blocks \(first) to \(first &+ blocks)) is out of order or out of range")
      }
      guard Int(length) >= StreamFormat.recordOverhead, offset >= UInt64(StreamFormat.preambleLength),
        offset <= identity.streamLength, UInt64(length) <= identity.streamLength - offset
      else {
        throw ToolkitError(
          "index entry \(i) points at bytes \(offset) to \(offset &+ UInt64(length)), outside the stream")
      }
      let type: StreamFormat.RecordType
      switch typeRaw {
      case UInt8(StreamFormat.RecordType.data.rawValue):
        guard blocks == 1 else { throw ToolkitError("index entry \(i) is a DATA record of \(blocks) blocks") }
        type = .data
        data += 1
      case UInt8(StreamFormat.RecordType.zero.rawValue):
        type = .zero
        zero += blocks
      default:
        throw ToolkitError("index entry \(i) has record type \(typeRaw), neither DATA nor ZERO")
      }
      entries.append(
        Entry(firstBlock: first, blockCount: blocks, offset: offset, sequence: sequence, length: length, type: type))
      next = first + blocks
    }
    guard data == u64(88), zero == u64(96) else {
      throw ToolkitError(
        "the index counts \(u64(88)) data and \(u64(96)) zero blocks but its entries hold \(data) and \(zero)")
    }
    return Index(identity: identity, entries: entries, dataBlocks: data, zeroBlocks: zero)
  }

  public static func decode(_ bytes: [UInt8]) throws -> Index {
    try bytes.withUnsafeBytes { try decode($0) }
  }
}

extension StreamIndexFormat.Index {
  /// The entry holding `block`, by binary search; nil when the stream has no
  /// record for it.
  @inline(__always)
  public func entry(for block: UInt64) -> Int? {
    var low = 0
    var high = entries.count
    while low < high {
      let mid = (low + high) >> 1
      if entries[mid].endBlock <= block { low = mid + 1 } else { high = mid }
    }
    guard low < entries.count, entries[low].firstBlock <= block else { return nil }
    return low
  }
}
