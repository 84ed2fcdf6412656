// The preservation store of a frozen view, on its own: it holds the old
// contents of every block written after the freeze, the view reads them
// back exactly, and the room it allocates ahead of its slots (a step at a
// time, so that the first writes after a freeze do not wait for the file
// system to allocate the store block by block) never takes the store past
// its limit.

import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class FrozenViewTests: XCTestCase {
  private func makeView(_ dir: String, device: Device, limit: UInt64) throws -> FrozenView {
    try FrozenView(
      path: "\(dir)/view.store", geometry: BlockGeometry(blockSize: 64 << 10, deviceSize: device.size), limit: limit,
      instant: .now(), generation: ID128.random(), log: { _ in })
  }

  /// Writes `bytes` at `offset` as the tracking engine does: old contents
  /// preserved first.
  private func write(_ bytes: [UInt8], at offset: UInt64, _ view: FrozenView, _ device: Device) throws {
    let blocks = view.geometry.blocks(touching: offset, length: UInt64(bytes.count))
    view.preserve(blocks, from: device, buffers: BufferPool())
    try bytes.withUnsafeBytes { try device.write($0, at: offset) }
  }

  private func viewBytes(_ view: FrozenView, _ device: Device) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(device.size))
    try out.withUnsafeMutableBytes { try view.read(into: $0, at: 0, device: device) }
    return out
  }

  private func storeSize(_ dir: String) throws -> UInt64 {
    var st = stat()
    guard stat("\(dir)/view.store", &st) == 0 else { throw Errno.current }
    return UInt64(st.st_size)
  }

  func testTheViewKeepsTheOldContentsOfEveryBlockWritten() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed())
    // 8 MiB and a partial last block.
    let size = (8 << 20) + 1000
    let before = g.bytes(size)
    try writeDenseFile("\(dir)/disk.img", before)
    let device = try Device(path: "\(dir)/disk.img", options: DeviceOpenOptions(writable: true))
    let view = try makeView(dir, device: device, limit: 1 << 30)
    var now = before
    for (offset, count) in [(0, 4096), (100_000, 300_000), (5 << 20, 1 << 20), (size - 1500, 1500), (200_000, 10)] {
      let bytes = g.bytes(count)
      try write(bytes, at: UInt64(offset), view, device)
      now.replaceSubrange(offset..<offset + count, with: bytes)
    }
    XCTAssertEqual(try readFileBytes("\(dir)/disk.img"), now, "the device holds the writes")
    XCTAssertTrue(try viewBytes(view, device) == before, "the view holds the device as frozen")
    XCTAssertNil(view.status.lost)
  }

  func testTheStoreNeverGrowsPastItsLimit() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(1))
    let size = 8 << 20
    let before = g.bytes(size)
    try writeDenseFile("\(dir)/disk.img", before)
    let device = try Device(path: "\(dir)/disk.img", options: DeviceOpenOptions(writable: true))
    // Room for the header and 20 blocks of 64 KiB: far less than one step
    // of allocation ahead.
    let limit = FrozenView.headerLength + 20 * (64 << 10)
    let view = try makeView(dir, device: device, limit: limit)
    for i in 0..<20 {
      try write(g.bytes(64 << 10), at: UInt64(i) * (128 << 10), view, device)
      XCTAssertLessThanOrEqual(try storeSize(dir), limit, "after block \(i)")
    }
    XCTAssertNil(view.status.lost, "20 blocks fit")
    XCTAssertTrue(try viewBytes(view, device) == before)
    try write(g.bytes(64 << 10), at: 7 << 20, view, device)
    XCTAssertNotNil(view.status.lost, "the 21st block does not fit")
    XCTAssertLessThanOrEqual(try storeSize(dir), limit)
  }

  func testTheStoreIsAllocatedAheadOfItsSlots() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: testSeed(2))
    try writeDenseFile("\(dir)/disk.img", g.bytes(1 << 20))
    let device = try Device(path: "\(dir)/disk.img", options: DeviceOpenOptions(writable: true))
    let view = try makeView(dir, device: device, limit: 1 << 30)
    try write(g.bytes(4096), at: 0, view, device)
    XCTAssertEqual(view.status.storeBytes, FrozenView.headerLength + (64 << 10), "one slot")
    XCTAssertGreaterThanOrEqual(
      try storeSize(dir), FrozenView.headerLength + FrozenView.allocationStep, "a step allocated ahead")
  }
}
