// The harness of ThreeUsesCLITests: images with zero regions, a running
// tracking-server and its control subcommands, and the client that reads
// and writes an NBD export all along (nbdsh, in the background) while the
// tools do their work. Children are RRTChild (TestSupport/Processes.swift):
// always stopped, commands with a time limit.

import Foundation
import Glibc
import TestSupport
import XCTest

/// A JSON object printed by a tool.
func tuJSON(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
  try XCTUnwrap(
    JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not a JSON object: \(text)", file: file,
    line: line)
}

/// The JSON object on the last line of `text` that parses as one (tools print
/// one JSON object per line; other lines may surround it).
func tuLastJSON(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
  for l in text.split(separator: "\n").reversed() where l.hasPrefix("{") {
    if let o = try? JSONSerialization.jsonObject(with: Data(l.utf8)) as? [String: Any] { return o }
  }
  XCTFail("no JSON object in: \(text)", file: file, line: line)
  throw RRTError("no JSON object")
}

enum TUImage {
  /// A file of `size` bytes: seeded random data, with `holes` left as holes
  /// and `zeros` written as zero bytes. Returns its content.
  @discardableResult
  static func make(_ path: String, size: Int, seed: UInt64, holes: [Range<Int>] = [], zeros: [Range<Int>] = [])
    throws -> Data
  {
    var data = RRTBytes.random(size, seed: seed)
    for r in holes + zeros { data.replaceSubrange(r, with: Data(count: r.count)) }
    unlink(path)
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw RRTError("cannot create \(path): errno \(errno)") }
    defer { close(fd) }
    guard ftruncate(fd, off_t(size)) == 0 else { throw RRTError("cannot size \(path): errno \(errno)") }
    // Write everything but the holes.
    var pieces: [Range<Int>] = []
    var at = 0
    for h in holes.sorted(by: { $0.lowerBound < $1.lowerBound }) {
      if h.lowerBound > at { pieces.append(at..<h.lowerBound) }
      at = max(at, h.upperBound)
    }
    if at < size { pieces.append(at..<size) }
    try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
      for p in pieces {
        var done = 0
        while done < p.count {
          let n = pwrite(fd, raw.baseAddress! + p.lowerBound + done, p.count - done, off_t(p.lowerBound + done))
          guard n > 0 else { throw RRTError("cannot write \(path): errno \(errno)") }
          done += n
        }
      }
    }
    return data
  }

  /// An empty (all-hole) file of `size` bytes.
  static func sparse(_ path: String, size: Int) throws {
    unlink(path)
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.truncate(atOffset: UInt64(size))
    try h.close()
  }

  static func read(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }
}

/// `overwrite-map` figures of a map, through `stats --json`.
func tuMapStats(_ map: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
  let r = try RRTCommand.run("overwrite-map", ["stats", "--json", map])
  XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
  return try tuJSON(r.stdout, file: file, line: line)
}

/// The `START LENGTH` lines of `overwrite-map extents`.
func tuExtents(_ map: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String] {
  let r = try RRTCommand.run("overwrite-map", ["extents", map])
  XCTAssertEqual(r.status, 0, r.summary, file: file, line: line)
  return r.lines
}

/// A running `tracking-server serve`, and its control subcommands.
final class TUTrackingServer {
  let child: RRTChild
  let socket: String
  let device: String
  let changes: String
  var deviceURI: String { "nbd+unix:///?socket=\(socket)" }
  var viewURI: String { "nbd+unix:///view?socket=\(socket)" }

  init(device: String, changes: String, socket: String, log: String) throws {
    self.device = device
    self.changes = changes
    self.socket = socket
    unlink(socket)
    child = try RRTChild(
      name: "tracking-server", executable: Tools.path("tracking-server"),
      arguments: ["serve", "--changes", changes, "--socket", socket, device], stdout: log + ".out", stderr: log)
    let end = RRTEnv.monotonic() + 15
    while RRTEnv.monotonic() < end {
      if !child.isRunning {
        let status = child.wait(timeout: 1) ?? -1
        throw RRTError("tracking-server ended with status \(status) before serving: \(child.errors)")
      }
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", deviceURI], timeout: 5), r.status == 0 { return }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("tracking-server did not answer within 15 s: \(child.errors)")
  }

  /// `tracking-server SUB --socket S --json ARGS`; asserts exit 0.
  @discardableResult
  func control(_ sub: String, _ args: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws
    -> [String: Any]
  {
    let r = try RRTCommand.run("tracking-server", [sub, "--socket", socket, "--json"] + args, timeout: 30)
    XCTAssertEqual(
      r.status, 0, "tracking-server \(sub): \(r.summary)\nserver log:\n\(child.errors)", file: file, line: line)
    guard r.status == 0 else { throw RRTError("tracking-server \(sub) failed") }
    return try tuJSON(r.stdout, file: file, line: line)
  }

  /// Freezes the view; with `changesOut`, ends the generation there.
  @discardableResult
  func freeze(changesOut: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try control("freeze", changesOut.map { ["--changes-out", $0] } ?? [], file: file, line: line)
  }

  @discardableResult
  func drop(file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try control("drop", file: file, line: line)
  }

  /// SIGTERM: exit 0 and the log says it stopped cleanly.
  func stop(file: StaticString = #filePath, line: UInt = #line) {
    let status = child.stop(grace: 20)
    XCTAssertEqual(status, 0, "tracking-server did not stop cleanly:\n\(child.errors)", file: file, line: line)
    XCTAssertTrue(child.errors.contains("stopped cleanly"), child.errors, file: file, line: line)
  }
}

/// The client of an NBD export: one nbdsh (Python) process that reads and
/// writes from the moment it connects until told to stop. It keeps a model
/// of the device (the original content with its own writes applied) and
/// checks every read against it, so a read that returns stale or wrong data
/// at any moment shows as a MISMATCH line. Writes are random data or
/// WRITE_ZEROES, a few with FUA, a FLUSH every 16 requests; most land in the
/// first `hot` bytes, as a real workload's do. It prints `P n` after each
/// request. The files NAME.pause / NAME.stop in the directory pause it
/// (after a FLUSH; it creates NAME.paused) and stop it. At the end it makes
/// `lastWrites` writes across block boundaries, flushes, writes the model to
/// NAME.expected and prints `L offset length` per last write and a DONE line.
final class TUClient {
  let child: RRTChild
  let dir: String
  let name: String
  var expectedPath: String { "\(dir)/\(name).expected" }
  private var pausePath: String { "\(dir)/\(name).pause" }
  private var pausedPath: String { "\(dir)/\(name).paused" }
  private var stopPath: String { "\(dir)/\(name).stop" }

  init(uri: String, original: String, dir: String, name: String, seed: Int, hot: Int, lastWrites: Int = 0) throws {
    self.dir = dir
    self.name = name
    for p in ["\(dir)/\(name).pause", "\(dir)/\(name).paused", "\(dir)/\(name).stop"] { unlink(p) }
    let code = """
      import os, sys, time, random
      URI = \(rrtPython(uri))
      ORIG = \(rrtPython(original))
      PAUSE = \(rrtPython("\(dir)/\(name).pause"))
      PAUSED = \(rrtPython("\(dir)/\(name).paused"))
      STOP = \(rrtPython("\(dir)/\(name).stop"))
      EXPECTED = \(rrtPython("\(dir)/\(name).expected"))
      HOT = \(hot)
      LAST = \(lastWrites)
      rng = random.Random(\(seed))
      with open(ORIG, 'rb') as f:
          model = bytearray(f.read())
      h.connect_uri(URI)
      SIZE = h.get_size()
      assert SIZE == len(model), (SIZE, len(model))
      ops = writes = zeros = reads = mismatches = 0
      print('READY', flush=True)
      paused = False
      while not os.path.exists(STOP):
          if os.path.exists(PAUSE):
              if not paused:
                  h.flush()
                  paused = True
                  open(PAUSED, 'w').close()
              time.sleep(0.01)
              continue
          if paused:
              paused = False
              os.unlink(PAUSED)
          span = HOT if rng.random() < 0.95 else SIZE
          off = rng.randrange(min(span, SIZE))
          n = min(rng.choice([512, 4096, 65536, 100000, 131072]), SIZE - off)
          r = rng.random()
          if r < 0.42:
              data = os.urandom(n)
              h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
              model[off:off + n] = data
              writes += 1
          elif r < 0.48:
              h.zero(n, off)
              model[off:off + n] = bytes(n)
              zeros += 1
          else:
              got = h.pread(n, off)
              reads += 1
              if got != model[off:off + n]:
                  mismatches += 1
                  first = next(i for i in range(n) if got[i] != model[off + i])
                  print('MISMATCH %d %d first at %d' % (off, n, off + first), flush=True)
          ops += 1
          if ops % 16 == 0:
              h.flush()
          print('P %d' % ops, flush=True)
      last = []
      for k in range(LAST):
          off = (k * SIZE) // LAST + 65536 - 1000
          data = (b'last write %d of the client. ' % k * 200)[:3000]
          h.pwrite(data, off)
          model[off:off + len(data)] = data
          last.append((off, len(data)))
      h.flush()
      with open(EXPECTED + '.tmp', 'wb') as f:
          f.write(model)
      os.rename(EXPECTED + '.tmp', EXPECTED)
      for off, n in last:
          print('L %d %d' % (off, n))
      print('DONE ops=%d writes=%d zeros=%d reads=%d mismatches=%d' % (ops, writes, zeros, reads, mismatches), flush=True)
      h.shutdown()
      """
    child = try RRTChild(
      name: name, executable: "/usr/bin/nbdsh", arguments: ["-c", code], stdout: "\(dir)/\(name).out",
      stderr: "\(dir)/\(name).err", cwd: dir)
  }

  /// Requests completed so far (the last `P n` line).
  var ops: Int {
    for l in child.output.split(separator: "\n").reversed() where l.hasPrefix("P ") {
      return Int(l.dropFirst(2)) ?? 0
    }
    return 0
  }

  var mismatchLines: [String] {
    child.output.split(separator: "\n").map(String.init).filter { $0.hasPrefix("MISMATCH") }
  }

  /// Waits until the client has completed `count` requests.
  func waitForOps(_ count: Int, timeout: Double = 60, file: StaticString = #filePath, line: UInt = #line) {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end {
      if ops >= count { return }
      if !child.isRunning { break }
      RRTEnv.sleep(0.02)
    }
    XCTFail(
      "the client did not reach \(count) requests (at \(ops)): \(child.errors)\n\(child.output.suffix(2000))",
      file: file, line: line)
  }

  /// Pauses the client and waits until its FLUSH is acknowledged.
  func pause(file: StaticString = #filePath, line: UInt = #line) {
    _ = FileManager.default.createFile(atPath: pausePath, contents: nil)
    let end = RRTEnv.monotonic() + 30
    while RRTEnv.monotonic() < end {
      if FileManager.default.fileExists(atPath: pausedPath) { return }
      if !child.isRunning { break }
      RRTEnv.sleep(0.01)
    }
    XCTFail("the client did not pause: \(child.errors)", file: file, line: line)
  }

  /// Stops the client and waits for its DONE line; asserts exit 0 and no
  /// read that disagreed with what it wrote.
  func finish(file: StaticString = #filePath, line: UInt = #line) {
    _ = FileManager.default.createFile(atPath: stopPath, contents: nil)
    let status = child.wait(timeout: 60)
    XCTAssertEqual(status, 0, "the client: \(child.errors)\n\(child.output.suffix(2000))", file: file, line: line)
    XCTAssertTrue(child.output.contains("DONE"), child.output.suffix(2000).description, file: file, line: line)
    XCTAssertEqual(
      mismatchLines, [], "reads through the export disagreed with what the client wrote", file: file, line: line)
  }

  /// The client's last writes (`L offset length`).
  var lastWrites: [(Int, Int)] {
    child.output.split(separator: "\n").filter { $0.hasPrefix("L ") }.compactMap { l in
      let p = l.split(separator: " ").compactMap { Int($0) }
      return p.count == 2 ? (p[0], p[1]) : nil
    }
  }

  func stopNow() {
    _ = FileManager.default.createFile(atPath: stopPath, contents: nil)
    if child.wait(timeout: 20) == nil { child.stop(grace: 5) }
  }
}
