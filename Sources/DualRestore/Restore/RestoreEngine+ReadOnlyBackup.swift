// A backup that takes no writes (--read-only-backup CHANGES): a chain of
// stored snapshots served read-only, or any export the restore must leave
// as it is. Blocks not current are still read from it; client writes stay
// on the primary and their blocks are recorded in a change map
// (DurableChangeMap, the same as tracking-server keeps), from which
// `snapshot --map CHANGES --base ID` of the primary makes the incremental
// stream that brings the backup's chain up to date.
//
// Invariants:
// - Nothing is written to the backup, nor flushed: no client write, no
//   recovery, no owed block.
// - Marked before written: a write's blocks are set in the change map on
//   disk before the write is issued, so no write is made (let alone
//   acknowledged) before the fact that its blocks changed is durable; the
//   change map covers every block in which the primary may differ from the
//   backup, after a crash too.
// - A partial write into a block not current first brings the block from
//   the backup, as with a writable backup; the block is then current.
// - Acknowledged means safe with the backup out of the picture: a FLUSH
//   commits the overwrite map, and so does a FUA write whose blocks it does
//   not yet mark current, because after a crash a block the map does not
//   mark current is read from the backup, which never got the write.
// - What an earlier run with a writable backup left to send it (the
//   regions of the activity log) is recorded in the change map instead: the
//   current blocks there may differ from the backup. A mirror journal that
//   still holds changes the backup lacks is refused (the primary may hold
//   only part of a block it names).

extension RestoreEngine {
  /// Refuses a backup that does not take writes unless the restore keeps a
  /// change map for it, and what a read-only backup cannot go with.
  static func checkBackupMode(
    _ copies: [BlockDevice], changesPath: String?, mapPath: String, mirroring: MirrorSettings?
  ) throws {
    guard let changesPath else {
      for (i, c) in copies.enumerated() where !c.capabilities.contains(.writable) {
        if i == 0 {
          throw ToolkitError(
            "the backup \(c.name) is exported read-only: with --read-only-backup CHANGES the writes stay on the "
              + "primary and the blocks they touch are recorded in the change map CHANGES")
        }
        throw ToolkitError("the far copy \(c.name) is exported read-only, so it cannot take the writes it mirrors")
      }
      return
    }
    if mirroring != nil {
      throw ToolkitError("a read-only backup takes no writes, so there is nothing to mirror asynchronously")
    }
    if copies.count > 1 {
      throw ToolkitError("a read-only backup is the only backup: \(copies.count) far copies are given")
    }
    if samePath(changesPath, mapPath) {
      throw ToolkitError("\(changesPath) is the overwrite map; the change map of a read-only backup needs its own file")
    }
  }

  /// The blocks set in the change map of a read-only backup (in memory),
  /// and its path; nil when writes go to the backup.
  public var readOnlyBackupChanges: (path: String, blocks: UInt64)? {
    changed.map { ($0.path, $0.summary.blocks) }
  }

  /// A write-like change with a read-only backup: partial blocks brought
  /// first, the blocks marked in the change map on disk, the change made
  /// on the primary alone, the blocks marked current.
  func modifyPrimaryOnly(
    _ changed: DurableChangeMap, offset: UInt64, length: UInt64, fua: Bool, local: () throws -> Void
  ) throws {
    try withChangeLocked(offset: offset, length: length) { blocks in
      do {
        try changed.mark(blocks)
        try local()
      } catch {
        throw RestoreError.writeFailed(cause: error)
      }
      writeback.written(offset, length)
      markCurrent(blocks)
      guard fua else { return }
      if map.withLock({ $0.bits.allSet(blocks) }) { try primary.sync() } else { try flush() }
    }
  }

  /// At the start, when an earlier run left regions in the activity log
  /// (an unclean stop, or blocks owed to a backup that was unreachable):
  /// their current blocks are recorded in the change map, since the
  /// backup, which takes nothing now, may lack them.
  func recoverIntoChangeMap(_ changed: DurableChangeMap) throws {
    var marked: UInt64 = 0
    for region in activity.recovered {
      try forEachCurrentRun(in: activity.blocks(ofRegion: region)) { run in
        try changed.mark(run)
        marked += UInt64(run.count)
      }
    }
    // The map file says so from the start, not at the first checkpoint.
    try changed.checkpoint()
    try activity.clear()
    log(
      "the last run left \(activity.recovered.count) region(s) in the activity log whose current blocks the "
        + "backup may lack; it takes no writes, so their \(marked) current block(s) are recorded in \(changed.path)")
  }
}
