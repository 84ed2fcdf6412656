// Asynchronous mirroring in the restore engine (--ack local, --ack
// quorum=K): a client's change is journaled, made on the primary and
// acknowledged; the far copies get it in the background from the journal
// (FarCopyShipper), interval by interval.
//
// Invariants, beyond the engine's own:
// - A change is journaled before it is made on the primary, under its
//   blocks' locks, so the journal orders changes of one block as the
//   primary does. A FLUSH closes the open interval and answers once the
//   journal, the primary and the map are durable (and, with a quorum, once
//   that many copies hold the interval).
// - A write into part of a block not yet current does not wait for the
//   backup: it lands on the primary and the block is *partial* (the byte
//   ranges written are kept); the rest of the block comes from the backup
//   in the background, or when a read needs it, and only the bytes not
//   written are taken from it. After a crash the partial blocks are found
//   again from the journal's changes that a copy still lacks.
// - The activity log still names every region with a write in flight; a
//   flush drops only regions whose writes it closed into the journal. After
//   a crash, the current (and partial) blocks of the logged regions are
//   journaled again from the primary as one interval, so the copies come to
//   equal the primary.

import Glibc

/// How a restore mirrors its writes to the far copies.
public struct MirrorSettings: Sendable, Equatable {
  public enum Ack: Sendable, Equatable {
    /// Every write waits for the far copy (synchronous; no journal).
    case all
    /// Writes and flushes wait for the primary and the journal only.
    case local
    /// A flush also waits until this many far copies hold it.
    case quorum(Int)
  }
  public var ack: Ack
  public var journalPath: String
  public var bound: MirrorLagBound
  /// Requests each far copy is sent at once.
  public var senders: Int

  public init(ack: Ack, journalPath: String, bound: MirrorLagBound, senders: Int = 16) {
    self.ack = ack
    self.journalPath = journalPath
    self.bound = bound
    self.senders = senders
  }
}

/// The journal and the far copies' shippers of a restore.
final class AsyncMirror: Sendable {
  let journal: MirrorJournal
  let shippers: [FarCopyShipper]
  /// Far copies a flush waits for.
  let quorum: Int
  /// Partial blocks to complete from the backup.
  let completions = Handoff<UInt64?>()
  static let completionThreads = 4
  let completionsEnded = StoppableThreads()

  init(
    journal: MirrorJournal, copies: [BlockDevice], settings: MirrorSettings, log: @escaping @Sendable (String) -> Void
  ) {
    self.journal = journal
    shippers = copies.enumerated().map {
      FarCopyShipper(journal: journal, index: $0.offset, copy: $0.element, senders: settings.senders, log: log)
    }
    if case .quorum(let k) = settings.ack { quorum = k } else { quorum = 0 }
  }
}

extension RestoreEngine {
  /// What each far copy owes (empty without asynchronous mirroring).
  public var mirrorLag: [MirrorLag] { mirror?.journal.lag ?? [] }

  func startMirroring(_ mirror: AsyncMirror) {
    for s in mirror.shippers { s.start() }
    for _ in 0..<AsyncMirror.completionThreads {
      mirror.completionsEnded.start { [self] in
        while let item = mirror.completions.take(), let block = item {
          // A stop leaves the rest partial: what a client wrote of them is
          // in the journal while a copy lacks it, and on the backup once
          // not, so a later start (or fetch) still gets them right. Trying
          // each first would cost a --backup-timeout a block when the
          // backup is away.
          if mirror.completionsEnded.isStopping { return }
          completePartial(block, mirror)
        }
      }
    }
    let pending = state.withLock { Array($0.partial.keys) }
    for b in pending { mirror.completions.put(b) }
    if !pending.isEmpty {
      log("\(pending.count) block(s) hold part of a client's write and the rest of the backup's; completing them")
    }
  }

  // MARK: Changes

  /// A write-like change under asynchronous mirroring: journaled, made on
  /// the primary, noted as current or partial; with `fua`, durable in the
  /// journal and on the primary before it returns.
  func modifyJournaled(
    _ type: MirrorJournalRecordType, offset: UInt64, length: UInt64, fua: Bool, payload: UnsafeRawBufferPointer?,
    local: () throws -> Void
  ) throws {
    guard let mirror else { return }
    let blocks = blockRange(offset, length)
    guard !blocks.isEmpty else { return }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    try activity.enter(blocks)
    defer { activity.leave(blocks) }
    try mirror.journal.append(type, offset: offset, length: length, payload: payload)
    do {
      try local()
    } catch {
      // The copies will get a change of these blocks the primary may not
      // hold: what the backup's signature says of them no longer holds.
      reuse?.forget(blocks)
      // The journal holds the change the primary may not: journal what the
      // primary holds there now, so the copies end up agreeing with it.
      if length <= UInt64(Self.resendLimit) {
        let buffer = buffers.get(Int(length))
        defer { buffers.put(buffer) }
        do {
          try primary.read(into: buffer.slice(0, Int(length)), at: offset)
          try mirror.journal.append(
            .write, offset: offset, length: length, payload: UnsafeRawBufferPointer(buffer.slice(0, Int(length))))
        } catch {
          log("a write failed on the primary and what it holds there could not be journaled again: \(error)")
        }
      }
      throw RestoreError.writeFailed(cause: error)
    }
    writeback.written(offset, length)
    notePartial(offset: offset, length: length, enqueue: true)
    if fua { try syncBoth(mirror) }
  }

  /// Notes bytes written: whole blocks become current; the parts of blocks
  /// not current become (or stay) partial, and are queued for completion
  /// when `enqueue` (not while the engine opens: startMirroring queues them).
  func notePartial(offset: UInt64, length: UInt64, enqueue: Bool) {
    let size = UInt64(geometry.blockSize)
    let end = offset + length
    let blocks = blockRange(offset, length)
    guard !blocks.isEmpty else { return }
    var queued: [UInt64] = []
    state.withLock { s in
      func note(_ b: UInt64) {
        let start = b * size
        let blockLength = UInt64(geometry.length(ofBlock: b))
        let lo = max(offset, start) - start
        let hi = min(end, start + blockLength) - start
        if lo == 0 && hi == blockLength {
          if !s.current[b] {
            s.current[b] = true
            s.dirty = true
          }
          s.partial[b] = nil
          return
        }
        guard !s.current[b] else { return }
        var ranges = s.partial[b] ?? []
        let isNew = ranges.isEmpty
        ranges = Self.adding(Int(lo)..<Int(hi), to: ranges)
        if ranges.count == 1 && ranges[0] == 0..<Int(blockLength) {
          s.current[b] = true
          s.dirty = true
          s.partial[b] = nil
          return
        }
        s.partial[b] = ranges
        if isNew { queued.append(b) }
      }
      note(blocks.lowerBound)
      if blocks.count > 1 { note(blocks.upperBound - 1) }
      if blocks.count > 2 {
        let middle = blocks.lowerBound + 1..<blocks.upperBound - 1
        if !s.current.allSet(middle) {
          s.current.set(middle)
          s.dirty = true
        }
        if !s.partial.isEmpty { for b in middle { s.partial[b] = nil } }
      }
    }
    if enqueue, let mirror { for b in queued { mirror.completions.put(b) } }
  }

  /// `ranges` (sorted, disjoint) with `r` added, joining what touches it.
  static func adding(_ r: Range<Int>, to ranges: [Range<Int>]) -> [Range<Int>] {
    var out: [Range<Int>] = []
    var merged = r
    for x in ranges {
      if x.upperBound < merged.lowerBound || x.lowerBound > merged.upperBound {
        out.append(x)
      } else {
        merged = min(x.lowerBound, merged.lowerBound)..<max(x.upperBound, merged.upperBound)
      }
    }
    out.append(merged)
    out.sort { $0.lowerBound < $1.lowerBound }
    return out
  }

  /// Whether any block of `blocks` is partial.
  func hasPartial(_ blocks: Range<UInt64>) -> Bool {
    state.withLock { s in
      guard !s.partial.isEmpty else { return false }
      if s.partial.count < blocks.count { return s.partial.keys.contains { blocks.contains($0) } }
      return blocks.contains { s.partial[$0] != nil }
    }
  }

  /// `runs` with their partial blocks taken out.
  func withoutPartial(_ runs: [Range<UInt64>]) -> [Range<UInt64>] {
    guard runs.contains(where: hasPartial) else { return runs }
    var out: [Range<UInt64>] = []
    for run in runs {
      var start = run.lowerBound
      for b in run where hasPartial(b..<b + 1) {
        if b > start { out.append(start..<b) }
        start = b + 1
      }
      if start < run.upperBound { out.append(start..<run.upperBound) }
    }
    return out
  }

  // MARK: Completing partial blocks

  /// Fetches `blocks` (locked by the caller), partial ones one by one with
  /// what the client wrote kept. Returns the bytes read from the backup.
  func fetchAroundPartial(_ blocks: Range<UInt64>) throws -> UInt64 {
    var start = blocks.lowerBound
    var fetched: UInt64 = 0
    for b in blocks where hasPartial(b..<b + 1) {
      if b > start { fetched += try fetch(start..<b) }
      try fetchPartial(b)
      fetched += UInt64(geometry.length(ofBlock: b))
      start = b + 1
    }
    if start < blocks.upperBound { fetched += try fetch(start..<blocks.upperBound) }
    return fetched
  }

  /// Reads a partial block (locked by the caller) from the backup and
  /// writes to the primary only the bytes no client wrote; the block is
  /// then current.
  private func fetchPartial(_ b: UInt64) throws {
    let length = geometry.length(ofBlock: b)
    let buffer = buffers.get(length)
    defer { buffers.put(buffer) }
    let whole = buffer.slice(0, length)
    try readPartial(b, into: whole)
    try landPartial(b, whole)
  }

  /// The backup's copy of block `b`.
  private func readPartial(_ b: UInt64, into whole: UnsafeMutableRawBufferPointer) throws {
    let offset = geometry.offset(ofBlock: b)
    do {
      try backup.read(into: whole, at: offset)
    } catch {
      throw RestoreError.fetchFailed(offset: offset, length: UInt64(whole.count), cause: error)
    }
  }

  /// Writes the bytes of `whole` (block `b` as the backup has it) that no
  /// client wrote to the primary, and marks the block current. The caller
  /// holds the block's lock.
  private func landPartial(_ b: UInt64, _ whole: UnsafeMutableRawBufferPointer) throws {
    let offset = geometry.offset(ofBlock: b)
    let length = whole.count
    let written = state.withLock { $0.partial[b] } ?? []
    var position = 0
    for r in written + [length..<length] {
      if r.lowerBound > position {
        try primary.write(
          UnsafeRawBufferPointer(rebasing: whole[position..<r.lowerBound]), at: offset + UInt64(position))
      }
      position = max(position, r.upperBound)
    }
    writeback.written(offset, UInt64(length))
    state.withLock { s in
      s.partial[b] = nil
      if !s.current[b] {
        s.current[b] = true
        s.dirty = true
      }
      s.counted.fetchedBlocks += 1
      s.counted.fetchedBytes += UInt64(length)
    }
  }

  /// A completion thread's turn with one block. The backup is read without
  /// the block's lock, so that a client's write into another part of the
  /// block lands at once instead of waiting on the far link: every change
  /// the backup may be sent meanwhile is a client's change to this block,
  /// made under the lock and so among its written ranges as they are when
  /// the lock is taken, and those bytes are not copied. Under the lock the
  /// rest is written, unless a client or a read made the block current
  /// meanwhile. Queued again after a pause when the backup cannot give it.
  private func completePartial(_ b: UInt64, _ mirror: AsyncMirror) {
    guard hasPartial(b..<b + 1) else { return }
    let length = geometry.length(ofBlock: b)
    let buffer = buffers.get(length)
    defer { buffers.put(buffer) }
    let whole = buffer.slice(0, length)
    var failed = false
    do {
      try readPartial(b, into: whole)
      locks.lock(b..<b + 1)
      defer { locks.unlock(b..<b + 1) }
      if hasPartial(b..<b + 1) { try landPartial(b, whole) }
    } catch {
      failed = true
    }
    guard failed, mirror.completionsEnded.pause(1) else { return }
    mirror.completions.put(b)
  }

  // MARK: Durability

  /// The journal and the primary made durable together.
  private func syncBoth(_ mirror: AsyncMirror) throws {
    try mirror.journal.sync(together: primary, on: offload)
  }

  /// A FLUSH under asynchronous mirroring: the open interval closed, the
  /// journal and the primary durable, the activity log trimmed of what the
  /// journal now holds; with a quorum, until enough far copies hold the
  /// interval. Concurrent flushes run together.
  ///
  /// The map is committed only with `commitMap` (checkpoints, merges, the
  /// stop): a client's flush does not need it, since every change since the
  /// last commit is in the journal or already on the backup, so a block the
  /// committed map does not call current reads the same after a crash
  /// (partial blocks are found again from the journal; others are fetched
  /// from the backup, which holds what was shipped).
  func flushJournaled(_ mirror: AsyncMirror, commitMap: Bool) throws {
    let interval: UInt64
    do {
      let mark = activity.mark()
      interval = try mirror.journal.closeInterval(sync: false)
      try syncBoth(mirror)
      try activity.trim(enteredUpTo: mark, keep: 64)
      if commitMap { try commitJournaledMap() }
    } catch {
      throw RestoreError.flushFailed(cause: error)
    }
    if mirror.quorum > 0 {
      let deadline = monotonicSeconds() + quorumTimeout
      guard mirror.journal.wait(forCopies: mirror.quorum, toHold: interval, until: deadline) else {
        throw RestoreError.flushFailed(
          cause: ToolkitError(
            "fewer than \(mirror.quorum) far copies hold interval \(interval) after \(Int(quorumTimeout)) s"))
      }
    }
  }

  /// Commits the map: its bits taken before the primary is synchronised,
  /// so a block marked current has its data durable.
  private func commitJournaledMap() throws {
    try map.withLock { saved in
      let (snapshot, wasDirty) = state.withLock { s -> (BlockBitmap, Bool) in
        let d = s.dirty
        s.dirty = false
        return (s.current, d)
      }
      guard wasDirty else { return }
      do {
        try primary.sync()
        var m = saved
        m.bits = snapshot
        try MapFile.save(m, to: mapPath)
        saved = m
      } catch {
        state.withLock { $0.dirty = true }
        throw error
      }
    }
  }

  /// The largest failed write whose range is journaled again from the
  /// primary (a client's request is at most 64 MiB).
  static var resendLimit: Int { 64 << 20 }

  /// How long a flush waits for its quorum of far copies.
  var quorumTimeout: Double { 30 }

  /// After an unclean shutdown: the current blocks (and the written parts
  /// of partial ones) of every logged region are journaled again from the
  /// primary as one interval, which the copies get after what they lack.
  func recoverIntoJournal() throws {
    guard let mirror else { return }
    var journaled: UInt64 = 0
    let step = 4 << 20
    let buffer = buffers.get(step)
    defer { buffers.put(buffer) }
    func copy(_ offset: UInt64, _ length: UInt64) throws {
      var done: UInt64 = 0
      while done < length {
        let n = Int(min(UInt64(step), length - done))
        try primary.read(into: buffer.slice(0, n), at: offset + done)
        try mirror.journal.append(
          .write, offset: offset + done, length: UInt64(n), payload: UnsafeRawBufferPointer(buffer.slice(0, n)))
        done += UInt64(n)
      }
      journaled += length
    }
    for region in activity.recovered {
      let blocks = activity.blocks(ofRegion: region)
      try forEachCurrentRun(in: blocks) { run in
        let (offset, length) = geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
        try copy(offset, length)
      }
      let partial = state.withLock { s in s.partial.filter { blocks.contains($0.key) } }
      for (block, ranges) in partial.sorted(by: { $0.key < $1.key }) {
        for r in ranges { try copy(geometry.offset(ofBlock: block) + UInt64(r.lowerBound), UInt64(r.count)) }
      }
    }
    try mirror.journal.closeInterval(sync: true)
    try activity.clear()
    log(
      "unclean shutdown detected: \(activity.recovered.count) region(s) had writes in flight; journaled their "
        + "\(formatBytes(journaled)) from the primary again, so the far copies come to equal it")
  }

  /// A clean stop under asynchronous mirroring: completions stopped, a
  /// last flush, the shippers stopped after the batch they send; what the
  /// copies still lack stays in the journal for the next start.
  func closeJournaled(_ mirror: AsyncMirror) throws -> Int {
    mirror.completionsEnded.beginStop()
    for _ in 0..<AsyncMirror.completionThreads { mirror.completions.put(nil) }
    mirror.completionsEnded.stop()
    try flush()
    mirror.journal.stop()
    for s in mirror.shippers { s.stop(closingLink: true) }
    try activity.clear()
    return 0
  }
}
