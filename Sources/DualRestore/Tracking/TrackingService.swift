// What a running tracking-server does beside serving NBD: the periodic
// checkpoint of its change map, and the answers on its control socket
// (ControlSocket: `status`, `freeze [changes-out=FILE]`, `drop`,
// `new-generation changes-out=FILE`, each answered with KEY VALUE lines).
//
// Invariants:
// - A checkpoint runs every few seconds until stop() returns; stop() waits
//   for the one in progress, so the engine's close() is the last writer of
//   the change map.
// - An answer's fields are the ones documented in tracking-server(1): the
//   subcommands that print them, in this or another version of the tool,
//   read them by name.

import Glibc

public final class TrackingService: Sendable {
  public let engine: TrackingEngine
  private let checkpointInterval: Double
  private let threads = StoppableThreads()

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

  /// The answer to one control request.
  public func answer(_ words: [String]) -> ControlAnswer {
    guard let command = words.first else { return .error("an empty request") }
    var arguments: [String: String] = [:]
    for w in words.dropFirst() {
      guard let eq = w.firstIndex(of: "=") else { return .error("'\(w)' is not KEY=VALUE") }
      arguments[String(w[..<eq])] = ControlSocket.decode(String(w[w.index(after: eq)...]))
    }
    do {
      switch command {
      case "status":
        return .ok(Self.fields(engine.status))
      case "freeze":
        let (view, change) = try engine.freeze(changesOutput: arguments["changes-out"])
        var f = Self.viewFields(view)
        if let change { f += Self.generationFields(change) }
        return .ok(f)
      case "drop":
        return .ok(Self.viewFields(try engine.dropView()))
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
        return .ok(Self.generationFields(try engine.newGeneration(output: out)))
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
