// snapshot --encrypt and merge-snapshot --key-file / --passphrase-file as
// users run them: round trips through pipes and files; and every way a
// stream can go wrong — a wrong or missing key, a flipped byte in a DATA
// record, the HEADER or the END (as damage, and forged with its CRC made
// right), a record removed, two swapped, one spliced from another stream
// under the same key, a cut — stops the merge with one sentence, and the
// target holds the source's blocks before the damaged record and its own
// bytes from there on.
//
// The streams here are of 64 KiB blocks of random data (incompressible), so
// record k is: 0 CRYPTO, 1 HEADER, 2 + b the DATA record of block b, then END.

import CShim
import Foundation
import TestSupport
import XCTest

final class EncryptedStreamCLITests: XCTestCase {

  // MARK: Helpers

  static let blockSize = 65536
  static let blocks = 16
  static let hexKey = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"

  /// A source, a target of its own content, a key file and a good stream.
  struct Setup {
    let s: Scratch
    let a: Data
    let b0: Data
    let good: [UInt8]
    let ranges: [Range<Int>]
  }

  func setup(passphrase: Bool = false) throws -> Setup {
    let s = try Scratch()
    try s.randomFile("a.img", size: Self.blocks * Self.blockSize, seed: 1)
    try s.randomFile("b.img", size: Self.blocks * Self.blockSize, seed: 2)
    try s.file("k.key", Data((Self.hexKey + "\n").utf8))
    try s.file("pw", Data("the passphrase of these tests\n".utf8))
    // An overwrite map that started tracking before the stream was read.
    let created = try RRTCommand.run("overwrite-map", ["create", "--like", "b.img", "m0.map"], cwd: s.url.path)
    XCTAssertEqual(created.status, 0, created.stderr)
    let keyOption = passphrase ? ["--passphrase-file", "pw"] : ["--key-file", "k.key"]
    let r = try RRTCommand.run(
      "snapshot", ["--quiet", "--encrypt"] + keyOption + ["-o", "good.stream", "a.img"], cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    let good = [UInt8](try s.read("good.stream"))
    let ranges = Self.recordRanges(good)
    XCTAssertEqual(ranges.count, 2 + Self.blocks + 1, "CRYPTO, HEADER, one DATA record a block, END")
    return Setup(s: s, a: try s.read("a.img"), b0: try s.read("b.img"), good: good, ranges: ranges)
  }

  /// Where each record starts and ends, from the framing alone.
  static func recordRanges(_ s: [UInt8]) -> [Range<Int>] {
    var out: [Range<Int>] = []
    var at = 16
    while at + 16 <= s.count {
      let length = Int(s[at + 4]) | Int(s[at + 5]) << 8 | Int(s[at + 6]) << 16 | Int(s[at + 7]) << 24
      guard at + 20 + length <= s.count else { break }
      out.append(at..<(at + 20 + length))
      at += 20 + length
    }
    return out
  }

  static func fixCRC(_ s: inout [UInt8], _ r: Range<Int>) {
    let crc = s.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + r.lowerBound, r.count - 4) }
    for i in 0..<4 { s[r.upperBound - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
  }

  static func renumber(_ s: inout [UInt8], _ r: Range<Int>, to seq: Int) {
    for i in 0..<8 { s[r.lowerBound + 8 + i] = UInt8(truncatingIfNeeded: seq >> (8 * i)) }
    fixCRC(&s, r)
  }

  /// Merges `stream` into a fresh copy of the target (and verifies it with
  /// --check): both must fail with `fragment`, and the target must hold the
  /// source's blocks before `firstUnwritten` and its own bytes from there.
  func assertRefused(
    _ t: Setup, _ stream: [UInt8], _ fragment: String, firstUnwritten: Int, key: [String] = ["--key-file", "k.key"],
    map: Bool = false, file: StaticString = #filePath, line: UInt = #line
  ) throws {
    try t.s.file("bad.stream", Data(stream))
    try t.s.file("b.img", t.b0)
    let check = try RRTCommand.run("merge-snapshot", ["--check"] + key + ["-i", "bad.stream"], cwd: t.s.url.path)
    assertFails(check, status: 1, mentioning: fragment, file: file, line: line)
    var args = key + ["-i", "bad.stream", "b.img"]
    if map {
      try t.s.file("m.map", try t.s.read("m0.map"))
      args = ["--map", "m.map"] + args
    }
    let r = try RRTCommand.run("merge-snapshot", args, cwd: t.s.url.path)
    assertFails(r, status: 1, mentioning: fragment, file: file, line: line)
    XCTAssertEqual(
      r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr.debugDescription)", file: file, line: line)
    let b1 = try t.s.read("b.img")
    XCTAssertEqual(b1.count, t.b0.count, file: file, line: line)
    let cut = firstUnwritten * Self.blockSize
    XCTAssertTrue(
      b1.prefix(cut) == t.a.prefix(cut), "blocks before \(firstUnwritten) are not the source's", file: file, line: line)
    XCTAssertTrue(
      b1.suffix(from: cut) == t.b0.suffix(from: cut), "the target was written from block \(firstUnwritten) on",
      file: file, line: line)
  }

  /// "record N at byte X" of the good stream.
  func at(_ t: Setup, _ seq: Int) -> String { "record \(seq) at byte \(t.ranges[seq].lowerBound)" }

  // MARK: Round trips

  func testRoundTripsWithKeyFilesAndPassphraseFiles() throws {
    let s = try Scratch()
    // Random, zeros, text and a partial last block.
    var rng = SplitMix64(seed: 7)
    var a = Data((0..<(3 << 20 + 4321)).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
    a.replaceSubrange((1 << 20)..<(3 << 19), with: Data(count: 1 << 19))
    let text = Array("encrypted streams compress first, then seal. ".utf8)
    a.replaceSubrange((2 << 20)..<(5 << 19), with: Data((0..<(1 << 19)).map { text[$0 % text.count] }))
    try s.file("a.img", a)
    try s.file("hex.key", Data(Self.hexKey.uppercased().utf8))
    var raw = SplitMix64(seed: 8)
    try s.file("raw.key", Data((0..<32).map { _ in UInt8(truncatingIfNeeded: raw.next()) }))
    try s.file("pw", Data("a long passphrase with spaces\n".utf8))
    for (i, key) in [["--key-file", "hex.key"], ["--key-file", "raw.key"], ["--passphrase-file", "pw"]].enumerated() {
      try s.randomFile("b.img", size: a.count, seed: 100 + UInt64(i))
      let k = key.joined(separator: " ")
      let r = try RRTCommand.shell(
        "snapshot --quiet --encrypt \(k) a.img | merge-snapshot --quiet \(k) b.img", cwd: s.url.path)
      XCTAssertEqual(r.status, 0, r.stderr)
      XCTAssertEqual(r.stderr, "", "--quiet prints nothing")
      XCTAssertTrue(try s.read("b.img") == a, "\(k): the target differs from the source")
      // Through -o and -i, with --check first; --json says it is encrypted.
      let snap = try RRTCommand.run(
        "snapshot", ["--json", "--encrypt"] + key + ["-o", "e.stream", "a.img"], cwd: s.url.path)
      XCTAssertEqual(snap.status, 0, snap.stderr)
      XCTAssertTrue(snap.stdout.contains("\"encrypted\": true"), snap.stdout)
      let check = try RRTCommand.run("merge-snapshot", ["--check"] + key + ["-i", "e.stream"], cwd: s.url.path)
      XCTAssertEqual(check.status, 0, check.stderr)
      XCTAssertTrue(check.stderr.contains("verified"), check.stderr)
      try s.randomFile("c.img", size: a.count, seed: 200 + UInt64(i))
      let merge = try RRTCommand.run(
        "merge-snapshot", ["--quiet"] + key + ["-i", "e.stream", "c.img"], cwd: s.url.path)
      XCTAssertEqual(merge.status, 0, merge.stderr)
      XCTAssertTrue(try s.read("c.img") == a, "\(k) through -o and -i")
      // Compressed before it is encrypted: the text and zeros shrink it.
      XCTAssertLessThan(try s.read("e.stream").count, a.count * 3 / 4)
    }
    // Uncompressed, and only the blocks that differ (bitmap-diff's map).
    try s.randomFile("e.img", size: a.count, seed: 400)
    let uncompressed = try RRTCommand.shell(
      "snapshot --quiet --encrypt --no-compress --key-file hex.key a.img | merge-snapshot --quiet --key-file hex.key e.img",
      cwd: s.url.path)
    XCTAssertEqual(uncompressed.status, 0, uncompressed.stderr)
    XCTAssertTrue(try s.read("e.img") == a, "--no-compress")
    var f = a
    f.replaceSubrange(70000..<70100, with: Data(repeating: 0xAB, count: 100))
    f.replaceSubrange((3 << 20)..<((3 << 20) + 10), with: Data(repeating: 0xCD, count: 10))
    try s.file("f.img", f)
    let diff = try RRTCommand.shell(
      "bitmap-diff --quiet -o d.map f.img a.img; snapshot --quiet --map d.map --encrypt --key-file hex.key a.img "
        + "| merge-snapshot --json --key-file hex.key f.img", cwd: s.url.path)
    XCTAssertEqual(diff.status, 0, diff.stderr)
    XCTAssertTrue(try s.read("f.img") == a, "the differing blocks, encrypted")
    XCTAssertTrue(
      diff.stdout.contains("\"written_blocks\": 2") && diff.stdout.contains("\"encrypted\": true"), diff.stdout)
    // The plaintext stream still reads as before, without a key.
    try s.randomFile("d.img", size: a.count, seed: 300)
    let plain = try RRTCommand.shell("snapshot --quiet a.img | merge-snapshot --quiet d.img", cwd: s.url.path)
    XCTAssertEqual(plain.status, 0, plain.stderr)
    XCTAssertTrue(try s.read("d.img") == a)
  }

  // MARK: Keys

  func testWrongMissingAndUnneededKeysWriteNothing() throws {
    let t = try setup()
    try t.s.file("other.key", Data(String(Self.hexKey.reversed()).utf8))
    try assertRefused(
      t, t.good, "record 0 at byte 16: wrong key: the key file other.key does not open this stream", firstUnwritten: 0,
      key: ["--key-file", "other.key"])
    try assertRefused(
      t, t.good, "the stream is encrypted with a key file; give it with --key-file FILE", firstUnwritten: 0, key: [])
    try assertRefused(
      t, t.good, "the stream is encrypted with a key file, not a passphrase; give --key-file FILE", firstUnwritten: 0,
      key: ["--passphrase-file", "pw"])
    // A key for a plaintext stream is refused.
    XCTAssertEqual(
      try RRTCommand.run("snapshot", ["--quiet", "-o", "plain.stream", "a.img"], cwd: t.s.url.path).status, 0)
    try assertRefused(
      t, [UInt8](try t.s.read("plain.stream")),
      "the stream is not encrypted, so nothing in it is authenticated; refusing it because --key-file was given",
      firstUnwritten: 0)
  }

  func testWrongPassphraseWritesNothing() throws {
    let t = try setup(passphrase: true)
    try t.s.file("pw2", Data("the passphrase of these tests!\n".utf8))
    try assertRefused(
      t, t.good, "wrong key: the passphrase in pw2 does not open this stream", firstUnwritten: 0,
      key: ["--passphrase-file", "pw2"])
    try assertRefused(
      t, t.good, "the stream is encrypted with a passphrase; give it with --passphrase-file FILE", firstUnwritten: 0,
      key: [])
    // The right one merges it.
    try t.s.file("b.img", t.b0)
    let r = try RRTCommand.run(
      "merge-snapshot", ["--quiet", "--passphrase-file", "pw", "-i", "good.stream", "b.img"], cwd: t.s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertTrue(try t.s.read("b.img") == t.a)
  }

  // MARK: Flipped bytes

  func testFlippedByteInADataRecord() throws {
    let t = try setup()
    // The middle of block 5's record (record 7).
    let r = t.ranges[7]
    var bad = t.good
    bad[r.lowerBound + r.count / 2] ^= 0x10
    try assertRefused(t, bad, at(t, 7) + ": checksum mismatch: the record is damaged", firstUnwritten: 5)
    // Forged: the CRC made right again; the tag still fails.
    Self.fixCRC(&bad, r)
    try assertRefused(
      t, bad, at(t, 7) + ": authentication failed: the record was altered, moved, or taken from another stream",
      firstUnwritten: 5)
    // The block index in the record's (encrypted) fields, forged.
    bad = t.good
    bad[r.lowerBound + 16] ^= 0x01
    Self.fixCRC(&bad, r)
    try assertRefused(t, bad, at(t, 7) + ": authentication failed", firstUnwritten: 5)
    // The framing (the AAD): its type.
    bad = t.good
    bad[r.lowerBound] ^= 0x01
    Self.fixCRC(&bad, r)
    try assertRefused(t, bad, at(t, 7) + ": authentication failed", firstUnwritten: 5)
  }

  func testFlippedByteInTheHeader() throws {
    let t = try setup()
    XCTAssertEqual(t.ranges[1].lowerBound, 116, "preamble 16, CRYPTO record 16 + 80 + 4")
    var bad = t.good
    bad[t.ranges[1].lowerBound + 20] ^= 0x01
    try assertRefused(t, bad, "record 1 at byte 116: checksum mismatch: the record is damaged", firstUnwritten: 0)
    Self.fixCRC(&bad, t.ranges[1])
    try assertRefused(t, bad, "record 1 at byte 116: authentication failed", firstUnwritten: 0)
    // The CRYPTO record's salt, forged: the key no longer opens the stream.
    bad = t.good
    bad[16 + 16 + 20] ^= 0x01
    Self.fixCRC(&bad, t.ranges[0])
    try assertRefused(
      t, bad,
      "record 0 at byte 16: wrong key: the key file k.key does not open this stream (or its CRYPTO record was altered)",
      firstUnwritten: 0)
  }

  func testFlippedByteInTheEndRecord() throws {
    let t = try setup()
    let end = t.ranges[18]
    XCTAssertEqual(end.upperBound, t.good.count)
    var bad = t.good
    bad[end.lowerBound + 30] ^= 0x01
    // Every block came before the END, verified; the stream is not recorded as merged.
    try assertRefused(
      t, bad, at(t, 18) + ": checksum mismatch: the record is damaged", firstUnwritten: Self.blocks, map: true)
    let stats = try RRTCommand.run("overwrite-map", ["stats", "--json", "m.map"], cwd: t.s.url.path)
    XCTAssertTrue(stats.stdout.contains("\"last_merged_stream\": null"), stats.stdout)
    XCTAssertTrue(stats.stdout.contains("\"set_blocks\": \(Self.blocks)"), stats.stdout)
    Self.fixCRC(&bad, end)
    try assertRefused(t, bad, at(t, 18) + ": authentication failed", firstUnwritten: Self.blocks, map: true)
    // The END's record count, forged with a right CRC, fails its tag too.
    bad = t.good
    bad[end.lowerBound + 16 + 24] ^= 0x01
    Self.fixCRC(&bad, end)
    try assertRefused(t, bad, at(t, 18) + ": authentication failed", firstUnwritten: Self.blocks)
  }

  // MARK: Records removed, swapped, spliced; cuts

  func testRecordRemoved() throws {
    let t = try setup()
    let removed = Array(t.good[..<t.ranges[7].lowerBound] + t.good[t.ranges[7].upperBound...])
    try assertRefused(
      t, removed, at(t, 7) + ": sequence number 8 where 7 was expected (a record is missing or out of order)",
      firstUnwritten: 5)
    // Removed and the rest renumbered, CRCs made right: the tags fail.
    var renumbered = removed
    for (k, r) in Self.recordRanges(renumbered).enumerated().dropFirst(7) { Self.renumber(&renumbered, r, to: k) }
    try assertRefused(t, renumbered, at(t, 7) + ": authentication failed", firstUnwritten: 5)
    // The END removed: incomplete, though every block came.
    let noEnd = Array(t.good[..<t.ranges[18].lowerBound])
    try assertRefused(t, noEnd, "truncated stream: no END record", firstUnwritten: Self.blocks)
  }

  func testTwoRecordsSwapped() throws {
    let t = try setup()
    let (r5, r6) = (t.ranges[7], t.ranges[8])
    var swapped = Array(t.good[..<r5.lowerBound] + t.good[r6] + t.good[r5] + t.good[r6.upperBound...])
    try assertRefused(t, swapped, at(t, 7) + ": sequence number 8 where 7 was expected", firstUnwritten: 5)
    // Swapped and renumbered: each record's sequence number is its nonce.
    Self.renumber(&swapped, r5, to: 7)
    Self.renumber(&swapped, r6, to: 8)
    try assertRefused(t, swapped, at(t, 7) + ": authentication failed", firstUnwritten: 5)
  }

  func testRecordSplicedFromAnotherStreamUnderTheSameKey() throws {
    let t = try setup()
    try t.s.randomFile("c.img", size: Self.blocks * Self.blockSize, seed: 3)
    let r = try RRTCommand.run(
      "snapshot", ["--quiet", "--encrypt", "--key-file", "k.key", "-o", "c.stream", "c.img"], cwd: t.s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    let other = [UInt8](try t.s.read("c.stream"))
    let otherRanges = Self.recordRanges(other)
    XCTAssertEqual(otherRanges[7], t.ranges[7], "the same place in a stream of the same shape")
    // Block 5 of the other stream: the same sequence number and a right CRC.
    let spliced = Array(t.good[..<t.ranges[7].lowerBound] + other[otherRanges[7]] + t.good[t.ranges[7].upperBound...])
    try assertRefused(
      t, spliced, at(t, 7) + ": authentication failed: the record was altered, moved, or taken from another stream",
      firstUnwritten: 5)
    // The other stream's END after a cut, renumbered.
    var end = Array(other[otherRanges[18]])
    Self.renumber(&end, 0..<end.count, to: 7)
    try assertRefused(
      t, Array(t.good[..<t.ranges[7].lowerBound]) + end, at(t, 7) + ": authentication failed", firstUnwritten: 5)
    // The same stream made again (same source, same key) does not lend its records either.
    let again = try RRTCommand.run(
      "snapshot", ["--quiet", "--encrypt", "--key-file", "k.key", "-o", "a2.stream", "a.img"], cwd: t.s.url.path)
    XCTAssertEqual(again.status, 0, again.stderr)
    let a2 = [UInt8](try t.s.read("a2.stream"))
    let same = Array(t.good[..<t.ranges[7].lowerBound] + a2[t.ranges[7]] + t.good[t.ranges[7].upperBound...])
    XCTAssertNotEqual(Array(a2[t.ranges[7]]), Array(t.good[t.ranges[7]]), "a fresh salt, a fresh key")
    try assertRefused(t, same, at(t, 7) + ": authentication failed", firstUnwritten: 5)
  }

  func testTruncatedStreams() throws {
    let t = try setup()
    // Inside block 5's record.
    try assertRefused(
      t, Array(t.good[..<(t.ranges[7].lowerBound + 1000)]), at(t, 7) + ": truncated stream: the record is incomplete",
      firstUnwritten: 5)
    // At its start.
    try assertRefused(
      t, Array(t.good[..<t.ranges[7].lowerBound]), at(t, 7) + ": truncated stream: no END record", firstUnwritten: 5)
    // One byte short of the END.
    try assertRefused(t, Array(t.good.dropLast()), at(t, 18) + ": truncated stream", firstUnwritten: Self.blocks)
    // Inside the CRYPTO record, and inside the HEADER.
    try assertRefused(t, Array(t.good[..<50]), "record 0 at byte 16: truncated stream", firstUnwritten: 0)
    try assertRefused(t, Array(t.good[..<150]), "record 1 at byte 116: truncated stream", firstUnwritten: 0)
    // Bytes after the END.
    try assertRefused(
      t, t.good + [0x44],
      at(t, 18).replacingOccurrences(of: "record 18", with: "record 19")
        .replacingOccurrences(of: "byte \(t.ranges[18].lowerBound)", with: "byte \(t.good.count)")
        + ": unexpected data after the END record", firstUnwritten: Self.blocks)
  }

  // MARK: Usage

  func testKeyOptionsAndKeyFilesAreChecked() throws {
    let s = try Scratch()
    try s.randomFile("a.img", size: 1 << 20, seed: 1)
    try s.file("short.key", Data(repeating: 7, count: 31))
    try s.file("k.key", Data(Self.hexKey.utf8))
    try s.file("empty", Data("\n".utf8))
    func refused(_ tool: String, _ args: [String], _ fragment: String, status: Int32 = 1, line: UInt = #line) throws {
      let r = try RRTCommand.run(tool, args, cwd: s.url.path)
      assertFails(r, status: status, mentioning: fragment, line: line)
      XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("out.stream")), "no stream written", line: line)
    }
    try refused(
      "snapshot", ["--encrypt", "-o", "out.stream", "a.img"],
      "--encrypt needs --key-file FILE or --passphrase-file FILE", status: 64)
    try refused(
      "snapshot", ["--key-file", "k.key", "-o", "out.stream", "a.img"], "add --encrypt to encrypt the stream",
      status: 64)
    try refused(
      "snapshot", ["--encrypt", "--key-file", "k.key", "--passphrase-file", "empty", "-o", "out.stream", "a.img"],
      "give one of --key-file and --passphrase-file, not both", status: 64)
    try refused(
      "snapshot", ["--encrypt", "--key-file", "short.key", "-o", "out.stream", "a.img"],
      "short.key: a key file holds exactly 32 raw bytes or 64 hex digits (one trailing newline allowed), and this one holds 31 bytes that are neither"
    )
    try refused(
      "snapshot", ["--encrypt", "--passphrase-file", "empty", "-o", "out.stream", "a.img"],
      "empty: the passphrase file is empty")
    try refused(
      "snapshot", ["--encrypt", "--key-file", "nothere", "-o", "out.stream", "a.img"], "nothere: No such file")
    try refused(
      "merge-snapshot", ["--check", "--key-file", "k.key", "--passphrase-file", "empty"],
      "give one of --key-file and --passphrase-file, not both", status: 64)
    // The help says where keys come from.
    for tool in ["snapshot", "merge-snapshot"] {
      let help = try RRTCommand.run(tool, ["--help"])
      let flat = help.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
      XCTAssertTrue(flat.contains("never from the command line or the environment"), "\(tool) --help: \(flat)")
      XCTAssertTrue(flat.contains("--key-file <file>") && flat.contains("--passphrase-file <file>"), tool)
    }
  }
}
