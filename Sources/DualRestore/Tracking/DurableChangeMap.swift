// A change map kept on disk for a device whose writes it records: the map
// file (dualrestore-map(5), meaning `changed`) and its journal (MarkJournal,
// PATH.journal). tracking-server keeps one per generation; restore-read-
// through keeps one with a read-only backup, for the writes the backup does
// not get.
//
// Invariants:
// - Marked before written: mark(_:) returns only once the blocks are set in
//   the map *on disk* (group commit: one journal append and fdatasync for
//   every caller waiting, or a save of the map file when the journal is
//   full), so the caller issues its write after it; after a crash the map
//   and its journal cover every block that may have changed.
// - The journal's records belong to the map file they follow: opening the
//   map replays them into it, saves it and starts the journal again, so a
//   restart keeps adding to the same map.
// - One writer: the journal is locked (flock) for as long as the object
//   lives; a second server on the same map is refused.
// - Saves (a checkpoint, a new generation, the close) run one at a time and
//   never beside a commit.

import Glibc

// @unchecked Sendable: its state is behind `state`.
final class DurableChangeMap: @unchecked Sendable {
  let path: String
  let geometry: BlockGeometry
  private let state = Monitor()
  /// The map, bits as in memory.
  private var changes: BlockMap
  /// The bits known to be on disk (map file and journal).
  private var committed: BlockBitmap
  /// Ranges set in `changes` but not yet committed.
  private var pendingRanges: [Range<UInt64>] = []
  private var committing = false
  private var journalHasRecords = false
  private let journal: MarkJournal

  /// Opens the change map of `device` at `path`, created when missing with
  /// blocks of `blockSize` (default when nil); an existing map must be a
  /// change map of this device and size (and of `blockSize` when given).
  init(path: String, device: Device, blockSize: UInt32?, log: (String) -> Void) throws {
    self.path = path
    // The journal is locked first: one server per change map.
    journal = try MarkJournal(path: path + ".journal")
    let devicePath = canonicalPath(device.path)
    var m: BlockMap
    if pathExists(path) {
      m = try MapFile.load(path)
      guard m.meaning == .changed else {
        throw ToolkitError("\(path) is a map of \(m.meaning) blocks, not a change map")
      }
      guard m.geometry.deviceSize == device.size else {
        throw ToolkitError("\(path) describes \(m.geometry.deviceSize) bytes but \(device.path) has \(device.size)")
      }
      if let blockSize, blockSize != m.geometry.blockSize {
        throw ToolkitError(
          "\(path) has blocks of \(m.geometry.blockSize) bytes, not \(blockSize): a change map keeps its block size")
      }
      if m.deviceName.isEmpty {
        m.deviceName = devicePath
      } else if !samePath(m.deviceName, device.path) {
        throw ToolkitError("\(path) is the change map of \(m.deviceName), not of \(device.path)")
      }
      log("generation \(m.mapID) since \(m.trackingStarted) goes on: \(m.bits.population) block(s) changed so far")
    } else {
      let geometry = try BlockGeometry(blockSize: blockSize ?? BlockGeometry.defaultBlockSize, deviceSize: device.size)
      try geometry.checkMappable()
      m = BlockMap(geometry: geometry, meaning: .changed, deviceName: devicePath)
      log("created the change map \(path): generation \(m.mapID) starts now")
    }
    // Marks journaled since the map file was last saved belong to it.
    let replayed = try journal.recovered(for: m.mapID)
    if !replayed.isEmpty {
      let before = m.bits.population
      for r in replayed where r.upperBound <= m.geometry.blockCount { m.bits.set(r) }
      log(
        "the last stop was not clean: \(replayed.count) journal record(s) replayed into \(path), "
          + "\(m.bits.population - before) block(s) added")
    }
    try MapFile.save(m, to: path)
    try journal.restart()
    changes = m
    committed = m.bits
    geometry = m.geometry
  }

  /// The generation, when it started, and the blocks set (in memory).
  var summary: (generation: ID128, started: Instant, blocks: UInt64) {
    state.withLock { (changes.mapID, changes.trackingStarted, changes.bits.population) }
  }

  /// Sets `blocks` and returns once they are set on disk; throws (with
  /// nothing to issue) when they cannot be made durable.
  func mark(_ blocks: Range<UInt64>) throws {
    state.lock()
    defer { state.unlock() }
    if committed.allSet(blocks) { return }
    if !changes.bits.allSet(blocks) {
      changes.bits.set(blocks)
      pendingRanges.append(blocks)
    }
    // Group commit: one thread makes the marks durable for everyone waiting.
    while !committed.allSet(blocks) {
      if committing {
        state.wait()
        continue
      }
      committing = true
      let ranges = pendingRanges
      pendingRanges.removeAll(keepingCapacity: true)
      let snapshot = changes
      state.unlock()
      var failure: Error?
      do {
        if journal.hasRoom(ranges.count) {
          try journal.append(ranges, mapID: snapshot.mapID)
        } else {
          try MapFile.save(snapshot, to: path)
          try journal.restart()
        }
      } catch { failure = error }
      state.lock()
      committing = false
      if failure == nil {
        committed = snapshot.bits
        journalHasRecords = true
      } else {
        pendingRanges = ranges + pendingRanges
      }
      state.broadcast()
      if let failure {
        throw ToolkitError("the change map cannot be made durable, so the write was not issued: \(failure)")
      }
    }
  }

  /// Runs `body` (a save) with no commit or other save beside it.
  private func saving<R>(_ body: () throws -> R) throws -> R {
    state.lock()
    while committing { state.wait() }
    committing = true
    state.unlock()
    defer {
      state.withLock {
        committing = false
        state.broadcast()
      }
    }
    return try body()
  }

  /// Folds the journal into the map file, so that overwrite-map show PATH
  /// is up to date; called every few seconds.
  func checkpoint() throws {
    try saving {
      guard var snapshot = state.withLock({ journalHasRecords ? changes : nil }) else { return }
      snapshot.bits = state.withLock { committed }
      try MapFile.save(snapshot, to: path)
      try journal.restart()
      state.withLock { journalHasRecords = false }
    }
  }

  /// Ends the generation: the map as it is goes to `output`, `fresh`
  /// starts at `path`. The caller holds its writes back meanwhile, so that
  /// each lands in exactly one generation. Returns the map that ended.
  func startGeneration(_ fresh: BlockMap, savingTo output: String) throws -> BlockMap {
    try saving {
      // The generation that ends records the instant it ended: the new one's start.
      var old = state.withLock { changes }
      old.trackingEnded = fresh.trackingStarted
      try MapFile.save(old, to: output)
      try MapFile.save(fresh, to: path)
      try journal.restart()
      state.withLock {
        changes = fresh
        committed = fresh.bits
        pendingRanges.removeAll()
        journalHasRecords = false
      }
      return old
    }
  }

  /// Saves the map whole and starts the journal again (a clean stop).
  func close() throws {
    try saving {
      let m = state.withLock { changes }
      try MapFile.save(m, to: path)
      try journal.restart()
      state.withLock { journalHasRecords = false }
    }
  }
}
