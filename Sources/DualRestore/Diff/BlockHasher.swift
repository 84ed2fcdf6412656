// Hashes the blocks of a chunk on every core: each worker owns a Digester and
// a contiguous share of the blocks, and writes into its own part of the
// output, so nothing is shared but the read-only chunk.

import Dispatch
import Glibc

// @unchecked Sendable: immutable after init; worker `w` alone uses `digesters[w]`.
public final class BlockHasher: @unchecked Sendable {
  public let algorithm: DigestAlgorithm
  public let geometry: BlockGeometry
  private let digesters: [Digester]
  /// The digest of a whole block of zeros, for blocks in holes.
  private let zeroDigest: [UInt8]
  private let zeroBlock: AlignedBuffer

  public init(algorithm: DigestAlgorithm, geometry: BlockGeometry, workers: Int = BlockHasher.defaultWorkers) {
    self.algorithm = algorithm
    self.geometry = geometry
    digesters = (0..<max(1, workers)).map { _ in Digester(algorithm) }
    zeroBlock = AlignedBuffer(count: Int(geometry.blockSize))
    zeroBlock.buffer.initializeMemory(as: UInt8.self, repeating: 0)
    let d = Digester(algorithm)
    d.update(UnsafeRawBufferPointer(zeroBlock.buffer))
    zeroDigest = d.finish()
  }

  public static var defaultWorkers: Int {
    min(8, max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
  }

  /// Writes one digest per block of `chunk` to `output`, block order:
  /// the digest of block `firstBlock + i` at `output + i × length`. Blocks
  /// the chunk skipped (outside its reader's selection) are not hashed;
  /// their places in `output` are left as they were.
  public func hash(_ chunk: ChunkReader.Chunk, into output: UnsafeMutableRawPointer) {
    let length = algorithm.length
    let workers = min(digesters.count, chunk.blockCount)
    let shared = Unchecked((chunk, output))
    let work: @Sendable (Int) -> Void = { w in
      let (chunk, output) = shared.value
      let digester = self.digesters[w]
      let from = chunk.blockCount * w / workers
      let to = chunk.blockCount * (w + 1) / workers
      for i in from..<to where !chunk.isSkipped[i] {
        let block = chunk.firstBlock + UInt64(i)
        let blockLength = self.geometry.length(ofBlock: block)
        let out = output + i * length
        if chunk.isHole[i] {
          if blockLength == Int(self.geometry.blockSize) {
            self.zeroDigest.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: length) }
          } else {
            digester.digest(UnsafeRawBufferPointer(self.zeroBlock.slice(0, blockLength)), into: out)
          }
          continue
        }
        let start = i * Int(self.geometry.blockSize)
        digester.digest(UnsafeRawBufferPointer(rebasing: chunk.bytes[start..<start + blockLength]), into: out)
      }
    }
    if workers <= 1 {
      work(0)
    } else {
      DispatchQueue.concurrentPerform(iterations: workers, execute: work)
    }
  }
}
