// restore-read-through stopped hard: kill -9 of the server (and of the
// backup server) in rounds under a writer, SIGTERM under load, FLUSH and FUA
// across connections. An acknowledged FLUSH or FUA write survives kill -9;
// after a restart every current block is the same on both sides and an
// unclean shutdown is reported; a clean stop keeps every completed write.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreCrashCLITests: RestoreCLITestCase {
  func formatted(_ x: Double) -> String { String(format: "%.2f", x) }

  /// Rounds of: a writer with random writes and periodic flushes, kill -9 of
  /// the server after a seeded random 0.2-1.5 s (and of the backup server
  /// too, with `killBackup`), a restart with the same arguments, and checks.
  func crashRounds(_ r: RRTRig, rounds: Int, seed: UInt64, killBackup: Bool) throws {
    var rng = SplitMix64(seed: seed)
    var nextID: UInt32 = 1
    var uncleanSeen = 0
    for round in 0..<rounds {
      let writer = try r.nbdshChild(
        "SEED = \(seed &+ UInt64(round))\nWBASE = \(nextID)\n" + Self.crashWriter, name: "writer-\(round)")
      XCTAssertTrue(writer.waitForOutput("READY", timeout: 20), "writer \(round): \(writer.errors)")
      // The clock starts at the first acknowledged FLUSH, so every round
      // has something to check however slow the machine.
      XCTAssertTrue(writer.waitForOutput("\nF ", timeout: 30), "writer \(round) never flushed: \(writer.errors)")
      let delay = 0.2 + Double(rng.next() % 1300) / 1000
      RRTEnv.sleep(delay)
      XCTAssertTrue(r.server?.isRunning ?? false, "the server died on its own in round \(round):\n\(r.log)")
      let killedLog = r.log
      r.killServer()
      if killBackup {
        // Backup writes still delayed in nbdkit die with it.
        r.backupServer?.kill9()
        try r.startBackup()
      }
      XCTAssertNotNil(writer.wait(timeout: 30), "the writer did not notice the server died")
      let wl = WriterLog(writer.output)
      XCTAssertTrue(writer.output.contains("\nE "), "writer \(round) saw no error: \(writer.output.suffix(300))")
      XCTAssertGreaterThan(wl.writes.count, 0, "round \(round): no writes at all in \(delay) s")
      XCTAssertGreaterThan(wl.flushes, 0, "round \(round): no flush was acknowledged in \(delay) s")
      nextID = (wl.writes.last?.id ?? nextID) + 1

      // Restart with the same arguments.
      try r.startServer()
      let log = r.log
      if wl.completedAfterLastFlushStarted {
        XCTAssertTrue(
          log.contains("unclean shutdown"),
          "round \(round): writes completed after the last flush, yet the restart does not mention an unclean shutdown:\n\(log)"
        )
      }
      if log.contains("unclean shutdown") { uncleanSeen += 1 }
      XCTAssertFalse(killedLog.contains("failed"), "round \(round) before the kill:\n\(killedLog)")

      // Right after recovery, every block the map marks current is the same
      // on both sides.
      let current = try r.currentBlocks()
      let primary = try r.primaryData()
      var backup = try r.backupData()
      let differing = current.sorted().filter { primary[r.blockRange($0)] != backup[r.blockRange($0)] }
      XCTAssertEqual(
        differing, [], "round \(round): current blocks whose primary and backup differ after recovery\nlog:\n\(log)")

      // Every write acknowledged by a flush reads back, where no later write
      // covers it, through the export and from the backup.
      let parts = visibleParts(wl.writes).filter { Int64(wl.writes[$0.0].id) <= wl.acknowledgedThrough }
      var blocks = Set<Int>()
      for (_, s, e) in parts { for b in r.blocks(s, e - s) { blocks.insert(b) } }
      let through = try r.readThroughExport(
        blocks.sorted().map { (r.blockRange($0).lowerBound, r.blockRange($0).count) }, name: "round\(round).img")
      backup = try r.backupData()
      let failure = checkParts(
        parts, of: wl.writes,
        in: [("through the export", through), ("on the backup", backup), ("on the primary", primary)],
        original: r.original)
      XCTAssertNil(
        failure,
        "round \(round) (killed after \(formatted(delay)) s, \(wl.writes.count) writes, acknowledged through "
          + "\(wl.acknowledgedThrough)): \(failure ?? "")\nlog:\n\(r.allLogs)")
      print(
        "kill -9 round \(round)\(killBackup ? " (backup too)" : ""): \(formatted(delay)) s after the first flush, \(wl.writes.count) writes, "
          + "\(wl.flushes) flushes, acknowledged through \(wl.acknowledgedThrough), \(parts.count) visible parts checked, "
          + "unclean shutdown \(log.contains("unclean shutdown") ? "reported" : "not reported")")
    }
    XCTAssertGreaterThan(uncleanSeen, 0, "no restart found an unclean shutdown:\n\(r.allLogs)")

    // A clean stop, then: every current block agrees; a full read makes the
    // primary the backup.
    r.stopServer()
    let current = try r.currentBlocks()
    let primary = try r.primaryData()
    let backup = try r.backupData()
    let wrong = current.sorted().filter { primary[r.blockRange($0)] != backup[r.blockRange($0)] }
    XCTAssertEqual(wrong, [], "current blocks where the primary and the backup differ")
    try r.startServer()
    XCTAssertFalse(r.log.contains("unclean"), "a clean stop was taken as unclean:\n\(r.log)")
    RRTBytes.assertEqual(try r.copyExport(to: "final.img"), backup, "the export vs the backup at the end")
    r.stopServer()
    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup at the end: \(diff.summary)")
  }

  func testKillDashNineKeepsEveryFlushedWrite() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(seed: 9)
    try crashRounds(r, rounds: 4, seed: 0x9_2024, killBackup: false)
  }

  /// Backup writes take 20 ms, so at the kill many writes are on the primary
  /// and not on the backup; the backup server dies too, losing them: the
  /// activity log must bring the two sides together again.
  func testKillDashNineOfBothSidesWithASlowBackup() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(seed: 19, backup: .nbdkitFilters(["delay"], ["delay-write=20ms", "delay-zero=20ms"]))
    try crashRounds(r, rounds: 3, seed: 0x19_2024, killBackup: true)
  }

  /// SIGTERM under load: requests in flight are answered, everything is
  /// flushed; every write the client saw complete is on both sides.
  func testCleanStopUnderLoadKeepsEveryCompletedWrite() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(seed: 21)
    let writer = try r.nbdshChild("SEED = 2121\nWBASE = 1\n" + Self.crashWriter, name: "writer")
    XCTAssertTrue(writer.waitForOutput("READY", timeout: 20), writer.errors)
    RRTEnv.sleep(0.6)
    let server = try XCTUnwrap(r.server)
    server.signal(SIGTERM)
    let status = server.wait(timeout: 30)
    XCTAssertEqual(status, 0, "SIGTERM under load: \(r.log)")
    XCTAssertTrue(r.log.contains("stopped cleanly"), r.log)
    r.server = nil
    XCTAssertNotNil(writer.wait(timeout: 30), "the writer did not notice the stop")
    let wl = WriterLog(writer.output)
    XCTAssertGreaterThan(wl.completed.count, 0)
    let parts = visibleParts(wl.writes).filter { wl.completed.contains(wl.writes[$0.0].id) }
    let failure = checkParts(
      parts, of: wl.writes, in: [("on the backup", try r.backupData()), ("on the primary", try r.primaryData())])
    XCTAssertNil(failure, "\(wl.completed.count) completed writes: \(failure ?? "")\nlog:\n\(r.log)")
    try r.startServer()
    XCTAssertFalse(r.log.contains("unclean"), "a clean stop under load was taken as unclean:\n\(r.log)")
    r.stopServer()
    let current = try r.currentBlocks()
    let primary = try r.primaryData()
    let backup = try r.backupData()
    XCTAssertEqual(current.sorted().filter { primary[r.blockRange($0)] != backup[r.blockRange($0)] }, [])
  }

  /// can_multi_conn: a FLUSH on one connection covers writes completed on
  /// another; a FUA write is safe on its own. Both survive kill -9 of the
  /// server and of the backup server.
  func testCrossConnectionFlushAndFUAWritesSurviveKill() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(seed: 77)
    let B = r.blockSize
    let writes: [(Int, Data)] = [
      (70 * B, RRTBytes.random(B, seed: 771)),
      (71 * B + 100, RRTBytes.random(3000, seed: 772)),
      (72 * B, RRTBytes.random(B, seed: 773)),
      (73 * B + 5, RRTBytes.random(777, seed: 774)),
    ]
    for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("c\(i).bin"))) }
    let writer = try r.nbdshChild(
      """
      d = [open('c%d.bin' % i, 'rb').read() for i in range(4)]
      h.connect_uri(URI)
      h2 = nbd.NBD()
      h2.connect_uri(URI)
      h.pwrite(d[0], 70 * B)
      h.pwrite(d[1], 71 * B + 100)
      h2.flush()
      h.pwrite(d[2], 72 * B, nbd.CMD_FLAG_FUA)
      h2.pwrite(d[3], 73 * B + 5, nbd.CMD_FLAG_FUA)
      print('ACKED', flush=True)
      time.sleep(60)
      """, name: "multi-conn")
    XCTAssertTrue(writer.waitForOutput("ACKED", timeout: 30), "\(writer.output) \(writer.errors)\nlog:\n\(r.log)")
    r.killServer()
    r.backupServer?.kill9()
    writer.stop(grace: 2)
    try r.startBackup()
    try r.startServer()
    let expected = applying(writes, to: r.original)
    let blocks = [70, 71, 72, 73]
    let back = try r.readThroughExport(blocks.map { (r.blockRange($0).lowerBound, B) })
    let backup = try r.backupData()
    for b in blocks {
      RRTBytes.assertEqual(
        back[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) through the export after kill -9")
      RRTBytes.assertEqual(backup[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) on the backup after kill -9")
    }
    r.stopServer()
    let primary = try r.primaryData()
    for b in blocks {
      RRTBytes.assertEqual(primary[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) on the primary")
    }
  }
}
