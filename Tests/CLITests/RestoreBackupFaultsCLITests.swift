// Backup trouble under restore-read-through: a backup that fails reads, that
// is killed and restarted, that is down at a stop, that fails writes on and
// off (also behind a slow primary), and that stops gracefully. Backup
// trouble never turns into zeros or into blocks marked current; owed writes
// reach the backup once it answers again; a stop never claims the backup is
// up to date when it is not.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreBackupFaultsCLITests: RestoreCLITestCase {
  func testBackupErrorsFailColdReadsAndNeverReturnZeros() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let trigger = "error.trigger"
    let r = try RRTRig(size: 16 << 20, seed: 11)
    rigs.append(r)
    try r.startBackup(
      .nbdkit(filters: ["error"], parameters: ["error-rate=100%", "error-file=\(r.s.path(trigger))"]))
    try r.startServer()
    let out = try r.nbdsh(
      """
      res = {}
      orig = open('backup.img', 'rb').read()
      h.connect_uri(URI)
      res['warm'] = h.pread(B, 3 * B) == orig[3 * B:4 * B]
      open(\(rrtPython(r.s.path(trigger))), 'w').close()
      try:
          d = h.pread(B, 10 * B)
          res['cold'] = 'zeros' if d == bytes(B) else ('right' if d == orig[10 * B:11 * B] else 'wrong')
      except nbd.Error as e:
          res['cold'] = e.errno
      try:
          d = h.pread(100, 12 * B + 7)
          res['cold_partial'] = 'zeros' if d == bytes(100) else 'data'
      except nbd.Error as e:
          res['cold_partial'] = e.errno
      res['warm_again'] = h.pread(B, 3 * B) == orig[3 * B:4 * B]
      # A write to the current block while the backup fails: the outcome may
      # be an error or an acknowledgement; the sides must agree in the end.
      try:
          h.pwrite(b'W' * 1000, 3 * B + 500)
          res['write'] = 'ok'
      except nbd.Error as e:
          res['write'] = e.errno
      os.unlink(\(rrtPython(r.s.path(trigger))))
      d = h.pread(B, 10 * B)
      res['cold_after'] = d == orig[10 * B:11 * B]
      res['partial_after'] = h.pread(100, 12 * B + 7) == orig[12 * B + 7:12 * B + 107]
      try:
          h.flush()
          res['flush_after'] = 'ok'
      except nbd.Error as e:
          res['flush_after'] = e.errno
      print(json.dumps(res))
      """)
    XCTAssertEqual(out.status, 0, "\(out.summary)\nlog:\n\(r.log)")
    let o = try json(out.lines.last ?? "{}")
    XCTAssertEqual(o["warm"] as? Bool, true, "\(o)")
    XCTAssertEqual(o["cold"] as? String, "EIO", "a cold read with a failing backup: \(o)\nlog:\n\(r.log)")
    XCTAssertEqual(o["cold_partial"] as? String, "EIO", "\(o)")
    XCTAssertEqual(o["warm_again"] as? Bool, true, "a current block must still read: \(o)")
    XCTAssertEqual(o["cold_after"] as? Bool, true, "the same read once the backup is back: \(o)")
    XCTAssertEqual(o["partial_after"] as? Bool, true, "\(o)")
    XCTAssertEqual(o["flush_after"] as? String, "ok", "\(o)\nlog:\n\(r.log)")
    r.stopServer()
    let primary = try r.primaryData()
    let backup = try r.backupData()
    let b3 = r.blockRange(3)
    RRTBytes.assertEqual(primary[b3], backup[b3], "block 3 after the backup came back: the sides disagree")
    if o["write"] as? String == "ok" {
      XCTAssertEqual(
        backup[(3 * r.blockSize + 500)..<(3 * r.blockSize + 1500)], Data(repeating: UInt8(ascii: "W"), count: 1000))
    }
    XCTAssertEqual(try r.currentBlocks(), [3, 10, 12], "failed fetches must not mark blocks current")
    for b in [10, 12] {
      RRTBytes.assertEqual(primary[r.blockRange(b)], r.original[r.blockRange(b)], "block \(b) on the primary")
    }
  }

  func testColdReadsWorkAfterTheBackupServerIsKilledAndRestarted() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(seed: 12, serverArguments: ["--backup-timeout", "2"])
    let B = r.blockSize
    _ = try r.readThroughExport([(3 * B, B)])
    r.backupServer?.kill9()
    // While it is down: current blocks read; a cold read fails in bounded time.
    let down = try r.nbdsh(
      """
      res = {}
      orig = open('backup.img', 'rb').read()
      h.connect_uri(URI)
      res['warm'] = h.pread(B, 3 * B) == orig[3 * B:4 * B]
      t = time.time()
      try:
          d = h.pread(B, 20 * B)
          res['cold'] = 'zeros' if d == bytes(B) else 'data'
      except nbd.Error as e:
          res['cold'] = e.errno
      res['seconds'] = time.time() - t
      print(json.dumps(res))
      """, timeout: 60)
    XCTAssertEqual(down.status, 0, down.summary)
    let d = try json(down.lines.last ?? "{}")
    XCTAssertEqual(d["warm"] as? Bool, true, "\(d)")
    XCTAssertEqual(d["cold"] as? String, "EIO", "cold read with the backup down: \(d)\nlog:\n\(r.log)")
    XCTAssertLessThan(d["seconds"] as? Double ?? 99, 15, "the failing read took too long: \(d)")

    try r.startBackup()
    let up = try r.nbdsh(
      """
      res = {}
      orig = open('backup.img', 'rb').read()
      h.connect_uri(URI)
      res['cold'] = h.pread(B, 20 * B) == orig[20 * B:21 * B]
      res['cold2'] = h.pread(3 * B, 30 * B) == orig[30 * B:33 * B]
      h.pwrite(b'N' * 5000, 40 * B + 100)
      h.flush()
      print(json.dumps(res))
      """, timeout: 60)
    XCTAssertEqual(up.status, 0, "after the backup came back: \(up.summary)\nlog:\n\(r.log)")
    let u = try json(up.lines.last ?? "{}")
    XCTAssertEqual(u["cold"] as? Bool, true, "\(u)")
    XCTAssertEqual(u["cold2"] as? Bool, true, "\(u)")
    r.stopServer()
    let backup = try r.backupData()
    XCTAssertEqual(backup[(40 * B + 100)..<(40 * B + 5100)], Data(repeating: UInt8(ascii: "N"), count: 5000))
    let primary = try r.primaryData()
    for b in [3, 20, 30, 31, 32, 40] {
      RRTBytes.assertEqual(primary[r.blockRange(b)], backup[r.blockRange(b)], "block \(b)")
    }
  }

  /// The backup dies; a write to a current block is kept on the primary (or
  /// refused); a stop must not claim the backup is up to date, and the next
  /// start with the backup back makes the two sides agree.
  func testAStopWithTheBackupDownDoesNotClaimItIsUpToDate() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(seed: 14, serverArguments: ["--backup-timeout", "2"])
    let B = r.blockSize
    _ = try r.readThroughExport([(0, B)])
    r.backupServer?.kill9()
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      res = {}
      try:
          h.pwrite(b'Q' * 1000, 100)
          res['write'] = 'ok'
      except nbd.Error as e:
          res['write'] = e.errno
      try:
          h.flush()
          res['flush'] = 'ok'
      except nbd.Error as e:
          res['flush'] = e.errno
      print(json.dumps(res))
      """)
    XCTAssertEqual(w.status, 0, w.summary)
    let o = try json(w.lines.last ?? "{}")
    let server = try XCTUnwrap(r.server)
    server.signal(SIGTERM)
    let status = server.wait(timeout: 60)
    r.server = nil
    XCTAssertNotNil(status, "no exit within 60 s of SIGTERM with the backup down:\n\(r.log)")
    XCTAssertFalse(
      r.log.contains("the map and the backup are up to date"),
      "with the backup unreachable (write: \(o["write"] ?? "?"), flush: \(o["flush"] ?? "?")), the stop claims the backup is "
        + "up to date (exit status \(status ?? -1)):\n\(r.log)")
    r.assertNoCrash()

    try r.startBackup()
    try r.startServer()
    r.stopServer()
    let primary = try r.primaryData()
    let backup = try r.backupData()
    RRTBytes.assertEqual(primary[r.blockRange(0)], backup[r.blockRange(0)], "block 0 once the backup is back")
    if o["write"] as? String == "ok" {
      XCTAssertEqual(
        backup[100..<1100], Data(repeating: UInt8(ascii: "Q"), count: 1000),
        "an acknowledged write never reached the backup")
    }
  }

  /// The backup fails writes on and off (nbdkit's error filter, while a
  /// trigger file exists) under a steady stream of writes to current blocks:
  /// each time it answers again the owed blocks are sent, and no write made
  /// meanwhile may be left behind. After a clean stop the two sides agree.
  func testWritesMadeWhileTheBackupFailsOnAndOffAllReachIt() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try RRTRig(size: 16 << 20, seed: 15)
    rigs.append(r)
    try backupOnAndOff(r, seed: 1515)
  }

  /// The same with a slow primary (nbdkit's delay filter behind nbdfuse): a
  /// write that started while the backup was away is still being written
  /// locally when the owed blocks have all been sent and writes go to the
  /// backup again; it must not be forgotten by either path.
  func testWritesMadeWhileTheBackupFailsOnAndOffWithASlowPrimary() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy", "nbdfuse")
    guard FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("no /dev/fuse") }
    // A race: a few attempts, up to the first that shows it.
    for attempt in 0..<4 {
      let r = try RRTRig(size: 16 << 20, seed: 16 + UInt64(attempt))
      rigs.append(r)
      let source = r.s.path("primary.img")
      let sourceSocket = r.s.path("ps.sock")
      let slow = try RRTChild(
        name: "nbdkit primary", executable: "/usr/bin/nbdkit",
        arguments: ["-f", "-U", sourceSocket, "--filter=delay", "file", source, "delay-write=4ms", "delay-zero=4ms"],
        stdout: r.s.path("ps.out"), stderr: r.s.path("ps.log"))
      r.others.append(slow)
      try r.waitForNBD("nbd+unix:///?socket=\(sourceSocket)", process: slow, what: "the primary's nbdkit")
      let fuseDir = r.s.path("pfuse")
      try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: true)
      let fuse = try RRTChild(
        name: "nbdfuse primary", executable: "/usr/bin/nbdfuse",
        arguments: [fuseDir + "/primary", "--unix", sourceSocket],
        stdout: r.s.path("pfuse.out"), stderr: r.s.path("pfuse.err"))
      defer {
        // The server first, then the FUSE file under it, then its nbdkit.
        r.server?.stop(grace: 10)
        r.server = nil
        if fuse.isRunning {
          _ = try? RRTCommand.shell("fusermount3 -u '\(fuseDir)' || umount '\(fuseDir)'", timeout: 30)
          fuse.stop(grace: 5)
        }
        r.stopAll()
      }
      let end = RRTEnv.monotonic() + 10
      while RRTEnv.monotonic() < end && fuse.isRunning && !FileManager.default.fileExists(atPath: fuseDir + "/primary")
      {
        RRTEnv.sleep(0.05)
      }
      guard FileManager.default.fileExists(atPath: fuseDir + "/primary") else {
        throw XCTSkip("nbdfuse does not work here: \(fuse.errors)")
      }
      r.primaryPath = fuseDir + "/primary"
      if try !backupOnAndOff(r, seed: 1616 + UInt64(attempt) * 7, cycles: 16, label: "slow primary, attempt \(attempt)")
      {
        break
      }
    }
  }

  /// Returns whether the two sides agreed at the end.
  @discardableResult
  func backupOnAndOff(_ r: RRTRig, seed: UInt64, cycles: Int = 10, label: String = "") throws -> Bool {
    let trigger = r.s.path("error.trigger")
    try r.startBackup(.nbdkit(filters: ["error"], parameters: ["error-rate=100%", "error-file=\(trigger)"]))
    try r.startServer()
    // Every block current first: writes never need the backup to read.
    RRTBytes.assertEqual(try r.copyExport(to: "first.img"), r.original, "the first full read")
    // Two writers on the two halves: one's FLUSH (which sends the owed
    // blocks) runs while the other's writes are in flight. Short writes, so
    // a write left behind is rarely covered by a later one.
    let half = r.size / 2
    let writer = try r.nbdshChild(
      "SEED = \(seed)\nWBASE = 1\nHI = \(half)\nMAXN = 4096\n" + Self.crashWriter, name: "writer")
    let other = try r.nbdshChild(
      "SEED = \(seed + 1)\nWBASE = 1000000\nLO = \(half)\nMAXN = 4096\n" + Self.crashWriter, name: "writer-2")
    XCTAssertTrue(writer.waitForOutput("READY", timeout: 20), writer.errors)
    XCTAssertTrue(other.waitForOutput("READY", timeout: 20), other.errors)
    var rng = SplitMix64(seed: seed)
    for _ in 0..<cycles {
      RRTEnv.sleep(0.05 + Double(rng.next() % 100) / 1000)
      _ = FileManager.default.createFile(atPath: trigger, contents: nil)
      RRTEnv.sleep(0.03 + Double(rng.next() % 50) / 1000)
      unlink(trigger)
    }
    RRTEnv.sleep(0.1)
    XCTAssertTrue(writer.isRunning, "the writer stopped: \(writer.output.suffix(300)) \(writer.errors)")
    let server = try XCTUnwrap(r.server)
    server.signal(SIGTERM)
    XCTAssertEqual(server.wait(timeout: 60), 0, r.log)
    r.server = nil
    XCTAssertNotNil(writer.wait(timeout: 30))
    XCTAssertNotNil(other.wait(timeout: 30))
    let wl = WriterLog(writer.output + "\n" + other.output)
    XCTAssertGreaterThan(wl.writes.count, 100, "too few writes to mean anything")
    XCTAssertTrue(r.log.contains("the backup is back"), "the backup never failed and came back:\n\(r.log)")
    XCTAssertFalse(r.log.contains("still owed"), r.log)
    print(
      "backup on and off\(label.isEmpty ? "" : " (\(label))"): \(wl.writes.count) writes, \(wl.flushes) flushes, "
        + "\(r.log.components(separatedBy: "did not take a write").count - 1) outages, "
        + "\(r.log.components(separatedBy: "the backup is back").count - 1) resynchronisations")

    let diff = try r.bitmapDiff()
    XCTAssertEqual(
      diff.status, 0,
      "every block is current, yet the primary and the backup differ at \(diff.stdout.split(separator: "\n").prefix(10)) "
        + "after \(wl.writes.count) writes:\n\(r.log)")
    let parts = visibleParts(wl.writes).filter { wl.completed.contains(wl.writes[$0.0].id) }
    let failure = checkParts(
      parts, of: wl.writes, in: [("on the backup", try r.backupData()), ("on the primary", try r.primaryData())],
      original: r.original)
    XCTAssertNil(failure, failure ?? "")
    return diff.status == 0 && failure == nil
  }

  /// nbdkit, on SIGTERM, answers ESHUTDOWN and waits for its clients to
  /// disconnect (a soft disconnect, as the NBD protocol describes): the
  /// backup link must let go so the backup server can exit and be restarted.
  func testTheBackupServerCanBeStoppedGracefullyAndRestarted() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(seed: 13, serverArguments: ["--backup-timeout", "4"])
    let old = try XCTUnwrap(r.backupServer)
    old.signal(SIGTERM)
    // A cold read sends a request to the stopping backup server.
    let during = try r.nbdsh(
      """
      h.connect_uri(URI)
      try:
          h.pread(B, 20 * B)
          print('READ')
      except nbd.Error as e:
          print('ERR', e.errno)
      """, timeout: 60)
    XCTAssertEqual(during.status, 0, during.summary)
    let exited = old.wait(timeout: 10)
    XCTAssertNotNil(
      exited,
      "nbdkit did not exit within 10 s of SIGTERM: restore-read-through keeps its connection after ESHUTDOWN replies "
        + "instead of disconnecting; log:\n\(r.log)")
    if exited == nil { old.kill9() }
    try r.startBackup()
    let up = try r.nbdsh(
      """
      orig = open('backup.img', 'rb').read()
      h.connect_uri(URI)
      print(h.pread(B, 21 * B) == orig[21 * B:22 * B], h.pread(B, 20 * B) == orig[20 * B:21 * B])
      """, timeout: 60)
    XCTAssertEqual(up.status, 0, "\(up.summary)\nlog:\n\(r.log)")
    XCTAssertEqual(up.lines.last, "True True", "\(up.summary)\nlog:\n\(r.log)")
    r.stopServer()
  }
}
