// The instrument that will judge asynchronous mirroring, judged first: the
// stamped writer against a real server leaves exactly the writes it was
// asked for and the checker passes them; images built a write at a time
// pass when they stop at a consistency point and fail, naming the slot,
// when a write below the highest interval present is missing, a byte is
// flipped, or a stamp sits in another slot; and a writer whose server is
// killed stops with the count it had issued while what it had flushed is
// on the image. A checker that could not fail would prove nothing.

import Foundation
import TestSupport
import XCTest

final class StampedLoadTests: CLITestCase {
  /// A copy of the baseline to write stamps into.
  private func copy(_ baseline: String, to path: String) throws -> String {
    try? FileManager.default.removeItem(atPath: path)
    try FileManager.default.copyItem(atPath: baseline, toPath: path)
    return path
  }

  // MARK: (a) The writer against nbdkit

  /// A few hundred writes of 1.5 KiB (partial 4 KiB blocks), four in flight,
  /// through nbdkit's file plugin: every FLUSH is logged, the image holds
  /// every write (acked) at a consistency point, and it is byte for byte
  /// what `apply` makes of the same writes, so the writer and the checker
  /// agree on the sequence without trusting each other.
  func testWriterThroughNbdkitLeavesEveryAcknowledgedWrite() throws {
    try require("nbdkit", "nbdinfo")
    try StampedLoad.require()
    let r = try RRTRig(size: 16 << 20, seed: 31)
    rigs.append(r)
    try r.startBackup()
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 1001, writeSize: 1536, slots: 8192, flushEvery: 16)
    let log = r.s.path("writer.log")

    let w = try load.write(uri: r.backupURI, log: log, queueDepth: 4, count: 400)
    XCTAssertEqual(w.status, 0, w.summary)
    let l = StampedLoad.Log(path: log)
    XCTAssertEqual(l.flushed, Array(stride(from: 16, through: 400, by: 16)), "log: \(l)")
    XCTAssertNil(l.stopped)
    XCTAssertEqual(l.other, [])
    r.backupServer?.stop()

    let acked = try load.check(image: r.backupPath, baseline: baseline, mode: .acked(400), maxIndex: 400)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    XCTAssertEqual(acked.violations, [])
    let stamped = try XCTUnwrap(acked.stamped, acked.summary)
    XCTAssertGreaterThan(stamped, 350, "400 writes over 8192 slots repeat few slots: \(acked.summary)")
    XCTAssertLessThanOrEqual(stamped, 400)
    let consistent = try load.check(image: r.backupPath, baseline: baseline, mode: .consistent, maxIndex: 400)
    XCTAssertEqual(consistent.status, 0, consistent.result.summary)
    XCTAssertTrue(consistent.summary.contains("interval 24 is the highest present"), consistent.summary)

    // The same writes applied to a file give the same bytes.
    let applied = try copy(baseline, to: r.s.path("applied.img"))
    let a = try load.apply(image: applied, upto: 400)
    XCTAssertEqual(a.result.status, 0, a.result.summary)
    XCTAssertEqual(Set(a.applied.map(\.slot)).count, stamped)
    RRTBytes.assertEqual(
      try Data(contentsOf: URL(fileURLWithPath: applied)), try r.backupData(), "the written image against apply's")

    // The baseline itself lacks every one of those slots.
    let none = try load.check(image: baseline, baseline: baseline, mode: .acked(400))
    XCTAssertEqual(none.status, 1, none.result.summary)
    XCTAssertEqual(none.violations.count, stamped, none.summary)
  }

  // MARK: (b) Whole intervals, a partial one, and a hole

  /// Intervals 0..<6 pass, with any part of interval 6 too; a write of
  /// interval 5 missing while one of interval 6 is there fails, naming its
  /// slot — and passes again once no write of interval 6 is there, since
  /// interval 5 is then the one allowed to be partial.
  func testAHoleBelowTheHighestIntervalPresentFails() throws {
    try StampedLoad.require()
    let s = try Scratch()
    let baseline = try s.randomFile("baseline.img", size: 4 << 20, seed: 41)
    let load = StampedLoad(seed: 77, writeSize: 1024, slots: 4096, flushEvery: 8)

    let whole = try copy(baseline, to: s.path("whole.img"))
    let all = try load.apply(image: whole, upto: 48)
    XCTAssertEqual(all.result.status, 0, all.result.summary)
    XCTAssertEqual(all.applied.map(\.index), Array(0..<48))
    XCTAssertEqual(all.applied.map(\.interval), (0..<48).map { $0 / 8 })
    for k in 0..<6 {
      let slots = all.applied.filter { $0.interval == k }.map(\.slot)
      XCTAssertEqual(Set(slots).count, 8, "interval \(k) repeats a slot: \(slots)")
    }
    let c0 = try load.check(image: whole, baseline: baseline, mode: .consistent)
    XCTAssertEqual(c0.status, 0, c0.result.summary)
    XCTAssertTrue(c0.summary.contains("interval 5 is the highest present, 40 writes required"), c0.summary)

    let partial = try copy(baseline, to: s.path("partial.img"))
    XCTAssertEqual(try load.apply(image: partial, upto: 48, extra: [48, 50, 53]).result.status, 0)
    let c1 = try load.check(image: partial, baseline: baseline, mode: .consistent)
    XCTAssertEqual(c1.status, 0, c1.result.summary)
    XCTAssertTrue(c1.summary.contains("interval 6 is the highest present, 48 writes required"), c1.summary)

    // Write 43 (interval 5) missing, write 50 (interval 6) present.
    let hole = try copy(baseline, to: s.path("hole.img"))
    let h = try load.apply(image: hole, upto: 48, skip: [43], extra: [50])
    XCTAssertEqual(h.result.status, 0, h.result.summary)
    let missing = try XCTUnwrap(all.applied.first { $0.index == 43 }).slot
    let present = try XCTUnwrap(h.applied.first { $0.index == 50 }).slot
    XCTAssertNotEqual(missing, present, "write 50 overwrites the slot whose write is missing: pick others")
    XCTAssertFalse(all.applied.contains { $0.index < 43 && $0.slot == missing }, "an older write covers the slot")
    let c2 = try load.check(image: hole, baseline: baseline, mode: .consistent)
    XCTAssertEqual(c2.status, 1, c2.result.summary)
    XCTAssertEqual(c2.violations, ["slot \(missing): found baseline bytes, expected at least write 43 (interval 5)"])
    // The acked check says the same of the first 48 writes, nothing of the first 40.
    let a2 = try load.check(image: hole, baseline: baseline, mode: .acked(48))
    XCTAssertEqual(a2.status, 1, a2.result.summary)
    XCTAssertNotNil(a2.violation(slot: missing), a2.result.stdout)
    XCTAssertEqual(try load.check(image: hole, baseline: baseline, mode: .acked(40)).status, 0)

    // Without write 50, interval 5 is the highest and may be partial.
    let top = try copy(baseline, to: s.path("top.img"))
    XCTAssertEqual(try load.apply(image: top, upto: 48, skip: [43]).result.status, 0)
    let c3 = try load.check(image: top, baseline: baseline, mode: .consistent)
    XCTAssertEqual(c3.status, 0, c3.result.summary)

    // An older write in place of the latest one of its slot fails too:
    // 16 slots, so that intervals share slots.
    let small = StampedLoad(seed: 78, writeSize: 1024, slots: 16, flushEvery: 8)
    let order = try small.apply(image: try copy(baseline, to: s.path("order.img")), upto: 56).applied
    XCTAssertEqual(order.count, 56)
    for k in 0..<7 {
      let slots = order.filter { $0.interval == k }.map(\.slot)
      XCTAssertEqual(Set(slots).count, 8, "interval \(k) repeats a slot: \(slots)")
    }
    let newer = try XCTUnwrap(order.first { n in n.interval == 5 && order[..<40].contains { $0.slot == n.slot } })
    let older = try XCTUnwrap(order[..<40].last { $0.slot == newer.slot })
    let next = try XCTUnwrap(order.first { $0.interval == 6 && $0.slot != newer.slot })
    let old = try copy(baseline, to: s.path("old.img"))
    XCTAssertEqual(try small.apply(image: old, upto: 48, skip: [newer.index], extra: [next.index]).result.status, 0)
    let c4 = try small.check(image: old, baseline: baseline, mode: .consistent)
    XCTAssertEqual(c4.status, 1, c4.result.summary)
    XCTAssertEqual(
      c4.violations,
      [
        "slot \(newer.slot): found write \(older.index) (interval \(older.interval)), "
          + "expected at least write \(newer.index) (interval 5)"
      ])
    XCTAssertEqual(try small.check(image: old, baseline: baseline, mode: .acked(40)).status, 0)
  }

  // MARK: (c) Foreign bytes

  /// One flipped byte in a stamp's filler, one in its header, one in a
  /// slot never written, a stamp's first sector torn back to the
  /// baseline's, and a stamp copied into another slot: each fails, naming
  /// that slot and nothing else.
  func testForeignBytesInASlotFail() throws {
    try StampedLoad.require()
    let s = try Scratch()
    let baseline = try s.randomFile("baseline.img", size: 2 << 20, seed: 43)
    let load = StampedLoad(seed: 5, writeSize: 2048, slots: 1024, flushEvery: 8)
    let good = try copy(baseline, to: s.path("good.img"))
    let a = try load.apply(image: good, upto: 24)
    XCTAssertEqual(a.result.status, 0, a.result.summary)
    XCTAssertEqual(try load.check(image: good, baseline: baseline, mode: .consistent).status, 0)
    let goodData = try s.read("good.img")
    let written = Set(a.applied.map(\.slot))
    let slot = a.applied[5].slot
    let last = try XCTUnwrap(a.applied.last { $0.slot == slot }).index
    let unwritten = try XCTUnwrap((0..<load.slots).first { !written.contains($0) })

    func damaged(_ name: String, at offset: Int, _ bytes: [UInt8]) throws -> StampedLoad.Check {
      try s.file(name, goodData)
      try s.patch(name, at: offset, bytes)
      return try load.check(image: s.path(name), baseline: baseline, mode: .consistent)
    }
    func flipped(_ offset: Int) -> [UInt8] { [goodData[offset] ^ 0x01] }

    let filler = try damaged("filler.img", at: slot * 2048 + 1500, flipped(slot * 2048 + 1500))
    XCTAssertEqual(filler.status, 1, filler.result.summary)
    XCTAssertEqual(
      filler.violations, ["slot \(slot): found foreign bytes (a torn or damaged stamp), expected baseline or a stamp"])

    // Byte 16 is the low byte of the write's index.
    let header = try damaged("header.img", at: slot * 2048 + 16, flipped(slot * 2048 + 16))
    XCTAssertEqual(header.status, 1, header.result.summary)
    XCTAssertEqual(header.violations.count, 1, header.result.stdout)
    XCTAssertTrue(header.violation(slot: slot)?.contains("foreign bytes") == true, header.result.stdout)

    let base = try damaged("base.img", at: unwritten * 2048 + 7, flipped(unwritten * 2048 + 7))
    XCTAssertEqual(base.status, 1, base.result.summary)
    XCTAssertEqual(base.violations, ["slot \(unwritten): found foreign bytes (no stamp), expected baseline or a stamp"])

    // A torn write: the first sector of a stamp gone back to the baseline's.
    let sector = [UInt8](try Data(contentsOf: URL(fileURLWithPath: baseline))[(slot * 2048)..<(slot * 2048 + 512)])
    let torn = try damaged("torn.img", at: slot * 2048, sector)
    XCTAssertEqual(torn.status, 1, torn.result.summary)
    XCTAssertEqual(torn.violations.count, 1, torn.result.stdout)
    XCTAssertNotNil(torn.violation(slot: slot), torn.result.stdout)

    // Slot `slot`'s stamp, whole and valid, in the unwritten slot.
    let stampBytes = [UInt8](goodData[(slot * 2048)..<(slot * 2048 + 2048)])
    let moved = try damaged("moved.img", at: unwritten * 2048, stampBytes)
    XCTAssertEqual(moved.status, 1, moved.result.summary)
    XCTAssertEqual(
      moved.violations,
      ["slot \(unwritten): found write \(last) of slot \(slot), which belongs in slot \(slot)"])
  }

  // MARK: (d) The writer's server killed

  /// nbdkit killed with -9 under the writer: it exits 3 with a `stopped`
  /// line naming at least what it had flushed, and no more than one interval
  /// beyond; the image holds every flushed write and is at a consistency
  /// point; a later run continues the same history from the last flushed
  /// count, and the image then holds that run's writes too.
  func testWriterStopsWhenItsServerIsKilledAndTheFlushedWritesRemain() throws {
    try require("nbdkit", "nbdinfo")
    try StampedLoad.require()
    let r = try RRTRig(size: 16 << 20, seed: 37)
    rigs.append(r)
    try r.startBackup(.nbdkit(filters: ["delay"], parameters: ["delay-write=1ms"]))
    let baseline = try r.s.file("baseline.img", r.original)
    let load = StampedLoad(seed: 2002, writeSize: 3584, slots: 4096, flushEvery: 16)
    let log = r.s.path("writer.log")

    let writer = try load.startWriter(uri: r.backupURI, log: log, output: r.s.path("writer"))
    r.others.append(writer)
    let end = RRTEnv.monotonic() + 60
    while StampedLoad.Log(path: log).flushed.count < 10 && writer.isRunning && RRTEnv.monotonic() < end {
      RRTEnv.sleep(0.02)
    }
    XCTAssertTrue(writer.isRunning, "the writer ended early: \(writer.errors)")
    r.backupServer?.kill9()
    let status = writer.wait(timeout: 30)
    XCTAssertEqual(status, 3, "writer: \(writer.errors)")

    let l = StampedLoad.Log(path: log)
    let stopped = try XCTUnwrap(l.stopped, "no stopped line in the log")
    XCTAssertGreaterThanOrEqual(l.flushed.count, 10)
    XCTAssertEqual(l.flushed, Array(stride(from: 16, through: l.lastFlushed, by: 16)))
    XCTAssertGreaterThanOrEqual(stopped.issued, l.lastFlushed)
    XCTAssertLessThanOrEqual(stopped.issued, l.lastFlushed + 16, "a write of the next interval before its FLUSH")
    XCTAssertFalse(stopped.reason.isEmpty)

    let acked = try load.check(
      image: r.backupPath, baseline: baseline, mode: .acked(l.lastFlushed), maxIndex: stopped.issued)
    XCTAssertEqual(acked.status, 0, acked.result.summary)
    let consistent = try load.check(
      image: r.backupPath, baseline: baseline, mode: .consistent, maxIndex: stopped.issued)
    XCTAssertEqual(consistent.status, 0, consistent.result.summary)
    // Writes never issued are not there.
    let beyond = try load.check(
      image: r.backupPath, baseline: baseline, mode: .acked(stopped.issued + 16), maxIndex: stopped.issued)
    XCTAssertEqual(beyond.status, 1, beyond.result.summary)
    XCTAssertGreaterThan(beyond.violations.count, 0)

    // A second run continues the history from the last flushed count.
    try r.startBackup()
    let again = try load.write(uri: r.backupURI, log: log, count: 32, start: l.lastFlushed)
    XCTAssertEqual(again.status, 0, again.summary)
    let l2 = StampedLoad.Log(path: log)
    XCTAssertEqual(l2.flushed.suffix(2), [l.lastFlushed + 16, l.lastFlushed + 32])
    let after = try load.check(
      image: r.backupPath, baseline: baseline, mode: .acked(l.lastFlushed + 32), maxIndex: l.lastFlushed + 32)
    XCTAssertEqual(after.status, 0, after.result.summary)
    XCTAssertEqual(try load.check(image: r.backupPath, baseline: baseline, mode: .consistent).status, 0)
  }
}
