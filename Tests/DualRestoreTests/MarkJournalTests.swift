// The change map's journal (dualrestore-map(5), "THE CHANGE MAP'S
// JOURNAL"): its scan takes what holds and nothing else (records up to the
// first that fails, the higher of two good cuts, a version-1 journal without
// cuts), its writer lays cuts and records out as the scan reads them, and a
// change map that stops without closing comes back from it whole: a cut not
// yet settled is finished (the ended map saved to its output, the new one
// live), a settled one is not done again, an undone one loses no mark, and
// a journal that fills up saves the ended map before it starts again. The
// fuzz target's own checks are run here on journals whole and damaged.

import CShim
import DualRestoreFuzz
import Glibc
import XCTest

@testable import DualRestore

final class MarkJournalTests: XCTestCase {
  typealias F = MarkJournalFormat

  let journalID: UInt64 = 0x0123_4567_89ab_cdef
  let mapA = ID128(high: 0x1111_2222_3333_4444, low: 0x5555_6666_7777_8888)
  let mapB = ID128(high: 9, low: 10)

  func cut(_ number: UInt64, output: String = "/var/lib/dualrestore/ended.map") -> MarkJournalCut {
    MarkJournalCut(
      number: number, ending: mapA, endingStarted: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_001),
      started: mapB, startedAt: Instant(nanosecondsSinceEpoch: 1_764_000_000_500_000_002), output: output)
  }

  /// A journal's bytes: the header of `id` (version 1 with `v1`), its cut
  /// slots empty, then room for `room` records, the first holding
  /// `records` of (map, blocks) in sequence from 0 (under `recordID`).
  func journal(
    id: UInt64? = nil, v1: Bool = false, records: [(ID128, Range<UInt64>)] = [], recordID: UInt64? = nil,
    room: Int = 8
  ) -> [UInt8] {
    let id = id ?? journalID
    var bytes = F.header(journalID: id) + [UInt8](repeating: 0, count: room * F.recordLength)
    if v1 {
      bytes.replaceSubrange(0..<8, with: F.magicV1)
      putCRC(&bytes, of: 0..<16)
    }
    for (i, r) in records.enumerated() {
      F.encodeRecord(
        into: &bytes, at: F.headerLength + i * F.recordLength, journalID: recordID ?? id, map: r.0, blocks: r.1,
        sequence: UInt32(i))
    }
    return bytes
  }

  func put(_ cut: MarkJournalCut, slot: Int, into bytes: inout [UInt8], journalID id: UInt64? = nil) throws {
    let c = try XCTUnwrap(F.encode(cut, journalID: id ?? journalID))
    bytes.replaceSubrange(F.cutSlots[slot]..<F.cutSlots[slot] + c.count, with: c)
  }

  func putLE<T: FixedWidthInteger>(_ v: T, at: Int, into bytes: inout [UInt8]) {
    for i in 0..<MemoryLayout<T>.size { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
  }

  /// Stores the CRC-32C of `range` right after it.
  func putCRC(_ bytes: inout [UInt8], of range: Range<Int>) {
    let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + range.lowerBound, range.count) }
    putLE(crc, at: range.upperBound, into: &bytes)
  }

  func blocks(_ c: MarkJournalContents?) -> [Range<UInt64>] { c?.records.map(\.blocks) ?? [] }

  // MARK: The scan

  func testAVersion2HeaderRoundTrips() throws {
    let h = F.header(journalID: journalID)
    XCTAssertEqual(h.count, 4096)
    XCTAssertEqual(Array(h[0..<8]), Array("DRMARKJ2".utf8))
    XCTAssertEqual(Array(h[8..<16]), [0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01], "the id, little-endian")
    let crc = h.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 16) }
    XCTAssertEqual(Array(h[16..<20]), (0..<4).map { UInt8(truncatingIfNeeded: crc >> (8 * $0)) })
    XCTAssertTrue(h[20...].allSatisfy { $0 == 0 }, "the cut slots start empty")
    let c = try XCTUnwrap(F.scan(h))
    XCTAssertEqual(c, MarkJournalContents(version: 2, journalID: journalID, cut: nil, records: [], end: 4096))
  }

  func testAVersion1JournalsRecordsAreReadAndItHasNoCut() throws {
    var bytes = journal(v1: true, records: [(mapA, 5..<9), (mapB, 0..<1)])
    // A cut a version-2 writer would keep, which version 1 has no room for.
    try put(cut(1), slot: 1, into: &bytes)
    let c = try XCTUnwrap(F.scan(bytes))
    XCTAssertEqual(c.version, 1)
    XCTAssertEqual(c.journalID, journalID)
    XCTAssertNil(c.cut)
    XCTAssertEqual(c.records.map(\.map), [mapA, mapB])
    XCTAssertEqual(blocks(c), [5..<9, 0..<1])
    XCTAssertEqual(c.end, 4096 + 2 * 48)
    // The same bytes as version 2 have the cut.
    bytes.replaceSubrange(0..<8, with: F.magic)
    putCRC(&bytes, of: 0..<16)
    XCTAssertEqual(F.scan(bytes)?.cut, cut(1))
  }

  func testWhatIsNoJournalIsNil() {
    let good = journal(records: [(mapA, 1..<2)])
    XCTAssertNotNil(F.scan(good))
    var magic = good
    magic.replaceSubrange(0..<8, with: Array("DRMARKJ3".utf8))
    putCRC(&magic, of: 0..<16)
    XCTAssertNil(F.scan(magic), "an unknown magic")
    var crc = good
    crc[17] ^= 1
    XCTAssertNil(F.scan(crc), "a bad header CRC")
    var id = good
    id[8] ^= 1
    XCTAssertNil(F.scan(id), "an id its CRC does not hold for")
    XCTAssertNil(F.scan(Array(good.prefix(4095))), "shorter than the header")
    XCTAssertNil(F.scan([]))
    XCTAssertNotNil(F.scan(Array(good.prefix(4096))), "the header alone is a journal")
  }

  func testRecordsEndAtTheFirstThatFails() throws {
    let records: [(ID128, Range<UInt64>)] = [(mapA, 0..<4), (mapB, 10..<11), (mapA, 20..<30), (mapA, 40..<41)]
    let good = journal(records: records)
    XCTAssertEqual(blocks(F.scan(good)), [0..<4, 10..<11, 20..<30, 40..<41])
    XCTAssertEqual(F.scan(good)?.end, 4096 + 4 * 48)
    let third = 4096 + 2 * 48
    var crc = good
    crc[third + 25] ^= 0x40  // its first block, the CRC unchanged
    var otherID = good
    F.encodeRecord(
      into: &otherID, at: third, journalID: journalID + 1, map: mapA, blocks: 20..<30, sequence: 2)
    var sequence = good
    F.encodeRecord(into: &sequence, at: third, journalID: journalID, map: mapA, blocks: 20..<30, sequence: 3)
    var repeated = good
    F.encodeRecord(into: &repeated, at: third, journalID: journalID, map: mapA, blocks: 20..<30, sequence: 1)
    for (what, bytes) in [
      ("a bad CRC", crc), ("another journal's id", otherID), ("a sequence skipped", sequence),
      ("a sequence repeated", repeated),
    ] {
      let c = try XCTUnwrap(F.scan(bytes), what)
      XCTAssertEqual(blocks(c), [0..<4, 10..<11], "\(what) ends the records, good ones after it too")
      XCTAssertEqual(c.end, third, what)
    }
    // Records of a journal the header no longer names (it started again).
    XCTAssertEqual(F.scan(journal(records: records, recordID: journalID ^ 1))?.end, 4096)
    // The records fill the file: the end is the file's.
    let full = journal(records: records, room: 4)
    XCTAssertEqual(F.scan(full)?.end, full.count)
    XCTAssertEqual(blocks(F.scan(full + [0, 0, 0])), blocks(F.scan(full)), "a partial record is no record")
  }

  func testARecordOfNoBlocksOrPastTheLastIsSkippedNotAnEnd() throws {
    var bytes = journal(records: [(mapA, 1..<2), (mapA, 3..<4), (mapA, 5..<6)])
    // Sequence 1 with no blocks, then one whose count overflows.
    var empty = bytes
    F.encodeRecord(into: &empty, at: 4096 + 48, journalID: journalID, map: mapA, blocks: 7..<7, sequence: 1)
    XCTAssertEqual(blocks(F.scan(empty)), [1..<2, 5..<6])
    XCTAssertEqual(F.scan(empty)?.end, 4096 + 3 * 48)
    putLE(UInt64.max - 1, at: 4096 + 48 + 24, into: &bytes)
    putLE(UInt64(2), at: 4096 + 48 + 32, into: &bytes)
    putCRC(&bytes, of: 4096 + 48..<4096 + 48 + 44)
    XCTAssertEqual(blocks(F.scan(bytes)), [1..<2, 5..<6])
    XCTAssertEqual(F.scan(bytes)?.end, 4096 + 3 * 48)
  }

  func testTheHigherCutWinsWhicheverSlotItIsIn() throws {
    var bytes = journal()
    try put(cut(3, output: "/three"), slot: 0, into: &bytes)
    try put(cut(4, output: "/four"), slot: 1, into: &bytes)
    XCTAssertEqual(F.scan(bytes)?.cut, cut(4, output: "/four"))
    try put(cut(5, output: "/five"), slot: 0, into: &bytes)
    XCTAssertEqual(F.scan(bytes)?.cut, cut(5, output: "/five"))
    // Either alone.
    var one = journal()
    try put(cut(7), slot: 1, into: &one)
    XCTAssertEqual(F.scan(one)?.cut, cut(7))
  }

  func testACutThatDoesNotHoldIsIgnored() throws {
    var base = journal()
    try put(cut(1, output: "/one"), slot: 1, into: &base)
    XCTAssertEqual(F.scan(base)?.cut?.number, 1)
    // Each damage to a higher cut in slot 0 leaves cut 1.
    var other = base
    try put(cut(2), slot: 0, into: &other, journalID: journalID ^ 0x100)
    XCTAssertEqual(F.scan(other)?.cut?.number, 1, "a cut of another journal")
    var crc = base
    try put(cut(2), slot: 0, into: &crc)
    XCTAssertEqual(F.scan(crc)?.cut?.number, 2)
    crc[512 + 20] ^= 1
    XCTAssertEqual(F.scan(crc)?.cut?.number, 1, "a bad CRC")
    var magic = base
    try put(cut(2), slot: 0, into: &magic)
    magic[512 + 7] = UInt8(ascii: "1")
    putCRC(&magic, of: 512..<512 + 76 + "/var/lib/dualrestore/ended.map".utf8.count)
    XCTAssertEqual(F.scan(magic)?.cut?.number, 1, "another cut magic")
    // A path one byte longer than a slot keeps, its CRC right where the
    // length puts it (the first byte of slot 1, which is not used here).
    var long = journal()
    let fixed = 76
    for (length, kept) in [(F.maximumOutputPath, true), (F.maximumOutputPath + 1, false)] {
      var c = try XCTUnwrap(F.encode(cut(2, output: "/p"), journalID: journalID))
      c = Array(c[0..<fixed]) + Array(repeating: UInt8(ascii: "a"), count: length) + [0, 0, 0, 0]
      putLE(UInt32(length), at: 72, into: &c)
      putCRC(&c, of: 0..<fixed + length)
      long.replaceSubrange(512..<512 + c.count, with: c)
      XCTAssertEqual(F.scan(long)?.cut != nil, kept, "a path of \(length) bytes in a slot of 1792")
    }
    // An empty path names no output.
    var empty = journal()
    try put(cut(2, output: ""), slot: 0, into: &empty)
    XCTAssertNil(F.scan(empty)?.cut)
  }

  func testEncodeRefusesAPathLongerThanASlotKeeps() throws {
    XCTAssertEqual(F.maximumOutputPath, 1712)
    let longest = "/" + String(repeating: "x", count: F.maximumOutputPath - 1)
    let bytes = try XCTUnwrap(F.encode(cut(1, output: longest), journalID: journalID))
    XCTAssertEqual(bytes.count, F.cutSlotLength, "the longest path fills the slot")
    XCTAssertNil(F.encode(cut(1, output: longest + "x"), journalID: journalID))
    // Bytes, not characters: 856 two-byte characters fit, 857 do not.
    XCTAssertNotNil(F.encode(cut(1, output: String(repeating: "é", count: 856)), journalID: journalID))
    XCTAssertNil(F.encode(cut(1, output: String(repeating: "é", count: 857)), journalID: journalID))
  }

  func testACutEncodesFieldByField() throws {
    let c = cut(0x0102_0304_0506_0708, output: "/o.map")
    let b = try XCTUnwrap(F.encode(c, journalID: journalID))
    XCTAssertEqual(b.count, 76 + 6 + 4)
    XCTAssertEqual(Array(b[0..<8]), Array("DRMARKC2".utf8))
    func le(_ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * $1) } }
    XCTAssertEqual(le(8, 8), journalID)
    XCTAssertEqual(le(16, 8), 0x0102_0304_0506_0708)
    XCTAssertEqual([le(24, 8), le(32, 8)], [mapA.high, mapA.low])
    XCTAssertEqual(le(40, 8), 1_764_000_000_000_000_001)
    XCTAssertEqual([le(48, 8), le(56, 8)], [mapB.high, mapB.low])
    XCTAssertEqual(le(64, 8), 1_764_000_000_500_000_002)
    XCTAssertEqual(le(72, 4), 6)
    XCTAssertEqual(Array(b[76..<82]), Array("/o.map".utf8))
    XCTAssertEqual(UInt32(le(82, 4)), b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 82) })
    var r = [UInt8](repeating: 0, count: 48)
    F.encodeRecord(into: &r, at: 0, journalID: journalID, map: mapA, blocks: 100..<107, sequence: 9)
    XCTAssertEqual(Array(r[0..<8]), Array(b[8..<16]))
    XCTAssertEqual(Array(r[8..<24]), Array(b[24..<40]), "a record names its map as a cut does")
    XCTAssertEqual(r[24], 100)
    XCTAssertEqual(r[32], 7)
    XCTAssertEqual(r[40], 9)
  }

  // MARK: The writer

  func testTheWriterLaysOutWhatTheScanReads() throws {
    let dir = try makeTempDirectory()
    let j = try MarkJournal(path: "\(dir)/j", records: 4)
    XCTAssertEqual(try readFileBytes("\(dir)/j").count, 4096 + 4 * 48, "allocated whole")
    XCTAssertNil(j.recovered(), "zeros are no journal")
    try j.restart()
    try j.append([1..<3, 7..<8], mapID: mapA)
    try j.cut(cut(99, output: "/first"))
    XCTAssertEqual(j.cuts, 1)
    try j.append([9..<10], mapID: mapB)
    var c = try XCTUnwrap(j.recovered())
    XCTAssertEqual(c.cut, cut(1, output: "/first"), "numbered by the journal, in slot 1")
    XCTAssertEqual(blocks(c), [1..<3, 7..<8, 9..<10])
    XCTAssertEqual(c.records.map(\.map), [mapA, mapA, mapB])
    try j.cut(cut(0, output: "/second"))
    c = try XCTUnwrap(j.recovered())
    XCTAssertEqual(c.cut, cut(2, output: "/second"))
    XCTAssertEqual(Array(try readFileBytes("\(dir)/j")[512..<520]), F.cutMagic, "cut 2 in slot 0")
    XCTAssertTrue(j.hasRoom(1))
    XCTAssertFalse(j.hasRoom(2))
    try j.append([12..<13], mapID: mapB)
    XCTAssertFalse(j.hasRoom(1))
    // Starting again orphans the records and both cuts.
    let old = c.journalID
    try j.restart()
    c = try XCTUnwrap(j.recovered())
    XCTAssertNotEqual(c.journalID, old)
    XCTAssertNil(c.cut)
    XCTAssertTrue(c.records.isEmpty)
    XCTAssertEqual(j.cuts, 0)
    let file = try readFileBytes("\(dir)/j")
    XCTAssertTrue(file[20..<4096].allSatisfy { $0 == 0 }, "both slots cleared")
    XCTAssertEqual(
      Array(file[4096..<4104]), (0..<8).map { UInt8(truncatingIfNeeded: old >> (8 * $0)) },
      "the records stay, under the former id")
    XCTAssertThrowsError(try j.cut(cut(0, output: String(repeating: "x", count: 1713))))
    XCTAssertNil(j.recovered()?.cut, "a path too long writes nothing")
  }

  func testASecondWriterIsRefused() throws {
    let dir = try makeTempDirectory()
    var first: MarkJournal? = try MarkJournal(path: "\(dir)/j", records: 4)
    assertThrows(try MarkJournal(path: "\(dir)/j", records: 4), containing: ["is locked"])
    XCTAssertNotNil(first)
    first = nil
    XCTAssertNoThrow(try MarkJournal(path: "\(dir)/j", records: 4), "the lock goes with the object")
  }

  // MARK: The fuzz target

  /// The fuzz target's checks (FuzzEntryPoints.scanMarkJournal) hold on a
  /// journal as written and on it damaged byte by byte, and its repair
  /// of the checksums gives back the journal whose checksums were zeroed.
  func testTheFuzzTargetsChecksHoldOnJournals() throws {
    var bytes = journal(records: [(mapA, 0..<4), (mapA, 100..<101), (mapB, 3..<5)], room: 3)
    try put(cut(2, output: "/g1.map"), slot: 0, into: &bytes)
    try put(cut(1, output: "/g0.map"), slot: 1, into: &bytes)
    XCTAssertNil(FuzzEntryPoints.scanMarkJournal(bytes))
    var v1 = journal(v1: true, records: [(mapA, 0..<4)], room: 1)
    XCTAssertNil(FuzzEntryPoints.scanMarkJournal(v1))
    v1[4096 + 30] ^= 1
    XCTAssertNil(FuzzEntryPoints.scanMarkJournal(v1), "a record that fails ends the records")
    for n in [0, 4095, 4096, 4100, 4096 + 48, bytes.count - 1] {
      XCTAssertEqual(FuzzEntryPoints.scanMarkJournal(Array(bytes.prefix(n))) == nil, n >= 4096, "\(n) bytes")
    }
    for i in bytes.indices {
      var b = bytes
      b[i] ^= 0x5a
      _ = FuzzEntryPoints.scanMarkJournal(b)
      _ = FuzzEntryPoints.scanMarkJournal(FuzzEntryPoints.repairMarkJournalChecksums(b))
    }
    var zeroed = bytes
    for at in [16, 512 + 76 + 7, 2304 + 76 + 7] + (0..<3).map({ 4096 + 48 * $0 + 44 }) {
      zeroed.replaceSubrange(at..<at + 4, with: [0, 0, 0, 0])
    }
    XCTAssertEqual(FuzzEntryPoints.scanMarkJournal(zeroed), "not a change map's journal")
    XCTAssertEqual(FuzzEntryPoints.repairMarkJournalChecksums(zeroed), bytes)
  }

  // MARK: Restarts of a change map

  var device: Device!
  var dir = ""
  var mapPath: String { "\(dir)/changes.map" }
  var logs: [String] = []

  func makeDevice(in directory: String? = nil, size: UInt64 = 1 << 20) throws {
    dir = try directory ?? makeTempDirectory()
    let image = try makeTempDirectory() + "/disk.img"
    try createSparseFile(image, size: size)
    device = try Device(path: image, options: DeviceOpenOptions(writable: true))
  }

  func open(blockSize: UInt32 = 4096) throws -> DurableChangeMap {
    try DurableChangeMap(path: mapPath, device: device, blockSize: blockSize, log: { self.logs.append($0) })
  }

  func fresh(_ m: DurableChangeMap) -> BlockMap {
    BlockMap(geometry: m.geometry, meaning: .changed, deviceName: device.path)
  }

  func mark(_ m: DurableChangeMap, _ ranges: [Range<UInt64>]) throws {
    for r in ranges { try m.mark(r) }
  }

  func extents(_ path: String) throws -> [Range<UInt64>] { Array(try MapFile.load(path).bits.extents) }

  /// Marks, a cut not settled, marks of the new generation, a crash: the
  /// restart saves the ended map to its output and goes on with the new.
  func testARestartFinishesACutNotSettled() throws {
    try makeDevice()
    let out = "\(dir)/ended.map"
    var m: DurableChangeMap? = try open()
    let ended = m!.summary
    try mark(m!, [3..<5, 10..<11, 4..<5])
    let next = fresh(m!)
    let old = try m!.cutGeneration(next, savingTo: out)
    XCTAssertEqual(old.mapID, ended.generation)
    XCTAssertEqual(m!.summary.generation, next.mapID)
    // Block 4 again: the new generation has it too.
    try mark(m!, [20..<22, 4..<5, 30..<31])
    XCTAssertFalse(pathExists(out), "not settled")
    m = nil  // a crash: no close, the lock goes with the object
    logs = []
    m = try open()
    let saved = try MapFile.load(out)
    XCTAssertEqual(saved.mapID, ended.generation)
    XCTAssertEqual(saved.trackingStarted, ended.started)
    XCTAssertEqual(saved.trackingEnded, next.trackingStarted)
    XCTAssertEqual(Array(saved.bits.extents), [3..<5, 10..<11])
    XCTAssertEqual(m!.summary.generation, next.mapID)
    XCTAssertEqual(m!.summary.started, next.trackingStarted)
    let live = try MapFile.load(mapPath)
    XCTAssertEqual(live.mapID, next.mapID)
    XCTAssertEqual(live.trackingEnded, .unset)
    XCTAssertEqual(Array(live.bits.extents), [4..<5, 20..<22, 30..<31])
    XCTAssertTrue(logs.contains { $0.contains("is saved to \(out)") }, "\(logs)")
    // The journal started again: a second restart changes nothing.
    m = nil
    m = try open()
    XCTAssertEqual(try extents(mapPath), [4..<5, 20..<22, 30..<31])
    XCTAssertEqual(m!.summary.generation, next.mapID)
  }

  /// A checkpoint saves the map file beside the marks and leaves the
  /// journal as it is: the file shows what was committed, a crash after
  /// more marks loses none, and nothing is saved again when nothing changed.
  func testACheckpointSavesTheMapAndKeepsTheJournal() throws {
    try makeDevice()
    var m: DurableChangeMap? = try open()
    try mark(m!, [1..<3, 7..<8])
    try m!.checkpoint()
    XCTAssertEqual(try extents(mapPath), [1..<3, 7..<8], "the map file after a checkpoint")
    var st = stat()
    XCTAssertEqual(stat(mapPath, &st), 0)
    let saved = st.st_mtim
    usleep(20_000)
    try m!.checkpoint()
    XCTAssertEqual(stat(mapPath, &st), 0)
    XCTAssertTrue(st.st_mtim.tv_sec == saved.tv_sec && st.st_mtim.tv_nsec == saved.tv_nsec, "saved again unchanged")
    try mark(m!, [12..<13, 2..<3])
    m = nil  // a crash
    m = try open()
    XCTAssertEqual(try extents(mapPath), [1..<3, 7..<8, 12..<13], "a mark after the checkpoint was lost")
  }

  /// A cut, settled and checkpointed (the map file is the new generation,
  /// the journal keeps the cut), then marks and a second cut not settled, a
  /// crash: the second cut is finished with exactly the middle generation's
  /// blocks, and the first is not finished again.
  func testACheckpointAfterASettledCutLeavesTheNextCutWhole() throws {
    try makeDevice()
    let out1 = "\(dir)/first.map"
    let out2 = "\(dir)/second.map"
    var m: DurableChangeMap? = try open()
    try mark(m!, [1..<2])
    let middle = fresh(m!)
    _ = try m!.cutGeneration(middle, savingTo: out1)
    try mark(m!, [5..<6])
    XCTAssertNotNil(try m!.settle())
    try m!.checkpoint()
    XCTAssertEqual(try MapFile.load(mapPath).mapID, middle.mapID, "the checkpoint saved the new generation")
    try mark(m!, [9..<10])
    let last = fresh(m!)
    _ = try m!.cutGeneration(last, savingTo: out2)
    try mark(m!, [14..<15])
    m = nil  // a crash
    XCTAssertEqual(unlink(out1), 0)
    m = try open()
    XCTAssertFalse(pathExists(out1), "the first cut, settled, was finished again")
    let second = try MapFile.load(out2)
    XCTAssertEqual(second.mapID, middle.mapID)
    XCTAssertEqual(Array(second.bits.extents), [5..<6, 9..<10])
    XCTAssertEqual(m!.summary.generation, last.mapID)
    XCTAssertEqual(try extents(mapPath), [14..<15])
  }

  /// A cut settled but not checkpointed, then a second cut: the restart
  /// finishes the second from the journal, whose ended generation began at
  /// the first cut, and leaves the first alone.
  func testARestartFinishesTheSecondOfTwoCuts() throws {
    try makeDevice()
    let out1 = "\(dir)/first.map"
    let out2 = "\(dir)/second.map"
    var m: DurableChangeMap? = try open()
    let first = m!.summary
    try mark(m!, [1..<2])
    let middle = fresh(m!)
    _ = try m!.cutGeneration(middle, savingTo: out1)
    let settled = try m!.settle()
    XCTAssertEqual(settled?.generation, first.generation)
    XCTAssertEqual(settled?.output, out1)
    let firstBytes = try readFileBytes(out1)
    XCTAssertEqual(try MapFile.load(mapPath).mapID, first.generation, "no checkpoint: the map file is behind")
    try mark(m!, [5..<7, 1..<2])
    let last = fresh(m!)
    _ = try m!.cutGeneration(last, savingTo: out2)
    try mark(m!, [9..<10, 6..<7])
    m = nil
    m = try open()
    let saved = try MapFile.load(out2)
    XCTAssertEqual(saved.mapID, middle.mapID)
    XCTAssertEqual(saved.trackingStarted, middle.trackingStarted)
    XCTAssertEqual(saved.trackingEnded, last.trackingStarted)
    XCTAssertEqual(Array(saved.bits.extents), [1..<2, 5..<7])
    let live = try MapFile.load(mapPath)
    XCTAssertEqual(live.mapID, last.mapID)
    XCTAssertEqual(live.trackingStarted, last.trackingStarted)
    XCTAssertEqual(Array(live.bits.extents), [6..<7, 9..<10])
    XCTAssertEqual(try readFileBytes(out1), firstBytes, "the first cut's map is not saved again")
  }

  /// An output that cannot be saved: settle says why, the ended generation
  /// goes on with the blocks of both, and a restart loses none, whether it
  /// comes right after (the cut still in the journal) or after more marks.
  func testASettleThatFailsUndoesTheCut() throws {
    for marksAfter in [false, true] {
      try makeDevice()
      let out = "\(dir)/missing/ended.map"
      var m: DurableChangeMap? = try open()
      let ended = m!.summary
      try mark(m!, [2..<4])
      _ = try m!.cutGeneration(fresh(m!), savingTo: out)
      try mark(m!, [8..<9, 3..<4])
      assertThrows(
        try m!.settle(), containing: ["generation \(ended.generation)", "cannot be saved to \(out)", "goes on"])
      XCTAssertEqual(m!.summary.generation, ended.generation)
      XCTAssertEqual(m!.summary.started, ended.started)
      XCTAssertEqual(m!.summary.blocks, 3)
      // Asked again by generation, the same sentence.
      assertThrows(try m!.settle(ended.generation), containing: ["cannot be saved to \(out)"])
      var expected: [Range<UInt64>] = [2..<4, 8..<9]
      if marksAfter {
        try mark(m!, [12..<13])
        expected.append(12..<13)
      }
      m = nil
      logs = []
      m = try open()
      let live = try MapFile.load(mapPath)
      XCTAssertEqual(live.mapID, ended.generation, "marks after: \(marksAfter)")
      XCTAssertEqual(live.trackingStarted, ended.started)
      XCTAssertEqual(live.trackingEnded, .unset)
      XCTAssertEqual(Array(live.bits.extents), expected, "marks after: \(marksAfter)")
      XCTAssertEqual(m!.summary.generation, ended.generation)
      XCTAssertFalse(pathExists(out))
      if !marksAfter {
        XCTAssertTrue(logs.contains { $0.contains("cannot be saved to \(out)") }, "\(logs)")
      }
    }
  }

  /// A cut undone stays undone: when its output can be saved by the time
  /// of a restart, the generation the server went on with still goes on,
  /// with every block written since, a new one or one of the ended map's.
  func testACutUndoneIsNotFinishedByARestart() throws {
    for after: Range<UInt64> in [12..<13, 3..<4] {
      try makeDevice()
      let out = "\(dir)/later/ended.map"
      var m: DurableChangeMap? = try open()
      let ended = m!.summary
      try mark(m!, [2..<4])
      _ = try m!.cutGeneration(fresh(m!), savingTo: out)
      try mark(m!, [8..<9])
      XCTAssertThrowsError(try m!.settle())
      // Written after the undo, which the server answered with "goes on".
      try m!.mark(after)
      m = nil
      XCTAssertEqual(mkdir("\(dir)/later", 0o700), 0)
      m = try open()
      let live = try MapFile.load(mapPath)
      let expected = Array(BlockBitmap(count: 256).with([2..<4, 8..<9, after]).extents)
      XCTAssertEqual(Array(live.bits.extents), expected, "every block written since the cut was undone (\(after))")
      XCTAssertEqual(live.mapID, ended.generation, "\(after)")
      XCTAssertFalse(pathExists(out), "the cut undone is not made at the restart (\(after))")
    }
  }

  /// The journal fills up while a cut is unsettled: the ended map reaches
  /// its output before the journal starts again (which orphans the cut).
  /// The journal keeps 16384 records, which a change map cannot be given
  /// fewer of: on tmpfs their syncs cost nothing.
  func testAJournalThatFillsUpSavesTheEndedMapFirst() throws {
    guard access("/dev/shm", W_OK) == 0 else { throw XCTSkip("no /dev/shm") }
    let shm = "/dev/shm/dualrestore-mark-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    XCTAssertEqual(mkdir(shm, 0o700), 0)
    addTeardownBlock {
      for f in ["changes.map", "changes.map.journal", "ended.map"] { unlink("\(shm)/\(f)") }
      rmdir(shm)
    }
    try makeDevice(in: shm, size: 16 << 20)
    let out = "\(dir)/ended.map"
    var m: DurableChangeMap? = try open(blockSize: 512)
    let ended = m!.summary
    try mark(m!, [0..<1])
    let next = fresh(m!)
    _ = try m!.cutGeneration(next, savingTo: out)
    let records = 16384
    let journalPath = mapPath + ".journal"
    // One record a mark: the journal's last one, the cut still unsettled.
    for b in 0..<UInt64(records - 1) { try m!.mark(10 + b..<11 + b) }
    let full = try XCTUnwrap(F.scan(try readFileBytes(journalPath)))
    XCTAssertEqual(full.records.count, records)
    XCTAssertEqual(full.cut?.output, out)
    XCTAssertFalse(pathExists(out))
    // The next mark finds no room.
    try m!.mark(10 + UInt64(records - 1)..<11 + UInt64(records - 1))
    let again = try XCTUnwrap(F.scan(try readFileBytes(journalPath)))
    XCTAssertNotEqual(again.journalID, full.journalID, "the journal started again")
    XCTAssertTrue(again.records.isEmpty)
    XCTAssertNil(again.cut)
    let saved = try MapFile.load(out)
    XCTAssertEqual(saved.mapID, ended.generation)
    XCTAssertEqual(saved.trackingEnded, next.trackingStarted)
    XCTAssertEqual(Array(saved.bits.extents), [0..<1])
    let live = try MapFile.load(mapPath)
    XCTAssertEqual(live.mapID, next.mapID)
    XCTAssertEqual(Array(live.bits.extents), [10..<10 + UInt64(records)])
    let outBytes = try readFileBytes(out)
    try m!.mark(5..<6)
    m = nil
    m = try open(blockSize: 512)
    XCTAssertEqual(try extents(mapPath), [5..<6, 10..<10 + UInt64(records)])
    XCTAssertEqual(try readFileBytes(out), outBytes)
  }
}

extension BlockBitmap {
  fileprivate func with(_ ranges: [Range<UInt64>]) -> BlockBitmap {
    var b = self
    for r in ranges { b.set(r) }
    return b
  }
}
