// The periodic work of a running restore, owned by its engine: hydration,
// the progress line, the completion line and the checkpoint commit. Started
// by RestoreEngine.start(_:), stopped by its close(), which waits for it.
//
// Invariants:
// - "every block is current: the restore is complete" is said once, after
//   a flush has committed the map that says so (current means durable:
//   the primary synchronised first, then the map saved), so the map on
//   disk agrees with the line from the moment it is written.
// - A stop ends hydration between runs: no run starts after it, the runs
//   in flight get their replies, and stop() returns only when every thread
//   here has ended, so the engine's final flush is the last request the
//   backup sees from it.
// - Hydration's pace holds over every window (HydrationPace): at most
//   rate × T + max(rate × 1 s, one run) bytes in any T seconds.
// - A progress line gives the total fetched and what was fetched in the
//   interval it covers, with that interval as measured, not as asked for.

import Dispatch
import Glibc

/// What a running restore does in the background.
public struct RestoreSchedule: Sendable {
  /// Copy the blocks not yet current from the backup.
  public var hydrate: Bool
  /// Bytes a second hydration may read from the backup (0: no limit).
  public var hydrateRate: UInt64
  /// Seconds between progress lines (0: none).
  public var progressInterval: Double
  /// Seconds between checkpoint commits of the map.
  public var checkpointInterval: Double

  public init(hydrate: Bool, hydrateRate: UInt64 = 0, progressInterval: Double = 10, checkpointInterval: Double = 5) {
    self.hydrate = hydrate
    self.hydrateRate = hydrateRate
    self.progressInterval = progressInterval
    self.checkpointInterval = checkpointInterval
  }
}

final class RestoreBackground: Sendable {
  let engine: RestoreEngine
  let schedule: RestoreSchedule
  private let log: @Sendable (String) -> Void
  private let threads = StoppableThreads()
  /// The completion check's state; its lock serialises the check (the
  /// watcher and hydration's end).
  private struct Completion {
    var said: Bool
    /// When the completion commit failed, the next time it is tried.
    var retry = 0.0
    /// Said just before the completion line (hydration's summary).
    var before: String?
  }
  private let completion: Locked<Completion>

  /// How often the watcher looks for the restore's completion.
  static let completionPoll = 0.2

  init(engine: RestoreEngine, schedule: RestoreSchedule) {
    self.engine = engine
    self.schedule = schedule
    self.log = engine.log
    // A restore complete when the server starts was said so before.
    completion = Locked(Completion(said: engine.isComplete))
  }

  func start() {
    if schedule.hydrate { threads.start { [self] in hydrate() } }
    if schedule.progressInterval > 0 { threads.start { [self] in reportProgress() } }
    threads.start { [self] in watch() }
  }

  /// Asks every thread to end, without waiting.
  func beginStop() { threads.beginStop() }

  /// Ends every thread and waits until they have ended.
  func stop() { threads.stop() }

  var isStopping: Bool { threads.isStopping }

  private func pause(_ seconds: Double) -> Bool { threads.pause(seconds) }

  // MARK: The threads

  private func hydrate() {
    engine.hydrate(rate: schedule.hydrateRate, shouldStop: { [self] in isStopping })
    guard engine.isComplete else { return }
    let counted = engine.counters
    let summary =
      "hydration done: \(counted.fetchedBlocks) block(s) fetched from the backup, \(counted.zeroedBlocks) "
      + "zeroed without copying (the backup said they read as zeros)"
      + (engine.reuseSummary.map { "; \($0)" } ?? "")
    // Said with the completion line, after the commit, unless that line
    // came first (the watcher saw the last block).
    let sayNow = completion.withLock { c -> Bool in
      if !c.said { c.before = summary }
      return c.said
    }
    if sayNow { log(summary) }
    checkCompletion()
  }

  /// Looks for the completion often, and commits the map (and the change
  /// map of a read-only backup) every `checkpointInterval` seconds, so a
  /// long run without a client's FLUSH (hydration, merges) still records
  /// its progress.
  private func watch() {
    var nextCheckpoint = monotonicSeconds() + schedule.checkpointInterval
    while pause(Self.completionPoll) {
      checkCompletion()
      if monotonicSeconds() >= nextCheckpoint {
        do { try engine.checkpoint() } catch { log("checkpoint: \(error)") }
        nextCheckpoint = monotonicSeconds() + schedule.checkpointInterval
      }
    }
  }

  /// Says the restore is complete once every block is current and the map
  /// committed says so.
  private func checkCompletion() {
    completion.withLock { c in
      guard !c.said, monotonicSeconds() >= c.retry, engine.isComplete else { return }
      do {
        try engine.flush()
      } catch {
        log("every block is current, but the map could not be committed (\(error)); trying again")
        c.retry = monotonicSeconds() + schedule.checkpointInterval
        return
      }
      c.said = true
      if let line = c.before { log(line) }
      log("every block is current: the restore is complete")
    }
  }

  private func reportProgress() {
    var lastFetched = engine.counters.fetchedBytes
    var lastTime = monotonicSeconds()
    while pause(schedule.progressInterval) {
      let (now, total) = engine.progress
      let counted = engine.counters
      let fetched = counted.fetchedBytes
      let time = monotonicSeconds()
      let recent = fetched - lastFetched
      let seconds = max(time - lastTime, 1e-3)
      lastFetched = fetched
      lastTime = time
      let percent = total == 0 ? 100 : Double(now) * 100 / Double(total)
      log(
        "progress: \(now) of \(total) blocks current (\(formatFixed(percent, digits: 1))%), "
          + "fetched \(formatBytes(fetched)) (\(formatBytes(recent)) in the last "
          + "\(formatFixed(seconds, digits: seconds < 10 ? 2 : 1)) s, \(formatBytes(UInt64(Double(recent) / seconds)))/s), "
          + "merged \(counted.mergedBlocks) blocks"
          + (engine.reuseSummary.map { "; \($0)" } ?? "")
          + (engine.readOnlyBackupChanges.map { ", \($0.blocks) written (in \($0.path))" } ?? "")
          + engine.mirrorLag.map {
            "; far copy \($0.name) holds interval \($0.interval), lacks \($0.intervals) (\(formatBytes($0.bytes))), "
              + "oldest \(formatFixed($0.oldestSeconds, digits: 1)) s"
          }.joined())
    }
  }
}
