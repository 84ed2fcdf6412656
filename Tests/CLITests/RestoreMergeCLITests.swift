// The merge export of restore-read-through, channel 2: the stream
// merge-snapshot names is checked for its time and base and recorded; it
// fills only the blocks that are not current and never overwrites a newer
// write, even racing a writer on the same blocks; and on a live ext4 disk
// (nbdfuse and a loop device) the snapshot taken before it was touched
// merges into a primary that ends equal to the backup.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreMergeCLITests: RestoreCLITestCase {
  /// merge-snapshot names its stream to the merge export, which checks it
  /// against the server's map as merge-snapshot checks a map file: a stream
  /// read before tracking started could bring back data older than writes
  /// the map never saw, and an incremental must apply on top of the last
  /// stream merged. A whole stream is recorded as the last merged.
  func testMergeExportChecksTheStreamsTimeAndBaseAndRecordsIt() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try RRTRig(size: 16 << 20, seed: 77)
    rigs.append(r)
    try r.startBackup(.nbdkit())
    let early = try RRTCommand.shell("snapshot --quiet -o early.stream backup.img", cwd: r.dir)
    XCTAssertEqual(early.status, 0, early.summary)
    usleep(20_000)
    try r.startServer()
    let refused = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("early.stream"), r.mergeURI], timeout: 60)
    XCTAssertEqual(refused.status, 1, refused.summary)
    XCTAssertTrue(refused.stderr.contains("before the map started tracking"), refused.summary)
    XCTAssertTrue(refused.stderr.contains(r.mergeURI), "the sentence names the target: \(refused.summary)")
    XCTAssertFalse(r.log.contains("merge:"), "the refused stream wrote blocks:\n\(r.log)")

    // A stream read after the server started merges, and is recorded.
    let late = try RRTCommand.shell("snapshot --quiet --json -o late.stream backup.img", cwd: r.dir)
    XCTAssertEqual(late.status, 0, late.summary)
    let lateID = try XCTUnwrap(
      (try JSONSerialization.jsonObject(with: Data(late.stdout.utf8)) as? [String: Any])?["stream_id"] as? String)
    let merged = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("late.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(merged.status, 0, "\(merged.summary)\nlog:\n\(r.log)")
    XCTAssertTrue(r.log.contains("stream \(lateID) is merged whole"), r.log)

    // An incremental on top of another stream is refused; on top of the
    // last merged one it is taken.
    let wrong = try RRTCommand.shell(
      "snapshot --quiet --base 0123456789abcdef0123456789abcdef -o wrong.stream backup.img", cwd: r.dir)
    XCTAssertEqual(wrong.status, 0, wrong.summary)
    let refusedBase = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("wrong.stream"), r.mergeURI], timeout: 60)
    XCTAssertEqual(refusedBase.status, 1, refusedBase.summary)
    XCTAssertTrue(
      refusedBase.stderr.contains("the last stream merged into this device is \(lateID)"), refusedBase.summary)
    let right = try RRTCommand.shell(
      "snapshot --quiet --json --base \(lateID) -o right.stream backup.img", cwd: r.dir)
    XCTAssertEqual(right.status, 0, right.summary)
    let rightID = try XCTUnwrap(
      (try JSONSerialization.jsonObject(with: Data(right.stdout.utf8)) as? [String: Any])?["stream_id"] as? String)
    let taken = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("right.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(taken.status, 0, "\(taken.summary)\nlog:\n\(r.log)")
    r.stopServer()
    XCTAssertEqual(try r.mapStats()["last_merged_stream"] as? String, rightID, "the incremental is the last merged")
  }

  func testMergeExportFillsOnlyBlocksThatAreNotCurrent() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(
      backup: .nbdkitFilters(["log"], []),
      serverArguments: ["--progress-interval", "0.2"])
    let B = r.blockSize
    // Channel 1 writes before the snapshot…
    let first: [(Int, Data)] = [
      (5 * B, RRTBytes.random(B, seed: 801)),
      (7 * B + 333, RRTBytes.random(2000, seed: 802)),
    ]
    // … and after it: block 5 again (newer than the snapshot), block 9, a
    // TRIM of block 11, and a read of blocks 60-61.
    let second: [(Int, Data)] = [
      (5 * B, RRTBytes.random(B, seed: 803)),
      (9 * B + 10, RRTBytes.random(50000, seed: 804)),
      (11 * B, Data(count: B)),
    ]
    func writeScript(_ writes: [(Int, Data)], _ name: String, trimLast: Bool = false) throws -> String {
      for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("\(name)\(i).bin"))) }
      let list = writes.enumerated().map { "(\($1.0), '\(name)\($0).bin')" }.joined(separator: ", ")
      return """
        h.connect_uri(URI)
        ws = [\(list)]
        for i, (off, path) in enumerate(ws):
            data = open(path, 'rb').read()
            if \(trimLast ? "True" : "False") and i == len(ws) - 1:
                h.trim(len(data), off)
            else:
                h.pwrite(data, off)
        h.flush()
        h.shutdown()
        print("OK")
        """
    }
    let w1 = try r.nbdsh(try writeScript(first, "first"))
    XCTAssertEqual(w1.status, 0, w1.summary)

    let snap = try RRTCommand.shell("snapshot --quiet backup.img > s.stream", cwd: r.dir)
    XCTAssertEqual(snap.status, 0, snap.summary)

    let w2 = try r.nbdsh(try writeScript(second, "second", trimLast: true))
    XCTAssertEqual(w2.status, 0, w2.summary)
    _ = try r.readThroughExport([(60 * B, 2 * B)])
    let currentBefore: Set<Int> = [5, 7, 9, 11, 60, 61]

    // The merge export takes whole blocks only.
    let partial = try r.nbdsh(
      """
      h.connect_uri(URI)
      try:
          h.pwrite(b'x' * 100, 3 * B + 5)
          print("ACCEPTED")
      except nbd.Error as e:
          print("REFUSED", e.errno)
      """, uri: r.mergeURI)
    XCTAssertTrue(partial.stdout.contains("REFUSED EINVAL"), partial.summary)

    // The backup as it is now, with every channel 1 write.
    let expected = applying(second, to: applying(first, to: r.original))
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup before the merge")
    let requestLog = try XCTUnwrap(r.backupRequestLog)
    func backupChanges() -> Int {
      let text = (try? String(contentsOfFile: requestLog, encoding: .utf8)) ?? ""
      return text.split(separator: "\n").filter {
        $0.contains(" Write id=") || $0.contains(" Zero id=") || $0.contains(" Trim id=")
      }.count
    }
    let changesBefore = backupChanges()
    XCTAssertGreaterThanOrEqual(changesBefore, 5, "the request log of the backup misses channel 1 writes")

    let m = try RRTCommand.run("merge-snapshot", ["--json", "-i", r.s.path("s.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(m.status, 0, "merge-snapshot: \(m.summary)\nlog:\n\(r.log)")
    if let o = try? json(m.stdout) {
      XCTAssertEqual(o["complete"] as? Bool, true, m.stdout)
    }
    // Block 5 holds the write made after the snapshot, not the snapshot's.
    let back = try r.readThroughExport([(5 * B, B), (9 * B, B), (11 * B, B)])
    RRTBytes.assertEqual(back[(5 * B)..<(6 * B)], second[0].1, "block 5 after the merge (newer data lost?)")
    RRTBytes.assertEqual(back[(9 * B)..<(10 * B)], expected[(9 * B)..<(10 * B)], "block 9 after the merge")
    XCTAssertTrue(RRTBytes.isZero(back[(11 * B)..<(12 * B)]), "trimmed block 11 after the merge")
    // Everything reads as the backup.
    RRTBytes.assertEqual(try r.copyExport(to: "after.img"), expected, "the export after the merge")

    // The log counts the merged blocks: every block that was not current.
    var merged: Int?
    let deadline = RRTEnv.monotonic() + 5
    while RRTEnv.monotonic() < deadline {
      if r.log.contains("the restore is complete"),
        let last = r.log.split(separator: "\n").last(where: { $0.contains("progress:") && $0.contains("(100.0%)") }),
        let range = last.range(of: "merged ")
      {
        merged = Int(last[range.upperBound...].prefix(while: { $0.isNumber }))
        break
      }
      RRTEnv.sleep(0.1)
    }
    XCTAssertEqual(merged, r.blockCount - currentBefore.count, "merged count in the log:\n\(r.log)")

    // Merged blocks are not sent to the backup.
    XCTAssertEqual(backupChanges(), changesBefore, "the merge sent writes to the backup")
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after the merge")
    r.stopServer()
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup after the merge: \(diff.summary)")
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary after the merge")
  }

  /// merge-snapshot and a writer on the same blocks at once: the per-block
  /// locks must never let the merge overwrite a newer write.
  func testMergeRacingClientWritesNeverLosesAWrite() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(size: 32 << 20, seed: 44)
    let B = r.blockSize
    let snap = try RRTCommand.shell("snapshot --quiet backup.img > s.stream", cwd: r.dir)
    XCTAssertEqual(snap.status, 0, snap.summary)
    var rng = SplitMix64(seed: 4400)
    var writes: [(Int, Data)] = []
    var used = Set<Int>()
    while writes.count < 300 {
      let b = Int(rng.next() % UInt64(r.blockCount))
      guard used.insert(b).inserted else { continue }
      if rng.next() % 2 == 0 {
        writes.append((b * B, RRTBytes.random(B, seed: rng.next())))
      } else {
        let off = b * B + Int(rng.next() % UInt64(B / 2))
        writes.append((off, RRTBytes.random(1 + Int(rng.next() % UInt64(B / 2 - 1)), seed: rng.next())))
      }
    }
    for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("m\(i).bin"))) }
    let list = writes.enumerated().map { "(\($1.0), 'm\($0).bin')" }.joined(separator: ", ")
    let writer = try r.nbdshChild(
      """
      h.connect_uri(URI)
      ws = [(off, open(path, 'rb').read()) for off, path in [\(list)]]
      print('READY', flush=True)
      for i, (off, data) in enumerate(ws):
          h.pwrite(data, off)
          if i % 16 == 15:
              h.flush()
      h.flush()
      print('OK', flush=True)
      """, name: "racing-writer")
    XCTAssertTrue(writer.waitForOutput("READY", timeout: 20), writer.errors)
    let merge = try RRTChild(
      name: "merge-snapshot", executable: Tools.path("merge-snapshot"),
      arguments: ["-i", r.s.path("s.stream"), r.mergeURI],
      stdout: r.s.path("merge.out"), stderr: r.s.path("merge.err"))
    r.others.append(merge)
    XCTAssertEqual(merge.wait(timeout: 120), 0, "merge-snapshot: \(merge.errors)\nlog:\n\(r.log)")
    XCTAssertEqual(writer.wait(timeout: 120), 0, "writer: \(writer.output) \(writer.errors)")
    XCTAssertTrue(writer.output.contains("OK"))
    let expected = applying(writes, to: r.original)
    RRTBytes.assertEqual(try r.copyExport(to: "after.img"), expected, "the export after the racing merge")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after the racing merge")
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary after the racing merge")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }

  // MARK: A live ext4 disk through nbdfuse and a loop device

  func testLiveExt4DiskThroughNbdfuseThenMergeOfASnapshot() throws {
    try require("nbdkit", "nbdinfo", "nbdfuse", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck")
    guard getuid() == 0 else { throw XCTSkip("mounting needs root") }
    guard FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("no /dev/fuse") }
    let work = try Scratch()
    let src = work.path("src")
    try FileManager.default.createDirectory(atPath: src + "/sub", withIntermediateDirectories: true)
    var files: [String: Data] = [
      "a.txt": Data("hello from the backup\n".utf8),
      "b.bin": RRTBytes.random(300_000, seed: 1201),
      "sub/c.bin": RRTBytes.random(1_500_000, seed: 1202),
    ]
    for (name, data) in files { try data.write(to: URL(fileURLWithPath: src + "/" + name)) }
    let size = 64 << 20
    let image = work.path("fs.img")
    let mk = try RRTCommand.shell("truncate -s \(size) '\(image)' && mkfs.ext4 -q -F -b 4096 -d '\(src)' '\(image)'")
    guard mk.status == 0 else { throw XCTSkip("mkfs.ext4 -d is not usable here: \(mk.summary)") }
    // Can this machine mount a loop device at all?
    let probeDir = work.path("probe")
    try FileManager.default.createDirectory(atPath: probeDir, withIntermediateDirectories: true)
    let probe = try RRTCommand.shell(
      "cp '\(image)' '\(work.path("probe.img"))' && mount -o ro,loop '\(work.path("probe.img"))' '\(probeDir)' && umount '\(probeDir)'"
    )
    guard probe.status == 0 else { throw XCTSkip("cannot mount a loop device here: \(probe.summary)") }

    let r = try RRTRig(size: size, backup: try Data(contentsOf: URL(fileURLWithPath: image)))
    rigs.append(r)
    try r.startBackup(.nbdkit())
    try r.startServer()
    // The snapshot of the backup, taken after tracking started and before
    // the file system is touched through the export.
    let snap = try RRTCommand.shell("snapshot --quiet backup.img > before.stream", cwd: r.dir)
    XCTAssertEqual(snap.status, 0, snap.summary)

    let fuseDir = r.s.path("fuse")
    let mnt = r.s.path("mnt")
    for d in [fuseDir, mnt] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
    let fuse = try RRTChild(
      name: "nbdfuse", executable: "/usr/bin/nbdfuse", arguments: [fuseDir + "/disk", "--unix", r.socket],
      stdout: r.s.path("fuse.out"), stderr: r.s.path("fuse.err"))
    r.others.append(fuse)
    var loop: String?
    var mounted = false
    defer {
      if mounted { _ = try? RRTCommand.run("/usr/bin/umount", [mnt], timeout: 30) }
      if let loop { _ = try? RRTCommand.run("/usr/sbin/losetup", ["-d", loop], timeout: 30) }
      if fuse.isRunning {
        _ = try? RRTCommand.shell("fusermount3 -u '\(fuseDir)' || umount '\(fuseDir)'", timeout: 30)
        fuse.stop(grace: 5)
      }
    }
    var appeared = false
    let end = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < end && fuse.isRunning {
      if FileManager.default.fileExists(atPath: fuseDir + "/disk") {
        appeared = true
        break
      }
      RRTEnv.sleep(0.05)
    }
    guard appeared else { throw XCTSkip("nbdfuse does not work here: \(fuse.errors)") }
    let attach = try RRTCommand.run("/usr/sbin/losetup", ["-f", "--show", fuseDir + "/disk"], timeout: 30)
    guard attach.status == 0, let dev = attach.lines.first else {
      throw XCTSkip("cannot attach a loop device to the nbdfuse file: \(attach.summary)")
    }
    loop = dev
    let m = try RRTCommand.run("/usr/bin/mount", ["-t", "ext4", dev, mnt], timeout: 60)
    XCTAssertEqual(m.status, 0, "mounting the restored disk: \(m.summary)\nlog:\n\(r.log)")
    guard m.status == 0 else { return }
    mounted = true
    for (name, data) in files {
      let seen = try Data(contentsOf: URL(fileURLWithPath: mnt + "/" + name))
      RRTBytes.assertEqual(seen, data, "\(name) read through the live disk")
    }
    let newFile = RRTBytes.random(2_000_000, seed: 1203)
    try newFile.write(to: URL(fileURLWithPath: mnt + "/new.bin"))
    files["new.bin"] = newFile
    XCTAssertEqual(try RRTCommand.run("/usr/bin/sync", ["-f", mnt + "/new.bin"], timeout: 60).status, 0)
    XCTAssertEqual(try RRTCommand.run("/usr/bin/umount", [mnt], timeout: 60).status, 0)
    mounted = false
    XCTAssertEqual(try RRTCommand.run("/usr/sbin/losetup", ["-d", dev], timeout: 30).status, 0)
    loop = nil
    let unmount = try RRTCommand.shell("fusermount3 -u '\(fuseDir)' || umount '\(fuseDir)'", timeout: 30)
    XCTAssertEqual(unmount.status, 0, unmount.summary)
    XCTAssertEqual(fuse.wait(timeout: 20), 0, "nbdfuse: \(fuse.errors)")

    // Channel 2: the snapshot from before lands where the map says not current.
    let merge = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("before.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(merge.status, 0, "merge-snapshot: \(merge.summary)\nlog:\n\(r.log)")
    r.stopServer()
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup: \(diff.summary)")
    let fsck = try RRTCommand.run("/usr/sbin/e2fsck", ["-f", "-n", r.primaryPath], timeout: 60)
    XCTAssertEqual(fsck.status, 0, "e2fsck of the restored primary: \(fsck.summary)")

    let check = r.s.path("check")
    try FileManager.default.createDirectory(atPath: check, withIntermediateDirectories: true)
    let ro = try RRTCommand.run("/usr/bin/mount", ["-o", "ro,loop,noload", r.primaryPath, check], timeout: 60)
    XCTAssertEqual(ro.status, 0, ro.summary)
    guard ro.status == 0 else { return }
    defer { _ = try? RRTCommand.run("/usr/bin/umount", [check], timeout: 30) }
    for (name, data) in files {
      let seen = try Data(contentsOf: URL(fileURLWithPath: check + "/" + name))
      RRTBytes.assertEqual(seen, data, "\(name) on the restored primary")
    }
  }
}
