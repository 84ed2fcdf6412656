// The activity log: which regions of the primary may hold writes that the
// backup has not (yet) got. A region enters the log, durably, before the
// first write to it is issued, and leaves it at a flush once no write to it
// is in flight and the backup holds every block of it. After an unclean
// shutdown, the current blocks of the regions in the log are copied from the
// primary to the backup, so the two agree again (as DRBD's activity log).
//
// The log is a map file (dualrestore-map(5), meaning "selected") beside the
// overwrite map, with one bit per region of 4 MiB (or one block, if larger).

final class ActivityLog: Sendable {
  let path: String
  let geometry: BlockGeometry
  let blockGeometry: BlockGeometry
  private struct Regions {
    var log: BlockMap
    var inFlight: [UInt64: Int] = [:]
    /// Regions kept in the log until the backup has their blocks.
    var pinned: Set<UInt64> = []
  }
  private let regions: Locked<Regions>

  /// The regions the log held when it was opened: non-empty after an
  /// unclean shutdown.
  let recovered: [UInt64]

  init(path: String, blockGeometry: BlockGeometry, deviceName: String) throws {
    self.path = path
    self.blockGeometry = blockGeometry
    let regionSize = max(UInt32(4 << 20), blockGeometry.blockSize)
    geometry = try BlockGeometry(blockSize: regionSize, deviceSize: blockGeometry.deviceSize)
    if pathExists(path) {
      let existing = try MapFile.load(path)
      try existing.geometry.check(matches: geometry, path, "the activity log this build keeps")
      regions = Locked(Regions(log: existing))
      recovered = Array(existing.bits.extents.flatMap { $0 })
    } else {
      let log = BlockMap(geometry: geometry, meaning: .selected, deviceName: deviceName)
      regions = Locked(Regions(log: log))
      recovered = []
      try MapFile.save(log, to: path)
    }
  }

  /// The blocks of a region.
  func blocks(ofRegion region: UInt64) -> Range<UInt64> {
    let perRegion = UInt64(geometry.blockSize / blockGeometry.blockSize)
    let first = region * perRegion
    return first..<min(first + perRegion, blockGeometry.blockCount)
  }

  private func regionRange(_ blocks: Range<UInt64>) -> ClosedRange<UInt64> {
    let perRegion = UInt64(geometry.blockSize / blockGeometry.blockSize)
    return (blocks.lowerBound / perRegion)...((blocks.upperBound - 1) / perRegion)
  }

  /// Records writes to `blocks` as in flight; the log is durable on return.
  func enter(_ blocks: Range<UInt64>) throws {
    guard !blocks.isEmpty else { return }
    try regions.withLock { s in
      var added = false
      for r in regionRange(blocks) {
        s.inFlight[r, default: 0] += 1
        if !s.log.bits[r] {
          s.log.bits[r] = true
          added = true
        }
      }
      if added { try MapFile.save(s.log, to: path) }
    }
  }

  /// The writes to `blocks` are done (the regions stay logged until a flush).
  func leave(_ blocks: Range<UInt64>) {
    guard !blocks.isEmpty else { return }
    regions.withLock { s in
      for r in regionRange(blocks) {
        if let n = s.inFlight[r], n > 1 { s.inFlight[r] = n - 1 } else { s.inFlight[r] = nil }
      }
    }
  }

  /// Keeps the regions of `blocks` logged until `unpin` (the backup lacks them).
  func pin(_ blocks: Range<UInt64>) {
    regions.withLock { s in
      for r in regionRange(blocks) { s.pinned.insert(r) }
    }
  }

  /// Pins exactly the regions of `blocks` (the blocks still owed).
  func repin(_ blocks: Set<UInt64>) {
    let perRegion = UInt64(geometry.blockSize / blockGeometry.blockSize)
    let owed = Set(blocks.map { $0 / perRegion })
    regions.withLock { $0.pinned = owed }
  }

  /// After a flush: drops the regions with nothing in flight or pinned.
  func trim() throws {
    try regions.withLock { s in
      var changed = false
      var r = s.log.bits.nextSet(from: 0)
      while let region = r {
        if s.inFlight[region] == nil && !s.pinned.contains(region) {
          s.log.bits[region] = false
          changed = true
        }
        r = s.log.bits.nextSet(from: region + 1)
      }
      if changed { try MapFile.save(s.log, to: path) }
    }
  }

  /// Empties the log (after recovery, or at a clean shutdown).
  func clear() throws {
    try regions.withLock { s in
      s.log.bits = BlockBitmap(count: geometry.blockCount)
      try MapFile.save(s.log, to: path)
    }
  }
}
