// Writes a block stream of a source: the blocks of a selection (or all),
// holes and zero blocks as ZERO runs, the rest as DATA records, LZ4-compressed
// when that makes them smaller.
//
// Pipeline: a ChunkReader thread reads ahead; the blocks of each chunk are
// classified and compressed on every core, each worker with its own LZ4
// state and a fixed area of the output buffers; the calling thread then
// frames the records in block order (sequence numbers, CRC-32C, the running
// SHA-256) and writes them with writev straight from those buffers. Memory is
// fixed by the chunk size; nothing is allocated per block.
//
// With `have` (an index of signatures of what the receiver holds), each
// block that is not zeros is hashed on the workers and looked up; a block
// whose content the receiver holds somewhere is not compressed, and the
// writer stage names it in a REFERENCE run instead of carrying it (stream
// format version 2): a run goes on while the next block's content is at the
// next block of the same image, and otherwise starts, preferring the place
// with the block's own number, where an unchanged block already is.
//
// With a secret, the stream is encrypted (StreamCrypto.swift): the writer
// stage seals each record after compression with one reused AES-256-GCM
// context, the ciphertext going into the chunk's compressed buffer (in place
// for LZ4 payloads) and the tag beside the CRC; the stream is then not
// hashed, its records being authenticated by their tags.

import CLZ4
import CShim
import Dispatch
import Glibc

public enum SnapshotWriter {
  public struct Options: Sendable {
    public var blockSize: UInt32
    public var selection: BlockMap?
    public var baseStreamID: ID128
    public var compress: Bool
    public var workers: Int
    public var progress: Bool
    /// Encrypt the stream with this key or passphrase.
    public var encryption: StreamSecret?
    /// A compaction's: the LINEAGE record written right after the HEADER,
    /// saying which stream's end this full stream equals. Only for a full
    /// stream (no `baseStreamID`).
    public var lineage: StreamFormat.Lineage?
    /// The GENERATION record written before the blocks: the tracking
    /// generations the stream carries, so a merge can tell one left out.
    public var generation: StreamFormat.Generation?
    /// What the receiver holds: blocks whose content it has are referenced.
    public var have: SignatureIndex?

    public init(
      blockSize: UInt32 = BlockGeometry.defaultBlockSize, selection: BlockMap? = nil, baseStreamID: ID128 = .none,
      compress: Bool = true, workers: Int = BlockHasher.defaultWorkers, progress: Bool = false,
      encryption: StreamSecret? = nil, lineage: StreamFormat.Lineage? = nil
    ) {
      self.encryption = encryption
      self.lineage = lineage
      self.blockSize = blockSize
      self.selection = selection
      self.baseStreamID = baseStreamID
      self.compress = compress
      self.workers = workers
      self.progress = progress
    }
  }

  public struct Summary: Sendable {
    public var header: StreamFormat.Header
    public var dataBlocks: UInt64 = 0
    public var compressedBlocks: UInt64 = 0
    public var zeroBlocks: UInt64 = 0
    /// Blocks named by references, the records naming them, and the bytes
    /// of those blocks (a short last block by its length): bytes not sent.
    public var referencedBlocks: UInt64 = 0
    public var referenceRecords: UInt64 = 0
    public var referencedBytes: UInt64 = 0
    /// Bytes of the blocks carried (data, zero and referenced), uncompressed.
    public var bytesIn: UInt64 = 0
    /// Bytes of stream written.
    public var bytesOut: UInt64 = 0
    public var seconds: Double = 0
  }

  /// Per-block outcome of the parallel stage.
  enum Kind: UInt8 {
    case skipped = 0
    case zero = 1
    case raw = 2
    case lz4 = 3
    /// The receiver holds the content: `candidates[i]` in the index.
    case reference = 4
  }

  /// The compressed form of one chunk: what the parallel stage produces and
  /// the writer stage frames. Two of them alternate.
  // @unchecked Sendable: handed stage to stage through Handoff queues; one stage holds it at a time.
  final class EncodedChunk: @unchecked Sendable {
    let compressed: AlignedBuffer
    let kinds: UnsafeMutableBufferPointer<Kind>
    let lengths: UnsafeMutableBufferPointer<Int32>
    var chunk: ChunkReader.Chunk?
    // The records framed for this chunk: 16 header bytes and 16 DATA fields
    // each, a trailer each (the GCM tag when encrypted, then the CRC), and
    // the vectors to write and hash, in order.
    let frames: AlignedBuffer
    let crcs: AlignedBuffer
    let vectors: UnsafeMutableBufferPointer<iovec>
    /// A copy of the vectors for writev, which may adjust them.
    let writeVectors: UnsafeMutableBufferPointer<iovec>
    var frameCount = 0
    var vectorCount = 0
    /// Signalled by the hashing thread when it has hashed the vectors.
    let hashed = DispatchSemaphore(value: 0)
    /// With an index: each block's digest, and the index positions that may
    /// hold its content.
    let digests: AlignedBuffer
    let candidates: UnsafeMutableBufferPointer<Range<Int>>
    /// The REFERENCE bodies framed for this chunk past their first 16 bytes
    /// (the source block and the digests), and how much of it is used.
    let references: AlignedBuffer
    var referencesUsed = 0

    init(blocks: Int, bound: Int, digestLength: Int = 0, longestRun: Int = 0) {
      digests = AlignedBuffer(count: blocks * digestLength)
      candidates = .allocate(capacity: digestLength > 0 ? blocks : 0)
      candidates.initialize(repeating: 0..<0)
      // Every block a run of its own, and one run carried in from before.
      references = AlignedBuffer(
        count: digestLength > 0 ? (blocks + 1) * (8 + digestLength + 64) + longestRun * digestLength : 0)
      compressed = AlignedBuffer(count: blocks * max(bound, 1))
      kinds = .allocate(capacity: blocks)
      kinds.initialize(repeating: .skipped)
      lengths = .allocate(capacity: blocks)
      lengths.initialize(repeating: 0)
      frames = AlignedBuffer(count: (blocks + 2) * 32)
      crcs = AlignedBuffer(count: (blocks + 2) * RecordFramer.trailerStride)
      vectors = .allocate(capacity: (blocks + 2) * 3)
      writeVectors = .allocate(capacity: (blocks + 2) * 3)
    }

    deinit {
      candidates.deallocate()
      kinds.deallocate()
      lengths.deallocate()
      vectors.deallocate()
      writeVectors.deallocate()
    }
  }

  public static func write(_ source: BlockDevice, to sink: OutputSink, options: Options) throws -> Summary {
    let started = Instant.now()
    let geometry = try BlockGeometry(blockSize: options.blockSize, deviceSize: source.size)
    var coverage = StreamFormat.Coverage.all
    var covered = geometry.blockCount
    if let map = options.selection {
      try map.geometry.check(matches: geometry, "the map", source.name)
      coverage = .map(id: map.mapID)
      covered = map.bits.population
    }
    let header = StreamFormat.Header(
      geometry: geometry, baseStreamID: options.baseStreamID, started: started, coverage: coverage,
      coveredBlocks: covered, compression: options.compress ? .lz4 : .none, sourceName: source.name)
    let index = options.have
    if let index, index.blockSize != geometry.blockSize {
      throw ToolkitError(
        "the signatures of what the receiver holds are in blocks of \(index.blockSize), not the stream's \(geometry.blockSize)"
      )
    }
    let sources = index.map {
      StreamFormat.Sources(digestName: $0.digestName, digestLength: $0.digestLength, images: $0.images)
    }
    let version = index == nil ? StreamFormat.version : StreamFormat.referencesVersion
    let digestLength = index?.digestLength ?? 0
    let longestRun = StreamFormat.maximumReferenceRun(blockSize: geometry.blockSize)
    let algorithm = try index.map { try DigestAlgorithm(named: $0.digestName) }

    let reader = ChunkReader(
      source: source, geometry: geometry, chunkBytes: max(8 << 20, Int(geometry.blockSize)),
      depth: geometry.blockSize >= 16 << 20 ? 4 : 5, selection: options.selection?.bits)
    defer { reader.cancel() }
    let perChunk = reader.blocksPerChunk
    let blockSize = Int(geometry.blockSize)
    let bound = Int(LZ4_compressBound(Int32(blockSize)))
    let workers = max(1, min(options.workers, perChunk))
    // Several slices a worker, so that a slice of incompressible blocks
    // does not leave one core idle while the other compresses text.
    let slices = workers == 1 ? 1 : min(perChunk, workers * 4)
    let states = (0..<slices).map { _ in AlignedBuffer(count: Int(LZ4_sizeofState()), alignment: 16) }
    let digesters = algorithm.map { a in (0..<slices).map { _ in Digester(a) } } ?? []
    let zeros = AlignedBuffer(count: blockSize)
    zeros.buffer.initializeMemory(as: UInt8.self, repeating: 0)
    if let lineage = options.lineage {
      // The parser's own checks, so that no stream is written that a reader refuses.
      if header.isIncremental {
        throw ToolkitError(
          "a stream on top of stream \(header.baseStreamID) cannot carry a lineage; only a full stream can")
      }
      let body = StreamFormat.lineageBody(lineage)
      try body.withUnsafeBytes { _ = try StreamFormat.decodeLineage($0, header: header) }
    }
    if let generation = options.generation {
      try StreamFormat.generationBody(generation).withUnsafeBytes { _ = try StreamFormat.decodeGeneration($0) }
    }
    let framer = try RecordFramer(
      header: header, lineage: options.lineage, generation: options.generation, sources: sources, index: index,
      version: version, sink: sink,
      encryption: try options.encryption.map { try StreamCrypto.seal($0, version: version) })

    // The writer stage runs on its own thread, one chunk behind the
    // compression stage, and hands each framed chunk to a hashing thread
    // that keeps the stream's SHA-256 while the chunk is being written.
    // Three encoded chunks circulate between the stages.
    let encoded = (0..<3).map { _ in
      EncodedChunk(blocks: perChunk, bound: bound, digestLength: digestLength, longestRun: longestRun)
    }
    let toWriter = Handoff<EncodedChunk?>()
    let toHasher = Handoff<EncodedChunk?>()
    let backToCompressor = Handoff<EncodedChunk?>()
    for e in encoded { backToCompressor.put(e) }
    let writerDone = DispatchSemaphore(value: 0)
    let hasherDone = DispatchSemaphore(value: 0)
    let writerError = ErrorBox()
    let meter = ProgressMeter(label: "snapshot", total: source.size, enabled: options.progress)
    startThread {
      while let item = toHasher.take(), let e = item {
        if framer.cipher == nil { framer.hash(e) }
        e.hashed.signal()
      }
      hasherDone.signal()
    }
    startThread {
      while let item = toWriter.take(), let e = item {
        if writerError.error == nil, let chunk = e.chunk {
          framer.frame(chunk, e, geometry: geometry, blockSize: blockSize, bound: bound)
          toHasher.put(e)
          do {
            try framer.write(e)
          } catch {
            writerError.set(error)
          }
          e.hashed.wait()
          meter.update(framer.sourceBytes)
        }
        e.chunk = nil
        reader.release()
        backToCompressor.put(e)
      }
      toHasher.put(nil)
      hasherDone.wait()
      writerDone.signal()
    }

    var readError: Error?
    do {
      while writerError.error == nil, let chunk = try reader.nextRetained() {
        guard let slot = backToCompressor.take(), let e = slot else { break }
        e.chunk = chunk
        let shared = Unchecked((chunk, e, states, zeros, digesters, index))
        let compress = options.compress
        let work: @Sendable (Int) -> Void = { w in
          let (chunk, e, states, zeros, digesters, index) = shared.value
          let from = chunk.blockCount * w / slices
          let to = chunk.blockCount * (w + 1) / slices
          for i in from..<to {
            if chunk.isSkipped[i] {
              e.kinds[i] = .skipped
              continue
            }
            if chunk.isHole[i] {
              e.kinds[i] = .zero
              continue
            }
            let length = geometry.length(ofBlock: chunk.firstBlock + UInt64(i))
            let src = chunk.bytes.baseAddress! + i * blockSize
            if memcmp(src, zeros.pointer, length) == 0 {
              e.kinds[i] = .zero
              continue
            }
            if let index {
              let digest = e.digests.pointer + i * digestLength
              digesters[w].digest(UnsafeRawBufferPointer(start: src, count: length), into: digest)
              let found = index.candidates(digest)
              e.candidates[i] = found
              if !found.isEmpty {
                e.kinds[i] = .reference
                continue
              }
            }
            e.kinds[i] = .raw
            if compress {
              let out = e.compressed.pointer + i * bound
              let n = LZ4_compress_fast_extState(
                states[w].pointer, src.assumingMemoryBound(to: CChar.self), out.assumingMemoryBound(to: CChar.self),
                Int32(length), Int32(bound), 1)
              if n > 0 && Int(n) < length {
                e.kinds[i] = .lz4
                e.lengths[i] = n
              }
            }
          }
        }
        if slices == 1 { work(0) } else { DispatchQueue.concurrentPerform(iterations: slices, execute: work) }
        toWriter.put(e)
      }
    } catch {
      readError = error
    }
    toWriter.put(nil)
    writerDone.wait()
    if let readError { throw readError }
    if let error = writerError.error { throw error }

    try framer.finish()
    meter.finish(framer.sourceBytes)
    var summary = Summary(header: header)
    summary.dataBlocks = framer.dataBlocks
    summary.compressedBlocks = framer.compressedBlocks
    summary.zeroBlocks = framer.zeroBlocks
    summary.referencedBlocks = framer.referencedBlocks
    summary.referenceRecords = framer.referenceRecords
    summary.referencedBytes = framer.referencedBytes
    summary.bytesIn = framer.blockBytes
    summary.bytesOut = sink.bytesWritten
    summary.seconds = started.secondsAgo
    return summary
  }
}

/// The writer stage: numbers the records, frames them (CRC-32C) into the
/// chunk's own buffers, and writes them with writev straight from the chunk
/// and the compressed buffers; `hash` keeps the stream's SHA-256 over the
/// same vectors, in order, on another thread.
// @unchecked Sendable: used by the writer stage's one thread; `hash` by one other, ordered by semaphores.
final class RecordFramer: @unchecked Sendable {
  /// Bytes kept per record after its body: a GCM tag and a CRC-32C.
  static let trailerStride = StreamCrypto.tagLength + StreamFormat.recordTrailerLength
  let sink: OutputSink
  /// Seals the records after the CRYPTO record of an encrypted stream.
  let cipher: RecordCipher?
  /// Bytes a record's body has after its plaintext: the tag, when encrypted.
  let tagLength: Int
  let digest = Digester(DigestAlgorithm.sha256)
  var sequence: UInt64 = 0
  var zeroRunStart: UInt64 = 0
  var zeroRunCount: UInt64 = 0
  var dataBlocks: UInt64 = 0
  var compressedBlocks: UInt64 = 0
  var zeroBlocks: UInt64 = 0
  var blockBytes: UInt64 = 0
  var referencedBlocks: UInt64 = 0
  var referenceRecords: UInt64 = 0
  var referencedBytes: UInt64 = 0
  /// Bytes of the source the framed chunks span, for progress.
  var sourceBytes: UInt64 = 0
  let geometry: BlockGeometry
  let version: UInt16
  /// Room for the last zero or reference run, framed after the last chunk.
  let tail: SnapshotWriter.EncodedChunk
  // The reference run pending: its first block, length, image, the image's
  // next block, and its digests so far.
  let index: SignatureIndex?
  let digestLength: Int
  let longestRun: Int
  var runFirst: UInt64 = 0
  var runCount = 0
  var runImage = 0
  var runSource: UInt64 = 0
  let runDigests: AlignedBuffer

  init(
    header: StreamFormat.Header, lineage: StreamFormat.Lineage? = nil, generation: StreamFormat.Generation? = nil,
    sources: StreamFormat.Sources? = nil, index: SignatureIndex? = nil, version: UInt16 = StreamFormat.version,
    sink: OutputSink,
    encryption: (cryptoBody: [UInt8], cipher: RecordCipher)? = nil
  ) throws {
    self.sink = sink
    self.index = index
    self.version = version
    geometry = header.geometry
    digestLength = index?.digestLength ?? 0
    longestRun = StreamFormat.maximumReferenceRun(blockSize: header.geometry.blockSize)
    runDigests = AlignedBuffer(count: index == nil ? 0 : longestRun * digestLength)
    tail = SnapshotWriter.EncodedChunk(blocks: 1, bound: 0, digestLength: digestLength, longestRun: longestRun)
    cipher = encryption?.cipher
    tagLength = encryption == nil ? 0 : StreamCrypto.tagLength
    let head = StreamFormat.head(
      header, lineage: lineage, sources: sources, generation: generation, version: version, encryption: encryption)
    for record in head.records { try emit(record) }
    sequence = head.nextSequence
  }

  /// Seals a record whose 16 framing bytes and first 16 body bytes are at
  /// `frame` and whose payload (if any) goes from `payload` to `sealed`;
  /// writes the tag and the CRC-32C at `trailer` and returns the trailer's
  /// length. Without a cipher, only the CRC.
  @inline(__always)
  private func seal(
    frame: UnsafeMutableRawPointer, payload: UnsafeRawPointer?, sealed: UnsafeMutableRawPointer?, payloadLength: Int,
    trailer: UnsafeMutableRawPointer
  ) -> Int {
    guard let cipher else {
      var crc = dr_crc32c(0, frame, 32)
      if let payload { crc = dr_crc32c(crc, payload, payloadLength) }
      trailer.storeBytes(of: crc.littleEndian, as: UInt32.self)
      return StreamFormat.recordTrailerLength
    }
    cipher.begin(framing: frame)
    cipher.update(frame + 16, frame + 16, count: 16)
    var crc = dr_crc32c(0, frame, 32)
    if let payload, let sealed {
      cipher.update(payload, sealed, count: payloadLength)
      crc = dr_crc32c(crc, sealed, payloadLength)
    }
    cipher.seal(tag: trailer)
    crc = dr_crc32c(crc, trailer, StreamCrypto.tagLength)
    (trailer + StreamCrypto.tagLength).storeBytes(of: crc.littleEndian, as: UInt32.self)
    return RecordFramer.trailerStride
  }

  private func emit(_ bytes: [UInt8]) throws {
    digest.update(bytes)
    try sink.write(bytes)
  }

  /// Appends a ZERO record for the pending run to `e`.
  private func frameZeroRun(_ e: SnapshotWriter.EncodedChunk) {
    guard zeroRunCount > 0 else { return }
    let frame = e.frames.pointer + e.frameCount * 32
    StreamFormat.storeRecordHeader(frame, type: .zero, bodyLength: 16 + tagLength, sequence: sequence)
    (frame + 16).storeBytes(of: zeroRunStart.littleEndian, as: UInt64.self)
    (frame + 24).storeBytes(of: zeroRunCount.littleEndian, as: UInt64.self)
    let trailer = e.crcs.pointer + e.frameCount * RecordFramer.trailerStride
    let trailerLength = seal(frame: frame, payload: nil, sealed: nil, payloadLength: 0, trailer: trailer)
    e.vectors[e.vectorCount] = iovec(iov_base: frame, iov_len: 32)
    e.vectors[e.vectorCount + 1] = iovec(iov_base: trailer, iov_len: trailerLength)
    e.vectorCount += 2
    e.frameCount += 1
    sequence += 1
    zeroBlocks += zeroRunCount
    blockBytes += geometry.byteRange(blocks: zeroRunStart, count: zeroRunCount).length
    zeroRunCount = 0
  }

  /// Appends a REFERENCE record for the pending run to `e`.
  private func frameReferenceRun(_ e: SnapshotWriter.EncodedChunk) {
    guard runCount > 0 else { return }
    let frame = e.frames.pointer + e.frameCount * 32
    let bodyLength = StreamFormat.referenceFixedLength + runCount * digestLength
    StreamFormat.storeRecordHeader(frame, type: .reference, bodyLength: bodyLength + tagLength, sequence: sequence)
    StreamFormat.storeReferenceFields(
      frame + 16, first: runFirst, count: runCount, image: runImage, sourceFirst: runSource - UInt64(runCount))
    // The body past its first 16 bytes: the source block, then the digests.
    let payload = e.references.pointer + e.referencesUsed
    payload.storeBytes(of: (runSource - UInt64(runCount)).littleEndian, as: UInt64.self)
    (payload + 8).copyMemory(from: runDigests.pointer, byteCount: runCount * digestLength)
    let payloadLength = bodyLength - 16
    e.referencesUsed += (payloadLength + 63) & ~63
    let trailer = e.crcs.pointer + e.frameCount * RecordFramer.trailerStride
    let trailerLength = seal(
      frame: frame, payload: payload, sealed: payload, payloadLength: payloadLength, trailer: trailer)
    e.vectors[e.vectorCount] = iovec(iov_base: frame, iov_len: 32)
    e.vectors[e.vectorCount + 1] = iovec(iov_base: payload, iov_len: payloadLength)
    e.vectors[e.vectorCount + 2] = iovec(iov_base: trailer, iov_len: trailerLength)
    e.vectorCount += 3
    e.frameCount += 1
    sequence += 1
    referencedBlocks += UInt64(runCount)
    referenceRecords += 1
    let bytes = geometry.byteRange(blocks: runFirst, count: UInt64(runCount)).length
    referencedBytes += bytes
    blockBytes += bytes
    runCount = 0
  }

  /// Adds `block`, whose content the index may hold at `candidates`, to the
  /// pending reference run, or ends that run and starts another.
  private func reference(
    _ block: UInt64, digest: UnsafeRawPointer, candidates: Range<Int>, _ e: SnapshotWriter.EncodedChunk
  ) {
    guard let index else { return }
    // The run goes on where the next block's content is at the image's next block.
    let continues =
      runCount > 0 && runCount < longestRun && runFirst + UInt64(runCount) == block
      && candidates.contains { index.location(at: $0) == SignatureIndex.Location(image: runImage, block: runSource) }
    if !continues {
      frameReferenceRun(e)
      // A new run: at the block's own place if the content is there (an
      // unchanged block), else at the first place that holds it.
      let own = candidates.first { index.location(at: $0).block == block } ?? candidates.lowerBound
      let start = index.location(at: own)
      runFirst = block
      runImage = start.image
      runSource = start.block
    }
    (runDigests.pointer + runCount * digestLength).copyMemory(from: digest, byteCount: digestLength)
    runCount += 1
    runSource += 1
  }

  func frame(
    _ chunk: ChunkReader.Chunk, _ e: SnapshotWriter.EncodedChunk, geometry: BlockGeometry, blockSize: Int, bound: Int
  ) {
    e.frameCount = 0
    e.vectorCount = 0
    e.referencesUsed = 0
    for i in 0..<chunk.blockCount {
      let block = chunk.firstBlock + UInt64(i)
      if e.kinds[i] == .reference {
        frameZeroRun(e)
        reference(block, digest: e.digests.pointer + i * digestLength, candidates: e.candidates[i], e)
        continue
      }
      frameReferenceRun(e)
      switch e.kinds[i] {
      case .skipped, .reference:
        frameZeroRun(e)
      case .zero:
        if zeroRunCount > 0 && zeroRunStart + zeroRunCount == block {
          zeroRunCount += 1
        } else {
          frameZeroRun(e)
          zeroRunStart = block
          zeroRunCount = 1
        }
      case .raw, .lz4:
        frameZeroRun(e)
        let length = geometry.length(ofBlock: block)
        let isLZ4 = e.kinds[i] == .lz4
        let slot = e.compressed.pointer + i * bound
        let payload = isLZ4 ? UnsafeRawPointer(slot) : chunk.bytes.baseAddress! + i * blockSize
        let payloadLength = isLZ4 ? Int(e.lengths[i]) : length
        let frame = e.frames.pointer + e.frameCount * 32
        StreamFormat.storeRecordHeader(
          frame, type: .data, bodyLength: 16 + payloadLength + tagLength, sequence: sequence)
        StreamFormat.storeDataFields(frame + 16, block: block, length: length, encoding: isLZ4 ? .lz4 : .raw)
        let trailer = e.crcs.pointer + e.frameCount * RecordFramer.trailerStride
        // Sealed into the block's own slot of the compressed buffer, which
        // holds at least a block (LZ4's bound): in place for LZ4 payloads.
        let trailerLength = seal(
          frame: frame, payload: payload, sealed: slot, payloadLength: payloadLength, trailer: trailer)
        let written = cipher == nil ? payload : UnsafeRawPointer(slot)
        e.vectors[e.vectorCount] = iovec(iov_base: frame, iov_len: 32)
        e.vectors[e.vectorCount + 1] = iovec(
          iov_base: UnsafeMutableRawPointer(mutating: written), iov_len: payloadLength)
        e.vectors[e.vectorCount + 2] = iovec(iov_base: trailer, iov_len: trailerLength)
        e.vectorCount += 3
        e.frameCount += 1
        sequence += 1
        dataBlocks += 1
        if isLZ4 { compressedBlocks += 1 }
        blockBytes += UInt64(length)
      }
    }
    sourceBytes += UInt64(chunk.length)
  }

  /// Writes the vectors framed for `e`.
  func write(_ e: SnapshotWriter.EncodedChunk) throws {
    guard e.vectorCount > 0 else { return }
    for i in 0..<e.vectorCount { e.writeVectors[i] = e.vectors[i] }
    try sink.write(vectors: UnsafeMutableBufferPointer(rebasing: e.writeVectors[0..<e.vectorCount]))
  }

  /// Adds the vectors framed for `e` to the stream's digest.
  func hash(_ e: SnapshotWriter.EncodedChunk) {
    for i in 0..<e.vectorCount {
      digest.update(UnsafeRawBufferPointer(start: e.vectors[i].iov_base, count: e.vectors[i].iov_len))
    }
  }

  /// The last zero run and the END record, once the threads are done.
  func finish() throws {
    tail.frameCount = 0
    tail.vectorCount = 0
    tail.referencesUsed = 0
    frameReferenceRun(tail)
    frameZeroRun(tail)
    hash(tail)
    try write(tail)
    // An encrypted stream's END carries no digest: the tags take its place.
    let end = StreamFormat.End(
      dataBlocks: dataBlocks, zeroBlocks: zeroBlocks, bytes: blockBytes, records: sequence,
      digest: cipher == nil ? digest.finish() : [UInt8](repeating: 0, count: 32), referencedBlocks: referencedBlocks)
    try sink.write(StreamFormat.endRecord(end, version: version, cipher: cipher))
  }
}

extension StreamFormat {
  /// The records a stream starts with, in order: the preamble, the CRYPTO
  /// record of an encrypted stream, the HEADER, and the LINEAGE, SOURCES and
  /// GENERATION records a stream has (sealed when encrypted); and the
  /// sequence number of the record after them.
  static func head(
    _ header: Header, lineage: Lineage?, sources: Sources? = nil, generation: Generation? = nil,
    version: UInt16 = StreamFormat.version,
    encryption: (cryptoBody: [UInt8], cipher: RecordCipher)?
  ) -> (records: [[UInt8]], nextSequence: UInt64) {
    var records: [[UInt8]] = []
    var sequence: UInt64 = 0
    func add(_ type: RecordType, _ body: [UInt8]) {
      records.append(
        encryption.map { $0.cipher.sealedRecord(type, sequence: sequence, body: body) }
          ?? record(type, sequence: sequence, body: body))
      sequence += 1
    }
    if let encryption {
      records.append(preamble(flags: encryptedFlag, version: version))
      records.append(record(.crypto, sequence: sequence, body: encryption.cryptoBody))
      sequence += 1
    } else {
      records.append(preamble(version: version))
    }
    add(.header, headerBody(header))
    if let lineage { add(.lineage, lineageBody(lineage)) }
    if let sources { add(.sources, sourcesBody(sources)) }
    if let generation { add(.generation, generationBody(generation)) }
    return (records, sequence)
  }

  /// The END record that closes a stream, sealed when it is encrypted.
  static func endRecord(_ end: End, version: UInt16 = StreamFormat.version, cipher: RecordCipher?) -> [UInt8] {
    let body = endBody(end, version: version)
    return cipher?.sealedRecord(.end, sequence: end.records, body: body)
      ?? record(.end, sequence: end.records, body: body)
  }
}
