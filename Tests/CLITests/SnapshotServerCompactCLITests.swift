// snapshot-server compact and retain as an operator runs them on a store of
// backups: a chain of a full stream and seven incrementals (plain,
// encrypted, 4 KiB blocks and an odd size; StreamChainHarness.swift)
// compacted whole is a valid stream equal to the chain's end, merged or
// served, with the newest stream's instant, each block's newest record
// copied as stored; the oldest part compacted lets the rest of the chain
// follow it in snapshot-server serve and in merge-snapshot --mirror, and is
// compacted again with the rest; a damaged record, the output named among
// the inputs, a broken chain and a wrong key are refused in one sentence
// with nothing written; retain lists what a rule no longer needs, and no
// stream a kept point's chain needs, the chains served and compared with
// the device as it was; and compaction's memory stays within its bound.
// A record damaged right after a stream's HEADER fails only its blocks when
// served.

import DualRestore
import Foundation
import Glibc
import TestSupport
import XCTest

final class SnapshotServerCompactCLITests: CLITestCase {

  override class func tearDown() {
    ChainFixture.removeAll()
    super.tearDown()
  }

  // MARK: Helpers

  func fixture(_ kind: ChainKind) throws -> ChainFixture {
    try require("nbdinfo", "cmp")
    return try ChainFixture.get(kind)
  }

  /// A scratch directory of the test's own, with an index directory, and a
  /// server to start there.
  func rig(_ f: ChainFixture) throws -> (Scratch, ChainServer) {
    let s = try Scratch()
    try FileManager.default.createDirectory(atPath: s.path("idx"), withIntermediateDirectories: true)
    let server = ChainServer(s, f)
    rigs.append(server)
    return (s, server)
  }

  @discardableResult
  func sh(_ script: String, in s: Scratch, status: Int32 = 0, file: StaticString = #filePath, line: UInt = #line)
    throws -> RRTCommand.Result
  {
    let r = try RRTCommand.shell(script, timeout: 120, cwd: s.url.path)
    XCTAssertEqual(r.status, status, "\(script): \(r.summary)", file: file, line: line)
    return r
  }

  /// A built tool run in `s` to its end with `status`.
  @discardableResult
  func run(
    _ s: Scratch, _ tool: String, _ arguments: [String], status: Int32 = 0, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> RRTCommand.Result {
    let r = try RRTCommand.run(tool, arguments, timeout: 120, cwd: s.url.path)
    XCTAssertEqual(r.status, status, "\(tool) \(arguments): \(r.summary)", file: file, line: line)
    return r
  }

  func json(_ r: RRTCommand.Result, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try TrackRig.json(r.stdout, file: file, line: line)
  }

  /// `snapshot-server compact --json` of `streams` into `output`, with the
  /// test's index directory: its summary.
  func compact(
    _ f: ChainFixture, _ s: Scratch, _ streams: [String], to output: String, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> [String: Any] {
    let r = try run(
      s, "snapshot-server",
      ["compact", "--json", "-o", output, "--index-dir", s.path("idx")] + f.keyOptions + streams, file: file,
      line: line)
    XCTAssertTrue(
      r.stderr.contains("snapshot-server: compacted \(streams.count) stream(s) into \(output) (stream "), r.stderr,
      file: file, line: line)
    return try json(r, file: file, line: line)
  }

  /// What snapshot --json said when it made stream `k` of the chain.
  func made(_ f: ChainFixture, _ k: Int) throws -> [String: Any] {
    try TrackRig.json(try String(contentsOfFile: f.s.path("s\(k).json"), encoding: .utf8))
  }

  /// The instant snapshot reported for stream `k` (RFC 3339, milliseconds).
  func started(_ f: ChainFixture, _ k: Int) throws -> String {
    try XCTUnwrap(try made(f, k)["started"] as? String)
  }

  /// Runs a command that must be refused: status 1, one sentence on stderr
  /// containing `fragment`, and `output` neither made nor left as a
  /// temporary file beside it.
  func assertRefused(
    _ s: Scratch, _ tool: String, _ arguments: [String], _ fragment: String, output: String,
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    let r = try RRTCommand.run(tool, arguments, timeout: 120, cwd: s.url.path)
    assertFails(r, status: 1, mentioning: fragment, file: file, line: line)
    XCTAssertEqual(
      r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr.debugDescription)", file: file, line: line)
    XCTAssertTrue(r.stderr.hasPrefix("snapshot-server: "), r.stderr, file: file, line: line)
    XCTAssertEqual(r.stdout, "", file: file, line: line)
    XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(output) was made", file: file, line: line)
    let dir = (output as NSString).deletingLastPathComponent
    let base = (output as NSString).lastPathComponent
    let left = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(".\(base).") }
    XCTAssertEqual(left, [], "temporary files left in \(dir)", file: file, line: line)
  }

  /// The stream's blocks by block number: the index entries (parsed from
  /// the file) of its DATA records.
  func dataRecords(_ index: IndexFile) -> [Int: IndexFile.Entry] {
    var byBlock: [Int: IndexFile.Entry] = [:]
    for e in index.entries where e.type == 2 { byBlock[e.first] = e }
    return byBlock
  }

  // MARK: (1) Compaction equals the chain's end

  /// Compacts the whole chain and checks the output every way it is used:
  /// the scratch directory and the output.
  @discardableResult
  func assertCompactionIsTheChainsEnd(_ kind: ChainKind, file: StaticString = #filePath, line: UInt = #line) throws
    -> (Scratch, String)
  {
    let f = try fixture(kind)
    let (s, server) = try rig(f)
    let out = s.path("compact.stream")
    let streams = (0..<f.streamCount).map { f.stream($0) }
    let o = try compact(f, s, streams, to: out, file: file, line: line)

    // The summary: every block once, the zeros exactly the device's.
    let zeros = f.zeroBlocks[7].count
    XCTAssertEqual(o["streams"] as? Int, f.streamCount, "\(o)", file: file, line: line)
    XCTAssertEqual(o["zero_blocks"] as? Int, zeros, "\(o)", file: file, line: line)
    XCTAssertEqual(o["data_blocks"] as? Int, f.blockCount - zeros, "\(o)", file: file, line: line)
    XCTAssertEqual(o["encrypted"] as? Bool, kind.encrypted, "\(o)", file: file, line: line)
    XCTAssertEqual(o["output"] as? String, out, "\(o)", file: file, line: line)
    let size = try FileManager.default.attributesOfItem(atPath: out)[.size] as? Int
    XCTAssertEqual(o["bytes_out"] as? Int, size, "\(o)", file: file, line: line)
    let id = try XCTUnwrap(o["stream_id"] as? String, "\(o)", file: file, line: line)
    XCTAssertFalse(f.ids.contains(id), "a stream id of its own", file: file, line: line)

    // A valid stream, as merge-snapshot --check reads it: full, standing
    // for the newest stream, with its instant.
    let key = f.keyOptions.map { "'\($0)'" }.joined(separator: " ")
    let check = try json(try run(s, "merge-snapshot", ["--check", "--json"] + f.keyOptions + ["-i", out]))
    XCTAssertEqual(check["stream_id"] as? String, id, "\(check)", file: file, line: line)
    XCTAssertTrue(check["base_stream_id"] is NSNull, "\(check)", file: file, line: line)
    XCTAssertEqual(check["stands_for"] as? String, f.ids[7], "\(check)", file: file, line: line)
    XCTAssertEqual(check["started"] as? String, try started(f, 7), "\(check)", file: file, line: line)
    XCTAssertEqual(check["complete"] as? Bool, true, "\(check)", file: file, line: line)
    XCTAssertEqual(check["device_size"] as? Int, f.size, "\(check)", file: file, line: line)
    XCTAssertEqual(check["block_size"] as? Int, f.blockSize, "\(check)", file: file, line: line)
    if kind.encrypted {
      // Encrypted: the preamble says so, and the key is needed.
      XCTAssertEqual(try StreamHead.flags(out), 1, file: file, line: line)
      let bare = try RRTCommand.run("merge-snapshot", ["--check", "-i", out])
      assertFails(bare, status: 1, mentioning: "give it with --key-file FILE", file: file, line: line)
    } else {
      // The HEADER's instant to the nanosecond, and the LINEAGE record.
      let head = try StreamHead(out)
      let newest = try StreamHead(f.stream(7))
      XCTAssertEqual(head.streamID, id, file: file, line: line)
      XCTAssertEqual(head.baseStreamID, String(repeating: "0", count: 32), file: file, line: line)
      XCTAssertEqual(head.started, newest.started, "the newest stream's instant", file: file, line: line)
      XCTAssertEqual(
        head.lineage,
        StreamHead.Lineage(
          standsFor: f.ids[7], standsForStarted: newest.started, firstCompacted: f.ids[0], count: f.streamCount),
        file: file, line: line)
    }

    // Merged into an empty image: the device.
    try sh(
      "truncate -s \(f.size) merged.img && merge-snapshot --quiet \(key) -i '\(out)' merged.img && "
        + "cmp merged.img '\(f.device)'", in: s, file: file, line: line)

    // Served alone: the device.
    try server.start(f.keyOptions + ["--index-dir", s.path("idx"), out], file: file, line: line)
    XCTAssertTrue(
      server.log.contains("serving 1 stream(s) ending with \(out) (stream \(id)"), server.log, file: file, line: line)
    try sh("bitmap-diff --quiet '\(server.uri)' '\(f.device)'", in: s, file: file, line: line)
    server.stop(file: file, line: line)

    // Each block's newest record copied as stored: the same length (LZ4 or
    // raw as it was), and in a plaintext stream the same body.
    let indexes = try f.ids.map { try IndexFile(s.path("idx/\($0).dridx")) }
    let compacted = try IndexFile(s.path("idx/\(id).dridx"))
    XCTAssertEqual(
      Set(compacted.entries.filter { $0.type == 3 }.flatMap { Array($0.blocks) }), f.zeroBlocks[7],
      "the ZERO runs are the device's zero blocks", file: file, line: line)
    let copies = dataRecords(compacted)
    XCTAssertEqual(copies.count, f.blockCount - zeros, file: file, line: line)
    let sources = indexes.map { dataRecords($0) }
    let bytes = kind.encrypted ? [] : try streams.map { [UInt8](try Data(contentsOf: URL(fileURLWithPath: $0))) }
    let output = kind.encrypted ? [] : [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    var differ: [Int] = []
    for (b, e) in copies.sorted(by: { $0.key < $1.key }) {
      guard let from = sources[f.newest[b]][b], from.length == e.length else {
        differ.append(b)
        continue
      }
      // The body: after the 16 framing bytes, before the CRC.
      if !kind.encrypted
        && bytes[f.newest[b]][(from.offset + 16)..<(from.offset + from.length - 4)]
          != output[(e.offset + 16)..<(e.offset + e.length - 4)]
      {
        differ.append(b)
      }
    }
    XCTAssertEqual(
      differ.prefix(10), [], "blocks not copied as stored from their newest record", file: file, line: line)
    return (s, out)
  }

  func testCompactingAPlainChainWritesItsEnd() throws {
    try assertCompactionIsTheChainsEnd(.plain)
  }

  func testCompactingAnEncryptedChainWritesItsEndEncrypted() throws {
    let (s, out) = try assertCompactionIsTheChainsEnd(.encrypted)
    // retain reads the encrypted LINEAGE record with the key: the whole
    // chain is replaced.
    let f = try fixture(.encrypted)
    let plan = try json(
      try run(
        s, "snapshot-server",
        ["retain", "--json", "--keep-last", "1"] + f.keyOptions + [out] + (0..<f.streamCount).map { f.stream($0) }))
    let kept = try XCTUnwrap(plan["kept_points"] as? [[String: Any]], "\(plan)")
    XCTAssertEqual(kept.map { $0["stream_id"] as? String }, [f.ids[7]], "\(plan)")
    XCTAssertEqual(kept.first?["chain"] as? [String], [out], "\(plan)")
    let deletable = try XCTUnwrap(plan["deletable"] as? [[String: Any]], "\(plan)")
    XCTAssertEqual(Set(deletable.compactMap { $0["stream"] as? String }), Set((0..<8).map { f.stream($0) }))
    XCTAssertEqual(
      Set(deletable.compactMap { $0["reason"] as? String }), ["replaced by compacted stream \(out)"], "\(plan)")
  }

  func testCompactingAChainOfSmallBlocksWritesItsEnd() throws {
    try assertCompactionIsTheChainsEnd(.small)
  }

  // MARK: (2) The oldest part compacted

  func testTheChainAfterACompactedPartFollowsIt() throws {
    let f = try fixture(.small)
    let (s, server) = try rig(f)
    let idx = s.path("idx")
    let c = s.path("c.stream")
    let oc = try compact(f, s, (0...3).map { f.stream($0) }, to: c)
    XCTAssertEqual(oc["streams"] as? Int, 4, "\(oc)")
    XCTAssertEqual(oc["zero_blocks"] as? Int, f.zeroBlocks[3].count, "\(oc)")
    let cID = try XCTUnwrap(oc["stream_id"] as? String)
    let s3 = try StreamHead(f.stream(3))
    let head = try StreamHead(c)
    XCTAssertEqual(head.started, s3.started, "the instant of the last stream compacted")
    XCTAssertEqual(
      head.lineage,
      StreamHead.Lineage(standsFor: f.ids[3], standsForStarted: s3.started, firstCompacted: f.ids[0], count: 4))

    // Served: C alone is the device after s3; C and s4 to s7, its end.
    try server.start(["--index-dir", idx, c])
    try sh("bitmap-diff --quiet '\(server.uri)' '\(f.version(3))'", in: s)
    server.stop()
    let rest = (4...7).map { f.stream($0) }
    try server.start(["--index-dir", idx, c] + rest)
    XCTAssertTrue(server.log.contains("serving 5 stream(s) ending with \(f.stream(7))"), server.log)
    try sh("bitmap-diff --quiet '\(server.uri)' '\(f.device)'", in: s)
    server.stop()
    // C compacted alone stands for what C stands for: s4 follows it too.
    let again = s.path("again.stream")
    XCTAssertEqual(try compact(f, s, [c], to: again)["streams"] as? Int, 1)
    XCTAssertEqual(try StreamHead(again).lineage, head.lineage)
    try server.start(["--index-dir", idx, again] + rest)
    try sh("bitmap-diff --quiet '\(server.uri)' '\(f.device)'", in: s)
    server.stop()
    // A stream after C that does not follow it is still refused.
    let gap = try RRTCommand.run(
      "snapshot-server", ["serve", "--socket", server.socket, "--index-dir", idx, c, rest[1]], timeout: 30)
    assertFails(
      gap, status: 1,
      mentioning: "\(rest[1]) applies on top of stream \(f.ids[4]), but the stream before it, \(c), is \(cID) "
        + "(standing for \(f.ids[3])); a stream of the chain is missing or out of order")

    // A mirror seeded from C takes s4 to s7 after it, without --force.
    try sh("truncate -s \(f.size) mirror.img", in: s)
    let merged = try json(
      try run(s, "merge-snapshot", ["--json", "--mirror", "--map", "m.map", "-i", c, "mirror.img"]))
    XCTAssertEqual(merged["stream_id"] as? String, cID, "\(merged)")
    XCTAssertEqual(merged["stands_for"] as? String, f.ids[3], "\(merged)")
    let stats = try json(try run(s, "overwrite-map", ["stats", "--json", "m.map"]))
    XCTAssertEqual(stats["last_merged_stream"] as? String, f.ids[3], "\(stats)")
    try sh("cmp mirror.img '\(f.version(3))'", in: s)
    for p in rest {
      let r = try run(s, "merge-snapshot", ["--quiet", "--mirror", "--map", "m.map", "-i", p, "mirror.img"])
      XCTAssertEqual(r.stderr, "", "no warning: \(p)")
    }
    try sh("cmp mirror.img '\(f.device)'", in: s)

    // A chain that starts with a compacted stream compacts again: C2
    // stands for s7 and compacts all eight streams.
    let c2 = s.path("c2.stream")
    let oc2 = try compact(f, s, [c] + rest, to: c2)
    XCTAssertEqual(oc2["streams"] as? Int, 5, "\(oc2)")
    let s7 = try StreamHead(f.stream(7))
    let head2 = try StreamHead(c2)
    XCTAssertEqual(head2.started, s7.started)
    XCTAssertEqual(
      head2.lineage,
      StreamHead.Lineage(standsFor: f.ids[7], standsForStarted: s7.started, firstCompacted: f.ids[0], count: 8))
    try sh("truncate -s \(f.size) c2.img", in: s)
    let merged2 = try json(try run(s, "merge-snapshot", ["--json", "--mirror", "--map", "c2.map", "-i", c2, "c2.img"]))
    XCTAssertEqual(merged2["stands_for"] as? String, f.ids[7], "\(merged2)")
    try sh("cmp c2.img '\(f.device)'", in: s)
  }

  // MARK: (3) Refusals

  func testADamagedRecordStopsCompactionWithNothingWritten() throws {
    for kind in [ChainKind.small, .encrypted] {
      let f = try fixture(kind)
      let (s, _) = try rig(f)
      let idx = s.path("idx")
      let out = s.path("out.stream")
      // The newest stream copied, its index (and the others') built while whole.
      let copy = try f.copyStreams(to: s, [7])[0]
      let streams = (0..<7).map { f.stream($0) } + [copy]
      try run(s, "snapshot-server", ["index", "--index-dir", idx] + f.keyOptions + streams)
      let index = try IndexFile("\(idx)/\(f.ids[7]).dridx")
      let whole = try Data(contentsOf: URL(fileURLWithPath: copy))
      // A DATA record holding a block no other stream makes newer, and a
      // ZERO run holding such blocks, past the first record after the
      // HEADER (which opening the stream reads: the last case).
      let data = try XCTUnwrap(index.entries.first { $0.type == 2 && $0.sequence >= 3 && f.newest[$0.first] == 7 })
      let zero = try XCTUnwrap(
        index.entries.first { $0.type == 3 && $0.sequence >= 3 && $0.blocks.contains { f.newest[$0] == 7 } })
      let first = try XCTUnwrap(index.entries.min { $0.sequence < $1.sequence })
      let damaged = "checksum mismatch: the record is damaged"
      let forged = "authentication failed: the record was altered, moved, or taken from another stream"
      var cases: [(IndexFile.Entry, Int, Bool, String)] = [
        (data, data.offset + 32 + (data.length - 36) / 2, false, damaged + "; nothing was compacted"),
        (zero, zero.offset + 16 + 3, false, damaged + "; nothing was compacted"),
        (first, first.offset + first.length - 5, false, damaged),
      ]
      if kind.encrypted { cases.append((data, data.offset + 32 + 5, true, forged + "; nothing was compacted")) }
      for (record, at, forge, why) in cases {
        try StreamEdit.flip(copy, at: at)
        if forge { try StreamEdit.fixCRC(copy, record: record) }
        try assertRefused(
          s, "snapshot-server", ["compact", "-o", out, "--index-dir", idx] + f.keyOptions + streams,
          "snapshot-server: \(copy): record \(record.sequence) at byte \(record.offset): \(why)",
          output: out)
        try whole.write(to: URL(fileURLWithPath: copy))
      }
      // Whole again, the same command compacts.
      try run(s, "snapshot-server", ["compact", "--quiet", "-o", out, "--index-dir", idx] + f.keyOptions + streams)
      try run(s, "merge-snapshot", ["--check", "--quiet"] + f.keyOptions + ["-i", out])
    }
  }

  func testCompactRefusesItsInputAsOutputABrokenChainAndAWrongKey() throws {
    let f = try fixture(.small)
    let (s, _) = try rig(f)
    let p = try f.copyStreams(to: s)
    let saved = try p.map { try Data(contentsOf: URL(fileURLWithPath: $0)) }
    // Indexes made first, so that a refusal is the only line.
    try run(s, "snapshot-server", ["index"] + p)

    // The output named as one of the streams, by another spelling too.
    for (output, named) in [("./s7.stream", "./s7.stream"), (p[0], p[0])] {
      let r = try RRTCommand.run("snapshot-server", ["compact", "-o", output] + p, cwd: s.url.path)
      assertFails(r, status: 1, mentioning: "snapshot-server: the output \(named) is one of the streams of the chain")
      XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
    }
    for (k, path) in p.enumerated() {
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), saved[k], "stream \(k) untouched")
    }
    XCTAssertEqual(
      try FileManager.default.contentsOfDirectory(atPath: s.url.path).filter { $0.hasPrefix(".") }, [],
      "no temporary file")

    // A broken chain: refused before any index is built.
    let g = try Scratch()
    let q = try f.copyStreams(to: g, [0, 1, 3])
    let out = g.path("out.stream")
    try assertRefused(
      g, "snapshot-server", ["compact", "-o", out] + q,
      "\(q[2]) applies on top of stream \(f.ids[2]), but the stream before it, \(q[1]), is \(f.ids[1]); "
        + "a stream of the chain is missing or out of order", output: out)
    try assertRefused(
      g, "snapshot-server", ["compact", "-o", out, q[1], q[2]],
      "\(q[1]) is an incremental stream on top of stream \(f.ids[0]); a chain starts with a full stream",
      output: out)
    XCTAssertEqual(
      try FileManager.default.contentsOfDirectory(atPath: g.url.path).filter { $0.hasSuffix(".dridx") }, [],
      "no index built for a chain refused")

    // Encrypted: a wrong key, no key, a key for a plaintext chain.
    let e = try fixture(.encrypted)
    let encrypted = (0..<e.streamCount).map { e.stream($0) }
    let wrong = s.path("wrong.key")
    try Data(String(ChainFixture.hexKey.reversed()).utf8).write(to: URL(fileURLWithPath: wrong))
    let fresh = g.path("idx")
    try FileManager.default.createDirectory(atPath: fresh, withIntermediateDirectories: true)
    try assertRefused(
      g, "snapshot-server", ["compact", "-o", out, "--index-dir", fresh, "--key-file", wrong] + encrypted,
      "wrong key: the key file \(wrong) does not open this stream", output: out)
    try assertRefused(
      g, "snapshot-server", ["compact", "-o", out, "--index-dir", fresh] + encrypted,
      "the stream is encrypted with a key file; give it with --key-file FILE", output: out)
    try assertRefused(
      g, "snapshot-server", ["compact", "-o", out, "--index-dir", fresh] + e.keyOptions + q[0...1],
      "the stream is not encrypted, so nothing in it is authenticated; refusing it", output: out)
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: fresh), [], "no index built")
  }

  /// A damaged record right after a stream's HEADER is a record like any
  /// other once the stream is indexed: served, its own blocks fail with EIO
  /// and the rest of the device reads on. Opening a stream reads its head
  /// (StoredStream.readHead), which parses a LINEAGE record after the HEADER
  /// and no other: a damaged first DATA record must not refuse the chain.
  func testADamagedRecordRightAfterTheHeaderFailsOnlyItsBlocksWhenServed() throws {
    guard (try? RRTCommand.run("/usr/bin/python3", ["-c", "import nbd"], timeout: 20))?.status == 0 else {
      throw XCTSkip("/usr/bin/python3 with libnbd's nbd module (python3-libnbd) is needed")
    }
    let f = try fixture(.small)
    let (s, server) = try rig(f)
    let idx = s.path("idx")
    let copy = try f.copyStreams(to: s, [7])[0]
    let streams = (0..<7).map { f.stream($0) } + [copy]
    try run(s, "snapshot-server", ["index", "--index-dir", idx] + streams)
    let index = try IndexFile("\(idx)/\(f.ids[7]).dridx")
    let first = try XCTUnwrap(index.entries.min { $0.sequence < $1.sequence })
    let failing = Set(first.blocks.filter { f.newest[$0] == 7 })
    XCTAssertFalse(failing.isEmpty, "the first record of s7 holds blocks no other stream makes newer")
    try StreamEdit.flip(copy, at: first.offset + first.length - 5)
    try server.start(["--index-dir", idx] + streams)
    let r = try f.check("blocks", server.uri)
    let failed = try XCTUnwrap(r["failed"] as? [String: Int], "\(r)")
    XCTAssertEqual(Set(failed.keys.compactMap { Int($0) }), failing, "the blocks that fail")
    XCTAssertEqual(Set(failed.values), [Int(EIO)], "\(failed)")
    XCTAssertEqual(r["mismatched"] as? [Int], [], "every other block equals the device")
    XCTAssertTrue(
      server.log.contains(
        "\(copy): record \(first.sequence) at byte \(first.offset): checksum mismatch: the record is damaged"),
      server.log)
    server.stop()
  }

  // MARK: (4) retain

  /// A store in `s` of the small chain's eight streams, C1 (compacting s0
  /// to s3) and C2 (compacting C1 and s4 to s7); `restamp` moves streams'
  /// instants first. Returns the paths, s0 to s7, then C1 and C2.
  func store(_ f: ChainFixture, _ s: Scratch, restamp: [Int: Int64] = [:]) throws -> [String] {
    var p = try f.copyStreams(to: s)
    for (k, ns) in restamp { try StreamHead.restamp(p[k], to: ns) }
    XCTAssertEqual(try compact(f, s, Array(p[0...3]), to: s.path("c1.stream"))["streams"] as? Int, 4)
    p.append(s.path("c1.stream"))
    XCTAssertEqual(try compact(f, s, [p[8]] + p[4...7], to: s.path("c2.stream"))["streams"] as? Int, 5)
    p.append(s.path("c2.stream"))
    return p
  }

  struct Plan {
    /// Kept points: the stream id each names, its instant, its chain.
    var kept: [(id: String, started: String, chain: [String])]
    var needed: [String]
    var deletable: [String: String]
    var errors: [String]
  }

  /// `retain --json RULE STREAMS`, and the same without --json: one plan,
  /// said twice.
  func retain(
    _ s: Scratch, _ rule: [String], _ streams: [String], status: Int32 = 0, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> Plan {
    let r = try run(
      s, "snapshot-server", ["retain", "--json"] + rule + streams, status: status, file: file, line: line)
    let o = try json(r, file: file, line: line)
    let kept = try XCTUnwrap(o["kept_points"] as? [[String: Any]], "\(o)", file: file, line: line).map {
      ($0["stream_id"] as? String ?? "", $0["started"] as? String ?? "", $0["chain"] as? [String] ?? [])
    }
    var deletable: [String: String] = [:]
    for d in try XCTUnwrap(o["deletable"] as? [[String: Any]], "\(o)", file: file, line: line) {
      deletable[d["stream"] as? String ?? ""] = d["reason"] as? String
    }
    let plan = Plan(
      kept: kept, needed: o["needed"] as? [String] ?? [], deletable: deletable, errors: o["errors"] as? [String] ?? [])
    XCTAssertEqual(
      r.stderr.split(separator: "\n").map(String.init), plan.errors.map { "snapshot-server: \($0)" }, file: file,
      line: line)
    // The text says the same.
    let text = try run(s, "snapshot-server", ["retain"] + rule + streams, status: status, file: file, line: line)
    XCTAssertEqual(
      text.lines,
      plan.kept.map { "keep point \($0.id) of \($0.started): \($0.chain.joined(separator: " "))" }
        + plan.deletable.keys.sorted().map { "deletable \($0): \(plan.deletable[$0] ?? "")" }, file: file, line: line)
    // Nothing both needed and deletable; every stream a kept chain uses is needed.
    XCTAssertEqual(Set(plan.needed).intersection(plan.deletable.keys), [], file: file, line: line)
    XCTAssertEqual(Set(plan.kept.flatMap { $0.chain }), Set(plan.needed), file: file, line: line)
    return plan
  }

  func testRetainListsWhatNoKeptPointNeeds() throws {
    let f = try fixture(.small)
    let (s, server) = try rig(f)
    let p = try store(f, s)
    let (c1, c2) = (p[8], p[9])
    // In any order.
    let all = [p[5], c2, p[0], p[7], p[3], c1, p[1], p[6], p[2], p[4]]

    // The last point only: C2 alone; everything else is replaced by it.
    let one = try retain(s, ["--keep-last", "1"], all)
    XCTAssertEqual(one.kept.map { $0.id }, [f.ids[7]])
    XCTAssertEqual(one.kept.map { $0.chain }, [[c2]])
    XCTAssertEqual(one.kept.map { $0.started }, [try started(f, 7)])
    XCTAssertEqual(one.needed, [c2])
    XCTAssertEqual(
      one.deletable, Dictionary(uniqueKeysWithValues: p[0...8].map { ($0, "replaced by compacted stream \(c2)") }))
    XCTAssertEqual(one.errors, [])

    // The last three points: each by its shortest chain.
    let three = try retain(s, ["--keep-last", "3"], all)
    XCTAssertEqual(three.kept.map { $0.id }, [f.ids[5], f.ids[6], f.ids[7]])
    XCTAssertEqual(three.kept.map { $0.started }, [try started(f, 5), try started(f, 6), try started(f, 7)])
    XCTAssertEqual(three.kept.map { $0.chain }, [[c1, p[4], p[5]], [c1, p[4], p[5], p[6]], [c2]])
    XCTAssertEqual(three.needed, [c1, c2, p[4], p[5], p[6]])
    var expected = Dictionary(uniqueKeysWithValues: p[0...3].map { ($0, "replaced by compacted stream \(c1)") })
    expected[p[7]] = "replaced by compacted stream \(c2)"
    XCTAssertEqual(three.deletable, expected)
    // Each kept chain, served, is the device as it was at that point.
    for point in three.kept {
      let k = try XCTUnwrap(f.ids.firstIndex(of: point.id))
      try server.start(["--index-dir", s.path("idx")] + point.chain)
      try sh("bitmap-diff --quiet '\(server.uri)' '\(f.version(k))'", in: s)
      server.stop()
    }

    // --keep-daily 1: the newest point of today, by the rule worked out
    // here from the instants snapshot reported.
    let today = String(Instant.now().description.prefix(10))
    var newestOfDay: [String: Int] = [:]
    for k in 0..<f.streamCount where try started(f, k).prefix(10) >= today {
      newestOfDay[String(try started(f, k).prefix(10))] = k
    }
    let daily = try retain(s, ["--keep-daily", "1"], all)
    XCTAssertEqual(
      Set(daily.kept.map { $0.id }), Set(newestOfDay.values.map { f.ids[$0] } + [f.ids[7]]), "\(daily.kept)")

    // A store missing s2: the streams after it are reported, in neither
    // list, and retain exits 1.
    let gap = [p[0], p[1]] + p[3...7]
    let broken = try retain(s, ["--keep-last", "1"], gap, status: 1)
    XCTAssertEqual(
      broken.errors,
      [
        "\(p[3]): stream \(f.ids[3]) cannot be reached: its base \(f.ids[2]) is not in the store"
      ] + (4...7).map { "\(p[$0]): stream \(f.ids[$0]) cannot be reached: its base \(f.ids[$0 - 1]) cannot be reached" }
    )
    XCTAssertEqual(broken.kept.map { $0.id }, [f.ids[1]])
    XCTAssertEqual(broken.kept.map { $0.chain }, [[p[0], p[1]]])
    XCTAssertEqual(broken.deletable, [:])
    // With C1 in the store, s3's point is reached through it: no gap.
    let bridged = try retain(s, ["--keep-last", "1"], gap + [c1])
    XCTAssertEqual(bridged.errors, [])
    XCTAssertEqual(bridged.kept.map { $0.chain }, [[c1, p[4], p[5], p[6], p[7]]])
    XCTAssertEqual(Set(bridged.deletable.keys), [p[0], p[1], p[3]])

    // No rule, or a rule out of range: a usage error.
    for rule in [[], ["--keep-last", "0"], ["--keep-daily", "0"]] {
      let r = try RRTCommand.run("snapshot-server", ["retain"] + rule + all)
      XCTAssertEqual(r.status, 64, r.summary)
      XCTAssertTrue(
        r.stderr.contains(rule.isEmpty ? "give --keep-last N or --keep-daily D" : "is out of range"), r.stderr)
      XCTAssertEqual(r.stdout, "")
    }
  }

  func testRetainKeepsTheNewestPointOfEachRecentDay() throws {
    let f = try fixture(.small)
    let (s, _) = try rig(f)
    // s0 and s1 read three days ago, s2 and s3 two, s4 and s5 yesterday
    // (at noon, UTC, a minute apart), s6 and s7 today: the instants moved
    // in the streams as the clock would have set them.
    let day: Int64 = 86_400 * 1_000_000_000
    let midnight = Instant.now().nanosecondsSinceEpoch / day * day
    var restamp: [Int: Int64] = [:]
    for k in 0..<6 { restamp[k] = midnight - Int64(3 - k / 2) * day + day / 2 + Int64(k) * 60_000_000_000 }
    let p = try store(f, s, restamp: restamp)
    for k in 0..<6 {
      XCTAssertEqual(try StreamHead(p[k]).started, restamp[k])
      try run(s, "merge-snapshot", ["--check", "--quiet", "-i", p[k]])
    }
    let (c1, c2) = (p[8], p[9])
    XCTAssertEqual(try StreamHead(c1).started, restamp[3], "C1 has s3's instant")
    let instants = try (0..<8).map { try StreamHead(p[$0]).started }

    // The rule worked out here: the newest point of each of the last D
    // days, and the newest point.
    func expected(_ days: Int, last: Int = 0) -> Set<String> {
      let today = Instant.now().nanosecondsSinceEpoch / day
      var newest: [Int64: Int] = [:]
      for k in 0..<8 where instants[k] / day > today - Int64(days) { newest[instants[k] / day] = k }
      return Set(newest.values.map { f.ids[$0] } + (8 - last..<8).map { f.ids[$0] } + [f.ids[7]])
    }
    // Each kept point's shortest chain.
    func chain(_ k: Int) -> [String] {
      switch k {
      case 7: return [c2]
      case 3: return [c1]
      case 4...6: return [c1] + p[4...k]
      default: return Array(p[0...k])
      }
    }
    let all = p
    for (rule, points) in [
      (["--keep-daily", "1"], [7]), (["--keep-daily", "2"], [5, 7]), (["--keep-daily", "3"], [3, 5, 7]),
      (["--keep-daily", "4"], [1, 3, 5, 7]), (["--keep-daily", "3", "--keep-last", "2"], [3, 5, 6, 7]),
    ] {
      let plan = try retain(s, rule, all)
      let last = rule.count > 2 ? 2 : 0
      XCTAssertEqual(Set(plan.kept.map { $0.id }), expected(Int(rule[1]) ?? 0, last: last), "\(rule)")
      XCTAssertEqual(plan.kept.map { $0.id }, points.map { f.ids[$0] }, "\(rule)")
      XCTAssertEqual(plan.kept.map { $0.chain }, points.map { chain($0) }, "\(rule)")
      XCTAssertEqual(Set(plan.deletable.keys), Set(all).subtracting(plan.needed), "\(rule)")
    }
  }

  // MARK: (5) Memory

  func testCompactingA256MiBChainStaysWithinItsMemoryBound() throws {
    try require("/usr/bin/time", "cmp")
    let s = try Scratch()
    let size = 256 << 20
    try s.randomFile("dev.img", size: size, seed: 77)
    let s0 = try json(try run(s, "snapshot", ["--json", "--block-size", "64K", "-o", "s0.stream", "dev.img"]))
    let id0 = try XCTUnwrap(s0["stream_id"] as? String)
    // Eight changed ranges, one of them zeroed.
    try run(s, "overwrite-map", ["create", "--like", "dev.img", "--block-size", "64K", "m1.map"])
    var rng = SplitMix64(seed: 78)
    for i in 0..<8 {
      let at = Int(rng.next() % UInt64(size - (2 << 20)))
      let length = 1 + Int(rng.next() % UInt64(1 << 20))
      try s.patch("dev.img", at: at, i == 0 ? [UInt8](repeating: 0, count: length) : rng.bytes(length))
      let first = at / 65536 * 65536
      let end = (at + length + 65535) / 65536 * 65536
      try run(s, "overwrite-map", ["set", "m1.map", "\(first)", "\(end - first)"])
    }
    try run(s, "snapshot", ["--quiet", "--map", "m1.map", "--base", id0, "-o", "s1.stream", "dev.img"])
    try FileManager.default.createDirectory(atPath: s.path("idx"), withIntermediateDirectories: true)

    // Compacted twice under /usr/bin/time: first building the indexes in
    // the same run, then with them loaded.
    var summaries: [[String: Any]] = []
    var peaks: [Int] = []
    for output in ["first.stream", "c.stream"] {
      let r = try run(
        s, "/usr/bin/time",
        [
          "-f", "%M", "-o", "rss", Tools.path("snapshot-server"), "compact", "--json", "--quiet", "--index-dir",
          "idx", "-o", output, "s0.stream", "s1.stream",
        ])
      summaries.append(try json(r))
      let kib = try String(contentsOfFile: s.path("rss"), encoding: .utf8).trimmingCharacters(
        in: .whitespacesAndNewlines)
      peaks.append(try XCTUnwrap(Int(kib), "/usr/bin/time said \(kib)") * 1024)
    }
    let indexBytes = try FileManager.default.contentsOfDirectory(atPath: s.path("idx")).reduce(0) {
      $0 + (try FileManager.default.attributesOfItem(atPath: s.path("idx/\($1)"))[.size] as? Int ?? 0)
    }
    let bound = (100 << 20) + indexBytes
    for (o, (peak, how)) in zip(summaries, zip(peaks, ["building the indexes", "with the indexes loaded"])) {
      print(
        "snapshot-server compact of a 256 MiB device (2 streams, \(indexBytes) bytes of indexes), \(how): "
          + "max RSS \(peak >> 20) MiB (bound \(bound >> 20) MiB); \(o["bytes_read"] ?? 0) bytes of records "
          + "read in \(o["seconds"] ?? 0) s")
      XCTAssertLessThan(peak, bound, "max RSS of compact, \(how)")
      XCTAssertEqual((o["data_blocks"] as? Int ?? 0) + (o["zero_blocks"] as? Int ?? 0), size / 65536, "\(o)")
    }
    try sh(
      "truncate -s \(size) merged.img && "
        + "merge-snapshot --quiet -i c.stream merged.img && cmp merged.img dev.img", in: s)
  }
}

/// The first records of a stream file, read byte by byte
/// (dualrestore-stream(5)): the preamble's flags, and in a plaintext
/// stream the HEADER's ids and instant and the LINEAGE record after it;
/// and a plaintext stream's instant moved, as if it had been read then.
struct StreamHead: Equatable {
  struct Lineage: Equatable {
    var standsFor: String
    /// Nanoseconds since the epoch.
    var standsForStarted: Int64
    var firstCompacted: String
    var count: Int
  }

  var streamID: String
  var baseStreamID: String
  /// The HEADER's instant, nanoseconds since the epoch.
  var started: Int64
  var lineage: Lineage?

  static func bytes(_ path: String, count: Int = 1 << 16) throws -> [UInt8] {
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? h.close() }
    let b = [UInt8](try h.read(upToCount: count) ?? Data())
    guard b.count >= 36, b.prefix(8) == [0x44, 0x52, 0x53, 0x54, 0x52, 0x0D, 0x0A, 0x1A] else {
      throw RRTError("\(path) is not a block stream")
    }
    return b
  }

  static func u(_ b: [UInt8], _ at: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 | Int(b[at + $1]) << (8 * $1) } }

  /// The preamble's flags: bit 0 encrypted.
  static func flags(_ path: String) throws -> Int { u(try bytes(path), 10, 2) }

  init(_ path: String) throws {
    let b = try Self.bytes(path)
    func u(_ at: Int, _ n: Int) -> Int { Self.u(b, at, n) }
    func hex(_ at: Int) -> String { b[at..<(at + 16)].map { String(format: "%02x", $0) }.joined() }
    guard u(10, 2) == 0, u(16, 2) == 1, u(24, 8) == 0 else {
      throw RRTError("\(path): not a plaintext stream whose record 0 is its HEADER")
    }
    let length = u(20, 4)
    streamID = hex(32 + 24)
    baseStreamID = hex(32 + 40)
    started = Int64(u(32 + 56, 8))
    // The record after the HEADER: record 1.
    let next = 16 + 16 + length + 4
    guard b.count >= next + 16 + 48 + 4, u(next, 2) == 6 else {
      lineage = nil
      return
    }
    guard u(next + 4, 4) == 48, u(next + 8, 8) == 1, u(next + 16 + 44, 4) == 0 else {
      throw RRTError("\(path): a LINEAGE record that is not record 1 of 48 bytes")
    }
    let body = next + 16
    lineage = Lineage(
      standsFor: hex(body), standsForStarted: Int64(u(body + 16, 8)), firstCompacted: hex(body + 24),
      count: u(body + 40, 4))
  }

  /// Sets a plaintext stream's HEADER instant to `ns`, then makes the
  /// HEADER's CRC, the END record's digest (SHA-256 of every byte before
  /// it) and its CRC right again: the stream snapshot would have written
  /// had its clock said `ns`.
  static func restamp(_ path: String, to ns: Int64) throws {
    var d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    guard u(d, 10, 2) == 0, u(d, 16, 2) == 1 else { throw RRTError("\(path) is not a plaintext stream") }
    let header = 16..<(16 + 16 + u(d, 20, 4) + 4)
    for i in 0..<8 { d[32 + 56 + i] = UInt8(truncatingIfNeeded: ns >> (8 * Int64(i))) }
    EncryptedStreamCLITests.fixCRC(&d, header)
    let end = d.count - (16 + 64 + 4)
    guard u(d, end, 2) == 4, u(d, end + 4, 4) == 64 else { throw RRTError("\(path) does not end with END") }
    let digester = Digester(DigestAlgorithm.sha256)
    d.withUnsafeBytes { digester.update(UnsafeRawBufferPointer(rebasing: $0[0..<end])) }
    var sum = [UInt8](repeating: 0, count: 32)
    sum.withUnsafeMutableBytes { digester.finish(into: $0.baseAddress!) }
    d.replaceSubrange((end + 16 + 32)..<(end + 16 + 64), with: sum)
    EncryptedStreamCLITests.fixCRC(&d, end..<d.count)
    try Data(d).write(to: URL(fileURLWithPath: path))
  }
}
