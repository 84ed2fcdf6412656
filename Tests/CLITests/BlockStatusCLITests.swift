// Structured replies and BLOCK_STATUS (base:allocation) of the toolkit's NBD
// server, end to end: restore-read-through with nbdkit as the backup, and
// the tracking server, against libnbd (nbdsh, nbdinfo, nbdcopy) and
// qemu-img, plus a raw Python client for the negotiation's error paths and
// the exact layout of reply chunks.
//
// What must hold: a run said to be zero reads as zeros (clients skip it), so
// a block that is not current is never reported as a hole even where the
// empty primary has one; current blocks report the primary's holes; the
// contexts are negotiated as the protocol says; READ replies are structured
// once structured replies are agreed, whichever way their data is sent.

import Foundation
import Glibc
import TestSupport
import XCTest

final class BlockStatusCLITests: CLITestCase {
  private func running(size: Int = 16 << 20) throws -> RRTRig {
    let r = try RRTRig(size: size, seed: 7)
    rigs.append(r)
    try r.startBackup(.nbdkit())
    try r.startServer()
    return r
  }

  /// base:allocation of the whole export as [(offset, length, flags)], from nbdsh.
  private func extents(_ r: RRTRig, uri: String? = nil) throws -> [(Int, Int, Int)] {
    let res = try r.nbdsh(
      """
      h.add_meta_context("base:allocation")
      h.connect_uri(URI)
      assert h.can_meta_context("base:allocation")
      out = []
      off = 0
      def cb(meta, o, entries, err):
          global off
          for i in range(0, len(entries), 2):
              out.append((off, entries[i], entries[i + 1]))
              off += entries[i]
      while off < SIZE:
          h.block_status(SIZE - off, off, cb)
      print(json.dumps(out))
      """, uri: uri)
    XCTAssertEqual(res.status, 0, res.summary)
    let list = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(res.stdout.utf8)) as? [[Int]], res.summary)
    return list.map { ($0[0], $0[1], $0[2]) }
  }

  func testHolesAreReportedOnlyWhereBlocksAreCurrent() throws {
    try require("nbdkit", "nbdsh", "nbdcopy")
    let r = try running()
    let B = r.blockSize
    // Blocks 0-3 written (current, data on the primary); blocks 10-11
    // trimmed (current, zeros: a hole in the primary image); the rest not
    // current, though the empty primary is a hole there and the backup has
    // zeros at blocks 100-107.
    let data = RRTBytes.random(4 * B, seed: 99)
    try data.write(to: URL(fileURLWithPath: r.s.path("w.bin")))
    let w2 = try r.nbdsh(
      """
      h.connect_uri(URI)
      h.pwrite(open(\(rrtPython(r.s.path("w.bin"))), "rb").read(), 0)
      h.trim(2 * B, 10 * B)
      h.flush()
      print("OK")
      """)
    XCTAssertEqual(w2.status, 0, w2.summary)

    let runs = try extents(r)
    XCTAssertEqual(runs.map { $0.0 + $0.1 }.last, r.size, "the runs do not cover the export: \(runs)")
    let zeroed = runs.filter { $0.2 & 2 != 0 }.map { $0.0..<$0.0 + $0.1 }
    XCTAssertEqual(zeroed, [10 * B..<12 * B], "only the trimmed current blocks are holes: \(runs)")
    XCTAssertEqual(runs.first?.2, 0)
    for run in runs where run.2 != 0 {
      XCTAssertEqual(run.2, 3, "a hole reads as zeros: \(runs)")
    }

    // nbdcopy skips what is reported zero; its copy must still be exact.
    var expected = r.original
    expected.replaceSubrange(0..<4 * B, with: data)
    expected.replaceSubrange(10 * B..<12 * B, with: Data(count: 2 * B))
    let copy = try r.copyExport(to: "copy.img")
    RRTBytes.assertEqual(copy, expected, "nbdcopy of the export (holes skipped)")

    // Once every block is current, the fetched zeros of the backup are data
    // on the primary, and the trimmed blocks still a hole.
    let after = try extents(r)
    XCTAssertEqual(after.filter { $0.2 != 0 }.map { $0.0..<$0.0 + $0.1 }, [10 * B..<12 * B], "\(after)")
    r.stopServer()
  }

  func testADeviceEndingInsideItsLastBlockIsCoveredExactly() throws {
    try require("nbdkit", "nbdsh", "nbdcopy")
    let size = (16 << 20) + 5000
    let r = try running(size: size)
    XCTAssertEqual(try extents(r).map { [$0.0, $0.1, $0.2] }, [[0, size, 0]])
    // Every block current (the short last one too), then the last two trimmed.
    RRTBytes.assertEqual(try r.copyExport(to: "copy.img"), r.original, "nbdcopy of the export")
    let t = try r.nbdsh("h.connect_uri(URI)\nh.trim(SIZE - (16 << 20) + B, (16 << 20) - B)\nh.flush()\nprint('OK')")
    XCTAssertEqual(t.status, 0, t.summary)
    let runs = try extents(r)
    XCTAssertEqual(runs.map { $0.0 + $0.1 }.last, size, "\(runs)")
    XCTAssertEqual(runs.first.map { [$0.0, $0.1, $0.2] }, [0, (16 << 20) - r.blockSize, 0], "\(runs)")
    var expected = r.original
    expected.replaceSubrange((16 << 20) - r.blockSize..<size, with: Data(count: size - (16 << 20) + r.blockSize))
    RRTBytes.assertEqual(try r.copyExport(to: "copy2.img"), expected, "nbdcopy after the trim")
    r.stopServer()
  }

  func testQemuImgMapAndNbdinfoAgree() throws {
    try require("nbdkit", "nbdsh", "nbdinfo", "qemu-img")
    let r = try running()
    let B = r.blockSize
    let t = try r.nbdsh("h.connect_uri(URI)\nh.trim(4 * B, 20 * B)\nh.flush()\nprint('OK')")
    XCTAssertEqual(t.status, 0, t.summary)
    let q = try RRTCommand.run("/usr/bin/qemu-img", ["map", "--output=json", "-f", "raw", r.uri], timeout: 60)
    XCTAssertEqual(q.status, 0, q.summary)
    let map = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(q.stdout.utf8)) as? [[String: Any]], q.summary)
    let zero = map.filter { $0["zero"] as? Bool == true }.map {
      ($0["start"] as! Int)..<($0["start"] as! Int) + ($0["length"] as! Int)
    }
    XCTAssertEqual(zero, [20 * B..<24 * B], q.stdout)
    let n = try RRTCommand.run("/usr/bin/nbdinfo", ["--map", r.uri], timeout: 60)
    XCTAssertEqual(n.status, 0, n.summary)
    let holes = n.lines.filter { $0.contains("hole") }
    XCTAssertEqual(holes.count, 1, n.stdout)
    XCTAssertTrue(holes.first?.contains("\(20 * B)") == true, n.stdout)
    r.stopServer()
  }

  func testTrackingServerReportsTheDevicesHoles() throws {
    try require("nbdsh")
    let r = try RRTRig(size: 8 << 20, seed: 3)
    rigs.append(r)
    // A device image with data in its first and last MiB and a hole between.
    let image = r.s.path("device.img")
    try r.makeSparse(image, size: 8 << 20)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
    try h.write(contentsOf: RRTBytes.random(1 << 20, seed: 5))
    try h.seek(toOffset: 7 << 20)
    try h.write(contentsOf: RRTBytes.random(1 << 20, seed: 6))
    try h.close()
    let socket = r.s.path("t.sock")
    let child = try RRTChild(
      name: "tracking-server", executable: Tools.path("tracking-server"),
      arguments: ["serve", "--changes", r.s.path("c.map"), "--socket", socket, image],
      stdout: r.s.path("t.out"), stderr: r.s.path("t.log"))
    r.others.append(child)
    let uri = "nbd+unix:///device?socket=\(socket)"
    try r.waitForNBD(uri, process: child, what: "tracking-server")
    let runs = try extents(r, uri: uri)
    XCTAssertEqual(
      runs.map { [$0.0, $0.1, $0.2] }, [[0, 1 << 20, 0], [1 << 20, 6 << 20, 3], [7 << 20, 1 << 20, 0]], "\(runs)")
    // The view export, frozen or not, claims no holes it cannot stand by.
  }

  /// A raw client: the negotiation's refusals and the reply chunks' layout.
  func testNegotiationAndChunkLayoutOnTheWire() throws {
    try require("nbdkit", "python3")
    let r = try running()
    let script = """
      import socket, struct, sys
      s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
      def rd(n):
          b = b""
          while len(b) < n:
              c = s.recv(n - len(b))
              if not c: raise SystemExit("closed")
              b += c
          return b
      assert rd(16)[:8] == b"NBDMAGIC"; flags = struct.unpack(">H", rd(2))[0]
      s.sendall(struct.pack(">I", 3))
      def opt(o, data=b""):
          s.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)
          out = []
          while True:
              magic, ro, rt, n = struct.unpack(">QIII", rd(20)); d = rd(n)
              out.append((rt, d))
              if rt != 4 and rt != 3 and rt != 2: return out
      def ctx(name, queries):
          b = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
          for q in queries: b += struct.pack(">I", len(q)) + q
          return b
      E = lambda v: 0x80000000 | v
      # Contexts before structured replies: invalid.
      print("early", opt(10, ctx(b"primary", [b"base:allocation"]))[-1][0] == E(3))
      print("sr", opt(8)[-1][0] == 1)
      l = opt(9, ctx(b"primary", []))
      print("list", [(t, d[4:]) for t, d in l] == [(4, b"base:allocation"), (1, b"")])
      print("unknown", opt(10, ctx(b"nosuch", [b"base:allocation"]))[-1][0] == E(6))
      print("malformed", opt(10, b"\\0\\0\\0\\x09primary")[-1][0] == E(3))
      sl = opt(10, ctx(b"primary", [b"x-other:thing", b"base:allocation"]))
      print("set", [(t, d) for t, d in sl] == [(4, struct.pack(">I", 1) + b"base:allocation"), (1, b"")])
      go = opt(7, struct.pack(">I", 7) + b"primary" + struct.pack(">H", 0))
      print("go", go[-1][0] == 1)
      tflags = lambda replies: [struct.unpack(">H", d[10:12])[0] for t, d in replies if t == 3 and d[:2] == b"\\0\\0"][0]
      print("df offered", tflags(go) & 0x80 != 0)
      def req(t, off, n, f=0, cookie=1):
          s.sendall(struct.pack(">IHHQQI", 0x25609513, f, t, cookie, off, n))
      def chunk():
          magic, fl, ty, ck, n = struct.unpack(">IHHQI", rd(20))
          return magic, fl, ty, ck, rd(n)
      backup = open(sys.argv[2], "rb").read()
      for n in (4096, 1 << 20):
          req(0, 65536, n, cookie=n)
          m, fl, ty, ck, p = chunk()
          print("read", n, m == 0x668e33ef and fl == 1 and ty == 1 and ck == n and p[:8] == struct.pack(">Q", 65536) and p[8:] == backup[65536:65536 + n])
      # DF: the data in one chunk (as always); on other commands refused.
      req(0, 12345, 70000, f=4, cookie=6)
      m, fl, ty, ck, p = chunk()
      print("read df", fl == 1 and ty == 1 and ck == 6 and p[8:] == backup[12345:12345 + 70000])
      req(3, 0, 0, f=4, cookie=6)
      magic, err, ck = struct.unpack(">IIQ", rd(16))
      print("flush df", magic == 0x67446698 and err == 22)
      req(0, (16 << 20) - 1024, 4096, cookie=7)
      m, fl, ty, ck, p = chunk()
      print("error", ty == 0x8001 and fl == 1 and ck == 7 and struct.unpack(">I", p[:4])[0] == 22)
      req(0, 0, 0, cookie=8)
      m, fl, ty, ck, p = chunk()
      print("empty", ty == 0 and fl == 1 and p == b"")
      req(7, 0, 16 << 20, f=8, cookie=9)
      m, fl, ty, ck, p = chunk()
      print("reqone", ty == 5 and fl == 1 and len(p) == 12 and struct.unpack(">I", p[:4])[0] == 1)
      req(7, 0, 16 << 20, cookie=10)
      m, fl, ty, ck, p = chunk()
      total = sum(struct.unpack(">I", p[i:i + 4])[0] for i in range(4, len(p), 8))
      print("status", ty == 5 and 0 < total <= 16 << 20)
      # A flag BLOCK_STATUS alone takes, on a READ: refused.
      req(0, 0, 4096, f=8, cookie=11)
      m, fl, ty, ck, p = chunk()
      print("badflag", ty == 0x8001 and struct.unpack(">I", p[:4])[0] == 22)
      # Other commands keep simple replies.
      req(3, 0, 0, cookie=12)
      magic, err, ck = struct.unpack(">IIQ", rd(16))
      print("flush", magic == 0x67446698 and err == 0 and ck == 12)
      s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
      # Contexts set for one export do not follow the client to another.
      s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
      rd(18); s.sendall(struct.pack(">I", 3))
      opt(8); opt(10, ctx(b"primary", [b"base:allocation"]))
      opt(7, struct.pack(">I", 5) + b"merge" + struct.pack(">H", 0))
      req(7, 0, 65536, cookie=13)
      m, fl, ty, ck, p = chunk()
      print("elsewhere", ty == 0x8001 and struct.unpack(">I", p[:4])[0] == 22)
      s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
      # Without structured replies DF is neither offered nor taken.
      s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
      rd(18); s.sendall(struct.pack(">I", 3))
      go = opt(7, struct.pack(">I", 7) + b"primary" + struct.pack(">H", 0))
      print("df simple", tflags(go) & 0x80 == 0)
      req(0, 0, 4096, f=4, cookie=14)
      magic, err, ck = struct.unpack(">IIQ", rd(16))
      print("read df simple", magic == 0x67446698 and err == 22 and ck == 14)
      s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
      """
    let res = try RRTCommand.run("/usr/bin/python3", ["-c", script, r.socket, r.backupPath], timeout: 60)
    XCTAssertEqual(res.status, 0, res.summary)
    let expected = [
      "early", "sr", "list", "unknown", "malformed", "set", "go", "df offered", "read 4096", "read 1048576", "read df",
      "flush df", "error", "empty", "reqone", "status", "badflag", "flush", "elsewhere", "df simple", "read df simple",
    ]
    for key in expected {
      XCTAssertTrue(res.lines.contains("\(key) True"), "\(key): \(res.stdout)\n\(res.stderr)")
    }

    r.stopServer()
  }
}
