// Spawns the built executables the way a user or a script would, and
// collects exit status, standard output and standard error.

import Foundation
import XCTest

struct ToolResult {
  var status: Int32
  var stdout: Data
  var stderr: String
  var text: String { String(decoding: stdout, as: UTF8.self) }
  var lines: [String] { text.split(separator: "\n").map(String.init) }
}

enum Tools {
  /// The directory holding the built executables (beside the test bundle).
  static let binDirectory: URL = {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    // swift-corelibs-xctest runs `<bin>/<package>PackageTests.xctest`.
    while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("overwrite-map").path),
      dir.path != "/"
    {
      dir = dir.deletingLastPathComponent()
    }
    return dir
  }()

  static func path(_ tool: String) -> String { binDirectory.appendingPathComponent(tool).path }

  /// Runs `tool` with `arguments`, feeding `stdin` (or /dev/null).
  @discardableResult
  static func run(_ tool: String, _ arguments: [String], stdin: Data? = nil, cwd: URL? = nil) throws -> ToolResult {
    try runProcess(path(tool), arguments, stdin: stdin, cwd: cwd)
  }

  /// Runs a shell pipeline with the tools on PATH.
  @discardableResult
  static func shell(_ script: String, cwd: URL? = nil) throws -> ToolResult {
    try runProcess("/bin/bash", ["-c", "set -o pipefail; " + script], stdin: nil, cwd: cwd)
  }

  static func runProcess(_ executable: String, _ arguments: [String], stdin: Data?, cwd: URL?) throws -> ToolResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let cwd { process.currentDirectoryURL = cwd }
    var env = ProcessInfo.processInfo.environment
    env["PATH"] = binDirectory.path + ":" + (env["PATH"] ?? "/usr/bin:/bin")
    process.environment = env
    let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("dr-run-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: scratch) }
    let outURL = scratch.appendingPathComponent("out")
    let errURL = scratch.appendingPathComponent("err")
    let inURL = scratch.appendingPathComponent("in")
    _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
    _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
    _ = FileManager.default.createFile(atPath: inURL.path, contents: stdin ?? Data())
    let out = try FileHandle(forWritingTo: outURL)
    let err = try FileHandle(forWritingTo: errURL)
    let input = try FileHandle(forReadingFrom: inURL)
    process.standardOutput = out
    process.standardError = err
    process.standardInput = input
    try process.run()
    process.waitUntilExit()
    try out.close()
    try err.close()
    try input.close()
    return ToolResult(
      status: process.terminationStatus, stdout: try Data(contentsOf: outURL),
      stderr: String(decoding: try Data(contentsOf: errURL), as: UTF8.self))
  }

  /// Whether a program is on PATH.
  static func have(_ program: String) -> Bool {
    (try? shell("command -v \(program) >/dev/null"))?.status == 0
  }
}

/// A temporary directory for one test, removed at the end.
final class Scratch {
  let url: URL

  init() throws {
    url = FileManager.default.temporaryDirectory.appendingPathComponent("dr-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
  }

  deinit { try? FileManager.default.removeItem(at: url) }

  func path(_ name: String) -> String { url.appendingPathComponent(name).path }

  /// Writes `data` to a new file.
  @discardableResult
  func file(_ name: String, _ data: Data) throws -> String {
    let p = path(name)
    try data.write(to: URL(fileURLWithPath: p))
    return p
  }

  /// A file of `size` bytes of seeded pseudo-random data.
  @discardableResult
  func randomFile(_ name: String, size: Int, seed: UInt64) throws -> String {
    var rng = SeededRandom(seed: seed)
    var data = Data(count: size)
    data.withUnsafeMutableBytes { raw in
      let words = raw.bindMemory(to: UInt64.self)
      for i in words.indices { words[i] = rng.next() }
      for i in (words.count * 8)..<size { raw[i] = UInt8(truncatingIfNeeded: rng.next()) }
    }
    return try file(name, data)
  }

  /// Overwrites bytes of a file in place.
  func patch(_ name: String, at offset: Int, _ bytes: [UInt8]) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path(name)))
    try handle.seek(toOffset: UInt64(offset))
    try handle.write(contentsOf: Data(bytes))
    try handle.close()
  }

  func read(_ name: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path(name))) }
}

struct SeededRandom: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}

/// Asserts a failed run: the status, and one sentence on stderr containing `fragment`.
func assertFails(
  _ r: ToolResult, status: Int32, mentioning fragment: String, file: StaticString = #filePath, line: UInt = #line
) {
  XCTAssertEqual(r.status, status, "stderr: \(r.stderr)", file: file, line: line)
  XCTAssertTrue(
    r.stderr.contains(fragment), "stderr \(r.stderr.debugDescription) lacks \(fragment.debugDescription)", file: file,
    line: line)
  XCTAssertFalse(r.stderr.contains("Fatal error") || r.stderr.contains("crashed"), r.stderr, file: file, line: line)
}
