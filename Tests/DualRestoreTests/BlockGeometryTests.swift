// BlockGeometry: block size validation, block counts with a partial last
// block, byte ranges, and the exact block ranges of byte ranges.

import TestSupport
import XCTest

@testable import DualRestore

final class BlockGeometryTests: XCTestCase {
  /// Every power of two from 512 B to 64 MiB.
  static let validSizes: [UInt32] = (9...26).map { UInt32(1) << UInt32($0) }

  func testValidBlockSizes() throws {
    for size in Self.validSizes {
      XCTAssertNoThrow(try BlockGeometry.validate(blockSize: UInt64(size)), "\(size)")
      let g = try BlockGeometry(blockSize: size, deviceSize: 12345)
      XCTAssertEqual(g.blockSize, size)
      XCTAssertEqual(g.deviceSize, 12345)
      XCTAssertEqual(UInt64(1) << g.blockShift, UInt64(size))
    }
    XCTAssertEqual(BlockGeometry.minimumBlockSize, 512)
    XCTAssertEqual(BlockGeometry.maximumBlockSize, 64 * 1024 * 1024)
    XCTAssertNoThrow(try BlockGeometry.validate(blockSize: UInt64(BlockGeometry.defaultBlockSize)))
  }

  func testInvalidBlockSizes() {
    let invalid: [UInt64] = [
      0, 1, 2, 256, 511, 513, 1000, 3000, 4095, 4097, 65535, (64 << 20) - 512, (64 << 20) + 512, 128 << 20,
      UInt64(UInt32.max), 1 << 32, (1 << 32) + 512, 1 << 40, UInt64.max,
    ]
    for size in invalid {
      assertThrows(try BlockGeometry.validate(blockSize: size), containing: ["\(size)"], "block size \(size)")
      if let small = UInt32(exactly: size) {
        assertThrows(
          try BlockGeometry(blockSize: small, deviceSize: 1 << 20), containing: ["block size \(size)"],
          "block size \(size)")
      }
    }
  }

  func testBlockCountWithPartialLastBlock() throws {
    let seed = testSeed(11)
    var g = SplitMix64(seed: seed)
    for size in Self.validSizes {
      let bs = UInt64(size)
      let max = BlockGeometry.maximumDeviceSize
      var devices: [UInt64] = [0, 1, bs - 1, bs, bs + 1, 2 * bs - 1, 2 * bs, 1000 * bs + 7, max, max - 1, max - bs + 1]
      for _ in 0..<20 { devices.append(g.next() >> (2 + g.next() % 62)) }
      for d in devices {
        let geometry = try BlockGeometry(blockSize: size, deviceSize: d)
        // ceil(d / bs) without overflow.
        let expected = d / bs + (d % bs == 0 ? 0 : 1)
        XCTAssertEqual(geometry.blockCount, expected, "seed \(seed), block size \(size), device \(d)")
      }
    }
  }

  func testDeviceSizeLimit() throws {
    let max = BlockGeometry.maximumDeviceSize
    XCTAssertEqual(max, 1 << 62)
    for size in BlockGeometryTests.validSizes {
      let g = try BlockGeometry(blockSize: size, deviceSize: max)
      XCTAssertEqual(g.blockCount, max / UInt64(size))
      // The last block's range is computed without overflow.
      let last = g.blockCount - 1
      XCTAssertEqual(UInt64(g.length(ofBlock: last)), UInt64(size))
      XCTAssertEqual(g.byteRange(blocks: last, count: 1).offset, max - UInt64(size))
      XCTAssertEqual(g.byteRange(blocks: last, count: 1).length, UInt64(size))
      XCTAssertEqual(try g.blocks(offset: max - UInt64(size), length: UInt64(size)), last..<g.blockCount)
    }
    for size: UInt64 in [max + 1, max + 512, UInt64.max] {
      assertThrows(try BlockGeometry(blockSize: 4096, deviceSize: size), containing: ["\(size)"])
    }
  }

  func testLengthAndOffsetOfBlocks() throws {
    let seed = testSeed(12)
    var g = SplitMix64(seed: seed)
    for _ in 0..<200 {
      let size = Self.validSizes[Int(g.next() % UInt64(Self.validSizes.count))]
      let bs = UInt64(size)
      let blocks = g.next() % 50
      let tail = g.next() % 3 == 0 ? 0 : g.next() % bs
      let device = blocks * bs + tail
      let geometry = try BlockGeometry(blockSize: size, deviceSize: device)
      let ctx = "seed \(seed), block size \(size), device \(device)"
      var total: UInt64 = 0
      for block in 0..<geometry.blockCount {
        XCTAssertEqual(geometry.offset(ofBlock: block), block * bs, ctx)
        let length = UInt64(geometry.length(ofBlock: block))
        if block < blocks {
          XCTAssertEqual(length, bs, "\(ctx), block \(block)")
        } else {
          XCTAssertEqual(length, tail, "\(ctx): partial last block")
        }
        XCTAssertGreaterThan(length, 0, ctx)
        total += length
      }
      XCTAssertEqual(total, device, "\(ctx): block lengths add up to the device size")
    }
  }

  func testByteRangeIsClippedToTheDevice() throws {
    let seed = testSeed(13)
    var g = SplitMix64(seed: seed)
    for _ in 0..<300 {
      let size = Self.validSizes[Int(g.next() % 10)]
      let bs = UInt64(size)
      let device = (g.next() % 40) * bs + (g.next() % 2 == 0 ? 0 : g.next() % bs)
      let geometry = try BlockGeometry(blockSize: size, deviceSize: device)
      let n = geometry.blockCount
      guard n > 0 else { continue }
      let first = g.next() % n
      let count = g.next() % (n - first + 1)
      let (offset, length) = geometry.byteRange(blocks: first, count: count)
      // The sum of the blocks' own lengths.
      var expected: UInt64 = 0
      for b in first..<(first + count) { expected += min(bs, device - b * bs) }
      let ctx = "seed \(seed), bs \(size), device \(device), blocks \(first)+\(count)"
      XCTAssertEqual(offset, first * bs, ctx)
      XCTAssertEqual(length, expected, ctx)
      XCTAssertLessThanOrEqual(offset + length, device, ctx)
    }
    // Whole device.
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 10 * 4096 + 100)
    XCTAssertEqual(geometry.byteRange(blocks: 0, count: geometry.blockCount).length, 10 * 4096 + 100)
    XCTAssertEqual(geometry.byteRange(blocks: 10, count: 1).length, 100)
    XCTAssertEqual(geometry.byteRange(blocks: 3, count: 0).length, 0)
  }

  func testBlocksOfAlignedRanges() throws {
    let seed = testSeed(14)
    var g = SplitMix64(seed: seed)
    for _ in 0..<300 {
      let size = Self.validSizes[Int(g.next() % 10)]
      let bs = UInt64(size)
      let full = g.next() % 40
      let device = full * bs + (g.next() % 2 == 0 ? 0 : g.next() % bs + 1)
      let geometry = try BlockGeometry(blockSize: size, deviceSize: device)
      let first = g.next() % (full + 1)
      let count = g.next() % (full - first + 1)
      let ctx = "seed \(seed), bs \(size), device \(device), blocks \(first)+\(count)"
      XCTAssertEqual(try geometry.blocks(offset: first * bs, length: count * bs), first..<(first + count), ctx)
      // Up to the device end, aligned or not: the partial last block is included.
      XCTAssertEqual(
        try geometry.blocks(offset: first * bs, length: device - first * bs), first..<geometry.blockCount, ctx)
    }
  }

  func testDeviceEndIsAValidUnalignedEnd() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 3 * 4096 + 512)
    XCTAssertEqual(geometry.blockCount, 4)
    XCTAssertEqual(try geometry.blocks(offset: 0, length: 3 * 4096 + 512), 0..<4)
    XCTAssertEqual(try geometry.blocks(offset: 3 * 4096, length: 512), 3..<4)
    XCTAssertEqual(try geometry.blocks(offset: 2 * 4096, length: 4096 + 512), 2..<4)
    XCTAssertEqual(try geometry.blocks(offset: 4096, length: 0), 1..<1)
    // An end short of the device end, inside the last block, is not aligned.
    assertThrows(
      try geometry.blocks(offset: 3 * 4096, length: 511), containing: ["\(3 * 4096 + 511)", "4096"])
    // A 1-byte device is one partial block.
    let tiny = try BlockGeometry(blockSize: 512, deviceSize: 1)
    XCTAssertEqual(tiny.blockCount, 1)
    XCTAssertEqual(try tiny.blocks(offset: 0, length: 1), 0..<1)
  }

  /// The doc comment says the device end counts as a block boundary, so an
  /// empty range starting at an unaligned device end starts on a boundary.
  func testEmptyRangeAtUnalignedDeviceEnd() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 3 * 4096 + 512)
    do {
      let blocks = try geometry.blocks(offset: 3 * 4096 + 512, length: 0)
      XCTAssertEqual(blocks, 4..<4)
    } catch {
      XCTFail("an empty range at the device end is refused: \(error)")
    }
  }

  func testMisalignedRangesNameTheOffsetAndBlockSize() throws {
    let seed = testSeed(15)
    var g = SplitMix64(seed: seed)
    for _ in 0..<200 {
      let size = Self.validSizes[Int(g.next() % 12)]
      let bs = UInt64(size)
      let device = (g.next() % 100 + 2) * bs
      let geometry = try BlockGeometry(blockSize: size, deviceSize: device)
      let ctx = "seed \(seed), bs \(size), device \(device)"
      // A misaligned start.
      let offset = (g.next() % (device / bs - 1)) * bs + g.next() % (bs - 1) + 1
      assertThrows(
        try geometry.blocks(offset: offset, length: 0), containing: ["offset \(offset)", "\(size)"], ctx)
      let length = g.next() % (device - offset)
      assertThrows(
        try geometry.blocks(offset: offset, length: length), containing: ["offset \(offset)", "\(size)"], ctx)
      // An aligned start with a misaligned end short of the device end.
      let start = (g.next() % (device / bs - 1)) * bs
      let badLength = (g.next() % ((device - start) / bs)) * bs + g.next() % (bs - 1) + 1
      assertThrows(
        try geometry.blocks(offset: start, length: badLength), containing: ["\(start + badLength)", "\(size)"],
        "\(ctx), start \(start) length \(badLength)")
    }
  }

  func testRangesPastTheEnd() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 10 * 4096)
    assertThrows(
      try geometry.blocks(offset: 0, length: 10 * 4096 + 4096), containing: ["past the device end", "\(10 * 4096)"])
    assertThrows(try geometry.blocks(offset: 0, length: 10 * 4096 + 1), containing: ["past the device end"])
    assertThrows(try geometry.blocks(offset: 11 * 4096, length: 0), containing: ["past the device end"])
    assertThrows(try geometry.blocks(offset: 10 * 4096, length: 4096), containing: ["past the device end"])
    // offset + length overflows 64 bits.
    assertThrows(try geometry.blocks(offset: 4096, length: UInt64.max), containing: ["past the device end"])
    assertThrows(try geometry.blocks(offset: UInt64.max - 4095, length: 8192))
    // The empty range at the (aligned) device end is fine.
    XCTAssertEqual(try geometry.blocks(offset: 10 * 4096, length: 0), 10..<10)
  }

  func testCheckMatchesNamesBothSides() throws {
    let a = try BlockGeometry(blockSize: 4096, deviceSize: 1 << 20)
    let b = try BlockGeometry(blockSize: 8192, deviceSize: 1 << 20)
    let c = try BlockGeometry(blockSize: 4096, deviceSize: (1 << 20) + 1)
    XCTAssertNoThrow(try a.check(matches: a, "map A", "map B"))
    assertThrows(try a.check(matches: b, "map A", "map B"), containing: ["map A", "map B", "4096", "8192"])
    assertThrows(
      try a.check(matches: c, "map A", "map B"), containing: ["map A", "map B", "\(1 << 20)", "\((1 << 20) + 1)"])
  }

  func testDescriptionMentionsBlocksAndSize() throws {
    let g = try BlockGeometry(blockSize: 65536, deviceSize: 10 * 65536 + 1)
    XCTAssertTrue(g.description.contains("11 blocks"), g.description)
    XCTAssertTrue(g.description.contains("\(10 * 65536 + 1) bytes"), g.description)
  }

  func testHashableByBothFields() throws {
    let a = try BlockGeometry(blockSize: 4096, deviceSize: 100)
    XCTAssertEqual(a, try BlockGeometry(blockSize: 4096, deviceSize: 100))
    XCTAssertNotEqual(a, try BlockGeometry(blockSize: 512, deviceSize: 100))
    XCTAssertNotEqual(a, try BlockGeometry(blockSize: 4096, deviceSize: 101))
    XCTAssertEqual(Set([a, try BlockGeometry(blockSize: 4096, deviceSize: 100)]).count, 1)
  }
}
