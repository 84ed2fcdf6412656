// The retention planner on stores built here: plain chains, a compacted
// stream replacing the first streams of a chain, keep-last and keep-daily
// (across UTC day boundaries), a gap, two full streams, ties, loops; and on
// a few hundred seeded random stores against a reference that enumerates
// every path from every full stream.

import TestSupport
import XCTest

@testable import DualRestore

final class ChainRetentionTests: XCTestCase {
  typealias S = ChainRetention.Stream

  /// 2026-11-01T00:00:00Z.
  static let epochDay: Int64 = 1_793_491_200 * 1_000_000_000
  static let hour: Int64 = 3_600 * 1_000_000_000
  static let day: Int64 = 24 * hour

  static func at(day d: Int64 = 0, hours h: Int64 = 0, ns: Int64 = 0) -> Instant {
    Instant(nanosecondsSinceEpoch: epochDay + d * day + h * hour + ns)
  }

  static func id(_ n: UInt64) -> ID128 { ID128(high: 0xD0, low: n) }

  static func full(_ name: String, _ n: UInt64, _ t: Instant) -> S { S(name: name, id: id(n), started: t) }

  static func inc(_ name: String, _ n: UInt64, on base: UInt64, _ t: Instant) -> S {
    S(name: name, id: id(n), base: id(base), started: t)
  }

  /// A compacted full stream `n`, standing for `last` (started at `lastAt`),
  /// compacting `count` streams from `first`.
  static func compacted(
    _ name: String, _ n: UInt64, standsFor last: UInt64, at lastAt: Instant, first: UInt64, count: UInt32,
    _ t: Instant
  ) -> S {
    S(
      name: name, id: id(n),
      lineage: StreamFormat.Lineage(
        standsFor: id(last), standsForStarted: lastAt, firstCompacted: id(first), compactedCount: count),
      started: t)
  }

  func names(_ s: [S]) -> [String] { s.map(\.name) }
  func chains(_ p: ChainRetention.Plan) -> [[String]] { p.kept.map { names($0.chain) } }
  func deletions(_ p: ChainRetention.Plan) -> [String] { p.deletable.map { "\($0.stream.name): \($0.reason)" } }

  /// f0, then i1 to i4 on top, an hour apart.
  func plainChain() -> [S] {
    [Self.full("f0", 0, Self.at(hours: 0))]
      + (1...4).map { Self.inc("i\($0)", UInt64($0), on: UInt64($0 - 1), Self.at(hours: Int64($0))) }
  }

  func testAPlainChainNeedsEveryStreamUpToTheNewestPoint() {
    let now = Self.at(day: 1)
    // Given in another order than their names: the plan does not depend on it.
    let p = ChainRetention.plan(plainChain().reversed(), rule: .init(keepLast: 2, now: now))
    XCTAssertEqual(p.kept.map(\.id), [Self.id(3), Self.id(4)])
    XCTAssertEqual(chains(p), [["f0", "i1", "i2", "i3"], ["f0", "i1", "i2", "i3", "i4"]])
    XCTAssertEqual(names(p.needed), ["f0", "i1", "i2", "i3", "i4"])
    XCTAssertEqual(p.deletable, [])
    XCTAssertEqual(p.errors, [])
    // Even a rule that keeps nothing keeps the newest point.
    let none = ChainRetention.plan(plainChain(), rule: .init(now: now))
    XCTAssertEqual(none.kept.map(\.id), [Self.id(4)])
    XCTAssertEqual(names(none.needed), ["f0", "i1", "i2", "i3", "i4"])
    XCTAssertEqual(ChainRetention.plan(plainChain(), rule: .init(keepLast: 99, now: now)).kept.count, 5)
  }

  func testACompactedBaseReplacesTheFirstStreamsOfItsChain() {
    let now = Self.at(day: 1)
    // c stands for i2: it compacts f0, i1 and i2.
    let c = Self.compacted("c", 10, standsFor: 2, at: Self.at(hours: 2), first: 0, count: 3, Self.at(hours: 7))
    let store = plainChain() + [c]
    let p = ChainRetention.plan(store, rule: .init(keepLast: 2, now: now))
    XCTAssertEqual(chains(p), [["c", "i3"], ["c", "i3", "i4"]])
    XCTAssertEqual(names(p.needed), ["c", "i3", "i4"])
    XCTAssertEqual(
      deletions(p),
      [
        "f0: replaced by compacted stream c", "i1: replaced by compacted stream c",
        "i2: replaced by compacted stream c",
      ])
    if case .replacedByCompacted(_, let by) = p.deletable[0].reason { XCTAssertEqual(by, c.id) } else { XCTFail() }
    // Keeping four points: i1 still needs f0; i2 is c alone, shorter than f0, i1, i2.
    let four = ChainRetention.plan(store, rule: .init(keepLast: 4, now: now))
    XCTAssertEqual(four.kept.map(\.id), [Self.id(1), Self.id(2), Self.id(3), Self.id(4)])
    XCTAssertEqual(four.kept[1].started, Self.at(hours: 2), "the point's instant is i2's, not c's")
    XCTAssertEqual(chains(four), [["f0", "i1"], ["c"], ["c", "i3"], ["c", "i3", "i4"]])
    XCTAssertEqual(names(four.needed), ["c", "f0", "i1", "i3", "i4"])
    XCTAssertEqual(deletions(four), ["i2: replaced by compacted stream c"])
    // Once the compacted streams are gone from the store, c alone reaches
    // i2's point, and i3 applies on it; an incremental naming c itself does too.
    let after = [c, store[3], store[4], Self.inc("j5", 5, on: 10, Self.at(hours: 9))]
    let q = ChainRetention.plan(after, rule: .init(keepLast: 9, now: now))
    XCTAssertEqual(q.errors, [])
    XCTAssertEqual(chains(q), [["c"], ["c", "i3"], ["c", "i3", "i4"], ["c", "j5"]])
  }

  func testKeepLastCountsPointsNotStreams() {
    // Two full streams of one instant: a tie, broken by id; the same point
    // reached twice counts once.
    let t = Self.at(hours: 5)
    let store = [
      Self.full("b", 2, t), Self.full("a", 1, t), Self.full("z", 0, Self.at(hours: 1)),
      Self.compacted("y", 9, standsFor: 0, at: Self.at(hours: 1), first: 0, count: 1, Self.at(hours: 6)),
    ]
    let p = ChainRetention.plan(store, rule: .init(keepLast: 2, now: Self.at(day: 1)))
    XCTAssertEqual(p.kept.map(\.id), [Self.id(1), Self.id(2)])
    XCTAssertEqual(
      deletions(p), ["y: older than every kept point", "z: older than every kept point"])
    let three = ChainRetention.plan(store, rule: .init(keepLast: 3, now: Self.at(day: 1)))
    XCTAssertEqual(three.kept.map(\.id), [Self.id(0), Self.id(1), Self.id(2)])
    // Point 0 by y or z, one stream each: the name that sorts first.
    XCTAssertEqual(chains(three), [["y"], ["a"], ["b"]])
    XCTAssertEqual(deletions(three), ["z: replaced by compacted stream y"])
  }

  func testKeepDailyKeepsTheNewestPointOfEachRecentUTCDay() {
    // Full streams: a point each, so only the rule keeps them.
    let store = [
      Self.full("a", 1, Self.at(day: 0, hours: 10)),
      Self.full("b", 2, Self.at(day: 1, ns: -1)),  // the last nanosecond of day 0
      Self.full("c", 3, Self.at(day: 1)),  // the first of day 1
      Self.full("d", 4, Self.at(day: 1, hours: 12)),
      Self.full("e", 5, Self.at(day: 2, hours: 8)),
      Self.full("f", 6, Self.at(day: 2, hours: 7)),
    ]
    let now = Self.at(day: 2, hours: 20)
    let two = ChainRetention.plan(store, rule: .init(keepDaily: 2, now: now))
    XCTAssertEqual(names(two.needed), ["d", "e"])
    XCTAssertEqual(
      deletions(two),
      [
        "a: older than every kept point", "b: older than every kept point", "c: older than every kept point",
        "f: no kept point's chain needs it",
      ])
    let three = ChainRetention.plan(store, rule: .init(keepDaily: 3, now: now))
    XCTAssertEqual(names(three.needed), ["b", "d", "e"])
    // Now a nanosecond before day 2: day 2's point is the newest, kept anyway.
    let early = ChainRetention.plan(store, rule: .init(keepDaily: 1, now: Self.at(day: 2, ns: -1)))
    XCTAssertEqual(names(early.needed), ["d", "e"])
    // With keep-last, the union of both: the last two are f and e.
    let both = ChainRetention.plan(store, rule: .init(keepLast: 2, keepDaily: 2, now: now))
    XCTAssertEqual(names(both.needed), ["d", "e", "f"])
    let more = ChainRetention.plan(store, rule: .init(keepLast: 4, keepDaily: 3, now: now))
    XCTAssertEqual(names(more.needed), ["b", "c", "d", "e", "f"])
    XCTAssertEqual(ChainRetention.day(Self.at(day: 1, ns: -1)) + 1, ChainRetention.day(Self.at(day: 1)))
    XCTAssertEqual(ChainRetention.day(Instant(nanosecondsSinceEpoch: -1)), -1)
  }

  func testAGapIsAnErrorAndNothingBeyondItIsDeletable() {
    var store = plainChain()
    store.remove(at: 2)  // i2
    let p = ChainRetention.plan(store, rule: .init(keepLast: 1, now: Self.at(day: 1)))
    XCTAssertEqual(
      p.errors,
      [
        "i3: stream \(Self.id(3)) cannot be reached: its base \(Self.id(2)) is not in the store",
        "i4: stream \(Self.id(4)) cannot be reached: its base \(Self.id(3)) cannot be reached",
      ])
    // The newest point that can be reached is kept; i3 and i4 are left alone.
    XCTAssertEqual(p.kept.map(\.id), [Self.id(1)])
    XCTAssertEqual(names(p.needed), ["f0", "i1"])
    XCTAssertEqual(p.deletable, [])
  }

  func testTwoFullStreams() {
    let store =
      plainChain().prefix(3) + [
        Self.full("g0", 20, Self.at(hours: 10)), Self.inc("g1", 21, on: 20, Self.at(hours: 11)),
      ]
    let now = Self.at(day: 1)
    let p = ChainRetention.plan(Array(store), rule: .init(keepLast: 1, now: now))
    XCTAssertEqual(chains(p), [["g0", "g1"]])
    XCTAssertEqual(
      deletions(p),
      ["f0: older than every kept point", "i1: older than every kept point", "i2: older than every kept point"])
    let q = ChainRetention.plan(Array(store), rule: .init(keepLast: 3, now: now))
    XCTAssertEqual(chains(q), [["f0", "i1", "i2"], ["g0"], ["g0", "g1"]])
    XCTAssertEqual(q.deletable, [])
  }

  func testTiesBetweenChainsGoToTheNameThatSortsFirst() {
    let i2 = Self.at(hours: 2)
    // Two compactions of the same part, and a fork: two streams on i1.
    let store =
      plainChain().prefix(3) + [
        Self.compacted("cb", 11, standsFor: 2, at: i2, first: 0, count: 3, Self.at(hours: 8)),
        Self.compacted("ca", 10, standsFor: 2, at: i2, first: 0, count: 3, Self.at(hours: 9)),
        Self.inc("k2", 30, on: 1, Self.at(hours: 2)),
      ]
    let p = ChainRetention.plan(Array(store), rule: .init(keepLast: 1, now: Self.at(day: 1)))
    // i2 and k2 started at the same instant: the newest point is the greater id (k2's).
    XCTAssertEqual(chains(p), [["f0", "i1", "k2"]])
    let q = ChainRetention.plan(Array(store), rule: .init(keepLast: 2, now: Self.at(day: 1)))
    XCTAssertEqual(chains(q), [["ca"], ["f0", "i1", "k2"]])
    XCTAssertEqual(deletions(q), ["cb: replaced by compacted stream ca", "i2: replaced by compacted stream ca"])
    // Run again, in another order: the same plan.
    XCTAssertEqual(ChainRetention.plan(store.shuffled(), rule: .init(keepLast: 2, now: Self.at(day: 1))), q)
  }

  func testLoopsDuplicatesAndImpossibleLineagesAreErrors() {
    let t = Self.at(hours: 1)
    let store = [
      Self.full("f", 1, t), Self.inc("x", 2, on: 3, t), Self.inc("y", 3, on: 2, t),
      Self.full("f-copy", 1, t),
      S(
        name: "odd", id: Self.id(4), base: Self.id(1),
        lineage: .init(standsFor: Self.id(9), standsForStarted: t, firstCompacted: Self.id(9), compactedCount: 1),
        started: t),
    ]
    let p = ChainRetention.plan(store, rule: .init(keepLast: 5, now: Self.at(day: 1)))
    XCTAssertEqual(
      p.errors,
      [
        "f-copy: stream \(Self.id(1)) is also f; it is left alone",
        "odd: stream \(Self.id(4)) has a lineage that does not hold (it is incremental); it is taken as a plain stream",
        "x: stream \(Self.id(2)) cannot be reached: its chain of bases loops",
        "y: stream \(Self.id(3)) cannot be reached: its chain of bases loops",
      ])
    XCTAssertEqual(chains(p), [["f"], ["f", "odd"]])
    // A compaction standing for y reaches y's point, and x on top of it:
    // the loop no longer hides them.
    let c = Self.compacted("c", 5, standsFor: 3, at: t, first: 3, count: 1, Self.at(hours: 2))
    let q = ChainRetention.plan(store + [c], rule: .init(keepLast: 5, now: Self.at(day: 1)))
    XCTAssertEqual(q.errors.count, 2, "\(q.errors)")
    XCTAssertEqual(Set(chains(q)), [["f"], ["f", "odd"], ["c"], ["c", "x"]])
    XCTAssertEqual(deletions(q), ["y: replaced by compacted stream c"])
  }

  // MARK: Against a reference

  /// A random store: a history of full and incremental streams (forks
  /// included, instants sometimes equal), compactions of some of its chains,
  /// then some streams removed. `covers` says which points each compacted
  /// stream compacts.
  func randomStore(_ rng: inout SplitMix64) -> (streams: [S], covers: [ID128: Set<ID128>], now: Instant) {
    var history: [S] = []
    var t = Self.at()
    var next: UInt64 = 1
    let count = 2 + Int(rng.next() % 10)
    for k in 0..<count {
      t = Instant(nanosecondsSinceEpoch: t.nanosecondsSinceEpoch + Int64(rng.next() % 4) * 10 * Self.hour)
      let name = "s\(rng.next() % 1000)-\(next)"
      if k == 0 || rng.next() % 4 == 0 {
        history.append(S(name: name, id: Self.id(next), started: t))
      } else {
        let back = rng.next() % 3 == 0 ? Int(rng.next() % UInt64(history.count)) : history.count - 1
        history.append(S(name: name, id: Self.id(next), base: history[back].id, started: t))
      }
      next += 1
    }
    let byID = Dictionary(uniqueKeysWithValues: history.map { ($0.id, $0) })
    var compacted: [S] = []
    var covers: [ID128: Set<ID128>] = [:]
    for _ in 0..<Int(rng.next() % 3) {
      let last = history[Int(rng.next() % UInt64(history.count))]
      var chain = [last]
      while let b = chain.first.flatMap({ byID[$0.base] }) { chain.insert(b, at: 0) }
      t = Instant(nanosecondsSinceEpoch: t.nanosecondsSinceEpoch + Self.hour)
      let c = S(
        name: "c\(rng.next() % 1000)-\(next)", id: Self.id(next),
        lineage: .init(
          standsFor: last.id, standsForStarted: last.started, firstCompacted: chain[0].id,
          compactedCount: UInt32(chain.count)),
        started: t)
      covers[c.id] = Set(chain.map(\.id))
      compacted.append(c)
      next += 1
    }
    let kept = history.filter { _ in rng.next() % 5 != 0 }
    let now = Instant(nanosecondsSinceEpoch: t.nanosecondsSinceEpoch + Int64(rng.next() % 60) * Self.hour)
    return (kept + compacted, covers, now)
  }

  /// Every path from every full stream, the shortest to each point (ties:
  /// the names, compared in order), with the point's instant.
  func reference(_ streams: [S]) -> [ID128: (chain: [S], started: Instant)] {
    var alias: [ID128: ID128] = [:]
    for s in streams { if let l = s.lineage { alias[s.id] = l.standsFor } }
    func point(_ id: ID128) -> ID128 { alias[id] ?? id }
    func key(_ c: [S]) -> [String] { c.map(\.name) }  // the random stores' names are unique
    var best: [ID128: [S]] = [:]
    func walk(_ path: [S]) {
      let p = point(path[path.count - 1].id)
      if let b = best[p] {
        if path.count < b.count || (path.count == b.count && key(path).lexicographicallyPrecedes(key(b))) {
          best[p] = path
        }
      } else {
        best[p] = path
      }
      for s in streams where !s.isFull && point(s.base) == p && !path.contains(s) { walk(path + [s]) }
    }
    for s in streams where s.isFull { walk([s]) }
    var out: [ID128: (chain: [S], started: Instant)] = [:]
    for (p, chain) in best {
      let started =
        streams.first { $0.id == p && $0.lineage == nil }?.started
        ?? streams.compactMap { $0.lineage?.standsFor == p ? $0.lineage?.standsForStarted : nil }.min()
      out[p] = (chain, started ?? .unset)
    }
    return out
  }

  func testAgainstEveryPathOnRandomStores() throws {
    var rng = SplitMix64(seed: 20_261_206)
    var sawCompactedChain = 0
    var sawDeletable = 0
    var sawError = 0
    for round in 0..<400 {
      let (streams, covers, now) = randomStore(&rng)
      let rule = ChainRetention.Rule(keepLast: Int(rng.next() % 4), keepDaily: Int(rng.next() % 4), now: now)
      let plan = ChainRetention.plan(streams, rule: rule)
      let ref = reference(streams)
      let what = "round \(round): \(streams.map { "\($0.name)=\($0.id.low)<-\($0.base.low)" }) \(rule)"

      // The points kept, by the rule.
      let points = ref.map { (id: $0.key, started: $0.value.started) }
        .sorted { ($0.started, $0.id.description) < ($1.started, $1.id.description) }
      var keep = Set(points.suffix(max(rule.keepLast, 1)).map(\.id))
      let today = ChainRetention.day(now)
      for d in Set(points.map { ChainRetention.day($0.started) })
      where rule.keepDaily > 0 && d > today - Int64(rule.keepDaily) {
        if let newest = points.last(where: { ChainRetention.day($0.started) == d }) { keep.insert(newest.id) }
      }
      XCTAssertEqual(plan.kept.map(\.id), points.filter { keep.contains($0.id) }.map(\.id), what)
      if let newest = points.last { XCTAssertEqual(plan.kept.last?.id, newest.id, what) }

      // Each chain the shortest, as every path says.
      var needed = Set<ID128>()
      for k in plan.kept {
        XCTAssertEqual(k.chain, ref[k.id]?.chain, "point \(k.id.low): \(what)")
        XCTAssertEqual(k.started, ref[k.id]?.started, what)
        needed.formUnion(k.chain.map(\.id))
        if k.chain.count > 1, k.chain[0].lineage != nil { sawCompactedChain += 1 }
      }
      XCTAssertEqual(Set(plan.needed.map(\.id)), needed, what)

      // Deletable: every stream whose point is reached and that no chain needs; never a needed one.
      func pointOf(_ s: S) -> ID128 { s.lineage?.standsFor ?? s.id }
      let reached = streams.filter { ref[pointOf($0)] != nil }
      XCTAssertEqual(Set(plan.deletable.map(\.stream.id)), Set(reached.map(\.id)).subtracting(needed), what)
      XCTAssertTrue(plan.deletable.allSatisfy { !needed.contains($0.stream.id) }, what)
      let oldest = plan.kept.map(\.started).min()
      for d in plan.deletable {
        sawDeletable += 1
        let at = ref[pointOf(d.stream)]?.started ?? .unset
        switch d.reason {
        case .replacedByCompacted(_, let by):
          XCTAssertTrue(needed.contains(by), what)
          XCTAssertTrue(covers[by]?.contains(pointOf(d.stream)) ?? false, "\(d): \(what)")
        case .olderThanEveryKeptPoint:
          XCTAssertLessThan(at, oldest ?? .unset, what)
        case .notOnAnyKeptChain:
          XCTAssertGreaterThanOrEqual(at, oldest ?? .unset, what)
        }
      }
      // One error per stream whose point cannot be reached; those are in neither list.
      let unreached = streams.filter { ref[pointOf($0)] == nil }
      XCTAssertEqual(plan.errors.count, unreached.count, "\(plan.errors) \(what)")
      sawError += unreached.isEmpty ? 0 : 1
      for s in unreached { XCTAssertTrue(plan.errors.contains { $0.hasPrefix("\(s.name): ") }, what) }
      // Lists in name order, and the same plan from any order of the input.
      XCTAssertEqual(plan.needed, plan.needed.sorted(by: ChainRetention.precedes), what)
      XCTAssertEqual(plan.deletable.map(\.stream), plan.deletable.map(\.stream).sorted(by: ChainRetention.precedes))
      XCTAssertEqual(ChainRetention.plan(streams.reversed(), rule: rule), plan, what)
    }
    // The random stores reached each case.
    XCTAssertGreaterThan(sawCompactedChain, 20)
    XCTAssertGreaterThan(sawDeletable, 100)
    XCTAssertGreaterThan(sawError, 20)
  }
}
