// The harness of the restore-read-through tests (RestoreCLITestCase and the
// Restore*CLITests that inherit it, and others that need a restore running):
// RRTRig, one restore set-up — a backup image served by nbdkit or qemu-nbd,
// an empty primary, the map, restore-read-through — whose children are
// always stopped; nbdsh snippets; and byte comparisons that say where two
// images differ. Children and commands with a time limit are RRTChild and
// RRTCommand (TestSupport/Processes.swift).
import Foundation
import Glibc
import TestSupport
import XCTest

/// Byte comparisons with a useful message.
enum RRTBytes {
  /// The first offset where `a` and `b` differ, or nil.
  static func firstDifference(_ a: Data, _ b: Data) -> Int? {
    if a.count != b.count {
      let n = min(a.count, b.count)
      return firstDifference(a.prefix(n), b.prefix(n)) ?? n
    }
    return a.withUnsafeBytes { (x: UnsafeRawBufferPointer) -> Int? in
      b.withUnsafeBytes { (y: UnsafeRawBufferPointer) -> Int? in
        if x.count == 0 || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 { return nil }
        // Narrow down by chunks, then bytes.
        var start = 0
        let chunk = 4096
        while start < x.count {
          let n = min(chunk, x.count - start)
          if memcmp(x.baseAddress! + start, y.baseAddress! + start, n) != 0 {
            for i in start..<start + n where x[i] != y[i] { return i }
          }
          start += n
        }
        return nil
      }
    }
  }

  static func isZero(_ d: Data) -> Bool { d.allSatisfy { $0 == 0 } }

  /// The blocks of `blockSize` bytes where two images of the same size differ.
  static func differingBlocks(_ a: Data, _ b: Data, blockSize: Int) -> Set<Int> {
    precondition(a.count == b.count, "images of \(a.count) and \(b.count) bytes")
    var out = Set<Int>()
    a.withUnsafeBytes { (x: UnsafeRawBufferPointer) in
      b.withUnsafeBytes { (y: UnsafeRawBufferPointer) in
        var start = 0
        while start < x.count {
          let n = min(blockSize, x.count - start)
          if memcmp(x.baseAddress! + start, y.baseAddress! + start, n) != 0 { out.insert(start / blockSize) }
          start += n
        }
      }
    }
    return out
  }

  static func assertEqual(
    _ a: Data, _ b: Data, _ what: @autoclosure () -> String, file: StaticString = #filePath, line: UInt = #line
  ) {
    if let i = firstDifference(a, b) {
      let detail =
        i < min(a.count, b.count)
        ? "first difference at byte \(i) (0x\(String(a[a.startIndex + i], radix: 16)) vs 0x\(String(b[b.startIndex + i], radix: 16)))"
        : "lengths \(a.count) and \(b.count)"
      XCTFail("\(what()): \(detail)", file: file, line: line)
    }
  }

  static func random(_ count: Int, seed: UInt64) -> Data {
    var rng = SplitMix64(seed: seed)
    var d = Data(count: count)
    d.withUnsafeMutableBytes { (raw: UnsafeMutableRawBufferPointer) in
      let words = count / 8
      for i in 0..<words { raw.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
      for i in (words * 8)..<count { raw[i] = UInt8(truncatingIfNeeded: rng.next() >> 11) }
    }
    return d
  }

  /// Reads `length` bytes at `offset` of a file.
  static func read(_ path: String, _ offset: Int, _ length: Int) throws -> Data {
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: UInt64(offset))
    return try h.read(upToCount: length) ?? Data()
  }
}

/// A Python string literal of `s`.
func rrtPython(_ s: String) -> String {
  var out = "'"
  for scalar in s.unicodeScalars {
    switch scalar {
    case "\\": out += "\\\\"
    case "'": out += "\\'"
    case "\n": out += "\\n"
    default: out.unicodeScalars.append(scalar)
    }
  }
  return out + "'"
}

/// One restore set-up: a backup image served by an NBD server, an empty
/// primary, the overwrite map, and restore-read-through between them.
final class RRTRig {
  let s: Scratch
  let size: Int
  let blockSize = 65536
  /// The backup image as created (before any write through the export).
  let original: Data
  var backupServer: RRTChild?
  var server: RRTChild?
  /// Other children (nbdfuse, writers) to stop at the end.
  var others: [RRTChild] = []
  private(set) var serverStarts = 0
  var serverArguments: [String] = []
  var backupKind: BackupKind = .nbdkit()
  /// With nbdkit's log filter: the file listing every request to the backup.
  var backupRequestLog: String?
  /// Serve the backup read-only (nbdkit -r, qemu-nbd -r).
  var backupReadOnly = false

  enum BackupKind {
    /// nbdkit's file plugin with these filters and their parameters.
    case nbdkit(filters: [String] = [], parameters: [String] = [])
    case qemuNBD
  }

  var dir: String { s.url.path }
  var backupPath: String { s.path("backup.img") }
  /// The primary as restore-read-through opens it (a file of the scratch
  /// directory unless a test points it elsewhere, e.g. at an nbdfuse file).
  lazy var primaryPath: String = s.path("primary.img")
  var mapPath: String { s.path("p.map") }
  /// The change map of --read-only-backup, when a test gives it.
  var changesPath: String { s.path("changes.map") }
  var backupSocket: String { s.path("b.sock") }
  var socket: String { s.path("p.sock") }
  var backupURI: String { "nbd+unix:///?socket=\(backupSocket)" }
  var uri: String { "nbd+unix:///?socket=\(socket)" }
  var mergeURI: String { "nbd+unix:///merge?socket=\(socket)" }
  var blockCount: Int { (size + blockSize - 1) / blockSize }
  /// The log of the latest start, and of all starts.
  var logPath: String { s.path("rrt-\(serverStarts).log") }
  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var allLogs: String {
    (1...max(1, serverStarts)).map { (try? String(contentsOfFile: s.path("rrt-\($0).log"), encoding: .utf8)) ?? "" }
      .joined(separator: "--- restart ---\n")
  }

  /// A backup of `size` bytes: seeded random data with a run of zero blocks
  /// (blocks 100..<108 when there are that many), and an empty primary.
  init(size: Int = 16 << 20, seed: UInt64 = 1, backup: Data? = nil) throws {
    s = try Scratch()
    self.size = size
    var data = backup ?? RRTBytes.random(size, seed: seed)
    if backup == nil && size >= 108 * 65536 {
      data.replaceSubrange((100 * 65536)..<(108 * 65536), with: Data(count: 8 * 65536))
    }
    original = data
    try data.write(to: URL(fileURLWithPath: backupPath))
    try makeSparse(primaryPath, size: size)
  }

  func makeSparse(_ path: String, size: Int) throws {
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.truncate(atOffset: UInt64(size))
    try h.close()
  }

  // MARK: Peers

  func startBackup(_ kind: BackupKind? = nil) throws {
    if let kind { backupKind = kind }
    unlink(backupSocket)
    let args: [String]
    let exe: String
    switch backupKind {
    case .nbdkit(let filters, let parameters):
      exe = "/usr/bin/nbdkit"
      var extra = parameters
      if filters.contains("log") {
        backupRequestLog = s.path("backup-requests.log")
        extra.append("logfile=\(s.path("backup-requests.log"))")
      }
      args =
        ["-f"] + (backupReadOnly ? ["-r"] : []) + ["-U", backupSocket] + filters.map { "--filter=\($0)" } + [
          "file", backupPath,
        ] + extra
    case .qemuNBD:
      exe = "/usr/bin/qemu-nbd"
      args =
        ["-f", "raw", "-k", backupSocket, "--persistent", "--shared=8", "--cache=writeback"]
        + (backupReadOnly ? ["-r"] : []) + [backupPath]
    }
    backupServer = try RRTChild(
      name: "backup server", executable: exe, arguments: args, stdout: s.path("backup.out"),
      stderr: s.path("backup.log"), appendStderr: true)
    try waitForNBD(backupURI, process: backupServer!, what: "the backup server")
  }

  /// Starts restore-read-through with the same arguments each time (plus
  /// `extra` the first time), its standard input from `stdin` (a file or a
  /// FIFO) when given, and waits until it answers.
  @discardableResult
  func startServer(_ extra: [String] = [], stdin: String? = nil) throws -> RRTChild {
    if serverStarts == 0 || !extra.isEmpty {
      serverArguments = extra + ["--backup", backupURI, "--map", mapPath, "--socket", socket, primaryPath]
    }
    serverStarts += 1
    let child = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"), arguments: serverArguments,
      stdout: s.path("rrt-\(serverStarts).out"), stderr: logPath, stdin: stdin)
    server = child
    try waitForNBD(uri, process: child, what: "restore-read-through")
    return child
  }

  func waitForNBD(_ target: String, process: RRTChild, what: String, timeout: Double = 10) throws {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end {
      if !process.isRunning {
        let status = process.wait(timeout: 1) ?? -1
        XCTFail("\(what) ended with status \(status) before serving: \(process.errors)")
        throw RRTError("\(what) did not start")
      }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", target], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    XCTFail("\(what) did not answer within \(timeout) s: \(process.errors)")
    throw RRTError("\(what) did not answer")
  }

  /// SIGTERM: the server flushes and exits 0 with a line saying so.
  func stopServer(file: StaticString = #filePath, line: UInt = #line) {
    guard let server else { return }
    let status = server.stop(grace: 30)
    self.server = nil
    XCTAssertEqual(status, 0, "restore-read-through did not stop cleanly; log:\n\(log)", file: file, line: line)
    XCTAssertTrue(log.contains("stopped cleanly"), "log:\n\(log)", file: file, line: line)
    assertNoCrash(file: file, line: line)
  }

  /// Waits up to `seconds` for the latest start's log to say one of `texts`.
  func waitForLog(_ texts: String..., seconds: Double = 60) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while true {
      let text = log
      if texts.contains(where: { text.contains($0) }) { return true }
      if RRTEnv.monotonic() >= end { return false }
      RRTEnv.sleep(0.1)
    }
  }

  func killServer() {
    server?.kill9()
    server = nil
  }

  func stopAll() {
    for c in others.reversed() { c.stop(grace: 5) }
    others = []
    if let server {
      server.stop(grace: 10)
      self.server = nil
    }
    backupServer?.stop(grace: 5)
    if backupServer?.isRunning == true { backupServer?.kill9() }
    backupServer = nil
  }

  // MARK: Clients

  /// Runs Python code in nbdsh (not connected: the code calls
  /// h.connect_uri(URI) itself, after any set_strict_mode).
  func nbdsh(_ code: String, uri target: String? = nil, timeout: Double = 60) throws -> RRTCommand.Result {
    let prologue = """
      import os, sys, struct, json, time, errno
      URI = \(rrtPython(target ?? uri))
      B = \(blockSize)
      SIZE = \(size)
      DIR = \(rrtPython(dir))

      """
    return try RRTCommand.run("/usr/bin/nbdsh", ["-c", prologue + code], timeout: timeout, cwd: dir)
  }

  /// Starts nbdsh running `code` in the background.
  func nbdshChild(_ code: String, name: String, uri target: String? = nil) throws -> RRTChild {
    let prologue = """
      import os, sys, struct, json, time, errno
      URI = \(rrtPython(target ?? uri))
      B = \(blockSize)
      SIZE = \(size)
      DIR = \(rrtPython(dir))

      """
    let c = try RRTChild(
      name: name, executable: "/usr/bin/nbdsh", arguments: ["-c", prologue + code], stdout: s.path("\(name).out"),
      stderr: s.path("\(name).err"), cwd: dir)
    others.append(c)
    return c
  }

  /// Reads byte ranges through the export into a sparse file of the image's
  /// size (same offsets) and returns its content.
  func readThroughExport(_ ranges: [(Int, Int)], name: String = "readback.img") throws -> Data {
    let list = ranges.map { "(\($0.0), \($0.1))" }.joined(separator: ", ")
    let out = s.path(name)
    unlink(out)
    let r = try nbdsh(
      """
      h.connect_uri(URI)
      fd = os.open(\(rrtPython(out)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
      os.ftruncate(fd, SIZE)
      for off, n in [\(list)]:
          done = 0
          while done < n:
              k = min(n - done, 16 << 20)
              os.pwrite(fd, h.pread(k, off + done), off + done)
              done += k
      os.close(fd)
      h.shutdown()
      print("OK")
      """)
    XCTAssertEqual(r.status, 0, "reading back through the export failed: \(r.summary)\nlog:\n\(log)")
    XCTAssertTrue(r.stdout.contains("OK"), r.summary)
    return try Data(contentsOf: URL(fileURLWithPath: out))
  }

  /// nbdcopy of the whole export to a file.
  func copyExport(to name: String, file: StaticString = #filePath, line: UInt = #line) throws -> Data {
    let out = s.path(name)
    unlink(out)
    let r = try RRTCommand.run("/usr/bin/nbdcopy", [uri, out], timeout: 120)
    XCTAssertEqual(r.status, 0, "nbdcopy: \(r.summary)\nlog:\n\(log)", file: file, line: line)
    return try Data(contentsOf: URL(fileURLWithPath: out))
  }

  // MARK: Files and the map

  func backupData() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: backupPath)) }
  func primaryData() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: primaryPath)) }

  func mapStats(file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    let r = try RRTCommand.run("overwrite-map", ["stats", "--json", mapPath])
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    return try XCTUnwrap(
      JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.summary, file: file, line: line)
  }

  /// The blocks the map on disk marks current.
  func currentBlocks(file: StaticString = #filePath, line: UInt = #line) throws -> Set<Int> {
    try setBlocks(mapPath, file: file, line: line)
  }

  /// The blocks a map on disk sets (the overwrite map: current; a change
  /// map: changed).
  func setBlocks(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws -> Set<Int> {
    let r = try RRTCommand.run("overwrite-map", ["extents", path])
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    var blocks = Set<Int>()
    for l in r.lines {
      let parts = l.split(separator: " ").compactMap { Int($0) }
      guard parts.count == 2 else {
        XCTFail("bad extents line \(l)", file: file, line: line)
        continue
      }
      let first = parts[0] / blockSize
      let last = (parts[0] + parts[1] - 1) / blockSize
      for b in first...last { blocks.insert(b) }
    }
    return blocks
  }

  /// bitmap-diff PRIMARY BACKUP: 0 when identical.
  func bitmapDiff(_ a: String? = nil, _ b: String? = nil) throws -> RRTCommand.Result {
    try RRTCommand.run("bitmap-diff", ["--extents", a ?? primaryPath, b ?? backupPath], timeout: 60)
  }

}

struct RRTError: Error, CustomStringConvertible {
  var description: String
  init(_ d: String) { description = d }
}
