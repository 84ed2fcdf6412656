// NBD over TLS: restore-read-through serving nbds to libnbd (nbdinfo,
// nbdcopy) and qemu, and the toolkit's client reading nbdkit --tls=require.
// Certificates are made by the test with openssl: a CA, a server certificate
// for localhost and 127.0.0.1, a client certificate, an expired server
// certificate, an expired client certificate and a second CA.

import Foundation
import Glibc
import TestSupport
import XCTest

/// Certificate directories laid out as nbdkit and qemu expect.
struct TLSCertificates {
  let root: String
  /// ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
  var pki: String { root + "/pki" }
  /// ca-cert.pem of the CA, client-cert.pem, client-key.pem.
  var client: String { root + "/client" }
  /// ca-cert.pem of the CA and an expired server certificate.
  var expired: String { root + "/expired" }
  /// ca-cert.pem of the CA and an expired client certificate.
  var expiredClient: String { root + "/expired-client" }
  /// ca-cert.pem of another CA (and its own client certificate).
  var otherCA: String { root + "/other" }

  static let script = #"""
    set -e
    cd "$1"
    mkdir -p pki client expired expired-client other ca.db
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
    key ca-key.pem
    openssl req -x509 -new -key ca-key.pem -out pki/ca-cert.pem -days 30 -subj /CN=dualrestore-test-ca 2>/dev/null
    key other-key.pem
    openssl req -x509 -new -key other-key.pem -out other/ca-cert.pem -days 30 -subj /CN=another-ca 2>/dev/null
    : > ca.db/index.txt; echo 01 > ca.db/serial
    cat > ca.cnf <<CNF
    [ca]
    default_ca = d
    [d]
    database = ca.db/index.txt
    serial = ca.db/serial
    new_certs_dir = ca.db
    default_md = sha256
    policy = p
    unique_subject = no
    [p]
    commonName = supplied
    [server]
    subjectAltName = DNS:localhost,IP:127.0.0.1
    extendedKeyUsage = serverAuth
    [client]
    extendedKeyUsage = clientAuth
    CNF
    # sign NAME CN EXT DIR STARTDATE ENDDATE [CA-CERT CA-KEY]
    sign() {
      key "$4/$1-key.pem"
      openssl req -new -key "$4/$1-key.pem" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
      openssl ca -batch -config ca.cnf -extensions "$3" -cert "${7:-pki/ca-cert.pem}" -keyfile "${8:-ca-key.pem}" \
        -in "$1.csr" -out "$4/$1-cert.pem" -startdate "$5" -enddate "$6" -notext 2>/dev/null
    }
    now=$(date -u -d '-1 day' +%Y%m%d%H%M%SZ); later=$(date -u -d '+30 days' +%Y%m%d%H%M%SZ)
    sign server localhost server pki "$now" "$later"
    sign client client client pki "$now" "$later"
    sign server localhost server expired 20200101000000Z 20200201000000Z
    sign client client client expired-client 20200101000000Z 20200201000000Z
    sign client client client other "$now" "$later" other/ca-cert.pem other-key.pem
    cp pki/ca-cert.pem client/ca-cert.pem; cp pki/client-cert.pem pki/client-key.pem client/
    cp pki/ca-cert.pem expired/ca-cert.pem; cp pki/ca-cert.pem expired-client/ca-cert.pem
    """#

  init(in dir: String) throws {
    root = dir + "/certs"
    try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    let r = try RRTCommand.run("/bin/bash", ["-c", TLSCertificates.script, "certs", root], timeout: 60)
    guard r.status == 0 else { throw RRTError("openssl could not make the test certificates: \(r.summary)") }
  }
}

final class TLSCLITests: XCTestCase {
  var rig: RRTRig!
  var certs: TLSCertificates!
  var children: [RRTChild] = []

  override func setUpWithError() throws {
    for tool in ["openssl", "nbdkit", "nbdinfo", "nbdcopy"] where !RRTEnv.have(tool) {
      throw XCTSkip("\(tool) is needed for the TLS tests")
    }
    rig = try RRTRig(size: 8 << 20, seed: 77)
    certs = try TLSCertificates(in: rig.dir)
  }

  override func tearDown() {
    for c in children.reversed() { c.stop(grace: 10) }
    children = []
    rig?.stopAll()
  }

  var tlsURI: String { "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.client)" }

  /// restore-read-through over the plain nbdkit backup, with `tls` options;
  /// waits until a TLS client (with `probe`'s certificates) gets an answer.
  @discardableResult
  func startOurs(_ tls: [String], probe: String? = nil, map: String? = nil) throws -> RRTChild {
    if rig.backupServer == nil { try rig.startBackup() }
    let child = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: tls + [
        "--backup", rig.backupURI, "--map", map ?? rig.mapPath, "--socket", rig.socket, "--progress-interval", "0",
        rig.primaryPath,
      ],
      stdout: rig.s.path("ours.out"), stderr: rig.s.path("ours.log"))
    children.append(child)
    let target = "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(probe ?? certs.client)"
    let end = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < end {
      guard child.isRunning else { throw RRTError("restore-read-through ended before serving: \(child.errors)") }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", target], timeout: 5), r.status == 0 {
        return child
      }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("restore-read-through did not answer over TLS: \(child.errors)")
  }

  /// nbdkit's file plugin over TLS with the certificates of `dir`, on a Unix
  /// socket or (with `port`) on TCP.
  func startNbdkit(_ dir: String, socket: String? = nil, port: Int? = nil, extra: [String] = []) throws -> RRTChild {
    var args = ["-f", "--tls=require", "--tls-certificates=\(dir)"] + extra
    if let port { args += ["-i", "127.0.0.1", "-p", String(port)] } else { args += ["-U", socket!] }
    let child = try RRTChild(
      name: "nbdkit", executable: "/usr/bin/nbdkit", arguments: args + ["file", rig.backupPath],
      stdout: rig.s.path("nbdkit.out"), stderr: rig.s.path("nbdkit-tls.log"), appendStderr: true)
    children.append(child)
    let target =
      port.map { "nbds://localhost:\($0)/?tls-certificates=\(certs.client)" }
      ?? "nbds+unix:///?socket=\(socket!)&tls-certificates=\(certs.client)"
    for _ in 0..<100 {
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", target], timeout: 5), r.status == 0 {
        return child
      }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("nbdkit --tls=require did not answer: \(child.errors)")
  }

  func freePort() throws -> Int {
    let r = try RRTCommand.shell(
      "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'")
    guard let port = Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
      throw RRTError("no free port: \(r.summary)")
    }
    return port
  }

  var oursLog: String { (try? String(contentsOfFile: rig.s.path("ours.log"), encoding: .utf8)) ?? "" }

  // MARK: Our server, their clients

  func testLibnbdAndQemuReadAndWriteOverTLS() throws {
    try startOurs(["--tls", "require", "--tls-certificates", certs.pki])
    let info = try RRTCommand.run("/usr/bin/nbdinfo", [tlsURI])
    XCTAssertEqual(info.status, 0, info.summary)
    XCTAssertTrue(info.stdout.contains("with TLS"), info.stdout)

    // nbdcopy: several connections, many requests in flight, over TLS.
    let copy = try RRTCommand.run("/usr/bin/nbdcopy", [tlsURI, rig.s.path("copy.img")])
    XCTAssertEqual(copy.status, 0, copy.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: rig.s.path("copy.img"))), rig.original, "nbdcopy")

    // Writes over TLS reach the primary and the backup.
    let patch = RRTBytes.random(1 << 20, seed: 5)
    try patch.write(to: URL(fileURLWithPath: rig.s.path("patch.img")))
    let w = try RRTCommand.shell(
      "nbdsh -c 'h.set_uri_allow_local_file(True)' -c 'h.connect_uri(\"\(tlsURI)\")' "
        + "-c 'h.pwrite(open(\"\(rig.s.path("patch.img"))\", \"rb\").read(), 1048576); h.flush()'")
    XCTAssertEqual(w.status, 0, w.summary)
    RRTBytes.assertEqual(try RRTBytes.read(rig.backupPath, 1 << 20, 1 << 20), patch, "backup after a TLS write")

    guard RRTEnv.have("qemu-img") else { return }
    let qemu = try RRTCommand.run(
      "/usr/bin/qemu-img",
      [
        "convert", "-O", "raw", "--object", "tls-creds-x509,id=tls0,dir=\(certs.client),endpoint=client",
        "--image-opts", "driver=nbd,path=\(rig.socket),tls-creds=tls0,tls-hostname=localhost",
        rig.s.path("qemu.img"),
      ])
    XCTAssertEqual(qemu.status, 0, qemu.summary)
    var expected = rig.original
    expected.replaceSubrange((1 << 20)..<(2 << 20), with: patch)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: rig.s.path("qemu.img"))), expected, "qemu-img")
  }

  func testOverTCPTheClientChecksTheHostName() throws {
    try rig.startBackup()
    let child = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--tls", "require", "--tls-certificates", certs.pki, "--backup", rig.backupURI, "--map", rig.mapPath,
        "--listen", "127.0.0.1:0", "--progress-interval", "0", rig.primaryPath,
      ],
      stdout: rig.s.path("ours.out"), stderr: rig.s.path("ours.log"))
    children.append(child)
    var port: String?
    for _ in 0..<100 where port == nil {
      if let range = oursLog.range(of: #"on 127\.0\.0\.1:[0-9]+"#, options: .regularExpression) {
        port = String(oursLog[range].split(separator: ":").last!)
      }
      RRTEnv.sleep(0.05)
    }
    let p = try XCTUnwrap(port, oursLog)
    let good = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbds://localhost:\(p)/?tls-certificates=\(certs.client)"])
    XCTAssertEqual(good.status, 0, good.summary)
    XCTAssertEqual(good.stdout.trimmingCharacters(in: .whitespacesAndNewlines), String(rig.size))
    // libnbd checks the name on TCP: 127.1 reaches the server but is not in the certificate.
    let other = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbds://127.1:\(p)/?tls-certificates=\(certs.client)"])
    XCTAssertNotEqual(other.status, 0, other.summary)
    XCTAssertTrue(other.stderr.contains("Error in the certificate verification"), other.summary)
    let plain = try RRTCommand.run("/usr/bin/nbdinfo", ["--size", "nbd://127.0.0.1:\(p)/"])
    XCTAssertNotEqual(plain.status, 0, plain.summary)
    XCTAssertEqual(child.stop(grace: 30), 0, oursLog)
  }

  func testRequireRefusesPlaintextClients() throws {
    try startOurs(["--tls", "require", "--tls-certificates", certs.pki])
    let plain = try RRTCommand.run("/usr/bin/nbdinfo", [rig.uri])
    XCTAssertNotEqual(plain.status, 0, plain.summary)
    if RRTEnv.have("qemu-img") {
      let qemu = try RRTCommand.run("/usr/bin/qemu-img", ["info", "--image-opts", "driver=nbd,path=\(rig.socket)"])
      XCTAssertNotEqual(qemu.status, 0)
      XCTAssertTrue(qemu.stderr.contains("TLS is required: send NBD_OPT_STARTTLS first"), qemu.summary)
    }
    // On the wire: GO before STARTTLS gets NBD_REP_ERR_TLS_REQD; LIST too;
    // EXPORT_NAME closes the connection; STARTTLS with data is invalid.
    let wire = try RRTCommand.run("/usr/bin/python3", ["-c", TLSCLITests.probe, rig.socket], timeout: 30)
    XCTAssertEqual(wire.status, 0, wire.summary)
    XCTAssertEqual(
      wire.lines, ["go 0x80000005", "list 0x80000005", "starttls-with-data 0x80000003", "export-name closed"],
      wire.summary)
    XCTAssertTrue(oursLog.contains("without TLS, which this server requires"), oursLog)
  }

  /// Raw handshakes against a socket: the reply types, one line each.
  static let probe = #"""
    import socket, struct, sys
    def connect():
        s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
        assert len(recvall(s, 18)) == 18
        s.sendall(struct.pack(">I", 3))
        return s
    def recvall(s, n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: return b
            b += c
        return b
    def option(s, o, data=b""):
        s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
        h = recvall(s, 20)
        if len(h) < 20: return "closed"
        _, _, t, n = struct.unpack(">QIII", h)
        recvall(s, n)
        return hex(t)
    s = connect()
    print("go", option(s, 7, struct.pack(">I", 0) + struct.pack(">H", 0)))
    print("list", option(s, 3))
    print("starttls-with-data", option(s, 5, b"x"))
    s.close()
    s = connect()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
    print("export-name", "closed" if recvall(s, 8) == b"" else "answered")
    """#

  func testOptionalTLSServesBothAndVerifiesClientCertificates() throws {
    // --tls on: plaintext and TLS clients alike.
    try startOurs(["--tls", "on", "--tls-certificates", certs.pki])
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", rig.uri]).status, 0)
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", tlsURI]).status, 0)
    children.removeLast().stop()

    // --tls-verify-peer: a client certificate of the CA is needed.
    try startOurs(["--tls", "require", "--tls-certificates", certs.pki, "--tls-verify-peer"])
    XCTAssertEqual(try RRTCommand.run("/usr/bin/nbdinfo", ["--size", tlsURI]).status, 0)
    let none = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.expired)"])
    XCTAssertNotEqual(none.status, 0, none.summary)
    let old = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.expiredClient)"])
    XCTAssertNotEqual(old.status, 0, old.summary)
    let foreign = try RRTCommand.run(
      "/usr/bin/nbdinfo", ["--size", "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.otherCA)"])
    XCTAssertNotEqual(foreign.status, 0, foreign.summary)
    RRTEnv.sleep(0.3)
    let log = oursLog
    // A client whose certificate another CA signed does not offer it (the
    // server names the CAs it accepts).
    XCTAssertEqual(log.components(separatedBy: "TLS handshake failed: peer did not return a certificate").count, 3, log)
    XCTAssertTrue(log.contains("the client's certificate was not accepted (certificate has expired)"), log)
  }

  func testQemuRefusesAWrongCAAndAnExpiredServerCertificate() throws {
    guard RRTEnv.have("qemu-img") else { throw XCTSkip("qemu-img is needed") }
    try startOurs(["--tls", "require", "--tls-certificates", certs.pki])
    let wrong = try RRTCommand.run(
      "/usr/bin/qemu-img",
      [
        "info", "--object", "tls-creds-x509,id=tls0,dir=\(certs.otherCA),endpoint=client",
        "--image-opts", "driver=nbd,path=\(rig.socket),tls-creds=tls0,tls-hostname=localhost",
      ])
    XCTAssertNotEqual(wrong.status, 0)
    XCTAssertTrue(wrong.stderr.contains("The certificate hasn't got a known issuer"), wrong.summary)
    children.removeLast().stop()

    try startOurs(["--tls", "require", "--tls-certificates", certs.expired])
    let expired = try RRTCommand.run(
      "/usr/bin/qemu-img",
      [
        "info", "--object", "tls-creds-x509,id=tls0,dir=\(certs.client),endpoint=client",
        "--image-opts", "driver=nbd,path=\(rig.socket),tls-creds=tls0,tls-hostname=localhost",
      ])
    XCTAssertNotEqual(expired.status, 0)
    // GnuTLS says an expired certificate "is not trusted".
    XCTAssertTrue(expired.stderr.contains("The certificate is not trusted"), expired.summary)
  }

  // MARK: Our client, nbdkit's server

  func testOurClientReadsNbdkitOverTLS() throws {
    let socket = rig.s.path("k.sock")
    _ = try startNbdkit(certs.pki, socket: socket)
    let uri = "nbds+unix:///?socket=\(socket)&tls-certificates=\(certs.client)"
    try rig.makeSparse(rig.s.path("target.img"), size: rig.size)
    let merged = try RRTCommand.shell(
      "snapshot --quiet '\(uri)' | merge-snapshot --quiet '\(rig.s.path("target.img"))'")
    XCTAssertEqual(merged.status, 0, merged.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: rig.s.path("target.img"))), rig.original, "merged")

    let plain = try RRTCommand.run("snapshot", ["-o", "/dev/null", "nbd+unix:///?socket=\(socket)"])
    XCTAssertEqual(plain.status, 1, plain.summary)
    XCTAssertTrue(plain.stderr.contains("the server requires TLS; use an nbds:// or nbds+unix:// URI"), plain.summary)

    let wrong = try RRTCommand.run(
      "snapshot", ["-o", "/dev/null", "nbds+unix:///?socket=\(socket)&tls-certificates=\(certs.otherCA)"])
    XCTAssertEqual(wrong.status, 1, wrong.summary)
    XCTAssertTrue(
      wrong.stderr.contains("the server's TLS certificate was not accepted (unable to get local issuer certificate)"),
      wrong.summary)
  }

  func testOurClientChecksExpiryAndHostName() throws {
    let port = try freePort()
    _ = try startNbdkit(certs.pki, port: port)
    let ok = try RRTCommand.run(
      "bitmap-diff", ["--quiet", "nbds://localhost:\(port)/?tls-certificates=\(certs.client)", rig.backupPath])
    XCTAssertEqual(ok.status, 0, ok.summary)
    let byAddress = try RRTCommand.run(
      "bitmap-diff", ["--quiet", "nbds://127.0.0.1:\(port)/?tls-certificates=\(certs.client)", rig.backupPath])
    XCTAssertEqual(byAddress.status, 0, byAddress.summary)
    // 127.1 reaches 127.0.0.1 but is a name the certificate does not have.
    let otherName = try RRTCommand.run(
      "bitmap-diff", ["--quiet", "nbds://127.1:\(port)/?tls-certificates=\(certs.client)", rig.backupPath])
    XCTAssertEqual(otherName.status, 2, otherName.summary)
    XCTAssertTrue(
      otherName.stderr.contains("the server's TLS certificate was not accepted (hostname mismatch)"), otherName.summary)
    let system = try RRTCommand.run("bitmap-diff", ["--quiet", "nbds://localhost:\(port)/", rig.backupPath])
    XCTAssertEqual(system.status, 2, system.summary)
    XCTAssertTrue(system.stderr.contains("unable to get local issuer certificate"), system.summary)

    let expiredSocket = rig.s.path("e.sock")
    let expiredServer = try RRTChild(
      name: "nbdkit", executable: "/usr/bin/nbdkit",
      arguments: [
        "-f", "--tls=require", "--tls-certificates=\(certs.expired)", "-U", expiredSocket, "file", rig.backupPath,
      ],
      stdout: rig.s.path("e.out"), stderr: rig.s.path("e.log"))
    children.append(expiredServer)
    for _ in 0..<100 where !FileManager.default.fileExists(atPath: expiredSocket) { RRTEnv.sleep(0.05) }
    let expired = try RRTCommand.run(
      "snapshot", ["-o", "/dev/null", "nbds+unix:///?socket=\(expiredSocket)&tls-certificates=\(certs.client)"])
    XCTAssertEqual(expired.status, 1, expired.summary)
    XCTAssertTrue(
      expired.stderr.contains("the server's TLS certificate was not accepted (certificate has expired)"),
      expired.summary)
  }

  func testRestoreReadThroughBacksOntoNbdkitOverTLS() throws {
    let port = try freePort()
    _ = try startNbdkit(certs.pki, port: port)
    // Our server, plain, in front of a TLS backup on TCP.
    let child = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--backup", "nbds://localhost:\(port)/?tls-certificates=\(certs.client)", "--map", rig.mapPath,
        "--socket", rig.socket, "--progress-interval", "0", rig.primaryPath,
      ],
      stdout: rig.s.path("ours.out"), stderr: rig.s.path("ours.log"))
    children.append(child)
    try rig.waitForNBD(rig.uri, process: child, what: "restore-read-through")
    let copy = try RRTCommand.run("/usr/bin/nbdcopy", [rig.uri, rig.s.path("copy.img")])
    XCTAssertEqual(copy.status, 0, copy.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: rig.s.path("copy.img"))), rig.original, "through")
    XCTAssertEqual(child.stop(grace: 30), 0, oursLog)
  }

  // MARK: Bad input

  func testTLSOptionsAndFilesAreChecked() throws {
    func fails(_ args: [String], _ fragment: String, file: StaticString = #filePath, line: UInt = #line) throws {
      let r = try RRTCommand.run(
        "restore-read-through",
        args + ["--backup", rig.backupURI, "--map", rig.mapPath, "--socket", rig.socket, rig.primaryPath])
      XCTAssertNotEqual(r.status, 0, r.summary, file: file, line: line)
      XCTAssertTrue(r.stderr.contains(fragment), r.summary, file: file, line: line)
    }
    try rig.startBackup()
    try fails(["--tls", "on"], "--tls on needs --tls-certificates DIR")
    try fails(["--tls-certificates", certs.pki], "--tls-certificates needs --tls on or --tls require")
    try fails(["--tls", "maybe", "--tls-certificates", certs.pki], "maybe")
    try fails(["--tls", "require", "--tls-certificates", rig.s.path("nowhere")], "nowhere: cannot read the TLS")
    try fails(
      ["--tls", "require", "--tls-certificates", certs.otherCA], "other/server-cert.pem: cannot read the certificate")
    chmod(certs.pki + "/server-key.pem", 0o644)
    try fails(
      ["--tls", "require", "--tls-certificates", certs.pki],
      "server-key.pem: the private key is open to every user (mode 0644)")
    chmod(certs.pki + "/server-key.pem", 0o640)
    try startOurs(["--tls", "require", "--tls-certificates", certs.pki])

    let plainWithDir = try RRTCommand.run(
      "snapshot", ["-o", "/dev/null", "nbd+unix:///?socket=\(rig.socket)&tls-certificates=\(certs.client)"])
    XCTAssertEqual(plainWithDir.status, 1)
    XCTAssertTrue(plainWithDir.stderr.contains("tls-certificates= needs an nbds:// or nbds+unix:// URI"))
    let psk = try RRTCommand.run("snapshot", ["-o", "/dev/null", "nbds+unix:///?socket=\(rig.socket)&tls-psk-file=x"])
    XCTAssertEqual(psk.status, 1)
    XCTAssertTrue(psk.stderr.contains("the query parameter tls-psk-file is not supported"), psk.summary)
    let noCA = try RRTCommand.run(
      "snapshot", ["-o", "/dev/null", "nbds+unix:///?socket=\(rig.socket)&tls-certificates=\(rig.dir)"])
    XCTAssertEqual(noCA.status, 1)
    XCTAssertTrue(noCA.stderr.contains("ca-cert.pem: cannot read the CA certificate"), noCA.summary)
  }
}
