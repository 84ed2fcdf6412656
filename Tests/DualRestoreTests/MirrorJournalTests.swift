// The mirror journal as asynchronous mirroring keeps it (MirrorJournal), on
// real files in a directory of each test's own: recovery hands on exactly
// the complete intervals a copy lacks and cuts the rest, refuses damage and
// journals or positions that are not this map's and leaves them as they
// were; positions advance with what was shipped; batches of changes make
// up their interval; large writes take several records; writers wait while
// the copies owe too much; a shipper is offered only durable intervals and
// told to close an open one that is old or that writers wait on; and the
// consumed start of a long journal is punched out.

import CShim
import Dispatch
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class MirrorJournalTests: XCTestCase {
  let map = ID128(high: 0x6d61_7020_6964, low: 42)
  let far = "nbd+unix:///disk?socket=/run/far.sock"
  var dir = ""
  var journalName = "disk.map.journal"
  var path: String { dir + "/" + journalName }
  var positionsPath: String { path + ".positions" }

  override func setUpWithError() throws {
    dir = try makeTempDirectory()
  }

  /// A change as recovery hands it on.
  struct Change: Equatable, CustomStringConvertible {
    var type: MirrorJournalRecordType
    var offset: UInt64
    var length: UInt64
    var description: String { "\(type) \(length)@\(offset)" }
  }

  /// The lines a journal logged.
  final class Lines: Sendable {
    private let lines = Locked<[String]>([])
    func add(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
    func contains(_ needle: String) -> Bool { all.contains { $0.contains(needle) } }
  }

  // MARK: Helpers

  /// Opens (creates or recovers) the journal at `path`: it, what recovery
  /// handed on, and its log.
  func open(
    copies: [String]? = nil, bound: MirrorLagBound = MirrorLagBound(bytes: 0, seconds: 0), size: UInt64 = 16 << 20,
    blockSize: UInt32 = 4096, map: ID128? = nil
  ) throws -> (journal: MirrorJournal, unshipped: [Change], log: Lines) {
    let log = Lines()
    var unshipped: [Change] = []
    let journal = try MirrorJournal(
      path: path, mapID: map ?? self.map, geometry: BlockGeometry(blockSize: blockSize, deviceSize: size),
      copyNames: copies ?? [far], bound: bound, log: { log.add($0) }
    ) { type, offset, length in unshipped.append(Change(type: type, offset: offset, length: length)) }
    return (journal, unshipped, log)
  }

  /// Opens the journal, runs `body` on it and lets it go (its file closed)
  /// before returning its log.
  @discardableResult
  func with(copies: [String]? = nil, size: UInt64 = 16 << 20, _ body: (MirrorJournal) throws -> Void) throws -> Lines {
    let (journal, _, log) = try open(copies: copies, size: size)
    try body(journal)
    return log
  }

  /// Seeded bytes, different for each `seed`.
  func data(_ count: Int, _ seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    return rng.bytes(count)
  }

  @discardableResult
  func write(_ j: MirrorJournal, _ offset: UInt64, _ bytes: [UInt8]) throws -> Change {
    try bytes.withUnsafeBytes { try j.append(.write, offset: offset, length: UInt64(bytes.count), payload: $0) }
    return Change(type: .write, offset: offset, length: UInt64(bytes.count))
  }

  @discardableResult
  func change(_ j: MirrorJournal, _ type: MirrorJournalRecordType, _ offset: UInt64, _ length: UInt64) throws
    -> Change
  {
    try j.append(type, offset: offset, length: length, payload: nil)
    return Change(type: type, offset: offset, length: length)
  }

  func fileSize(_ p: String? = nil) -> Int {
    var st = stat()
    guard stat(p ?? path, &st) == 0 else { return -1 }
    return Int(st.st_size)
  }

  func scanFile() throws -> MirrorJournalScan {
    let bytes = try readFileBytes(path)
    let result = bytes.withUnsafeBytes { p in
      Result { () throws(MirrorJournalDamage) in try MirrorJournalFormat.scan(p) }
    }
    return try result.get()
  }

  /// The interval the journal offers next after `interval`, which must be
  /// one to ship.
  func nextShip(
    _ j: MirrorJournal, after interval: UInt64, file: StaticString = #filePath, line: UInt = #line
  ) -> ClosedInterval? {
    guard case .ship(let c)? = j.next(after: interval, timeout: 1) else {
      XCTFail("no interval after \(interval) to ship", file: file, line: line)
      return nil
    }
    return c
  }

  /// Every change of `closed`, read `limit` at a time as a shipper does.
  func changes(_ j: MirrorJournal, _ closed: ClosedInterval, limit: Int) throws -> [JournaledChange] {
    var all: [JournaledChange] = []
    var from = closed.start
    var calls = 0
    while true {
      let (batch, next) = try j.changes(of: closed, from: from, limit: limit)
      XCTAssertLessThanOrEqual(batch.count, limit)
      all += batch
      calls += 1
      if batch.count < limit || calls > 100_000 { break }
      from = next
    }
    return all
  }

  func payload(_ j: MirrorJournal, _ c: JournaledChange) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(c.length))
    try out.withUnsafeMutableBytes { try j.read(into: $0, at: c.payloadAt) }
    return out
  }

  /// Sets a record's CRC-32C right again after its bytes were changed.
  func recrc(_ bytes: inout [UInt8], record: Int) {
    let payload = (0..<4).reduce(0) { $0 | Int(bytes[record + 8 + $1]) << (8 * $1) }
    let checked = MirrorJournalFormat.recordHeaderLength + payload
    let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + record, checked) }
    for i in 0..<4 { bytes[record + checked + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
  }

  func setFile(_ bytes: [UInt8], _ p: String? = nil) throws {
    try writeDenseFile(p ?? path, bytes)
  }

  // MARK: Recovery

  func testReopenHandsOnTheCompleteIntervalsInOrderAndCutsTheOpenOne() throws {
    var expected: [Change] = []
    var closedEnd = 0
    let created = try with { j in
      expected += [
        try write(j, 0, data(5000, 1)), try change(j, .zero, 8192, 8192), try change(j, .trim, 65536, 4096),
      ]
      XCTAssertEqual(try j.closeInterval(sync: true), 1)
      expected += [try write(j, 300, data(100, 2)), try change(j, .zero, 0, 1)]
      XCTAssertEqual(try j.closeInterval(sync: false), 2)
      XCTAssertEqual(try j.closeInterval(sync: true), 2, "nothing open: nothing closed")
      closedEnd = fileSize()
      try write(j, 0, data(4096, 3))
      try change(j, .zero, 4096, 512)
    }
    XCTAssertTrue(created.contains("created the mirror journal \(path)"), "\(created.all)")
    let cut = fileSize() - closedEnd
    XCTAssertGreaterThan(cut, 4096)
    let (j, unshipped, log) = try open()
    XCTAssertEqual(unshipped, expected)
    XCTAssertEqual(fileSize(), closedEnd, "the open interval is cut off the file")
    XCTAssertTrue(
      log.contains(
        "the mirror journal \(path) ended inside an interval: cut \(cut) byte(s) at offset \(closedEnd) "
          + "(2 change(s) not closed by a flush"), "\(log.all)")
    XCTAssertTrue(log.contains("holds 2 interval(s)"), "\(log.all)")
    XCTAssertEqual(j.lag.map(\.intervals), [2])
    XCTAssertEqual(j.lag.map(\.bytes), [5000 + 8192 + 4096 + 100 + 1])
    // The journal goes on after the cut: intervals and sequences continue.
    try write(j, 777, data(10, 4))
    XCTAssertEqual(try j.closeInterval(sync: true), 3)
    let scan = try scanFile()
    XCTAssertEqual(scan.intervals.map(\.interval), [1, 2, 3])
    XCTAssertTrue(scan.open.isEmpty)
    XCTAssertNil(scan.torn)
    XCTAssertEqual(nextShip(j, after: 2)?.interval, 3)
  }

  func testANewJournalReopensWithNothingToHandOn() throws {
    try with { _ in }
    XCTAssertEqual(fileSize(), 4096)
    let (j, unshipped, log) = try open()
    XCTAssertEqual(unshipped, [])
    XCTAssertEqual(log.all, [])
    XCTAssertEqual(j.lag, [MirrorLag(name: far, intervals: 0, bytes: 0, oldestSeconds: 0, interval: 0)])
  }

  /// A journal of two closed intervals and what they hold; the end of the
  /// second.
  func twoIntervals(_ extra: (MirrorJournal) throws -> Void = { _ in }) throws -> ([Change], Int) {
    var expected: [Change] = []
    var closedEnd = 0
    try with { j in
      expected += [try write(j, 0, data(3000, 10)), try write(j, 9000, data(500, 11))]
      expected += [try change(j, .zero, 4096, 4096)]
      try j.closeInterval(sync: true)
      expected += [try write(j, 100, data(100, 12))]
      try j.closeInterval(sync: true)
      closedEnd = fileSize()
      try extra(j)
    }
    return (expected, closedEnd)
  }

  func testTornTailIsCutNotRefused() throws {
    let record = MirrorJournalFormat.recordSize(payload: 2000)
    let tears: [(String, (Int) -> Int?, [UInt8])] = [
      ("in a record's header", { $0 + 20 }, []),
      ("in a record's payload", { $0 + 44 + 1000 }, []),
      ("in a record's checksum", { $0 + 44 + 2000 + 2 }, []),
      ("in the interval end after the record", { $0 + record + 30 }, []),
      ("garbage after the last interval end", { _ in nil }, data(777, 13)),
      ("zeros after the last interval end", { _ in nil }, [UInt8](repeating: 0, count: 8192)),
    ]
    for (n, (what, cutAt, appended)) in tears.enumerated() {
      journalName = "torn-\(n)"
      let (expected, closedEnd) = try twoIntervals { j in
        guard cutAt(0) != nil else { return }
        try self.write(j, 20000, self.data(2000, 14))
        try j.closeInterval(sync: true)
      }
      if let at = cutAt(closedEnd) {
        XCTAssertEqual(truncate(path, off_t(at)), 0)
      } else {
        try writeBytes(path, appended, at: UInt64(closedEnd))
      }
      let size = fileSize()
      let (_, unshipped, log) = try open()
      XCTAssertEqual(unshipped, expected, what)
      XCTAssertEqual(fileSize(), closedEnd, what)
      XCTAssertTrue(
        log.contains("ended inside an interval: cut \(size - closedEnd) byte(s) at offset \(closedEnd)"),
        "\(what): \(log.all)")
    }
  }

  func testABadRecordInTheOpenIntervalIsATornTail() throws {
    var openRecord = 0
    let (expected, closedEnd) = try twoIntervals { j in
      try self.write(j, 20000, self.data(2000, 15))
      openRecord = self.fileSize()
      try self.write(j, 30000, self.data(2000, 16))
    }
    var bytes = try readFileBytes(path)
    bytes[openRecord + 44 + 7] ^= 0x40
    try setFile(bytes)
    let (_, unshipped, log) = try open()
    XCTAssertEqual(unshipped, expected)
    XCTAssertEqual(fileSize(), closedEnd)
    XCTAssertTrue(log.contains("(1 change(s) not closed by a flush"), "\(log.all)")
  }

  func testDamageBeforeTheLastIntervalEndIsRefusedAndLeftAsItWas() throws {
    _ = try twoIntervals { j in try self.write(j, 20000, self.data(2000, 17)) }
    let clean = try readFileBytes(path)
    let scan = try scanFile()
    XCTAssertEqual(scan.intervals.count, 2)
    let secondWrite = scan.intervals[0].records[1].position
    let firstEnd = scan.intervals[0].endPosition
    let lastWrite = scan.intervals[1].records[0].position
    let damages: [(String, (inout [UInt8]) -> Void, [String])] = [
      (
        "a payload byte of a write in the first interval", { $0[secondWrite + 44 + 250] ^= 1 },
        ["the record at offset \(secondWrite) has a checksum that does not match"]
      ),
      (
        "a payload byte of the last interval's write", { $0[lastWrite + 44] ^= 0x80 },
        ["the record at offset \(lastWrite) has a checksum that does not match"]
      ),
      (
        "the first interval's end", { $0[firstEnd + 44] ^= 1 },
        ["the record at offset \(firstEnd) has a checksum that does not match"]
      ),
      (
        "a sequence set back, its checksum right",
        { bytes in
          bytes[lastWrite + 20] = 1
          for i in 21..<28 { bytes[lastWrite + i] = 0 }
          self.recrc(&bytes, record: lastWrite)
        },
        ["the record at offset \(lastWrite) has sequence 1, not above"]
      ),
      (
        "a record of a later interval before the first ended, its checksum right",
        { bytes in
          bytes[secondWrite + 12] = 2
          self.recrc(&bytes, record: secondWrite)
        },
        ["the record at offset \(secondWrite) is of interval 2 before interval 1 ended"]
      ),
    ]
    let positions = try readFileBytes(positionsPath)
    for (what, damage, needles) in damages {
      var bytes = clean
      damage(&bytes)
      try setFile(bytes)
      assertThrows(
        try open(), containing: [path + ": the mirror journal is damaged: "] + needles + ["refusing to replay it"],
        what)
      XCTAssertEqual(try readFileBytes(path), bytes, "\(what): the journal is left as it was")
      XCTAssertEqual(try readFileBytes(positionsPath), positions, "\(what): the positions are left as they were")
    }
    // And the clean journal still opens.
    try setFile(clean)
    XCTAssertEqual(try open().unshipped.count, 4)
  }

  // MARK: Positions

  func testShippedIntervalsAreNotHandedOnAgain() throws {
    var intervals: [[Change]] = []
    let sizes: [UInt64] = [3000, 4096 + 512, 70000]
    try with { j in
      for (n, size) in sizes.enumerated() {
        intervals.append([try write(j, UInt64(n) * 65536, data(Int(size), UInt64(20 + n)))])
        try j.closeInterval(sync: true)
      }
      XCTAssertEqual(j.lag.map(\.intervals), [3])
      XCTAssertEqual(j.lag.map(\.bytes), [sizes.reduce(0, +)])
      XCTAssertEqual(j.lag.map(\.interval), [0])
      XCTAssertGreaterThan(j.lag[0].oldestSeconds, 0)
      guard let c1 = nextShip(j, after: 0) else { return }
      XCTAssertEqual(c1.interval, 1)
      try j.shipped(copy: 0, c1)
      XCTAssertEqual(j.lag.map(\.intervals), [2])
      XCTAssertEqual(j.lag.map(\.bytes), [sizes[1] + sizes[2]])
    }
    XCTAssertEqual(try MirrorPositions.load(positionsPath)?.copies.map(\.interval), [1])
    do {
      let (j, unshipped, _) = try open()
      XCTAssertEqual(unshipped, intervals[1] + intervals[2])
      XCTAssertEqual(j.position(of: 0), 1)
      guard let c2 = nextShip(j, after: 1) else { return }
      XCTAssertEqual(c2.interval, 2)
      try j.shipped(copy: 0, c2)
    }
    do {
      let (j, unshipped, log) = try open()
      XCTAssertEqual(unshipped, intervals[2])
      XCTAssertTrue(log.contains("holds 1 interval(s)"), "\(log.all)")
      guard let c3 = nextShip(j, after: 2) else { return }
      XCTAssertEqual(c3.interval, 3)
      try j.shipped(copy: 0, c3)
      XCTAssertEqual(j.lag.map(\.intervals), [0])
      XCTAssertEqual(j.lag.map(\.bytes), [0])
      XCTAssertEqual(j.lag.map(\.oldestSeconds), [0])
      XCTAssertEqual(j.lag.map(\.interval), [3])
      XCTAssertTrue(j.drained)
      XCTAssertNil(j.next(after: 3, timeout: 0.05))
    }
    let (j, unshipped, log) = try open()
    XCTAssertEqual(unshipped, [])
    XCTAssertEqual(log.all, [])
    XCTAssertEqual(j.lag.map(\.bytes), [0])
    // New intervals go on from 4.
    try write(j, 0, data(10, 23))
    XCTAssertEqual(try j.closeInterval(sync: true), 4)
  }

  func testMissingPositionsFileIsRefused() throws {
    _ = try twoIntervals()
    let bytes = try readFileBytes(path)
    XCTAssertEqual(unlink(positionsPath), 0)
    assertThrows(
      try open(),
      containing: [
        "\(positionsPath) is missing: without it nobody knows what the far copies lack of \(path), which holds changes"
      ])
    XCTAssertEqual(try readFileBytes(path), bytes)
    XCTAssertFalse(pathExists(positionsPath))
    // A journal of no records is refused too: it cannot tell where the copies are.
    journalName = "empty"
    try with { _ in }
    XCTAssertEqual(unlink(positionsPath), 0)
    assertThrows(try open(), containing: ["\(positionsPath) is missing"])
  }

  func testPositionsOfAnotherJournalAreRefused() throws {
    _ = try twoIntervals()
    let mine = path
    let bytes = try readFileBytes(mine)
    journalName = "other"
    var other = ID128.none
    try with { other = $0.header.journal }
    let otherPositions = try readFileBytes(positionsPath)
    journalName = "disk.map.journal"
    try setFile(otherPositions, positionsPath)
    assertThrows(try open(), containing: ["\(positionsPath) is the positions file of journal \(other), not of \(mine)"])
    XCTAssertEqual(try readFileBytes(mine), bytes)
    XCTAssertEqual(try readFileBytes(positionsPath), otherPositions)
  }

  func testJournalOfAnotherMapOrDeviceIsRefused() throws {
    _ = try twoIntervals()
    let bytes = try readFileBytes(path)
    let positions = try readFileBytes(positionsPath)
    let otherMap = ID128(high: 1, low: 1)
    assertThrows(
      try open(map: otherMap), containing: ["\(path) is the mirror journal of map \(map), not of this overwrite map"])
    assertThrows(
      try open(size: 32 << 20),
      containing: ["\(path) describes \(16 << 20) bytes in blocks of 4096, not the map's \(32 << 20) in blocks of 4096"]
    )
    assertThrows(try open(blockSize: 512), containing: ["not the map's \(16 << 20) in blocks of 512"])
    XCTAssertEqual(try readFileBytes(path), bytes)
    XCTAssertEqual(try readFileBytes(positionsPath), positions)
    XCTAssertEqual(try open().unshipped.count, 4)
  }

  func testACopyNoLongerNamedIsLetGoAndANewOneStartsAtTheOldestKeptPosition() throws {
    var intervals: [[Change]] = []
    try with(copies: ["a", "b"]) { j in
      for n in 0..<3 {
        intervals.append([try write(j, UInt64(n) * 8192, data(1000, UInt64(30 + n)))])
        try j.closeInterval(sync: true)
      }
      guard let c1 = nextShip(j, after: 0), let c2 = nextShip(j, after: 1) else { return }
      try j.shipped(copy: 0, c1)
      try j.shipped(copy: 0, c2)
      try j.shipped(copy: 1, c1)
    }
    let (j, unshipped, log) = try open(copies: ["a", "c"])
    XCTAssertEqual(j.copyNames, ["a", "c"])
    XCTAssertTrue(
      log.contains("the far copy b is no longer mirrored to: it holds the changes up to interval 1"), "\(log.all)")
    XCTAssertTrue(
      log.contains("the far copy c is new to the journal \(path): it is sent the changes after interval 1"),
      "\(log.all)")
    XCTAssertEqual(j.position(of: 0), 2)
    XCTAssertEqual(j.position(of: 1), 1)
    XCTAssertEqual(unshipped, intervals[1] + intervals[2])
    XCTAssertEqual(j.lag.map(\.intervals), [1, 2])
    guard let c2 = nextShip(j, after: 1) else { return }
    XCTAssertEqual(c2.interval, 2)
    let got = try changes(j, c2, limit: 10)
    XCTAssertEqual(got.map { Change(type: $0.type, offset: $0.offset, length: $0.length) }, intervals[1])
    XCTAssertEqual(try payload(j, got[0]), data(1000, 31))
  }

  func testCopyNamesAPositionsFileCannotHoldAreRefusedBeforeAnythingIsMade() throws {
    let cases: [(String, [String], String)] = [
      ("a name of 1025 bytes", [String(repeating: "x", count: 1025)], "1025 bytes"),
      ("a name of 70000 bytes", [String(repeating: "é", count: 35000)], "70000 bytes"),
      ("an empty name", [far, ""], "empty"),
      ("65 copies", (0..<65).map { "nbd://far\($0)/disk" }, "65 far copies"),
      ("a name twice", [far, "b", far], "named twice"),
    ]
    for (n, (what, names, needle)) in cases.enumerated() {
      journalName = "refused-\(n)"
      assertThrows(try open(copies: names), containing: [needle], what)
      XCTAssertFalse(pathExists(path), "\(what): no journal is made")
      XCTAssertFalse(pathExists(positionsPath), "\(what): no positions file is made")
    }
    // The most a positions file holds is fine, and reopens.
    journalName = "most"
    let most = (0..<64).map { "\($0)" + String(repeating: "y", count: 1024 - "\($0)".count) }
    try with(copies: most) { _ in }
    XCTAssertEqual(try open(copies: most).journal.copyNames, most)
  }

  // MARK: Reading and appending

  func testChangesInSmallBatchesMakeUpTheInterval() throws {
    let (j, _, _) = try open()
    var rng = SplitMix64(seed: testSeed(0x6261_7463))
    var expected: [Change] = []
    var written: [[UInt8]] = []
    for n in 0..<60 {
      let length = n % 7 == 0 ? 70000 + rng.next() % 5000 : 1 + rng.next() % 3000
      let offset = rng.next() % ((16 << 20) - length)
      switch rng.next() % 3 {
      case 0:
        expected.append(try change(j, rng.next() % 2 == 0 ? .zero : .trim, offset, length))
        written.append([])
      default:
        let bytes = data(Int(length), rng.next())
        expected.append(try write(j, offset, bytes))
        written.append(bytes)
      }
    }
    try j.closeInterval(sync: true)
    guard let c = nextShip(j, after: 0) else { return }
    let whole = try changes(j, c, limit: 1000)
    XCTAssertEqual(whole.map { Change(type: $0.type, offset: $0.offset, length: $0.length) }, expected)
    for limit in [1, 2, 7, 59, 60] {
      XCTAssertEqual(try changes(j, c, limit: limit), whole, "limit \(limit)")
    }
    for (k, change) in whole.enumerated() where change.type == .write {
      XCTAssertEqual(try payload(j, change), written[k], "change \(k)")
    }
    // The next position after the last batch is the interval's end record.
    let (_, next) = try j.changes(of: c, from: c.start, limit: 1000)
    XCTAssertEqual(next, c.end - UInt64(MirrorJournalFormat.recordSize(payload: 0)))
  }

  func testWritesLargerThanFourMiBTakeSeveralRecords() throws {
    let big = data((10 << 20) + 5, 40)
    try with(size: 64 << 20) { j in
      try write(j, 4096, big)
      try j.closeInterval(sync: true)
      guard let c = nextShip(j, after: 0) else { return }
      let got = try changes(j, c, limit: 100)
      XCTAssertEqual(
        got.map { Change(type: $0.type, offset: $0.offset, length: $0.length) },
        [
          Change(type: .write, offset: 4096, length: 4 << 20),
          Change(type: .write, offset: 4096 + (4 << 20), length: 4 << 20),
          Change(type: .write, offset: 4096 + (8 << 20), length: (2 << 20) + 5),
        ])
      XCTAssertEqual(try got.flatMap { try payload(j, $0) }, big)
      XCTAssertEqual(j.lag.map(\.bytes), [UInt64(big.count)])
    }
    let (_, unshipped, _) = try open(size: 64 << 20)
    XCTAssertEqual(unshipped.map(\.length), [4 << 20, 4 << 20, (2 << 20) + 5])
  }

  func testAChangeOfNoBytesJournalsNothing() throws {
    try with { j in
      try write(j, 0, data(100, 41))
      try write(j, 4096, [])
      try change(j, .zero, 8192, 0)
      try j.closeInterval(sync: true)
      try change(j, .trim, 0, 0)
      XCTAssertEqual(try j.closeInterval(sync: true), 1, "an interval of no change is not closed")
    }
    let (_, unshipped, _) = try open()
    XCTAssertEqual(unshipped, [Change(type: .write, offset: 0, length: 100)])
  }

  // MARK: Waits

  func testWritesWaitWhileTheCopiesOweMoreThanTheBound() throws {
    let (j, _, log) = try open(bound: MirrorLagBound(bytes: 1000, seconds: 0))
    try write(j, 0, data(4096, 50))
    // A second write finds the copy owing more than 1000 bytes, and waits.
    let done = DispatchSemaphore(value: 0)
    let failure = ErrorBox()
    let started = monotonicSeconds()
    let finished = Locked(0.0)
    let second = data(4096, 51)
    Thread.detachNewThread {
      do {
        try second.withUnsafeBytes { try j.append(.write, offset: 8192, length: 4096, payload: $0) }
      } catch {
        failure.set(error)
      }
      finished.withLock { $0 = monotonicSeconds() }
      done.signal()
    }
    XCTAssertEqual(done.wait(timeout: .now() + 0.3), .timedOut, "the write did not wait")
    XCTAssertTrue(log.contains("writes wait: the far copies owe"), "\(log.all)")
    // A writer waits on an open interval: the shipper is told to close it,
    // young as it is.
    let asked = monotonicSeconds()
    guard case .closeOpen? = j.next(after: 0, timeout: 5) else { return XCTFail("not told to close the interval") }
    XCTAssertLessThan(monotonicSeconds() - asked, 0.5)
    XCTAssertEqual(try j.closeInterval(sync: true), 1)
    guard let c = nextShip(j, after: 0) else { return }
    XCTAssertEqual(done.wait(timeout: .now() + 0.2), .timedOut, "the write went on before the copy caught up")
    try j.shipped(copy: 0, c)
    XCTAssertEqual(done.wait(timeout: .now() + 5), .success, "the write still waits after the copy caught up")
    XCTAssertNil(failure.error)
    XCTAssertGreaterThanOrEqual(finished.withLock { $0 } - started, 0.5)
    XCTAssertEqual(j.lag.map(\.bytes), [4096])
  }

  func testWritesWaitWhileTheOldestChangeOwedIsOlderThanTheBound() throws {
    let (j, _, log) = try open(bound: MirrorLagBound(bytes: 0, seconds: 0.3))
    try write(j, 0, data(100, 52))
    try j.closeInterval(sync: true)
    Thread.sleep(forTimeInterval: 0.35)
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
      try? j.append(.zero, offset: 0, length: 4096, payload: nil)
      done.signal()
    }
    XCTAssertEqual(done.wait(timeout: .now() + 0.3), .timedOut, "the write did not wait")
    XCTAssertTrue(
      log.all.contains {
        $0.hasPrefix("writes wait: the far copies owe changes ") && $0.contains("s old, at the bound of 0.3 s")
      }, "\(log.all)")
    guard let c = nextShip(j, after: 0) else { return }
    try j.shipped(copy: 0, c)
    XCTAssertEqual(done.wait(timeout: .now() + 5), .success, "the write still waits after the copy caught up")
  }

  func testWritersWaitingOnAnIntervalNotYetDurableGetItMadeDurable() throws {
    let (j, _, _) = try open(bound: MirrorLagBound(bytes: 1000, seconds: 0))
    try write(j, 0, data(4096, 53))
    // Closed, its sync not yet done (a flush between its close and its sync).
    XCTAssertEqual(try j.closeInterval(sync: false), 1)
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
      try? j.append(.zero, offset: 0, length: 4096, payload: nil)
      done.signal()
    }
    XCTAssertEqual(done.wait(timeout: .now() + 0.3), .timedOut, "the write did not wait")
    let asked = monotonicSeconds()
    let work = j.next(after: 0, timeout: 3)
    guard case .closeOpen? = work else { return XCTFail("got \(String(describing: work)), not .closeOpen") }
    XCTAssertLessThan(monotonicSeconds() - asked, 0.5)
    XCTAssertEqual(try j.closeInterval(sync: true), 1, "nothing open: the close only syncs")
    guard let c = nextShip(j, after: 0) else { return }
    try j.shipped(copy: 0, c)
    XCTAssertEqual(done.wait(timeout: .now() + 5), .success, "the write still waits after the copy caught up")
  }

  func testNextOffersOnlyDurableClosedIntervalsAndClosesOldOpenOnes() throws {
    let (j, _, _) = try open()
    XCTAssertNil(j.next(after: 0, timeout: 0.05), "nothing to do")
    try write(j, 0, data(100, 60))
    XCTAssertNil(j.next(after: 0, timeout: 0.05), "a young open interval is left open")
    XCTAssertEqual(try j.closeInterval(sync: false), 1)
    XCTAssertNil(j.next(after: 0, timeout: 0.1), "an interval not yet durable is not offered")
    try j.sync()
    XCTAssertEqual(nextShip(j, after: 0)?.interval, 1)
    XCTAssertNil(j.next(after: 1, timeout: 0.05), "nothing after interval 1")
    // An open interval is closed by the shipper once it is a second old.
    try write(j, 4096, data(100, 61))
    let asked = monotonicSeconds()
    guard case .closeOpen? = j.next(after: 1, timeout: 5) else { return XCTFail("the open interval stays open") }
    let waited = monotonicSeconds() - asked
    XCTAssertGreaterThan(waited, 0.9)
    XCTAssertLessThan(waited, 3)
    XCTAssertEqual(try j.closeInterval(sync: true), 2)
    XCTAssertEqual(nextShip(j, after: 1)?.interval, 2)
    // A closed interval not yet durable ahead of an old open one: the
    // shipper is told to close (and so sync) rather than left waiting.
    XCTAssertEqual(try j.closeInterval(sync: false), 2, "nothing open")
    try write(j, 8192, data(100, 62))
    XCTAssertEqual(try j.closeInterval(sync: false), 3)
    try write(j, 12288, data(100, 63))
    Thread.sleep(forTimeInterval: 1.05)
    let before = threadCPUSeconds()
    let result = j.next(after: 2, timeout: 0.5)
    let cpu = threadCPUSeconds() - before
    guard case .closeOpen? = result else { return XCTFail("got \(String(describing: result)), not .closeOpen") }
    XCTAssertLessThan(cpu, 0.1, "next spun")
    XCTAssertEqual(try j.closeInterval(sync: true), 4)
    XCTAssertEqual(nextShip(j, after: 2)?.interval, 3)
    XCTAssertEqual(nextShip(j, after: 3)?.interval, 4)
    j.stop()
    guard case .stop? = j.next(after: 4, timeout: 1) else { return XCTFail("a stopped journal does not say stop") }
  }

  func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
  }

  // MARK: Punching

  func testShippedPastSixtyFourMiBPunchesTheConsumedStart() throws {
    let size: UInt64 = 128 << 20
    let (j, _, _) = try open(size: size)
    var block = data(4 << 20, 70)
    for n in 0..<17 {
      block[0] = UInt8(n)
      try write(j, UInt64(n) << 22, block)
    }
    try j.closeInterval(sync: true)
    let last = data(5000, 71)
    try write(j, 1 << 20, last)
    try j.closeInterval(sync: true)
    XCTAssertTrue(try holeRanges(path).filter { $0.count >= 1 << 20 }.isEmpty)
    guard let c1 = nextShip(j, after: 0), let c2 = nextShip(j, after: 1) else { return }
    XCTAssertGreaterThan(c2.start, 68 << 20)
    try j.shipped(copy: 0, c1)
    let holes = try holeRanges(path)
    XCTAssertTrue(isInside((1 << 20)..<(64 << 20), holes), "holes: \(holes)")
    var st = stat()
    XCTAssertEqual(stat(path, &st), 0)
    XCTAssertLessThan(Int(st.st_blocks) * 512, 8 << 20, "the consumed start still takes its space")
    var probe = [UInt8](repeating: 1, count: 4096)
    try probe.withUnsafeMutableBytes { try j.read(into: $0, at: 32 << 20) }
    XCTAssertTrue(probe.allSatisfy { $0 == 0 })
    // The header and the interval still owed are intact.
    let head = try readFileBytes(path).prefix(4096)
    XCTAssertEqual(try MirrorJournalHeader(decoding: head), j.header)
    let owed = try changes(j, c2, limit: 10)
    XCTAssertEqual(owed.count, 1)
    XCTAssertEqual(try owed.first.map { try payload(j, $0) }, last)
    XCTAssertEqual(try j.closeInterval(sync: true), 2)
    _ = consume j
    let (again, unshipped, log) = try open(size: size)
    XCTAssertEqual(unshipped, [Change(type: .write, offset: 1 << 20, length: 5000)], "\(log.all)")
    XCTAssertEqual(nextShip(again, after: 1)?.interval, 2)
  }
}
