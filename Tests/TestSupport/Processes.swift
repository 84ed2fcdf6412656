// Running programs from the tests of both targets: the built tools found
// beside the test bundle; children (servers, clients, writers) with their
// output in files, always stopped; and commands run to their end within a
// time limit, so that a hung program fails its test instead of hanging the
// suite. Every child has the same environment: the built tools first on
// PATH, then the system's.

import Foundation
import Glibc

/// Where the built executables are.
public enum Tools {
  /// The directory holding the built executables (beside the test bundle).
  public static let binDirectory: URL = {
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

  /// The path of a built executable.
  public static func path(_ tool: String) -> String { binDirectory.appendingPathComponent(tool).path }
}

/// PATH for every child: the built tools first, then the system's (Debian's
/// /usr/bin/python3 before any other python3, for nbdsh).
public enum RRTEnv {
  public static let path =
    Tools.binDirectory.path + ":/usr/bin:/usr/sbin:/bin:/sbin:"
    + (ProcessInfo.processInfo.environment["PATH"] ?? "")

  public static var environment: [String: String] {
    var env = ProcessInfo.processInfo.environment
    env["PATH"] = path
    // Keep pyenv and friends out of nbdsh's python3.
    env["PYTHONPATH"] = nil
    env["PYENV_VERSION"] = nil
    return env
  }

  /// Whether a program is on the harness PATH.
  public static func have(_ program: String) -> Bool {
    (try? RRTCommand.run("/bin/sh", ["-c", "command -v \(program) >/dev/null"], timeout: 10))?.status == 0
  }

  public static func monotonic() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
  }

  public static func sleep(_ seconds: Double) { usleep(UInt32(max(0, seconds) * 1e6)) }
}

/// A child process with its standard output and error in files (one file
/// when both paths are the same), its standard input from a file or
/// /dev/null.
public final class RRTChild {
  public let name: String
  public let process = Process()
  public let stdoutPath: String
  public let stderrPath: String
  private var handles: [FileHandle] = []

  public init(
    name: String, executable: String, arguments: [String], stdout: String, stderr: String, cwd: String? = nil,
    appendStderr: Bool = false, stdin: String? = nil
  ) throws {
    self.name = name
    stdoutPath = stdout
    stderrPath = stderr
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.environment = RRTEnv.environment
    if let cwd { process.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    _ = FileManager.default.createFile(atPath: stdout, contents: nil)
    let out = try FileHandle(forWritingTo: URL(fileURLWithPath: stdout))
    handles = [out]
    let err: FileHandle
    if stderr == stdout {
      err = out
    } else {
      if !(appendStderr && FileManager.default.fileExists(atPath: stderr)) {
        _ = FileManager.default.createFile(atPath: stderr, contents: nil)
      }
      err = try FileHandle(forWritingTo: URL(fileURLWithPath: stderr))
      try err.seekToEnd()
      handles.append(err)
    }
    process.standardOutput = out
    process.standardError = err
    if let stdin {
      let input = try FileHandle(forReadingFrom: URL(fileURLWithPath: stdin))
      handles.append(input)
      process.standardInput = input
    } else {
      process.standardInput = FileHandle.nullDevice
    }
    try process.run()
  }

  deinit { _ = stop() }

  public var pid: Int32 { process.processIdentifier }
  public var isRunning: Bool { process.isRunning }
  /// Standard output and error so far, as text (invalid UTF-8 replaced).
  public var output: String { Self.text(stdoutPath) }
  public var errors: String { Self.text(stderrPath) }

  static func text(_ path: String) -> String {
    String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: path))) ?? Data(), as: UTF8.self)
  }

  /// Waits up to `timeout` seconds; the exit status, or nil if still running.
  @discardableResult
  public func wait(timeout: Double) -> Int32? {
    let end = RRTEnv.monotonic() + timeout
    while process.isRunning {
      if RRTEnv.monotonic() >= end { return nil }
      usleep(10_000)
    }
    process.waitUntilExit()
    for h in handles { try? h.close() }
    handles = []
    return process.terminationStatus
  }

  /// Whether the child ended on a signal.
  public var diedOfSignal: Bool { !process.isRunning && process.terminationReason == .uncaughtSignal }

  public func signal(_ sig: Int32) {
    if process.isRunning { kill(pid, sig) }
  }

  /// SIGTERM, a grace period, then SIGKILL. Returns the exit status (nil if
  /// it had to be killed).
  @discardableResult
  public func stop(grace: Double = 10) -> Int32? {
    guard process.isRunning else { return wait(timeout: 1) }
    signal(SIGTERM)
    if let status = wait(timeout: grace) { return status }
    signal(SIGKILL)
    _ = wait(timeout: 10)
    return nil
  }

  public func kill9() {
    signal(SIGKILL)
    _ = wait(timeout: 10)
  }

  /// Waits until `line` appears in standard output (or the child ends).
  public func waitForOutput(_ fragment: String, timeout: Double) -> Bool {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end {
      if output.contains(fragment) { return true }
      if !process.isRunning { return output.contains(fragment) }
      usleep(10_000)
    }
    return false
  }
}

/// One command run to its end, within a time limit: a built tool by name, or
/// any program by its absolute path.
public enum RRTCommand {
  public struct Result {
    public var status: Int32
    /// Standard output as text (invalid UTF-8 replaced).
    public var stdout: String
    /// Standard output byte for byte.
    public var data: Data
    public var stderr: String
    public var timedOut: Bool
    public var lines: [String] { stdout.split(separator: "\n").map(String.init) }
    public var summary: String {
      "status \(status)\(timedOut ? " (timed out)" : "")\nstdout: \(stdout)\nstderr: \(stderr)"
    }
  }

  /// Runs `executable` with `arguments`, feeding it `stdin` (or /dev/null);
  /// killed after `timeout` seconds.
  @discardableResult
  public static func run(
    _ executable: String, _ arguments: [String], stdin: Data? = nil, timeout: Double = 60, cwd: String? = nil
  ) throws -> Result {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("rrt-cmd-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let exe = executable.hasPrefix("/") ? executable : Tools.path(executable)
    var input: String?
    if let stdin {
      let path = dir.appendingPathComponent("in").path
      try stdin.write(to: URL(fileURLWithPath: path))
      input = path
    }
    let child = try RRTChild(
      name: executable, executable: exe, arguments: arguments, stdout: dir.appendingPathComponent("out").path,
      stderr: dir.appendingPathComponent("err").path, cwd: cwd, stdin: input)
    var status = child.wait(timeout: timeout)
    let timedOut = status == nil
    if timedOut {
      child.signal(SIGKILL)
      status = child.wait(timeout: 10)
    }
    let data = (try? Data(contentsOf: URL(fileURLWithPath: child.stdoutPath))) ?? Data()
    return Result(
      status: status ?? -1, stdout: String(decoding: data, as: UTF8.self), data: data, stderr: child.errors,
      timedOut: timedOut)
  }

  /// A bash script with the harness PATH.
  @discardableResult
  public static func shell(_ script: String, timeout: Double = 60, cwd: String? = nil) throws -> Result {
    try run("/bin/bash", ["-c", "set -o pipefail; " + script], timeout: timeout, cwd: cwd)
  }
}
