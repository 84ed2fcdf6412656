// bitmap-diff as users run it: exit statuses like cmp, maps and extents,
// signatures across files and pipes, loop devices, damaged input.

import Foundation
import TestSupport
import XCTest

final class BitmapDiffCLITests: XCTestCase {
  /// Two 4 MiB images that differ in known 64 KiB blocks.
  func makePair(_ s: Scratch, size: Int = 4 << 20, changed: [Int] = [0, 5, 6, 63]) throws -> (String, String) {
    let a = try s.randomFile("a.img", size: size, seed: 1)
    var data = try s.read("a.img")
    for block in changed {
      let offset = min(block * 65536 + 100, size - 1)
      data[offset] ^= 0xFF
    }
    let b = try s.file("b.img", data)
    return (a, b)
  }

  func testExitStatusesLikeCmp() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s)
    let same = try RRTCommand.run("bitmap-diff", ["--extents", a, a])
    XCTAssertEqual(same.status, 0, same.stderr)
    XCTAssertEqual(same.stdout, "")
    let differ = try RRTCommand.run("bitmap-diff", ["--extents", a, b])
    XCTAssertEqual(differ.status, 1, differ.stderr)
    XCTAssertEqual(differ.lines, ["0 65536", "327680 131072", "4128768 65536"])
    assertFails(
      try RRTCommand.run("bitmap-diff", [a, s.path("missing.img")]), status: 2, mentioning: "missing.img: No such file")
    let usage = try RRTCommand.run("bitmap-diff", [a])
    XCTAssertEqual(usage.status, 2)
    XCTAssertTrue(usage.stderr.contains("give two sources"), usage.stderr)
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--help"]).status, 0)
  }

  func testMapOutputMatchesExtents() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s)
    let r = try RRTCommand.shell(
      "bitmap-diff a.img b.img > d.map; echo $? > status; overwrite-map extents d.map", cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertEqual(String(decoding: try s.read("status"), as: UTF8.self), "1\n")
    XCTAssertEqual(r.lines, ["0 65536", "327680 131072", "4128768 65536"])
    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path("d.map")])
    let o = try XCTUnwrap(JSONSerialization.jsonObject(with: stats.data) as? [String: Any])
    XCTAssertEqual(o["meaning"] as? String, "differs")
    XCTAssertEqual(o["device_name"] as? String, "b.img", "the second source, named as given")
    XCTAssertEqual(o["set_blocks"] as? Int, 4)
    // -o FILE gives the same map bits.
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["-o", s.path("o.map"), a, b]).status, 1)
    XCTAssertEqual(try RRTCommand.run("overwrite-map", ["extents", s.path("o.map")]).lines, r.lines)
  }

  func testBlockSizesAndPartialLastBlock() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s, size: 1_000_000, changed: [15])
    // Block 15 at 64 KiB is the partial last block (983040..1000000).
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", a, b]).lines, ["983040 16960"])
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", "--block-size", "4K", a, b]).lines, ["983040 4096"])
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", "--block-size", "512", a, b]).lines, ["983040 512"])
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--block-size", "1000", a, b]).status, 2)
    // O_DIRECT reads the aligned blocks directly and the partial tail buffered.
    let direct = try RRTCommand.run("bitmap-diff", ["--direct", "--extents", a, b])
    if direct.stderr.contains("not supported here") { return }  // a file system without O_DIRECT
    XCTAssertEqual(direct.lines, ["983040 16960"], direct.stderr)
  }

  func testSizeChange() throws {
    let s = try Scratch()
    let a = try s.randomFile("a.img", size: 1 << 20, seed: 3)
    var longer = try s.read("a.img")
    longer.append(Data(repeating: 7, count: 100_000))
    let b = try s.file("b.img", longer)
    assertFails(try RRTCommand.run("bitmap-diff", [a, b]), status: 2, mentioning: "--allow-size-change")
    let grown = try RRTCommand.run("bitmap-diff", ["--extents", "--allow-size-change", a, b])
    XCTAssertEqual(grown.status, 1)
    XCTAssertEqual(grown.lines, ["1048576 100000"])
    let shrunk = try RRTCommand.run("bitmap-diff", ["--extents", "--allow-size-change", b, a])
    XCTAssertEqual(shrunk.status, 1, "the lost tail counts as a difference")
    XCTAssertEqual(shrunk.lines, [])
  }

  func testHolesCompareAsZeros() throws {
    let s = try Scratch()
    // A sparse file and a dense file of zeros with the same data blocks.
    let sparse = s.path("sparse.img")
    let dense = s.path("dense.img")
    XCTAssertEqual(
      try RRTCommand.shell("truncate -s 8M sparse.img && head -c 8M /dev/zero > dense.img", cwd: s.url.path).status, 0)
    try s.patch("sparse.img", at: 3 << 20, Array(repeating: 9, count: 1000))
    try s.patch("dense.img", at: 3 << 20, Array(repeating: 9, count: 1000))
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", [sparse, dense, "-o", s.path("m")]).status, 0)
    try s.patch("sparse.img", at: 7 << 20, [1])
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", sparse, dense]).lines, ["7340032 65536"])
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", dense, sparse]).lines, ["7340032 65536"])
  }

  func testSignatureGivesTheSameMapAsTheData() throws {
    let s = try Scratch()
    var rng = SplitMix64(seed: 99)
    for round in 0..<4 {
      let size = [4 << 20, 1_000_000, 65536 * 3, 12345][round]
      let changed = (0..<Int(rng.next() % 6)).map { _ in Int(rng.next() % UInt64(max(1, size / 65536 + 1))) }
      let (a, b) = try makePair(s, size: size, changed: changed)
      let direct = try RRTCommand.run("bitmap-diff", ["--extents", a, b])
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--signature", "-o", s.path("a.sig"), a]).status, 0)
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--signature", "-o", s.path("b.sig"), b]).status, 0)
      for pair in [[s.path("a.sig"), b], [a, s.path("b.sig")], [s.path("a.sig"), s.path("b.sig")]] {
        let viaSig = try RRTCommand.run("bitmap-diff", ["--extents"] + pair)
        XCTAssertEqual(viaSig.status, direct.status, "\(pair): \(viaSig.stderr)")
        XCTAssertEqual(viaSig.lines, direct.lines, "round \(round) \(pair)")
      }
      // The signature streams through a pipe, as over ssh.
      let piped = try RRTCommand.shell("bitmap-diff --signature a.img | bitmap-diff --extents - b.img", cwd: s.url.path)
      XCTAssertEqual(piped.lines, direct.lines, piped.stderr)
    }
  }

  func testSignatureOptionsAndDigests() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s)
    XCTAssertEqual(
      try RRTCommand.run(
        "bitmap-diff", ["--signature", "--digest", "sha512", "--block-size", "4K", "-o", s.path("a.sig"), a]
      ).status, 0)
    // 1024 blocks of 64-byte digests plus header and checksum.
    let size = try s.read("a.sig").count
    XCTAssertGreaterThan(size, 1024 * 64)
    XCTAssertLessThan(size, 1024 * 64 + 400)
    XCTAssertEqual(
      try RRTCommand.run("bitmap-diff", ["--extents", s.path("a.sig"), b]).lines,
      ["0 4096", "327680 4096", "393216 4096", "4128768 4096"])
    assertFails(
      try RRTCommand.run("bitmap-diff", ["--block-size", "64K", s.path("a.sig"), b]), status: 2,
      mentioning: "made with block size 4096, not 65536")
    assertFails(
      try RRTCommand.run("bitmap-diff", ["--signature", "--digest", "nosuch", "-o", s.path("x.sig"), a]), status: 2,
      mentioning: "digest nosuch is not known")
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("x.sig")))
  }

  func testDamagedSignaturesAreRefused() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s, size: 1 << 20)
    try RRTCommand.run("bitmap-diff", ["--signature", "-o", s.path("a.sig"), a])
    let good = try s.read("a.sig")
    for cut in [0, 5, 40, 100, good.count / 2, good.count - 32, good.count - 1] {
      try s.file("cut.sig", good.prefix(cut))
      let r = try RRTCommand.run("bitmap-diff", [s.path("cut.sig"), b, "-o", s.path("out.map")])
      XCTAssertEqual(r.status, cut < 8 ? 2 : 2, "cut at \(cut): \(r.stderr)")
      XCTAssertFalse(r.stderr.isEmpty)
      XCTAssertFalse(
        FileManager.default.fileExists(atPath: s.path("out.map")), "a map was written from a bad signature")
    }
    for offset in stride(from: 0, to: good.count, by: max(1, good.count / 40)) {
      var bad = good
      bad[offset] ^= 0x01
      try s.file("bad.sig", bad)
      let r = try RRTCommand.run("bitmap-diff", ["--extents", s.path("bad.sig"), a])
      XCTAssertEqual(r.status, 2, "flip at \(offset) accepted: \(r.stdout)")
      XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
    }
  }

  func testLoopDeviceAgainstItsImage() throws {
    let s = try Scratch()
    let image = try s.randomFile("disk.img", size: 8 << 20, seed: 21)
    let copy = try s.file("copy.img", try s.read("disk.img"))
    try LoopDevice.with(image: image) { device in
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", device, copy]).status, 0)
      // Write through the block device, then compare again.
      let w = try RRTCommand.shell(
        "printf 'changed' | dd of=\(device) bs=1 seek=\(5 << 20) conv=notrunc,fsync status=none")
      XCTAssertEqual(w.status, 0, w.stderr)
      let r = try RRTCommand.run("bitmap-diff", ["--extents", copy, device])
      XCTAssertEqual(r.status, 1, r.stderr)
      XCTAssertEqual(r.lines, ["5242880 65536"])
      // The same through O_DIRECT, with a block size below the page size.
      let direct = try RRTCommand.run("bitmap-diff", ["--direct", "--block-size", "512", "--extents", copy, device])
      XCTAssertEqual(direct.status, 1, direct.stderr)
      XCTAssertEqual(direct.lines, ["5242880 512"])
      // A signature of the device compares with the image file.
      XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--signature", "-o", s.path("dev.sig"), device]).status, 0)
      XCTAssertEqual(
        try RRTCommand.run("bitmap-diff", ["--extents", s.path("dev.sig"), copy]).lines, ["5242880 65536"])
    }
  }

  func testNeverWritesBinaryToATerminal() throws {
    guard RRTEnv.have("script") else { throw XCTSkip("script(1) from util-linux is needed to get a terminal") }
    let s = try Scratch()
    _ = try makePair(s)
    let bin = Tools.path("bitmap-diff")
    let map = try RRTCommand.shell("script -qec '\(bin) a.img b.img' /dev/null", cwd: s.url.path)
    XCTAssertTrue(map.stdout.contains("refusing to write a binary map to a terminal"), map.stdout)
    let sig = try RRTCommand.shell("script -qec '\(bin) --signature a.img' /dev/null", cwd: s.url.path)
    XCTAssertTrue(sig.stdout.contains("refusing to write a binary signature to a terminal"), sig.stdout)
    // --extents is text and goes to the terminal.
    let text = try RRTCommand.shell("script -qec '\(bin) --quiet --extents a.img b.img' /dev/null", cwd: s.url.path)
    XCTAssertTrue(text.stdout.contains("327680 131072"), text.stdout)
  }

  func testSparseSignatureOfAMap() throws {
    let s = try Scratch()
    // Blocks 0, 5, 6 and 63 of 64 KiB differ; the map selects blocks 0..<8.
    let (a, b) = try makePair(s)
    try RRTCommand.run("overwrite-map", ["create", "--like", a, "--meaning", "selected", s.path("sel.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("sel.map"), "0", "512K"])
    let sign = try RRTCommand.run("bitmap-diff", ["--signature", "--map", s.path("sel.map"), "-o", s.path("a.sig"), a])
    XCTAssertEqual(sign.status, 0, sign.stderr)
    // 8 digests and a selection of 3 bytes (runs 0, 8, 56), not 64 digests.
    let size = try s.read("a.sig").count
    XCTAssertEqual(size, 82 + a.utf8.count + 16 + 3 + 8 * 32 + 32)
    let selected = ["0 65536", "327680 131072"]
    for pair in [[s.path("a.sig"), b], [b, s.path("a.sig")]] {
      let r = try RRTCommand.run("bitmap-diff", ["--extents"] + pair)
      XCTAssertEqual(r.status, 1, r.stderr)
      XCTAssertEqual(r.lines, selected, "\(pair): block 63 is outside the selection")
    }
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--extents", s.path("a.sig"), a]).status, 0)
    // Outside the selection nothing counts: a difference there alone is no difference.
    let far = try RRTCommand.run("bitmap-diff", ["--extents", "--signature", "--map", s.path("sel.map"), b])
    XCTAssertNotEqual(far.status, 0, "a signature is not text")
    try RRTCommand.run("overwrite-map", ["create", "--like", a, "--meaning", "selected", s.path("tail.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("tail.map"), "4M", "0"])
    try RRTCommand.run("overwrite-map", ["set", s.path("tail.map"), "1M", "1M"])
    try RRTCommand.run("bitmap-diff", ["--signature", "--map", s.path("tail.map"), "-o", s.path("mid.sig"), a])
    let none = try RRTCommand.run("bitmap-diff", ["--extents", s.path("mid.sig"), b])
    XCTAssertEqual(none.status, 0, none.stderr)
    XCTAssertEqual(none.lines, [])

    // Through pipes, the map from standard input; against a dense signature
    // and against a sparse one of the same map; as a map.
    let piped = try RRTCommand.shell(
      "bitmap-diff --signature --map - a.img < sel.map | bitmap-diff --extents - b.img; test $? = 1", cwd: s.url.path)
    XCTAssertEqual(piped.status, 0, piped.stderr)
    XCTAssertEqual(piped.lines, selected)
    try RRTCommand.run("bitmap-diff", ["--signature", "-o", s.path("b-dense.sig"), b])
    try RRTCommand.run("bitmap-diff", ["--signature", "--map", s.path("sel.map"), "-o", s.path("b.sig"), b])
    for pair in [["a.sig", "b-dense.sig"], ["b-dense.sig", "a.sig"], ["a.sig", "b.sig"]] {
      let r = try RRTCommand.run("bitmap-diff", ["--extents"] + pair.map(s.path))
      XCTAssertEqual(r.status, 1, r.stderr)
      XCTAssertEqual(r.lines, selected, "\(pair)")
    }
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["-o", s.path("d.map"), s.path("a.sig"), b]).status, 1)
    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", s.path("d.map")])
    let o = try XCTUnwrap(JSONSerialization.jsonObject(with: stats.data) as? [String: Any])
    XCTAssertEqual(o["meaning"] as? String, "differs")
    XCTAssertEqual(o["set_blocks"] as? Int, 3)
    XCTAssertEqual(o["block_count"] as? Int, 64)

    // A map of 4 KiB blocks makes a signature of 4 KiB blocks, with or
    // without --block-size 4K.
    let fine = try RRTCommand.shell(
      "overwrite-map rescale --block-size 4K sel.map -o fine.map && "
        + "bitmap-diff --signature --map fine.map a.img > f1.sig && "
        + "bitmap-diff --signature --map fine.map --block-size 4K a.img > f2.sig && "
        + "bitmap-diff --extents f1.sig b.img; test $? = 1 && bitmap-diff --extents f2.sig b.img",
      cwd: s.url.path)
    XCTAssertEqual(fine.status, 1, fine.stderr)
    XCTAssertEqual(fine.lines, ["0 4096", "327680 4096", "393216 4096"] + ["0 4096", "327680 4096", "393216 4096"])
  }

  func testSparseSignatureRefusals() throws {
    let s = try Scratch()
    let (a, b) = try makePair(s)
    try RRTCommand.run("overwrite-map", ["create", "--like", a, s.path("sel.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("sel.map"), "0", "1M"])
    try RRTCommand.run("bitmap-diff", ["--signature", "--map", s.path("sel.map"), "-o", s.path("a.sig"), a])
    func refused(_ arguments: [String], _ fragment: String) throws {
      assertFails(try RRTCommand.run("bitmap-diff", arguments), status: 2, mentioning: fragment)
      XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("out")), "\(arguments) wrote its output")
    }
    try refused(["--map", s.path("sel.map"), a, b], "--map applies only to --signature")
    try refused(["--signature", "--map", "-", "-"], "only one of --map and SOURCE")
    try refused(
      ["--signature", "--map", s.path("sel.map"), "--block-size", "4K", "-o", s.path("out"), a],
      "sel.map has block size 65536, not 4096")
    try RRTCommand.run("overwrite-map", ["create", "--size", "8M", s.path("big.map")])
    try refused(
      ["--signature", "--map", s.path("big.map"), "-o", s.path("out"), a], "describes 8388608 bytes but \(a) has")
    try refused(["--signature", "--map", s.path("missing.map"), "-o", s.path("out"), a], "missing.map")
    // Two sparse signatures of different selections.
    try RRTCommand.run("overwrite-map", ["set", s.path("sel.map"), "1M", "64K"])
    try RRTCommand.run("bitmap-diff", ["--signature", "--map", s.path("sel.map"), "-o", s.path("b.sig"), b])
    try refused([s.path("a.sig"), s.path("b.sig"), "-o", s.path("out")], "different selections")
    // Another size, even with --allow-size-change.
    let short = try s.file("short.img", try s.read("b.img").prefix(1 << 20))
    try refused(["--allow-size-change", s.path("a.sig"), short, "-o", s.path("out")], "sparse signature")
    try refused(["--allow-size-change", short, s.path("a.sig"), "-o", s.path("out")], "sparse signature")
    // A damaged selection: one sentence, no map.
    var bad = try s.read("a.sig")
    bad[82 + a.utf8.count + 16] ^= 0x40
    try s.file("bad.sig", bad)
    let r = try RRTCommand.run("bitmap-diff", [s.path("bad.sig"), b, "-o", s.path("out")])
    XCTAssertEqual(r.status, 2, r.stderr)
    XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("out")))
  }
}
