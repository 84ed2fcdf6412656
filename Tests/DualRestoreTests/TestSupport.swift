// Helpers shared by the DualRestore unit tests: the seed of a property test
// (the generator, SplitMix64, is in the TestSupport target), temporary
// directories, file construction (sparse and dense) and error assertions.

import Dispatch
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// The seed for a property test: `DR_TEST_SEED` when set (to replay a
/// failure), otherwise a fresh one. Every failure message names it.
func testSeed(_ salt: UInt64 = 0) -> UInt64 {
  if let text = ProcessInfo.processInfo.environment["DR_TEST_SEED"], let seed = UInt64(text) {
    return seed
  }
  var g = SystemRandomNumberGenerator()
  return g.next() ^ salt
}

extension XCTestCase {
  /// A fresh directory under the system temporary directory, removed when
  /// the test ends.
  func makeTempDirectory() throws -> String {
    let url = FileManager.default.temporaryDirectory
      .appendingPathComponent("dualrestore-tests-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    addTeardownBlock {
      try? FileManager.default.removeItem(at: url)
    }
    return url.path
  }
}

/// The error's sentence as tools print it.
func errorText(_ error: Error) -> String { "\(error)" }

/// Asserts that `body` throws and that the error's text contains every needle.
func assertThrows<T>(
  _ body: @autoclosure () throws -> T, containing needles: [String] = [], _ message: String = "",
  file: StaticString = #filePath, line: UInt = #line
) {
  do {
    _ = try body()
    XCTFail("expected an error. \(message)", file: file, line: line)
  } catch {
    let text = errorText(error)
    for needle in needles where !text.contains(needle) {
      XCTFail("error \"\(text)\" does not contain \"\(needle)\". \(message)", file: file, line: line)
    }
  }
}

// MARK: Files

enum TestFileError: Error, CustomStringConvertible {
  case failed(String, Int32)
  var description: String {
    switch self {
    case .failed(let what, let e): return "\(what): \(String(cString: strerror(e)))"
    }
  }
}

/// Creates (or truncates) `path` with `size` bytes, all holes.
func createSparseFile(_ path: String, size: UInt64) throws {
  let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
  guard fd >= 0 else { throw TestFileError.failed("open \(path)", errno) }
  defer { close(fd) }
  guard ftruncate(fd, off_t(size)) == 0 else { throw TestFileError.failed("ftruncate \(path)", errno) }
}

/// Writes `bytes` at `offset` of an existing file, then fsyncs it so that
/// SEEK_DATA/SEEK_HOLE see settled extents.
func writeBytes(_ path: String, _ bytes: [UInt8], at offset: UInt64) throws {
  let fd = open(path, O_RDWR)
  guard fd >= 0 else { throw TestFileError.failed("open \(path)", errno) }
  defer { close(fd) }
  var done = 0
  while done < bytes.count {
    let n = bytes.withUnsafeBytes { raw in
      pwrite(fd, raw.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
    }
    guard n > 0 else { throw TestFileError.failed("pwrite \(path)", errno) }
    done += n
  }
  guard fsync(fd) == 0 else { throw TestFileError.failed("fsync \(path)", errno) }
}

/// Writes a whole file densely (every byte written, zeros included).
func writeDenseFile(_ path: String, _ bytes: [UInt8]) throws {
  try createSparseFile(path, size: 0)
  try writeBytes(path, bytes, at: 0)
}

/// The whole content of a file.
func readFileBytes(_ path: String) throws -> [UInt8] {
  guard let data = FileManager.default.contents(atPath: path) else {
    throw TestFileError.failed("read \(path)", errno)
  }
  return [UInt8](data)
}

/// lseek whence values for holes (Linux; Glibc hides the names without _GNU_SOURCE).
let seekData: Int32 = 3
let seekHole: Int32 = 4

/// Byte ranges of a file that are holes, found with lseek(SEEK_HOLE/SEEK_DATA)
/// directly (an oracle independent of `Device.dataRegion`).
func holeRanges(_ path: String) throws -> [Range<UInt64>] {
  let fd = open(path, O_RDONLY)
  guard fd >= 0 else { throw TestFileError.failed("open \(path)", errno) }
  defer { close(fd) }
  var st = stat()
  guard fstat(fd, &st) == 0 else { throw TestFileError.failed("fstat \(path)", errno) }
  let size = off_t(st.st_size)
  var holes: [Range<UInt64>] = []
  var position: off_t = 0
  while position < size {
    let hole = lseek(fd, position, seekHole)
    if hole < 0 || hole >= size { break }
    let data = lseek(fd, hole, seekData)
    let end = data < 0 ? size : min(data, size)
    if end > hole { holes.append(UInt64(hole)..<UInt64(end)) }
    position = end
  }
  return holes
}

/// Whether `range` lies entirely inside one of `holes`.
func isInside(_ range: Range<UInt64>, _ holes: [Range<UInt64>]) -> Bool {
  holes.contains { $0.lowerBound <= range.lowerBound && range.upperBound <= $0.upperBound }
}

/// Runs `body` on another thread and reports whether it finished within
/// `seconds`. A hang fails the test instead of hanging the run.
func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
  let done = DispatchSemaphore(value: 0)
  Thread.detachNewThread {
    body()
    done.signal()
  }
  return done.wait(timeout: .now() + seconds) == .success
}
