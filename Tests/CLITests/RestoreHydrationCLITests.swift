// --hydrate, the background copy of every block not yet current: it
// completes while a client writes; what the backup reports as zeros
// (base:allocation) is zeroed, not copied; it survives kill -9 and restarts;
// it rides out a backup that fails reads for a while and copies nothing
// wrong.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreHydrationCLITests: RestoreCLITestCase {
  /// --hydrate copies every block in the background while a client writes.
  func testHydrationCompletesWhileAClientWrites() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(size: 32 << 20, seed: 55, serverArguments: ["--hydrate", "--progress-interval", "0.2"])
    let B = r.blockSize
    var writes: [(Int, Data)] = []
    for k in 0..<64 {
      let b = (k * 37) % r.blockCount
      writes.append(
        (b * B + (k % 3) * 1000, RRTBytes.random(k % 2 == 0 ? B - (k % 3) * 1000 : 3000, seed: 5500 + UInt64(k))))
    }
    for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("h\(i).bin"))) }
    let list = writes.enumerated().map { "(\($1.0), 'h\($0).bin')" }.joined(separator: ", ")
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      for i, (off, path) in enumerate([\(list)]):
          h.pwrite(open(path, 'rb').read(), off)
          if i % 8 == 7:
              h.flush()
      h.flush()
      print('OK')
      """)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    let complete = r.waitForLog("every block is current", "hydration done")
    XCTAssertTrue(complete, "hydration did not finish in 60 s:\n\(r.log)")
    r.stopServer()
    let expected = applying(writes, to: r.original)
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after hydration and writes")
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary after hydration and writes")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }

  /// --hydrate over a sparse backup: what the backup says reads as zeros
  /// (base:allocation) is zeroed on the primary, not copied; the primary
  /// ends equal to the backup, and sparse where the backup is.
  func testHydrationDoesNotCopyTheBackupsZeros() throws {
    try require("nbdkit")
    let size = 64 << 20
    // Data in a few places (blocks of 64 KiB): partial blocks, a run, the end.
    let pieces = [(70_000, 5000), (3 << 20, 1 << 20), (40 << 20 + 65536 * 3, 65536), (size - 100, 100)]
    let (r, image) = try sparseBackupRig(size: size, seed: 70, pieces: pieces)
    try r.startBackup(.nbdkit(filters: ["log"], parameters: []))
    try r.startServer(["--hydrate", "--progress-interval", "0"])
    XCTAssertTrue(r.waitForLog("hydration done"), "hydration did not finish in 60 s:\n\(r.log)")
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), image, "the primary after hydration")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
    // Only blocks holding data crossed the link.
    let B = r.blockSize
    var dataBlocks = Set<Int>()
    for (offset, count) in pieces { for b in offset / B...(offset + count - 1) / B { dataBlocks.insert(b) } }
    let requests = try String(contentsOfFile: try XCTUnwrap(r.backupRequestLog), encoding: .utf8)
    var readBytes = 0
    for line in requests.split(separator: "\n") where line.contains(" Read id=") {
      if let c = line.split(separator: " ").first(where: { $0.hasPrefix("count=0x") }) {
        readBytes += Int(c.dropFirst(8), radix: 16) ?? 0
      }
    }
    XCTAssertGreaterThanOrEqual(readBytes, dataBlocks.count * B - (B - size % B) % B, requests)
    XCTAssertLessThanOrEqual(readBytes, dataBlocks.count * B, "zeros were copied: \(readBytes) bytes read")
    XCTAssertTrue(
      r.log.contains(
        "hydration done: \(dataBlocks.count) block(s) fetched from the backup, "
          + "\(r.blockCount - dataBlocks.count) zeroed without copying"), r.log)
    // The primary is sparse where the backup is.
    var st = stat()
    XCTAssertEqual(stat(r.primaryPath, &st), 0)
    XCTAssertLessThan(Int(st.st_blocks) * 512, 8 << 20, "the primary's zeros take space")
  }

  /// kill -9 during hydration of a sparse backup onto a disk full of old
  /// bytes, several times, then a run to the end: the zeros are zeros,
  /// the data is the backup's, the map full.
  func testKillDuringSparseHydrationThenRestart() throws {
    try require("nbdkit")
    let size = 32 << 20
    let pieces = [(65536 * 5 + 100, 70_000), (9 << 20, 2 << 20), (size - 65536, 65536)]
    let (r, image) = try sparseBackupRig(size: size, seed: 80, pieces: pieces)
    // The replacement disk still holds old bytes everywhere.
    try RRTBytes.random(size, seed: 81).write(to: URL(fileURLWithPath: r.primaryPath))
    try r.startBackup(.nbdkit(filters: ["delay"], parameters: ["delay-read=20ms"]))
    // Paced, so that each kill meets the copy under way.
    for (round, pause) in [0.08, 0.23, 0.15].enumerated() {
      try r.startServer(round == 0 ? ["--hydrate", "--hydrate-rate", "1M", "--progress-interval", "0"] : [])
      RRTEnv.sleep(pause)
      r.killServer()
      XCTAssertFalse(r.log.contains("hydration done"), "round \(round) ended before the kill:\n\(r.log)")
    }
    try r.startServer()
    let done = r.waitForLog("hydration done", "every block is current")
    XCTAssertTrue(done, "hydration did not finish after the restarts:\n\(r.allLogs)")
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), image, "the primary after hydration with kills")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }

  /// Hydration meets a backup that fails every read for a while: it says
  /// so in a few lines (not one per worker and second), copies nothing
  /// wrong, and completes once the backup answers again.
  func testHydrationRidesOutBackupErrors() throws {
    try require("nbdkit")
    let r = try RRTRig(size: 16 << 20, seed: 12)
    rigs.append(r)
    let trigger = r.s.path("error.trigger")
    _ = FileManager.default.createFile(atPath: trigger, contents: Data())
    try r.startBackup(.nbdkit(filters: ["error"], parameters: ["error-rate=100%", "error-file=\(trigger)"]))
    try r.startServer(["--hydrate", "--progress-interval", "0"])
    RRTEnv.sleep(3)
    let failing = r.log
    let lines = failing.split(separator: "\n").filter { $0.contains("hydration: ") }
    XCTAssertGreaterThanOrEqual(lines.count, 1, "no failure said:\n\(failing)")
    XCTAssertLessThanOrEqual(lines.count, 2, "a line per failure:\n\(failing)")
    XCTAssertFalse(failing.contains("hydration done"), failing)
    try FileManager.default.removeItem(atPath: trigger)
    XCTAssertTrue(r.waitForLog("hydration done"), "hydration did not finish after the backup recovered:\n\(r.log)")
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), r.original, "the primary after hydration through errors")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }
}
