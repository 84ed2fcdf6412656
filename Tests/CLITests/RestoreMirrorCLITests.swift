// restore-read-through --ack local against real peers: nbdkit as the far
// copy (the backup), often behind its delay filter, frozen with SIGSTOP or
// killed with -9; the stamped writer and its checker (Tests/Scripts/
// stamped.py) as the client and the judge. What is proved:
// - writes and flushes are acknowledged once the primary and the journal
//   hold them, not after the far link (timed against --ack all), also into
//   part of a block not yet current, which then reads back whole;
// - the far copy is always at a consistency point (every write of the
//   intervals below the highest one present, any of that one's, none
//   later), whenever it is frozen: while shipping, with the server killed;
// - every write a FLUSH acknowledged is served after kill -9 of the server,
//   round after round, the far copy killed too now and then;
// - once the journal drains the far copy equals the primary byte for byte,
//   also after the far copy was away and came back, and after --max-lag
//   made writes wait;
// - a damaged journal, or one without its positions file, is refused in one
//   sentence and nothing changes; a torn tail is cut and said so;
// - usage errors.
// DUALRESTORE_LONG=1 runs at least 200 kill -9 rounds instead of a few.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreMirrorCLITests: RestoreCLITestCase {
  static let long = ProcessInfo.processInfo.environment["DUALRESTORE_LONG"] == "1"
  /// The server's arguments for asynchronous mirroring, with progress lines
  /// often enough to wait on.
  let local = ["--ack", "local", "--progress-interval", "0.2"]

  func mirrored(
    size: Int = 16 << 20, seed: UInt64, filters: [String] = [], parameters: [String] = [], extra: [String] = []
  ) throws -> RRTRig {
    let r = try RRTRig(size: size, seed: seed)
    rigs.append(r)
    try r.startBackup(.nbdkit(filters: filters, parameters: parameters))
    try r.startServer(local + extra)
    XCTAssertTrue(r.log.contains("writes acknowledged local"), r.log)
    return r
  }

  /// The stamped writer against the export, among the rig's children.
  func startWriter(
    _ r: RRTRig, _ load: StampedLoad, log: String, start: Int, count: Int? = nil, queueDepth: Int = 4, name: String
  ) throws -> RRTChild {
    let w = try load.startWriter(
      uri: r.uri, log: log, output: r.s.path(name), queueDepth: queueDepth, count: count, start: start)
    r.others.append(w)
    return w
  }

  /// Waits until the writer's log says `count` flushes or more.
  func waitForFlushes(_ log: String, atLeast count: Int, writer: RRTChild, seconds: Double = 60) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while RRTEnv.monotonic() < end {
      if StampedLoad.Log(path: log).flushed.count >= count { return true }
      if !writer.isRunning { return StampedLoad.Log(path: log).flushed.count >= count }
      RRTEnv.sleep(0.02)
    }
    return false
  }

  /// The highest interval a check found, from its summary.
  func highestInterval(_ c: StampedLoad.Check) -> Int? {
    guard let r = c.summary.range(of: "interval ") else { return nil }
    return Int(c.summary[r.upperBound...].prefix { $0.isNumber })
  }

  // MARK: 1. Acknowledged locally

  /// Times QD1 4 KiB writes and a FLUSH through the server, first into
  /// current blocks, then into part of blocks not yet current: with the
  /// backup 200 ms away for reads and writes, --ack all (the control) takes
  /// a round trip a write (two for a partial block: its fetch first);
  /// --ack local takes a fraction of one link round trip for all of them.
  /// Such a partial block reads back right away as the client's bytes in
  /// the backup's, and the far copy gets the writes afterwards.
  func testWritesAreAcknowledgedWithoutWaitingForTheFarLink() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try RRTRig(size: 16 << 20, seed: 101)
    rigs.append(r)
    try r.s.file("orig.img", r.original)
    try r.startBackup(.nbdkit(filters: ["delay"], parameters: ["delay-write=200ms", "delay-read=200ms"]))

    func timed(current: Range<Int>, cold: Range<Int>) throws -> [String: Any] {
      let out = try r.nbdsh(
        """
        h.connect_uri(URI)
        orig = open('orig.img', 'rb').read()
        def data(b):
            return bytes(((b * 131 + k * 7) & 255) for k in range(4096))
        CUR = list(range(\(current.lowerBound), \(current.upperBound)))
        COLD = list(range(\(cold.lowerBound), \(cold.upperBound)))
        d = {b: data(b) for b in CUR + COLD}
        res = {}
        h.pread(len(CUR) * B, CUR[0] * B)
        t = time.monotonic()
        for b in CUR:
            h.pwrite(d[b], b * B + 4096)
        h.flush()
        res['current'] = time.monotonic() - t
        t = time.monotonic()
        for b in COLD:
            h.pwrite(d[b], b * B + 8192)
        h.flush()
        res['cold'] = time.monotonic() - t
        t = time.monotonic()
        for b in COLD:
            h.pwrite(d[b][:512], b * B + 30000)
        h.flush()
        res['again'] = time.monotonic() - t
        bad = []
        for b in COLD:
            want = orig[b * B:b * B + 8192] + d[b] + orig[b * B + 12288:b * B + 30000] + d[b][:512] + orig[b * B + 30512:(b + 1) * B]
            if h.pread(B, b * B) != want:
                bad.append(b)
        res['bad'] = bad
        cur = [b for b in CUR if h.pread(4096, b * B + 4096) != d[b]]
        res['bad_current'] = cur
        h.shutdown()
        print(json.dumps(res))
        """, timeout: 120)
      XCTAssertEqual(out.status, 0, "\(out.summary)\nlog:\n\(r.log)")
      return try json(out.lines.last ?? "{}")
    }

    // The control: synchronous mirroring waits for the link every write.
    try r.startServer(["--progress-interval", "0.2"])
    let sync = try timed(current: 20..<30, cold: 30..<40)
    r.stopServer()
    let syncCurrent = try XCTUnwrap(sync["current"] as? Double)
    let syncCold = try XCTUnwrap(sync["cold"] as? Double)
    XCTAssertGreaterThan(syncCurrent, 10 * 0.2 * 0.9, "--ack all: 10 writes to a 200 ms backup, \(sync)")
    XCTAssertGreaterThan(syncCold, 10 * 0.4 * 0.9, "--ack all: 10 fetches and writes, \(sync)")
    XCTAssertEqual(sync["bad"] as? [Int], [], "\(sync)")

    try r.startServer(local)
    let async = try timed(current: 40..<60, cold: 60..<80)
    // Marked once every write is flushed: a line saying the copy lacks
    // nothing between two phases of writes (the machine slow enough for
    // the copy to catch up) would otherwise pass for the drain.
    let mark = r.logMark
    let asyncCurrent = try XCTUnwrap(async["current"] as? Double)
    let asyncCold = try XCTUnwrap(async["cold"] as? Double)
    let asyncAgain = try XCTUnwrap(async["again"] as? Double)
    print(
      "20 writes and a flush, 200 ms backup: --ack local \(String(format: "%.3f", asyncCurrent)) s into current "
        + "blocks, \(String(format: "%.3f", asyncCold)) s into part of blocks not current, "
        + "\(String(format: "%.3f", asyncAgain)) s into another part of each; --ack all (10 writes) "
        + "\(String(format: "%.3f", syncCurrent)) s, \(String(format: "%.3f", syncCold)) s and "
        + "\(String(format: "%.3f", try XCTUnwrap(sync["again"] as? Double))) s")
    XCTAssertLessThan(asyncCurrent, 20 * 0.2 / 4, "--ack local waited for the link: \(async)\nlog:\n\(r.log)")
    XCTAssertLessThan(asyncCold, 20 * 0.2 / 4, "--ack local waited for fetches: \(async)\nlog:\n\(r.log)")
    // While the rest of each block is fetched in the background, another
    // write into it must not wait for that fetch either.
    XCTAssertLessThan(
      asyncAgain, 20 * 0.2 / 4, "--ack local: a write into a block being completed waited for its fetch: \(async)")
    XCTAssertEqual(async["bad"] as? [Int], [], "partial blocks read back wrong: \(async)\nlog:\n\(r.log)")
    XCTAssertEqual(async["bad_current"] as? [Int], [], "\(async)")

    // The far copy gets every write, in the end.
    XCTAssertTrue(r.waitForDrain(after: mark), r.log)
    r.stopServer()
    let backup = try r.backupData()
    var expected = r.original
    for b in 20..<80 {
      let data = Data((0..<4096).map { UInt8(truncatingIfNeeded: b * 131 + $0 * 7) })
      let current = b < 30 || (40..<60).contains(b)
      let at = b * r.blockSize + (current ? 4096 : 8192)
      expected.replaceSubrange(at..<at + 4096, with: data)
      if !current {
        expected.replaceSubrange(b * r.blockSize + 30000..<b * r.blockSize + 30512, with: data.prefix(512))
      }
    }
    RRTBytes.assertEqual(backup, expected, "the far copy after the drain")
  }

  // MARK: 2. Drain and equality

  /// A stamped load (2 KiB writes, so mostly parts of blocks, four in
  /// flight, a FLUSH every 16) through a backup 2 ms away: once the progress
  /// line says the far copy lacks nothing, it holds every write, the
  /// export reads as it, and after a clean stop the primary equals it byte
  /// for byte; the positions file is there, and a restart owes nothing.
  func testOnceTheJournalDrainsTheFarCopyEqualsThePrimary() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try mirrored(seed: 102, filters: ["delay"], parameters: ["delay-write=2ms"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 2202, writeSize: 2048, slots: 8192, flushEvery: 16)
    let w = try load.write(uri: r.uri, log: r.s.path("writer.log"), queueDepth: 4, count: 800)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    XCTAssertEqual(StampedLoad.Log(path: r.s.path("writer.log")).lastFlushed, 800)
    let mark = r.logMark
    XCTAssertTrue(r.waitForDrain(after: mark), "the journal never drained:\n\(r.log)")

    // The far copy holds every write, at a consistency point.
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(800), maxIndex: 800)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    XCTAssertGreaterThan(acked.stamped ?? 0, 700, acked.summary)
    try r.assertDrainedAndEqual("after 800 stamped writes")
    XCTAssertTrue(FileManager.default.fileExists(atPath: r.positionsPath), "no positions file beside the journal")
    XCTAssertTrue(FileManager.default.fileExists(atPath: r.journalPath))

    // A restart owes nothing and serves.
    try r.startServer()
    XCTAssertFalse(r.log.contains("a far copy lacks"), r.log)
    XCTAssertFalse(r.log.contains("unclean"), r.log)
    _ = try r.copyExport(to: "again.img")
    let again = try load.check(image: r.s.path("again.img"), baseline: baseline, mode: .acked(800), maxIndex: 800)
    XCTAssertEqual(again.status, 0, again.result.summary)
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), try r.backupData(), "after the restart")
  }

  // MARK: 3. Consistency while shipping

  /// A backup 20 ms away falls behind a stamped writer of 250 intervals;
  /// frozen at random moments while it writes and while the copy catches
  /// up, the copy's image is at a consistency point each time (and at some
  /// of them behind the writer's last flush, so the checks were not of a
  /// copy that merely kept up). Then, under a second writer continuing the
  /// history, frozen while the server is killed: still consistent; after a
  /// restart the copy drains and holds every write the writer saw flushed.
  func testTheFarCopyIsAlwaysAtAConsistencyPoint() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try mirrored(seed: 103, filters: ["delay"], parameters: ["delay-write=20ms"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 3303, writeSize: 2048, slots: 8192, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    let backup = try XCTUnwrap(r.backupServer)
    var rng = SplitMix64(seed: 0x3303)
    let writer = try startWriter(r, load, log: wlog, start: 0, count: 250 * 16, name: "writer")
    XCTAssertTrue(waitForFlushes(wlog, atLeast: 4, writer: writer), writer.errors)
    var behind = 0
    var highest: [Int] = []
    for moment in 0..<8 {
      RRTEnv.sleep(0.05 + Double(rng.next() % 400) / 1000)
      let flushed = StampedLoad.Log(path: wlog).lastFlushed
      backup.freeze()
      let c = try load.check(image: r.backupPath, baseline: baseline, mode: .consistent)
      backup.thaw()
      XCTAssertEqual(c.status, 0, "moment \(moment): the far copy is not at a consistency point: \(c.result.summary)")
      let k = highestInterval(c) ?? -1
      highest.append(k)
      if k < flushed / load.flushEvery - 1 { behind += 1 }
    }
    print("far copy's highest interval at eight freezes: \(highest); behind the writer's last flush at \(behind)")
    XCTAssertGreaterThan(behind, 0, "the far copy was never behind the writer: the checks proved little")
    XCTAssertGreaterThan(highest.last ?? -1, highest.first ?? 0, "the far copy did not move: \(highest)\n\(r.log)")
    XCTAssertEqual(writer.wait(timeout: 60), 0, writer.errors)

    // Frozen, and the server killed meanwhile.
    let second = try startWriter(r, load, log: wlog, start: 250 * 16, name: "second")
    XCTAssertTrue(waitForFlushes(wlog, atLeast: 250 + 4, writer: second), second.errors)
    RRTEnv.sleep(Double(rng.next() % 200) / 1000)
    backup.freeze()
    r.killServer()
    XCTAssertEqual(second.wait(timeout: 30), 3, second.errors)
    let l = StampedLoad.Log(path: wlog)
    let issued = try XCTUnwrap(l.stopped?.issued, "no stopped line")
    let frozen = try load.check(image: r.backupPath, baseline: baseline, mode: .consistent, maxIndex: issued)
    backup.thaw()
    XCTAssertEqual(frozen.status, 0, "with the server killed: \(frozen.result.summary)")
    try r.reviveBackupIfItAborted()

    try r.startServer()
    XCTAssertTrue(r.waitForDrain(after: r.logMark), r.log)
    let acked = try load.check(
      image: r.backupPath, baseline: baseline, mode: .acked(l.lastFlushed), maxIndex: issued)
    XCTAssertEqual(acked.status, 0, "after the restart, drained: \(acked.result.summary)\nlog:\n\(r.allLogs)")
    try r.assertDrainedAndEqual("after the kill")
  }

  // MARK: 4. The far copy gone and back

  /// kill -9 of the backup's nbdkit under a stamped writer: writes and
  /// flushes go on (acknowledged locally), the log says the copy cannot be
  /// reached; nbdkit started again on the same socket and image: the log
  /// says it is back, the journal drains, and the images are equal.
  func testAFarCopyThatGoesAwayCatchesUpWhenItComesBack() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try mirrored(
      seed: 104, filters: ["delay"], parameters: ["delay-write=5ms"], extra: ["--backup-timeout", "2"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 4404, writeSize: 2048, slots: 8192, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    let writer = try startWriter(r, load, log: wlog, start: 0, name: "writer")
    XCTAssertTrue(waitForFlushes(wlog, atLeast: 4, writer: writer), writer.errors)
    let mark = r.logMark
    r.backupServer?.kill9()
    let atKill = StampedLoad.Log(path: wlog).flushed.count
    XCTAssertTrue(
      waitForFlushes(wlog, atLeast: atKill + 20, writer: writer, seconds: 30),
      "writes and flushes stopped with the far copy gone: \(writer.errors)\nlog:\n\(r.log)")
    XCTAssertTrue(
      r.waitForLog("far copy \(r.backupURI): ", after: mark, seconds: 30), "no line about the copy:\n\(r.log)")
    XCTAssertTrue(r.log(after: mark).contains("kept in the journal; trying again"), r.log)
    XCTAssertNotNil(
      r.waitForLag(after: mark) { $0.lacks > 0 }, "no progress line says the copy lacks intervals:\n\(r.log)")

    try r.startBackup()
    XCTAssertTrue(
      r.waitForLog("far copy \(r.backupURI) is back", after: mark, seconds: 60), "never back:\n\(r.log)")
    XCTAssertTrue(writer.isRunning, writer.errors)
    writer.stop(grace: 5)
    let l = StampedLoad.Log(path: wlog)
    XCTAssertGreaterThanOrEqual(l.flushed.count, atKill + 20)
    let drainMark = r.logMark
    XCTAssertTrue(r.waitForDrain(after: drainMark), r.log)
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(l.lastFlushed))
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    try r.assertDrainedAndEqual("after the far copy came back")
  }

  /// The far copy gone and 40 blocks holding part of a client's write
  /// each, their rest not fetched: SIGTERM stops the server within about
  /// one --backup-timeout (8 s: long enough that every try of a fetch
  /// waits it out), not after a fetch of every block in turn (4 at a time:
  /// 80 s); the log says what the copy lacks stays in the journal;
  /// with the copy back, a start completes the blocks as the client's
  /// bytes in the backup's, and the copy drains to equal the primary.
  func testAStopWithTheFarCopyGoneIsPromptAndOwesWhatItLacks() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try mirrored(seed: 109, extra: ["--backup-timeout", "8"])
    try r.s.file("orig.img", r.original)
    r.backupServer?.kill9()
    let code = """
      h.connect_uri(URI)
      orig = open('orig.img', 'rb').read()
      def data(b):
          return bytes(((b * 37 + k) & 255) for k in range(4096))
      if MODE == 'write':
          for b in range(10, 50):
              h.pwrite(data(b), b * B + 4096)
          h.flush()
          print('[]')
      else:
          bad = [b for b in range(10, 50)
                 if h.pread(B, b * B) != orig[b * B:b * B + 4096] + data(b) + orig[b * B + 8192:(b + 1) * B]]
          print(json.dumps(bad))
      """
    let w = try r.nbdsh("MODE = 'write'\n" + code)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    let server = try XCTUnwrap(r.server)
    let t0 = RRTEnv.monotonic()
    server.signal(SIGTERM)
    let status = server.wait(timeout: 300)
    let took = RRTEnv.monotonic() - t0
    r.server = nil
    print("SIGTERM with the far copy gone and 40 blocks to complete: stopped in \(String(format: "%.1f", took)) s")
    XCTAssertNotNil(status, "no stop within 300 s:\n\(r.log)")
    XCTAssertLessThan(took, 20, "the stop waited for every partial block's fetch in turn:\n\(r.log)")
    XCTAssertTrue(r.log.contains("lacks 1 interval(s)"), r.log)
    XCTAssertTrue(r.log.contains("they stay in the mirror journal and are sent at the next start"), r.log)

    try r.startBackup()
    try r.startServer()
    XCTAssertTrue(r.log.contains("holds 1 interval(s)"), r.log)
    XCTAssertTrue(r.log.contains("40 block(s) hold part of a client's write"), r.log)
    let back = try r.nbdsh("MODE = 'read'\n" + code)
    XCTAssertEqual(back.status, 0, "\(back.summary)\nlog:\n\(r.log)")
    XCTAssertEqual(back.lines.last, "[]", "blocks that read back wrong after the restart")
    try r.assertDrainedAndEqual("after the stop with the far copy gone")
  }

  /// A start with --ack all (the default) after --ack local left
  /// intervals owed must not drop them: a whole-block write and a write
  /// into part of a block not current, flushed while the far copy was
  /// gone, are either served and sent to the copy, or the start is refused
  /// in one sentence naming the journal (and --ack local then sends them).
  func testAStartWithAckAllDoesNotDropWhatTheJournalOwes() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try mirrored(seed: 110, extra: ["--backup-timeout", "2"])
    let B = r.blockSize
    r.backupServer?.kill9()
    let w = try r.nbdsh(
      "h.connect_uri(URI)\nh.pwrite(b'A' * B, 50 * B)\nh.pwrite(b'P' * 4096, 60 * B + 4096)\nh.flush()\nprint('OK')")
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    r.server?.stop(grace: 60)
    r.server = nil
    XCTAssertTrue(r.log.contains("lacks 1 interval(s)"), r.log)
    try r.startBackup()
    var expected = r.original
    expected.replaceSubrange(50 * B..<51 * B, with: Data(repeating: 0x41, count: B))
    expected.replaceSubrange(60 * B + 4096..<60 * B + 8192, with: Data(repeating: 0x50, count: 4096))

    var all = r.serverArguments
    if let i = all.firstIndex(of: "--ack") { all.removeSubrange(i...i + 1) }
    let child = try RRTChild(
      name: "restore-read-through --ack all", executable: Tools.path("restore-read-through"), arguments: all,
      stdout: r.s.path("ack-all.out"), stderr: r.s.path("ack-all.log"))
    r.others.append(child)
    let end = RRTEnv.monotonic() + 20
    var serving = false
    while child.isRunning && RRTEnv.monotonic() < end {
      if let a = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri], timeout: 5), a.status == 0 {
        serving = true
        break
      }
      RRTEnv.sleep(0.05)
    }
    if serving {
      let back = try r.readThroughExport([(50 * B, B), (60 * B, B)])
      for b in [50, 60] {
        RRTBytes.assertEqual(
          back[r.blockRange(b)], expected[r.blockRange(b)],
          "block \(b) served by --ack all after --ack local left it owed; log:\n\(child.errors)")
      }
      XCTAssertEqual(child.stop(grace: 30), 0, child.errors)
      let backup = try r.backupData()
      for b in [50, 60] {
        RRTBytes.assertEqual(
          backup[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) on the far copy after --ack all")
      }
    } else {
      XCTAssertNotNil(child.wait(timeout: 5), "neither served nor refused within 20 s: \(child.errors)")
      XCTAssertNotEqual(child.process.terminationStatus, 0, child.errors)
      XCTAssertTrue(child.errors.contains(r.journalPath), "the refusal does not name the journal: \(child.errors)")
      XCTAssertEqual(child.errors.split(separator: "\n").count, 1, "one sentence: \(child.errors)")
      try r.startServer()
      try r.assertDrainedAndEqual("--ack local after --ack all was refused")
      let backup = try r.backupData()
      for b in [50, 60] {
        RRTBytes.assertEqual(backup[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) on the far copy")
      }
    }
  }

  // MARK: 5. kill -9 of the server

  struct Tally {
    var serverKills = 0
    var backupKills = 0
    var ackedChecks = 0
    var consistentChecks = 0
    var epochs = 0
    /// nbdkit's own aborts when its client was killed (see
    /// reviveBackupIfItAborted).
    var backupAborts = 0
  }

  /// Rounds of: the stamped writer (continuing the history from the last
  /// flushed count), a random moment, now and then the far copy frozen and
  /// checked (consistent) or killed -9 and started again, kill -9 of the
  /// server, sometimes the far copy frozen and checked with the server
  /// dead, a restart with the same arguments, and the export checked
  /// (acked: every write the writer saw flushed). Reading the whole export
  /// makes every block current, so every few kills an epoch ends: drained,
  /// equal, then a fresh primary, map and journal over the far copy as it
  /// is (its new baseline), so that partial blocks are in play again.
  func killRounds(seed: UInt64, serverKills: Int, backupKillEvery: Int, killsPerEpoch: ClosedRange<Int>) throws
    -> Tally
  {
    let r = try mirrored(
      size: 8 << 20, seed: seed, filters: ["delay"], parameters: ["delay-write=5ms", "delay-read=100ms"],
      extra: ["--backup-timeout", "5"])
    var rng = SplitMix64(seed: seed)
    var t = Tally()
    func chance(_ n: UInt64) -> Bool { rng.next() % n == 0 }
    while t.serverKills < serverKills {
      let baseline = try r.s.file("baseline.img", try r.backupData())
      let load = StampedLoad(seed: seed &+ UInt64(t.epochs), writeSize: 2048, slots: 4096, flushEvery: 16)
      let wlog = r.s.path("writer-\(t.epochs).log")
      let kills = killsPerEpoch.lowerBound + Int(rng.next() % UInt64(killsPerEpoch.count))
      var issued = 0
      for _ in 0..<kills where t.serverKills < serverKills {
        let round = t.serverKills
        let before = StampedLoad.Log(path: wlog)
        let writer = try startWriter(r, load, log: wlog, start: before.lastFlushed, name: "writer-\(round)")
        XCTAssertTrue(
          waitForFlushes(wlog, atLeast: before.flushed.count + 2, writer: writer),
          "round \(round): no flush: \(writer.errors)\nlog:\n\(r.log)")
        RRTEnv.sleep(0.05 + Double(rng.next() % 550) / 1000)
        if chance(2), let b = r.backupServer {
          b.freeze()
          let c = try load.check(image: r.backupPath, baseline: baseline, mode: .consistent)
          b.thaw()
          t.consistentChecks += 1
          XCTAssertEqual(c.status, 0, "round \(round), far copy frozen under load: \(c.result.summary)")
        }
        if backupKillEvery > 0 && round % backupKillEvery == backupKillEvery - 1 {
          r.backupServer?.kill9()
          RRTEnv.sleep(Double(rng.next() % 300) / 1000)
          try r.startBackup()
          t.backupKills += 1
          RRTEnv.sleep(Double(rng.next() % 300) / 1000)
        }
        XCTAssertTrue(r.server?.isRunning ?? false, "round \(round): the server died on its own:\n\(r.log)")
        r.killServer()
        t.serverKills += 1
        if try r.reviveBackupIfItAborted() { t.backupAborts += 1 }
        XCTAssertEqual(writer.wait(timeout: 30), 3, "round \(round): \(writer.errors)")
        let l = StampedLoad.Log(path: wlog)
        issued = max(issued, l.stopped?.issued ?? 0)
        XCTAssertGreaterThanOrEqual(l.flushed.count, before.flushed.count + 2)
        if chance(3), let b = r.backupServer {
          b.freeze()
          let c = try load.check(image: r.backupPath, baseline: baseline, mode: .consistent, maxIndex: issued)
          b.thaw()
          t.consistentChecks += 1
          XCTAssertEqual(c.status, 0, "round \(round), far copy frozen, server dead: \(c.result.summary)")
        }
        try r.startServer()
        let view = try r.copyExport(to: "view.img")
        XCTAssertEqual(view.count, r.size)
        let acked = try load.check(
          image: r.s.path("view.img"), baseline: baseline, mode: .acked(l.lastFlushed), maxIndex: issued)
        t.ackedChecks += 1
        XCTAssertEqual(
          acked.status, 0,
          "round \(round): after kill -9 and a restart, a flushed write is missing: \(acked.result.summary)\n"
            + "log:\n\(r.allLogs.suffix(4000))")
        if acked.status != 0 || r.server?.isRunning != true { return t }
      }
      // The epoch's end: the far copy drains, holds every flushed write,
      // and equals the primary.
      let last = StampedLoad.Log(path: wlog).lastFlushed
      XCTAssertTrue(r.waitForDrain(after: r.logMark), r.log)
      let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(last), maxIndex: issued)
      t.ackedChecks += 1
      XCTAssertEqual(acked.status, 0, "epoch \(t.epochs), drained far copy: \(acked.result.summary)")
      try r.assertDrainedAndEqual("epoch \(t.epochs)")
      t.epochs += 1
      for p in [r.primaryPath, r.mapPath, r.mapPath + ".al", r.journalPath, r.positionsPath] { unlink(p) }
      try r.makeSparse(r.primaryPath, size: r.size)
      if t.serverKills < serverKills { try r.startServer() }
    }
    return t
  }

  /// A few rounds here (DUALRESTORE_LONG=1: at least 200 kills of the
  /// server, every fifth round the far copy's server killed as well).
  func testKillDashNineKeepsEveryFlushedWriteAndTheFarCopyConsistent() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let start = RRTEnv.monotonic()
    let t =
      Self.long
      ? try killRounds(seed: 0x5505, serverKills: 200, backupKillEvery: 5, killsPerEpoch: 2...5)
      : try killRounds(seed: 0x5505, serverKills: 4, backupKillEvery: 3, killsPerEpoch: 2...2)
    print(
      "kill -9: \(t.serverKills) of the server, \(t.backupKills) of the far copy's (and \(t.backupAborts) aborts of "
        + "nbdkit itself), over \(t.epochs) epochs; "
        + "\(t.ackedChecks) acked checks, \(t.consistentChecks) consistent checks of the frozen far copy, in "
        + "\(Int(RRTEnv.monotonic() - start)) s")
    XCTAssertEqual(t.serverKills, Self.long ? 200 : 4)
    XCTAssertGreaterThan(t.consistentChecks, 0)
  }

  // MARK: 6. Damage refused

  /// Intervals owed in the journal (the backup frozen at the stop). One
  /// flipped payload byte of a record that a good interval end follows:
  /// the start is refused in one sentence naming the journal and the
  /// record's offset, and the primary, the backup and the journal are as
  /// they were. The positions file missing beside that journal: refused
  /// too. A torn record appended at the tail: cut, said so, and everything
  /// owed is still sent.
  func testADamagedJournalIsRefusedAndATornTailIsCut() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try mirrored(seed: 106, extra: ["--backup-timeout", "2"])
    let baseline = try r.s.file("baseline.img", r.original)
    // Whole-block writes: no block waits for the frozen backup.
    let load = StampedLoad(seed: 6606, writeSize: 65536, slots: 128, flushEvery: 4)
    let wlog = r.s.path("writer.log")
    XCTAssertEqual(try load.write(uri: r.uri, log: wlog, queueDepth: 2, count: 8).status, 0)
    XCTAssertTrue(r.waitForDrain(after: r.logMark), r.log)
    let backup = try XCTUnwrap(r.backupServer)
    backup.freeze()
    let w = try load.write(uri: r.uri, log: wlog, queueDepth: 2, count: 16, start: 8)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    let server = try XCTUnwrap(r.server)
    server.signal(SIGTERM)
    XCTAssertEqual(server.wait(timeout: 60), 0, r.log)
    r.server = nil
    backup.thaw()
    XCTAssertTrue(r.log.contains("they stay in the mirror journal and are sent at the next start"), r.log)
    // What nbdkit had queued when frozen lands now.
    RRTEnv.sleep(1)
    try r.reviveBackupIfItAborted()

    let primaryBefore = try r.primaryData()
    let backupBefore = try r.backupData()
    let good = try Data(contentsOf: URL(fileURLWithPath: r.journalPath))
    let positions = try Data(contentsOf: URL(fileURLWithPath: r.positionsPath))
    let records = JournalRecord.all(good)
    XCTAssertEqual(records.last.map { $0.offset + $0.size }, good.count, "the journal does not end on a record")
    let ends = records.filter { $0.type == JournalRecord.intervalEnd }
    let victim = try XCTUnwrap(
      records.first { rec in
        rec.type == JournalRecord.write && rec.offset > 4096 + 8 * (65536 + 48)
          && ends.contains { $0.offset > rec.offset }
      }, "no write record with an interval end after it among \(records.count)")

    func start() throws -> RRTCommand.Result {
      try RRTCommand.run("restore-read-through", r.serverArguments, timeout: 30)
    }
    func assertUnchanged(_ what: String, journal: Data, file: StaticString = #filePath, line: UInt = #line) throws {
      RRTBytes.assertEqual(try r.primaryData(), primaryBefore, "\(what): the primary", file: file, line: line)
      RRTBytes.assertEqual(try r.backupData(), backupBefore, "\(what): the backup", file: file, line: line)
      RRTBytes.assertEqual(
        try Data(contentsOf: URL(fileURLWithPath: r.journalPath)), journal, "\(what): the journal", file: file,
        line: line)
    }

    // One byte flipped in the payload.
    var damaged = good
    let at = victim.offset + 44 + 1000
    damaged[at] ^= 0x40
    try damaged.write(to: URL(fileURLWithPath: r.journalPath))
    let refused = try start()
    XCTAssertFalse(refused.timedOut, "a damaged journal was served: \(refused.summary)")
    XCTAssertNotEqual(refused.status, 0, refused.summary)
    XCTAssertNotEqual(refused.status, 64, "not a usage error: \(refused.summary)")
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, "one sentence: \(refused.stderr)")
    XCTAssertTrue(refused.stderr.contains(r.journalPath), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("offset \(victim.offset)"), "offset \(victim.offset): \(refused.stderr)")
    try assertUnchanged("after the damaged journal was refused", journal: damaged)

    // The positions file missing beside the journal.
    try good.write(to: URL(fileURLWithPath: r.journalPath))
    unlink(r.positionsPath)
    let orphan = try start()
    XCTAssertFalse(orphan.timedOut, "a journal without positions was served: \(orphan.summary)")
    XCTAssertNotEqual(orphan.status, 0, orphan.summary)
    XCTAssertTrue(orphan.stderr.contains(r.positionsPath), orphan.stderr)
    XCTAssertEqual(orphan.stderr.split(separator: "\n").count, 1, "one sentence: \(orphan.stderr)")
    try assertUnchanged("after the journal without positions was refused", journal: good)
    try positions.write(to: URL(fileURLWithPath: r.positionsPath))

    // A torn append at the tail: the first 1000 bytes of a write record.
    var torn = good
    torn.append(good[victim.offset..<victim.offset + 1000])
    try torn.write(to: URL(fileURLWithPath: r.journalPath))
    try r.startServer()
    XCTAssertTrue(
      r.log.contains(
        "the mirror journal \(r.journalPath) ended inside an interval: cut 1000 byte(s) at offset \(good.count)"),
      r.log)
    let mark = r.logMark
    XCTAssertTrue(r.waitForDrain(after: mark), r.log)
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(24), maxIndex: 24)
    XCTAssertEqual(acked.status, 0, "the owed intervals after the cut: \(acked.result.summary)\nlog:\n\(r.log)")
    try r.assertDrainedAndEqual("after the torn tail")
  }

  // MARK: 7. --max-lag

  /// --max-lag 1M with the far copy frozen: a writer of 64 KiB writes gets
  /// about 1 MiB acknowledged, then its writes wait and the log says so;
  /// thawed, the writer finishes and the journal drains.
  func testMaxLagMakesWritesWaitForTheFarCopy() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try mirrored(seed: 107, extra: ["--max-lag", "1M"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 7707, writeSize: 65536, slots: 200, flushEvery: 2)
    let wlog = r.s.path("writer.log")
    let backup = try XCTUnwrap(r.backupServer)
    backup.freeze()
    let writer = try startWriter(r, load, log: wlog, start: 0, count: 64, queueDepth: 1, name: "writer")
    // Until the flushed count holds still for 2 s.
    var last = -1
    var since = RRTEnv.monotonic()
    let end = RRTEnv.monotonic() + 30
    while RRTEnv.monotonic() < end && RRTEnv.monotonic() - since < 2 {
      let n = StampedLoad.Log(path: wlog).lastFlushed
      if n != last {
        last = n
        since = RRTEnv.monotonic()
      }
      RRTEnv.sleep(0.05)
    }
    XCTAssertTrue(writer.isRunning, "the writer ended with the far copy frozen: \(writer.errors)")
    let held = StampedLoad.Log(path: wlog).lastFlushed
    print("--max-lag 1M, far copy frozen: \(held) writes of 64 KiB acknowledged, then writes wait")
    XCTAssertGreaterThanOrEqual(held, 8, "fewer than 512 KiB acknowledged before writes waited")
    XCTAssertLessThanOrEqual(held, 24, "more than 1.5 MiB acknowledged with --max-lag 1M")
    XCTAssertTrue(r.log.contains("writes wait"), r.log)
    backup.thaw()
    XCTAssertEqual(writer.wait(timeout: 60), 0, "the writer after the thaw: \(writer.errors)\nlog:\n\(r.log)")
    XCTAssertEqual(StampedLoad.Log(path: wlog).lastFlushed, 64)
    XCTAssertTrue(r.waitForDrain(after: r.logMark), r.log)
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(64), maxIndex: 64)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    try r.assertDrainedAndEqual("after --max-lag held writes")
  }

  // MARK: 8. Usage

  /// --journal and --max-lag need --ack local; --ack quorum=2 needs two far
  /// copies: each refused with a sentence, exit 64, nothing created. And
  /// --journal PATH puts the journal and PATH.positions there.
  func testMirrorUsage() throws {
    let s = try Scratch()
    let primary = s.path("p.img")
    _ = FileManager.default.createFile(atPath: primary, contents: Data(count: 65536))
    let base = ["--backup", "nbd+unix:///?socket=/nonexistent", "--map", s.path("m.map"), "--socket", s.path("a.sock")]
    let cases: [([String], String)] = [
      (["--journal", s.path("j")], "--journal needs --ack local"),
      (["--max-lag", "1M"], "--max-lag needs --ack local"),
      (["--ack", "all", "--max-lag", "10s"], "--max-lag needs --ack local"),
      (["--ack", "quorum=2"], "--ack quorum=2 needs 2 far copies"),
    ]
    for (extra, fragment) in cases {
      let r = try RRTCommand.run("restore-read-through", base + extra + [primary], timeout: 20)
      assertFails(r, status: 64, mentioning: fragment)
      XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("m.map")), "\(extra) created the map")
      XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("j")), "\(extra) created the journal")
    }

    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try RRTRig(size: 4 << 20, seed: 108)
    rigs.append(r)
    try r.startBackup()
    let journal = r.s.path("elsewhere.journal")
    try r.startServer(local + ["--journal", journal])
    let out = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(b'J' * 4096, 5 * B + 512)\nh.flush()\nprint('OK')")
    XCTAssertEqual(out.status, 0, out.summary)
    XCTAssertTrue(r.waitForDrain(after: r.logMark), r.log)
    r.stopServer()
    XCTAssertTrue(r.allLogs.contains("created the mirror journal \(journal)"), r.allLogs)
    XCTAssertTrue(FileManager.default.fileExists(atPath: journal))
    XCTAssertTrue(FileManager.default.fileExists(atPath: journal + ".positions"))
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.journalPath), "MAP.mirror made despite --journal")
    XCTAssertEqual(try RRTBytes.read(r.backupPath, 5 * r.blockSize + 512, 4096), Data(repeating: 0x4A, count: 4096))
  }
}
