// The pace of hydration under --hydrate-rate: a token bucket.
//
// Invariants:
// - Tokens (bytes) come at `rate` a second and the bucket holds at most
//   `burst` = max(rate × 1 s, the longest run): over any T seconds at most
//   rate × T + burst bytes are taken. Time spent not taking (yielding to
//   clients, waiting out a failure) fills the bucket and no more, so it is
//   never credit for a later rush at the link's speed.
// - Bytes given back (a run not copied after all) return to the bucket,
//   never past `burst`.
// - The clock is the caller's (monotonic seconds), so the arithmetic is
//   tested without waiting.

struct HydrationPace {
  /// Bytes a second.
  let rate: Double
  /// The most the bucket holds, in bytes.
  let burst: Double
  private var tokens: Double
  private var updated: Double

  /// A full bucket at `now`, for runs of at most `longestRun` bytes.
  init(rate: UInt64, longestRun: UInt64, now: Double) {
    self.rate = Double(max(rate, 1))
    burst = Double(max(rate, longestRun, 1))
    tokens = burst
    updated = now
  }

  private mutating func refill(_ now: Double) {
    if now > updated {
      tokens = min(burst, tokens + (now - updated) * rate)
      updated = now
    }
  }

  /// Takes `bytes` if the bucket holds them (nil); else the seconds until it
  /// will, when nobody else takes first.
  mutating func take(_ bytes: UInt64, now: Double) -> Double? {
    refill(now)
    // A run longer than the bucket (only if the caller's runs grew) goes
    // when the bucket is full, and leaves it in debt.
    let needed = min(Double(bytes), burst)
    if tokens >= needed {
      tokens -= Double(bytes)
      return nil
    }
    return (needed - tokens) / rate
  }

  /// Returns `bytes` taken but not sent.
  mutating func giveBack(_ bytes: UInt64, now: Double) {
    refill(now)
    tokens = min(burst, tokens + Double(bytes))
  }
}
