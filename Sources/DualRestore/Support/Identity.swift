// Identities and instants that the formats carry so that two artefacts can be
// checked to fit: a 128-bit random id and a UTC instant in nanoseconds.

import COpenSSL
import CShim
import Glibc

/// A 128-bit random identifier, shown as 32 lowercase hex digits.
public struct ID128: Hashable, Sendable, CustomStringConvertible {
  public var high: UInt64
  public var low: UInt64

  public init(high: UInt64, low: UInt64) {
    self.high = high
    self.low = low
  }

  /// The all-zero id, which the formats use for "none".
  public static let none = ID128(high: 0, low: 0)
  public var isNone: Bool { high == 0 && low == 0 }

  /// A fresh random id from OpenSSL's generator.
  public static func random() -> ID128 {
    var bytes = [UInt8](repeating: 0, count: 16)
    while true {
      let ok = bytes.withUnsafeMutableBufferPointer { RAND_bytes($0.baseAddress, 16) } == 1
      if !ok {
        // Fall back to the kernel's generator; it does not fail once seeded.
        _ = bytes.withUnsafeMutableBufferPointer { dr_getrandom($0.baseAddress, 16) }
      }
      let id = ID128(bytes: bytes[...])
      if !id.isNone { return id }
    }
  }

  /// Reads 16 bytes, most significant first.
  public init(bytes: ArraySlice<UInt8>) {
    precondition(bytes.count == 16)
    var h: UInt64 = 0
    var l: UInt64 = 0
    for (i, b) in bytes.enumerated() {
      if i < 8 { h = h << 8 | UInt64(b) } else { l = l << 8 | UInt64(b) }
    }
    high = h
    low = l
  }

  /// Parses 32 hex digits (dashes allowed, as in a UUID).
  public init?(hex: String) {
    let digits = hex.filter { $0 != "-" }
    guard digits.count == 32, digits.allSatisfy(\.isHexDigit), let h = UInt64(digits.prefix(16), radix: 16),
      let l = UInt64(digits.suffix(16), radix: 16)
    else { return nil }
    high = h
    low = l
  }

  public var bytes: [UInt8] {
    (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64($0))) }
      + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64($0))) }
  }

  public var description: String {
    func hex16(_ v: UInt64) -> String {
      let s = String(v, radix: 16)
      return String(repeating: "0", count: 16 - s.count) + s
    }
    return hex16(high) + hex16(low)
  }
}

/// A UTC instant as nanoseconds since the Unix epoch.
public struct Instant: Hashable, Comparable, Sendable, CustomStringConvertible {
  public var nanosecondsSinceEpoch: Int64

  public init(nanosecondsSinceEpoch: Int64) {
    self.nanosecondsSinceEpoch = nanosecondsSinceEpoch
  }

  /// "Never", which the formats store as 0.
  public static let unset = Instant(nanosecondsSinceEpoch: 0)

  public static func now() -> Instant {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Instant(nanosecondsSinceEpoch: Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec))
  }

  /// Seconds from this instant until now.
  public var secondsAgo: Double {
    Double(Instant.now().nanosecondsSinceEpoch - nanosecondsSinceEpoch) / 1e9
  }

  public static func < (a: Instant, b: Instant) -> Bool {
    a.nanosecondsSinceEpoch < b.nanosecondsSinceEpoch
  }

  /// RFC 3339 in UTC with millisecond precision: `2026-11-21T21:14:04.123Z`.
  public var description: String {
    if self == .unset { return "unset" }
    // Round toward the past, so instants before 1970 print correctly.
    var wholeSeconds = nanosecondsSinceEpoch / 1_000_000_000
    var rest = nanosecondsSinceEpoch % 1_000_000_000
    if rest < 0 {
      wholeSeconds -= 1
      rest += 1_000_000_000
    }
    var seconds = time_t(wholeSeconds)
    let millis = rest / 1_000_000
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func pad(_ v: Int32, _ width: Int) -> String {
      let s = String(v)
      return String(repeating: "0", count: max(0, width - s.count)) + s
    }
    return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))"
      + "T\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2))"
      + ".\(pad(Int32(millis), 3))Z"
  }
}
