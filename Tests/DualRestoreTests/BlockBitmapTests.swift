// Property tests of BlockBitmap against a plain [Bool] model, with counts
// around word boundaries and ranges at the edges.

import TestSupport
import XCTest

@testable import DualRestore

/// The reference model: one Bool per block, every operation done the slow way.
private struct Model: Equatable {
  var bits: [Bool]
  var count: UInt64 { UInt64(bits.count) }

  init(count: Int, filled: Bool = false) { bits = [Bool](repeating: filled, count: count) }

  func population(_ r: Range<UInt64>) -> UInt64 {
    var n: UInt64 = 0
    for i in r where bits[Int(i)] { n += 1 }
    return n
  }
  var population: UInt64 { population(0..<count) }

  func next(_ value: Bool, from start: UInt64) -> UInt64? {
    var i = start
    while i < count {
      if bits[Int(i)] == value { return i }
      i += 1
    }
    return nil
  }

  var extents: [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    var i = 0
    while i < bits.count {
      if bits[i] {
        let start = i
        while i < bits.count && bits[i] { i += 1 }
        out.append(UInt64(start)..<UInt64(i))
      } else {
        i += 1
      }
    }
    return out
  }

  /// Packs the model into words (LSB first), independently of BlockBitmap.
  var words: [UInt64] {
    var w = [UInt64](repeating: 0, count: (bits.count + 63) / 64)
    for (i, b) in bits.enumerated() where b { w[i / 64] |= UInt64(1) << UInt64(i % 64) }
    return w
  }
}

final class BlockBitmapTests: XCTestCase {
  static let edgeCounts: [Int] = [0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]

  // MARK: Generators

  private func randomModel(count: Int, _ g: inout SplitMix64) -> Model {
    var m = Model(count: count)
    switch g.next() % 6 {
    case 0:
      break  // all clear
    case 1:
      m.bits = [Bool](repeating: true, count: count)
    case 2:
      for i in 0..<count { m.bits[i] = i % 2 == 0 }  // alternating
    case 3:
      // Long runs of random lengths.
      var i = 0
      var value = g.next() & 1 == 0
      while i < count {
        let run = Int(g.next() % 150) + 1
        for j in i..<min(count, i + run) { m.bits[j] = value }
        i += run
        value.toggle()
      }
    default:
      // Independent bits with a random density.
      let density = g.next() % 101
      for i in 0..<count { m.bits[i] = g.next() % 100 < density }
    }
    return m
  }

  /// A random range inside 0...count, biased towards word and bitmap edges.
  private func randomRange(count: UInt64, _ g: inout SplitMix64) -> Range<UInt64> {
    func point() -> UInt64 {
      switch g.next() % 6 {
      case 0: return 0
      case 1: return count
      case 2:
        // A word boundary, or one off it.
        let word = count == 0 ? 0 : g.next() % (count / 64 + 1)
        let p = Int64(word * 64) + Int64(g.next() % 3) - 1
        return UInt64(max(0, min(Int64(count), p)))
      case 3: return count == 0 ? 0 : count - min(count, g.next() % 3)
      default: return count == 0 ? 0 : g.next() % (count + 1)
      }
    }
    let a = point()
    let b = point()
    return min(a, b)..<max(a, b)
  }

  /// Builds the bitmap from the model through the public single-bit setter.
  private func bitmap(from m: Model) -> BlockBitmap {
    var b = BlockBitmap(count: m.count)
    for (i, v) in m.bits.enumerated() where v { b[UInt64(i)] = true }
    return b
  }

  private func assertSame(
    _ b: BlockBitmap, _ m: Model, _ context: @autoclosure () -> String, file: StaticString = #filePath,
    line: UInt = #line
  ) {
    guard b.count == m.count else {
      XCTFail("count \(b.count) != \(m.count); \(context())", file: file, line: line)
      return
    }
    let words = b.withWords { Array($0) }
    if words != m.words {
      // Find the first differing block for a useful message.
      let first = (0..<m.bits.count).first { b[UInt64($0)] != m.bits[$0] }
      XCTFail(
        "words differ (first differing block \(first.map(String.init) ?? "none: tail bits set")); \(context())",
        file: file, line: line)
      return
    }
    XCTAssertEqual(b.wordCount, (m.bits.count + 63) / 64, context(), file: file, line: line)
    XCTAssertEqual(b.population, m.population, context(), file: file, line: line)
  }

  private func forEachCase(
    rounds: Int, randomCounts: Int, salt: UInt64, _ body: (Int, inout SplitMix64, String) -> Void
  ) {
    let seed = testSeed(salt)
    var g = SplitMix64(seed: seed)
    var counts = Self.edgeCounts
    for _ in 0..<randomCounts { counts.append(Int(g.next() % 5000) + 1) }
    for count in counts {
      for round in 0..<rounds {
        body(count, &g, "seed \(seed) (DR_TEST_SEED), count \(count), round \(round)")
      }
    }
  }

  // MARK: Construction

  func testInitialStatesAndWordsInit() {
    forEachCase(rounds: 1, randomCounts: 10, salt: 1) { count, g, ctx in
      let n = UInt64(count)
      assertSame(BlockBitmap(count: n), Model(count: count), ctx)
      assertSame(BlockBitmap(count: n, filled: true), Model(count: count, filled: true), ctx)
      // All-ones words: the tail past `count` must be cleared.
      let ones = [UInt64](repeating: ~0, count: (count + 63) / 64)
      assertSame(BlockBitmap(count: n, words: ones), Model(count: count, filled: true), ctx)
      XCTAssertEqual(BlockBitmap(count: n, words: ones), BlockBitmap(count: n, filled: true), ctx)
      // Random words: only the tail is masked.
      let m = randomModel(count: count, &g)
      var noisy = m.words
      if count % 64 != 0, !noisy.isEmpty { noisy[noisy.count - 1] |= ~0 << UInt64(count % 64) }
      let b = BlockBitmap(count: n, words: noisy)
      assertSame(b, m, ctx)
      XCTAssertEqual(b, bitmap(from: m), ctx)
      // withMutableWords clears the tail afterwards.
      var c = BlockBitmap(count: n)
      c.withMutableWords { w in
        for i in w.indices { w[i] = ~0 }
      }
      assertSame(c, Model(count: count, filled: true), ctx)
    }
  }

  // MARK: Single bits and ranges

  func testSubscriptGetSet() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 2) { count, g, ctx in
      guard count > 0 else { return }
      var m = randomModel(count: count, &g)
      var b = bitmap(from: m)
      assertSame(b, m, ctx)
      for _ in 0..<200 {
        // Favour the first, last and word-edge blocks.
        let i: Int
        switch g.next() % 4 {
        case 0: i = 0
        case 1: i = count - 1
        case 2: i = min(count - 1, Int(g.next() % UInt64(count / 64 + 1)) * 64 + Int(g.next() % 2))
        default: i = Int(g.next() % UInt64(count))
        }
        let v = g.next() & 1 == 1
        b[UInt64(i)] = v
        m.bits[i] = v
        XCTAssertEqual(b[UInt64(i)], v, ctx)
      }
      assertSame(b, m, ctx)
      for i in 0..<count where b[UInt64(i)] != m.bits[i] {
        XCTFail("block \(i) reads \(b[UInt64(i)]); \(ctx)")
        break
      }
    }
  }

  func testSetAndClearRanges() {
    forEachCase(rounds: 4, randomCounts: 20, salt: 3) { count, g, ctx in
      var m = randomModel(count: count, &g)
      var b = bitmap(from: m)
      for step in 0..<40 {
        let r = randomRange(count: UInt64(count), &g)
        let doSet = g.next() & 1 == 0
        if doSet { b.set(r) } else { b.clear(r) }
        for i in r { m.bits[Int(i)] = doSet }
        assertSame(b, m, "\(ctx), step \(step), \(doSet ? "set" : "clear") \(r)")
      }
      // Whole range and empty ranges at both edges.
      b.set(0..<UInt64(count))
      assertSame(b, Model(count: count, filled: true), ctx)
      b.clear(0..<0)
      b.clear(UInt64(count)..<UInt64(count))
      assertSame(b, Model(count: count, filled: true), ctx)
      b.clear(0..<UInt64(count))
      assertSame(b, Model(count: count), ctx)
      b.set(UInt64(count)..<UInt64(count))
      assertSame(b, Model(count: count), ctx)
    }
  }

  func testEveryRangeOfSmallBitmaps() {
    // Exhaustive over all ranges for counts that straddle one and two words.
    for count in [1, 63, 64, 65, 129] {
      let n = UInt64(count)
      for lo in 0...n {
        for hi in lo...n {
          var b = BlockBitmap(count: n)
          b.set(lo..<hi)
          XCTAssertEqual(b.population, hi - lo, "count \(count), set \(lo)..<\(hi)")
          XCTAssertEqual(b.nextSet(from: 0), lo < hi ? lo : nil, "count \(count), set \(lo)..<\(hi)")
          XCTAssertEqual(
            b.nextClear(from: lo), hi < n ? hi : (lo < hi ? nil : (lo < n ? lo : nil)),
            "count \(count), set \(lo)..<\(hi)")
          var c = BlockBitmap(count: n, filled: true)
          c.clear(lo..<hi)
          XCTAssertEqual(c.population, n - (hi - lo), "count \(count), clear \(lo)..<\(hi)")
          XCTAssertEqual(c, b.inverted(), "count \(count), range \(lo)..<\(hi)")
          XCTAssertEqual(Array(b.extents), lo < hi ? [lo..<hi] : [], "count \(count), set \(lo)..<\(hi)")
        }
      }
    }
  }

  // MARK: Counting and searching

  func testPopulationInRange() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 4) { count, g, ctx in
      let m = randomModel(count: count, &g)
      let b = bitmap(from: m)
      XCTAssertEqual(b.population(in: 0..<UInt64(count)), m.population, ctx)
      for _ in 0..<60 {
        let r = randomRange(count: UInt64(count), &g)
        XCTAssertEqual(b.population(in: r), m.population(r), "\(ctx), range \(r)")
      }
    }
  }

  func testBoundedSearchesStopAtTheirLimit() {
    forEachCase(rounds: 2, randomCounts: 12, salt: 6) { count, g, ctx in
      let m = randomModel(count: count, &g)
      let b = bitmap(from: m)
      for _ in 0..<200 {
        let s = count == 0 ? 0 : g.next() % UInt64(count + 2)
        let limit = g.next() % UInt64(count + 70)
        let wantSet = m.next(true, from: s).flatMap { $0 < limit ? $0 : nil }
        let wantClear = m.next(false, from: s).flatMap { $0 < limit ? $0 : nil }
        XCTAssertEqual(b.nextSet(from: s, before: limit), wantSet, "\(ctx), \(s)..<\(limit)")
        XCTAssertEqual(b.nextClear(from: s, before: limit), wantClear, "\(ctx), \(s)..<\(limit)")
        let r = min(s, UInt64(count))..<min(max(s, limit), UInt64(count))
        XCTAssertEqual(b.allSet(r), m.population(r) == UInt64(r.count), "\(ctx), allSet \(r)")
        XCTAssertEqual(b.anySet(r), m.population(r) > 0, "\(ctx), anySet \(r)")
      }
    }
  }

  func testNextSetAndNextClearFromEveryStart() {
    forEachCase(rounds: 2, randomCounts: 12, salt: 5) { count, g, ctx in
      let m = randomModel(count: count, &g)
      let b = bitmap(from: m)
      // The model's answers for every start, computed backwards in one pass.
      var nextSet = [UInt64?](repeating: nil, count: count + 1)
      var nextClear = [UInt64?](repeating: nil, count: count + 1)
      var i = count - 1
      while i >= 0 {
        nextSet[i] = m.bits[i] ? UInt64(i) : nextSet[i + 1]
        nextClear[i] = m.bits[i] ? nextClear[i + 1] : UInt64(i)
        i -= 1
      }
      var mismatches = 0
      for s in 0...count where mismatches < 5 {
        if b.nextSet(from: UInt64(s)) != nextSet[s] || b.nextClear(from: UInt64(s)) != nextClear[s] {
          mismatches += 1
          XCTFail(
            "start \(s): nextSet \(String(describing: b.nextSet(from: UInt64(s)))) vs \(String(describing: nextSet[s])), nextClear \(String(describing: b.nextClear(from: UInt64(s)))) vs \(String(describing: nextClear[s])); \(ctx)"
          )
        }
      }
      // Starts past the end.
      for s in [UInt64(count) + 1, UInt64(count) + 64, UInt64.max] {
        XCTAssertNil(b.nextSet(from: s), "\(ctx), start \(s)")
        XCTAssertNil(b.nextClear(from: s), "\(ctx), start \(s)")
      }
      // Spot-check against the linear model too.
      for _ in 0..<20 where count > 0 {
        let s = g.next() % UInt64(count)
        XCTAssertEqual(b.nextSet(from: s), m.next(true, from: s), "\(ctx), start \(s)")
        XCTAssertEqual(b.nextClear(from: s), m.next(false, from: s), "\(ctx), start \(s)")
      }
    }
  }

  func testExtents() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 6) { count, g, ctx in
      let m = randomModel(count: count, &g)
      let b = bitmap(from: m)
      let extents = Array(b.extents)
      XCTAssertEqual(extents, m.extents, ctx)
      // Extents are non-empty, ordered, separated by at least one clear block.
      for (a, c) in zip(extents, extents.dropFirst()) {
        XCTAssertLessThan(a.upperBound, c.lowerBound, ctx)
      }
      XCTAssertEqual(extents.reduce(0) { $0 + UInt64($1.count) }, m.population, ctx)
      // The sequence can be iterated twice with the same result.
      XCTAssertEqual(Array(b.extents), extents, ctx)
    }
  }

  func testAllSetAnySet() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 7) { count, g, ctx in
      var m = randomModel(count: count, &g)
      // Make long set runs likely so that allSet is true sometimes.
      if count > 10, g.next() & 1 == 0 {
        let r = randomRange(count: UInt64(count), &g)
        for i in r { m.bits[Int(i)] = true }
      }
      let b = bitmap(from: m)
      var checkRanges: [Range<UInt64>] = [0..<0, UInt64(count)..<UInt64(count), 0..<UInt64(count)]
      for e in m.extents {
        checkRanges.append(e)
        if e.lowerBound > 0 { checkRanges.append(e.lowerBound - 1..<e.upperBound) }
        if e.upperBound < UInt64(count) { checkRanges.append(e.lowerBound..<e.upperBound + 1) }
      }
      for _ in 0..<60 { checkRanges.append(randomRange(count: UInt64(count), &g)) }
      for r in checkRanges {
        let modelAll = r.allSatisfy { m.bits[Int($0)] }
        let modelAny = r.contains { m.bits[Int($0)] }
        XCTAssertEqual(b.allSet(r), modelAll, "\(ctx), allSet \(r)")
        XCTAssertEqual(b.anySet(r), modelAny, "\(ctx), anySet \(r)")
      }
    }
  }

  // MARK: Algebra

  func testSetAlgebra() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 8) { count, g, ctx in
      let ma = randomModel(count: count, &g)
      let mb = randomModel(count: count, &g)
      let a = bitmap(from: ma)
      let b = bitmap(from: mb)

      var union = Model(count: count)
      var inter = Model(count: count)
      var diff = Model(count: count)
      var inv = Model(count: count)
      for i in 0..<count {
        union.bits[i] = ma.bits[i] || mb.bits[i]
        inter.bits[i] = ma.bits[i] && mb.bits[i]
        diff.bits[i] = ma.bits[i] && !mb.bits[i]
        inv.bits[i] = !ma.bits[i]
      }

      var x = a
      x.formUnion(b)
      assertSame(x, union, "\(ctx), formUnion")
      x = a
      x.formIntersection(b)
      assertSame(x, inter, "\(ctx), formIntersection")
      x = a
      x.subtract(b)
      assertSame(x, diff, "\(ctx), subtract")
      x = a
      x.invert()
      assertSame(x, inv, "\(ctx), invert")

      assertSame(a.union(b), union, "\(ctx), union")
      assertSame(a.intersection(b), inter, "\(ctx), intersection")
      assertSame(a.subtracting(b), diff, "\(ctx), subtracting")
      assertSame(a.inverted(), inv, "\(ctx), inverted")
      // The non-mutating forms leave their operands alone (value semantics).
      assertSame(a, ma, "\(ctx), operand a after algebra")
      assertSame(b, mb, "\(ctx), operand b after algebra")

      // Identities.
      XCTAssertEqual(a.inverted().inverted(), a, ctx)
      XCTAssertEqual(a.union(a.inverted()), BlockBitmap(count: UInt64(count), filled: true), ctx)
      XCTAssertEqual(a.intersection(a.inverted()), BlockBitmap(count: UInt64(count)), ctx)
      XCTAssertEqual(a.subtracting(b), a.intersection(b.inverted()), ctx)
    }
  }

  func testInvertKeepsTailBitsClear() {
    forEachCase(rounds: 3, randomCounts: 20, salt: 9) { count, g, ctx in
      var b = bitmap(from: randomModel(count: count, &g))
      for step in 0..<4 {
        let before = b.population
        b.invert()
        XCTAssertEqual(b.population, UInt64(count) - before, "\(ctx), invert \(step)")
        XCTAssertEqual(b.population(in: 0..<UInt64(count)), UInt64(count) - before, "\(ctx), invert \(step)")
        // No bit past `count` may be set in the last word.
        if count % 64 != 0 {
          let last = b.withWords { $0.last! }
          XCTAssertEqual(last >> UInt64(count % 64), 0, "\(ctx), tail bits after invert \(step)")
        }
        // Searches never report blocks past the end.
        if let s = b.nextSet(from: 0) { XCTAssertLessThan(s, UInt64(count), ctx) }
        if let c = b.nextClear(from: 0) { XCTAssertLessThan(c, UInt64(count), ctx) }
        if before == 0 { XCTAssertNil(b.nextClear(from: 0), "\(ctx): all set after inverting all clear") }
        // Set algebra after an invert keeps the tail clean too.
        b.formUnion(BlockBitmap(count: UInt64(count)))
        XCTAssertEqual(b.population, UInt64(count) - before, ctx)
      }
    }
  }

  func testEquatableIsByContent() {
    forEachCase(rounds: 2, randomCounts: 10, salt: 10) { count, g, ctx in
      let m = randomModel(count: count, &g)
      let viaSubscript = bitmap(from: m)
      var viaRanges = BlockBitmap(count: UInt64(count))
      for e in m.extents { viaRanges.set(e) }
      XCTAssertEqual(viaSubscript, viaRanges, ctx)
      XCTAssertEqual(viaSubscript, BlockBitmap(count: UInt64(count), words: m.words), ctx)
      if count > 0 {
        var other = viaSubscript
        other[UInt64(count - 1)].toggle()
        XCTAssertNotEqual(other, viaSubscript, ctx)
      }
      XCTAssertNotEqual(BlockBitmap(count: UInt64(count)), BlockBitmap(count: UInt64(count) + 1), ctx)
    }
  }

  // MARK: 2^32 blocks

  /// A bitmap of exactly 2^32 blocks (512 MiB of words): blocks near the end
  /// and above 2^31 must be addressable, and counts must not wrap at 32 bits.
  func testFourBillionBlocks() {
    let n: UInt64 = 1 << 32
    var b = BlockBitmap(count: n)
    XCTAssertEqual(b.count, n)
    XCTAssertEqual(b.wordCount, 1 << 26)

    let last = n - 1
    b[last] = true
    XCTAssertTrue(b[last])
    XCTAssertFalse(b[last - 1])
    // A range crossing two word boundaries near the end.
    let r: Range<UInt64> = (n - 200)..<(n - 70)
    b.set(r)
    // A range around 2^31 and one around 2^32 - 2^31 boundary of Int32 indices.
    let mid: Range<UInt64> = ((1 << 31) - 3)..<((1 << 31) + 3)
    b.set(mid)
    XCTAssertTrue(b[1 << 31])
    XCTAssertFalse(b[(1 << 31) + 3])
    XCTAssertEqual(b.population(in: (n - 256)..<n), UInt64(r.count) + 1)
    XCTAssertEqual(b.population(in: mid), 6)
    XCTAssertTrue(b.allSet(r))
    XCTAssertFalse(b.allSet((r.lowerBound - 1)..<r.upperBound))
    XCTAssertTrue(b.anySet(last..<n))
    XCTAssertFalse(b.anySet(r.upperBound..<last))
    XCTAssertEqual(b.nextSet(from: (1 << 31) + 3), r.lowerBound)
    XCTAssertEqual(b.nextClear(from: r.lowerBound), r.upperBound)
    XCTAssertEqual(b.nextSet(from: r.upperBound), last)
    XCTAssertNil(b.nextClear(from: last))
    XCTAssertNil(b.nextSet(from: n))

    // Whole-bitmap passes: a few, to stay fast in debug builds.
    let population = b.population
    XCTAssertEqual(population, UInt64(r.count) + 1 + 6)
    XCTAssertEqual(Array(b.extents), [mid, r, last..<n])

    b.invert()
    XCTAssertEqual(b.population, n - population)
    XCTAssertFalse(b[last])
    XCTAssertTrue(b[last - 1])
    XCTAssertEqual(b.nextClear(from: 0), mid.lowerBound)
    XCTAssertEqual(b.nextClear(from: mid.upperBound), r.lowerBound)

    b.clear((n - 64)..<n)
    b.set(0..<(n - 64))
    XCTAssertEqual(b.population(in: (n - 128)..<n), 64)
    XCTAssertEqual(b.nextClear(from: 0), n - 64)
  }
}
