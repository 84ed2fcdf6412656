// NBD URIs with TLS (nbds, nbds+unix, tls-certificates=DIR) and the TLS
// contexts' refusals of missing or unsafe files, in process.

import Foundation
import XCTest

@testable import DualRestore

final class TLSTests: XCTestCase {
  func testTLSURIs() throws {
    let tcp = try NBDURI("nbds://backup.example:10810/sdb?tls-certificates=/etc/pki/nbd")
    XCTAssertTrue(tcp.tls)
    XCTAssertEqual(tcp.endpoint, .tcp(host: "backup.example", port: 10810))
    XCTAssertEqual(tcp.exportName, "sdb")
    XCTAssertEqual(tcp.tlsCertificates, "/etc/pki/nbd")

    let unix = try NBDURI("nbds+unix:///merge?socket=/run/a%20b.sock&tls-certificates=/tmp/c%26d")
    XCTAssertTrue(unix.tls)
    XCTAssertEqual(unix.endpoint, .unix(path: "/run/a b.sock"))
    XCTAssertEqual(unix.exportName, "merge")
    XCTAssertEqual(unix.tlsCertificates, "/tmp/c&d")

    let system = try NBDURI("nbds://[::1]/")
    XCTAssertEqual(system.endpoint, .tcp(host: "::1", port: NBD.defaultPort))
    XCTAssertNil(system.tlsCertificates)

    let plain = try NBDURI("nbd://host/export?unknown=1")
    XCTAssertFalse(plain.tls)
    XCTAssertEqual(plain.exportName, "export")
  }

  func testTLSURIMistakes() {
    assertThrows(
      try NBDURI("nbd://host/x?tls-certificates=/d"), containing: ["tls-certificates= needs an nbds:// or nbds+unix://"]
    )
    assertThrows(try NBDURI("nbds://host/x?tls-certificates="), containing: ["names no directory"])
    assertThrows(
      try NBDURI("nbds+unix:///?socket=/s&tls-psk-file=/k"),
      containing: ["the query parameter tls-psk-file is not supported"])
    assertThrows(try NBDURI("nbds+unix:///x"), containing: ["the socket=PATH query is missing"])
    assertThrows(try NBDURI("nbdx://host/"), containing: ["not an NBD URI"])
  }

  func testContextsRefuseMissingAndUnsafeFiles() throws {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tls-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    assertThrows(
      try TLSServerContext(directory: dir + "/none", verifyPeer: false),
      containing: ["none: cannot read the TLS certificate directory"])
    assertThrows(
      try TLSServerContext(directory: dir, verifyPeer: false),
      containing: ["server-cert.pem: cannot read the certificate"])
    _ = FileManager.default.createFile(atPath: dir + "/server-cert.pem", contents: Data("not a certificate".utf8))
    _ = FileManager.default.createFile(
      atPath: dir + "/server-key.pem", contents: Data("not a key".utf8), attributes: [.posixPermissions: 0o644])
    assertThrows(
      try TLSServerContext(directory: dir, verifyPeer: false),
      containing: ["server-key.pem: the private key is open to every user (mode 0644)"])
    try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: dir + "/server-key.pem")
    assertThrows(
      try TLSServerContext(directory: dir, verifyPeer: false),
      containing: ["server-cert.pem: not a usable PEM certificate"])
    assertThrows(
      try TLSClientContext(certificates: dir), containing: ["ca-cert.pem: cannot read the CA certificate"])
    XCTAssertNoThrow(try TLSClientContext(certificates: nil))
  }
}
