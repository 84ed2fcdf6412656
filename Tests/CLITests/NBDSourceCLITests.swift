// snapshot, bitmap-diff and merge-snapshot against NBD exports served by
// nbdkit, as they would read a live export or a remote backup.

import Foundation
import TestSupport
import XCTest

final class NBDSourceCLITests: XCTestCase {
  var server: Process?

  override func tearDown() {
    if let server, server.isRunning {
      server.terminate()
      server.waitUntilExit()
    }
  }

  /// Serves `image` with nbdkit on a private socket; returns its URI.
  func serve(_ image: String, in s: Scratch) throws -> String {
    guard RRTEnv.have("nbdkit"), RRTEnv.have("nbdinfo") else {
      throw XCTSkip("nbdkit and nbdinfo (libnbd-bin) are needed")
    }
    let socket = s.path("nbd.sock")
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["nbdkit", "-f", "-U", socket, "file", image]
    p.standardError = FileHandle.nullDevice
    try p.run()
    server = p
    let uri = "nbd+unix:///?socket=\(socket)"
    for _ in 0..<100 {
      if try RRTCommand.shell("nbdinfo '\(uri)' >/dev/null 2>&1").status == 0 { return uri }
      usleep(100_000)
    }
    XCTFail("nbdkit did not answer")
    return uri
  }

  func testSnapshotDiffAndSignatureOfAnExport() throws {
    let s = try Scratch()
    let image = try s.randomFile("backup.img", size: 6 << 20, seed: 31)
    try s.patch("backup.img", at: 2 << 20, Array(repeating: 0, count: 1 << 20))
    let uri = try serve(image, in: s)
    var copy = try s.read("backup.img")
    copy[5 << 20] ^= 1
    try s.file("copy.img", copy)

    let diff = try RRTCommand.run("bitmap-diff", ["--quiet", "--extents", uri, s.path("copy.img")])
    XCTAssertEqual(diff.status, 1, diff.stderr)
    XCTAssertEqual(diff.lines, ["5242880 65536"])

    let sig = try RRTCommand.shell(
      "bitmap-diff --quiet --signature '\(uri)' | bitmap-diff --quiet --extents - copy.img", cwd: s.url.path)
    XCTAssertEqual(sig.lines, ["5242880 65536"], sig.stderr)

    let merged = try RRTCommand.shell(
      "truncate -s 6M target.img && snapshot --quiet '\(uri)' | merge-snapshot --quiet target.img && cmp target.img backup.img",
      cwd: s.url.path)
    XCTAssertEqual(merged.status, 0, merged.stderr + merged.stdout)

    assertFails(
      try RRTCommand.run("bitmap-diff", ["--direct", uri, s.path("copy.img")]), status: 2,
      mentioning: "--direct applies to files and block devices")
    assertFails(
      try RRTCommand.run("snapshot", ["nbd+unix:///?socket=\(s.path("nobody.sock"))"]), status: 1,
      mentioning: "nobody.sock")
  }
}
