// Writes a signature of a source: the header, one digest per block in block
// order, and the closing checksum. To a file it is saved atomically; to a
// pipe it streams, and a reader detects a cut-off stream by its missing
// checksum.

public enum Signer {
  public struct Summary: Sendable {
    public var header: SignatureFormat.Header
    public var bytesRead: UInt64
  }

  public static func sign(
    _ source: BlockDevice, algorithm: DigestAlgorithm, blockSize: UInt32, to target: OutputTarget,
    progress: Bool, workers: Int = BlockHasher.defaultWorkers
  ) throws -> Summary {
    let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: source.size)
    let header = SignatureFormat.Header(
      geometry: geometry, digestName: algorithm.name, digestLength: algorithm.length,
      sourceName: source.name)
    let sink = try OutputSink(target, what: "signature")
    defer { sink.abandon() }
    let checksum = Digester(DigestAlgorithm.sha256)
    let headerBytes = SignatureFormat.encodeHeader(header)
    checksum.update(headerBytes)
    try sink.write(headerBytes)

    let reader = ChunkReader(source: source, geometry: geometry, chunkBytes: Comparison.chunkBytes)
    defer { reader.cancel() }
    let hasher = BlockHasher(algorithm: algorithm, geometry: geometry, workers: workers)
    let digests = AlignedBuffer(count: reader.blocksPerChunk * algorithm.length)
    let meter = ProgressMeter(label: "hashing", total: source.size, enabled: progress)
    var done: UInt64 = 0
    while let chunk = try reader.next() {
      hasher.hash(chunk, into: digests.pointer)
      let part = UnsafeRawBufferPointer(digests.slice(0, chunk.blockCount * algorithm.length))
      checksum.update(part)
      try sink.write(part)
      done += UInt64(chunk.length)
      meter.update(done)
    }
    try sink.write(checksum.finish())
    try sink.finish()
    meter.finish(done)
    return Summary(header: header, bytesRead: done)
  }
}
