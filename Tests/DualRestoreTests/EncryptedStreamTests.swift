// Encrypted block streams in the library: the records match the plaintext
// stream's, the layout is the one dualrestore-stream(5) documents (checked by
// decrypting with OpenSSL directly, keys derived here from HMAC alone), and
// every way of damaging a stream — a wrong key, a flipped byte anywhere (with
// or without its CRC made right again), a record removed, repeated, swapped or
// taken from another stream under the same key, a cut anywhere — is refused
// before anything of the damaged record is returned.

import COpenSSL
import CShim
import DualRestoreFuzz
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class EncryptedStreamTests: XCTestCase {

  // MARK: Helpers

  static let key: [UInt8] = (0..<32).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
  static let otherKey: [UInt8] = (0..<32).map { UInt8(truncatingIfNeeded: $0 &* 11 &+ 1) }

  static func secret(_ key: [UInt8] = key) -> StreamSecret {
    // The keys above are 32 bytes, which is all init(key:) checks.
    guard let s = try? StreamSecret(key: key) else { fatalError("a 32-byte key was refused") }
    return s
  }

  /// A record as returned, with its payload copied.
  struct Rec: Equatable, CustomStringConvertible {
    var shape: String
    var payload: [UInt8] = []
    var header: StreamFormat.Header?
    var end: StreamFormat.End?
    var description: String { shape }

    init(_ r: StreamParser.Record) {
      switch r {
      case .preamble: shape = "P"
      case .header(let h):
        shape = "H"
        header = h
      case .data(let block, let length, let encoding, let payload):
        shape = "D\(block):\(length):\(encoding == .raw ? "raw" : "lz4")"
        self.payload = Array(payload)
      case .zero(let first, let count): shape = "Z\(first)+\(count)"
      case .end(let e):
        shape = "E"
        end = e
      case .lineage: shape = "L"
      case .generation: shape = "G"
      case .sources: shape = "SRC"
      case .reference(let r):
        shape = "R\(r.first)+\(r.count)@\(r.image):\(r.sourceFirst)"
        payload = Array(r.digests)
      case .skipped(let t): shape = "S\(t)"
      }
    }
  }

  struct Parsed {
    var records: [Rec] = []
    var error: String?
  }

  /// Feeds all of `bytes` to a parser with `secret`, then finishes.
  static func parse(_ bytes: [UInt8], secret: StreamSecret?) -> Parsed {
    var p = Parsed()
    var parser = StreamParser(secret: secret)
    var at = 0
    bytes.withUnsafeBytes { raw in
      do {
        while let (record, consumed) = try parser.next(UnsafeRawBufferPointer(rebasing: raw[at...])) {
          p.records.append(Rec(record))
          at += consumed
        }
        try parser.finish(leftover: bytes.count - at)
      } catch {
        p.error = "\(error)"
      }
    }
    return p
  }

  /// Reads `bytes` through StreamReader (the reading thread, the END held
  /// back until the end of input), as merge-snapshot does.
  func readWithReader(_ bytes: [UInt8], secret: StreamSecret?) throws -> Parsed {
    let path = try makeTempDirectory() + "/in.stream"
    _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
    let fd = open(path, O_RDONLY)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    let reader = StreamReader(fd: fd, name: "enc-stream", bufferSize: 4096, secret: secret)
    var p = Parsed()
    do {
      while let r = try reader.next() { p.records.append(Rec(r)) }
    } catch {
      p.error = "\(error)"
    }
    return p
  }

  /// A sparse image of `size` bytes with `parts` written at their offsets.
  func makeImage(size: Int, parts: [(Int, [UInt8])]) throws -> String {
    let path = try makeTempDirectory() + "/i.img"
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
    for (offset, bytes) in parts {
      XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }, bytes.count)
    }
    return path
  }

  static func compressible(_ count: Int) -> [UInt8] {
    let unit = Array("an encrypted stream compresses before it encrypts. ".utf8)
    return (0..<count).map { unit[$0 % unit.count] }
  }

  /// 512-byte blocks: 0 random, 1-2 zeros, 3 compressible, 4 random, 5 a
  /// hole, 6 a partial block of 100 random bytes.
  func tinyImage(seed: UInt64 = 5) throws -> (path: String, content: [UInt8]) {
    var rng = SplitMix64(seed: seed)
    let parts: [(Int, [UInt8])] = [
      (0, rng.bytes(512)), (512, [UInt8](repeating: 0, count: 1024)), (1536, Self.compressible(512)),
      (2048, rng.bytes(512)), (3072, rng.bytes(100)),
    ]
    var content = [UInt8](repeating: 0, count: 3172)
    for (o, b) in parts { content.replaceSubrange(o..<o + b.count, with: b) }
    return (try makeImage(size: 3172, parts: parts), content)
  }

  func snapshot(_ image: String, blockSize: UInt32 = 512, secret: StreamSecret?) throws -> [UInt8] {
    let out = try makeTempDirectory() + "/s.stream"
    let sink = try OutputSink(.file(out), what: "stream")
    _ = try SnapshotWriter.write(
      try Device(path: image), to: sink,
      options: SnapshotWriter.Options(blockSize: blockSize, workers: 3, encryption: secret))
    try sink.finish()
    return Array(try Data(contentsOf: URL(fileURLWithPath: out)))
  }

  /// Where each record starts and ends, from the framing alone.
  static func recordRanges(_ s: [UInt8]) -> [Range<Int>] {
    var out: [Range<Int>] = []
    var at = 16
    while at + 16 <= s.count {
      let length = Int(s[at + 4]) | Int(s[at + 5]) << 8 | Int(s[at + 6]) << 16 | Int(s[at + 7]) << 24
      let end = at + 16 + length + 4
      guard end <= s.count else { break }
      out.append(at..<end)
      at = end
    }
    return out
  }

  static func u32(_ s: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(s[at + $1]) << (8 * $1) } }
  static func u64(_ s: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(s[at + $1]) << (8 * $1) } }

  /// Writes a record's sequence number and makes its CRC right again.
  static func renumber(_ s: inout [UInt8], _ r: Range<Int>, to seq: UInt64) {
    for i in 0..<8 { s[r.lowerBound + 8 + i] = UInt8(truncatingIfNeeded: seq >> (8 * UInt64(i))) }
    fixCRC(&s, r)
  }

  static func fixCRC(_ s: inout [UInt8], _ r: Range<Int>) {
    let crc = s.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + r.lowerBound, r.count - 4) }
    for i in 0..<4 { s[r.upperBound - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
  }

  func hmac(_ key: [UInt8], _ data: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    var length = 0
    _ = out.withUnsafeMutableBytes { o in
      key.withUnsafeBytes { k in
        data.withUnsafeBytes { d in
          EVP_Q_mac(
            nil, "HMAC", nil, "SHA256", nil, k.baseAddress, k.count, d.baseAddress?.assumingMemoryBound(to: UInt8.self),
            d.count, o.baseAddress?.assumingMemoryBound(to: UInt8.self), 32, &length)
        }
      }
    }
    XCTAssertEqual(length, 32)
    return out
  }

  /// HKDF-SHA256 (RFC 5869) for one output block, from HMAC alone.
  func hkdf(_ ikm: [UInt8], salt: [UInt8], info: String) -> [UInt8] {
    let prk = hmac(salt, ikm)
    return hmac(prk, Array(info.utf8) + [1])
  }

  /// AES-256-GCM decryption with OpenSSL directly; nil when the tag fails.
  func gcmOpen(key: [UInt8], nonce: [UInt8], aad: [UInt8], body: [UInt8]) -> [UInt8]? {
    let ctx = EVP_CIPHER_CTX_new()
    defer { EVP_CIPHER_CTX_free(ctx) }
    let cipherText = Array(body.dropLast(16))
    var tag = Array(body.suffix(16))
    var out = [UInt8](repeating: 0, count: cipherText.count + 16)
    var n: Int32 = 0
    XCTAssertEqual(EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nil, key, nonce), 1)
    XCTAssertEqual(EVP_DecryptUpdate(ctx, nil, &n, aad, Int32(aad.count)), 1)
    XCTAssertEqual(EVP_DecryptUpdate(ctx, &out, &n, cipherText, Int32(cipherText.count)), 1)
    XCTAssertEqual(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, &tag), 1)
    var m: Int32 = 0
    let ok = out.withUnsafeMutableBufferPointer { EVP_DecryptFinal_ex(ctx, $0.baseAddress! + Int(n), &m) }
    ERR_clear_error()
    return ok == 1 ? Array(out[0..<cipherText.count]) : nil
  }

  // MARK: Round trips

  func testEncryptedRecordsCarryTheSameBlocksAsThePlaintextStream() throws {
    let (image, content) = try tinyImage()
    let plain = Self.parse(try snapshot(image, secret: nil), secret: nil)
    XCTAssertNil(plain.error)
    let expected = ["P", "H", "D0:512:raw", "Z1+2", "D3:512:lz4", "D4:512:raw", "Z5+1", "D6:100:raw", "E"]
    XCTAssertEqual(plain.records.map(\.shape), expected)
    for secret in [Self.secret(), try StreamSecret(passphrase: Array("correct horse".utf8))] {
      let bytes = try snapshot(image, secret: secret)
      let parsed = Self.parse(bytes, secret: secret)
      XCTAssertNil(parsed.error, "\(secret.kind)")
      // The CRYPTO record (type 5) comes first; then the same records.
      XCTAssertEqual(parsed.records.map(\.shape), ["P", "S5"] + expected.dropFirst(), "\(secret.kind)")
      let dataPlain = plain.records.filter { $0.shape.hasPrefix("D") }
      let dataEnc = parsed.records.filter { $0.shape.hasPrefix("D") }
      XCTAssertEqual(dataPlain.map(\.payload), dataEnc.map(\.payload), "payloads differ (\(secret.kind))")
      XCTAssertEqual(dataEnc.first?.payload, Array(content[0..<512]))
      // The same through StreamReader, as merge-snapshot reads.
      let read = try readWithReader(bytes, secret: secret)
      XCTAssertNil(read.error)
      XCTAssertEqual(read.records.map(\.shape), ["P", "S5"] + expected.dropFirst())
      // The END record carries zeros where a plaintext stream has its digest.
      XCTAssertEqual(read.records.last?.end?.digest, [UInt8](repeating: 0, count: 32))
      XCTAssertEqual(read.records.last?.end?.records, 8)
      // Nothing of a block shows in clear: no 16-byte window of the random
      // block, nor of the compressible one's LZ4 form.
      for payload in [dataEnc[0].payload, dataEnc[1].payload] {
        for start in stride(from: 0, to: payload.count - 16, by: 16) {
          let window = Array(payload[start..<start + 16])
          XCTAssertFalse(
            (0...(bytes.count - 16)).contains { Array(bytes[$0..<$0 + 16]) == window }, "plaintext at \(start) shows")
        }
      }
    }
  }

  func testLayoutAndKeysAreTheDocumentedOnes() throws {
    let (image, _) = try tinyImage()
    let bytes = try snapshot(image, secret: Self.secret())
    // Preamble: flags bit 0, reserved zero.
    XCTAssertEqual(Array(bytes[0..<16]), StreamFormat.magic + [1, 0, 1, 0, 0, 0, 0, 0])
    let ranges = Self.recordRanges(bytes)
    XCTAssertEqual(ranges.count, 9)
    XCTAssertEqual(ranges.last?.upperBound, bytes.count)
    // Record 0: CRYPTO, critical, 80 bytes, in clear.
    let c = ranges[0]
    XCTAssertEqual(Array(bytes[c.lowerBound..<c.lowerBound + 4]), [5, 0, 1, 0])
    XCTAssertEqual(Self.u32(bytes, c.lowerBound + 4), 80)
    XCTAssertEqual(Self.u64(bytes, c.lowerBound + 8), 0)
    let body = Array(bytes[(c.lowerBound + 16)..<(c.upperBound - 4)])
    XCTAssertEqual(Array(body[0..<16]), [1, 1] + [UInt8](repeating: 0, count: 14), "AES-256-GCM, a key file")
    let salt = Array(body[16..<48])
    // The keys, derived here from HMAC-SHA256 alone.
    let recordKey = hkdf(Self.key, salt: salt, info: "dualrestore-stream v1 record key")
    let checkKey = hkdf(Self.key, salt: salt, info: "dualrestore-stream v1 key check")
    let framing0 = Array(bytes[c.lowerBound..<c.lowerBound + 16])
    XCTAssertEqual(
      Array(body[48..<80]), hmac(checkKey, Array(bytes[0..<16]) + framing0 + Array(body[0..<48])), "key check")
    // Every later record: nonce 0000 ‖ sequence, AAD its framing, body ‖ tag.
    let plain = Self.parse(bytes, secret: Self.secret())
    for (seq, r) in ranges.enumerated().dropFirst() {
      let framing = Array(bytes[r.lowerBound..<r.lowerBound + 16])
      XCTAssertEqual(Self.u64(framing, 8), UInt64(seq))
      let nonce = [0, 0, 0, 0] + Array(framing[8..<16])
      let sealed = Array(bytes[(r.lowerBound + 16)..<(r.upperBound - 4)])
      let opened = gcmOpen(key: recordKey, nonce: nonce, aad: framing, body: sealed)
      XCTAssertNotNil(opened, "record \(seq) does not open with the documented construction")
      guard let opened else { continue }
      let rec = plain.records[seq + 1]
      switch rec.shape.first {
      case "H":
        XCTAssertEqual(Self.u32(framing, 4), UInt32(98 + "\(image)".utf8.count + 16))
        XCTAssertEqual(opened, StreamFormat.headerBody(try XCTUnwrap(rec.header)))
      case "D": XCTAssertEqual(Array(opened[16...]), rec.payload)
      case "E":
        XCTAssertEqual(opened.count, 64)
        XCTAssertEqual(Array(opened[32..<64]), [UInt8](repeating: 0, count: 32))
      default: XCTAssertEqual(opened.count, 16, rec.shape)
      }
      // The same record under another nonce, AAD or key does not open.
      var wrongNonce = nonce
      wrongNonce[11] ^= 1
      XCTAssertNil(gcmOpen(key: recordKey, nonce: wrongNonce, aad: framing, body: sealed))
      var wrongAAD = framing
      wrongAAD[2] ^= 2
      XCTAssertNil(gcmOpen(key: recordKey, nonce: nonce, aad: wrongAAD, body: sealed))
      XCTAssertNil(gcmOpen(key: Self.key, nonce: nonce, aad: framing, body: sealed), "the master key is not used as is")
    }
    // A second stream under the same key has a salt of its own.
    let again = try snapshot(image, secret: Self.secret())
    XCTAssertNotEqual(Array(again[(16 + 32)..<(16 + 64)]), salt)
    // A passphrase stream records scrypt N = 2^17, r = 8, p = 1.
    let pass = try snapshot(image, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertEqual(Array(pass[32..<48]), [1, 2, 17, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
  }

  /// A stream sets its own scrypt parameters; a hostile one could ask for
  /// minutes of work before the key check fails. Work beyond 8 times what
  /// this build writes is refused before any derivation.
  func testCostlyScryptParametersAreRefusedBeforeDeriving() throws {
    let (image, _) = try tinyImage()
    let pass = try snapshot(image, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    var costly = pass
    costly[34] = 20  // N = 2^20
    costly[40] = 2  // p = 2: N·r·p = 2^24
    costly = FuzzEntryPoints.repairStreamChecksums(costly)
    let started = monotonicNow()
    let p = Self.parse(costly, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertTrue(p.error?.contains("ask for more work than this build allows") ?? false, "\(p)")
    XCTAssertLessThan(monotonicNow() - started, 5, "the refusal came after a derivation")
    // Within the limit (N = 2^18, p = 2: 2^22), the parameters are used and the
    // altered CRYPTO record fails its key check instead.
    var fair = pass
    fair[34] = 18
    fair[40] = 2
    let q = Self.parse(
      FuzzEntryPoints.repairStreamChecksums(fair), secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertTrue(q.error?.contains("wrong") ?? false, "\(q)")
  }

  func monotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
  }

  // MARK: Keys

  func testWrongMissingMismatchedAndUnneededKeys() throws {
    let (image, _) = try tinyImage()
    let bytes = try snapshot(image, secret: Self.secret())
    var p = Self.parse(bytes, secret: Self.secret(Self.otherKey))
    XCTAssertEqual(p.records.map(\.shape), ["P"], "nothing after the preamble is returned")
    XCTAssertTrue(
      p.error?.contains("record 0 at byte 16: wrong key: the key does not open this stream") ?? false, "\(p)")
    p = Self.parse(bytes, secret: nil)
    XCTAssertEqual(p.records.map(\.shape), ["P"])
    XCTAssertTrue(p.error?.contains("the stream is encrypted with a key file; give it with --key-file FILE") ?? false)
    p = Self.parse(bytes, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertTrue(p.error?.contains("encrypted with a key file, not a passphrase") ?? false, "\(p)")
    let pass = try snapshot(image, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    p = Self.parse(pass, secret: nil)
    XCTAssertTrue(p.error?.contains("encrypted with a passphrase; give it with --passphrase-file FILE") ?? false)
    p = Self.parse(pass, secret: try StreamSecret(passphrase: Array("pW".utf8)))
    XCTAssertTrue(p.error?.contains("wrong key: the passphrase does not open this stream") ?? false, "\(p)")
    XCTAssertEqual(p.records.map(\.shape), ["P"])
    p = Self.parse(pass, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertNil(p.error)
    // A key for a plaintext stream is refused at the preamble.
    p = Self.parse(try snapshot(image, secret: nil), secret: Self.secret())
    XCTAssertEqual(p.records.count, 0)
    XCTAssertTrue(p.error?.contains("the stream is not encrypted, so nothing in it is authenticated") ?? false)
    // Scrypt parameters asking for too much memory are refused before any derivation.
    var greedy = pass
    greedy[16 + 16 + 2] = 30
    Self.fixCRC(&greedy, Self.recordRanges(greedy)[0])
    p = Self.parse(greedy, secret: try StreamSecret(passphrase: Array("pw".utf8)))
    XCTAssertTrue(p.error?.contains("need 1048576 MiB, more than the 1024 MiB") ?? false, "\(p)")
  }

  func testKeyAndPassphraseFiles() throws {
    let dir = try makeTempDirectory()
    func file(_ name: String, _ bytes: [UInt8]) -> String {
      let path = dir + "/" + name
      _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
      return path
    }
    let hex = Self.key.map { String(format: "%02x", $0) }.joined()
    let image = try tinyImage().path
    let stream = try snapshot(image, secret: Self.secret())
    for (name, content) in [
      ("raw", Self.key), ("hex", Array(hex.utf8)), ("hexnl", Array((hex + "\n").utf8)),
      ("HEX", Array((hex.uppercased() + "\r\n").utf8)),
    ] {
      let secret = try StreamSecret.load(keyFile: file(name, content))
      XCTAssertEqual(secret.kind, .key)
      XCTAssertNil(Self.parse(stream, secret: secret).error, "key file \(name) does not open the stream")
    }
    let sentence = "a key file holds exactly 32 raw bytes or 64 hex digits (one trailing newline allowed)"
    for (name, content) in [
      ("short", Array(Self.key.dropLast())), ("long", Self.key + [0]), ("hex63", Array(hex.dropLast().utf8)),
      ("nothex", Array(("g" + hex.dropFirst()).utf8)), ("twonl", Array((hex + "\n\n").utf8)), ("empty", []),
    ] {
      assertThrows(try StreamSecret.load(keyFile: file(name, content)), containing: [sentence], name)
    }
    assertThrows(try StreamSecret.load(keyFile: dir + "/missing"), containing: ["missing: No such file"])
    // Passphrases: the content less one newline; not empty.
    let pw = try StreamSecret.load(passphraseFile: file("pw", Array("pw\n".utf8)))
    let pass = try snapshot(image, secret: pw)
    XCTAssertNil(Self.parse(pass, secret: try StreamSecret(passphrase: Array("pw".utf8))).error)
    XCTAssertNotNil(Self.parse(pass, secret: try StreamSecret(passphrase: Array("pw\n".utf8))).error)
    assertThrows(try StreamSecret.load(passphraseFile: file("e", Array("\n".utf8))), containing: ["is empty"])
    assertThrows(
      try StreamSecret.load(passphraseFile: file("big", [UInt8](repeating: 0x41, count: 2000))),
      containing: ["too long"])
  }

  // MARK: Damage

  /// Record `seq`'s start, for "record N at byte X".
  static func position(_ bytes: [UInt8], _ seq: Int) -> String {
    "record \(seq) at byte \(recordRanges(bytes)[seq].lowerBound)"
  }

  func testEveryFlippedByteIsCaughtBeforeItsRecordIsUsed() throws {
    let stream = try snapshot(try tinyImage().path, secret: Self.secret())
    let ranges = Self.recordRanges(stream)
    for offset in 0..<stream.count {
      var bad = stream
      bad[offset] ^= 0x01
      let p = Self.parse(bad, secret: Self.secret())
      guard let error = p.error else {
        XCTFail("flip at byte \(offset) read as a clean stream")
        continue
      }
      XCTAssertFalse(p.records.contains { $0.shape == "E" }, "flip at \(offset): END returned")
      guard let seq = ranges.firstIndex(where: { $0.contains(offset) }) else {
        // The preamble.
        XCTAssertEqual(p.records.count, 0, "flip at \(offset)")
        // Bit 0 of the flags cleared makes it a plaintext stream, which the key refuses.
        let expected =
          offset < 8
          ? "bad magic"
          : offset < 10 ? "version" : offset == 10 ? "is not encrypted" : offset == 11 ? "flags" : "reserved bytes"
        XCTAssertTrue(error.contains(expected), "flip at \(offset): \(error)")
        continue
      }
      XCTAssertTrue(error.contains(Self.position(stream, seq) + ": "), "flip at \(offset): \(error)")
      if !(4..<8).contains(offset - ranges[seq].lowerBound) {
        // (A flipped length makes the record run past its CRC, or past the end.)
        XCTAssertTrue(error.contains("checksum mismatch"), "flip at \(offset): \(error)")
      }
      // The preamble and the records before this one; nothing of it.
      XCTAssertEqual(p.records.count, seq + 1, "flip at \(offset)")
    }
  }

  func testAlteredRecordsWithTheirCRCMadeRightFailTheirTag() throws {
    let stream = try snapshot(try tinyImage().path, secret: Self.secret())
    let ranges = Self.recordRanges(stream)
    // Every body byte of every sealed record, and the type and flags bytes of
    // its framing (the AAD), altered on purpose: the CRC is made right again.
    for (seq, r) in ranges.enumerated() {
      let bodyOffsets = (r.lowerBound + 16)..<(r.upperBound - 4)
      for offset in [r.lowerBound, r.lowerBound + 1, r.lowerBound + 2, r.lowerBound + 3] + Array(bodyOffsets) {
        var bad = stream
        bad[offset] ^= 0x01
        Self.fixCRC(&bad, r)
        let p = Self.parse(bad, secret: Self.secret())
        guard let error = p.error else {
          XCTFail("altered byte \(offset) of record \(seq) read as a clean stream")
          continue
        }
        XCTAssertEqual(p.records.count, seq + 1, "byte \(offset): \(error)")
        let at = Self.position(stream, seq)
        if seq == 0 {
          // The CRYPTO record: its fields are checked, and covered by the
          // key check with its framing; the salt and the check itself only
          // by the key check.
          XCTAssertTrue(error.contains(at + ": "), "byte \(offset): \(error)")
          if offset - r.lowerBound - 16 >= 16 {
            XCTAssertTrue(error.contains(at + ": wrong key"), "byte \(offset): \(error)")
          }
        } else {
          XCTAssertTrue(
            error.contains(at + ": authentication failed: the record was altered, moved, or taken from another stream"),
            "byte \(offset) of record \(seq): \(error)")
        }
      }
    }
  }

  func testRemovedRepeatedSwappedSplicedAndCutRecordsAreRefused() throws {
    let (image, _) = try tinyImage()
    let stream = try snapshot(image, secret: Self.secret())
    let ranges = Self.recordRanges(stream)
    func without(_ i: Int) -> [UInt8] { Array(stream[..<ranges[i].lowerBound] + stream[ranges[i].upperBound...]) }
    func check(_ bytes: [UInt8], _ fragment: String, returned: Int, _ what: String, line: UInt = #line) {
      let p = Self.parse(bytes, secret: Self.secret())
      XCTAssertTrue(p.error?.contains(fragment) ?? false, "\(what): \(p.error ?? "accepted")", line: line)
      XCTAssertEqual(p.records.count, returned, "\(what): \(p.records)", line: line)
    }
    // A DATA record removed: the next one is out of sequence.
    check(without(3), "record 3 at byte \(ranges[3].lowerBound): sequence number 4 where 3", returned: 4, "removed")
    // Removed, and the records after it renumbered (CRCs made right): the tags fail.
    var renumbered = without(3)
    for (k, r) in Self.recordRanges(renumbered).enumerated().dropFirst(3) {
      Self.renumber(&renumbered, r, to: UInt64(k))
    }
    check(renumbered, "record 3 at byte \(ranges[3].lowerBound): authentication failed", returned: 4, "renumbered")
    // The END removed: the stream is incomplete.
    check(without(8), "truncated stream: no END record", returned: 9, "END removed")
    // A record repeated.
    let repeated = Array(stream[..<ranges[4].upperBound] + stream[ranges[4]] + stream[ranges[4].upperBound...])
    check(repeated, "record 5 at byte \(ranges[5].lowerBound): sequence number 4 where 5", returned: 6, "repeated")
    // Two records swapped, as they are and renumbered.
    var swapped = Array(stream[..<ranges[3].lowerBound] + stream[ranges[4]] + stream[ranges[3]])
    swapped += stream[ranges[4].upperBound...]
    check(swapped, "record 3 at byte \(ranges[3].lowerBound): sequence number 4 where 3", returned: 4, "swapped")
    let swappedRanges = Self.recordRanges(swapped)
    Self.renumber(&swapped, swappedRanges[3], to: 3)
    Self.renumber(&swapped, swappedRanges[4], to: 4)
    check(
      swapped, "record 3 at byte \(ranges[3].lowerBound): authentication failed", returned: 4, "swapped, renumbered")
    // A record from another stream of the same image under the same key,
    // with the same sequence number and a right CRC.
    let other = try snapshot(image, secret: Self.secret())
    let otherRanges = Self.recordRanges(other)
    XCTAssertEqual(otherRanges.map(\.count), ranges.map(\.count))
    let spliced = Array(stream[..<ranges[5].lowerBound] + other[otherRanges[5]] + stream[ranges[5].upperBound...])
    check(spliced, "record 5 at byte \(ranges[5].lowerBound): authentication failed", returned: 6, "spliced")
    // The other stream's END after a cut, renumbered.
    var tail = Array(other[otherRanges[8]])
    Self.renumber(&tail, 0..<tail.count, to: 5)
    check(
      Array(stream[..<ranges[5].lowerBound]) + tail, "record 5 at byte \(ranges[5].lowerBound): authentication failed",
      returned: 6, "END spliced after a cut")
    // The other stream's HEADER.
    let header = Array(stream[..<ranges[1].lowerBound] + other[otherRanges[1]] + stream[ranges[1].upperBound...])
    check(header, "record 1 at byte \(ranges[1].lowerBound): authentication failed", returned: 2, "header spliced")
    // Cuts at every byte: never complete, nothing of the cut record.
    for cut in 0..<stream.count {
      let p = Self.parse(Array(stream[0..<cut]), secret: Self.secret())
      XCTAssertNotNil(p.error, "cut at \(cut) accepted")
      XCTAssertFalse(p.records.contains { $0.shape == "E" }, "cut at \(cut)")
      if let seq = ranges.firstIndex(where: { $0.contains(cut) }), cut > ranges[seq].lowerBound {
        XCTAssertEqual(p.records.count, seq + 1, "cut at \(cut)")
        XCTAssertTrue(p.error?.contains("truncated") ?? false, "cut at \(cut): \(p.error ?? "")")
      }
    }
    // Bytes after the END record.
    check(stream + [0], "unexpected data after the END record", returned: 10, "trailing byte")
    // The same refusals through StreamReader, which merge-snapshot uses.
    let r = try readWithReader(without(3), secret: Self.secret())
    XCTAssertTrue(r.error?.hasPrefix("enc-stream: record 3 at byte") ?? false, r.error ?? "accepted")
    XCTAssertEqual(r.records.count, 4)
    let cut = try readWithReader(Array(stream.dropLast(1)), secret: Self.secret())
    XCTAssertTrue(cut.error?.contains("truncated") ?? false, cut.error ?? "accepted")
    XCTAssertFalse(cut.records.contains { $0.shape == "E" })
  }

  func testLargeBlocksRoundTripThroughTheReader() throws {
    // 1 MiB blocks: records larger than the reader's first buffer, and the
    // cipher's plaintext buffer growing to them.
    var rng = SplitMix64(seed: 9)
    let size = 5 << 20 + 777
    let random = rng.bytes(size)
    let image = try makeImage(size: size, parts: [(0, random)])
    let bytes = try snapshot(image, blockSize: 1 << 20, secret: Self.secret())
    let p = try readWithReader(bytes, secret: Self.secret())
    XCTAssertNil(p.error)
    let data = p.records.filter { $0.shape.hasPrefix("D") }
    XCTAssertEqual(data.count, 6)
    XCTAssertEqual(data.flatMap(\.payload), random)
  }

  /// The records of `bytes` as a RecordPipeline hands them over, with small
  /// batches, so that they are handed back and refilled many times.
  func readThroughPipeline(_ bytes: [UInt8], secret: StreamSecret?) -> Parsed {
    let inner = StreamReader(bytes: bytes, name: "enc-stream", bufferSize: 4096, chunk: 3000, secret: secret)
    let pipeline = RecordPipeline(inner, batchBytes: 2048, depth: 2)
    defer { pipeline.cancel() }
    var p = Parsed()
    do {
      while let r = try pipeline.next() { p.records.append(Rec(r)) }
    } catch {
      p.error = "\(error)"
    }
    return p
  }

  func testThePipelineHandsOverExactlyWhatTheReaderReturnsAndThenItsError() throws {
    // 300 blocks of 512 bytes: random, compressible and zero ones in turn.
    var rng = SplitMix64(seed: testSeed(9))
    var parts: [(Int, [UInt8])] = []
    for b in 0..<300 where b % 3 != 2 {
      parts.append((b * 512, b % 3 == 0 ? rng.bytes(512) : Self.compressible(512)))
    }
    let sealed = try snapshot(try makeImage(size: 300 * 512, parts: parts), secret: Self.secret())
    let direct = Self.parse(sealed, secret: Self.secret())
    XCTAssertNil(direct.error)
    let piped = readThroughPipeline(sealed, secret: Self.secret())
    XCTAssertNil(piped.error)
    XCTAssertEqual(piped.records.filter { $0.shape != "P" }, direct.records.filter { $0.shape != "P" })
    XCTAssertGreaterThan(piped.records.filter { $0.shape.hasPrefix("D") }.count, 150)
    // A tag broken two thirds in: every record before it, then the error.
    var damaged = sealed
    let ranges = Self.recordRanges(sealed)
    let victim = ranges[ranges.count * 2 / 3]
    damaged[victim.upperBound - 10] ^= 1
    Self.fixCRC(&damaged, victim)
    let refused = readThroughPipeline(damaged, secret: Self.secret())
    let before = Self.parse(damaged, secret: Self.secret())
    XCTAssertTrue(refused.error?.contains("authentication failed") ?? false, refused.error ?? "accepted")
    XCTAssertEqual(refused.records.filter { $0.shape != "P" }, before.records.filter { $0.shape != "P" })
    XCTAssertGreaterThan(refused.records.count, 100)
  }
}
