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
    /// The count of entries so far, and each region's last entry's number.
    var generation: UInt64 = 0
    var entered: [UInt64: UInt64] = [:]
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
      s.generation += 1
      for r in regionRange(blocks) {
        s.entered[r] = s.generation
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

  /// The number of the last entry: a flush takes it before it closes
  /// its interval, and trims only what was entered up to it.
  func mark() -> UInt64 { regions.withLock { $0.generation } }

  /// After a flush: drops the regions with nothing in flight or pinned
  /// (and, given `enteredUpTo`, not entered since that mark). With `keep`,
  /// the log is left alone while it holds at most `keep` regions, and then
  /// cut to half of that, least recently entered first: a region a client
  /// keeps writing to stays, and its writes do not each rewrite the log.
  func trim(enteredUpTo mark: UInt64? = nil, keep: Int = 0) throws {
    try regions.withLock { s in
      if keep > 0 && s.log.bits.population <= UInt64(keep) { return }
      var candidates: [(UInt64, UInt64)] = []
      var r = s.log.bits.nextSet(from: 0)
      while let region = r {
        let last = s.entered[region] ?? 0
        if s.inFlight[region] == nil && !s.pinned.contains(region) && (mark.map { last <= $0 } ?? true) {
          candidates.append((last, region))
        }
        r = s.log.bits.nextSet(from: region + 1)
      }
      if keep > 0 {
        let excess = Int(s.log.bits.population) - keep / 2
        candidates.sort { $0.0 < $1.0 }
        candidates = Array(candidates.prefix(max(0, excess)))
      }
      for (_, region) in candidates {
        s.log.bits[region] = false
        s.entered[region] = nil
      }
      if !candidates.isEmpty { try MapFile.save(s.log, to: path) }
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
