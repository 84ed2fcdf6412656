// What a stopped server's mirror journal owes one far copy, as blocks: the
// map `overwrite-map owed` writes for a failback, where the far copy took
// over and the original must be brought back to it by sending only what
// differs (dualrestore(7), "Failback").
//
// Invariants:
// - Read only: the journal, its positions file and the activity log are
//   never written, truncated or punched; a journal whose server runs (it
//   holds the journal's lock) is refused, since what it owes changes under
//   the reader.
// - Nothing owed is left out: every change of the intervals the copy has
//   not flushed, the good changes after the last interval end (taken by
//   the primary, never closed by a flush), and every block of the regions
//   the activity log names (writes a power cut may have left on the primary
//   but not in the journal). A block more is a block compared or sent for
//   nothing; a block less would be a block the failback leaves wrong.
// - Damage is refused as recovery refuses it: nothing is read from a record
//   that is not good, and a journal that is damaged before its last
//   interval end gives no map at all.

import Glibc

/// The blocks a mirror journal owes one far copy, and where they come from.
public struct MirrorJournalOwed: Sendable {
  /// The blocks, at the journal's geometry (meaning: changed).
  public var map: BlockMap
  /// The copy, as the positions file names it, and its place there.
  public var copy: String
  public var copyIndex: Int
  /// The last interval the copy holds, and when it flushed it.
  public var copyInterval: UInt64
  public var copyFlushed: Instant
  /// Closed intervals the copy lacks, and their changes.
  public var intervals: Int
  public var intervalChanges: Int
  /// Good changes after the last interval end (no flush closed them).
  public var openChanges: Int
  /// Where a torn tail starts, when the journal has one.
  public var tornAt: Int?
  /// Regions the activity log names, and the blocks they add to the
  /// journal's.
  public var regions: Int
  public var regionBlocks: UInt64
  /// Blocks the journal's changes touch.
  public var journalBlocks: UInt64

  /// Reads the journal at `journal` (its positions file beside it) and the
  /// activity log at `activityLog`; `copy` picks the far copy by its name
  /// or its place in the positions file (0 first), and may be nil when
  /// there is one.
  public static func read(journal path: String, activityLog: String, copy: String?) throws -> MirrorJournalOwed {
    let fd: Int32
    switch Sys.open(path, flags: O_RDONLY) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, "cannot open the mirror journal: \(e)")
    }
    defer { Sys.close(fd) }
    // A server holds the journal's lock (exclusive) while it runs; the
    // shared lock, held while the journal is read, keeps one from starting.
    if flock(fd, LOCK_SH | LOCK_NB) != 0 {
      let e = Errno.current
      if e.rawValue == EWOULDBLOCK {
        throw ToolkitError(
          "\(path) is locked: the server that keeps this mirror journal is running, and what it owes changes "
            + "while it runs; stop it first")
      }
      throw ToolkitError.path(path, "cannot lock the mirror journal", errno: e)
    }
    guard case .success(let st) = Sys.fstat(fd) else { throw ToolkitError.path(path, "cannot stat the journal") }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw ToolkitError("\(path) is not a mirror journal: not a file") }
    let size = Int(st.st_size)
    guard size >= MirrorJournalHeader.length else {
      throw ToolkitError("\(path) is not a mirror journal: it has \(size) bytes, fewer than its header's 4096")
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
      throw ToolkitError("\(path) is not a usable mirror journal: \(error.message)")
    }
    let positionsPath = path + ".positions"
    guard let positions = try MirrorPositions.load(positionsPath) else {
      throw ToolkitError(
        "\(positionsPath) is missing: without it nobody knows what the far copies lack of \(path)")
    }
    guard header.journal == positions.journal else {
      throw ToolkitError("\(positionsPath) is the positions file of journal \(positions.journal), not of \(path)")
    }
    let (index, position) = try pick(copy, from: positions, path: positionsPath)
    let geometry = try BlockGeometry(blockSize: header.blockSize, deviceSize: header.deviceSize)
    try geometry.checkMappable()
    let log = try loadActivityLog(activityLog, geometry: geometry, journal: path)

    // The copy's records start at its offset (the bytes before the oldest
    // copy's offset may be punched out); intervals it holds are skipped,
    // as after a restart of the journal cut short by a crash.
    let start = Int(min(max(position.offset, UInt64(MirrorJournalHeader.length)), UInt64(size)))
    let scan: MirrorJournalScan
    do {
      scan = try MirrorJournalFormat.scan(bytes, from: start)
    } catch {
      throw ToolkitError("\(path): \(error.description); refusing to read what it owes from it")
    }
    var bits = BlockBitmap(count: geometry.blockCount)
    var owed = MirrorJournalOwed(
      map: BlockMap(geometry: geometry), copy: position.name, copyIndex: index, copyInterval: position.interval,
      copyFlushed: position.shipped, intervals: 0, intervalChanges: 0, openChanges: 0,
      tornAt: scan.torn == nil ? nil : scan.end, regions: 0, regionBlocks: 0, journalBlocks: 0)
    func note(_ r: MirrorJournalRecord) {
      bits.set(geometry.blocks(touching: r.offset, length: r.length))
    }
    for i in scan.intervals where i.interval > position.interval {
      owed.intervals += 1
      owed.intervalChanges += i.records.count
      for (_, r) in i.records { note(r) }
    }
    for (_, r) in scan.open where r.interval > position.interval {
      owed.openChanges += 1
      note(r)
    }
    owed.journalBlocks = bits.population
    let perRegion = UInt64(log.geometry.blockSize / geometry.blockSize)
    for regions in log.bits.extents {
      owed.regions += regions.count
      bits.set(regions.lowerBound * perRegion..<min(regions.upperBound * perRegion, geometry.blockCount))
    }
    owed.regionBlocks = bits.population - owed.journalBlocks
    // Changed since an instant no record gives (a record carries none): the
    // tracking start is left unset rather than guessed.
    owed.map = BlockMap(
      geometry: geometry, meaning: .changed, deviceName: log.deviceName.isEmpty ? path : log.deviceName,
      trackingStarted: .unset, bits: bits)
    return owed
  }

  /// The copy `wanted` names (a name, or a place from 0), or the only one.
  private static func pick(_ wanted: String?, from positions: MirrorPositions, path: String) throws -> (
    Int, MirrorPosition
  ) {
    let copies = positions.copies
    let names = copies.enumerated().map { "\($0.offset): \($0.element.name)" }.joined(separator: ", ")
    guard let wanted else {
      guard copies.count == 1 else {
        if copies.isEmpty { throw ToolkitError("\(path) names no far copy, so the journal owes none anything") }
        throw ToolkitError("\(path) names \(copies.count) far copies (\(names)); say which with --copy NAME or N")
      }
      return (0, copies[0])
    }
    if let i = copies.firstIndex(where: { $0.name == wanted }) { return (i, copies[i]) }
    if let i = Int(wanted), i >= 0, i < copies.count { return (i, copies[i]) }
    throw ToolkitError("\(path) names no far copy \(wanted); it names \(copies.isEmpty ? "none" : names)")
  }

  /// The activity log beside the server's map: regions of 4 MiB (or one
  /// block, if larger) over the journal's device.
  private static func loadActivityLog(_ path: String, geometry: BlockGeometry, journal: String) throws -> BlockMap {
    guard pathExists(path) else {
      throw ToolkitError(
        "\(path) is missing: the activity log names what a crash may have left on the primary and not in "
          + "\(journal); give its path with --activity-log")
    }
    let log = try MapFile.load(path)
    let regionSize = max(UInt32(4 << 20), geometry.blockSize)
    guard log.meaning == .selected, log.geometry.blockSize == regionSize,
      log.geometry.deviceSize == geometry.deviceSize
    else {
      throw ToolkitError(
        "\(path) is not the activity log of \(journal)'s device: it has \(log.meaning) blocks of "
          + "\(log.geometry.blockSize) bytes over \(log.geometry.deviceSize), not selected regions of \(regionSize) "
          + "over \(geometry.deviceSize)")
    }
    return log
  }
}
