// Writes through restore-read-through's export: partial and whole blocks,
// the short last block, fio with verification, two writers and a reader at
// once, TRIM and WRITE_ZEROES. Writes reach the primary and the backup;
// partial writes bring their block first; TRIM and WRITE_ZEROES leave zeros
// on both sides; the map marks exactly the blocks worked on.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreWritesCLITests: RestoreCLITestCase {
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

  // MARK: fio

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

  // MARK: Two clients at once

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

  // MARK: TRIM and WRITE_ZEROES

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
}
