// Interoperability with GNU ddrescue's mapfiles, checked by ddrescuelog and
// ddrescue themselves.

import Foundation
import TestSupport
import XCTest

final class DdrescueInteropTests: XCTestCase {
  override func setUpWithError() throws {
    guard RRTEnv.have("ddrescuelog"), RRTEnv.have("ddrescue") else {
      throw XCTSkip("GNU ddrescue (package gddrescue) is not installed")
    }
  }

  func testExportIsReadByDdrescuelog() throws {
    let s = try Scratch()
    let map = s.path("a.map")
    try RRTCommand.run("overwrite-map", ["create", "--size", "10M", "--block-size", "4K", map])
    var rng = SplitMix64(seed: 11)
    var expected = Set<Int>()
    for _ in 0..<40 {
      let block = Int(rng.next() % 2560)
      let count = Int(rng.next() % 5) + 1
      let end = min(block + count, 2560)
      XCTAssertEqual(
        try RRTCommand.run("overwrite-map", ["set", map, "\(block * 4096)", "\((end - block) * 4096)"]).status, 0)
      expected.formUnion(block..<end)
    }
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["export", map, s.path("a.mapfile")]).status, 0)
    let listed = try RRTCommand.shell("ddrescuelog -b 4096 -l+ a.mapfile", cwd: s.url.path)
    XCTAssertEqual(listed.status, 0, listed.stderr)
    XCTAssertEqual(Set(listed.lines.compactMap { Int($0) }), expected)
    let rest = try RRTCommand.shell("ddrescuelog -b 4096 -l? a.mapfile | wc -l", cwd: s.url.path)
    XCTAssertEqual(Int(rest.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), 2560 - expected.count)
  }

  func testImportOfAMapfileMadeByDdrescuelog() throws {
    let s = try Scratch()
    var rng = SplitMix64(seed: 12)
    let blocks = Set((0..<60).map { _ in Int(rng.next() % 1000) })
    try s.file("list", Data(blocks.sorted().map { "\($0)\n" }.joined().utf8))
    let made = try RRTCommand.shell(
      "ddrescuelog -b 4096 -s 4096000 --create-mapfile=+? made.mapfile < list", cwd: s.url.path)
    XCTAssertEqual(made.status, 0, made.stderr)
    let r = try RRTCommand.run(
      "overwrite-map", ["import", "--block-size", "4K", s.path("made.mapfile"), s.path("made.map")])
    XCTAssertEqual(r.status, 0, r.stderr)
    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path("made.map")])
    let o = try XCTUnwrap(JSONSerialization.jsonObject(with: stats.data) as? [String: Any])
    XCTAssertEqual(o["device_size"] as? Int, 4_096_000)
    XCTAssertEqual(o["set_blocks"] as? Int, blocks.count)
    // Back out again: ddrescuelog sees the same blocks.
    let round = try RRTCommand.shell("overwrite-map export made.map | ddrescuelog -b 4096 -l+ -", cwd: s.url.path)
    XCTAssertEqual(round.status, 0, round.stderr)
    XCTAssertEqual(Set(round.lines.compactMap { Int($0) }), blocks)
  }

  func testImportOfARealDdrescueRun() throws {
    let s = try Scratch()
    try s.randomFile("src.img", size: 1 << 20, seed: 13)
    // Copy only the second half, as an interrupted rescue would leave it.
    let r = try RRTCommand.shell(
      "ddrescue -q -i 512Ki -s 512Ki src.img dst.img rescue.mapfile", cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    let imported = try RRTCommand.run(
      "overwrite-map",
      ["import", "--size", "1M", "--block-size", "64K", s.path("rescue.mapfile"), s.path("r.map")])
    XCTAssertEqual(imported.status, 0, imported.stderr)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["extents", s.path("r.map")]).lines, ["524288 524288"])
  }

  func testImportKeepsWholeBlocksUnlessAnyByte() throws {
    let s = try Scratch()
    try s.file(
      "m", Data("# test\n0x0 + 1\n0x0 0x1800 +\n0x1800 0x800 ?\n0x2000 0x2000 +\n".utf8))
    let whole = try RRTCommand.shell(
      "overwrite-map import --block-size 4K m - | overwrite-map extents -", cwd: s.url.path)
    XCTAssertEqual(whole.lines, ["0 4096", "8192 8192"], whole.stderr)
    let any = try RRTCommand.shell(
      "overwrite-map import --any-byte --block-size 4K m - | overwrite-map extents -", cwd: s.url.path)
    XCTAssertEqual(any.lines, ["0 16384"], any.stderr)
    try s.file("bad", Data("0x0 + 1\n0x0 0x1000 X\n".utf8))
    assertFails(
      try RRTCommand.run("overwrite-map", ["import", s.path("bad"), s.path("bad.map")]), status: 1, mentioning: "line 2"
    )
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("bad.map")))
  }
}
