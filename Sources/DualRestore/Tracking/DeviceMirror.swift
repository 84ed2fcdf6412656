// Asynchronous mirroring of a live device that is whole (tracking-server
// --backup): every block is the device's own, so there is nothing to fetch
// and no partial block; a change is journaled, made on the device and
// acknowledged, and the far copies get it from the journal in the
// background (FarCopyShipper), interval by interval, at consistency points.
//
// Invariants:
// - A change is journaled and made on the device under its blocks' locks,
//   so the journal orders changes of one block as the device does.
// - The activity log (CHANGES.al) names every region with a write in
//   flight before the write is issued; a flush drops only regions whose
//   writes it closed into the durable journal. After a crash the logged
//   regions are journaled again from the device as one interval, so the far
//   copies come to equal it.
// - A FLUSH is acknowledged once the journal and the device are durable
//   (and, under a quorum, once that many copies hold the interval).

import Glibc

public final class DeviceMirror: Sendable {
  let device: Device
  let journal: MirrorJournal
  let shippers: [FarCopyShipper]
  let activity: ActivityLog
  let locks = BlockLocks()
  let quorum: Int
  let log: @Sendable (String) -> Void
  private let offload = Offload(threads: 4)

  /// Opens (or recovers) the journal of `device` at `settings.journalPath`
  /// and the activity log at `activityPath`, for `copies`.
  public init(
    device: Device, geometry: BlockGeometry, activityPath: String, settings: MirrorSettings, copies: [BlockDevice],
    log: @escaping @Sendable (String) -> Void
  ) throws {
    self.device = device
    self.log = log
    for c in copies where c.size != device.size {
      throw ToolkitError("the far copy \(c.name) has \(c.size) bytes but \(device.path) has \(device.size)")
    }
    // The journal belongs to the device (a change map's id changes with
    // each generation).
    let identity = ID128(bytes: sha256(Array("dualrestore device \(canonicalPath(device.path))".utf8))[0..<16])
    activity = try ActivityLog(path: activityPath, blockGeometry: geometry, deviceName: device.path)
    let journal = try MirrorJournal(
      path: settings.journalPath, mapID: identity, geometry: geometry, copyNames: copies.map(\.name),
      bound: settings.bound, log: log
    ) { _, _, _ in }
    self.journal = journal
    shippers = copies.enumerated().map {
      FarCopyShipper(journal: journal, index: $0.offset, copy: $0.element, senders: settings.senders, log: log)
    }
    if case .quorum(let k) = settings.ack { quorum = k } else { quorum = 0 }
    if !activity.recovered.isEmpty { try recover() }
  }

  /// After an unclean shutdown: the logged regions journaled again.
  private func recover() throws {
    let buffer = AlignedBuffer(count: 4 << 20)
    var journaled: UInt64 = 0
    for region in activity.recovered {
      let (offset, length) = activity.geometry.byteRange(blocks: region, count: 1)
      var done: UInt64 = 0
      while done < length {
        let n = Int(min(UInt64(buffer.count), length - done))
        try device.read(into: buffer.slice(0, n), at: offset + done)
        try journal.append(
          .write, offset: offset + done, length: UInt64(n), payload: UnsafeRawBufferPointer(buffer.slice(0, n)))
        done += UInt64(n)
      }
      journaled += length
    }
    try journal.closeInterval(sync: true)
    try activity.clear()
    log(
      "unclean shutdown detected: \(activity.recovered.count) region(s) had writes in flight; journaled their "
        + "\(formatBytes(journaled)) from the device again, so the far copies come to equal it")
  }

  public func start() {
    for s in shippers { s.start() }
  }

  /// A change of `length` bytes at `offset` (a write when `payload` is
  /// given, else zeros): journaled, then made by `apply`.
  public func change(
    _ type: MirrorJournalRecordType, offset: UInt64, length: UInt64, payload: UnsafeRawBufferPointer?,
    blocks: Range<UInt64>, apply: () throws -> Void
  ) throws {
    guard !blocks.isEmpty else { return try apply() }
    locks.lock(blocks)
    defer { locks.unlock(blocks) }
    try activity.enter(blocks)
    defer { activity.leave(blocks) }
    try journal.append(type, offset: offset, length: length, payload: payload)
    try apply()
  }

  /// The journal and the device made durable together (a FUA write).
  public func sync() throws { try journal.sync(together: device, on: offload) }

  /// A FLUSH: the open interval closed, journal and device durable, the
  /// activity log trimmed; under a quorum, until enough copies hold it.
  public func flush() throws {
    let mark = activity.mark()
    let interval = try journal.closeInterval(sync: false)
    try sync()
    try activity.trim(enteredUpTo: mark, keep: 64)
    if quorum > 0 {
      guard journal.wait(forCopies: quorum, toHold: interval, until: monotonicSeconds() + 30) else {
        throw ToolkitError("fewer than \(quorum) far copies hold interval \(interval) after 30 s")
      }
    }
  }

  /// What each far copy owes.
  public var lag: [MirrorLag] { journal.lag }

  /// A clean stop, once no request is in flight: a last flush, the
  /// shippers stopped after the batch they send; what the copies lack
  /// stays in the journal.
  public func close() throws {
    try flush()
    journal.stop()
    for s in shippers { s.stop(closingLink: true) }
    try activity.clear()
  }
}
