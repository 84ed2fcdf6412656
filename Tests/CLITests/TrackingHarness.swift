// The harness of TrackingServerCLITests: a device image in a scratch
// directory, tracking-server serving it (always stopped at the end), the
// control subcommands, nbdsh snippets with shared helpers, and the block
// sets of change maps and of images that differ. Child processes and
// commands with a time limit come from TestSupport/Processes.swift.

import Foundation
import Glibc
import TestSupport
import XCTest

final class TrackRig {
  let s: Scratch
  let size: Int
  let blockSize: Int
  /// The device image as created, before any write through the export.
  let original: Data
  var server: RRTChild?
  /// Other children (writers, snapshots) to stop at the end.
  var others: [RRTChild] = []
  private(set) var starts = 0
  var serverArguments: [String] = []

  var dir: String { s.url.path }
  var devicePath: String { s.path("device.img") }
  /// What the server serves: the image, or a block device standing for it.
  lazy var served: String = devicePath
  var mapPath: String { s.path("d.map") }
  var storePath: String { mapPath + ".store" }
  var socket: String { s.path("d.sock") }
  /// The default export (`device`).
  var uri: String { "nbd+unix:///?socket=\(socket)" }
  var viewURI: String { "nbd+unix:///view?socket=\(socket)" }
  var blockCount: Int { (size + blockSize - 1) / blockSize }
  /// The log of the latest start, and of all starts.
  var logPath: String { s.path("ts-\(starts).log") }
  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var allLogs: String {
    (1...max(1, starts)).map { (try? String(contentsOfFile: s.path("ts-\($0).log"), encoding: .utf8)) ?? "" }
      .joined(separator: "--- restart ---\n")
  }

  /// A device of `size` bytes of seeded random data.
  init(size: Int = 16 << 20, blockSize: Int = 65536, seed: UInt64 = 1) throws {
    s = try Scratch()
    self.size = size
    self.blockSize = blockSize
    original = RRTBytes.random(size, seed: seed)
    try original.write(to: URL(fileURLWithPath: devicePath))
  }

  // MARK: The server

  /// Starts tracking-server with the same arguments each time (`extra`
  /// replaces the options when given) and waits until it answers.
  @discardableResult
  func start(_ extra: [String]? = nil) throws -> RRTChild {
    if starts == 0 || extra != nil {
      serverArguments = ["serve"] + (extra ?? []) + ["--changes", mapPath, "--socket", socket, served]
    }
    starts += 1
    let child = try RRTChild(
      name: "tracking-server", executable: Tools.path("tracking-server"), arguments: serverArguments,
      stdout: s.path("ts-\(starts).out"), stderr: logPath, cwd: dir)
    server = child
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      if !child.isRunning {
        let status = child.wait(timeout: 1) ?? -1
        XCTFail("tracking-server ended with status \(status) before serving: \(child.errors)")
        throw RRTError("tracking-server did not start")
      }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return child }
      RRTEnv.sleep(0.05)
    }
    XCTFail("tracking-server did not answer within 15 s: \(child.errors)")
    throw RRTError("tracking-server did not answer")
  }

  /// The arguments of `serve` with absolute paths and the default options.
  var serverArgumentsForTest: [String] { ["serve", "--changes", mapPath, "--socket", socket, devicePath] }

  /// SIGTERM: the server synchronises the device and exits 0 saying so.
  func stop(file: StaticString = #filePath, line: UInt = #line) {
    guard let server else { return }
    let status = server.stop(grace: 30)
    self.server = nil
    XCTAssertEqual(status, 0, "tracking-server did not stop cleanly; log:\n\(log)", file: file, line: line)
    XCTAssertTrue(log.contains("stopped cleanly"), "log:\n\(log)", file: file, line: line)
    assertNoCrash(file: file, line: line)
  }

  func kill9() {
    server?.kill9()
    server = nil
  }

  func stopAll() {
    for c in others.reversed() { c.stop(grace: 5) }
    others = []
    server?.stop(grace: 10)
    server = nil
  }

  // MARK: Commands

  /// A tracking-server control subcommand against this server.
  func control(_ subcommand: String, _ arguments: [String] = []) throws -> RRTCommand.Result {
    try RRTCommand.run("tracking-server", [subcommand, "--socket", socket] + arguments, timeout: 60, cwd: dir)
  }

  /// `status --json`.
  func status(file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    let r = try control("status", ["--json"])
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    return try TrackRig.json(r.stdout, file: file, line: line)
  }

  /// Runs a command of the toolkit (or a program given by its absolute
  /// path) in the scratch directory.
  func run(_ tool: String, _ arguments: [String], timeout: Double = 120) throws -> RRTCommand.Result {
    try RRTCommand.run(tool, arguments, timeout: timeout, cwd: dir)
  }

  /// The export names the server lists.
  func exports(file: StaticString = #filePath, line: UInt = #line) throws -> [String: [String: Any]] {
    let r = try RRTCommand.run("/usr/bin/nbdinfo", ["--list", "--json", uri], timeout: 20)
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    let o = try TrackRig.json(r.stdout, file: file, line: line)
    let list = try XCTUnwrap(o["exports"] as? [[String: Any]], r.stdout, file: file, line: line)
    var byName: [String: [String: Any]] = [:]
    for e in list { byName[e["export-name"] as? String ?? "?"] = e }
    return byName
  }

  static func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not JSON: \(text)", file: file, line: line
    )
  }

  // MARK: nbdsh

  /// What every snippet starts with: the names it uses, and `pattern(w, n)`,
  /// the data of write `w` (16-byte records of LE32 w, i, 0x5EED0000 ^ w,
  /// i ^ 0xA5A5A5A5, as `TrackRig.pattern`).
  func prologue(_ target: String) -> String {
    """
    import os, sys, struct, json, time, errno, random
    URI = \(rrtPython(target))
    VIEW = \(rrtPython(viewURI))
    B = \(blockSize)
    SIZE = \(size)
    DIR = \(rrtPython(dir))
    def pattern(w, n):
        k = (n + 15) // 16
        return struct.pack('<%dI' % (4 * k), *[x for i in range(k) for x in (w, i, 0x5EED0000 ^ w, i ^ 0xA5A5A5A5)])[:n]

    """
  }

  /// Runs Python in nbdsh (not connected: the code calls h.connect_uri).
  func nbdsh(_ code: String, uri target: String? = nil, timeout: Double = 60) throws -> RRTCommand.Result {
    try RRTCommand.run("/usr/bin/nbdsh", ["-c", prologue(target ?? uri) + code], timeout: timeout, cwd: dir)
  }

  /// Starts nbdsh running `code` in the background.
  func nbdshChild(_ code: String, name: String, uri target: String? = nil) throws -> RRTChild {
    let c = try RRTChild(
      name: name, executable: "/usr/bin/nbdsh", arguments: ["-c", prologue(target ?? uri) + code],
      stdout: s.path("\(name).out"), stderr: s.path("\(name).err"), cwd: dir)
    others.append(c)
    return c
  }

  // MARK: Files and maps

  func deviceData() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: devicePath)) }

  func mapStats(_ path: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    let r = try RRTCommand.run("overwrite-map", ["stats", "--json", path ?? mapPath])
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    return try TrackRig.json(r.stdout, file: file, line: line)
  }

  /// The blocks set in a map (of blocks of `blockSize` bytes).
  func setBlocks(_ path: String? = nil, blockSize bs: Int? = nil, file: StaticString = #filePath, line: UInt = #line)
    throws -> Set<Int>
  {
    let bs = bs ?? blockSize
    let r = try RRTCommand.run("overwrite-map", ["extents", path ?? mapPath])
    XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
    var blocks = Set<Int>()
    for l in r.lines {
      let parts = l.split(separator: " ").compactMap { Int($0) }
      guard parts.count == 2, parts[1] > 0 else {
        XCTFail("bad extents line \(l)", file: file, line: line)
        continue
      }
      for b in (parts[0] / bs)...((parts[0] + parts[1] - 1) / bs) { blocks.insert(b) }
    }
    return blocks
  }

  /// The data of write `w` of `n` bytes, as the snippets' `pattern(w, n)`.
  static func pattern(_ w: UInt32, _ n: Int) -> Data {
    var d = Data(count: (n + 15) / 16 * 16)
    d.withUnsafeMutableBytes { (raw: UnsafeMutableRawBufferPointer) in
      let words = raw.bindMemory(to: UInt32.self)
      var i: UInt32 = 0
      var k = 0
      while k < words.count {
        words[k] = w.littleEndian
        words[k + 1] = i.littleEndian
        words[k + 2] = (0x5EED_0000 ^ w).littleEndian
        words[k + 3] = (i ^ 0xA5A5_A5A5).littleEndian
        i &+= 1
        k += 4
      }
    }
    return d.prefix(n)
  }

  /// Whether `data` holds `expected` at `offset`.
  static func holds(_ data: Data, _ expected: Data, at offset: Int) -> Bool {
    guard offset >= 0, offset + expected.count <= data.count else { return false }
    return data.withUnsafeBytes { (x: UnsafeRawBufferPointer) in
      expected.withUnsafeBytes { (y: UnsafeRawBufferPointer) in
        y.count == 0 || memcmp(x.baseAddress! + offset, y.baseAddress!, y.count) == 0
      }
    }
  }
}

extension Set where Element == Int {
  /// The first few elements, sorted, for messages.
  var brief: String {
    let s = sorted()
    return s.prefix(12).map(String.init).joined(separator: " ") + (s.count > 12 ? " … (\(s.count))" : "")
  }
}
