// A scratch directory for one test, with seeded files, and the assertion of
// a failed run. Commands run through RRTCommand (TestSupport).

import Foundation
import TestSupport
import XCTest

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
    var rng = SplitMix64(seed: seed)
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

/// Asserts a failed run: the status, and one sentence on stderr containing `fragment`.
func assertFails(
  _ r: RRTCommand.Result, status: Int32, mentioning fragment: String, file: StaticString = #filePath, line: UInt = #line
) {
  XCTAssertEqual(r.status, status, "stderr: \(r.stderr)", file: file, line: line)
  XCTAssertTrue(
    r.stderr.contains(fragment), "stderr \(r.stderr.debugDescription) lacks \(fragment.debugDescription)", file: file,
    line: line)
  XCTAssertFalse(r.stderr.contains("Fatal error") || r.stderr.contains("crashed"), r.stderr, file: file, line: line)
}
