// snapshot-server as users run it, against real peers: a chain of a full
// stream and seven incrementals (made by snapshot from bitmap-diff maps
// after random partial writes and zeroed ranges; 64 KiB and 4 KiB blocks;
// a partial last block; plain and encrypted) served as one read-only
// export that nbdcopy, qemu-img compare, bitmap-diff, nbdinfo --map and
// libnbd reads find equal to the device, at its end and at every stream;
// equal to what merge-snapshot makes of the same chain; its indexes built,
// loaded, rebuilt when damaged, stale or another stream's, kept in
// --index-dir and for streams read over NBD; broken chains refused before
// anything is served; a damaged record failing its own blocks only; four
// connections reading at once.
//
// The chains come from StreamChainHarness.swift, built once per run.

import Foundation
import Glibc
import TestSupport
import XCTest

final class SnapshotServerCLITests: CLITestCase {

  override class func tearDown() {
    ChainFixture.removeAll()
    super.tearDown()
  }

  // MARK: Helpers

  func fixture(_ kind: ChainKind) throws -> ChainFixture {
    try require("nbdkit", "nbdcopy", "nbdinfo", "qemu-img", "cmp")
    guard (try? RRTCommand.run("/usr/bin/python3", ["-c", "import nbd"], timeout: 20))?.status == 0 else {
      throw XCTSkip("/usr/bin/python3 with libnbd's nbd module (python3-libnbd) is needed")
    }
    return try ChainFixture.get(kind)
  }

  /// A scratch directory of the test's own and a server to start there.
  func rig(_ f: ChainFixture) throws -> (Scratch, ChainServer) {
    let s = try Scratch()
    let server = ChainServer(s, f)
    rigs.append(server)
    return (s, server)
  }

  /// The fixture's streams, oldest first, with the test's index directory:
  /// served in place, their indexes never beside them.
  func inPlace(_ f: ChainFixture, _ s: Scratch, count: Int? = nil) throws -> [String] {
    let dir = s.path("idx")
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return f.keyOptions + ["--index-dir", dir] + (0..<(count ?? f.streamCount)).map { f.stream($0) }
  }

  @discardableResult
  func sh(_ script: String, in s: Scratch, status: Int32 = 0, file: StaticString = #filePath, line: UInt = #line)
    throws -> RRTCommand.Result
  {
    let r = try RRTCommand.shell(script, timeout: 120, cwd: s.url.path)
    XCTAssertEqual(r.status, status, "\(script): \(r.summary)", file: file, line: line)
    return r
  }

  /// The export, copied whole by nbdcopy, is `expected` byte for byte.
  func assertCopyEquals(
    _ uri: String, _ expected: String, in s: Scratch, file: StaticString = #filePath, line: UInt = #line
  )
    throws
  {
    try sh("nbdcopy '\(uri)' - | cmp - '\(expected)'", in: s, file: file, line: line)
  }

  /// Reads that cross from blocks of one stream into blocks of another, at
  /// unaligned offsets, and long reads over blocks of three streams or
  /// more; the last bytes of the device; one read of the whole device.
  /// Written as the checker's plan.
  func crossingPlan(_ f: ChainFixture, in s: Scratch, file: StaticString = #filePath, line: UInt = #line) throws
    -> String
  {
    var rng = SplitMix64(seed: f.kind.seed &* 31)
    let b = f.blockSize
    var reads: [[Int]] = []
    let boundaries = (0..<(f.blockCount - 1)).filter { f.newest[$0] != f.newest[$0 + 1] }
    XCTAssertGreaterThan(boundaries.count, 20, "blocks of different streams side by side", file: file, line: line)
    for _ in 0..<60 {
      let k = boundaries[Int(rng.next() % UInt64(boundaries.count))]
      let before = 1 + Int(rng.next() % UInt64(b - 1))
      let after = 1 + Int(rng.next() % UInt64(b - 1))
      reads.append([(k + 1) * b - before, before + after])
    }
    var wide = 0
    var touched = Set<Int>()
    for _ in 0..<40 {
      let n = (3 << 20) - 1 - Int(rng.next() % 4096)
      let off = Int(rng.next() % UInt64(f.size - n))
      let streams = Set((off / b...((off + n - 1) / b)).map { f.newest[$0] })
      if streams.count >= 3 { wide += 1 }
      touched.formUnion(streams)
      reads.append([off, n])
    }
    XCTAssertGreaterThan(wide, 10, "long reads over blocks of three streams or more", file: file, line: line)
    XCTAssertEqual(touched.count, f.streamCount, "the long reads touch blocks of every stream", file: file, line: line)
    let tail = f.size % b
    reads += [
      [f.size - 1, 1], [f.size - tail - 7, tail + 7], [f.size - tail + 3, tail - 3], [0, 1],
      [f.size - (3 << 20) + 5, (3 << 20) - 5],
      // Past the 8 MiB a read of joined records stops at, and the whole device.
      [12345, min(f.size - 12345, (20 << 20) + 7)], [0, f.size],
    ]
    let path = s.path("plan.json")
    try JSONSerialization.data(withJSONObject: reads).write(to: URL(fileURLWithPath: path))
    return path
  }

  /// Every check of a served chain's end: nbdcopy and cmp, qemu-img
  /// compare, bitmap-diff, unaligned libnbd reads, nbdinfo --map, and
  /// merge-snapshot of the same chain into a file.
  func assertServesTheDevice(_ f: ChainFixture, file: StaticString = #filePath, line: UInt = #line) throws {
    let (s, server) = try rig(f)
    try server.start(try inPlace(f, s), file: file, line: line)
    XCTAssertTrue(
      server.log.contains("serving \(f.streamCount) stream(s) ending with \(f.stream(7)) (stream \(f.ids[7])"),
      server.log, file: file, line: line)
    let uri = server.uri
    try sh("nbdcopy '\(uri)' served.img && cmp served.img '\(f.device)'", in: s, file: file, line: line)
    let qemu = try sh("qemu-img compare -f raw -F raw '\(uri)' '\(f.device)'", in: s, file: file, line: line)
    XCTAssertTrue(qemu.stdout.contains("Images are identical"), qemu.stdout, file: file, line: line)
    let diff = try sh("bitmap-diff --quiet --extents '\(uri)' '\(f.device)'", in: s, file: file, line: line)
    XCTAssertEqual(diff.stdout, "", file: file, line: line)

    let plan = try crossingPlan(f, in: s, file: file, line: line)
    let reads = try f.check("reads", uri, ["\(f.kind.seed)", "150", "\(3 << 20)", plan], file: file, line: line)
    XCTAssertEqual(reads["mismatch_count"] as? Int, 0, "\(reads)", file: file, line: line)
    XCTAssertEqual(reads["reads"] as? Int, 257, file: file, line: line)
    XCTAssertGreaterThan(reads["unaligned"] as? Int ?? 0, 245, file: file, line: line)
    XCTAssertEqual(reads["read_only"] as? Bool, true, file: file, line: line)

    // Block status: hole,zero exactly where the device's blocks read as
    // zeros (ZERO records, newest first), data elsewhere.
    let status = try f.check("status", uri, file: file, line: line)
    XCTAssertEqual(status["problems"] as? [String], [], "\(status)", file: file, line: line)
    let zeros = f.zeroBlocks[7]
    XCTAssertGreaterThan(zeros.count, 10, file: file, line: line)
    let zeroBytes = zeros.reduce(0) { $0 + min(f.blockSize, f.size - $1 * f.blockSize) }
    XCTAssertEqual(status["zero_bytes"] as? Int, zeroBytes, "\(status)", file: file, line: line)
    XCTAssertEqual(status["data_bytes"] as? Int, f.size - zeroBytes, "\(status)", file: file, line: line)

    // merge-snapshot of the same chain into a file, as a mirror seeded
    // from the full stream and caught up by the incrementals.
    let key = f.keyOptions.map { "'\($0)'" }.joined(separator: " ")
    let streams = (0..<f.streamCount).map { "'\(f.stream($0))'" }.joined(separator: " ")
    try sh(
      "truncate -s \(f.size) merged.img && for s in \(streams); do "
        + "merge-snapshot --quiet --mirror --map merged.map \(key) -i \"$s\" merged.img || exit 1; done && "
        + "cmp merged.img served.img", in: s, file: file, line: line)
    server.stop(file: file, line: line)
  }

  /// The blocks each stream's index makes newest (index entries parsed
  /// from the files, not through the library).
  func newestByIndexes(_ indexes: [IndexFile], blockCount: Int) -> [Int] {
    var newest = Array(repeating: -1, count: blockCount)
    for (k, idx) in indexes.enumerated() {
      for e in idx.entries { for b in e.blocks { newest[b] = k } }
    }
    return newest
  }

  /// Runs snapshot-server to its end (a refusal): one sentence on stderr
  /// naming `fragment`, status 1, nothing served.
  func assertRefused(
    _ server: ChainServer, _ arguments: [String], _ fragment: String, subcommand: String = "serve",
    file: StaticString = #filePath, line: UInt = #line
  ) throws {
    unlink(server.socket)
    let serveArguments = subcommand == "serve" ? ["--socket", server.socket] : []
    let r = try RRTCommand.run(
      "snapshot-server", [subcommand] + serveArguments + arguments, timeout: 30, cwd: server.s.url.path)
    XCTAssertFalse(r.timedOut, "snapshot-server served instead of refusing: \(r.summary)", file: file, line: line)
    assertFails(r, status: 1, mentioning: fragment, file: file, line: line)
    XCTAssertEqual(
      r.stderr.split(separator: "\n").count, 1, "one sentence: \(r.stderr.debugDescription)", file: file, line: line)
    XCTAssertTrue(r.stderr.hasPrefix("snapshot-server: "), r.stderr, file: file, line: line)
    XCTAssertFalse(r.stderr.contains("serving"), r.stderr, file: file, line: line)
    XCTAssertFalse(FileManager.default.fileExists(atPath: server.socket), "a socket was made", file: file, line: line)
  }

  // MARK: (1) The chain's end

  func testPlainChainServesTheDeviceAtItsEnd() throws {
    try assertServesTheDevice(try fixture(.plain))
  }

  func testEncryptedChainServesTheDeviceAtItsEnd() throws {
    try assertServesTheDevice(try fixture(.encrypted))
  }

  func testChainOfSmallBlocksServesTheDeviceAtItsEnd() throws {
    try assertServesTheDevice(try fixture(.small))
  }

  // MARK: (2) Every point of the chain

  func testEveryPrefixOfTheChainIsTheDeviceAfterItsLastStream() throws {
    let f = try fixture(.plain)
    let (s, server) = try rig(f)
    for k in 0..<f.streamCount {
      try server.start(try inPlace(f, s, count: k + 1))
      XCTAssertTrue(server.log.contains("serving \(k + 1) stream(s) ending with \(f.stream(k))"), server.log)
      try assertCopyEquals(server.uri, f.version(k), in: s)
      server.stop()
    }
  }

  // MARK: (3) Indexes

  func testIndexesAreBuiltOnceLoadedAfterAndRebuiltWhenUnusable() throws {
    let f = try fixture(.plain)
    let (s, server) = try rig(f)
    let paths = try f.copyStreams(to: s)

    // First start: every index is built beside its stream, and said so.
    try server.start(paths)
    for (k, p) in paths.enumerated() {
      XCTAssertTrue(
        server.log.contains("\(p): there is no index at \(p).dridx; indexed "), "stream \(k):\n\(server.log)")
      XCTAssertTrue(server.log.contains("kept in \(p).dridx"), server.log)
    }
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // The indexes say what the chain is: each stream's blocks, the newest
    // holder of every block, ZERO runs over older data and data over
    // older ZERO runs, and the partial last block both ways.
    let indexes = try paths.map { try IndexFile($0 + ".dridx") }
    for (k, idx) in indexes.enumerated() {
      XCTAssertEqual(idx.streamID, f.ids[k])
      XCTAssertEqual(idx.baseStreamID, k == 0 ? String(repeating: "0", count: 32) : f.ids[k - 1])
      let blocks = idx.entries.flatMap { Array($0.blocks) }
      XCTAssertEqual(Set(blocks), f.carried[k], "stream \(k)'s index holds the blocks it carries")
      XCTAssertEqual(blocks.count, f.carried[k].count, "no block twice in stream \(k)")
      XCTAssertEqual(
        Set(idx.entries.filter { $0.type == 3 }.flatMap { Array($0.blocks) }),
        f.carried[k].intersection(f.zeroBlocks[k]),
        "stream \(k)'s ZERO runs are its blocks that read as zeros")
    }
    XCTAssertEqual(newestByIndexes(indexes, blockCount: f.blockCount), f.newest)
    let last = f.blockCount - 1
    var zeroOverData = 0
    var dataOverZero = 0
    var lastBlock: [UInt8] = []
    for k in 1..<f.streamCount {
      for e in indexes[k].entries {
        for b in e.blocks where f.zeroBlocks[k - 1].contains(b) != (e.type == 3) {
          if e.type == 3 { zeroOverData += 1 } else { dataOverZero += 1 }
        }
        if e.blocks.contains(last) { lastBlock.append(e.type) }
      }
    }
    XCTAssertGreaterThan(zeroOverData, 10, "ZERO records over older DATA")
    XCTAssertGreaterThan(dataOverZero, 10, "DATA records over older ZERO runs")
    XCTAssertTrue(
      lastBlock.contains(2) && lastBlock.contains(3), "the partial last block as DATA and ZERO: \(lastBlock)")

    // `index --json` checks them and counts as the chain was made.
    let json = try RRTCommand.run("snapshot-server", ["index", "--json"] + paths, cwd: s.url.path)
    XCTAssertEqual(json.status, 0, json.summary)
    XCTAssertEqual(json.stderr, "", "loaded indexes are not announced")
    XCTAssertEqual(json.lines.count, f.streamCount)
    for (k, l) in json.lines.enumerated() {
      let o = try TrackRig.json(l)
      XCTAssertEqual(o["stream_id"] as? String, f.ids[k])
      XCTAssertEqual(o["base_stream_id"] as? String, k == 0 ? nil : f.ids[k - 1])
      XCTAssertEqual(o["built"] as? Bool, false)
      XCTAssertEqual(o["index"] as? String, paths[k] + ".dridx")
      XCTAssertEqual(o["records"] as? Int, indexes[k].entries.count)
      XCTAssertEqual(o["zero_blocks"] as? Int, f.carried[k].intersection(f.zeroBlocks[k]).count)
      XCTAssertEqual(o["data_blocks"] as? Int, f.carried[k].subtracting(f.zeroBlocks[k]).count)
      XCTAssertEqual(o["encrypted"] as? Bool, false)
    }

    // Second start: loaded, nothing indexed.
    try server.start(paths)
    XCTAssertFalse(server.log.contains("indexed"), server.log)
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // Damaged (a byte of the header, a byte of an entry), truncated, and
    // another stream's: each rebuilt, saying why, the same as before.
    let saved = try paths.map { try Data(contentsOf: URL(fileURLWithPath: $0 + ".dridx")) }
    try StreamEdit.flip(paths[2] + ".dridx", at: 20)
    try StreamEdit.flip(paths[4] + ".dridx", at: 128 + 40 * (indexes[4].entries.count / 2) + 17)
    try saved[3].prefix(saved[3].count / 2).write(to: URL(fileURLWithPath: paths[3] + ".dridx"))
    try saved[6].prefix(100).write(to: URL(fileURLWithPath: paths[6] + ".dridx"))
    try saved[5].write(to: URL(fileURLWithPath: paths[7] + ".dridx"))
    try server.start(paths)
    let log = server.log
    let why = [
      2: "the index \(paths[2]).dridx is not usable: the index header's checksum does not match: the index is damaged",
      3: "the index \(paths[3]).dridx is not usable: the index says \(indexes[3].entries.count) entries but is "
        + "\(saved[3].count / 2) bytes long",
      4: "the index \(paths[4]).dridx is not usable: the index entries' checksum does not match: the index is damaged",
      6: "the index \(paths[6]).dridx is not usable: the index is 100 bytes, shorter than its header",
      7: "the index \(paths[7]).dridx describes another stream or an older version of it",
    ]
    for (k, reason) in why { XCTAssertTrue(log.contains("\(paths[k]): \(reason); indexed "), "stream \(k):\n\(log)") }
    XCTAssertEqual(log.components(separatedBy: "indexed ").count - 1, why.count, log)
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()
    for k in why.keys {
      XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: paths[k] + ".dridx")), saved[k], "stream \(k)'s index")
    }
    try server.start(paths)
    XCTAssertFalse(server.log.contains("indexed"), server.log)
    server.stop()
  }

  func testIndexDirectoryAndStreamsReadOverNBD() throws {
    let f = try fixture(.encrypted)
    let (s, server) = try rig(f)
    let streams = try Scratch()
    let paths = try f.copyStreams(to: streams)
    let dir = s.path("indexes")
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)

    // --index-dir keeps STREAM-ID.dridx there, nothing beside the streams.
    try server.start(f.keyOptions + ["--index-dir", dir] + paths)
    for (k, p) in paths.enumerated() {
      XCTAssertTrue(server.log.contains("\(p): there is no index at \(dir)/\(f.ids[k]).dridx; indexed "), server.log)
      XCTAssertTrue(server.log.contains("kept in \(dir)/\(f.ids[k]).dridx"), server.log)
    }
    XCTAssertEqual(
      Set(try FileManager.default.contentsOfDirectory(atPath: dir)), Set(f.ids.map { "\($0).dridx" }))
    XCTAssertEqual(
      try FileManager.default.contentsOfDirectory(atPath: streams.url.path).filter { $0.hasSuffix(".dridx") }, [])
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // Streams read through `nbdkit -r file STREAM`: their indexes are found
    // in --index-dir by stream id, loaded, not built.
    let uris = try paths.enumerated().map { k, p in k % 3 == 0 ? try server.nbdkit(p, name: "s\(k)") : p }
    XCTAssertTrue(uris[0].hasPrefix("nbd+unix://") && uris[7].hasPrefix("/"))
    try server.start(f.keyOptions + ["--index-dir", dir] + uris)
    XCTAssertFalse(server.log.contains("indexed"), server.log)
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // Built through NBD into a new directory, and kept there.
    let fresh = s.path("fresh")
    try FileManager.default.createDirectory(atPath: fresh, withIntermediateDirectories: true)
    try server.start(f.keyOptions + ["--index-dir", fresh] + uris)
    XCTAssertTrue(
      server.log.contains("\(uris[3]): there is no index at \(fresh)/\(f.ids[3]).dridx; indexed "), server.log)
    XCTAssertEqual(
      try Data(contentsOf: URL(fileURLWithPath: "\(fresh)/\(f.ids[3]).dridx")),
      try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(f.ids[3]).dridx")), "the same index through NBD")
    let reads = try f.check("reads", server.uri, ["5", "60", "\(1 << 20)"])
    XCTAssertEqual(reads["mismatch_count"] as? Int, 0, "\(reads)")
    server.stop()

    // Without --index-dir a stream read through NBD has its index built at
    // each start and held in memory; files keep theirs beside them.
    for start in 0..<2 {
      try server.start(f.keyOptions + uris)
      for k in [0, 3, 6] {
        XCTAssertTrue(server.log.contains("\(uris[k]): no index was kept; indexed "), server.log)
        XCTAssertTrue(server.log.contains("held in memory (give --index-dir to keep it)"), server.log)
      }
      // The files' indexes are built beside them the first time, then loaded.
      XCTAssertEqual(
        server.log.components(separatedBy: "; indexed ").count - 1, start == 0 ? f.streamCount : 3, server.log)
      try assertCopyEquals(server.uri, f.device, in: s)
      server.stop()
    }
  }

  func testIndexesThatCannotBeKeptAreHeldInMemory() throws {
    let f = try fixture(.small)
    let (s, server) = try rig(f)
    let paths = try f.copyStreams(to: s)
    // A directory where an index file would go: renaming over it fails,
    // for root too.
    try FileManager.default.createDirectory(atPath: paths[2] + ".dridx", withIntermediateDirectories: false)
    try server.start(paths)
    let log = server.log
    XCTAssertTrue(
      log.contains(
        "\(paths[2]): the index could not be kept at \(paths[2]).dridx (\(paths[2]).dridx: cannot replace the file: "
          + "Is a directory); it is held in memory"), log)
    XCTAssertTrue(log.contains("\(paths[2]): the index \(paths[2]).dridx cannot be read; indexed "), log)
    let line = log.split(separator: "\n").first {
      $0.contains("\(paths[2]): the index \(paths[2]).dridx cannot be read")
    }
    XCTAssertTrue(line?.hasSuffix(", held in memory (give --index-dir to keep it)") == true, log)
    XCTAssertTrue(log.contains("kept in \(paths[1]).dridx"), log)
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // An index directory where nothing can be made (/proc/self refuses new
    // files, root or not): every index is held in memory, and --index-dir
    // (given) is not offered as the cure.
    try server.start(["--index-dir", "/proc/self"] + paths)
    for (k, p) in paths.enumerated() {
      XCTAssertTrue(
        server.log.contains("\(p): the index could not be kept at /proc/self/\(f.ids[k]).dridx ("), server.log)
    }
    XCTAssertEqual(server.log.components(separatedBy: ", held in memory\n").count - 1, f.streamCount, server.log)
    XCTAssertFalse(server.log.contains("give --index-dir"), server.log)
    try assertCopyEquals(server.uri, f.device, in: s)
    server.stop()

    // snapshot-server index, whose job is to keep them, fails and says so.
    let index = try RRTCommand.run("snapshot-server", ["index", "--index-dir", "/proc/self"] + paths)
    XCTAssertEqual(index.status, 1, index.stderr)
    XCTAssertTrue(
      index.stderr.contains(
        "snapshot-server: \(paths.count) index(es) could not be kept (the log says why): \(paths[0])"),
      index.stderr)

    // --index-dir naming a file is refused before anything is read.
    try assertRefused(server, ["--index-dir", paths[0]] + paths, "--index-dir \(paths[0]) is not a directory")
  }

  // MARK: (4) Broken chains

  func testBrokenChainsAreRefusedBeforeAnythingIsServed() throws {
    let f = try fixture(.plain)
    let e = try fixture(.encrypted)
    let (s, server) = try rig(f)
    let p = try f.copyStreams(to: s)
    let enc = try Scratch()
    let q = try e.copyStreams(to: enc, [0, 1, 2])
    // Indexes made first, so that a refusal is the only line.
    XCTAssertEqual(try RRTCommand.run("snapshot-server", ["index"] + p).status, 0)
    XCTAssertEqual(try RRTCommand.run("snapshot-server", ["index"] + e.keyOptions + q).status, 0)
    let missing = "a stream of the chain is missing or out of order"

    try assertRefused(
      server, [p[0], p[2], p[1]],
      "\(p[2]) applies on top of stream \(f.ids[1]), but the stream before it, \(p[0]), is \(f.ids[0]); \(missing)")
    try assertRefused(
      server, [p[0], p[1], p[3], p[4]],
      "\(p[3]) applies on top of stream \(f.ids[2]), but the stream before it, \(p[1]), is \(f.ids[1]); \(missing)")
    try assertRefused(
      server, [p[1], p[2]],
      "\(p[1]) is an incremental stream on top of stream \(f.ids[0]); a chain starts with a full stream")
    try assertRefused(server, [p[0], p[1], p[1]], "\(p[1]) is stream \(f.ids[1]), given twice")
    // A second full stream: of the device itself, later.
    let full2 = s.path("full2.stream")
    XCTAssertEqual(try RRTCommand.run("snapshot", ["--quiet", "-o", full2, f.version(1)]).status, 0)
    XCTAssertEqual(try RRTCommand.run("snapshot-server", ["index", full2]).status, 0)
    try assertRefused(
      server, [p[0], full2],
      "\(full2) is a full stream after \(p[0]): give a chain as one full stream and the incrementals that follow it")
    // Streams of different devices: another size, on the chain's base.
    let other = s.path("other.img")
    try sh("truncate -s 3M '\(other)'", in: s)
    let odd = s.path("other.stream")
    XCTAssertEqual(try RRTCommand.run("snapshot", ["--quiet", "--base", f.ids[0], "-o", odd, other]).status, 0)
    XCTAssertEqual(try RRTCommand.run("snapshot-server", ["index", odd]).status, 0)
    try assertRefused(server, [p[0], odd], "\(odd) is of a device of ")
    // Encrypted: no key, a wrong key; a key for a plaintext chain.
    try assertRefused(server, q, "the stream is encrypted with a key file; give it with --key-file FILE")
    let wrong = s.path("wrong.key")
    try Data(String(ChainFixture.hexKey.reversed()).utf8).write(to: URL(fileURLWithPath: wrong))
    try assertRefused(server, ["--key-file", wrong] + q, "wrong key: the key file \(wrong) does not open this stream")
    try assertRefused(
      server, e.keyOptions + p, "the stream is not encrypted, so nothing in it is authenticated; refusing it")

    // A stream cut short (its END record gone, or cut inside a record),
    // whose index was made whole: the index is stale, the pass refuses it.
    let whole = try Data(contentsOf: URL(fileURLWithPath: p[3]))
    try whole.prefix(whole.count - 84).write(to: URL(fileURLWithPath: p[3]))
    try assertRefused(server, Array(p[0...3]), "\(p[3]): record ")
    try assertRefused(server, Array(p[0...3]), "truncated stream: no END record; the stream is incomplete")
    try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: p[3]))
    try assertRefused(server, Array(p[0...3]), "truncated stream: the record is incomplete")
    try assertRefused(server, Array(p[0...3]), "truncated stream", subcommand: "index")
    try whole.write(to: URL(fileURLWithPath: p[3]))

    // A damaged record when the index must be built: the pass names it.
    let idx = try IndexFile(p[5] + ".dridx")
    let record = try XCTUnwrap(idx.entries.first { $0.type == 2 })
    try StreamEdit.flip(p[5], at: record.offset + record.length / 2)
    unlink(p[5] + ".dridx")
    try assertRefused(server, Array(p[0...5]), "\(p[5]): record \(record.sequence) at byte \(record.offset): ")
    XCTAssertFalse(FileManager.default.fileExists(atPath: p[5] + ".dridx"), "no index of a damaged stream")
  }

  // MARK: (5) Damage after indexing

  /// Damages records of streams whose indexes are built, serves, and reads
  /// every block alone: exactly `failing` fail with EIO, every other
  /// equals the device, and the log names each damaged record once.
  func assertDamageFailsItsOwnBlocks(
    _ f: ChainFixture, damage: [(stream: Int, type: UInt8, forge: Bool, why: String)]
  ) throws {
    let (s, server) = try rig(f)
    let paths = try f.copyStreams(to: s)
    let built = try RRTCommand.run("snapshot-server", ["index"] + f.keyOptions + paths)
    XCTAssertEqual(built.status, 0, built.summary)
    var failing = Set<Int>()
    var named: [String] = []
    for d in damage {
      let idx = try IndexFile(paths[d.stream] + ".dridx")
      // A record whose blocks (some of them) no newer stream holds, with
      // room for the byte: inside a DATA record's payload, a ZERO record's
      // body.
      let record = try XCTUnwrap(
        idx.entries.first { e in e.type == d.type && e.blocks.contains { f.newest[$0] == d.stream } },
        "stream \(d.stream) has no record of type \(d.type) to damage")
      let at = d.type == 2 ? record.offset + 32 + (record.length - 36) / 2 : record.offset + 16 + 3
      try StreamEdit.flip(paths[d.stream], at: at)
      if d.forge { try StreamEdit.fixCRC(paths[d.stream], record: record) }
      let mine = record.blocks.filter { f.newest[$0] == d.stream }
      failing.formUnion(mine)
      named.append("\(paths[d.stream]): record \(record.sequence) at byte \(record.offset): \(d.why)")
    }
    try server.start(f.keyOptions + paths)
    XCTAssertFalse(server.log.contains("indexed"), "the damage does not make the indexes stale:\n\(server.log)")
    let r = try f.check("blocks", server.uri)
    let failed = try XCTUnwrap(r["failed"] as? [String: Int], "\(r)")
    XCTAssertEqual(Set(failed.keys.compactMap { Int($0) }), failing, "the blocks that fail")
    XCTAssertEqual(Set(failed.values), [Int(EIO)], "\(failed)")
    XCTAssertEqual(Set((r["again"] as? [String: Int] ?? [:]).values), [Int(EIO)], "\(r)")
    XCTAssertEqual(r["mismatched"] as? [Int], [], "every other block equals the device")
    XCTAssertEqual(r["blocks"] as? Int, f.blockCount)
    let log = server.log
    for n in named { XCTAssertEqual(log.components(separatedBy: n).count - 1, 1, "once: \(n)\n\(log)") }
    XCTAssertEqual(log.components(separatedBy: "fail with EIO").count - 1, damage.count, log)
    // A long read over a damaged block fails too; the server reads on.
    let b = try XCTUnwrap(failing.min())
    let long = try RRTCommand.run(
      "/usr/bin/nbdsh",
      ["-u", server.uri, "-c", "h.pread(\(3 * f.blockSize + 5), \(max(0, b - 1) * f.blockSize + 7))"], timeout: 30)
    XCTAssertNotEqual(long.status, 0, long.summary)
    let copy = try RRTCommand.shell("nbdcopy '\(server.uri)' null:", timeout: 60)
    XCTAssertNotEqual(copy.status, 0, "nbdcopy reads a damaged DATA record: \(copy.summary)")
    XCTAssertTrue(server.server?.isRunning == true)
    server.stop()
  }

  func testDamagedRecordsOfAPlainChainFailOnlyTheirBlocks() throws {
    try assertDamageFailsItsOwnBlocks(
      try fixture(.plain),
      damage: [
        (3, 2, false, "checksum mismatch: the record is damaged"),
        (5, 3, false, "checksum mismatch: the record is damaged"),
      ])
  }

  func testDamagedRecordsOfAnEncryptedChainFailOnlyTheirBlocks() throws {
    let forged = "authentication failed: the record was altered, moved, or taken from another stream"
    try assertDamageFailsItsOwnBlocks(
      try fixture(.encrypted),
      damage: [
        (2, 2, false, "checksum mismatch: the record is damaged"),
        (4, 2, true, forged),
        (6, 3, true, forged),
      ])
  }

  // MARK: (6) Connections at once

  func testFourConnectionsReadAtOnce() throws {
    for kind in [ChainKind.plain, .encrypted] {
      let f = try fixture(kind)
      let (s, server) = try rig(f)
      try server.start(try inPlace(f, s))
      let readers = try (0..<4).map { i in
        try f.checkChild("reads", server.uri, ["\(100 + i)", "120", "\(1 << 20)"], name: "reader\(i)", in: s)
      }
      for (i, c) in readers.enumerated() {
        XCTAssertEqual(c.wait(timeout: 120), 0, "reader \(i): \(c.errors)")
        let o = try TrackRig.json(c.output)
        XCTAssertEqual(o["mismatch_count"] as? Int, 0, "reader \(i): \(o)")
        XCTAssertEqual(o["reads"] as? Int, 120)
        XCTAssertEqual(o["multi_conn"] as? Bool, true)
      }
      server.stop()
    }
  }
}
