// tracking-server group end to end: several built servers (TrackRig, one
// per device, in TrackingHarness.swift), the group coordinator, and real
// NBD clients. Dependent writes come from Tests/Scripts/dependent.py (a
// write to A acknowledged, then a write to B naming it), which also takes
// and checks the points; raw control sessions, and a device that holds but
// never acts, from Tests/Scripts/control.py.
//
// What is checked is what the tool promises (group --help and the
// invariants of ConsistencyGroup.swift and TrackingService.swift): a group
// point never holds a B write without the A write it depends on, where
// devices frozen one after the other do; writes resume at once when the
// holder goes away (kill -9) and by themselves at the hold's limit, and a
// view frozen within a hold never released is dropped; a device that
// cannot hold or act leaves no view anywhere; bad input is one sentence
// and holds nothing.

import Foundation
import Glibc
import TestSupport
import XCTest

final class GroupCLITests: CLITestCase {
  static let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Scripts")
  static let python = "/usr/bin/python3"
  static var dependent: String { scripts.appendingPathComponent("dependent.py").path }
  static var control: String { scripts.appendingPathComponent("control.py").path }

  static func text(_ path: String) -> String {
    String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: path))) ?? Data(), as: UTF8.self)
  }

  /// Rigs with tracking-server answering, one per device.
  func devices(_ count: Int, size: Int = 2 << 20) throws -> [TrackRig] {
    try (0..<count).map { i in
      let r = try TrackRig(size: size, seed: UInt64(300 + i))
      rigs.append(r)
      try r.start()
      return r
    }
  }

  func requirePython() throws {
    try require("nbdinfo", "nbdsh")
    let r = try RRTCommand.run(Self.python, ["-c", "import nbd"], timeout: 30)
    if r.status != 0 { throw XCTSkip("/usr/bin/python3 lacks libnbd's nbd module (python3-libnbd): \(r.stderr)") }
  }

  func group(_ arguments: [String], timeout: Double = 60) throws -> RRTCommand.Result {
    try RRTCommand.run("tracking-server", ["group"] + arguments, timeout: timeout)
  }

  /// Asserts a failed command: a non-zero status and one line on standard
  /// error holding every fragment.
  func assertRefused(
    _ r: RRTCommand.Result, status: Int32? = nil, _ fragments: String..., file: StaticString = #filePath,
    line: UInt = #line
  ) {
    XCTAssertNotEqual(r.status, 0, "expected a failure: \(r.summary)", file: file, line: line)
    if let status { XCTAssertEqual(r.status, status, r.summary, file: file, line: line) }
    XCTAssertFalse(r.timedOut, r.summary, file: file, line: line)
    if status != 64 {
      let lines = r.stderr.split(separator: "\n", omittingEmptySubsequences: true)
      XCTAssertEqual(lines.count, 1, "not one sentence on standard error: \(r.summary)", file: file, line: line)
    }
    for f in fragments {
      XCTAssertTrue(r.stderr.contains(f), "stderr lacks \(f.debugDescription): \(r.summary)", file: file, line: line)
    }
    XCTAssertFalse(r.stderr.contains("Fatal error"), r.summary, file: file, line: line)
  }

  /// Starts an nbdsh client that writes one block to `rig` and prints the
  /// seconds the write took (from just before it is sent).
  func timedWrite(_ rig: TrackRig, name: String) throws -> RRTChild {
    try rig.nbdshChild(
      """
      h.connect_uri(URI)
      print('CONNECTED', flush=True)
      t = time.monotonic()
      h.pwrite(pattern(9, 4096), 7 * B)
      print('WROTE %.3f' % (time.monotonic() - t), flush=True)
      """, name: name)
  }

  /// The seconds the `timedWrite` client's write took, waiting up to `timeout`.
  func writeSeconds(_ c: RRTChild, timeout: Double) -> Double? {
    guard c.waitForOutput("WROTE ", timeout: timeout) else { return nil }
    let line = c.output.split(separator: "\n").first { $0.hasPrefix("WROTE ") }
    return line.flatMap { Double($0.dropFirst(6)) }
  }

  // MARK: 1. Dependent writes

  /// A client writes to A, waits for the acknowledgement, then writes to B
  /// a stamp naming that A write, continuously from 4 threads. 200 group
  /// points of A and B: no B stamp in B's view without its A write in A's
  /// view. The same load with A frozen, then B, by two `freeze` commands:
  /// violations — so the check can fail.
  func testGroupPointsKeepDependentWritesAndSuccessiveFreezesDoNot() throws {
    try requirePython()
    let d = try devices(2)
    let (a, b) = (d[0], d[1])
    let slots = a.size / 4096
    let log = a.s.path("dependent.log")
    let writer = try RRTChild(
      name: "dependent-writer", executable: Self.python,
      arguments: [
        Self.dependent, "write", "--a", a.uri, "--b", b.uri, "--slots", "\(slots)", "--seed", "11", "--log", log,
        "--threads", "4",
      ], stdout: a.s.path("writer.out"), stderr: a.s.path("writer.err"))
    a.others.append(writer)
    RRTEnv.sleep(0.5)

    func points(_ mode: String, _ count: Int) throws -> [String: Any] {
      let r = try RRTCommand.run(
        Self.python,
        [
          Self.dependent, "points", "--tool", Tools.path("tracking-server"), "--a", a.socket, "--b", b.socket,
          "--slots", "\(slots)", "--seed", "11", "--count", "\(count)", "--mode", mode,
        ], timeout: 120)
      XCTAssertEqual(r.status, 0, r.summary)
      return try TrackRig.json(r.stdout)
    }
    let g = try points("group", 200)
    XCTAssertEqual(g["points"] as? Int, 200, "\(g)")
    XCTAssertEqual(g["violations"] as? Int, 0, "group points with a B write lacking its A write: \(g)")
    XCTAssertEqual(g["torn"] as? Int, 0, "\(g)")
    XCTAssertGreaterThan(g["b_stamps"] as? Int ?? 0, 0, "no B write in any point: \(g)")
    XCTAssertGreaterThan(g["b_progress"] as? Int ?? 0, 100, "the writes did not go on between the points: \(g)")

    print("group points of dependent writes: \(g)")
    let s = try points("sequential", 30)
    print("A frozen, then B: \(s)")
    XCTAssertGreaterThan(
      s["violations"] as? Int ?? 0, 0, "A frozen then B found no B write lacking its A write: the check is blind: \(s)")
    XCTAssertEqual(s["torn"] as? Int, 0, "\(s)")

    XCTAssertEqual(writer.stop(grace: 10), 0, writer.errors)
    let written = Self.text(log)
    XCTAssertFalse(written.contains("stopped"), written)
    XCTAssertTrue(written.hasPrefix("wrote "), written)
    XCTAssertGreaterThan(Int(written.dropFirst(6).prefix { $0.isNumber }) ?? 0, 1000, written)
    XCTAssertNil(try a.status()["view"])
    XCTAssertNil(try b.status()["view"])
    a.stop()
    b.stop()
  }

  // MARK: 2. A coordinator gone, a hold past its limit

  /// A device that holds but never answers the freeze keeps the group
  /// command holding the real one; kill -9 of the command: the write that
  /// waited completes at once, the view frozen within the hold is dropped,
  /// and the log says why. status answers while writes are held, and a
  /// second coordinator's hold is refused meanwhile.
  func testACoordinatorKilledWhileHoldingReleasesWritesAndLeavesNoView() throws {
    try requirePython()
    let a = try devices(1)[0]
    let stuck = a.s.path("stuck.control")
    let staller = try RRTChild(
      name: "stall", executable: Self.python, arguments: [Self.control, "stall", "--control", stuck],
      stdout: a.s.path("stall.out"), stderr: a.s.path("stall.err"))
    a.others.append(staller)
    XCTAssertTrue(staller.waitForOutput("listening", timeout: 10), staller.errors)

    let coordinator = try RRTChild(
      name: "group", executable: Tools.path("tracking-server"),
      arguments: ["group", "freeze", "--control", stuck, "--socket", a.socket, "--max-hold", "30"],
      stdout: a.s.path("group.out"), stderr: a.s.path("group.err"))
    a.others.append(coordinator)
    // Held and frozen on A: status answers meanwhile, and shows the view.
    var view: String?
    let end = RRTEnv.monotonic() + 15
    while view == nil && RRTEnv.monotonic() < end {
      let t = RRTEnv.monotonic()
      let st = try a.status()
      XCTAssertLessThan(RRTEnv.monotonic() - t, 3, "status waited for the hold")
      view = st["view"] as? String
      if view == nil { RRTEnv.sleep(0.05) }
    }
    XCTAssertNotNil(view, "A was never frozen: \(coordinator.errors)")
    XCTAssertTrue(coordinator.isRunning, coordinator.errors)

    let write = try timedWrite(a, name: "w1")
    XCTAssertTrue(write.waitForOutput("CONNECTED", timeout: 10), write.errors)
    XCTAssertNil(writeSeconds(write, timeout: 1), "a write completed while the coordinator held writes")
    let second = try group(["freeze", "--socket", a.socket], timeout: 30)
    assertRefused(second, "held already by another control connection", "nothing is held")

    coordinator.kill9()
    let waited = writeSeconds(write, timeout: 5)
    XCTAssertNotNil(waited, "the write did not complete after the coordinator was killed: \(write.errors)")
    XCTAssertGreaterThan(waited ?? 0, 0.9, "the write did not wait for the hold")
    var left: Any? = view
    let gone = RRTEnv.monotonic() + 2
    while left != nil && RRTEnv.monotonic() < gone {
      left = try a.status()["view"]
      RRTEnv.sleep(0.05)
    }
    XCTAssertNil(left, "the view frozen within the killed coordinator's hold is still held")
    XCTAssertTrue(a.log.contains("ended as its control connection closed"), a.log)
    XCTAssertTrue(a.log.contains("frozen within it is dropped"), a.log)
    XCTAssertFalse(FileManager.default.fileExists(atPath: a.storePath), "the store of the dropped view")
    a.stop()
  }

  /// A hold not released within its limit: the server releases writes by
  /// itself (a waiting write completes while the holder is still
  /// connected), logs it, and refuses the freeze sent afterwards. The same
  /// through the group command with --max-hold 1 and a device that never
  /// acts: the real one's writes go on after a second, the command fails
  /// with a sentence, and no view is left.
  func testAHoldPastItsLimitIsReleasedByTheServerAndTheActionRefused() throws {
    try requirePython()
    let a = try devices(1)[0]
    let session = try RRTChild(
      name: "session", executable: Self.python,
      arguments: [Self.control, "session", "--control", a.socket + ".control", "hold limit=1", "sleep=4", "freeze"],
      stdout: a.s.path("session.out"), stderr: a.s.path("session.err"))
    a.others.append(session)
    XCTAssertTrue(session.waitForOutput("\"request\": \"hold limit=1\"", timeout: 10), session.errors)
    let heldAt = RRTEnv.monotonic()
    let write = try timedWrite(a, name: "w1")
    let waited = writeSeconds(write, timeout: 5)
    XCTAssertNotNil(waited, write.errors)
    let released = RRTEnv.monotonic() - heldAt
    XCTAssertLessThan(released, 3.5, "writes waited long past the 1 s limit")
    XCTAssertTrue(session.isRunning, "the holder went away before the limit was tested")
    XCTAssertEqual(session.wait(timeout: 10), 0, session.errors)
    let answers = session.output.split(separator: "\n").compactMap { try? TrackRig.json(String($0)) }
    XCTAssertEqual(answers.count, 2, session.output)
    XCTAssertEqual(answers.first?["ok"] as? Bool, true, session.output)
    XCTAssertEqual(answers.last?["ok"] as? Bool, false, "a freeze after the limit was not refused: \(session.output)")
    XCTAssertTrue((answers.last?["error"] as? String ?? "").contains("at its limit of 1.000 s"), session.output)
    XCTAssertNil(try a.status()["view"], "a freeze after the hold's limit left a view")
    XCTAssertTrue(a.log.contains("ended at its limit of 1.000 s"), a.log)

    // The group command: A held, the other device never acts.
    let stuck = a.s.path("stuck.control")
    let staller = try RRTChild(
      name: "stall", executable: Self.python, arguments: [Self.control, "stall", "--control", stuck],
      stdout: a.s.path("stall.out"), stderr: a.s.path("stall.err"))
    a.others.append(staller)
    XCTAssertTrue(staller.waitForOutput("listening", timeout: 10), staller.errors)
    let coordinator = try RRTChild(
      name: "group", executable: Tools.path("tracking-server"),
      arguments: ["group", "freeze", "--socket", a.socket, "--control", stuck, "--max-hold", "1"],
      stdout: a.s.path("group.out"), stderr: a.s.path("group.err"))
    a.others.append(coordinator)
    let started = RRTEnv.monotonic()
    RRTEnv.sleep(0.3)
    let w2 = try timedWrite(a, name: "w2")
    XCTAssertNotNil(writeSeconds(w2, timeout: 5), w2.errors)
    XCTAssertLessThan(RRTEnv.monotonic() - started, 3, "writes waited past --max-hold 1")
    XCTAssertTrue(coordinator.isRunning, "the coordinator ended before the limit was tested: \(coordinator.errors)")
    let status = coordinator.wait(timeout: 20)
    XCTAssertNotNil(status, "the coordinator did not give up")
    XCTAssertNotEqual(status ?? 0, 0, coordinator.errors)
    let lines = coordinator.errors.split(separator: "\n")
    XCTAssertEqual(lines.count, 1, coordinator.errors)
    XCTAssertTrue(coordinator.errors.contains("no point was made"), coordinator.errors)
    XCTAssertEqual(coordinator.output, "", "a failed group printed a report")
    XCTAssertNil(try a.status()["view"], "the failed group left a view on A")
    a.stop()
  }

  // MARK: 3. Reports, undo, bad input

  /// new-generation on three devices: every generation ends at the point,
  /// saved to its --changes-out in device order, as the report says; the
  /// --before and --after commands run around the hold.
  func testNewGenerationOnEveryDeviceReportsEachAndRunsBeforeAndAfter() throws {
    try require("nbdinfo", "nbdsh")
    let d = try devices(3)
    let before = try d.map { try $0.status()["generation"] as? String }
    let out = d.indices.map { d[0].s.path("g\($0).map") }
    let trace = d[0].s.path("trace")
    let r = try group(
      ["new-generation", "--control", d[0].socket + ".control", "--socket", d[1].socket, "--socket", d[2].socket]
        + out.flatMap { ["--changes-out", $0] }
        + ["--before", "echo before >> \(trace)", "--after", "echo after >> \(trace)", "--json"])
    XCTAssertEqual(r.status, 0, r.summary)
    let o = try TrackRig.json(r.stdout)
    XCTAssertEqual(o["action"] as? String, "new-generation")
    let hold = try XCTUnwrap(o["hold_seconds"] as? Double, r.stdout)
    XCTAssertGreaterThan(hold, 0)
    XCTAssertLessThan(hold, 5)
    let devs = try XCTUnwrap(o["devices"] as? [[String: Any]], r.stdout)
    XCTAssertEqual(devs.count, 3)
    for (i, e) in devs.enumerated() {
      XCTAssertEqual(e["changes_out"] as? String, out[i], r.stdout)
      XCTAssertEqual(e["ended_generation"] as? String, before[i], "device \(i): \(r.stdout)")
      let held = try XCTUnwrap(e["held_seconds"] as? Double, r.stdout)
      XCTAssertLessThanOrEqual(held, hold + 0.001, "a device held longer than the group: \(r.stdout)")
      XCTAssertEqual(e["generation"] as? String, try d[i].status()["generation"] as? String, r.stdout)
      XCTAssertEqual(try d[i].mapStats(out[i])["map_id"] as? String, before[i], "the map saved for device \(i)")
    }
    XCTAssertEqual(devs.first?["control"] as? String, d[0].socket + ".control")
    XCTAssertEqual(Self.text(trace), "before\nafter\n")

    let text = try group(
      ["freeze", "--socket", d[0].socket, "--socket", d[1].socket, "--before", "echo noise"])
    XCTAssertEqual(text.status, 0, text.summary)
    XCTAssertTrue(text.stdout.hasPrefix("freeze of 2 device(s) at one instant: writes held "), text.stdout)
    XCTAssertEqual(text.lines.count, 3, text.stdout)
    XCTAssertTrue(text.stderr.contains("noise"), "--before's output is not on standard error: \(text.summary)")
    for i in 0..<2 {
      let view = try XCTUnwrap(try d[i].status()["view"] as? String)
      XCTAssertTrue(text.lines[i + 1].contains("view \(view) frozen at"), text.stdout)
      XCTAssertEqual(try d[i].control("drop").status, 0)
    }
    for r in d { r.stop() }
  }

  /// A device that cannot freeze (a view is held there already): the views
  /// frozen on the others are dropped, writes are released everywhere, the
  /// sentence says so, and --after still runs.
  func testADeviceThatCannotFreezeLeavesNoViewOnTheOthers() throws {
    try require("nbdinfo", "nbdsh")
    let d = try devices(3)
    XCTAssertEqual(try d[2].control("freeze").status, 0)
    let kept = try d[2].status()["view"] as? String
    let trace = d[0].s.path("trace")
    let r = try group(
      ["freeze"] + d.flatMap { ["--socket", $0.socket] } + ["--after", "echo after >> \(trace)"])
    assertRefused(
      r, "is held already", "the view frozen on \(d[0].socket).control was dropped",
      "the view frozen on \(d[1].socket).control was dropped", "no point was made")
    XCTAssertEqual(r.stdout, "")
    XCTAssertNil(try d[0].status()["view"])
    XCTAssertNil(try d[1].status()["view"])
    XCTAssertEqual(try d[2].status()["view"] as? String, kept, "the view that was there before is kept")
    XCTAssertEqual(Self.text(trace), "after\n", "--after did not run after a failed hold")
    let w = try d[0].nbdsh("h.connect_uri(URI)\nh.pwrite(b'x' * 512, 0)\nprint('OK')", timeout: 10)
    XCTAssertEqual(w.status, 0, "writes are still held: \(w.summary)")
    for r in d { r.stop() }
  }

  /// Bad input: an unknown control socket is one sentence naming it, and
  /// nothing is held or frozen anywhere, nor --before run (so --after is
  /// not either); a failing --before holds nothing and skips --after;
  /// argument errors exit 64 with the sentence.
  func testBadInputIsOneSentenceAndHoldsNothing() throws {
    try require("nbdinfo", "nbdsh")
    let a = try devices(1)[0]
    let generation = try a.status()["generation"] as? String
    let missing = a.s.path("none.control")
    let trace = a.s.path("trace")
    let r = try group(
      [
        "freeze", "--socket", a.socket, "--control", missing, "--before", "echo before >> \(trace)", "--after",
        "echo after >> \(trace)",
      ])
    assertRefused(r, missing, "no server answers on this control socket", "nothing was held")
    XCTAssertNil(try a.status()["view"])
    XCTAssertEqual(try a.status()["generation"] as? String, generation)
    XCTAssertFalse(a.log.contains("froze"), a.log)
    XCTAssertEqual(Self.text(trace), "", "the application was quiesced for a group that cannot be made")

    let b = try group(
      ["freeze", "--socket", a.socket, "--before", "exit 3", "--after", "echo after >> \(trace)"])
    assertRefused(b, "the --before command exited with status 3", "nothing was held")
    XCTAssertEqual(Self.text(trace), "", "--after ran after a failed --before")
    XCTAssertNil(try a.status()["view"])

    // An output that no server may take (here: not a map) is refused by
    // its server before anything is held; the other ends its generation
    // within its hold and undoes it: no generation ends anywhere.
    let b2 = try devices(1)[0]
    let generation2 = try b2.status()["generation"] as? String
    let notMap = a.s.path("notes.txt")
    try Data("notes\n".utf8).write(to: URL(fileURLWithPath: notMap))
    let n = try group([
      "new-generation", "--socket", b2.socket, "--socket", a.socket, "--changes-out", a.s.path("ok.map"),
      "--changes-out", notMap,
    ])
    assertRefused(n, "\(notMap) exists and is not a map", "nothing is held", "no point was made")
    XCTAssertEqual(try a.status()["generation"] as? String, generation)
    XCTAssertEqual(try b2.status()["generation"] as? String, generation2, "a generation ended on the other device")
    // The other device had ended its generation within its hold: undone there.
    XCTAssertTrue(
      n.stderr.contains("the end of generation \(generation2 ?? "?") on \(b2.socket).control was undone"), n.summary)
    XCTAssertFalse(FileManager.default.fileExists(atPath: a.s.path("ok.map")))
    XCTAssertEqual(Self.text(notMap), "notes\n")
    b2.stop()

    let other = a.s.path("other.sock")
    let cases: [([String], String)] = [
      (
        ["freeze", "--socket", a.socket, "--socket", other, "--changes-out", "x.map"],
        "--changes-out is given 1 time(s) for 2 device(s)"
      ),
      (["new-generation", "--socket", a.socket], "new-generation needs --changes-out FILE"),
      (["freeze", "--socket", a.socket, "--control", a.socket + ".control"], "a device is named twice"),
      (["thaw", "--socket", a.socket], "'thaw' is not a group action"),
      (["freeze"], "give the devices of the group"),
      (["freeze", "--socket", a.socket, "--max-hold", "0"], "--max-hold 0.0 is out of range"),
      (["freeze", "--socket", a.socket, "--max-hold", "61"], "--max-hold 61.0 is out of range"),
    ]
    for (arguments, fragment) in cases {
      assertRefused(try group(arguments), status: 64, fragment)
    }
    XCTAssertNil(try a.status()["view"])
    XCTAssertEqual(try a.status()["generation"] as? String, generation)
    a.stop()
  }
}
