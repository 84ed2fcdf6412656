// tracking-server end to end: the built server spawned on an image file in a
// scratch directory (TrackRig, in TrackingHarness.swift), its control
// subcommands, and real NBD clients — nbdinfo, nbdsh, nbdcopy, qemu-img —
// with snapshot and merge-snapshot reading the frozen view.
//
// What is checked is what the tool promises (its --help and the invariants
// of TrackingEngine.swift): every write, WRITE_ZEROES and TRIM sets exactly
// the blocks it touches in the change map, which is continued across starts
// and refused when it is not a change map of this device; a frozen view
// reads the device as it was at the freeze — a cut of the writes around it —
// however the device is written afterwards, is read-only, offered only
// while held, and lost, never wrong, when its store fills, when it is
// dropped under a client, or when the server stops or dies (a snapshot
// reading it fails rather than finish on another view); a generation ends
// atomically with its map saved; the server's own files (device, journal,
// store) are never replaced or removed by a path given to it; after kill -9
// every flushed write is on the device and the change map covers every
// block that differs from the original.

import Foundation
import Glibc
import TestSupport
import XCTest

final class TrackingServerCLITests: CLITestCase {
  /// A rig with tracking-server answering.
  func running(size: Int = 16 << 20, seed: UInt64 = 1, arguments: [String] = []) throws -> TrackRig {
    let r = try TrackRig(size: size, seed: seed)
    rigs.append(r)
    try r.start(arguments)
    return r
  }

  /// Asserts a failed command: a non-zero status and one line on standard
  /// error holding every fragment.
  func assertRefused(
    _ r: RRTCommand.Result, _ fragments: String..., file: StaticString = #filePath, line: UInt = #line
  ) {
    XCTAssertNotEqual(r.status, 0, "expected a failure: \(r.summary)", file: file, line: line)
    XCTAssertFalse(r.timedOut, r.summary, file: file, line: line)
    let lines = r.stderr.split(separator: "\n", omittingEmptySubsequences: true)
    XCTAssertEqual(lines.count, 1, "not one sentence on standard error: \(r.summary)", file: file, line: line)
    for f in fragments {
      XCTAssertTrue(r.stderr.contains(f), "stderr lacks \(f.debugDescription): \(r.summary)", file: file, line: line)
    }
    XCTAssertFalse(r.stderr.contains("Fatal error"), r.summary, file: file, line: line)
  }

  // MARK: 1. Exports, the change map, its generation, refusals

  func testListsTheDeviceAndTheViewOnlyWhileOneIsFrozen() throws {
    try require("nbdinfo")
    let r = try running()
    var e = try r.exports()
    XCTAssertEqual(Set(e.keys), ["device"], "before any freeze")
    XCTAssertEqual(e["device"]?["export-size"] as? Int, r.size)
    XCTAssertEqual(e["device"]?["is_read_only"] as? Bool, false)
    XCTAssertEqual(e["device"]?["can_trim"] as? Bool, true)
    XCTAssertEqual(e["device"]?["can_zero"] as? Bool, true)
    XCTAssertEqual(e["device"]?["can_fua"] as? Bool, true)

    let f = try r.control("freeze", ["--json"])
    XCTAssertEqual(f.status, 0, f.summary)
    let fo = try TrackRig.json(f.stdout)
    XCTAssertEqual(fo["view_lost"] as? Bool, false, f.stdout)
    e = try r.exports()
    XCTAssertEqual(Set(e.keys), ["device", "view"], "while a view is frozen")
    XCTAssertEqual(e["view"]?["export-size"] as? Int, r.size)
    XCTAssertEqual(e["view"]?["is_read_only"] as? Bool, true)
    let st = try r.status()
    XCTAssertEqual(st["view"] as? String, fo["view"] as? String)
    XCTAssertTrue(FileManager.default.fileExists(atPath: r.storePath), "the store of a held view")

    let d = try r.control("drop")
    XCTAssertEqual(d.status, 0, d.summary)
    XCTAssertEqual(Set(try r.exports().keys), ["device"], "after the drop")
    XCTAssertNil(try r.status()["view"], "status after the drop")
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.storePath), "the store after the drop")
    r.stop()
  }

  func testWritesZeroesAndTrimsMarkExactlyTheBlocksTheyTouch() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 2)
    var stats = try r.mapStats()
    XCTAssertEqual(stats["block_size"] as? Int, 65536, "the default block size")
    XCTAssertEqual(stats["meaning"] as? String, "changed")
    XCTAssertEqual(stats["device_size"] as? Int, r.size)
    XCTAssertEqual(stats["set_blocks"] as? Int, 0, "a new generation")
    let B = r.blockSize
    let last = r.blockCount - 1
    // (offset, length, kind): d data, f data with FUA, z WRITE_ZEROES, t TRIM.
    let ops: [(Int, Int, Character)] = [
      (3 * B, B, "d"),  // one aligned block
      (7 * B, 2 * B, "d"),  // two aligned blocks
      (13 * B - 50, 100, "d"),  // unaligned, across a boundary
      (20 * B + 777, 1, "d"),  // one byte
      (25 * B + 10, B, "f"),  // FUA, unaligned, two blocks
      (30 * B + 5, 3, "z"),  // a few zero bytes
      (40 * B, 2 * B, "z"),  // aligned zeroes
      (50 * B, B, "t"),  // an aligned TRIM
      (55 * B + 100, B + 1, "t"),  // an unaligned TRIM over three blocks
      (r.size - 1, 1, "d"),  // the device's last byte
    ]
    let list = ops.map { "(\($0.0), \($0.1), '\($0.2)')" }.joined(separator: ", ")
    let out = try r.nbdsh(
      """
      h.connect_uri(URI)
      w = 1
      for off, n, kind in [\(list)]:
          if kind == 'd':
              h.pwrite(pattern(w, n), off)
          elif kind == 'f':
              h.pwrite(pattern(w, n), off, nbd.CMD_FLAG_FUA)
          elif kind == 'z':
              h.zero(n, off)
          else:
              h.trim(n, off)
          w += 1
      # Reads mark nothing.
      h.pread(4 * B, 60 * B)
      h.flush()
      h.shutdown()
      print('OK')
      """)
    XCTAssertEqual(out.status, 0, out.summary + "\nlog:\n" + r.log)
    var expected = Set<Int>()
    for (o, n, _) in ops { expected.formUnion(r.blocks(o, n)) }
    XCTAssertTrue(expected.contains(last) && expected.contains(56) && expected.contains(12))
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, expected.count)
    // The map file takes in its journal every few seconds and at a stop.
    r.stop()
    let marked = try r.setBlocks()
    XCTAssertEqual(
      marked, expected,
      "marked but not touched: \(marked.subtracting(expected).brief); touched but not marked: \(expected.subtracting(marked).brief)"
    )
    stats = try r.mapStats()
    XCTAssertEqual(stats["set_blocks"] as? Int, expected.count)

    // The data went where it was sent; zeroed and trimmed ranges read zeros.
    let device = try r.deviceData()
    for (i, (o, n, kind)) in ops.enumerated() {
      let want = kind == "d" || kind == "f" ? TrackRig.pattern(UInt32(i + 1), n) : Data(count: n)
      XCTAssertTrue(TrackRig.holds(device, want, at: o), "op \(i) (\(kind) \(o)+\(n)) is not on the device")
    }
    let untouched = Set(0..<r.blockCount).subtracting(expected)
    let changed = RRTBytes.differingBlocks(r.original, device, blockSize: B)
    XCTAssertTrue(changed.isDisjoint(with: untouched), "untouched blocks changed: \(changed.intersection(untouched))")
  }

  func testBlockSizeOptionSetsTheGranularityOfANewMap() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 3, arguments: ["--block-size", "4K"])
    XCTAssertEqual(try r.mapStats()["block_size"] as? Int, 4096)
    XCTAssertEqual(try r.exports()["device"]?["block_size_preferred"] as? Int, 4096)
    let out = try r.nbdsh(
      """
      h.connect_uri(URI)
      h.pwrite(b'x' * 100, 5 * 4096 - 50)
      h.zero(4096, 100 * 4096)
      h.flush()
      print('OK')
      """)
    XCTAssertEqual(out.status, 0, out.summary)
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, 3)
    r.stop()
    XCTAssertEqual(try r.setBlocks(blockSize: 4096), [4, 5, 100])
    let e = try r.run("overwrite-map", ["extents", r.mapPath])
    XCTAssertEqual(e.lines, ["16384 8192", "409600 4096"], e.summary)
  }

  func testARestartWithTheSameMapContinuesItsGeneration() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 4)
    let first = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(1, B), 5 * B)\nh.flush()\nprint('OK')")
    XCTAssertEqual(first.status, 0, first.summary)
    let before = try r.mapStats()
    r.stop()

    try r.start()
    XCTAssertTrue(
      r.log.contains("generation \(before["map_id"] as? String ?? "?")")
        && r.log.contains("goes on: 1 block(s) changed so far"), r.log)
    let second = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(b'y' * 10, 9 * B + 3)\nh.flush()\nprint('OK')")
    XCTAssertEqual(second.status, 0, second.summary)
    let after = try r.mapStats()
    XCTAssertEqual(after["map_id"] as? String, before["map_id"] as? String, "the map id after a restart")
    XCTAssertEqual(after["tracking_started"] as? String, before["tracking_started"] as? String)
    XCTAssertEqual(try r.status()["generation"] as? String, before["map_id"] as? String)
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, 2)
    r.stop()
    XCTAssertEqual(try r.setBlocks(), [5, 9], "the blocks of both runs")
  }

  /// A map created by a server started with relative paths names its
  /// device so that a start from another directory, with absolute paths,
  /// continues it.
  func testAMapStartedWithRelativePathsContinuesFromAnotherDirectory() throws {
    try require("nbdinfo")
    let r = try TrackRig(seed: 21)
    rigs.append(r)
    let first = try RRTChild(
      name: "relative", executable: Tools.path("tracking-server"),
      arguments: ["serve", "--changes", "d.map", "--socket", "d.sock", "device.img"], stdout: r.s.path("rel.out"),
      stderr: r.s.path("rel.log"), cwd: r.dir)
    r.others.append(first)
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end && first.isRunning {
      if let q = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri], timeout: 5), q.status == 0 { break }
      RRTEnv.sleep(0.05)
    }
    XCTAssertEqual(first.stop(grace: 10), 0, first.errors)
    let generation = try r.mapStats()["map_id"] as? String
    let second = try RRTCommand.run(
      "/usr/bin/timeout", ["-s", "TERM", "3", Tools.path("tracking-server")] + r.serverArgumentsForTest, timeout: 20,
      cwd: "/")
    XCTAssertTrue(
      second.stderr.contains("goes on"),
      "a start from / with absolute paths did not continue the map: \(second.summary)")
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, generation)
  }

  func testMapsOfAnotherMeaningSizeOrDeviceAreRefused() throws {
    let r = try TrackRig(size: 4 << 20, seed: 5)
    rigs.append(r)
    let maps: [(String, [String], String)] = [
      ("current.map", ["--like", r.devicePath, "--meaning", "current"], "not a change map"),
      ("differs.map", ["--like", r.devicePath, "--meaning", "differs"], "not a change map"),
      ("small.map", ["--size", "2M", "--meaning", "changed"], "describes 2097152 bytes"),
      ("other.map", ["--like", r.devicePath, "--meaning", "changed", "--name", "/dev/other"], "/dev/other"),
    ]
    for (name, options, cause) in maps {
      let path = r.s.path(name)
      let c = try r.run("overwrite-map", ["create"] + options + [path])
      XCTAssertEqual(c.status, 0, c.summary)
      let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
      let serve = try r.run(
        "tracking-server", ["serve", "--changes", path, "--socket", r.socket, r.devicePath], timeout: 20)
      assertRefused(serve, path, cause)
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), bytes, "\(name) was changed")
      XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".store"))
    }
    // Options that cannot work are refused before anything is opened.
    let small = try r.run(
      "tracking-server", ["serve", "--changes", r.mapPath, "--socket", r.socket, "--store-limit", "4K", r.devicePath])
    XCTAssertEqual(small.status, 64, small.summary)
    XCTAssertTrue(small.stderr.contains("--store-limit"), small.summary)
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.mapPath), "a refused start created the map")
    let missing = try r.run("tracking-server", ["serve", "--changes", r.mapPath, "--socket", r.socket, "nothing.img"])
    assertRefused(missing, "nothing.img")
  }

  /// The device a loop device (block-device paths: BLKZEROOUT, O_EXCL):
  /// writes, zeroes and trims reach it, the view keeps the old contents,
  /// and a second server of the device is refused as busy.
  func testABlockDeviceIsTrackedAndFrozen() throws {
    try require("nbdinfo", "nbdsh", "nbdcopy")
    let r = try TrackRig(seed: 22)
    rigs.append(r)
    try LoopDevice.with(image: r.devicePath) { device in
      r.served = device
      try r.start()
      XCTAssertEqual(try r.control("freeze").status, 0)
      let out = try r.nbdsh(
        """
        h.connect_uri(URI)
        h.zero(5 << 20, (1 << 20) + 512)
        h.trim(3 << 20, 10 << 20)
        h.pwrite(pattern(1, 1000), 14 << 20)
        h.flush()
        print('OK')
        """)
      XCTAssertEqual(out.status, 0, out.summary + "\nlog:\n" + r.log)
      let copy = try RRTCommand.run("/usr/bin/nbdcopy", [r.viewURI, r.s.path("view.img")], timeout: 60)
      XCTAssertEqual(copy.status, 0, copy.summary)
      RRTBytes.assertEqual(try r.s.read("view.img"), r.original, "the view of the block device")
      let second = try r.run(
        "tracking-server", ["serve", "--changes", r.s.path("e.map"), "--socket", r.s.path("e.sock"), device],
        timeout: 20)
      assertRefused(second, "busy")
      r.stop()
    }
    var expected = r.original
    expected.replaceSubrange(((1 << 20) + 512)..<((6 << 20) + 512), with: Data(count: 5 << 20))
    expected.replaceSubrange((10 << 20)..<(13 << 20), with: Data(count: 3 << 20))
    expected.replaceSubrange((14 << 20)..<((14 << 20) + 1000), with: TrackRig.pattern(1, 1000))
    RRTBytes.assertEqual(try r.deviceData(), expected, "the loop device's image after the stop")
    let touched = Set(r.blocks((1 << 20) + 512, 5 << 20) + r.blocks(10 << 20, 3 << 20) + r.blocks(14 << 20, 1000))
    XCTAssertEqual(try r.setBlocks(), touched)
  }

  // MARK: 2. A frozen view stays exact while writes go on

  /// The writer of the view tests (nbdsh; SEED and STOP set before it):
  /// batches of 8 random writes and zeroes in flight at once, overlapping,
  /// until the file STOP appears. Prints `N count` after each batch and
  /// `DONE count` once everything it sent is acknowledged and flushed.
  static let busyWriter = """
    rnd = random.Random(SEED)
    h.connect_uri(URI)
    print('READY', flush=True)
    n = 0
    while not os.path.exists(STOP):
        cmds = []
        keep = []
        for _ in range(8):
            x = rnd.random()
            if x < 0.5:
                off = rnd.randrange(SIZE // B) * B
                ln = min(B * rnd.choice([1, 2, 3]), SIZE - off)
            else:
                off = rnd.randrange(SIZE - 1)
                ln = rnd.randrange(1, min(2 * B, SIZE - off) + 1)
            if x < 0.9:
                buf = nbd.Buffer.from_bytearray(bytearray(rnd.randbytes(ln)))
                keep.append(buf)
                cmds.append(h.aio_pwrite(buf, off))
            else:
                cmds.append(h.aio_zero(ln, off))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cmds:
            h.aio_command_completed(c)
        n += len(cmds)
        print('N', n, flush=True)
    h.flush()
    h.shutdown()
    print('DONE', n, flush=True)
    """

  /// The last `N count` a busy writer printed.
  func writerCount(_ w: RRTChild) -> Int {
    w.output.split(separator: "\n").last { $0.hasPrefix("N ") }.flatMap { Int($0.dropFirst(2)) } ?? 0
  }

  func waitForCount(_ w: RRTChild, atLeast n: Int, timeout: Double = 60) -> Bool {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end && w.isRunning {
      if writerCount(w) >= n { return true }
      usleep(10_000)
    }
    return writerCount(w) >= n
  }

  /// Stops a busy writer through its STOP file; it must end cleanly.
  func finish(_ w: RRTChild, stopFile: String, file: StaticString = #filePath, line: UInt = #line) {
    _ = FileManager.default.createFile(atPath: stopFile, contents: nil)
    XCTAssertEqual(w.wait(timeout: 60), 0, "the writer: \(w.output.suffix(200)) \(w.errors)", file: file, line: line)
    XCTAssertTrue(w.output.contains("DONE"), w.output.suffix(200) + w.errors, file: file, line: line)
  }

  func testAFrozenViewStaysExactWhileWritesGoOn() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(size: 64 << 20, seed: 6)
    let B = r.blockSize

    // Writes before the freeze; they end (all acknowledged) before it.
    let w1 = try r.nbdshChild("SEED = 61\nSTOP = 'stop1'\n" + Self.busyWriter, name: "writer1")
    XCTAssertTrue(waitForCount(w1, atLeast: 64), "writer1: \(w1.output.suffix(200)) \(w1.errors)\n\(r.log)")
    finish(w1, stopFile: r.s.path("stop1"))

    let f = try r.control("freeze", ["--changes-out", "g0.map", "--json"])
    XCTAssertEqual(f.status, 0, f.summary)
    let fo = try TrackRig.json(f.stdout)
    let reference = try r.deviceData()
    try reference.write(to: URL(fileURLWithPath: r.s.path("ref.img")))
    // The generation ended at the freeze: g0.map covers what writer1 changed.
    let before = RRTBytes.differingBlocks(r.original, reference, blockSize: B)
    XCTAssertFalse(before.isEmpty)
    let g0 = try r.setBlocks(r.s.path("g0.map"))
    XCTAssertTrue(before.isSubset(of: g0), "changed before the freeze, not in g0.map: \(before.subtracting(g0).brief)")
    XCTAssertEqual(try r.mapStats(r.s.path("g0.map"))["map_id"] as? String, fo["ended_generation"] as? String)
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, fo["generation"] as? String)
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, 0, "the new generation right after the freeze")
    XCTAssertEqual(fo["frozen"] as? String, fo["generation_started"] as? String, "the view's instant: \(fo)")
    XCTAssertEqual(try r.mapStats()["tracking_started"] as? String, fo["generation_started"] as? String)

    // The snapshot of the view runs while writer2 keeps writing.
    let w2 = try r.nbdshChild("SEED = 62\nSTOP = 'stop2'\n" + Self.busyWriter, name: "writer2")
    XCTAssertTrue(waitForCount(w2, atLeast: 16), "writer2: \(w2.output.suffix(200)) \(w2.errors)\n\(r.log)")
    let countBefore = writerCount(w2)
    let snap = try r.run("snapshot", ["-o", "v.stream", r.viewURI])
    let countAfter = writerCount(w2)
    XCTAssertEqual(snap.status, 0, snap.summary + "\nlog:\n" + r.log)
    XCTAssertGreaterThan(countAfter, countBefore, "no write completed while the snapshot read the view")
    if RRTEnv.have("qemu-img") {
      let q = try r.run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", r.viewURI, r.s.path("ref.img")])
      XCTAssertEqual(q.status, 0, "qemu-img compare of the view and the reference: \(q.summary)")
    }
    finish(w2, stopFile: r.s.path("stop2"))
    let st = try r.status()
    XCTAssertEqual(st["view_lost"] as? Bool, false, "\(st)")
    XCTAssertGreaterThan(st["preserved_blocks"] as? Int ?? 0, 0, "no block was preserved: \(st)")

    // The stream merged into an empty image is the device at the freeze.
    let check = try r.run("merge-snapshot", ["--check", "-i", "v.stream"])
    XCTAssertEqual(check.status, 0, check.summary)
    XCTAssertEqual(try r.run("overwrite-map", ["create", "--like", "ref.img", "m.map"]).status, 0)
    XCTAssertEqual(try r.run("/usr/bin/truncate", ["-s", String(r.size), "out.img"]).status, 0)
    let merge = try r.run("merge-snapshot", ["--mirror", "--map", "m.map", "-i", "v.stream", "out.img"])
    XCTAssertEqual(merge.status, 0, merge.summary)
    let cmp = try r.run("/usr/bin/cmp", ["out.img", "ref.img"])
    XCTAssertEqual(cmp.status, 0, "the merged view differs from the device at the freeze: \(cmp.summary)")

    // The live device moved on, and the new generation covers it.
    let now = try r.deviceData()
    let after = RRTBytes.differingBlocks(reference, now, blockSize: B)
    XCTAssertFalse(after.isEmpty, "writer2 changed nothing")
    let d = try r.control("drop")
    XCTAssertEqual(d.status, 0, d.summary)
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.storePath), "the store after the drop")
    r.stop()
    let live = try r.setBlocks()
    XCTAssertTrue(
      after.isSubset(of: live), "changed after the freeze, not in the map: \(after.subtracting(live).brief)")
  }

  /// Views frozen in the middle of a stream of writes, one at a time (the
  /// crash writer's): each holds exactly the writes before some instant
  /// within the freeze — every write completed before the freeze began,
  /// none sent after it returned — however the device is written while the
  /// view is copied.
  func testAViewFrozenAmidWritesHoldsExactlyTheWritesBeforeIt() throws {
    try require("nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(size: 32 << 20, seed: 15)
    let writer = try r.nbdshChild("SEED = 1501\nWBASE = 1\n" + Self.crashWriter, name: "writer")
    XCTAssertTrue(writer.waitForOutput("\nF ", timeout: 30), writer.errors)
    var rng = SplitMix64(seed: 0x15_2026)
    var image = r.original
    var applied = 1  // the writes with smaller ids are in `image`
    func apply(_ w: (id: Int, offset: Int, length: Int, kind: Character)) {
      let data = w.kind == "d" ? TrackRig.pattern(UInt32(w.id), w.length) : Data(count: w.length)
      image.replaceSubrange(w.offset..<(w.offset + w.length), with: data)
    }
    for round in 0..<3 {
      RRTEnv.sleep(0.05 + Double(rng.next() % 300) / 1000)
      // `W k` is printed before write k is sent and after write k - 1 completed.
      let before = CrashLog(writer.output).writes.last?.id ?? 0
      let f = try r.control("freeze")
      let after = CrashLog(writer.output).writes.last?.id ?? 0
      XCTAssertEqual(f.status, 0, f.summary)
      let name = "view\(round).img"
      let copy = try RRTCommand.run("/usr/bin/nbdcopy", [r.viewURI, r.s.path(name)], timeout: 120)
      XCTAssertEqual(copy.status, 0, copy.summary + "\nlog:\n" + r.log)
      XCTAssertTrue(writer.isRunning, "the writer stopped: \(writer.output.suffix(300)) \(writer.errors)")
      let view = try r.s.read(name)
      let writes = CrashLog(writer.output).writes
      XCTAssertTrue(writes.enumerated().allSatisfy { $0.element.id == $0.offset + 1 }, "the writer's ids")
      XCTAssertGreaterThan(writes.count, after, "the writer went on during the copy")
      while applied < before {
        apply(writes[applied - 1])
        applied += 1
      }
      // The view is the image after the writes before some cut in [before, after + 1].
      var cut: Int?
      while true {
        if view.count == image.count && TrackRig.holds(view, image, at: 0) {
          cut = applied
          break
        }
        if applied > after || applied > writes.count { break }
        apply(writes[applied - 1])
        applied += 1
      }
      let detail =
        cut == nil
        ? "differs in blocks \(RRTBytes.differingBlocks(view, image, blockSize: r.blockSize).brief) from the image after write \(applied - 1)"
        : ""
      XCTAssertNotNil(
        cut, "round \(round): the view frozen between writes \(before) and \(after) is no cut of them: \(detail)")
      guard cut != nil else { break }
      print("round \(round): froze between writes \(before) and \(after); the view holds the writes before \(cut ?? 0)")
      XCTAssertEqual(try r.control("drop").status, 0)
    }
    writer.stop(grace: 5)
    r.stop()
  }

  // MARK: 3. Read-only view, mistaken requests

  func testTheViewIsReadOnlyAndMistakenRequestsAreRefused() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 7)
    let generation = try r.mapStats()["map_id"] as? String
    XCTAssertEqual(try r.control("freeze").status, 0)
    let out = try r.nbdsh(
      """
      h.connect_uri(VIEW)
      print('RO', h.is_read_only())
      for name, op in [('write', lambda: h.pwrite(b'x' * 512, 0)), ('zero', lambda: h.zero(B, 0)),
                       ('trim', lambda: h.trim(B, 0))]:
          try:
              op()
              print(name, 'ACCEPTED')
          except nbd.Error as e:
              print(name, 'REFUSED', e.errno)
      d = h.pread(B, 0)
      print('READ', len(d))
      """, uri: r.viewURI)
    XCTAssertEqual(out.status, 0, out.summary)
    XCTAssertTrue(out.stdout.contains("RO True"), out.summary)
    for op in ["write", "zero", "trim"] {
      XCTAssertTrue(out.stdout.contains("\(op) REFUSED"), "\(op) on the view: \(out.summary)")
    }
    XCTAssertTrue(out.stdout.contains("READ \(r.blockSize)"), out.summary)
    XCTAssertEqual(try r.deviceData(), r.original, "a refused write reached the device")
    XCTAssertEqual(try r.setBlocks(), [], "a refused write was marked")

    assertRefused(try r.control("freeze"), "held already")
    assertRefused(try r.control("freeze", ["--changes-out", "g.map"]), "held already")
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.s.path("g.map")), "a refused freeze saved a map")
    assertRefused(try r.control("new-generation", ["--changes-out", r.mapPath]), "live change map")
    assertRefused(try r.control("new-generation", ["--changes-out", "./d.map"]), "live change map")
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, generation, "a refused new generation replaced the map")

    XCTAssertEqual(try r.control("drop").status, 0)
    assertRefused(try r.control("drop"), "no view is frozen")
    assertRefused(try r.control("freeze", ["--changes-out", r.mapPath]), "live change map")
    XCTAssertNil(try r.status()["view"], "a refused freeze left a view")
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, generation)

    let snap = try r.run("snapshot", ["-o", "x.stream", r.viewURI])
    assertRefused(snap, "no view is frozen")
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.s.path("x.stream")))
    let missing = try RRTCommand.run("tracking-server", ["status", "--socket", r.s.path("none.sock")])
    assertRefused(missing, "none.sock.control")
    r.stop()
  }

  /// --changes-out names where the ending generation's map goes; a file
  /// the server works on — the device, the change map's journal, the
  /// preservation store — must be refused like the live map, never replaced
  /// by a map.
  func testChangesOutNeverReplacesTheServersOwnFiles() throws {
    try require("nbdinfo")
    let r = try running(seed: 16)
    let generation = try r.mapStats()["map_id"] as? String
    XCTAssertEqual(try r.control("freeze").status, 0)
    for (what, path) in [
      ("the device", r.devicePath), ("the journal", r.mapPath + ".journal"), ("the store", r.storePath),
    ] {
      let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int
      XCTAssertNotNil(size, "\(path) is missing before the test")
      let g = try r.control("new-generation", ["--changes-out", path])
      XCTAssertNotEqual(g.status, 0, "new-generation --changes-out \(what) was accepted: \(g.summary)")
      let after = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int
      XCTAssertEqual(after, size, "new-generation --changes-out \(what) replaced \(path)")
    }
    XCTAssertEqual(try r.control("drop").status, 0)
    let f = try r.control("freeze", ["--changes-out", r.devicePath])
    XCTAssertNotEqual(f.status, 0, "freeze --changes-out the device was accepted: \(f.summary)")
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, generation, "a refused request ended the generation")
    r.stop()
    XCTAssertEqual(try? r.deviceData(), r.original, "the device after the server stopped")
  }

  /// A store left behind is found by its path; a file at --store that is not
  /// a preservation store (the device itself, the change map, any file) must
  /// be refused or left alone, never removed as a lost view's store.
  func testAStorePathThatIsNotAStoreIsNeverRemoved() throws {
    try require("nbdinfo")
    let r = try TrackRig(seed: 17)
    rigs.append(r)
    try Data("keep me\n".utf8).write(to: URL(fileURLWithPath: r.s.path("notes.txt")))
    XCTAssertEqual(
      try r.run("overwrite-map", ["create", "--like", r.devicePath, "--meaning", "changed", r.mapPath]).status, 0)
    for store in [r.devicePath, r.mapPath, r.s.path("notes.txt")] {
      // Each case on an intact device.
      try r.original.write(to: URL(fileURLWithPath: r.devicePath))
      let before = try Data(contentsOf: URL(fileURLWithPath: store))
      let server = try RRTChild(
        name: "tracking-server", executable: Tools.path("tracking-server"),
        arguments: ["serve", "--changes", r.mapPath, "--socket", r.socket, "--store", store, r.devicePath],
        stdout: r.s.path("store.out"), stderr: r.s.path("store.log"), cwd: r.dir)
      r.others.append(server)
      let end = RRTEnv.monotonic() + 15
      while RRTEnv.monotonic() < end && server.isRunning {
        if let q = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri], timeout: 5), q.status == 0 { break }
        RRTEnv.sleep(0.05)
      }
      let existedWhileServing = FileManager.default.fileExists(atPath: store)
      server.stop(grace: 10)
      XCTAssertTrue(existedWhileServing, "serve --store \(store) removed it at start: \(server.errors)")
      let after = try? Data(contentsOf: URL(fileURLWithPath: store))
      if store != r.mapPath {
        XCTAssertEqual(after, before, "serve --store \(store) changed or removed it: \(server.errors)")
      }
    }
  }

  /// Two servers on one change map would share its journal and store: the
  /// second start must be refused while the first runs. Whatever it does,
  /// the first server's view keeps its store, and after a kill -9 of the
  /// first the map covers every write it acknowledged.
  func testASecondServerOnTheSameMapIsRefused() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 19)
    let w1 = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(1, 512), 0)\nh.flush()\nprint('OK')")
    XCTAssertEqual(w1.status, 0, w1.summary)
    XCTAssertEqual(try r.control("freeze").status, 0)
    let second = try RRTChild(
      name: "second server", executable: Tools.path("tracking-server"),
      arguments: ["serve", "--changes", r.mapPath, "--socket", r.s.path("e.sock"), r.devicePath],
      stdout: r.s.path("second.out"), stderr: r.s.path("second.log"), cwd: r.dir)
    r.others.append(second)
    // Refused, it ends; started, it answers on its socket and is stopped.
    let end = RRTEnv.monotonic() + 10
    let other = "nbd+unix:///?socket=\(r.s.path("e.sock"))"
    while RRTEnv.monotonic() < end && second.isRunning {
      if let q = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", other], timeout: 5), q.status == 0 { break }
      RRTEnv.sleep(0.05)
    }
    let status = second.isRunning ? second.stop(grace: 10) ?? -1 : second.wait(timeout: 5)
    XCTAssertNotEqual(status, 0, "a second server on the map of a running one started: \(second.errors)")
    XCTAssertTrue(
      FileManager.default.fileExists(atPath: r.storePath),
      "a second server removed the store of the running server's view: \(second.errors)")
    let w2 = try r.nbdsh(
      "h.connect_uri(URI)\nh.pwrite(pattern(2, 512), 10 * B)\nh.pwrite(pattern(3, 512), 20 * B)\nh.flush()\nprint('OK')"
    )
    XCTAssertEqual(w2.status, 0, w2.summary)
    r.kill9()
    try r.start()
    XCTAssertEqual(try r.setBlocks(), [0, 10, 20], "the map after kill -9 of the first server:\n\(r.log)")
    r.stop()
  }

  /// A socket a running server answers on is not taken over by another
  /// server (of another device): its clients would write to the wrong
  /// device, and the first server would be left unreachable.
  func testASocketInUseIsNotTakenOver() throws {
    try require("nbdinfo")
    let r = try running(seed: 20)
    let other = r.s.path("other.img")
    XCTAssertEqual(try r.run("/usr/bin/truncate", ["-s", "8M", other]).status, 0)
    let second = try RRTChild(
      name: "second server", executable: Tools.path("tracking-server"),
      arguments: ["serve", "--changes", r.s.path("other.map"), "--socket", r.socket, other],
      stdout: r.s.path("second.out"), stderr: r.s.path("second.log"), cwd: r.dir)
    r.others.append(second)
    // Refused, it ends; started, it owns the socket path (8 MiB) and is stopped.
    let end = RRTEnv.monotonic() + 10
    var sizeSeen = ""
    while RRTEnv.monotonic() < end && second.isRunning {
      sizeSeen = (try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri], timeout: 5))?.stdout ?? ""
      if sizeSeen.hasPrefix(String(8 << 20)) { break }
      RRTEnv.sleep(0.05)
    }
    let status = second.isRunning ? second.stop(grace: 10) ?? -1 : second.wait(timeout: 5)
    XCTAssertNotEqual(status, 0, "a second server took the socket of a running one: \(second.errors)")
    XCTAssertFalse(sizeSeen.hasPrefix(String(8 << 20)), "clients of \(r.socket) reached the other device")
    let size = try RRTCommand.run("/usr/bin/nbdinfo", ["--size", r.uri], timeout: 10)
    XCTAssertEqual(size.stdout.trimmingCharacters(in: .whitespacesAndNewlines), String(r.size), size.summary)
    XCTAssertEqual(try r.control("status").status, 0, "the first server's control socket")
    r.stop()
  }

  // MARK: 4. A full store loses the view, never a write

  func testAFullStoreLosesTheViewButNotTheWrites() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 8, arguments: ["--store-limit", "1M", "--block-size", "64K"])
    let f = try r.control("freeze", ["--json"])
    XCTAssertEqual(f.status, 0, f.summary)
    XCTAssertEqual(try TrackRig.json(f.stdout)["store_limit"] as? Int, 1 << 20)
    // 24 distinct blocks (1.5 MiB) written while a client holds the view.
    let out = try r.nbdsh(
      """
      v = nbd.NBD()
      v.connect_uri(VIEW)
      open('v30.bin', 'wb').write(v.pread(B, 30 * B))
      h.connect_uri(URI)
      for i in range(24):
          h.pwrite(pattern(100 + i, B), (30 + i) * B)
      h.flush()
      good = sum(h.pread(B, (30 + i) * B) == pattern(100 + i, B) for i in range(24))
      print('READBACK', good)
      for blk in (30, 0):
          try:
              v.pread(B, blk * B)
              print('VIEW', blk, 'READ')
          except nbd.Error as e:
              print('VIEW', blk, e.errno)
      """)
    XCTAssertEqual(out.status, 0, out.summary + "\nlog:\n" + r.log)
    XCTAssertTrue(out.stdout.contains("READBACK 24"), out.summary)
    XCTAssertTrue(out.stdout.contains("VIEW 30 EIO"), "a read of a preserved block of the lost view: \(out.summary)")
    XCTAssertTrue(out.stdout.contains("VIEW 0 EIO"), "a read of an untouched block of the lost view: \(out.summary)")
    RRTBytes.assertEqual(
      try r.s.read("v30.bin"), r.original[r.blockRange(30)], "the view's block 30 before the store filled")

    let st = try r.status()
    XCTAssertEqual(st["view_lost"] as? Bool, true, "status of the view: \(st)")
    let lost = st["view_lost_reason"] as? String ?? ""
    XCTAssertTrue(lost.contains("full"), "status of the view: \(st)")
    XCTAssertLessThanOrEqual(st["store_bytes"] as? Int ?? .max, 1 << 20, "\(st)")
    XCTAssertTrue(r.log.contains("is full") && r.log.contains("is lost"), r.log)
    XCTAssertEqual(Set(try r.exports().keys), ["device"], "a lost view is still offered")
    let snap = try r.run("snapshot", ["-o", "lost.stream", r.viewURI])
    XCTAssertNotEqual(snap.status, 0, snap.summary)
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.s.path("lost.stream")))
    XCTAssertEqual(st["changed_blocks"] as? Int, 24)

    // Drop it and freeze anew: a new view works.
    XCTAssertEqual(try r.control("drop").status, 0)
    XCTAssertEqual(try r.control("freeze").status, 0)
    XCTAssertEqual(try r.status()["view_lost"] as? Bool, false)
    r.stop()
    XCTAssertEqual(try r.setBlocks(), Set(30..<54))
    let device = try r.deviceData()
    for i in 0..<24 {
      XCTAssertTrue(
        TrackRig.holds(device, TrackRig.pattern(UInt32(100 + i), r.blockSize), at: (30 + i) * r.blockSize),
        "block \(30 + i) is not on the device after the stop")
    }
  }

  /// With the default --store-limit (the device size, when the file system
  /// has room), a view survives every block of the device being written —
  /// also when the size is not a multiple of the block size.
  func testTheDefaultStoreHoldsEveryBlockOfAnOddSizedDevice() throws {
    try require("nbdinfo", "nbdsh", "nbdcopy")
    let r = try running(size: (16 << 20) + 1000, seed: 23)
    let f = try r.control("freeze", ["--json"])
    XCTAssertEqual(f.status, 0, f.summary)
    let limit = try TrackRig.json(f.stdout)["store_limit"] as? Int ?? 0
    if limit < r.size { throw XCTSkip("the file system's room sets the store limit to \(limit) bytes") }
    let out = try r.nbdsh("h.connect_uri(URI)\nh.zero(SIZE, 0)\nh.flush()\nprint('OK')")
    XCTAssertEqual(out.status, 0, out.summary)
    let st = try r.status()
    XCTAssertEqual(st["view_lost"] as? Bool, false, "the view after the whole device was written: \(st)")
    let copy = try RRTCommand.run("/usr/bin/nbdcopy", [r.viewURI, r.s.path("view.img")], timeout: 60)
    XCTAssertEqual(copy.status, 0, copy.summary)
    RRTBytes.assertEqual((try? r.s.read("view.img")) ?? Data(), r.original, "the view")
    r.stop()
  }

  // MARK: 5. A client of a dropped view

  func testAClientOfADroppedViewGetsEIOEvenAfterANewFreeze() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 9)
    XCTAssertEqual(try r.control("freeze").status, 0)
    let client = try r.nbdshChild(
      """
      h.connect_uri(VIEW)
      open('first.bin', 'wb').write(h.pread(B, 3 * B))
      print('FIRST', flush=True)
      while not os.path.exists('go'):
          time.sleep(0.01)
      try:
          d = h.pread(B, 3 * B)
          open('second.bin', 'wb').write(d)
          print('SECOND READ', flush=True)
      except nbd.Error as e:
          print('SECOND', e.errno, flush=True)
      """, name: "old-client")
    XCTAssertTrue(client.waitForOutput("FIRST", timeout: 30), client.errors)
    let w = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(7, B), 3 * B)\nh.flush()\nprint('OK')")
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertEqual(try r.control("drop").status, 0)
    XCTAssertEqual(try r.control("freeze").status, 0)
    _ = FileManager.default.createFile(atPath: r.s.path("go"), contents: nil)
    XCTAssertEqual(client.wait(timeout: 30), 0, client.errors)
    XCTAssertTrue(
      client.output.contains("SECOND EIO"), "the old view's client after a drop and a new freeze: \(client.output)")
    RRTBytes.assertEqual(try r.s.read("first.bin"), r.original[r.blockRange(3)], "the first read of the old view")

    // A new client reads the new view, which holds the write.
    let fresh = try r.nbdsh(
      "h.connect_uri(VIEW)\nprint('NEW', h.pread(B, 3 * B) == pattern(7, B))", uri: r.viewURI)
    XCTAssertTrue(fresh.stdout.contains("NEW True"), fresh.summary)
    r.stop()
  }

  // MARK: 6. Generations

  func testNewGenerationSavesTheEndedMapAndStartsAnEmptyOne() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(seed: 10)
    let w1 = try r.nbdsh(
      """
      h.connect_uri(URI)
      h.pwrite(pattern(1, B), 2 * B)
      h.pwrite(pattern(2, B), 4 * B)
      h.pwrite(pattern(3, 10), 9 * B + 20)
      h.zero(B, 100 * B)
      h.flush()
      print('OK')
      """)
    XCTAssertEqual(w1.status, 0, w1.summary)
    let old = try r.mapStats()
    let g = try r.control("new-generation", ["--changes-out", "g.map", "--json"])
    XCTAssertEqual(g.status, 0, g.summary)
    let go = try TrackRig.json(g.stdout)
    XCTAssertEqual(go["ended_generation"] as? String, old["map_id"] as? String)
    XCTAssertEqual(go["ended_changed_blocks"] as? Int, 4)

    let gPath = r.s.path("g.map")
    XCTAssertEqual(try r.setBlocks(gPath), [2, 4, 9, 100], "the ended generation")
    let saved = try r.mapStats(gPath)
    XCTAssertEqual(saved["map_id"] as? String, old["map_id"] as? String)
    XCTAssertEqual(saved["tracking_started"] as? String, old["tracking_started"] as? String)
    XCTAssertEqual(saved["meaning"] as? String, "changed")

    let fresh = try r.mapStats()
    XCTAssertEqual(fresh["set_blocks"] as? Int, 0, "the new generation")
    XCTAssertEqual(fresh["map_id"] as? String, go["generation"] as? String)
    XCTAssertNotEqual(fresh["map_id"] as? String, old["map_id"] as? String, "the new generation's map id")
    let t0 = old["tracking_started"] as? String ?? ""
    let t1 = fresh["tracking_started"] as? String ?? ""
    XCTAssertGreaterThan(t1, t0, "the new generation's tracking start")
    XCTAssertEqual(fresh["block_size"] as? Int, old["block_size"] as? Int)
    let st = try r.status()
    XCTAssertEqual(st["generation"] as? String, go["generation"] as? String)
    XCTAssertEqual(st["changed_blocks"] as? Int, 0)

    let w2 = try r.nbdsh(
      "h.connect_uri(URI)\nh.pwrite(pattern(4, 1), 4 * B + 1)\nh.trim(B, 200 * B)\nh.flush()\nprint('OK')")
    XCTAssertEqual(w2.status, 0, w2.summary)
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, 2)
    XCTAssertEqual(try r.setBlocks(gPath), [2, 4, 9, 100], "the ended generation after later writes")
    r.stop()
    XCTAssertEqual(try r.setBlocks(), [4, 200], "writes after the new generation")

    // The new generation is what a restart continues.
    try r.start()
    XCTAssertEqual(try r.status()["generation"] as? String, go["generation"] as? String, r.log)
    XCTAssertEqual(try r.setBlocks(), [4, 200])
    r.stop()
  }

  // MARK: 7. kill -9

  /// The writer of the crash tests (nbdsh; SEED and WBASE set before it):
  /// one write at a time, each within one block, in passes over the blocks
  /// in a new random order each (never a block whose number is 3 mod 4,
  /// which stay untouched), a FLUSH after every fourth. Prints
  /// `W id offset length kind` (d data, z zeroes, t trim) before sending,
  /// `F id` once a FLUSH following write id is acknowledged, and
  /// `E message` when the connection fails.
  static let crashWriter = """
    rnd = random.Random(SEED)
    order = [b for b in range(SIZE // B) if b % 4 != 3]
    h.connect_uri(URI)
    print('READY', flush=True)
    w = WBASE
    try:
        while True:
            rnd.shuffle(order)
            for blk in order:
                x = rnd.random()
                if x < 0.4:
                    off, n = blk * B, B
                else:
                    off = blk * B + rnd.randrange(B - 1)
                    n = rnd.randrange(1, blk * B + B - off + 1)
                kind = 'd' if x < 0.8 else ('z' if x < 0.9 else 't')
                print('W', w, off, n, kind, flush=True)
                if kind == 'd':
                    h.pwrite(pattern(w, n), off)
                elif kind == 'z':
                    h.zero(n, off)
                else:
                    h.trim(n, off)
                if w % 4 == 3:
                    h.flush()
                    print('F', w, flush=True)
                w += 1
    except nbd.Error as e:
        print('E', str(e.string).replace('\\n', ' '), flush=True)
    """

  struct CrashLog {
    var writes: [(id: Int, offset: Int, length: Int, kind: Character)] = []
    var flushedThrough = -1
    var failed = false

    init(_ text: String) {
      for line in text.split(separator: "\n") {
        let p = line.split(separator: " ")
        switch p.first {
        case "W":
          if p.count == 5, let id = Int(p[1]), let o = Int(p[2]), let n = Int(p[3]), let k = p[4].first {
            writes.append((id, o, n, k))
          }
        case "F":
          if p.count == 2, let id = Int(p[1]) { flushedThrough = id }
        case "E": failed = true
        default: break
        }
      }
    }
  }

  /// One crash round: a crash writer runs; once it saw a FLUSH acknowledged,
  /// `killPoint` picks the moment and kills the server with -9; the server
  /// is restarted with the same arguments. Then every write acknowledged by
  /// a FLUSH is on the device, every block that differs from the original
  /// is in the change map, and the map holds no block that no write touched
  /// (`touched` accumulates the blocks of every write sent).
  func crashRound(
    _ r: TrackRig, round: Int, seed: UInt64, nextID: inout Int, touched: inout Set<Int>, killPoint: () throws -> Void
  ) throws -> CrashLog {
    let writer = try r.nbdshChild(
      "SEED = \(seed)\nWBASE = \(nextID)\n" + Self.crashWriter, name: "crash-writer-\(round)")
    XCTAssertTrue(writer.waitForOutput("\nF ", timeout: 30), "round \(round): no flush: \(writer.errors)\n\(r.log)")
    XCTAssertTrue(r.server?.isRunning ?? false, "round \(round): the server died on its own:\n\(r.log)")
    try killPoint()
    XCTAssertNotNil(writer.wait(timeout: 30), "round \(round): the writer did not notice the kill")
    let wl = CrashLog(writer.output)
    XCTAssertTrue(wl.failed, "round \(round): the writer saw no error: \(writer.errors)")
    XCTAssertGreaterThanOrEqual(wl.flushedThrough, nextID, "round \(round): \(writer.output.suffix(300))")
    nextID = (wl.writes.last?.id ?? nextID) + 1
    for w in wl.writes { touched.formUnion(r.blocks(w.offset, w.length)) }

    try r.start()
    let device = try r.deviceData()
    // Each flushed write, where no later write of the round covers it
    // (later writes may or may not have landed).
    var lostWrites: [String] = []
    var later: [Int: [(Int, Int)]] = [:]  // block: ranges of later writes
    var checked = 0
    for w in wl.writes.reversed() {
      let block = w.offset / r.blockSize
      if w.id <= wl.flushedThrough {
        let want = w.kind == "d" ? TrackRig.pattern(UInt32(w.id), w.length) : Data(count: w.length)
        for (s, e) in uncovered(w.offset, w.offset + w.length, by: later[block] ?? []) {
          checked += e - s
          if !TrackRig.holds(device, want[(s - w.offset)..<(e - w.offset)], at: s) {
            lostWrites.append("\(w.id) (\(w.kind) \(w.offset)+\(w.length), bytes \(s)..<\(e))")
          }
        }
      }
      later[block, default: []].append((w.offset, w.offset + w.length))
    }
    XCTAssertGreaterThan(checked, 0, "round \(round): nothing flushed to check")
    XCTAssertEqual(
      lostWrites, [],
      "round \(round): flushed writes missing after kill -9 (flushed through \(wl.flushedThrough))\nlog:\n\(r.allLogs)")
    let map = try r.setBlocks()
    let changed = RRTBytes.differingBlocks(r.original, device, blockSize: r.blockSize)
    XCTAssertTrue(
      changed.isSubset(of: map),
      "round \(round): blocks changed since the generation began but not in the change map: \(changed.subtracting(map).brief)"
    )
    XCTAssertTrue(
      map.isSubset(of: touched),
      "round \(round): blocks marked that no write touched: \(map.subtracting(touched).brief)")
    return wl
  }

  /// The parts of [s, e) outside every range of `ranges`.
  func uncovered(_ s: Int, _ e: Int, by ranges: [(Int, Int)]) -> [(Int, Int)] {
    var parts = [(s, e)]
    for (cs, ce) in ranges {
      parts = parts.flatMap { (ps, pe) -> [(Int, Int)] in
        if ce <= ps || cs >= pe { return [(ps, pe)] }
        return [(ps, cs), (ce, pe)].filter { $0.0 < $0.1 }
      }
    }
    return parts
  }

  func testKillDashNineDuringWritesKeepsEveryFlushedWriteAndTheMapCoversThem() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(size: 32 << 20, seed: 11)
    let never = Set((0..<r.blockCount).filter { $0 % 4 == 3 })
    var rng = SplitMix64(seed: 0x11_2026)
    var nextID = 1
    var touched = Set<Int>()
    var written = 0
    let generation = try r.mapStats()["map_id"] as? String
    // The last round outlasts the 5 s between the journal's checkpoints.
    for round in 0..<9 {
      let delay = round == 8 ? 5.5 : 0.02 + Double(rng.next() % 800) / 1000
      let wl = try crashRound(r, round: round, seed: 0x1100 + UInt64(round), nextID: &nextID, touched: &touched) {
        RRTEnv.sleep(delay)
        r.kill9()
      }
      written += wl.writes.count
      XCTAssertTrue(r.log.contains("goes on"), "round \(round): the restart did not continue the map:\n\(r.log)")
      print(
        "kill -9 round \(round): \(String(format: "%.2f", delay)) s after the first flush, \(wl.writes.count) writes, "
          + "flushed through \(wl.flushedThrough), \(touched.count) blocks touched so far")
    }
    XCTAssertGreaterThan(written, 9 * 4)
    XCTAssertTrue(touched.isDisjoint(with: never))
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, generation, "the generation after the restarts")
    r.stop()
  }

  func testKillDashNineDuringASnapshotOfTheViewFailsTheSnapshotAndLosesTheView() throws {
    try require("nbdinfo", "nbdsh")
    // A device twice the snapshot's read-ahead (4 chunks of 8 MiB) past the
    // largest kill point, so the kill always comes before the last read.
    let r = try running(size: 128 << 20, seed: 12)
    var rng = SplitMix64(seed: 0x12_2026)
    var nextID = 1
    var touched = Set<Int>()
    for round in 0..<4 {
      let stream = r.s.path("v\(round).stream")
      let threshold = (1 << 20) + Int(rng.next() % UInt64(40 << 20))
      var snapshot: RRTChild?
      var killedAt = 0
      _ = try crashRound(r, round: round, seed: 0x1200 + UInt64(round), nextID: &nextID, touched: &touched) {
        let f = try r.control("freeze")
        XCTAssertEqual(f.status, 0, f.summary)
        let snap = try RRTChild(
          name: "snapshot", executable: Tools.path("snapshot"), arguments: ["-o", stream, r.viewURI],
          stdout: r.s.path("snap\(round).out"), stderr: r.s.path("snap\(round).err"), cwd: r.dir)
        r.others.append(snap)
        snapshot = snap
        // Kill once the unfinished stream holds `threshold` bytes.
        let prefix = ".v\(round).stream."
        let end = RRTEnv.monotonic() + 60
        while RRTEnv.monotonic() < end && snap.isRunning {
          let names = (try? FileManager.default.contentsOfDirectory(atPath: r.dir)) ?? []
          if let temp = names.first(where: { $0.hasPrefix(prefix) }),
            let n = (try? FileManager.default.attributesOfItem(atPath: r.s.path(temp)))?[.size] as? Int,
            n >= threshold
          {
            killedAt = n
            break
          }
          usleep(2000)
        }
        XCTAssertTrue(snap.isRunning, "round \(round): the snapshot ended before the kill: \(snap.errors)")
        r.kill9()
      }
      let snap = try XCTUnwrap(snapshot)
      let status = endSnapshot(snap)
      XCTAssertNotEqual(status, 0, "round \(round): the snapshot of a view whose server died succeeded: \(snap.errors)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: stream), "round \(round): an incomplete stream appeared")
      if status != nil {
        let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: r.dir)) ?? []).filter {
          $0.hasPrefix(".v\(round).stream.")
        }
        XCTAssertEqual(leftovers, [], "round \(round): snapshot left its unfinished stream's temporary file")
      }
      XCTAssertTrue(
        r.log.contains("did not survive the last stop: it is lost"), "round \(round): the restart's log:\n\(r.log)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: r.storePath), "round \(round): the old store stayed")
      XCTAssertEqual(Set(try r.exports().keys), ["device"], "round \(round): a view is offered after the restart")
      XCTAssertNil(try r.status()["view"], "round \(round): status after the restart")
      print(
        "kill -9 during a snapshot, round \(round): killed at \(killedAt) bytes of stream; the snapshot "
          + (status == nil ? "was still reconnecting 5 s later" : "ended with status \(status ?? 0)")
          + ": \(snap.errors)")
    }
    r.stop()
  }

  /// More marks than the change map's journal holds between two
  /// checkpoints (20000 writes to distinct 4 KiB blocks, 128 in flight),
  /// then kill -9: after the restart the map holds exactly the blocks
  /// written, and the device their data.
  func testKillDashNineAfterTheJournalFilledKeepsEveryMark() throws {
    try require("nbdinfo", "nbdsh")
    let r = try TrackRig(size: 128 << 20, blockSize: 4096, seed: 18)
    rigs.append(r)
    try r.start(["--block-size", "4K"])
    let out = try r.nbdsh(
      """
      blocks = list(range(SIZE // B))
      random.Random(18).shuffle(blocks)
      blocks = blocks[:20000]
      buf = nbd.Buffer.from_bytearray(bytearray(b'\\x5a' * B))
      h.connect_uri(URI)
      for i in range(0, len(blocks), 128):
          cs = [h.aio_pwrite(buf, b * B) for b in blocks[i:i + 128]]
          while h.aio_in_flight() > 0:
              h.poll(-1)
          for c in cs:
              h.aio_command_completed(c)
      h.flush()
      open('blocks.txt', 'w').write(' '.join(map(str, blocks)))
      print('OK')
      """, timeout: 120)
    XCTAssertEqual(out.status, 0, out.summary + "\nlog:\n" + r.log)
    XCTAssertEqual(try r.status()["changed_blocks"] as? Int, 20000)
    r.kill9()
    try r.start()
    let written = Set(
      String(decoding: try r.s.read("blocks.txt"), as: UTF8.self).split(separator: " ").compactMap { Int($0) })
    XCTAssertEqual(written.count, 20000)
    let map = try r.setBlocks()
    XCTAssertEqual(map.count, 20000, r.log)
    XCTAssertTrue(written.isSubset(of: map), "written, not in the map: \(written.subtracting(map).brief)\n\(r.log)")
    let device = try r.deviceData()
    let changed = RRTBytes.differingBlocks(r.original, device, blockSize: r.blockSize)
    XCTAssertEqual(changed, written, "the blocks holding new data")
    let block = Data(repeating: 0x5A, count: r.blockSize)
    let lost = written.filter { !TrackRig.holds(device, block, at: $0 * r.blockSize) }
    XCTAssertEqual(lost, [], "written blocks without their data after kill -9")
    r.stop()
  }

  /// Waits for a snapshot whose server died or stopped. It fails at once
  /// when a read was in flight; when its reader was idle it tries to connect
  /// again for a minute, which the test does not wait for: after `grace`
  /// seconds it is killed, and nil is returned.
  func endSnapshot(_ snap: RRTChild, grace: Double = 5) -> Int32? {
    if let status = snap.wait(timeout: grace) { return status }
    snap.kill9()
    return nil
  }

  /// A snapshot of a view must not go on reading a view frozen after its
  /// server restarted: its stream would mix two instants. The snapshot
  /// writes into a pipe whose reader waits, so the snapshot reads ahead and
  /// stops with no read in flight; the server is killed and restarted, the
  /// device written, a new view frozen, and then the pipe drains.
  func testASnapshotDoesNotContinueOnAViewFrozenAfterARestart() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(size: 96 << 20, seed: 14)
    XCTAssertEqual(try r.control("freeze").status, 0)
    try r.deviceData().write(to: URL(fileURLWithPath: r.s.path("ref.img")))
    let script = """
      { snapshot '\(r.viewURI)' 2>snap.err & echo $! > snap.pid; wait $!; echo $? > snap.status; } |
        { until [ -e go ]; do sleep 0.02; done; cat > out.stream; }
      """
    let pipeline = try RRTChild(
      name: "pipeline", executable: "/bin/bash", arguments: ["-c", script], stdout: r.s.path("pipeline.out"),
      stderr: r.s.path("pipeline.err"), cwd: r.dir)
    r.others.append(pipeline)
    // The snapshot has read ahead and waits: what it read stays the same.
    var pid: Int32 = 0
    var readBytes = 0
    var stable = 0
    let end = RRTEnv.monotonic() + 60
    while RRTEnv.monotonic() < end && stable < 5 && pipeline.isRunning {
      usleep(100_000)
      if pid == 0 {
        pid = Int32(
          (try? r.s.read("snap.pid")).flatMap {
            Int(String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
          } ?? 0)
      }
      guard pid > 0, let io = try? String(contentsOfFile: "/proc/\(pid)/io", encoding: .utf8) else { continue }
      let n =
        io.split(separator: "\n").first { $0.hasPrefix("rchar:") }.flatMap {
          Int($0.dropFirst(6).trimmingCharacters(in: .whitespaces))
        } ?? 0
      stable = n == readBytes && n >= 16 << 20 ? stable + 1 : 0
      readBytes = n
    }
    XCTAssertEqual(stable, 5, "the snapshot did not settle waiting for its pipe (read \(readBytes) bytes)")
    XCTAssertLessThan(readBytes, 80 << 20, "the snapshot read ahead into the region written later")

    r.kill9()
    try r.start()
    let w = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(9, 16 << 20), 80 << 20)\nh.flush()\nprint('OK')")
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertEqual(try r.control("freeze").status, 0)
    _ = FileManager.default.createFile(atPath: r.s.path("go"), contents: nil)

    var status = pipeline.wait(timeout: 20)
    if status == nil {
      // Still reconnecting: it did not take the new view; stop it.
      if pid > 0 { kill(pid, SIGKILL) }
      status = pipeline.wait(timeout: 10)
    }
    let snapStatus = (try? r.s.read("snap.status")).map { String(decoding: $0, as: UTF8.self) } ?? "killed"
    if snapStatus.hasPrefix("0") {
      XCTAssertEqual(try r.run("overwrite-map", ["create", "--like", "ref.img", "m.map"]).status, 0)
      XCTAssertEqual(try r.run("/usr/bin/truncate", ["-s", String(r.size), "out.img"]).status, 0)
      let merge = try r.run("merge-snapshot", ["--mirror", "--map", "m.map", "-i", "out.stream", "out.img"])
      let differ = RRTBytes.differingBlocks(
        try r.s.read("ref.img"), try r.s.read("out.img"), blockSize: r.blockSize)
      XCTFail(
        "the snapshot of the first view ended with status 0 after the server restarted and froze another view; "
          + "merged (status \(merge.status)), its stream differs from the first view in \(differ.count) blocks "
          + "(\(differ.brief)): \((try? r.s.read("snap.err")).map { String(decoding: $0, as: UTF8.self) } ?? "")")
    }
    r.stop()
  }

  // MARK: 8. A clean stop

  func testACleanStopLosesTheViewFailsItsSnapshotAndTheNextStartSaysSo() throws {
    try require("nbdinfo", "nbdsh")
    let r = try running(size: 64 << 20, seed: 13)
    XCTAssertEqual(try r.control("freeze").status, 0)
    let snap = try RRTChild(
      name: "snapshot", executable: Tools.path("snapshot"), arguments: ["-o", "v.stream", r.viewURI],
      stdout: r.s.path("snap.out"), stderr: r.s.path("snap.err"), cwd: r.dir)
    r.others.append(snap)
    let end = RRTEnv.monotonic() + 60
    while RRTEnv.monotonic() < end && snap.isRunning {
      let names = (try? FileManager.default.contentsOfDirectory(atPath: r.dir)) ?? []
      if let temp = names.first(where: { $0.hasPrefix(".v.stream.") }),
        let n = (try? FileManager.default.attributesOfItem(atPath: r.s.path(temp)))?[.size] as? Int, n >= 4 << 20
      {
        break
      }
      usleep(2000)
    }
    XCTAssertTrue(snap.isRunning, "the snapshot ended before the stop: \(snap.errors)")
    r.stop()
    XCTAssertTrue(r.log.contains("is lost with the stop"), r.log)
    let status = endSnapshot(snap)
    XCTAssertNotEqual(status, 0, "a snapshot of a view whose server stopped succeeded: \(snap.errors)")
    XCTAssertFalse(FileManager.default.fileExists(atPath: r.s.path("v.stream")), "an incomplete stream appeared")

    try r.start()
    XCTAssertEqual(Set(try r.exports().keys), ["device"])
    // serve --help: "A view does not survive a stop of the server: the next
    // start reports it lost".
    XCTAssertTrue(r.log.contains("it is lost"), "the start after a stop with a view held:\n\(r.log)")
    r.stop()
  }

  func testAFullFileSystemUnderTheDeviceIsENOSPCToItsClient() throws {
    // The device on 1 MiB of tmpfs: a sparse 8 MiB image whose holes cannot
    // all be filled. A client is told ENOSPC, as by nbdkit's file plugin,
    // and the server goes on.
    let r = try TrackRig(size: 8 << 20)
    defer { r.stopAll() }
    let small = r.s.path("small")
    try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
    let m = try RRTCommand.shell("mount -t tmpfs -o size=1m tmpfs '\(small)'")
    guard m.status == 0 else { throw XCTSkip("cannot mount a tmpfs here: \(m.stderr)") }
    defer { _ = try? RRTCommand.shell("umount '\(small)'") }
    XCTAssertEqual(try RRTCommand.shell("truncate -s 8M '\(small)/device.img'").status, 0)
    r.served = "\(small)/device.img"
    try r.start()
    let out = try r.nbdsh(
      """
      h.connect_uri(URI)
      try:
          h.pwrite(pattern(1, 4 << 20), 0)
          print('written')
      except nbd.Error as e:
          print(e.errno)
      print(h.pread(4096, 0) == pattern(1, 4096))
      """)
    XCTAssertEqual(out.status, 0, out.stderr)
    XCTAssertEqual(out.stdout, "ENOSPC\nTrue\n", "a write past the room of the device's file system; log:\n\(r.log)")
  }

  /// drop --view ID drops only that view: another id is refused with a
  /// sentence and the view kept, a malformed one is a usage error. While a
  /// control connection holds writes, status says so (writes_held_seconds,
  /// and the text line), and stops saying it after the release.
  func testDropByIdAndStatusOfAnOpenHold() throws {
    try require("nbdinfo")
    let r = try running(seed: 77)
    let frozen = try r.control("freeze", ["--json"])
    XCTAssertEqual(frozen.status, 0, frozen.summary)
    let id = try XCTUnwrap(try TrackRig.json(frozen.stdout)["view"] as? String)
    let other = String(repeating: "ab", count: 16)
    assertRefused(try r.control("drop", ["--view", other]), "the view held is \(id)", "it is kept")
    XCTAssertEqual(try r.status()["view"] as? String, id, "a drop of another id dropped the view")
    let bad = try r.control("drop", ["--view", "xyz"])
    XCTAssertEqual(bad.status, 64, bad.summary)
    XCTAssertTrue(bad.stderr.contains("--view xyz is not a view id"), bad.summary)
    let dropped = try r.control("drop", ["--view", id, "--json"])
    XCTAssertEqual(dropped.status, 0, dropped.summary)
    XCTAssertNil(try r.status()["view"])

    XCTAssertNil(try r.status()["writes_held_seconds"], "a hold reported with none open")
    let session = try RRTChild(
      name: "session", executable: GroupCLITests.python,
      arguments: [GroupCLITests.control, "session", "--control", r.socket + ".control", "hold", "sleep=2", "release"],
      stdout: r.s.path("session.out"), stderr: r.s.path("session.err"))
    r.others.append(session)
    XCTAssertTrue(session.waitForOutput("\"request\": \"hold\"", timeout: 10), session.errors)
    RRTEnv.sleep(0.3)
    let st = try r.status()
    let held = try XCTUnwrap(
      (st["writes_held_seconds"] as? Double) ?? Double(st["writes_held_seconds"] as? String ?? ""), "no hold: \(st)")
    XCTAssertGreaterThan(held, 0.2)
    XCTAssertLessThan(held, 2.5)
    let text = try r.control("status")
    XCTAssertTrue(text.stdout.contains("WRITES HELD for "), text.stdout)
    XCTAssertEqual(session.wait(timeout: 10), 0, session.errors)
    XCTAssertNil(try r.status()["writes_held_seconds"], "a hold reported after its release")
    r.stop()
  }
}
