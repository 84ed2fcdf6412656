// The seeded generator of both test targets: SplitMix64 (Vigna), small,
// fast and fully determined by its seed, so seeded images and property
// tests are the same on every run and machine, and a failing property test
// can be replayed with `DR_TEST_SEED=<seed>` (DualRestoreTests' testSeed).
// Its sequence must never change: tests build their data from it.

/// SplitMix64: for seed 1234567 its first outputs are 6457827717110365317,
/// 3203168211198807973, 9817491932198370423, as the reference splitmix64.c.
public struct SplitMix64: RandomNumberGenerator {
  public private(set) var state: UInt64

  public init(seed: UInt64) { state = seed }

  public mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// Random bytes: each word's bytes in little-endian order.
  public mutating func bytes(_ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
      var v = next()
      for _ in 0..<8 where i < count {
        out[i] = UInt8(truncatingIfNeeded: v)
        v >>= 8
        i += 1
      }
    }
    return out
  }
}
