// The harness of TrackingMirrorCLITests: far copies (an image file served
// by nbdkit's file plugin behind its delay filter, on a private socket),
// stopped with SIGSTOP until every thread of the process is at rest so that
// the image can be read as it stands, and started again when nbdkit died on
// its own; the primary of a chain (restore-read-through on a whole image,
// every block current); and what tracking-server status says of each far
// copy. Children and commands come from TestSupport/Processes.swift.

import Foundation
import Glibc
import TestSupport
import XCTest

/// One far copy: `NAME.img` in a directory, served by nbdkit with writes,
/// zeros and trims delayed by `delay` (nbdkit's `wdelay`).
final class FarCopy: ServerRig {
  let dir: String
  let name: String
  let size: Int
  let blockSize = 65536
  let delay: String
  var child: RRTChild?
  private(set) var starts = 0
  /// Starts after nbdkit had died without being told to (nbdkit 1.32's
  /// delay filter may abort when a client is killed in mid-request).
  private(set) var revivals = 0

  var path: String { dir + "/\(name).img" }
  var socket: String { dir + "/\(name).sock" }
  var logPath: String { dir + "/\(name).log" }
  var uri: String { "nbd+unix:///?socket=\(socket)" }
  var allLogs: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var isRunning: Bool { child?.isRunning == true }

  /// The image holds `image`; nbdkit is not started yet.
  init(dir: String, name: String, image: Data, delay: String) throws {
    self.dir = dir
    self.name = name
    self.delay = delay
    size = image.count
    try image.write(to: URL(fileURLWithPath: dir + "/\(name).img"))
  }

  /// Starts nbdkit (a stale socket of a dead one removed first) and waits
  /// until it answers.
  func start() throws {
    unlink(socket)
    starts += 1
    let c = try RRTChild(
      name: "far copy \(name)", executable: "/usr/bin/nbdkit",
      arguments: ["-f", "-U", socket, "--filter=delay", "file", path, "wdelay=\(delay)"],
      stdout: dir + "/\(name).out", stderr: logPath, appendStderr: true)
    child = c
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      if !c.isRunning { throw RRTError("nbdkit of the far copy \(name) ended: \(allLogs)") }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("nbdkit of the far copy \(name) did not answer within 15 s")
  }

  /// Starts nbdkit again if it died on its own; whether it had.
  @discardableResult
  func revive() throws -> Bool {
    guard let child, !child.isRunning else { return false }
    revivals += 1
    try start()
    return true
  }

  /// SIGSTOP, then waits until every thread of nbdkit is stopped: no write
  /// of it is half made while the image is read. False if it is not running.
  @discardableResult
  func freeze(file: StaticString = #filePath, line: UInt = #line) -> Bool {
    guard let child, child.isRunning else { return false }
    kill(child.pid, SIGSTOP)
    let end = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < end {
      if Self.allStopped(child.pid) { return true }
      RRTEnv.sleep(0.002)
    }
    XCTFail("nbdkit of the far copy \(name) did not stop within 10 s of SIGSTOP", file: file, line: line)
    return false
  }

  func thaw() {
    if let child, child.isRunning { kill(child.pid, SIGCONT) }
  }

  /// Whether every thread of `pid` is in the stopped state (T).
  static func allStopped(_ pid: Int32) -> Bool {
    guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else { return false }
    for t in tasks {
      guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
      else { return false }
      let state = stat[stat.index(after: close)...].drop { $0 == " " }.first
      if state != "T" && state != "t" { return false }
    }
    return !tasks.isEmpty
  }

  func kill9() {
    thaw()
    child?.kill9()
    unlink(socket)
  }

  /// SIGTERM (after SIGCONT); kill -9 if it does not end.
  func stop() {
    thaw()
    child?.stop(grace: 5)
    if child?.isRunning == true { child?.kill9() }
  }

  func stopAll() { stop() }

  func data() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }
}

/// What tracking-server status says of one far copy.
struct CopyLag: CustomStringConvertible {
  var name: String
  var interval: Int
  var owedIntervals: Int
  var owedBytes: Int
  var oldestSeconds: Double

  var description: String {
    "\(name): holds \(interval), owes \(owedIntervals) (\(owedBytes) bytes), oldest \(oldestSeconds) s"
  }
}

extension TrackRig {
  /// The arguments of a mirroring server: `--ack ACK` and each copy's URI.
  static func mirroring(_ copies: [FarCopy], ack: String = "local", extra: [String] = []) -> [String] {
    ["--ack", ack] + copies.flatMap { ["--backup", $0.uri] } + extra
  }

  /// The far copies in `status --json`, checked for their fields' presence.
  func copyLags(file: StaticString = #filePath, line: UInt = #line) throws -> [CopyLag] {
    let s = try status(file: file, line: line)
    let count = try XCTUnwrap(s["copies"] as? Int, "status lacks copies: \(s)", file: file, line: line)
    return try (0..<count).map { i in
      func int(_ key: String) throws -> Int {
        try XCTUnwrap(s[key] as? Int, "status lacks \(key) as a number: \(s)", file: file, line: line)
      }
      let oldest = try XCTUnwrap(
        (s["copy_\(i)_oldest_seconds"] as? String).flatMap(Double.init)
          ?? (s["copy_\(i)_oldest_seconds"] as? NSNumber)?.doubleValue,
        "status lacks copy_\(i)_oldest_seconds: \(s)", file: file, line: line)
      return CopyLag(
        name: try XCTUnwrap(s["copy_\(i)"] as? String, "status lacks copy_\(i): \(s)", file: file, line: line),
        interval: try int("copy_\(i)_interval"), owedIntervals: try int("copy_\(i)_owed_intervals"),
        owedBytes: try int("copy_\(i)_owed_bytes"), oldestSeconds: oldest)
    }
  }

  /// Polls status until `done` holds of the copies (their lags then), or
  /// `seconds` pass (nil; the last lags are in `last`).
  func waitForCopies(
    seconds: Double = 30, last: inout [CopyLag], file: StaticString = #filePath, line: UInt = #line,
    _ done: ([CopyLag]) -> Bool
  ) throws -> [CopyLag]? {
    let end = RRTEnv.monotonic() + seconds
    while true {
      last = try copyLags(file: file, line: line)
      if done(last) { return last }
      if RRTEnv.monotonic() >= end { return nil }
      RRTEnv.sleep(0.1)
    }
  }

  /// Waits until no far copy owes anything; asserts it happens in time.
  @discardableResult
  func waitUntilDrained(seconds: Double = 30, file: StaticString = #filePath, line: UInt = #line) throws -> Bool {
    var last: [CopyLag] = []
    let ok = try waitForCopies(seconds: seconds, last: &last, file: file, line: line) {
      $0.allSatisfy { $0.owedIntervals == 0 && $0.owedBytes == 0 }
    }
    XCTAssertNotNil(ok, "the far copies still owe after \(seconds) s: \(last)\nlog:\n\(log)", file: file, line: line)
    return ok != nil
  }

  /// Waits up to `seconds` for the latest start's log to hold `text`.
  func waitForLog(_ text: String, seconds: Double = 30) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while !log.contains(text) {
      if RRTEnv.monotonic() >= end { return false }
      RRTEnv.sleep(0.1)
    }
    return true
  }
}

/// The primary of a chain: restore-read-through --ack local on a whole
/// image (a copy of the backup's, its map with every block current), so
/// nothing is fetched and every write is shipped to its backup, the relay.
final class ChainPrimary: ServerRig {
  let dir: String
  let size: Int
  let blockSize = 65536
  var server: RRTChild?
  /// Its clients (writers), stopped first.
  var others: [RRTChild] = []
  private(set) var starts = 0
  var arguments: [String] = []

  var path: String { dir + "/primary.img" }
  var mapPath: String { dir + "/p.map" }
  var socket: String { dir + "/p.sock" }
  var uri: String { "nbd+unix:///?socket=\(socket)" }
  var logPath: String { dir + "/rrt-\(starts).log" }
  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var allLogs: String {
    (1...max(1, starts)).map { (try? String(contentsOfFile: dir + "/rrt-\($0).log", encoding: .utf8)) ?? "" }
      .joined(separator: "--- restart ---\n")
  }

  /// `image` as the primary, with a map of the same geometry that says
  /// every block is current (`overwrite-map create --like`, then `invert`).
  init(dir: String, image: Data) throws {
    self.dir = dir
    size = image.count
    try image.write(to: URL(fileURLWithPath: dir + "/primary.img"))
    let r = try RRTCommand.shell(
      "overwrite-map create --like '\(dir)/primary.img' empty.map && overwrite-map invert empty.map > p.map", cwd: dir)
    XCTAssertEqual(r.status, 0, "the primary's full map: \(r.summary)")
  }

  /// Starts restore-read-through with `options`, its backups, the map and
  /// the socket, and waits until it answers.
  func start(backups: [String], options: [String]) throws {
    arguments = options + backups.flatMap { ["--backup", $0] } + ["--map", mapPath, "--socket", socket, path]
    starts += 1
    let c = try RRTChild(
      name: "restore-read-through", executable: Tools.path("restore-read-through"), arguments: arguments,
      stdout: dir + "/rrt-\(starts).out", stderr: logPath)
    server = c
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      if !c.isRunning { throw RRTError("restore-read-through ended before serving: \(c.errors)") }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("restore-read-through did not answer within 15 s: \(c.errors)")
  }

  /// The progress lines of the latest start.
  var progressLines: [String] { log.split(separator: "\n").map(String.init).filter { $0.contains("progress: ") } }

  /// Waits for a progress line, after the first `after` of them, saying the
  /// far copy lacks nothing (`lacks 0 (`).
  func waitUntilDrained(after: Int, seconds: Double = 30) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while true {
      if progressLines.dropFirst(after).contains(where: { $0.contains("lacks 0 (") }) { return true }
      if RRTEnv.monotonic() >= end { return false }
      RRTEnv.sleep(0.1)
    }
  }

  /// SIGTERM: exits 0 saying it stopped cleanly.
  func stop(file: StaticString = #filePath, line: UInt = #line) {
    guard let server else { return }
    let status = server.stop(grace: 30)
    self.server = nil
    XCTAssertEqual(status, 0, "restore-read-through did not stop cleanly; log:\n\(log)", file: file, line: line)
    XCTAssertTrue(log.contains("stopped cleanly"), "log:\n\(log)", file: file, line: line)
    assertNoCrash(file: file, line: line)
  }

  func stopAll() {
    for c in others.reversed() { c.stop(grace: 5) }
    others = []
    server?.stop(grace: 10)
    server = nil
  }

  func data() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }
}
