// How large a request the servers take: READs and WRITEs of up to 64 MiB
// (the reference suite's integrityhuge trace sends 47.6 MiB, which
// nbd-server and nbdkit accept), advertised in NBD_INFO_BLOCK_SIZE, through
// both restore-read-through and tracking-server with nbdsh; a READ past the
// limit inside the export is refused with EINVAL (the protocol keeps
// EOVERFLOW for NBD_CMD_FLAG_DF), over a raw socket since libnbd will not
// send it.

import Foundation
import Glibc
import TestSupport
import XCTest

final class NBDRequestSizeCLITests: XCTestCase {
  /// Larger than the largest READ taken, so that a READ past the limit is
  /// still inside the export.
  static let size = 80 << 20

  override func setUpWithError() throws {
    for tool in ["nbdkit", "nbdsh", "nbdinfo", "python3"] where !RRTEnv.have(tool) {
      throw XCTSkip("\(tool) is needed for the request size tests")
    }
  }

  /// nbdsh code: the advertised maximum, a 48 MiB READ compared with
  /// `expected` (a file holding what the export holds), a 48 MiB WRITE read
  /// back. Prints one line per step.
  static func hugeRequests(expected: String) -> String {
    """
    h.connect_uri(URI)
    print("maximum", h.get_block_size(nbd.SIZE_MAXIMUM))
    n = 48 << 20
    with open(\(rrtPython(expected)), "rb") as f:
        f.seek(4096); want = f.read(n)
    got = h.pread(n, 4096)
    print("read", len(got), got == want)
    data = bytes((i * 7 + 3) & 0xFF for i in range(65536)) * (n // 65536)
    h.pwrite(data, 8 << 20)
    h.flush()
    print("write", h.pread(n, 8 << 20) == data)
    h.shutdown()
    """
  }

  /// A raw client's READ of 64 MiB + 4 KiB at 0: the error number.
  static let overLimit = """
    s, size = session()
    assert size > (64 << 20) + 4096, size
    request(s, 0, 0, (64 << 20) + 4096, cookie=5); print("over the limit", reply(s))
    request(s, 0, 0, 4096, cookie=6); print("then", reply(s)); recvall(s, 4096)
    """

  func python(_ socket: String, _ body: String) throws -> RRTCommand.Result {
    try RRTCommand.run("/usr/bin/python3", ["-c", NBDServerLimitsCLITests.prologue + body, socket], timeout: 120)
  }

  func testRestoreReadThroughTakes48MiBRequests() throws {
    let rig = try RRTRig(size: NBDRequestSizeCLITests.size, seed: 171)
    defer { rig.stopAll() }
    try rig.startBackup()
    try rig.startServer(["--progress-interval", "0"])
    let r = try rig.nbdsh(NBDRequestSizeCLITests.hugeRequests(expected: rig.backupPath), timeout: 300)
    XCTAssertEqual(r.lines, ["maximum 67108864", "read 50331648 True", "write True"], r.summary)
    let raw = try python(rig.socket, NBDRequestSizeCLITests.overLimit)
    XCTAssertEqual(raw.lines, ["over the limit (22, 5)", "then (0, 6)"], raw.summary)
    rig.stopServer()
  }

  func testTrackingServerTakes48MiBRequests() throws {
    let rig = try TrackRig(size: NBDRequestSizeCLITests.size, seed: 172)
    defer { rig.stopAll() }
    try rig.start()
    let r = try rig.nbdsh(NBDRequestSizeCLITests.hugeRequests(expected: rig.devicePath), timeout: 300)
    XCTAssertEqual(r.lines, ["maximum 67108864", "read 50331648 True", "write True"], r.summary)
    let raw = try python(rig.socket, NBDRequestSizeCLITests.overLimit)
    XCTAssertEqual(raw.lines, ["over the limit (22, 5)", "then (0, 6)"], raw.summary)
    rig.stop()
  }
}
