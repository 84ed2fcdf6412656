// Failback, end to end with real processes (dualrestore(7), "Failback"): an
// original site mirroring asynchronously (--ack local) to a far copy through
// a link that fails, the original killed while it still owes the far copy
// some intervals, the far copy taking over with its writes tracked, and the
// original brought back to the far copy by sending only what differs.
//
// The link is nbdkit's nbd plugin between two sockets, stopped to make it
// fail; the failback's reads cross it through nbdkit's stats filter, which
// counts them. What is checked is what the tools promise: the owed map
// (overwrite-map owed) names exactly the blocks written after the link went
// down (as nbdsh's Python writing them says), and after a crash no fewer;
// with the far copy's change map since it took over it covers every block
// that differs between the sites (compared here byte for byte); the link
// carries those blocks and barely more; the original ends equal to the far
// copy; and it serves again as the primary with a fresh journal. Bad input
// to overwrite-map owed is refused with one sentence and no map.

import Foundation
import Glibc
import TestSupport
import XCTest

/// The link between the sites: nbdkit's nbd plugin forwarding a socket to
/// another server's, optionally read-only, to one export, counting with
/// the stats filter.
final class SiteLink: ServerRig {
  let size = 0
  let blockSize = 0
  let socket: String
  let logPath: String
  let statsPath: String?
  private var child: RRTChild?

  var uri: String { "nbd+unix:///?socket=\(socket)" }
  var allLogs: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

  /// Starts the link to the server on `target` (export `export`) and waits
  /// until it answers.
  init(dir: String, name: String, target: String, export: String? = nil, readOnly: Bool = false, stats: Bool = false)
    throws
  {
    socket = dir + "/\(name).sock"
    logPath = dir + "/\(name).log"
    statsPath = stats ? dir + "/\(name).stats" : nil
    unlink(socket)
    var arguments = ["-f", "-U", socket] + (readOnly ? ["-r"] : []) + (stats ? ["--filter=stats"] : [])
    arguments += ["nbd", "socket=\(target)"] + (export.map { ["export=\($0)"] } ?? [])
    arguments += statsPath.map { ["statsfile=\($0)"] } ?? []
    let c = try RRTChild(
      name: "link \(name)", executable: "/usr/bin/nbdkit", arguments: arguments, stdout: dir + "/\(name).out",
      stderr: logPath)
    child = c
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      if !c.isRunning { throw RRTError("the link \(name) ended: \(allLogs)") }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("the link \(name) did not answer within 15 s")
  }

  /// The link fails: nbdkit ends (SIGTERM; its connections close).
  func stop() {
    child?.stop(grace: 5)
    child = nil
    unlink(socket)
  }

  func stopAll() { stop() }

  /// The bytes the stats filter counted read (nbdkit stopped first: it
  /// writes the file as it exits), within the rounding of its units.
  func bytesRead(file: StaticString = #filePath, line: UInt = #line) throws -> Double {
    stop()
    let path = try XCTUnwrap(statsPath, "the link counts nothing", file: file, line: line)
    let text = try String(contentsOfFile: path, encoding: .utf8)
    XCTAssertTrue(text.contains("total:"), "no stats in \(path): \(text)", file: file, line: line)
    let units: [String: Double] = ["bytes": 1, "KiB": 0x1p10, "MiB": 0x1p20, "GiB": 0x1p30]
    for l in text.split(separator: "\n") where l.hasPrefix("read:") {
      // read: 32 ops, 0.020959 s, 8.00 MiB, 381.70 MiB/s op, 13.24 MiB/s total
      let fields = l.dropFirst(5).split(separator: ",").map { $0.split(separator: " ") }
      if fields.count >= 3, fields[2].count == 2, let amount = Double(fields[2][0]),
        let unit = units[String(fields[2][1])]
      {
        return amount * unit
      }
      XCTFail("a stats line of nbdkit not understood: \(l)", file: file, line: line)
    }
    return 0
  }
}

final class FailbackCLITests: CLITestCase {
  /// One change a site's client makes: a write of `length` seeded bytes,
  /// a zero or a trim, at `offset`, with a FLUSH after it or not.
  struct Change {
    enum Kind: String { case write, zero, trim }
    var kind: Kind = .write
    var offset: Int
    var length: Int
    var flush = true
  }

  /// Makes `changes` through the export at `uri` with nbdsh, and returns the
  /// blocks of `blockSize` they touch, as Python works them out.
  func apply(_ changes: [Change], to uri: String, seed: Int, blockSize: Int) throws -> Set<Int> {
    let list = changes.map { "(\"\($0.kind.rawValue)\", \($0.offset), \($0.length), \($0.flush ? "True" : "False"))" }
    let code = """
      import json, random
      h.connect_uri(\(rrtPython(uri)))
      rnd = random.Random(\(seed))
      touched = set()
      for kind, off, n, flush in [\(list.joined(separator: ", "))]:
          if kind == "write":
              h.pwrite(rnd.randbytes(n), off)
          elif kind == "zero":
              h.zero(n, off)
          else:
              h.trim(n, off)
          if flush:
              h.flush()
          touched.update(range(off // \(blockSize), (off + n - 1) // \(blockSize) + 1))
      h.shutdown()
      print(json.dumps(sorted(touched)))
      """
    let r = try RRTCommand.run("/usr/bin/nbdsh", ["-c", code], timeout: 60)
    XCTAssertEqual(r.status, 0, r.summary)
    let blocks = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [Int], r.summary)
    return Set(blocks)
  }

  /// The blocks of `blockSize` at which two images differ, and their bytes.
  static func differing(_ a: Data, _ b: Data, blockSize: Int) -> (blocks: Set<Int>, bytes: Int) {
    var blocks = Set<Int>()
    var bytes = 0
    a.withUnsafeBytes { (x: UnsafeRawBufferPointer) in
      b.withUnsafeBytes { (y: UnsafeRawBufferPointer) in
        var start = 0
        while start < min(x.count, y.count) {
          let n = min(blockSize, x.count - start)
          if memcmp(x.baseAddress! + start, y.baseAddress! + start, n) != 0 {
            blocks.insert(start / blockSize)
            bytes += n
          }
          start += blockSize
        }
      }
    }
    return (blocks, bytes)
  }

  /// `overwrite-map owed` in `dir` with `arguments`.
  func owed(_ dir: String, _ arguments: [String]) throws -> RRTCommand.Result {
    try RRTCommand.run("overwrite-map", ["owed"] + arguments, timeout: 60, cwd: dir)
  }

  func sha(_ path: String) throws -> String {
    let r = try RRTCommand.run("/usr/bin/sha256sum", [path])
    return String(r.stdout.prefix(64))
  }

  // MARK: The owed map on its own

  /// tracking-server --ack local keeping two far copies: far0 through a link
  /// that goes down, far1 directly. Changes A are shipped to both; then the
  /// link fails and changes B (writes, a zero, a trim, several flushes)
  /// reach far1 only. After a clean stop (the activity log emptied), the
  /// map owed to far0 is exactly the blocks of B, by name or by place, and
  /// the map owed to far1 is empty; the journal, its positions and the
  /// activity log are left byte for byte as they were. Without --copy, two
  /// copies are refused.
  func testTheOwedMapIsWhatWasWrittenAfterTheLinkWentDown() throws {
    let (o, link, dir) = try linkDownRun(seed: 81, secondCopy: true)
    let journal = o.mapPath + ".mirror"
    let files = [journal, journal + ".positions", o.mapPath + ".al"]
    let before = try files.map(sha)

    let r0 = try owed(dir, ["--journal", journal, "--copy", "0", "-o", "owed0.map"])
    XCTAssertEqual(r0.status, 0, r0.summary)
    XCTAssertTrue(r0.stderr.contains("owes the far copy \(link.uri)"), r0.stderr)
    XCTAssertTrue(r0.stderr.contains("the activity log's 0 region(s) add 0"), r0.stderr)
    let owed0 = try o.setBlocks(dir + "/owed0.map")
    XCTAssertEqual(owed0, changesB, "owed \(owed0.brief), written after the link went down \(changesB.brief)")
    let stats = try o.mapStats(dir + "/owed0.map")
    XCTAssertEqual(stats["meaning"] as? String, "changed", "\(stats)")
    XCTAssertEqual(stats["block_size"] as? Int, o.blockSize, "\(stats)")
    XCTAssertEqual(stats["device_size"] as? Int, o.size, "\(stats)")

    let byName = try owed(dir, ["--journal", journal, "--copy", link.uri, "-o", "owed0-by-name.map"])
    XCTAssertEqual(byName.status, 0, byName.summary)
    XCTAssertEqual(try o.setBlocks(dir + "/owed0-by-name.map"), changesB)

    let r1 = try owed(dir, ["--journal", journal, "--copy", "1", "-o", "owed1.map"])
    XCTAssertEqual(r1.status, 0, r1.summary)
    XCTAssertEqual(try o.setBlocks(dir + "/owed1.map"), [], "far1 got everything: \(r1.stderr)")

    let both = try owed(dir, ["--journal", journal, "-o", "both.map"])
    assertFails(both, status: 1, mentioning: "names 2 far copies")
    XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/both.map"))

    XCTAssertEqual(try files.map(sha), before, "overwrite-map owed changed the journal's files")
  }

  /// The blocks the B changes of `linkDownRun` touch.
  var changesB: Set<Int> = []

  /// A tracking-server with --ack local whose far copy far0 is reached
  /// through a link; with `secondCopy`, a second copy far1 directly.
  /// Changes A are shipped, the link goes down, changes B are made
  /// (`changesB`), and the server stops cleanly (the server, the link and
  /// the scratch directory are returned).
  func linkDownRun(seed: UInt64, secondCopy: Bool, stop: Bool = true) throws -> (TrackRig, SiteLink, String) {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let o = try TrackRig(size: 16 << 20, seed: seed)
    rigs.append(o)
    let far0 = try FarCopy(dir: o.dir, name: "far0", image: o.original, delay: "1ms")
    rigs.insert(far0, at: 0)
    try far0.start()
    let link = try SiteLink(dir: o.dir, name: "link", target: far0.socket)
    rigs.insert(link, at: 0)
    var backups = ["--backup", link.uri]
    if secondCopy {
      let far1 = try FarCopy(dir: o.dir, name: "far1", image: o.original, delay: "1ms")
      rigs.insert(far1, at: 0)
      try far1.start()
      backups += ["--backup", far1.uri]
    }
    try o.start(["--ack", "local"] + backups)
    let mb = 1 << 20
    _ = try apply(
      [
        Change(offset: 0, length: 256 << 10), Change(offset: 5 * mb + 4096, length: 8192),
        Change(offset: 9 * mb, length: 128 << 10),
      ], to: o.uri, seed: 1, blockSize: o.blockSize)
    try o.waitUntilDrained()
    link.stop()
    changesB = try apply(
      [
        Change(offset: mb + 100, length: 300 << 10), Change(offset: 9 * mb, length: 4096),
        Change(kind: .zero, offset: 12 * mb, length: 256 << 10), Change(offset: 6 * mb + 65536, length: 65536),
        Change(kind: .trim, offset: 14 * mb, length: 131072), Change(offset: 15 * mb + 70000, length: 10),
      ], to: o.uri, seed: 2, blockSize: o.blockSize)
    var last: [CopyLag] = []
    let lags = try o.waitForCopies(last: &last) { l in
      l[0].owedIntervals > 0 && l.dropFirst().allSatisfy { $0.owedIntervals == 0 }
    }
    XCTAssertNotNil(lags, "far0 should owe, far1 not: \(last)")
    if stop {
      o.stop()
      XCTAssertTrue(o.log.contains("they stay in the mirror journal"), o.log)
    }
    return (o, link, o.dir)
  }

  // MARK: Failback end to end

  /// The original site runs restore-read-through --ack local on a whole
  /// disk (every block current, blocks of 64 KiB), its far copy a
  /// tracking-server (blocks of 4 KiB) reached through a link. Changes A
  /// are shipped; the link goes down; changes B are made, the last of them
  /// never flushed, and the original is killed (-9). The far copy takes
  /// over: a new generation starts and changes C are made there, some over
  /// B's blocks, some over A's, some new. Failback: the owed map (from the
  /// journal and the activity log) rescaled to 4 KiB and united with the
  /// far copy's change map since it took over; a sparse signature of those
  /// blocks at the original, compared with the far copy's frozen view,
  /// leaves the blocks that differ; a snapshot of them read at the original
  /// through the link (counted by nbdkit's stats filter) is merged into the
  /// original's disk. The link carries no more than 1.05 times the bytes
  /// of the blocks that differ (worked out here from the two images), the
  /// map of the blocks that differ is exactly those, and the original then
  /// equals the far copy (bitmap-diff exits 0). With its journal and
  /// activity log set aside, the original serves again as the primary with
  /// a fresh journal, and its next writes reach the far copy.
  func testFailbackBringsTheOriginalBackSendingOnlyWhatDiffers() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let mb = 1 << 20
    let far = try TrackRig(size: 16 << 20, blockSize: 4096, seed: 91)
    rigs.append(far)
    let dir = far.dir
    try far.start(["--block-size", "4K"])
    let original = try ChainPrimary(dir: dir, image: far.original)
    rigs.insert(original, at: 0)
    var link = try SiteLink(dir: dir, name: "link", target: far.socket)
    rigs.insert(link, at: 0)
    let options = ["--ack", "local", "--progress-interval", "0.2"]
    try original.start(backups: [link.uri], options: options)

    // A: shipped.
    let a = try apply(
      [
        Change(offset: 0, length: 256 << 10), Change(offset: 5 * mb + 4096, length: 8192),
        Change(offset: 9 * mb, length: 128 << 10),
      ], to: original.uri, seed: 11, blockSize: 4096)
    XCTAssertTrue(original.waitUntilDrained(after: original.progressLines.count + 1), original.log)
    // The link goes down; B: owed, the last two never flushed.
    link.stop()
    let b = try apply(
      [
        Change(offset: mb, length: mb), Change(offset: 6 * mb + 4096, length: 512 << 10),
        Change(offset: 9 * mb, length: 64 << 10), Change(offset: 12 * mb, length: mb),
        Change(kind: .zero, offset: 14 * mb, length: 256 << 10),
        Change(offset: 15 * mb, length: (256 << 10) + 4096, flush: false),
        Change(offset: 3 * mb + 8192, length: 12288, flush: false),
      ], to: original.uri, seed: 12, blockSize: 4096)
    original.server?.kill9()
    original.server = nil
    let b64 = Set(b.map { $0 / 16 })

    // The owed map, offline: every block of B (in blocks of 64 KiB), and
    // otherwise only blocks of the regions the activity log names.
    let o = try owed(dir, ["--journal", original.mapPath + ".mirror", "-o", "owed.map"])
    XCTAssertEqual(o.status, 0, o.summary)
    let owed64 = try far.setBlocks(dir + "/owed.map", blockSize: 65536)
    let logged = try far.setBlocks(original.mapPath + ".al", blockSize: 65536)
    XCTAssertTrue(owed64.isSuperset(of: b64), "owed \(owed64.brief) lacks some of B \(b64.brief)")
    XCTAssertTrue(
      owed64.isSubset(of: b64.union(logged)), "owed \(owed64.brief) beyond B and the activity log \(logged.brief)")
    print("failback: the owed map: \(o.stderr)")

    // Fail-over: a new generation at the far copy; C made there.
    let g = try far.control("new-generation", ["--changes-out", dir + "/failover.map"])
    XCTAssertEqual(g.status, 0, g.summary)
    let c = try apply(
      [
        Change(offset: mb + 512 << 10, length: 256 << 10), Change(offset: 3 * mb, length: 512 << 10),
        Change(offset: 9 * mb + 64 << 10, length: 128 << 10), Change(offset: 12 * mb + 4096, length: 65536),
        Change(offset: 15 * mb, length: 65536), Change(kind: .zero, offset: 100 << 10, length: 8192),
      ], to: far.uri, seed: 13, blockSize: 4096)

    // Failback: the far copy frozen, with its changes since the fail-over.
    let f = try far.control("freeze", ["--changes-out", dir + "/since.map"])
    XCTAssertEqual(f.status, 0, f.summary)
    XCTAssertEqual(try far.setBlocks(dir + "/since.map"), c)
    let before = try original.data()
    let farNow = try far.deviceData()
    let (differ, differBytes) = Self.differing(before, farNow, blockSize: 4096)
    XCTAssertFalse(differ.isEmpty)
    XCTAssertTrue(differ.isSubset(of: b.union(c)), "differ beyond B and C: \(differ.subtracting(b.union(c)).brief)")
    // The scenario is what it says: C over some of B's blocks, some of A's, and new ones.
    XCTAssertFalse(c.isDisjoint(with: b))
    XCTAssertFalse(c.isDisjoint(with: a))
    XCTAssertFalse(c.subtracting(a).subtracting(b).isEmpty)

    let steps = try RRTCommand.shell(
      """
      overwrite-map rescale --block-size 4K owed.map -o owed-4k.map &&
      overwrite-map union owed-4k.map since.map -o candidates.map &&
      bitmap-diff --signature --map candidates.map primary.img -o original.sig &&
      { bitmap-diff original.sig '\(far.viewURI)' -o differ.map; test $? -eq 1; }
      """, timeout: 120, cwd: dir)
    XCTAssertEqual(steps.status, 0, steps.summary)
    let candidates = try far.setBlocks(dir + "/candidates.map")
    XCTAssertTrue(candidates.isSuperset(of: differ), "candidates miss \(differ.subtracting(candidates).brief)")
    XCTAssertEqual(try far.setBlocks(dir + "/differ.map"), differ)

    link = try SiteLink(dir: dir, name: "link-back", target: far.socket, export: "view", readOnly: true, stats: true)
    rigs.insert(link, at: 0)
    let back = try RRTCommand.shell(
      "snapshot --map differ.map '\(link.uri)' | merge-snapshot primary.img", timeout: 120, cwd: dir)
    XCTAssertEqual(back.status, 0, back.summary)
    let read = try link.bytesRead()
    let signature = try XCTUnwrap(
      FileManager.default.attributesOfItem(atPath: dir + "/original.sig")[.size] as? Int)
    print(
      "failback: \(differ.count) blocks of 4 KiB differ (\(differBytes) bytes); the owed map had \(owed64.count) "
        + "of 64 KiB, \(candidates.count) candidates of 4 KiB; the link read \(Int(read)) bytes "
        + "(\(String(format: "%.4f", read / Double(differBytes))) of what differs), the signature sent back "
        + "\(signature) bytes (\(String(format: "%.4f", (read + Double(signature)) / Double(differBytes))) in all)")
    XCTAssertGreaterThanOrEqual(read, Double(differBytes) * 0.999)
    XCTAssertLessThanOrEqual(read, Double(differBytes) * 1.05)
    XCTAssertLessThanOrEqual(read + Double(signature), Double(differBytes) * 1.05)
    let same = try RRTCommand.run("bitmap-diff", ["-o", "/dev/null", dir + "/primary.img", far.viewURI], timeout: 60)
    XCTAssertEqual(same.status, 0, same.summary)
    XCTAssertEqual(try original.data(), farNow, "the original after failback vs the far copy")

    // The original serves again: the journal, its positions and the
    // activity log describe writes the far copy's blocks replaced, so they
    // are set aside and a fresh journal starts.
    XCTAssertEqual(try far.control("drop").status, 0)
    let aside = dir + "/failed-back"
    try FileManager.default.createDirectory(atPath: aside, withIntermediateDirectories: true)
    for name in [".mirror", ".mirror.positions", ".al"] {
      XCTAssertEqual(rename(original.mapPath + name, aside + "/p.map" + name), 0, name)
    }
    link = try SiteLink(dir: dir, name: "link-again", target: far.socket)
    rigs.insert(link, at: 0)
    try original.start(backups: [link.uri], options: options)
    XCTAssertTrue(original.log.contains("created the mirror journal"), original.log)
    XCTAssertFalse(original.log.contains("unclean shutdown"), original.log)
    _ = try apply(
      [Change(offset: 2 * mb, length: 128 << 10), Change(offset: 15 * mb, length: 4096)], to: original.uri, seed: 14,
      blockSize: 4096)
    XCTAssertTrue(original.waitUntilDrained(after: original.progressLines.count + 1), original.log)
    original.stop()
    XCTAssertEqual(try original.data(), try far.deviceData(), "the original serving again vs the far copy")
  }

  // MARK: Refusals

  /// A journal whose server runs is refused (its lock); so are a file that
  /// is not a journal, a journal without its positions file, a damaged
  /// record before the last interval end, a map that is not the activity
  /// log, and a copy the positions file does not name. Each: one sentence,
  /// exit 1, no map.
  func testOwedRefusesARunningServerAndWhatIsNotAJournal() throws {
    let (o, _, dir) = try linkDownRun(seed: 82, secondCopy: false, stop: false)
    let journal = o.mapPath + ".mirror"
    func refused(_ arguments: [String], _ fragment: String, file: StaticString = #filePath, line: UInt = #line) throws {
      let out = dir + "/refused.map"
      let r = try owed(dir, arguments + ["-o", out])
      assertFails(r, status: 1, mentioning: fragment, file: file, line: line)
      XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr, file: file, line: line)
      XCTAssertFalse(FileManager.default.fileExists(atPath: out), "a map was written", file: file, line: line)
    }
    try refused(["--journal", journal], "is locked: the server that keeps this mirror journal is running")
    // A second server on the same journal is refused too.
    let second = try RRTCommand.run(
      "tracking-server",
      [
        "serve", "--changes", dir + "/other.map", "--journal", journal, "--socket", dir + "/other.sock", "--ack",
        "local",
        "--backup", "nbd+unix:///?socket=\(dir)/nowhere.sock", o.devicePath,
      ], timeout: 30)
    XCTAssertNotEqual(second.status, 0, second.summary)
    XCTAssertTrue(second.stderr.contains("is locked"), second.stderr)
    o.stop()

    let records = JournalRecord.all(try Data(contentsOf: URL(fileURLWithPath: journal)))
    XCTAssertGreaterThanOrEqual(records.filter { $0.type == JournalRecord.intervalEnd }.count, 2)
    func copy(_ name: String, positions: Bool = true) throws -> String {
      let path = dir + "/\(name).mirror"
      try FileManager.default.copyItem(atPath: journal, toPath: path)
      try FileManager.default.copyItem(atPath: o.mapPath + ".al", toPath: dir + "/\(name).al")
      if positions { try FileManager.default.copyItem(atPath: journal + ".positions", toPath: path + ".positions") }
      return path
    }
    // The device image and a short file: not journals.
    try refused(["--journal", o.devicePath, "--activity-log", o.mapPath + ".al"], "is not a usable mirror journal")
    try Data(count: 100).write(to: URL(fileURLWithPath: dir + "/short.mirror"))
    try refused(["--journal", dir + "/short.mirror"], "is not a mirror journal: it has 100 bytes")
    try refused(["--journal", try copy("bare", positions: false)], "bare.mirror.positions is missing")
    // A payload byte of the first write the far copy lacks, with good
    // interval ends after it: damage, not a torn tail.
    let damaged = try copy("damaged")
    let positions = try Data(contentsOf: URL(fileURLWithPath: journal + ".positions"))
    let firstOwed = try XCTUnwrap(
      records.first { $0.type == JournalRecord.write && $0.interval > positionInterval(positions) })
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: damaged))
    try handle.seek(toOffset: UInt64(firstOwed.offset + 44 + 7))
    let byte = try XCTUnwrap(handle.read(upToCount: 1)).first ?? 0
    try handle.seek(toOffset: UInt64(firstOwed.offset + 44 + 7))
    try handle.write(contentsOf: Data([byte ^ 0xFF]))
    try handle.close()
    try refused(["--journal", damaged], "refusing to read what it owes from it")
    try refused(["--journal", journal, "--activity-log", o.mapPath], "is not the activity log of")
    try refused(["--journal", journal, "--copy", "5"], "names no far copy 5")
    try refused(["--journal", journal, "--activity-log", dir + "/none.al"], "none.al is missing")
    // The good journal still gives its map.
    let r = try owed(dir, ["--journal", journal, "-o", "good.map"])
    XCTAssertEqual(r.status, 0, r.summary)
    XCTAssertEqual(try o.setBlocks(dir + "/good.map"), changesB)
  }

  /// The interval the first copy of a positions file holds.
  func positionInterval(_ d: Data) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<8 { v |= UInt64(d[d.startIndex + 48 + i]) << (8 * UInt64(i)) }
    return v
  }
}
