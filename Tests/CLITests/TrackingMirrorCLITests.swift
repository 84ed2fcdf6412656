// tracking-server keeping far copies asynchronously (--backup URI with
// --ack local or quorum=K), end to end with real peers: far copies served by
// nbdkit behind its delay filter (TrackingMirrorHarness.swift), the stamped
// writer and its checker (Tests/Scripts/stamped.py, StampedLoad.swift), and
// a chain primary (restore-read-through --ack local) → relay
// (tracking-server --ack local) → far copy.
//
// What is checked is what the tool promises: a write and a FLUSH wait for
// the journal and the device, never for the far link; a far copy read at any
// moment is at a consistency point (every write acknowledged before some
// FLUSH k, any subset of the writes between FLUSH k and k+1, nothing later),
// through kills of the server, of the relay and of the far server; a copy
// that does not answer holds no other back, and resumes from its own
// position; a quorum FLUSH waits for its copies; what status reports of
// each copy is what it owes; and once nothing is owed every copy equals the
// device byte for byte. With DUALRESTORE_LONG=1 the chain test kills the
// relay and the far server over 200 times.

import Foundation
import Glibc
import TestSupport
import XCTest

final class TrackingMirrorCLITests: CLITestCase {
  static let long = ProcessInfo.processInfo.environment["DUALRESTORE_LONG"] == "1"
  /// How long a load's backlog may take to drain (the long mode's is large).
  static let drainSeconds: Double = long ? 900 : 60

  /// A 16 MiB device, far copies of the same bytes behind `delays` (one
  /// each), started, and tracking-server keeping them with `--ack ack`.
  func mirrored(
    seed: UInt64, delays: [String], ack: String = "local", extra: [String] = []
  ) throws -> (TrackRig, [FarCopy]) {
    try require("nbdkit", "nbdinfo", "nbdsh")
    try StampedLoad.require()
    let r = try TrackRig(size: 16 << 20, seed: seed)
    var copies: [FarCopy] = []
    for (i, delay) in delays.enumerated() {
      let f = try FarCopy(dir: r.dir, name: "far\(i)", image: r.original, delay: delay)
      // Far copies are stopped before the server at the end, so that its
      // stop never waits on a stopped one.
      rigs.append(f)
      try f.start()
      copies.append(f)
    }
    rigs.append(r)
    try r.start(TrackRig.mirroring(copies, ack: ack, extra: extra))
    return (r, copies)
  }

  /// Stamps over the first 8 MiB of the device (2048 slots of 4 KiB, partial
  /// blocks of 64 KiB); the second half is left to other writes.
  func stamps(seed: UInt64, flushEvery: Int) -> StampedLoad {
    StampedLoad(seed: seed, writeSize: 4096, slots: 2048, flushEvery: flushEvery)
  }

  /// Waits until the writer's log has `count` flushes (or it ended).
  func waitForFlushes(_ log: String, _ count: Int, writer: RRTChild, seconds: Double = 60) {
    let end = RRTEnv.monotonic() + seconds
    while StampedLoad.Log(path: log).flushed.count < count && writer.isRunning && RRTEnv.monotonic() < end {
      RRTEnv.sleep(0.02)
    }
    XCTAssertGreaterThanOrEqual(
      StampedLoad.Log(path: log).flushed.count, count, "the writer: \(writer.errors)\n\(writer.output)")
  }

  // MARK: 1. Acknowledged locally, shipped behind

  /// A far copy 200 ms away: twenty QD1 write+FLUSH pairs take less than
  /// half of the 4 s the link would need for them, and the copy then owes
  /// exactly the intervals it has not had time to receive; a stamped load
  /// drains (owed 0) and the copy equals the device after a clean stop.
  /// While the far server is stopped, status says what it owes, with an age
  /// that grows, and a position that does not move.
  func testWritesAndFlushesDoNotWaitForTheFarLinkAndTheCopyDrainsToTheDevice() throws {
    let (r, copies) = try mirrored(seed: 11, delays: ["200ms"], extra: ["--backup-connections", "16"])
    let far = copies[0]
    let baseline = try r.s.file("baseline.img", r.original)

    let started = RRTEnv.monotonic()
    let q = try r.nbdsh(
      """
      h.connect_uri(URI)
      t = time.monotonic()
      for i in range(20):
          h.pwrite(pattern(i + 1, B), SIZE // 2 + i * B)
          h.flush()
      print(json.dumps({'seconds': time.monotonic() - t}))
      h.shutdown()
      """)
    XCTAssertEqual(q.status, 0, q.summary)
    let lag = try r.copyLags()
    let elapsed = RRTEnv.monotonic() - started
    let seconds = try XCTUnwrap(TrackRig.json(q.lines.last ?? "")["seconds"] as? Double, q.summary)
    print("20 QD1 write+FLUSH pairs with the far copy 200 ms away: \(seconds) s")
    XCTAssertLessThan(seconds, 2.0, "the writes waited for the far link (20 × 200 ms = 4 s)")
    XCTAssertEqual(lag.count, 1, "\(lag)")
    XCTAssertEqual(lag.first?.name, far.uri)
    let first = try XCTUnwrap(lag.first)
    // Each interval costs the link 200 ms at least.
    XCTAssertEqual(first.interval + first.owedIntervals, 20, "\(first)")
    XCTAssertLessThanOrEqual(Double(first.interval), elapsed / 0.2 + 1, "\(first) after \(elapsed) s")
    if elapsed < 3 {
      XCTAssertGreaterThan(first.owedIntervals, 0, "the far copy kept up with a 200 ms link: \(first)")
      XCTAssertGreaterThanOrEqual(first.owedBytes, first.owedIntervals * r.blockSize, "\(first)")
      XCTAssertGreaterThan(first.oldestSeconds, 0, "\(first)")
    }

    // A stamped load, drained.
    let load = stamps(seed: 1101, flushEvery: 32)
    let wlog = r.s.path("writer.log")
    let w = try load.write(uri: r.uri, log: wlog, queueDepth: 4, count: 192)
    XCTAssertEqual(w.status, 0, w.summary)
    XCTAssertEqual(StampedLoad.Log(path: wlog).lastFlushed, 192)
    try r.waitUntilDrained(seconds: 60)
    let drained = try XCTUnwrap(try r.copyLags().first)
    XCTAssertEqual(drained.oldestSeconds, 0, "\(drained)")
    // One interval a FLUSH at least (one open for a second is closed too).
    XCTAssertGreaterThanOrEqual(drained.interval, 20 + 192 / 32, "\(drained)")

    // The far server stopped: writes, zeros and trims go on (the device's
    // original bytes there zeroed), status says what it owes.
    XCTAssertTrue(far.freeze())
    let s = try r.nbdsh(
      """
      h.connect_uri(URI)
      for i in range(4):
          h.pwrite(pattern(100 + i, B), SIZE // 2 + (40 + i) * B)
      h.zero(2 * B, SIZE // 2 + 50 * B)
      h.trim(B, SIZE // 2 + 60 * B)
      h.flush()
      h.shutdown()
      print("OK")
      """, timeout: 30)
    XCTAssertEqual(s.status, 0, s.summary)
    let owed = try XCTUnwrap(try r.copyLags().first)
    XCTAssertEqual(owed.name, far.uri)
    XCTAssertEqual(owed.interval, drained.interval, "a stopped copy's position moved: \(owed)")
    XCTAssertGreaterThanOrEqual(owed.owedIntervals, 1, "\(owed)")
    XCTAssertEqual(owed.owedBytes, 7 * r.blockSize, "four blocks written, two zeroed, one trimmed: \(owed)")
    RRTEnv.sleep(1)
    let older = try XCTUnwrap(try r.copyLags().first)
    XCTAssertGreaterThanOrEqual(older.oldestSeconds, owed.oldestSeconds + 0.9, "the age of what it lacks: \(older)")
    XCTAssertEqual(older.owedIntervals, owed.owedIntervals)
    XCTAssertEqual(older.owedBytes, owed.owedBytes)
    XCTAssertEqual(older.interval, owed.interval)
    let text = try r.control("status")
    XCTAssertTrue(
      text.stdout.contains(
        "far copy \(far.uri) holds interval \(owed.interval), lacks \(owed.owedIntervals) (\(owed.owedBytes) bytes)"),
      text.summary)
    far.thaw()
    try r.waitUntilDrained()
    XCTAssertEqual(try r.copyLags().first?.interval, owed.interval + owed.owedIntervals)

    r.stop()
    far.stop()
    let device = try r.deviceData()
    let zeroed = (r.size / 2 + 50 * r.blockSize)..<(r.size / 2 + 52 * r.blockSize)
    XCTAssertTrue(RRTBytes.isZero(device[zeroed]), "WRITE_ZEROES on the device")
    XCTAssertFalse(RRTBytes.isZero(r.original[zeroed]), "the original bytes there are not zeros")
    RRTBytes.assertEqual(try far.data(), device, "the far copy against the device")
    let acked = try load.check(image: far.path, baseline: baseline, mode: .acked(192), maxIndex: 192)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
  }

  // MARK: 2. kill -9, the far copy down during the restart

  /// The server killed under a stamped writer, the far server down while
  /// it starts again: the device holds every flushed write, the restart says
  /// it found an unclean shutdown, writes are acknowledged while the copy is
  /// down, and once the far server is back the copy catches up and equals
  /// the device — the writes that were in flight at the kill too, which only
  /// the activity log's regions, journaled again from the device, bring (the
  /// writer does not write their slots again).
  func testKillNineWithTheFarCopyDownDuringTheRestartCatchesUp() throws {
    let (r, copies) = try mirrored(seed: 12, delays: ["10ms"])
    let far = copies[0]
    let baseline = try r.s.file("baseline.img", r.original)
    let load = stamps(seed: 2101, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"))
    r.others.append(writer)
    waitForFlushes(wlog, 12, writer: writer)
    XCTAssertTrue(writer.isRunning, "the writer ended early: \(writer.errors)")
    r.kill9()
    XCTAssertEqual(writer.wait(timeout: 30), 3, "writer: \(writer.errors)")
    far.kill9()

    let l = StampedLoad.Log(path: wlog)
    let stopped = try XCTUnwrap(l.stopped, "no stopped line in the writer's log")
    let acked = try load.check(
      image: r.devicePath, baseline: baseline, mode: .acked(l.lastFlushed), maxIndex: stopped.issued)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    let atKill = try r.deviceData()

    try r.start()
    XCTAssertTrue(r.log.contains("unclean shutdown detected"), r.log)
    // Acknowledged with the far copy down (in the half the stamps leave).
    let more = try r.nbdsh(
      """
      h.connect_uri(URI)
      for i in range(8):
          h.pwrite(pattern(200 + i, B), SIZE // 2 + i * 2 * B)
          h.flush()
      h.shutdown()
      print("OK")
      """, timeout: 30)
    XCTAssertEqual(more.status, 0, more.summary)
    let down = try XCTUnwrap(try r.copyLags().first)
    XCTAssertGreaterThanOrEqual(down.owedIntervals, 8, "\(down)")

    RRTEnv.sleep(3)
    try far.start()
    XCTAssertTrue(r.waitForLog("far copy \(far.uri) is back"), r.log)
    try r.waitUntilDrained()
    r.stop()
    far.stop()
    XCTAssertTrue(r.allLogs.contains("cannot connect"), "the copy was not tried while down: \(r.allLogs)")
    let device = try r.deviceData()
    RRTBytes.assertEqual(device.prefix(r.size / 2), atKill.prefix(r.size / 2), "the stamps' half after the restart")
    RRTBytes.assertEqual(try far.data(), device, "the far copy against the device")
    let consistent = try load.check(image: far.path, baseline: baseline, mode: .consistent, maxIndex: stopped.issued)
    XCTAssertEqual(consistent.status, 0, consistent.result.summary)
  }

  // MARK: 3. A consistency point at any moment

  /// The far server stopped at random moments under a stamped load faster
  /// than the copy (an interval of eight writes costs the link a flush and
  /// two round trips): its image is each time at a consistency point, seen
  /// at several points on its way, until it has drained.
  func testTheFarCopyIsAtAConsistencyPointWheneverItIsStopped() throws {
    let (r, copies) = try mirrored(seed: 13, delays: ["5ms"])
    let far = copies[0]
    let baseline = try r.s.file("baseline.img", r.original)
    let load = stamps(seed: 3101, flushEvery: 8)
    let wlog = r.s.path("writer.log")
    let total = Self.long ? 40000 : 2400
    let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"), count: total)
    r.others.append(writer)
    waitForFlushes(wlog, 2, writer: writer)

    var rng = SplitMix64(seed: 3)
    var checks = 0
    var highest = Set<Int>()
    let end = RRTEnv.monotonic() + (Self.long ? 600 : 30)
    while RRTEnv.monotonic() < end {
      RRTEnv.sleep(Double.random(in: 0.02...0.3, using: &rng))
      guard far.freeze() else { break }
      let c = try load.check(image: far.path, baseline: baseline, mode: .consistent)
      far.thaw()
      checks += 1
      XCTAssertEqual(c.status, 0, "check \(checks): \(c.result.summary)")
      if let k = Self.highestInterval(c.summary) { highest.insert(k) }
      if checks >= 10 && !writer.isRunning, try r.copyLags().first?.owedIntervals == 0 { break }
    }
    XCTAssertEqual(writer.wait(timeout: 60), 0, "the writer: \(writer.errors)")
    XCTAssertEqual(StampedLoad.Log(path: wlog).lastFlushed, total)
    print("far copy checked at \(checks) random moments, \(highest.count) different intervals; \(total) writes")
    XCTAssertGreaterThanOrEqual(checks, 10)
    XCTAssertGreaterThanOrEqual(highest.count, 3, "the copy did not move between checks: \(highest.sorted())")

    try r.waitUntilDrained(seconds: Self.drainSeconds)
    r.stop()
    far.stop()
    RRTBytes.assertEqual(try far.data(), try r.deviceData(), "the far copy against the device")
    let acked = try load.check(image: far.path, baseline: baseline, mode: .acked(total), maxIndex: total)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
  }

  /// K from a check's summary ("interval K is the highest present").
  static func highestInterval(_ summary: String) -> Int? {
    guard let r = summary.range(of: "interval ") else { return nil }
    return Int(summary[r.upperBound...].prefix { $0.isNumber })
  }

  // MARK: 4. Fan-out and quorum

  /// Two far copies, 5 ms and 50 ms away; the far one stopped: a stamped
  /// load is acknowledged all the same, the near copy keeps up while what
  /// the stopped one owes only grows, and once it runs again both equal the
  /// device. Under --ack quorum=2 a FLUSH with one copy stopped waits until
  /// it runs again.
  func testOneStoppedCopyHoldsNoOtherBackAndAQuorumFlushWaitsForIt() throws {
    let (r, copies) = try mirrored(seed: 14, delays: ["5ms", "50ms"], extra: ["--backup-connections", "8"])
    let (near, far) = (copies[0], copies[1])
    let baseline = try r.s.file("baseline.img", r.original)
    let load = stamps(seed: 4101, flushEvery: 16)
    let wlog = r.s.path("writer.log")
    XCTAssertEqual(try load.write(uri: r.uri, log: wlog, count: 32).status, 0)
    try r.waitUntilDrained()
    let before = try r.copyLags()

    XCTAssertTrue(far.freeze())
    let writer = try load.startWriter(uri: r.uri, log: wlog, output: r.s.path("writer"), count: 160, start: 32)
    r.others.append(writer)
    var samples: [[CopyLag]] = []
    while writer.isRunning {
      samples.append(try r.copyLags())
      RRTEnv.sleep(0.1)
    }
    XCTAssertEqual(writer.wait(timeout: 60), 0, "the writer with a copy stopped: \(writer.errors)")
    XCTAssertEqual(StampedLoad.Log(path: wlog).lastFlushed, 192)
    var last: [CopyLag] = []
    let kept = try r.waitForCopies(last: &last) { $0[0].owedIntervals == 0 }
    XCTAssertNotNil(kept, "the near copy did not keep up: \(last)")
    samples.append(last)
    let owedByFar = samples.map { $0[1].owedIntervals }
    print(
      "while the far copy was stopped it owed \(owedByFar) intervals; the near copy \(samples.map { $0[0].owedIntervals })"
    )
    XCTAssertEqual(owedByFar, owedByFar.sorted(), "what a stopped copy owes went down")
    XCTAssertGreaterThanOrEqual(owedByFar.last ?? 0, 10, "ten FLUSHes while it was stopped: \(last)")
    XCTAssertGreaterThanOrEqual(last[1].owedBytes, 160 * 4096, "\(last)")
    XCTAssertEqual(Set(samples.map { $0[1].interval }), [before[1].interval], "a stopped copy's position moved")
    XCTAssertGreaterThanOrEqual(last[0].interval, before[0].interval + 10, "the near copy's intervals: \(last)")
    XCTAssertEqual(last[0].owedBytes, 0)
    far.thaw()
    try r.waitUntilDrained()
    let both = try r.copyLags()
    XCTAssertEqual(both[0].interval, both[1].interval, "\(both)")
    r.stop()
    let device = try r.deviceData()
    RRTBytes.assertEqual(try near.data(), device, "the near copy against the device")
    RRTBytes.assertEqual(try far.data(), device, "the far copy against the device")
    XCTAssertEqual(try load.check(image: far.path, baseline: baseline, mode: .acked(192)).status, 0)

    // --ack quorum=2: a FLUSH waits for both copies.
    try r.start(TrackRig.mirroring(copies, ack: "quorum=2", extra: ["--backup-connections", "8"]))
    let warm = try r.nbdsh("h.connect_uri(URI)\nh.pwrite(pattern(1, 4096), 12 << 20)\nh.flush()\nprint('OK')")
    XCTAssertEqual(warm.status, 0, warm.summary)
    let held = try r.copyLags()
    XCTAssertTrue(far.freeze())
    let client = try r.nbdshChild(
      """
      h.connect_uri(URI)
      h.pwrite(pattern(2, 4096), (12 << 20) + B)
      print('written', flush=True)
      t = time.monotonic()
      h.flush()
      print('flushed after %.3f s' % (time.monotonic() - t), flush=True)
      h.shutdown()
      """, name: "quorum-flush")
    XCTAssertTrue(client.waitForOutput("written", timeout: 20), "a write waited for the quorum: \(client.errors)")
    RRTEnv.sleep(3)
    XCTAssertTrue(client.isRunning, "the FLUSH ended with a copy stopped: \(client.output) \(client.errors)")
    XCTAssertFalse(client.output.contains("flushed"), client.output)
    let waiting = try r.copyLags()
    XCTAssertEqual(waiting[0].interval, held[0].interval + 1, "the near copy holds the FLUSH's interval: \(waiting)")
    XCTAssertEqual(waiting[1].interval, held[1].interval, "\(waiting)")
    far.thaw()
    XCTAssertTrue(client.waitForOutput("flushed", timeout: 20), "the FLUSH after the copy resumed: \(client.errors)")
    XCTAssertEqual(client.wait(timeout: 10), 0, client.errors)
    print("quorum=2: \(client.output.split(separator: "\n").last ?? "")")
    try r.waitUntilDrained()
    r.stop()
    let after = try r.deviceData()
    XCTAssertTrue(TrackRig.holds(after, TrackRig.pattern(2, 4096), at: (12 << 20) + r.blockSize))
    RRTBytes.assertEqual(try near.data(), after, "the near copy against the device (quorum)")
    RRTBytes.assertEqual(try far.data(), after, "the far copy against the device (quorum)")
  }

  // MARK: 5. A chain: primary → relay → far copy

  /// restore-read-through --ack local on a whole primary, mirroring to a
  /// relay (tracking-server --ack local) that mirrors to a far nbdkit: under
  /// a stamped load on the primary, the far copy is at a consistency point
  /// whenever it is stopped, though the relay is killed with -9 three times
  /// and the far server once, mostly while a writer runs, and each started
  /// again (DUALRESTORE_LONG=1: 220 kills, a third of them the far
  /// server's); the primary acknowledges its writes all along; once
  /// everything drains, the primary, the relay's device and the far copy
  /// are equal.
  func testARelayChainStaysConsistentThroughKillsAndEndsEqual() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    try StampedLoad.require()
    let relay = try TrackRig(size: 16 << 20, seed: 15)
    let far = try FarCopy(dir: relay.dir, name: "far", image: relay.original, delay: "5ms")
    let primary = try ChainPrimary(dir: relay.dir, image: relay.original)
    rigs += [primary, far, relay]
    let baseline = try relay.s.file("baseline.img", relay.original)
    try far.start()
    try relay.start(TrackRig.mirroring([far]))
    try primary.start(backups: [relay.uri], options: ["--ack", "local", "--progress-interval", "0.5"])

    let load = stamps(seed: 5101, flushEvery: 8)
    let wlog = relay.s.path("writer.log")
    // The load comes in bursts, each a writer continuing the history, so
    // that the chain (slower than the writer: every interval costs each hop
    // a flush) keeps up from one round to the next.
    let burst = Self.long ? 400 : 800
    let rounds = Self.long ? 220 : 4
    var rng = SplitMix64(seed: 5)
    var relayKills = 0
    var farKills = 0
    var killsUnderLoad = 0
    var farChecks = 0
    var highest = Set<Int>()
    func checkFar() throws {
      try far.revive()
      guard far.freeze() else { return }
      let c = try load.check(image: far.path, baseline: baseline, mode: .consistent)
      far.thaw()
      farChecks += 1
      XCTAssertEqual(c.status, 0, "far check \(farChecks) (after \(relayKills) relay kills): \(c.result.summary)")
      if let k = Self.highestInterval(c.summary) { highest.insert(k) }
    }
    for round in 0..<rounds {
      let start = StampedLoad.Log(path: wlog).lastFlushed
      let writer = try load.startWriter(
        uri: primary.uri, log: wlog, output: relay.s.path("writer"), count: burst, start: start)
      primary.others.append(writer)
      RRTEnv.sleep(Double.random(in: 0.02...0.3, using: &rng))
      try checkFar()
      let loaded = writer.isRunning
      let atKill = StampedLoad.Log(path: wlog).lastFlushed
      // In the long mode a third of the kills are the far server's; in the
      // short one, the last.
      if Self.long ? rng.next() % 3 == 0 : round == rounds - 1 {
        far.kill9()
        farKills += 1
        RRTEnv.sleep(Double.random(in: 0...1, using: &rng))
        try far.start()
      } else {
        relay.kill9()
        relayKills += 1
        RRTEnv.sleep(Double.random(in: 0...0.5, using: &rng))
        try relay.start()
        // A writer that ran all the while the relay was down was
        // acknowledged by the primary meanwhile.
        if loaded && writer.isRunning {
          XCTAssertGreaterThan(StampedLoad.Log(path: wlog).lastFlushed, atKill, "the primary waited for the relay")
        }
        try far.revive()
      }
      if loaded { killsUnderLoad += 1 }
      XCTAssertEqual(writer.wait(timeout: 120), 0, "burst \(round): \(writer.errors)")
      primary.others.removeAll { $0 === writer }
      XCTAssertEqual(StampedLoad.Log(path: wlog).lastFlushed, start + burst, "burst \(round)")
      RRTEnv.sleep(Double.random(in: 0.02...0.3, using: &rng))
      try checkFar()
      if Self.long && round % 20 == 19 {
        print("round \(round + 1): \(relayKills) relay kills, \(farKills) far kills, \(farChecks) far checks")
        fflush(nil)
      }
    }
    let flushed = StampedLoad.Log(path: wlog).lastFlushed
    XCTAssertEqual(flushed, rounds * burst)
    XCTAssertGreaterThan(killsUnderLoad, 0, "no kill came while the writer ran")

    let progress = primary.progressLines.count
    XCTAssertTrue(
      primary.waitUntilDrained(after: progress, seconds: Self.drainSeconds),
      "the primary's copy (the relay) still lacks something: \(primary.progressLines.last ?? "")")
    try relay.waitUntilDrained(seconds: Self.drainSeconds)
    primary.stop()
    try relay.waitUntilDrained()
    relay.stop()
    far.stop()
    print(
      "relay chain: \(relayKills) relay kills, \(farKills) far kills (\(killsUnderLoad) under load; "
        + "\(far.revivals) far restarts after nbdkit died), \(farChecks) far checks at \(highest.count) intervals, "
        + "\(flushed) writes flushed")
    XCTAssertGreaterThanOrEqual(highest.count, 3, "the far copy did not move between checks: \(highest.sorted())")
    let image = try primary.data()
    RRTBytes.assertEqual(try relay.deviceData(), image, "the relay's device against the primary")
    RRTBytes.assertEqual(try far.data(), image, "the far copy against the primary")
    let acked = try load.check(image: primary.path, baseline: baseline, mode: .acked(flushed), maxIndex: flushed)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    XCTAssertTrue(relay.allLogs.contains("unclean shutdown detected"), "no relay start found writes in flight")
  }

  // MARK: 6. Usage

  /// Far copies without an asynchronous --ack, an asynchronous --ack without
  /// a far copy, a quorum larger than the copies: each refused in one
  /// sentence with status 64, and nothing created beside the device.
  func testMirroringUsageErrorsAreRefusedAndCreateNothing() throws {
    let s = try Scratch()
    try s.randomFile("device.img", size: 1 << 20, seed: 16)
    let a = "nbd+unix:///?socket=\(s.path("a.sock"))"
    let b = "nbd+unix:///?socket=\(s.path("b.sock"))"
    let cases: [([String], String)] = [
      (["--ack", "local"], "--ack local needs a far copy to keep: give --backup URI"),
      (["--ack", "quorum=1"], "--ack quorum=1 needs a far copy to keep: give --backup URI"),
      (["--backup", a], "tracking-server keeps far copies asynchronously: give --ack local or --ack quorum=K"),
      (["--ack", "all", "--backup", a], "tracking-server keeps far copies asynchronously"),
      (["--ack", "quorum=3", "--backup", a, "--backup", b], "--ack quorum=3 needs 3 far copies; --backup names 2"),
    ]
    for (options, sentence) in cases {
      let r = try RRTCommand.run(
        "tracking-server", ["serve"] + options + ["--changes", "d.map", "--socket", "d.sock", "device.img"],
        timeout: 20, cwd: s.url.path)
      XCTAssertEqual(r.status, 64, "\(options): \(r.summary)")
      let errors = r.stderr.split(separator: "\n").filter { $0.hasPrefix("Error: ") }
      XCTAssertEqual(errors.count, 1, "\(options): \(r.stderr)")
      XCTAssertTrue(errors.first?.contains(sentence) == true, "\(options): \(r.stderr)")
      XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr)
      XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.url.path), ["device.img"], "\(options)")
    }
  }
}
