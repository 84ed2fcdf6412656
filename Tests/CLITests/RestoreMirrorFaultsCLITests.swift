// restore-read-through --ack local over links and disks that fail: a far
// link that refuses a tenth of its requests (nbdkit's error filter), a far
// copy served by qemu-nbd instead of nbdkit, and a journal on a small file
// system. What is proved: nothing acknowledged is lost, the journal never
// fills its disk (writes wait instead), and once the far copy catches up it
// equals the primary byte for byte.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreMirrorFaultsCLITests: RestoreCLITestCase {
  let local = ["--ack", "local", "--progress-interval", "0.2"]

  /// A link whose server answers one request in ten (writes, flushes) with
  /// EIO: every write is still acknowledged locally, the far copy gets all
  /// of them (a refused write is sent again, a failed flush sends its whole
  /// interval again), and it ends equal to the primary.
  func testAFarLinkThatRefusesRequestsNowAndThenLosesNothing() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try RRTRig(size: 16 << 20, seed: 201)
    rigs.append(r)
    // The errors start when their file exists, once the server is up.
    let errors = r.s.path("errors-on")
    try r.startBackup(.nbdkit(filters: ["error"], parameters: ["error=EIO", "error-rate=10%", "error-file=\(errors)"]))
    try r.startServer(local)
    let baseline = try r.s.file("baseline.img", r.original)
    XCTAssertTrue(FileManager.default.createFile(atPath: errors, contents: Data()))
    let load = StampedLoad(seed: 2011, writeSize: 4096, slots: 4096, flushEvery: 16)
    let w = try load.write(uri: r.uri, log: r.s.path("writer.log"), queueDepth: 4, count: 960)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    XCTAssertEqual(StampedLoad.Log(path: r.s.path("writer.log")).lastFlushed, 960)
    XCTAssertTrue(r.waitForDrain(after: 0, seconds: 120), "the far copy never caught up:\n\(r.log)")
    unlink(errors)
    let injected = try XCTUnwrap(r.backupServer).errors.components(separatedBy: "injecting").count - 1
    print("the far link refused \(injected) request(s) on purpose")
    XCTAssertGreaterThan(injected, 10, "the error filter refused too few requests to prove anything")
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(960), maxIndex: 960)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    try r.assertDrainedAndEqual("over a link refusing 10 % of its requests")
  }

  /// qemu-nbd as the far copy: ordering comes from the sender's intervals
  /// and flushes, not from a special receiver.
  func testQemuNBDIsAFarCopyToo() throws {
    try require("qemu-nbd", "nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try running(seed: 202, backup: .qemuNBD, serverArguments: local)
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 2022, writeSize: 2048, slots: 8192, flushEvery: 8)
    let w = try load.write(uri: r.uri, log: r.s.path("writer.log"), queueDepth: 4, count: 640)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    XCTAssertTrue(r.waitForDrain(after: 0), "the far copy never caught up:\n\(r.log)")
    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(640), maxIndex: 640)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    try r.assertDrainedAndEqual("with qemu-nbd as the far copy")
  }

  /// 64 KiB writes of byte i%251+1 at block i%256, each flushed, 400 of
  /// them; after each acknowledged flush the count so far on a line.
  static let fillScript = """
    import nbd, sys
    h = nbd.NBD(); h.connect_uri(sys.argv[1])
    for i in range(400):
        h.pwrite(bytes([i % 251 + 1]) * 65536, (i % 256) * 65536)
        h.flush()
        print(i + 1, flush=True)
    """

  /// The journal on a 24 MiB file system with the far copy frozen: writes
  /// are acknowledged until the journal would leave less than the 8 MiB it
  /// keeps free, then wait (the log says why) instead of filling the disk,
  /// which would leave no room to record what the copies have; none fails.
  /// Once the copy is thawed, what it has is punched out of the journal and
  /// the writes go on; the copy ends equal to the primary, holding every
  /// block's last write.
  func testAJournalShortOfRoomMakesWritesWaitAndLosesNothing() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let r = try RRTRig(size: 16 << 20, seed: 203)
    rigs.append(r)
    let small = r.s.path("small")
    try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
    let mounted = try RRTCommand.run("/bin/mount", ["-t", "tmpfs", "-o", "size=24m", "tmpfs", small])
    guard mounted.status == 0 else { throw XCTSkip("cannot mount a tmpfs here: \(mounted.stderr)") }
    defer { try? RRTCommand.run("/bin/umount", ["-l", small]) }
    try r.startBackup(.nbdkit())
    try r.startServer(local + ["--journal", "\(small)/j", "--max-lag", "1G"])
    let backup = try XCTUnwrap(r.backupServer)
    backup.freeze()
    let out = r.s.path("fill.out")
    let fill = try RRTChild(
      name: "fill", executable: "/usr/bin/python3", arguments: ["-c", Self.fillScript, r.uri], stdout: out,
      stderr: r.s.path("fill.err"))
    r.others.append(fill)
    func acknowledged() -> Int {
      Int((try? String(contentsOfFile: out, encoding: .utf8))?.split(separator: "\n").last ?? "") ?? 0
    }
    // Until the count holds still for 2 s.
    var last = -1
    var since = RRTEnv.monotonic()
    let end = RRTEnv.monotonic() + 30
    while RRTEnv.monotonic() < end && RRTEnv.monotonic() - since < 2 {
      if acknowledged() != last {
        last = acknowledged()
        since = RRTEnv.monotonic()
      }
      RRTEnv.sleep(0.05)
    }
    let held = acknowledged()
    XCTAssertTrue(fill.isRunning, "the writer ended with the far copy frozen: \(fill.errors)\n\(r.log)")
    XCTAssertGreaterThan(held, 150, "writes waited long before 16 MiB of journal: \(held)\n\(r.log)")
    XCTAssertLessThan(held, 300, "more writes acknowledged than 24 MiB less 8 MiB hold: \(held)")
    XCTAssertTrue(r.log.contains("the journal's file system has"), r.log)
    XCTAssertFalse(r.log.contains("No space left"), r.log)
    backup.thaw()
    XCTAssertEqual(fill.wait(timeout: 60), 0, "the writer after the thaw: \(fill.errors)\n\(r.log)")
    XCTAssertEqual(acknowledged(), 400)
    try r.assertDrainedAndEqual("with the journal short of room")
    for b in 0..<256 {
      let i = b < 144 ? 256 + b : b
      let got = try RRTBytes.read(r.backupPath, b * 65536, 65536)
      XCTAssertTrue(got.allSatisfy { $0 == UInt8(i % 251 + 1) }, "block \(b) does not hold write \(i)")
    }
  }
}
