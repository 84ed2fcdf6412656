// Which streams of a store of backups to keep, and which may go: a pure
// planner over what the streams' headers (and LINEAGE records) say, with no
// I/O, so that a store's command can show the plan before it deletes.
//
// A *point* is a stream's end state: the device after stream S. A full
// stream reaches the point it stands for (itself; a compacted one, with a
// LINEAGE record, the stream it stands for, whose end it equals); an
// incremental stream reaches its own point from the point of its base. A
// compacted stream's own id names the same point as the stream it stands for.
//
// Invariants:
// - A stream a kept point's chain needs is never deletable, and the newest
//   reachable point is always kept, whatever the rule.
// - A point that cannot be reached (a base missing, or bases in a loop) is an
//   error, never dropped in silence; its streams are neither needed nor
//   deletable, so nothing is deleted on the strength of a damaged store.
// - Each kept point's chain is the shortest (fewest streams), ties broken by
//   the streams' names; every list is in a fixed order, so one store and one
//   rule give one plan.

public enum ChainRetention {
  /// One stream of the store, as its HEADER and LINEAGE record describe it.
  public struct Stream: Equatable, Hashable, Sendable {
    /// Where it is: a path or URL, for people and for deleting it.
    public var name: String
    public var id: ID128
    /// The stream it applies on top of; `.none` for a full stream.
    public var base: ID128
    /// A compacted full stream's LINEAGE record.
    public var lineage: StreamFormat.Lineage?
    /// When it started reading (its HEADER's instant).
    public var started: Instant

    public init(
      name: String, id: ID128, base: ID128 = .none, lineage: StreamFormat.Lineage? = nil, started: Instant
    ) {
      self.name = name
      self.id = id
      self.base = base
      self.lineage = lineage
      self.started = started
    }

    public var isFull: Bool { base.isNone }
  }

  /// What to keep: the newest `keepLast` points, and the newest point of each
  /// of the last `keepDaily` UTC days up to `now`'s (a day after `now`'s,
  /// from a clock ahead, counts too). The newest point is kept in any case.
  public struct Rule: Equatable, Sendable {
    public var keepLast: Int
    public var keepDaily: Int
    public var now: Instant

    public init(keepLast: Int = 0, keepDaily: Int = 0, now: Instant = .now()) {
      self.keepLast = keepLast
      self.keepDaily = keepDaily
      self.now = now
    }
  }

  /// A point kept, and the streams that rebuild it, full stream first.
  public struct Point: Equatable, Sendable {
    /// The stream after which the device is in this state.
    public var id: ID128
    /// That stream's instant.
    public var started: Instant
    public var chain: [Stream]
  }

  public enum Reason: Equatable, Sendable, CustomStringConvertible {
    /// The stream is within what a needed compacted stream compacts.
    case replacedByCompacted(name: String, id: ID128)
    /// Its point is older than every kept point.
    case olderThanEveryKeptPoint
    /// Its point is not kept, and no kept point's chain passes through it.
    case notOnAnyKeptChain

    public var description: String {
      switch self {
      case .replacedByCompacted(let name, _): return "replaced by compacted stream \(name)"
      case .olderThanEveryKeptPoint: return "older than every kept point"
      case .notOnAnyKeptChain: return "no kept point's chain needs it"
      }
    }
  }

  public struct Deletion: Equatable, Sendable {
    public var stream: Stream
    public var reason: Reason
  }

  public struct Plan: Equatable, Sendable {
    /// The points kept, oldest first.
    public var kept: [Point]
    /// The streams the kept points' chains use, by name.
    public var needed: [Stream]
    /// The streams no kept point needs, by name, each with why.
    public var deletable: [Deletion]
    /// One sentence per stream whose point cannot be reached or whose
    /// description does not hold together; such a stream is in neither list.
    public var errors: [String]
  }

  /// The plan for `streams` (in any order) under `rule`.
  public static func plan(_ streams: [Stream], rule: Rule) -> Plan {
    var errors: [String] = []
    // One stream per id: the first by name; the others are left alone.
    var byID: [ID128: Stream] = [:]
    var ordered: [Stream] = []
    for s in streams.sorted(by: precedes) {
      if let first = byID[s.id] {
        errors.append("\(s.name): stream \(s.id) is also \(first.name); it is left alone")
        continue
      }
      var s = s
      if let l = s.lineage, !s.isFull || l.standsFor == s.id || l.standsFor.isNone {
        let why = s.isFull ? "it stands for itself" : "it is incremental"
        errors.append(
          "\(s.name): stream \(s.id) has a lineage that does not hold (\(why)); it is taken as a plain stream")
        s.lineage = nil
      }
      byID[s.id] = s
      ordered.append(s)
    }
    // A compacted stream's own id names the point it stands for (which may
    // itself be a compacted stream's, so resolved through as many steps as
    // there are compacted streams, never round a loop).
    var alias: [ID128: ID128] = [:]
    for s in ordered { if let l = s.lineage { alias[s.id] = l.standsFor } }
    func point(_ id: ID128) -> ID128 {
      var at = id
      for _ in 0..<alias.count {
        guard let next = alias[at] else { break }
        at = next
      }
      return at
    }
    func pointOf(_ s: Stream) -> ID128 { point(s.id) }

    // The shortest chain to each point, breadth first: every point reached
    // by k streams is settled (ties by name) before any reached by k + 1.
    var reaching: [ID128: [Stream]] = [:]
    var onTopOf: [ID128: [Stream]] = [:]
    for s in ordered {
      reaching[pointOf(s), default: []].append(s)
      if !s.isFull { onTopOf[point(s.base), default: []].append(s) }
    }
    var best: [ID128: [Stream]] = [:]
    var layer: [ID128] = []
    for s in ordered where s.isFull {
      let p = pointOf(s)
      if let b = best[p] {
        if shorter([s], than: b) { best[p] = [s] }
      } else {
        best[p] = [s]
        layer.append(p)
      }
    }
    while !layer.isEmpty {
      var next: [ID128] = []
      for p in layer {
        guard let below = best[p] else { continue }
        for s in onTopOf[p] ?? [] {
          let q = pointOf(s)
          let candidate = below + [s]
          if let b = best[q] {
            if b.count == candidate.count && shorter(candidate, than: b) { best[q] = candidate }
          } else {
            best[q] = candidate
            next.append(q)
          }
        }
      }
      layer = next
    }
    func chain(to p: ID128) -> [Stream]? { best[p] }
    var points: [(id: ID128, started: Instant)] = []
    var seen = Set<ID128>()
    for s in ordered {
      let p = pointOf(s)
      guard !seen.contains(p) else { continue }
      seen.insert(p)
      if chain(to: p) != nil { points.append((p, instant(of: p, byID[p], reaching[p] ?? []))) }
    }
    // Why a point cannot be reached, once per stream that reaches nothing
    // (an incremental one: a full stream always reaches its point).
    for s in ordered where chain(to: pointOf(s)) == nil {
      if reaching[point(s.base)] == nil {
        errors.append("\(s.name): stream \(s.id) cannot be reached: its base \(s.base) is not in the store")
        continue
      }
      var visited: Set<ID128> = [s.id]
      var at = s
      var loops = false
      while let next = byID[point(at.base)] ?? reaching[point(at.base)]?.first, !next.isFull {
        if !visited.insert(next.id).inserted {
          loops = true
          break
        }
        at = next
      }
      errors.append(
        "\(s.name): stream \(s.id) cannot be reached: "
          + (loops ? "its chain of bases loops" : "its base \(s.base) cannot be reached"))
    }

    // The points kept: the newest, the last N, the newest of each recent day.
    points.sort { ($0.started, $0.id.description) < ($1.started, $1.id.description) }
    var keep = Set<ID128>()
    if let newest = points.last { keep.insert(newest.id) }
    for p in points.suffix(max(rule.keepLast, 0)) { keep.insert(p.id) }
    if rule.keepDaily > 0 {
      let today = day(rule.now)
      var newestOfDay: [Int64: ID128] = [:]
      for p in points where day(p.started) > today - Int64(rule.keepDaily) { newestOfDay[day(p.started)] = p.id }
      keep.formUnion(newestOfDay.values)
    }
    var kept: [Point] = []
    var neededIDs = Set<ID128>()
    for p in points where keep.contains(p.id) {
      guard let c = chain(to: p.id) else { continue }
      kept.append(Point(id: p.id, started: p.started, chain: c))
      neededIDs.formUnion(c.map(\.id))
    }

    // The rest, each with why it may go.
    let needed = ordered.filter { neededIDs.contains($0.id) }
    let oldestKept = kept.first?.started
    var deletable: [Deletion] = []
    for s in ordered where !neededIDs.contains(s.id) && chain(to: pointOf(s)) != nil {
      let at = instant(of: pointOf(s), byID[pointOf(s)], reaching[pointOf(s)] ?? [])
      let reason: Reason
      if let c = needed.first(where: { compacts($0, pointOf(s), byID: byID, point: point) }) {
        reason = .replacedByCompacted(name: c.name, id: c.id)
      } else if let oldestKept, at < oldestKept {
        reason = .olderThanEveryKeptPoint
      } else {
        reason = .notOnAnyKeptChain
      }
      deletable.append(Deletion(stream: s, reason: reason))
    }
    return Plan(kept: kept, needed: needed, deletable: deletable, errors: errors)
  }

  /// Name order, then id order: the order of every list.
  static func precedes(_ a: Stream, _ b: Stream) -> Bool {
    (a.name, a.id.description) < (b.name, b.id.description)
  }

  /// Fewer streams, then the first stream whose name sorts first.
  static func shorter(_ a: [Stream], than b: [Stream]) -> Bool {
    if a.count != b.count { return a.count < b.count }
    for (x, y) in zip(a, b) where x.id != y.id { return precedes(x, y) }
    return false
  }

  /// The instant of point `p`: that of its own stream when the store has it,
  /// else the one a compacted stream's lineage gives.
  static func instant(of p: ID128, _ own: Stream?, _ reaching: [Stream]) -> Instant {
    if let own, own.lineage == nil { return own.started }
    return reaching.compactMap { $0.lineage?.standsForStarted }.min() ?? own?.started ?? .unset
  }

  /// Whether compacted stream `c` compacts point `p`: `p` is on the chain of
  /// bases from what `c` stands for back to the first stream it compacts.
  static func compacts(_ c: Stream, _ p: ID128, byID: [ID128: Stream], point: (ID128) -> ID128) -> Bool {
    guard let l = c.lineage else { return false }
    if p == point(l.firstCompacted) { return true }
    var at = point(l.standsFor)
    var steps: UInt32 = 0
    while steps < l.compactedCount {
      if at == p { return true }
      if at == point(l.firstCompacted) { return false }
      guard let s = byID[at], !s.isFull else { return false }
      at = point(s.base)
      steps += 1
    }
    return false
  }

  /// The UTC day of `t`: days since 1970-01-01, rounded down.
  static func day(_ t: Instant) -> Int64 {
    let perDay: Int64 = 86_400 * 1_000_000_000
    let ns = t.nanosecondsSinceEpoch
    return ns >= 0 ? ns / perDay : -((-ns + perDay - 1) / perDay)
  }
}
