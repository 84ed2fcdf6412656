// The three uses of dualrestore(7), end to end, as a user runs them: the
// built commands spawned against real files and real Unix sockets, a client
// reading and writing through nbdsh all along where the use has one, and
// every use ending with bitmap-diff exit 0 between the two copies that must
// agree.
//
// 1. Restore a lost disk while it stays on line: restore-read-through serves
//    an empty primary from a backup (tracking-server, or nbdkit's file
//    plugin) while a client works on it; a snapshot of the backup stands for
//    the shipped media and is merged through the `merge` export while the
//    client goes on. Then every block is current, the primary and the backup
//    are mirrors, and they hold exactly what the client wrote.
// 2. Seed a new mirror from shipped media: tracking-server tracks a source
//    that a client keeps writing; a frozen view's snapshot seeds the mirror
//    and the change maps of later views make catch-up streams, each smaller
//    than the seed, until the quiesced source and the mirror agree. A
//    catch-up merged out of order is refused and writes nothing.
// 3. Compose in shell scripts: the one-liners of the man page run by bash,
//    with their pipes, exit statuses and formats checked.

import Foundation
import Glibc
import TestSupport
import XCTest

final class ThreeUsesCLITests: CLITestCase {
  private var children: [RRTChild] = []
  private var scratches: [Scratch] = []

  override func tearDown() {
    // Clients first, then the servers they talk to, the backup last.
    for c in children.reversed() { c.stop(grace: 5) }
    children = []
    scratches = []
    super.tearDown()
  }

  private func scratch() throws -> Scratch {
    let s = try Scratch()
    scratches.append(s)
    return s
  }

  private let blockSize = 65536

  /// The zero regions of the test images: holes and written zeros.
  private func zeroRegions(size: Int) -> (holes: [Range<Int>], zeros: [Range<Int>]) {
    let B = blockSize
    return (
      [(40 * B)..<(56 * B), (size / 2)..<(size / 2 + 24 * B)],
      [(200 * B + 1000)..<(210 * B), (size - 8 * B)..<size]
    )
  }

  // MARK: 1. Restore a lost disk while it stays on line

  enum Use1Backup {
    case trackingServer
    case nbdkit
  }

  /// The backup served by tracking-server; the media made from a frozen view
  /// while the restore is running.
  func testUse1RestoreWhileOnlineFromATrackingServerBackup() throws {
    try restoreWhileOnline(backup: .trackingServer)
  }

  /// The backup served by nbdkit's file plugin; the media made from the
  /// backup image itself.
  func testUse1RestoreWhileOnlineFromAnNbdkitBackup() throws {
    try restoreWhileOnline(backup: .nbdkit)
  }

  private func restoreWhileOnline(backup: Use1Backup) throws {
    try require("nbdsh", "nbdinfo")
    if backup == .nbdkit { try require("nbdkit") }
    let s = try scratch()
    let dir = s.url.path
    let size = 64 << 20
    let B = blockSize
    let blockCount = size / B
    let z = zeroRegions(size: size)
    let original = try TUImage.make(s.path("backup.img"), size: size, seed: 71, holes: z.holes, zeros: z.zeros)
    try original.write(to: URL(fileURLWithPath: s.path("original.img")))
    try TUImage.sparse(s.path("primary.img"), size: size)
    let backupSocket = s.path("b.sock")
    let backupURI = "nbd+unix:///?socket=\(backupSocket)"

    // The backup site.
    var tracking: TUTrackingServer?
    var nbdkit: RRTChild?
    switch backup {
    case .trackingServer:
      let t = try TUTrackingServer(
        device: s.path("backup.img"), changes: s.path("backup.changes"), socket: backupSocket,
        log: s.path("tracking.log"))
      children.append(t.child)
      tracking = t
    case .nbdkit:
      let k = try RRTChild(
        name: "nbdkit", executable: "/usr/bin/nbdkit",
        arguments: ["-f", "-U", backupSocket, "file", s.path("backup.img")], stdout: s.path("nbdkit.out"),
        stderr: s.path("nbdkit.log"))
      children.append(k)
      nbdkit = k
      try waitForNBD(backupURI, k, "nbdkit")
    }

    // The primary site, from the first minute.
    let socket = s.path("p.sock")
    let rrt = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--backup", backupURI, "--map", s.path("p.map"), "--socket", socket, "--progress-interval", "0",
        s.path("primary.img"),
      ],
      stdout: s.path("rrt.out"), stderr: s.path("rrt.log"))
    children.append(rrt)
    try waitForNBD("nbd+unix:///?socket=\(socket)", rrt, "restore-read-through")

    if backup == .nbdkit {
      // Only the primary writes the backup, and only through
      // restore-read-through, so the backup image read before the client
      // starts is a consistent copy, as a frozen view would be; and it is
      // read after the map started tracking, as the time check demands.
      let snap = try RRTCommand.run("snapshot", ["--quiet", "-o", s.path("media.stream"), s.path("backup.img")])
      XCTAssertEqual(snap.status, 0, snap.summary)
    }

    let client = try TUClient(
      uri: "nbd+unix:///?socket=\(socket)", original: s.path("original.img"), dir: dir, name: "client", seed: 711,
      hot: 24 << 20, lastWrites: 8)
    children.append(client.child)
    client.waitForOps(24)

    if let tracking {
      // At the backup site, a consistent snapshot onto media, from a view
      // frozen while the restore keeps writing to the backup.
      let frozen = try tracking.freeze()
      XCTAssertNotNil(frozen["view"], "\(frozen)")
      let snap = try RRTCommand.run(
        "snapshot", ["--json", "-o", s.path("media.stream"), tracking.viewURI], timeout: 120)
      XCTAssertEqual(snap.status, 0, snap.summary)
      XCTAssertEqual(try tuLastJSON(snap.stdout + snap.stderr)["covered_blocks"] as? Int, blockCount)
      client.waitForOps(client.ops + 24)
      // The restore wrote the backup while the view was held: the view kept
      // the old contents of those blocks.
      let dropped = try tracking.drop()
      XCTAssertGreaterThan(dropped["preserved_blocks"] as? Int ?? 0, 0, "\(dropped)")
      XCTAssertEqual(dropped["view_lost"] as? Bool, false, "\(dropped)")
    }

    // When the media arrives: verify it, merge it into the running server
    // while the client keeps working.
    let check = try RRTCommand.run("merge-snapshot", ["--check", "-i", s.path("media.stream")], timeout: 120)
    XCTAssertEqual(check.status, 0, check.summary)
    let notYet = try tuMapStats(s.path("p.map"))["set_blocks"] as? Int ?? -1
    XCTAssertTrue((1..<blockCount).contains(notYet), "blocks current before the merge: \(notYet)")
    let opsBefore = client.ops
    let merge = try RRTCommand.run(
      "merge-snapshot", ["-i", s.path("media.stream"), "nbd+unix:///merge?socket=\(socket)"], timeout: 120)
    XCTAssertEqual(merge.status, 0, "\(merge.summary)\nserver log:\n\(rrt.errors)")
    let opsAfter = client.ops
    // The server's log counts the blocks merged and those skipped as
    // current: together every block, and at least those current before.
    var merged: (Int, Int)?
    let logEnd = RRTEnv.monotonic() + 10
    while merged == nil && RRTEnv.monotonic() < logEnd {
      merged = mergeCounts(rrt.errors)
      if merged == nil { RRTEnv.sleep(0.05) }
    }
    if let (landed, skipped) = merged {
      XCTAssertEqual(landed + skipped, blockCount, rrt.errors)
      XCTAssertGreaterThanOrEqual(skipped, notYet, rrt.errors)
    } else {
      XCTFail("the server's log does not count the merge:\n\(rrt.errors)")
    }
    XCTAssertTrue(client.child.isRunning, "the client ended during the merge: \(client.child.errors)")
    XCTAssertGreaterThan(opsAfter, opsBefore, "the client made no progress while the merge ran")
    client.waitForOps(opsAfter + 24)

    // Every block is current once the merge is done (the map is committed
    // at the client's flushes).
    var current = 0
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      current = try tuMapStats(s.path("p.map"))["set_blocks"] as? Int ?? 0
      if current == blockCount { break }
      RRTEnv.sleep(0.2)
    }
    XCTAssertEqual(current, blockCount, "blocks current after the merge, while serving")

    client.finish()
    XCTAssertEqual(client.lastWrites.count, 8, client.child.output.suffix(1000).description)
    let status = rrt.stop(grace: 30)
    XCTAssertEqual(status, 0, "restore-read-through did not stop cleanly:\n\(rrt.errors)")
    XCTAssertTrue(rrt.errors.contains("stopped cleanly"), rrt.errors)
    tracking?.stop()
    if let nbdkit { XCTAssertEqual(nbdkit.stop(grace: 10), 0, nbdkit.errors) }

    let stats = try tuMapStats(s.path("p.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, blockCount, "\(stats)")
    XCTAssertEqual(stats["block_count"] as? Int, blockCount, "\(stats)")
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("primary.img"), s.path("backup.img")])
    XCTAssertEqual(diff.status, 0, "the primary and the backup are not mirrors: \(diff.summary)")

    // Both hold the client's writes, the last ones included.
    let expected = try TUImage.read(client.expectedPath)
    let primary = try TUImage.read(s.path("primary.img"))
    let backupData = try TUImage.read(s.path("backup.img"))
    RRTBytes.assertEqual(primary, expected, "the primary against the client's writes")
    RRTBytes.assertEqual(backupData, expected, "the backup against the client's writes")
    XCTAssertNotEqual(expected, original, "the client wrote nothing")
    for (off, n) in client.lastWrites {
      let want = expected.subdata(in: off..<off + n)
      XCTAssertTrue(want.starts(with: Data("last write".utf8)))
      XCTAssertEqual(primary.subdata(in: off..<off + n), want, "last write at \(off) on the primary")
      XCTAssertEqual(backupData.subdata(in: off..<off + n), want, "last write at \(off) on the backup")
    }
  }

  /// dualrestore(7)'s recipe as written: the backup served by
  /// tracking-server over TCP with a separate control socket, reached as
  /// nbd://HOST:PORT/device and /view; restore-read-through with --hydrate
  /// (slowed so that the media lands most blocks). The merge and the
  /// hydration share the work: the log counts both, says the restore is
  /// complete, and bitmap-diff of the two running exports exits 0.
  func testUse1TheManPageRecipeOverTCPWithHydration() throws {
    try require("nbdsh", "nbdinfo")
    let s = try scratch()
    let size = 32 << 20
    let blockCount = size / blockSize
    try TUImage.make(s.path("backup.img"), size: size, seed: 74, holes: [(100 * blockSize)..<(120 * blockSize)])
    try TUImage.sparse(s.path("primary.img"), size: size)
    let control = s.path("backup.control")
    let backup = try RRTChild(
      name: "tracking-server", executable: Tools.path("tracking-server"),
      arguments: [
        "serve", "--changes", s.path("backup.changes"), "--listen", "127.0.0.1:0", "--control", control,
        s.path("backup.img"),
      ],
      stdout: s.path("tracking.out"), stderr: s.path("tracking.log"))
    children.append(backup)
    var port: Int?
    let end = RRTEnv.monotonic() + 15
    while port == nil && backup.isRunning && RRTEnv.monotonic() < end {
      if let range = backup.errors.range(of: " on 127.0.0.1:") {
        port = Int(backup.errors[range.upperBound...].prefix(while: { $0.isNumber }))
      }
      if port == nil { RRTEnv.sleep(0.05) }
    }
    let p = try XCTUnwrap(port, "tracking-server did not say its port: \(backup.errors)")
    let device = "nbd://127.0.0.1:\(p)/device"
    let socket = s.path("p.sock")
    // No progress lines: the completion line is written all the same.
    let rrt = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--backup", device, "--map", s.path("p.map"), "--socket", socket, "--hydrate", "--hydrate-rate", "2M",
        "--progress-interval", "0", s.path("primary.img"),
      ],
      stdout: s.path("rrt.out"), stderr: s.path("rrt.log"))
    children.append(rrt)
    try waitForNBD("nbd+unix:///?socket=\(socket)", rrt, "restore-read-through")
    let w = try RRTCommand.run(
      "/usr/bin/nbdsh",
      [
        "-u", "nbd+unix:///?socket=\(socket)", "-c",
        "h.pwrite(b'written on the primary' * 100, 7 * 65536 + 9)\nh.flush()",
      ])
    XCTAssertEqual(w.status, 0, w.summary)

    let frozen = try RRTCommand.run("tracking-server", ["freeze", "--control", control])
    XCTAssertEqual(frozen.status, 0, frozen.summary)
    let snap = try RRTCommand.run(
      "snapshot", ["--quiet", "-o", s.path("sdb.stream"), "nbd://localhost:\(p)/view"], timeout: 120)
    XCTAssertEqual(snap.status, 0, snap.summary)
    let dropped = try RRTCommand.run("tracking-server", ["drop", "--control", control])
    XCTAssertEqual(dropped.status, 0, dropped.summary)
    let merge = try RRTCommand.run(
      "merge-snapshot", ["-i", s.path("sdb.stream"), "nbd+unix:///merge?socket=\(socket)"], timeout: 120)
    XCTAssertEqual(merge.status, 0, merge.summary)

    var complete = false
    let done = RRTEnv.monotonic() + 30
    while !complete && RRTEnv.monotonic() < done {
      complete = rrt.errors.contains("the restore is complete")
      if !complete { RRTEnv.sleep(0.1) }
    }
    XCTAssertTrue(complete, "the log does not say the restore is complete:\n\(rrt.errors)")
    let counts = try XCTUnwrap(mergeCounts(rrt.errors), rrt.errors)
    XCTAssertEqual(counts.0 + counts.1, blockCount, rrt.errors)
    XCTAssertGreaterThan(counts.0, blockCount / 2, "the media should land most blocks: \(rrt.errors)")
    XCTAssertGreaterThan(counts.1, 0, "the written and hydrated blocks are skipped: \(rrt.errors)")
    let live = try RRTCommand.run("bitmap-diff", ["--extents", "nbd+unix:///?socket=\(socket)", device])
    XCTAssertEqual(live.status, 0, "the running exports are not mirrors: \(live.summary)")

    XCTAssertEqual(rrt.stop(grace: 30), 0, rrt.errors)
    XCTAssertEqual(backup.stop(grace: 20), 0, backup.errors)
    let files = try RRTCommand.run("bitmap-diff", [s.path("primary.img"), s.path("backup.img")])
    XCTAssertEqual(files.status, 0, files.summary)
    XCTAssertEqual(try tuMapStats(s.path("p.map"))["set_blocks"] as? Int, blockCount)
  }

  /// The counts of the log line `merge: N block(s) merged, M skipped as
  /// current`.
  private func mergeCounts(_ log: String) -> (Int, Int)? {
    for l in log.split(separator: "\n") where l.contains("merge: ") && l.contains("merged") {
      let words = l[l.range(of: "merge: ")!.upperBound...].split(separator: " ")
      let numbers = words.compactMap { Int($0.trimmingCharacters(in: .punctuationCharacters)) }
      if numbers.count >= 2 { return (numbers[0], numbers[1]) }
    }
    return nil
  }

  private func waitForNBD(_ uri: String, _ child: RRTChild, _ what: String, timeout: Double = 15) throws {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end {
      if !child.isRunning {
        throw RRTError("\(what) ended with status \(child.wait(timeout: 1) ?? -1) before serving: \(child.errors)")
      }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("\(what) did not answer within \(timeout) s: \(child.errors)")
  }

  // MARK: 2. Seed a new mirror from shipped media

  /// A seed from a frozen view, then catch-up rounds made from the change
  /// maps of later views, all while a client writes the source; the mirror
  /// equals each view after its merge, each catch-up is smaller than the
  /// seed and carries every block that differs from the previous view, and
  /// after a last round with the client paused the source and the mirror
  /// are mirrors.
  func testUse2SeedAMirrorFromShippedMediaAndCatchUpWhileWritesContinue() throws {
    try require("nbdsh", "nbdinfo", "qemu-img")
    let s = try scratch()
    let dir = s.url.path
    let size = 64 << 20
    let blockCount = size / blockSize
    let z = zeroRegions(size: size)
    let original = try TUImage.make(s.path("source.img"), size: size, seed: 72, holes: z.holes, zeros: z.zeros)
    try original.write(to: URL(fileURLWithPath: s.path("original.img")))
    let source = try TUTrackingServer(
      device: s.path("source.img"), changes: s.path("source.changes"), socket: s.path("s.sock"),
      log: s.path("tracking.log"))
    children.append(source.child)
    let client = try TUClient(
      uri: source.deviceURI, original: s.path("original.img"), dir: dir, name: "client", seed: 722, hot: 12 << 20)
    children.append(client.child)
    client.waitForOps(16)

    // The seed: a view frozen at the end of generation 0, onto "media".
    let g0 = try source.freeze(changesOut: s.path("g0.map"))
    XCTAssertNotNil(g0["ended_generation"], "\(g0)")
    let seed = try snapshotJSON(["-o", s.path("s1.stream"), source.viewURI])
    let seedID = try XCTUnwrap(seed["stream_id"] as? String, "\(seed)")
    XCTAssertEqual(seed["covered_blocks"] as? Int, blockCount)
    try TUImage.sparse(s.path("mirror.img"), size: size)
    let create = try RRTCommand.run("overwrite-map", ["create", "--like", s.path("mirror.img"), s.path("mirror.map")])
    XCTAssertEqual(create.status, 0, create.summary)
    try mergeIntoMirror(s, "s1.stream", expectID: seedID)
    try assertMirrorEqualsView(s, source, "after the seed")
    try source.drop()
    let seedBytes = try fileSize(s.path("s1.stream"))

    // Catch-up rounds while the client writes.
    var previous = seedID
    var preserved = 0
    for round in 1...3 {
      client.waitForOps(client.ops + 40)
      let frozen = try source.freeze(changesOut: s.path("g\(round).map"))
      let changed = try tuMapStats(s.path("g\(round).map"))
      let changedBlocks = try XCTUnwrap(changed["set_blocks"] as? Int, "\(changed)")
      XCTAssertGreaterThan(changedBlocks, 0, "round \(round): the client wrote, yet no block changed")
      XCTAssertEqual(frozen["ended_changed_blocks"] as? Int, changedBlocks, "\(frozen)")
      // Every block where this view differs from the last (the mirror) is
      // in the change map of the generation that ended here.
      let missed = try RRTCommand.shell(
        "bitmap-diff --quiet mirror.img 'nbd+unix:///view?socket=s.sock' > d\(round).map; "
          + "test $? -le 1 && overwrite-map subtract d\(round).map g\(round).map | overwrite-map extents -",
        timeout: 120, cwd: dir)
      XCTAssertEqual(missed.status, 0, missed.summary)
      XCTAssertEqual(missed.stdout, "", "round \(round): blocks that changed but are not in the change map")
      let catchUp = try snapshotJSON([
        "--map", s.path("g\(round).map"), "--base", previous, "-o", s.path("c\(round).stream"), source.viewURI,
      ])
      XCTAssertEqual(catchUp["covered_blocks"] as? Int, changedBlocks, "\(catchUp)")
      XCTAssertEqual(catchUp["base_stream_id"] as? String, previous, "\(catchUp)")
      let id = try XCTUnwrap(catchUp["stream_id"] as? String, "\(catchUp)")
      XCTAssertLessThan(
        try fileSize(s.path("c\(round).stream")), seedBytes, "round \(round): the catch-up is not smaller than the seed"
      )
      try mergeIntoMirror(s, "c\(round).stream", expectID: id)
      try assertMirrorEqualsView(s, source, "after catch-up \(round)")
      let dropped = try source.drop()
      preserved += dropped["preserved_blocks"] as? Int ?? 0
      XCTAssertEqual(dropped["view_lost"] as? Bool, false, "\(dropped)")
      previous = id
    }

    XCTAssertGreaterThan(preserved, 0, "the client wrote while views were held, yet no block was preserved")

    // The last round with the source quiesced.
    client.pause()
    do {
      _ = try source.freeze(changesOut: s.path("g4.map"))
      let last = try snapshotJSON([
        "--map", s.path("g4.map"), "--base", previous, "-o", s.path("c4.stream"), source.viewURI,
      ])
      try mergeIntoMirror(s, "c4.stream", expectID: try XCTUnwrap(last["stream_id"] as? String))
      try source.drop()
    }
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 0, "the source and the mirror are not mirrors: \(diff.summary)")
    client.finish()
    source.stop()
    RRTBytes.assertEqual(
      try TUImage.read(s.path("source.img")), try TUImage.read(client.expectedPath),
      "the source against the client's writes")
  }

  /// c2 (on top of c1) merged before c1 is refused with the base sentence,
  /// and neither the mirror nor its map changes; a truncated c1 stops and
  /// records nothing; in order, both apply.
  func testUse2ACatchUpMergedOutOfOrderIsRefusedAndWritesNothing() throws {
    try require("nbdsh", "nbdinfo")
    let s = try scratch()
    let size = 16 << 20
    try TUImage.make(s.path("source.img"), size: size, seed: 73, holes: [(20 * blockSize)..<(30 * blockSize)])
    let source = try TUTrackingServer(
      device: s.path("source.img"), changes: s.path("source.changes"), socket: s.path("s.sock"),
      log: s.path("tracking.log"))
    children.append(source.child)
    try TUImage.sparse(s.path("mirror.img"), size: size)
    let create = try RRTCommand.run("overwrite-map", ["create", "--like", s.path("mirror.img"), s.path("mirror.map")])
    XCTAssertEqual(create.status, 0, create.summary)

    var ids: [String] = []
    for round in 0...2 {
      if round > 0 {
        // Writes between the views: different blocks each round, and a
        // hole filled.
        let w = try RRTCommand.run(
          "/usr/bin/nbdsh",
          [
            "-u", source.deviceURI, "-c",
            "import os\nfor b in range(\(round), 240, 7):\n    h.pwrite(os.urandom(3000), b * 65536 + 100 * \(round))\nh.flush()",
          ], timeout: 60)
        XCTAssertEqual(w.status, 0, w.summary)
      }
      _ = try source.freeze(changesOut: s.path("g\(round).map"))
      var args = ["-o", s.path("c\(round).stream"), source.viewURI]
      if round > 0 { args = ["--map", s.path("g\(round).map"), "--base", ids[round - 1]] + args }
      ids.append(try XCTUnwrap(try snapshotJSON(args)["stream_id"] as? String))
      try source.drop()
    }
    try mergeIntoMirror(s, "c0.stream", expectID: ids[0])
    let mirrorBefore = try TUImage.read(s.path("mirror.img"))
    let mapBefore = try TUImage.read(s.path("mirror.map"))

    let refused = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", s.path("mirror.map"), "-i", s.path("c2.stream"), s.path("mirror.img")])
    XCTAssertEqual(refused.status, 1, refused.summary)
    XCTAssertTrue(
      refused.stderr.contains(
        "the stream applies on top of stream \(ids[1]), but the last stream merged into this device is \(ids[0])"),
      refused.summary)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, "one sentence: \(refused.stderr)")
    XCTAssertTrue(try TUImage.read(s.path("mirror.img")) == mirrorBefore, "the refused merge wrote the mirror")
    XCTAssertTrue(try TUImage.read(s.path("mirror.map")) == mapBefore, "the refused merge changed the map")

    // A catch-up cut short (damaged media) stops with a sentence naming the
    // record and leaves the base check where it was: the whole copy merges
    // afterwards.
    let whole = try TUImage.read(s.path("c1.stream"))
    try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: s.path("c1.part")))
    let cut = try RRTCommand.run(
      "merge-snapshot", ["--mirror", "--map", s.path("mirror.map"), "-i", s.path("c1.part"), s.path("mirror.img")])
    XCTAssertEqual(cut.status, 1, cut.summary)
    XCTAssertTrue(cut.stderr.contains("truncated stream"), cut.summary)
    XCTAssertEqual(try tuMapStats(s.path("mirror.map"))["last_merged_stream"] as? String, ids[0])

    try mergeIntoMirror(s, "c1.stream", expectID: ids[1])
    try mergeIntoMirror(s, "c2.stream", expectID: ids[2])
    source.stop()
    let diff = try RRTCommand.run("bitmap-diff", ["--extents", s.path("source.img"), s.path("mirror.img")])
    XCTAssertEqual(diff.status, 0, "the source and the mirror are not mirrors: \(diff.summary)")
  }

  /// snapshot --json; the summary object (on standard error or output).
  private func snapshotJSON(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws
    -> [String: Any]
  {
    let r = try RRTCommand.run("snapshot", ["--json"] + args, timeout: 120)
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    return try tuLastJSON(r.stdout + "\n" + r.stderr, file: file, line: line)
  }

  /// merge-snapshot --mirror of a stream of the scratch directory into
  /// mirror.img; asserts it merged and recorded the stream.
  private func mergeIntoMirror(
    _ s: Scratch, _ stream: String, expectID: String, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let r = try RRTCommand.run(
      "merge-snapshot",
      ["--mirror", "--json", "--map", s.path("mirror.map"), "-i", s.path(stream), s.path("mirror.img")],
      timeout: 120)
    XCTAssertEqual(r.status, 0, "merging \(stream): \(r.summary)", file: file, line: line)
    let o = try tuLastJSON(r.stdout, file: file, line: line)
    XCTAssertEqual(o["complete"] as? Bool, true, "\(o)", file: file, line: line)
    let stats = try tuMapStats(s.path("mirror.map"), file: file, line: line)
    XCTAssertEqual(stats["last_merged_stream"] as? String, expectID, "\(stats)", file: file, line: line)
  }

  /// qemu-img compare of the mirror against the frozen view export.
  private func assertMirrorEqualsView(
    _ s: Scratch, _ source: TUTrackingServer, _ when: String, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let r = try RRTCommand.run(
      "/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", s.path("mirror.img"), source.viewURI], timeout: 120)
    XCTAssertEqual(r.status, 0, "the mirror is not the view \(when): \(r.summary)", file: file, line: line)
  }

  private func fileSize(_ path: String) throws -> Int {
    (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.intValue ?? -1
  }

  // MARK: 3. Compose in shell scripts

  /// bash -c without pipefail, as a script runs the man page's lines; the
  /// script prints the pipeline's statuses itself.
  private func bash(_ script: String, _ s: Scratch, file: StaticString = #filePath, line: UInt = #line) throws
    -> RRTCommand.Result
  {
    try RRTCommand.run("/bin/bash", ["-c", script], timeout: 120, cwd: s.url.path)
  }

  /// Two 8 MiB images: `a` with holes, `b` the same with blocks rewritten,
  /// zeroed, a byte changed and a hole filled. Returns the differing blocks.
  private func twoImages(_ s: Scratch, _ a: String, _ b: String, seed: UInt64) throws -> [Int] {
    let B = blockSize
    let size = 8 << 20
    var data = try TUImage.make(s.path(a), size: size, seed: seed, holes: [(60 * B)..<(70 * B)])
    for blk in [3, 10, 11, 12, 99] {
      data.replaceSubrange((blk * B)..<((blk + 1) * B), with: RRTBytes.random(B, seed: seed &+ UInt64(blk)))
    }
    data.replaceSubrange((20 * B)..<(21 * B), with: Data(count: B))
    data[40 * B + 777] ^= 0x5A
    data.replaceSubrange((64 * B + 10)..<(64 * B + 20), with: Data(repeating: 0xEE, count: 10))
    try data.write(to: URL(fileURLWithPath: s.path(b)))
    return RRTBytes.differingBlocks(try TUImage.read(s.path(a)), data, blockSize: B).sorted()
  }

  private func extentLines(_ blocks: [Int]) -> [String] {
    // Runs of consecutive blocks as START LENGTH.
    var out: [String] = []
    var i = 0
    while i < blocks.count {
      var j = i
      while j + 1 < blocks.count && blocks[j + 1] == blocks[j] + 1 { j += 1 }
      out.append("\(blocks[i] * blockSize) \((j - i + 1) * blockSize)")
      i = j + 1
    }
    return out
  }

  /// bitmap-diff old.img new.img | snapshot --map - new.img | merge-snapshot old.img
  func testUse3CopyOnlyTheBlocksThatDifferThroughAPipeline() throws {
    let s = try scratch()
    let differing = try twoImages(s, "old.img", "new.img", seed: 81)
    XCTAssertEqual(differing, [3, 10, 11, 12, 20, 40, 64, 99])
    let before = try RRTCommand.run("bitmap-diff", ["--extents", s.path("old.img"), s.path("new.img")])
    XCTAssertEqual(before.status, 1, before.summary)
    XCTAssertEqual(before.lines, extentLines(differing))

    let r = try bash(
      "bitmap-diff old.img new.img | snapshot --json --map - new.img 2>snap.json | merge-snapshot old.img; "
        + "echo \"status ${PIPESTATUS[*]}\"", s)
    // bitmap-diff exits 1 (the images differ), the others 0.
    XCTAssertTrue(r.stdout.contains("status 1 0 0"), r.summary)
    let snap = try tuLastJSON(try String(contentsOfFile: s.path("snap.json"), encoding: .utf8))
    XCTAssertEqual(snap["covered_blocks"] as? Int, differing.count, "only the differing blocks travel: \(snap)")
    let after = try RRTCommand.run("bitmap-diff", [s.path("old.img"), s.path("new.img")])
    XCTAssertEqual(after.status, 0, after.summary)
  }

  /// bitmap-diff --signature a.img | ssh far bitmap-diff - b.img > differ.map,
  /// with `sh -c` standing for ssh: the map is the direct bitmap-diff's; the
  /// blocks it names, shipped from a, make b a's mirror.
  func testUse3SignatureAcrossAPipeFindsTheDirectDifferences() throws {
    let s = try scratch()
    let differing = try twoImages(s, "a.img", "b.img", seed: 82)
    let r = try bash(
      "bitmap-diff --signature a.img | sh -c 'bitmap-diff - b.img' > differ.map; echo \"status ${PIPESTATUS[*]}\"", s)
    XCTAssertTrue(r.stdout.contains("status 0 1"), r.summary)
    let direct = try bash("bitmap-diff a.img b.img > direct.map; echo \"status $?\"", s)
    XCTAssertTrue(direct.stdout.contains("status 1"), direct.summary)
    let viaSignature = try tuExtents(s.path("differ.map"))
    XCTAssertEqual(viaSignature, try tuExtents(s.path("direct.map")))
    XCTAssertEqual(viaSignature, extentLines(differing))

    // Another digest, through the same pipe, finds the same blocks.
    let sha512 = try bash(
      "bitmap-diff --signature --digest sha512 a.img | sh -c 'bitmap-diff - b.img' | overwrite-map extents -", s)
    XCTAssertEqual(sha512.lines, extentLines(differing), sha512.summary)

    let ship = try bash(
      "snapshot --map differ.map a.img | sh -c 'merge-snapshot b.img'; echo \"status ${PIPESTATUS[*]}\"", s)
    XCTAssertTrue(ship.stdout.contains("status 0 0"), ship.summary)
    let after = try RRTCommand.run("bitmap-diff", [s.path("a.img"), s.path("b.img")])
    XCTAssertEqual(after.status, 0, after.summary)
  }

  /// overwrite-map export | ddrescuelog, and a mapfile that GNU ddrescue
  /// itself uses to copy only the blocks a restore still has to bring.
  func testUse3OverwriteMapAndDdrescueMapfilesRoundTrip() throws {
    try require("ddrescue", "ddrescuelog")
    let s = try scratch()
    let B = blockSize
    let size = 8 << 20
    let backup = try TUImage.make(s.path("backup.img"), size: size, seed: 83, holes: [(90 * B)..<(100 * B)])
    try TUImage.sparse(s.path("primary.img"), size: size)
    // Blocks 0, 5..8 and 127 are current on the primary, with newer data.
    let currentBlocks = [0, 5, 6, 7, 8, 127]
    let newer = RRTBytes.random(size, seed: 830)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: s.path("primary.img")))
    for b in currentBlocks {
      try h.seek(toOffset: UInt64(b * B))
      try h.write(contentsOf: newer.subdata(in: (b * B)..<((b + 1) * B)))
    }
    try h.close()
    let made = try bash(
      "overwrite-map create --like primary.img cur.map && overwrite-map set cur.map 0 65536 && "
        + "overwrite-map set cur.map 327680 262144 && overwrite-map set cur.map 8323072 65536", s)
    XCTAssertEqual(made.status, 0, made.summary)
    XCTAssertEqual(try tuExtents(s.path("cur.map")), extentLines(currentBlocks))

    // ddrescuelog reads the export from a pipe: the finished blocks are the
    // current ones, in ddrescuelog's own block numbers and totals.
    let listed = try bash("overwrite-map export cur.map | ddrescuelog -b 65536 -l+ -", s)
    XCTAssertEqual(listed.status, 0, listed.summary)
    XCTAssertEqual(listed.lines, currentBlocks.map(String.init))
    let todo = try bash("overwrite-map invert cur.map | overwrite-map export - | ddrescuelog -t -", s)
    XCTAssertEqual(todo.status, 0, todo.summary)
    XCTAssertTrue(todo.stdout.contains("non-tried:   393216 B"), "the current blocks, 6 x 64 KiB: \(todo.stdout)")

    // Back from a mapfile through a pipe: the same blocks.
    let back = try bash(
      "overwrite-map export cur.map | overwrite-map import --like primary.img - back.map && overwrite-map extents back.map",
      s)
    XCTAssertEqual(back.status, 0, back.summary)
    XCTAssertEqual(back.lines, extentLines(currentBlocks))

    // GNU ddrescue copies the non-tried blocks (not current) from the
    // backup and leaves the finished (current) ones alone; its final
    // mapfile imports as every block done.
    let rescue = try bash(
      "overwrite-map export cur.map todo.mapfile && ddrescue -q --force backup.img primary.img todo.mapfile", s)
    XCTAssertEqual(rescue.status, 0, rescue.summary)
    let done = try bash(
      "overwrite-map import --like primary.img todo.mapfile done.map && overwrite-map stats done.map", s)
    XCTAssertTrue(done.lines.contains("set_blocks \(size / B)"), done.summary)
    let differ = try RRTCommand.run("bitmap-diff", ["--extents", s.path("backup.img"), s.path("primary.img")])
    XCTAssertEqual(differ.status, 1, differ.summary)
    XCTAssertEqual(differ.lines, extentLines(currentBlocks), "ddrescue must have skipped exactly the current blocks")

    // The newer blocks go back to the backup: mirrors again.
    let sendBack = try bash(
      "snapshot --map cur.map primary.img | merge-snapshot backup.img; echo \"status ${PIPESTATUS[*]}\"", s)
    XCTAssertTrue(sendBack.stdout.contains("status 0 0"), sendBack.summary)
    let after = try RRTCommand.run("bitmap-diff", [s.path("backup.img"), s.path("primary.img")])
    XCTAssertEqual(after.status, 0, after.summary)
    XCTAssertNotEqual(try TUImage.read(s.path("backup.img")), backup)
  }

  /// snapshot SRC | ssh primary 'merge-snapshot --map m.map t.img', with
  /// `sh -c` standing for ssh: current blocks are skipped, the rest lands,
  /// the map records the stream; a stream older than the map is refused
  /// through the same pipe and writes nothing.
  func testUse3AStreamThroughAPipeStandingForSSH() throws {
    let s = try scratch()
    let B = blockSize
    let size = 8 << 20
    let src = try TUImage.make(
      s.path("src.img"), size: size, seed: 84, holes: [(30 * B)..<(50 * B)], zeros: [(70 * B)..<(71 * B)])
    let early = try bash("snapshot --quiet src.img > early.stream", s)
    XCTAssertEqual(early.status, 0, early.summary)
    RRTEnv.sleep(0.01)
    try TUImage.sparse(s.path("t.img"), size: size)
    // Blocks 5..8 were restored already: current, and holding the source's data.
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: s.path("t.img")))
    try h.seek(toOffset: UInt64(5 * B))
    try h.write(contentsOf: src.subdata(in: (5 * B)..<(9 * B)))
    try h.close()
    let made = try bash("overwrite-map create --like t.img m.map && overwrite-map set m.map 327680 262144", s)
    XCTAssertEqual(made.status, 0, made.summary)

    let targetBefore = try TUImage.read(s.path("t.img"))
    let mapBefore = try TUImage.read(s.path("m.map"))
    let refused = try bash("cat early.stream | sh -c 'merge-snapshot --map m.map t.img'; echo \"status $?\"", s)
    XCTAssertTrue(refused.stdout.contains("status 1"), refused.summary)
    XCTAssertTrue(refused.stderr.contains("before the map started tracking"), refused.summary)
    XCTAssertTrue(try TUImage.read(s.path("t.img")) == targetBefore, "the refused stream wrote the target")
    XCTAssertTrue(try TUImage.read(s.path("m.map")) == mapBefore, "the refused stream changed the map")

    let r = try bash(
      "snapshot src.img | tee media.stream | sh -c 'merge-snapshot --json --map m.map t.img' > merge.json; "
        + "echo \"status ${PIPESTATUS[*]}\"", s)
    XCTAssertTrue(r.stdout.contains("status 0 0 0"), r.summary)
    let merged = try tuLastJSON(try String(contentsOfFile: s.path("merge.json"), encoding: .utf8))
    XCTAssertEqual(merged["skipped_current_blocks"] as? Int, 4, "\(merged)")
    XCTAssertEqual(merged["complete"] as? Bool, true, "\(merged)")
    let check = try bash("merge-snapshot --check -i media.stream", s)
    XCTAssertEqual(check.status, 0, check.summary)
    let stats = try tuMapStats(s.path("m.map"))
    XCTAssertEqual(stats["set_blocks"] as? Int, size / B, "\(stats)")
    XCTAssertEqual(stats["last_merged_stream"] as? String, merged["stream_id"] as? String, "\(stats)")
    let after = try RRTCommand.run("bitmap-diff", [s.path("src.img"), s.path("t.img")])
    XCTAssertEqual(after.status, 0, after.summary)
  }
}
