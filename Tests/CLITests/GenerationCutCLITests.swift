// A generation's end as tracking-server makes it: cut within the hold of
// writes by one durable write to the change map's journal, the ended map
// saved to its output after the release (TrackingService.swift, hold
// sessions; DurableChangeMap.swift). Checked end to end with the built
// server, a raw control session (Tests/Scripts/control.py) and nbdsh: a
// server killed after the cut and before the release finishes the cut when
// it starts again, and an ended map that cannot be saved leaves the
// generation going on with nothing lost.

import Foundation
import Glibc
import TestSupport
import XCTest

final class GenerationCutCLITests: CLITestCase {
  static var control: String { GroupCLITests.control }

  private func rig(seed: UInt64) throws -> TrackRig {
    try require("nbdinfo", "nbdsh")
    let r = try TrackRig(size: 4 << 20, seed: seed)
    rigs.append(r)
    try r.start()
    return r
  }

  /// Writes one block of pattern `tag` to each block in `blocks`, then FLUSH.
  private func write(_ r: TrackRig, _ blocks: [Int], tag: Int) throws {
    let code =
      "h.connect_uri(URI)\n"
      + blocks.map { "h.pwrite(pattern(\(tag), B), \($0) * B)\n" }.joined() + "h.flush()\nprint('OK')\n"
    let w = try r.nbdsh(code)
    XCTAssertEqual(w.status, 0, w.summary)
  }

  /// A control session holds writes and cuts the generation, and the server
  /// is killed before the release: the ended map was not saved yet (it is
  /// saved after a release), and the next start saves it from the journal,
  /// with the blocks written before the cut, and goes on with the new
  /// generation, which then ends with exactly the blocks written after.
  func testACutWithinAHoldIsFinishedByTheNextStartAfterAKill() throws {
    let r = try rig(seed: 41)
    try write(r, [2, 5, 6], tag: 1)
    let ended = try XCTUnwrap(try r.status()["generation"] as? String)
    let out = r.s.path("ended.map")
    let session = try RRTChild(
      name: "session", executable: GroupCLITests.python,
      arguments: [
        Self.control, "session", "--control", r.socket + ".control", "hold", "new-generation changes-out=\(out)",
        "sleep=60",
      ],
      stdout: r.s.path("session.out"), stderr: r.s.path("session.err"))
    r.others.append(session)
    XCTAssertTrue(session.waitForOutput("\"request\": \"new-generation", timeout: 20), session.errors)
    let line = try XCTUnwrap(session.output.split(separator: "\n").last { $0.contains("new-generation") })
    let answer = try TrackRig.json(String(line))
    XCTAssertEqual(answer["ok"] as? Bool, true, session.output)
    let fields = try XCTUnwrap(answer["fields"] as? [String: String], session.output)
    XCTAssertEqual(fields["ended_generation"], ended)
    let started = try XCTUnwrap(fields["generation"], session.output)
    XCTAssertNotEqual(started, ended)
    XCTAssertFalse(
      FileManager.default.fileExists(atPath: out), "the ended map was saved within the hold: the cut is not one write")

    r.kill9()
    session.stop(grace: 2)
    try r.start()
    XCTAssertTrue(r.log.contains("its change map"), r.log)
    XCTAssertEqual(try r.status()["generation"] as? String, started, "the new generation after the restart")
    let saved = try r.mapStats(out)
    XCTAssertEqual(saved["map_id"] as? String, ended, "the map saved at the start")
    XCTAssertEqual(saved["tracking_ended"] as? String, fields["generation_started"], "the instant the generation ended")
    XCTAssertEqual(try r.setBlocks(out), [2, 5, 6], "the ended generation's blocks")
    XCTAssertEqual(try r.mapStats()["map_id"] as? String, started, "the live map")
    XCTAssertEqual(try r.setBlocks(), [], "the new generation holds no write yet")

    try write(r, [9, 5], tag: 2)
    let next = try r.control("new-generation", ["--changes-out", "next.map", "--json"])
    XCTAssertEqual(next.status, 0, next.summary)
    XCTAssertEqual(try TrackRig.json(next.stdout)["ended_generation"] as? String, started)
    XCTAssertEqual(try r.setBlocks(r.s.path("next.map")), [5, 9], "the generation begun at the cut")
    XCTAssertEqual(
      try r.mapStats(r.s.path("next.map"))["tracking_started"] as? String, fields["generation_started"],
      "its start")
    r.stop()
  }

  /// A generation ended within a hold that ends without release (the
  /// session closes its connection) is undone: the generation goes on,
  /// nothing is saved, the log says so. Then `undo` within a hold, and a
  /// hold that carries its action (then=) and is released: that end holds,
  /// and `settle` answers once its map is saved.
  func testAGenerationEndedWithinAHoldIsUndoneUnlessReleased() throws {
    let r = try rig(seed: 43)
    try write(r, [1, 2], tag: 1)
    let generation = try XCTUnwrap(try r.status()["generation"] as? String)
    func session(_ steps: [String], _ name: String) throws -> [[String: Any]] {
      let c = try RRTChild(
        name: name, executable: GroupCLITests.python,
        arguments: [Self.control, "session", "--control", r.socket + ".control"] + steps,
        stdout: r.s.path("\(name).out"), stderr: r.s.path("\(name).err"))
      r.others.append(c)
      XCTAssertEqual(c.wait(timeout: 30), 0, c.errors)
      return c.output.split(separator: "\n").compactMap { try? TrackRig.json(String($0)) }
    }
    let out = r.s.path("g.map")
    let closed = try session(["hold", "new-generation changes-out=\(out)"], "closed")
    XCTAssertEqual(closed.last?["ok"] as? Bool, true, "\(closed)")
    // The server undoes as it sees the connection close.
    let end = RRTEnv.monotonic() + 10
    while !r.log.contains("within it is undone"), RRTEnv.monotonic() < end { RRTEnv.sleep(0.05) }
    XCTAssertTrue(r.log.contains("the end of generation \(generation) within it is undone"), r.log)
    XCTAssertEqual(try r.status()["generation"] as? String, generation, "a hold never released ended the generation")
    XCTAssertFalse(FileManager.default.fileExists(atPath: out), "a hold never released saved a map")

    let undone = try session(["hold", "new-generation changes-out=\(out)", "undo", "release", "settle"], "undone")
    XCTAssertEqual(undone.count, 5, "\(undone)")
    XCTAssertEqual((undone[2]["fields"] as? [String: String])?["undone_generation_end"], generation, "\(undone)")
    XCTAssertEqual(try r.status()["generation"] as? String, generation, "undo did not undo")
    XCTAssertFalse(FileManager.default.fileExists(atPath: out), "an undone end saved a map")

    try write(r, [3], tag: 2)
    let made = try session(["hold then=new-generation changes-out=\(out)", "release", "settle"], "made")
    XCTAssertEqual(made.count, 3, "\(made)")
    let fields = try XCTUnwrap(made[0]["fields"] as? [String: String], "\(made)")
    XCTAssertEqual(fields["ended_generation"], generation, "\(made)")
    XCTAssertNotNil(fields["drain_seconds"], "\(made)")
    XCTAssertEqual(made[2]["ok"] as? Bool, true, "\(made)")
    XCTAssertNotNil((made[2]["fields"] as? [String: String])?["settle_seconds"], "\(made)")
    XCTAssertEqual(try r.setBlocks(out), [1, 2, 3], "the ended generation, with the blocks of the undone ends")
    XCTAssertEqual(try r.status()["generation"] as? String, fields["generation"])
    r.stop()
  }

  /// An ended map that cannot be saved (its directory does not exist): one
  /// sentence, and the generation goes on as if it had not ended: same id
  /// and start, the blocks written before and after the attempt all in it,
  /// across a kill and a start too.
  func testAnEndedMapThatCannotBeSavedLeavesTheGenerationGoingOn() throws {
    let r = try rig(seed: 42)
    try write(r, [1, 3], tag: 1)
    let before = try r.status()
    let generation = try XCTUnwrap(before["generation"] as? String)
    let failed = try r.control("new-generation", ["--changes-out", r.s.path("missing/dir/g.map")])
    XCTAssertNotEqual(failed.status, 0, failed.summary)
    XCTAssertEqual(failed.stderr.split(separator: "\n").count, 1, failed.summary)
    XCTAssertTrue(failed.stderr.contains("cannot be saved to"), failed.summary)
    XCTAssertTrue(failed.stderr.contains("goes on"), failed.summary)
    let after = try r.status()
    XCTAssertEqual(after["generation"] as? String, generation, "the generation changed: \(after)")
    XCTAssertEqual(after["generation_started"] as? String, before["generation_started"] as? String)

    try write(r, [4], tag: 2)
    r.kill9()
    try r.start()
    XCTAssertEqual(try r.status()["generation"] as? String, generation, "after a kill and a start")
    let out = r.s.path("g.map")
    let ok = try r.control("new-generation", ["--changes-out", out, "--json"])
    XCTAssertEqual(ok.status, 0, ok.summary)
    XCTAssertEqual(try TrackRig.json(ok.stdout)["ended_generation"] as? String, generation)
    XCTAssertEqual(try r.setBlocks(out), [1, 3, 4], "blocks written before and after the failed end")
    r.stop()
  }
}
