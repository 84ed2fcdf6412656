// The full-write loops of Support/Syscalls.swift: a list of buffers goes
// out whole through short writes, empty buffers anywhere in it are skipped
// rather than written (a write of nothing would read as a stuck peer), and
// a peer that takes nothing is an error, not a spin.

import Glibc
import XCTest

@testable import DualRestore

final class WriteLoopTests: XCTestCase {
  /// Writes `parts` as one list through `writingAllVectors`, at most
  /// `most` bytes per step, and returns what arrived and the count.
  private func send(_ parts: [[UInt8]], most: Int) -> (Result<Void, Errno>, [UInt8], UInt64) {
    var out: [UInt8] = []
    var written: UInt64 = 0
    let storage = parts.map { p -> UnsafeMutableRawPointer in
      let m = UnsafeMutableRawPointer.allocate(byteCount: max(p.count, 1), alignment: 8)
      p.withUnsafeBytes { m.copyMemory(from: $0.baseAddress!, byteCount: p.count) }
      return m
    }
    defer { storage.forEach { $0.deallocate() } }
    var vectors = zip(storage, parts).map { iovec(iov_base: $0.0, iov_len: $0.1.count) }
    let result = vectors.withUnsafeMutableBufferPointer { v in
      writingAllVectors(v, written: &written) { first, count in
        var taken = 0
        for i in 0..<count where taken < most {
          let n = min(first[i].iov_len, most - taken)
          XCTAssertGreaterThan(first[0].iov_len, 0, "a step starts at an empty vector")
          out += UnsafeRawBufferPointer(start: first[i].iov_base, count: n)
          taken += n
          if n < first[i].iov_len { break }
        }
        return .success(taken)
      }
    }
    return (result, out, written)
  }

  func testAListOfBuffersGoesOutWholeAndEmptyOnesAreSkipped() {
    let parts: [[UInt8]] = [[], [1, 2, 3], [], [], [4, 5, 6, 7, 8], []]
    for most in [1, 2, 3, 100] {
      let (result, out, written) = send(parts, most: most)
      XCTAssertNoThrow(try result.get(), "at most \(most) bytes a step")
      XCTAssertEqual(out, [1, 2, 3, 4, 5, 6, 7, 8], "at most \(most) bytes a step")
      XCTAssertEqual(written, 8)
    }
    let (result, out, written) = send([[], []], most: 10)
    XCTAssertNoThrow(try result.get(), "nothing to write is not an error")
    XCTAssertEqual(out, [])
    XCTAssertEqual(written, 0)
  }

  func testAPeerThatTakesNothingIsAnError() {
    var written: UInt64 = 0
    let byte = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)
    defer { byte.deallocate() }
    var vector = iovec(iov_base: byte, iov_len: 1)
    let result = withUnsafeMutablePointer(to: &vector) { v in
      writingAllVectors(UnsafeMutableBufferPointer(start: v, count: 1), written: &written) { _, _ in .success(0) }
    }
    XCTAssertEqual(result.failureErrno, Errno(EIO))
    XCTAssertEqual(writingAll(4) { _ in .success(0) }.failureErrno, Errno(EIO))
  }
}

extension Result where Failure == Errno {
  fileprivate var failureErrno: Errno? {
    if case .failure(let e) = self { return e }
    return nil
  }
}
