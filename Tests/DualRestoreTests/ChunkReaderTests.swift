// ChunkReader: chunks cover the source in order, hole flags are exact (set
// only for blocks entirely in a hole), hole blocks are not read, errors reach
// the caller, and cancelling never hangs.

import Dispatch
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// An in-memory source with declared holes, recording every read.
private final class FakeSource: BlockDevice, @unchecked Sendable {
  let name: String
  let content: [UInt8]
  /// Sorted, disjoint, non-adjacent byte ranges that are holes (zeros).
  let holes: [Range<UInt64>]
  let failAt: UInt64?
  let delay: useconds_t
  private let lock = NSLock()
  private var _reads: [Range<UInt64>] = []

  init(
    name: String = "fake", content: [UInt8], holes: [Range<UInt64>] = [], failAt: UInt64? = nil, delay: useconds_t = 0
  ) {
    self.name = name
    self.content = content
    self.holes = holes
    self.failAt = failAt
    self.delay = delay
  }

  var size: UInt64 { UInt64(content.count) }
  var reads: [Range<UInt64>] { lock.withLock { _reads } }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    if delay > 0 { usleep(delay) }
    let range = offset..<(offset + UInt64(buffer.count))
    lock.withLock { _reads.append(range) }
    if let failAt, range.contains(failAt) { throw ToolkitError("\(name): injected read error at \(failAt)") }
    guard range.upperBound <= size else { throw ToolkitError("\(name): read past the end") }
    content.withUnsafeBytes { src in
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<Int(range.upperBound)]))
    }
  }

  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) {
    if offset >= size { return (true, size) }
    for h in holes {
      if h.contains(offset) { return (false, h.upperBound) }
      if h.lowerBound > offset { return (true, h.lowerBound) }
    }
    return (true, size)
  }
}

final class ChunkReaderTests: XCTestCase {
  private struct Seen {
    /// The chunks' bytes at their device offsets; 0xEE where a hole block left them undefined.
    var bytes: [UInt8]
    var isHole: [Bool]
  }

  /// Reads everything and checks the chunk bookkeeping; returns what was seen.
  private func readAll(
    _ reader: ChunkReader, _ geometry: BlockGeometry, _ ctx: String, file: StaticString = #filePath, line: UInt = #line
  ) throws -> Seen {
    var seen = Seen(bytes: [UInt8](repeating: 0xEE, count: Int(geometry.deviceSize)), isHole: [])
    var expectedFirst: UInt64 = 0
    while let chunk = try reader.next() {
      XCTAssertEqual(chunk.firstBlock, expectedFirst, ctx, file: file, line: line)
      XCTAssertGreaterThan(chunk.blockCount, 0, ctx, file: file, line: line)
      XCTAssertLessThanOrEqual(chunk.blockCount, reader.blocksPerChunk, ctx, file: file, line: line)
      let (offset, length) = geometry.byteRange(blocks: chunk.firstBlock, count: UInt64(chunk.blockCount))
      XCTAssertEqual(UInt64(chunk.length), length, ctx, file: file, line: line)
      XCTAssertEqual(chunk.bytes.count, chunk.length, ctx, file: file, line: line)
      XCTAssertEqual(chunk.isHole.count, chunk.blockCount, ctx, file: file, line: line)
      XCTAssertEqual(chunk.holeCount, chunk.isHole.filter { $0 }.count, ctx, file: file, line: line)
      for i in 0..<chunk.blockCount {
        seen.isHole.append(chunk.isHole[i])
        if chunk.isHole[i] { continue }
        let start = i * Int(geometry.blockSize)
        let blockLength = geometry.length(ofBlock: chunk.firstBlock + UInt64(i))
        let at = Int(offset) + start
        seen.bytes.replaceSubrange(at..<(at + blockLength), with: chunk.bytes[start..<(start + blockLength)])
      }
      expectedFirst += UInt64(chunk.blockCount)
    }
    XCTAssertEqual(expectedFirst, geometry.blockCount, "\(ctx): chunks cover every block", file: file, line: line)
    return seen
  }

  private func blockRange(_ geometry: BlockGeometry, _ block: Int) -> Range<UInt64> {
    let start = geometry.offset(ofBlock: UInt64(block))
    return start..<(start + UInt64(geometry.length(ofBlock: UInt64(block))))
  }

  // MARK: Fake sources: exact hole semantics

  func testRandomSourcesWithHoles() throws {
    let seed = testSeed(51)
    var g = SplitMix64(seed: seed)
    for iteration in 0..<60 {
      let blockSize = UInt32(512) << UInt32(g.next() % 5)
      let bs = UInt64(blockSize)
      let size = Int(g.next() % (40 * bs)) + (iteration == 0 ? 0 : 1)
      // Random unaligned holes with at least one data byte between them.
      var holes: [Range<UInt64>] = []
      var position = g.next() % (2 * bs)
      while position < UInt64(size) {
        let length = g.next() % (5 * bs) + 1
        let end = min(UInt64(size), position + length)
        holes.append(position..<end)
        position = end + 1 + g.next() % (3 * bs)
      }
      var content = g.bytes(size)
      for h in holes { for i in h { content[Int(i)] = 0 } }
      // Make some data blocks zero too: zeros are not holes.
      if size > 0 { for i in 0..<min(size, Int(bs)) where g.next() % 2 == 0 { content[i] = 0 } }
      let source = FakeSource(content: content, holes: holes)
      let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: UInt64(size))
      let chunkBytes = Int(bs) * Int(g.next() % 6 + 1) + Int(g.next() % bs)
      let depth = Int(g.next() % 4) + 1
      let ctx =
        "seed \(seed), iteration \(iteration), bs \(blockSize), size \(size), chunk \(chunkBytes), holes \(holes)"

      let reader = ChunkReader(source: source, geometry: geometry, chunkBytes: chunkBytes, depth: depth)
      XCTAssertEqual(reader.blocksPerChunk, max(1, chunkBytes / Int(bs)), ctx)
      let seen = try readAll(reader, geometry, ctx)
      reader.cancel()

      var holeBlocks = Set<Int>()
      var dataBytes: UInt64 = 0
      for block in 0..<Int(geometry.blockCount) {
        let r = blockRange(geometry, block)
        let entirelyHole = isInside(r, holes)
        if entirelyHole { holeBlocks.insert(block) } else { dataBytes += UInt64(r.count) }
        XCTAssertEqual(seen.isHole[block], entirelyHole, "\(ctx), block \(block)")
        if !seen.isHole[block] {
          XCTAssertTrue(
            seen.bytes[Int(r.lowerBound)..<Int(r.upperBound)] == content[Int(r.lowerBound)..<Int(r.upperBound)],
            "\(ctx): bytes of block \(block) differ")
        }
      }
      // Blocks entirely in holes are never read; every other byte is read once.
      let reads = source.reads.sorted { $0.lowerBound < $1.lowerBound }
      for (a, b) in zip(reads, reads.dropFirst()) {
        XCTAssertLessThanOrEqual(a.upperBound, b.lowerBound, "\(ctx): reads \(a) and \(b) overlap")
      }
      XCTAssertEqual(reads.reduce(0) { $0 + UInt64($1.count) }, dataBytes, "\(ctx): bytes read")
      for r in reads where !r.isEmpty {
        let first = Int(r.lowerBound / bs)
        let last = Int((r.upperBound - 1) / bs)
        for block in first...last where holeBlocks.contains(block) {
          XCTFail("\(ctx): read \(r) touches hole block \(block)")
        }
      }

      // Without hole skipping: no flags, every byte read.
      let plain = ChunkReader(
        source: source, geometry: geometry, chunkBytes: chunkBytes, depth: depth, skipHoles: false)
      let all = try readAll(plain, geometry, "\(ctx), skipHoles false")
      XCTAssertFalse(all.isHole.contains(true), ctx)
      XCTAssertTrue(all.bytes == content, ctx)
    }
  }

  func testReadErrorsReachTheCaller() throws {
    let content = [UInt8](repeating: 3, count: 100 * 512)
    let source = FakeSource(name: "flaky", content: content, failAt: 37 * 512 + 5)
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: UInt64(content.count))
    let reader = ChunkReader(source: source, geometry: geometry, chunkBytes: 4 * 512, depth: 2)
    var blocks: UInt64 = 0
    do {
      while let chunk = try reader.next() { blocks += UInt64(chunk.blockCount) }
      XCTFail("no error after \(blocks) blocks")
    } catch {
      XCTAssertTrue(errorText(error).contains("injected read error at \(37 * 512 + 5)"), errorText(error))
      XCTAssertEqual(blocks, 36, "the chunks before the failing one arrive intact")
    }
    XCTAssertTrue(finishes(within: 5) { reader.cancel() }, "cancel after an error hangs")
  }

  // MARK: A real file with holes

  func testFileWithHoles() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(52)
    var g = SplitMix64(seed: seed)
    let path = dir + "/holes.img"
    let bs = 4096
    let size = 64 * bs + 1234
    var content = [UInt8](repeating: 0, count: size)
    try createSparseFile(path, size: UInt64(size))
    // Data extents, page-aligned and not: blocks 0-2, a half block at 10, 20-29,
    // one byte in block 40, and the partial last block.
    let extents: [Range<Int>] = [
      0..<(3 * bs), (10 * bs)..<(10 * bs + 2048), (20 * bs)..<(30 * bs), (40 * bs + 100)..<(40 * bs + 101),
      (64 * bs)..<size,
    ]
    for e in extents {
      let bytes = g.bytes(e.count).map { $0 | 1 }  // never zero
      content.replaceSubrange(e, with: bytes)
      try writeBytes(path, bytes, at: UInt64(e.lowerBound))
    }
    XCTAssertEqual(try readFileBytes(path), content)
    let holes = try holeRanges(path)
    let device = try Device(path: path)
    for blockSize: UInt32 in [4096, 8192, 65536] {
      let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: UInt64(size))
      let ctx = "seed \(seed), block size \(blockSize)"
      let reader = ChunkReader(source: device, geometry: geometry, chunkBytes: 3 * Int(blockSize), depth: 2)
      let seen = try readAll(reader, geometry, ctx)
      var flagged = 0
      for block in 0..<Int(geometry.blockCount) {
        let r = blockRange(geometry, block)
        let inHole = isInside(r, holes)
        let hasData = extents.contains { $0.overlaps(Int(r.lowerBound)..<Int(r.upperBound)) }
        // Flags agree with the file system's own holes, and never hide data.
        XCTAssertEqual(seen.isHole[block], inHole, "\(ctx), block \(block)")
        if seen.isHole[block] {
          flagged += 1
          XCTAssertFalse(hasData, "\(ctx): block \(block) with data flagged as a hole")
        } else {
          XCTAssertTrue(
            seen.bytes[Int(r.lowerBound)..<Int(r.upperBound)] == content[Int(r.lowerBound)..<Int(r.upperBound)],
            "\(ctx), block \(block)")
        }
      }
      if blockSize == 4096 {
        // Blocks never written: 3-9, 11-19, 30-39, 41-63.
        XCTAssertEqual(flagged, 7 + 9 + 10 + 23, ctx)
      }
      XCTAssertGreaterThan(flagged, 0, "\(ctx): the file system should report holes")
    }
  }

  // MARK: Cancelling

  func testEarlyCancelDoesNotHang() throws {
    let content = [UInt8](repeating: 9, count: 2000 * 512)
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: UInt64(content.count))
    // Slow reads, one block per chunk, a small ring: the producer is busy or
    // waiting for a free slot when cancel arrives.
    for taken in [0, 1, 2, 5] {
      for settle in [false, true] {
        let source = FakeSource(content: content, delay: 200)
        let reader = ChunkReader(source: source, geometry: geometry, chunkBytes: 512, depth: 2)
        var got = 0
        for _ in 0..<taken {
          if try reader.next() != nil { got += 1 }
        }
        XCTAssertEqual(got, taken)
        // With `settle`, the producer has filled the ring and waits for a free slot.
        if settle { usleep(50_000) }
        XCTAssertTrue(
          finishes(within: 10) { reader.cancel() }, "cancel after \(taken) chunks (settled: \(settle)) hangs")
        XCTAssertTrue(finishes(within: 5) { reader.cancel() }, "a second cancel hangs")
        XCTAssertLessThan(source.reads.count, 2000, "the producer stopped early")
      }
    }
    // Dropping a reader without cancelling stops it too (deinit).
    XCTAssertTrue(
      finishes(within: 10) {
        let reader = ChunkReader(
          source: FakeSource(content: content, delay: 100), geometry: geometry, chunkBytes: 512, depth: 2)
        _ = try? reader.next()
      }, "deinit hangs")
  }

  func testCancelAfterTheEnd() throws {
    let content = [UInt8](repeating: 1, count: 10 * 512)
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: UInt64(content.count))
    let reader = ChunkReader(source: FakeSource(content: content), geometry: geometry, chunkBytes: 2048)
    var blocks = 0
    while let chunk = try reader.next() { blocks += chunk.blockCount }
    XCTAssertEqual(blocks, 10)
    XCTAssertTrue(finishes(within: 5) { reader.cancel() })
  }

  func testEmptySource() throws {
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: 0)
    let reader = ChunkReader(source: FakeSource(content: []), geometry: geometry)
    XCTAssertNil(try reader.next())
    XCTAssertTrue(finishes(within: 5) { reader.cancel() })
  }

  /// After the end, asking again should answer nil again, not block forever.
  func testNextAfterTheEndReturnsNilAgain() throws {
    let content = [UInt8](repeating: 1, count: 4 * 512)
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: UInt64(content.count))
    let reader = ChunkReader(source: FakeSource(content: content), geometry: geometry, chunkBytes: 2048)
    while try reader.next() != nil {}
    let box = ResultBox()
    let returned = finishes(within: 3) {
      do {
        let chunk = try reader.next()
        box.set(chunk == nil)
      } catch {
        box.set(false)
      }
    }
    XCTAssertTrue(returned, "next() after the end blocks forever")
    if returned { XCTAssertEqual(box.value, true, "next() after the end returns nil") }
  }
}

private final class ResultBox: @unchecked Sendable {
  private let lock = NSLock()
  private var _value: Bool?
  func set(_ v: Bool) { lock.withLock { _value = v } }
  var value: Bool? { lock.withLock { _value } }
}
