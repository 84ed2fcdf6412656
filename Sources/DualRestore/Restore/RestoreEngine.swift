// Channel 1 of the dual-channel restore: the primary serves its clients from
// an empty replacement disk while blocks come back from the backup.
//
// Invariants:
// - A block marked current is served from the primary; any other block is
//   fetched from the backup, written to the primary, then marked current.
// - Current means durable: the overwrite map on disk marks a block current
//   only after the primary's data is durable (fdatasync), and a flush takes
//   its snapshot of the in-memory bits *before* it synchronises, so a bit
//   set by a write that completes during the flush waits for the next one.
// - Acknowledged means safe: a FLUSH is answered after the primary is
//   synchronised, the backup is flushed and the map is saved; a FUA write
//   after both sides hold it durably.
// - Partial writes: a write covering part of a block that is not current
//   first brings the block from the backup; a whole-block write does not.
// - The activity log holds every region with a write in flight, durably,
//   before the write is issued, so that after a crash the two sides can be
//   made to agree again.
// - One block is never worked on by two requests at once (BlockLocks); a
//   read that misses waits for a fetch of the same block in progress.
// - When the backup cannot take a write, the write is kept on the primary,
//   its blocks are owed to the backup (their regions stay in the activity
//   log, which is durable) and later writes go to the primary alone until a
//   resynchronisation has sent every owed block; meanwhile a FLUSH makes
//   data durable on the primary only, and the backup's recovery point lags.
// - With a read-only backup (a change map given), nothing is ever written
//   to the backup: a write's blocks are marked in the change map on disk
//   before the write is issued on the primary alone (RestoreEngine+
//   ReadOnlyBackup.swift), so the change map covers every block in which
//   the primary may differ from the backup.
// - With older copies to reuse (LocalReuse), a block not current is taken
//   from an older copy when its digest there matches the backup's, and
//   made current exactly as a fetched block is; the blocks of a write that
//   reached the backup but not the primary are no longer reused.

import Dispatch
import Glibc
import Synchronization

public final class RestoreEngine: Sendable {
  public let primary: Device
  public let backup: BlockDevice
  public let geometry: BlockGeometry
  public let mapPath: String
  let log: @Sendable (String) -> Void
  /// What client requests, fetches and hydration share. Held for short
  /// steps only: no I/O under it (the activity log's pins excepted).
  struct State {
    /// Blocks current in memory (a superset of the map's bits on disk).
    var current: BlockBitmap
    /// Current blocks whose latest write the backup has not acknowledged.
    var backupLacks: Set<UInt64> = []
    /// The backup refused or missed a write; writes go to the primary alone
    /// until every owed block has been sent.
    var backupDown = false
    var dirty = false
    var counted = Counters()
    /// Streams whose merge was admitted since the server started, with what
    /// the merge export did with their blocks since the last admission.
    var admittedStreams: [ID128: MergeReport] = [:]
    // Read-ahead of sequential misses: where recent misses ended, and how
    // many misses in a row led there.
    var recentMissEnds: [(end: UInt64, streak: Int)] = []
    var aheadUntil: UInt64 = 0
    /// Fetches in progress: read-ahead only helps a reader that keeps few
    /// requests in flight; one that keeps many is its own read-ahead.
    var fetchesInFlight = 0
    /// Asynchronous mirroring: blocks not current that a client wrote part
    /// of, with the byte ranges (within the block) it wrote; the rest of
    /// the block is still the backup's.
    var partial: [UInt64: [Range<Int>]] = [:]
  }
  let state: Locked<State>
  /// The overwrite map as saved at `mapPath`. Its lock is held through a
  /// whole flush (and the admission or recording of a merge), I/O included,
  /// so that flushes run one at a time; client requests never take it.
  let map: Locked<BlockMap>
  let locks = BlockLocks()
  let activity: ActivityLog
  /// Asynchronous mirroring (--ack local or quorum): the journal and the
  /// far copies' shippers; nil when writes are mirrored synchronously.
  let mirror: AsyncMirror?
  /// The far copies, each on its own: the backup alone, or the copies a
  /// fan-out backup sends every change to.
  let farCopies: [BlockDevice]
  /// With a read-only backup: the change map of the blocks clients wrote,
  /// which the backup never gets; nil when writes go to the backup.
  let changed: DurableChangeMap?
  /// Older copies at the restore site whose blocks are taken where their
  /// digest matches the backup's (--reuse, --backup-signature).
  public let reuse: LocalReuse?
  /// Buffers for copying current blocks to the backup (recovery, owed
  /// blocks); fetched blocks go from the backup's connection into the
  /// primary without one.
  let buffers = BufferPool(keepCount: 4, keepSize: 4 << 20, keepBytes: 16 << 20)
  let zeros: AlignedBuffer
  /// Starts write-out of the clients' writes (and merged blocks), which a
  /// FLUSH waits for, so that it waits for little (EarlyWriteback). Fetched
  /// blocks are left to the kernel and the periodic commit: no client waits
  /// for them, and a cold read should not pay for their write-out.
  let writeback: EarlyWriteback
  /// What the engine has done since it started.
  public struct Counters: Sendable {
    public var fetchedBlocks: UInt64 = 0
    public var fetchedBytes: UInt64 = 0
    /// Blocks made current by zeroing them on the primary, because the
    /// backup said they read as zeros (hydration).
    public var zeroedBlocks: UInt64 = 0
    public var mergedBlocks: UInt64 = 0
    /// Blocks the merge export was given but left alone: already current.
    public var mergeSkippedBlocks: UInt64 = 0
    /// Blocks taken from an older copy at their own offset, at another
    /// offset, and zeroed because the backup's signature says zeros.
    public var reusedSamePlaceBlocks: UInt64 = 0
    public var reusedElsewhereBlocks: UInt64 = 0
    public var reusedZeroBlocks: UInt64 = 0
    /// Bytes of those blocks: what the link did not carry.
    public var reusedBytes: UInt64 = 0
  }
  /// The counters as they are now (read under `state`).
  public var counters: Counters { state.withLock { $0.counted } }
  /// Client requests being served (hydration yields to them).
  private let activeRequests = Atomic<Int>(0)
  /// Writes that reached the backup but not the primary. What the backup
  /// said of its blocks before such a write may no longer hold for blocks
  /// that are not current: hydration does not use it then.
  private let divergentWrites = Atomic<Int>(0)
  private let readAhead = Handoff<Range<UInt64>?>()
  private static let readAheadThreads = 4
  /// Signalled by each read-ahead thread as it ends.
  private let readAheadEnded = DispatchSemaphore(value: 0)
  /// Set when the engine closes: read-ahead fetches nothing more.
  let closing = AtomicFlag()
  /// The periodic work (hydration, progress, completion, checkpoints),
  /// once started.
  private let background = Locked<RestoreBackground?>(nil)
  /// Runs the backup's half of a write while the caller does the primary's.
  let offload = Offload(threads: 32)
  private let readAheadUnit: UInt64
  private let readAheadWindow: UInt64

  deinit { writeback.stop() }

  /// Opens the restore of `primary` from `backup` through the map at `mapPath`
  /// (created when missing), recovering from an unclean shutdown if needed.
  /// With `readOnlyBackup`, the path of a change map (created when
  /// missing, continued when present), nothing is written to the backup and
  /// the blocks clients write are recorded there instead; without it a
  /// backup that refuses writes is refused.
  public init(
    primary: Device, backup: BlockDevice, mapPath: String, blockSize: UInt32,
    mirroring: MirrorSettings? = nil, farCopies: [BlockDevice]? = nil, readOnlyBackup changesPath: String? = nil,
    reuse: LocalReuse? = nil, log: @escaping @Sendable (String) -> Void
  ) throws {
    self.primary = primary
    self.backup = backup
    self.mapPath = mapPath
    self.log = log
    self.farCopies = farCopies ?? [backup]
    self.reuse = reuse
    guard backup.size == primary.size else {
      throw ToolkitError("the backup \(backup.name) has \(backup.size) bytes but \(primary.path) has \(primary.size)")
    }
    // Before any file is made: a backup that refuses writes is not found
    // out at the first client write.
    try Self.checkBackupMode(self.farCopies, changesPath: changesPath, mapPath: mapPath, mirroring: mirroring)
    var m: BlockMap
    if pathExists(mapPath) {
      m = try MapFile.load(mapPath)
      guard m.geometry.deviceSize == primary.size else {
        throw ToolkitError(
          "\(mapPath) describes \(m.geometry.deviceSize) bytes but \(primary.path) has \(primary.size)")
      }
      guard m.meaning == .current else {
        throw ToolkitError("\(mapPath) is a map of \(m.meaning) blocks, not an overwrite map of current blocks")
      }
      try reuse?.check(blockSize: m.geometry.blockSize, mapName: mapPath, backup: backup)
      let sameDevice = samePath(m.deviceName, primary.path)
      if m.deviceName.isEmpty || (!sameDevice && m.bits.population == 0 && m.lastMergedStream.isNone) {
        // A fresh map: bind it to this device.
        m.deviceName = canonicalPath(primary.path)
        try MapFile.save(m, to: mapPath)
        log("bound the fresh map \(mapPath) to \(primary.path)")
      } else if !sameDevice {
        throw ToolkitError("\(mapPath) is the overwrite map of \(m.deviceName), not of \(primary.path)")
      }
    } else {
      let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: primary.size)
      try geometry.checkMappable()
      try reuse?.check(blockSize: blockSize, mapName: mapPath, backup: backup)
      m = BlockMap(
        geometry: geometry, meaning: .current,
        deviceName: canonicalPath(primary.path))
      try MapFile.save(m, to: mapPath)
      log("created the overwrite map \(mapPath): tracking starts now")
    }
    map = Locked(m)
    geometry = m.geometry
    state = Locked(State(current: m.bits))
    writeback = EarlyWriteback(primary)
    zeros = AlignedBuffer(count: Int(geometry.blockSize))
    zeros.buffer.initializeMemory(as: UInt8.self, repeating: 0)
    activity = try ActivityLog(path: mapPath + ".al", blockGeometry: m.geometry, deviceName: primary.path)
    changed = try changesPath.map {
      try DurableChangeMap(path: $0, device: primary, blockSize: m.geometry.blockSize, log: log)
    }
    readAheadUnit = UInt64(max(1, (1 << 20) / Int(m.geometry.blockSize)))
    readAheadWindow = readAheadUnit * 8
    if let mirroring {
      var unshipped: [JournaledChange] = []
      let journal = try MirrorJournal(
        path: mirroring.journalPath, mapID: m.mapID, geometry: m.geometry, copyNames: self.farCopies.map(\.name),
        bound: mirroring.bound, log: log
      ) { type, offset, length in
        unshipped.append(JournaledChange(type: type, offset: offset, length: length, payloadAt: 0))
      }
      mirror = AsyncMirror(journal: journal, copies: self.farCopies, settings: mirroring, log: log)
      for c in unshipped { notePartial(offset: c.offset, length: c.length, enqueue: false) }
    } else {
      mirror = nil
    }
    if mirroring == nil && pathExists(mapPath + ".mirror") {
      try drainLeftoverJournal(mapPath + ".mirror", mapID: m.mapID)
    }
    if !activity.recovered.isEmpty {
      if mirror != nil {
        try recoverIntoJournal()
      } else if let changed {
        try recoverIntoChangeMap(changed)
      } else {
        try recover()
      }
    }
    if pathExists(owedMarker) { unlink(owedMarker) }
    if let mirror { startMirroring(mirror) }
    for _ in 0..<Self.readAheadThreads {
      startThread { [self] in
        while let item = readAhead.take(), let range = item { prefetch(range) }
        readAheadEnded.signal()
      }
    }
    if let reuse {
      // The regions an unclean stop left may hold writes the backup took
      // and the map never recorded: not what SIG may say of them.
      for region in activity.recovered { reuse.forget(activity.blocks(ofRegion: region)) }
      reuse.start()
    }
  }

  /// Fetches a range ahead of a sequential reader, unless it is current or
  /// being worked on already. Errors are left for the reader's own request.
  private func prefetch(_ range: Range<UInt64>) {
    guard !closing.isSet, !missingRuns(range).isEmpty, locks.tryLock(range) else { return }
    defer { locks.unlock(range) }
    for run in missingRuns(range) {
      do { try fetch(run) } catch { return }
    }
  }

  /// Notes a miss; when it continues a run of two earlier ones, schedules
  /// the blocks after it so a sequential reader finds them current. Two,
  /// not one: a random reader whose miss happens to follow one of the
  /// recent misses must not fetch a window it will not read.
  private func noteMiss(_ run: Range<UInt64>) {
    let ranges: [Range<UInt64>] = state.withLock { s in
      var streak = 1
      if let i = s.recentMissEnds.firstIndex(where: { $0.end == run.lowerBound }) {
        streak = s.recentMissEnds[i].streak + 1
        s.recentMissEnds.remove(at: i)
      }
      let sequential =
        streak >= 3 || (run.lowerBound < s.aheadUntil && run.lowerBound + readAheadWindow >= s.aheadUntil)
      s.recentMissEnds.append((run.upperBound, streak))
      if s.recentMissEnds.count > 64 { s.recentMissEnds.removeFirst(s.recentMissEnds.count - 64) }
      guard sequential, s.fetchesInFlight <= 4 else { return [] }
      let from = max(run.upperBound, s.aheadUntil)
      let to = min(run.upperBound + readAheadWindow, geometry.blockCount)
      guard from < to else { return [] }
      s.aheadUntil = to
      return stride(from: from, to: to, by: Int(readAheadUnit)).map { $0..<min($0 + readAheadUnit, to) }
    }
    for r in ranges { readAhead.put(r) }
  }

  // MARK: Recovery

  /// After an unclean shutdown: the current blocks of every logged region
  /// are copied from the primary to the backup, which is then flushed.
  /// Present when the last stop was clean but left blocks owed to the
  /// backup; tells the next start that its activity log is not a crash's.
  private var owedMarker: String { mapPath + ".owed" }

  private func recover() throws {
    var copied: UInt64 = 0
    for region in activity.recovered {
      try forEachCurrentRun(in: activity.blocks(ofRegion: region)) { run in
        try copyToBackup(run)
        copied += run.upperBound - run.lowerBound
      }
    }
    try backup.flush()
    try activity.clear()
    if pathExists(owedMarker) {
      log(
        "the last stop left blocks owed to the backup in \(activity.recovered.count) region(s); "
          + "copied their \(copied) current block(s) from the primary to the backup, which now agree")
    } else {
      log(
        "unclean shutdown detected: \(activity.recovered.count) region(s) had writes in flight; "
          + "copied their \(copied) current block(s) from the primary to the backup, which now agree")
    }
  }

  /// Calls `body` with each run of current blocks in `blocks`, in order;
  /// each run is looked up under the state's lock, handled outside it.
  func forEachCurrentRun(in blocks: Range<UInt64>, _ body: (Range<UInt64>) throws -> Void) throws {
    var b = blocks.lowerBound
    while b < blocks.upperBound {
      let run = state.withLock { s -> Range<UInt64>? in
        guard let start = s.current.nextSet(from: b, before: blocks.upperBound) else { return nil }
        return start..<(s.current.nextClear(from: start, before: blocks.upperBound) ?? blocks.upperBound)
      }
      guard let run else { return }
      try body(run)
      b = run.upperBound
    }
  }

  private func copyToBackup(_ blocks: Range<UInt64>) throws {
    let (offset, length) = geometry.byteRange(blocks: blocks.lowerBound, count: UInt64(blocks.count))
    let step = UInt64(min(backup.maximumRequest, 4 << 20))
    let buffer = buffers.get(Int(min(step, length)))
    defer { buffers.put(buffer) }
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(step, length - done))
      try primary.read(into: buffer.slice(0, n), at: offset + done)
      try backup.write(UnsafeRawBufferPointer(buffer.slice(0, n)), at: offset + done, fua: false)
      done += UInt64(n)
    }
  }

  // MARK: State

  public var progress: (current: UInt64, total: UInt64) {
    state.withLock { ($0.current.population, geometry.blockCount) }
  }

  public var isComplete: Bool { state.withLock { $0.current.population == geometry.blockCount } }

  private func isCurrent(_ b: UInt64) -> Bool { state.withLock { $0.current[b] } }

  func markCurrent(_ blocks: Range<UInt64>) {
    state.withLock { s in
      // Only a change of the bits makes the map dirty (a flush commits it).
      guard !s.current.allSet(blocks) else { return }
      s.current.set(blocks)
      s.dirty = true
    }
  }

  /// The blocks `[offset, offset+length)` touches.
  func blockRange(_ offset: UInt64, _ length: UInt64) -> Range<UInt64> {
    geometry.blocks(touching: offset, length: length)
  }

  /// Whether every block of `range` is current (without allocating).
  private func allCurrent(_ range: Range<UInt64>) -> Bool {
    state.withLock { $0.current.allSet(range) }
  }

  /// Runs of blocks in `range` that are not current.
  func missingRuns(_ range: Range<UInt64>) -> [Range<UInt64>] {
    state.withLock { s in
      var runs: [Range<UInt64>] = []
      var b = range.lowerBound
      while b < range.upperBound {
        guard let start = s.current.nextClear(from: b, before: range.upperBound) else { break }
        let end = s.current.nextSet(from: start, before: range.upperBound) ?? range.upperBound
        runs.append(start..<end)
        b = end
      }
      return runs
    }
  }

  func beginRequest() { activeRequests.wrappingAdd(1, ordering: .relaxed) }
  func endRequest() { activeRequests.wrappingSubtract(1, ordering: .relaxed) }
  var clientsBusy: Bool { activeRequests.load(ordering: .relaxed) > 0 }

  // MARK: Fetching (locks held by the caller)

  /// Brings `blocks` from the backup to the primary and marks them current:
  /// into the caller's buffer and from there to the primary when the
  /// caller holds the whole run (a cold read answered from memory), else
  /// straight from the backup's connection into the primary. With older
  /// copies to reuse, the blocks they hold are taken from them instead.
  /// Returns the bytes read from the backup.
  @discardableResult
  func fetch(_ blocks: Range<UInt64>, into destination: UnsafeMutableRawPointer? = nil) throws -> UInt64 {
    // Blocks a client wrote part of keep what it wrote (asynchronous
    // mirroring); callers that pass a destination have none among them.
    if mirror != nil && destination == nil && hasPartial(blocks) { return try fetchAroundPartial(blocks) }
    if let reuse, reuse.isReady { return try fetchReusing(blocks, into: destination, reuse) }
    return try fetchFromBackup(blocks, into: destination)
  }

  /// fetch(_:into:) from the backup alone.
  private func fetchFromBackup(_ blocks: Range<UInt64>, into destination: UnsafeMutableRawPointer?) throws -> UInt64 {
    let (offset, length) = geometry.byteRange(blocks: blocks.lowerBound, count: UInt64(blocks.count))
    state.withLock { $0.fetchesInFlight += 1 }
    defer { state.withLock { $0.fetchesInFlight -= 1 } }
    do {
      if let destination {
        try backup.read(into: UnsafeMutableRawBufferPointer(start: destination, count: Int(length)), at: offset)
      } else {
        try backup.read(at: offset, length: Int(length), toFile: primary.pageCacheFD)
      }
    } catch let e as FileWriteError {
      throw RestoreError.fetchNotKept(primary: primary.path, offset: offset, length: length, errno: e.errno)
    } catch {
      throw RestoreError.fetchFailed(offset: offset, length: length, cause: error)
    }
    if let destination {
      try primary.write(UnsafeRawBufferPointer(start: destination, count: Int(length)), at: offset)
    }
    state.withLock { s in
      s.current.set(blocks)
      s.dirty = true
      s.counted.fetchedBlocks += UInt64(blocks.count)
      s.counted.fetchedBytes += length
    }
    return length
  }

  /// fetch(_:into:) with older copies: each block an older copy holds (its
  /// digest checked) is written to the primary from there, or zeroed when
  /// the backup's signature says zeros, and marked current, as a fetched
  /// block is (its data reaches the disk before a flush commits the map);
  /// the runs between are fetched from the backup, one request a run.
  private func fetchReusing(
    _ blocks: Range<UInt64>, into destination: UnsafeMutableRawPointer?, _ reuse: LocalReuse
  ) throws -> UInt64 {
    let size = Int(geometry.blockSize)
    // Where block `b` goes in the caller's buffer, if it gave one.
    func place(_ b: UInt64) -> UnsafeMutableRawPointer? {
      destination.map { $0 + Int(b - blocks.lowerBound) * size }
    }
    let scratch = buffers.get(size)
    defer { buffers.put(scratch) }
    var fetched: UInt64 = 0
    var pending = blocks.lowerBound
    for b in blocks {
      let out = place(b) ?? scratch.pointer
      let n = geometry.length(ofBlock: b)
      guard let found = reuse.find(b, into: UnsafeMutableRawBufferPointer(start: out, count: n)) else { continue }
      if pending < b { fetched += try fetchFromBackup(pending..<b, into: place(pending)) }
      pending = b + 1
      let offset = geometry.offset(ofBlock: b)
      if found == .zeros {
        if destination != nil { out.initializeMemory(as: UInt8.self, repeating: 0, count: n) }
        try primary.writeZeros(offset: offset, length: UInt64(n), scratch: zeros)
      } else {
        try primary.write(UnsafeRawBufferPointer(start: out, count: n), at: offset)
      }
      state.withLock { s in
        s.current[b] = true
        s.dirty = true
        switch found {
        case .zeros: s.counted.reusedZeroBlocks += 1
        case .samePlace: s.counted.reusedSamePlaceBlocks += 1
        case .elsewhere: s.counted.reusedElsewhereBlocks += 1
        }
        s.counted.reusedBytes += UInt64(n)
      }
    }
    if pending < blocks.upperBound { fetched += try fetchFromBackup(pending..<blocks.upperBound, into: place(pending)) }
    return fetched
  }

  // MARK: Client requests

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    let blocks = blockRange(offset, UInt64(buffer.count))
    guard !blocks.isEmpty, let base = buffer.baseAddress else { return }
    // Current already (a block once current stays so): read without the
    // block locks, as a reply sent from the page cache is.
    if allCurrent(blocks) { return try primary.read(into: buffer, at: offset) }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    let end = offset + UInt64(buffer.count)
    // Runs the request covers whole are fetched into the reply itself; the
    // rest is read from the primary afterwards.
    var served: [Range<UInt64>] = []
    for run in missingRuns(blocks) {
      noteMiss(run)
      let (start, length) = geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
      if start >= offset && start + length <= end && !hasPartial(run) {
        try fetch(run, into: base + Int(start - offset))
        served.append(start..<start + length)
      } else {
        try fetch(run)
      }
    }
    var position = offset
    for range in served + [end..<end] {
      if range.lowerBound > position {
        let n = Int(range.lowerBound - position)
        try primary.read(
          into: UnsafeMutableRawBufferPointer(start: base + Int(position - offset), count: n), at: position)
      }
      position = max(position, range.upperBound)
    }
  }

  /// Makes every block of a byte range current, fetching the others from
  /// the backup, so that a READ of the range can be answered from the
  /// primary's page cache. A block once current stays so: a range current
  /// already takes no lock.
  public func makeCurrent(offset: UInt64, length: UInt64) throws {
    let blocks = blockRange(offset, length)
    guard !blocks.isEmpty, !allCurrent(blocks) else { return }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    for run in missingRuns(blocks) {
      noteMiss(run)
      try fetch(run)
    }
  }

  /// base:allocation of a byte range: a block not current is data (what
  /// the backup holds there is not known here, and the primary's hole is
  /// not its content); current blocks are as the primary holds them.
  public func allocation(offset: UInt64, length: UInt32, limit: Int) -> [Extent] {
    var runs: [Extent] = []
    let end = min(offset + UInt64(length), geometry.deviceSize)
    var position = offset
    // Bounded work per request, however the map alternates: a shorter
    // answer is allowed, and the client asks again from where it ends.
    var steps = 0
    // Blocks are looked at only as far as the range goes.
    let endBlock = (end + UInt64(geometry.blockSize) - 1) / UInt64(geometry.blockSize)
    while position < end && steps < 4096 {
      steps += 1
      let block = position / UInt64(geometry.blockSize)
      let (isCurrent, runEnd) = state.withLock { s -> (Bool, UInt64) in
        let c = s.current[block]
        let next =
          (c ? s.current.nextClear(from: block, before: endBlock) : s.current.nextSet(from: block, before: endBlock))
          ?? endBlock
        return (c, next)
      }
      // The device may end inside the last block.
      let runStop = min(runEnd * UInt64(geometry.blockSize), end)
      var part: [Extent]
      if isCurrent {
        part = primary.allocation(offset: position, length: UInt32(runStop - position), limit: limit)
      } else {
        part = [Extent(length: UInt32(runStop - position), flags: 0)]
      }
      for e in part where !runs.append(joining: e, limit: limit) { return runs }
      let covered = part.reduce(UInt64(0)) { $0 + UInt64($1.length) }
      if covered < runStop - position { break }  // the primary's runs hit the limit
      position = runStop
    }
    return runs
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    if mirror != nil {
      return try modifyJournaled(.write, offset: offset, length: UInt64(buffer.count), fua: fua, payload: buffer) {
        try primary.write(buffer, at: offset)
      }
    }
    if let changed {
      return try modifyPrimaryOnly(changed, offset: offset, length: UInt64(buffer.count), fua: fua) {
        try primary.write(buffer, at: offset)
      }
    }
    try modify(
      offset: offset, length: UInt64(buffer.count), fua: fua,
      local: { try primary.write(buffer, at: offset) },
      remote: { [backup] in try backup.write(buffer, at: offset, fua: fua) })
  }

  /// TRIM and WRITE_ZEROES both leave zeros on both sides (a trimmed block
  /// must read the same on the primary and the backup).
  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    if mirror != nil {
      return try modifyJournaled(.zero, offset: offset, length: length, fua: fua, payload: nil) {
        try primary.writeZeros(offset: offset, length: length, scratch: zeros)
      }
    }
    if let changed {
      return try modifyPrimaryOnly(changed, offset: offset, length: length, fua: fua) {
        try primary.writeZeros(offset: offset, length: length, scratch: zeros)
      }
    }
    try modify(
      offset: offset, length: length, fua: fua,
      local: { try primary.writeZeros(offset: offset, length: length, scratch: zeros) },
      remote: { [backup] in try backup.writeZeroes(offset: offset, length: length, fua: fua) })
  }

  /// A write-like change of a byte range: partial blocks brought first, the
  /// activity log entered, the change made on the primary, the blocks marked
  /// current, then the change sent to the backup (or owed to it).
  private func modify(
    offset: UInt64, length: UInt64, fua: Bool, local: () throws -> Void, remote: @escaping () throws -> Void
  ) throws {
    try withChangeLocked(offset: offset, length: length) { blocks in
      try activity.enter(blocks)
      defer { activity.leave(blocks) }
      // The backup's half runs beside the primary's; the blocks are locked,
      // so nothing else touches them until both are done.
      let remoteError = ErrorBox()
      var job: Offload.Job?
      // Decided once: a write either goes to the backup or is owed to it.
      let sendToBackup = !state.withLock({ $0.backupDown })
      if sendToBackup {
        job = offload.start {
          do { try remote() } catch { remoteError.set(error) }
        }
      }
      do {
        try local()
        job?.wait()
      } catch {
        job?.wait()
        // The primary failed: the blocks that were current may hold part of
        // the change; owe them to the backup so the two sides agree again.
        // (Counted before the block locks are let go.)
        if sendToBackup {
          divergentWrites.wrappingAdd(1, ordering: .sequentiallyConsistent)
          // The backup may hold the write where the primary does not:
          // what its signature says of those blocks no longer holds.
          reuse?.forget(blocks)
        }
        state.withLock { s in
          for b in blocks where s.current[b] { s.backupLacks.insert(b) }
          activity.pin(blocks)
        }
        throw RestoreError.writeFailed(cause: error)
      }
      writeback.written(offset, length)
      markCurrent(blocks)
      var owe = !sendToBackup
      if let error = remoteError.error {
        owe = true
        state.withLock { $0.backupDown = true }
        log(
          "the backup did not take a write (\(error)); writes are kept on the primary and owed to the backup "
            + "until it comes back")
      }
      if owe {
        // Owed and pinned under one lock, so a resynchronisation that just
        // finished cannot unpin what it did not send.
        state.withLock { s in
          for b in blocks { s.backupLacks.insert(b) }
          activity.pin(blocks)
        }
      }
      if fua { try primary.sync() }
    }
  }

  /// Runs `body` with the blocks a change of `[offset, offset+length)`
  /// touches locked, after bringing the first and last of them from the
  /// backup when the change covers only part of them and they are not
  /// current, so that it leaves them whole.
  func withChangeLocked(offset: UInt64, length: UInt64, _ body: (Range<UInt64>) throws -> Void) throws {
    let blocks = blockRange(offset, length)
    guard !blocks.isEmpty else { return }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    let mask = UInt64(geometry.blockSize) - 1
    let end = offset + length
    let first = blocks.lowerBound
    let last = blocks.upperBound - 1
    if offset & mask != 0 && !isCurrent(first) { try fetch(first..<first + 1) }
    if end & mask != 0 && end != geometry.deviceSize && !isCurrent(last) && (last != first || offset & mask == 0) {
      try fetch(last..<last + 1)
    }
    try body(blocks)
  }

  /// Blocks owed to the backup, and whether it is taken as unreachable.
  public var backupDebt: (blocks: Int, down: Bool) { state.withLock { ($0.backupLacks.count, $0.backupDown) } }

  /// Sends the owed blocks to the backup, each under its block lock so no
  /// newer write can be overtaken; when all are sent, writes go to the
  /// backup again. Throws when the backup still cannot take them.
  public func resynchronize() throws {
    let owed = state.withLock { $0.backupLacks.sorted() }
    if owed.isEmpty {
      state.withLock { $0.backupDown = false }
      return
    }
    var i = 0
    while i < owed.count {
      var j = i + 1
      while j < owed.count && owed[j] == owed[j - 1] + 1 && j - i < 64 { j += 1 }
      let run = owed[i]..<owed[j - 1] + 1
      locks.lock(run)
      defer { locks.unlock(run) }
      try copyToBackup(run)
      state.withLock { s in for b in run { s.backupLacks.remove(b) } }
      i = j
    }
    try backup.flush()
    let clear = state.withLock { s -> Bool in
      if s.backupLacks.isEmpty { s.backupDown = false }
      // Keep pinned exactly the regions of the blocks still owed.
      activity.repin(s.backupLacks)
      return s.backupLacks.isEmpty
    }
    if clear {
      log("the backup is back: sent the \(owed.count) block(s) it lacked")
    }
  }

  // MARK: The merge export (channel 2 into the running server)

  /// Admits the merge of a stream through the merge export, with the checks
  /// merge-snapshot makes against a map of its own: the stream must have
  /// started reading after the map started tracking (plus the clock skew
  /// allowed), and an incremental stream must apply on top of the last
  /// stream merged. `force` turns a failed check into a warning in the log.
  public func admitMerge(_ a: MergeAdmission) throws {
    try map.withLock { saved in
      let problems = saved.problems(admittingStreamStarted: a.started, base: a.base, clockSkew: a.skew)
      if let first = problems.first, !a.force { throw RestoreError.streamRefused(problem: first) }
      for p in problems { log("merge of stream \(a.stream) forced: \(p)") }
      // Counted afresh: a re-run after a stop reports what it did itself.
      state.withLock { $0.admittedStreams[a.stream] = MergeReport(stream: a.stream) }
      log("merging stream \(a.stream) through the merge export")
    }
  }

  /// What the merge export did with the blocks of `stream` since its merge
  /// was last admitted; refused for a stream that was not admitted.
  public func mergeReport(stream: ID128) throws -> MergeReport {
    guard let report = state.withLock({ $0.admittedStreams[stream] }) else {
      throw RestoreError.streamNotAdmitted(stream)
    }
    return report
  }

  /// Records `stream`, admitted earlier and now merged whole, as the last
  /// merged stream, after everything it wrote is durable and committed.
  public func recordMerged(stream: ID128) throws -> MergeReport {
    _ = try mergeReport(stream: stream)
    try flush()
    return try map.withLock { saved in
      var m = saved
      m.lastMergedStream = stream
      try MapFile.save(m, to: mapPath)
      saved = m
      let report = state.withLock { s in
        s.admittedStreams[stream]?.recorded = true
        return s.admittedStreams[stream] ?? MergeReport(stream: stream)
      }
      log(
        "stream \(stream) is merged whole: recorded as the last merged stream; \(report.dataBlocks + report.zeroBlocks) "
          + "block(s) merged, \(report.skippedCurrent) skipped as current")
      return report
    }
  }

  /// Writes whole blocks of a merged snapshot where the map says not current;
  /// current blocks are left alone. Nothing is sent to the backup. The
  /// blocks count toward `stream`'s report when one is given.
  public func mergeWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, stream: ID128? = nil) throws {
    try checkWholeBlocks(offset, UInt64(buffer.count))
    let blocks = blockRange(offset, UInt64(buffer.count))
    guard !blocks.isEmpty else { return }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    var written: UInt64 = 0
    var skipped: UInt64 = 0
    var bytes: UInt64 = 0
    defer { tally(stream, data: written, zero: 0, skipped: skipped, bytes: bytes) }
    for b in blocks {
      // A block a client wrote part of is newer than any snapshot.
      if isCurrent(b) || hasPartial(b..<b + 1) {
        skipped += 1
        continue
      }
      let start = Int(geometry.offset(ofBlock: b) - offset)
      let n = geometry.length(ofBlock: b)
      try primary.write(UnsafeRawBufferPointer(rebasing: buffer[start..<start + n]), at: geometry.offset(ofBlock: b))
      writeback.written(geometry.offset(ofBlock: b), UInt64(n))
      markCurrent(b..<b + 1)
      written += 1
      bytes += UInt64(n)
    }
  }

  public func mergeZeroes(offset: UInt64, length: UInt64, stream: ID128? = nil) throws {
    try checkWholeBlocks(offset, length)
    let blocks = blockRange(offset, length)
    guard !blocks.isEmpty else { return }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    let runs = withoutPartial(missingRuns(blocks))
    let skipped = UInt64(blocks.count) - runs.reduce(0) { $0 + UInt64($1.count) }
    var written: UInt64 = 0
    var bytes: UInt64 = 0
    defer { tally(stream, data: 0, zero: written, skipped: skipped, bytes: bytes) }
    for run in runs {
      let (o, l) = geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
      try primary.writeZeros(offset: o, length: l, scratch: zeros)
      markCurrent(run)
      written += UInt64(run.count)
      bytes += l
    }
  }

  /// Counts what one merge request did, also when it failed part way: in
  /// the totals, and in `stream`'s report.
  private func tally(_ stream: ID128?, data: UInt64, zero: UInt64, skipped: UInt64, bytes: UInt64) {
    state.withLock { s in
      s.counted.mergedBlocks += data + zero
      s.counted.mergeSkippedBlocks += skipped
      if let stream, s.admittedStreams[stream] != nil {
        s.admittedStreams[stream]?.dataBlocks += data
        s.admittedStreams[stream]?.zeroBlocks += zero
        s.admittedStreams[stream]?.skippedCurrent += skipped
        s.admittedStreams[stream]?.bytesWritten += bytes
      }
    }
  }

  private func checkWholeBlocks(_ offset: UInt64, _ length: UInt64) throws {
    let mask = UInt64(geometry.blockSize) - 1
    let end = offset + length
    guard offset & mask == 0, end & mask == 0 || end == geometry.deviceSize else {
      throw RestoreError.partialBlocks(blockSize: geometry.blockSize, offset: offset, length: length)
    }
  }

  // MARK: Durability

  /// A client's FLUSH: as flush(), but under asynchronous mirroring without
  /// committing the map (see flushJournaled).
  public func clientFlush() throws {
    if let mirror { return try flushJournaled(mirror, commitMap: false) }
    try flush()
  }

  /// Makes every completed write durable on both sides and commits the map.
  public func flush() throws {
    if let mirror { return try flushJournaled(mirror, commitMap: true) }
    try map.withLock { saved in
      // Snapshot before synchronising: only what is complete now is committed.
      let (snapshot, wasDirty) = state.withLock { s -> (BlockBitmap, Bool) in
        let d = s.dirty
        s.dirty = false
        return (s.current, d)
      }
      do {
        // The backup's part, at the same time as the primary's: owed blocks
        // first, then its own flush. While it is unreachable the flush holds
        // on the primary alone; the owed blocks stay in the durable activity
        // log until they are sent. A read-only backup has no part.
        var backupError: Error?
        let backupPart =
          changed != nil
          ? nil
          : offload.start { [self] in
            do {
              if state.withLock({ !$0.backupLacks.isEmpty }) { try resynchronize() }
              if !state.withLock({ $0.backupDown }) { try backup.flush() }
            } catch {
              backupError = error
            }
          }
        var primaryError: Error?
        do { try primary.sync() } catch { primaryError = error }
        backupPart?.wait()
        if let primaryError { throw primaryError }
        let backupOK = backupError == nil
        if let backupError {
          state.withLock { $0.backupDown = true }
          log("flush: the backup is unreachable (\(backupError)); \(backupDebt.blocks) block(s) are owed to it")
        }
        if wasDirty {
          var m = saved
          m.bits = snapshot
          try MapFile.save(m, to: mapPath)
          saved = m
        }
        if backupOK { try activity.trim() }
      } catch {
        if wasDirty { state.withLock { $0.dirty = true } }
        throw RestoreError.flushFailed(cause: error)
      }
    }
  }

  /// The periodic commit: flush() and, with a read-only backup, the change
  /// map's journal folded into its file (so that overwrite-map show MAP is
  /// up to date while the server runs).
  func checkpoint() throws {
    try flush()
    try changed?.checkpoint()
  }

  /// A clean stop: the periodic work and read-ahead stopped (their reads
  /// from the backup answered), everything flushed, the activity log
  /// emptied, and the backup's connections ended with NBD_CMD_DISC. Call
  /// it once no client request is in flight. Returns the number of blocks
  /// still owed to an unreachable backup (their regions stay in the
  /// activity log for the next start).
  @discardableResult
  public func close() throws -> Int {
    background.withLock { $0 }?.stop()
    if closing.setOnce() {
      for _ in 0..<Self.readAheadThreads { readAhead.put(nil) }
      for _ in 0..<Self.readAheadThreads { readAheadEnded.wait() }
    }
    reuse?.stop()
    writeback.stop()
    defer { backup.close() }
    if let mirror { return try closeJournaled(mirror) }
    try flush()
    try changed?.close()
    let owed = backupDebt.blocks
    if owed == 0 {
      try activity.clear()
    } else {
      try writeFileAtomically(owedMarker, [])
    }
    return owed
  }

  // MARK: Periodic work

  /// Starts the periodic work of a running restore (RestoreBackground):
  /// hydration when `schedule` asks for it, progress lines, the completion
  /// line and the checkpoints. close() stops it; beginStop() asks it to.
  public func start(_ schedule: RestoreSchedule) {
    let work = RestoreBackground(engine: self, schedule: schedule)
    let started = background.withLock { background -> Bool in
      guard background == nil else { return false }
      background = work
      return true
    }
    if started { work.start() }
  }

  /// Asks the periodic work to stop (hydration takes no new run), without
  /// waiting: for a signal handler. close() waits for it.
  public func beginStop() {
    background.withLock { $0 }?.beginStop()
  }

  // MARK: Background copy

  /// Copies the blocks not yet current from the backup, yielding to client
  /// requests, at most `rate` bytes a second (0: no limit), with `workers`
  /// runs of up to 1 MiB in flight (a round trip to the backup each). Where
  /// the backup reports base:allocation, runs it says read as zeros are
  /// zeroed on the primary (a hole in an image file) instead of copied.
  /// Returns when every block is current or `shouldStop` says so.
  public func hydrate(rate: UInt64, workers: Int = 16, shouldStop: @escaping @Sendable () -> Bool) {
    // The link is what older copies spare: hydration starts once what
    // they can give is known (SIG read, each copy hashed, or given up),
    // which takes local reads only. Clients do not wait for it.
    if let reuse, !reuse.isSettled {
      log("hydration waits until the backup's signature is read and the older copies are hashed")
      while !reuse.isSettled && !shouldStop() { usleep(100_000) }
    }
    let plan = HydrationPlan(engine: self, rate: rate)
    let done = DispatchSemaphore(value: 0)
    let count = max(1, workers)
    for _ in 0..<count {
      startThread { [self] in
        hydrationWorker(plan, shouldStop: shouldStop)
        done.signal()
      }
    }
    for _ in 0..<count { done.wait() }
  }

  /// One worker of `hydrate`: takes the next run not current, waits for
  /// its turn under the rate and for clients to be idle, skips it if a
  /// client holds any of its blocks (it is met again on the next pass).
  private func hydrationWorker(_ plan: HydrationPlan, shouldStop: () -> Bool) {
    while !shouldStop() {
      if clientsBusy {
        usleep(5000)
        continue
      }
      guard let (run, zeroRuns, generation) = plan.next() else { return }
      // The bytes the run should bring over the link (less what the backup
      // said is zeros) are counted against the rate before it is fetched;
      // what does not come after all is given back.
      let zeroed = zeroRuns.reduce(UInt64(0)) {
        $0 + UInt64(max(0, Int64(min($1.upperBound, run.upperBound)) - Int64(max($1.lowerBound, run.lowerBound))))
      }
      let length = geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count) - zeroed).length
      // A client that came while the run waited for its turn goes first:
      // the turn is given back and taken again once the client is idle.
      while true {
        guard plan.admit(length, shouldStop: shouldStop) else { return }
        if !clientsBusy { break }
        plan.giveBack(length)
        while clientsBusy && !shouldStop() { usleep(5000) }
      }
      guard locks.tryLock(run) else {
        // Being fetched by another worker, or held by a client.
        plan.giveBack(length)
        usleep(1000)
        continue
      }
      defer { locks.unlock(run) }
      // What the backup said holds unless a write reached it and not the
      // primary since it was asked (such a write ends before its block
      // locks are let go, so it is counted by now).
      let zeros = generation == divergentWrites.load(ordering: .sequentiallyConsistent) ? zeroRuns : []
      var copied: UInt64 = 0
      do {
        for m in missingRuns(run) { copied += try fetchOrZero(m, zeroRuns: zeros) }
        plan.giveBack(length - min(copied, length))
      } catch {
        plan.giveBack(length - min(copied, length))
        if let more = plan.failureToLog() {
          log(
            "hydration: \(error)\(more > 0 ? " (and \(more) other failure(s) since the last such line)" : ""); retrying"
          )
        }
        plan.forget()
        // A second before retrying, unless hydration stops meanwhile.
        for _ in 0..<10 where !shouldStop() { usleep(100_000) }
      }
    }
  }

  /// Brings `blocks` (locked by the caller) from the backup, except the
  /// parts of `zeroRuns` among them, which are zeroed on the primary.
  /// Returns the bytes that crossed the link.
  private func fetchOrZero(_ blocks: Range<UInt64>, zeroRuns given: [Range<UInt64>]) throws -> UInt64 {
    // Zeroing would wipe what a client wrote of a partial block.
    let zeroRuns = hasPartial(blocks) ? [] : given
    var fetched: UInt64 = 0
    var b = blocks.lowerBound
    func fetchUpTo(_ stop: UInt64) throws {
      guard stop > b else { return }
      fetched += try fetch(b..<stop)
      let (offset, length) = geometry.byteRange(blocks: b, count: stop - b)
      // Hydration ends with an fdatasync before it is said done: start the
      // write-out now, so that it waits for the tail only.
      writeback.written(offset, length)
    }
    for z in zeroRuns where z.upperBound > b && z.lowerBound < blocks.upperBound {
      let zero = max(z.lowerBound, b)..<min(z.upperBound, blocks.upperBound)
      try fetchUpTo(zero.lowerBound)
      let (offset, length) = geometry.byteRange(blocks: zero.lowerBound, count: UInt64(zero.count))
      try primary.writeZeros(offset: offset, length: length, scratch: zeros)
      state.withLock { s in
        s.current.set(zero)
        s.dirty = true
        s.counted.zeroedBlocks += UInt64(zero.count)
      }
      b = zero.upperBound
    }
    try fetchUpTo(blocks.upperBound)
    return fetched
  }

  /// Whole blocks of a window that the backup says read as zeros.
  fileprivate func zeroBlocks(in runs: [Extent], from firstBlock: UInt64) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    let size = UInt64(geometry.blockSize)
    var position = firstBlock * size
    // Zero runs next to each other are joined before they are cut to whole
    // blocks, so a block they share is not lost.
    var zeroStart: UInt64?
    func close(_ end: UInt64) {
      guard let start = zeroStart else { return }
      zeroStart = nil
      let first = (start + size - 1) / size
      // The device's last block may be partial.
      let last = end >= geometry.deviceSize ? geometry.blockCount : end / size
      if first < last { out.append(first..<last) }
    }
    for r in runs {
      if r.flags & Extent.zero != 0 {
        if zeroStart == nil { zeroStart = position }
      } else {
        close(position)
      }
      position += UInt64(r.length)
    }
    close(position)
    return out
  }

  var divergentWriteCount: Int { divergentWrites.load(ordering: .sequentiallyConsistent) }

  /// The first run of blocks not current from `position` on (else from the
  /// start), at most `maximum` blocks: (first, end).
  fileprivate func nextMissingRun(from position: UInt64, maximum: UInt64) -> (UInt64, UInt64)? {
    state.withLock { s in
      guard let start = s.current.nextClear(from: position) ?? s.current.nextClear(from: 0) else { return nil }
      let limit = min(start + maximum, geometry.blockCount)
      return (start, s.current.nextSet(from: start, before: limit) ?? limit)
    }
  }
}

/// Hydration's shared state: where the next run starts, what the backup
/// said of its zeros in the window last asked about (and the count of
/// divergent writes then), and the pace under the rate.
private final class HydrationPlan: Sendable {
  let engine: RestoreEngine
  let rate: UInt64
  private let batchBlocks: UInt64
  /// One block status request covers this many blocks (64 MiB).
  private let windowBlocks: UInt64
  private struct Plan {
    var position: UInt64 = 0
    var available = true
    var window: Range<UInt64> = 0..<0
    var zeroRuns: [Range<UInt64>] = []
    var generation = -1
    var pace: HydrationPace
    /// Failures are logged at most every 10 s (16 workers fail together).
    var lastFailureLogged: Double?
    var failuresNotLogged = 0

    mutating func forget() {
      window = 0..<0
      zeroRuns = []
    }

    /// Whether a failure gets a log line, and how many went unlogged since
    /// the last: nil when it is too soon.
    mutating func failureToLog() -> Int? {
      let now = monotonicSeconds()
      if let last = lastFailureLogged, now - last < 10 {
        failuresNotLogged += 1
        return nil
      }
      lastFailureLogged = now
      defer { failuresNotLogged = 0 }
      return failuresNotLogged
    }
  }
  private let plan: Locked<Plan>

  init(engine: RestoreEngine, rate: UInt64) {
    self.engine = engine
    self.rate = rate
    batchBlocks = UInt64(max(1, (1 << 20) / Int(engine.geometry.blockSize)))
    windowBlocks = max(batchBlocks, UInt64((64 << 20) / Int(engine.geometry.blockSize)))
    plan = Locked(
      Plan(
        pace: HydrationPace(
          rate: rate, longestRun: batchBlocks * UInt64(engine.geometry.blockSize), now: monotonicSeconds())))
  }

  /// The next run to hydrate, with the zero runs known around it and the
  /// generation they were asked at; nil when every block is current.
  func next() -> (Range<UInt64>, [Range<UInt64>], Int)? {
    plan.withLock { p in
      guard let (start, end) = engine.nextMissingRun(from: p.position, maximum: batchBlocks) else { return nil }
      p.position = end >= engine.geometry.blockCount ? 0 : end
      if p.available && !p.window.contains(start) { ask(from: start, &p) }
      return (start..<end, p.window.contains(start) ? p.zeroRuns : [], p.generation)
    }
  }

  /// Counts `bytes` about to be copied against the rate, waiting until the
  /// pace allows them; false (nothing counted) when `shouldStop` says so
  /// first.
  func admit(_ bytes: UInt64, shouldStop: () -> Bool) -> Bool {
    guard rate > 0 else { return !shouldStop() }
    while !shouldStop() {
      guard let wait = plan.withLock({ $0.pace.take(bytes, now: monotonicSeconds()) }) else { return true }
      usleep(UInt32(min(0.1, max(0.001, wait)) * 1e6))
    }
    return false
  }

  /// Whether a failure gets a log line, and how many went unlogged since
  /// the last: nil when it is too soon.
  func failureToLog() -> Int? { plan.withLock { $0.failureToLog() } }

  /// Bytes admitted but not copied after all (zeroed, or not fetched).
  func giveBack(_ bytes: UInt64) {
    guard rate > 0, bytes > 0 else { return }
    plan.withLock { $0.pace.giveBack(bytes, now: monotonicSeconds()) }
  }

  /// Asks the backup about the window from `start` (the plan's lock held).
  private func ask(from start: UInt64, _ p: inout Plan) {
    let end = min(start + windowBlocks, engine.geometry.blockCount)
    let (offset, length) = engine.geometry.byteRange(blocks: start, count: end - start)
    p.generation = engine.divergentWriteCount
    do {
      guard let runs = try engine.backup.allocation(from: offset, length: UInt32(length)) else {
        p.available = false
        engine.log("the backup gives no block status (base:allocation): hydration copies every block")
        p.forget()
        return
      }
      // The runs may cover only the start of the window: the rest is
      // asked about when hydration gets there.
      let covered = runs.reduce(UInt64(0)) { $0 + UInt64($1.length) }
      let coveredEnd =
        (offset + covered) >= engine.geometry.deviceSize
        ? engine.geometry.blockCount : (offset + covered) / UInt64(engine.geometry.blockSize)
      p.window = start..<max(start + 1, min(end, coveredEnd))
      p.zeroRuns = engine.zeroBlocks(in: runs, from: start)
    } catch {
      // Asked again for the next window; meanwhile everything is copied.
      if let more = p.failureToLog() {
        engine.log(
          "hydration: no block status from the backup for now (\(error))"
            + (more > 0 ? " (and \(more) other failure(s) since the last such line)" : "") + "; copying these blocks")
      }
      p.forget()
      p.window = start..<end
    }
  }

  func forget() { plan.withLock { $0.forget() } }
}
