// Little-endian encoding into and out of byte arrays, for headers and
// trailers. Bulk payloads never pass through here.

/// Appends fixed-width little-endian fields and LEB128 varints to a byte array.
public struct ByteWriter {
  public var bytes: [UInt8] = []
  public init() {}

  public mutating func u8(_ v: UInt8) { bytes.append(v) }
  public mutating func u16(_ v: UInt16) { le(UInt64(v), 2) }
  public mutating func u32(_ v: UInt32) { le(UInt64(v), 4) }
  public mutating func u64(_ v: UInt64) { le(v, 8) }
  public mutating func i64(_ v: Int64) { le(UInt64(bitPattern: v), 8) }
  public mutating func id(_ v: ID128) { bytes.append(contentsOf: v.bytes) }
  public mutating func raw(_ v: some Collection<UInt8>) { bytes.append(contentsOf: v) }
  public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

  /// A string as a 16-bit length and UTF-8 bytes, cut at `limit` bytes.
  public mutating func string16(_ s: String, limit: Int) {
    let full = Array(s.utf8)
    // Never cut inside a character: back up while the first byte left out
    // continues the character before it.
    var n = min(limit, full.count)
    while n > 0 && n < full.count && full[n] & 0xC0 == 0x80 { n -= 1 }
    let utf8 = full[0..<n]
    u16(UInt16(utf8.count))
    bytes.append(contentsOf: utf8)
  }

  public mutating func varint(_ v: UInt64) {
    var v = v
    while v >= 0x80 {
      bytes.append(UInt8(truncatingIfNeeded: v) | 0x80)
      v >>= 7
    }
    bytes.append(UInt8(v))
  }

  private mutating func le(_ v: UInt64, _ width: Int) {
    for i in 0..<width { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
  }
}

/// Reads fields written by `ByteWriter`; every read is bounds-checked and
/// returns nil past the end instead of trapping.
public struct ByteReader {
  public let bytes: ArraySlice<UInt8>
  public private(set) var position: Int

  public init(_ bytes: ArraySlice<UInt8>) {
    self.bytes = bytes
    self.position = bytes.startIndex
  }

  public var remaining: Int { bytes.endIndex - position }
  public var offset: Int { position - bytes.startIndex }

  public mutating func u8() -> UInt8? { le(1).map { UInt8($0) } }
  public mutating func u16() -> UInt16? { le(2).map { UInt16($0) } }
  public mutating func u32() -> UInt32? { le(4).map { UInt32($0) } }
  public mutating func u64() -> UInt64? { le(8) }
  public mutating func i64() -> Int64? { le(8).map { Int64(bitPattern: $0) } }

  public mutating func id() -> ID128? {
    guard let raw = take(16) else { return nil }
    return ID128(bytes: raw)
  }

  public mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
    guard n >= 0, remaining >= n else { return nil }
    defer { position += n }
    return bytes[position..<position + n]
  }

  public mutating func string16() -> String? {
    guard let n = u16(), let raw = take(Int(n)) else { return nil }
    return String(decoding: raw, as: UTF8.self)
  }

  public mutating func varint() -> UInt64? {
    var result: UInt64 = 0
    var shift: UInt64 = 0
    while true {
      guard let b = u8() else { return nil }
      if shift == 63 && b > 1 { return nil }
      result |= UInt64(b & 0x7F) << shift
      if b & 0x80 == 0 { return result }
      shift += 7
      if shift > 63 { return nil }
    }
  }

  private mutating func le(_ width: Int) -> UInt64? {
    guard let raw = take(width) else { return nil }
    var v: UInt64 = 0
    for (i, b) in raw.enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
    return v
  }
}
