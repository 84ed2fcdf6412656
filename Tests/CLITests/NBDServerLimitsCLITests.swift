// The NBD server against hostile or broken clients, through
// restore-read-through: too many connections, a client that says nothing or
// stops half way, garbage, floods and oversized requests, and the Unix
// socket it listens on. Clients are raw Python sockets.

import Foundation
import Glibc
import TestSupport
import XCTest

final class NBDServerLimitsCLITests: XCTestCase {
  var rig: RRTRig!

  override func setUpWithError() throws {
    for tool in ["nbdkit", "nbdinfo", "python3"] where !RRTEnv.have(tool) {
      throw XCTSkip("\(tool) is needed for the server limit tests")
    }
    rig = try RRTRig(size: 40 << 20, seed: 91)
    try rig.startBackup()
  }

  override func tearDown() { rig?.stopAll() }

  /// Runs a Python client against the server's socket; `PATH` is the socket.
  func python(_ body: String, extra: [String] = [], timeout: Double = 60) throws -> RRTCommand.Result {
    let script = NBDServerLimitsCLITests.prologue + body
    return try RRTCommand.run("/usr/bin/python3", ["-c", script, rig.socket] + extra, timeout: timeout)
  }

  static let prologue = #"""
    import socket, struct, sys, time
    PATH = sys.argv[1]
    OPT = 0x49484156454F5054
    def connect(timeout=20):
        s = socket.socket(socket.AF_UNIX); s.settimeout(timeout); s.connect(PATH)
        return s
    def recvall(s, n):
        b = b""
        while len(b) < n:
            try:
                c = s.recv(n - len(b))
            except (ConnectionResetError, BrokenPipeError):
                return b
            if not c: return b
            b += c
        return b
    def closed_within(s, seconds):
        # Seconds until the server closes the connection, or None.
        start = time.monotonic(); s.settimeout(seconds)
        try:
            while True:
                c = s.recv(65536)
                if not c: return time.monotonic() - start
        except socket.timeout:
            return None
        except ConnectionResetError:
            return time.monotonic() - start
    def greet(s):
        assert len(recvall(s, 18)) == 18
        s.sendall(struct.pack(">I", 3))
    def go(s):
        # NBD_OPT_GO for the default export; returns the export size.
        s.sendall(struct.pack(">QII", OPT, 7, 6) + struct.pack(">IH", 0, 0))
        size = None
        while True:
            _, _, t, n = struct.unpack(">QIII", recvall(s, 20))
            data = recvall(s, n)
            if t == 3 and struct.unpack(">H", data[:2])[0] == 0: size = struct.unpack(">Q", data[2:10])[0]
            if t == 1: return size
            assert t < 0x80000000, hex(t)
    def session():
        s = connect(); greet(s); size = go(s); return s, size
    def request(s, cmd, offset, length, cookie=1, flags=0, magic=0x25609513):
        s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length))
    def reply(s):
        h = recvall(s, 16)
        if len(h) < 16: return None
        _, err, cookie = struct.unpack(">IIQ", h)
        return err, cookie

    """#

  @discardableResult
  func start(_ extra: [String]) throws -> RRTChild {
    try rig.startServer(extra + ["--progress-interval", "0"])
  }

  // MARK: Connections

  func testExtraConnectionsAreRefusedCleanly() throws {
    try start(["--max-connections", "2"])
    let r = try python(
      """
      a, _ = session(); b, _ = session()
      c = connect()
      print("third", "closed" if recvall(c, 18) == b"" else "served")
      a.close(); time.sleep(0.3)
      d, size = session()
      print("after one left", "served" if size else "refused")
      """)
    XCTAssertEqual(r.lines, ["third closed", "after one left served"], r.summary)
    XCTAssertTrue(rig.log.contains("refused a connection: 2 connections are open, the most allowed"), rig.log)
    rig.stopServer()
  }

  func testSilentAndStalledClientsAreDisconnected() throws {
    try start(["--handshake-timeout", "1", "--idle-timeout", "2", "--stall-timeout", "1"])
    let r = try python(
      """
      s = connect(); recvall(s, 18)
      t = closed_within(s, 10); print("silent in the handshake", t is not None and 0.5 < t < 3)
      # A trickle of one byte at a time does not extend the handshake.
      s = connect(); recvall(s, 18); start = time.monotonic(); gone = None
      for i in range(40):
          try:
              s.send(b"\\0")
          except OSError:
              gone = time.monotonic() - start; break
          time.sleep(0.1)
      print("trickling handshake", gone is not None and gone < 3)
      s, _ = session(); t = closed_within(s, 10); print("idle in transmission", t is not None and 1.5 < t < 4)
      s, _ = session(); s.sendall(struct.pack(">IH", 0x25609513, 0))
      t = closed_within(s, 10); print("half a request", t is not None and t < 3)
      s, _ = session(); request(s, 1, 0, 1 << 20); s.sendall(b"x" * 4096)
      t = closed_within(s, 10); print("half a write", t is not None and t < 3)
      """)
    XCTAssertEqual(
      r.lines,
      [
        "silent in the handshake True", "trickling handshake True", "idle in transmission True",
        "half a request True", "half a write True",
      ], r.summary)
    let log = rig.log
    XCTAssertTrue(log.contains("the handshake took longer than 1 s"), log)
    XCTAssertTrue(log.contains("idle for 2 s; disconnected"), log)
    XCTAssertTrue(log.contains("stopped in the middle of a request for 1 s"), log)
    rig.stopServer()
  }

  func testIdleClientsStayByDefault() throws {
    try start([])
    let r = try python(
      """
      s, size = session(); t = closed_within(s, 3); print("still connected", t is None)
      request(s, 0, 0, 4096, cookie=7); print(reply(s))
      """)
    XCTAssertEqual(r.lines, ["still connected True", "(0, 7)"], r.summary)
    rig.stopServer()
  }

  func testTLSClientsMeetTheSameLimits() throws {
    guard RRTEnv.have("openssl") else { throw XCTSkip("openssl is needed") }
    let certs = try TLSCertificates(in: rig.dir)
    let logPath = rig.s.path("tls-limits.log")
    let server = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--tls", "require", "--tls-certificates", certs.pki, "--handshake-timeout", "1", "--idle-timeout", "2",
        "--stall-timeout", "1", "--progress-interval", "0", "--backup", rig.backupURI, "--map", rig.mapPath,
        "--socket", rig.socket, rig.primaryPath,
      ], stdout: rig.s.path("tls-limits.out"), stderr: logPath)
    rig.others.append(server)
    try rig.waitForNBD(
      "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.client)", process: server, what: "the TLS server")
    let r = try python(
      """
      import ssl
      CA = sys.argv[2]
      def starttls(s):
          greet(s); s.sendall(struct.pack(">QII", OPT, 5, 0))
          _, _, t, n = struct.unpack(">QIII", recvall(s, 20)); assert t == 1, hex(t)
          c = ssl.create_default_context(cafile=CA)
          return c.wrap_socket(s, server_hostname="localhost")
      # STARTTLS acknowledged, then no TLS handshake.
      s = connect(); greet(s); s.sendall(struct.pack(">QII", OPT, 5, 0)); recvall(s, 20)
      t = closed_within(s, 10); print("silent TLS handshake", t is not None and t < 3)
      s = starttls(connect()); size = go(s); print("size", size)
      t = closed_within(s, 10); print("idle over TLS", t is not None and 1.5 < t < 4)
      s = starttls(connect()); go(s); s.sendall(struct.pack(">IH", 0x25609513, 0))
      t = closed_within(s, 10); print("half a request over TLS", t is not None and t < 3)
      """, extra: [certs.pki + "/ca-cert.pem"])
    XCTAssertEqual(
      r.lines,
      [
        "silent TLS handshake True", "size \(rig.size)", "idle over TLS True", "half a request over TLS True",
      ], r.summary)
    let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
    XCTAssertTrue(log.contains("the handshake took longer than 1 s"), log)
    XCTAssertTrue(log.contains("idle for 2 s; disconnected"), log)
    XCTAssertTrue(log.contains("stopped in the middle of a request for 1 s"), log)
    XCTAssertEqual(server.stop(grace: 20), 0, log)
  }

  // MARK: Requests

  func testGarbageFloodsAndOversizedRequests() throws {
    try start([])
    let r = try python(
      """
      s, size = session()
      # A flood: many requests in flight, good and bad; every one answered.
      n = 2000; batch = b""
      for i in range(n):
          if i % 4 == 0: batch += struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i * 4096) % size, 4096)
          elif i % 4 == 1: batch += struct.pack(">IHHQQI", 0x25609513, 0, 0, i, size, 4096)
          elif i % 4 == 2: batch += struct.pack(">IHHQQI", 0x25609513, 0, 99, i, 0, 0)
          else: batch += struct.pack(">IHHQQI", 0x25609513, 0x8000, 0, i, 0, 4096)
      import threading
      sender = threading.Thread(target=s.sendall, args=(batch,)); sender.start()
      errors = {}
      for _ in range(n):
          err, cookie = reply(s)
          if err == 0: recvall(s, 4096)
          errors[cookie % 4] = errors.get(cookie % 4, set()) | {err}
      sender.join()
      print("flood", sorted((k, sorted(v)) for k, v in errors.items()))
      request(s, 0, 0, (64 << 20) + 4096, cookie=9); print("oversized read", reply(s))
      request(s, 1, 0, (64 << 20) + 4096, cookie=10); print("oversized write", reply(s))
      s, size = session(); s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n" + b"\\xff" * 12)
      print("garbage", reply(s))
      s = connect(); greet(s); s.sendall(struct.pack(">QII", OPT, 3, 1 << 20))
      print("huge option", closed_within(s, 5) is not None)
      """)
    XCTAssertEqual(
      r.lines,
      [
        "flood [(0, [0]), (1, [22]), (2, [22]), (3, [22])]", "oversized read (22, 9)", "oversized write None",
        "garbage None", "huge option True",
      ], r.summary)
    let log = rig.log
    XCTAssertTrue(log.contains("WRITE of 67112960 bytes exceeds the limit"), log)
    XCTAssertTrue(log.contains("bad request magic"), log)
    XCTAssertTrue(log.contains("is too long"), log)
    rig.stopServer()
  }

  // MARK: The socket

  func testTheUnixSocketIsPrivateAndNeverStolen() throws {
    try start([])
    var st = stat()
    XCTAssertEqual(stat(rig.socket, &st), 0)
    XCTAssertEqual(st.st_mode & 0o777, 0o600, String(st.st_mode & 0o777, radix: 8))

    // A second server on the same socket is refused; the first keeps it.
    try rig.makeSparse(rig.s.path("other.img"), size: rig.size)
    let second = try RRTCommand.run(
      "restore-read-through",
      ["--backup", rig.backupURI, "--map", rig.s.path("second.map"), "--socket", rig.socket, rig.s.path("other.img")])
    XCTAssertEqual(second.status, 1, second.summary)
    XCTAssertTrue(
      second.stderr.contains(
        "\(rig.socket): another server is listening on this socket; stop it or choose another path"),
      second.summary)
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", rig.uri]).status, 0)
    rig.stopServer()

    // A regular file is never replaced.
    let file = rig.s.path("file.sock")
    _ = FileManager.default.createFile(atPath: file, contents: Data("keep".utf8))
    let onFile = try RRTCommand.run(
      "restore-read-through",
      ["--backup", rig.backupURI, "--map", rig.mapPath, "--socket", file, rig.primaryPath])
    XCTAssertEqual(onFile.status, 1, onFile.summary)
    XCTAssertTrue(onFile.stderr.contains("\(file): exists and is not a socket"), onFile.summary)
    XCTAssertEqual(try String(contentsOfFile: file, encoding: .utf8), "keep")

    // A stale socket (nobody listening) is replaced.
    let stale = try RRTCommand.shell(
      "python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()' '\(rig.socket)'"
    )
    XCTAssertEqual(stale.status, 0, stale.summary)
    try rig.startServer()
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", rig.uri]).status, 0)
    rig.stopServer()
    XCTAssertFalse(FileManager.default.fileExists(atPath: rig.socket), "the socket is removed at exit")
  }

  func testLimitOptionsAreChecked() throws {
    for (args, fragment) in [
      (["--max-connections", "0"], "--max-connections must be between 1 and 4096"),
      (["--handshake-timeout=-1"], "--handshake-timeout must be between 0 and 86400"),
      (["--idle-timeout", "nan"], "--idle-timeout must be between 0 and 86400"),
    ] {
      let r = try RRTCommand.run(
        "restore-read-through",
        args + ["--backup", rig.backupURI, "--map", rig.mapPath, "--socket", rig.socket, rig.primaryPath])
      XCTAssertNotEqual(r.status, 0, r.summary)
      XCTAssertTrue(r.stderr.contains(fragment), r.summary)
    }
  }
}
