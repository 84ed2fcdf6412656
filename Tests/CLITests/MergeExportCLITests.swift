// merge-snapshot into the `merge` export of a running restore-read-through:
// the server keeps the overwrite map, so only it knows which blocks it wrote
// and which it left alone as current. The summary must give its counts
// (dualrestore-merge(5)), never the client's guess.

import Foundation
import XCTest

final class MergeExportCLITests: XCTestCase {
  private var rigs: [RRTRig] = []

  override func tearDown() {
    for r in rigs { r.stopAll() }
    rigs = []
    super.tearDown()
  }

  private func running() throws -> RRTRig {
    for p in ["nbdkit", "nbdsh", "nbdcopy"] where !RRTEnv.have(p) {
      throw XCTSkip("\(p) is not installed (needed by this test)")
    }
    let r = try RRTRig()
    rigs.append(r)
    try r.startBackup(.nbdkit())
    try r.startServer([])
    return r
  }

  private func json(_ text: String) throws -> [String: Any] {
    try XCTUnwrap(JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not JSON: \(text)")
  }

  func testJSONGivesTheServersCounts() throws {
    let r = try running()
    let B = r.blockSize
    // Blocks 3 and 4 written, 10-12 and 104 (one of the backup's zero blocks,
    // 100..<108) read: six current blocks the merge must leave alone.
    _ = try r.readThroughExport([(10 * B, 3 * B), (104 * B, B)])
    // The FLUSH commits the map, the reads' blocks with the writes'.
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      h.pwrite(b'\\x5a' * (2 * \(B)), 3 * \(B))
      h.flush()
      print("OK")
      """)
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertEqual(try r.currentBlocks(), [3, 4, 10, 11, 12, 104])

    let snap = try RRTCommand.shell("snapshot --quiet backup.img > s.stream", cwd: r.dir)
    XCTAssertEqual(snap.status, 0, snap.summary)
    let dataBlocks = r.blockCount - 8
    let m = try RRTCommand.run("merge-snapshot", ["--json", "-i", r.s.path("s.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(m.status, 0, "\(m.summary)\nlog:\n\(r.log)")
    let o = try json(m.stdout)
    XCTAssertEqual(o["skipped_current_blocks"] as? Int, 6, m.stdout)
    XCTAssertEqual(o["written_blocks"] as? Int, dataBlocks - 5, m.stdout)
    XCTAssertEqual(o["zero_blocks"] as? Int, 7, m.stdout)
    XCTAssertEqual(o["bytes_written"] as? Int, (r.blockCount - 6) * B, m.stdout)
    XCTAssertEqual(o["sent_blocks"] as? Int, dataBlocks, m.stdout)
    XCTAssertEqual(o["sent_zero_blocks"] as? Int, 8, m.stdout)
    XCTAssertEqual(o["bytes_sent"] as? Int, r.blockCount * B, m.stdout)
    XCTAssertEqual(o["recorded"] as? Bool, true, m.stdout)
    XCTAssertEqual(o["complete"] as? Bool, true, m.stdout)
    XCTAssertTrue(r.log.contains("block(s) merged, 6 skipped as current"), r.log)

    // The same stream again: every block is current now, and the report
    // counts this run alone.
    let again = try RRTCommand.run("merge-snapshot", ["-i", r.s.path("s.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(again.status, 0, again.summary)
    XCTAssertTrue(
      again.stderr.contains("the server wrote 0 blocks and 0 zero blocks (0 B) and skipped \(r.blockCount) current"),
      again.summary)

    // A dry run sends nothing, so the server's counts are left out, not zeros.
    let dry = try RRTCommand.run(
      "merge-snapshot", ["--dry-run", "--json", "-i", r.s.path("s.stream"), r.mergeURI], timeout: 120)
    XCTAssertEqual(dry.status, 0, dry.summary)
    let d = try json(dry.stdout)
    for key in ["written_blocks", "zero_blocks", "skipped_current_blocks", "bytes_written", "sent_blocks"] {
      XCTAssertNil(d[key], "\(key) in a dry run into the merge export: \(dry.stdout)")
    }
    RRTBytes.assertEqual(
      try r.copyExport(to: "after.img"), r.original.replacingBlocks(3..<5, B, with: 0x5a), "the export after the merge")
  }

  func testReportNamesAreCheckedByTheServer() throws {
    let r = try running()
    // A stream the server never admitted has no report, and a name the
    // merge export does not know is refused with the server's sentence.
    let id = String(repeating: "ab", count: 16)
    for (name, said) in [
      ("merge;report=\(id)", "stream \(id) was not merged through this server"),
      ("merge;complete=\(id)", "stream \(id) was not merged through this server"),
      ("merge;report=xyz", "report=xyz is not a stream id"),
      ("merge;stream=\(id)", "takes started=NS"),
      ("merge;stream=\(id);started=1;colour=red", "colour is not a field"),
      ("merge;complete=\(id);complete=\(id)", "complete is given twice"),
    ] {
      // snapshot's NBD client prints the sentence a server refuses with.
      let c = try RRTCommand.shell("snapshot --quiet 'nbd+unix:///\(name)?socket=\(r.socket)' > /dev/null", cwd: r.dir)
      XCTAssertNotEqual(c.status, 0, "\(name): \(c.summary)")
      XCTAssertTrue(c.stderr.contains(said), "\(name): \(c.summary)")
    }
  }
}

extension Data {
  /// These bytes with blocks `blocks` (of `size` bytes) filled with `byte`.
  fileprivate func replacingBlocks(_ blocks: Range<Int>, _ size: Int, with byte: UInt8) -> Data {
    var d = self
    d.replaceSubrange(
      (blocks.lowerBound * size)..<(blocks.upperBound * size), with: Data(repeating: byte, count: blocks.count * size))
    return d
  }
}
