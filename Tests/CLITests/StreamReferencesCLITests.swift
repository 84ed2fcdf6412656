// snapshot --have and merge-snapshot --reuse / --keep as users run them, on
// real file systems: two ext4 images made by mkfs.ext4 -d from one tree of
// files (A from the tree; B from it with files added, moved into another
// directory and deleted), and A shifted by 64 KiB (new bytes in front, its
// tail cut; Ext4Images.swift). The receiver holds A; the streams name what
// it holds.
//
// What must hold:
// - A stream with references merged onto a copy of A with --reuse A is B,
//   byte for byte, and is a fraction of a plain stream of B; the shifted
//   copy's is at most 2% of its plain stream.
// - Merged in place, a block overwritten may hold content a later
//   reference needs: the merge either gives the source exactly, or stops
//   with one sentence naming a block, the target's blocks from that
//   reference's run on still A's. With --keep 0 the shifted copy shows the
//   hazard is real.
// - Nothing unchecked is written: content found nowhere (a signature of an
//   image the receiver does not hold, a damaged --reuse image) refuses the
//   stream; a later --reuse image is looked in when an earlier one fails.
// - Encryption, --check, --dry-run, the overwrite map's current blocks,
//   snapshot-server's refusal, and the JSON counts.

import DualRestore
import Foundation
import TestSupport
import XCTest

final class StreamReferencesCLITests: CLITestCase {
  static let size = 256 << 20
  static let bs = 4096
  static let blocks = size / bs
  static let shift = 64 << 10

  // MARK: Helpers

  func json(_ r: RRTCommand.Result, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: r.data) as? [String: Any], "not JSON: \(r.stdout) \(r.stderr)", file: file,
      line: line)
  }

  @discardableResult
  func sh(_ s: Scratch, _ script: String, file: StaticString = #filePath, line: UInt = #line) throws
    -> RRTCommand.Result
  {
    let r = try RRTCommand.shell(script, timeout: 300, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, "\(script): \(r.stderr)", file: file, line: line)
    return r
  }

  /// A command in the scratch directory (not asserted).
  func run(_ s: Scratch, _ tool: String, _ arguments: [String]) throws -> RRTCommand.Result {
    try RRTCommand.run(tool, arguments, timeout: 300, cwd: s.url.path)
  }

  /// The images, made once for the class (the tests only copy them).
  nonisolated(unsafe) private static var made: Scratch?

  override class func tearDown() {
    made = nil
    super.tearDown()
  }

  /// A.img and B.img (ext4, 256 MiB, 4 KiB blocks) from the tree and the
  /// changed tree, S.img (A shifted by 64 KiB), and A.sig, in a scratch
  /// directory of the test's own.
  func images() throws -> Scratch {
    try require("mkfs.ext4")
    if Self.made == nil {
      let m = try Scratch()
      try Ext4Images.make(in: m.url.path, size: Self.size)
      try m.randomFile("front", size: Self.shift, seed: 64)
      try sh(m, "{ cat front; head -c \(Self.size - Self.shift) A.img; } > S.img")
      try sh(m, "bitmap-diff --signature --block-size 4096 -o A.sig A.img")
      for image in ["A.img", "B.img", "S.img"] {
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: m.path(image))[.size] as? Int, Self.size)
      }
      XCTAssertNotEqual(try m.read("A.img"), try m.read("B.img"))
      Self.made = m
    }
    let s = try Scratch()
    let from = try XCTUnwrap(Self.made)
    try sh(
      s,
      "cp --sparse=always '\(from.path("A.img"))' '\(from.path("B.img"))' '\(from.path("S.img"))' '\(from.path("A.sig"))' ."
    )
    return s
  }

  /// `snapshot --json` of `image` to `stream` with `extra` options; its report.
  @discardableResult
  func snapshot(
    _ s: Scratch, _ image: String, to stream: String, _ extra: [String] = [], file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> [String: Any] {
    let r = try run(s, "snapshot", ["--block-size", "4096", "--json", "-o", stream] + extra + [image])
    XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
    return try json(r, file: file, line: line)
  }

  /// A sparse copy.
  func copy(_ s: Scratch, _ from: String, _ to: String) throws { try sh(s, "cp --sparse=always \(from) \(to)") }

  /// `bitmap-diff` says the two are the same (exit 0).
  func assertSame(_ s: Scratch, _ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let r = try run(s, "bitmap-diff", ["--block-size", "4096", "--extents", a, b])
    XCTAssertEqual(r.status, 0, "\(a) and \(b) differ: \(r.stdout.prefix(400)) \(r.stderr)", file: file, line: line)
  }

  struct Run: Equatable {
    var first: UInt64
    var count: Int
    var image: Int
    var source: UInt64
  }

  /// The REFERENCE runs of a plaintext stream, and the record each starts,
  /// by its byte offset.
  func referenceRuns(_ path: String) throws -> [(offset: UInt64, run: Run)] {
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    var parser = StreamParser()
    var at = 0
    var runs: [(UInt64, Run)] = []
    try bytes.withUnsafeBytes { raw in
      while true {
        let offset = parser.offset
        guard let (record, n) = try parser.next(UnsafeRawBufferPointer(rebasing: raw[at...])) else { break }
        if case .reference(let r) = record {
          runs.append((offset, Run(first: r.first, count: r.count, image: r.image, source: r.sourceFirst)))
        }
        at += n
      }
    }
    return runs
  }

  /// The first block of the run of the record a refusal names ("record N at byte X").
  func refusedRun(_ stderr: String, _ stream: String, file: StaticString = #filePath, line: UInt = #line) throws
    -> Run?
  {
    guard let range = stderr.range(of: #"at byte [0-9]+"#, options: .regularExpression),
      let offset = UInt64(stderr[range].dropFirst(8))
    else {
      XCTFail("no record named: \(stderr)", file: file, line: line)
      return nil
    }
    let run = try referenceRuns(stream).first { $0.offset == offset }?.run
    XCTAssertNotNil(run, "the record at byte \(offset) is not a REFERENCE record: \(stderr)", file: file, line: line)
    return run
  }

  /// The block a refusal names: "block N refers to …".
  func refusedBlock(_ stderr: String) -> UInt64? {
    guard let range = stderr.range(of: #"block [0-9]+ refers to"#, options: .regularExpression) else { return nil }
    return UInt64(stderr[range].dropFirst(6).prefix { $0.isNumber })
  }

  /// Asserts a refused merge: exit 1, one line naming a block inside the
  /// refused record's run; the target from that run's first block on is
  /// `before`'s, and before it `source`'s. Returns the run.
  @discardableResult
  func assertRefusedIntact(
    _ r: RRTCommand.Result, stream: String, target: Data, before: Data, source: Data?, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> Run? {
    XCTAssertEqual(r.status, 1, r.stderr, file: file, line: line)
    XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr)", file: file, line: line)
    XCTAssertTrue(r.stderr.contains("nothing of its run was written"), r.stderr, file: file, line: line)
    XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr, file: file, line: line)
    guard let block = refusedBlock(r.stderr), let run = try refusedRun(r.stderr, stream, file: file, line: line) else {
      XCTFail("no block named: \(r.stderr)", file: file, line: line)
      return nil
    }
    XCTAssertTrue(
      block >= run.first && block < run.first + UInt64(run.count), "\(block) is in \(run)", file: file, line: line)
    let from = Int(run.first) * Self.bs
    XCTAssertTrue(
      target[from...] == before[from...], "blocks from \(run.first) on are no longer the target's own",
      file: file, line: line)
    if let source {
      // What came before the refused record was merged: the source's blocks.
      XCTAssertTrue(
        target[..<from] == source[..<from], "blocks before \(run.first) are not the source's", file: file, line: line)
    }
    return run
  }

  // MARK: Round trips and sizes

  func testAStreamOfBWithReferencesRebuildsBFromACopyOfAAndIsAFractionOfAPlainOne() throws {
    let s = try images()
    let plain = try snapshot(s, "B.img", to: "B.plain")
    let refs = try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let plainBytes = try XCTUnwrap(plain["bytes_out"] as? Int)
    let refsBytes = try XCTUnwrap(refs["bytes_out"] as? Int)
    print("B: plain stream \(plainBytes) bytes, with references \(refsBytes) (\(100 * refsBytes / plainBytes)%)")
    XCTAssertLessThan(refsBytes * 100, plainBytes * 30, "measured 21%; at most 30% of a plain stream")
    XCTAssertGreaterThan(refs["referenced_blocks"] as? Int ?? 0, 1000)

    try copy(s, "A.img", "T.img")
    let r = try run(s, "merge-snapshot", ["--json", "--reuse", "A.img", "-i", "B.v2", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    try assertSame(s, "B.img", "T.img")
    XCTAssertTrue(try s.read("T.img") == (try s.read("B.img")))
    let o = try json(r)
    XCTAssertEqual(o["complete"] as? Bool, true)
    XCTAssertEqual(
      (o["referenced_written_blocks"] as? Int ?? 0) + (o["referenced_in_place_blocks"] as? Int ?? 0),
      refs["referenced_blocks"] as? Int)
  }

  func testTheShiftedCopysStreamIsAtMostTwoPercentOfAPlainOneAndRebuildsIt() throws {
    let s = try images()
    let plain = try snapshot(s, "S.img", to: "S.plain")
    let refs = try snapshot(s, "S.img", to: "S.v2", ["--have", "A.sig"])
    let plainBytes = try XCTUnwrap(plain["bytes_out"] as? Int)
    let refsBytes = try XCTUnwrap(refs["bytes_out"] as? Int)
    print("S: plain stream \(plainBytes) bytes, with references \(refsBytes)")
    XCTAssertLessThanOrEqual(refsBytes * 100, plainBytes * 2, "at most 2% of the plain stream")
    XCTAssertEqual(refs["data_blocks"] as? Int, Self.shift / Self.bs, "only the new bytes in front are carried")
    try copy(s, "A.img", "T.img")
    let r = try run(s, "merge-snapshot", ["--reuse", "A.img", "-i", "S.v2", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    try assertSame(s, "S.img", "T.img")
  }

  // MARK: In place

  /// B merged onto A itself: the result is B, or the merge stopped with a
  /// sentence and A's blocks from the refused run on are intact.
  func testBMergedInPlaceOntoAIsBOrRefusedWithTheRestIntact() throws {
    let s = try images()
    try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let a = try s.read("A.img")
    let r = try run(s, "merge-snapshot", ["--json", "-i", "B.v2", "A.img"])
    if r.status == 0 {
      try assertSame(s, "B.img", "A.img")
      let o = try json(r)
      print("B in place: \(o["referenced_from_kept_blocks"] ?? "?") blocks from what was kept")
    } else {
      print("B in place refused: \(r.stderr)")
      try assertRefusedIntact(r, stream: s.path("B.v2"), target: try s.read("A.img"), before: a, source: nil)
    }
  }

  /// The shifted copy merged onto A itself: every referenced block's
  /// content was at a block the merge had just overwritten. With the
  /// default --keep (64 MiB, far more than the 64 KiB shift) the merge
  /// takes it from what it kept; with --keep 0 it is refused at the first
  /// reference, and A's blocks from there on are intact.
  func testTheShiftedCopyInPlaceNeedsWhatWasKept() throws {
    let s = try images()
    try snapshot(s, "S.img", to: "S.v2", ["--have", "A.sig"])
    try copy(s, "A.img", "A0.img")
    let a = try s.read("A.img")
    let shifted = try s.read("S.img")

    let refused = try run(s, "merge-snapshot", ["--keep", "0", "-i", "S.v2", "A.img"])
    let stopped = try assertRefusedIntact(
      refused, stream: s.path("S.v2"), target: try s.read("A.img"), before: a, source: shifted)
    XCTAssertEqual(stopped?.first, UInt64(Self.shift / Self.bs), "the first reference, after the 16 new blocks")
    XCTAssertTrue(
      refused.stderr.contains("block 16 refers to the content of block 0 of image 0 (A.img"), refused.stderr)
    XCTAssertTrue(refused.stderr.contains("the target does not hold that content there"), refused.stderr)

    try copy(s, "A0.img", "A.img")
    let r = try run(s, "merge-snapshot", ["--json", "-i", "S.v2", "A.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    try assertSame(s, "S.img", "A.img")
    let o = try json(r)
    XCTAssertGreaterThan(o["referenced_from_kept_blocks"] as? Int ?? 0, 0, "kept blocks were needed")
  }

  // MARK: Nothing unchecked

  /// A stream naming content of an image C the receiver does not hold:
  /// its first run is found at the target but for one block, so the run
  /// is refused whole, and the target is byte for byte what it was.
  func testContentTheReceiverDoesNotHoldIsRefusedAndNothingIsWritten() throws {
    let s = try Scratch()
    let blocks = 3000
    try s.randomFile("C.img", size: blocks * Self.bs, seed: 3)
    var c = try s.read("C.img")
    // A: C but for block 100. X: C one block back (X's k is C's k + 1), a new last block.
    var g = SplitMix64(seed: 4)
    var a = c
    a.replaceSubrange((100 * Self.bs)..<(101 * Self.bs), with: Data(g.bytes(Self.bs)))
    try s.file("A.img", a)
    c.removeFirst(Self.bs)
    c.append(Data(g.bytes(Self.bs)))
    try s.file("X.img", c)
    try sh(s, "bitmap-diff --signature --block-size 4096 -o C.sig C.img")
    let o = try snapshot(s, "X.img", to: "X.v2", ["--have", "C.sig"])
    XCTAssertEqual(o["referenced_blocks"] as? Int, blocks - 1)
    XCTAssertEqual(
      try referenceRuns(s.path("X.v2")).map(\.run).first, Run(first: 0, count: 2048, image: 0, source: 1))

    for extra in [[], ["--dry-run"], ["--keep", "0"]] {
      let r = try run(s, "merge-snapshot", extra + ["-i", "X.v2", "A.img"])
      let stopped = try assertRefusedIntact(
        r, stream: s.path("X.v2"), target: try s.read("A.img"), before: a, source: nil)
      XCTAssertEqual(stopped?.first, 0)
      XCTAssertTrue(r.stderr.contains("block 99 refers to the content of block 100 of image 0 (C.img"), r.stderr)
      XCTAssertTrue(try s.read("A.img") == a, "\(extra): the target changed")
    }
    // With C itself to reuse, it merges.
    let r = try run(s, "merge-snapshot", ["--reuse", "C.img", "-i", "X.v2", "A.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertTrue(try s.read("A.img") == c)
  }

  /// A --reuse image damaged in a block the stream refers to (and a target
  /// that holds none of it): refused, naming the block; with an undamaged
  /// image after it, the merge looks there and succeeds.
  func testADamagedReuseImageIsRefusedAndTheNextOneIsLookedIn() throws {
    let s = try images()
    try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let runs = try referenceRuns(s.path("B.v2"))
    let first = try XCTUnwrap(runs.first).run
    try copy(s, "A.img", "Adamaged.img")
    let damagedBlock = Int(first.source) + first.count / 2
    let at = damagedBlock * Self.bs + 100
    let byte = try s.read("A.img")[at]
    try s.patch("Adamaged.img", at: at, [byte ^ 0x5A])
    try sh(s, "truncate -s \(Self.size) T.img")
    let zeros = try s.read("T.img")

    let r = try run(s, "merge-snapshot", ["--reuse", "Adamaged.img", "-i", "B.v2", "T.img"])
    try assertRefusedIntact(r, stream: s.path("B.v2"), target: try s.read("T.img"), before: zeros, source: nil)
    let named = first.first + UInt64(damagedBlock) - first.source
    XCTAssertTrue(
      r.stderr.contains("block \(named) refers to the content of block \(damagedBlock) of image 0 (A.img"), r.stderr)
    XCTAssertTrue(r.stderr.contains("neither the target nor Adamaged.img"), r.stderr)

    try sh(s, "truncate -s 0 T.img && truncate -s \(Self.size) T.img")
    let ok = try run(
      s, "merge-snapshot", ["--json", "--reuse", "Adamaged.img", "--reuse", "A.img", "-i", "B.v2", "T.img"])
    XCTAssertEqual(ok.status, 0, ok.stderr)
    try assertSame(s, "B.img", "T.img")
    let o = try json(ok)
    XCTAssertGreaterThan(o["referenced_from_reuse1_blocks"] as? Int ?? 0, 0, "the damaged image served the rest")
    XCTAssertGreaterThanOrEqual(o["referenced_from_reuse2_blocks"] as? Int ?? 0, 1, "A served the damaged block")
    XCTAssertEqual(o["referenced_in_place_blocks"] as? Int, 0, "the target held nothing")
  }

  // MARK: Encryption, --check, --dry-run, the map

  func testAnEncryptedStreamWithReferencesMergesAndRebuildsB() throws {
    let s = try images()
    try s.file("k.key", Data("00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210\n".utf8))
    let o = try snapshot(s, "B.img", to: "B.enc", ["--have", "A.sig", "--encrypt", "--key-file", "k.key"])
    XCTAssertEqual(o["format_version"] as? Int, 2)
    XCTAssertEqual(o["encrypted"] as? Bool, true)
    try copy(s, "A.img", "T.img")
    let r = try run(s, "merge-snapshot", ["--key-file", "k.key", "--reuse", "A.img", "-i", "B.enc", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    try assertSame(s, "B.img", "T.img")
    // Without the key, nothing.
    try copy(s, "A.img", "U.img")
    let refused = try run(s, "merge-snapshot", ["-i", "B.enc", "U.img"])
    XCTAssertEqual(refused.status, 1)
    XCTAssertTrue(try s.read("U.img") == (try s.read("A.img")))
  }

  func testCheckCountsReferencesAndDryRunWritesNothing() throws {
    let s = try images()
    let o = try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let referenced = try XCTUnwrap(o["referenced_blocks"] as? Int)
    let check = try run(s, "merge-snapshot", ["--check", "--json", "-i", "B.v2"])
    XCTAssertEqual(check.status, 0, check.stderr)
    let c = try json(check)
    XCTAssertEqual(c["referenced_blocks"] as? Int, referenced)
    XCTAssertEqual(c["format_version"] as? Int, 2)
    XCTAssertEqual(c["complete"] as? Bool, true)
    let text = try run(s, "merge-snapshot", ["--check", "-i", "B.v2"])
    XCTAssertTrue(
      text.stderr.contains("\(referenced) referenced blocks (their content is checked when merged)"), text.stderr)
    XCTAssertEqual(
      try run(s, "merge-snapshot", ["--check", "--reuse", "A.img", "-i", "B.v2"]).status, 64, "--check has no target")

    try copy(s, "A.img", "T.img")
    let a = try s.read("A.img")
    let dry = try run(s, "merge-snapshot", ["--dry-run", "--json", "-i", "B.v2", "T.img"])
    XCTAssertEqual(dry.status, 0, dry.stderr)
    XCTAssertTrue(try s.read("T.img") == a, "a dry run writes nothing")
    let d = try json(dry)
    XCTAssertEqual(
      (d["referenced_written_blocks"] as? Int ?? 0) + (d["referenced_in_place_blocks"] as? Int ?? 0), referenced)
    // A dry run looks for the content too: onto an empty image it is refused.
    try sh(s, "truncate -s \(Self.size) Z.img")
    let zeros = try s.read("Z.img")
    let nowhere = try run(s, "merge-snapshot", ["--dry-run", "-i", "B.v2", "Z.img"])
    XCTAssertEqual(nowhere.status, 1)
    XCTAssertTrue(nowhere.stderr.contains("the target does not hold that content there"), nowhere.stderr)
    XCTAssertTrue(try s.read("Z.img") == zeros)
  }

  /// Blocks the overwrite map marks current are newer than the stream:
  /// references are not written over them, in place or not.
  func testReferencesDoNotOverwriteCurrentBlocks() throws {
    let s = try images()
    try copy(s, "A.img", "T.img")
    try sh(s, "overwrite-map create --like T.img --block-size 4K T.map")
    try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let runs = try referenceRuns(s.path("B.v2")).map(\.run)
    // Current: blocks of moved runs and of runs in place, first and last of each.
    var current: [Int] = []
    XCTAssertTrue(
      runs.prefix(40).contains { $0.first == $0.source } && runs.prefix(40).contains { $0.first != $0.source })
    for run in runs.prefix(40) {
      current.append(Int(run.first))
      if run.count > 1 { current.append(Int(run.first) + run.count - 1) }
    }
    var g = SplitMix64(seed: 99)
    var marked = Data()
    for b in current {
      // Newer content at the primary, marked current.
      let newer = Data(g.bytes(Self.bs))
      try s.patch("T.img", at: b * Self.bs, Array(newer))
      try sh(s, "overwrite-map set T.map \(b * Self.bs) \(Self.bs)")
      marked.append(newer)
    }
    let r = try run(s, "merge-snapshot", ["--json", "--map", "T.map", "--reuse", "A.img", "-i", "B.v2", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertEqual(try json(r)["skipped_current_blocks"] as? Int, current.count)
    let t = try s.read("T.img")
    let b = try s.read("B.img")
    var expected = b
    for (i, blk) in current.enumerated() {
      let range = (blk * Self.bs)..<((blk + 1) * Self.bs)
      XCTAssertTrue(t[range] == marked[(i * Self.bs)..<((i + 1) * Self.bs)], "current block \(blk) was overwritten")
      expected.replaceSubrange(range, with: marked[(i * Self.bs)..<((i + 1) * Self.bs)])
    }
    XCTAssertTrue(t == expected, "every other block is B's")
  }

  // MARK: snapshot-server, JSON

  func testSnapshotServerRefusesAStreamWithReferences() throws {
    let s = try images()
    try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let sentence =
      "B.v2: the stream names content its receiver already holds (stream format version 2, made with snapshot --have); "
      + "it can be merged with merge-snapshot, not served or compacted"
    let index = try run(s, "snapshot-server", ["index", "B.v2"])
    assertFails(index, status: 1, mentioning: sentence)
    // Refused before it serves: were it served, it would be stopped after 20 s.
    let serve = try RRTCommand.run(
      "snapshot-server", ["serve", "--socket", s.path("chain.sock"), "B.v2"], timeout: 20, cwd: s.url.path)
    assertFails(serve, status: 1, mentioning: sentence)
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("chain.sock")), "nothing was served")
    let compact = try run(s, "snapshot-server", ["compact", "-o", "c.stream", "B.v2"])
    assertFails(compact, status: 1, mentioning: sentence)
  }

  func testTheJSONOfBothCommandsCountsTheReferences() throws {
    let s = try images()
    let a = try s.read("A.img")
    var nonZero = 0
    let zero = Data(count: Self.bs)
    for b in 0..<Self.blocks where a[(b * Self.bs)..<((b + 1) * Self.bs)] != zero { nonZero += 1 }
    let o = try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    let referenced = try XCTUnwrap(o["referenced_blocks"] as? Int)
    XCTAssertEqual(o["format_version"] as? Int, 2)
    XCTAssertEqual(o["have_images"] as? Int, 1)
    XCTAssertEqual(o["index_entries"] as? Int, nonZero, "one entry per block of A that is not zeros")
    XCTAssertEqual(o["index_bytes"] as? Int, 16 * Self.blocks, "16 bytes per signed block")
    XCTAssertEqual(o["bytes_saved"] as? Int, referenced * Self.bs)
    XCTAssertEqual(
      (o["data_blocks"] as? Int ?? 0) + (o["zero_blocks"] as? Int ?? 0) + referenced, Self.blocks,
      "every block once")
    XCTAssertEqual(o["reference_records"] as? Int, try referenceRuns(s.path("B.v2")).count)
    XCTAssertEqual(o["bytes_in"] as? Int, Self.size)
    let plain = try snapshot(s, "B.img", to: "B.plain")
    XCTAssertNil(plain["referenced_blocks"], "a plain stream has no references to count")
    XCTAssertNil(plain["format_version"])

    try copy(s, "A.img", "T.img")
    let r = try run(s, "merge-snapshot", ["--json", "--reuse", "A.img", "-i", "B.v2", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    let m = try json(r)
    let written = try XCTUnwrap(m["referenced_written_blocks"] as? Int)
    let inPlace = try XCTUnwrap(m["referenced_in_place_blocks"] as? Int)
    let kept = try XCTUnwrap(m["referenced_from_kept_blocks"] as? Int)
    let fromTarget = try XCTUnwrap(m["referenced_from_target_blocks"] as? Int)
    let fromReuse = try XCTUnwrap(m["referenced_from_reuse1_blocks"] as? Int)
    XCTAssertEqual(written + inPlace, referenced)
    XCTAssertEqual(fromTarget + kept + fromReuse, referenced, "each referenced block found in one place")
    XCTAssertGreaterThan(inPlace, 0, "unchanged blocks of A are found where they are")
    XCTAssertLessThanOrEqual(inPlace, fromTarget, "in place means found in the target")
    XCTAssertEqual(m["format_version"] as? Int, 2)
    XCTAssertEqual(m["reference_images"] as? Int, 1)
    XCTAssertEqual(m["written_blocks"] as? Int, o["data_blocks"] as? Int)
    XCTAssertEqual(m["zero_blocks"] as? Int, o["zero_blocks"] as? Int)
    XCTAssertNil(m["referenced_blocks"], "counted, not only listed, when merged")
    try assertSame(s, "B.img", "T.img")
  }

  /// bytes_saved counts a short last block by its own length, not the block size.
  func testBytesSavedCountsAShortLastBlockByItsLength() throws {
    let s = try Scratch()
    let size = 10 * Self.bs + 1000
    try s.randomFile("R.img", size: size, seed: 8)
    try sh(s, "bitmap-diff --signature --block-size 4096 -o R.sig R.img")
    let o = try snapshot(s, "R.img", to: "R.v2", ["--have", "R.sig"])
    XCTAssertEqual(o["referenced_blocks"] as? Int, 11)
    XCTAssertEqual(o["bytes_saved"] as? Int, size, "every byte of the device is referenced, none more")
  }

  /// Each --reuse image has its own key in merge-snapshot's JSON, numbered
  /// from 1 in the order given, whatever its name: one named "target" is
  /// not the target.
  func testTheJSONNamesEachReuseImageByItsPlaceNotItsName() throws {
    let s = try images()
    try snapshot(s, "B.img", to: "B.v2", ["--have", "A.sig"])
    try copy(s, "A.img", "target")
    try sh(s, "truncate -s \(Self.size) T.img")
    let r = try run(s, "merge-snapshot", ["--json", "--reuse", "target", "-i", "B.v2", "T.img"])
    XCTAssertEqual(r.status, 0, r.stderr)
    let m = try json(r)
    XCTAssertEqual(m["referenced_from_target_blocks"] as? Int, 0, "the empty target held nothing: \(r.stdout)")
    XCTAssertEqual(m["referenced_from_reuse1_blocks"] as? Int, m["referenced_written_blocks"] as? Int, r.stdout)
    XCTAssertEqual(r.stdout.components(separatedBy: "referenced_from_target_blocks").count, 2, "one key each")
    try assertSame(s, "B.img", "T.img")
  }
}
