// CRC-32C as every record of a block stream carries it: the check value of
// the standard, and a plain bitwise CRC for lengths and alignments that
// reach each path of the hardware version (bytes before an 8-byte
// boundary, three runs of 8 KiB and of 256 bytes joined by shifting, the
// words and bytes after them) and for a CRC continued across calls.

import CShim
import TestSupport
import XCTest

final class CRC32CTests: XCTestCase {
  private func bitwise(_ bytes: ArraySlice<UInt8>) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes {
      crc ^= UInt32(b)
      for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
  }

  private func crc(_ bytes: ArraySlice<UInt8>, from start: UInt32 = 0) -> UInt32 {
    bytes.withUnsafeBytes { dr_crc32c(start, $0.baseAddress, $0.count) }
  }

  func testTheCheckValue() {
    XCTAssertEqual(crc(ArraySlice("123456789".utf8)), 0xE306_9283)
    XCTAssertEqual(crc([]), 0)
  }

  func testEveryPathAgreesWithTheBitwiseCRC() {
    var g = SplitMix64(seed: testSeed())
    let data = g.bytes(80_000)
    let lengths = [
      1, 7, 8, 9, 255, 767, 768, 769, 3 * 256 + 13, 24_575, 24_576, 24_583, 3 * 8192 + 3 * 256 + 5, 70_001,
    ]
    for offset in 0..<9 {
      for length in lengths where offset + length <= data.count {
        let slice = data[offset..<offset + length]
        XCTAssertEqual(crc(slice), bitwise(slice), "\(length) bytes at \(offset)")
      }
    }
    // Continued across calls, split anywhere.
    let whole = data[3..<60_003]
    for split in [1, 100, 8191, 24_577, 59_999] {
      let first = crc(whole.prefix(split))
      XCTAssertEqual(crc(whole.dropFirst(split), from: first), bitwise(whole), "split at \(split)")
    }
  }
}
