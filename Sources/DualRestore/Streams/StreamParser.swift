// A pure, incremental parser of the block stream framing. `next(_:)` looks at
// the bytes the caller has (any amount, down to one byte at a time) and
// returns either nil ("need more bytes") or one verified record and how many
// bytes it used. It allocates nothing: a record's body points into the
// caller's bytes. Semantic checks (block order, sizes against the header)
// are the parser's too, so every consumer gets them.
//
// Every record is checked before it is returned: framing, a body length
// within bounds (before anything is allocated), its CRC-32C, its sequence
// number, its place (HEADER first, END last, nothing after END), and for
// known types the body's size and fields. A LINEAGE record is checked like
// any known type (size, fields, at most once, right after the HEADER, only
// in a full stream, not naming the stream itself), though it is not
// critical: a reader that does not know it skips it. So is a GENERATION
// record (at most once, after the HEADER, LINEAGE and SOURCES records,
// before any block record).
//
// An encrypted stream (preamble flag bit 0) is opened with the secret given
// to `init(secret:)`: its CRYPTO record is checked against the key, and each
// later record's tag is verified and its body decrypted (into the cipher's
// own buffer, reused) before anything in it is looked at. A version 2 stream
// names the images its references point into in a SOURCES record before any
// block record; each REFERENCE run is checked against that record (image,
// range, lengths on both sides) and the block order. A secret given
// for a plaintext stream is refused: nothing in such a stream is
// authenticated, and it must not pass for a stream that is.

import CShim

public struct StreamParser {
  public enum Record {
    /// The 16-byte preamble (magic and version), checked.
    case preamble
    case header(StreamFormat.Header)
    /// A block; `payload` is raw or LZ4 as `encoding` says.
    case data(block: UInt64, length: Int, encoding: StreamFormat.DataEncoding, payload: UnsafeRawBufferPointer)
    case zero(first: UInt64, count: UInt64)
    /// The full stream is a compaction that stands for the end of another
    /// stream; right after the header, at most once.
    case lineage(StreamFormat.Lineage)
    /// The images a version 2 stream's references point into; once, before any block.
    case sources(StreamFormat.Sources)
    /// The tracking generations the stream carries; once, before any block.
    case generation(StreamFormat.Generation)
    /// A run of blocks whose content the receiver holds; `digests` points
    /// into the caller's bytes, as a DATA payload does.
    case reference(StreamFormat.Reference)
    case end(StreamFormat.End)
    /// A record with nothing for the consumer: a type this version does not
    /// know and may skip, or the CRYPTO record, which the parser handles.
    case skipped(type: UInt16)
  }

  /// Where the next record starts in the stream.
  public private(set) var offset: UInt64 = 0
  /// Sequence number of the next record.
  public private(set) var sequence: UInt64 = 0
  public private(set) var header: StreamFormat.Header?
  /// The LINEAGE record's, once seen.
  public private(set) var lineage: StreamFormat.Lineage?
  /// The GENERATION record's, once seen.
  public private(set) var generation: StreamFormat.Generation?
  /// The preamble's format version: 1, or 2 for a stream with references.
  public private(set) var formatVersion: UInt16 = StreamFormat.version
  /// The SOURCES record's, once seen (version 2).
  public private(set) var sources: StreamFormat.Sources?
  /// Blocks named by REFERENCE records so far.
  public private(set) var referencedBlocks: UInt64 = 0
  /// The sequence number of the HEADER, which a LINEAGE record follows.
  private var headerSequence: UInt64 = 0
  public private(set) var sawEnd = false
  /// The next block a DATA or ZERO record may name (blocks only increase).
  private var nextBlock: UInt64 = 0
  private var sawPreamble = false
  private let secret: StreamSecret?
  /// The preamble as read, which the CRYPTO record's key check covers.
  private var preambleBytes: [UInt8] = []
  /// Set once the CRYPTO record has been opened.
  private var cipher: RecordCipher?
  /// The cipher of an encrypted stream, once its CRYPTO record is open: a
  /// reader of single records makes its own from it (`another()`).
  package var recordCipher: RecordCipher? { cipher }
  /// Whether the preamble marks the stream encrypted.
  public private(set) var isEncrypted = false
  /// Counts kept to check the END record against.
  public private(set) var dataBlocks: UInt64 = 0
  public private(set) var zeroBlocks: UInt64 = 0
  public private(set) var blockBytes: UInt64 = 0

  /// A parser of plaintext streams, or, with `secret`, of streams encrypted with it.
  public init(secret: StreamSecret? = nil) { self.secret = secret }

  /// "record 12 at byte 65572", for messages.
  public var position: String { "record \(sequence) at byte \(offset)" }

  /// Parses the next record from `bytes`. Returns nil when more bytes are needed.
  public mutating func next(_ bytes: UnsafeRawBufferPointer) throws -> (record: Record, consumed: Int)? {
    if !sawPreamble {
      let have = min(bytes.count, StreamFormat.magic.count)
      for i in 0..<have where bytes[i] != StreamFormat.magic[i] {
        throw ToolkitError("not a dualrestore block stream (bad magic)")
      }
      guard bytes.count >= StreamFormat.preambleLength else { return nil }
      let version = bytes.loadUnaligned(fromByteOffset: 8, as: UInt16.self).littleEndian
      guard version == StreamFormat.version || version == StreamFormat.referencesVersion else {
        throw ToolkitError(
          "stream format version \(version) is not supported (this build reads versions \(StreamFormat.version) "
            + "and \(StreamFormat.referencesVersion))")
      }
      formatVersion = version
      let flags = bytes.loadUnaligned(fromByteOffset: 10, as: UInt16.self).littleEndian
      guard flags & ~StreamFormat.encryptedFlag == 0 else {
        throw ToolkitError("stream uses flags 0x\(String(flags, radix: 16)) this build does not know")
      }
      if flags & StreamFormat.encryptedFlag != 0 {
        guard bytes.loadUnaligned(fromByteOffset: 12, as: UInt32.self) == 0 else {
          throw ToolkitError("the preamble of the encrypted stream has reserved bytes that are not zero")
        }
        isEncrypted = true
        preambleBytes = Array(UnsafeRawBufferPointer(rebasing: bytes[0..<StreamFormat.preambleLength]))
      } else if let secret {
        throw ToolkitError(
          "the stream is not encrypted, so nothing in it is authenticated; refusing it because "
            + "\(secret.kind.option) was given (drop \(secret.kind.option) to read a plaintext stream)")
      }
      sawPreamble = true
      offset = UInt64(StreamFormat.preambleLength)
      return (.preamble, StreamFormat.preambleLength)
    }
    let rest = bytes
    if sawEnd {
      if rest.isEmpty { return nil }
      throw fail("unexpected data after the END record")
    }
    guard rest.count >= StreamFormat.recordHeaderLength else { return nil }
    let type = rest.loadUnaligned(fromByteOffset: 0, as: UInt16.self).littleEndian
    let flags = rest.loadUnaligned(fromByteOffset: 2, as: UInt16.self).littleEndian
    let framedLength = Int(rest.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian)
    let seq = rest.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
    guard framedLength <= StreamFormat.maximumBodyLength else {
      throw fail("body length \(framedLength) exceeds the limit of \(StreamFormat.maximumBodyLength) bytes")
    }
    let total = StreamFormat.recordHeaderLength + framedLength + StreamFormat.recordTrailerLength
    guard rest.count >= total else { return nil }
    guard let base = rest.baseAddress else { return nil }
    let stored = rest.loadUnaligned(fromByteOffset: StreamFormat.recordHeaderLength + framedLength, as: UInt32.self)
      .littleEndian
    guard dr_crc32c(0, base, StreamFormat.recordHeaderLength + framedLength) == stored else {
      throw fail("checksum mismatch: the record is damaged")
    }
    guard seq == sequence else {
      throw fail("sequence number \(seq) where \(sequence) was expected (a record is missing or out of order)")
    }
    var body = UnsafeRawBufferPointer(start: base + StreamFormat.recordHeaderLength, count: framedLength)
    if isEncrypted {
      guard let cipher else {
        // Record 0 of an encrypted stream: the CRYPTO record, in clear.
        guard type == StreamFormat.RecordType.crypto.rawValue else {
          throw fail("the preamble flags mark the stream encrypted, but its first record is not a CRYPTO record")
        }
        do {
          cipher = try StreamCrypto.open(
            body: body, framing: UnsafeRawBufferPointer(start: base, count: StreamFormat.recordHeaderLength),
            preamble: preambleBytes, secret: secret)
        } catch let error as ToolkitError {
          throw fail(error.message)
        }
        return advance(.skipped(type: type), total)
      }
      guard let plain = cipher.open(framing: base, body: body) else {
        throw fail("authentication failed: the record was altered, moved, or taken from another stream")
      }
      guard type != StreamFormat.RecordType.crypto.rawValue else { throw fail("a second CRYPTO record") }
      body = plain
    } else if type == StreamFormat.RecordType.crypto.rawValue {
      throw fail("a CRYPTO record in a stream whose preamble flags do not mark it encrypted")
    }
    let length = body.count

    let record: Record
    switch StreamFormat.RecordType(rawValue: type) {
    case .crypto:
      throw fail("a CRYPTO record out of place")
    case .header:
      guard header == nil else { throw fail("a second HEADER record") }
      record = .header(try StreamFormat.decodeHeader(body, at: position))
      if case .header(let h) = record { header = h }
      headerSequence = sequence
    case .lineage:
      let h = try requireHeader()
      guard lineage == nil else { throw fail("a second LINEAGE record") }
      guard sequence == headerSequence + 1 else {
        throw fail("a LINEAGE record after other records; it must follow the HEADER directly")
      }
      guard !h.isIncremental else {
        throw fail(
          "a LINEAGE record in an incremental stream (on top of stream \(h.baseStreamID)); only a full stream "
            + "may stand for another")
      }
      let decoded: StreamFormat.Lineage
      do { decoded = try StreamFormat.decodeLineage(body, header: h) } catch { throw fail(error.message) }
      lineage = decoded
      record = .lineage(decoded)
    case .generation:
      _ = try requireHeader()
      guard generation == nil else { throw fail("a second GENERATION record") }
      guard dataBlocks == 0, zeroBlocks == 0, referencedBlocks == 0 else {
        throw fail("a GENERATION record after block records; it must come before them")
      }
      if formatVersion >= StreamFormat.referencesVersion && sources == nil {
        throw fail("a GENERATION record before the SOURCES record; it must follow it")
      }
      let decoded: StreamFormat.Generation
      do { decoded = try StreamFormat.decodeGeneration(body) } catch { throw fail(error.message) }
      generation = decoded
      record = .generation(decoded)
    case .sources:
      let h = try requireHeader()
      guard formatVersion >= StreamFormat.referencesVersion else {
        throw fail("a SOURCES record in a version \(formatVersion) stream; references need version 2")
      }
      guard sources == nil else { throw fail("a second SOURCES record") }
      guard generation == nil else {
        throw fail("a SOURCES record after the GENERATION record; it must come before it")
      }
      guard dataBlocks == 0, zeroBlocks == 0, referencedBlocks == 0 else {
        throw fail("a SOURCES record after block records; it must come before them")
      }
      let decoded: StreamFormat.Sources
      do { decoded = try StreamFormat.decodeSources(body, header: h) } catch { throw fail(error.message) }
      sources = decoded
      record = .sources(decoded)
    case .reference:
      let h = try requireHeader()
      let s = try requireSources()
      guard length >= StreamFormat.referenceFixedLength else { throw fail("REFERENCE record is too short") }
      let first = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
      let count = Int(body.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian)
      let fields = body.loadUnaligned(fromByteOffset: 12, as: UInt32.self).littleEndian
      let image = Int(fields & 0xFF)
      let sourceFirst = body.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
      guard fields >> 8 == 0 else { throw fail("REFERENCE record has reserved bytes that are not zero") }
      guard count >= 1, count <= StreamFormat.maximumReferenceRun(blockSize: h.geometry.blockSize) else {
        throw fail(
          "REFERENCE record names \(count) blocks, outside 1 to \(StreamFormat.maximumReferenceRun(blockSize: h.geometry.blockSize))"
        )
      }
      guard length == StreamFormat.referenceFixedLength + count * s.digestLength else {
        throw fail(
          "REFERENCE record has \(length) bytes, not \(StreamFormat.referenceFixedLength + count * s.digestLength) for \(count) digests"
        )
      }
      guard first < h.geometry.blockCount, UInt64(count) <= h.geometry.blockCount - first else {
        throw fail("reference run of \(count) blocks from block \(first) is out of range")
      }
      guard first >= nextBlock else { throw fail("block \(first) is out of order or repeated") }
      guard image < s.images.count else {
        throw fail("REFERENCE record names image \(image); the SOURCES record lists \(s.images.count)")
      }
      let source = s.images[image].geometry
      guard sourceFirst < source.blockCount, UInt64(count) <= source.blockCount - sourceFirst else {
        throw fail(
          "reference run of \(count) blocks from block \(sourceFirst) of \(s.describe(image)) is past its \(source.blockCount) blocks"
        )
      }
      // Blocks pair up whole: only the last of the run may be short, on both sides alike.
      let lastTarget = h.geometry.length(ofBlock: first + UInt64(count) - 1)
      let lastSource = source.length(ofBlock: sourceFirst + UInt64(count) - 1)
      guard lastTarget == lastSource else {
        throw fail(
          "block \(first + UInt64(count) - 1) has \(lastTarget) bytes but the block it refers to in \(s.describe(image)) has \(lastSource)"
        )
      }
      record = .reference(
        StreamFormat.Reference(
          first: first, count: count, image: image, sourceFirst: sourceFirst,
          digests: UnsafeRawBufferPointer(rebasing: body[StreamFormat.referenceFixedLength...])))
      nextBlock = first + UInt64(count)
      referencedBlocks += UInt64(count)
      blockBytes += h.geometry.byteRange(blocks: first, count: UInt64(count)).length
    case .data:
      let h = try requireHeader()
      try requireSourcesInVersion2()
      guard length >= StreamFormat.dataFixedLength else { throw fail("DATA record is too short") }
      let block = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
      let blockLength = Int(body.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian)
      let encodingRaw = body.loadUnaligned(fromByteOffset: 12, as: UInt32.self).littleEndian
      guard block < h.geometry.blockCount else {
        throw fail("block \(block) is past the end of the device's \(h.geometry.blockCount) blocks")
      }
      guard block >= nextBlock else { throw fail("block \(block) is out of order or repeated") }
      guard blockLength == h.geometry.length(ofBlock: block) else {
        throw fail("block \(block) has length \(blockLength), not \(h.geometry.length(ofBlock: block))")
      }
      guard encodingRaw <= 1, let encoding = StreamFormat.DataEncoding(rawValue: UInt8(encodingRaw)) else {
        throw fail("unknown block encoding \(encodingRaw)")
      }
      let payloadLength = length - StreamFormat.dataFixedLength
      switch encoding {
      case .raw:
        guard payloadLength == blockLength else {
          throw fail("raw block \(block) has \(payloadLength) bytes, not \(blockLength)")
        }
      case .lz4:
        guard h.compression == .lz4, payloadLength > 0, payloadLength < blockLength else {
          throw fail("LZ4 payload of \(payloadLength) bytes for block \(block) is out of range")
        }
      }
      record = .data(
        block: block, length: blockLength, encoding: encoding,
        payload: UnsafeRawBufferPointer(rebasing: body[StreamFormat.dataFixedLength...]))
      nextBlock = block + 1
      dataBlocks += 1
      blockBytes += UInt64(blockLength)
    case .zero:
      let h = try requireHeader()
      try requireSourcesInVersion2()
      guard length == StreamFormat.zeroBodyLength else { throw fail("ZERO record has \(length) bytes, not 16") }
      let first = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
      let count = body.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
      guard count > 0, first < h.geometry.blockCount, count <= h.geometry.blockCount - first else {
        throw fail("zero run of \(count) blocks from block \(first) is out of range")
      }
      guard first >= nextBlock else { throw fail("block \(first) is out of order or repeated") }
      record = .zero(first: first, count: count)
      nextBlock = first + count
      zeroBlocks += count
      let (_, bytes) = h.geometry.byteRange(blocks: first, count: count)
      blockBytes += bytes
    case .end:
      _ = try requireHeader()
      try requireSourcesInVersion2()
      guard let end = StreamFormat.decodeEnd(body, version: formatVersion) else {
        let expected =
          formatVersion >= StreamFormat.referencesVersion
          ? StreamFormat.referencesEndBodyLength : StreamFormat.endBodyLength
        throw fail(
          length == expected
            ? "END record has reserved bytes that are not zero"
            : "END record has \(length) bytes, not the \(expected) of a version \(formatVersion) stream")
      }
      guard end.dataBlocks == dataBlocks, end.zeroBlocks == zeroBlocks, end.bytes == blockBytes,
        end.records == sequence, end.referencedBlocks == referencedBlocks
      else {
        throw fail(
          "END record counts \(end.dataBlocks) data, \(end.zeroBlocks) zero and \(end.referencedBlocks) referenced blocks in \(end.records) records, "
            + "but the stream had \(dataBlocks), \(zeroBlocks) and \(referencedBlocks) in \(sequence)")
      }
      record = .end(end)
      sawEnd = true
    case nil:
      _ = try requireHeader()
      guard flags & StreamFormat.criticalFlag == 0 else {
        throw fail("record type \(type) is not known to this version and is marked critical")
      }
      record = .skipped(type: type)
    }
    return advance(record, total)
  }

  private mutating func advance(_ record: Record, _ total: Int) -> (record: Record, consumed: Int) {
    sequence += 1
    offset += UInt64(total)
    return (record, total)
  }

  /// At end of input: throws unless the stream ended with its END record.
  public func finish(leftover: Int) throws {
    if !sawPreamble {
      throw ToolkitError(
        offset == 0 && leftover == 0
          ? "empty input, not a block stream" : "truncated stream: the preamble is incomplete")
    }
    if !sawEnd {
      if leftover > 0 {
        throw fail("truncated stream: the record is incomplete (\(leftover) bytes); the stream has no END record")
      }
      throw fail("truncated stream: no END record; the stream is incomplete")
    }
  }

  private func requireSources() throws -> StreamFormat.Sources {
    guard formatVersion >= StreamFormat.referencesVersion else {
      throw fail("a REFERENCE record in a version \(formatVersion) stream; references need version 2")
    }
    guard let sources else { throw fail("a REFERENCE record before the SOURCES record") }
    return sources
  }

  /// A version 2 stream names its images before its first block record.
  private func requireSourcesInVersion2() throws {
    if formatVersion >= StreamFormat.referencesVersion && sources == nil {
      throw fail("a version 2 stream whose SOURCES record does not come before its blocks")
    }
  }

  private func requireHeader() throws -> StreamFormat.Header {
    guard let header else { throw fail("the first record is not a HEADER") }
    return header
  }

  private func fail(_ why: String) -> ToolkitError { ToolkitError("\(position): \(why)") }
}
