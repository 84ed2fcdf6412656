// Encrypted, authenticated block streams (documented in
// man/dualrestore-stream.5, "Encrypted streams").
//
// The preamble's flag bit 0 marks a stream encrypted. Its first record (0)
// is then a CRYPTO record in clear: how the key was given (a key file, or a
// passphrase stretched with scrypt and its parameters), a random salt of the
// stream, and a key check. Every later record keeps its 16 framing bytes in
// clear; its body is AES-256-GCM ciphertext followed by the 16-byte tag:
//
//   master key   the 32-byte key of the key file, or
//                scrypt(passphrase, salt, N, r, p) (RFC 7914)
//   record key   HKDF-SHA256(master, salt, "dualrestore-stream v1 record key")
//   check key    HKDF-SHA256(master, salt, "dualrestore-stream v1 key check")
//   key check    HMAC-SHA256(check key, preamble ‖ CRYPTO framing ‖ CRYPTO body[0..<48])
//   nonce        4 zero bytes ‖ the record's sequence number (little-endian)
//   AAD          the record's 16 framing bytes (type, flags, length, sequence)
//
// The salt is fresh for every stream, so the record key is too: a nonce is
// never used twice under one key, and a record moved from another stream
// (under the same key file or passphrase) fails its tag. The sequence number
// is both the nonce and part of the AAD, so a removed, repeated or reordered
// record fails; the END record is authenticated and required, and counts the
// records before it, so a cut-off stream fails. The CRC-32C of each record
// stays (over the ciphertext), so damage on the media is told apart from a
// record altered on purpose, which only the tag can catch.

import COpenSSL
import CShim
import Glibc

/// A key or passphrase read from a file, held in memory that is wiped when
/// released. Keys are never taken from the command line or the environment.
// @unchecked Sendable: the secret's bytes never change after init; `derived` is touched only under `derivedFor`'s lock.
public final class StreamSecret: @unchecked Sendable {
  public enum Kind: UInt8, Sendable {
    /// 32 bytes used as the master key.
    case key = 1
    /// A passphrase the master key is derived from with scrypt.
    case passphrase = 2

    /// The command-line option that gives a secret of this kind.
    public var option: String { self == .key ? "--key-file" : "--passphrase-file" }
  }

  public let kind: Kind
  /// How messages name it: "the key file k.key".
  public let origin: String
  let bytes: UnsafeMutableRawBufferPointer

  private let count: Int

  init(kind: Kind, origin: String, copying source: some Collection<UInt8>) {
    self.kind = kind
    self.origin = origin
    bytes = .allocate(byteCount: max(source.count, 1), alignment: 16)
    count = source.count
    for (i, byte) in source.enumerated() { bytes[i] = byte }
  }

  /// The key or passphrase itself.
  var material: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: bytes[0..<count]) }

  deinit {
    OPENSSL_cleanse(bytes.baseAddress, bytes.count)
    bytes.deallocate()
    OPENSSL_cleanse(derived.baseAddress, derived.count)
    derived.deallocate()
  }

  /// The record key and the check key derived last from this secret, and
  /// the CRYPTO fields (parameters and salt) they were derived for: the
  /// same stream opened again with the same secret (a merge checked, then
  /// run; the fuzz targets, thousands of times) is not derived again, which
  /// for a passphrase is a few tenths of a second of scrypt. Wiped with the
  /// secret.
  /// The fields the keys in `derived` were derived for; its lock guards both.
  private let derivedFor = Locked<[UInt8]>([])
  private let derived = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * StreamCrypto.keyLength, alignment: 16)

  func derivedKeys(for fields: [UInt8]) -> (record: [UInt8], check: [UInt8])? {
    derivedFor.withLock { derivedFor in
      guard !derivedFor.isEmpty, derivedFor == fields else { return nil }
      let n = StreamCrypto.keyLength
      return (Array(derived[0..<n]), Array(derived[n..<2 * n]))
    }
  }

  func remember(_ keys: (record: [UInt8], check: [UInt8]), for fields: [UInt8]) {
    derivedFor.withLock { derivedFor in
      let n = StreamCrypto.keyLength
      UnsafeMutableRawBufferPointer(rebasing: derived[0..<n]).copyBytes(from: keys.record)
      UnsafeMutableRawBufferPointer(rebasing: derived[n..<2 * n]).copyBytes(from: keys.check)
      derivedFor = fields
    }
  }

  /// A 32-byte key given directly (tests, and callers that hold one).
  public convenience init(key: [UInt8], origin: String = "the key") throws {
    guard key.count == StreamCrypto.keyLength else {
      throw ToolkitError("\(origin): a stream key is 32 bytes, not \(key.count)")
    }
    self.init(kind: .key, origin: origin, copying: key)
  }

  /// A passphrase given directly (tests, and callers that hold one).
  public convenience init(passphrase: [UInt8], origin: String = "the passphrase") throws {
    guard !passphrase.isEmpty else { throw ToolkitError("\(origin) is empty") }
    self.init(kind: .passphrase, origin: origin, copying: passphrase)
  }

  /// Reads a key file: exactly 32 raw bytes, or 64 hex digits with at most
  /// one trailing newline. Anything else is refused.
  public static func load(keyFile path: String) throws -> StreamSecret {
    let content = try readSmallFile(path, limit: 4096)
    defer {
      OPENSSL_cleanse(content.baseAddress, content.count)
      content.deallocate()
    }
    let origin = "the key file \(path)"
    if content.count == keyLength {
      return StreamSecret(kind: .key, origin: origin, copying: UnsafeRawBufferPointer(content))
    }
    var digits = content.count
    if digits > 0 && content[digits - 1] == 0x0A { digits -= 1 }
    if digits > 0 && content[digits - 1] == 0x0D { digits -= 1 }
    if digits == keyLength * 2 {
      let key = UnsafeMutableRawBufferPointer.allocate(byteCount: keyLength, alignment: 16)
      defer {
        OPENSSL_cleanse(key.baseAddress, keyLength)
        key.deallocate()
      }
      var ok = true
      for i in 0..<keyLength {
        guard let high = hexValue(content[2 * i]), let low = hexValue(content[2 * i + 1]) else {
          ok = false
          break
        }
        key[i] = high << 4 | low
      }
      if ok { return StreamSecret(kind: .key, origin: origin, copying: UnsafeRawBufferPointer(key)) }
    }
    throw ToolkitError(
      "\(path): a key file holds exactly 32 raw bytes or 64 hex digits (one trailing newline allowed), "
        + "and this one holds \(content.count) bytes that are neither")
  }

  /// Reads a passphrase file: its content, less one trailing newline; not
  /// empty, at most 1024 bytes.
  public static func load(passphraseFile path: String) throws -> StreamSecret {
    let content = try readSmallFile(path, limit: 1026)
    defer {
      OPENSSL_cleanse(content.baseAddress, content.count)
      content.deallocate()
    }
    var length = content.count
    if length > 0 && content[length - 1] == 0x0A { length -= 1 }
    if length > 0 && content[length - 1] == 0x0D { length -= 1 }
    guard length > 0 else { throw ToolkitError("\(path): the passphrase file is empty") }
    guard length <= 1024 else { throw ToolkitError("\(path): a passphrase file holds at most 1024 bytes") }
    return StreamSecret(
      kind: .passphrase, origin: "the passphrase in \(path)",
      copying: UnsafeRawBufferPointer(rebasing: content[0..<length]))
  }

  private static var keyLength: Int { StreamCrypto.keyLength }

  private static func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case 0x30...0x39: return c - 0x30
    case 0x41...0x46: return c - 0x41 + 10
    case 0x61...0x66: return c - 0x61 + 10
    default: return nil
    }
  }

  /// The whole of a small file (a regular file, or a pipe such as /dev/fd/3),
  /// refused when longer than `limit`.
  private static func readSmallFile(_ path: String, limit: Int) throws -> UnsafeMutableRawBufferPointer {
    let fd: Int32
    switch Sys.open(path, flags: O_RDONLY) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, e.description)
    }
    defer { Sys.close(fd) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: limit + 1, alignment: 16)
    let have: Int
    switch readFull(fd, buffer.baseAddress!, limit + 1) {
    case .success(let n): have = n
    case .failure(let e):
      OPENSSL_cleanse(buffer.baseAddress, buffer.count)
      buffer.deallocate()
      throw ToolkitError.path(path, e.description)
    }
    if have > limit {
      OPENSSL_cleanse(buffer.baseAddress, buffer.count)
      buffer.deallocate()
      throw ToolkitError("\(path): the file is longer than \(limit) bytes, too long for a key or passphrase file")
    }
    let out = UnsafeMutableRawBufferPointer.allocate(byteCount: max(have, 1), alignment: 16)
    if have > 0 { out.baseAddress!.copyMemory(from: buffer.baseAddress!, byteCount: have) }
    OPENSSL_cleanse(buffer.baseAddress, buffer.count)
    buffer.deallocate()
    return UnsafeMutableRawBufferPointer(rebasing: out[0..<have])
  }
}

public enum StreamCrypto {
  public static let keyLength = 32
  public static let tagLength = 16
  public static let saltLength = 32
  /// The CRYPTO record's body.
  public static let recordBodyLength = 80
  /// Bytes of the CRYPTO body the key check covers (all before the check).
  static let checkedLength = 48
  /// Cipher identifiers.
  public static let aes256GCM: UInt8 = 1

  /// scrypt parameters of the streams this build writes: N = 2^17, r = 8,
  /// p = 1 (128 MiB and a few tenths of a second per derivation).
  public static let scryptLog2N: UInt8 = 17
  public static let scryptR: UInt32 = 8
  public static let scryptP: UInt32 = 1
  /// The most memory a reader lets a stream's scrypt parameters ask for.
  public static let scryptMemoryLimit: UInt64 = 1 << 30
  /// The most work (N·r·p, which the time grows with) a reader lets a
  /// stream's scrypt parameters ask for: 8 times what this build writes, so
  /// a hostile stream cannot stall a reader for minutes before a wrong key
  /// is reported.
  public static let scryptWorkLimit: UInt64 = 8 << 20

  static let recordKeyInfo = Array("dualrestore-stream v1 record key".utf8)
  static let checkKeyInfo = Array("dualrestore-stream v1 key check".utf8)

  /// The CRYPTO record's fields.
  struct Parameters {
    var cipher: UInt8 = aes256GCM
    var kind: StreamSecret.Kind
    var log2N: UInt8 = 0
    var r: UInt32 = 0
    var p: UInt32 = 0
    var salt: [UInt8]

    /// The first 48 bytes of the body, before the key check.
    var fields: [UInt8] {
      var w = ByteWriter()
      w.u8(cipher)
      w.u8(kind.rawValue)
      w.u8(log2N)
      w.u8(0)
      w.u32(r)
      w.u32(p)
      w.u32(0)
      w.raw(salt)
      return w.bytes
    }
  }

  /// The framing of the CRYPTO record: type 5, critical, 80 bytes, record 0.
  static func cryptoFraming() -> [UInt8] {
    var framing = [UInt8](repeating: 0, count: StreamFormat.recordHeaderLength)
    framing.withUnsafeMutableBytes {
      StreamFormat.storeRecordHeader($0.baseAddress!, type: .crypto, bodyLength: recordBodyLength, sequence: 0)
    }
    return framing
  }

  /// Starts an encrypted stream: the CRYPTO record's body and the cipher
  /// that seals the records after it. A passphrase is stretched here.
  /// The preamble it covers is of format `version`.
  public static func seal(_ secret: StreamSecret, version: UInt16 = StreamFormat.version) throws -> (
    cryptoBody: [UInt8], cipher: RecordCipher
  ) {
    var salt = [UInt8](repeating: 0, count: saltLength)
    guard salt.withUnsafeMutableBufferPointer({ RAND_bytes($0.baseAddress, Int32(saltLength)) }) == 1 else {
      ERR_clear_error()
      throw ToolkitError("OpenSSL's random generator failed to make the stream's salt")
    }
    var parameters = Parameters(kind: secret.kind, salt: salt)
    if secret.kind == .passphrase {
      parameters.log2N = scryptLog2N
      parameters.r = scryptR
      parameters.p = scryptP
    }
    let fields = parameters.fields
    let keys = try deriveKeys(secret, parameters, fields: fields)
    let check = keyCheck(
      checkKey: keys.check, preamble: StreamFormat.preamble(flags: StreamFormat.encryptedFlag, version: version),
      framing: cryptoFraming(), fields: fields)
    return (
      fields + check, try RecordCipher(key: keys.record, encrypting: true, indexKey: indexKey(checkKey: keys.check))
    )
  }

  /// Opens an encrypted stream from its CRYPTO record (whose CRC and place
  /// the parser has checked): the cipher for the records after it, or one
  /// sentence on why it cannot be opened.
  static func open(
    body: UnsafeRawBufferPointer, framing: UnsafeRawBufferPointer, preamble: [UInt8], secret: StreamSecret?
  ) throws -> RecordCipher {
    guard body.count == recordBodyLength else {
      throw ToolkitError("the CRYPTO record has \(body.count) bytes, not \(recordBodyLength)")
    }
    let cipher = body[0]
    let kindRaw = body[1]
    guard cipher == aes256GCM else {
      throw ToolkitError("the stream uses cipher \(cipher), which this build does not know")
    }
    guard let kind = StreamSecret.Kind(rawValue: kindRaw) else {
      throw ToolkitError("the stream's key was given in a way (\(kindRaw)) this build does not know")
    }
    guard let secret else {
      throw ToolkitError(
        kind == .key
          ? "the stream is encrypted with a key file; give it with --key-file FILE"
          : "the stream is encrypted with a passphrase; give it with --passphrase-file FILE")
    }
    guard secret.kind == kind else {
      throw ToolkitError(
        kind == .key
          ? "the stream is encrypted with a key file, not a passphrase; give --key-file FILE instead of --passphrase-file"
          : "the stream is encrypted with a passphrase, not a key file; give --passphrase-file FILE instead of --key-file"
      )
    }
    var parameters = Parameters(kind: kind, salt: Array(body[16..<48]))
    parameters.log2N = body[2]
    parameters.r = body.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian
    parameters.p = body.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
    let reservedZero =
      body[3] == 0 && body.loadUnaligned(fromByteOffset: 12, as: UInt32.self) == 0
    guard reservedZero else { throw ToolkitError("the CRYPTO record's reserved bytes are not zero") }
    if kind == .key {
      guard parameters.log2N == 0, parameters.r == 0, parameters.p == 0 else {
        throw ToolkitError("the CRYPTO record gives scrypt parameters for a key file")
      }
    } else {
      let (log2N, r, p) = (UInt64(parameters.log2N), UInt64(parameters.r), UInt64(parameters.p))
      guard log2N >= 1, log2N <= 40, r >= 1, r <= 64, p >= 1, p <= 64 else {
        throw ToolkitError("the stream's scrypt parameters (N 2^\(log2N), r \(r), p \(p)) are out of range")
      }
      let memory = 128 * r * (UInt64(1) << log2N)
      guard memory <= scryptMemoryLimit else {
        throw ToolkitError(
          "the stream's scrypt parameters need \(memory >> 20) MiB, more than the \(scryptMemoryLimit >> 20) MiB this build allows"
        )
      }
      let work = (UInt64(1) << log2N) * r * p
      guard work <= scryptWorkLimit else {
        throw ToolkitError(
          "the stream's scrypt parameters (N 2^\(log2N), r \(r), p \(p)) ask for more work than this build allows (N·r·p at most 2^23)"
        )
      }
    }
    // With the reserved bytes zero, these are the parameters' fields.
    let fields = Array(body[0..<checkedLength])
    let keys = try deriveKeys(secret, parameters, fields: fields)
    let expected = keyCheck(checkKey: keys.check, preamble: preamble, framing: Array(framing), fields: fields)
    let matches = expected.withUnsafeBytes { e in
      CRYPTO_memcmp(e.baseAddress, body.baseAddress! + checkedLength, 32) == 0
    }
    guard matches else {
      throw ToolkitError(
        "wrong key: \(secret.origin) does not open this stream (or its CRYPTO record was altered)")
    }
    return try RecordCipher(key: keys.record, encrypting: false, indexKey: indexKey(checkKey: keys.check))
  }

  static let indexKeyInfo = Array("dualrestore-index v1 key".utf8)

  /// The key that authenticates the stream's index (dualrestore-index(5)):
  /// HMAC-SHA256 of a label under the check key, so an index is bound to
  /// the stream's key and salt and cannot be made without the key.
  static func indexKey(checkKey: [UInt8]) -> [UInt8] { hmac(key: checkKey, indexKeyInfo) }

  /// HMAC-SHA256 of `message` under `key`; all zeros if OpenSSL fails,
  /// which no check matches by chance.
  package static func hmac(key: [UInt8], _ message: [UInt8]) -> [UInt8] {
    message.withUnsafeBytes { hmac(key: key, $0) }
  }

  package static func hmac(key: [UInt8], _ m: UnsafeRawBufferPointer) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    let ok = out.withUnsafeMutableBytes { o in
      key.withUnsafeBytes { k in
        dr_hmac_sha256(
          hmacAlgorithm, k.baseAddress?.assumingMemoryBound(to: UInt8.self), k.count,
          m.baseAddress?.assumingMemoryBound(to: UInt8.self), m.count,
          o.baseAddress?.assumingMemoryBound(to: UInt8.self))
      }
    }
    if ok != 1 {
      ERR_clear_error()
      return [UInt8](repeating: 0, count: 32)
    }
    return out
  }

  /// The record key and the check key of a stream.
  /// `fields` are `p.fields`, when the caller has them already.
  static func deriveKeys(_ secret: StreamSecret, _ p: Parameters, fields: [UInt8]? = nil) throws -> (
    record: [UInt8], check: [UInt8]
  ) {
    let fields = fields ?? p.fields
    if let keys = secret.derivedKeys(for: fields) { return keys }
    let keys = try deriveNewKeys(secret, p)
    secret.remember(keys, for: fields)
    return keys
  }

  private static func deriveNewKeys(_ secret: StreamSecret, _ p: Parameters) throws -> (
    record: [UInt8], check: [UInt8]
  ) {
    var master = [UInt8](repeating: 0, count: keyLength)
    defer { master.withUnsafeMutableBytes { OPENSSL_cleanse($0.baseAddress, $0.count) } }
    let source = secret.material
    switch secret.kind {
    case .key:
      guard source.count == keyLength else { throw ToolkitError("\(secret.origin): a stream key is 32 bytes") }
      master.withUnsafeMutableBytes { $0.copyMemory(from: source) }
    case .passphrase:
      let memory = 128 * UInt64(p.r) * (UInt64(1) << UInt64(p.log2N)) + 128 * UInt64(p.r) * UInt64(p.p)
      let ok = master.withUnsafeMutableBytes { out in
        p.salt.withUnsafeBytes { salt in
          dr_scrypt(
            source.baseAddress?.assumingMemoryBound(to: UInt8.self), source.count,
            salt.baseAddress?.assumingMemoryBound(to: UInt8.self), salt.count, UInt64(1) << UInt64(p.log2N), p.r, p.p,
            memory + (64 << 20), out.baseAddress?.assumingMemoryBound(to: UInt8.self), keyLength)
        }
      }
      guard ok == 1 else {
        ERR_clear_error()
        throw ToolkitError("scrypt failed to derive the key from \(secret.origin) (out of memory?)")
      }
    }
    func hkdf(_ info: [UInt8]) throws -> [UInt8] {
      var out = [UInt8](repeating: 0, count: keyLength)
      let ok = out.withUnsafeMutableBytes { o in
        master.withUnsafeBytes { m in
          p.salt.withUnsafeBytes { s in
            info.withUnsafeBytes { i in
              dr_hkdf_sha256(
                hkdfAlgorithm, m.baseAddress?.assumingMemoryBound(to: UInt8.self), m.count,
                s.baseAddress?.assumingMemoryBound(to: UInt8.self), s.count,
                i.baseAddress?.assumingMemoryBound(to: UInt8.self), i.count,
                o.baseAddress?.assumingMemoryBound(to: UInt8.self), o.count)
            }
          }
        }
      }
      guard ok == 1 else {
        ERR_clear_error()
        throw ToolkitError("OpenSSL's HKDF failed to derive the stream's keys")
      }
      return out
    }
    return (try hkdf(recordKeyInfo), try hkdf(checkKeyInfo))
  }

  /// HMAC-SHA256 of the preamble, the CRYPTO framing and its fields. A
  /// failure inside OpenSSL leaves it all zeros, which no stream carries by
  /// chance, so the check then fails as a wrong key would.
  static func keyCheck(checkKey: [UInt8], preamble: [UInt8], framing: [UInt8], fields: [UInt8]) -> [UInt8] {
    hmac(key: checkKey, preamble + framing + fields)
  }

  /// OpenSSL's HKDF and HMAC, fetched once: a fetch searches the providers
  /// and costs more than the derivation it is for.
  nonisolated(unsafe) private static let hkdfAlgorithm: OpaquePointer? = EVP_KDF_fetch(nil, "HKDF", nil)
  nonisolated(unsafe) private static let hmacAlgorithm: OpaquePointer? = EVP_MAC_fetch(nil, "HMAC", nil)
}

/// AES-256-GCM for the records of one stream: one EVP context, keyed once
/// and reused for every record (only the nonce changes), so sealing and
/// opening allocate nothing. One thread uses it at a time.
// @unchecked Sendable: handed between threads, used by one at a time (the stream's reader or writer owns it).
public final class RecordCipher: @unchecked Sendable {
  nonisolated(unsafe) private static let algorithm: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-GCM", nil)

  private let ctx: OpaquePointer
  private let encrypting: Bool
  /// The record key, kept to make another cipher for another thread.
  private let key: [UInt8]
  /// The key of the stream's index's HMAC (dualrestore-index(5)).
  package let indexKey: [UInt8]
  private let nonce = UnsafeMutableRawPointer.allocate(byteCount: 12, alignment: 16)
  /// Where `open` puts plaintext bodies; grows to the largest record seen.
  private var plain: UnsafeMutableRawPointer
  private var plainCapacity: Int

  init(key: [UInt8], encrypting: Bool, indexKey: [UInt8] = []) throws {
    guard let algorithm = RecordCipher.algorithm, let ctx = EVP_CIPHER_CTX_new() else {
      ERR_clear_error()
      throw ToolkitError("OpenSSL has no AES-256-GCM")
    }
    self.ctx = ctx
    self.encrypting = encrypting
    self.key = key
    self.indexKey = indexKey
    plainCapacity = 0
    plain = .allocate(byteCount: 1, alignment: 16)
    nonce.initializeMemory(as: UInt8.self, repeating: 0, count: 12)
    let ok = key.withUnsafeBytes { k in
      EVP_CipherInit_ex2(
        ctx, algorithm, k.baseAddress?.assumingMemoryBound(to: UInt8.self), nil, encrypting ? 1 : 0, nil)
    }
    guard ok == 1 else {
      ERR_clear_error()
      throw ToolkitError("OpenSSL could not set up AES-256-GCM")
    }
  }

  deinit {
    EVP_CIPHER_CTX_free(ctx)
    nonce.deallocate()
    OPENSSL_cleanse(plain, plainCapacity)
    plain.deallocate()
  }

  /// A cipher of its own for another thread, with the same key.
  package func another() throws -> RecordCipher {
    try RecordCipher(key: key, encrypting: encrypting, indexKey: indexKey)
  }

  /// Starts a record: the nonce from its sequence number, its 16 framing bytes as AAD.
  @inline(__always)
  func begin(framing: UnsafeRawPointer) {
    (nonce + 4).copyMemory(from: framing + 8, byteCount: 8)
    EVP_CipherInit_ex2(ctx, nil, nil, nonce.assumingMemoryBound(to: UInt8.self), encrypting ? 1 : 0, nil)
    var n: Int32 = 0
    EVP_CipherUpdate(ctx, nil, &n, framing.assumingMemoryBound(to: UInt8.self), Int32(StreamFormat.recordHeaderLength))
  }

  /// Encrypts or decrypts `count` bytes (in place when `input == output`).
  @inline(__always)
  func update(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, count: Int) {
    guard count > 0 else { return }
    var n: Int32 = 0
    EVP_CipherUpdate(
      ctx, output.assumingMemoryBound(to: UInt8.self), &n, input.assumingMemoryBound(to: UInt8.self), Int32(count))
  }

  /// Ends a sealed record: writes its 16-byte tag.
  @inline(__always)
  func seal(tag: UnsafeMutableRawPointer) {
    var n: Int32 = 0
    EVP_CipherFinal_ex(ctx, nil, &n)
    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, Int32(StreamCrypto.tagLength), tag)
  }

  /// A whole encrypted record from a plaintext body: framing, ciphertext,
  /// tag, CRC-32C.
  package func sealedRecord(_ type: StreamFormat.RecordType, sequence: UInt64, body: [UInt8]) -> [UInt8] {
    let bodyLength = body.count + StreamCrypto.tagLength
    let header = StreamFormat.recordHeaderLength
    var out = [UInt8](repeating: 0, count: header + bodyLength + StreamFormat.recordTrailerLength)
    out.withUnsafeMutableBytes { raw in
      let base = raw.baseAddress!
      StreamFormat.storeRecordHeader(base, type: type, bodyLength: bodyLength, sequence: sequence)
      begin(framing: base)
      body.withUnsafeBytes { b in
        if let bb = b.baseAddress { update(bb, base + header, count: b.count) }
      }
      seal(tag: base + header + body.count)
      let crc = dr_crc32c(0, base, header + bodyLength)
      (base + header + bodyLength).storeBytes(of: crc.littleEndian, as: UInt32.self)
    }
    return out
  }

  /// Opens a record's body (ciphertext and tag) into a buffer of the
  /// cipher's own, valid until the next call; nil when the tag does not match.
  func open(framing: UnsafeRawPointer, body: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
    let length = body.count - StreamCrypto.tagLength
    guard length >= 0, let base = body.baseAddress else { return nil }
    if length > plainCapacity {
      let capacity = max(length, min(plainCapacity * 2, StreamFormat.maximumBodyLength))
      OPENSSL_cleanse(plain, plainCapacity)
      plain.deallocate()
      plain = .allocate(byteCount: capacity, alignment: 4096)
      plainCapacity = capacity
    }
    begin(framing: framing)
    update(base, plain, count: length)
    EVP_CIPHER_CTX_ctrl(
      ctx, EVP_CTRL_AEAD_SET_TAG, Int32(StreamCrypto.tagLength), UnsafeMutableRawPointer(mutating: base + length))
    var n: Int32 = 0
    guard EVP_CipherFinal_ex(ctx, plain.assumingMemoryBound(to: UInt8.self) + length, &n) == 1 else {
      ERR_clear_error()
      return nil
    }
    return UnsafeRawBufferPointer(start: plain, count: length)
  }
}
