// ID128 and Instant: hex forms, randomness, RFC 3339 rendering.

import Foundation
import TestSupport
import XCTest

@testable import DualRestore

final class IdentityTests: XCTestCase {
  // MARK: ID128

  func testHexRoundTrip() {
    let seed = testSeed(81)
    var g = SplitMix64(seed: seed)
    var ids = [ID128.none, ID128(high: 0, low: 1), ID128(high: 1, low: 0), ID128(high: .max, low: .max)]
    for _ in 0..<500 { ids.append(ID128(high: g.next() >> (g.next() % 64), low: g.next() >> (g.next() % 64))) }
    let hexDigits = Set("0123456789abcdef")
    for id in ids {
      let hex = id.description
      XCTAssertEqual(hex.count, 32, "seed \(seed): \(hex)")
      XCTAssertTrue(hex.allSatisfy { hexDigits.contains($0) }, "seed \(seed): \(hex)")
      XCTAssertEqual(ID128(hex: hex), id, "seed \(seed): \(hex)")
      XCTAssertEqual(ID128(hex: hex.uppercased()), id, "seed \(seed): \(hex)")
      // As a UUID, with dashes.
      let c = Array(hex)
      let uuid =
        String(c[0..<8]) + "-" + String(c[8..<12]) + "-" + String(c[12..<16]) + "-" + String(c[16..<20]) + "-"
        + String(c[20..<32])
      XCTAssertEqual(ID128(hex: uuid), id, "seed \(seed): \(uuid)")
      // Bytes: big-endian, 16 of them, and back.
      let bytes = id.bytes
      XCTAssertEqual(bytes.count, 16)
      XCTAssertEqual(bytes.map { String(format: "%02x", $0) }.joined(), hex, "seed \(seed)")
      XCTAssertEqual(ID128(bytes: bytes[...]), id, "seed \(seed)")
    }
    XCTAssertEqual(ID128(high: 0, low: 1).description, String(repeating: "0", count: 31) + "1")
    XCTAssertEqual(
      ID128(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210).description, "0123456789abcdeffedcba9876543210")
    XCTAssertEqual(
      ID128(hex: "01234567-89ab-cdef-FEDC-BA9876543210"), ID128(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)
    )
    // Bytes from a slice that does not start at 0.
    let padded: [UInt8] = [9, 9] + (1...16).map { UInt8($0) }
    XCTAssertEqual(ID128(bytes: padded[2...]), ID128(high: 0x0102_0304_0506_0708, low: 0x090A_0B0C_0D0E_0F10))
  }

  func testMalformedHexIsRefused() {
    let good = "0123456789abcdef0123456789abcdef"
    let bad = [
      "", String(good.dropLast()), good + "0", "0123456789abcdeg0123456789abcdef", " " + String(good.dropFirst()),
      "0123456789abcdef 123456789abcdef", "0x23456789abcdef0123456789abcdef", String(repeating: "z", count: 32),
    ]
    for text in bad {
      XCTAssertNil(ID128(hex: text), text.debugDescription)
    }
  }

  /// A sign is not a hex digit: "+" must not pass as one of the 32 digits.
  func testSignsAreNotHexDigits() {
    XCTAssertNil(ID128(hex: "+123456789abcdef0123456789abcdef"))
    XCTAssertNil(ID128(hex: "0123456789abcdef+123456789abcdef"))
  }

  func testRandomIDsDifferAndAreNotNone() {
    var seen = Set<ID128>()
    for _ in 0..<2000 {
      let id = ID128.random()
      XCTAssertFalse(id.isNone)
      XCTAssertNotEqual(id, .none)
      seen.insert(id)
    }
    XCTAssertEqual(seen.count, 2000, "random ids repeat")
    // Both halves carry randomness.
    XCTAssertGreaterThan(Set(seen.map { $0.high }).count, 1990)
    XCTAssertGreaterThan(Set(seen.map { $0.low }).count, 1990)
    XCTAssertTrue(ID128.none.isNone)
    XCTAssertFalse(ID128(high: 0, low: 1).isNone)
    XCTAssertFalse(ID128(high: 1, low: 0).isNone)
    XCTAssertEqual(ID128.none.description, String(repeating: "0", count: 32))
  }

  // MARK: Instant

  /// RFC 3339, UTC, milliseconds (truncated), computed here from the
  /// civil-from-days algorithm with floor division.
  private func rfc3339(_ ns: Int64) -> String {
    func floorDiv(_ a: Int64, _ b: Int64) -> Int64 { a >= 0 ? a / b : -((-a + b - 1) / b) }
    let seconds = floorDiv(ns, 1_000_000_000)
    let millis = (ns - seconds * 1_000_000_000) / 1_000_000
    let days = floorDiv(seconds, 86400)
    let secondOfDay = seconds - days * 86400
    let z = days + 719_468
    let era = (z >= 0 ? z : z - 146_096) / 146_097
    let doe = z - era * 146_097
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
    let mp = (5 * doy + 2) / 153
    let day = doy - (153 * mp + 2) / 5 + 1
    let month = mp < 10 ? mp + 3 : mp - 9
    let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
    return String(
      format: "%04lld-%02lld-%02lldT%02lld:%02lld:%02lld.%03lldZ", year, month, day, secondOfDay / 3600,
      secondOfDay / 60 % 60, secondOfDay % 60, millis)
  }

  func testInstantDescriptionKnownValues() {
    XCTAssertEqual(Instant.unset.description, "unset")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 0).description, "unset")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 1).description, "1970-01-01T00:00:00.000Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 1_000_000_000_000_000_000).description, "2001-09-09T01:46:40.000Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 1_000_000_000_123_456_789).description, "2001-09-09T01:46:40.123Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 951_782_400_999_999_999).description, "2000-02-29T00:00:00.999Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 1_735_689_599_000_000_000).description, "2024-12-31T23:59:59.000Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: 4_102_444_800_005_000_000).description, "2100-01-01T00:00:00.005Z")
  }

  func testInstantDescriptionMatchesRFC3339() {
    let seed = testSeed(82)
    var g = SplitMix64(seed: seed)
    let pattern = try! NSRegularExpression(pattern: #"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"#)
    // Every positive Int64 nanosecond count (up to the year 2262).
    for _ in 0..<3000 {
      let ns = Int64(g.next() % UInt64(Int64.max)) + 1
      let text = Instant(nanosecondsSinceEpoch: ns).description
      XCTAssertEqual(text, rfc3339(ns), "seed \(seed): \(ns)")
      XCTAssertEqual(
        pattern.numberOfMatches(in: text, range: NSRange(text.startIndex..., in: text)), 1, "seed \(seed): \(text)")
    }
    let now = Instant.now()
    XCTAssertEqual(now.description, rfc3339(now.nanosecondsSinceEpoch))
    XCTAssertGreaterThan(now, Instant(nanosecondsSinceEpoch: 1_700_000_000_000_000_000))
    XCTAssertLessThan(Instant.unset, now)
  }

  /// Instants before 1970 are representable (Int64) and must print as the
  /// right RFC 3339 time, not with a negative fraction.
  func testInstantDescriptionBeforeTheEpoch() {
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: -1).description, "1969-12-31T23:59:59.999Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: -1_500_000_000).description, "1969-12-31T23:59:58.500Z")
    XCTAssertEqual(Instant(nanosecondsSinceEpoch: -86_400_000_000_000).description, "1969-12-31T00:00:00.000Z")
  }
}
