// overwrite-map as scripts use it: spawned, with real files and pipes.

import Foundation
import TestSupport
import XCTest

final class OverwriteMapCLITests: XCTestCase {
  func testHelpListsEverySubcommand() throws {
    let r = try RRTCommand.run("overwrite-map", ["--help"])
    XCTAssertEqual(r.status, 0)
    for sub in [
      "create", "show", "stats", "extents", "set", "clear", "union", "intersect", "subtract", "invert", "rescale",
      "import", "export",
    ] {
      XCTAssertTrue(r.stdout.contains("  \(sub) "), "help lacks \(sub)")
    }
  }

  func testCreateSetExtentsAndStats() throws {
    let s = try Scratch()
    let map = s.path("a.map")
    XCTAssertEqual(
      try RRTCommand.run("overwrite-map", ["create", "--size", "1G", "--name", "/dev/sdb", map]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["set", map, "0", "128K"]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["set", map, "1M", "65536"]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["clear", map, "64K", "64K"]).status, 0)
    let extents = try RRTCommand.run("overwrite-map", ["extents", map])
    XCTAssertEqual(extents.status, 0)
    XCTAssertEqual(extents.lines, ["0 65536", "1048576 65536"])
    XCTAssertEqual(extents.stderr, "")

    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", map])
    XCTAssertEqual(stats.status, 0)
    let json = try XCTUnwrap(JSONSerialization.jsonObject(with: stats.data) as? [String: Any])
    XCTAssertEqual(json["set_blocks"] as? Int, 2)
    XCTAssertEqual(json["block_count"] as? Int, 16384)
    XCTAssertEqual(json["block_size"] as? Int, 65536)
    XCTAssertEqual(json["device_size"] as? Int, 1 << 30)
    XCTAssertEqual(json["device_name"] as? String, "/dev/sdb")
    XCTAssertEqual(json["meaning"] as? String, "current")
    XCTAssertEqual((json["map_id"] as? String)?.count, 32)
    XCTAssertTrue(json["last_merged_stream"] is NSNull)

    let show = try RRTCommand.run("overwrite-map", ["show", map])
    XCTAssertEqual(show.status, 0)
    XCTAssertTrue(show.stdout.contains("2 of 16384 current"), show.stdout)
    XCTAssertTrue(show.stdout.contains("/dev/sdb"))
  }

  func testPartialLastBlockAndDeviceEnd() throws {
    let s = try Scratch()
    let map = s.path("p.map")
    // 100000 bytes in 4 KiB blocks: 25 blocks, the last one 1696 bytes.
    XCTAssertEqual(
      try RRTCommand.run("overwrite-map", ["create", "--size", "100000", "--block-size", "4K", map]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["set", map, "94208", "5792"]).status, 0)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["extents", map]).lines, ["94208 5792"])
    let bad = try RRTCommand.run("overwrite-map", ["set", map, "94208", "5000"])
    assertFails(bad, status: 1, mentioning: "not a multiple of the block size 4096")
    let past = try RRTCommand.run("overwrite-map", ["set", map, "98304", "4096"])
    assertFails(past, status: 1, mentioning: "past the device end")
  }

  func testBadRangesLeaveTheMapUntouched() throws {
    let s = try Scratch()
    let map = s.path("a.map")
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", map])
    let before = try s.read("a.map")
    let r = try RRTCommand.run("overwrite-map", ["set", map, "1000", "4096"])
    assertFails(r, status: 1, mentioning: "offset 1000 is not a multiple of the block size 65536")
    XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr)")
    XCTAssertEqual(try s.read("a.map"), before)
  }

  func testCreateRefusesToReplaceWithoutForce() throws {
    let s = try Scratch()
    let map = s.path("a.map")
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", map])
    let before = try s.read("a.map")
    assertFails(
      try RRTCommand.run("overwrite-map", ["create", "--size", "2M", map]), status: 1, mentioning: "already exists")
    XCTAssertEqual(try s.read("a.map"), before)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["create", "--force", "--size", "2M", map]).status, 0)
    XCTAssertNotEqual(try s.read("a.map"), before)
  }

  func testUsageErrors() throws {
    let r = try RRTCommand.run("overwrite-map", ["create", "a.map"])
    XCTAssertEqual(r.status, 64)
    XCTAssertTrue(r.stderr.contains("exactly one of --size"), r.stderr)
    let bs = try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "3000", "x.map"])
    XCTAssertEqual(bs.status, 64)
    XCTAssertTrue(bs.stderr.contains("block size 3000 is not a power of two"), bs.stderr)
    let big = try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "128M", "x.map"])
    XCTAssertEqual(big.status, 64)
  }

  func testCorruptTruncatedAndForeignMapsAreRefused() throws {
    let s = try Scratch()
    let map = s.path("a.map")
    try RRTCommand.run("overwrite-map", ["create", "--size", "1G", map])
    try RRTCommand.run("overwrite-map", ["set", map, "0", "64K"])
    let good = try s.read("a.map")

    // A flipped byte anywhere: refused, and `set` does not rewrite the file.
    for offset in stride(from: 0, to: good.count, by: 7) {
      var bad = good
      bad[offset] ^= 0x40
      try s.file("bad.map", bad)
      let r = try RRTCommand.run("overwrite-map", ["set", s.path("bad.map"), "0", "64K"])
      XCTAssertNotEqual(r.status, 0, "flip at \(offset) accepted")
      XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
      XCTAssertEqual(try s.read("bad.map"), bad, "flip at \(offset): file changed")
    }
    // Truncated at every length.
    for length in 0..<good.count {
      try s.file("short.map", good.prefix(length))
      let r = try RRTCommand.run("overwrite-map", ["show", s.path("short.map")])
      XCTAssertEqual(r.status, 1, "truncated to \(length) accepted")
    }
    assertFails(
      try RRTCommand.run("overwrite-map", ["show", s.path("short.map")]), status: 1, mentioning: "short.map: ")
    try s.file("text.map", Data("0 65536\n".utf8))
    assertFails(
      try RRTCommand.run("overwrite-map", ["show", s.path("text.map")]), status: 1, mentioning: "not a dualrestore map")
    assertFails(
      try RRTCommand.run("overwrite-map", ["show", s.path("missing.map")]), status: 1, mentioning: "No such file")
  }

  func testAlgebraThroughPipes() throws {
    let s = try Scratch()
    let a = s.path("a.map")
    let b = s.path("b.map")
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "64K", a])
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "64K", b])
    try RRTCommand.run("overwrite-map", ["set", a, "0", "256K"])
    try RRTCommand.run("overwrite-map", ["set", b, "128K", "256K"])
    func extents(_ script: String) throws -> [String] {
      let r = try RRTCommand.shell(script, cwd: s.url.path)
      XCTAssertEqual(r.status, 0, r.stderr)
      return r.lines
    }
    XCTAssertEqual(try extents("overwrite-map union a.map b.map | overwrite-map extents -"), ["0 393216"])
    XCTAssertEqual(try extents("overwrite-map intersect a.map b.map | overwrite-map extents -"), ["131072 131072"])
    XCTAssertEqual(try extents("overwrite-map subtract a.map b.map | overwrite-map extents -"), ["0 131072"])
    XCTAssertEqual(try extents("overwrite-map invert a.map | overwrite-map extents -"), ["262144 786432"])
    XCTAssertEqual(
      try extents("overwrite-map invert - < a.map | overwrite-map subtract - b.map | overwrite-map extents -"),
      ["393216 655360"])
    // A filter: set on standard input to standard output.
    XCTAssertEqual(
      try extents("overwrite-map set - 960K 64K < a.map | overwrite-map extents -"), ["0 262144", "983040 65536"])
    // -o FILE, replacing A itself.
    XCTAssertEqual(try extents("overwrite-map union a.map b.map -o a.map && overwrite-map extents a.map"), ["0 393216"])
  }

  func testAlgebraRefusesMismatchedMaps() throws {
    let s = try Scratch()
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", s.path("a.map")])
    try RRTCommand.run("overwrite-map", ["create", "--size", "2M", s.path("b.map")])
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "4K", s.path("c.map")])
    assertFails(
      try RRTCommand.run("overwrite-map", ["union", s.path("a.map"), s.path("b.map"), "-o", s.path("u.map")]),
      status: 1,
      mentioning: "describes 1048576 bytes but")
    assertFails(
      try RRTCommand.run("overwrite-map", ["intersect", s.path("a.map"), s.path("c.map"), "-o", s.path("u.map")]),
      status: 1, mentioning: "block size 65536")
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("u.map")))
    let both = try RRTCommand.run("overwrite-map", ["union", "-", "-"])
    XCTAssertNotEqual(both.status, 0)
    XCTAssertTrue(both.stderr.contains("only one map can come from standard input"), both.stderr)
  }

  func testRescale() throws {
    let s = try Scratch()
    func extents(_ script: String) throws -> [String] {
      let r = try RRTCommand.shell(script, cwd: s.url.path)
      XCTAssertEqual(r.status, 0, "\(script): \(r.stderr)")
      return r.lines
    }
    // 1000000 bytes in 64 KiB blocks: 16 blocks, the last one 16960 bytes.
    try RRTCommand.run(
      "overwrite-map", ["create", "--size", "1000000", "--meaning", "differs", "--name", "/dev/sdx", s.path("c.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("c.map"), "64K", "64K"])
    try RRTCommand.run("overwrite-map", ["set", s.path("c.map"), "983040", "16960"])
    XCTAssertEqual(
      try extents("overwrite-map rescale --block-size 4K c.map | overwrite-map extents -"),
      ["65536 65536", "983040 16960"])
    XCTAssertEqual(
      try extents("overwrite-map rescale --block-size 4K - < c.map -o f.map && overwrite-map extents f.map"),
      ["65536 65536", "983040 16960"])
    func stats(_ name: String) throws -> [String: Any] {
      let r = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path(name)])
      return try XCTUnwrap(JSONSerialization.jsonObject(with: r.data) as? [String: Any])
    }
    let c = try stats("c.map")
    let f = try stats("f.map")
    XCTAssertEqual(f["block_size"] as? Int, 4096)
    XCTAssertEqual(f["set_blocks"] as? Int, 16 + 5)
    XCTAssertEqual(f["device_size"] as? Int, 1_000_000)
    for key in ["meaning", "device_name", "tracking_started", "last_merged_stream"] {
      XCTAssertEqual("\(f[key] ?? "none")", "\(c[key] ?? "none")", key)
    }
    XCTAssertNotEqual(f["map_id"] as? String, c["map_id"] as? String, "a new map")
    // Coarser: a block is set when any block in it is; and back.
    try RRTCommand.run("overwrite-map", ["set", s.path("f.map"), "400K", "4K"])
    XCTAssertEqual(
      try extents("overwrite-map rescale --block-size 256K f.map | overwrite-map extents -"),
      ["0 524288", "786432 213568"])
    XCTAssertEqual(
      try extents(
        "overwrite-map rescale --block-size 512K f.map | overwrite-map rescale --block-size 64K - | overwrite-map extents -"
      ), ["0 1000000"])

    // A map of current blocks is made finer, never coarser.
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", "--block-size", "4K", s.path("cur.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("cur.map"), "8K", "4K"])
    XCTAssertEqual(
      try extents("overwrite-map rescale --block-size 512 cur.map | overwrite-map extents -"), ["8192 4096"])
    assertFails(
      try RRTCommand.run(
        "overwrite-map", ["rescale", "--block-size", "64K", s.path("cur.map"), "-o", s.path("x.map")]),
      status: 1, mentioning: "is a map of current blocks, and a coarse block set as current would hold back")
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("x.map")))
    let bad = try RRTCommand.run("overwrite-map", ["rescale", "--block-size", "3000", s.path("cur.map")])
    XCTAssertEqual(bad.status, 64)
    XCTAssertTrue(bad.stderr.contains("block size 3000 is not a power of two"), bad.stderr)
    XCTAssertEqual(
      try RRTCommand.run("overwrite-map", ["rescale", s.path("cur.map")]).status, 64, "--block-size is needed")
  }

  func testNeverWritesABinaryMapToATerminal() throws {
    guard RRTEnv.have("script") else { throw XCTSkip("script(1) from util-linux is needed to get a terminal") }
    let s = try Scratch()
    try RRTCommand.run("overwrite-map", ["create", "--size", "1M", s.path("a.map")])
    // script(1) runs the command with a pseudo-terminal as its standard output.
    let bin = Tools.path("overwrite-map")
    let r = try RRTCommand.shell("script -qec '\(bin) invert a.map' /dev/null", cwd: s.url.path)
    XCTAssertNotEqual(r.status, 0)
    XCTAssertTrue(r.stdout.contains("refusing to write a binary map to a terminal"), r.stdout)
    XCTAssertFalse(r.stdout.contains("DRMAP"))
  }

  func testCreateLikeAFileAndALoopDevice() throws {
    let s = try Scratch()
    let image = try s.randomFile("disk.img", size: 3 * 65536 + 512, seed: 7)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["create", "--like", image, s.path("f.map")]).status, 0)
    let json = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path("f.map")])
    let o = try XCTUnwrap(JSONSerialization.jsonObject(with: json.data) as? [String: Any])
    XCTAssertEqual(o["device_size"] as? Int, 3 * 65536 + 512)
    XCTAssertEqual(o["block_count"] as? Int, 4)
    XCTAssertEqual(o["device_name"] as? String, image)

    try LoopDevice.with(image: image) { device in
      XCTAssertEqual(try RRTCommand.run("overwrite-map", ["create", "--like", device, s.path("l.map")]).status, 0)
      let j = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path("l.map")])
      let lo = try XCTUnwrap(JSONSerialization.jsonObject(with: j.data) as? [String: Any])
      // A loop device rounds down to whole 512-byte sectors.
      XCTAssertEqual(lo["device_size"] as? Int, 3 * 65536 + 512)
      XCTAssertEqual(lo["device_name"] as? String, device)
    }
    assertFails(
      try RRTCommand.run("overwrite-map", ["create", "--like", "/dev/sdzz9", s.path("x.map")]), status: 1,
      mentioning: "/dev/sdzz9: No such file or directory")
  }
}

/// A loop device over an image file, for the block-device code paths.
enum LoopDevice {
  static func with(image: String, _ body: (String) throws -> Void) throws {
    guard getuid() == 0, RRTEnv.have("losetup") else { throw XCTSkip("loop devices need root and losetup") }
    let attach = try RRTCommand.shell("losetup --find --show '\(image)'")
    guard attach.status == 0, let device = attach.lines.first else {
      throw XCTSkip("cannot attach a loop device here: \(attach.stderr)")
    }
    defer { _ = try? RRTCommand.shell("losetup -d \(device)") }
    try body(device)
  }
}
