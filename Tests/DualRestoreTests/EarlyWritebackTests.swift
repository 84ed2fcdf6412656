// EarlyWriteback starts write-out of what was written without waiting for an
// fdatasync: the pages of a file it was told of stop being dirty within
// seconds, while those of the same writes to a file it was not told of stay
// dirty (the kernel's own write-out waits 30 s or for far more dirty memory).
// Pages are counted with cachestat(2).

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import CShim
@testable import DualRestore

final class EarlyWritebackTests: XCTestCase {
  private func unwritten(_ device: Device) throws -> Int {
    let n = dr_unwritten_pages(device.fd)
    if n < 0 { throw XCTSkip("cachestat(2) is not available here: \(Errno.current)") }
    return n
  }

  func testWritesAreWrittenOutWithoutAFlush() throws {
    let dir = try makeTempDirectory()
    let size = 64 << 20
    let told = try Device(path: "\(dir)/told.img", options: DeviceOpenOptions(writable: true, createSize: UInt64(size)))
    let untold = try Device(
      path: "\(dir)/untold.img", options: DeviceOpenOptions(writable: true, createSize: UInt64(size)))
    _ = try unwritten(told)
    let writeback = EarlyWriteback(told)
    defer { writeback.stop() }
    var g = SplitMix64(seed: testSeed())
    let piece = g.bytes(1 << 20)
    for i in 0..<(size >> 20) {
      try piece.withUnsafeBytes {
        try told.write($0, at: UInt64(i) << 20)
        try untold.write($0, at: UInt64(i) << 20)
      }
      writeback.written(UInt64(i) << 20, 1 << 20)
    }
    let pages = size / 4096
    let deadline = Date() + 10
    while try unwritten(told) > pages / 8 && Date() < deadline { usleep(50_000) }
    let left = try unwritten(told)
    let control = try unwritten(untold)
    XCTAssertLessThanOrEqual(left, pages / 8, "\(left) of \(pages) pages still not written out")
    XCTAssertGreaterThan(control, left, "the file nobody was told of was written out as fast")
    try told.sync()
    try untold.sync()
  }
}
