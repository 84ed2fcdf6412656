// READ replies sent from a file (sendfile) by the NBD server: the bytes
// match the file for every size and alignment around the threshold, a
// reader sees a file's later writes, and a file that ends before the reply
// does gives the client an error, never short or zero-filled data.
// The server runs in process on a Unix socket; the clients are NBDClient
// and, when installed, nbdcopy.

import CShim
import Dispatch
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// An export backed by a file, answered from the file when the server can.
private final class FileBackedExport: NBDExport, @unchecked Sendable {
  let name = "file"
  let description = "a file"
  let size: UInt64
  let flags: UInt16 = NBD.flagSendFlush
  let preferredBlockSize: UInt32 = 4096
  let device: Device
  let sendsFromFile: Bool
  private let lock = Monitor()
  private var spans = 0
  private var buffered = 0

  init(path: String, size: UInt64? = nil, sendsFromFile: Bool = true) throws {
    device = try Device(path: path, options: .readWrite)
    self.size = size ?? device.size
    self.sendsFromFile = sendsFromFile
  }

  /// READs answered from the file, and through a buffer.
  var counts: (spans: Int, buffered: Int) { lock.withLock { (spans, buffered) } }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    lock.withLock { buffered += 1 }
    try device.read(into: buffer, at: offset)
  }

  func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan? {
    guard sendsFromFile else { return nil }
    lock.withLock { spans += 1 }
    return FileSpan(fd: device.pageCacheFD, offset: offset)
  }

  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try device.write(buffer, at: offset)
  }
  func flush() throws { try device.sync() }
  func trim(offset: UInt64, length: UInt64, fua: Bool) throws {}
  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {}
}

/// Whether `buffer` holds the bytes of `bytes` at `offset`.
private func same(_ bytes: [UInt8], _ offset: Int, _ buffer: UnsafeMutableRawBufferPointer) -> Bool {
  bytes.withUnsafeBytes { memcmp($0.baseAddress! + offset, buffer.baseAddress!, buffer.count) == 0 }
}

final class NBDServerFileReplyTests: XCTestCase {
  /// Serves `export` on `DIR/s.sock` and connects NBDClient to it; both
  /// end with the test.
  private func connect(_ export: NBDExport, _ dir: String, timeout: Double = 10) throws -> NBDClient {
    let listener = try Listener(unixPath: "\(dir)/s.sock")
    let server = NBDServer(exports: [export], log: { _ in })
    Thread { server.serve(listener) }.start()
    let client = try NBDClient(uri: "nbd+unix:///file?socket=\(dir)/s.sock", timeout: timeout)
    addTeardownBlock {
      client.close()
      server.beginStop(listener)
      server.stop()
    }
    return client
  }

  private func makeFile(_ path: String, _ size: Int, seed: UInt64) throws -> [UInt8] {
    var g = SplitMix64(seed: seed)
    let bytes = g.bytes(size)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    return bytes
  }

  func testRepliesFromTheFileMatchItForEverySizeAndAlignment() throws {
    let dir = try makeTempDirectory()
    let size = 40 << 20
    let seed = testSeed()
    let bytes = try makeFile("\(dir)/disk.img", size, seed: seed)
    let export = try FileBackedExport(path: "\(dir)/disk.img")
    let client = try connect(export, dir)
    let threshold = 32 << 10
    let lengths = [1, 511, 4096, threshold - 1, threshold, threshold + 1, 256 << 10, 1 << 20, 32 << 20]
    var g = SplitMix64(seed: seed ^ 1)
    for length in lengths {
      for offset in [0, 1, 4095, Int(g.next() % UInt64(size - length))] where offset + length <= size {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
        defer { buffer.deallocate() }
        try client.read(into: buffer, at: UInt64(offset))
        XCTAssert(
          same(bytes, offset, buffer),
          "\(length) bytes at \(offset) differ from the file (seed \(seed))")
      }
    }
    let (spans, buffered) = export.counts
    XCTAssertGreaterThan(spans, 0, "no reply was sent from the file")
    XCTAssertGreaterThan(buffered, 0, "short reads should go through a buffer")
  }

  func testConcurrentReadsFromTheFileAndNbdcopyAgree() throws {
    let dir = try makeTempDirectory()
    let size = 24 << 20
    let bytes = try makeFile("\(dir)/disk.img", size, seed: testSeed())
    let export = try FileBackedExport(path: "\(dir)/disk.img")
    let client = try connect(export, dir)
    let uri = "nbd+unix:///file?socket=\(dir)/s.sock"
    // 64 KiB pieces from many threads at once share the connection.
    let piece = 64 << 10
    final class Bad: @unchecked Sendable {
      let lock = Monitor()
      var pieces: [Int] = []
    }
    let bad = Bad()
    DispatchQueue.concurrentPerform(iterations: size / piece) { i in
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 4096)
      defer { buffer.deallocate() }
      let ok =
        (try? client.read(into: buffer, at: UInt64(i * piece))) != nil
        && same(bytes, i * piece, buffer)
      if !ok { bad.lock.withLock { bad.pieces.append(i) } }
    }
    XCTAssertEqual(bad.pieces, [], "pieces read wrong or failed")

    let candidates = ["/usr/bin/nbdcopy", "/usr/local/bin/nbdcopy"]
    guard let nbdcopy = candidates.first(where: { access($0, X_OK) == 0 }) else {
      throw XCTSkip("nbdcopy is not installed; the NBDClient part passed")
    }
    let copied = try RRTCommand.run(nbdcopy, [uri, "\(dir)/copy.img"])
    XCTAssertEqual(copied.status, 0, copied.summary)
    let copy = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/copy.img"))
    XCTAssertEqual(copy.count, bytes.count)
    let equal = copy.withUnsafeBytes { c in
      bytes.withUnsafeBytes { memcmp(c.baseAddress!, $0.baseAddress!, $0.count) == 0 }
    }
    XCTAssert(equal, "nbdcopy's copy differs from the file")
  }

  func testAReaderSeesTheFilesLaterWrites() throws {
    let dir = try makeTempDirectory()
    _ = try makeFile("\(dir)/disk.img", 4 << 20, seed: testSeed())
    let export = try FileBackedExport(path: "\(dir)/disk.img")
    let client = try connect(export, dir)
    let length = 1 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
    defer { buffer.deallocate() }
    for round in 0..<4 {
      let fill = [UInt8](repeating: UInt8(0x40 + round), count: length)
      try fill.withUnsafeBytes { try client.write($0, at: 1 << 20) }
      try client.read(into: buffer, at: 1 << 20)
      XCTAssert(buffer.allSatisfy { $0 == UInt8(0x40 + round) }, "round \(round) read stale data")
    }
  }

  func testAFileEndingBeforeTheReplyIsAnErrorNotData() throws {
    let dir = try makeTempDirectory()
    let size = 8 << 20
    let bytes = try makeFile("\(dir)/disk.img", size, seed: testSeed())
    let export = try FileBackedExport(path: "\(dir)/disk.img")
    let client = try connect(export, dir, timeout: 5)
    // Someone truncates the file under the server: its last 4 MiB are gone.
    XCTAssertEqual(truncate("\(dir)/disk.img", off_t(size / 2)), 0)
    let length = 1 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
    XCTAssertThrowsError(
      try client.read(into: buffer, at: UInt64(size - length)), "a read past the file's end succeeded")
    XCTAssert(buffer.allSatisfy { $0 == 0xEE }, "the failed read left data in the buffer")
    // A read straddling the new end: part of the reply exists, yet it fails.
    XCTAssertThrowsError(try client.read(into: buffer, at: UInt64(size / 2 - length / 2)))
    // The connection goes on: what the file still holds reads well.
    try client.read(into: buffer, at: 0)
    XCTAssert(same(bytes, 0, buffer))
  }

  func testOnlyCachedRangesAreSentFromTheFile() throws {
    let dir = try makeTempDirectory()
    let bytes = try makeFile("\(dir)/disk.img", 8 << 20, seed: testSeed())
    let export = try FileBackedExport(path: "\(dir)/disk.img")
    guard dr_cached_pages(export.device.fd, 0, 4096) >= 0 else { throw XCTSkip("cachestat(2) is not available") }
    // Out of the page cache: the read goes to the disk before the reply,
    // so that an error there could still be an error reply.
    try export.device.sync()
    XCTAssertEqual(posix_fadvise(export.device.fd, 0, 0, POSIX_FADV_DONTNEED), 0)
    let client = try connect(export, dir)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buffer.deallocate() }
    try client.read(into: buffer, at: 2 << 20)
    XCTAssert(same(bytes, 2 << 20, buffer))
    XCTAssertEqual(export.counts.buffered, 1, "an uncached range was not read through a buffer")
    // Now cached by that read: sent from the file.
    try client.read(into: buffer, at: 2 << 20)
    XCTAssert(same(bytes, 2 << 20, buffer))
    XCTAssertEqual(export.counts.buffered, 1)
  }

  func testAnExportWithoutFileRepliesIsReadThroughItsBuffer() throws {
    let dir = try makeTempDirectory()
    let bytes = try makeFile("\(dir)/disk.img", 2 << 20, seed: testSeed())
    let export = try FileBackedExport(path: "\(dir)/disk.img", sendsFromFile: false)
    let client = try connect(export, dir)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buffer.deallocate() }
    try client.read(into: buffer, at: 1 << 20)
    XCTAssert(same(bytes, 1 << 20, buffer))
    XCTAssertEqual(export.counts.spans, 0)
    XCTAssertEqual(export.counts.buffered, 1)
  }
}
