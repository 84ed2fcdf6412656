// snapshot-server over HTTP, as dualrestore.7 has an operator run it: a
// chain of stored streams (a full stream and seven incrementals of a sparse
// device written at random between them, plain or encrypted with a key
// file) and their indexes kept beside them, served by nginx or kept in
// moto_server's S3; each stream read through its own nbdkit curl, the
// indexes fetched over HTTP into a directory, and snapshot-server serving
// the chain's end. The export must be the device (nbdcopy, qemu-img
// compare, bitmap-diff); the indexes must be loaded, never rebuilt; a hot
// set of 5% of the blocks must move over HTTP no more than 1.1 times the
// bytes of the newest records of those blocks (computed here from the index
// files, by their documented layout); a record damaged on the HTTP side
// must fail the reads of its own block alone, named in the log; and
// restore-read-through --read-only-backup restoring from the chain's export
// must fetch no more than the chain alone, keep the writes on the primary
// and set exactly their blocks in the change map that makes the next
// incremental.

import CShim
import Foundation
import TestSupport
import XCTest

final class SnapshotServerHTTPCLITests: CLITestCase {
  static let blockSize = 65536
  static let blocks = 512  // 32 MiB
  static let size = blocks * blockSize
  static let incrementals = 7
  static let plainSeed: UInt64 = 0x4854_5450_0001
  static let hexKey = "8f0e1d2c3b4a59687786a5b4c3d2e1f00123456789abcdeffedcba9876543210"

  var http: HTTPRig?
  /// The snapshot-server children, stopped before the rig's peers.
  var servers: [RRTChild] = []

  override func tearDown() {
    for c in servers.reversed() { c.stop(grace: 10) }
    servers = []
    http?.stopAll()
    http = nil
    super.tearDown()
  }

  // MARK: The chain

  /// One record's entry in an index file (dualrestore-index(5)).
  struct IndexEntry {
    var first: Int
    var count: Int
    var offset: Int
    var sequence: Int
    var length: Int
    var type: UInt8
    var isZero: Bool { type == 3 }
  }

  /// A chain built in the scratch directory: www/ holds the streams and
  /// their indexes (STREAM.dridx), dev.img the device at the chain's end.
  struct StoredChain {
    let s: Scratch
    let www: String
    /// full.stream, inc1.stream, ... inc7.stream, oldest first.
    let names: [String]
    let ids: [String]
    let device: Data
    let keyArguments: [String]
    /// Per stream, its index's entries, read from the index file.
    let indexes: [[IndexEntry]]
    var devicePath: String { s.path("dev.img") }

    /// Per block, the newest stream holding it and its entry there.
    func owners() -> [(stream: Int, entry: Int)?] {
      var out: [(stream: Int, entry: Int)?] = Array(repeating: nil, count: SnapshotServerHTTPCLITests.blocks)
      for (s, entries) in indexes.enumerated() {
        for (e, entry) in entries.enumerated() {
          for b in entry.first..<entry.first + entry.count { out[b] = (s, e) }
        }
      }
      return out
    }
  }

  /// Reads an index file by its documented layout: a 128-byte header (the
  /// entry count at byte 80), then 40-byte entries.
  static func readIndex(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws -> [IndexEntry] {
    let d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    guard d.count >= 132, Array(d[0..<8]) == [0x44, 0x52, 0x49, 0x44, 0x58, 0x0D, 0x0A, 0x1A] else {
      throw RRTError("\(path) is not a stream index")
    }
    func u(_ at: Int, _ width: Int) -> Int {
      (0..<width).reduce(0) { $0 | Int(d[at + $1]) << (8 * $1) }
    }
    let count = u(80, 8)
    // An encrypted stream's index (flags bit 0) ends with a 32-byte HMAC.
    let authenticator = d[10] & 1 != 0 ? 32 : 0
    XCTAssertEqual(d.count, 128 + 40 * count + 4 + authenticator, "\(path): \(count) entries", file: file, line: line)
    return (0..<count).map { i in
      let at = 128 + 40 * i
      return IndexEntry(
        first: u(at, 8), count: u(at + 8, 8), offset: u(at + 16, 8), sequence: u(at + 24, 8), length: u(at + 32, 4),
        type: d[at + 36])
    }
  }

  /// A block of text that LZ4 compresses well.
  static func compressible(_ tag: String) -> Data {
    var d = Data()
    let line = Data("\(tag): the quick brown fox jumps over the lazy dog 0123456789\n".utf8)
    while d.count < blockSize { d.append(line) }
    return d.prefix(blockSize)
  }

  /// Builds the chain: a sparse device of random, compressible and unwritten
  /// blocks, its full stream, then seven rounds of random writes (whole
  /// blocks, 4 KiB pieces, blocks zeroed), each stream of the blocks the
  /// round changed (bitmap-diff's map) on top of the one before; then the
  /// indexes, beside the streams.
  func buildChain(encrypted: Bool, seed: UInt64) throws -> StoredChain {
    let started = RRTEnv.monotonic()
    let s = try Scratch()
    let dir = s.url.path
    let www = s.path("www")
    try FileManager.default.createDirectory(atPath: www, withIntermediateDirectories: true)
    var keyArguments: [String] = []
    if encrypted {
      try s.file("k.key", Data((Self.hexKey + "\n").utf8))
      keyArguments = ["--key-file", s.path("k.key")]
    }
    let B = Self.blockSize
    var rng = SplitMix64(seed: seed)
    var device = Data(count: Self.size)
    guard FileManager.default.createFile(atPath: s.path("dev.img"), contents: nil) else {
      throw RRTError("cannot create dev.img")
    }
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: s.path("dev.img")))
    defer { try? h.close() }
    try h.truncate(atOffset: UInt64(Self.size))
    func put(_ offset: Int, _ bytes: Data) throws {
      device.replaceSubrange(offset..<offset + bytes.count, with: bytes)
      try h.seek(toOffset: UInt64(offset))
      try h.write(contentsOf: bytes)
    }
    for b in 0..<Self.blocks {
      switch rng.next() % 100 {
      case 0..<55: try put(b * B, RRTBytes.random(B, seed: rng.next()))
      case 55..<70: try put(b * B, Self.compressible("block \(b)"))
      default: break  // a hole: read as zeros, a ZERO run in the full stream
      }
    }

    func snapshot(_ arguments: [String]) throws -> String {
      let r = try RRTCommand.run("snapshot", ["--json"] + keyArguments + arguments, timeout: 120, cwd: dir)
      XCTAssertEqual(r.status, 0, "snapshot \(arguments): \(r.summary)")
      guard let o = try? JSONSerialization.jsonObject(with: r.data) as? [String: Any],
        let id = o["stream_id"] as? String
      else { throw RRTError("snapshot \(arguments) printed no stream_id: \(r.summary)") }
      return id
    }
    let encrypt = encrypted ? ["--encrypt"] : []
    var names = ["full.stream"]
    var ids = [try snapshot(encrypt + ["-o", "www/full.stream", "dev.img"])]
    for round in 1...Self.incrementals {
      let cp = try RRTCommand.run("/bin/cp", ["--sparse=always", "dev.img", "prev.img"], cwd: dir)
      XCTAssertEqual(cp.status, 0, cp.summary)
      for _ in 0..<14 {
        let b = Int(rng.next() % UInt64(Self.blocks))
        try put(
          b * B,
          rng.next() % 5 == 0 ? Self.compressible("round \(round) block \(b)") : RRTBytes.random(B, seed: rng.next()))
      }
      for _ in 0..<6 {
        let at = Int(rng.next() % UInt64(Self.blocks)) * B + Int(rng.next() % 16) * 4096
        try put(at, RRTBytes.random(4096, seed: rng.next()))
      }
      for _ in 0..<3 { try put(Int(rng.next() % UInt64(Self.blocks)) * B, Data(count: B)) }
      let map = "m\(round).map"
      let diff = try RRTCommand.run("bitmap-diff", ["--quiet", "-o", map, "prev.img", "dev.img"], cwd: dir)
      XCTAssertEqual(diff.status, 1, "round \(round) changed blocks: \(diff.summary)")
      names.append("inc\(round).stream")
      ids.append(
        try snapshot(encrypt + ["--map", map, "--base", ids[ids.count - 1], "-o", "www/" + names[round], "dev.img"]))
    }

    let streamPaths = names.map { www + "/" + $0 }
    let index = try RRTCommand.run(
      "snapshot-server", ["index", "--json"] + keyArguments + streamPaths, timeout: 120, cwd: dir)
    XCTAssertEqual(index.status, 0, index.summary)
    XCTAssertEqual(index.lines.count, names.count, index.summary)
    for (i, l) in index.lines.enumerated() {
      let o = try JSONSerialization.jsonObject(with: Data(l.utf8)) as? [String: Any]
      XCTAssertEqual(o?["stream_id"] as? String, ids[i], l)
      XCTAssertEqual(o?["index"] as? String, streamPaths[i] + ".dridx", l)
      XCTAssertEqual(o?["built"] as? Bool, true, l)
      XCTAssertEqual(o?["encrypted"] as? Bool, encrypted, l)
    }
    let indexes = try streamPaths.map { try Self.readIndex($0 + ".dridx") }
    let bytes = streamPaths.reduce(0) {
      $0 + ((try? FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0)
    }
    print(
      "chain of \(names.count) \(encrypted ? "encrypted " : "")streams, \(bytes) bytes of streams,"
        + " \(indexes.reduce(0) { $0 + $1.count }) index entries, built in \(RRTEnv.monotonic() - started) s")
    return StoredChain(
      s: s, www: www, names: names, ids: ids, device: device, keyArguments: keyArguments, indexes: indexes)
  }

  // MARK: Serving

  /// nginx serving www/ and an nbdkit curl per stream: the streams' NBD URIs.
  func serveOverHTTP(_ chain: StoredChain) throws -> (HTTPRig, NginxServer, [NbdkitCurl]) {
    let rig = try HTTPRig(scratch: chain.s)
    http = rig
    let nginx = try rig.startNginx(serving: chain.www)
    let nbdkits = try chain.names.map { try rig.startNbdkitCurl(url: nginx.url($0), name: "nbdkit-" + $0) }
    return (rig, nginx, nbdkits)
  }

  /// Fetches every stream's index over HTTP with curl into a new directory
  /// `dir` of the scratch directory (keeping the names they have beside the
  /// streams).
  func fetchIndexes(_ chain: StoredChain, from nginx: NginxServer, into dir: String) throws -> String {
    let path = chain.s.path(dir)
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    for name in chain.names {
      let r = try RRTCommand.run(
        "/usr/bin/env",
        HTTPRig.noProxy + ["curl", "-sSf", "-o", path + "/" + name + ".dridx", nginx.url(name + ".dridx")],
        timeout: 30)
      XCTAssertEqual(r.status, 0, "curl \(name).dridx: \(r.summary)")
    }
    return path
  }

  /// snapshot-server serve on a socket of the scratch directory, waited for
  /// until its export answers; its log and export URI.
  func serve(
    _ chain: StoredChain, _ streams: [String], indexDir: String?, name: String, file: StaticString = #filePath,
    line: UInt = #line
  ) throws -> (child: RRTChild, uri: String, logPath: String) {
    let socket = chain.s.path(name + ".sock")
    let logPath = chain.s.path(name + ".log")
    let arguments =
      ["serve", "--socket", socket] + (indexDir.map { ["--index-dir", $0] } ?? []) + chain.keyArguments + streams
    let child = try RRTChild(
      name: name, executable: Tools.path("snapshot-server"), arguments: arguments, stdout: chain.s.path(name + ".out"),
      stderr: logPath)
    servers.append(child)
    let uri = "nbd+unix:///chain?socket=\(socket)"
    let end = RRTEnv.monotonic() + 60
    while true {
      if !child.isRunning {
        XCTFail("\(name) ended with status \(child.wait(timeout: 1) ?? -1): \(child.errors)", file: file, line: line)
        throw RRTError("\(name) did not start")
      }
      if FileManager.default.fileExists(atPath: socket),
        let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 10), r.status == 0
      {
        XCTAssertEqual(
          r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), String(Self.size), file: file, line: line)
        break
      }
      if RRTEnv.monotonic() >= end {
        XCTFail("\(name) did not answer within 60 s: \(child.errors)", file: file, line: line)
        throw RRTError("\(name) did not answer")
      }
      RRTEnv.sleep(0.05)
    }
    return (child, uri, logPath)
  }

  /// Stops a server: exit 0, "stopped cleanly", no crash in its log.
  func stop(_ child: RRTChild, file: StaticString = #filePath, line: UInt = #line) {
    let status = child.stop(grace: 20)
    servers.removeAll { $0 === child }
    XCTAssertEqual(status, 0, "\(child.name): \(child.errors)", file: file, line: line)
    XCTAssertTrue(child.errors.contains("stopped cleanly"), child.errors, file: file, line: line)
    for bad in ["Fatal error", "fatal error", "Segmentation fault", "crashed"] {
      XCTAssertFalse(child.errors.contains(bad), child.errors, file: file, line: line)
    }
  }

  /// The export equals the device: nbdcopy to a file (byte for byte, and
  /// cmp), and unless `once`, qemu-img compare and bitmap-diff.
  func assertExportIsTheDevice(
    _ chain: StoredChain, _ uri: String, _ what: String, once: Bool = false, file: StaticString = #filePath,
    line: UInt = #line
  ) throws {
    let copy = chain.s.path("copy.img")
    try? FileManager.default.removeItem(atPath: copy)
    let c = try RRTCommand.run("/usr/bin/nbdcopy", [uri, copy], timeout: 120)
    XCTAssertEqual(c.status, 0, "\(what): nbdcopy: \(c.summary)", file: file, line: line)
    RRTBytes.assertEqual(
      try Data(contentsOf: URL(fileURLWithPath: copy)), chain.device, "\(what): nbdcopy of the export", file: file,
      line: line)
    let cmp = try RRTCommand.run("/usr/bin/cmp", [copy, chain.devicePath], timeout: 60)
    XCTAssertEqual(cmp.status, 0, "\(what): cmp: \(cmp.summary)", file: file, line: line)
    if once { return }
    let qemu = try RRTCommand.run(
      "/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", chain.devicePath, uri], timeout: 120)
    XCTAssertEqual(qemu.status, 0, "\(what): qemu-img compare: \(qemu.summary)", file: file, line: line)
    let diff = try RRTCommand.run("bitmap-diff", ["--quiet", uri, chain.devicePath], timeout: 120)
    XCTAssertEqual(diff.status, 0, "\(what): bitmap-diff: \(diff.summary)", file: file, line: line)
  }

  /// Runs Python code with Debian's python3 and its libnbd module.
  func python(_ code: String, timeout: Double = 120) throws -> RRTCommand.Result {
    try RRTCommand.run("/usr/bin/python3", ["-c", "import nbd, json, sys\n" + code], timeout: timeout)
  }

  // MARK: The tests

  func testAChainOverHTTPServesTheDeviceFromItsFetchedIndexes() throws {
    try exercise(encrypted: false, seed: Self.plainSeed)
  }

  func testAnEncryptedChainOverHTTPServesTheDeviceFromItsFetchedIndexes() throws {
    try exercise(encrypted: true, seed: 0x4854_5450_0002)
  }

  /// The same chain kept in moto_server's S3, as dualrestore.7 has it: the
  /// streams and their indexes uploaded, the indexes fetched with aws s3 cp,
  /// the streams read through nbdkit curl by presigned URLs (the full and the
  /// newest stream, kept private) and by unsigned path-style URLs (the
  /// others, uploaded public-read: moto refuses an unsigned GET of a private
  /// object put in one piece with 403, though it serves one put in parts).
  func testAChainKeptInS3ServesTheDevice() throws {
    try require("qemu-img", "nbdcopy")
    try HTTPRig.require(s3: true, nbdkitCurl: true)
    let chain = try buildChain(encrypted: false, seed: Self.plainSeed)
    let rig = try HTTPRig(scratch: chain.s)
    http = rig
    let moto = try rig.startMoto()
    var t = RRTEnv.monotonic()
    try moto.makeBucket("backups")
    let newest = chain.names.count - 1
    let signed = [chain.names[0], chain.names[newest]]
    let cp = ["s3", "cp", "--recursive", "--only-show-errors"]
    let open = try moto.aws(
      cp + signed.flatMap { ["--exclude", $0] } + ["--acl", "public-read", chain.www + "/", "s3://backups/data/"])
    XCTAssertEqual(open.status, 0, open.summary)
    let kept = try moto.aws(
      cp + ["--exclude", "*"] + signed.flatMap { ["--include", $0] } + [chain.www + "/", "s3://backups/data/"])
    XCTAssertEqual(kept.status, 0, kept.summary)
    let idx = chain.s.path("idx")
    let down = try moto.aws(
      cp + ["--exclude", "*", "--include", "*.dridx", "s3://backups/data/", idx + "/"])
    XCTAssertEqual(down.status, 0, down.summary)
    XCTAssertEqual(
      try FileManager.default.contentsOfDirectory(atPath: idx).sorted(), chain.names.map { $0 + ".dridx" }.sorted())
    var urls: [String] = []
    for name in chain.names {
      if signed.contains(name) {
        let url = try moto.presignedURL(bucket: "backups", key: "data/" + name)
        XCTAssertTrue(url.contains("Signature="), url)
        urls.append(url)
      } else {
        urls.append(moto.objectURL(bucket: "backups", key: "data/" + name))
      }
    }
    // The newest stream is private: it is read by its signature alone.
    XCTAssertEqual(HTTPRig.httpStatus(moto.objectURL(bucket: "backups", key: "data/" + chain.names[newest])), 403)
    print("moto answered in \(moto.startSeconds) s; uploaded, fetched and presigned in \(RRTEnv.monotonic() - t) s")
    let nbdkits = try zip(chain.names, urls).map { try rig.startNbdkitCurl(url: $1, name: "nbdkit-s3-" + $0) }
    t = RRTEnv.monotonic()
    let server = try serve(chain, nbdkits.map { $0.uri }, indexDir: idx, name: "serve-s3")
    XCTAssertFalse(server.child.errors.contains("; indexed "), server.child.errors)
    try assertExportIsTheDevice(chain, server.uri, "the chain in S3", once: true)
    print("served and compared in \(RRTEnv.monotonic() - t) s")
    stop(server.child)
  }

  /// The restore of dualrestore.7 from the chain over HTTP:
  /// restore-read-through with the chain's export as a read-only backup. The
  /// hot set read through the restore moves no more than through the chain
  /// alone; client writes (whole blocks, partial ones into blocks fetched or
  /// not, zeroes) stay on the primary, the export is the chain's end plus
  /// the writes, LACKS.map sets exactly the blocks written, and the
  /// incremental made with it (snapshot --map LACKS.map --base the newest)
  /// brings the chain to the restored disk.
  func testRestoreReadThroughFromTheChainOverHTTP() throws {
    try require("nbdcopy")
    try HTTPRig.require(nginx: true, nbdkitCurl: true)
    let chain = try buildChain(encrypted: false, seed: Self.plainSeed)
    let (_, nginx, nbdkits) = try serveOverHTTP(chain)
    let idx = try fetchIndexes(chain, from: nginx, into: "idx")
    let backup = try serve(chain, nbdkits.map { $0.uri }, indexDir: idx, name: "serve-backup")

    let s = chain.s
    let primary = s.path("primary.img")
    guard FileManager.default.createFile(atPath: primary, contents: nil) else { throw RRTError("no primary.img") }
    let ph = try FileHandle(forWritingTo: URL(fileURLWithPath: primary))
    try ph.truncate(atOffset: UInt64(Self.size))
    try ph.close()
    let lacks = s.path("lacks.map")
    let socket = s.path("restore.sock")
    let restoreURI = "nbd+unix:///?socket=\(socket)"
    let rrt = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"),
      arguments: [
        "--backup", backup.uri, "--read-only-backup", lacks, "--map", s.path("restore.map"), "--socket", socket,
        primary,
      ], stdout: s.path("restore.out"), stderr: s.path("restore.log"))
    servers.append(rrt)
    let end = RRTEnv.monotonic() + 30
    while (try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", restoreURI], timeout: 10))?.status != 0 {
      guard rrt.isRunning, RRTEnv.monotonic() < end else {
        XCTFail("restore-read-through did not answer: \(rrt.errors)")
        throw RRTError("restore-read-through did not start")
      }
      RRTEnv.sleep(0.05)
    }
    XCTAssertTrue(rrt.errors.contains("read-only: writes stay on the primary"), rrt.errors)

    let hot = try assertHotSet(chain, through: restoreURI, "restore-read-through", nginx, nbdkits)

    // Writes: blocks out of the hot set (not yet fetched) and one in it.
    let B = Self.blockSize
    let cold = (0..<Self.blocks).filter { !hot.contains($0) && !hot.contains($0 + 1) && $0 + 1 < Self.blocks }
    let w = (0..<6).map { cold[(cold.count / 7) * ($0 + 1)] }
    var plan: [(offset: Int, length: Int, zero: Bool)] = [
      (w[0] * B, B, false),  // a whole block
      (w[1] * B, 2 * B, false),  // two whole blocks
      (w[2] * B + 8192, 4096, false),  // part of a block not fetched
      (w[3] * B + 60000, 10000, false),  // across a boundary, part of two
      (w[4] * B + 4096, 8192, true),  // zeroes into part of a block
      (w[5] * B, B, true),  // a whole block of zeroes
      (hot[3] * B + 100, 3000, false),  // part of a block fetched
    ]
    plan.sort { $0.offset < $1.offset }
    var expected = chain.device
    var written = Set<Int>()
    var calls: [String] = []
    for (i, op) in plan.enumerated() {
      written.formUnion((op.offset / B)...((op.offset + op.length - 1) / B))
      if op.zero {
        expected.replaceSubrange(op.offset..<op.offset + op.length, with: Data(count: op.length))
        calls.append("h.zero(\(op.length), \(op.offset))")
      } else {
        let d = RRTBytes.random(op.length, seed: 0x5752_4954 &+ UInt64(i))
        let path = try s.file("write-\(i).bin", d)
        expected.replaceSubrange(op.offset..<op.offset + op.length, with: d)
        calls.append("h.pwrite(open(\(rrtPython(path)), 'rb').read(), \(op.offset))")
      }
    }
    let r = try python(
      """
      h = nbd.NBD()
      h.connect_uri(\(rrtPython(restoreURI)))
      \(calls.joined(separator: "\n"))
      h.flush()
      h.shutdown()
      """)
    XCTAssertEqual(r.status, 0, "\(r.summary)\n\(rrt.errors)")

    // The restored disk: the chain's end plus the writes.
    let copy = s.path("restored.img")
    let c = try RRTCommand.run("/usr/bin/nbdcopy", [restoreURI, copy], timeout: 120)
    XCTAssertEqual(c.status, 0, c.summary)
    RRTBytes.assertEqual(try Data(contentsOf: URL(fileURLWithPath: copy)), expected, "the restored export")
    stop(rrt)

    // LACKS.map holds exactly the blocks written; the chain is as it was.
    let extents = try RRTCommand.run("overwrite-map", ["extents", lacks])
    XCTAssertEqual(extents.status, 0, extents.summary)
    var lacking = Set<Int>()
    for l in extents.lines {
      let parts = l.split(separator: " ").compactMap { Int($0) }
      guard parts.count == 2, parts[1] > 0 else {
        XCTFail("an extents line not understood: \(l)")
        continue
      }
      lacking.formUnion((parts[0] / B)...((parts[0] + parts[1] - 1) / B))
    }
    XCTAssertEqual(lacking.sorted(), written.sorted(), "LACKS.map must set exactly the blocks written")
    let unchanged = try RRTCommand.run("bitmap-diff", ["--quiet", backup.uri, chain.devicePath], timeout: 120)
    XCTAssertEqual(unchanged.status, 0, "the chain's export is not the device after the restore: \(unchanged.summary)")
    stop(backup.child)

    // The next incremental carries the writes into the chain.
    let inc = try RRTCommand.run(
      "snapshot",
      ["--quiet", "--map", lacks, "--base", chain.ids[chain.ids.count - 1], "-o", s.path("inc8.stream"), primary],
      timeout: 120)
    XCTAssertEqual(inc.status, 0, inc.summary)
    let longer = try serve(
      chain, nbdkits.map { $0.uri } + [s.path("inc8.stream")], indexDir: idx, name: "serve-longer")
    let diff = try RRTCommand.run("bitmap-diff", ["--quiet", longer.uri, copy], timeout: 120)
    XCTAssertEqual(diff.status, 0, "the chain with the new incremental vs the restored disk: \(diff.summary)")
    stop(longer.child)
    print("restore: \(written.count) block(s) written, \(lacking.count) set in LACKS.map: \(lacking.sorted())")
  }

  /// The whole operator flow over nginx: serve, hot set, damage.
  func exercise(encrypted: Bool, seed: UInt64) throws {
    try require("qemu-img", "nbdcopy")
    try HTTPRig.require(nginx: true, nbdkitCurl: true)
    let chain = try buildChain(encrypted: encrypted, seed: seed)
    let (_, nginx, nbdkits) = try serveOverHTTP(chain)
    let idx = try fetchIndexes(chain, from: nginx, into: "idx")
    let fetched = try FileManager.default.contentsOfDirectory(atPath: idx).sorted()
    let uris = nbdkits.map { $0.uri }

    // The chain's end, from the fetched indexes: loaded, none built, none
    // written, a few KiB of each stream read (its head and its last bytes).
    let streamBytes = chain.names.map { chain.s.path("www/" + $0) }.reduce(0) {
      $0 + ((try? Data(contentsOf: URL(fileURLWithPath: $1)).count) ?? 0)
    }
    var before = nbdkits.reduce(0) { $0 + $1.bytesRead() }
    var t = RRTEnv.monotonic()
    let first = try serve(chain, uris, indexDir: idx, name: "serve-1")
    let startSeconds = RRTEnv.monotonic() - t
    let startBytes = nbdkits.reduce(0) { $0 + $1.bytesRead() } - before
    let log = first.child.errors
    XCTAssertTrue(log.contains("serving \(chain.names.count) stream(s)"), log)
    XCTAssertFalse(log.contains("; indexed "), "an index was built, not loaded:\n\(log)")
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: idx).sorted(), fetched)
    XCTAssertLessThanOrEqual(startBytes, chain.names.count * 65536, "the start read \(startBytes) bytes of streams")
    t = RRTEnv.monotonic()
    try assertExportIsTheDevice(chain, first.uri, "the chain over HTTP")
    print(
      "served in \(startSeconds) s, reading \(startBytes) of the streams' \(streamBytes) bytes; compared three ways "
        + "in \(RRTEnv.monotonic() - t) s")
    stop(first.child)

    if !encrypted {
      // The control: without the indexes, the server builds each one by
      // reading its whole stream, and says so.
      before = nbdkits.reduce(0) { $0 + $1.bytesRead() }
      let unindexed = try serve(chain, uris, indexDir: nil, name: "serve-no-index-dir")
      let built = unindexed.child.errors.split(separator: "\n").filter { $0.contains("; indexed ") }
      XCTAssertEqual(built.count, chain.names.count, unindexed.child.errors)
      XCTAssertGreaterThanOrEqual(nbdkits.reduce(0) { $0 + $1.bytesRead() } - before, streamBytes)
      stop(unindexed.child)
    }

    try assertTheHotSetReadsItsRecordsOnly(chain, nginx, nbdkits, idx)
    try assertADamagedRecordFailsItsBlockAlone(chain, nginx, nbdkits, idx)
  }

  /// A fresh server; the hot set read through it.
  func assertTheHotSetReadsItsRecordsOnly(
    _ chain: StoredChain, _ nginx: NginxServer, _ nbdkits: [NbdkitCurl], _ idx: String
  ) throws {
    let server = try serve(chain, nbdkits.map { $0.uri }, indexDir: idx, name: "serve-hot")
    _ = try assertHotSet(chain, through: server.uri, "snapshot-server", nginx, nbdkits)
    stop(server.child)
  }

  /// The hot set: 5% of the blocks (seeded), 4 KiB read inside each, through
  /// `uri` (the chain's export, or a restore reading from it); the bytes
  /// nbdkit curl read, and nginx sent, for those reads against the bytes of
  /// the newest records of those blocks. Returns the blocks read.
  func assertHotSet(
    _ chain: StoredChain, through uri: String, _ what: String, _ nginx: NginxServer, _ nbdkits: [NbdkitCurl],
    file: StaticString = #filePath, line: UInt = #line
  ) throws -> [Int] {
    let nbdBefore = nbdkits.map { $0.bytesRead() }
    let httpBefore = nginx.requests().count

    var rng = SplitMix64(seed: 0x4854_5345_54)
    var order = Array(0..<Self.blocks)
    order.shuffle(using: &rng)
    let chosen = order.prefix(Self.blocks * 5 / 100).sorted()
    let offsets = chosen.map { $0 * Self.blockSize + Int(rng.next() % 16) * 4096 }
    let out = chain.s.path("hot.bin")
    let r = try python(
      """
      h = nbd.NBD()
      h.connect_uri(\(rrtPython(uri)))
      with open(\(rrtPython(out)), 'wb') as f:
          for off in [\(offsets.map(String.init).joined(separator: ", "))]:
              f.write(h.pread(4096, off))
      h.shutdown()
      """)
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    let got = try Data(contentsOf: URL(fileURLWithPath: out))
    for (i, off) in offsets.enumerated() {
      RRTBytes.assertEqual(
        got.subdata(in: i * 4096..<(i + 1) * 4096), chain.device.subdata(in: off..<off + 4096),
        "\(what): 4 KiB at \(off)", file: file, line: line)
    }

    // What the newest records of those blocks weigh: each DATA record once,
    // each ZERO record once (read the first time one of its blocks is).
    let owners = chain.owners()
    var records: [String: Int] = [:]
    var zeroBlocks = 0
    for b in chosen {
      guard let (s, e) = owners[b] else { continue }
      let entry = chain.indexes[s][e]
      if entry.isZero { zeroBlocks += 1 }
      records["\(s)#\(e)"] = entry.length
    }
    let recordBytes = records.values.reduce(0, +)
    let perStream = zip(nbdkits, nbdBefore).map { $0.bytesRead() - $1 }
    let nbdBytes = perStream.reduce(0, +)
    let requests = Array(nginx.requests().dropFirst(httpBefore))
    let gets = requests.filter { $0.method == "GET" }
    let httpBytes = requests.reduce(0) { $0 + $1.bodyBytes }
    print(
      "hot set through \(what): \(chosen.count) of \(Self.blocks) blocks (\(zeroBlocks) zero), \(records.count) "
        + "newest records of \(recordBytes) bytes; nbdkit curl read \(nbdBytes) bytes (\(perStream) per stream), "
        + "nginx sent \(httpBytes) bytes of body in \(gets.count) GETs and \(requests.count - gets.count) other "
        + "requests; ratio " + String(format: "%.4f", Double(httpBytes) / Double(max(recordBytes, 1))))
    XCTAssertGreaterThan(recordBytes, chosen.count * 1024, "the hot set holds data records", file: file, line: line)
    XCTAssertGreaterThanOrEqual(
      nbdBytes, recordBytes, "\(what): fewer bytes read than the records hold", file: file, line: line)
    XCTAssertLessThanOrEqual(
      Double(nbdBytes), 1.1 * Double(recordBytes), "\(what): nbdkit curl read \(nbdBytes) bytes", file: file,
      line: line)
    XCTAssertLessThanOrEqual(
      Double(httpBytes), 1.1 * Double(recordBytes) + Double(gets.count),
      "\(what): nginx sent \(httpBytes) bytes: \(requests)", file: file, line: line)
    return chosen
  }

  /// One stored record of a block the chain reads from it (the newest
  /// record of the block, in an incremental) flipped in the served file, and
  /// one of the full stream that a newer stream overrides: the reads of the
  /// first's block fail with EIO, every other block reads right, and the log
  /// names the stream and the record.
  func assertADamagedRecordFailsItsBlockAlone(
    _ chain: StoredChain, _ nginx: NginxServer, _ nbdkits: [NbdkitCurl], _ idx: String
  ) throws {
    guard let rig = http else { throw RRTError("no rig") }
    let owners = chain.owners()
    let middle = chain.names.count / 2
    guard
      let victim = (0..<Self.blocks).first(where: {
        owners[$0]?.stream == middle && !chain.indexes[middle][owners[$0]!.entry].isZero
      })
    else { throw RRTError("no block's newest record is a DATA record of \(chain.names[middle])") }
    let entry = chain.indexes[middle][owners[victim]!.entry]
    // A record of the full stream hidden by a newer one: damaging it changes nothing.
    guard
      let hiddenEntry = chain.indexes[0].first(where: {
        !$0.isZero && owners[$0.first]?.stream ?? 0 > 0 && $0.first != victim
      })
    else { throw RRTError("no record of the full stream is overridden") }

    let damagedDir = chain.www + "/damaged"
    try FileManager.default.createDirectory(atPath: damagedDir, withIntermediateDirectories: true)
    func damage(_ name: String, _ e: IndexEntry) throws {
      var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: chain.www + "/" + name)))
      bytes[e.offset + e.length / 2] ^= 0x20
      if !chain.keyArguments.isEmpty {
        // The CRC made right, so that only the tag can tell.
        let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + e.offset, e.length - 4) }
        for i in 0..<4 { bytes[e.offset + e.length - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
      }
      try Data(bytes).write(to: URL(fileURLWithPath: damagedDir + "/" + name))
    }
    try damage(chain.names[middle], entry)
    try damage(chain.names[0], hiddenEntry)
    let damagedMiddle = try rig.startNbdkitCurl(
      url: nginx.url("damaged/" + chain.names[middle]), name: "nbdkit-damaged-" + chain.names[middle])
    let damagedFull = try rig.startNbdkitCurl(url: nginx.url("damaged/" + chain.names[0]), name: "nbdkit-damaged-full")
    var uris = nbdkits.map { $0.uri }
    uris[middle] = damagedMiddle.uri
    uris[0] = damagedFull.uri
    let server = try serve(chain, uris, indexDir: idx, name: "serve-damaged")
    XCTAssertFalse(server.child.errors.contains("; indexed "), server.child.errors)

    let out = chain.s.path("damaged-read.img")
    let inside = victim * Self.blockSize + 8192
    let r = try python(
      """
      h = nbd.NBD()
      h.connect_uri(\(rrtPython(server.uri)))
      B = \(Self.blockSize)
      failed = {}
      with open(\(rrtPython(out)), 'wb') as f:
          for b in range(\(Self.blocks)):
              try:
                  f.write(h.pread(B, b * B))
              except nbd.Error as e:
                  failed[b] = e.errno
                  f.write(bytes(B))
      extra = {}
      for name, length, offset in [('inside', 4096, \(inside)), ('across', 3 * B, \(max(0, victim - 1)) * B)]:
          try:
              h.pread(length, offset)
              extra[name] = 0
          except nbd.Error as e:
              extra[name] = e.errno
      h.shutdown()
      print(json.dumps({'failed': failed, 'extra': extra}))
      """)
    XCTAssertEqual(r.status, 0, r.summary)
    let o = try JSONSerialization.jsonObject(with: r.data) as? [String: Any]
    // libnbd's Error.errno is the errno's name.
    let failed = (o?["failed"] as? [String: String]) ?? [:]
    XCTAssertEqual(failed, [String(victim): "EIO"], "only block \(victim) fails, with EIO")
    XCTAssertEqual((o?["extra"] as? [String: String]) ?? [:], ["inside": "EIO", "across": "EIO"], r.stdout)
    var got = try Data(contentsOf: URL(fileURLWithPath: out))
    var want = chain.device
    let v = victim * Self.blockSize..<(victim + 1) * Self.blockSize
    got.resetBytes(in: v)
    want.resetBytes(in: v)
    RRTBytes.assertEqual(got, want, "every block but \(victim) through the damaged chain")

    let log = server.child.errors
    let named = "\(damagedMiddle.uri): record \(entry.sequence) at byte \(entry.offset): "
    let why = chain.keyArguments.isEmpty ? "checksum mismatch" : "authentication failed"
    XCTAssertTrue(
      log.split(separator: "\n").contains {
        $0.contains(named) && $0.contains(why) && $0.contains("block \(victim) fail")
      },
      "the log names \(named)(\(why)) and block \(victim):\n\(log)")
    XCTAssertFalse(log.contains(damagedFull.uri + ": record"), "the hidden record was read:\n\(log)")
    print(
      "damaged record \(entry.sequence) of \(chain.names[middle]) (block \(victim)): \(failed.count) block failed; "
        + "hidden record \(hiddenEntry.sequence) of full.stream (block \(hiddenEntry.first)) flipped too")
    stop(server.child)
  }
}
