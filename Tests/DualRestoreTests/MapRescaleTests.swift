// A map at another block size: every fine block of a set coarse block set,
// a coarse block set when any fine block in it is; the identity kept but
// for a new map id; a map of current blocks never coarsened.

import TestSupport
import XCTest

@testable import DualRestore

final class MapRescaleTests: XCTestCase {
  private func randomMap(_ g: inout SplitMix64, blockSize: UInt32, deviceSize: UInt64, meaning: MapMeaning)
    throws -> BlockMap
  {
    var map = BlockMap(
      geometry: try BlockGeometry(blockSize: blockSize, deviceSize: deviceSize), meaning: meaning,
      deviceName: "/dev/sdx", trackingStarted: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_000),
      lastMergedStream: ID128(high: 1, low: 2))
    let count = map.geometry.blockCount
    var block: UInt64 = 0
    while block < count {
      let run = 1 + g.next() % (g.next() % 2 == 0 ? 3 : 40)
      if g.next() % 3 == 0 { map.bits.set(block..<min(count, block + run)) }
      block += run
    }
    if g.next() % 2 == 0, count > 0 { map.bits[count - 1] = true }
    return map
  }

  func testFinerAndCoarserBlocksBlockByBlock() throws {
    let seed = testSeed(71)
    var g = SplitMix64(seed: seed)
    for round in 0..<40 {
      // A device with a partial last block at every size involved, or none.
      let deviceSize = round % 4 == 0 ? UInt64(1 + g.next() % 64) << 16 : 1 + g.next() % (8 << 20)
      let coarseSize: UInt32 = 64 << 10
      let fineSize: UInt32 = [512, 4096, 32 << 10][round % 3]
      let ratio = UInt64(coarseSize / fineSize)
      let what = "seed \(seed), round \(round), \(deviceSize) bytes, fine \(fineSize)"

      let coarse = try randomMap(&g, blockSize: coarseSize, deviceSize: deviceSize, meaning: .differs)
      let fine = try coarse.rescaled(to: fineSize, name: "coarse")
      XCTAssertEqual(fine.geometry, try BlockGeometry(blockSize: fineSize, deviceSize: deviceSize), what)
      for block in 0..<fine.geometry.blockCount {
        XCTAssertEqual(fine.bits[block], coarse.bits[block / ratio], "\(what), fine block \(block)")
      }
      XCTAssertEqual(fine.meaning, .differs)
      XCTAssertEqual(fine.deviceName, coarse.deviceName)
      XCTAssertEqual(fine.trackingStarted, coarse.trackingStarted)
      XCTAssertEqual(fine.lastMergedStream, coarse.lastMergedStream)
      XCTAssertNotEqual(fine.mapID, coarse.mapID, "a new map")
      XCTAssertEqual(try fine.rescaled(to: coarseSize, name: "fine").bits, coarse.bits, "there and back, \(what)")

      let other = try randomMap(&g, blockSize: fineSize, deviceSize: deviceSize, meaning: .changed)
      let up = try other.rescaled(to: coarseSize, name: "fine")
      XCTAssertEqual(up.geometry.blockCount, coarse.geometry.blockCount, what)
      for block in 0..<up.geometry.blockCount {
        let fineBlocks = (block * ratio)..<min((block + 1) * ratio, other.geometry.blockCount)
        XCTAssertEqual(up.bits[block], other.bits.anySet(fineBlocks), "\(what), coarse block \(block)")
      }
      // Made fine again it covers every block it came from.
      let back = try up.rescaled(to: fineSize, name: "up")
      XCTAssertEqual(back.bits.intersection(other.bits), other.bits, what)
      XCTAssertEqual(try other.rescaled(to: fineSize, name: "same").bits, other.bits)
    }
  }

  func testCurrentBlocksAreNeverCoarsened() throws {
    var map = BlockMap(geometry: try BlockGeometry(blockSize: 4096, deviceSize: 1 << 20))
    map.bits.set(3..<4)
    assertThrows(
      try map.rescaled(to: 8192, name: "sdb.map"),
      containing: ["sdb.map", "current", "would hold back the fine blocks", "4096 bytes or less"])
    let fine = try map.rescaled(to: 512, name: "sdb.map")
    XCTAssertEqual(fine.meaning, .current)
    XCTAssertEqual(Array(fine.bits.extents), [24..<32])
    XCTAssertEqual(try map.rescaled(to: 4096, name: "sdb.map").bits, map.bits)
  }

  func testAMapTooFineToHoldIsRefused() throws {
    // 4 PiB in 64 MiB blocks is 2^26 blocks; in 512-byte ones, 2^43.
    let map = BlockMap(
      geometry: try BlockGeometry(blockSize: 64 << 20, deviceSize: 1 << 52), meaning: .differs)
    assertThrows(try map.rescaled(to: 512, name: "big.map"), containing: ["big.map", "more than the 2^34"])
    assertThrows(try map.rescaled(to: 1000, name: "big.map"), containing: ["1000", "power of two"])
  }
}
