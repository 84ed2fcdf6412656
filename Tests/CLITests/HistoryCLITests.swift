// tracking-server --history against real processes: the stamped writer
// (Tests/Scripts/stamped.py) writes numbered stamps with a FLUSH every F
// writes, so point k of the history is the device after k*F writes, which
// the script's own sequence rebuilds from the baseline. Checked:
// - 100 instants drawn at random between the first and the last point each
//   find, by `points --at` and by the export point;at=INSTANT, the point
//   whose state they name, byte for byte;
// - --keep-time trims the oldest points (an instant before the oldest, a
//   point trimmed are refused in a sentence naming the oldest), and
//   --keep-bytes holds the history near its bound while the newest point
//   reads right;
// - a clean stop keeps every point; after a kill -9 every point listed
//   reads as it was and the next flush makes the device a point; a torn
//   tail is cut with a log line; a damaged before-image is refused with
//   EIO, never read as wrong bytes;
// - a far copy kept by restore-read-through --ack local on a tracking-server
//   with --history: every point of its history is a consistency point;
// - bad input: one sentence, a non-zero exit, nothing changed.

import DualRestore
import Foundation
import Glibc
import TestSupport
import XCTest

final class HistoryCLITests: CLITestCase {
  /// The test scripts' directory (stamped.py is imported from it).
  static let scripts = URL(fileURLWithPath: StampedLoad.script).deletingLastPathComponent().path

  func historyPath(_ r: TrackRig) -> String { r.s.path("history") }

  /// A tracking-server with a history in the rig's directory.
  func historyRig(size: Int = 16 << 20, seed: UInt64, keep: [String] = ["--keep-time", "1h"]) throws -> TrackRig {
    let r = try TrackRig(size: size, seed: seed)
    rigs.append(r)
    try r.start(["--history", historyPath(r)] + keep)
    XCTAssertTrue(r.log.contains("point 0 is the device as it is now"), r.log)
    return r
  }

  // MARK: Points listed

  struct Listed: Equatable {
    var number: Int
    var instant: String
    /// The instant in nanoseconds, as printed (to the millisecond, rounded down).
    var ns: Int64
    var bytes: Int
    var blocks: Int
  }

  /// `points --json [--at INSTANT]` against the server on `socket`.
  func points(
    _ r: TrackRig, at: String? = nil, socket: String? = nil, file: StaticString = #filePath, line: UInt = #line
  )
    throws -> (result: RRTCommand.Result, points: [Listed], object: [String: Any])
  {
    let res = try r.run(
      "tracking-server", ["points", "--socket", socket ?? r.socket, "--json"] + (at.map { ["--at", $0] } ?? []))
    guard res.status == 0 else { return (res, [], [:]) }
    let o = try TrackRig.json(res.stdout, file: file, line: line)
    let list = try XCTUnwrap(o["points"] as? [[String: Any]], res.stdout, file: file, line: line)
    var out: [Listed] = []
    for p in list {
      let number = try XCTUnwrap(p["number"] as? Int, "\(p)", file: file, line: line)
      let instant = try XCTUnwrap(p["instant"] as? String, "\(p)", file: file, line: line)
      let parsed = try XCTUnwrap(Instant(rfc3339: instant), instant, file: file, line: line)
      XCTAssertEqual(p["export"] as? String, "point;\(number)", file: file, line: line)
      out.append(
        Listed(
          number: number, instant: instant, ns: parsed.nanosecondsSinceEpoch, bytes: p["bytes"] as? Int ?? -1,
          blocks: p["blocks"] as? Int ?? -1))
    }
    return (res, out, o)
  }

  /// An instant in RFC 3339 to the nanosecond.
  func rfc3339(_ ns: Int64) -> String {
    var seconds = time_t(ns / 1_000_000_000)
    var t = tm()
    gmtime_r(&seconds, &t)
    return String(
      format: "%04d-%02d-%02dT%02d:%02d:%02d.%09lldZ", t.tm_year + 1900, t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min,
      t.tm_sec, ns % 1_000_000_000)
  }

  // MARK: Reading points

  /// One export read whole and compared with the state after `writes`.
  struct Read {
    var export: String
    var writes: Int
    /// The first byte that differs, -1 when none does; nil when the read failed.
    var firstDifference: Int?
    var error: String?
    var equal: Bool { firstDifference == -1 }
  }

  /// Reads each export over NBD (python's nbd module) and compares it with
  /// the baseline after that many of the load's writes (stamped.py's
  /// sequence, applied in python), in one process.
  func read(
    _ checks: [(export: String, writes: Int)], socket: String, load: StampedLoad, baseline: String, dir: String,
    file: StaticString = #filePath, line: UInt = #line
  ) throws -> [Read] {
    let config: [String: Any] = [
      "scripts": Self.scripts, "socket": socket, "baseline": baseline, "seed": load.seed,
      "write_size": load.writeSize, "slots": load.slots, "flush_every": load.flushEvery,
      "checks": checks.map { [$0.export, $0.writes] as [Any] },
    ]
    let path = dir + "/read-\(UUID().uuidString).json"
    try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
    let code = """
      import sys, json
      import nbd
      cfg = json.load(open(sys.argv[1]))
      sys.path.insert(0, cfg["scripts"])
      import stamped
      W, F, N, S = cfg["write_size"], cfg["flush_every"], cfg["slots"], cfg["seed"]
      checks = sorted(enumerate(cfg["checks"]), key=lambda c: c[1][1])
      top = max([c[1][1] for c in checks] + [0])
      seq = stamped.sequence(S, N, F, top)
      img = bytearray(open(cfg["baseline"], "rb").read())
      applied = 0
      out = [None] * len(checks)
      for k, (name, writes) in checks:
          for i in range(applied, writes):
              img[seq[i] * W:(seq[i] + 1) * W] = stamped.stamp(S, i, seq[i], W, F)
          applied = max(applied, writes)
          r = {"export": name, "writes": writes}
          h = nbd.NBD()
          try:
              h.connect_uri("nbd+unix:///%s?socket=%s" % (name, cfg["socket"]))
              size = h.get_size()
              if size != len(img):
                  raise Exception("the export has %d bytes, the image %d" % (size, len(img)))
              first, off = -1, 0
              while off < size:
                  n = min(4 << 20, size - off)
                  got = h.pread(n, off)
                  if first < 0 and got != img[off:off + n]:
                      first = off + next(j for j in range(n) if got[j] != img[off + j])
                  off += n
              r["first"] = first
              h.shutdown()
          except nbd.Error as e:
              r["error"] = " ".join(str(e).split())
          out[k] = r
      print(json.dumps(out))
      """
    let res = try RRTCommand.run(StampedLoad.python, ["-c", code, path], timeout: 600)
    XCTAssertEqual(res.status, 0, res.summary, file: file, line: line)
    guard res.status == 0,
      let list = try JSONSerialization.jsonObject(with: Data(res.stdout.utf8)) as? [[String: Any]]
    else { return [] }
    return list.map {
      Read(
        export: $0["export"] as? String ?? "?", writes: $0["writes"] as? Int ?? -1,
        firstDifference: $0["first"] as? Int,
        error: $0["error"] as? String)
    }
  }

  /// Every point listed reads as the device after number*F writes.
  func assertPointsRead(
    _ r: TrackRig, _ listed: [Listed], load: StampedLoad, baseline: String, _ what: String,
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let reads = try read(
      listed.map { ("point;\($0.number)", $0.number * load.flushEvery) }, socket: r.socket, load: load,
      baseline: baseline, dir: r.dir, file: file, line: line)
    XCTAssertEqual(reads.count, listed.count, what, file: file, line: line)
    let bad = reads.filter { !$0.equal }
    XCTAssertEqual(
      bad.count, 0, "\(what): points that did not read as their state: \(bad.prefix(5))\nlog:\n\(r.allLogs)",
      file: file, line: line)
  }

  /// The history's log files, oldest first.
  func historyFiles(_ r: TrackRig) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: historyPath(r)).filter { $0.hasSuffix(".points") }.sorted()
      .map { historyPath(r) + "/" + $0 }
  }

  /// What the history directory holds: names and sizes.
  func historyListing(_ path: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
    return names.sorted().map { name in
      let size = (try? FileManager.default.attributesOfItem(atPath: path + "/" + name)[.size] as? Int) ?? -1
      return "\(name) \(size)"
    }
  }

  // MARK: a. Any instant reads as its point

  /// 1200 stamped writes of 2 KiB (partial 4 KiB blocks), four in flight, a
  /// FLUSH every 8: 150 points, point k the device after 8k writes (the
  /// writer's log and the list agree). 100 instants drawn at random between
  /// the first and the last point: `points --at` names a point whose listed
  /// instant brackets it, and the export point;at=INSTANT reads as that
  /// point's state, byte for byte, 100 of 100. The newest point and the
  /// device read as the state after every write.
  func testAHundredInstantsEachReadAsTheStateAtTheirPoint() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    let r = try historyRig(seed: 51)
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 5101, writeSize: 2048, slots: 4096, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    let started = RRTEnv.monotonic()
    let w = try load.write(uri: r.uri, log: wlog, queueDepth: 4, count: 1200, timeout: 600)
    let writing = RRTEnv.monotonic() - started
    XCTAssertEqual(w.status, 0, w.summary)
    let l = StampedLoad.Log(path: wlog)
    XCTAssertEqual(l.flushed, Array(stride(from: 8, through: 1200, by: 8)))

    let (res, listed, object) = try points(r)
    XCTAssertEqual(res.status, 0, res.summary)
    // A point a flush: point k is the state after the writer's k-th flush.
    XCTAssertEqual(listed.map(\.number), Array(0...l.flushed.count), "\(listed.prefix(5))")
    XCTAssertEqual(listed.first?.bytes, 0)
    for (a, b) in zip(listed, listed.dropFirst()) {
      XCTAssertLessThanOrEqual(a.ns, b.ns, "point \(b.number)'s instant is before point \(a.number)'s")
      // 8 writes of 2 KiB: each in one 4 KiB block, so 1 to 8 blocks kept.
      XCTAssertTrue((1...8).contains(b.blocks), "point \(b.number): \(b.blocks) blocks")
      XCTAssertGreaterThanOrEqual(b.bytes, b.blocks * 4100, "point \(b.number)")
    }
    XCTAssertEqual(object["open_bytes"] as? Int, 0, "\(object)")
    XCTAssertEqual(object["keep_seconds"] as? Double, 3600, "\(object)")
    let used = try XCTUnwrap(object["space_used"] as? Int)
    let kept = listed.reduce(0) { $0 + $1.bytes }
    XCTAssertGreaterThanOrEqual(used, kept, "\(object)")

    var rng = SplitMix64(seed: 0x5101)
    // The instant listed for a point finds that point: instants are
    // listed to the millisecond, and found to it.
    for _ in 0..<10 {
      let k = Int(rng.next() % UInt64(listed.count))
      let at = try points(r, at: listed[k].instant)
      XCTAssertEqual(at.result.status, 0, at.result.summary)
      XCTAssertEqual(at.points.map(\.number), [k], "points --at \(listed[k].instant), point \(k)'s instant")
    }

    // 100 instants, after point 0's millisecond (which may hold instants
    // just before it) and up to the last point's.
    let first = try XCTUnwrap(listed.first).ns + 1_000_000
    let last = try XCTUnwrap(listed.last).ns
    XCTAssertGreaterThan(last - first, 100_000_000, "the points span too little time")
    var checks: [(export: String, writes: Int)] = []
    var chosen: [Int] = []
    for _ in 0..<100 {
      let t = first + Int64(rng.next() % UInt64(last - first + 1))
      let text = rfc3339(t)
      let at = try points(r, at: text)
      XCTAssertEqual(at.result.status, 0, at.result.summary)
      XCTAssertEqual(at.points.count, 1, at.result.stdout)
      guard let n = at.points.first?.number, n < listed.count else { continue }
      XCTAssertEqual(at.points.first, listed[n])
      // The newest at or before t: its instant is not after t, the next
      // one's is (each listed to its millisecond, rounded down).
      XCTAssertLessThanOrEqual(listed[n].ns, t, "\(text) found point \(n) at \(listed[n].instant)")
      if n + 1 < listed.count {
        XCTAssertGreaterThan(listed[n + 1].ns + 1_000_000, t, "\(text) found point \(n), not \(n + 1)")
      }
      checks.append(("point;at=\(text)", n * load.flushEvery))
      chosen.append(n)
    }
    let reads = try read(
      checks + [("point", 1200), ("device", 1200)], socket: r.socket, load: load, baseline: baseline, dir: r.dir)
    let equal = reads.prefix(100).filter(\.equal).count
    print(
      "history: 1200 writes in \(String(format: "%.1f", writing)) s, \(listed.count) points, \(used) bytes; "
        + "\(equal) of 100 instants read as their point (\(Set(chosen).count) distinct points)")
    XCTAssertEqual(equal, 100, "instants that did not read as their point: \(reads.filter { !$0.equal }.prefix(5))")
    XCTAssertEqual(reads.count, 102)
    XCTAssertTrue(reads.suffix(2).allSatisfy(\.equal), "\(reads.suffix(2))")
    XCTAssertGreaterThan(Set(chosen).count, 40, "the instants fell on few points: \(chosen)")
    r.stop()
  }

  /// Points read while the writer goes on making new ones (so their
  /// overlays are brought up to date under the reads) read exactly as
  /// their state; with --keep-bytes trimming the oldest meanwhile, a point
  /// read as it goes is refused or fails, never read wrong.
  func testPointsReadUnderAWriterAreExactOrRefused() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    for keep in [["--keep-time", "1h"], ["--keep-bytes", "1M"]] {
      let r = try historyRig(size: 16 << 20, seed: 61, keep: keep)
      let baseline = try r.s.file("baseline.img", r.original)
      let load = StampedLoad(seed: 6106, writeSize: 2048, slots: 8192, flushEvery: 8)
      let wlog = r.s.path("writer.log")
      let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"), count: 4000)
      r.others.append(writer)
      var rounds = 0
      var right = 0
      var refused = 0
      var rng = SplitMix64(seed: 0x6106)
      while writer.isRunning {
        let listed = try points(r).points
        guard listed.count > 2 else {
          RRTEnv.sleep(0.05)
          continue
        }
        // The oldest, the newest and two between, read in one go.
        let picks =
          [listed[0], listed[listed.count - 1]] + (0..<2).map { _ in listed[Int(rng.next() % UInt64(listed.count))] }
        let reads = try read(
          picks.map { ("point;\($0.number)", $0.number * 8) }, socket: r.socket, load: load, baseline: baseline,
          dir: r.dir)
        XCTAssertEqual(reads.count, picks.count)
        for x in reads {
          if x.equal {
            right += 1
          } else {
            XCTAssertNil(x.firstDifference, "\(keep): \(x.export) read wrong bytes: \(x)\nlog:\n\(r.log)")
            refused += 1
          }
        }
        rounds += 1
      }
      XCTAssertEqual(writer.wait(timeout: 10), 0, writer.errors)
      print("history \(keep) under a writer: \(rounds) rounds, \(right) points read right, \(refused) refused")
      XCTAssertGreaterThan(rounds, 2, "the writer ended before the points were read")
      XCTAssertGreaterThan(right, 0)
      if keep[0] == "--keep-time" { XCTAssertEqual(refused, 0, "points refused with nothing trimmed") }
      r.stop()
    }
  }

  /// A device whose size is not a multiple of 4 KiB: writes into its last,
  /// partial block and across blocks, a FLUSH after each group; every point
  /// reads as the device was, to its last byte, also after a restart.
  func testAPartialLastBlockIsKeptToTheDevicesLastByte() throws {
    try require("nbdinfo", "nbdsh")
    let size = (4 << 20) + 1000
    let r = try historyRig(size: size, seed: 62)
    let groups: [[(Int, Int)]] = [
      [(size - 500, 500), (4090, 20)], [(size - 1000, 1000), (0, 1)], [(size - 1, 1), (8192, 8192 * 3 + 7)],
      [(size - 4096 - 1000, 4096 + 1000)],
    ]
    var expected = [r.original]
    var state = r.original
    for (g, group) in groups.enumerated() {
      var code = "h.connect_uri(URI)\n"
      for (k, (offset, length)) in group.enumerated() {
        let w = UInt32(100 * (g + 1) + k)
        code += "h.pwrite(pattern(\(w), \(length)), \(offset))\n"
        state.replaceSubrange(offset..<offset + length, with: TrackRig.pattern(w, length))
      }
      code += "h.flush()\nh.shutdown()\nprint('OK')"
      let res = try r.nbdsh(code)
      XCTAssertEqual(res.status, 0, res.summary)
      expected.append(state)
    }
    func check(_ what: String) throws {
      XCTAssertEqual(try points(r).points.map(\.number), Array(0...groups.count), what)
      for n in 0...groups.count {
        let out = r.s.path("point-\(n).img")
        let res = try r.nbdsh(
          """
          h.connect_uri("nbd+unix:///point;\(n)?socket=\(r.socket)")
          assert h.get_size() == SIZE
          open(\(rrtPython(out)), "wb").write(h.pread(SIZE, 0))
          h.shutdown()
          """, uri: r.uri)
        XCTAssertEqual(res.status, 0, res.summary)
        RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), expected[n], "\(what): point \(n)")
      }
    }
    try check("running")
    r.stop()
    try r.start()
    try check("after a restart")
    r.stop()
  }

  // MARK: b. Retention

  /// --keep-time 3s: once the points are older, the periodic trim leaves
  /// the newest alone; an instant before it is refused naming it, a point
  /// trimmed is refused by name, and the points made afterwards and the
  /// one kept read right.
  func testKeepTimeTrimsTheOldestPointsAndRefusesThem() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    let r = try historyRig(size: 8 << 20, seed: 52, keep: ["--keep-time", "3s"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 5202, writeSize: 2048, slots: 2048, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    let w = try load.write(uri: r.uri, log: wlog, count: 80)
    XCTAssertEqual(w.status, 0, w.summary)
    let before = try points(r).points
    XCTAssertEqual(before.map(\.number), Array(0...10))
    let spaceBefore = try XCTUnwrap(try points(r).object["space_used"] as? Int)

    // Trimmed every 5 s while no point is taken.
    let end = RRTEnv.monotonic() + 20
    var now = before
    while RRTEnv.monotonic() < end {
      now = try points(r).points
      if now.map(\.number) == [10] { break }
      RRTEnv.sleep(0.25)
    }
    XCTAssertEqual(now.map(\.number), [10], "the oldest points were not trimmed; log:\n\(r.log)")
    XCTAssertEqual(now.first?.instant, before.last?.instant)
    let after = try points(r).object
    let spaceAfter = try XCTUnwrap(after["space_used"] as? Int)
    XCTAssertLessThan(spaceAfter, spaceBefore, "trimming punched nothing out: \(after)")

    let refused = try r.run("tracking-server", ["points", "--socket", r.socket, "--at", before[5].instant])
    XCTAssertNotEqual(refused.status, 0, refused.summary)
    XCTAssertTrue(
      refused.stderr.contains("is before the oldest point kept, 10 at \(before[10].instant)"), refused.summary)
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertEqual(refused.stdout, "")
    let trimmed = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///point;5?socket=\(r.socket)"])
    XCTAssertNotEqual(trimmed.status, 0, trimmed.summary)
    let reads = try read(
      [("point;5", 40), ("point;10", 80), ("point;at=\(before[10].instant)", 80)], socket: r.socket, load: load,
      baseline: baseline, dir: r.dir)
    XCTAssertNil(reads.first?.firstDifference, "point 5 was read after its trimming: \(reads)")
    XCTAssertTrue(reads.first?.error?.contains("nbd_connect_uri") == true, "refused at its opening: \(reads)")
    XCTAssertTrue(reads.dropFirst().allSatisfy(\.equal), "\(reads)")

    // The history goes on from the point kept, which the next point trims
    // (it is older than 3 s by then).
    let more = try load.write(uri: r.uri, log: wlog, count: 40, start: 80)
    XCTAssertEqual(more.status, 0, more.summary)
    let listed = try points(r).points
    XCTAssertEqual(listed.map(\.number), Array(11...15))
    // The same list as text: a line per point, then the totals.
    let text = try r.run("tracking-server", ["points", "--socket", r.socket])
    XCTAssertEqual(text.status, 0, text.summary)
    XCTAssertEqual(text.lines.count, listed.count + 1, text.stdout)
    for (i, p) in listed.enumerated() where i < text.lines.count {
      XCTAssertEqual(
        text.lines[i], "point \(p.number) at \(p.instant): \(p.bytes) bytes, \(p.blocks) block(s) kept for its interval"
      )
    }
    XCTAssertTrue(text.lines.last?.hasPrefix("\(listed.count) point(s); the history takes ") == true, text.stdout)
    XCTAssertTrue(text.stdout.hasSuffix("; keeping 3.000 s\n"), text.stdout)
    try assertPointsRead(r, listed, load: load, baseline: baseline, "after the trim")
    r.stop()
  }

  /// --keep-bytes 1M under 200 intervals of 16 writes: the oldest points
  /// go while the load runs, the records kept and the space the files take
  /// stay near the bound all along, and the newest point, the oldest kept
  /// and one between read right.
  func testKeepBytesHoldsTheHistoryNearItsBound() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    let r = try historyRig(size: 16 << 20, seed: 53, keep: ["--keep-bytes", "1M"])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 5303, writeSize: 2048, slots: 8192, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"), count: 3200)
    r.others.append(writer)
    var most = 0
    var samples = 0
    while writer.isRunning {
      let p = try points(r)
      if let used = p.object["space_used"] as? Int {
        most = max(most, used)
        samples += 1
      }
      RRTEnv.sleep(0.1)
    }
    XCTAssertEqual(writer.wait(timeout: 10), 0, writer.errors)
    let (_, listed, object) = try points(r)
    let used = try XCTUnwrap(object["space_used"] as? Int)
    most = max(most, used)
    let records = listed.reduce(0) { $0 + $1.bytes } + (object["open_bytes"] as? Int ?? 0)
    print(
      "history --keep-bytes 1M: 200 points made, \(listed.count) kept (\(listed.first?.number ?? -1) to "
        + "\(listed.last?.number ?? -1)), records \(records) bytes, space used now \(used), at most \(most) "
        + "over \(samples) samples")
    XCTAssertEqual(listed.last?.number, 200)
    XCTAssertGreaterThan(listed.first?.number ?? 0, 100, "the oldest points were not trimmed: \(object)")
    XCTAssertEqual(listed.map(\.number), Array((listed.first?.number ?? 0)...200))
    XCTAssertLessThanOrEqual(records, 1 << 20, "the records kept exceed the bound: \(object)")
    XCTAssertGreaterThan(records, 1 << 19, "far fewer records kept than the bound allows: \(object)")
    XCTAssertLessThanOrEqual(most, (1 << 20) + (256 << 10), "the files took more than the bound and a segment")
    XCTAssertGreaterThan(samples, 5)
    let oldest = try XCTUnwrap(listed.first?.number)
    let middle = (oldest + 200) / 2
    let reads = try read(
      [("point", 3200), ("point;\(oldest)", oldest * 16), ("point;\(middle)", middle * 16)], socket: r.socket,
      load: load, baseline: baseline, dir: r.dir)
    XCTAssertEqual(reads.count, 3)
    XCTAssertTrue(reads.allSatisfy(\.equal), "\(reads)\nlog:\n\(r.log)")
    r.stop()
  }

  // MARK: c. Stops, crashes, torn tails, damage

  /// A clean stop and a start keep every point, reading the same; garbage
  /// after the last record is cut with a log line, all points kept; the
  /// last point's record cut short is cut, the points before it read
  /// right and the next flush makes the device that point again; a flipped
  /// byte in a before-image of point 1 makes point 1 fail with EIO (the log
  /// says why) while the later points read right.
  func testAStopKeepsEveryPointATornTailIsCutAndDamageIsRefused() throws {
    try require("nbdinfo", "nbdsh")
    try StampedLoad.require()
    let r = try historyRig(size: 8 << 20, seed: 54)
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 5404, writeSize: 2048, slots: 2048, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    let w = try load.write(uri: r.uri, log: wlog, count: 320)
    XCTAssertEqual(w.status, 0, w.summary)
    let listed = try points(r).points
    XCTAssertEqual(listed.map(\.number), Array(0...40))
    try assertPointsRead(r, listed, load: load, baseline: baseline, "before the stop")

    // A clean stop and a start.
    r.stop()
    try r.start()
    XCTAssertTrue(r.log.contains("41 point(s) recovered"), r.log)
    XCTAssertEqual(try points(r).points, listed, "the points after a restart")
    try assertPointsRead(r, listed, load: load, baseline: baseline, "after a restart")

    // Garbage after the last record.
    r.stop()
    let files = try historyFiles(r)
    XCTAssertEqual(files.count, 1, "\(files)")
    let last = try XCTUnwrap(files.last)
    let size = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: last)[.size] as? Int)
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: last))
    try h.seekToEnd()
    try h.write(contentsOf: Data((0..<100).map { UInt8(truncatingIfNeeded: $0 * 37 + 5) }))
    try h.close()
    try r.start()
    XCTAssertTrue(r.log.contains("a torn tail is cut at log position \(size)"), r.log)
    XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: last)[.size] as? Int, size)
    XCTAssertEqual(try points(r).points, listed, "the points after garbage was cut")
    try assertPointsRead(r, listed, load: load, baseline: baseline, "after garbage was cut")

    // The last record (point 40's) cut short.
    r.stop()
    XCTAssertEqual(truncate(last, off_t(size - 5)), 0)
    try r.start()
    XCTAssertTrue(r.log.contains("a torn tail is cut at log position \(size - 48)"), r.log)
    let kept = try points(r).points
    XCTAssertEqual(kept, Array(listed.prefix(40)), "the points after the last was cut")
    try assertPointsRead(r, kept, load: load, baseline: baseline, "after the last point was cut")
    let gone = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///point;40?socket=\(r.socket)"])
    XCTAssertNotEqual(gone.status, 0, gone.summary)
    // Its before-images are kept: a flush makes the device point 40 again.
    let flush = try r.nbdsh("h.connect_uri(URI)\nh.flush()\nh.shutdown()\nprint('OK')")
    XCTAssertEqual(flush.status, 0, flush.summary)
    let again = try points(r).points
    XCTAssertEqual(again.map(\.number), Array(0...40))
    try assertPointsRead(r, again, load: load, baseline: baseline, "after point 40 was made again")

    // A byte flipped in the first before-image block of segment 2 (what
    // point 1 reads in place of the blocks interval 2 overwrote).
    let bytes = try Data(contentsOf: URL(fileURLWithPath: last))
    let record = try XCTUnwrap(
      HistoryRecord.all(bytes).first { $0.type == 1 && !$0.zero && $0.segment == 2 }, "no before-image of segment 2")
    let at = record.offset + 48 + 4 * record.count + 1000
    let patch = try FileHandle(forUpdating: URL(fileURLWithPath: last))
    try patch.seek(toOffset: UInt64(at))
    try patch.write(contentsOf: Data([bytes[at] ^ 0x40]))
    try patch.close()
    let reads = try read(
      (0...40).map { ("point;\($0)", $0 * 8) }, socket: r.socket, load: load, baseline: baseline, dir: r.dir)
    XCTAssertEqual(reads.count, 41)
    XCTAssertNil(reads[1].firstDifference, "point 1 was read over a damaged before-image: \(reads[1])")
    XCTAssertTrue(
      reads[1].error?.contains("nbd_pread: read: command failed: Input/output error") == true, "\(reads[1])")
    XCTAssertTrue(
      reads[0].equal || reads[0].error?.contains("nbd_pread: read: command failed: Input/output error") == true,
      "point 0 read wrong bytes: \(reads[0])")
    XCTAssertTrue(reads[2...].allSatisfy(\.equal), "\(reads[2...].filter { !$0.equal })")
    XCTAssertTrue(r.log.contains("a before-image block of point 1 does not match its CRC"), r.log)
    r.stop()
  }

  /// kill -9 under a stamped load: after a start, every point listed (at
  /// least one per acknowledged flush, at most one more) reads as the state
  /// after its flush, and a flush makes the device as the start found it
  /// the newest point.
  func testAfterAKillEveryPointListedReadsAsItWas() throws {
    try require("nbdinfo", "nbdsh", "nbdcopy")
    try StampedLoad.require()
    let r = try historyRig(size: 8 << 20, seed: 55)
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 5505, writeSize: 2048, slots: 2048, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"))
    r.others.append(writer)
    let end = RRTEnv.monotonic() + 60
    while StampedLoad.Log(path: wlog).flushed.count < 30 && writer.isRunning && RRTEnv.monotonic() < end {
      RRTEnv.sleep(0.02)
    }
    RRTEnv.sleep(0.037)
    r.kill9()
    XCTAssertEqual(writer.wait(timeout: 30), 3, writer.errors)
    let l = StampedLoad.Log(path: wlog)
    XCTAssertGreaterThanOrEqual(l.flushed.count, 30)

    try r.start()
    XCTAssertTrue(r.log.contains("point(s) recovered"), r.log)
    let listed = try points(r).points
    let newest = try XCTUnwrap(listed.last?.number)
    XCTAssertEqual(listed.map(\.number), Array(0...newest))
    XCTAssertGreaterThanOrEqual(newest, l.flushed.count, "an acknowledged flush's point was lost")
    XCTAssertLessThanOrEqual(newest, l.flushed.count + 1)
    try assertPointsRead(r, listed, load: load, baseline: baseline, "after the kill")

    // The device as the start found it, made a point by the next flush
    // (or already the newest, when the kill fell just after one).
    let device = try r.deviceData()
    let flush = try r.nbdsh("h.connect_uri(URI)\nh.flush()\nh.shutdown()\nprint('OK')")
    XCTAssertEqual(flush.status, 0, flush.summary)
    let after = try points(r).points
    XCTAssertEqual(Array(after.prefix(listed.count)), listed)
    XCTAssertTrue([newest, newest + 1].contains(after.last?.number ?? -1), "\(after.suffix(3))")
    let out = r.s.path("newest.img")
    let copy = try r.run("/usr/bin/nbdcopy", ["nbd+unix:///point?socket=\(r.socket)", out])
    XCTAssertEqual(copy.status, 0, copy.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), device, "the newest point vs the device")
    print(
      "history after kill -9: \(l.flushed.count) flushes acknowledged, \(newest) points recovered, "
        + "\(after.count - listed.count) made by the next flush")
    r.stop()
  }

  // MARK: d. A far copy's history

  /// Every point of the history of the server on `socket` read to a file
  /// and checked by stamped.py (--mode consistent), in one process: each
  /// must be a consistency point of the load, the highest interval present
  /// never going down, the newest holding all `writes`. Returns the highest
  /// interval of each point.
  @discardableResult
  func assertEveryPointConsistent(
    socket: String, load: StampedLoad, writes: Int, baseline: String, dir: String, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> [Int] {
    let p = try RRTCommand.run("tracking-server", ["points", "--socket", socket, "--json"], timeout: 60)
    XCTAssertEqual(p.status, 0, p.summary)
    let list = try XCTUnwrap(try TrackRig.json(p.stdout)["points"] as? [[String: Any]])
    let numbers = list.compactMap { $0["number"] as? Int }
    XCTAssertEqual(numbers.first, 0)
    XCTAssertGreaterThan(numbers.count, 3, "the far copy made few points: \(p.stdout)")

    // Each point read to a file and checked by stamped.py, in one process.
    let code = """
      import sys, json, io, argparse, contextlib
      import nbd
      scripts, sock, baseline, out, seed, w, slots, f = sys.argv[1:9]
      numbers = [int(x) for x in sys.argv[9].split(",")]
      sys.path.insert(0, scripts)
      import stamped
      results = []
      for n in numbers:
          h = nbd.NBD()
          h.connect_uri("nbd+unix:///point;%d?socket=%s" % (n, sock))
          size = h.get_size()
          with open(out, "wb") as fh:
              off = 0
              while off < size:
                  k = min(4 << 20, size - off)
                  fh.write(h.pread(k, off))
                  off += k
          h.shutdown()
          a = argparse.Namespace(image=out, baseline=baseline, seed=int(seed), write_size=int(w), slots=int(slots),
              flush_every=int(f), mode="consistent", acked=None, max_index=int(sys.argv[10]))
          text = io.StringIO()
          with contextlib.redirect_stdout(text):
              status = stamped.cmd_check(a)
          lines = text.getvalue().splitlines()
          results.append({"point": n, "status": status, "summary": lines[-1] if lines else "", "lines": lines[:3]})
      print(json.dumps(results))
      """
    let res = try RRTCommand.run(
      StampedLoad.python,
      [
        "-c", code, Self.scripts, socket, baseline, dir + "/far-point-\(UUID().uuidString).img", "\(load.seed)",
        "\(load.writeSize)",
        "\(load.slots)", "\(load.flushEvery)", numbers.map(String.init).joined(separator: ","), "\(writes)",
      ], timeout: 600)
    XCTAssertEqual(res.status, 0, res.summary)
    let results = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(res.stdout.utf8)) as? [[String: Any]])
    XCTAssertEqual(results.count, numbers.count)
    let failed = results.filter { ($0["status"] as? Int) != 0 }
    XCTAssertEqual(
      failed.count, 0, "points that are no consistency point: \(failed.prefix(3))", file: file, line: line)
    // The highest interval present never goes down, and the newest is the last.
    let highest = results.map { r -> Int in
      let s = r["summary"] as? String ?? ""
      guard let at = s.range(of: "interval ") else { return -1 }
      return Int(s[at.upperBound...].prefix { $0.isNumber }) ?? -1
    }
    XCTAssertEqual(highest, highest.sorted(), "\(highest)", file: file, line: line)
    XCTAssertEqual(
      highest.last, writes / load.flushEvery - 1, "the newest point lacks the last interval: \(results.last ?? [:])",
      file: file, line: line)
    return highest
  }

  /// restore-read-through --ack local mirrors a stamped load to a far copy
  /// served by tracking-server --history, which flushes after each interval
  /// it receives: once the far copy has caught up, every point of its
  /// history is a consistency point of the load, the points reach further
  /// as they go, and the newest holds every write.
  func testEveryPointOfAFarCopysHistoryIsAConsistencyPoint() throws {
    try require("nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let r = try RRTRig(size: 16 << 20, seed: 56)
    rigs.append(r)
    let baseline = try r.s.file("baseline.img", r.original)
    let far = try RRTChild(
      name: "far tracking-server", executable: Tools.path("tracking-server"),
      arguments: [
        "serve", "--history", r.s.path("far-history"), "--keep-time", "1h", "--changes", r.s.path("far.map"),
        "--socket", r.backupSocket, r.backupPath,
      ], stdout: r.s.path("far.out"), stderr: r.s.path("far.log"))
    r.backupServer = far
    try r.waitForNBD(r.backupURI, process: far, what: "the far tracking-server")
    try r.startServer(["--ack", "local", "--progress-interval", "0.2"])
    let load = StampedLoad(seed: 5606, writeSize: 2048, slots: 8192, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    let w = try load.write(uri: r.uri, log: wlog, queueDepth: 4, count: 640)
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertTrue(r.waitForDrain(after: r.logMark), "the far copy never caught up; log:\n\(r.log)")

    let highest = try assertEveryPointConsistent(
      socket: r.backupSocket, load: load, writes: 640, baseline: baseline, dir: r.dir)
    print("far copy's history: \(highest.count) points, every one a consistency point; highest intervals \(highest)")
    r.stopServer()
  }

  // MARK: Files past 256 MiB

  /// Writes the whole device `count` times through the export, pass p
  /// being random bytes seeded with p in 4 MiB writes, a FLUSH after each
  /// pass; prints one line a pass: `flushed P` or why its flush failed.
  func writePasses(_ r: TrackRig, first: Int, count: Int) throws -> RRTCommand.Result {
    let code = """
      import sys, random, nbd
      uri, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
      h = nbd.NBD()
      h.connect_uri(uri)
      size = h.get_size()
      for p in range(first, first + count):
          data = random.Random(p).randbytes(size)
          for off in range(0, size, 4 << 20):
              h.pwrite(data[off:off + (4 << 20)], off)
          try:
              h.flush()
              print("flushed %d" % p, flush=True)
          except nbd.Error as e:
              print("flush %d failed: %s" % (p, " ".join(str(e).split())), flush=True)
      h.shutdown()
      """
    return try RRTCommand.run(StampedLoad.python, ["-c", code, r.uri, "\(first)", "\(count)"], timeout: 600)
  }

  /// Reads each point named and says, one line each, whether it holds the
  /// device after pass `pass` (0: the device as created).
  func assertPasses(
    _ r: TrackRig, _ points: [(point: Int, pass: Int)], baseline: String, _ what: String,
    file: StaticString = #filePath,
    line: UInt = #line
  ) throws {
    let code = """
      import sys, random, nbd
      sock, baseline = sys.argv[1], sys.argv[2]
      for item in sys.argv[3:]:
          n, p = [int(x) for x in item.split(":")]
          h = nbd.NBD()
          try:
              h.connect_uri("nbd+unix:///point;%d?socket=%s" % (n, sock))
              size = h.get_size()
              want = open(baseline, "rb").read() if p == 0 else random.Random(p).randbytes(size)
              same = all(h.pread(min(4 << 20, size - o), o) == want[o:o + (4 << 20)] for o in range(0, size, 4 << 20))
              print("point %d %s" % (n, "right" if same else "WRONG"))
              h.shutdown()
          except nbd.Error as e:
              print("point %d refused: %s" % (n, " ".join(str(e).split())))
      """
    let res = try RRTCommand.run(
      StampedLoad.python, ["-c", code, r.socket, baseline] + points.map { "\($0.point):\($0.pass)" }, timeout: 600)
    XCTAssertEqual(res.status, 0, res.summary, file: file, line: line)
    XCTAssertEqual(
      res.lines, points.map { "point \($0.point) right" }, "\(what)\nlog:\n\(r.allLogs)", file: file, line: line)
  }

  /// Five passes over a 64 MiB device: 320 MiB of before-images, so the log
  /// goes on in a second file (begun inside segment 4). Every point reads
  /// right, and again after a stop and a start; a start with --keep-bytes
  /// 100M trims points 0 to 3, which removes the first file and updates the
  /// second's header, and the points kept read right, also after one more
  /// start, which reads the history from a file that is not at position 0.
  func testTheLogGoesOnInASecondFileAndATrimRemovesTheFirst() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    let r = try historyRig(size: 64 << 20, seed: 59)
    let baseline = try r.s.file("baseline.img", r.original)
    let started = RRTEnv.monotonic()
    let w = try writePasses(r, first: 1, count: 5)
    let took = RRTEnv.monotonic() - started
    XCTAssertEqual(w.lines, (1...5).map { "flushed \($0)" }, w.summary)
    let files = try historyFiles(r)
    XCTAssertEqual(files.count, 2, "\(files)")
    let listed = try points(r).points
    XCTAssertEqual(listed.map(\.number), Array(0...5))
    let all = (0...5).map { (point: $0, pass: $0) }
    try assertPasses(r, all, baseline: baseline, "two files")
    print(
      "history: 320 MiB written in \(String(format: "%.1f", took)) s; files \(files.map { ($0 as NSString).lastPathComponent })"
    )

    r.stop()
    try r.start()
    XCTAssertEqual(try points(r).points, listed)
    try assertPasses(r, all, baseline: baseline, "two files, after a restart")

    r.stop()
    // Kept aside, to put back as a crash inside the trim would leave it.
    let firstCopy = r.s.path("first-file.kept")
    try FileManager.default.copyItem(atPath: try XCTUnwrap(files.first), toPath: firstCopy)
    defer { unlink(firstCopy) }
    try r.start(["--history", historyPath(r), "--keep-bytes", "100M"])
    let kept = try points(r).points
    XCTAssertEqual(kept.map(\.number), [4, 5], "log:\n\(r.log)")
    XCTAssertEqual(kept.first?.instant, listed[4].instant)
    let remaining = try historyFiles(r)
    XCTAssertEqual(
      remaining.map { ($0 as NSString).lastPathComponent }, files.dropFirst().map { ($0 as NSString).lastPathComponent }
    )
    try assertPasses(r, [(4, 4), (5, 5)], baseline: baseline, "after the first file was trimmed")
    let gone = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///point;3?socket=\(r.socket)"])
    XCTAssertNotEqual(gone.status, 0, gone.summary)

    r.stop()
    try r.start()
    XCTAssertEqual(try points(r).points, kept, "log:\n\(r.log)")
    try assertPasses(r, [(4, 4), (5, 5)], baseline: baseline, "from the second file alone, after a restart")

    // A crash inside that trim, after the second file's header said where
    // its records start and its bytes before were punched, but before the
    // first file was removed: the first file is back as the trim left it.
    r.stop()
    let firstFile = try XCTUnwrap(files.first)
    XCTAssertEqual(rename(firstCopy, firstFile), 0)
    try r.start()
    XCTAssertTrue(r.log.contains("1 file(s) that a trim cut short left behind are removed"), r.log)
    XCTAssertFalse(FileManager.default.fileExists(atPath: firstFile))
    XCTAssertEqual(
      try points(r).points.suffix(2), ArraySlice(kept), "after a trim cut short by a crash; log:\n\(r.log)")
    try assertPasses(
      r, try points(r).points.map { ($0.number, $0.number) }, baseline: baseline, "after a trim cut short by a crash")
    // And it goes on: pass 6 is point 6, and point 4 goes (segments 5 and 6
    // take 128 MiB).
    XCTAssertEqual(try writePasses(r, first: 6, count: 1).lines, ["flushed 6"])
    XCTAssertEqual(try points(r).points.map(\.number), [5, 6])
    try assertPasses(r, [(5, 5), (6, 6)], baseline: baseline, "after one more pass")
    r.stop()
  }

  /// A crash as the log goes on into a new file: a record was reserved at
  /// the end of the old file, the new file begun (durable, with a record
  /// of its own), but the reserved record never reached the old file. No
  /// write waited on either (the durable prefix stops at the record not
  /// written), so the start cuts the tail there and removes the new file:
  /// every point reads right, and the history goes on. (It refused the
  /// history as damaged, so the server could not start with it.)
  func testACrashAsTheLogGoesOnInANewFileIsATornTail() throws {
    try require("nbdinfo")
    try StampedLoad.require()
    let r = try historyRig(size: 4 << 20, seed: 64)
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 6406, writeSize: 2048, slots: 2048, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    XCTAssertEqual(try load.write(uri: r.uri, log: wlog, count: 80).status, 0)
    let listed = try points(r).points
    XCTAssertEqual(listed.map(\.number), Array(0...10))
    r.stop()

    // The new file as the crash left it: its header at the log position
    // after the reserved before-image of one block, then a before-image of
    // the open segment (11) of its own.
    let first = try XCTUnwrap(try historyFiles(r).first)
    let bytes = try Data(contentsOf: URL(fileURLWithPath: first))
    let header = try HistoryFormat.FileHeader.decode(file: [UInt8](bytes.prefix(4096))[...]).get()
    let end = UInt64(bytes.count)
    let position = end + 48 + 4100
    let newer = HistoryFormat.FileHeader(
      updates: 1, historyID: header.historyID, deviceSize: header.deviceSize, blockSize: 4096, continues: true,
      position: position, openSegment: 11, previousPoint: 10, previousInstant: listed[10].ns, live: position + 4096)
    var record = [UInt8](repeating: 0, count: 48)
    record.withUnsafeMutableBytes {
      HistoryFormat.Record.before(segment: 11, first: 7, count: 2, zero: true).encodeHeader(into: $0.baseAddress!)
    }
    let newFile = historyPath(r) + "/" + HistoryFormat.fileName(position)
    try Data(newer.encoded() + newer.encoded() + record).write(to: URL(fileURLWithPath: newFile))

    try r.start()
    XCTAssertTrue(r.log.contains("1 file(s) begun after the torn tail are removed"), r.log)
    XCTAssertTrue(
      r.log.contains("a torn tail is cut at log position \(end) (the file ends before the next one begins)"), r.log)
    XCTAssertFalse(FileManager.default.fileExists(atPath: newFile))
    XCTAssertEqual(try points(r).points, listed)
    try assertPointsRead(r, listed, load: load, baseline: baseline, "after the torn roll")
    XCTAssertEqual(try load.write(uri: r.uri, log: wlog, count: 16, start: 80).status, 0)
    let more = try points(r).points
    XCTAssertEqual(more.map(\.number), Array(0...12))
    try assertPointsRead(r, more, load: load, baseline: baseline, "going on after the torn roll")
    r.stop()
  }

  /// A history that cannot go on (its directory made immutable, so the
  /// second file cannot be made) is lost: its points are refused, status
  /// says why, and the device goes on: its writes and FLUSHes succeed.
  func testALostHistoryLeavesTheDeviceGoingOn() throws {
    try require("nbdinfo", "chattr")
    let r = try historyRig(size: 64 << 20, seed: 60)
    let dir = historyPath(r)
    let lock = try r.run("/usr/bin/chattr", ["+i", dir])
    guard lock.status == 0 else { throw XCTSkip("chattr +i is refused here: \(lock.stderr)") }
    defer { _ = try? RRTCommand.run("/usr/bin/chattr", ["-i", dir]) }
    let w = try writePasses(r, first: 1, count: 5)
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertEqual(w.lines, (1...5).map { "flushed \($0)" }, "the device did not go on:\n\(w.summary)\nlog:\n\(r.log)")
    XCTAssertTrue(r.log.contains("history \(dir) is lost: "), r.log)
    let p = try r.control("points", ["--json"])
    XCTAssertEqual(p.status, 0, p.summary)
    let o = try TrackRig.json(p.stdout)
    XCTAssertNotNil(o["lost"] as? String, "\(o)")
    XCTAssertEqual((o["points"] as? [Any])?.count, 0, "\(o)")
    let refused = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///point;1?socket=\(r.socket)"])
    XCTAssertNotEqual(refused.status, 0, refused.summary)
    // The device holds the last pass.
    let device = try r.deviceData()
    let want = try RRTCommand.run(
      StampedLoad.python, ["-c", "import random, sys; sys.stdout.buffer.write(random.Random(5).randbytes(64 << 20))"])
    XCTAssertTrue(device == want.data, "the device does not hold the last pass")
    _ = try r.run("/usr/bin/chattr", ["-i", dir])
    r.stop()
  }

  /// The same through a relay: restore-read-through --ack local ships to a
  /// tracking-server --ack local (the relay), which ships to the far copy,
  /// a tracking-server with --history. Once both have caught up, every
  /// point of the far copy's history is a consistency point.
  func testEveryPointOfAFarCopysHistoryBehindARelayIsAConsistencyPoint() throws {
    try require("nbdinfo", "nbdcopy")
    try StampedLoad.require()
    let far = try historyRig(size: 16 << 20, seed: 63)
    let relay = try TrackRig(size: 16 << 20, seed: 63)
    rigs.append(relay)
    XCTAssertEqual(relay.original, far.original)
    try relay.start(["--ack", "local", "--backup", far.uri])
    let primary = try ChainPrimary(dir: relay.s.path(""), image: relay.original)
    rigs.append(primary)
    try primary.start(backups: [relay.uri], options: ["--ack", "local", "--progress-interval", "0.2"])
    let baseline = try far.s.file("baseline.img", far.original)
    let load = StampedLoad(seed: 6306, writeSize: 2048, slots: 8192, flushEvery: 16)
    let w = try load.write(uri: primary.uri, log: far.s.path("writer.log"), queueDepth: 4, count: 640)
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertTrue(primary.waitUntilDrained(after: 0, seconds: 60), "the relay never caught up:\n\(primary.log)")
    XCTAssertTrue(try relay.waitUntilDrained(seconds: 60))
    let highest = try assertEveryPointConsistent(
      socket: far.socket, load: load, writes: 640, baseline: baseline, dir: far.dir)
    print("far copy behind a relay: \(highest.count) points, every one a consistency point")
    primary.stop()
    relay.stop()
    far.stop()
  }

  // MARK: e. Bad input

  /// Each refused in one sentence with a non-zero exit, the device and the
  /// history untouched: --history without a bound, a bound without
  /// --history, a directory holding a foreign file, a history of a device
  /// of another size, a second server on a history; `points` of a server
  /// without one, `points --at` of no instant or of one a nanosecond count
  /// cannot hold, and export names the same (the server stays up).
  func testBadInputIsRefusedInOneSentence() throws {
    try require("nbdinfo")
    let r = try TrackRig(size: 4 << 20, seed: 57)
    rigs.append(r)
    let history = historyPath(r)
    func serve(_ extra: [String], device: String? = nil, socket: String? = nil) throws -> RRTCommand.Result {
      try r.run(
        "tracking-server",
        ["serve"] + extra + [
          "--changes", r.s.path("bad-\(UUID().uuidString).map"), "--socket", socket ?? r.s.path("bad.sock"),
          device ?? r.devicePath,
        ], timeout: 30)
    }
    func assertOneSentence(_ res: RRTCommand.Result, _ fragment: String, line: UInt = #line) {
      XCTAssertNotEqual(res.status, 0, res.summary, line: line)
      XCTAssertTrue(res.stderr.contains(fragment), "\(res.stderr.debugDescription) lacks \(fragment)", line: line)
      // serve creates the change map (saying so) before it opens the history.
      let lines = res.stderr.split(separator: "\n").filter {
        !$0.hasPrefix("Usage:") && !$0.contains("--help") && !$0.contains("created the change map")
      }
      XCTAssertEqual(lines.count, 1, res.stderr, line: line)
    }

    assertOneSentence(try serve(["--history", history]), "--history needs a bound on what it keeps")
    XCTAssertFalse(FileManager.default.fileExists(atPath: history))
    assertOneSentence(try serve(["--keep-bytes", "1G"]), "--keep-time and --keep-bytes bound a history")
    assertOneSentence(try serve(["--keep-time", "1h"]), "--keep-time and --keep-bytes bound a history")
    assertOneSentence(try serve(["--history", history, "--keep-bytes", "100K"]), "is too small")
    XCTAssertFalse(FileManager.default.fileExists(atPath: history))

    // A directory holding something else.
    let foreign = r.s.path("foreign")
    try FileManager.default.createDirectory(atPath: foreign, withIntermediateDirectories: true)
    try r.s.file("foreign/notes.txt", Data("mine".utf8))
    assertOneSentence(
      try serve(["--history", foreign, "--keep-time", "1h"]), "holds notes.txt, which is not a history file")
    XCTAssertEqual(historyListing(foreign), ["notes.txt 4"], "the refused directory was changed")

    // A history made for this device, then another device of another size.
    try r.start(["--history", history, "--keep-time", "1h"])
    let w = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(1, 8192), 4096)\nh.flush()\nh.shutdown()")
    XCTAssertEqual(w.status, 0, w.summary)
    // A second server on the same history, while the first runs.
    let copy = try r.s.file("copy.img", r.original)
    let beforeSecond = historyListing(history)
    assertOneSentence(
      try serve(["--history", history, "--keep-time", "1h"], device: copy),
      "another server keeps this history (its lock is held)")
    XCTAssertEqual(historyListing(history), beforeSecond)
    XCTAssertEqual(try points(r).points.map(\.number), [0, 1])

    // Points asked badly.
    let garbage = try r.control("points", ["--at", "garbage"])
    assertOneSentence(garbage, "--at 'garbage' is not an instant such as 2026-12-07T01:30:00Z")
    let far = try r.control("points", ["--at", "9999-12-31T23:59:59Z"])
    assertOneSentence(far, "is not an instant such as")
    let early = try r.control("points", ["--at", "2001-01-01T00:00:00Z"])
    assertOneSentence(early, "is before the oldest point kept, 0 at")
    for name in ["point;at=9999-12-31T23:59:59Z", "point;at=garbage", "point;99", "point;x", "point;-1"] {
      let res = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///\(name)?socket=\(r.socket)"], timeout: 20)
      XCTAssertNotEqual(res.status, 0, "\(name): \(res.summary)")
    }
    XCTAssertTrue(r.server?.isRunning == true, "the server ended on an export name; log:\n\(r.log)")
    XCTAssertEqual(try points(r).points.map(\.number), [0, 1])
    r.stop()

    let listing = historyListing(history)
    let device = try r.deviceData()
    let other = try r.s.randomFile("other.img", size: 3 << 20, seed: 58)
    assertOneSentence(
      try serve(["--history", history, "--keep-time", "1h"], device: other),
      "is the history of a device of \(4 << 20) bytes; this device has \(3 << 20)")
    XCTAssertEqual(historyListing(history), listing)
    XCTAssertEqual(try r.deviceData(), device)

    // A server without a history has no points.
    try r.start([])
    let none = try r.control("points")
    assertOneSentence(none, "the server keeps no history; start it with --history DIR")
    let noExport = try r.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///point?socket=\(r.socket)"], timeout: 20)
    XCTAssertNotEqual(noExport.status, 0, noExport.summary)
    r.stop()
  }
}

/// A record of a history file as found in its bytes (dualrestore-history(5)).
struct HistoryRecord {
  var offset: Int
  var type: UInt8
  var zero: Bool
  var segment: UInt64
  var count: Int

  /// The records from offset 4096 on, up to the first bytes that are not one.
  static func all(_ d: Data) -> [HistoryRecord] {
    func le(_ at: Int, _ width: Int) -> UInt64 {
      var v: UInt64 = 0
      for i in 0..<width { v |= UInt64(d[d.startIndex + at + i]) << (8 * UInt64(i)) }
      return v
    }
    var out: [HistoryRecord] = []
    var p = 4096
    while p + 48 <= d.count, le(p, 4) == 0x4850_5244 {
      let type = d[d.startIndex + p + 4]
      let zero = d[d.startIndex + p + 5] & 1 != 0
      let count = Int(le(p + 24, 4))
      out.append(HistoryRecord(offset: p, type: type, zero: zero, segment: le(p + 8, 8), count: count))
      p += 48 + (type == 1 && !zero ? count * 4100 : 0)
    }
    return out
  }
}
