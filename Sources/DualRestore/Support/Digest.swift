// Message digests through OpenSSL's EVP interface. An algorithm is fetched
// once; each thread that hashes owns one `Digester`, reused for every block,
// so the hot path allocates nothing.

import COpenSSL

/// A digest algorithm known to OpenSSL by name (`sha256`, `sha512`, `sha3-256`, …).
// @unchecked Sendable: immutable after init; an EVP_MD from the default provider is thread-safe for reads.
public final class DigestAlgorithm: @unchecked Sendable {
  // EVP_MD objects fetched from the default provider are immutable and
  // safe to share between threads.
  let md: OpaquePointer
  public let name: String
  public let length: Int

  public init(named name: String) throws {
    let lowered = name.lowercased()
    guard let md = EVP_MD_fetch(nil, lowered, nil) else {
      ERR_clear_error()
      throw ToolkitError("digest \(name) is not known to OpenSSL (try sha256, sha512, sha3-256 or blake2b512)")
    }
    let size = Int(EVP_MD_get_size(md))
    guard size > 0, size <= 64 else {
      EVP_MD_free(md)
      throw ToolkitError("digest \(name) has no fixed length of at most 64 bytes")
    }
    self.md = md
    self.name = lowered
    self.length = size
  }

  deinit { EVP_MD_free(md) }

  /// SHA-256, fetched once per process.
  public static let sha256: DigestAlgorithm = {
    // SHA-256 is in every OpenSSL build the toolkit supports.
    guard let algorithm = try? DigestAlgorithm(named: "sha256") else {
      fatalError("OpenSSL has no SHA-256")
    }
    return algorithm
  }()
}

/// A reusable digest context for one thread.
public final class Digester {
  private let ctx: OpaquePointer
  public let algorithm: DigestAlgorithm

  public init(_ algorithm: DigestAlgorithm) {
    guard let ctx = EVP_MD_CTX_new() else { fatalError("out of memory creating a digest context") }
    self.ctx = ctx
    self.algorithm = algorithm
    reset()
  }

  deinit { EVP_MD_CTX_free(ctx) }

  public func reset() {
    EVP_DigestInit_ex2(ctx, algorithm.md, nil)
  }

  public func update(_ buffer: UnsafeRawBufferPointer) {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    EVP_DigestUpdate(ctx, base, buffer.count)
  }

  public func update(_ bytes: some Collection<UInt8>) {
    if let done = bytes.withContiguousStorageIfAvailable({ update(UnsafeRawBufferPointer($0)) }) {
      return done
    }
    let copy = Array(bytes)
    copy.withUnsafeBytes { update($0) }
  }

  /// Writes the digest to `output` (at least `algorithm.length` bytes) and resets.
  public func finish(into output: UnsafeMutableRawPointer) {
    var length: UInt32 = 0
    EVP_DigestFinal_ex(ctx, output.assumingMemoryBound(to: UInt8.self), &length)
    reset()
  }

  public func finish() -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 64)
    out.withUnsafeMutableBytes { raw in
      if let base = raw.baseAddress { finish(into: base) }
    }
    return Array(out.prefix(algorithm.length))
  }

  /// One-shot digest of a buffer into `output`.
  public func digest(_ buffer: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer) {
    update(buffer)
    finish(into: output)
  }
}

/// SHA-256 of a byte collection: the checksum the map and signature formats use.
public func sha256(_ bytes: some Collection<UInt8>) -> [UInt8] {
  let d = Digester(DigestAlgorithm.sha256)
  d.update(bytes)
  return d.finish()
}
