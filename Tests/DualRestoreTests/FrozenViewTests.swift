// The preservation store of a frozen view, on its own: it holds the old
// contents of every block written after the freeze, the view reads them
// back exactly, and the room it allocates ahead of its slots (a step at a
// time, so that the first writes after a freeze do not wait for the file
// system to allocate the store block by block) never takes the store past
// its limit. Slots are written past the page cache where the file system
// and the block size allow, and through it elsewhere (tmpfs, blocks of
// less than a page), with the same contents either way.

import CShim
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class FrozenViewTests: XCTestCase {
  private func makeView(_ dir: String, device: Device, limit: UInt64, blockSize: UInt32 = 64 << 10) throws
    -> FrozenView
  {
    try FrozenView(
      path: "\(dir)/view.store", geometry: BlockGeometry(blockSize: blockSize, deviceSize: device.size), limit: limit,
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
    for blockSize: UInt32 in [64 << 10, 4096, 512] {
      let dir = try makeTempDirectory()
      try checkTheViewKeepsTheOldContents(dir, storeDirectory: dir, blockSize: blockSize) {
        // Slots of whole pages go past the cache; smaller ones cannot.
        let fd = open("\(dir)/view.store", O_RDONLY)
        defer { close(fd) }
        let cached = dr_cached_pages(fd, FrozenView.headerLength, 1 << 30)
        if cached < 0 { return }  // no cachestat(2) here
        if blockSize % 4096 == 0 {
          XCTAssertEqual(cached, 0, "blocks of \(blockSize): no slot in the page cache")
        } else {
          XCTAssertGreaterThan(cached, 0, "blocks of \(blockSize): slots written through the cache")
        }
      }
    }
  }

  func testAStoreOnTmpfsIsWrittenThroughTheCache() throws {
    // tmpfs refuses O_DIRECT.
    guard access("/dev/shm", W_OK) == 0 else { throw XCTSkip("no /dev/shm") }
    let shm = "/dev/shm/dualrestore-view-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    mkdir(shm, 0o700)
    defer {
      unlink("\(shm)/view.store")
      rmdir(shm)
    }
    try checkTheViewKeepsTheOldContents(try makeTempDirectory(), storeDirectory: shm, blockSize: 64 << 10) {}
  }

  /// Writes over a frozen device, runs `afterWrites` (before the view is
  /// read), then checks the device and the view.
  private func checkTheViewKeepsTheOldContents(
    _ dir: String, storeDirectory: String, blockSize: UInt32, afterWrites: () -> Void
  ) throws {
    var g = SplitMix64(seed: testSeed(UInt64(blockSize)))
    // 8 MiB and a partial last block.
    let size = (8 << 20) + 1000
    let before = g.bytes(size)
    try writeDenseFile("\(dir)/disk.img", before)
    let device = try Device(path: "\(dir)/disk.img", options: DeviceOpenOptions(writable: true))
    let view = try makeView(storeDirectory, device: device, limit: 1 << 30, blockSize: blockSize)
    var now = before
    for (offset, count) in [(0, 4096), (100_000, 300_000), (5 << 20, 1 << 20), (size - 1500, 1500), (200_000, 10)] {
      let bytes = g.bytes(count)
      try write(bytes, at: UInt64(offset), view, device)
      now.replaceSubrange(offset..<offset + count, with: bytes)
    }
    afterWrites()
    XCTAssertEqual(try readFileBytes("\(dir)/disk.img"), now, "blocks of \(blockSize): the device holds the writes")
    XCTAssertTrue(try viewBytes(view, device) == before, "blocks of \(blockSize): the view holds the device as frozen")
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
