// A mirror journal left by an asynchronous run (--ack local) when the next
// run mirrors synchronously (--ack all): what the backup still lacks from it
// is sent first, in order, before any write goes to the backup directly and
// before the activity log's regions are copied, so no interval is skipped
// and nothing older lands over something newer. Then the journal goes.
// A read-only backup cannot take what it lacks: such a journal is refused.

import Glibc

extension RestoreEngine {
  /// Sends what the backup lacks of the journal at `path`, then removes
  /// the journal and its positions file. Refuses to go on when the backup
  /// cannot take it now.
  func drainLeftoverJournal(_ path: String, mapID: ID128) throws {
    let journal = try MirrorJournal(
      path: path, mapID: mapID, geometry: geometry, copyNames: farCopies.map(\.name),
      bound: MirrorLagBound(bytes: 0, seconds: 0), log: log
    ) { _, _, _ in }
    let lags = journal.lag
    let owed =
      lags.max { $0.intervals < $1.intervals }
      ?? MirrorLag(name: "", intervals: 0, bytes: 0, oldestSeconds: 0, interval: 0)
    if owed.intervals > 0, changed != nil {
      throw ToolkitError(
        "\(path) holds \(owed.intervals) interval(s) a far copy lacks from an asynchronous run, which a read-only "
          + "backup cannot take; start without --read-only-backup, with the backup writable, until they are sent")
    }
    if owed.intervals > 0 {
      log(
        "\(path) holds \(owed.intervals) interval(s) (\(formatBytes(owed.bytes))) a far copy lacks from an "
          + "asynchronous run: sending them before serving")
      // Each copy from its own position: none is sent an interval it holds.
      let shippers = farCopies.enumerated().map {
        FarCopyShipper(journal: journal, index: $0.offset, copy: $0.element, senders: 16, log: log)
      }
      for s in shippers { s.start() }
      defer {
        journal.stop()
        for s in shippers { s.stop() }
      }
      while !journal.drained {
        if shippers.contains(where: \.failing) {
          throw ToolkitError(
            "\(path) holds intervals a far copy lacks, and it cannot take them now; start again when it "
              + "can (or with --ack local, which keeps them in the journal)")
        }
        usleep(20_000)
      }
    }
    unlink(path)
    unlink(journal.positionsPath)
    syncDirectory(of: path)
    if owed.intervals > 0 { log("every far copy holds every interval of \(path); it is removed") }
  }
}
