// restore-read-through refusing bad input without harm: requests past the
// end get error replies and the server goes on; maps and backups that do not
// fit are refused at start in one sentence, the map untouched; usage errors
// exit 64 and create nothing.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreUsageCLITests: RestoreCLITestCase {
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
}
