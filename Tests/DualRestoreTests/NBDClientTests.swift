// NBDClient against real servers (nbdkit, qemu-nbd) on private sockets, and
// against a scripted fake server for the misbehaviours real servers do not
// show: bad reply magic, unknown cookies, oversized option replies, servers
// without NBD_OPT_GO. nbdinfo, when installed, is the oracle for what the
// servers advertise.

import Dispatch
import Foundation
import Glibc
import Synchronization
import TestSupport
import XCTest

@testable import DualRestore

final class NBDClientTests: XCTestCase {
  private var servers: [RRTChild] = []

  override func tearDown() {
    for p in servers { p.kill9() }
    servers.removeAll()
    super.tearDown()
  }

  // MARK: Helpers

  private func toolPath(_ tool: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin"] {
      let candidate = "\(dir)/\(tool)"
      if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
  }

  private func requireTool(_ tool: String) throws -> String {
    guard let path = toolPath(tool) else { throw XCTSkip("\(tool) is not installed") }
    return path
  }

  /// Starts a server and waits until `endpoint` accepts connections.
  @discardableResult
  private func launch(_ tool: String, _ arguments: [String], endpoint: NBDURI.Endpoint, log: String) throws -> RRTChild
  {
    let executable = try requireTool(tool)
    let p = try RRTChild(name: tool, executable: executable, arguments: arguments, stdout: log, stderr: log)
    servers.append(p)
    let deadline = Date() + 10
    while Date() < deadline && p.isRunning {
      if (try? Socket.connect(endpoint, timeout: 1)) != nil { return p }
      usleep(20_000)
    }
    let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    throw TestFileError.failed("\(tool) \(arguments.joined(separator: " ")) did not start: \(text)", 0)
  }

  /// nbdkit on a Unix socket; `arguments` follow the socket options.
  @discardableResult
  private func nbdkit(_ socket: String, _ arguments: [String], log: String) throws -> RRTChild {
    try launch(
      "nbdkit", ["-f", "-U", socket] + arguments, endpoint: .unix(path: socket), log: log)
  }

  private func stop(_ p: RRTChild) { p.kill9() }

  private func unixURI(_ socket: String, export: String = "") -> String {
    "nbd+unix:///\(export)?socket=\(socket)"
  }

  /// What nbdinfo says of the export, or nil without nbdinfo.
  private func nbdinfo(_ uri: String) throws -> [String: Any]? {
    guard let tool = toolPath("nbdinfo") else { return nil }
    let r = try RRTCommand.run(tool, ["--json", uri])
    guard r.status == 0,
      let json = try JSONSerialization.jsonObject(with: r.data) as? [String: Any],
      let exports = json["exports"] as? [[String: Any]], let first = exports.first
    else {
      XCTFail("nbdinfo \(uri) failed")
      return nil
    }
    return first
  }

  private func assertFlags(
    _ client: NBDClient, match info: [String: Any]?, file: StaticString = #filePath, line: UInt = #line
  ) {
    guard let info else { return }
    XCTAssertEqual(client.size, (info["export-size"] as? NSNumber)?.uint64Value, file: file, line: line)
    XCTAssertEqual(client.isReadOnly, info["is_read_only"] as? Bool, "read-only", file: file, line: line)
    XCTAssertEqual(client.canFlush, info["can_flush"] as? Bool, "flush", file: file, line: line)
    XCTAssertEqual(client.canFUA, info["can_fua"] as? Bool, "FUA", file: file, line: line)
    XCTAssertEqual(client.canTrim, info["can_trim"] as? Bool, "trim", file: file, line: line)
    XCTAssertEqual(client.canWriteZeroes, info["can_zero"] as? Bool, "write zeroes", file: file, line: line)
    if let maximum = (info["block_size_maximum"] as? NSNumber)?.intValue {
      XCTAssertEqual(client.maximumBlockSize, maximum, file: file, line: line)
      XCTAssertEqual(client.maximumRequest, min(maximum, NBD.maximumPayload), file: file, line: line)
    }
    if let minimum = (info["block_size_minimum"] as? NSNumber)?.intValue {
      XCTAssertEqual(client.minimumBlockSize, minimum, file: file, line: line)
    }
  }

  /// A file of random bytes; returns them.
  private func randomImage(_ path: String, size: Int, _ g: inout SplitMix64) throws -> [UInt8] {
    let bytes = g.bytes(size)
    try writeDenseFile(path, bytes)
    return bytes
  }

  private func read(_ client: NBDClient, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    try out.withUnsafeMutableBytes { try client.read(into: $0, at: offset) }
    return out
  }

  private func write(_ client: NBDClient, _ bytes: [UInt8], _ offset: UInt64, fua: Bool = false) throws {
    try bytes.withUnsafeBytes { try client.write($0, at: offset, fua: fua) }
  }

  /// Data requests in an nbdkit log filter's log: (kind, offset, count).
  private func loggedRequests(_ log: String) throws -> [(String, UInt64, UInt64)] {
    let text = try String(contentsOfFile: log, encoding: .utf8)
    var out: [(String, UInt64, UInt64)] = []
    for line in text.split(separator: "\n") {
      let words = line.split(separator: " ")
      guard let k = words.firstIndex(where: { ["Read", "Write", "Trim", "Zero"].contains($0) }),
        k + 1 < words.count, words[k + 1].hasPrefix("id=")
      else { continue }
      var offset: UInt64?
      var count: UInt64?
      for w in words {
        if w.hasPrefix("offset=0x") { offset = UInt64(w.dropFirst(9), radix: 16) }
        if w.hasPrefix("count=0x") { count = UInt64(w.dropFirst(8), radix: 16) }
      }
      if let offset, let count { out.append((String(words[k]), offset, count)) }
    }
    return out
  }

  /// Waits until the log filter has seen the client disconnect.
  private func waitForDisconnect(_ log: String) {
    let deadline = Date() + 5
    while Date() < deadline {
      if let text = try? String(contentsOfFile: log, encoding: .utf8), text.contains("Disconnect") { return }
      usleep(20_000)
    }
    XCTFail("the server never logged the disconnection")
  }

  // MARK: Handshake and flags

  func testNbdkitFileSizeAndFlags() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(1))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 5 << 20 + 512, &g)
    let socket = "\(dir)/rw.sock"
    try nbdkit(socket, ["file", image], log: "\(dir)/rw.log")
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 10)
    defer { client.close() }
    XCTAssertEqual(client.name, uri)
    XCTAssertEqual(client.size, UInt64(bytes.count))
    XCTAssertNotEqual(client.flags & NBD.flagHasFlags, 0)
    XCTAssertFalse(client.isReadOnly)
    XCTAssertTrue(client.canFlush)
    assertFlags(client, match: try nbdinfo(uri))
    XCTAssertEqual(client.dataRegion(at: 0).end, client.size)
    XCTAssertEqual(try read(client, 0, 4096), Array(bytes[0..<4096]))

    // The same file read-only.
    let roSocket = "\(dir)/ro.sock"
    try nbdkit(roSocket, ["-r", "file", image], log: "\(dir)/ro.log")
    let roURI = unixURI(roSocket)
    let ro = try NBDClient(uri: roURI, timeout: 10)
    defer { ro.close() }
    XCTAssertTrue(ro.isReadOnly)
    assertFlags(ro, match: try nbdinfo(roURI))
    assertThrows(try write(ro, [1, 2, 3], 0), containing: [roURI, "read-only"])
    XCTAssertEqual(try read(ro, UInt64(bytes.count - 100), 100), Array(bytes.suffix(100)))
  }

  func testQemuNbdSizeFlagsAndExportNames() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(2))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 3 << 20, &g)
    let socket = "\(dir)/q.sock"
    try launch(
      "qemu-nbd", ["-t", "-e", "4", "-k", socket, "-x", "disk", "-f", "raw", image], endpoint: .unix(path: socket),
      log: "\(dir)/q.log")
    let uri = unixURI(socket, export: "disk")
    let client = try NBDClient(uri: uri, timeout: 10)
    defer { client.close() }
    XCTAssertEqual(client.size, UInt64(bytes.count))
    XCTAssertFalse(client.isReadOnly)
    // qemu-nbd answers NBD_INFO_BLOCK_SIZE.
    XCTAssertNotNil(client.maximumBlockSize)
    XCTAssertLessThanOrEqual(client.maximumRequest, NBD.maximumPayload)
    assertFlags(client, match: try nbdinfo(uri))
    XCTAssertEqual(try read(client, 12345, 7000), Array(bytes[12345..<19345]))

    let wrong = unixURI(socket, export: "nosuch")
    assertThrows(try NBDClient(uri: wrong, timeout: 5))
    do {
      _ = try NBDClient(uri: wrong, timeout: 5)
    } catch {
      XCTAssertEqual(errorText(error), "\(wrong): the server has no export named 'nosuch'")
    }
  }

  // MARK: Data

  func testReadsMatchTheFile() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(3)
    var g = SplitMix64(seed: seed)
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 4 << 20 + 123, &g)
    let socket = "\(dir)/s.sock"
    try nbdkit(socket, ["file", image], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI(socket), timeout: 10)
    defer { client.close() }
    XCTAssertEqual(try read(client, 0, bytes.count), bytes, "seed \(seed)")
    for _ in 0..<200 {
      let count = Int(g.next() % 70_000) + 1
      let offset = Int(g.next() % UInt64(bytes.count - count + 1))
      let got = try read(client, UInt64(offset), count)
      if got != Array(bytes[offset..<offset + count]) {
        XCTFail("read of \(count) at \(offset) differs from the file, seed \(seed)")
        break
      }
    }
    XCTAssertEqual(try read(client, UInt64(bytes.count - 1), 1), [bytes.last!])
    XCTAssertEqual(client.reconnects, 0)
  }

  /// READs into a file (spliced from plain connections): random ranges
  /// land at other offsets of the file, from threads at once, over a Unix
  /// socket and TCP, split at the server's maximum block size too.
  func testReadsIntoAFile() throws {
    _ = try requireTool("nbdkit")
    let dir = try makeTempDirectory()
    let seed = testSeed(11)
    var g = SplitMix64(seed: seed)
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 6 << 20 + 123, &g)
    let port: UInt16 = try {
      let probe = try Listener(host: "127.0.0.1", port: 0)
      return UInt16(probe.name.split(separator: ":").last!)!
    }()
    try nbdkit("\(dir)/u.sock", ["file", image], log: "\(dir)/u.log")
    try launch(
      "nbdkit",
      [
        "-f", "-p", String(port), "-i", "127.0.0.1", "--filter=blocksize-policy", "file", image,
        "blocksize-maximum=1M",
      ],
      endpoint: .tcp(host: "127.0.0.1", port: port), log: "\(dir)/t.log")
    for uri in [unixURI("\(dir)/u.sock"), "nbd://127.0.0.1:\(port)/"] {
      let client = try NBDClient(uri: uri, timeout: 20)
      defer { client.close() }
      let target = "\(dir)/target.img"
      unlink(target)
      let fd = open(target, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
      XCTAssertGreaterThanOrEqual(fd, 0)
      defer { close(fd) }
      // The whole export at a shifted offset, then random ranges.
      var expected = [UInt8](repeating: 0, count: bytes.count + 5000)
      try client.read(at: 0, length: bytes.count, toFile: fd, at: 5000)
      expected.replaceSubrange(5000..<5000 + bytes.count, with: bytes)
      var ranges: [(offset: Int, count: Int, at: Int)] = []
      for _ in 0..<60 {
        let count = Int(g.next() % 3_000_000) + 1
        let offset = Int(g.next() % UInt64(bytes.count - count + 1))
        ranges.append((offset, count, Int(g.next() % UInt64(expected.count - count + 1))))
      }
      // Ranges that overlap in the file would race: each thread takes its
      // own, and only non-overlapping ones run at once.
      var batches: [[(offset: Int, count: Int, at: Int)]] = [[]]
      for r in ranges {
        if batches[batches.count - 1].contains(where: { r.at < $0.at + $0.count && $0.at < r.at + r.count }) {
          batches.append([])
        }
        batches[batches.count - 1].append(r)
      }
      for batch in batches {
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: batch.count) { i in
          let r = batch[i]
          do {
            try client.read(at: UInt64(r.offset), length: r.count, toFile: fd, at: UInt64(r.at))
          } catch {
            failures.withLock { $0.append("\(error)") }
          }
        }
        XCTAssertEqual(failures.withLock { $0 }, [], uri)
        for r in batch { expected.replaceSubrange(r.at..<r.at + r.count, with: bytes[r.offset..<r.offset + r.count]) }
      }
      let got = try readFileBytes(target)
      XCTAssertEqual(got.count, expected.count, uri)
      XCTAssertTrue(got == expected, "\(uri): the file differs from what was read, seed \(seed)")
      XCTAssertEqual(client.reconnects, 0, uri)
    }
  }

  /// A file that cannot be written: the READ fails with the file's error,
  /// the reply's data is drained, and the connection goes on.
  func testAReadIntoAFileThatCannotBeWrittenLeavesTheConnectionWorking() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(12))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 8 << 20, &g)
    try nbdkit("\(dir)/s.sock", ["file", image], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI("\(dir)/s.sock"), timeout: 10)
    defer { client.close() }
    let target = "\(dir)/target.img"
    try writeDenseFile(target, [UInt8](repeating: 0, count: 1 << 20))
    let fd = open(target, O_RDONLY | O_CLOEXEC)
    defer { close(fd) }
    do {
      try client.read(at: 4096, length: 5 << 20, toFile: fd, at: 0)
      XCTFail("a read into a read-only descriptor must fail")
    } catch let e as NBDFileWriteError {
      XCTAssertEqual(e.errno, EBADF)
      XCTAssertEqual(e.offset, 4096)
      XCTAssertEqual(e.length, 5 << 20)
    }
    XCTAssertEqual(try readFileBytes(target), [UInt8](repeating: 0, count: 1 << 20), "nothing written")
    XCTAssertEqual(try read(client, 3 << 20, 70_000), Array(bytes[3 << 20..<(3 << 20) + 70_000]))
    XCTAssertEqual(client.reconnects, 0)
  }

  /// A file that takes no splice (opened O_APPEND: splice(2) says EINVAL)
  /// gets the data through the buffer instead, then and afterwards.
  func testAReadIntoAFileThatRefusesSpliceGoesThroughMemory() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(14))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 4 << 20, &g)
    try nbdkit("\(dir)/s.sock", ["file", image], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI("\(dir)/s.sock"), timeout: 10)
    defer { client.close() }
    let target = "\(dir)/target.img"
    let fd = open(target, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
    XCTAssertGreaterThanOrEqual(fd, 0)
    defer { close(fd) }
    // Appended in order: the file is the two ranges back to back.
    try client.read(at: 12_345, length: 1 << 20, toFile: fd, at: 0)
    try client.read(at: 3 << 20, length: 70_000, toFile: fd, at: 1 << 20)
    let expected = Array(bytes[12_345..<12_345 + (1 << 20)]) + Array(bytes[(3 << 20)..<(3 << 20) + 70_000])
    XCTAssertTrue(try readFileBytes(target) == expected, "the file differs from what was read")
    XCTAssertEqual(client.reconnects, 0)
  }

  /// A reply whose data comes in pieces that end inside pages: every byte
  /// lands where it belongs.
  func testAReadIntoAFileFromATricklingServer() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/fake.sock"
    let server = try FakeNBDServer(path: socket, script: [.trickle])
    let client = try NBDClient(uri: unixURI(socket), timeout: 10)
    defer { client.close() }
    let target = "\(dir)/target.img"
    let fd = open(target, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
    defer { close(fd) }
    for (offset, count, at) in [(0, 300_000, 0), (1000, 70_001, 4096), (9, 5, 999_999), (777, 200_000, 12_345)] {
      try client.read(at: UInt64(offset), length: count, toFile: fd, at: UInt64(at))
      var got = [UInt8](repeating: 0, count: count)
      XCTAssertEqual(pread(fd, &got, count, off_t(at)), count)
      XCTAssertTrue(got == FakeNBDServer.pattern(offset, count), "\(count) bytes at \(offset) into \(at)")
    }
    XCTAssertEqual(client.reconnects, 0)
    XCTAssertTrue(server.failures.isEmpty, "\(server.failures)")
  }

  /// base:allocation over a client opened for it, from nbdkit and
  /// qemu-nbd, against SEEK_HOLE on the image: every run said to read as
  /// zeros is a hole, every byte of data is reported as data.
  func testAllocationFromNbdkitAndQemuNbd() throws {
    _ = try requireTool("nbdkit")
    let dir = try makeTempDirectory()
    let image = "\(dir)/sparse.img"
    let size: UInt64 = 16 << 20
    try createSparseFile(image, size: size)
    var g = SplitMix64(seed: testSeed(13))
    let data: [(UInt64, Int)] = [(1 << 20, 65536), (5 << 20 + 4096, 1 << 20), (size - 4096, 4096), (9 << 20, 1)]
    for (offset, count) in data { try writeBytes(image, g.bytes(count), at: offset) }
    let holes = try holeRanges(image)
    XCTAssertFalse(holes.isEmpty, "the file system keeps no holes here")
    try nbdkit("\(dir)/k.sock", ["file", image], log: "\(dir)/k.log")
    var uris = [unixURI("\(dir)/k.sock")]
    if toolPath("qemu-nbd") != nil {
      try launch(
        "qemu-nbd", ["-f", "raw", "-r", "-k", "\(dir)/q.sock", image], endpoint: .unix(path: "\(dir)/q.sock"),
        log: "\(dir)/q.log")
      uris.append(unixURI("\(dir)/q.sock"))
    }
    for uri in uris {
      let client = try NBDClient(uri: uri, timeout: 10, allocation: true)
      defer { client.close() }
      XCTAssertTrue(client.hasAllocation, uri)
      var zeroRuns: [Range<UInt64>] = []
      var position: UInt64 = 0
      while position < size {
        let runs = try client.allocation(offset: position, length: UInt32(min(size - position, 7 << 20)))
        XCTAssertFalse(runs.isEmpty)
        for r in runs {
          if r.flags & NBD.stateZero != 0 { zeroRuns.append(position..<position + UInt64(r.length)) }
          position += UInt64(r.length)
        }
      }
      XCTAssertEqual(position, size, uri)
      for z in zeroRuns { XCTAssertTrue(isInside(z, holes), "\(uri): \(z) reported zero is not a hole") }
      for (offset, count) in data {
        XCTAssertFalse(
          zeroRuns.contains { $0.overlaps(offset..<offset + UInt64(count)) }, "\(uri): data at \(offset) reported zero")
      }
      XCTAssertGreaterThan(zeroRuns.reduce(0) { $0 + $1.count }, Int(size / 2), "\(uri): holes reported")
      // Data requests do not go over it.
      assertThrows(try read(client, 0, 512), containing: ["block status"])
      XCTAssertEqual(client.reconnects, 0)
    }
    // A server without structured replies: no allocation, and no harm.
    try nbdkit("\(dir)/n.sock", ["--no-sr", "file", image], log: "\(dir)/n.log")
    let plain = try NBDClient(uri: unixURI("\(dir)/n.sock"), timeout: 10, allocation: true)
    defer { plain.close() }
    XCTAssertFalse(plain.hasAllocation)
    assertThrows(try plain.allocation(offset: 0, length: 4096), containing: ["does not report base:allocation"])
    // A data client refuses BLOCK_STATUS work.
    let data0 = try NBDClient(uri: unixURI("\(dir)/k.sock"), timeout: 10)
    defer { data0.close() }
    XCTAssertFalse(data0.hasAllocation)
  }

  func testWritesReachTheFile() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(4)
    var g = SplitMix64(seed: seed)
    let image = "\(dir)/disk.img"
    var model = try randomImage(image, size: 2 << 20, &g)
    let socket = "\(dir)/s.sock"
    try nbdkit(socket, ["file", image], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI(socket), timeout: 10)
    defer { client.close() }
    for i in 0..<60 {
      let count = Int(g.next() % 20_000) + 1
      let offset = Int(g.next() % UInt64(model.count - count + 1))
      let data = g.bytes(count)
      try write(client, data, UInt64(offset), fua: i % 3 == 0)
      model.replaceSubrange(offset..<offset + count, with: data)
    }
    try client.writeZeroes(offset: 100_000, length: 70_001)
    model.replaceSubrange(100_000..<170_001, with: [UInt8](repeating: 0, count: 70_001))
    try client.flush()
    XCTAssertEqual(try readFileBytes(image), model, "seed \(seed)")
    XCTAssertEqual(try read(client, 0, model.count), model, "seed \(seed)")
    // Trim is advisory; it must be accepted inside the export.
    try client.trim(offset: 1 << 20, length: 65536)
    assertThrows(try client.trim(offset: 2 << 20 - 10, length: 20), containing: ["past the end"])
  }

  func testConcurrentReadsAndWrites() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(5)
    var g = SplitMix64(seed: seed)
    let image = "\(dir)/disk.img"
    let initial = try randomImage(image, size: 16 << 20, &g)
    let socket = "\(dir)/s.sock"
    try nbdkit(socket, ["file", image], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI(socket), timeout: 20)
    defer { client.close() }

    // Thread t owns the 64 KiB blocks b with b % 8 == t: it alone writes
    // them, so its model of them is exact while the others run.
    // The model is raw memory: threads write disjoint parts of it at once.
    final class Shared: @unchecked Sendable {
      let model: UnsafeMutableBufferPointer<UInt8>
      var failures: [String] = []
      let lock = NSLock()
      init(_ m: [UInt8]) {
        model = .allocate(capacity: m.count)
        _ = model.initialize(from: m)
      }
      deinit { model.deallocate() }
      func fail(_ why: String) { lock.withLock { failures.append(why) } }
    }
    let shared = Shared(initial)
    let block = 65536
    let threads = 8
    let done = DispatchSemaphore(value: 0)
    for t in 0..<threads {
      Thread.detachNewThread {
        var r = SplitMix64(seed: seed &+ UInt64(t) &* 7919)
        let model = shared.model
        let blocks = (model.count / block) / threads
        let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: block, alignment: 16)
        defer { readBuffer.deallocate() }
        // Written data are slices of a random pool: cheap to make and copy.
        let pool = r.bytes(4 * block)
        for _ in 0..<200 {
          let b = Int(r.next() % UInt64(blocks)) * threads + t
          let count = Int(r.next() % UInt64(block)) + 1
          let start = b * block + Int(r.next() % UInt64(block - count + 1))
          let from = Int(r.next() % UInt64(pool.count - count + 1))
          do {
            if r.next() % 2 == 0 {
              try pool.withUnsafeBytes { p in
                let data = UnsafeRawBufferPointer(rebasing: p[from..<from + count])
                try client.write(data, at: UInt64(start))
                memcpy(model.baseAddress! + start, data.baseAddress!, count)
              }
            } else {
              let slice = UnsafeMutableRawBufferPointer(rebasing: readBuffer[0..<count])
              try client.read(into: slice, at: UInt64(start))
              if memcmp(model.baseAddress! + start, slice.baseAddress!, count) != 0 {
                shared.fail("thread \(t): read of \(count) at \(start) differs")
              }
            }
          } catch {
            shared.fail("thread \(t): \(error)")
          }
        }
        done.signal()
      }
    }
    for _ in 0..<threads {
      XCTAssertEqual(done.wait(timeout: .now() + 30), .success, "a thread hung")
    }
    XCTAssertEqual(shared.failures, [], "seed \(seed)")
    try client.flush()
    let file = try readFileBytes(image)
    XCTAssertEqual(file.count, shared.model.count)
    XCTAssertEqual(memcmp(file, shared.model.baseAddress!, min(file.count, shared.model.count)), 0, "seed \(seed)")
    XCTAssertEqual(client.reconnects, 0)
  }

  func testLargeRequestsAreSplit() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(6)
    var g = SplitMix64(seed: seed)
    let socket = "\(dir)/s.sock"
    let log = "\(dir)/requests.log"
    try nbdkit(socket, ["--filter=log", "memory", "64M", "logfile=\(log)"], log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI(socket), timeout: 20)
    // nbdkit's memory plugin advertises no maximum: the protocol's 32 MiB.
    XCTAssertEqual(client.maximumRequest, NBD.defaultMaximumPayload)
    let length = 40 << 20 + 5
    let data = g.bytes(length)
    try write(client, data, 3)
    XCTAssertEqual(try read(client, 3, length), data, "seed \(seed)")
    client.close()
    waitForDisconnect(log)
    let requests = try loggedRequests(log)
    for kind in ["Write", "Read"] {
      let mine = requests.filter { $0.0 == kind }.sorted { $0.1 < $1.1 }
      XCTAssertEqual(mine.count, 2, kind)
      XCTAssertEqual(mine.map { $0.2 }.max(), UInt64(NBD.defaultMaximumPayload), kind)
      XCTAssertEqual(mine.map { $0.2 }.reduce(0, +), UInt64(length), kind)
      XCTAssertEqual(mine.first?.1, 3, kind)
      XCTAssertEqual(mine.last?.1, 3 + UInt64(NBD.defaultMaximumPayload), kind)
    }
  }

  func testServerMaximumBlockSizeSplitsRequests() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(7))
    let socket = "\(dir)/s.sock"
    let log = "\(dir)/requests.log"
    try nbdkit(
      socket,
      ["--filter=log", "--filter=blocksize-policy", "memory", "8M", "blocksize-maximum=1M", "logfile=\(log)"],
      log: "\(dir)/s.log")
    let client = try NBDClient(uri: unixURI(socket), timeout: 10)
    XCTAssertEqual(client.maximumBlockSize, 1 << 20)
    XCTAssertEqual(client.maximumRequest, 1 << 20)
    let data = g.bytes(3 << 20 + 1)
    try write(client, data, 0)
    XCTAssertEqual(try read(client, 0, data.count), data)
    client.close()
    waitForDisconnect(log)
    let requests = try loggedRequests(log)
    XCTAssertEqual(requests.filter { $0.0 == "Write" }.count, 4)
    XCTAssertEqual(requests.filter { $0.0 == "Read" }.count, 4)
    XCTAssertLessThanOrEqual(requests.map { $0.2 }.max() ?? 0, 1 << 20)
  }

  func testRangesPastTheEndAreRefusedWithoutSending() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/s.sock"
    let log = "\(dir)/requests.log"
    try nbdkit(socket, ["--filter=log", "memory", "1M", "logfile=\(log)"], log: "\(dir)/s.log")
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 10)
    let size = client.size
    XCTAssertEqual(size, 1 << 20)
    assertThrows(
      try read(client, size - 10, 20), containing: ["\(uri): read of 20 bytes at \(size - 10)", "past the end"])
    assertThrows(try read(client, UInt64.max - 1, 4), containing: ["past the end"])
    assertThrows(try write(client, [1, 2], size - 1), containing: ["write of 2 bytes", "past the end"])
    assertThrows(try client.writeZeroes(offset: size, length: 1), containing: ["past the end"])
    // Up to the last byte is fine; nothing is sent for an empty read.
    XCTAssertEqual(try read(client, size - 1, 1), [0])
    XCTAssertEqual(try read(client, size, 0), [])
    client.close()
    assertThrows(try read(client, 0, 1), containing: [uri, "closed"])
    waitForDisconnect(log)
    let requests = try loggedRequests(log)
    XCTAssertEqual(requests.count, 1, "\(requests)")
    XCTAssertEqual(requests.first?.1, size - 1)
  }

  // MARK: Errors, time limits and reconnection

  func testServerErrorsNameTheRequestThenRecover() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(8))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 2 << 20, &g)
    let trigger = "\(dir)/trigger"
    let socket = "\(dir)/s.sock"
    try nbdkit(
      socket, ["--filter=error", "file", image, "error-rate=100%", "error-file=\(trigger)"], log: "\(dir)/s.log")
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 10)
    defer { client.close() }
    XCTAssertEqual(try read(client, 0, 512), Array(bytes[0..<512]))

    _ = FileManager.default.createFile(atPath: trigger, contents: Data())
    do {
      _ = try read(client, 1 << 20, 4096)
      XCTFail("the read should fail while the trigger file exists")
    } catch {
      XCTAssertTrue(error is ToolkitError)
      XCTAssertEqual(errorText(error), "\(uri): read of 4096 bytes at 1048576 failed: \(Errno(EIO))")
    }
    assertThrows(try write(client, [9, 9, 9], 77), containing: ["\(uri): write of 3 bytes at 77 failed: "])

    try FileManager.default.removeItem(atPath: trigger)
    XCTAssertEqual(try read(client, 1 << 20, 4096), Array(bytes[1 << 20..<(1 << 20) + 4096]))
    // A server's error is no broken connection.
    XCTAssertEqual(client.reconnects, 0)
  }

  func testReconnectsAfterTheServerRestarts() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(9))
    let image = "\(dir)/disk.img"
    let bytes = try randomImage(image, size: 1 << 20, &g)
    let socket = "\(dir)/s.sock"
    let first = try nbdkit(socket, ["file", image], log: "\(dir)/1.log")
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 10)
    defer { client.close() }
    XCTAssertEqual(try read(client, 0, 4096), Array(bytes[0..<4096]))

    stop(first)
    unlink(socket)
    let second = try nbdkit(socket, ["file", image], log: "\(dir)/2.log")
    XCTAssertEqual(try read(client, 4096, 4096), Array(bytes[4096..<8192]))
    XCTAssertEqual(client.reconnects, 1)
    try write(client, [1, 2, 3], 10)
    try client.flush()
    XCTAssertEqual(Array(try readFileBytes(image)[10..<13]), [1, 2, 3])

    // A server with a different export size is refused.
    stop(second)
    unlink(socket)
    let other = "\(dir)/other.img"
    try createSparseFile(other, size: 2 << 20)
    try nbdkit(socket, ["file", other], log: "\(dir)/3.log")
    assertThrows(try read(client, 0, 512), containing: [uri, "size changed from 1048576 to 2097152"])
    XCTAssertEqual(client.reconnects, 1)
  }

  func testWithoutAServerRequestsFailWithinTheTimeLimit() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/s.sock"
    let server = try nbdkit(socket, ["memory", "1M"], log: "\(dir)/s.log")
    let uri = unixURI(socket)
    let timeout = 1.5
    let client = try NBDClient(uri: uri, timeout: timeout)
    defer { client.close() }
    XCTAssertEqual(try read(client, 0, 16), [UInt8](repeating: 0, count: 16))
    stop(server)
    unlink(socket)

    let start = Date()
    assertThrows(
      try read(client, 0, 16), containing: ["\(uri): read of 16 bytes at 0 failed", "could not be made again"])
    let elapsed = Date().timeIntervalSince(start)
    XCTAssertLessThan(elapsed, timeout + 2)
    XCTAssertEqual(client.reconnects, 0)

    // No server at all: the first connection fails at once, naming the URI.
    let missing = unixURI("\(dir)/none.sock")
    let start2 = Date()
    assertThrows(try NBDClient(uri: missing, timeout: timeout), containing: [missing, "cannot connect"])
    XCTAssertLessThan(Date().timeIntervalSince(start2), timeout + 2)
  }

  func testARequestWithoutAReplyTimesOutAndTheNextReconnects() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/s.sock"
    try nbdkit(socket, ["--filter=delay", "memory", "1M", "delay-read=20"], log: "\(dir)/s.log")
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 1)
    defer { client.close() }
    let start = Date()
    assertThrows(try read(client, 0, 512), containing: ["\(uri): read of 512 bytes at 0 failed: no reply within 1 s"])
    let elapsed = Date().timeIntervalSince(start)
    XCTAssertGreaterThan(elapsed, 0.9)
    XCTAssertLessThan(elapsed, 3)
    // Writes are not delayed: the next request gets a new connection.
    try write(client, [5, 6, 7], 100)
    XCTAssertEqual(client.reconnects, 1)
  }

  func testTCP() throws {
    _ = try requireTool("nbdkit")
    let port: UInt16
    do {
      let probe = try Listener(host: "127.0.0.1", port: 0)
      port = UInt16(probe.name.split(separator: ":").last!)!
    }
    let dir = try makeTempDirectory()
    try launch(
      "nbdkit", ["-f", "-p", String(port), "-i", "127.0.0.1", "memory", "64M"],
      endpoint: .tcp(host: "127.0.0.1", port: port), log: "\(dir)/s.log")
    let uri = "nbd://127.0.0.1:\(port)/"
    let client = try NBDClient(uri: uri, timeout: 10)
    defer { client.close() }
    XCTAssertEqual(client.size, 64 << 20)
    var g = SplitMix64(seed: testSeed(10))
    let data = g.bytes(1 << 20 + 17)
    try write(client, data, 12_345)
    XCTAssertEqual(try read(client, 12_345, data.count), data)
    assertFlags(client, match: try nbdinfo(uri))
  }

  // MARK: A scripted server

  func testBadReplyMagicAndUnknownCookiesBreakTheConnection() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/fake.sock"
    let server = try FakeNBDServer(path: socket, script: [.unknownCookie, .badMagic, .correct])
    let uri = unixURI(socket)
    let client = try NBDClient(uri: uri, timeout: 5)
    defer { client.close() }
    XCTAssertEqual(client.size, FakeNBDServer.size)
    assertThrows(try read(client, 0, 4096), containing: [uri, "unknown request"])
    assertThrows(try read(client, 0, 4096), containing: [uri, "bad magic"])
    XCTAssertEqual(try read(client, 1000, 3000), FakeNBDServer.pattern(1000, 3000))
    XCTAssertEqual(client.reconnects, 2)
    XCTAssertTrue(server.failures.isEmpty, "\(server.failures)")
  }

  func testExportNameFallbackAndOversizedOptionReplies() throws {
    let dir = try makeTempDirectory()
    let socket = "\(dir)/old.sock"
    let server = try FakeNBDServer(path: socket, script: [.goUnsupported])
    let client = try NBDClient(uri: unixURI(socket, export: "name"), timeout: 5)
    XCTAssertEqual(client.size, FakeNBDServer.size)
    XCTAssertEqual(try read(client, 7, 100), FakeNBDServer.pattern(7, 100))
    client.close()
    XCTAssertEqual(server.exportNames, ["name"])

    let socket2 = "\(dir)/huge.sock"
    _ = try FakeNBDServer(path: socket2, script: [.hugeOptionReply])
    assertThrows(try NBDClient(uri: unixURI(socket2), timeout: 5), containing: ["65536"])
  }

  func testErrorNumbersBecomeText() {
    XCTAssertEqual(NBDClient.errorText(NBD.errIO), String(cString: strerror(EIO)))
    XCTAssertEqual(NBDClient.errorText(NBD.errNoSpace), String(cString: strerror(ENOSPC)))
    XCTAssertEqual(NBDClient.errorText(NBD.errShutdown), String(cString: strerror(ESHUTDOWN)))
    XCTAssertTrue(NBDClient.errorText(4242).contains("4242"))
  }
}

/// A one-export NBD server that misbehaves as told, one connection per
/// script step, then stops accepting.
private final class FakeNBDServer: @unchecked Sendable {
  enum Step { case correct, unknownCookie, badMagic, goUnsupported, hugeOptionReply, trickle }

  static let size: UInt64 = 1 << 20
  static func pattern(_ offset: Int, _ count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: (offset + $0) &* 31 &+ 7) }
  }

  private let listener: Listener
  private let lock = NSLock()
  private var _failures: [String] = []
  private var _exportNames: [String] = []
  var failures: [String] { lock.withLock { _failures } }
  var exportNames: [String] { lock.withLock { _exportNames } }

  init(path: String, script: [Step]) throws {
    listener = try Listener(unixPath: path)
    Thread.detachNewThread { [self] in
      for step in script {
        guard let s = try? listener.accept() else { return }
        do { try serve(s, step) } catch { lock.withLock { _failures.append("\(step): \(error)") } }
      }
    }
  }

  private func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

  private func receive(_ s: Socket, _ count: Int) throws -> [UInt8] {
    var b = [UInt8](repeating: 0, count: count)
    if count > 0 { try b.withUnsafeMutableBytes { try s.read(into: $0.baseAddress!, count: count) } }
    return b
  }

  private func value<T: FixedWidthInteger>(_ b: [UInt8], _ at: Int, _: T.Type) -> T {
    b.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).loadBE(at: at, as: T.self) }
  }

  private func optionReply(_ s: Socket, _ option: UInt32, _ type: UInt32, _ data: [UInt8], length: UInt32? = nil) throws
  {
    try s.write(be(NBD.optionReplyMagic) + be(option) + be(type) + be(length ?? UInt32(data.count)) + data)
  }

  private func serve(_ s: Socket, _ step: Step) throws {
    try s.write(be(NBD.initMagic) + be(NBD.optionMagic) + be(NBD.flagFixedNewstyle | NBD.flagNoZeroes))
    let clientFlags = value(try receive(s, 4), 0, UInt32.self)
    guard clientFlags == NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes else {
      throw TestFileError.failed("client flags \(clientFlags)", 0)
    }
    let head = try receive(s, 16)
    let option = value(head, 8, UInt32.self)
    _ = try receive(s, Int(value(head, 12, UInt32.self)))
    guard option == NBD.optGo else { throw TestFileError.failed("option \(option) instead of GO", 0) }
    let transmissionFlags = NBD.flagHasFlags | NBD.flagSendFlush
    switch step {
    case .hugeOptionReply:
      // Announce 1 MiB of information; the client must refuse to read it.
      try optionReply(s, option, NBD.repInfo, [], length: 1 << 20)
      _ = try? receive(s, 1)
      return
    case .goUnsupported:
      try optionReply(s, option, NBD.repErrUnsupported, [])
      let head2 = try receive(s, 16)
      let name = try receive(s, Int(value(head2, 12, UInt32.self)))
      guard value(head2, 8, UInt32.self) == NBD.optExportName else {
        throw TestFileError.failed("no EXPORT_NAME after GO was refused", 0)
      }
      lock.withLock { _exportNames.append(String(decoding: name, as: UTF8.self)) }
      try s.write(be(FakeNBDServer.size) + be(transmissionFlags))
    default:
      try optionReply(s, option, NBD.repInfo, be(NBD.infoExport) + be(FakeNBDServer.size) + be(transmissionFlags))
      try optionReply(s, option, NBD.repAck, [])
    }
    while true {
      guard let request = try? receive(s, 28) else { return }
      let type = value(request, 6, UInt16.self)
      let cookie = value(request, 8, UInt64.self)
      let offset = Int(value(request, 16, UInt64.self))
      let length = Int(value(request, 24, UInt32.self))
      if type == NBD.cmdDisconnect { return }
      if type == NBD.cmdWrite { _ = try receive(s, length) }
      switch step {
      case .unknownCookie:
        try s.write(be(NBD.simpleReplyMagic) + be(UInt32(0)) + be(cookie ^ 0x5555_0000_0000))
      case .badMagic:
        try s.write(be(UInt32(0x1234_5678)) + be(UInt32(0)) + be(cookie))
      case .trickle where type == NBD.cmdRead:
        // The data in pieces of odd sizes, with pauses between them.
        let data = FakeNBDServer.pattern(offset, length)
        try s.write(be(NBD.simpleReplyMagic) + be(UInt32(0)) + be(cookie))
        var sent = 0
        var piece = 1
        while sent < data.count {
          let n = min(piece, data.count - sent)
          try s.write(Array(data[sent..<sent + n]))
          sent += n
          piece = piece * 7 + 3
          usleep(2000)
        }
      default:
        let data = type == NBD.cmdRead ? FakeNBDServer.pattern(offset, length) : []
        try s.write(be(NBD.simpleReplyMagic) + be(UInt32(0)) + be(cookie) + data)
      }
    }
  }
}
