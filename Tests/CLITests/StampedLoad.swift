// Tests/Scripts/stamped.py from the CLI tests: the stamped-write client
// (write), the far-copy consistency checker (check) and the builder of good
// and bad images (apply), run by Debian's /usr/bin/python3 (the one with
// libnbd's nbd module) within a time limit; and the writer's log read back.
// One StampedLoad is one history: a seed and a geometry that every writer
// run and every check of it share. Successive writer runs continue it with
// `start:` set to the last flushed count (see the script's opening notes).

import Foundation
import TestSupport
import XCTest

struct StampedLoad {
  /// The script: this file is Tests/CLITests/StampedLoad.swift.
  static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Scripts/stamped.py").path
  static let python = "/usr/bin/python3"

  var seed: UInt64
  /// Bytes a write, a multiple of 512 (may be smaller than a block).
  var writeSize: Int
  /// The slots the device is cut into; they must fit its size.
  var slots: Int
  /// Writes an interval: a FLUSH closes each.
  var flushEvery: Int

  var geometry: [String] {
    ["--seed", "\(seed)", "--write-size", "\(writeSize)", "--slots", "\(slots)", "--flush-every", "\(flushEvery)"]
  }

  /// Skips the test unless /usr/bin/python3 imports libnbd's nbd module.
  static func require() throws {
    let r = try RRTCommand.run(python, ["-c", "import nbd"], timeout: 30)
    if r.status != 0 { throw XCTSkip("/usr/bin/python3 lacks libnbd's nbd module (python3-libnbd): \(r.stderr)") }
  }

  // MARK: write

  func writeArguments(uri: String, log: String, queueDepth: Int, count: Int?, start: Int) -> [String] {
    [Self.script, "write", "--uri", uri, "--log", log, "--queue-depth", "\(queueDepth)", "--start", "\(start)"]
      + geometry + (count.map { ["--count", "\($0)"] } ?? [])
  }

  /// Runs the writer to its end: `count` writes from `start`, then a flush.
  func write(
    uri: String, log: String, queueDepth: Int = 4, count: Int, start: Int = 0, timeout: Double = 120
  ) throws -> RRTCommand.Result {
    try RRTCommand.run(
      Self.python, writeArguments(uri: uri, log: log, queueDepth: queueDepth, count: count, start: start),
      timeout: timeout)
  }

  /// Starts the writer in the background, with no count: it writes until
  /// stopped or until the server fails. Its output goes to `output`.out/.err.
  func startWriter(
    uri: String, log: String, output: String, queueDepth: Int = 4, count: Int? = nil, start: Int = 0
  ) throws -> RRTChild {
    try RRTChild(
      name: "stamped writer", executable: Self.python,
      arguments: writeArguments(uri: uri, log: log, queueDepth: queueDepth, count: count, start: start),
      stdout: output + ".out", stderr: output + ".err")
  }

  // MARK: check

  enum Mode {
    /// A consistency point: every interval below the highest one present is whole.
    case consistent
    /// Every write below this index (acknowledged by a FLUSH) is there, or a later one.
    case acked(Int)
  }

  struct Check {
    var result: RRTCommand.Result
    var status: Int32 { result.status }
    /// One line per violation: "slot S: found …, expected …".
    var violations: [String] { result.lines.filter { $0.hasPrefix("slot ") } }
    /// The last line: mode, slots, stamped, highest interval, violations.
    var summary: String { result.lines.last ?? "" }
    /// The slots holding a stamp, from the summary.
    var stamped: Int? {
      let words = summary.split(whereSeparator: { $0 == " " || $0 == "," })
      guard let i = words.firstIndex(of: "stamped"), i > 0 else { return nil }
      return Int(words[i - 1])
    }
    /// The violation of one slot, if any.
    func violation(slot: Int) -> String? { violations.first { $0.hasPrefix("slot \(slot): ") } }
  }

  /// Checks a whole image against its baseline. The caller freezes it.
  func check(image: String, baseline: String, mode: Mode, maxIndex: Int? = nil) throws -> Check {
    var args = [Self.script, "check", "--image", image, "--baseline", baseline] + geometry
    switch mode {
    case .consistent: args += ["--mode", "consistent"]
    case .acked(let n): args += ["--mode", "acked", "--acked", "\(n)"]
    }
    if let maxIndex { args += ["--max-index", "\(maxIndex)"] }
    return Check(result: try RRTCommand.run(Self.python, args, timeout: 60))
  }

  // MARK: apply

  /// One write `apply` made.
  struct Applied: Equatable {
    var index: Int
    var interval: Int
    var slot: Int
  }

  /// Writes [0, upto) but `skip`, then `extra`, in order, into an image file.
  func apply(image: String, upto: Int, skip: [Int] = [], extra: [Int] = []) throws -> (
    result: RRTCommand.Result, applied: [Applied]
  ) {
    var args = [Self.script, "apply", "--image", image, "--upto", "\(upto)"] + geometry
    if !skip.isEmpty { args += ["--skip", skip.map(String.init).joined(separator: ",")] }
    if !extra.isEmpty { args += ["--extra", extra.map(String.init).joined(separator: ",")] }
    let r = try RRTCommand.run(Self.python, args, timeout: 60)
    let applied = r.lines.compactMap { line -> Applied? in
      let f = line.split(separator: " ").compactMap { Int($0) }
      return f.count == 3 ? Applied(index: f[0], interval: f[1], slot: f[2]) : nil
    }
    return (r, applied)
  }

  // MARK: The writer's log

  /// The writer's log: a `flushed <n>` line after each acknowledged FLUSH,
  /// and `stopped <issued> <reason>` when an NBD error ended it.
  struct Log {
    /// Every flushed count, in order.
    var flushed: [Int] = []
    /// Writes 0 ..< issued were issued; why it stopped.
    var stopped: (issued: Int, reason: String)?
    /// Lines that are neither.
    var other: [String] = []

    /// Writes 0 ..< lastFlushed are acknowledged (0 when none was).
    var lastFlushed: Int { flushed.last ?? 0 }

    init(path: String) {
      let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
      for line in text.split(separator: "\n") {
        let f = line.split(separator: " ", maxSplits: 2)
        if f.count == 2, f[0] == "flushed", let n = Int(f[1]) {
          flushed.append(n)
        } else if f.count >= 2, f[0] == "stopped", let n = Int(f[1]) {
          stopped = (n, f.count == 3 ? String(f[2]) : "")
        } else {
          other.append(String(line))
        }
      }
    }
  }
}
