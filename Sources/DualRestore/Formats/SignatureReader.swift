// Reads a signature front to back from a file or a pipe, keeping a running
// SHA-256, so that memory stays bounded whatever the device size. The caller
// asks for digests in block order and calls `finish()`, which checks the
// closing checksum, before it trusts anything it compared.

import Glibc

/// A growable read buffer over a stream descriptor, or over bytes already
/// in memory (handed over as reads of a pipe would be, without a descriptor).
final class InputBuffer {
  let fd: Int32
  let name: String
  var bytes: [UInt8]
  var start = 0
  var end = 0
  /// In memory: the bytes, and how many of them were handed over.
  private let source: [UInt8]?
  private var sourceOffset = 0

  init(fd: Int32, name: String, capacity: Int = 1 << 20) {
    self.fd = fd
    self.name = name
    bytes = [UInt8](repeating: 0, count: capacity)
    source = nil
  }

  init(bytes source: [UInt8], name: String, capacity: Int) {
    fd = -1
    self.name = name
    bytes = [UInt8](repeating: 0, count: max(capacity, 1))
    self.source = source
  }

  var available: Int { end - start }

  /// Reads more input after `end`; returns the bytes added (0 at end of input).
  func fill() throws -> Int {
    if start > 0 && start == end {
      start = 0
      end = 0
    } else if start > 0 && end == bytes.count {
      let live = end - start
      let from = start
      bytes.withUnsafeMutableBytes { raw in
        guard let base = raw.baseAddress else { return }
        base.copyMemory(from: base + from, byteCount: live)
      }
      start = 0
      end = live
    }
    if end == bytes.count { bytes.append(contentsOf: repeatElement(0, count: bytes.count)) }
    let at = end
    if let source {
      let n = min(bytes.count - at, source.count - sourceOffset)
      if n > 0 {
        let from = sourceOffset
        bytes.withUnsafeMutableBytes { raw in
          source.withUnsafeBytes {
            raw.baseAddress!.advanced(by: at).copyMemory(from: $0.baseAddress! + from, byteCount: n)
          }
        }
      }
      sourceOffset += n
      end += n
      return n
    }
    let result = bytes.withUnsafeMutableBytes { raw in
      Sys.read(fd, raw.baseAddress! + at, raw.count - at)
    }
    switch result {
    case .success(let n):
      end += n
      return n
    case .failure(let e): throw ToolkitError.path(name, e.description)
    }
  }
}

public final class SignatureReader {
  public let header: SignatureFormat.Header
  public let name: String
  private let input: InputBuffer
  private let ownsFD: Bool
  private let checksum = Digester(DigestAlgorithm.sha256)
  private var digestsRead: UInt64 = 0
  var entriesRead: UInt64 { digestsRead }

  /// Opens `path` (or standard input for `-`) and parses the header.
  public convenience init(path: String) throws {
    let name = path == "-" ? "standard input" : path
    if path == "-" {
      try self.init(input: InputBuffer(fd: 0, name: name), ownsFD: false)
      return
    }
    switch Sys.open(path, flags: O_RDONLY) {
    case .success(let fd): try self.init(input: InputBuffer(fd: fd, name: name), ownsFD: true)
    case .failure(let e): throw ToolkitError.path(path, e.description)
    }
  }

  /// Reads `bytes` as if from a pipe, through a buffer of `bufferSize`
  /// bytes to begin with (it grows as a long header needs).
  package convenience init(bytes: [UInt8], name: String, bufferSize: Int = 1 << 20) throws {
    try self.init(input: InputBuffer(bytes: bytes, name: name, capacity: bufferSize), ownsFD: false)
  }

  /// Parses the header from `input`; closes its descriptor on failure when `ownsFD`.
  private init(input: InputBuffer, ownsFD: Bool) throws {
    name = input.name
    self.ownsFD = ownsFD
    self.input = input
    var parsed: (SignatureFormat.Header, Int)?
    do {
      while true {
        let got = try input.fill()
        parsed = try SignatureFormat.decodeHeader(input.bytes[0..<input.end], name: name)
        if parsed != nil { break }
        if got == 0 {
          throw ToolkitError.path(name, input.end == 0 ? "empty input, not a signature" : "truncated signature header")
        }
      }
    } catch {
      if ownsFD { Sys.close(input.fd) }
      throw error
    }
    guard let (header, digestsStart) = parsed else { throw ToolkitError.path(name, "truncated signature header") }
    self.header = header
    input.bytes.withUnsafeBytes { checksum.update(UnsafeRawBufferPointer(rebasing: $0[0..<digestsStart])) }
    input.start = digestsStart
  }

  deinit { if ownsFD { Sys.close(input.fd) } }

  /// Copies the digests of the next `count` blocks into `output`.
  public func readDigests(count: Int, into output: UnsafeMutableRawPointer) throws {
    let needed = count * header.digestLength
    guard digestsRead + UInt64(count) <= header.geometry.blockCount else {
      throw ToolkitError.path(name, "asked for digests past the last block")
    }
    var copied = 0
    while copied < needed {
      if input.available == 0, try input.fill() == 0 {
        throw ToolkitError.path(
          name, "truncated signature: digests end at block \(digestsRead + UInt64(copied / header.digestLength))")
      }
      let n = min(needed - copied, input.available)
      let from = input.start
      input.bytes.withUnsafeBytes { raw in
        let part = UnsafeRawBufferPointer(rebasing: raw[from..<from + n])
        (output + copied).copyMemory(from: part.baseAddress!, byteCount: n)
        checksum.update(part)
      }
      input.start += n
      copied += n
    }
    digestsRead += UInt64(count)
  }

  /// Reads the closing checksum and checks it; also checks nothing follows.
  public func finish() throws {
    if digestsRead < header.geometry.blockCount {
      var scratch = [UInt8](repeating: 0, count: header.digestLength * 1024)
      while digestsRead < header.geometry.blockCount {
        let n = Int(min(1024, header.geometry.blockCount - digestsRead))
        try scratch.withUnsafeMutableBytes { try readDigests(count: n, into: $0.baseAddress!) }
      }
    }
    while input.available < 33, try input.fill() > 0 {}
    guard input.available >= 32 else {
      throw ToolkitError.path(name, "truncated signature: the closing checksum is missing")
    }
    let expected = checksum.finish()
    guard Array(input.bytes[input.start..<input.start + 32]) == expected else {
      throw ToolkitError.path(name, "checksum mismatch: the signature is damaged")
    }
    guard input.available == 32 else {
      throw ToolkitError.path(name, "unexpected data after the closing checksum")
    }
  }
}
