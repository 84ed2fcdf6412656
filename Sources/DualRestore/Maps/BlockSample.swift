// A reproducible pseudo-random sample of a device's blocks, for checking
// copies by samples (bitmap-diff --signature --sample FRACTION --seed N).
//
// Block b is selected when output b, counting from 0, of SplitMix64 seeded
// with N is below T = ⌊FRACTION × 2^64⌋; every block is when FRACTION is 1.
// Output b is mix(N + (b + 1) × 0x9E3779B97F4A7C15 mod 2^64), with mix the
// SplitMix64 finalizer (Vigna's splitmix64.c). Each block's choice depends
// on N and b alone — not on the data, the device size or the other blocks —
// so the same FRACTION and seed select the same blocks of every device of
// the same geometry, on every machine, without reading it; and a block is
// selected with probability FRACTION, independently of the others for all
// purposes of catching damage that does not know the seed. The exact
// definition is in dualrestore-signature(5): another implementation must
// reproduce it bit for bit.

public struct BlockSample: Equatable, Sendable, CustomStringConvertible {
  /// A fraction in (0, 1], in lowest terms.
  public struct Fraction: Equatable, Sendable, CustomStringConvertible {
    public let numerator: UInt64
    public let denominator: UInt64

    /// `numerator/denominator`, reduced; throws unless 0 < it ≤ 1.
    public init(numerator: UInt64, denominator: UInt64) throws {
      guard numerator > 0, denominator > 0, numerator <= denominator else {
        throw ToolkitError("sample fraction \(numerator)/\(denominator) is out of range (above 0, at most 1)")
      }
      let d = Self.gcd(numerator, denominator)
      self.numerator = numerator / d
      self.denominator = denominator / d
    }

    /// Parses a decimal (`0.001`, `.5`, `1`) or a fraction (`1/1000`).
    public init(parsing text: String) throws {
      let notANumber = ToolkitError("sample fraction \(text) is not a decimal like 0.001 or a fraction like 1/1000")
      let tooBig = ToolkitError(
        "sample fraction \(text) has a numerator or denominator above 2^64 - 1 (18446744073709551615)")
      if text.hasPrefix("-"), text.count > 1, text.dropFirst().utf8.allSatisfy({ "0123456789./".utf8.contains($0) }) {
        throw ToolkitError("sample fraction \(text) is out of range (above 0, at most 1)")
      }
      let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
      if parts.count == 2 {
        guard Self.isDigits(parts[0]), Self.isDigits(parts[1]) else { throw notANumber }
        guard let p = UInt64(parts[0]), let q = UInt64(parts[1]) else { throw tooBig }
        try self.init(checking: text, p, q)
        return
      }
      let point = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
      let whole = point[0]
      let decimals = point.count == 2 ? point[1] : ""
      guard whole.isEmpty || Self.isDigits(whole), decimals.isEmpty || Self.isDigits(decimals),
        !(whole.isEmpty && decimals.isEmpty)
      else { throw notANumber }
      // Trailing zeros say nothing; up to 19 decimals, 10^19 < 2^64.
      let places = decimals.reversed().drop { $0 == "0" }.reversed()
      guard places.count <= 19 else {
        throw ToolkitError("sample fraction \(text) has more than 19 decimal places")
      }
      var denominator: UInt64 = 1
      for _ in 0..<places.count { denominator *= 10 }
      let digits = String(places)
      let wholeValue = whole.isEmpty ? 0 : UInt64(whole)
      guard let wholeValue, wholeValue == 0 || (wholeValue == 1 && digits.isEmpty) else {
        throw ToolkitError("sample fraction \(text) is out of range (above 0, at most 1)")
      }
      let numerator = wholeValue * denominator + (digits.isEmpty ? 0 : UInt64(digits) ?? 0)
      try self.init(checking: text, numerator, denominator)
    }

    private init(checking text: String, _ p: UInt64, _ q: UInt64) throws {
      guard p > 0, q > 0, p <= q else {
        throw ToolkitError("sample fraction \(text) is out of range (above 0, at most 1)")
      }
      try self.init(numerator: p, denominator: q)
    }

    private static func isDigits(_ s: Substring) -> Bool {
      !s.isEmpty && s.utf8.allSatisfy { $0 >= 0x30 && $0 <= 0x39 }
    }

    private static func gcd(_ a: UInt64, _ b: UInt64) -> UInt64 {
      var (x, y) = (a, b)
      while y != 0 { (x, y) = (y, x % y) }
      return x
    }

    /// T = ⌊numerator × 2^64 / denominator⌋: a block is selected when its
    /// hash is below T. Nil for 1, which selects every block (T = 2^64).
    /// Never 0: the denominator is below 2^64.
    public var threshold: UInt64? {
      guard numerator < denominator else { return nil }
      return denominator.dividingFullWidth((high: numerator, low: 0)).quotient
    }

    /// The fraction as a number, for sentences.
    public var value: Double { Double(numerator) / Double(denominator) }

    /// `1/1000`, or `1`.
    public var description: String { numerator == denominator ? "1" : "\(numerator)/\(denominator)" }
  }

  public let fraction: Fraction
  public let seed: UInt64

  public init(fraction: Fraction, seed: UInt64) {
    self.fraction = fraction
    self.seed = seed
  }

  /// Parses a seed: a decimal unsigned 64-bit integer.
  public static func parseSeed(_ text: String) throws -> UInt64 {
    guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let seed = UInt64(text) else {
      throw ToolkitError("seed \(text) is not an unsigned 64-bit integer (0 to 18446744073709551615)")
    }
    return seed
  }

  static let gamma: UInt64 = 0x9E37_79B9_7F4A_7C15

  /// The SplitMix64 finalizer.
  @inline(__always)
  static func mix(_ x: UInt64) -> UInt64 {
    var z = x
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// Output `block` (from 0) of SplitMix64 seeded with `seed`.
  public static func hash(seed: UInt64, block: UInt64) -> UInt64 {
    mix(seed &+ (block &+ 1) &* gamma)
  }

  /// Whether the sample selects `block`.
  public func contains(_ block: UInt64) -> Bool {
    guard let t = fraction.threshold else { return true }
    return Self.hash(seed: seed, block: block) < t
  }

  /// The selection of a device of `blockCount` blocks: one hash per block,
  /// a word of 64 blocks at a time; nothing is read.
  public func selection(blockCount: UInt64) -> BlockBitmap {
    guard let t = fraction.threshold else { return BlockBitmap(count: blockCount, filled: true) }
    var bits = BlockBitmap(count: blockCount)
    bits.withMutableWords { words in
      // The state before output 0's increment; each block adds gamma.
      var state = seed
      var block: UInt64 = 0
      for w in 0..<words.count {
        let n = Int(min(64, blockCount - block))
        var word: UInt64 = 0
        for i in 0..<n {
          state &+= Self.gamma
          if Self.mix(state) < t { word |= 1 << UInt64(i) }
        }
        words[w] = word
        block += UInt64(n)
      }
    }
    return bits
  }

  /// `1/1000 with seed 42`.
  public var description: String { "\(fraction) with seed \(seed)" }
}
