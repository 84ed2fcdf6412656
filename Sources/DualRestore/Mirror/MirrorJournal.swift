// The mirror journal as asynchronous mirroring keeps it: the file of
// dualrestore-journal(5) beside the overwrite map, what it still owes each
// far copy (the positions file beside it), and the waits around it.
//
// Invariants:
// - A change is in the journal before it is made on the primary and before
//   the client hears of it; a client's flush closes the open interval and
//   returns once the journal (and the primary) are durable.
// - Only durable, closed intervals are offered to the shippers, in order;
//   an interval is kept until every far copy has flushed it, and its bytes
//   are punched out of the file after that.
// - An append that fails leaves the journal as it was (the record's bytes
//   are cut off again); when even that fails the journal takes no more
//   changes, so nothing is acknowledged that it does not hold.
// - Recovery keeps the complete intervals a copy lacks, cuts a torn tail
//   and the open interval (the activity log covers what they held), and
//   refuses damage: nothing is ever replayed from a record that is not good.
// - When the far copies owe more than the lag bound allows, new changes
//   wait (the log says so) until they catch up; when no client flush comes
//   to close an interval, the journal closes one itself, so a waiting
//   client is never waiting on itself.
// - One process keeps a journal at a time: it is locked (flock) for as
//   long as it is open.

import CShim
import Glibc

/// A closed interval not yet flushed on every far copy.
struct ClosedInterval: Sendable {
  var interval: UInt64
  /// Where its first record starts (its end record, when it has no change).
  var start: UInt64
  /// Where the record after its end record starts.
  var end: UInt64
  /// Device bytes its changes cover.
  var bytes: UInt64
  /// When its first change was journaled (monotonic seconds).
  var firstChange: Double
}

/// What one far copy owes, for the status and the log.
public struct MirrorLag: Sendable, Equatable {
  public var name: String
  public var intervals: Int
  public var bytes: UInt64
  /// Seconds since the oldest change the copy lacks was journaled (0 when
  /// it lacks none): the copy's recovery point.
  public var oldestSeconds: Double
  /// The last interval the copy holds.
  public var interval: UInt64
}

/// The bound on what the far copies may owe before changes wait.
public struct MirrorLagBound: Sendable, Equatable {
  /// Bytes of journal owed (0: no bound).
  public var bytes: UInt64
  /// Age of the oldest change owed (0: no bound).
  public var seconds: Double

  public init(bytes: UInt64, seconds: Double) {
    self.bytes = bytes
    self.seconds = seconds
  }
}

// @unchecked Sendable: every mutable field is behind `monitor`, which the
// shippers, throttled writers and flush waiters wait on.
public final class MirrorJournal: @unchecked Sendable {
  public let path: String
  public let positionsPath: String
  public let header: MirrorJournalHeader
  let fd: Int32
  let bound: MirrorLagBound
  let log: @Sendable (String) -> Void
  /// A journal this long or longer starts again after its header once every
  /// copy has everything (a file system's largest file is never reached).
  static let restartLength: UInt64 = 1 << 30
  /// The largest record payload appended: a larger write takes several.
  static let recordPayload = 4 << 20
  /// An open interval this old is closed by the journal when a copy waits
  /// for work; one this large is closed at once.
  static let autoCloseSeconds = 1.0
  static let autoCloseBytes: UInt64 = 64 << 20
  /// Room kept free on the journal's file system: writes wait rather than
  /// take it.
  static let spaceReserve: UInt64 = 8 << 20
  /// The consumed start of the journal is punched out in steps this large.
  static let punchUnit: UInt64 = 64 << 20

  private let monitor = Monitor()
  /// Held while the positions file is written (before the monitor, never
  /// inside it).
  private let saving = Locked(0)
  // Guarded by monitor:
  private var end: UInt64
  private var nextSequence: UInt64
  private var openInterval: UInt64
  private var openStart: UInt64
  private var openChanges = 0
  private var openBytes: UInt64 = 0
  private var openSince = 0.0
  private var closedIntervals = IntervalQueue()
  private var durableEnd: UInt64
  private var copies: [MirrorPosition]
  private var punchedTo: UInt64
  private var broken: ToolkitError?
  private var stopping = false
  private var waitingWriters = 0
  /// The journal's file system had less than `spaceReserve` free when last
  /// looked at (at journal offset `spaceCheckedAt`).
  private var lowSpace = false
  private var spaceCheckedAt: UInt64 = 0
  private var throttleLogged = 0.0
  /// Scratch for framing a record, used under the lock.
  private let frameHeader = UnsafeMutableRawBufferPointer.allocate(
    byteCount: MirrorJournalFormat.recordHeaderLength, alignment: 8)
  private let frameTrailer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
  private let frameVectors = UnsafeMutableBufferPointer<iovec>.allocate(capacity: 3)

  deinit {
    frameHeader.deallocate()
    frameTrailer.deallocate()
    frameVectors.deallocate()
    Sys.close(fd)
  }

  /// Opens the journal at `path` for the map `mapID` of a device of
  /// `geometry`, mirrored to `copyNames`, creating it when missing. An
  /// existing journal is recovered: `unshipped` is called with every change
  /// of the complete intervals some copy lacks, in journal order.
  public init(
    path: String, mapID: ID128, geometry: BlockGeometry, copyNames: [String], bound: MirrorLagBound,
    log: @escaping @Sendable (String) -> Void, unshipped: (MirrorJournalRecordType, UInt64, UInt64) -> Void
  ) throws {
    self.path = path
    self.positionsPath = path + ".positions"
    self.bound = bound
    self.log = log
    // Before anything is made: a journal whose positions cannot be saved
    // could not be opened again.
    try MirrorPositions.check(names: copyNames)
    let exists = pathExists(path)
    let fd: Int32
    switch Sys.open(path, flags: O_RDWR | (exists ? 0 : O_CREAT | O_EXCL)) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, "cannot open the mirror journal: \(e)")
    }
    // One server per journal, and no reader of what it owes while it runs
    // (overwrite-map owed): the lock goes with the process.
    if flock(fd, LOCK_EX | LOCK_NB) != 0 {
      let e = Errno.current
      Sys.close(fd)
      if !exists { unlink(path) }
      if e.rawValue == EWOULDBLOCK {
        throw ToolkitError("\(path) is locked: another process is using this mirror journal")
      }
      throw ToolkitError.path(path, "cannot lock the mirror journal", errno: e)
    }
    self.fd = fd
    // A refusal below leaves no descriptor open, and so no lock held (the
    // object is not whole, so deinit does not run).
    var opened = false
    defer { if !opened { Sys.close(fd) } }
    if !exists {
      header = MirrorJournalHeader(
        journal: .random(), map: mapID, deviceSize: geometry.deviceSize, blockSize: geometry.blockSize,
        created: .now())
      let bytes = header.encoded
      let written = bytes.withUnsafeBytes { pwriteFull(fd, $0.baseAddress!, $0.count, 0) }
      if case .failure(let e) = written {
        unlink(path)
        throw ToolkitError.path(path, "cannot write the mirror journal's header: \(e)")
      }
      if case .failure(let e) = Sys.fdatasync(fd) {
        unlink(path)
        throw ToolkitError.path(path, "cannot make the mirror journal durable: \(e)")
      }
      let now = Instant.now()
      copies = copyNames.map { MirrorPosition(name: $0, interval: 0, offset: 4096, shipped: now) }
      end = UInt64(MirrorJournalHeader.length)
      nextSequence = 1
      openInterval = 1
      try MirrorPositions(journal: header.journal, nextInterval: 1, nextSequence: 1, copies: copies).save(
        to: positionsPath)
      syncDirectory(of: path)
      log("created the mirror journal \(path)")
    } else {
      let recovered = try Self.recover(
        fd: fd, path: path, positionsPath: positionsPath, mapID: mapID, geometry: geometry, copyNames: copyNames,
        log: log, unshipped: unshipped)
      header = recovered.header
      copies = recovered.copies
      end = recovered.end
      nextSequence = recovered.nextSequence
      openInterval = recovered.nextInterval
      closedIntervals = IntervalQueue(recovered.closed)
    }
    openStart = end
    durableEnd = end
    // What every copy has is punched out now: a stop (or a crash) may have
    // come before the last step of it.
    let consumed = min(copies.map(\.offset).min() ?? end, end) & ~UInt64((1 << 20) - 1)
    let start = UInt64(MirrorJournalHeader.length)
    if consumed > start { _ = dr_punch_hole(fd, start, consumed - start) }
    punchedTo = max(start, consumed)
    opened = true
  }

  // MARK: Recovery

  private struct Recovered {
    var header: MirrorJournalHeader
    var copies: [MirrorPosition]
    var end: UInt64
    var nextSequence: UInt64
    var nextInterval: UInt64
    var closed: [ClosedInterval]
  }

  private static func recover(
    fd: Int32, path: String, positionsPath: String, mapID: ID128, geometry: BlockGeometry, copyNames: [String],
    log: @Sendable (String) -> Void, unshipped: (MirrorJournalRecordType, UInt64, UInt64) -> Void
  ) throws -> Recovered {
    guard case .success(let st) = Sys.fstat(fd) else { throw ToolkitError.path(path, "cannot stat the journal") }
    let size = Int(st.st_size)
    guard size >= MirrorJournalHeader.length else {
      throw ToolkitError("\(path) is not a mirror journal: it has \(size) bytes, fewer than its header's 4096")
    }
    guard let positions = try MirrorPositions.load(positionsPath) else {
      if size == MirrorJournalHeader.length {
        throw ToolkitError(
          "\(positionsPath) is missing: without it nobody knows what the far copies lack of \(path)")
      }
      throw ToolkitError(
        "\(positionsPath) is missing: without it nobody knows what the far copies lack of \(path), which holds changes")
    }
    guard let base = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), base != MAP_FAILED else {
      throw ToolkitError.path(path, "cannot map the mirror journal: \(Errno.current)")
    }
    defer { munmap(base, size) }
    let bytes = UnsafeRawBufferPointer(start: base, count: size)
    let header: MirrorJournalHeader
    do {
      header = try MirrorJournalHeader(decoding: Array(bytes[0..<MirrorJournalHeader.length])[...])
    } catch {
      throw ToolkitError("\(path): \(error.message)")
    }
    guard header.journal == positions.journal else {
      throw ToolkitError("\(positionsPath) is the positions file of journal \(positions.journal), not of \(path)")
    }
    guard header.map == mapID else {
      throw ToolkitError("\(path) is the mirror journal of map \(header.map), not of this overwrite map (\(mapID))")
    }
    guard header.deviceSize == geometry.deviceSize, header.blockSize == geometry.blockSize else {
      throw ToolkitError(
        "\(path) describes \(header.deviceSize) bytes in blocks of \(header.blockSize), "
          + "not the map's \(geometry.deviceSize) in blocks of \(geometry.blockSize)")
    }
    // The copies named now keep their positions; a new one starts where
    // the journal's oldest kept change is; one no longer named is let go.
    var copies: [MirrorPosition] = []
    let oldest = positions.copies.min { $0.interval < $1.interval }
    for name in copyNames {
      if let p = positions.copies.first(where: { $0.name == name }) {
        copies.append(p)
      } else {
        let from = oldest ?? MirrorPosition(name: name, interval: 0, offset: 4096, shipped: .now())
        copies.append(MirrorPosition(name: name, interval: from.interval, offset: from.offset, shipped: .now()))
        log(
          "the far copy \(name) is new to the journal \(path): it is sent the changes after interval \(from.interval); "
            + "it must hold what the primary held then")
      }
    }
    for p in positions.copies where !copyNames.contains(p.name) {
      log("the far copy \(p.name) is no longer mirrored to: it holds the changes up to interval \(p.interval)")
    }
    let minimum = copies.min { $0.interval < $1.interval }
    let start = Int(min(max(minimum?.offset ?? 4096, 4096), UInt64(size)))
    let shippedByAll = minimum?.interval ?? 0
    let scan: MirrorJournalScan
    do {
      scan = try MirrorJournalFormat.scan(bytes, from: start)
    } catch {
      throw ToolkitError("\(path): \(error.description); refusing to replay it")
    }
    var closed: [ClosedInterval] = []
    var lastSequence: UInt64 = 0
    var lastInterval: UInt64 = 0
    let now = monotonicSeconds()
    for i in scan.intervals {
      lastInterval = i.interval
      if let r = i.records.last { lastSequence = max(lastSequence, r.record.sequence) }
      let endRecord = i.endPosition + MirrorJournalFormat.recordSize(payload: 0)
      // The interval-end record's sequence is above its records'.
      lastSequence = max(lastSequence, Self.sequence(at: i.endPosition, in: bytes))
      guard i.interval > shippedByAll else { continue }
      var covered: UInt64 = 0
      for (_, r) in i.records {
        unshipped(r.type, r.offset, r.length)
        covered += r.length
      }
      closed.append(
        ClosedInterval(
          interval: i.interval, start: UInt64(i.records.first?.position ?? i.endPosition), end: UInt64(endRecord),
          bytes: covered, firstChange: now))
    }
    let keep = scan.intervals.last.map { $0.endPosition + MirrorJournalFormat.recordSize(payload: 0) } ?? start
    if keep < size {
      let dropped = scan.open.count
      guard ftruncate(fd, off_t(keep)) == 0, case .success = Sys.fdatasync(fd) else {
        throw ToolkitError.path(path, "cannot cut the mirror journal's torn tail: \(Errno.current)")
      }
      log(
        "the mirror journal \(path) ended inside an interval: cut \(size - keep) byte(s) at offset \(keep)"
          + (dropped > 0 ? " (\(dropped) change(s) not closed by a flush; the activity log covers them)" : ""))
    }
    if !closed.isEmpty {
      let bytes = closed.reduce(UInt64(0)) { $0 + $1.bytes }
      log(
        "the mirror journal \(path) holds \(closed.count) interval(s) (\(formatBytes(bytes))) a far copy lacks; "
          + "they are sent first")
    }
    return Recovered(
      header: header, copies: copies, end: UInt64(keep),
      nextSequence: max(lastSequence + 1, positions.nextSequence),
      nextInterval: max(lastInterval + 1, positions.nextInterval, (minimum?.interval ?? 0) + 1), closed: closed)
  }

  private static func sequence(at position: Int, in bytes: UnsafeRawBufferPointer) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<8 { v |= UInt64(bytes[position + 20 + i]) << (8 * UInt64(i)) }
    return v
  }

  // MARK: Appending

  /// Journals a change: a write (`payload` its data), zero or trim of
  /// `length` bytes at `offset`. Waits first while the copies owe more
  /// than the bound. The change is in the file (not yet durable) on return.
  func append(_ type: MirrorJournalRecordType, offset: UInt64, length: UInt64, payload: UnsafeRawBufferPointer?)
    throws
  {
    // A record of no bytes is not a good record: recovery would refuse it.
    guard length > 0 else { return }
    monitor.lock()
    defer { monitor.unlock() }
    try throttle()
    if let broken { throw broken }
    var done: UInt64 = 0
    repeat {
      let n = type == .write ? min(length - done, UInt64(Self.recordPayload)) : length
      let part = payload.map { UnsafeRawBufferPointer(rebasing: $0[Int(done)..<Int(done + n)]) }
      try appendRecord(
        .change(type, interval: openInterval, sequence: nextSequence, offset: offset + done, length: n), part)
      if openChanges == 0 { openSince = monotonicSeconds() }
      openChanges += 1
      openBytes += n
      done += n
    } while done < length
  }

  /// Writes one record at the end (monitor held). A failure cuts it off
  /// again; when that fails too, the journal is broken.
  private func appendRecord(_ record: MirrorJournalRecord, _ payload: UnsafeRawBufferPointer?) throws {
    let data = payload ?? UnsafeRawBufferPointer(start: nil, count: 0)
    let trailerCount = MirrorJournalFormat.frame(
      record, payload: data, header: frameHeader, trailer: frameTrailer)
    let size = UInt64(MirrorJournalFormat.recordHeaderLength + data.count + trailerCount)
    func write() -> Result<Void, Errno> {
      frameVectors[0] = iovec(iov_base: frameHeader.baseAddress, iov_len: MirrorJournalFormat.recordHeaderLength)
      frameVectors[1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress), iov_len: data.count)
      frameVectors[2] = iovec(iov_base: frameTrailer.baseAddress, iov_len: trailerCount)
      return pwritevFull(fd, frameVectors, end)
    }
    var result = write()
    // A full file system: what every copy has is punched out (the file
    // keeps its length), and the change tried once more.
    if case .failure(let e) = result, e.rawValue == ENOSPC, ftruncate(fd, off_t(end)) == 0, punchConsumed() {
      result = write()
    }
    if case .failure(let e) = result {
      if ftruncate(fd, off_t(end)) != 0 {
        broken = ToolkitError(
          "the mirror journal \(path) could not take a change (\(e)) nor be cut back (\(Errno.current)): "
            + "it takes no more", cause: .system(e.rawValue))
        throw broken!
      }
      throw ToolkitError(
        "the mirror journal \(path) could not take a change of \(record.length) bytes: \(e)", cause: .system(e.rawValue)
      )
    }
    end += size
    nextSequence += 1
  }

  /// Waits while the copies owe more than the bound (monitor held).
  private func throttle() throws {
    var waited = false
    while !stopping, let reason = overBound() {
      if !waited {
        waited = true
        waitingWriters += 1
        let now = monotonicSeconds()
        if now - throttleLogged >= 10 {
          throttleLogged = now
          log("writes wait: \(reason); they go on as the copies catch up")
        }
        monitor.broadcast()
      }
      _ = monitor.wait(until: monotonicSeconds() + 1)
    }
    if waited { waitingWriters -= 1 }
  }

  /// Why the copies owe too much, or nil (monitor held).
  private func overBound() -> String? {
    // Every append asks: no array is made for it.
    let owedFrom = copies.isEmpty ? end : copies.reduce(UInt64.max) { min($0, $1.offset) }
    let owed = end > owedFrom ? end - owedFrom : 0
    if bound.bytes > 0 && owed >= bound.bytes {
      return "the far copies owe \(formatBytes(owed)) of journal, at the bound of \(formatBytes(bound.bytes))"
    }
    if bound.seconds > 0, let oldest = oldestOwed() {
      let age = monotonicSeconds() - oldest
      if age >= bound.seconds {
        return "the far copies owe changes \(Int(age)) s old, at the bound of \(bound.seconds) s"
      }
    }
    // The journal's file system keeps room for the largest record and the
    // positions file: a journal that fills its disk could no longer record
    // what the copies have, and so never make room again. Looked at every
    // 256 KiB of journal, and at each turn while it is short.
    if lowSpace || end >= spaceCheckedAt + (256 << 10) {
      spaceCheckedAt = end
      var fs = statvfs()
      if fstatvfs(fd, &fs) == 0 {
        let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        lowSpace = free < Self.spaceReserve
        if lowSpace {
          return
            "the journal's file system has \(formatBytes(free)) free, less than the \(formatBytes(Self.spaceReserve)) kept"
        }
      }
    }
    return nil
  }

  /// When the oldest change some copy lacks was journaled (monitor held).
  private func oldestOwed() -> Double? {
    if let first = closedIntervals.first { return first.firstChange }
    return openChanges > 0 ? openSince : nil
  }

  // MARK: Intervals

  /// Closes the open interval when it holds a change; with `sync`, makes
  /// the journal durable. Returns the last interval closed: every change
  /// journaled before the call is in it or before it.
  @discardableResult
  func closeInterval(sync: Bool) throws -> UInt64 {
    let (closedUpTo, syncTo) = try monitor.withLock { () throws -> (UInt64, UInt64) in
      if let broken { throw broken }
      if openChanges > 0 {
        let start = openStart
        try appendRecord(.intervalEnd(openInterval, sequence: nextSequence), nil)
        closedIntervals.append(
          ClosedInterval(interval: openInterval, start: start, end: end, bytes: openBytes, firstChange: openSince))
        openInterval += 1
        openStart = end
        openChanges = 0
        openBytes = 0
      }
      return (openInterval - 1, end)
    }
    if sync { try self.sync(upTo: syncTo) }
    return closedUpTo
  }

  /// Makes the journal and `device` durable at once (a FLUSH or FUA under
  /// asynchronous mirroring): the journal's fdatasync on `offload`, the
  /// device's on this thread; the device's error first.
  func sync(together device: Device, on offload: Offload) throws {
    let journalError = ErrorBox()
    let job = offload.start { [self] in
      do { try sync() } catch { journalError.set(error) }
    }
    var deviceError: Error?
    do { try device.sync() } catch { deviceError = error }
    job.wait()
    if let deviceError { throw deviceError }
    if let e = journalError.error { throw e }
  }

  /// Makes the journal durable (a FUA write's part).
  func sync() throws {
    try sync(upTo: monitor.withLock { end })
  }

  private func sync(upTo: UInt64) throws {
    if case .failure(let e) = Sys.fdatasync(fd) {
      throw ToolkitError("cannot make the mirror journal \(path) durable: \(e)", cause: .system(e.rawValue))
    }
    monitor.withLock {
      if upTo > durableEnd {
        durableEnd = upTo
        monitor.broadcast()
      }
    }
  }

  /// What a shipper is given to do next.
  enum Work {
    case ship(ClosedInterval)
    /// The open interval should be closed, or a closed one made durable
    /// (it is old, large, or writers wait): call closeInterval(sync: true)
    /// and ask again.
    case closeOpen
    case stop
  }

  /// The next durable closed interval after `interval` for `copy`, waiting
  /// up to `timeout` seconds for one (nil: none came).
  func next(after interval: UInt64, timeout: Double) -> Work? {
    monitor.lock()
    defer { monitor.unlock() }
    let deadline = monotonicSeconds() + timeout
    while true {
      if stopping { return .stop }
      let closed = closedIntervals.first(after: interval)
      if let c = closed, c.end <= durableEnd { return .ship(c) }
      // A closed interval not yet durable (a flush is syncing it) does not
      // hold back closing an old or large open one, nor writers waiting:
      // the close syncs both, where waiting would wait on a sync that may
      // not come (and, with the open interval old, would spin).
      if openChanges > 0 || closed != nil {
        let age = openChanges > 0 ? monotonicSeconds() - openSince : 0
        if waitingWriters > 0 || openBytes >= Self.autoCloseBytes || age >= Self.autoCloseSeconds {
          return .closeOpen
        }
      }
      let wake =
        openChanges > 0 ? min(deadline, openSince + Self.autoCloseSeconds + 0.001) : deadline
      if !monitor.wait(until: wake) && monotonicSeconds() >= deadline { return nil }
    }
  }

  /// Reads the changes of `closed` from journal offset `from` on, at most
  /// `limit` of them: the changes and where the next one starts (the
  /// interval's end record once all are read).
  func changes(of closed: ClosedInterval, from: UInt64, limit: Int) throws -> ([JournaledChange], UInt64) {
    var out: [JournaledChange] = []
    var position = max(from, closed.start)
    let stop = closed.end - UInt64(MirrorJournalFormat.recordSize(payload: 0))
    let headerLength = MirrorJournalFormat.recordHeaderLength
    var window = [UInt8](repeating: 0, count: 64 << 10)
    var windowStart: UInt64 = 0
    var windowCount = 0
    while position < stop && out.count < limit {
      if position < windowStart || position + UInt64(headerLength) > windowStart + UInt64(windowCount) {
        let want = Int(min(UInt64(window.count), stop - position))
        let got = window.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, want, position) }
        guard case .success(let n) = got, n >= headerLength else {
          throw ToolkitError("cannot read the mirror journal \(path) at offset \(position)")
        }
        windowStart = position
        windowCount = n
      }
      let at = Int(position - windowStart)
      func le(_ o: Int, _ width: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<width { v |= UInt64(window[at + o + i]) << (8 * UInt64(i)) }
        return v
      }
      guard UInt32(le(0, 4)) == MirrorJournalFormat.recordMagic,
        let type = MirrorJournalRecordType(rawValue: window[at + 4]), type != .intervalEnd
      else {
        throw ToolkitError("the mirror journal \(path) has no change record at offset \(position)")
      }
      let payload = Int(le(8, 4))
      let offset = le(28, 8)
      let length = le(36, 8)
      out.append(
        JournaledChange(
          type: type, offset: offset, length: length,
          payloadAt: type == .write ? position + UInt64(headerLength) : 0))
      position += UInt64(MirrorJournalFormat.recordSize(payload: payload))
    }
    return (out, position)
  }

  /// Reads journal bytes (a piece's payload).
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard case .success(let n) = preadFull(fd, buffer.baseAddress!, buffer.count, offset), n == buffer.count else {
      throw ToolkitError("cannot read \(buffer.count) bytes of the mirror journal \(path) at offset \(offset)")
    }
  }

  // MARK: Positions

  /// Records that copy `index` has flushed `closed`: the positions file is
  /// saved, what every copy has (as saved) is dropped and punched out of
  /// the file, and waiters are woken. The file is written outside the
  /// monitor, so appends do not wait for it; saves (and the restart, which
  /// saves too) take turns under `saving`, so an older save never lands
  /// after a newer one.
  func shipped(copy index: Int, _ closed: ClosedInterval) throws {
    monitor.withLock {
      copies[index].interval = closed.interval
      copies[index].offset = closed.end
      copies[index].shipped = .now()
      monitor.broadcast()
    }
    try saving.withLock { _ in
      let snapshot = monitor.withLock { positions() }
      try snapshot.save(to: positionsPath)
      monitor.withLock {
        let all = snapshot.copies.map(\.interval).min() ?? 0
        closedIntervals.drop(through: all)
        let keepFrom = closedIntervals.first?.start ?? openStart
        if openChanges == 0 && closedIntervals.isEmpty && end >= Self.restartLength
          && snapshot.copies.allSatisfy({ $0.interval == openInterval - 1 })
        {
          restart()
        } else if keepFrom >= punchedTo + Self.punchUnit || lowSpace {
          punchConsumed()
        }
        monitor.broadcast()
      }
    }
  }

  /// Punches out the whole MiBs before the oldest record some copy lacks
  /// (as the positions file says; monitor held): whether any were.
  @discardableResult
  private func punchConsumed() -> Bool {
    let keepFrom = closedIntervals.first?.start ?? openStart
    let to = keepFrom & ~UInt64((1 << 20) - 1)
    guard to > punchedTo else { return false }
    _ = dr_punch_hole(fd, punchedTo, to - punchedTo)
    punchedTo = to
    return true
  }

  /// Starts the journal again after its header (monitor held; every copy
  /// has every change). The positions say so first, so a crash in between
  /// leaves old records that every copy has, which are skipped.
  private func restart() {
    let start = UInt64(MirrorJournalHeader.length)
    for i in copies.indices { copies[i].offset = start }
    do {
      try savePositions()
    } catch {
      log("the mirror journal \(path) was not started again: \(error)")
      return
    }
    guard ftruncate(fd, off_t(start)) == 0, case .success = Sys.fdatasync(fd) else {
      broken = ToolkitError("the mirror journal \(path) could not be started again: \(Errno.current); it takes no more")
      return
    }
    end = start
    openStart = start
    durableEnd = start
    punchedTo = start
  }

  /// The positions as they stand (monitor held).
  private func positions() -> MirrorPositions {
    MirrorPositions(journal: header.journal, nextInterval: openInterval, nextSequence: nextSequence, copies: copies)
  }

  private func savePositions() throws { try positions().save(to: positionsPath) }

  /// The last interval copy `index` holds.
  func position(of index: Int) -> UInt64 { monitor.withLock { copies[index].interval } }

  /// The names of the copies, in their order.
  var copyNames: [String] { monitor.withLock { copies.map(\.name) } }

  /// Waits until `count` copies hold `interval`, or `deadline` passes, or
  /// the journal stops: whether they do.
  func wait(forCopies count: Int, toHold interval: UInt64, until deadline: Double) -> Bool {
    monitor.lock()
    defer { monitor.unlock() }
    while true {
      if copies.filter({ $0.interval >= interval }).count >= count { return true }
      if stopping || monotonicSeconds() >= deadline { return false }
      _ = monitor.wait(until: min(deadline, monotonicSeconds() + 1))
    }
  }

  /// What each copy owes.
  public var lag: [MirrorLag] {
    monitor.withLock {
      let now = monotonicSeconds()
      return copies.map { c in
        let owed = closedIntervals.all(after: c.interval)
        let bytes = owed.reduce(UInt64(0)) { $0 + $1.bytes } + openBytes
        let oldest = owed.first?.firstChange ?? (openChanges > 0 ? openSince : nil)
        return MirrorLag(
          name: c.name, intervals: owed.count + (openChanges > 0 ? 1 : 0), bytes: bytes,
          oldestSeconds: oldest.map { max(0, now - $0) } ?? 0, interval: c.interval)
      }
    }
  }

  /// Whether every copy holds every change (nothing open, nothing owed).
  var drained: Bool { monitor.withLock { closedIntervals.isEmpty && openChanges == 0 } }

  /// Whether stop() was called.
  var isStopping: Bool { monitor.withLock { stopping } }

  /// Wakes every waiter; shippers stop, throttled writers go on.
  func stop() {
    monitor.withLock {
      stopping = true
      monitor.broadcast()
    }
  }
}

/// fsyncs the directory holding `path`, so a file just created there stays.
func syncDirectory(of path: String) {
  let directory = splitPath(path).directory
  guard case .success(let d) = Sys.open(directory.isEmpty ? "." : directory, flags: O_RDONLY) else { return }
  _ = Sys.fsync(d)
  Sys.close(d)
}

/// The closed intervals some copy lacks, in order: dropped from the front
/// in O(1) each and found by binary search, however long the lag.
struct IntervalQueue {
  private var items: [ClosedInterval]
  private var head = 0

  init(_ items: [ClosedInterval] = []) { self.items = items }

  var isEmpty: Bool { head == items.count }
  var first: ClosedInterval? { isEmpty ? nil : items[head] }

  mutating func append(_ c: ClosedInterval) { items.append(c) }

  /// The first interval above `interval`.
  func first(after interval: UInt64) -> ClosedInterval? {
    let i = index(after: interval)
    return i < items.count ? items[i] : nil
  }

  /// Every interval above `interval`.
  func all(after interval: UInt64) -> ArraySlice<ClosedInterval> { items[index(after: interval)...] }

  /// Drops the intervals up to `interval`; the array is compacted once
  /// most of it is dropped.
  mutating func drop(through interval: UInt64) {
    head = index(after: interval)
    if head > 1024 && head * 2 > items.count {
      items.removeFirst(head)
      head = 0
    }
  }

  private func index(after interval: UInt64) -> Int {
    var low = head
    var high = items.count
    while low < high {
      let mid = (low + high) / 2
      if items[mid].interval <= interval { low = mid + 1 } else { high = mid }
    }
    return low
  }
}
