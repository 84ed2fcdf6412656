// Device: opening image files, sizes, positional reads and writes, errors
// that name the path, and hole detection.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class DeviceTests: XCTestCase {
  private func read(_ device: Device, _ count: Int, at offset: UInt64) throws -> [UInt8] {
    var buffer = [UInt8](repeating: 0xAA, count: count)
    try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
    return buffer
  }

  private func write(_ device: Device, _ bytes: [UInt8], at offset: UInt64) throws {
    try bytes.withUnsafeBytes { try device.write($0, at: offset) }
  }

  func testSizeOfFiles() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(41)
    var g = SplitMix64(seed: seed)
    for size in [0, 1, 511, 512, 4097, Int(g.next() % 200_000)] {
      let path = dir + "/f\(size).img"
      try writeDenseFile(path, g.bytes(size))
      let device = try Device(path: path)
      XCTAssertEqual(device.size, UInt64(size), "seed \(seed)")
      XCTAssertEqual(device.path, path)
      XCTAssertEqual(device.name, path)
      XCTAssertFalse(device.isBlockDevice)
      XCTAssertEqual(device.sectorSize, 512)
    }
    // A sparse file's size is its apparent size.
    let sparse = dir + "/sparse.img"
    try createSparseFile(sparse, size: 1 << 34)
    XCTAssertEqual(try Device(path: sparse).size, 1 << 34)
  }

  func testReadsReturnTheFileBytes() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(42)
    var g = SplitMix64(seed: seed)
    let content = g.bytes(100_000 + Int(g.next() % 1000))
    let path = dir + "/data.img"
    try writeDenseFile(path, content)
    let device = try Device(path: path)
    XCTAssertEqual(try read(device, content.count, at: 0), content)
    for _ in 0..<100 {
      let offset = Int(g.next() % UInt64(content.count))
      let length = Int(g.next() % UInt64(content.count - offset + 1))
      XCTAssertEqual(
        try read(device, length, at: UInt64(offset)), Array(content[offset..<(offset + length)]),
        "seed \(seed), \(length) at \(offset)")
    }
    // Up to the last byte exactly.
    XCTAssertEqual(try read(device, 1, at: UInt64(content.count - 1)), [content.last!])
  }

  func testReadPastTheEndThrowsWithThePath() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/short.img"
    try writeDenseFile(path, [UInt8](repeating: 7, count: 1000))
    let device = try Device(path: path)
    assertThrows(try read(device, 10, at: 995), containing: [path, "past the end"])
    assertThrows(try read(device, 1, at: 1000), containing: [path])
    assertThrows(try read(device, 1, at: 5000), containing: [path])
    assertThrows(try read(device, 1001, at: 0), containing: [path])
    assertThrows(try read(device, 2, at: UInt64.max), containing: [path])
    // Nothing was returned as silent zeros: the buffer holds its fill.
    var buffer = [UInt8](repeating: 0xAA, count: 10)
    XCTAssertThrowsError(try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 995) })
  }

  func testMissingPathAndWrongKinds() throws {
    let dir = try makeTempDirectory()
    let missing = dir + "/does-not-exist.img"
    do {
      _ = try Device(path: missing)
      XCTFail("opening a missing path succeeded")
    } catch {
      XCTAssertEqual(errorText(error), "\(missing): No such file or directory")
    }
    XCTAssertFalse(FileManager.default.fileExists(atPath: missing), "a read-only open creates nothing")
    assertThrows(try Device(path: missing, options: .readWrite), containing: [missing, "No such file or directory"])
    assertThrows(try Device(path: dir), containing: [dir, "not an image file or a block device"])
    // A missing parent directory with createSize fails with the path.
    let deep = dir + "/no/such/dir.img"
    assertThrows(
      try Device(path: deep, options: DeviceOpenOptions(writable: true, createSize: 4096)), containing: [deep])
  }

  func testCreateSize() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/new.img"
    let device = try Device(path: path, options: DeviceOpenOptions(writable: true, createSize: 1 << 20))
    XCTAssertEqual(device.size, 1 << 20)
    XCTAssertEqual(try read(device, 4096, at: 12345), [UInt8](repeating: 0, count: 4096))
    try write(device, [1, 2, 3], at: 0)
    // Opening an existing file with createSize neither truncates nor resizes it.
    let again = try Device(path: path, options: DeviceOpenOptions(writable: true, createSize: 4096))
    XCTAssertEqual(again.size, 1 << 20)
    XCTAssertEqual(try read(again, 3, at: 0), [1, 2, 3])
  }

  func testWritesThenReadsBack() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(43)
    var g = SplitMix64(seed: seed)
    let path = dir + "/rw.img"
    var model = g.bytes(64 * 1024 + 333)
    try writeDenseFile(path, model)
    let device = try Device(path: path, options: .readWrite)
    for _ in 0..<50 {
      let offset = Int(g.next() % UInt64(model.count))
      let length = Int(g.next() % UInt64(min(5000, model.count - offset) + 1))
      let bytes = g.bytes(length)
      try write(device, bytes, at: UInt64(offset))
      model.replaceSubrange(offset..<(offset + length), with: bytes)
      XCTAssertEqual(try read(device, length, at: UInt64(offset)), bytes, "seed \(seed)")
    }
    try device.sync()
    XCTAssertEqual(try read(device, model.count, at: 0), model, "seed \(seed)")
    // Another open sees the same bytes, and so does the file system.
    XCTAssertEqual(try read(try Device(path: path), model.count, at: 0), model, "seed \(seed)")
    XCTAssertEqual(try readFileBytes(path), model, "seed \(seed)")
    // Writing past the end is refused and does not grow the file.
    assertThrows(try write(device, [1, 2], at: UInt64(model.count - 1)), containing: [path, "past the end"])
    assertThrows(try write(device, [1], at: UInt64(model.count)), containing: [path])
    XCTAssertEqual(try readFileBytes(path).count, model.count)
  }

  func testReadOnlyDeviceRefusesWrites() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/ro.img"
    let content = [UInt8](repeating: 0x5A, count: 8192)
    try writeDenseFile(path, content)
    let device = try Device(path: path)
    XCTAssertFalse(device.options.writable)
    assertThrows(try write(device, [1, 2, 3], at: 0), containing: [path, "read-only"])
    assertThrows(try write(device, [1], at: 8191), containing: [path, "read-only"])
    XCTAssertEqual(try readFileBytes(path), content, "the file is unchanged")
  }

  func testDataRegionsOfASparseFile() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/sparse.img"
    // data [0, 8K) · hole [8K, 64K) · data [64K, 68K) · hole [68K, 100000)
    let size: UInt64 = 100_000
    try createSparseFile(path, size: size)
    try writeBytes(path, [UInt8](repeating: 1, count: 8192), at: 0)
    try writeBytes(path, [UInt8](repeating: 2, count: 4096), at: 65536)
    let holes = try holeRanges(path)
    XCTAssertEqual(holes, [8192..<65536, 69632..<size], "the file system should report these holes")

    let device = try Device(path: path)
    func region(_ offset: UInt64) -> String {
      let r = device.dataRegion(at: offset)
      return "\(r.isData ? "data" : "hole") to \(r.end)"
    }
    XCTAssertEqual(region(0), "data to 8192")
    XCTAssertEqual(region(4000), "data to 8192")
    XCTAssertEqual(region(8191), "data to 8192")
    XCTAssertEqual(region(8192), "hole to 65536")
    XCTAssertEqual(region(10000), "hole to 65536")
    XCTAssertEqual(region(65535), "hole to 65536")
    XCTAssertEqual(region(65536), "data to 69632")
    XCTAssertEqual(region(69631), "data to 69632")
    XCTAssertEqual(region(69632), "hole to \(size)")
    XCTAssertEqual(region(size - 1), "hole to \(size)")
    // At and past the end: nothing to skip.
    XCTAssertEqual(region(size), "data to \(size)")
    XCTAssertEqual(region(size + 1000), "data to \(size)")

    // Walking the regions covers the file once, and agrees with the bytes:
    // every byte in a reported hole reads as zero.
    let content = try readFileBytes(path)
    var offset: UInt64 = 0
    var walked: [(Bool, Range<UInt64>)] = []
    while offset < size {
      let r = device.dataRegion(at: offset)
      XCTAssertGreaterThan(r.end, offset)
      if r.end <= offset { break }
      walked.append((r.isData, offset..<r.end))
      if !r.isData { XCTAssertTrue(content[Int(offset)..<Int(r.end)].allSatisfy { $0 == 0 }) }
      offset = r.end
    }
    XCTAssertEqual(walked.map { $0.0 }, [true, false, true, false])
    XCTAssertEqual(walked.map { $0.1 }, [0..<8192, 8192..<65536, 65536..<69632, 69632..<size])

    // A file that is all hole.
    let empty = dir + "/hole.img"
    try createSparseFile(empty, size: 50_000)
    let d = try Device(path: empty)
    XCTAssertEqual(d.dataRegion(at: 0).isData, false)
    XCTAssertEqual(d.dataRegion(at: 0).end, 50_000)
    // A dense file is all data.
    let dense = dir + "/dense.img"
    try writeDenseFile(dense, [UInt8](repeating: 0, count: 50_000))
    XCTAssertEqual(try Device(path: dense).dataRegion(at: 100).isData, true)
    XCTAssertEqual(try Device(path: dense).dataRegion(at: 100).end, 50_000)
  }

  func testAlignedBuffer() {
    let buffer = AlignedBuffer(count: 10_000)
    XCTAssertEqual(Int(bitPattern: buffer.pointer) % 4096, 0)
    XCTAssertEqual(buffer.buffer.count, 10_000)
    let slice = buffer.slice(100, 50)
    XCTAssertEqual(slice.baseAddress, buffer.pointer + 100)
    XCTAssertEqual(slice.count, 50)
  }
}
