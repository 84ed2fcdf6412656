// Writes a signature of a source: the header, one digest per block in block
// order, and the closing checksum. To a file it is saved atomically; to a
// pipe it streams, and a reader detects a cut-off stream by its missing
// checksum.

import CShim
import Glibc

public enum Signer {
  public struct Summary: Sendable {
    public var header: SignatureFormat.Header
    public var bytesRead: UInt64
  }

  public static func sign(
    _ source: BlockSource, algorithm: DigestAlgorithm, blockSize: UInt32, to target: OutputTarget,
    progress: Bool, workers: Int = BlockHasher.defaultWorkers
  ) throws -> Summary {
    let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: source.size)
    let header = SignatureFormat.Header(
      geometry: geometry, digestName: algorithm.name, digestLength: algorithm.length,
      sourceName: source.name)
    let sink = try SignatureSink(target)
    defer { sink.abandon() }
    let headerBytes = SignatureFormat.encodeHeader(header)
    try headerBytes.withUnsafeBytes { try sink.write($0) }

    let reader = ChunkReader(source: source, geometry: geometry, chunkBytes: Comparison.chunkBytes)
    defer { reader.cancel() }
    let hasher = BlockHasher(algorithm: algorithm, geometry: geometry, workers: workers)
    let digests = AlignedBuffer(count: reader.blocksPerChunk * algorithm.length)
    let meter = ProgressMeter(label: "hashing", total: source.size, enabled: progress)
    var done: UInt64 = 0
    while let chunk = try reader.next() {
      hasher.hash(chunk, into: digests.pointer)
      try sink.write(UnsafeRawBufferPointer(digests.slice(0, chunk.blockCount * algorithm.length)))
      done += UInt64(chunk.length)
      meter.update(done)
    }
    try sink.finish()
    meter.finish(done)
    return Summary(header: header, bytesRead: done)
  }
}

/// Streams bytes to stdout or to a temporary file renamed into place at the
/// end, appending the SHA-256 of everything written.
final class SignatureSink {
  private let target: OutputTarget
  private let fd: Int32
  private var tempPath: String?
  private let checksum = Digester(DigestAlgorithm.sha256)
  private var done = false

  init(_ target: OutputTarget) throws {
    self.target = target
    switch target {
    case .standardOutput:
      try target.refuseTerminal(for: "signature")
      fd = 1
    case .file(let path):
      let (directory, base) = splitPath(path)
      var template = Array("\(directory)/.\(base).XXXXXX".utf8CString)
      let d = template.withUnsafeMutableBufferPointer { dr_mkostemp($0.baseAddress!, O_CLOEXEC) }
      guard d >= 0 else { throw ToolkitError.path(path, "cannot create a temporary file: \(Errno.current)") }
      fd = d
      tempPath = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
      let mask = umask(0)
      umask(mask)
      fchmod(fd, 0o644 & ~mask)
    }
  }

  func write(_ bytes: UnsafeRawBufferPointer) throws {
    checksum.update(bytes)
    guard let base = bytes.baseAddress, bytes.count > 0 else { return }
    if case .failure(let e) = writeFull(fd, base, bytes.count) {
      throw ToolkitError("\(target.name): \(e)")
    }
  }

  func finish() throws {
    let sum = checksum.finish()
    try sum.withUnsafeBytes { raw in
      if case .failure(let e) = writeFull(fd, raw.baseAddress!, raw.count) {
        throw ToolkitError("\(target.name): \(e)")
      }
    }
    if case .file(let path) = target, let tempPath {
      if case .failure(let e) = Sys.fsync(fd) { throw ToolkitError.path(path, "cannot make the file durable: \(e)") }
      Sys.close(fd)
      guard rename(tempPath, path) == 0 else {
        throw ToolkitError.path(path, "cannot replace the file: \(Errno.current)")
      }
      self.tempPath = nil
      let (directory, _) = splitPath(path)
      let dfd = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
      if dfd >= 0 {
        _ = Sys.fsync(dfd)
        Sys.close(dfd)
      }
    }
    done = true
  }

  /// Removes the temporary file of an unfinished signature.
  func abandon() {
    guard !done, let tempPath else { return }
    Sys.close(fd)
    unlink(tempPath)
    self.tempPath = nil
  }
}
