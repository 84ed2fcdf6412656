// restore-read-through with a backup that takes no writes (--read-only-
// backup CHANGES), served read-only by nbdkit -r and qemu-nbd -r: client
// writes (whole and partial blocks, zeroes, trims, FUA) stay on the primary,
// the backup stays byte for byte as it was, the change map sets exactly the
// blocks written, kill -9 loses no acknowledged write's mark, hydration and
// the merge export still work, and snapshot --map CHANGES --base ID ships
// the writes back onto a copy of the backup. A read-only backup without the
// option, and the combinations the option does not take, are refused.

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreReadOnlyBackupCLITests: RestoreCLITestCase {
  /// A rig whose backup is served read-only and whose restore keeps the
  /// change map at `r.changesPath`.
  func readOnlyRig(seed: UInt64, qemu: Bool = false, extra: [String] = []) throws -> RRTRig {
    let r = try RRTRig(size: 16 << 20, seed: seed)
    rigs.append(r)
    r.backupReadOnly = true
    try r.startBackup(qemu ? .qemuNBD : .nbdkit())
    try r.startServer(["--read-only-backup", r.changesPath] + extra)
    XCTAssertTrue(r.log.contains("read-only: writes stay on the primary"), r.log)
    return r
  }

  /// One client request of a test's plan.
  enum Op {
    case write(Int, Int, fua: Bool)
    case zero(Int, Int)
    case trim(Int, Int)
    case read(Int, Int)
  }

  /// Runs `plan` through the export in nbdsh (a FLUSH at the end) and
  /// returns what the device should then hold and the blocks written.
  func run(_ plan: [Op], on r: RRTRig, seed: UInt64) throws -> (expected: Data, written: Set<Int>) {
    var expected = r.original
    var written = Set<Int>()
    var calls: [String] = []
    for (i, op) in plan.enumerated() {
      switch op {
      case .write(let off, let n, let fua):
        let d = RRTBytes.random(n, seed: seed &+ UInt64(i))
        try d.write(to: URL(fileURLWithPath: r.s.path("w\(i).bin")))
        expected.replaceSubrange(off..<off + n, with: d)
        written.formUnion(r.blocks(off, n))
        calls.append("h.pwrite(open('w\(i).bin', 'rb').read(), \(off), \(fua ? "nbd.CMD_FLAG_FUA" : "0"))")
      case .zero(let off, let n):
        expected.replaceSubrange(off..<off + n, with: Data(count: n))
        written.formUnion(r.blocks(off, n))
        calls.append("h.zero(\(n), \(off))")
      case .trim(let off, let n):
        // TRIM leaves zeros (a trimmed block reads the same everywhere).
        expected.replaceSubrange(off..<off + n, with: Data(count: n))
        written.formUnion(r.blocks(off, n))
        calls.append("h.trim(\(n), \(off))")
      case .read(let off, let n):
        calls.append("assert h.pread(\(n), \(off)) == orig[\(off):\(off + n)]")
      }
    }
    let out = try r.nbdsh(
      """
      orig = open('backup.img', 'rb').read()
      h.connect_uri(URI)
      \(calls.joined(separator: "\n"))
      h.flush()
      h.shutdown()
      print("OK")
      """)
    XCTAssertEqual(out.status, 0, "\(out.summary)\nlog:\n\(r.log)")
    XCTAssertTrue(out.stdout.contains("OK"), out.summary)
    return (expected, written)
  }

  // MARK: Writes stay on the primary

  /// Scattered writes of every kind: the export is the backup plus the
  /// writes, the backup is unchanged, the change map sets exactly the
  /// blocks written, the overwrite map those and the block read.
  func testWritesStayOnThePrimaryAndTheChangeMapSetsExactlyTheirBlocks() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try readOnlyRig(seed: 41)
    let B = r.blockSize
    let plan: [Op] = [
      .read(5 * B + 100, 200),
      .write(5 * B + 1000, 3000, fua: false),  // partial, into a current block
      .write(10 * B + 1000, 3000, fua: false),  // partial, into a block not current
      .write(20 * B + 60000, 10000, fua: false),  // across a boundary: partial on both sides
      .write(30 * B, 2 * B, fua: false),  // whole blocks
      .write(40 * B, B + 100, fua: false),  // a whole block and a partial one
      .write(50 * B, B, fua: true),  // FUA
      .write(51 * B + 7, 9, fua: true),  // FUA, partial, into a block not current
      .zero(60 * B + 512, 4096),  // zeroes into part of a block not current
      .zero(70 * B, 2 * B),
      .trim(80 * B, B),
      .trim(90 * B + 100, 1000),
      .write(r.size - 700, 700, fua: false),  // the end of the device
    ]
    let (expected, written) = try run(plan, on: r, seed: 4100)
    XCTAssertEqual(
      written, [5, 10, 20, 21, 30, 31, 40, 41, 50, 51, 60, 70, 71, 80, 90, r.blockCount - 1])
    // The FLUSH committed the overwrite map: the blocks written and the
    // block read.
    XCTAssertEqual(try r.currentBlocks(), written.union([5]), "the overwrite map after the FLUSH")
    r.stopServer()
    XCTAssertTrue(r.log.contains("the \(written.count) block(s) written are in \(r.changesPath)"), r.log)
    XCTAssertFalse(r.log.contains("up to date"), "the stop line claims the backup is up to date:\n\(r.log)")
    XCTAssertEqual(try r.setBlocks(r.changesPath), written, "the change map must set exactly the blocks written")
    XCTAssertEqual(try r.currentBlocks(), written.union([5]), "the overwrite map")
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
    // The primary holds each block written whole (the partial ones with the
    // backup's bytes around them); the others were never fetched.
    let primary = try r.primaryData()
    for b in 0..<r.blockCount {
      let range = r.blockRange(b)
      if written.contains(b) || b == 5 {
        RRTBytes.assertEqual(primary[range], expected[range], "primary block \(b)")
      } else if !RRTBytes.isZero(primary[range]) {
        XCTFail("primary block \(b) was neither read nor written but is not empty")
      }
    }
    // Started again with the same change map: the rest comes from the
    // backup, the writes from the primary, and the map goes on.
    try r.startServer()
    XCTAssertTrue(r.log.contains("goes on: \(written.count) block(s) changed so far"), r.log)
    RRTBytes.assertEqual(try r.copyExport(to: "export.img"), expected, "the export vs the backup plus the writes")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
    XCTAssertEqual(try r.setBlocks(r.changesPath), written, "the change map after reading everything")
  }

  /// qemu-nbd -r as the backup, qemu-io as the client: the same promises.
  func testQemuNBDReadOnlyBackupAndQemuIOWrites() throws {
    try require("qemu-nbd", "qemu-io", "nbdinfo", "nbdcopy")
    let r = try readOnlyRig(seed: 42, qemu: true)
    let B = r.blockSize
    // (offset, length, pattern byte, or nil for zeroes, -1 for discard)
    let plan: [(Int, Int, Int?)] = [
      (3 * B + 1000, 3000, 0xAB), (7 * B, 2 * B, 0x5A), (12 * B + 60000, 10000, 0x11), (15 * B, B, nil),
      (17 * B + 4096, 8192, nil), (19 * B, B, -1), (r.size - 512, 512, 0x77),
    ]
    var expected = r.original
    var written = Set<Int>()
    var commands: [String] = []
    for (off, n, pattern) in plan {
      switch pattern {
      case nil:
        commands += ["-c", "write -z \(off) \(n)"]
        expected.replaceSubrange(off..<off + n, with: Data(count: n))
      case -1:
        commands += ["-c", "discard \(off) \(n)"]
        expected.replaceSubrange(off..<off + n, with: Data(count: n))
      case let p?:
        commands += ["-c", "write -P 0x\(String(p, radix: 16)) \(off) \(n)"]
        expected.replaceSubrange(off..<off + n, with: Data(repeating: UInt8(p), count: n))
      }
      written.formUnion(r.blocks(off, n))
    }
    let q = try RRTCommand.run("/usr/bin/qemu-io", ["-f", "raw"] + commands + ["-c", "flush", r.uri], timeout: 60)
    XCTAssertEqual(q.status, 0, "\(q.summary)\nlog:\n\(r.log)")
    XCTAssertFalse((q.stdout + q.stderr).contains("failed"), q.summary)
    RRTBytes.assertEqual(try r.copyExport(to: "export.img"), expected, "the export vs the backup plus the writes")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
    XCTAssertEqual(try r.setBlocks(r.changesPath), written, "the change map must set exactly the blocks written")
    XCTAssertEqual(try r.currentBlocks().count, r.blockCount, "every block was read")
  }

  // MARK: kill -9

  /// Rounds of a writer (random writes, a FLUSH every third batch) killed
  /// under with kill -9: every write the writer saw complete has its
  /// blocks in the change map after the restart and its bytes on the
  /// primary; every flushed write reads back; at the end every block in
  /// which the export differs from the backup is in the change map, and
  /// the change map sets no block no write touched.
  func testKillDashNineKeepsTheMarksOfEveryAcknowledgedWrite() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try readOnlyRig(seed: 43)
    var rng = SplitMix64(seed: 0x43_2024)
    var nextID: UInt32 = 1
    var replays = 0
    var completedBlocks = Set<Int>()
    var sentBlocks = Set<Int>()
    for round in 0..<4 {
      // Each round in a region of its own, so its marks are new ones.
      let region = (r.size / 4 * round, r.size / 4 * (round + 1))
      let writer = try r.nbdshChild(
        "SEED = \(0x43_2024 + round)\nWBASE = \(nextID)\nLO = \(region.0)\nHI = \(region.1)\n" + Self.crashWriter,
        name: "writer-\(round)")
      XCTAssertTrue(writer.waitForOutput("READY", timeout: 20), "writer \(round): \(writer.errors)")
      XCTAssertTrue(writer.waitForOutput("\nF ", timeout: 30), "writer \(round) never flushed: \(writer.errors)")
      RRTEnv.sleep(0.2 + Double(rng.next() % 1000) / 1000)
      XCTAssertTrue(r.server?.isRunning ?? false, "the server died on its own in round \(round):\n\(r.log)")
      r.killServer()
      XCTAssertNotNil(writer.wait(timeout: 30), "the writer did not notice the server died")
      let wl = WriterLog(writer.output)
      XCTAssertGreaterThan(wl.completed.count, 0, "round \(round): no write completed")
      nextID = (wl.writes.last?.id ?? nextID) + 1
      let completed = wl.writes.filter { wl.completed.contains($0.id) }
      let roundBlocks = Set(completed.flatMap { r.blocks($0.offset, $0.length) })
      completedBlocks.formUnion(roundBlocks)
      for w in wl.writes { sentBlocks.formUnion(r.blocks(w.offset, w.length)) }

      // The completed writes are on the primary (a kill -9 leaves the page
      // cache), where no later write covers them.
      let acknowledged = visibleParts(wl.writes).filter { wl.completed.contains(wl.writes[$0.0].id) }
      let onPrimary = checkParts(acknowledged, of: wl.writes, in: [("on the primary", try r.primaryData())])
      XCTAssertNil(onPrimary, "round \(round): \(onPrimary ?? "")")

      // Restarted with the same change map: it sets every block of them.
      try r.startServer()
      if r.log.contains("journal record(s) replayed into \(r.changesPath)") { replays += 1 }
      let changed = try r.setBlocks(r.changesPath)
      let lost = roundBlocks.subtracting(changed).sorted()
      XCTAssertEqual(changed.subtracting(sentBlocks).sorted(), [], "round \(round): blocks no write touched")
      XCTAssertEqual(lost, [], "round \(round): acknowledged writes' blocks missing from the change map\n\(r.log)")

      // Every write a FLUSH acknowledged reads back through the export.
      let flushed = visibleParts(wl.writes).filter { Int64(wl.writes[$0.0].id) <= wl.acknowledgedThrough }
      let blocks = Set(flushed.flatMap { r.blocks($0.1, $0.2 - $0.1) })
      let through = try r.readThroughExport(
        blocks.sorted().map { (r.blockRange($0).lowerBound, r.blockRange($0).count) }, name: "round\(round).img")
      let readBack = checkParts(flushed, of: wl.writes, in: [("through the export", through)], original: r.original)
      XCTAssertNil(readBack, "round \(round): \(readBack ?? "")\nlog:\n\(r.allLogs)")
      print(
        "read-only backup, kill -9 round \(round): \(wl.writes.count) writes, \(wl.completed.count) completed, "
          + "\(wl.flushes) flushes, \(roundBlocks.count) blocks acknowledged, \(changed.count) in the change map, "
          + "journal \(r.log.contains("replayed") ? "replayed" : "not needed")")
    }
    XCTAssertGreaterThan(replays, 0, "no restart replayed the change map's journal:\n\(r.allLogs)")
    r.stopServer()
    let changed = try r.setBlocks(r.changesPath)
    XCTAssertTrue(changed.isSuperset(of: completedBlocks), "the change map lost blocks at the end")
    XCTAssertEqual(changed.subtracting(sentBlocks).sorted(), [], "the change map sets blocks no write touched")
    // Whatever the kills left, the primary differs from the backup only in
    // blocks the change map sets.
    try r.startServer()
    let export = try r.copyExport(to: "final.img")
    r.stopServer()
    let differ = RRTBytes.differingBlocks(export, r.original, blockSize: r.blockSize)
    XCTAssertEqual(
      differ.subtracting(changed).sorted(), [], "blocks that differ from the backup but are not in the map")
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
  }

  /// A FUA write into blocks not current, then kill -9 at once (no FLUSH):
  /// the backup never got it, so only the overwrite map on disk can say the
  /// blocks are the primary's; after the restart they read back.
  func testAFUAWriteSurvivesKillDashNine() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try readOnlyRig(seed: 50)
    let B = r.blockSize
    var expected = r.original
    let d = RRTBytes.random(B + 3000, seed: 5000)
    try d.write(to: URL(fileURLWithPath: r.s.path("fua.bin")))
    expected.replaceSubrange(33 * B + 500..<33 * B + 500 + d.count, with: d)
    let w = try r.nbdsh(
      """
      h.connect_uri(URI)
      h.pwrite(open('fua.bin', 'rb').read(), \(33 * B + 500), nbd.CMD_FLAG_FUA)
      print("OK")
      """)
    XCTAssertEqual(w.status, 0, "\(w.summary)\nlog:\n\(r.log)")
    r.killServer()
    try r.startServer()
    let back = try r.readThroughExport([(33 * B, 2 * B)])
    for b in [33, 34] {
      RRTBytes.assertEqual(back[r.blockRange(b)], expected[r.blockRange(b)], "block \(b) after kill -9")
    }
    r.stopServer()
    XCTAssertEqual(try r.setBlocks(r.changesPath), [33, 34])
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
  }

  // MARK: Refusals

  /// A backup exported read-only, by nbdkit and by qemu-nbd, without the
  /// option: refused at the start in one sentence that names it, with
  /// nothing created or changed.
  func testAReadOnlyBackupWithoutTheOptionIsRefusedAtStart() throws {
    try require("nbdkit", "qemu-nbd", "nbdinfo")
    for kind in [RRTRig.BackupKind.nbdkit(), .qemuNBD] {
      let r = try RRTRig(size: 4 << 20, seed: 44)
      rigs.append(r)
      r.backupReadOnly = true
      try r.startBackup(kind)
      let res = try RRTCommand.run(
        "restore-read-through", ["--backup", r.backupURI, "--map", r.mapPath, "--socket", r.socket, r.primaryPath],
        timeout: 20)
      XCTAssertFalse(res.timedOut, "\(kind): started serving instead of refusing: \(res.summary)")
      XCTAssertEqual(res.status, 1, "\(kind): \(res.summary)")
      XCTAssertTrue(res.stderr.contains("is exported read-only"), "\(kind): \(res.stderr)")
      XCTAssertTrue(res.stderr.contains("--read-only-backup"), "\(kind): \(res.stderr)")
      XCTAssertEqual(res.stderr.split(separator: "\n").count, 1, "\(kind): one sentence: \(res.stderr)")
      for made in [r.mapPath, r.mapPath + ".al", r.changesPath, r.socket] {
        XCTAssertFalse(FileManager.default.fileExists(atPath: made), "\(kind): \(made) was created")
      }
      let primary = try r.primaryData()
      XCTAssertEqual(primary.count, r.size, "\(kind): the primary changed size")
      XCTAssertTrue(RRTBytes.isZero(primary), "\(kind): the primary was written")
      RRTBytes.assertEqual(try r.backupData(), r.original, "\(kind): the backup changed")
      r.stopAll()
    }
  }

  /// With the option, a backup that would take writes gets none, and the
  /// log says so.
  func testAWritableBackupGetsNoWriteWithTheOption() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try RRTRig(size: 16 << 20, seed: 45)
    rigs.append(r)
    try r.startBackup()
    try r.startServer(["--read-only-backup", r.changesPath])
    XCTAssertTrue(r.log.contains("takes writes, but with --read-only-backup none is sent to it"), r.log)
    let B = r.blockSize
    let (expected, written) = try run(
      [.write(2 * B + 10, 100, fua: false), .write(9 * B, B, fua: true), .zero(11 * B, B)], on: r, seed: 4500)
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), r.original, "the backup got a write")
    XCTAssertEqual(try r.setBlocks(r.changesPath), written)
    let primary = try r.primaryData()
    for b in written { RRTBytes.assertEqual(primary[r.blockRange(b)], expected[r.blockRange(b)], "block \(b)") }
  }

  /// --read-only-backup with --ack local or quorum, with a second backup,
  /// or on the overwrite map's own file: refused, nothing created.
  func testTheCombinationsTheOptionDoesNotTakeAreRefused() throws {
    try require("nbdkit", "nbdinfo")
    let r = try RRTRig(size: 4 << 20, seed: 46)
    rigs.append(r)
    r.backupReadOnly = true
    try r.startBackup()
    let other = "nbd+unix:///?socket=\(r.s.path("other.sock"))"
    let base = ["--map", r.mapPath, "--socket", r.socket, r.primaryPath]
    let cases: [([String], Int32, [String])] = [
      (["--read-only-backup", r.changesPath, "--backup", r.backupURI, "--ack", "local"], 64, ["--ack local"]),
      (["--read-only-backup", r.changesPath, "--backup", r.backupURI, "--ack", "quorum=1"], 64, ["--ack quorum=1"]),
      (["--read-only-backup", r.changesPath, "--backup", r.backupURI, "--backup", other], 64, ["given 2 times"]),
      (["--read-only-backup", r.mapPath, "--backup", r.backupURI], 1, ["is the overwrite map"]),
    ]
    for (i, (args, status, fragments)) in cases.enumerated() {
      let res = try RRTCommand.run("restore-read-through", args + base, timeout: 20)
      XCTAssertFalse(res.timedOut, "case \(i): started serving: \(res.summary)")
      XCTAssertEqual(res.status, status, "case \(i): \(res.summary)")
      let first = res.stderr.split(separator: "\n").first.map(String.init) ?? ""
      for f in fragments + (status == 1 ? [] : ["--read-only-backup"]) {
        XCTAssertTrue(first.contains(f), "case \(i): '\(f)' not in the first line: \(res.stderr)")
      }
      for made in [r.mapPath, r.mapPath + ".al", r.changesPath, r.changesPath + ".journal", r.mapPath + ".journal"] {
        XCTAssertFalse(FileManager.default.fileExists(atPath: made), "case \(i): \(made) was created")
      }
    }
    RRTBytes.assertEqual(try r.backupData(), r.original, "the backup changed")
  }

  // MARK: Hydration, the merge export, and the writes shipped back

  /// Background hydration with writes going on: the restore completes,
  /// the primary is the backup plus the writes, the backup is unchanged.
  func testHydrationCompletesAroundTheWrites() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try readOnlyRig(seed: 47, extra: ["--hydrate", "--hydrate-rate", "4M"])
    let B = r.blockSize
    let plan: [Op] = (0..<24).map { i in
      let b = (i * 37 + 11) % r.blockCount
      switch i % 4 {
      case 0: return .write(b * B + 333, 5000, fua: false)
      case 1: return .write(b * B, B, fua: false)
      case 2: return .zero(b * B + 4096, 8192)
      default: return .trim(b * B, B)
      }
    }
    let (expected, written) = try run(plan, on: r, seed: 4700)
    XCTAssertTrue(r.waitForLog("the restore is complete", seconds: 60), r.log)
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), expected, "the primary after hydration")
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
    XCTAssertEqual(try r.setBlocks(r.changesPath), written)
  }

  /// The use the option is for: the backup's chain is a full stream S0 of
  /// it (merged onto a copy standing for the chain); the restore takes
  /// writes and a merge of S0 through its merge export; then snapshot
  /// --map CHANGES --base S0 of the export, merged onto the copy, makes
  /// the copy equal to the primary.
  func testTheChangeMapShipsTheWritesBackOntoACopyOfTheBackup() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let r = try readOnlyRig(seed: 48)
    let full = r.s.path("full.stream")
    let s0 = try RRTCommand.run("snapshot", ["--json", "-o", full, r.backupPath])
    XCTAssertEqual(s0.status, 0, s0.summary)
    let base = try XCTUnwrap(try json(s0.stdout)["stream_id"] as? String, s0.summary)
    let copy = r.s.path("copy.img")
    let mirrorMap = r.s.path("copy.map")
    try r.makeSparse(copy, size: r.size)
    let seeded = try RRTCommand.run("merge-snapshot", ["--mirror", "--map", mirrorMap, "-i", full, copy])
    XCTAssertEqual(seeded.status, 0, seeded.summary)

    let B = r.blockSize
    var plan: [Op] = []
    var rng = SplitMix64(seed: 0x48)
    for i in 0..<40 {
      let b = Int(rng.next() % UInt64(r.blockCount))
      let off = b * B + Int(rng.next() % UInt64(B / 2))
      let n = min(1 + Int(rng.next() % UInt64(2 * B)), r.size - off)
      switch i % 5 {
      case 0, 1: plan.append(.write(off, n, fua: i % 7 == 0))
      case 2: plan.append(.write(b * B, B, fua: false))
      case 3: plan.append(.zero(off, n))
      default: plan.append(.trim(b * B, B))
      }
    }
    let (expected, written) = try run(plan, on: r, seed: 4800)
    // Channel 2 while the writes are in: S0 lands where nothing was written.
    let merged = try RRTCommand.run("merge-snapshot", ["--json", "-i", full, r.mergeURI], timeout: 120)
    XCTAssertEqual(merged.status, 0, "\(merged.summary)\nlog:\n\(r.log)")
    r.stopServer()
    XCTAssertEqual(try r.setBlocks(r.changesPath), written)

    try r.startServer()
    let inc = r.s.path("inc.stream")
    let shipped = try RRTCommand.run(
      "snapshot", ["--json", "--map", r.changesPath, "--base", base, "-o", inc, r.uri], timeout: 120)
    XCTAssertEqual(shipped.status, 0, shipped.summary)
    XCTAssertEqual(try json(shipped.stdout)["covered_blocks"] as? Int, written.count, shipped.stdout)
    let export = try r.copyExport(to: "export.img")
    r.stopServer()
    RRTBytes.assertEqual(export, expected, "the export vs the backup plus the writes")
    let applied = try RRTCommand.run("merge-snapshot", ["--mirror", "--map", mirrorMap, "-i", inc, copy])
    XCTAssertEqual(applied.status, 0, applied.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: copy)), export, "the copy with the writes shipped")
    RRTBytes.assertEqual(try r.backupData(), r.original, "the read-only backup changed")
  }

  // MARK: After a run with a writable backup

  /// A run whose backup refused every write leaves the blocks it owes in
  /// the activity log; started again with the backup read-only and the
  /// option, those blocks are recorded in the change map and nothing is
  /// sent to the backup.
  func testBlocksOwedByAnEarlierRunAreRecordedInTheChangeMap() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try running(
      seed: 49, backup: .nbdkitFilters(["error"], ["error-pwrite-rate=100%", "error-zero-rate=100%"]))
    let B = r.blockSize
    let (expected, written) = try run(
      [.write(3 * B + 100, 500, fua: false), .write(8 * B, 2 * B, fua: false), .zero(20 * B, B)], on: r, seed: 4900)
    let server = try XCTUnwrap(r.server)
    server.signal(SIGTERM)
    XCTAssertEqual(server.wait(timeout: 30), 1, "a stop owing blocks exits 1: \(r.log)")
    r.server = nil
    XCTAssertTrue(r.log.contains("lacks \(written.count) block(s)"), r.log)

    r.backupServer?.stop(grace: 5)
    r.backupReadOnly = true
    try r.startBackup(.nbdkit())
    try r.startServer(["--read-only-backup", r.changesPath])
    XCTAssertTrue(r.log.contains("whose current blocks the backup may lack"), r.log)
    XCTAssertEqual(try r.setBlocks(r.changesPath), written, "the owed blocks in the change map")
    RRTBytes.assertEqual(
      try r.readThroughExport([(0, r.size)]), expected, "the export: the backup plus the owed writes")
    r.stopServer()
    RRTBytes.assertEqual(try r.backupData(), r.original, "the backup got a write")
  }
}
