// Reads a signature front to back from a file or a pipe, keeping a running
// SHA-256, so that memory stays bounded whatever the device size: a fixed
// buffer, and for a sparse signature its selection, one bit per block. The
// caller asks for the digests of the signed blocks in block order and calls
// `finish()`, which checks the closing checksum, before it trusts anything
// it compared.

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
  /// Digests read so far: of the first `digestsRead` signed blocks.
  private var digestsRead: UInt64 = 0
  /// Of a sparse signature: the block after the last one read.
  private var nextBlock: UInt64 = 0

  /// Whether the signature covers only the blocks its selection sets.
  public var isSparse: Bool { header.isSparse }
  /// The blocks a sparse signature covers; nil when it covers every block.
  public var selection: BlockBitmap? { header.selection }
  /// How many blocks the signature holds a digest of: the selected ones, or
  /// every block when it is dense.
  public var signedBlocks: UInt64 { header.signedBlocks }

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

  /// Parses the header, and the selection of a sparse signature, from
  /// `input`; closes its descriptor on failure when `ownsFD`.
  private init(input: InputBuffer, ownsFD: Bool) throws {
    name = input.name
    self.ownsFD = ownsFD
    self.input = input
    do {
      header = try Self.readHeader(input, checksum)
    } catch {
      if ownsFD { Sys.close(input.fd) }
      throw error
    }
  }

  private static func readHeader(_ input: InputBuffer, _ checksum: Digester) throws -> SignatureFormat.Header {
    let name = input.name
    func fail(_ why: String) -> ToolkitError { ToolkitError.path(name, why) }
    var parsed: SignatureFormat.Prelude?
    while true {
      let got = try input.fill()
      parsed = try SignatureFormat.decodePrelude(input.bytes[0..<input.end], name: name)
      if parsed != nil { break }
      if got == 0 { throw fail(input.end == 0 ? "empty input, not a signature" : "truncated signature header") }
    }
    guard let prelude = parsed else { throw fail("truncated signature header") }
    input.bytes.withUnsafeBytes { checksum.update(UnsafeRawBufferPointer(rebasing: $0[0..<prelude.length])) }
    input.start = prelude.length
    var header = prelude.header
    guard prelude.sparse else { return header }

    // The selection, decoded as it streams past: only a run cut off at the
    // end of the buffer is kept for the next fill.
    var decoder = RunsDecoder(count: header.geometry.blockCount)
    let selectionFail: (String) -> ToolkitError = { fail("selection: \($0)") }
    var remaining = prelude.selectionLength
    while remaining > 0 {
      let n = Int(min(UInt64(input.available), remaining))
      if n > 0 {
        let from = input.start
        let used = try decoder.decode(input.bytes[from..<from + n], final: UInt64(n) == remaining, fail: selectionFail)
        input.bytes.withUnsafeBytes { checksum.update(UnsafeRawBufferPointer(rebasing: $0[from..<from + used])) }
        input.start += used
        remaining -= UInt64(used)
      }
      if remaining > 0, try input.fill() == 0 {
        throw fail(
          "truncated signature: the selection ends at byte \(decoder.bytesDecoded) of \(prelude.selectionLength)")
      }
    }
    header.selection = try decoder.finish(fail: selectionFail)
    try SignatureFormat.checkDigestBytes(prelude.digestBytes, header, fail)
    return header
  }

  deinit { if ownsFD { Sys.close(input.fd) } }

  /// Copies the next `count` digests into `output`: those of the next
  /// `count` signed blocks, in block order (for a dense signature, of the
  /// next `count` blocks).
  public func readDigests(count: Int, into output: UnsafeMutableRawPointer) throws {
    guard count >= 0, digestsRead + UInt64(count) <= header.signedBlocks else {
      throw ToolkitError.path(name, "asked for digests past the last signed block")
    }
    try copyDigests(count, into: output)
    if let selection = header.selection {
      // Keep the block cursor of `readEntries` in step.
      for _ in 0..<count { nextBlock = (selection.nextSet(from: nextBlock) ?? selection.count) + 1 }
    }
  }

  /// Reads up to `max` signed blocks in block order: stores the block
  /// numbers in `blocks[i]` and digest i at `digests + i × digestLength`.
  /// Returns how many it read, 0 once every signed block was read. Works
  /// for dense and sparse signatures alike; `finish()` checks the closing
  /// checksum after.
  public func readEntries(max: Int, blocks: UnsafeMutablePointer<UInt64>, digests: UnsafeMutableRawPointer) throws
    -> Int
  {
    let n = Int(min(UInt64(Swift.max(max, 0)), header.signedBlocks - digestsRead))
    if n == 0 { return 0 }
    if let selection = header.selection {
      var block = nextBlock
      for i in 0..<n {
        // n never exceeds the selected blocks left, so one is always found.
        guard let found = selection.nextSet(from: block) else {
          throw ToolkitError.path(name, "the selection ends before its signed blocks")
        }
        blocks[i] = found
        block = found + 1
      }
      try copyDigests(n, into: digests)
      nextBlock = block
    } else {
      let first = digestsRead
      try copyDigests(n, into: digests)
      for i in 0..<n { blocks[i] = first + UInt64(i) }
    }
    return n
  }

  /// Copies the next `count` digests from the input, through the checksum.
  private func copyDigests(_ count: Int, into output: UnsafeMutableRawPointer) throws {
    let needed = count * header.digestLength
    var copied = 0
    while copied < needed {
      if input.available == 0, try input.fill() == 0 {
        throw ToolkitError.path(name, "truncated signature: digests end at \(truncationPoint(copied))")
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

  /// Where the digests of a cut signature end, for the sentence that says so.
  private func truncationPoint(_ copiedBytes: Int) -> String {
    let index = digestsRead + UInt64(copiedBytes / header.digestLength)
    if header.isSparse { return "signed block \(index) of \(header.signedBlocks)" }
    return "block \(index)"
  }

  /// Reads the closing checksum and checks it; also checks nothing follows.
  /// Digests not read yet are read (and checked) first.
  public func finish() throws {
    if digestsRead < header.signedBlocks {
      var scratch = [UInt8](repeating: 0, count: header.digestLength * 1024)
      while digestsRead < header.signedBlocks {
        let n = Int(min(1024, header.signedBlocks - digestsRead))
        try scratch.withUnsafeMutableBytes { try copyDigests(n, into: $0.baseAddress!) }
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
