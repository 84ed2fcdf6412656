// The backup site's device, served with its writes tracked: a change map of
// the blocks written since a named generation, and on request a frozen
// point-in-time view kept by copy-on-write while writes continue.
//
// Invariants:
// - Marked before written: a write's blocks are set in the change map *on
//   disk* before the write is issued (DurableChangeMap's group commit, as
//   dm-era does: one journal append and fdatasync for all writes waiting),
//   so after a crash the map and its journal still cover every block that
//   may have changed.
// - A generation ends atomically: writes are held at a gate while the old
//   map is saved and the new one starts, so every write lands in exactly
//   one generation.
// - A frozen view is exact: the old contents of a block are copied to the
//   preservation store before the first write after the freeze, under the
//   block's lock, which a read of the view also takes.
// - A view never lies: when the store is full or the server stopped while a
//   view was held, the view is lost — its reads fail, its export goes — and
//   the log says so; the live device keeps working.
// - Acknowledged means durable: FLUSH and FUA reach the device (fdatasync);
//   the change map needs no flush, being committed before each write.

import Dispatch
import Glibc

// @unchecked Sendable: its state is behind `state`, which writes and commits wait on (the gate).
public final class TrackingEngine: @unchecked Sendable {
  public let device: Device
  public let geometry: BlockGeometry
  public let changesPath: String
  public let storePath: String
  public let storeLimit: UInt64
  let log: @Sendable (String) -> Void

  private let state = Monitor()
  /// The change map of the current generation, on disk before each write.
  private let changes: DurableChangeMap
  /// Writes hold the gate open; a generation change or a freeze closes it
  /// and waits for the writes inside to finish.
  private var gateClosed = false
  /// How many times the gate has closed (a write's marks made across a
  /// closing are made again).
  private var gateClosings: UInt64 = 0
  private var writesInside = 0
  /// The hold keeping the gate closed across control requests, if any.
  private var hold: WriteHold?
  private var holdCount: UInt64 = 0
  private let locks = BlockLocks()
  private var view: FrozenView?
  private let zeros: AlignedBuffer
  private let buffers = BufferPool(keepCount: 16, keepSize: 4 << 20)
  /// Starts write-out of the device's writes, so a flush waits for little.
  private let writeback: EarlyWriteback
  /// Far copies kept asynchronously (--backup), or nil. Set once, before
  /// the device is served (`mirror(to:settings:)`), and only read after.
  public private(set) var mirror: DeviceMirror?
  /// The device's points in time (--history), or nil. Set once, before the
  /// device is served, and only read after.
  public private(set) var history: PointHistory?
  /// Writes on their way to the device while it keeps a history and no
  /// far copy (StagedWrites); nil otherwise.
  private(set) var staging: StagedWrites?

  deinit { writeback.stop() }

  public init(
    device: Device, changesPath: String, storePath: String, storeLimit: UInt64?, blockSize: UInt32?,
    log: @escaping @Sendable (String) -> Void
  ) throws {
    self.device = device
    self.writeback = EarlyWriteback(device)
    self.changesPath = changesPath
    self.storePath = storePath
    self.log = log
    // The change map first (its journal's lock): one server per change map.
    changes = try DurableChangeMap(path: changesPath, device: device, blockSize: blockSize, log: log)
    geometry = changes.geometry
    // A store left behind belonged to a view held when the server stopped
    // without dropping it: that view is gone, and whoever streamed it must
    // know. A file there that is not a store is not ours to remove.
    if pathExists(storePath) {
      guard FrozenView.isStore(storePath) else {
        throw ToolkitError("\(storePath) exists and is not a preservation store; give --store another path")
      }
      let what = FrozenView.describeLeftover(storePath)
      unlink(storePath)
      log("the frozen view \(what) did not survive the last stop: it is lost; freeze a new one")
    }
    self.storeLimit = storeLimit ?? TrackingEngine.defaultStoreLimit(storePath: storePath, geometry: geometry)
    zeros = AlignedBuffer(count: 1 << 20)
    zeros.buffer.initializeMemory(as: UInt8.self, repeating: 0)
  }

  /// Room for every block of the device (a partial last block takes a whole
  /// slot), or half the free space of the store's file system when that is
  /// less: a store never fills the disk the change map lives on.
  static func defaultStoreLimit(storePath: String, geometry: BlockGeometry) -> UInt64 {
    let all = FrozenView.headerLength + geometry.blockCount * UInt64(geometry.blockSize)
    var fs = statvfs()
    guard statvfs(splitPath(storePath).directory, &fs) == 0 else { return all }
    let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
    return max(1 << 20, min(all, free / 2))
  }

  // MARK: Status

  public struct Status: Sendable {
    public var generation: ID128
    public var generationStarted: Instant
    public var changedBlocks: UInt64
    public var view: ViewStatus?
    /// What each far copy lacks (empty without --backup).
    public var mirror: [MirrorLag]
    /// The points in time kept (nil without --history).
    public var history: PointHistory.Summary?
    /// Seconds the open hold of a control connection has held writes (nil:
    /// none is open).
    public var heldSeconds: Double?
  }

  public struct ViewStatus: Sendable {
    public var id: ID128
    public var frozen: Instant
    public var preservedBlocks: UInt64
    public var storeBytes: UInt64
    public var storeLimit: UInt64
    /// Why the view is lost, or nil while it is exact.
    public var lost: String?
  }

  public var status: Status {
    let summary = history?.summary
    return state.withLock {
      let (generation, started, blocks) = changes.summary
      return Status(
        generation: generation, generationStarted: started, changedBlocks: blocks, view: view?.status,
        mirror: mirror?.lag ?? [], history: summary, heldSeconds: hold.map { monotonicSeconds() - $0.asked })
    }
  }

  public var currentView: FrozenView? { state.withLock { view } }

  // MARK: Writes

  /// Keeps far copies of the device from now on (before serving).
  public func mirror(to copies: [BlockDevice], settings: MirrorSettings) throws {
    let m = try DeviceMirror(
      device: device, geometry: geometry, activityPath: changesPath + ".al", settings: settings, copies: copies,
      log: log)
    state.withLock { mirror = m }
    m.start()
  }

  /// Keeps the device's points in time from now on (before serving).
  /// Without far copies, writes are staged (StagedWrites), so that the
  /// history's sync is not in each write's path; with far copies they are
  /// not, since the activity log must cover a write until it is on the
  /// device.
  public func keepHistory(_ h: PointHistory) {
    let staged = mirror == nil ? StagedWrites(device: device, history: h, log: log) : nil
    state.withLock {
      history = h
      staging = staged
    }
    staged?.start()
  }

  /// Writes `buffer` at `offset`, tracked.
  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    let blocks = geometry.blocks(touching: offset, length: UInt64(buffer.count))
    try enter(blocks)
    defer { leave() }
    if let mirror {
      try mirror.change(.write, offset: offset, length: UInt64(buffer.count), payload: buffer, blocks: blocks) {
        try withPreserved(blocks, offset, UInt64(buffer.count)) { try device.write(buffer, at: offset) }
      }
      writeback.written(offset, UInt64(buffer.count))
      if fua { try mirror.sync() }
      return
    }
    if let staging {
      var id: UInt64 = 0
      try withPreserved(blocks, offset, UInt64(buffer.count)) {
        id = staging.stage(buffer, offset: offset, length: UInt64(buffer.count))
      }
      if fua {
        try staging.drain(through: id)
        try device.sync()
      }
      return
    }
    try withPreserved(blocks, offset, UInt64(buffer.count)) { try device.write(buffer, at: offset) }
    writeback.written(offset, UInt64(buffer.count))
    if fua { try device.sync() }
  }

  /// Zeros a range (WRITE_ZEROES and TRIM), tracked.
  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    let blocks = geometry.blocks(touching: offset, length: length)
    try enter(blocks)
    defer { leave() }
    if let mirror {
      try mirror.change(.zero, offset: offset, length: length, payload: nil, blocks: blocks) {
        try withPreserved(blocks, offset, length) {
          try device.writeZeros(offset: offset, length: length, scratch: zeros)
        }
      }
      if fua { try mirror.sync() }
      return
    }
    if let staging {
      var id: UInt64 = 0
      try withPreserved(blocks, offset, length) { id = staging.stage(nil, offset: offset, length: length) }
      if fua {
        try staging.drain(through: id)
        try device.sync()
      }
      return
    }
    try withPreserved(blocks, offset, length) { try device.writeZeros(offset: offset, length: length, scratch: zeros) }
    if fua { try device.sync() }
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    if let staging { return try staging.read(into: buffer, at: offset) }
    try device.read(into: buffer, at: offset)
  }

  /// Makes the device durable; with a history, records a point there,
  /// with writes held so that the point is exactly what the device holds.
  public func flush() throws {
    guard let history else {
      if let mirror { return try mirror.flush() }
      return try device.sync()
    }
    if let staging {
      // Writes are held only while the staged ones reach the device and
      // the point is recorded; they are staged again while the device is
      // made durable, and applied after.
      try withWritesHeld { () throws -> Void in
        try staging.drain()
        try history.point(durable: false)
        staging.pause()
      }
      defer { staging.resume() }
      do {
        try device.sync()
        history.releasePoint(durable: true)
      } catch {
        history.releasePoint(durable: false)
        throw error
      }
    } else {
      try withWritesHeld { () throws -> Void in
        if let mirror { try mirror.flush() } else { try device.sync() }
        try history.point()
      }
    }
    history.trim()
  }

  /// Passes the gate and commits the marks of `blocks` to the change map on
  /// disk before returning.
  /// A write waiting for its marks is not inside yet: a hold does not wait
  /// for the change map's journal, only for writes reaching the device. A
  /// write whose marks were made as the gate closed waits for it to reopen
  /// and marks them again (a generation may have ended meanwhile).
  private func enter(_ blocks: Range<UInt64>) throws {
    while true {
      let closings = state.withLock { () -> UInt64 in
        while gateClosed { state.wait() }
        return gateClosings
      }
      try changes.mark(blocks)
      let inside = state.withLock { () -> Bool in
        // Closed, or closed and reopened, since: marked again.
        guard !gateClosed, gateClosings == closings else { return false }
        writesInside += 1
        return true
      }
      if inside { return }
    }
  }

  /// Folds the journal into the map file, so that overwrite-map show MAP is
  /// up to date; called every few seconds.
  public func checkpoint() throws { try changes.checkpoint() }

  private func leave() {
    state.withLock {
      writesInside -= 1
      if writesInside == 0 { state.broadcast() }
    }
  }

  /// Runs `body` (a write of `blocks`, bytes `offset..<offset+length`)
  /// after the view and the history, if any, have preserved their old
  /// contents; the block lock keeps their reads out meanwhile.
  private func withPreserved(_ blocks: Range<UInt64>, _ offset: UInt64, _ length: UInt64, _ body: () throws -> Void)
    throws
  {
    let view = state.withLock { () -> FrozenView? in self.view }
    guard view != nil || history != nil else { return try body() }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    view?.preserve(blocks, from: device, buffers: buffers)
    history?.preserve(offset: offset, length: length, from: device, durable: staging == nil)
    try body()
  }

  /// Closes the gate, waits for the writes inside, runs `body`, reopens.
  /// Within `held` (a hold of this engine's gate) the gate is closed
  /// already: `body` runs at once, or not at all when the hold has ended.
  private func withWritesHeld<R>(within held: WriteHold? = nil, _ body: () throws -> R) throws -> R {
    if let held {
      try state.withLock {
        guard hold?.number == held.number else {
          throw ToolkitError("the hold of writes has ended (released, or past its limit); nothing was done")
        }
      }
      return try body()
    }
    state.lock()
    while gateClosed { state.wait() }
    gateClosed = true
    gateClosings &+= 1
    while writesInside > 0 { state.wait() }
    state.unlock()
    defer {
      state.withLock {
        gateClosed = false
        state.broadcast()
      }
    }
    return try body()
  }

  // MARK: Holds

  /// Writes held across several control requests, from `holdWrites` to
  /// `release`: the instant of a consistency group, at which the actions
  /// run on each device (`within:`, which does not close the gate again).
  /// One hold at a time; only `release` reopens the gate it closed.
  public struct WriteHold: Sendable {
    let number: UInt64
    /// When the hold was asked, and when the writes inside had finished
    /// behind the closed gate (monotonic seconds).
    public let asked: Double
    public let since: Double
  }

  /// Closes the gate and waits for the writes inside; the gate stays
  /// closed until `release`. Refuses while another hold is open; waits for
  /// a freeze or generation change in progress. When the writes inside do
  /// not finish within `drainLimit` seconds, the gate reopens and nothing
  /// is held.
  public func holdWrites(drainLimit: Double) throws -> WriteHold {
    let asked = monotonicSeconds()
    let deadline = asked + drainLimit
    state.lock()
    defer { state.unlock() }
    func refuseIfHeld() throws {
      if let h = hold {
        throw ToolkitError(
          "writes are held already by another control connection (for \(formatFixed(monotonicSeconds() - h.since, digits: 3)) s); one hold at a time, nothing is held"
        )
      }
    }
    try refuseIfHeld()
    while gateClosed {
      try refuseIfHeld()
      if !state.wait(until: deadline) && gateClosed {
        throw ToolkitError(
          "writes stayed held by another request for \(formatFixed(drainLimit, digits: 3)) s; nothing is held")
      }
    }
    gateClosed = true
    gateClosings &+= 1
    while writesInside > 0 {
      if !state.wait(until: deadline) && writesInside > 0 {
        let n = writesInside
        gateClosed = false
        state.broadcast()
        throw ToolkitError(
          "\(n) write(s) in flight did not finish within \(formatFixed(drainLimit, digits: 3)) s; writes go on, nothing is held"
        )
      }
    }
    holdCount += 1
    let h = WriteHold(number: holdCount, asked: asked, since: monotonicSeconds())
    hold = h
    return h
  }

  /// Reopens the gate of `held`; returns the seconds writes were held (from
  /// the hold asked), or nil when that hold had ended already.
  @discardableResult
  public func release(_ held: WriteHold) -> Double? {
    state.withLock {
      guard hold?.number == held.number else { return nil }
      hold = nil
      gateClosed = false
      state.broadcast()
      return monotonicSeconds() - held.asked
    }
  }

  // MARK: Generations

  public struct GenerationChange: Sendable {
    public var ended: ID128
    public var endedStarted: Instant
    public var endedBlocks: UInt64
    public var started: ID128
    public var instant: Instant
  }

  /// Ends the current generation, saving its change map to `output`, and
  /// starts a new one, with writes held so each lands in exactly one. The
  /// generation is cut within the hold (one durable journal write); the
  /// ended map reaches `output` after it: before the return, or, within a
  /// hold of a control connection, at `settle` after its release.
  public func newGeneration(output: String, within held: WriteHold? = nil) throws -> GenerationChange {
    try checkOutput(output)
    let change = try withWritesHeld(within: held) { try switchGeneration(output: output, fresh: freshGeneration()) }
    if held == nil { try settle(change) }
    return change
  }

  /// Undoes the end of generation `ended`, cut within `held` and not saved
  /// yet: it goes on, with the blocks written since.
  public func undoGeneration(ended: ID128, within held: WriteHold) throws {
    try withWritesHeld(within: held) { try changes.undoCut(ended) }
    log("the end of generation \(ended) is undone: it goes on")
  }

  /// Saves the change map of the generation `change` ended to its output,
  /// if not saved yet; throws when it cannot be:
  /// then that generation goes on, with the blocks written since.
  /// The live map file is saved too (a checkpoint), so that it shows the
  /// new generation.
  public func settle(_ change: GenerationChange) throws { try settle(ended: change.ended) }

  /// The same for the generation `ended` (nil: the last cut's).
  public func settle(ended: ID128?) throws {
    guard let saved = try changes.settle(ended) else { return }
    log("the change map of generation \(saved.generation), which ended, is saved to \(saved.output)")
    do {
      try changes.checkpoint()
    } catch {
      // The journal keeps the new generation's marks meanwhile.
      log("\(changesPath) shows the generation that ended until the next checkpoint: \(error)")
    }
  }

  /// Refuses an output for an ending generation that is one of the server's
  /// own files, or an existing file that is not a map.
  public func checkOutput(_ output: String) throws {
    let own = [
      (device.path, "the device"), (changesPath, "the live change map"), (changesPath + ".journal", "its journal"),
      (storePath, "the preservation store"),
    ]
    for (path, what) in own where samePath(output, path) {
      throw ToolkitError("\(output) is \(what); give another file for the generation that ends")
    }
    if output.utf8.count > MarkJournalFormat.maximumOutputPath {
      throw ToolkitError(
        "the path of the file for the generation that ends is longer than \(MarkJournalFormat.maximumOutputPath) bytes; give a shorter one"
      )
    }
    if pathExists(output), !(peekFile(output, count: 8).map(MapFormat.looksLikeMap) ?? false) {
      throw ToolkitError("\(output) exists and is not a map; remove it or give another file")
    }
  }

  private func freshGeneration() -> BlockMap {
    BlockMap(geometry: geometry, meaning: .changed, deviceName: canonicalPath(device.path))
  }

  private func switchGeneration(output: String, fresh: BlockMap) throws -> GenerationChange {
    let old = try changes.cutGeneration(fresh, savingTo: output)
    log(
      "generation \(old.mapID) ended with \(old.bits.population) changed block(s), its map going to \(output); "
        + "generation \(fresh.mapID) starts")
    return GenerationChange(
      ended: old.mapID, endedStarted: old.trackingStarted, endedBlocks: old.bits.population, started: fresh.mapID,
      instant: fresh.trackingStarted)
  }

  // MARK: Frozen views

  /// Freezes a point-in-time view of the device; with `changesOutput`, the
  /// current generation ends at the same instant (saved there).
  public func freeze(changesOutput: String?, within held: WriteHold? = nil) throws -> (
    view: ViewStatus, generation: GenerationChange?
  ) {
    if let changesOutput { try checkOutput(changesOutput) }
    let frozen = try withWritesHeld(within: held) { () throws -> (view: ViewStatus, generation: GenerationChange?) in
      if let v = state.withLock({ view }) {
        throw ToolkitError("a view frozen at \(v.frozen) is held already; drop it first")
      }
      // The view preserves what the device holds: the staged writes first.
      try staging?.drain()
      // The view first: if its store cannot be made, the generation goes on.
      let fresh = changesOutput.map { _ in freshGeneration() }
      let v = try FrozenView(
        path: storePath, geometry: geometry, limit: storeLimit, instant: fresh?.trackingStarted ?? .now(),
        generation: fresh?.mapID ?? changes.summary.generation, log: log)
      var change: GenerationChange?
      if let changesOutput, let fresh {
        do {
          change = try switchGeneration(output: changesOutput, fresh: fresh)
        } catch {
          v.close(reason: "the freeze failed")
          unlink(storePath)
          throw error
        }
      }
      state.withLock { view = v }
      log(
        "froze view \(v.id) at \(v.frozen); the preservation store is \(storePath), at most \(formatBytes(storeLimit))")
      return (v.status, change)
    }
    if held == nil, let change = frozen.generation {
      do {
        try settle(change)
      } catch {
        // Both at one instant or neither: the view goes too.
        _ = try? dropView(id: frozen.view.id)
        throw ToolkitError("\(error); the view frozen with it is dropped")
      }
    }
    return frozen
  }

  /// Drops the view: its export goes and its store is removed. With `id`,
  /// only that view: another one held is kept, and the drop refused.
  public func dropView(id: ID128? = nil) throws -> ViewStatus {
    let (v, other) = state.withLock { () -> (FrozenView?, FrozenView?) in
      guard let v = view else { return (nil, nil) }
      if let id, v.id != id { return (nil, v) }
      view = nil
      return (v, nil)
    }
    if let other, let id {
      throw ToolkitError("the view held is \(other.id), frozen at \(other.frozen), not \(id); it is kept")
    }
    guard let v else { throw ToolkitError("no view is frozen") }
    // Writes that fetched the view before it was dropped still hold block
    // locks; taking the whole range waits for them.
    locks.lock(0..<geometry.blockCount)
    locks.unlock(0..<geometry.blockCount)
    let s = v.status
    v.close(reason: "the view was dropped")
    unlink(storePath)
    log("dropped view \(s.id) (\(s.preservedBlocks) block(s) preserved, \(formatBytes(s.storeBytes)) of store)")
    return s
  }

  /// Reads the frozen view: preserved blocks from the store, the others
  /// from the device, under the block locks that writes take.
  func readView(_ v: FrozenView, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    let blocks = geometry.blocks(touching: offset, length: UInt64(buffer.count))
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    try v.read(into: buffer, at: offset, device: device)
  }

  /// Reads point `n` of the history, under the block locks that writes take.
  func readPoint(_ n: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let history else { throw ToolkitError("the server keeps no history (--history)") }
    let blocks = geometry.blocks(touching: offset, length: UInt64(buffer.count))
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    try history.read(point: n, into: buffer, at: offset, device: device)
  }

  /// Stops: a view still held is lost (the store goes), the device is
  /// synchronised.
  public func close() throws {
    try staging?.stop()
    writeback.stop()
    if let v = state.withLock({ view }) {
      v.close(reason: "the server stopped")
      // The store's header stays, so that the next start reports the view
      // lost to whoever looks for it there.
      v.discardSlots()
      log("the frozen view \(v.id) is lost with the stop")
      state.withLock { view = nil }
    }
    if let mirror { try mirror.close() } else { try device.sync() }
    // The device as it stops is a point, durable as it is.
    history?.close()
    try changes.close()
  }
}
