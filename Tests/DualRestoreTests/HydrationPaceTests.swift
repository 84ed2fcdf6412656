// HydrationPace, hydration's token bucket, on a clock the test moves: over
// any window the bytes taken stay within rate × window + burst, however
// long the taker was away before; bytes given back never raise the bucket
// past its burst.

import XCTest

@testable import DualRestore

final class HydrationPaceTests: XCTestCase {
  /// Takes runs of `run` bytes as fast as the pace allows, from `from` to
  /// `to` (seconds): the instants and sizes taken.
  private func drain(_ pace: inout HydrationPace, run: UInt64, from: Double, to: Double) -> [(Double, UInt64)] {
    var taken: [(Double, UInt64)] = []
    var now = from
    while now < to {
      if let wait = pace.take(run, now: now) {
        XCTAssertGreaterThan(wait, 0)
        now += wait
      } else {
        taken.append((now, run))
      }
    }
    return taken
  }

  private func most(in window: Double, _ taken: [(Double, UInt64)]) -> UInt64 {
    var best: UInt64 = 0
    for (i, start) in taken.enumerated() {
      best = max(best, taken[i...].prefix { $0.0 < start.0 + window }.reduce(0) { $0 + $1.1 })
    }
    return best
  }

  func testAnIdleSpellIsNotSavedUp() {
    let rate: UInt64 = 4 << 20
    var pace = HydrationPace(rate: rate, longestRun: 1 << 20, now: 0)
    var taken = drain(&pace, run: 1 << 20, from: 0, to: 3)
    // An hour away (yielding to a busy client), then as fast as allowed.
    taken += drain(&pace, run: 1 << 20, from: 3603, to: 3613)
    XCTAssertEqual(pace.burst, Double(rate))
    for window in [0.5, 1, 5] {
      XCTAssertLessThanOrEqual(
        Double(most(in: window, taken)), Double(rate) * window + pace.burst + 1, "window \(window) s")
    }
    // The bucket was full after the hour: one second's worth at once.
    XCTAssertEqual(taken.filter { $0.0 == 3603 }.count, 4)
    // And the rate is used, not undercut: the burst, then a run every 0.25 s.
    let after = taken.filter { $0.0 >= 3603 }.reduce(0) { $0 + $1.1 }
    XCTAssertEqual(after, 43 << 20)
  }

  func testASlowRateStillTakesWholeRuns() {
    // 256 KiB/s with runs of 1 MiB: the bucket holds one run.
    var pace = HydrationPace(rate: 256 << 10, longestRun: 1 << 20, now: 0)
    XCTAssertEqual(pace.burst, Double(1 << 20))
    let taken = drain(&pace, run: 1 << 20, from: 0, to: 20)
    XCTAssertEqual(taken.count, 5, "\(taken)")
    XCTAssertLessThanOrEqual(Double(most(in: 8, taken)), Double(256 << 10) * 8 + pace.burst)
  }

  func testGivingBackNeverRaisesTheBucketPastItsBurst() {
    var pace = HydrationPace(rate: 1 << 20, longestRun: 1 << 20, now: 0)
    XCTAssertNil(pace.take(1 << 20, now: 0))
    pace.giveBack(1 << 20, now: 0)
    pace.giveBack(8 << 20, now: 0)
    XCTAssertNil(pace.take(1 << 20, now: 0))
    XCTAssertNotNil(pace.take(1, now: 0), "more than the burst was taken at once")
    // Half a second later, half a run is there.
    XCTAssertEqual(pace.take(1 << 20, now: 0.5) ?? 0, 0.5, accuracy: 1e-9)
  }
}
