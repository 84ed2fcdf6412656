// Entry points for the fuzz targets in fuzz/ (run by scripts/fuzz) and for
// the regression tests of what they find. Each takes bytes as a damaged
// file or a hostile peer would give them and runs the code a tool runs on
// them: it returns nil when the input was accepted, or the one sentence it
// was refused with. A trap, a sanitizer report or a hang is a bug. They live
// in a module of their own, which no tool links; the library's internals they
// use are `package`, not public.
//
// The `repair…` functions recompute what a mutated input gets wrong at once
// (record CRCs, the stream digest, a map's or signature's closing SHA-256),
// so that mutations also reach the checks behind them.

import CShim
import Dispatch
import DualRestore
import Glibc

public enum FuzzEntryPoints {
  // MARK: Block streams

  /// Reads `bytes` as `merge-snapshot --check` does: the stream reader (the
  /// parser, the CRCs, the tags of an encrypted stream, the digest check)
  /// and the merge in check mode, which decodes every LZ4 block. The reader
  /// takes the bytes from memory, hashing them on this thread: the same
  /// checks as on a pipe, without a reading thread per input. With `key`,
  /// the stream must be encrypted with it.
  public static func checkStream(_ bytes: [UInt8], key: [UInt8]? = nil) -> String? {
    do {
      let secret = try key.map { try FuzzKeys.shared.secret($0) }
      // A small buffer, so that records larger than it make the reader grow
      // it, filled in reads of odd sizes, so that records straddle them.
      let reader = StreamReader(bytes: bytes, name: "fuzz input", bufferSize: 4096, chunk: 1500, secret: secret)
      var map: BlockMap? = nil
      var options = Merger.Options()
      options.mode = .check
      let summary = try Merger.merge(reader, into: nil, map: &map, mapPath: nil, options: options, warn: { _ in })
      precondition(summary.complete, "a stream the check accepted is not complete")
      return nil
    } catch {
      return "\(error)"
    }
  }

  /// Parses `bytes` with the pure parser, all of it at once: the records it
  /// returns, then the end-of-input check.
  public static func parseStream(_ bytes: [UInt8], key: [UInt8]? = nil) -> String? {
    do {
      let secret = try key.map { try FuzzKeys.shared.secret($0) }
      var parser = StreamParser(secret: secret)
      var offset = 0
      try bytes.withUnsafeBytes { all in
        while let (_, consumed) = try parser.next(UnsafeRawBufferPointer(rebasing: all[offset...])) {
          precondition(consumed > 0 && consumed <= all.count - offset, "the parser consumed \(consumed) bytes")
          offset += consumed
        }
      }
      try parser.finish(leftover: bytes.count - offset)
      return nil
    } catch {
      return "\(error)"
    }
  }

  /// `bytes` with every whole record's CRC-32C recomputed, and an END
  /// record's digest (of either version's length) set to the SHA-256 of the
  /// bytes before it.
  public static func repairStreamChecksums(_ bytes: [UInt8]) -> [UInt8] {
    var out = bytes
    var offset = StreamFormat.preambleLength
    let overhead = StreamFormat.recordHeaderLength + StreamFormat.recordTrailerLength
    while out.count - offset >= overhead {
      let type = UInt16(out[offset]) | UInt16(out[offset + 1]) << 8
      var length = 0
      for i in 0..<4 { length |= Int(out[offset + 4 + i]) << (8 * i) }
      guard length <= StreamFormat.maximumBodyLength, out.count - offset - overhead >= length else { break }
      let body = offset + StreamFormat.recordHeaderLength
      if type == StreamFormat.RecordType.end.rawValue && isEndLength(length) {
        let digest = sha256(out[0..<offset])
        out.replaceSubrange(body + 32..<body + 64, with: digest)
      }
      out.withUnsafeMutableBytes { raw in
        let crc = dr_crc32c(0, raw.baseAddress! + offset, StreamFormat.recordHeaderLength + length)
        raw.storeBytes(of: crc.littleEndian, toByteOffset: body + length, as: UInt32.self)
      }
      offset = body + length + StreamFormat.recordTrailerLength
    }
    return out
  }

  /// Whether a body of `length` bytes is an END body: 64 bytes, or 80 in a
  /// stream with references (version 2).
  private static func isEndLength(_ length: Int) -> Bool {
    length == StreamFormat.endBodyLength || length == StreamFormat.referencesEndBodyLength
  }

  /// The plaintext stream `plain` encrypted with `key` as `snapshot
  /// --encrypt` would: an encrypted preamble of the plain stream's version
  /// (1 or 2; any other is sealed as 1), a CRYPTO record, then each
  /// record of `plain` (of a known type) sealed one sequence number later,
  /// an END record counting the CRYPTO record too. Bytes after the last
  /// whole record are kept as they are. Unlike snapshot, every stream
  /// sealed with one key in a process has the same salt (the CRYPTO record
  /// is made once): fuzzing wants the records' tags, not the derivation,
  /// done per input.
  public static func encryptStream(_ plain: [UInt8], key: [UInt8]) throws -> [UInt8] {
    var version = StreamFormat.version
    if plain.count >= StreamFormat.preambleLength
      && UInt16(plain[8]) | UInt16(plain[9]) << 8 == StreamFormat.referencesVersion
    {
      version = StreamFormat.referencesVersion
    }
    return try FuzzKeys.shared.sealing(key, version: version) { cryptoBody, cipher in
      try encrypt(plain, version, cryptoBody, cipher)
    }
  }

  private static func encrypt(_ plain: [UInt8], _ version: UInt16, _ cryptoBody: [UInt8], _ cipher: RecordCipher)
    throws -> [UInt8]
  {
    var out = StreamFormat.preamble(flags: StreamFormat.encryptedFlag, version: version)
    // Room for every record's tag (records are at least 20 bytes) at once.
    out.reserveCapacity(out.count + 100 + plain.count + plain.count / 20 * StreamCrypto.tagLength)
    out += StreamFormat.record(.crypto, sequence: 0, body: cryptoBody)
    var offset = StreamFormat.preambleLength
    let overhead = StreamFormat.recordHeaderLength + StreamFormat.recordTrailerLength
    while plain.count - offset >= overhead {
      var length = 0
      for i in 0..<4 { length |= Int(plain[offset + 4 + i]) << (8 * i) }
      guard length <= StreamFormat.maximumBodyLength, plain.count - offset - overhead >= length else { break }
      let typeRaw = UInt16(plain[offset]) | UInt16(plain[offset + 1]) << 8
      var sequence: UInt64 = 0
      for i in 0..<8 { sequence |= UInt64(plain[offset + 8 + i]) << (8 * UInt64(i)) }
      let start = offset + StreamFormat.recordHeaderLength
      var body = Array(plain[start..<start + length])
      offset = start + length + StreamFormat.recordTrailerLength
      guard let type = StreamFormat.RecordType(rawValue: typeRaw) else { continue }
      if type == .end && isEndLength(length) {
        var records: UInt64 = 0
        for i in 0..<8 { records |= UInt64(body[24 + i]) << (8 * UInt64(i)) }
        records &+= 1
        for i in 0..<8 { body[24 + i] = UInt8(truncatingIfNeeded: records >> (8 * UInt64(i))) }
      }
      out += cipher.sealedRecord(type, sequence: sequence &+ 1, body: body)
    }
    out += plain[min(offset, plain.count)...]
    return out
  }

  // MARK: Maps and signatures

  /// Decodes `bytes` as a map; a map it accepts must come back unchanged
  /// from encoding and decoding it again.
  public static func decodeMap(_ bytes: [UInt8]) -> String? {
    do {
      let map = try MapFormat.decode(bytes, name: "fuzz input")
      let again = try MapFormat.decode(MapFormat.encode(map), name: "the map encoded again")
      precondition(again == map, "a decoded map changed when encoded and decoded again")
      return nil
    } catch {
      return "\(error)"
    }
  }

  /// `bytes` with its closing SHA-256 (the last 32 bytes, as maps and
  /// signatures end) recomputed over everything before it.
  public static func repairClosingChecksum(_ bytes: [UInt8]) -> [UInt8] {
    guard bytes.count >= 32 else { return bytes }
    return Array(bytes[..<(bytes.count - 32)]) + sha256(bytes[..<(bytes.count - 32)])
  }

  /// Parses `bytes` as a GNU ddrescue mapfile, as `overwrite-map import`
  /// does, and turns its extents into blocks of 4 KiB both ways.
  public static func importDdrescueMapfile(_ bytes: [UInt8]) -> String? {
    do {
      let extents = try DdrescueMapfile.parse(String(decoding: bytes, as: UTF8.self), name: "fuzz input")
      var end: UInt64 = 1
      for e in extents { end = max(end, e.position + e.size) }
      // A device of at most 4 GiB: its bitmap (128 KiB) is made twice per
      // input, and extents past its end are still cut at it.
      let geometry = try BlockGeometry(blockSize: 4096, deviceSize: min(end, 1 << 32))
      for anyByte in [false, true] {
        let bits = DdrescueMapfile.bitmap(
          extents, geometry: geometry, statuses: ["+", "?"], anyByte: anyByte)
        precondition(bits.count == geometry.blockCount, "the bitmap does not cover the device")
      }
      return nil
    } catch {
      return "\(error)"
    }
  }

  /// Reads `bytes` as a signature front to back, as `bitmap-diff` reads one
  /// from a pipe: the header (and a sparse signature's selection), every
  /// digest, then the closing checksum. The reader takes the bytes from
  /// memory, through a small buffer that a long header makes it grow. The
  /// first digests are read with `readDigests`, the rest with `readEntries`,
  /// whose block numbers must be the signed blocks in order: every block,
  /// or the ones the selection sets.
  public static func readSignature(_ bytes: [UInt8]) -> String? {
    do {
      let reader = try SignatureReader(bytes: bytes, name: "fuzz input", bufferSize: 4096)
      let header = reader.header
      let selection = reader.selection
      precondition(reader.isSparse == (selection != nil), "isSparse disagrees with the selection")
      precondition(
        reader.signedBlocks == (selection?.population ?? header.geometry.blockCount),
        "signedBlocks is not the blocks the selection sets")
      if let sample = header.sample {
        let f = sample.fraction
        precondition(selection != nil, "a dense signature was read with a sample")
        precondition(
          f.numerator > 0 && f.numerator <= f.denominator, "a sample fraction \(f) out of range was accepted")
        // The header written again reads back with the same sample.
        let again = try SignatureReader(bytes: SignatureFormat.encodeHeader(header), name: "the header written again")
        precondition(again.header.sample == sample, "the sample changed when the header was written again")
      }
      var expected: UInt64 = 0
      func advance() {
        if let selection {
          expected = (selection.nextSet(from: expected) ?? selection.count) + 1
        } else {
          expected += 1
        }
      }
      // Odd counts, so that reads straddle the reader's buffer.
      let batch = 1000
      var scratch = [UInt8](repeating: 0, count: header.digestLength * batch)
      var blocks = [UInt64](repeating: 0, count: batch)
      let first = Int(min(7, reader.signedBlocks))
      try scratch.withUnsafeMutableBytes { try reader.readDigests(count: first, into: $0.baseAddress!) }
      for _ in 0..<first { advance() }
      var read = UInt64(first)
      while true {
        let n = try blocks.withUnsafeMutableBufferPointer { b in
          try scratch.withUnsafeMutableBytes {
            try reader.readEntries(max: batch, blocks: b.baseAddress!, digests: $0.baseAddress!)
          }
        }
        if n == 0 { break }
        for i in 0..<n {
          let block = selection.map { $0.nextSet(from: expected) ?? $0.count } ?? expected
          precondition(blocks[i] == block, "readEntries gave block \(blocks[i]) where \(block) is next")
          advance()
        }
        read += UInt64(n)
      }
      precondition(read == reader.signedBlocks, "read \(read) of \(reader.signedBlocks) signed blocks")
      try reader.finish()
      return nil
    } catch {
      return "\(error)"
    }
  }

  // MARK: NBD
  //
  // Both ends run on the input in memory (MemoryTransport): the server's
  // handshake and transmission, or the client's handshake and reply
  // reader, on the calling thread, with no socket, pipe or thread per
  // input.

  /// Serves `bytes` as the client's whole side of a connection (handshake,
  /// then requests) to a server of two in-memory exports of 1 MiB, `disk`
  /// and `other`, until the input ends. Returns what the server logged
  /// about the connection, nil when nothing.
  public static func serveNBD(_ bytes: [UInt8]) -> String? {
    let server = FuzzNBDServer.shared
    server.log.clear()
    let connection = MemoryTransport(bytes, peer: "client of the fuzz server")
    server.server.serve(connection)
    precondition(connection.bytesWritten >= NBDGreeting.length, "the server sent no greeting")
    let lines = server.log.take()
    return lines.isEmpty ? nil : lines.joined(separator: "\n")
  }

  /// Where the client believes the server is: the name its sentences give.
  public static let nbdPeer = "/tmp/dualrestore-fuzz-\(getpid())-client.sock"

  /// Serves `bytes` as a server's whole side of a connection (greeting,
  /// option replies, then transmission replies) to the client, which
  /// negotiates an export and, if that works, reads its first 4 KiB and
  /// writes them back. Returns the client's error, nil when all worked.
  /// `timeout` is the client's; a connection made again (after the server
  /// said it is shutting down) meets a peer that closes it at once. The
  /// client reads each reply after sending its request, so a reply never
  /// comes before it (`repliesFrom`, where the replies start, is for the
  /// callers' own bookkeeping). With `allocation`, the client is opened
  /// for block status (structured replies, base:allocation) and, when given
  /// it, asks for that of the first MiB instead.
  public static func negotiateNBD(
    _ bytes: [UInt8], timeout: Double = 0.05, repliesFrom: Int? = nil, allocation: Bool = false
  ) -> String? {
    let peer = nbdPeer
    let first = FirstConnection(bytes)
    let connector = NBDConnector.memory { MemoryTransport(first.take() ?? [], peer: peer) }
    do {
      let client = try NBDClient(
        uri: "nbd+unix:///disk?socket=\(peer)", timeout: timeout, allocation: allocation, connector: connector)
      defer { client.close() }
      if allocation {
        if client.hasAllocation && client.size > 0 {
          let runs = try client.allocation(offset: 0, length: UInt32(min(client.size, 1 << 20)))
          let total = runs.reduce(UInt64(0)) { $0 + UInt64($1.length) }
          precondition(!runs.isEmpty && total <= min(client.size, 1 << 20), "block status outside the range asked")
        }
        return nil
      }
      let length = Int(min(client.size, 4096))
      if length > 0 {
        let buffer = AlignedBuffer(count: length)
        try client.read(into: buffer.buffer, at: 0)
        if !client.isReadOnly { try client.write(UnsafeRawBufferPointer(buffer.buffer), at: 0) }
      }
      if client.canFlush { try client.flush() }
      return nil
    } catch {
      return "\(error)"
    }
  }
}

/// The input of a client's first connection; later ones get nothing.
private final class FirstConnection: Sendable {
  private let bytes: Locked<[UInt8]?>

  init(_ bytes: [UInt8]) { self.bytes = Locked(bytes) }

  func take() -> [UInt8]? {
    bytes.withLock { bytes in
      defer { bytes = nil }
      return bytes
    }
  }
}

/// The fuzz key as a StreamSecret, and the start of a stream sealed with
/// it (one per format version: the CRYPTO record's key check covers the
/// preamble), made once for the last key asked for rather than per input.
private final class FuzzKeys: Sendable {
  static let shared = FuzzKeys()
  private struct Made {
    var key: [UInt8] = []
    var secret: StreamSecret?
    var seals: [UInt16: (cryptoBody: [UInt8], cipher: RecordCipher)] = [:]
  }
  private let made = Locked(Made())

  func secret(_ key: [UInt8]) throws -> StreamSecret {
    try made.withLock { try Self.secret(key, &$0) }
  }

  /// Runs `body` with the CRYPTO record's body and the cipher of the records
  /// after it, holding the lock: the cipher is one EVP context. It keeps
  /// nothing between records but its key, so one serves every stream.
  func sealing<R: Sendable>(
    _ key: [UInt8], version: UInt16 = StreamFormat.version, _ body: ([UInt8], RecordCipher) throws -> R
  ) throws -> R {
    try made.withLock { m in
      let secret = try Self.secret(key, &m)
      let seal = try m.seals[version] ?? StreamCrypto.seal(secret, version: version)
      m.seals[version] = seal
      return try body(seal.cryptoBody, seal.cipher)
    }
  }

  private static func secret(_ key: [UInt8], _ m: inout Made) throws -> StreamSecret {
    if let made = m.secret, key == m.key { return made }
    let secret = try StreamSecret(key: key, origin: "the fuzz key")
    (m.key, m.secret, m.seals) = (key, secret, [:])
    return secret
  }
}

/// Lines logged, collected for the caller.
private final class LogLines: Sendable {
  private let lines = Locked<[String]>([])

  func add(_ line: String) { lines.withLock { $0.append(line) } }
  func clear() { lines.withLock { $0.removeAll() } }
  func take() -> [String] {
    lines.withLock { lines in
      defer { lines.removeAll() }
      return lines
    }
  }
}

/// An export held in memory.
private final class MemoryExport: NBDExport, Sendable {
  let name: String
  let description = "fuzz export"
  let size: UInt64 = 1 << 20
  let flags = NBD.flagSendFlush | NBD.flagSendFUA | NBD.flagSendTrim | NBD.flagSendWriteZeroes
  let preferredBlockSize: UInt32 = 4096
  private let bytes = Locked([UInt8](repeating: 0, count: 1 << 20))

  init(name: String) { self.name = name }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try check(offset, UInt64(buffer.count))
    bytes.withLock {
      $0.withUnsafeBytes {
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)...].prefix(buffer.count)))
      }
    }
  }

  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try check(offset, UInt64(buffer.count))
    bytes.withLock { $0.replaceSubrange(Int(offset)..<Int(offset) + buffer.count, with: buffer) }
  }

  func flush() throws {}

  func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    try writeZeroes(offset: offset, length: length, fua: fua)
  }

  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try check(offset, length)
    bytes.withLock {
      $0.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
    }
  }

  /// The server checks ranges before it calls; a range out of bounds here is its bug.
  private func check(_ offset: UInt64, _ length: UInt64) throws {
    precondition(offset <= size && length <= size - offset, "the server passed on a request past the export's end")
  }
}

/// The server `FuzzEntryPoints.serveNBD` runs its inputs through, one per
/// process; one worker, which is the calling thread.
private final class FuzzNBDServer: Sendable {
  static let shared = FuzzNBDServer()
  let log = LogLines()
  let server: NBDServer

  private init() {
    let log = self.log
    server = NBDServer(
      exports: [MemoryExport(name: "disk"), MemoryExport(name: "other")], workersPerConnection: 1,
      options: NBDServerOptions(handshakeTimeout: 10, stallTimeout: 10, maximumBufferedBytes: 64 << 20),
      log: { log.add($0) })
  }
}
