// restore-read-through end to end, against real NBD peers: nbdkit and
// qemu-nbd as the backup; nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, fio and
// nbdfuse (+ a loop device and ext4) as clients. Each test builds a backup
// image, an empty primary and a map in a scratch directory, starts the backup
// server and restore-read-through (RRTRig, in RestoreReadThroughHarness.swift)
// and always stops both in tearDown.
//
// What is checked is what the tool promises (its --help and the invariants
// of RestoreEngine.swift): reads through the export give the backup's bytes;
// writes reach the primary and the backup; partial writes bring their block
// first; TRIM and WRITE_ZEROES leave zeros on both sides; the map marks
// exactly the blocks worked on; the merge export never overwrites a current
// block; an acknowledged FLUSH survives kill -9; bad requests and bad start-up
// input are refused without harm; backup trouble never turns into zeros.

import Foundation
import Glibc
import XCTest

final class RestoreReadThroughCLITests: XCTestCase {
  private var rigs: [RRTRig] = []

  override func tearDown() {
    for r in rigs { r.stopAll() }
    rigs = []
    super.tearDown()
  }

  func require(_ programs: String...) throws {
    for p in programs where !RRTEnv.have(p) {
      throw XCTSkip("\(p) is not installed (needed by this test)")
    }
  }

  /// A rig with the backup served and restore-read-through answering.
  func running(
    size: Int = 16 << 20, seed: UInt64 = 1, backup: BackupChoice = .nbdkit, serverArguments: [String] = []
  ) throws -> RRTRig {
    let r = try RRTRig(size: size, seed: seed)
    rigs.append(r)
    switch backup {
    case .nbdkit: try r.startBackup(.nbdkit())
    case .nbdkitFilters(let f, let p): try r.startBackup(.nbdkit(filters: f, parameters: p))
    case .qemuNBD: try r.startBackup(.qemuNBD)
    }
    try r.startServer(serverArguments)
    return r
  }

  enum BackupChoice {
    case nbdkit
    case nbdkitFilters([String], [String])
    case qemuNBD
  }

  func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not JSON: \(text)", file: file, line: line
    )
  }

  /// A rig whose backup image is sparse: zeros but for `pieces` (offset,
  /// length) of seeded random bytes, which are holes in the file. Returns
  /// the rig and the backup's content.
  func sparseBackupRig(size: Int, seed: UInt64, pieces: [(Int, Int)]) throws -> (RRTRig, Data) {
    var image = Data(count: size)
    for (i, (offset, count)) in pieces.enumerated() {
      image.replaceSubrange(offset..<offset + count, with: RRTBytes.random(count, seed: seed * 10 + UInt64(i)))
    }
    let r = try RRTRig(size: size, seed: seed, backup: image)
    rigs.append(r)
    unlink(r.backupPath)
    try r.makeSparse(r.backupPath, size: size)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: r.backupPath))
    for (offset, count) in pieces {
      try h.seek(toOffset: UInt64(offset))
      try h.write(contentsOf: image[offset..<offset + count])
    }
    try h.synchronize()
    try h.close()
    return (r, image)
  }

  /// The expected image: `base` with writes applied.
  func applying(_ writes: [(Int, Data)], to base: Data) -> Data {
    var d = base
    for (off, data) in writes { d.replaceSubrange(off..<off + data.count, with: data) }
    return d
  }

  // MARK: 1. What nbdinfo sees

  func testNbdinfoShowsSizeFlagsAndBothExports() throws {
    try require("nbdkit", "nbdinfo")
    let r = try running()
    let info = try RRTCommand.run("/usr/bin/nbdinfo", ["--json", "--no-content", r.uri])
    XCTAssertEqual(info.status, 0, info.summary)
    let o = try json(info.stdout)
    let exports = try XCTUnwrap(o["exports"] as? [[String: Any]], info.stdout)
    let e = try XCTUnwrap(exports.first)
    XCTAssertEqual(e["export-size"] as? Int, r.size)
    XCTAssertEqual(e["is_read_only"] as? Bool, false)
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
      XCTAssertEqual(e[flag] as? Bool, true, "\(flag) in \(info.stdout)")
    }
    XCTAssertEqual(e["block_size_preferred"] as? Int, r.blockSize)
    XCTAssertTrue((e["description"] as? String ?? "").contains(r.primaryPath), info.stdout)

    let list = try RRTCommand.run("/usr/bin/nbdinfo", ["--list", "--json", "--no-content", r.uri])
    XCTAssertEqual(list.status, 0, list.summary)
    let all = try XCTUnwrap(try json(list.stdout)["exports"] as? [[String: Any]], list.stdout)
    let names = all.compactMap { $0["export-name"] as? String }
    XCTAssertEqual(Set(names), ["primary", "merge"], list.stdout)
    for x in all {
      XCTAssertEqual(x["export-size"] as? Int, r.size, "\(x)")
    }
    // Both by name; an unknown name is refused and the server keeps serving.
    for name in ["primary", "merge"] {
      let sized = try RRTCommand.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///\(name)?socket=\(r.socket)"])
      XCTAssertEqual(sized.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "\(r.size)", sized.summary)
    }
    let unknown = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbd+unix:///nosuch?socket=\(r.socket)"], timeout: 20)
    XCTAssertNotEqual(unknown.status, 0, unknown.summary)
    XCTAssertFalse(unknown.timedOut)
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri]).status, 0, "the server stopped serving")

    // Asking about the exports read nothing: no block became current.
    r.stopServer()
    let stats = try r.mapStats()
    XCTAssertEqual(stats["set_blocks"] as? Int, 0, "\(stats)")
    XCTAssertEqual(stats["block_count"] as? Int, r.blockCount)
    XCTAssertEqual(stats["device_name"] as? String, r.primaryPath)
    XCTAssertTrue(r.log.contains("created the overwrite map"), r.log)
  }

  func testServesOverTCP() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try RRTRig(size: 16 << 20, seed: 2)
    rigs.append(r)
    try r.startBackup(.nbdkit())
    let server = try RRTChild(
      name: "restore-read-through tcp", executable: Tools.path("restore-read-through"),
      arguments: ["--backup", r.backupURI, "--map", r.mapPath, "--listen", "127.0.0.1:0", r.primaryPath],
      stdout: r.s.path("tcp.out"), stderr: r.s.path("tcp.log"))
    r.others.append(server)
    var port: Int?
    let end = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < end && server.isRunning && port == nil {
      if let line = server.errors.split(separator: "\n").first(where: { $0.contains("serving") }),
        let range = line.range(of: " on 127.0.0.1:")
      {
        port = Int(line[range.upperBound...].prefix(while: { $0.isNumber }))
      }
      RRTEnv.sleep(0.05)
    }
    let p = try XCTUnwrap(port, "no port in the log: \(server.errors)")
    XCTAssertNotEqual(p, 0, "the log should name the port picked")
    let out = try r.nbdsh(
      """
      h.connect_uri(URI)
      print(h.get_size(), h.pread(B, 7 * B) == open('backup.img', 'rb').read()[7 * B:8 * B])
      """, uri: "nbd://127.0.0.1:\(p)/")
    XCTAssertEqual(out.status, 0, out.summary)
    XCTAssertEqual(out.lines.last, "\(r.size) True", out.summary)
    XCTAssertEqual(server.stop(grace: 20), 0, server.errors)
    XCTAssertTrue(server.errors.contains("stopped cleanly"), server.errors)
  }

  // MARK: 2. Cold read

  func testColdReadOfTheWholeExportRestoresThePrimary() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let r = try running()
    let copy = try r.copyExport(to: "copy.img")
    RRTBytes.assertEqual(copy, r.original, "nbdcopy of the export vs the backup")
    r.stopServer()

    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup after a cold read: \(diff.summary)")
    RRTBytes.assertEqual(try r.primaryData(), r.original, "the primary after a cold read")
    RRTBytes.assertEqual(try r.backupData(), r.original, "reads changed the backup")
    let stats = try r.mapStats()
    XCTAssertEqual(stats["set_blocks"] as? Int, r.blockCount, "\(stats)")
    XCTAssertEqual(stats["percent"] as? Double, 100.0)

    // A restart finds every block current: the map was saved.
    try r.startServer()
    XCTAssertTrue(r.log.contains("\(r.blockCount) of \(r.blockCount) blocks current"), r.log)
    r.stopServer()
  }

  // MARK: 3. Writes

  func testPartialAndWholeBlockWritesReachBothSides() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running()
    let B = r.blockSize
    // (offset, length, FUA): unaligned inside a never-read block, across a
    // block boundary (partial on both sides), whole blocks, whole + partial
    // tail, the partial end of the device, and a whole block with FUA.
    let plan: [(Int, Int, Bool)] = [
      (10 * B + 1000, 3000, false),
      (20 * B + 60000, 10000, false),
      (30 * B, 2 * B, false),
      (40 * B, B + 100, false),
      (r.size - 700, 700, false),
      (50 * B, B, true),
      (60 * B + 1, 1, false),
    ]
    var writes: [(Int, Data)] = []
    for (i, (off, n, _)) in plan.enumerated() {
      let d = RRTBytes.random(n, seed: 300 + UInt64(i))
      try d.write(to: URL(fileURLWithPath: r.s.path("w\(i).bin")))
      writes.append((off, d))
    }
    let calls = plan.enumerated().map { i, p in "(\(p.0), 'w\(i).bin', \(p.2 ? "nbd.CMD_FLAG_FUA" : "0"))" }
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      for off, path, flags in [\(calls.joined(separator: ", "))]:
          h.pwrite(open(path, 'rb').read(), off, flags)
      h.flush()
      h.shutdown()
      print("OK")
      """)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    XCTAssertTrue(w.stdout.contains("OK"))

    let expected = applying(writes, to: r.original)
    let touched = Set(plan.flatMap { r.blocks($0.0, $0.1) })
    XCTAssertEqual(touched, [10, 20, 21, 30, 31, 40, 41, 50, 60, r.blockCount - 1])
    let ranges = touched.sorted().map { (r.blockRange($0).lowerBound, r.blockRange($0).count) }
    let back = try r.readThroughExport(ranges)
    for b in touched.sorted() {
      RRTBytes.assertEqual(back[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) read through the export")
    }
    r.stopServer()

    // The backup holds the writes and nothing else changed.
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after the writes")
    // The primary holds each touched block whole (writes + the backup's
    // bytes around partial writes); untouched blocks were never fetched.
    let primary = try r.primaryData()
    for b in 0..<r.blockCount {
      let range = r.blockRange(b)
      if touched.contains(b) {
        RRTBytes.assertEqual(primary[range], expected[range], "primary block \(b) (written)")
      } else if !RRTBytes.isZero(primary[range]) {
        XCTFail("primary block \(b) was never read or written but is not empty")
      }
    }
    XCTAssertEqual(try r.currentBlocks(), touched, "the map must mark exactly the written blocks")
    XCTAssertFalse(r.log.contains("failed"), r.log)
  }

  /// A device whose size is not a multiple of the block size: writes in the
  /// short last block, a cold read of it, and a merge that ends there.
  func testPartialLastBlockWritesReadsAndMerge() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let size = (16 << 20) + 5000
    let r = try running(size: size, seed: 33)
    let B = r.blockSize
    let last = r.blockCount - 1
    XCTAssertEqual(r.blockRange(last).count, 5000)
    let snap = try RRTCommand.shell("snapshot --quiet backup.img > s.stream", cwd: r.dir)
    XCTAssertEqual(snap.status, 0, snap.summary)
    // Inside the short block (brings it first), and a whole-block write of
    // block last-2 ending mid-way into last-1 … then the device's very end.
    let writes: [(Int, Data)] = [
      (size - 3000, RRTBytes.random(1000, seed: 331)),
      ((last - 2) * B + 10, RRTBytes.random(B, seed: 332)),
      (size - 1, Data([0x42])),
    ]
    for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("t\(i).bin"))) }
    let list = writes.enumerated().map { "(\($1.0), 't\($0).bin')" }.joined(separator: ", ")
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      for off, path in [\(list)]:
          h.pwrite(open(path, 'rb').read(), off)
      h.flush()
      print(h.get_size())
      """)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    XCTAssertEqual(w.lines.last, "\(size)")
    let expected = applying(writes, to: r.original)
    let touched = Set(writes.flatMap { r.blocks($0.0, $0.1.count) })
    XCTAssertEqual(touched, [last - 2, last - 1, last])
    let back = try r.readThroughExport(touched.sorted().map { (r.blockRange($0).lowerBound, r.blockRange($0).count) })
    for b in touched.sorted() {
      RRTBytes.assertEqual(back[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) through the export")
    }
    // The merge export takes the short last block whole.
    let m = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("s.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(m.status, 0, "merge-snapshot: \(m.summary)\nlog:\n\(r.log)")
    RRTBytes.assertEqual(try r.copyExport(to: "copy.img"), expected, "the whole export")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup")
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }

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

  // MARK: 4. qemu-img and qemu-io

  func testQemuImgCompareAndQemuIOThroughTheExport() throws {
    try require("nbdinfo", "qemu-img", "qemu-io")
    let r = try running(backup: RRTEnv.have("qemu-nbd") ? .qemuNBD : .nbdkit)
    let cmp = try RRTCommand.run("/usr/bin/qemu-img", ["compare", "-U", "-f", "raw", "-F", "raw", r.uri, r.backupPath])
    XCTAssertEqual(cmp.status, 0, "qemu-img compare export vs backup: \(cmp.summary)\nlog:\n\(r.log)")

    let io = try RRTCommand.run(
      "/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0xab 4096 8192", "-c", "read -P 0xab 4096 8192", r.uri])
    XCTAssertEqual(io.status, 0, io.summary)
    XCTAssertTrue(io.stdout.contains("wrote 8192/8192 bytes at offset 4096"), io.summary)
    XCTAssertTrue(io.stdout.contains("read 8192/8192 bytes at offset 4096"), io.summary)
    XCTAssertFalse(io.stdout.contains("Pattern verification failed"), io.summary)
    // The check can fail: another pattern does not verify.
    let wrong = try RRTCommand.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0xcd 4096 8192", r.uri])
    XCTAssertTrue(wrong.stdout.contains("Pattern verification failed"), wrong.summary)

    // The write reached the backup too: the export and the backup still agree.
    let again = try RRTCommand.run(
      "/usr/bin/qemu-img", ["compare", "-U", "-f", "raw", "-F", "raw", r.uri, r.backupPath])
    XCTAssertEqual(again.status, 0, "after the write: \(again.summary)")
    r.stopServer()
    let expected = applying([(4096, Data(repeating: 0xab, count: 8192))], to: r.original)
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after qemu-io")
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary after qemu-io")
    XCTAssertEqual(try r.bitmapDiff().status, 0)
  }

  // MARK: 5. fio

  func testFioRandomReadWriteWithVerification() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy", "fio")
    let r = try running()
    let f = try RRTCommand.run(
      "/usr/bin/fio",
      [
        "--name=rrt", "--ioengine=nbd", "--uri=\(r.uri)", "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=16M",
        "--verify=crc32c", "--fsync=32", "--runtime=20", "--randseed=42", "--output-format=json",
        "--output=\(r.s.path("fio.json"))",
      ], timeout: 120, cwd: r.dir)
    XCTAssertEqual(f.status, 0, "fio: \(f.summary)\nlog:\n\(r.log)")
    XCTAssertFalse(f.timedOut)
    let report = (try? String(contentsOfFile: r.s.path("fio.json"), encoding: .utf8)) ?? ""
    if let o = try? json(report), let jobs = o["jobs"] as? [[String: Any]], let job = jobs.first {
      XCTAssertEqual(job["error"] as? Int, 0, "\(job)")
      let written = (job["write"] as? [String: Any])?["io_bytes"] as? Int ?? 0
      XCTAssertGreaterThan(written, 1 << 20, "fio wrote too little to mean anything")
    } else {
      XCTFail("fio wrote no JSON report: \(report) \(f.summary)")
    }
    // While serving: the export is the backup, byte for byte.
    let copy = try r.copyExport(to: "copy.img")
    RRTBytes.assertEqual(copy, try r.backupData(), "the export vs the backup after fio")
    r.stopServer()
    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup after fio: \(diff.summary)")
    XCTAssertEqual(try r.mapStats()["set_blocks"] as? Int, r.blockCount)
  }

  // MARK: 6. Two clients at once

  func testConcurrentClientsSeeConsistentDataAndMirrorsAgree() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy", "nbdsh")
    let r = try running(size: 32 << 20, seed: 6)
    let B = r.blockSize
    // Two writers on disjoint blocks (whole blocks on even ones, unaligned
    // partial writes on odd ones) while nbdcopy reads the whole export.
    var evenWrites: [(Int, Data)] = []
    var oddWrites: [(Int, Data)] = []
    for k in 0..<48 {
      let even = 2 * (k * 5 % 240)
      evenWrites.append((even * B, RRTBytes.random(B, seed: 600 + UInt64(k))))
      let odd = 2 * (k * 7 % 240) + 1
      let off = odd * B + 17 * (k + 1)
      oddWrites.append((off, RRTBytes.random(4000 + 97 * k, seed: 700 + UInt64(k))))
    }
    // Each block once per writer.
    XCTAssertEqual(Set(evenWrites.map { $0.0 }).count, evenWrites.count)
    XCTAssertEqual(Set(oddWrites.map { $0.0 / B }).count, oddWrites.count)
    func script(_ writes: [(Int, Data)], _ name: String) throws -> String {
      for (i, w) in writes.enumerated() { try w.1.write(to: URL(fileURLWithPath: r.s.path("\(name)\(i).bin"))) }
      let list = writes.enumerated().map { "(\($1.0), '\(name)\($0).bin')" }.joined(separator: ", ")
      return """
        h.connect_uri(URI)
        for i, (off, path) in enumerate([\(list)]):
            h.pwrite(open(path, 'rb').read(), off)
            if i % 8 == 7:
                h.flush()
        h.flush()
        h.shutdown()
        print("OK")
        """
    }
    let a = try r.nbdshChild(try script(evenWrites, "even"), name: "writer-even")
    let b = try r.nbdshChild(try script(oddWrites, "odd"), name: "writer-odd")
    let copyPath = r.s.path("during.img")
    let copier = try RRTChild(
      name: "nbdcopy", executable: "/usr/bin/nbdcopy", arguments: [r.uri, copyPath], stdout: r.s.path("copy.out"),
      stderr: r.s.path("copy.err"))
    r.others.append(copier)
    for c in [a, b, copier] {
      let status = c.wait(timeout: 120)
      XCTAssertEqual(status, 0, "\(c.name): \(c.output) \(c.errors)\nlog:\n\(r.log)")
    }
    let expected = applying(evenWrites + oddWrites, to: r.original)
    // The copy made during the writes: each written range is all old or all new.
    let during = try Data(contentsOf: URL(fileURLWithPath: copyPath))
    XCTAssertEqual(during.count, r.size)
    if during.count == r.size {
      for (off, data) in evenWrites + oddWrites {
        let range = off..<off + data.count
        let seen = during[range]
        XCTAssertTrue(
          seen == data || seen == r.original[range], "bytes \(range) read during the writes are neither old nor new")
      }
      var mask = Data(count: r.size)
      for (off, data) in evenWrites + oddWrites {
        mask.replaceSubrange(off..<off + data.count, with: Data(repeating: 1, count: data.count))
      }
      // Bytes nobody wrote are the backup's.
      var bad = 0
      during.withUnsafeBytes { (d: UnsafeRawBufferPointer) in
        r.original.withUnsafeBytes { (o: UnsafeRawBufferPointer) in
          mask.withUnsafeBytes { (m: UnsafeRawBufferPointer) in
            for i in 0..<r.size where m[i] == 0 && d[i] != o[i] { bad += 1 }
          }
        }
      }
      XCTAssertEqual(bad, 0, "bytes outside the writes changed in the concurrent copy")
    }
    // Afterwards the export is exactly the backup with both writers' data.
    RRTBytes.assertEqual(try r.copyExport(to: "after.img"), expected, "the export after both writers")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), expected, "the backup after both writers")
    let diff = try r.bitmapDiff()
    XCTAssertEqual(diff.status, 0, "primary vs backup: \(diff.summary)")
  }

  // MARK: 7. TRIM and WRITE_ZEROES

  func testTrimAndWriteZeroesLeaveZerosOnBothSides() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running()
    let B = r.blockSize
    // (kind, offset, length): unaligned inside never-read blocks, whole
    // blocks, across a boundary, with FUA, at the device end.
    let ops: [(String, Int, Int)] = [
      ("trim", 12 * B + 100, 5000),
      ("trim", 14 * B, 2 * B),
      ("zero", 16 * B + B - 300, 600),
      ("zero", 18 * B, B),
      ("zerofua", 22 * B + 4096, 3 * B),
      ("trim", r.size - 1000, 1000),
    ]
    let calls = ops.map { "('\($0.0)', \($0.1), \($0.2))" }.joined(separator: ", ")
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      for kind, off, n in [\(calls)]:
          if kind == 'trim':
              h.trim(n, off)
          elif kind == 'zero':
              h.zero(n, off)
          else:
              h.zero(n, off, nbd.CMD_FLAG_FUA)
      h.flush()
      h.shutdown()
      print("OK")
      """)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    let expected = applying(ops.map { ($0.1, Data(count: $0.2)) }, to: r.original)
    let touched = Set(ops.flatMap { r.blocks($0.1, $0.2) })
    let back = try r.readThroughExport(touched.sorted().map { (r.blockRange($0).lowerBound, r.blockRange($0).count) })
    for b in touched.sorted() {
      RRTBytes.assertEqual(back[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) through the export")
    }
    r.stopServer()
    let backup = try r.backupData()
    let primary = try r.primaryData()
    RRTBytes.assertEqual(backup, expected, "the backup after TRIM and WRITE_ZEROES")
    for b in touched.sorted() {
      RRTBytes.assertEqual(primary[r.blockRange(b)], expected[r.blockRange(b)], "primary block \(b)")
    }
    for (kind, off, n) in ops {
      XCTAssertTrue(RRTBytes.isZero(backup[off..<off + n]), "\(kind) \(off)+\(n) not zero on the backup")
      XCTAssertTrue(RRTBytes.isZero(primary[off..<off + n]), "\(kind) \(off)+\(n) not zero on the primary")
    }
    XCTAssertEqual(try r.currentBlocks(), touched)
  }

  // MARK: 8. The merge export

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
    var rng = SeededRandom(seed: 4400)
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

  // MARK: 9. kill -9

  /// The byte at `q` of write `w`'s data (the writer's pattern: 16-byte
  /// records of LE32 w, i, 0x5EED0000 ^ w, i ^ 0xA5A5A5A5).
  @inline(__always)
  func patternByte(_ w: UInt32, _ q: Int) -> UInt8 {
    let i = UInt32(truncatingIfNeeded: q >> 4)
    let word: UInt32
    switch (q >> 2) & 3 {
    case 0: word = w
    case 1: word = i
    case 2: word = 0x5EED_0000 ^ w
    default: word = i ^ 0xA5A5_A5A5
    }
    return UInt8(truncatingIfNeeded: word >> (8 * UInt32(q & 3)))
  }

  /// The writer of the kill -9 and clean-stop tests (nbdsh; SEED and WBASE
  /// set before it; LO and HI keep its writes in [LO, HI), MAXN bounds
  /// their length). Batches of 8 non-overlapping writes in flight at once
  /// (random offsets and lengths, a quarter whole blocks), a FLUSH every
  /// third batch. Its output: `W id offset length` before a write is sent,
  /// `D id` once its whole batch completed, `S` before a FLUSH is sent,
  /// `F id` once it is acknowledged (every write up to id is then safe),
  /// `E message` when the connection fails.
  static let crashWriter = """
    import random
    rnd = random.Random(SEED)
    LO = globals().get('LO', 0)
    HI = globals().get('HI', SIZE)
    MAXN = globals().get('MAXN', 3 * B // 2)
    def pattern(w, n):
        k = (n + 15) // 16
        return b''.join(struct.pack('<IIII', w, i, 0x5EED0000 ^ w, i ^ 0xA5A5A5A5) for i in range(k))[:n]
    h.connect_uri(URI)
    print('READY', flush=True)
    w = WBASE
    batchno = 0
    try:
        while True:
            batch = []
            ranges = []
            for _ in range(8):
                # Writes in flight together never overlap: NBD does not order them.
                while True:
                    if MAXN >= B and rnd.random() < 0.25:
                        off = LO + rnd.randrange((HI - LO) // B) * B
                        n = min(B * rnd.choice([1, 1, 2]), HI - off)
                    else:
                        off = rnd.randrange(LO, HI - 1)
                        n = rnd.randrange(1, min(MAXN, HI - off) + 1)
                    if all(off + n <= a or b <= off for a, b in ranges):
                        break
                ranges.append((off, off + n))
                print('W', w, off, n, flush=True)
                buf = nbd.Buffer.from_bytearray(pattern(w, n))
                batch.append((h.aio_pwrite(buf, off), buf, w))
                w += 1
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c, buf, x in batch:
                h.aio_command_completed(c)
                print('D', x, flush=True)
            batchno += 1
            if batchno % 3 == 0:
                print('S', flush=True)
                h.flush()
                print('F', w - 1, flush=True)
    except nbd.Error as e:
        print('E', str(e.string).replace('\\n', ' '), flush=True)
    """

  struct WriterLog {
    var writes: [(id: UInt32, offset: Int, length: Int)] = []
    var acknowledgedThrough: Int64 = -1
    /// A write completed after the last flush was sent.
    var completedAfterLastFlushStarted = false
    var flushes = 0
    /// Writes whose completion the writer saw.
    var completed = Set<UInt32>()

    init(_ text: String) {
      var doneSinceFlushStart = false
      for line in text.split(separator: "\n") {
        let p = line.split(separator: " ")
        switch p.first {
        case "W":
          if p.count == 4, let id = UInt32(p[1]), let off = Int(p[2]), let n = Int(p[3]) {
            writes.append((id, off, n))
          }
        case "D":
          doneSinceFlushStart = true
          if p.count == 2, let id = UInt32(p[1]) { completed.insert(id) }
        case "S":
          doneSinceFlushStart = false
        case "F":
          if p.count == 2, let id = Int64(p[1]) { acknowledgedThrough = id }
          flushes += 1
        default: break
        }
      }
      completedAfterLastFlushStarted = doneSinceFlushStart
    }
  }

  /// The parts of each write no later write covers: [(write index, start, end)].
  func visibleParts(_ writes: [(id: UInt32, offset: Int, length: Int)]) -> [(Int, Int, Int)] {
    var covered: [(Int, Int)] = []  // sorted, disjoint
    var parts: [(Int, Int, Int)] = []
    for k in stride(from: writes.count - 1, through: 0, by: -1) {
      let s = writes[k].offset
      let e = s + writes[k].length
      var cursor = s
      for (cs, ce) in covered where ce > s && cs < e {
        if cs > cursor { parts.append((k, cursor, cs)) }
        cursor = max(cursor, ce)
      }
      if cursor < e { parts.append((k, cursor, e)) }
      // Insert [s, e) into covered, merging.
      var merged: [(Int, Int)] = []
      var ns = s
      var ne = e
      var placed = false
      for (cs, ce) in covered {
        if ce < ns {
          merged.append((cs, ce))
        } else if cs > ne {
          if !placed {
            merged.append((ns, ne))
            placed = true
          }
          merged.append((cs, ce))
        } else {
          ns = min(ns, cs)
          ne = max(ne, ce)
        }
      }
      if !placed { merged.append((ns, ne)) }
      covered = merged
    }
    return parts
  }

  func formatted(_ x: Double) -> String { String(format: "%.2f", x) }

  /// Checks that the bytes of `parts` hold their writes' patterns in
  /// `images` (name, content); returns a failure description or nil.
  func checkParts(
    _ parts: [(Int, Int, Int)], of writes: [(id: UInt32, offset: Int, length: Int)], in images: [(String, Data)],
    original: Data? = nil
  ) -> String? {
    var report: [String] = []
    for (name, image) in images {
      var bad = 0
      var first = ""
      var badRanges: [(Int, Int)] = []
      image.withUnsafeBytes { (t: UnsafeRawBufferPointer) in
        for (k, s, e) in parts {
          let w = writes[k]
          for p in s..<e where t[p] != patternByte(w.id, p - w.offset) {
            bad += 1
            if let l = badRanges.last, l.1 == p {
              badRanges[badRanges.count - 1].1 = p + 1
            } else {
              badRanges.append((p, p + 1))
            }
            if first.isEmpty {
              first =
                "write \(w.id) (\(w.offset)+\(w.length)) at byte \(p): \(whoseData(t, at: p, writeOffset: w.offset, original: original))"
            }
          }
        }
      }
      if bad > 0 {
        let ranges = badRanges.prefix(8).map { "\($0.0)..<\($0.1)" }.joined(separator: " ")
        report.append("\(bad) bytes wrong \(name) (\(ranges)), first: \(first)")
      }
    }
    return report.isEmpty ? nil : report.joined(separator: "; ")
  }

  /// What the image holds at `p`: the record of some write, or the
  /// original backup bytes.
  func whoseData(_ t: UnsafeRawBufferPointer, at p: Int, writeOffset: Int, original: Data?) -> String {
    if let original, t[p] == original[p], p + 16 <= t.count,
      (0..<16).allSatisfy({ t[p + $0] == original[p + $0] })
    {
      return "holds the original backup bytes"
    }
    // Writes start anywhere: try every alignment of a 16-byte record.
    for shift in 0..<16 where p - shift >= 0 && p - shift + 16 <= t.count {
      let r = p - shift
      func le32(_ o: Int) -> UInt32 {
        UInt32(t[r + o]) | UInt32(t[r + o + 1]) << 8 | UInt32(t[r + o + 2]) << 16 | UInt32(t[r + o + 3]) << 24
      }
      let w = le32(0)
      let i = le32(4)
      if le32(8) == 0x5EED_0000 ^ w && le32(12) == i ^ 0xA5A5_A5A5 {
        return "holds record \(i) of write \(w) (which began at \(r - Int(i) * 16))"
      }
    }
    return "holds bytes of no write"
  }

  /// Rounds of: a writer with random writes and periodic flushes, kill -9 of
  /// the server after a seeded random 0.2-1.5 s (and of the backup server
  /// too, with `killBackup`), a restart with the same arguments, and checks.
  func crashRounds(_ r: RRTRig, rounds: Int, seed: UInt64, killBackup: Bool) throws {
    var rng = SeededRandom(seed: seed)
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

  // MARK: 10. Bad input

  func testRequestsPastTheEndGetErrorRepliesAndTheServerGoesOn() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running()
    let out = try r.nbdsh(
      """
      h.set_strict_mode(0)
      h.connect_uri(URI)
      res = {}
      def attempt(name, f):
          try:
              f()
              res[name] = 'ok'
          except nbd.Error as e:
              res[name] = e.errno or e.string
      attempt('read_across_end', lambda: h.pread(4096, SIZE - 1024))
      attempt('read_past_end', lambda: h.pread(512, SIZE))
      attempt('read_far', lambda: h.pread(512, 1 << 62))
      attempt('write_across_end', lambda: h.pwrite(b'x' * 4096, SIZE - 100))
      attempt('trim_past_end', lambda: h.trim(B, SIZE))
      attempt('zero_past_end', lambda: h.zero(B, SIZE - B // 2))
      res['next_read'] = h.pread(4096, SIZE - 4096) == open('backup.img', 'rb').read()[SIZE - 4096:]
      h.flush()
      res['flush'] = 'ok'
      print(json.dumps(res))
      """)
    XCTAssertEqual(out.status, 0, out.summary)
    let o = try json(out.lines.last ?? "")
    XCTAssertEqual(o["read_across_end"] as? String, "EINVAL", "\(o)")
    XCTAssertEqual(o["read_past_end"] as? String, "EINVAL", "\(o)")
    XCTAssertEqual(o["read_far"] as? String, "EINVAL", "\(o)")
    XCTAssertEqual(o["write_across_end"] as? String, "ENOSPC", "\(o)")
    XCTAssertNotEqual(o["trim_past_end"] as? String, "ok", "\(o)")
    XCTAssertNotEqual(o["zero_past_end"] as? String, "ok", "\(o)")
    XCTAssertEqual(o["next_read"] as? Bool, true, "\(o)")
    XCTAssertEqual(o["flush"] as? String, "ok")
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri]).status, 0, "the server stopped serving")
    r.stopServer()
    // The refused requests changed nothing; only the block read is current.
    RRTBytes.assertEqual(try r.backupData(), r.original, "refused requests changed the backup")
    XCTAssertEqual(try r.currentBlocks(), [r.blockCount - 1])
  }

  func testMismatchedMapsAndBackupsAreRefusedAtStart() throws {
    try require("nbdkit", "nbdinfo")
    let r = try RRTRig(size: 16 << 20, seed: 10)
    rigs.append(r)
    try r.startBackup(.nbdkit())
    func start(map: String, backup: String? = nil) throws -> RRTCommand.Result {
      try RRTCommand.run(
        "restore-read-through",
        ["--backup", backup ?? r.backupURI, "--map", map, "--socket", r.s.path("x.sock"), r.primaryPath], timeout: 20)
    }
    func assertRefused(_ res: RRTCommand.Result, _ fragment: String, file: StaticString = #filePath, line: UInt = #line)
    {
      XCTAssertFalse(res.timedOut, "started serving instead of refusing: \(res.summary)", file: file, line: line)
      XCTAssertNotEqual(res.status, 0, res.summary, file: file, line: line)
      XCTAssertNotEqual(res.status, 64, "not a usage error: \(res.summary)", file: file, line: line)
      XCTAssertTrue(res.stderr.contains(fragment), "stderr lacks '\(fragment)': \(res.summary)", file: file, line: line)
      XCTAssertEqual(
        res.stderr.split(separator: "\n").count, 1, "one sentence: \(res.stderr)", file: file, line: line)
    }
    // A map of another size.
    let other = r.s.path("other-size.map")
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["create", "--size", "32M", other]).status, 0)
    let before = try Data(contentsOf: URL(fileURLWithPath: other))
    assertRefused(try start(map: other), "describes 33554432 bytes")
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: other)), before, "a refused map was changed")

    // A map of another device (with blocks set: not a fresh one).
    let foreign = r.s.path("foreign.map")
    XCTAssertEqual(
      try RRTCommand.run("overwrite-map", ["create", "--size", "16M", "--name", "/dev/other", foreign]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["set", foreign, "0", "64K"]).status, 0)
    let foreignBefore = try Data(contentsOf: URL(fileURLWithPath: foreign))
    assertRefused(try start(map: foreign), "/dev/other")
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: foreign)), foreignBefore)
    XCTAssertFalse(
      FileManager.default.fileExists(atPath: foreign + ".al"), "an activity log was made for a refused map")

    // A backup of another size (the map is not even created).
    let big = r.s.path("big.img")
    try r.makeSparse(big, size: 32 << 20)
    let bigSocket = r.s.path("big.sock")
    let bigServer = try RRTChild(
      name: "nbdkit big", executable: "/usr/bin/nbdkit", arguments: ["-f", "-U", bigSocket, "file", big],
      stdout: r.s.path("big.out"), stderr: r.s.path("big.log"))
    r.others.append(bigServer)
    try r.waitForNBD("nbd+unix:///?socket=\(bigSocket)", process: bigServer, what: "the second nbdkit")
    let fresh = r.s.path("fresh.map")
    assertRefused(try start(map: fresh, backup: "nbd+unix:///?socket=\(bigSocket)"), "33554432")
    XCTAssertFalse(FileManager.default.fileExists(atPath: fresh), "a map was created for a refused backup")

    // An unreachable backup.
    let gone = try start(map: fresh, backup: "nbd+unix:///?socket=\(r.s.path("nobody.sock"))")
    XCTAssertFalse(gone.timedOut, gone.summary)
    XCTAssertEqual(gone.status, 1, gone.summary)

    // A fresh map made for another name is bound to this primary.
    let unbound = r.s.path("unbound.map")
    XCTAssertEqual(
      try RRTCommand.run("overwrite-map", ["create", "--size", "16M", "--name", "/dev/other", unbound]).status, 0)
    let bind = try RRTChild(
      name: "rrt bind", executable: Tools.path("restore-read-through"),
      arguments: ["--backup", r.backupURI, "--map", unbound, "--socket", r.s.path("u.sock"), r.primaryPath],
      stdout: r.s.path("u.out"), stderr: r.s.path("u.log"))
    r.others.append(bind)
    try r.waitForNBD(
      "nbd+unix:///?socket=\(r.s.path("u.sock"))", process: bind, what: "restore-read-through (fresh map)")
    XCTAssertEqual(bind.stop(grace: 20), 0, bind.errors)
    XCTAssertTrue(bind.errors.contains("bound the fresh map"), bind.errors)
    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", unbound])
    XCTAssertEqual(try json(stats.stdout)["device_name"] as? String, r.primaryPath)
  }

  func testUsageErrorsExit64() throws {
    let s = try Scratch()
    let primary = s.path("p.img")
    _ = FileManager.default.createFile(atPath: primary, contents: Data(count: 65536))
    let cases: [[String]] = [
      ["--backup", "nbd+unix:///?socket=/nonexistent", "--map", s.path("m.map"), primary],
      [
        "--backup", "nbd+unix:///?socket=/nonexistent", "--map", s.path("m.map"), "--socket", s.path("a.sock"),
        "--listen", "127.0.0.1:0", primary,
      ],
      ["--map", s.path("m.map"), "--socket", s.path("a.sock"), primary],
      ["--backup", "nbd+unix:///?socket=/nonexistent", "--socket", s.path("a.sock"), primary],
      ["--backup", "nbd+unix:///?socket=/x", "--map", s.path("m.map"), "--socket", s.path("a.sock")],
      [
        "--backup", "nbd+unix:///?socket=/x", "--map", s.path("m.map"), "--socket", s.path("a.sock"),
        "--hydrate-rate", "1M", primary,
      ],
    ]
    for (i, args) in cases.enumerated() {
      let r = try RRTCommand.run("restore-read-through", args, timeout: 20)
      XCTAssertEqual(r.status, 64, "case \(i) \(args): \(r.summary)")
      XCTAssertFalse(r.stderr.isEmpty, "case \(i): no message")
      XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("m.map")), "case \(i) created the map")
    }
    let none = try RRTCommand.run("restore-read-through", cases[0], timeout: 20)
    XCTAssertTrue(none.stderr.contains("exactly one of --socket"), none.stderr)
    let help = try RRTCommand.run("restore-read-through", ["--help"])
    XCTAssertEqual(help.status, 0)
    XCTAssertTrue(help.stdout.contains("merge"), help.stdout)
  }

  // MARK: 11. Link trouble

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
    var rng = SeededRandom(seed: seed)
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

  // MARK: 12. A live ext4 disk through nbdfuse and a loop device

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
