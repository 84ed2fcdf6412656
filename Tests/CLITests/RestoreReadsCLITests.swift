// restore-read-through as its clients see it: nbdinfo's size, flags and two
// exports, the export over TCP, a cold read of the whole export, and qemu-img
// compare and qemu-io through it. Reads through the export give the backup's
// bytes and make their blocks current on the primary; asking about the
// exports reads nothing.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreReadsCLITests: RestoreCLITestCase {
  // MARK: What nbdinfo sees

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

  // MARK: Cold read

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

  // MARK: qemu-img and qemu-io

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
}
