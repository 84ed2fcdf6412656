// The sample of bitmap-diff --signature --sample: the documented function
// (output b of SplitMix64 seeded with N, below ⌊FRACTION × 2^64⌋) pinned to
// the reference generator; fractions and seeds parsed or refused in one
// sentence; and the statistics that make sampling worth it: about
// FRACTION × n blocks a seed, independent of their place and of other
// seeds, so k seeds cover about 1 - (1 - FRACTION)^k of the device.
// The seeds are fixed: the bounds are several standard deviations wide and
// hold for these seeds every run.

import Foundation
import TestSupport
import XCTest

@testable import DualRestore

final class BlockSampleTests: XCTestCase {
  private func sample(_ fraction: String, _ seed: UInt64) throws -> BlockSample {
    BlockSample(fraction: try BlockSample.Fraction(parsing: fraction), seed: seed)
  }

  // MARK: The function

  /// Output b of SplitMix64 seeded with N: the reference values of
  /// splitmix64.c, and the test generator's sequence, block by block.
  func testTheHashIsSplitMix64() {
    XCTAssertEqual(BlockSample.hash(seed: 1_234_567, block: 0), 6_457_827_717_110_365_317)
    XCTAssertEqual(BlockSample.hash(seed: 1_234_567, block: 1), 3_203_168_211_198_807_973)
    XCTAssertEqual(BlockSample.hash(seed: 1_234_567, block: 2), 9_817_491_932_198_370_423)
    for seed: UInt64 in [0, 1, 42, 0xFFFF_FFFF_FFFF_FFFF] {
      var g = SplitMix64(seed: seed)
      for block: UInt64 in 0..<1000 { XCTAssertEqual(BlockSample.hash(seed: seed, block: block), g.next()) }
    }
    // Far blocks without walking the sequence (the wrap of the state is defined).
    let far: UInt64 = 1 << 40
    var g = SplitMix64(seed: 9 &+ far &* 0x9E37_79B9_7F4A_7C15)
    XCTAssertEqual(BlockSample.hash(seed: 9, block: far), g.next())
  }

  /// The bitmap a sample draws is, bit for bit, `contains` of each block,
  /// which is the hash below the threshold; at every size around a word.
  func testSelectionIsTheHashBelowTheThreshold() throws {
    for fraction in ["1/2", "1/1000", "0.3", "1"] {
      let s = try sample(fraction, 77)
      let t = s.fraction.threshold
      for count: UInt64 in [0, 1, 63, 64, 65, 127, 128, 129, 5000] {
        let bits = s.selection(blockCount: count)
        XCTAssertEqual(bits.count, count)
        for b in 0..<count {
          XCTAssertEqual(bits[b], s.contains(b), "\(fraction), block \(b) of \(count)")
          XCTAssertEqual(bits[b], t.map { BlockSample.hash(seed: 77, block: b) < $0 } ?? true)
        }
        // A longer device starts with the same choices: each depends on its block alone.
        let longer = s.selection(blockCount: count + 100)
        for b in 0..<count { XCTAssertEqual(longer[b], bits[b]) }
      }
    }
    XCTAssertEqual(try sample("1", 5).selection(blockCount: 1000).population, 1000)
  }

  /// ⌊p × 2^64 / q⌋ exactly, from fractions in lowest terms.
  func testThresholdsAreExact() throws {
    func t(_ text: String) throws -> UInt64? { try BlockSample.Fraction(parsing: text).threshold }
    XCTAssertEqual(try t("1/2"), 1 << 63)
    XCTAssertEqual(try t("0.5"), 1 << 63)
    XCTAssertEqual(try t(".5"), 1 << 63)
    XCTAssertEqual(try t("2/4"), 1 << 63)
    XCTAssertEqual(try t("1/4"), 1 << 62)
    XCTAssertEqual(try t("1/1000"), 18_446_744_073_709_551)
    XCTAssertEqual(try t("0.001"), 18_446_744_073_709_551)
    XCTAssertEqual(try t("0.0010000"), 18_446_744_073_709_551)
    XCTAssertEqual(try t("1/3"), 6_148_914_691_236_517_205)
    XCTAssertEqual(try t("2/3"), 12_297_829_382_473_034_410)
    XCTAssertEqual(try t("1/18446744073709551615"), 1)
    XCTAssertEqual(try t("18446744073709551614/18446744073709551615"), 0xFFFF_FFFF_FFFF_FFFE)
    XCTAssertNil(try t("1"))
    XCTAssertNil(try t("1.000"))
    XCTAssertNil(try t("7/7"))
    let f = try BlockSample.Fraction(parsing: "0.001")
    XCTAssertEqual([f.numerator, f.denominator], [1, 1000])
    XCTAssertEqual(f.description, "1/1000")
    XCTAssertEqual(try BlockSample.Fraction(parsing: "0.0000000000000000001").denominator, 10_000_000_000_000_000_000)
    XCTAssertEqual(try BlockSample.Fraction(parsing: "1.0").description, "1")
    XCTAssertEqual(try BlockSample.Fraction(parsing: "6/8"), try BlockSample.Fraction(parsing: "0.75"))
  }

  func testBadFractionsAndSeedsAreRefusedInOneSentence() throws {
    let outOfRange = [
      "0", "0.0", "0/5", ".0", "-0.1", "-1", "-1/1000", "1.5", "2", "3/2", "1.0000000000000000001",
      "99999999999999999999.5",
    ]
    for text in outOfRange {
      assertThrows(try BlockSample.Fraction(parsing: text), containing: ["sample fraction \(text) is out of range"])
    }
    for text in ["", ".", "abc", "1/", "/2", "1//2", "1e-3", "0,001", " 0.1", "0.1 ", "+0.5", "1/2/3", "0x10", "½"] {
      assertThrows(
        try BlockSample.Fraction(parsing: text), containing: ["is not a decimal like 0.001 or a fraction like 1/1000"],
        text)
    }
    assertThrows(try BlockSample.Fraction(parsing: "1/0"), containing: ["is out of range"])
    assertThrows(
      try BlockSample.Fraction(parsing: "0.00000000000000000001"), containing: ["more than 19 decimal places"])
    assertThrows(
      try BlockSample.Fraction(parsing: "1/99999999999999999999"), containing: ["above 2^64 - 1"])
    for text in ["-1", "abc", "", "18446744073709551616", "0x10", " 5", "5 ", "+5", "1.0", "1e3"] {
      assertThrows(
        try BlockSample.parseSeed(text),
        containing: ["seed \(text) is not an unsigned 64-bit integer (0 to 18446744073709551615)"])
    }
    XCTAssertEqual(try BlockSample.parseSeed("0"), 0)
    XCTAssertEqual(try BlockSample.parseSeed("18446744073709551615"), UInt64.max)
    XCTAssertEqual(try BlockSample.parseSeed("007"), 7)
    do {
      _ = try BlockSample.Fraction(parsing: "1.5")
    } catch {
      XCTAssertFalse("\(error)".contains("\n"), "one sentence: \(error)")
    }
  }

  // MARK: Statistics

  private let n: UInt64 = 1 << 20

  /// Over 200 seeds, each selection holds f × n blocks within five binomial
  /// standard deviations, their mean within five standard errors, and every
  /// eighth of the device its share: the choice does not favour places.
  func testSelectedCountsAreBinomial() throws {
    for (fraction, f) in [("1/1000", 0.001), ("1/10", 0.1), ("0.5", 0.5)] {
      let expected = f * Double(n)
      let sd = (Double(n) * f * (1 - f)).squareRoot()
      var total = 0.0
      let seeds: [UInt64] = Array(1...200)
      var eighths = [Double](repeating: 0, count: 8)
      for seed in seeds {
        let bits = try sample(fraction, seed).selection(blockCount: n)
        let count = Double(bits.population)
        XCTAssertLessThan(abs(count - expected), 5 * sd, "\(fraction), seed \(seed): \(count) selected")
        total += count
        for e in 0..<8 {
          let part = UInt64(e) * n / 8..<UInt64(e + 1) * n / 8
          eighths[e] += Double(bits.population(in: part))
        }
      }
      let mean = total / Double(seeds.count)
      XCTAssertLessThan(abs(mean - expected), 5 * sd / Double(seeds.count).squareRoot(), "\(fraction): mean \(mean)")
      let perEighth = expected / 8 * Double(seeds.count)
      let sdEighth = (Double(n) / 8 * f * (1 - f) * Double(seeds.count)).squareRoot()
      for (e, c) in eighths.enumerated() {
        XCTAssertLessThan(abs(c - perEighth), 5 * sdEighth, "\(fraction): eighth \(e) holds \(c)")
      }
    }
  }

  /// Different seeds select different blocks: two selections share about
  /// f² × n blocks, as independent ones would — for neighbouring seeds, far
  /// ones, and seeds one increment of the generator apart.
  func testSelectionsOfDifferentSeedsAreIndependent() throws {
    let f = 0.01
    let pairs: [(UInt64, UInt64)] = [
      (1, 2), (2, 3), (0, UInt64.max), (12345, 12346), (7, 7 &+ 0x9E37_79B9_7F4A_7C15), (1 << 63, 1 << 62),
    ]
    let shared = f * f * Double(n)
    let sd = (Double(n) * f * f * (1 - f * f)).squareRoot()
    for (x, y) in pairs {
      let a = try sample("1/100", x).selection(blockCount: n)
      let b = try sample("1/100", y).selection(blockCount: n)
      XCTAssertNotEqual(a, b, "seeds \(x) and \(y)")
      let both = Double(a.intersection(b).population)
      XCTAssertLessThan(abs(both - shared), 6 * sd + 1, "seeds \(x) and \(y) share \(both) blocks")
    }
    // The same seed, the same selection; another fraction, a subset of it or a superset.
    XCTAssertEqual(try sample("1/100", 5).selection(blockCount: n), try sample("0.01", 5).selection(blockCount: n))
    let small = try sample("1/1000", 5).selection(blockCount: n)
    let large = try sample("1/100", 5).selection(blockCount: n)
    XCTAssertEqual(small.subtracting(large).population, 0, "a smaller fraction of a seed is inside a larger one")
  }

  /// The union of k seeds' selections covers 1 - (1 - f)^k of the blocks,
  /// within five binomial standard deviations, as the man page promises.
  func testUnionOfSeedsCoversAsPromised() throws {
    for (fraction, f, ks) in [("1/1000", 0.001, [1, 10, 100, 300]), ("1/10", 0.1, [1, 2, 5, 10, 30])] {
      var union = BlockBitmap(count: n)
      var seed: UInt64 = 1000
      var k = 0
      for target in ks {
        while k < target {
          union.formUnion(try sample(fraction, seed).selection(blockCount: n))
          seed += 1
          k += 1
        }
        let p = 1 - pow(1 - f, Double(k))
        let expected = p * Double(n)
        let sd = (Double(n) * p * (1 - p)).squareRoot()
        let covered = Double(union.population)
        XCTAssertLessThan(
          abs(covered - expected), 5 * sd + 1, "\(fraction), \(k) seeds: \(covered) blocks, expected \(expected)")
      }
    }
  }
}
