// Byte counts as people write them and as the tools print them.

import TestSupport
import XCTest

@testable import DualRestore

final class UnitsTests: XCTestCase {
  func testParseDocumentedForms() {
    let cases: [(String, UInt64)] = [
      ("0", 0),
      ("4096", 4096),
      ("512B", 512),
      ("64K", 64 * 1024),
      ("64KiB", 64 * 1024),
      ("1M", 1024 * 1024),
      ("1MiB", 1024 * 1024),
      ("1G", 1024 * 1024 * 1024),
      ("3GiB", 3 * 1024 * 1024 * 1024),
      ("1T", 1024 * 1024 * 1024 * 1024),
      ("2TiB", 2 * 1024 * 1024 * 1024 * 1024),
      ("1P", 1024 * 1024 * 1024 * 1024 * 1024),
      ("1PiB", 1024 * 1024 * 1024 * 1024 * 1024),
      ("10KB", 10_000),
      ("2MB", 2_000_000),
      ("5GB", 5_000_000_000),
      ("7TB", 7_000_000_000_000),
      ("1PB", 1_000_000_000_000_000),
      (" 64K\t", 64 * 1024),
      ("18446744073709551615", UInt64.max),
      ("18446744073709551615B", UInt64.max),
      ("16383P", 16383 * 1024 * 1024 * 1024 * 1024 * 1024),
      ("18446744073709551KB", 18_446_744_073_709_551_000),
    ]
    for (text, expected) in cases {
      XCTAssertEqual(parseByteCount(text), expected, text.debugDescription)
    }
  }

  func testParseRefusesGarbageAndOverflow() {
    let bad = [
      "", " ", "abc", "K", "KiB", "64X", "64KX", "64KIBB", "64KBB", "64Ki", "1.5G", "-1", "+-1", "0x100", "64 K!",
      "1E", "1EiB", "1EB", "١٢", "６４K",
      // Overflow.
      "99999999999P", "16384P", "16384PiB", "18446744073709551616", "18446744073709552KB", "18446744073709551615K",
      "99999999999999999999999",
    ]
    for text in bad {
      XCTAssertNil(parseByteCount(text), text.debugDescription)
    }
  }

  func testParseRandomNumbersAndUnits() {
    let seed = testSeed(71)
    var g = SplitMix64(seed: seed)
    let units: [(String, UInt64)] = [
      ("", 1), ("B", 1), ("K", 1 << 10), ("KiB", 1 << 10), ("M", 1 << 20), ("MiB", 1 << 20), ("G", 1 << 30),
      ("GiB", 1 << 30), ("T", 1 << 40), ("TiB", 1 << 40), ("P", 1 << 50), ("PiB", 1 << 50), ("KB", 1000),
      ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000), ("PB", 1_000_000_000_000_000),
    ]
    for _ in 0..<2000 {
      let number = g.next() >> (g.next() % 64)
      let (unit, multiplier) = units[Int(g.next() % UInt64(units.count))]
      let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
      let text = "\(number)\(unit)"
      XCTAssertEqual(parseByteCount(text), overflow ? nil : product, "seed \(seed): \(text)")
    }
  }

  /// The examples in formatBytes's doc comment.
  func testFormatBytesDocumentedExamples() {
    XCTAssertEqual(formatBytes(65536), "64 KiB")
    XCTAssertEqual(formatBytes(1000), "1000 B")
    XCTAssertEqual(formatBytes(1536), "1.5 KiB")
  }

  func testFormatBytesExactAndSmallValues() {
    XCTAssertEqual(formatBytes(0), "0 B")
    XCTAssertEqual(formatBytes(1), "1 B")
    XCTAssertEqual(formatBytes(1023), "1023 B")
    XCTAssertEqual(formatBytes(1024), "1 KiB")
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    for (i, unit) in units.enumerated() {
      let one = UInt64(1) << (10 * UInt64(i + 1))
      XCTAssertEqual(formatBytes(one), "1 \(unit)")
      XCTAssertEqual(formatBytes(3 * one), "3 \(unit)")
      if i < 5 { XCTAssertEqual(formatBytes(512 * one), "512 \(unit)") }
    }
    XCTAssertEqual(formatBytes(64 << 20), "64 MiB")
    XCTAssertEqual(formatBytes(16 << 40), "16 TiB")
  }

  /// Any value prints as a number and a unit that together are within 1% of it.
  func testFormatBytesIsCloseToTheValue() {
    let seed = testSeed(72)
    var g = SplitMix64(seed: seed)
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    for _ in 0..<3000 {
      let value = g.next() >> (g.next() % 64)
      let text = formatBytes(value)
      let parts = text.split(separator: " ")
      guard parts.count == 2, let number = Double(parts[0]), let index = units.firstIndex(of: String(parts[1])) else {
        XCTFail("seed \(seed): \(value) printed as \(text.debugDescription)")
        continue
      }
      if value < 1024 {
        XCTAssertEqual(text, "\(value) B", "seed \(seed)")
        continue
      }
      // The largest unit not above the value.
      var expectedIndex = 0
      while expectedIndex < 6 && value >> (10 * UInt64(expectedIndex + 1)) > 0 { expectedIndex += 1 }
      XCTAssertEqual(index, expectedIndex, "seed \(seed): \(value) printed as \(text)")
      let shown = number * pow(1024, Double(index))
      XCTAssertEqual(shown / Double(value), 1, accuracy: 0.01, "seed \(seed): \(value) printed as \(text)")
      XCTAssertLessThanOrEqual(number, 1024, "seed \(seed): \(text)")
      XCTAssertGreaterThanOrEqual(number, 1, "seed \(seed): \(text)")
    }
  }

  func testFormatFixed() {
    XCTAssertEqual(formatFixed(3.14159, digits: 2), "3.14")
    XCTAssertEqual(formatFixed(2, digits: 0), "2")
    XCTAssertEqual(formatFixed(2.5, digits: 0), "3")
    XCTAssertEqual(formatFixed(-2.5, digits: 0), "-3")
    XCTAssertEqual(formatFixed(0.001, digits: 3), "0.001")
    XCTAssertEqual(formatFixed(0.04, digits: 1), "0.0")
    XCTAssertEqual(formatFixed(-0.04, digits: 1), "0.0")
    XCTAssertEqual(formatFixed(-1.25, digits: 1), "-1.3")
    XCTAssertEqual(formatFixed(99.99, digits: 1), "100.0")
    XCTAssertEqual(formatFixed(100, digits: 1), "100.0")
    XCTAssertEqual(formatFixed(7.5, digits: 3), "7.500")
  }
}
