// One block stream kept at rest (an image file, or an object read through
// an NBD export such as nbdkit's curl plugin), opened for random reads:
// its head is parsed (preamble, CRYPTO record, HEADER), its index
// (dualrestore-index(5)) loaded, or built by one pass over the stream when
// missing or stale and kept where it was looked for.
//
// Invariants:
// - An index is used only for the stream it describes: same stream id,
//   length, END record CRC, geometry and encryption. Anything else is stale.
// - A built index comes from a complete, verified pass: every record's CRC
//   (and tag), the END record's counts and digest. A stream that fails the
//   pass is refused whole.
// - A kept index is written to a temporary file, made durable, then renamed
//   over the old one, so a crash leaves the old index or the new, never half.

public final class StoredStream: Sendable {
  /// Why a stream with references is not read at random: its blocks are
  /// not all in it.
  static let referencesRefused = ToolkitError(
    "the stream names content its receiver already holds (stream format version 2, made with snapshot --have); "
      + "it can be merged with merge-snapshot, not served or compacted")
  /// How messages name the stream: its path or URI.
  public let name: String
  public let source: BlockDevice
  public let header: StreamFormat.Header
  /// The LINEAGE record of a compacted stream.
  public let lineage: StreamFormat.Lineage?
  /// The GENERATION record, when the stream has one.
  public let generation: StreamFormat.Generation?
  public let index: StreamIndexFormat.Index
  /// The cipher of an encrypted stream, as opened from its CRYPTO record;
  /// readers take their own with `another()`.
  let cipher: RecordCipher?

  public var identity: StreamIndexFormat.Identity { index.identity }
  public var isEncrypted: Bool { cipher != nil }

  /// What opening did about the index, for the log.
  public enum IndexOrigin: Sendable, Equatable {
    case loaded(String)
    case built(kept: String?, why: String)
  }
  public let indexOrigin: IndexOrigin

  /// What the first bytes of a stream say: its HEADER, the LINEAGE record
  /// of a compacted stream, and the cipher of an encrypted one.
  public struct Head: Sendable {
    public let header: StreamFormat.Header
    public let lineage: StreamFormat.Lineage?
    let cipher: RecordCipher?
    /// The GENERATION record: the writes the stream carries, as of when.
    public var generation: StreamFormat.Generation? = nil
    /// The stream whose end this one's stands for besides its own (zeros: none).
    public var standsFor: ID128 { lineage?.standsFor ?? .none }
  }

  /// Opens the stream on `source`. `indexPath` says, from the stream's
  /// HEADER, where its index is looked for and kept (nil: built and held in
  /// memory only).
  public convenience init(
    source: BlockDevice, name: String, secret: StreamSecret?,
    indexPath indexPathOf: (StreamFormat.Header) -> String?, log: @Sendable (String) -> Void = { _ in }
  ) throws {
    let head = try StoredStream.readHead(source, name: name, secret: secret)
    try self.init(
      source: source, name: name, head: head, secret: secret, indexPath: indexPathOf(head.header), log: log)
  }

  /// Opens the stream on `source` whose head has been read.
  public init(
    source: BlockDevice, name: String, head: Head, secret: StreamSecret?, indexPath: String?,
    log: @Sendable (String) -> Void = { _ in }
  ) throws {
    self.source = source
    self.name = name
    header = head.header
    lineage = head.lineage
    generation = head.generation
    cipher = head.cipher
    let endCRC = try StoredStream.endCRC(source, name: name)

    var why = "no index was kept"
    if let indexPath, pathExists(indexPath), let bytes = try? readWholeFile(indexPath, limit: 1 << 36) {
      do {
        let loaded = try StreamIndexFormat.decode(bytes)
        let id = loaded.identity
        let authentic = cipher.map { c in bytes.withUnsafeBytes { StreamIndexFormat.authenticate($0, key: c.indexKey) }
        }
        if authentic == false {
          why = "the index \(indexPath) is not authenticated by the stream's key (altered, or made for another stream)"
        } else if id.streamID == header.streamID && id.baseStreamID == header.baseStreamID
          && id.streamLength == source.size && id.endCRC == endCRC && id.geometry == header.geometry
          && id.encrypted == (cipher != nil) && id.standsFor == head.standsFor
        {
          index = loaded
          indexOrigin = .loaded(indexPath)
          return
        } else {
          why = "the index \(indexPath) describes another stream or an older version of it"
        }
      } catch let error as ToolkitError {
        why = "the index \(indexPath) is not usable: \(error.message)"
      }
    } else if let indexPath {
      why = pathExists(indexPath) ? "the index \(indexPath) cannot be read" : "there is no index at \(indexPath)"
    }
    let built = try StoredStream.buildIndex(source, name: name, secret: secret, endCRC: endCRC)
    index = built
    var kept: String? = nil
    if let indexPath {
      do {
        let bytes = StreamIndexFormat.encode(built, key: cipher?.indexKey ?? [])
        try bytes.withUnsafeBytes { try writeFileAtomically(indexPath, [$0]) }
        kept = indexPath
      } catch {
        log("\(name): the index could not be kept at \(indexPath) (\(error)); it is held in memory")
      }
    }
    indexOrigin = .built(kept: kept, why: why)
  }

  /// The preamble, the CRYPTO record of an encrypted stream, the HEADER and
  /// the LINEAGE and GENERATION records after it, parsed from the first
  /// bytes of the stream.
  public static func readHead(_ source: BlockDevice, name: String, secret: StreamSecret?) throws -> Head {
    var parser = StreamParser(secret: secret)
    var want = Int(min(source.size, 16 << 10))
    // The types read here after the HEADER; any other record is the first
    // of the blocks.
    func isHead(_ rest: UnsafeRawBufferPointer) -> Bool {
      let type = rest.loadUnaligned(as: UInt16.self).littleEndian
      return type == StreamFormat.RecordType.lineage.rawValue || type == StreamFormat.RecordType.generation.rawValue
    }
    while true {
      let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: max(want, 1), alignment: 16)
      defer { bytes.deallocate() }
      let window = UnsafeMutableRawBufferPointer(rebasing: bytes[0..<want])
      try source.read(into: window, at: 0)
      parser = StreamParser(secret: secret)
      var used = 0
      do {
        var header: StreamFormat.Header?
        var lineage: StreamFormat.Lineage?
        func head(_ generation: StreamFormat.Generation? = nil) -> Head? {
          guard let header else { return nil }
          var h = Head(header: header, lineage: lineage, cipher: parser.recordCipher)
          h.generation = generation
          return h
        }
        while true {
          let rest = UnsafeRawBufferPointer(rebasing: window[used...])
          // After the HEADER only LINEAGE and GENERATION records are parsed
          // here: any other record is the first of the blocks, checked when
          // it is read (a damaged one fails its own blocks, not the whole
          // stream).
          if rest.count >= 2, !isHead(rest), let h = head() { return h }
          guard let (record, consumed) = try parser.next(rest) else {
            // The record after the HEADER is not all here: a LINEAGE or
            // GENERATION record (small) is read whole below; any other
            // record says there is none.
            if rest.count >= 2, !isHead(rest), let h = head() { return h }
            break
          }
          used += consumed
          switch record {
          case .header(let h):
            guard parser.formatVersion == StreamFormat.version else { throw StoredStream.referencesRefused }
            header = h
          // The parser takes a LINEAGE record only right after the HEADER,
          // and a GENERATION record after it, before any block.
          case .lineage(let l): lineage = l
          case .generation(let g): if let h = head(g) { return h }
          case .preamble, .skipped: break
          default:
            if let h = head() { return h }
          }
        }
        if want == Int(source.size) { try parser.finish(leftover: want - used) }
      } catch let error as ToolkitError {
        throw ToolkitError("\(name): \(error.message)")
      }
      // The HEADER is longer than what was read: read as much as it and a
      // LINEAGE record can be.
      let most = Int(min(source.size, UInt64(StreamFormat.maximumNameLength + 8192)))
      guard want < most else { throw ToolkitError("\(name): the stream has no HEADER record") }
      want = most
    }
  }

  /// The CRC-32C that ends the stream (its END record's, in a whole stream).
  static func endCRC(_ source: BlockDevice, name: String) throws -> UInt32 {
    guard source.size >= UInt64(StreamFormat.preambleLength + 4) else {
      throw ToolkitError("\(name): \(source.size) bytes is too short for a block stream")
    }
    var crc: UInt32 = 0
    try withUnsafeMutableBytes(of: &crc) { try source.read(into: $0, at: source.size - 4) }
    return UInt32(littleEndian: crc)
  }

  /// One pass over the whole stream, every record verified: the index of
  /// its DATA and ZERO records.
  static func buildIndex(_ source: BlockDevice, name: String, secret: StreamSecret?, endCRC: UInt32) throws
    -> StreamIndexFormat.Index
  {
    let reader = StreamReader(device: source, name: name, secret: secret)
    var entries: [StreamIndexFormat.Entry] = []
    var header: StreamFormat.Header?
    var standsFor = ID128.none
    var data: UInt64 = 0
    var zero: UInt64 = 0
    let maximumRun = UInt64(UInt32.max)
    while let record = try reader.next() {
      let length = UInt32(reader.nextOffset - reader.recordOffset)
      switch record {
      case .header(let h): header = h
      case .data(let block, _, _, _):
        entries.append(
          .init(
            firstBlock: block, blockCount: 1, offset: reader.recordOffset, sequence: reader.recordSequence,
            length: length, type: .data))
        data += 1
      case .zero(let first, let count):
        // A run longer than an entry can say takes several entries, all
        // pointing at the same record.
        var at = first
        while at < first + count {
          let n = min(first + count - at, maximumRun)
          entries.append(
            .init(
              firstBlock: at, blockCount: n, offset: reader.recordOffset, sequence: reader.recordSequence,
              length: length, type: .zero))
          at += n
        }
        zero += count
      case .lineage(let l): standsFor = l.standsFor
      case .sources, .reference: throw ToolkitError("\(name): \(StoredStream.referencesRefused.message)")
      case .preamble, .end, .generation, .skipped: break
      }
    }
    guard let header else { throw ToolkitError("\(name): the stream has no HEADER record") }
    guard reader.bytesRead == source.size else {
      throw ToolkitError("\(name): the stream ends at byte \(reader.bytesRead) but \(source.size) bytes are stored")
    }
    let identity = StreamIndexFormat.Identity(
      streamID: header.streamID, baseStreamID: header.baseStreamID, streamLength: source.size, endCRC: endCRC,
      geometry: header.geometry, started: header.started, encrypted: reader.recordCipher != nil,
      standsFor: standsFor)
    return StreamIndexFormat.Index(identity: identity, entries: entries, dataBlocks: data, zeroBlocks: zero)
  }
}
