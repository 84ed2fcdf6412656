// The block signature format, version 1 (documented in man/dualrestore-signature.5):
// one strong digest per block of a source, or per block of a selection of
// it, so that two copies can be compared across a slow link by moving
// digests instead of data. All integers are little-endian.
//
//   offset  size  field
//   0       8     magic: 44 52 53 49 47 0D 0A 1A ("DRSIG\r\n\x1a")
//   8       2     format version: 1
//   10      2     flags: bit 0 sparse; a reader refuses flags it does not know
//   12      4     header length H: bytes from offset 0 to the digest count
//   16      4     block size in bytes (a power of two, 512 B to 64 MiB)
//   20      1     digest length L in bytes (1 to 64)
//   21      3     reserved, 0
//   24      8     device size in bytes
//   32      8     block count: ceil(device size / block size)
//   40      16    signature id
//   56      8     instant the read started: ns since 1970-01-01T00:00:00Z
//   64      16    digest name as OpenSSL knows it, ASCII, NUL-padded
//   80      2     source name length N (at most 4096)
//   82      N     source name, UTF-8 (a path or URI, for people)
//   82+N    ...   header fields up to H, each: 4-byte ASCII tag, 2-byte
//                 length F, F bytes; a reader skips tags it does not know
//                   "SMPL", F = 24: the sample that chose the selection:
//                   fraction numerator, denominator (lowest terms), seed
//   H       8     digest bytes D = signed blocks × L
//   (sparse only)
//   H+8     8     selection length S (at most block count + 1)
//   H+16    S     the selection: runs as in a map's payload encoding 1
//                 (dualrestore-map(5)), adding up to the block count
//   then    D     the digests of the signed blocks, in block order; a
//                 partial last block is hashed over its real length
//   then    32    SHA-256 of every byte before it
//
// The signed blocks are every block (dense), or the blocks the selection
// sets (sparse). A sampled signature (BlockSample) is a sparse one whose
// selection is the sample's blocks, or those of them a map set; its SMPL
// field is for people and for the sentences that refuse to compare two
// samples: a reader never recomputes the selection from it. A signature is written front to back, so it streams
// through a pipe; a reader holds the selection as a bitmap, one bit per
// block, and trusts nothing it compared until the closing checksum has matched.

public enum SignatureFormat {
  public static let magic: [UInt8] = [0x44, 0x52, 0x53, 0x49, 0x47, 0x0D, 0x0A, 0x1A]
  public static let version: UInt16 = 1
  static let fixedHeaderLength = 82
  /// Flags bit 0: the signature covers only the blocks its selection sets.
  static let sparseFlag: UInt16 = 1
  static let knownFlags: UInt16 = sparseFlag
  public static let maximumNameLength = 4096
  /// The header field of a sampled signature: "SMPL", 24 bytes.
  static let sampleTag: [UInt8] = Array("SMPL".utf8)
  static let sampleFieldLength = 24

  public static func looksLikeSignature(_ prefix: some Collection<UInt8>) -> Bool {
    prefix.count >= magic.count && Array(prefix.prefix(magic.count)) == magic
  }

  public struct Header: Equatable, Sendable {
    public var geometry: BlockGeometry
    public var digestName: String
    public var digestLength: Int
    public var signatureID: ID128
    public var started: Instant
    public var sourceName: String
    /// The blocks signed, for a sparse signature; nil when every block is.
    public var selection: BlockBitmap? {
      didSet {
        precondition(selection == nil || selection?.count == geometry.blockCount)
        signedBlocks = selection?.population ?? geometry.blockCount
      }
    }
    /// How many blocks the signature holds a digest of.
    public private(set) var signedBlocks: UInt64
    /// Of a sampled signature: the fraction and seed its selection was
    /// drawn with (a sparse signature's only).
    public var sample: BlockSample?

    public init(
      geometry: BlockGeometry, digestName: String, digestLength: Int, signatureID: ID128 = .random(),
      started: Instant = .now(), sourceName: String, selection: BlockBitmap? = nil, sample: BlockSample? = nil
    ) {
      precondition(selection == nil || selection?.count == geometry.blockCount)
      precondition(sample == nil || selection != nil, "a sample makes a sparse signature")
      self.geometry = geometry
      self.digestName = digestName
      self.digestLength = digestLength
      self.signatureID = signatureID
      self.started = started
      self.sourceName = sourceName
      self.selection = selection
      self.sample = sample
      signedBlocks = selection?.population ?? geometry.blockCount
    }

    public var isSparse: Bool { selection != nil }

    public var digestBytes: UInt64 { signedBlocks * UInt64(digestLength) }
  }

  /// The header, the digest byte count and for a sparse signature its
  /// selection: ready to be followed by the digests.
  public static func encodeHeader(_ h: Header) -> [UInt8] {
    var w = ByteWriter()
    w.raw(magic)
    w.u16(version)
    w.u16(h.isSparse ? sparseFlag : 0)
    w.u32(0)  // header length, patched below
    w.u32(h.geometry.blockSize)
    w.u8(UInt8(h.digestLength))
    w.zeros(3)
    w.u64(h.geometry.deviceSize)
    w.u64(h.geometry.blockCount)
    w.id(h.signatureID)
    w.i64(h.started.nanosecondsSinceEpoch)
    var name = Array(h.digestName.utf8.prefix(15))
    name += [UInt8](repeating: 0, count: 16 - name.count)
    w.raw(name)
    w.string16(h.sourceName, limit: maximumNameLength)
    if let sample = h.sample {
      w.raw(sampleTag)
      w.u16(UInt16(sampleFieldLength))
      w.u64(sample.fraction.numerator)
      w.u64(sample.fraction.denominator)
      w.u64(sample.seed)
    }
    let length = UInt32(w.bytes.count)
    for i in 0..<4 { w.bytes[12 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
    w.u64(h.digestBytes)
    if let selection = h.selection {
      // The runs of a bitmap always fit: no limit is given.
      let runs = MapFormat.encodeRuns(selection) ?? []
      w.u64(UInt64(runs.count))
      w.raw(runs)
    }
    return w.bytes
  }

  /// What comes before the selection and the digests: the header, the
  /// digest byte count, and for a sparse signature the selection length.
  struct Prelude {
    /// The header, without its selection yet for a sparse signature.
    var header: Header
    var sparse: Bool
    var digestBytes: UInt64
    var selectionLength: UInt64
    /// Bytes from offset 0 to the selection (sparse) or the digests (dense).
    var length: Int
  }

  /// Parses the prelude from the start of `bytes`, or returns nil when more
  /// bytes are needed. The digest byte count of a dense signature is
  /// checked here; that of a sparse one once its selection is read
  /// (`checkDigestBytes`).
  static func decodePrelude(_ bytes: ArraySlice<UInt8>, name: String) throws -> Prelude? {
    func fail(_ why: String) -> ToolkitError { ToolkitError.path(name, why) }
    if bytes.count < magic.count {
      if bytes.count < magic.count, !bytes.elementsEqual(magic.prefix(bytes.count)) {
        throw fail("not a dualrestore signature (bad magic)")
      }
      return nil
    }
    guard bytes.prefix(magic.count).elementsEqual(magic) else {
      throw fail("not a dualrestore signature (bad magic)")
    }
    var r = ByteReader(bytes)
    _ = r.take(magic.count)
    guard let version = r.u16(), let flags = r.u16(), let headerLength = r.u32() else { return nil }
    guard version == SignatureFormat.version else {
      throw fail(
        "signature format version \(version) is not supported (this build reads version \(SignatureFormat.version))")
    }
    guard flags & ~knownFlags == 0 else {
      throw fail("signature uses flags 0x\(String(flags, radix: 16)) this build does not know")
    }
    let sparse = flags & sparseFlag != 0
    guard headerLength >= fixedHeaderLength, headerLength <= UInt32(fixedHeaderLength + maximumNameLength + 4096)
    else { throw fail("header length \(headerLength) is out of range") }
    let length = Int(headerLength) + (sparse ? 16 : 8)
    guard bytes.count >= length else { return nil }
    guard let blockSize = r.u32(), let digestLength = r.u8(), let _ = r.take(3), let deviceSize = r.u64(),
      let blockCount = r.u64(), let id = r.id(), let started = r.i64(), let digestNameRaw = r.take(16),
      let nameLength = r.u16()
    else { return nil }
    let geometry: BlockGeometry
    do { geometry = try BlockGeometry(blockSize: blockSize, deviceSize: deviceSize) } catch { throw fail("\(error)") }
    guard geometry.blockCount == blockCount else {
      throw fail("block count \(blockCount) does not fit \(deviceSize) bytes in blocks of \(blockSize)")
    }
    guard digestLength >= 1, digestLength <= 64 else { throw fail("digest length \(digestLength) is out of range") }
    guard fixedHeaderLength + Int(nameLength) <= Int(headerLength), let nameBytes = r.take(Int(nameLength)) else {
      throw fail("source name length \(nameLength) is out of range")
    }
    let digestName = String(decoding: digestNameRaw.prefix { $0 != 0 }, as: UTF8.self)
    let sample = try decodeFields(&r, end: Int(headerLength), sparse: sparse, fail)
    var tail = ByteReader(bytes[(bytes.startIndex + Int(headerLength))...])
    guard let digestBytes = tail.u64() else { return nil }
    var header = Header(
      geometry: geometry, digestName: digestName, digestLength: Int(digestLength), signatureID: id,
      started: Instant(nanosecondsSinceEpoch: started),
      sourceName: String(decoding: nameBytes, as: UTF8.self))
    header.sample = sample
    var selectionLength: UInt64 = 0
    if sparse {
      // The selection is held in memory, one bit per block: the limit of a map.
      do { try geometry.checkMappable() } catch { throw fail("\(error)") }
      guard let s = tail.u64() else { return nil }
      guard s <= MapFormat.longestRuns(count: blockCount) else {
        throw fail("selection of \(s) bytes is longer than the runs of \(blockCount) blocks can be")
      }
      selectionLength = s
    } else {
      try checkDigestBytes(digestBytes, header, fail)
    }
    return Prelude(
      header: header, sparse: sparse, digestBytes: digestBytes, selectionLength: selectionLength, length: length)
  }

  /// Reads the header fields from `r` (just past the source name) up to
  /// offset `end`: returns the sample of a sampled signature, skips fields
  /// of other tags.
  private static func decodeFields(
    _ r: inout ByteReader, end: Int, sparse: Bool, _ fail: (String) -> ToolkitError
  ) throws -> BlockSample? {
    var sample: BlockSample?
    while r.offset < end {
      let at = r.offset
      guard end - at >= 6, let tag = r.take(4), let length = r.u16() else {
        throw fail("header field at byte \(at) is cut off by the header length \(end)")
      }
      guard Int(length) <= end - r.offset, let body = r.take(Int(length)) else {
        throw fail("header field at byte \(at) of \(length) bytes runs past the header length \(end)")
      }
      guard tag.elementsEqual(sampleTag) else { continue }
      var f = ByteReader(body)
      guard sample == nil, sparse, Int(length) == sampleFieldLength, let p = f.u64(), let q = f.u64(),
        let seed = f.u64()
      else {
        if !sparse { throw fail("a dense signature records a sample") }
        if sample != nil { throw fail("the sample is recorded twice") }
        throw fail("sample field of \(length) bytes is not \(sampleFieldLength)")
      }
      do {
        sample = BlockSample(fraction: try BlockSample.Fraction(numerator: p, denominator: q), seed: seed)
      } catch {
        throw fail("\(error)")
      }
    }
    return sample
  }

  /// Throws unless `digestBytes` is the signed blocks times the digest length.
  static func checkDigestBytes(_ digestBytes: UInt64, _ header: Header, _ fail: (String) -> ToolkitError) throws {
    guard digestBytes == header.digestBytes else {
      throw fail(
        "digest area of \(digestBytes) bytes does not hold \(header.signedBlocks) digests of \(header.digestLength) bytes"
      )
    }
  }
}
