// The block-device seam: files speak it as the engines expect (capabilities,
// zeroes as holes, holes reported, file copies), a read-only source refuses
// writes with a typed error, and errors become NBD wire codes in one
// function with the codes clients saw before the engines were typed.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// A read-only in-memory source that implements only what a source must.
private final class ConstantSource: BlockDevice, @unchecked Sendable {
  let name = "constant source"
  let size: UInt64 = 1 << 16
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    buffer.initializeMemory(as: UInt8.self, repeating: 0x5A)
  }
}

final class BlockDeviceTests: XCTestCase {
  func testAFileSpeaksTheSeam() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/f.img"
    let size = 1 << 20
    try writeDenseFile(path, [UInt8](repeating: 0xC3, count: size))

    let readOnly: BlockDevice = try Device(path: path)
    XCTAssertFalse(readOnly.capabilities.contains(.writable))
    XCTAssertTrue(readOnly.capabilities.contains(.reportsHoles))
    XCTAssertThrowsError(try readOnly.writeZeroes(offset: 0, length: 4096, fua: false))

    let device: BlockDevice = try Device(path: path, options: .readWrite)
    XCTAssertTrue(device.capabilities.isSuperset(of: [.writable, .flush, .writeZeroes]))
    XCTAssertEqual(device.name, path)
    // Zeroes in the middle become a hole that reads as zeros.
    try device.writeZeroes(offset: 256 << 10, length: 256 << 10, fua: true)
    var buffer = [UInt8](repeating: 0xAA, count: size)
    try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
    XCTAssertEqual(Array(buffer[0..<(256 << 10)]), [UInt8](repeating: 0xC3, count: 256 << 10))
    XCTAssertEqual(Array(buffer[(256 << 10)..<(512 << 10)]), [UInt8](repeating: 0, count: 256 << 10))
    XCTAssertEqual(Array(buffer[(512 << 10)...]), [UInt8](repeating: 0xC3, count: 512 << 10))
    let runs = try XCTUnwrap(try device.allocation(from: 0, length: UInt32(size)))
    XCTAssertEqual(runs.reduce(0) { $0 + UInt64($1.length) }, UInt64(size))
    XCTAssertTrue(
      runs.contains { $0.flags == Extent.hole | Extent.zero }, "the zeroed range is reported as a hole: \(runs)")

    // A range read into a file lands at the same offset.
    let copy = dir + "/copy.img"
    try createSparseFile(copy, size: UInt64(size))
    let out = open(copy, O_RDWR)
    XCTAssertGreaterThanOrEqual(out, 0)
    defer { close(out) }
    try device.read(at: 128 << 10, length: 256 << 10, toFile: out)
    let copied = try Device(path: copy)
    var back = [UInt8](repeating: 0xAA, count: 256 << 10)
    try back.withUnsafeMutableBytes { try copied.read(into: $0, at: 128 << 10) }
    XCTAssertEqual(back, Array(buffer[(128 << 10)..<(384 << 10)]))
  }

  func testAReadOnlySourceRefusesWritesWithATypedError() throws {
    let source: BlockDevice = ConstantSource()
    XCTAssertEqual(source.capabilities, [])
    XCTAssertNil(try source.allocation(from: 0, length: 4096))
    XCTAssertThrowsError(
      try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try source.write($0, at: 0, fua: false) }
    ) {
      XCTAssertEqual($0 as? DeviceError, DeviceError("constant source", .readOnly))
      XCTAssertEqual("\($0)", "constant source: opened read-only")
    }
    // Trim and flush of a source nothing is written to do nothing.
    XCTAssertNoThrow(try source.trim(offset: 0, length: 4096))
    XCTAssertNoThrow(try source.flush())
  }

  func testErrorsBecomeTheWireCodesClientsSaw() {
    let id = ID128(high: 1, low: 2)
    // The restore engine's failures are EIO and its refusals EINVAL, as
    // when it threw NBD error numbers itself.
    let cases: [(Error, UInt32)] = [
      (RestoreError.fetchFailed(offset: 0, length: 4096, cause: ToolkitError("backup gone")), NBD.errIO),
      (RestoreError.fetchNotKept(primary: "p.img", offset: 0, length: 4096, errno: ENOSPC), NBD.errIO),
      (RestoreError.writeFailed(cause: ToolkitError("p.img: write at 0: No space left on device")), NBD.errIO),
      (RestoreError.flushFailed(cause: ToolkitError("x")), NBD.errIO),
      (RestoreError.streamRefused(problem: "too old"), NBD.errInvalid),
      (RestoreError.streamNotAdmitted(id), NBD.errInvalid),
      (RestoreError.partialBlocks(blockSize: 4096, offset: 512, length: 512), NBD.errInvalid),
      (DeviceError("d", .io(ENOSPC)), NBD.errNoSpace),
      (DeviceError("d", .io(EROFS)), NBD.errPerm),
      (DeviceError("d", .io(EBADF)), NBD.errIO),
      (DeviceError("d", .readOnly), NBD.errPerm),
      (DeviceError("d", .noSpace), NBD.errNoSpace),
      (DeviceError("d", .invalid("no")), NBD.errInvalid),
      (DeviceError("d", .timedOut), NBD.errIO),
      (NBDError(NBD.errPerm, "the frozen view is read-only"), NBD.errPerm),
      (ToolkitError("anything else"), NBD.errIO),
      // A file or device's failed system call keeps its errno.
      (ToolkitError.path("p.img", "write at 0", errno: Errno(ENOSPC)), NBD.errNoSpace),
      (ToolkitError.path("p.img", "write at 0", errno: Errno(EROFS)), NBD.errPerm),
      (ToolkitError("a peer", cause: .timedOut), NBD.errIO),
    ]
    for (error, code) in cases {
      XCTAssertEqual(NBDError.code(for: error), code, "\(error)")
    }
    // The sentences clients and logs see stay what they were.
    XCTAssertEqual(
      "\(ToolkitError.path("p.img", "write at 0", errno: Errno(ENOSPC)))",
      "p.img: write at 0: \(String(cString: strerror(ENOSPC)))")
    XCTAssertEqual(
      "\(RestoreError.streamNotAdmitted(id))", "stream \(id) was not merged through this server")
    XCTAssertEqual(
      "\(RestoreError.streamRefused(problem: "too old"))", "too old (--force merges it anyway)")
    XCTAssertEqual(
      "\(RestoreError.partialBlocks(blockSize: 4096, offset: 512, length: 512))",
      "the merge export takes whole blocks of 4096 bytes; got 512 bytes at 512")
  }
}
