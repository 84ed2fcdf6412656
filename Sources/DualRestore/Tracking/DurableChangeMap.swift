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
// - A generation is cut by one durable write to the journal (its cut slot),
//   which the caller makes with writes held; the ended map is saved to its
//   output after the release (`settle`), and the map file at the next
//   checkpoint. Until then a restart finishes the cut from the journal:
//   the ended map is rebuilt and saved to the output, the new one to PATH.
//   The journal starts again only once the last cut's ended map is saved,
//   and a cut is made only once the one before it is settled, so the
//   journal never needs more than its latest cut.
// - A cut undone (its ended map could not be saved) stays in the journal
//   until it starts again, which it does before any further write is let
//   through: a restart could still finish the cut, and would put the
//   blocks written since the undo in the ended map, not in the one that
//   went on (those the ended map has are not even journaled again).
// - One writer: the journal is locked (flock) for as long as the object
//   lives; a second server on the same map is refused.
// - Saves of PATH run one at a time, each snapshot taken under that lock,
//   so a later save never holds older bits. A checkpoint saves PATH beside
//   commits and leaves the journal as it is (its records stay good: a
//   restart replays them into a map file that holds them, or fewer); the
//   journal starts again, with no commit beside it, only when full, at a
//   cut undone, and at the close. Saving an ended map to its output runs
//   beside commits.

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
  private let journal: MarkJournal
  /// A generation cut whose ended map is not saved to its output yet.
  private var unsettled: (ended: BlockMap, output: String)?
  /// The cuts whose ended map could not be saved (undone), by ended
  /// generation: why (a few, kept for the server's life).
  private var settleFailures: [ID128: String] = [:]
  /// A cut was undone (its ended map could not be saved): the journal must
  /// start again before another cut or write.
  private var cutUndone = false
  /// One settle at a time (beside commits, not beside each other).
  private let settling = Monitor()
  /// No journal restart beside a cut (a restart would orphan it); taken
  /// before `pathSaves`.
  private let restarts = Monitor()
  /// One save of PATH at a time, its snapshot taken under it, so that a
  /// later save never holds older bits than an earlier one.
  private let pathSaves = Monitor()
  /// Counts what changes the bits on disk may lack (commits, cuts, undos);
  /// `savedVersion` is the count the map file holds.
  private var version: UInt64 = 0
  private var savedVersion: UInt64 = 0

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
    // Marks journaled since the map file was last saved belong to it, or,
    // past a cut, to the generations the cut ended and started.
    if let contents = journal.recovered() {
      m = Self.recover(m, from: contents, path: path, log: log)
    }
    try MapFile.save(m, to: path)
    try journal.restart()
    changes = m
    committed = m.bits
    geometry = m.geometry
  }

  /// The map at `path` as the journal's records and cut leave it; a cut
  /// whose ended map may not have reached its output is finished here.
  private static func recover(
    _ loaded: BlockMap, from contents: MarkJournalContents, path: String, log: (String) -> Void
  ) -> BlockMap {
    func replay(_ map: inout BlockMap) -> Int {
      var n = 0
      for r in contents.records where r.map == map.mapID && r.blocks.upperBound <= map.geometry.blockCount {
        map.bits.set(r.blocks)
        n += 1
      }
      return n
    }
    var m = loaded
    // A cut whose new generation is the map's was saved before the map
    // (settled before the journal could start again): nothing to finish.
    guard let cut = contents.cut, cut.started != m.mapID else {
      let before = m.bits.population
      let n = replay(&m)
      if n > 0 {
        log(
          "the last stop was not clean: \(n) journal record(s) replayed into \(path), "
            + "\(m.bits.population - before) block(s) added")
      }
      return m
    }
    // The ended generation is the map's, or began at an earlier cut in this
    // journal (whose own ended map was saved before this cut was made).
    var ended =
      cut.ending == m.mapID
      ? m
      : BlockMap(
        geometry: m.geometry, meaning: .changed, deviceName: m.deviceName, mapID: cut.ending,
        trackingStarted: cut.endingStarted)
    let endedRecords = replay(&ended)
    ended.trackingEnded = cut.startedAt
    var fresh = BlockMap(
      geometry: m.geometry, meaning: .changed, deviceName: m.deviceName, mapID: cut.started,
      trackingStarted: cut.startedAt)
    let freshRecords = replay(&fresh)
    do {
      try MapFile.save(ended, to: cut.output)
    } catch {
      // The ended generation goes on, with the blocks written since.
      ended.trackingEnded = .unset
      ended.bits.formUnion(fresh.bits)
      log(
        "the last stop came after generation \(cut.ending) ended, but its change map cannot be saved to "
          + "\(cut.output) (\(error)): generation \(cut.ending) goes on, with the blocks written since")
      return ended
    }
    log(
      "the last stop came after generation \(cut.ending) ended: its change map (\(ended.bits.population) block(s), "
        + "\(endedRecords) journal record(s)) is saved to \(cut.output); generation \(cut.started) goes on "
        + "(\(freshRecords) journal record(s) replayed)")
    return fresh
  }

  /// The generation, when it started, and the blocks set (in memory).
  var summary: (generation: ID128, started: Instant, blocks: UInt64) {
    state.withLock { (changes.mapID, changes.trackingStarted, changes.bits.population) }
  }

  /// Sets `blocks` and returns once they are set on disk; throws (with
  /// nothing to issue) when they cannot be made durable.
  /// The blocks are those of the generation running when it returns: a
  /// cut meanwhile sets them again in the new one.
  func mark(_ blocks: Range<UInt64>) throws {
    state.lock()
    defer { state.unlock() }
    // Group commit: one thread makes the marks durable for everyone waiting.
    while cutUndone || !committed.allSet(blocks) {
      if !changes.bits.allSet(blocks) {
        changes.bits.set(blocks)
        pendingRanges.append(blocks)
      }
      if committing {
        state.wait()
        continue
      }
      committing = true
      let ranges = pendingRanges
      pendingRanges.removeAll(keepingCapacity: true)
      let mapID = changes.mapID
      let undone = cutUndone
      state.unlock()
      var failure: Error?
      // The map saved when the journal starts again here.
      var restarted: BlockMap?
      do {
        if !undone, journal.hasRoom(ranges.count) {
          try journal.append(ranges, mapID: mapID)
        } else {
          // The journal starts again only once the last cut's ended map
          // is saved (or the cut undone); after a cut undone, before any
          // write.
          restarts.lock()
          defer { restarts.unlock() }
          if state.withLock({ unsettled != nil }) { _ = try? settle() }
          pathSaves.lock()
          defer { pathSaves.unlock() }
          let snapshot = state.withLock { changes }
          try MapFile.save(snapshot, to: path)
          try journal.restart()
          restarted = snapshot
        }
      } catch { failure = error }
      state.lock()
      committing = false
      if failure == nil {
        if let saved = restarted {
          // Everything in memory when the map was saved is on disk.
          if saved.mapID == changes.mapID { committed = saved.bits }
          cutUndone = false
        } else if mapID == changes.mapID {
          // A cut made meanwhile started another map: what was committed
          // belongs to the one that ended (its writers set their blocks
          // again). A cut undone meanwhile gave `committed` the ended
          // map's bits already.
          for r in ranges { committed.set(r) }
        }
        version &+= 1
      } else {
        pendingRanges = ranges + pendingRanges
      }
      state.broadcast()
      if let failure {
        throw ToolkitError("the change map cannot be made durable, so the write was not issued: \(failure)")
      }
    }
  }

  /// Runs `body` (a save of PATH) with no commit or other save beside it.
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

  /// Saves the map at PATH and starts the journal again; the caller is
  /// `saving`, and the last cut is settled.
  private func saveAndRestart() throws {
    restarts.lock()
    defer { restarts.unlock() }
    pathSaves.lock()
    defer { pathSaves.unlock() }
    let (snapshot, saved) = state.withLock {
      var m = changes
      m.bits = committed
      return (m, version)
    }
    try MapFile.save(snapshot, to: path)
    try journal.restart()
    state.withLock {
      cutUndone = false
      savedVersion = max(savedVersion, saved)
    }
  }

  /// Saves the map file with the bits committed so far, so that
  /// overwrite-map show PATH is up to date; called every few seconds, and
  /// after a generation's end is settled. Writes go on meanwhile: the
  /// journal keeps its records (a restart replays them into the map file
  /// again, which holds them or fewer), and starts again only when full
  /// (or at the close), so nothing waits for this save.
  func checkpoint() throws {
    // PATH shows a new generation only once the ended one is saved: a
    // restart takes a map file of the new generation as that.
    if state.withLock({ unsettled != nil }) { _ = try? settle() }
    if state.withLock({ cutUndone }) {
      // The undone cut leaves the journal before any write (see mark).
      try saving { try saveAndRestart() }
      return
    }
    pathSaves.lock()
    defer { pathSaves.unlock() }
    let snapshot = state.withLock { () -> (map: BlockMap, version: UInt64)? in
      guard unsettled == nil, !cutUndone, version != savedVersion else { return nil }
      var m = changes
      m.bits = committed
      return (m, version)
    }
    guard let snapshot else { return }
    try MapFile.save(snapshot.map, to: path)
    state.withLock { savedVersion = max(savedVersion, snapshot.version) }
  }

  /// Ends the generation, the caller holding its writes back so that each
  /// lands in exactly one: one durable write to the journal cuts it, and
  /// `fresh` goes on in memory. The ended map is saved to `output` by
  /// `settle()` (after the release), the map file at the next checkpoint.
  /// Returns the map that ended.
  /// A commit may be in flight meanwhile (its writer is not yet writing,
  /// so the caller's hold does not wait for it): its records name the map
  /// that ends, and its writer sets its blocks again in the new one.
  func cutGeneration(_ fresh: BlockMap, savingTo output: String) throws -> BlockMap {
    // The journal keeps one cut: the one before is settled first, and a
    // cut undone is folded into the map file (both rare: a cut settles
    // right after its release).
    if state.withLock({ unsettled != nil }) { _ = try? settle() }
    if state.withLock({ cutUndone }) { try saving { try saveAndRestart() } }
    // No restart beside the cut, which would orphan it.
    restarts.lock()
    defer { restarts.unlock() }
    // The generation that ends records the instant it ended: the new one's start.
    var old = state.withLock { changes }
    old.trackingEnded = fresh.trackingStarted
    do {
      try journal.cut(
        MarkJournalCut(
          number: 0, ending: old.mapID, endingStarted: old.trackingStarted, started: fresh.mapID,
          startedAt: fresh.trackingStarted, output: output))
    } catch {
      // The cut may be on disk all the same: start the journal again
      // with the map saved, so that no cut but a settled one is there.
      restarts.unlock()
      try? saving { try saveAndRestart() }
      restarts.lock()
      throw error
    }
    state.withLock {
      // The blocks set since `old` was taken (by a commit's writer, not yet
      // writing) are in the ended map too.
      old.bits.formUnion(changes.bits)
      changes = fresh
      committed = fresh.bits
      pendingRanges.removeAll()
      unsettled = (old, output)
      version &+= 1
      state.broadcast()
    }
    return old
  }

  /// Saves the ended map of the last cut to its output, if not saved yet;
  /// throws when it cannot be (the cut is undone: the ended generation goes
  /// on, with the blocks written since) or could not be before. `ended`
  /// names the cut asked about (nil: the last).
  @discardableResult
  func settle(_ ended: ID128? = nil) throws -> (generation: ID128, output: String)? {
    settling.lock()
    defer { settling.unlock() }
    let pending = state.withLock { unsettled }
    guard let u = pending, ended == nil || u.ended.mapID == ended else {
      if let ended, let why = state.withLock({ settleFailures[ended] }) { throw ToolkitError(why) }
      return nil
    }
    do {
      try MapFile.save(u.ended, to: u.output)
      state.withLock { unsettled = nil }
      return (u.ended.mapID, u.output)
    } catch {
      let why =
        "the change map of generation \(u.ended.mapID), which ended, cannot be saved to \(u.output) (\(error)): "
        + "that generation goes on, with the blocks written since"
      state.withLock {
        fold(u.ended)
        settleFailures[u.ended.mapID] = why
      }
      throw ToolkitError(why)
    }
  }

  /// Undoes the last cut, which ended `ended` and is not settled: that
  /// generation goes on, with the blocks written since; the map file is
  /// saved and the journal started again, so that the cut is gone for a
  /// restart too. The caller holds writes back.
  func undoCut(_ ended: ID128) throws {
    try saving {
      settling.lock()
      defer { settling.unlock() }
      try state.withLock {
        guard let u = unsettled, u.ended.mapID == ended else {
          throw ToolkitError("generation \(ended) has not ended here, or its end is saved already: it cannot be undone")
        }
        fold(u.ended)
      }
      try saveAndRestart()
    }
  }

  /// The ended map's bits join the running map, which takes back its id
  /// and start: the cut is undone. They are committed already (in the map
  /// file, or in the journal under the ended id). Under `state`.
  private func fold(_ ended: BlockMap) {
    var m = changes
    m.mapID = ended.mapID
    m.trackingStarted = ended.trackingStarted
    m.trackingEnded = .unset
    m.lastMergedStream = ended.lastMergedStream
    m.mergedAsOf = ended.mergedAsOf
    m.mergedAsOfGeneration = ended.mergedAsOfGeneration
    m.bits.formUnion(ended.bits)
    changes = m
    committed.formUnion(ended.bits)
    unsettled = nil
    cutUndone = true
    version &+= 1
  }

  /// Saves the map whole and starts the journal again (a clean stop).
  func close() throws {
    try saving {
      if state.withLock({ unsettled != nil }) { _ = try? settle() }
      restarts.lock()
      defer { restarts.unlock() }
      pathSaves.lock()
      defer { pathSaves.unlock() }
      let m = state.withLock { changes }
      try MapFile.save(m, to: path)
      try journal.restart()
    }
  }
}
