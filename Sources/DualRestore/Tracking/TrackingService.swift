// What a running tracking-server does beside serving NBD: the periodic
// checkpoint of its change map, and the answers on its control socket
// (ControlSocket: `status`, `freeze [changes-out=FILE]`, `drop [view=ID]`,
// `new-generation changes-out=FILE`, each answered with KEY VALUE lines;
// and `hold [limit=SECONDS] [changes-out=FILE]`, which keeps writes held
// on its connection until `release` (answered with `held_seconds`), the
// requests sent meanwhile running within the hold: a consistency group's
// point, taken on several servers at one instant; FILE, the output of the
// action to come, is checked before anything is held).
//
// Invariants:
// - A checkpoint runs every few seconds until stop() returns; stop() waits
//   for the one in progress, so the engine's close() is the last writer of
//   the change map.
// - An answer's fields are the ones documented in tracking-server(1): the
//   subcommands that print them, in this or another version of the tool,
//   read them by name.
// - A hold never outlives its client nor its limit (10 s unless the client
//   asks another, at most 60 s): at the connection's close or the limit the
//   writes go on at once, the log says so, and a view frozen within the
//   hold is dropped, since its group may lack it elsewhere.

import Glibc

public final class TrackingService: Sendable {
  public let engine: TrackingEngine
  private let checkpointInterval: Double
  private let threads = StoppableThreads()
  /// Taken by the requests that change the server, outside a hold.
  private let plainRequests = Monitor()

  public init(engine: TrackingEngine, checkpointInterval: Double = 5) {
    self.engine = engine
    self.checkpointInterval = checkpointInterval
  }

  /// Starts the periodic checkpoint, and with far copies a line every
  /// `lagInterval` seconds on what each lacks while any lacks something.
  public func start(lagInterval: Double = 10) {
    threads.start { [self] in
      while threads.pause(checkpointInterval) {
        do { try engine.checkpoint() } catch { engine.log("checkpoint: \(error)") }
        // Retention by time goes on while no point is taken.
        engine.history?.trim()
      }
    }
    guard let mirror = engine.mirror, lagInterval > 0 else { return }
    threads.start { [self] in
      while threads.pause(lagInterval) {
        let lags = mirror.lag
        guard lags.contains(where: { $0.intervals > 0 }) else { continue }
        engine.log(
          lags.map {
            "far copy \($0.name) holds interval \($0.interval), lacks \($0.intervals) (\(formatBytes($0.bytes))), "
              + "oldest \(formatFixed($0.oldestSeconds, digits: 1)) s"
          }.joined(separator: "; "))
      }
    }
  }

  /// Asks the checkpoint to end, without waiting (from a signal handler).
  public func beginStop() { threads.beginStop() }

  /// Ends the checkpoint and waits for it.
  public func stop() { threads.stop() }

  /// Serves one control connection: one request answered, or a hold of
  /// writes (`hold`) with the requests made within it.
  public func serve(_ channel: ControlChannel) {
    let words: [String]
    switch channel.next(timeout: 10) {
    case .words(let w): words = w
    case .closed: return
    case .timedOut, .tooLong:
      try? channel.send(.error("the request was not one line of at most \(ControlSocket.maximumLine) bytes"))
      return
    }
    if words.first == "hold" { return holdSession(channel, words) }
    // Requests that change the server are answered one at a time, as
    // before connections had threads of their own; a hold's are not (a
    // freeze waiting here for its gate would block the hold's own freeze).
    let changes = words.first != "status"
    try? channel.send(changes ? plainRequests.withLock { answer(words) } : answer(words))
  }

  /// A hold's limit when the client gives none, and the most it may give.
  public static let defaultHoldLimit = 10.0
  public static let maximumHoldLimit = 60.0

  /// `hold [limit=SECONDS] [changes-out=FILE] [then=ACTION]`: writes are
  /// held (and, with then=, ACTION run at once within the hold: its answer
  /// joins the hold's) until `release`, the
  /// connection's close or the limit (counted from the request); in
  /// between, `freeze`, `new-generation`, `drop` and `status` run with
  /// writes held; `undo` drops the view frozen and undoes the generation
  /// ended within it. A hold that ends without `release` undoes them too:
  /// only a released hold makes a point. A generation
  /// cut within the hold is cut by one journal write; its ended map is
  /// saved after the release (writes going on), and `settle`, the one
  /// request answered after `release`, waits for that.
  private func holdSession(_ channel: ControlChannel, _ words: [String]) {
    var limit = Self.defaultHoldLimit
    /// The action to run as soon as writes are held (`then=`), and its words.
    var then: [String]?
    switch ControlSocket.arguments(words.dropFirst()) {
    case .failure(let e):
      try? channel.send(.error(e.message))
      return
    case .success(let a):
      if let text = a["limit"] {
        guard let l = Double(text), l > 0, l <= Self.maximumHoldLimit else {
          try? channel.send(
            .error("hold limit=\(text) is out of range (above 0, at most \(Int(Self.maximumHoldLimit)) seconds)"))
          return
        }
        limit = l
      }
      // The output of the action to come, checked before anything is held,
      // so that a group refuses a bad one on every device alike.
      if let out = a["changes-out"] {
        do {
          try engine.checkOutput(out)
        } catch {
          try? channel.send(.error("\(error); nothing is held"))
          return
        }
      }
      if let action = a["then"] {
        guard action == "freeze" || action == "new-generation" else {
          try? channel.send(.error("hold then=\(action) is not an action: give freeze or new-generation"))
          return
        }
        guard action == "freeze" || a["changes-out"] != nil else {
          try? channel.send(.error("hold then=new-generation needs changes-out=FILE; nothing is held"))
          return
        }
        then = [action] + (a["changes-out"].map { ["changes-out=" + ControlSocket.encode($0)] } ?? [])
      }
    }
    let held: TrackingEngine.WriteHold
    do {
      held = try engine.holdWrites(drainLimit: limit)
    } catch {
      try? channel.send(.error("\(error)"))
      return
    }
    let deadline = held.asked + limit
    /// The view frozen within this hold and not dropped since.
    var frozen: ID128?
    /// The generation ended within this hold and not undone since.
    var ended: ID128?
    /// Notes what an action's answer made within the hold.
    func made(_ a: ControlAnswer) {
      guard a.error == nil else { return }
      if let v = a.fields.first(where: { $0.0 == "view" }) { frozen = ID128(hex: v.1) }
      if let g = a.fields.first(where: { $0.0 == "ended_generation" }) { ended = ID128(hex: g.1) }
    }
    /// Undoes what was made within the hold (the view dropped, the
    /// generation's end undone), the hold still open; says what it did.
    func undo() throws -> [(String, String)] {
      var done: [(String, String)] = []
      if let id = ended {
        try engine.undoGeneration(ended: id, within: held)
        ended = nil
        done.append(("undone_generation_end", id.description))
      }
      if let id = frozen {
        _ = try engine.dropView(id: id)
        frozen = nil
        done.append(("dropped_view", id.description))
      }
      return done
    }
    /// Ends the hold without release: writes go on, and what was made
    /// within it is undone (only a released hold makes a point).
    func abandon(_ why: String) -> String {
      var undone = ""
      // At a stop the view is lost with the server (and reported so at the
      // next start), and a generation ended is saved at the close.
      if !threads.isStopping {
        do {
          for (what, id) in try undo() {
            undone +=
              what == "dropped_view"
              ? "; the view \(id) frozen within it is dropped" : "; the end of generation \(id) within it is undone"
          }
        } catch {
          undone += "; \(error)"
        }
      }
      let seconds = engine.release(held) ?? 0
      let s =
        "the hold of writes ended \(why) after \(formatFixed(seconds, digits: 3)) s, without release: writes go on"
        + undone
      engine.log(s)
      return s
    }
    let drain = formatFixed(held.since - held.asked, digits: 6)
    var fields = [("drain_seconds", drain), ("limit_seconds", formatFixed(limit, digits: 3))]
    if let then {
      // The action at once, saving the coordinator a round trip within the
      // hold; when it fails, the hold ends with it.
      let a = answer(then, within: held)
      if let error = a.error {
        engine.release(held)
        try? channel.send(.error("\(error); the hold ended, nothing is held"))
        return
      }
      made(a)
      fields += a.fields
    }
    guard (try? channel.send(.ok(fields))) != nil
    else {
      _ = abandon("as its control connection failed")
      return
    }
    while true {
      let left = deadline - monotonicSeconds()
      var request = left > 0 ? channel.next(timeout: left) : .timedOut
      if case .words = request, monotonicSeconds() >= deadline { request = .timedOut }
      switch request {
      case .closed:
        _ = abandon("as its control connection closed")
        return
      case .tooLong:
        let s = abandon("on a request longer than \(ControlSocket.maximumLine) bytes")
        try? channel.send(.error(s))
        return
      case .timedOut:
        // The client learns it from the answer to its next request.
        let s = abandon("at its limit of \(formatFixed(limit, digits: 3)) s")
        if case .words = channel.next(timeout: 10) { try? channel.send(.error(s + "; nothing more was done")) }
        return
      case .words(let w):
        switch w.first {
        case "release":
          let seconds = engine.release(held) ?? 0
          try? channel.send(.ok([("held_seconds", formatFixed(seconds, digits: 6))]))
          // What was done within the hold reaches its files now, writes
          // going on; `settle` waits for it.
          let started = monotonicSeconds()
          var settled: ControlAnswer
          do {
            // Nothing to save when nothing ended within the hold.
            if let ended { try engine.settle(ended: ended) }
            settled = .ok([("settle_seconds", formatFixed(monotonicSeconds() - started, digits: 6))])
          } catch {
            settled = .error("\(error)")
            engine.log("after the hold: \(error)")
          }
          if case .words(let w) = channel.next(timeout: 30) {
            if w.first != "settle" { settled = .error("after release only settle is answered") }
            try? channel.send(settled)
          }
          return
        case "hold":
          try? channel.send(.error("this control connection holds writes already"))
        case "undo":
          var a: ControlAnswer
          do { a = .ok(try undo()) } catch { a = .error("\(error)") }
          if (try? channel.send(a)) == nil {
            _ = abandon("as its control connection failed")
            return
          }
        default:
          let a = answer(w, within: held)
          if w.first == "freeze" || w.first == "new-generation" { made(a) }
          if a.error == nil, w.first == "drop" { frozen = nil }
          if (try? channel.send(a)) == nil {
            _ = abandon("as its control connection failed")
            return
          }
        }
      }
    }
  }

  /// The answer to one control request (within `held`, a hold of writes,
  /// if given).
  public func answer(_ words: [String], within held: TrackingEngine.WriteHold? = nil) -> ControlAnswer {
    guard let command = words.first else { return .error("an empty request") }
    let arguments: [String: String]
    switch ControlSocket.arguments(words.dropFirst()) {
    case .success(let a): arguments = a
    case .failure(let e): return .error(e.message)
    }
    do {
      switch command {
      case "status":
        return .ok(Self.fields(engine.status))
      case "freeze":
        let (view, change) = try engine.freeze(changesOutput: arguments["changes-out"], within: held)
        var f = Self.viewFields(view)
        if let change { f += Self.generationFields(change) }
        return .ok(f)
      case "drop":
        var id: ID128?
        if let text = arguments["view"] {
          guard let v = ID128(hex: text) else { return .error("drop view=\(text) is not a view id") }
          id = v
        }
        return .ok(Self.viewFields(try engine.dropView(id: id)))
      case "points":
        guard let history = engine.history else {
          return .error("the server keeps no history; start it with --history DIR")
        }
        if let at = arguments["at"] {
          guard let instant = Instant(rfc3339: at) else {
            return .error("'\(at)' is not an instant such as 2026-12-07T01:30:00Z")
          }
          let n = try history.point(at: instant)
          return .ok(Self.historyFields(history.summary, only: n))
        }
        return .ok(Self.historyFields(history.summary, only: nil))
      case "new-generation":
        guard let out = arguments["changes-out"] else { return .error("new-generation needs changes-out=FILE") }
        return .ok(Self.generationFields(try engine.newGeneration(output: out, within: held)))
      default:
        return .error("unknown request '\(command)'")
      }
    } catch {
      return .error("\(error)")
    }
  }

  static func fields(_ s: TrackingEngine.Status) -> [(String, String)] {
    var f: [(String, String)] = [
      ("generation", s.generation.description), ("generation_started", s.generationStarted.description),
      ("changed_blocks", String(s.changedBlocks)),
    ]
    if let v = s.view { f += viewFields(v) }
    if let h = s.history {
      f += [
        ("history", h.id.description), ("history_points", String(h.points.count)),
        ("history_space_used", String(h.spaceUsed)),
      ]
      if let first = h.points.first, let last = h.points.last {
        f += [
          ("history_oldest", String(first.number)), ("history_oldest_instant", first.instant.description),
          ("history_newest", String(last.number)), ("history_newest_instant", last.instant.description),
        ]
      }
      if let lost = h.lost { f.append(("history_lost", lost)) }
    }
    if let held = s.heldSeconds { f.append(("writes_held_seconds", formatFixed(held, digits: 3))) }
    return f + mirrorFields(s.mirror)
  }

  /// `history` (its id), `space_used` (bytes of its files), `open_bytes`
  /// (before-images since the newest point), `keep_seconds`, `keep_bytes`
  /// (0: no bound), `points`, then for each point I (oldest first)
  /// `point_I`, `point_I_instant`, `point_I_bytes`, `point_I_blocks`;
  /// `lost` when the history is lost. With `only`, that point alone.
  static func historyFields(_ h: PointHistory.Summary, only: UInt64?) -> [(String, String)] {
    var f: [(String, String)] = [
      ("history", h.id.description), ("space_used", String(h.spaceUsed)), ("open_bytes", String(h.openBytes)),
      ("keep_seconds", formatFixed(h.retention.seconds, digits: 3)), ("keep_bytes", String(h.retention.bytes)),
    ]
    if let lost = h.lost { f.append(("lost", lost)) }
    let points = h.points.filter { only == nil || $0.number == only }
    f.append(("points", String(points.count)))
    for (i, p) in points.enumerated() {
      f += [
        ("point_\(i)", String(p.number)), ("point_\(i)_instant", p.instant.description),
        ("point_\(i)_bytes", String(p.bytes)), ("point_\(i)_blocks", String(p.blocks)),
      ]
    }
    return f
  }

  /// `copies` is the number of far copies; for each, `copy_N` (its URI),
  /// `copy_N_interval` (the last interval it holds), `copy_N_owed_intervals`,
  /// `copy_N_owed_bytes` and `copy_N_oldest_seconds` (the age of the oldest
  /// change it lacks: its recovery point).
  static func mirrorFields(_ lags: [MirrorLag]) -> [(String, String)] {
    guard !lags.isEmpty else { return [] }
    var f = [("copies", String(lags.count))]
    for (i, l) in lags.enumerated() {
      f += [
        ("copy_\(i)", l.name), ("copy_\(i)_interval", String(l.interval)),
        ("copy_\(i)_owed_intervals", String(l.intervals)), ("copy_\(i)_owed_bytes", String(l.bytes)),
        ("copy_\(i)_oldest_seconds", formatFixed(l.oldestSeconds, digits: 3)),
      ]
    }
    return f
  }

  /// `view_lost` is true or false; `view_lost_reason` is there when true.
  static func viewFields(_ v: TrackingEngine.ViewStatus) -> [(String, String)] {
    var f = [
      ("view", v.id.description), ("frozen", v.frozen.description), ("preserved_blocks", String(v.preservedBlocks)),
      ("store_bytes", String(v.storeBytes)), ("store_limit", String(v.storeLimit)),
      ("view_lost", v.lost == nil ? "false" : "true"),
    ]
    if let lost = v.lost { f.append(("view_lost_reason", lost)) }
    return f
  }

  static func generationFields(_ c: TrackingEngine.GenerationChange) -> [(String, String)] {
    [
      ("ended_generation", c.ended.description), ("ended_generation_started", c.endedStarted.description),
      ("ended_changed_blocks", String(c.endedBlocks)), ("generation", c.started.description),
      ("generation_started", c.instant.description),
    ]
  }
}
