// The block stream format, version 1 (documented in man/dualrestore-stream.5).
// A stream carries blocks of a device from `snapshot` to `merge-snapshot`
// through any pipe or on media. All integers are little-endian.
//
// Preamble, 16 bytes:
//   0   8  magic: 44 52 53 54 52 0D 0A 1A ("DRSTR\r\n\x1a")
//   8   2  format version: 1, or 2 for a stream with references (below)
//   10  2  flags: bit 0 encrypted (StreamCrypto.swift); a reader refuses
//          flags it does not know
//   12  4  reserved, 0
//
// Then records, each framed the same way, so a reader can skip a record type
// it does not know (unless its critical flag says it must not):
//   0   2  type
//   2   2  flags: bit 0 critical (a reader that does not know the type stops)
//   4   4  body length L, at most 64 MiB + 4096; checked before any allocation
//   8   8  sequence number: 0 for the header record, then 1, 2, 3, …
//   16  L  body
//   16+L 4 CRC-32C of the 16 header bytes and the body
//
// Record types and bodies:
//   1 HEADER, first and once (L = 98 + N):
//     0 4 block size; 4 4 reserved; 8 8 device size; 16 8 block count;
//     24 16 stream id; 40 16 base stream id (zeros: a full stream);
//     56 8 instant the stream started reading, ns since 1970-01-01T00:00:00Z;
//     64 1 coverage: 0 every block, 1 the blocks of a map;
//     65 1 compression: 0 none, 1 LZ4 (per record, when smaller);
//     66 1 checksum: 1 CRC-32C; 67 5 reserved;
//     72 16 id of the map that selected the blocks (zeros: none);
//     88 8 blocks covered; 96 2 source name length N; 98 N source name, UTF-8
//   2 DATA, one block (L = 16 + payload):
//     0 8 block index; 8 4 block length (the block size, less for a partial
//     last block); 12 1 encoding: 0 raw, 1 LZ4 block; 13 3 reserved;
//     16 … payload: the block's bytes, or their LZ4 compression
//   3 ZERO, a run of blocks that read as zeros (L = 16):
//     0 8 first block; 8 8 block count
//   4 END, last and once (L = 64):
//     0 8 data blocks; 8 8 zero blocks; 16 8 bytes of blocks carried
//     (uncompressed); 24 8 records before this one;
//     32 32 SHA-256 of every stream byte before this record, preamble included
//
//   5 CRYPTO, first (record 0) and only in an encrypted stream (L = 80):
//     0 1 cipher: 1 AES-256-GCM; 1 1 key: 1 key file, 2 passphrase (scrypt);
//     2 1 scrypt log2 N; 3 1 reserved; 4 4 scrypt r; 8 4 scrypt p;
//     12 4 reserved; 16 32 salt; 48 32 key check. In an encrypted stream
//     every later body is AES-256-GCM ciphertext and a 16-byte tag, and the
//     END record's digest is zeros (the tags take its place).
//   6 LINEAGE, not critical, at most once, only in a full stream and only
//     right after the HEADER (L = 48): the full stream is a compaction of a
//     chain of streams and equals the device at the end of one of them.
//     0 16 id of the stream whose end this stream equals (the chain end it
//     stands for); 16 8 that stream's instant, ns, from its HEADER;
//     24 16 id of the first stream compacted; 40 4 number of streams
//     compacted, at least 1 (1: the first is the one stood for);
//     44 4 reserved, 0. A reader that does not know it skips it and merges
//     the stream as the plain full stream it is.
//   9 GENERATION, not critical, at most once, after the HEADER (and the
//     LINEAGE and SOURCES records a stream has), before any block record
//     (L = 40): which tracking generations the stream carries, so that a
//     merge can tell a catch-up that leaves one out.
//     0 16 id of the change map whose generation ended at "as of": the map
//     that selected the blocks, or for a full stream the map saved when its
//     view was frozen (zeros: none); 16 8 changes since, ns: that map's
//     tracking start, the earliest write the stream carries (0: every
//     write, a full stream); 24 8 as of, ns: the instant the carried
//     contents were cut at, the generation's end (not 0, not before
//     "changes since"); 32 8 reserved, 0. A reader that does not know it
//     skips it.
//
// Version 2 adds two critical types, for a stream that names content the
// receiver already holds instead of carrying it (`snapshot --have`); a
// version 1 reader refuses the stream at its preamble:
//   7 SOURCES, exactly once, after the HEADER (and LINEAGE), before any block
//     record (L = 24 + Σ(48 + N)): 0 1 digest length D (16 to 64); 1 1 image
//     count K (1 to 255); 2 6 reserved; 8 16 digest name as OpenSSL knows it,
//     ASCII, NUL-padded; then K images, each: 0 16 signature id; 16 8 device
//     size; 24 4 block size (the stream's); 28 4 reserved; 32 8 blocks
//     signed; 40 2 name length N (at most 4096); 42 6 reserved; 48 N name.
//   8 REFERENCE, a run of blocks whose content the receiver holds (L = 24 +
//     n × D): 0 8 first block; 8 4 block count n (1 up to 8 MiB of blocks, or
//     1); 12 1 image (index into SOURCES); 13 3 reserved; 16 8 the image's
//     block holding the first block's content (the run continues there);
//     24 … the n blocks' digests, D bytes each. A receiver checks each
//     block's digest on what it read before writing it.
//   END in version 2 is 80 bytes: the 64 above (data blocks counting only
//   DATA records; bytes counting referenced blocks too), then 64 8
//   referenced blocks, 72 8 reserved.
//
// Blocks appear in increasing order, each at most once. A stream without its
// END record is incomplete and is never taken as whole.

import CShim

public enum StreamFormat {
  public static let magic: [UInt8] = [0x44, 0x52, 0x53, 0x54, 0x52, 0x0D, 0x0A, 0x1A]
  public static let version: UInt16 = 1
  /// The version of a stream with SOURCES and REFERENCE records.
  public static let referencesVersion: UInt16 = 2
  public static let preambleLength = 16
  public static let recordHeaderLength = 16
  public static let recordTrailerLength = 4
  public static let recordOverhead = 20
  /// The largest body a reader accepts: a 64 MiB raw block and its fields.
  public static let maximumBodyLength = (64 << 20) + 4096
  static let maximumNameLength = 4096
  static let headerFixedLength = 98
  static let dataFixedLength = 16
  static let zeroBodyLength = 16
  package static let endBodyLength = 64
  package static let referencesEndBodyLength = 80
  static let sourcesFixedLength = 24
  static let sourceImageFixedLength = 48
  static let referenceFixedLength = 24
  /// The most bytes of blocks one REFERENCE record names (more when one
  /// block is larger).
  public static let maximumReferenceRunBytes = 8 << 20
  package static let lineageBodyLength = 48
  package static let generationBodyLength = 40

  public enum RecordType: UInt16, Sendable {
    case header = 1
    case data = 2
    case zero = 3
    case end = 4
    case crypto = 5
    case lineage = 6
    case sources = 7
    case reference = 8
    case generation = 9

    /// Whether a reader that does not know the type must stop: every type
    /// but LINEAGE and GENERATION, which only add to what a stream is.
    public var isCritical: Bool { self != .lineage && self != .generation }
  }

  public static let criticalFlag: UInt16 = 1
  /// Preamble flag: the stream is encrypted and starts with a CRYPTO record.
  public static let encryptedFlag: UInt16 = 1

  public enum Compression: UInt8, Sendable, CustomStringConvertible {
    case none = 0
    case lz4 = 1
    public var description: String { self == .none ? "none" : "lz4" }
  }

  public enum Coverage: Equatable, Sendable {
    case all
    /// The blocks set in the map with this id.
    case map(id: ID128)
  }

  public struct Header: Equatable, Sendable {
    public var geometry: BlockGeometry
    public var streamID: ID128
    public var baseStreamID: ID128
    public var started: Instant
    public var coverage: Coverage
    public var coveredBlocks: UInt64
    public var compression: Compression
    public var sourceName: String

    public init(
      geometry: BlockGeometry, streamID: ID128 = .random(), baseStreamID: ID128 = .none,
      started: Instant = .now(), coverage: Coverage = .all, coveredBlocks: UInt64? = nil,
      compression: Compression = .lz4, sourceName: String
    ) {
      self.geometry = geometry
      self.streamID = streamID
      self.baseStreamID = baseStreamID
      self.started = started
      self.coverage = coverage
      self.coveredBlocks = coveredBlocks ?? geometry.blockCount
      self.compression = compression
      self.sourceName = sourceName
    }

    public var isIncremental: Bool { !baseStreamID.isNone }
  }

  /// What a LINEAGE record says: this full stream is a compaction of
  /// `compactedCount` streams, from `firstCompacted` to `standsFor`, and
  /// equals the device at the end of `standsFor`.
  public struct Lineage: Equatable, Hashable, Sendable {
    /// The stream whose end this stream equals: the chain end it stands for.
    public var standsFor: ID128
    /// When `standsFor` started reading (its HEADER's instant).
    public var standsForStarted: Instant
    /// The oldest stream compacted (a full stream): `standsFor` when only one was.
    public var firstCompacted: ID128
    /// How many streams were compacted, at least 1.
    public var compactedCount: UInt32

    public init(standsFor: ID128, standsForStarted: Instant, firstCompacted: ID128, compactedCount: UInt32) {
      self.standsFor = standsFor
      self.standsForStarted = standsForStarted
      self.firstCompacted = firstCompacted
      self.compactedCount = compactedCount
    }
  }

  /// What a GENERATION record says: the stream carries the writes since
  /// `changesSince` (all of them when `.unset`), the device as it was at
  /// `asOf`, when generation `generation` ended.
  public struct Generation: Equatable, Hashable, Sendable {
    /// The change map whose generation ended at `asOf`, or `.none`.
    public var generation: ID128
    /// That generation's tracking start (`.unset`: every write, a full stream).
    public var changesSince: Instant
    /// The instant the carried contents were cut at.
    public var asOf: Instant

    public init(generation: ID128, changesSince: Instant, asOf: Instant) {
      self.generation = generation
      self.changesSince = changesSince
      self.asOf = asOf
    }
  }

  public struct End: Equatable, Sendable {
    public var dataBlocks: UInt64
    public var zeroBlocks: UInt64
    public var bytes: UInt64
    public var records: UInt64
    public var digest: [UInt8]
    /// Blocks named by REFERENCE records (version 2; 0 in version 1).
    public var referencedBlocks: UInt64 = 0
  }

  /// What a SOURCES record says: the images a stream's references point
  /// into, as their signatures described them, and the digest that names
  /// a block's content.
  public struct Sources: Equatable, Sendable {
    public var digestName: String
    public var digestLength: Int
    public var images: [SignatureIndex.Image]
    public init(digestName: String, digestLength: Int, images: [SignatureIndex.Image]) {
      self.digestName = digestName
      self.digestLength = digestLength
      self.images = images
    }

    /// "image 1 (/dev/vg/old, signature 1f…)", for messages.
    public func describe(_ image: Int) -> String {
      guard image < images.count else { return "image \(image)" }
      let i = images[image]
      return "image \(image) (\(i.name.isEmpty ? "unnamed" : i.name), signature \(i.signatureID))"
    }
  }

  /// A REFERENCE record: `count` blocks from `first` whose contents were at
  /// `sourceFirst`… of image `image`, with their digests.
  public struct Reference {
    public var first: UInt64
    public var count: Int
    public var image: Int
    public var sourceFirst: UInt64
    /// `count` digests, back to back.
    public var digests: UnsafeRawBufferPointer
  }

  public enum DataEncoding: UInt8, Sendable {
    case raw = 0
    case lz4 = 1
  }

  // MARK: Writing

  public static func preamble(flags: UInt16 = 0, version: UInt16 = StreamFormat.version) -> [UInt8] {
    var w = ByteWriter()
    w.raw(magic)
    w.u16(version)
    w.u16(flags)
    w.u32(0)
    return w.bytes
  }

  /// The 16 framing bytes of a record.
  @inline(__always)
  public static func storeRecordHeader(
    _ out: UnsafeMutableRawPointer, type: RecordType, bodyLength: Int, sequence: UInt64
  ) {
    out.storeBytes(of: type.rawValue.littleEndian, toByteOffset: 0, as: UInt16.self)
    let flags = type.isCritical ? criticalFlag : 0
    out.storeBytes(of: flags.littleEndian, toByteOffset: 2, as: UInt16.self)
    out.storeBytes(of: UInt32(bodyLength).littleEndian, toByteOffset: 4, as: UInt32.self)
    out.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
  }

  /// The fixed 16 bytes that start a DATA body.
  @inline(__always)
  public static func storeDataFields(
    _ out: UnsafeMutableRawPointer, block: UInt64, length: Int, encoding: DataEncoding
  ) {
    out.storeBytes(of: block.littleEndian, toByteOffset: 0, as: UInt64.self)
    out.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 8, as: UInt32.self)
    out.storeBytes(of: UInt32(encoding.rawValue).littleEndian, toByteOffset: 12, as: UInt32.self)
  }

  public static func headerBody(_ h: Header) -> [UInt8] {
    var w = ByteWriter()
    w.u32(h.geometry.blockSize)
    w.u32(0)
    w.u64(h.geometry.deviceSize)
    w.u64(h.geometry.blockCount)
    w.id(h.streamID)
    w.id(h.baseStreamID)
    w.i64(h.started.nanosecondsSinceEpoch)
    switch h.coverage {
    case .all: w.u8(0)
    case .map: w.u8(1)
    }
    w.u8(h.compression.rawValue)
    w.u8(1)
    w.zeros(5)
    if case .map(let id) = h.coverage { w.id(id) } else { w.id(.none) }
    w.u64(h.coveredBlocks)
    w.string16(h.sourceName, limit: maximumNameLength)
    return w.bytes
  }

  public static func zeroBody(first: UInt64, count: UInt64) -> [UInt8] {
    var w = ByteWriter()
    w.u64(first)
    w.u64(count)
    return w.bytes
  }

  public static func lineageBody(_ l: Lineage) -> [UInt8] {
    var w = ByteWriter()
    w.id(l.standsFor)
    w.i64(l.standsForStarted.nanosecondsSinceEpoch)
    w.id(l.firstCompacted)
    w.u32(l.compactedCount)
    w.u32(0)
    return w.bytes
  }

  public static func generationBody(_ g: Generation) -> [UInt8] {
    var w = ByteWriter()
    w.id(g.generation)
    w.i64(g.changesSince.nanosecondsSinceEpoch)
    w.i64(g.asOf.nanosecondsSinceEpoch)
    w.u64(0)
    return w.bytes
  }

  public static func endBody(_ e: End, version: UInt16 = StreamFormat.version) -> [UInt8] {
    var w = ByteWriter()
    w.u64(e.dataBlocks)
    w.u64(e.zeroBlocks)
    w.u64(e.bytes)
    w.u64(e.records)
    w.raw(e.digest)
    if version >= referencesVersion {
      w.u64(e.referencedBlocks)
      w.u64(0)
    }
    return w.bytes
  }

  public static func sourcesBody(_ s: Sources) -> [UInt8] {
    var w = ByteWriter()
    w.u8(UInt8(s.digestLength))
    w.u8(UInt8(s.images.count))
    w.zeros(6)
    var name = Array(s.digestName.utf8.prefix(15))
    name += [UInt8](repeating: 0, count: 16 - name.count)
    w.raw(name)
    for i in s.images {
      w.id(i.signatureID)
      w.u64(i.geometry.deviceSize)
      w.u32(i.geometry.blockSize)
      w.u32(0)
      w.u64(i.signedBlocks)
      let n = Array(i.name.utf8.prefix(maximumNameLength))
      w.u16(UInt16(n.count))
      w.zeros(6)
      w.raw(n)
    }
    return w.bytes
  }

  /// The 24 fixed bytes that start a REFERENCE body; the digests follow.
  @inline(__always)
  public static func storeReferenceFields(
    _ out: UnsafeMutableRawPointer, first: UInt64, count: Int, image: Int, sourceFirst: UInt64
  ) {
    out.storeBytes(of: first.littleEndian, toByteOffset: 0, as: UInt64.self)
    out.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 8, as: UInt32.self)
    out.storeBytes(of: UInt32(image).littleEndian, toByteOffset: 12, as: UInt32.self)
    out.storeBytes(of: sourceFirst.littleEndian, toByteOffset: 16, as: UInt64.self)
  }

  /// The most blocks one REFERENCE record may name in blocks of `blockSize`.
  public static func maximumReferenceRun(blockSize: UInt32) -> Int {
    max(1, maximumReferenceRunBytes / Int(blockSize))
  }

  /// A whole record (framing, body, checksum) from a body held in memory.
  public static func record(_ type: RecordType, sequence: UInt64, body: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: recordHeaderLength + body.count + recordTrailerLength)
    out.withUnsafeMutableBytes { raw in
      guard let base = raw.baseAddress else { return }
      storeRecordHeader(base, type: type, bodyLength: body.count, sequence: sequence)
      body.withUnsafeBytes { b in
        if let bb = b.baseAddress { (base + recordHeaderLength).copyMemory(from: bb, byteCount: b.count) }
      }
      let crc = dr_crc32c(0, base, recordHeaderLength + body.count)
      (base + recordHeaderLength + body.count).storeBytes(of: crc.littleEndian, as: UInt32.self)
    }
    return out
  }

  // MARK: Reading bodies

  static func decodeHeader(_ body: UnsafeRawBufferPointer, at where_: String) throws -> Header {
    func fail(_ why: String) -> ToolkitError { ToolkitError("\(where_): \(why)") }
    guard body.count >= headerFixedLength else { throw fail("header record is too short") }
    var r = ByteReader(ArraySlice(body))
    guard let blockSize = r.u32(), let _ = r.u32(), let deviceSize = r.u64(), let blockCount = r.u64(),
      let streamID = r.id(), let base = r.id(), let started = r.i64(), let coverageRaw = r.u8(),
      let compressionRaw = r.u8(), let checksumRaw = r.u8(), let _ = r.take(5), let mapID = r.id(),
      let covered = r.u64(), let nameLength = r.u16()
    else { throw fail("header record is too short") }
    let geometry: BlockGeometry
    do { geometry = try BlockGeometry(blockSize: blockSize, deviceSize: deviceSize) } catch {
      throw fail("\(error)")
    }
    guard geometry.blockCount == blockCount else {
      throw fail("block count \(blockCount) does not fit \(deviceSize) bytes in blocks of \(blockSize)")
    }
    guard streamID != .none else { throw fail("the stream has no id") }
    let coverage: Coverage
    switch coverageRaw {
    case 0: coverage = .all
    case 1: coverage = .map(id: mapID)
    default: throw fail("unknown coverage \(coverageRaw)")
    }
    guard covered <= blockCount else { throw fail("covers \(covered) of \(blockCount) blocks") }
    guard let compression = Compression(rawValue: compressionRaw) else {
      throw fail("unknown compression \(compressionRaw)")
    }
    guard checksumRaw == 1 else { throw fail("unknown checksum algorithm \(checksumRaw)") }
    guard Int(nameLength) <= maximumNameLength, headerFixedLength + Int(nameLength) <= body.count,
      let name = r.take(Int(nameLength))
    else { throw fail("source name length \(nameLength) is out of range") }
    return Header(
      geometry: geometry, streamID: streamID, baseStreamID: base,
      started: Instant(nanosecondsSinceEpoch: started), coverage: coverage, coveredBlocks: covered,
      compression: compression, sourceName: String(decoding: name, as: UTF8.self))
  }

  /// The LINEAGE body of a stream whose HEADER is `header`, checked on its own
  /// (its place in the stream is the parser's to check); the sentence says why not.
  static func decodeLineage(_ body: UnsafeRawBufferPointer, header: Header) throws(ToolkitError) -> Lineage {
    guard body.count == lineageBodyLength else {
      throw ToolkitError("LINEAGE record has \(body.count) bytes, not \(lineageBodyLength)")
    }
    var r = ByteReader(ArraySlice(body))
    guard let standsFor = r.id(), let started = r.i64(), let first = r.id(), let count = r.u32(),
      let reserved = r.u32()
    else { throw ToolkitError("LINEAGE record is too short") }
    guard reserved == 0 else { throw ToolkitError("LINEAGE record has reserved bytes that are not zero") }
    guard !standsFor.isNone, !first.isNone else {
      throw ToolkitError("LINEAGE record names no stream (an id of zeros)")
    }
    guard standsFor != header.streamID, first != header.streamID else {
      throw ToolkitError("LINEAGE record names the stream's own id \(header.streamID); a stream cannot compact itself")
    }
    guard count >= 1 else { throw ToolkitError("LINEAGE record compacts 0 streams; at least 1 is needed") }
    guard (count == 1) == (first == standsFor) else {
      throw ToolkitError(
        count == 1
          ? "LINEAGE record compacts 1 stream but names two, \(first) and \(standsFor)"
          : "LINEAGE record compacts \(count) streams but the first is the one it stands for, \(standsFor)")
    }
    return Lineage(
      standsFor: standsFor, standsForStarted: Instant(nanosecondsSinceEpoch: started), firstCompacted: first,
      compactedCount: count)
  }

  /// The GENERATION body, checked on its own (its place in the stream is
  /// the parser's to check); the sentence says why not.
  static func decodeGeneration(_ body: UnsafeRawBufferPointer) throws(ToolkitError) -> Generation {
    guard body.count == generationBodyLength else {
      throw ToolkitError("GENERATION record has \(body.count) bytes, not \(generationBodyLength)")
    }
    var r = ByteReader(ArraySlice(body))
    guard let id = r.id(), let since = r.i64(), let asOf = r.i64(), let reserved = r.u64() else {
      throw ToolkitError("GENERATION record is too short")
    }
    guard reserved == 0 else { throw ToolkitError("GENERATION record has reserved bytes that are not zero") }
    guard asOf > 0 else { throw ToolkitError("GENERATION record gives no instant the stream is as of") }
    guard since >= 0, since <= asOf else {
      throw ToolkitError(
        "GENERATION record says the changes since \(Instant(nanosecondsSinceEpoch: since)) are as of "
          + "\(Instant(nanosecondsSinceEpoch: asOf)), which is before they started")
    }
    return Generation(
      generation: id, changesSince: Instant(nanosecondsSinceEpoch: since), asOf: Instant(nanosecondsSinceEpoch: asOf))
  }

  static func decodeEnd(_ body: UnsafeRawBufferPointer, version: UInt16 = StreamFormat.version) -> End? {
    let references = version >= referencesVersion
    guard body.count == (references ? referencesEndBodyLength : endBodyLength) else { return nil }
    var end = End(
      dataBlocks: body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian,
      zeroBlocks: body.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian,
      bytes: body.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian,
      records: body.loadUnaligned(fromByteOffset: 24, as: UInt64.self).littleEndian,
      digest: Array(body[32..<64]))
    if references {
      guard body.loadUnaligned(fromByteOffset: 72, as: UInt64.self) == 0 else { return nil }
      end.referencedBlocks = body.loadUnaligned(fromByteOffset: 64, as: UInt64.self).littleEndian
    }
    return end
  }

  /// The SOURCES body of a stream whose HEADER is `header`; the sentence says why not.
  static func decodeSources(_ body: UnsafeRawBufferPointer, header: Header) throws(ToolkitError) -> Sources {
    var r = ByteReader(ArraySlice(body))
    guard let length = r.u8(), let count = r.u8(), let reserved = r.take(6), let nameRaw = r.take(16) else {
      throw ToolkitError("SOURCES record is too short")
    }
    guard reserved.allSatisfy({ $0 == 0 }) else {
      throw ToolkitError("SOURCES record has reserved bytes that are not zero")
    }
    guard length >= UInt8(SignatureIndex.minimumDigestLength), length <= 64 else {
      throw ToolkitError("SOURCES record gives a digest length of \(length) bytes, outside 16 to 64")
    }
    guard count >= 1 else { throw ToolkitError("SOURCES record names no image") }
    let nameBytes = nameRaw.prefix { $0 != 0 }
    guard !nameBytes.isEmpty, nameBytes.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
      throw ToolkitError("SOURCES record has no readable digest name")
    }
    var images: [SignatureIndex.Image] = []
    for i in 0..<Int(count) {
      guard let id = r.id(), let size = r.u64(), let blockSize = r.u32(), let reserved1 = r.u32(),
        let signed = r.u64(), let nameLength = r.u16(), let reserved2 = r.take(6)
      else { throw ToolkitError("SOURCES record is too short for its \(count) images") }
      guard reserved1 == 0, reserved2.allSatisfy({ $0 == 0 }) else {
        throw ToolkitError("SOURCES record has reserved bytes that are not zero in image \(i)")
      }
      guard blockSize == header.geometry.blockSize else {
        throw ToolkitError(
          "SOURCES record gives image \(i) block size \(blockSize), not the stream's \(header.geometry.blockSize)")
      }
      let geometry: BlockGeometry
      do { geometry = try BlockGeometry(blockSize: blockSize, deviceSize: size) } catch {
        throw ToolkitError("SOURCES record gives image \(i) an impossible size: \(error)")
      }
      guard geometry.blockCount <= SignatureIndex.maximumBlocks, signed <= geometry.blockCount else {
        throw ToolkitError("SOURCES record says image \(i) has \(signed) blocks signed of \(geometry.blockCount)")
      }
      guard Int(nameLength) <= maximumNameLength, let name = r.take(Int(nameLength)) else {
        throw ToolkitError("SOURCES record's name of image \(i) is out of range")
      }
      images.append(
        SignatureIndex.Image(
          name: String(decoding: name, as: UTF8.self), signatureID: id, geometry: geometry, signedBlocks: signed))
    }
    guard r.remaining == 0 else { throw ToolkitError("SOURCES record has \(r.remaining) bytes after its images") }
    return Sources(digestName: String(decoding: nameBytes, as: UTF8.self), digestLength: Int(length), images: images)
  }
}
