// What a stopped journal owes one far copy (MirrorJournalOwed, behind
// overwrite-map owed), on journals kept by MirrorJournal itself: the
// changes of the intervals the copy has not flushed, those after the last
// interval end, and the blocks of the activity log's regions, at the
// journal's geometry; a torn tail is not read, damage and a journal in use
// are refused.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class MirrorJournalOwedTests: XCTestCase {
  let size: UInt64 = 32 << 20
  let blockSize: UInt32 = 4096
  var dir = ""
  var path: String { dir + "/disk.map.mirror" }
  var logPath: String { dir + "/disk.map.al" }

  override func setUpWithError() throws {
    dir = try makeTempDirectory()
  }

  func open(_ copies: [String] = ["a", "b"]) throws -> MirrorJournal {
    try MirrorJournal(
      path: path, mapID: ID128(high: 1, low: 2), geometry: BlockGeometry(blockSize: blockSize, deviceSize: size),
      copyNames: copies, bound: MirrorLagBound(bytes: 0, seconds: 0), log: { _ in }
    ) { _, _, _ in }
  }

  /// An activity log naming `regions` (of 4 MiB).
  func saveLog(_ regions: [UInt64]) throws {
    var m = BlockMap(
      geometry: try BlockGeometry(blockSize: 4 << 20, deviceSize: size), meaning: .selected, deviceName: "disk.img")
    for r in regions { m.bits[r] = true }
    try MapFile.save(m, to: logPath)
  }

  func blocks(_ m: BlockMap) -> Set<UInt64> { Set(m.bits.extents.flatMap { $0 }) }

  /// Interval 1 (block 0) shipped to copy a; interval 2 (a write over
  /// blocks 256-258, a zero of blocks 512-527) closed; a write into block
  /// 5120 left open. The journal is closed on return.
  func keep() throws {
    let j = try open()
    let first = [UInt8](repeating: 1, count: 4096)
    try first.withUnsafeBytes { try j.append(.write, offset: 0, length: 4096, payload: $0) }
    try j.closeInterval(sync: true)
    guard case .ship(let c1)? = j.next(after: 0, timeout: 1) else { return XCTFail("interval 1 not offered") }
    try j.shipped(copy: 0, c1)
    let second = [UInt8](repeating: 2, count: 8192)
    try second.withUnsafeBytes { try j.append(.write, offset: (1 << 20) + 100, length: 8192, payload: $0) }
    try j.append(.zero, offset: 2 << 20, length: 65536, payload: nil)
    try j.closeInterval(sync: true)
    let open = [UInt8](repeating: 3, count: 10)
    try open.withUnsafeBytes { try j.append(.write, offset: 20 << 20, length: 10, payload: $0) }
    try j.sync()
  }

  func testOwedIsWhatTheCopyLacksWhatNoFlushClosedAndTheLoggedRegions() throws {
    try keep()
    try saveLog([7])
    let interval2: Set<UInt64> = Set(256...258).union(512..<528)
    let logged = Set<UInt64>(7168..<8192)

    let a = try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "a")
    XCTAssertEqual(blocks(a.map), interval2.union([5120]).union(logged))
    XCTAssertEqual(a.copyIndex, 0)
    XCTAssertEqual(a.copyInterval, 1)
    XCTAssertEqual(a.intervals, 1)
    XCTAssertEqual(a.intervalChanges, 2)
    XCTAssertEqual(a.openChanges, 1)
    XCTAssertNil(a.tornAt)
    XCTAssertEqual(a.journalBlocks, 20)
    XCTAssertEqual(a.regions, 1)
    XCTAssertEqual(a.regionBlocks, 1024)
    XCTAssertEqual(a.map.meaning, .changed)
    XCTAssertEqual(a.map.trackingStarted, .unset)
    XCTAssertEqual(a.map.deviceName, "disk.img")
    XCTAssertEqual(a.map.geometry, try BlockGeometry(blockSize: blockSize, deviceSize: size))

    // Copy b holds nothing: interval 1 is owed too; by place as by name.
    let b = try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "1")
    XCTAssertEqual(b.copy, "b")
    XCTAssertEqual(blocks(b.map), interval2.union([0, 5120]).union(logged))
    XCTAssertEqual(b.intervals, 2)

    XCTAssertThrowsError(try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: nil)) {
      XCTAssertTrue("\($0)".contains("names 2 far copies (0: a, 1: b)"), "\($0)")
    }
    XCTAssertThrowsError(try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "c")) {
      XCTAssertTrue("\($0)".contains("names no far copy c; it names 0: a, 1: b"), "\($0)")
    }
  }

  func testATornTailIsNotReadAndDamageIsRefused() throws {
    try keep()
    try saveLog([])
    let clean = try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "a")
    let h = try XCTUnwrap(FileHandle(forUpdatingAtPath: path))
    let end = try h.seekToEnd()
    // Half a record: a torn tail, not read, the rest as before.
    try h.write(contentsOf: Data([0x44, 0x52, 0x4A, 0x52, 1, 0, 0, 0]))
    let torn = try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "a")
    XCTAssertEqual(torn.tornAt, Int(end))
    XCTAssertEqual(blocks(torn.map), blocks(clean.map))
    // A payload byte of interval 2's first write, interval 2's end after it.
    let bytes = try readFileBytes(path)
    let record = try XCTUnwrap(
      stride(from: 4096, to: bytes.count - 48, by: 8).first {
        bytes[$0..<$0 + 4] == [0x44, 0x52, 0x4A, 0x52] && bytes[$0 + 12] == 2 && bytes[$0 + 4] == 1
      })
    try h.seek(toOffset: UInt64(record + 44 + 3))
    try h.write(contentsOf: Data([0xEE]))
    try h.close()
    XCTAssertThrowsError(try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "a")) {
      XCTAssertTrue("\($0)".contains("refusing to read what it owes from it"), "\($0)")
    }
  }

  func testAJournalInUseIsRefused() throws {
    let j = try open()
    try saveLog([])
    XCTAssertThrowsError(try MirrorJournalOwed.read(journal: path, activityLog: logPath, copy: "a")) {
      XCTAssertTrue("\($0)".contains("is locked: the server that keeps this mirror journal is running"), "\($0)")
    }
    withExtendedLifetime(j) {}
  }
}
