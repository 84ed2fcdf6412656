// Writes a signature of a source: the header, one digest per block in block
// order, and the closing checksum; or, given a selection, a sparse
// signature: the header with the selection, and the digests of the
// selected blocks only, which alone are read. A sample (BlockSample) is
// drawn without reading the source, within the selection when both are
// given, and recorded in the header. To a file it is saved
// atomically; to a pipe it streams, and a reader detects a cut-off stream
// by its missing checksum.

public enum Signer {
  public struct Summary: Sendable {
    public var header: SignatureFormat.Header
    /// Bytes of the signed blocks (blocks in holes count, unread).
    public var bytesRead: UInt64
  }

  /// Signs `source`; with `selection` (one bit per block of `source` at
  /// `blockSize`), only the blocks it sets; with `sample`, only the blocks
  /// it selects (of those `selection` sets, when both are given).
  public static func sign(
    _ source: BlockDevice, algorithm: DigestAlgorithm, blockSize: UInt32, to target: OutputTarget,
    progress: Bool, workers: Int = BlockHasher.defaultWorkers, selection given: BlockBitmap? = nil,
    sample: BlockSample? = nil
  ) throws -> Summary {
    let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: source.size)
    if let given, given.count != geometry.blockCount {
      throw ToolkitError(
        "the selection has \(given.count) blocks but \(source.name) has \(geometry.blockCount) of \(blockSize) bytes"
      )
    }
    var selection = given
    if let sample {
      // Held as a bitmap, one bit per block: the limit of a map.
      try geometry.checkMappable()
      var drawn = sample.selection(blockCount: geometry.blockCount)
      if let given { drawn.formIntersection(given) }
      selection = drawn
    }
    let header = SignatureFormat.Header(
      geometry: geometry, digestName: algorithm.name, digestLength: algorithm.length,
      sourceName: source.name, selection: selection, sample: sample)
    let sink = try OutputSink(target, what: "signature")
    defer { sink.abandon() }
    let checksum = Digester(DigestAlgorithm.sha256)
    let headerBytes = SignatureFormat.encodeHeader(header)
    checksum.update(headerBytes)
    try sink.write(headerBytes)

    let reader = ChunkReader(
      source: source, geometry: geometry, chunkBytes: Comparison.chunkBytes, selection: selection)
    defer { reader.cancel() }
    let hasher = BlockHasher(algorithm: algorithm, geometry: geometry, workers: workers)
    let length = algorithm.length
    let digests = AlignedBuffer(count: reader.blocksPerChunk * length)
    let total = selection.map { selectedBytes($0, geometry) } ?? source.size
    let meter = ProgressMeter(label: "hashing", total: total, enabled: progress)
    var done: UInt64 = 0
    while let chunk = try reader.next() {
      hasher.hash(chunk, into: digests.pointer)
      var kept = chunk.blockCount
      if selection != nil {
        // Close up the digests of the selected blocks, in block order.
        kept = 0
        var bytes = 0
        for i in 0..<chunk.blockCount where !chunk.isSkipped[i] {
          if kept != i {
            (digests.pointer + kept * length).copyMemory(from: digests.pointer + i * length, byteCount: length)
          }
          kept += 1
          bytes += geometry.length(ofBlock: chunk.firstBlock + UInt64(i))
        }
        done += UInt64(bytes)
      } else {
        done += UInt64(chunk.length)
      }
      let part = UnsafeRawBufferPointer(digests.slice(0, kept * length))
      checksum.update(part)
      try sink.write(part)
      meter.update(done)
    }
    try sink.write(checksum.finish())
    try sink.finish()
    meter.finish(done)
    return Summary(header: header, bytesRead: done)
  }

  /// Bytes of the blocks `selection` sets, the partial last block short.
  static func selectedBytes(_ selection: BlockBitmap, _ geometry: BlockGeometry) -> UInt64 {
    let count = selection.population
    guard count > 0, selection[geometry.blockCount - 1] else { return count << geometry.blockShift }
    return (count - 1) << geometry.blockShift + UInt64(geometry.length(ofBlock: geometry.blockCount - 1))
  }
}
