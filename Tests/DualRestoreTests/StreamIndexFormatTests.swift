// The stream index (dualrestore-index(5)) in the library: the layout is the
// one the page documents; random indexes (data and zero entries, zero runs
// longer than 2^32 blocks, gaps, encrypted or not, standing for another
// stream or not) come back unchanged from encoding and decoding; the entry
// search agrees with a scan of every entry; the two CRCs cover every byte,
// so any byte changed and any file cut or lengthened is refused; every
// check of the entries refuses with its sentence; and the index a stored
// stream builds names exactly the stream's DATA and ZERO records, is kept,
// loaded again, and built again when it is stale or damaged.

import CShim
import DualRestoreFuzz
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class StreamIndexFormatTests: XCTestCase {
  typealias Format = StreamIndexFormat

  // MARK: Building indexes

  /// A random index the decoder must accept, and what it is made of.
  struct Made {
    var index: Format.Index
    var longRuns = 0
    var zeroEntries = 0
    var gaps = 0
  }

  static func randomIndex(_ rng: inout SplitMix64) throws -> Made {
    let blockSize = UInt32(1) << (9 + rng.next() % 18)
    let deviceSize: UInt64
    switch rng.next() % 4 {
    case 0: deviceSize = 1 + rng.next() % (1 << 20)
    case 1: deviceSize = 1 + rng.next() % (1 << 44)
    default: deviceSize = BlockGeometry.maximumDeviceSize - rng.next() % (1 << 30)
    }
    let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: deviceSize)
    let blockCount = geometry.blockCount
    let streamLength = UInt64(StreamFormat.preambleLength) + 200_000 + rng.next() % (1 << 40)
    func randomID() -> ID128 { rng.next() % 3 == 0 ? .none : ID128(high: rng.next(), low: rng.next() | 1) }
    let identity = Format.Identity(
      streamID: ID128(high: rng.next(), low: rng.next() | 1), baseStreamID: randomID(), streamLength: streamLength,
      endCRC: UInt32(truncatingIfNeeded: rng.next()), geometry: geometry,
      started: Instant(nanosecondsSinceEpoch: Int64(bitPattern: rng.next())), encrypted: rng.next() % 2 == 0,
      standsFor: randomID())
    var made = Made(index: Format.Index(identity: identity, entries: [], dataBlocks: 0, zeroBlocks: 0))
    var next: UInt64 = 0
    let wanted = rng.next() % 8 == 0 ? 0 : Int(rng.next() % 64)
    for _ in 0..<wanted where next < blockCount {
      let room = blockCount - next
      let gap: UInt64
      switch rng.next() % 4 {
      case 0, 1: gap = 0
      case 2: gap = rng.next() % min(room, 5)
      default: gap = rng.next() % room
      }
      let first = next + gap
      let left = blockCount - first
      let isData = rng.next() % 2 == 0
      let count: UInt64
      if isData {
        count = 1
      } else {
        switch rng.next() % 3 {
        case 0: count = 1 + rng.next() % min(left, 100)
        case 1: count = min(left, UInt64(UInt32.max))
        default: count = 1 + rng.next() % left
        }
      }
      let length = UInt32(StreamFormat.recordOverhead) + UInt32(rng.next() % 100_000)
      let preamble = UInt64(StreamFormat.preambleLength)
      let offset = preamble + rng.next() % (streamLength - preamble - UInt64(length) + 1)
      made.index.entries.append(
        Format.Entry(
          firstBlock: first, blockCount: count, offset: offset, sequence: rng.next() >> (rng.next() % 64),
          length: length, type: isData ? .data : .zero))
      if isData { made.index.dataBlocks += 1 } else { made.index.zeroBlocks += count }
      if !isData { made.zeroEntries += 1 }
      if count > UInt64(UInt32.max) { made.longRuns += 1 }
      if gap > 0 { made.gaps += 1 }
      next = first + count
    }
    return made
  }

  /// A small index: a DATA record, a ZERO run of three blocks, a gap, a DATA record.
  static func smallIndex(encrypted: Bool = false) throws -> Format.Index {
    let identity = Format.Identity(
      streamID: ID128(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210), baseStreamID: .none,
      streamLength: 100_000, endCRC: 0xDEAD_BEEF, geometry: try BlockGeometry(blockSize: 4096, deviceSize: 40960),
      started: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_000), encrypted: encrypted)
    return Format.Index(
      identity: identity,
      entries: [
        Format.Entry(firstBlock: 0, blockCount: 1, offset: 130, sequence: 1, length: 4132, type: .data),
        Format.Entry(firstBlock: 1, blockCount: 3, offset: 4262, sequence: 2, length: 36, type: .zero),
        Format.Entry(firstBlock: 6, blockCount: 1, offset: 4298, sequence: 3, length: 1000, type: .data),
      ], dataBlocks: 2, zeroBlocks: 3)
  }

  /// Encoded, then decoded: the sentence it is refused with, nil when accepted.
  func refusal(_ bytes: [UInt8]) -> String? {
    do {
      _ = try Format.decode(bytes)
      return nil
    } catch {
      return errorText(error)
    }
  }

  func refusal(_ index: Format.Index) -> String? { refusal(Format.encode(index)) }

  func le(_ bytes: [UInt8], _ at: Int, _ width: Int) -> UInt64 {
    (0..<width).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) }
  }

  func patched(_ bytes: [UInt8], at offset: Int, _ patch: [UInt8]) -> [UInt8] {
    var out = bytes
    out.replaceSubrange(offset..<offset + patch.count, with: patch)
    return out
  }

  func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
  func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

  // MARK: Layout

  func testTheLayoutIsTheDocumentedOne() throws {
    let index = try Self.smallIndex(encrypted: true)
    let b = Format.encode(index)
    XCTAssertEqual(b.count, 128 + 3 * 40 + 4)
    XCTAssertEqual(Array(b[0..<8]), [0x44, 0x52, 0x49, 0x44, 0x58, 0x0D, 0x0A, 0x1A])
    XCTAssertEqual(le(b, 8, 2), 1, "version")
    XCTAssertEqual(le(b, 10, 2), 1, "flags: encrypted")
    XCTAssertEqual(le(b, 12, 4), 40, "entry length")
    XCTAssertEqual(Array(b[16..<32]), index.identity.streamID.bytes, "stream id, most significant byte first")
    XCTAssertEqual(b[16], 0x01)
    XCTAssertEqual(Array(b[32..<48]), [UInt8](repeating: 0, count: 16), "no base")
    XCTAssertEqual(le(b, 48, 8), 100_000, "stream length")
    XCTAssertEqual(le(b, 56, 4), 4096, "block size")
    XCTAssertEqual(le(b, 60, 4), 0xDEAD_BEEF, "end CRC")
    XCTAssertEqual(le(b, 64, 8), 40960, "device size")
    XCTAssertEqual(le(b, 72, 8), 1_764_000_000_000_000_000, "instant")
    XCTAssertEqual(le(b, 80, 8), 3, "entries")
    XCTAssertEqual(le(b, 88, 8), 2, "data blocks")
    XCTAssertEqual(le(b, 96, 8), 3, "zero blocks")
    XCTAssertEqual(Array(b[104..<124]), [UInt8](repeating: 0, count: 20), "stands for nothing; reserved")
    XCTAssertEqual(le(b, 124, 4), UInt64(b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 124) }), "header CRC")
    // The second entry: the zero run.
    let e = 128 + 40
    XCTAssertEqual(le(b, e, 8), 1)
    XCTAssertEqual(le(b, e + 8, 8), 3)
    XCTAssertEqual(le(b, e + 16, 8), 4262)
    XCTAssertEqual(le(b, e + 24, 8), 2)
    XCTAssertEqual(le(b, e + 32, 4), 36)
    XCTAssertEqual(Array(b[e + 36..<e + 40]), [3, 0, 0, 0])
    XCTAssertEqual(b[128 + 36], 2, "DATA")
    XCTAssertEqual(
      le(b, b.count - 4, 4), UInt64(b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + 128, 120) }), "entries CRC")
    // An index of no entries: the trailer is the CRC of nothing.
    var empty = index
    (empty.entries, empty.dataBlocks, empty.zeroBlocks) = ([], 0, 0)
    let none = Format.encode(empty)
    XCTAssertEqual(none.count, 132)
    XCTAssertEqual(le(none, 128, 4), UInt64(dr_crc32c(0, nil, 0)))
    XCTAssertEqual(try Format.decode(none), empty)
    // In memory, as on disk, an entry takes 40 bytes (dualrestore-index(5), Size and memory).
    XCTAssertEqual(MemoryLayout<Format.Entry>.stride, 40)
  }

  // MARK: Round trips and the search

  func testRandomIndexesComeBackUnchanged() throws {
    let seed = testSeed(41)
    var rng = SplitMix64(seed: seed)
    var longRuns = 0
    var zeroEntries = 0
    var gaps = 0
    var empty = 0
    var encrypted = 0
    var standing = 0
    for i in 0..<400 {
      let made = try Self.randomIndex(&rng)
      let index = made.index
      let bytes = Format.encode(index)
      XCTAssertEqual(bytes.count, 132 + 40 * index.entries.count, "seed \(seed), index \(i)")
      let decoded: Format.Index
      do {
        decoded = try Format.decode(bytes)
      } catch {
        XCTFail("seed \(seed), index \(i): \(error)")
        continue
      }
      XCTAssertEqual(decoded, index, "seed \(seed), index \(i)")
      XCTAssertEqual(Format.encode(decoded), bytes, "seed \(seed), index \(i)")
      XCTAssertNil(FuzzEntryPoints.decodeStreamIndex(bytes), "seed \(seed), index \(i)")
      XCTAssertEqual(FuzzEntryPoints.repairStreamIndexChecksums(bytes), bytes, "seed \(seed), index \(i)")
      longRuns += made.longRuns
      zeroEntries += made.zeroEntries
      gaps += made.gaps
      empty += index.entries.isEmpty ? 1 : 0
      encrypted += index.identity.encrypted ? 1 : 0
      standing += index.identity.standsFor.isNone ? 0 : 1
    }
    // The generator reaches every kind of index it is meant to.
    XCTAssertGreaterThan(longRuns, 10, "seed \(seed): zero runs of more than 2^32 blocks")
    XCTAssertGreaterThan(zeroEntries, 1000, "seed \(seed)")
    XCTAssertGreaterThan(gaps, 1000, "seed \(seed)")
    XCTAssertGreaterThan(empty, 10, "seed \(seed)")
    XCTAssertGreaterThan(encrypted, 100, "seed \(seed)")
    XCTAssertGreaterThan(standing, 100, "seed \(seed)")
  }

  func testTheSearchFindsTheEntryAScanFinds() throws {
    let seed = testSeed(42)
    var rng = SplitMix64(seed: seed)
    var found = 0
    var missed = 0
    for i in 0..<300 {
      let index = try Self.randomIndex(&rng).index
      let blockCount = index.identity.geometry.blockCount
      var blocks: [UInt64] = [0, blockCount - 1, blockCount, .max]
      for e in index.entries {
        blocks += [e.firstBlock &- 1, e.firstBlock, e.firstBlock + (e.blockCount - 1) / 2, e.endBlock - 1, e.endBlock]
      }
      for _ in 0..<20 { blocks.append(rng.next() % blockCount) }
      for block in blocks {
        let scanned = index.entries.firstIndex { $0.firstBlock <= block && block < $0.endBlock }
        XCTAssertEqual(index.entry(for: block), scanned, "seed \(seed), index \(i), block \(block)")
        if scanned == nil { missed += 1 } else { found += 1 }
      }
    }
    XCTAssertGreaterThan(found, 10_000, "seed \(seed)")
    XCTAssertGreaterThan(missed, 1_000, "seed \(seed)")
  }

  // MARK: Damage

  func testEveryChangedByteIsRefused() throws {
    let bytes = Format.encode(try Self.smallIndex())
    XCTAssertNil(refusal(bytes))
    var checked = 0
    for at in bytes.indices {
      for flip in 1...255 {
        var damaged = bytes
        damaged[at] ^= UInt8(flip)
        XCTAssertNotNil(refusal(damaged), "byte \(at) changed by \(flip) was accepted")
        checked += 1
      }
    }
    XCTAssertEqual(checked, 252 * 255)
  }

  func testChangedBytesAreRefusedByTheirChecksum() throws {
    let bytes = Format.encode(try Self.smallIndex())
    let header = "the index header's checksum does not match: the index is damaged"
    let entries = "the index entries' checksum does not match: the index is damaged"
    XCTAssertEqual(refusal(patched(bytes, at: 20, [0x55])), header)
    XCTAssertEqual(refusal(patched(bytes, at: 124, [0x55])), header)
    XCTAssertEqual(refusal(patched(bytes, at: 80, le64(2))), header, "the count is under the header CRC")
    XCTAssertEqual(refusal(patched(bytes, at: 128 + 40 + 16, [0x55])), entries)
    XCTAssertEqual(refusal(patched(bytes, at: bytes.count - 1, [bytes[bytes.count - 1] ^ 1])), entries)
    XCTAssertEqual(refusal(patched(bytes, at: 0, [0x45])), "not a dualrestore stream index (bad magic)")
    XCTAssertEqual(
      refusal(patched(bytes, at: 8, [2])), "index format version 2 is not supported (this build reads version 1)")
  }

  func testCutOrLengthenedIndexesAreRefused() throws {
    let bytes = Format.encode(try Self.smallIndex())
    for cut in 0..<bytes.count {
      let message = refusal(Array(bytes[..<cut]))
      XCTAssertNotNil(message, "cut at \(cut) was accepted")
      if cut < 132 {
        XCTAssertEqual(message, "the index is \(cut) bytes, shorter than its header")
      } else {
        XCTAssertEqual(message, "the index says 3 entries but is \(cut) bytes long")
      }
    }
    var rng = SplitMix64(seed: 7)
    for extra in [1, 3, 4, 39, 40, 41, 80, 1000] {
      for tail in [[UInt8](repeating: 0, count: extra), rng.bytes(extra)] {
        XCTAssertEqual(refusal(bytes + tail), "the index says 3 entries but is \(bytes.count + extra) bytes long")
      }
    }
    // A whole entry added, the count and every checksum made right: it is
    // out of order.
    var longer = patched(bytes, at: 80, le64(4))
    longer.insert(contentsOf: Array(bytes[128..<168]), at: 248)
    XCTAssertEqual(
      refusal(FuzzEntryPoints.repairStreamIndexChecksums(longer)),
      "index entry 3 (blocks 0 to 1) is out of order or out of range")
  }

  func testEveryCheckOfTheEntriesRefusesWithItsSentence() throws {
    let good = try Self.smallIndex()
    func with(_ change: (inout Format.Index) -> Void) -> Format.Index {
      var index = good
      change(&index)
      return index
    }
    let order = "is out of order or out of range"
    // Out of order: the third entry before the second.
    XCTAssertEqual(
      refusal(with { $0.entries.swapAt(1, 2) }), "index entry 2 (blocks 1 to 4) \(order)")
    // Overlapping: the zero run reaches into the next DATA block.
    XCTAssertEqual(
      refusal(with { $0.entries[1].blockCount = 6 }), "index entry 2 (blocks 6 to 7) \(order)")
    XCTAssertEqual(
      refusal(with { $0.entries[2].firstBlock = 0 }), "index entry 2 (blocks 0 to 1) \(order)")
    // No blocks.
    XCTAssertEqual(
      refusal(with { $0.entries[1].blockCount = 0 }), "index entry 1 (blocks 1 to 1) \(order)")
    // Past the device's last block (10 blocks), and past 2^64.
    XCTAssertEqual(refusal(with { $0.entries[2].firstBlock = 10 }), "index entry 2 (blocks 10 to 11) \(order)")
    XCTAssertEqual(
      refusal(
        with {
          $0.entries[2] = Format.Entry(firstBlock: 9, blockCount: 2, offset: 4298, sequence: 3, length: 36, type: .zero)
        }),
      "index entry 2 (blocks 9 to 11) \(order)")
    XCTAssertEqual(
      refusal(with { $0.entries[1].blockCount = .max }),
      "index entry 1 (blocks 1 to 0) \(order)")
    // A DATA record of two blocks.
    XCTAssertEqual(
      refusal(with { $0.entries[2].blockCount = 2 }), "index entry 2 is a DATA record of 2 blocks")
    // The record outside the stream (100000 bytes): in the preamble, past
    // the end, shorter than a record's framing and CRC.
    XCTAssertEqual(
      refusal(with { $0.entries[0].offset = 15 }), "index entry 0 points at bytes 15 to 4147, outside the stream")
    XCTAssertEqual(
      refusal(with { $0.entries[0].offset = 100_000 - 4131 }),
      "index entry 0 points at bytes 95869 to 100001, outside the stream")
    XCTAssertNil(refusal(with { $0.entries[0].offset = 100_000 - 4132 }), "a record that ends the stream")
    XCTAssertEqual(
      refusal(with { $0.entries[0].offset = .max - 10 }),
      "index entry 0 points at bytes 18446744073709551605 to 4121, outside the stream")
    XCTAssertEqual(
      refusal(with { $0.entries[1].length = 19 }), "index entry 1 points at bytes 4262 to 4281, outside the stream")
    // Counts that disagree with the entries.
    XCTAssertEqual(
      refusal(with { $0.dataBlocks = 3 }),
      "the index counts 3 data and 3 zero blocks but its entries hold 2 and 3")
    XCTAssertEqual(
      refusal(with { $0.zeroBlocks = 0 }), "the index counts 2 data and 0 zero blocks but its entries hold 2 and 3")
    // No stream id; a geometry no device has.
    XCTAssertEqual(refusal(with { $0.identity.streamID = .none }), "the index names no stream id")

    // Fields encode() cannot get wrong, written here with their checksums made right.
    let bytes = Format.encode(good)
    func damaged(_ at: Int, _ patch: [UInt8]) -> String? {
      refusal(FuzzEntryPoints.repairStreamIndexChecksums(patched(bytes, at: at, patch)))
    }
    for type: UInt8 in [0, 1, 4, 5, 255] {
      XCTAssertEqual(damaged(128 + 40 + 36, [type]), "index entry 1 has record type \(type), neither DATA nor ZERO")
    }
    for at in 37..<40 {
      XCTAssertEqual(damaged(128 + 80 + at, [1]), "index entry 2 has reserved bytes that are not zero")
    }
    XCTAssertEqual(damaged(120, [0, 0, 0, 1]), "the index header's reserved bytes are not zero")
    XCTAssertEqual(damaged(10, [2, 0]), "the index uses flags 0x2 this build does not know")
    XCTAssertEqual(damaged(10, [0, 0x80]), "the index uses flags 0x8000 this build does not know")
    XCTAssertEqual(damaged(12, le32(48)), "the index's entries are 48 bytes, not 40")
    XCTAssertEqual(
      damaged(56, le32(3)),
      "the index names a device the toolkit cannot have: block size 3 is not a power of two from 512 B to 64 MiB")
    XCTAssertEqual(
      damaged(64, le64(.max)),
      "the index names a device the toolkit cannot have: device size 18446744073709551615 exceeds the largest "
        + "supported, 4 EiB")
    XCTAssertEqual(
      damaged(80, le64(.max)), "the index says 18446744073709551615 entries but is 252 bytes long")
    // The same changes with the checksums as they were: refused by them.
    XCTAssertEqual(
      refusal(patched(bytes, at: 128 + 40 + 36, [4])),
      "the index entries' checksum does not match: the index is damaged")
    XCTAssertEqual(
      refusal(patched(bytes, at: 56, le32(3))), "the index header's checksum does not match: the index is damaged")
  }

  // MARK: The index of a real stream

  /// An image of 4 KiB blocks: random, zeros written, compressible, a hole
  /// of 5 blocks, random, a partial last block.
  func makeImage(_ dir: String, seed: UInt64) throws -> String {
    var rng = SplitMix64(seed: seed)
    let path = dir + "/disk.img"
    let unit = Array("a stored stream is read at random through its index. ".utf8)
    try createSparseFile(path, size: 12 * 4096 + 1000)
    try writeBytes(path, rng.bytes(4096) + [UInt8](repeating: 0, count: 3 * 4096), at: 0)
    try writeBytes(path, (0..<4096).map { unit[$0 % unit.count] }, at: 4 * 4096)
    try writeBytes(path, rng.bytes(2 * 4096 + 1000), at: 10 * 4096)
    return path
  }

  func snapshot(_ image: String, to out: String, secret: StreamSecret?, selection: BlockMap? = nil) throws {
    let sink = try OutputSink(.file(out), what: "stream")
    _ = try SnapshotWriter.write(
      try Device(path: image), to: sink,
      options: SnapshotWriter.Options(blockSize: 4096, selection: selection, workers: 2, encryption: secret))
    try sink.finish()
  }

  /// The entries an index of `bytes` must have, from the pure parser: each
  /// DATA and ZERO record where it starts, its sequence number as framed,
  /// its length as consumed; and the END record's counts.
  func expectedEntries(_ bytes: [UInt8], secret: StreamSecret?) throws -> (
    entries: [Format.Entry], end: StreamFormat.End, header: StreamFormat.Header
  ) {
    var parser = StreamParser(secret: secret)
    var at = 0
    var entries: [Format.Entry] = []
    var end: StreamFormat.End?
    var header: StreamFormat.Header?
    try bytes.withUnsafeBytes { raw in
      while let (record, consumed) = try parser.next(UnsafeRawBufferPointer(rebasing: raw[at...])) {
        let sequence = at >= StreamFormat.preambleLength ? le(bytes, at + 8, 8) : 0
        switch record {
        case .data(let block, _, _, _):
          entries.append(
            Format.Entry(
              firstBlock: block, blockCount: 1, offset: UInt64(at), sequence: sequence, length: UInt32(consumed),
              type: .data))
        case .zero(let first, let count):
          entries.append(
            Format.Entry(
              firstBlock: first, blockCount: count, offset: UInt64(at), sequence: sequence,
              length: UInt32(consumed), type: .zero))
        case .end(let e): end = e
        case .header(let h): header = h
        default: break
        }
        at += consumed
      }
      try parser.finish(leftover: bytes.count - at)
    }
    XCTAssertEqual(at, bytes.count)
    return (entries, try XCTUnwrap(end), try XCTUnwrap(header))
  }

  func testAStoredStreamIndexesExactlyItsRecordsAndKeepsTheIndex() throws {
    let dir = try makeTempDirectory()
    let image = try makeImage(dir, seed: testSeed(43))
    let secret = try StreamSecret(key: (0..<32).map { UInt8($0 &* 5 &+ 1) })
    for encrypted in [false, true] {
      let what = encrypted ? "encrypted" : "plain"
      let streamPath = dir + "/\(what).stream"
      try snapshot(image, to: streamPath, secret: encrypted ? secret : nil)
      let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: streamPath)))
      let expected = try expectedEntries(bytes, secret: encrypted ? secret : nil)
      XCTAssertTrue(expected.entries.contains { $0.type == .zero && $0.blockCount > 1 }, "\(what): a zero run")
      XCTAssertGreaterThanOrEqual(expected.entries.filter { $0.type == .data }.count, 5, what)

      let indexPath = dir + "/\(what).index/s.dridx"
      try FileManager.default.createDirectory(atPath: dir + "/\(what).index", withIntermediateDirectories: true)
      func open() throws -> StoredStream {
        try StoredStream(
          source: try Device(path: streamPath), name: streamPath, secret: encrypted ? secret : nil,
          indexPath: { _ in indexPath })
      }
      let built = try open()
      XCTAssertEqual(built.indexOrigin, .built(kept: indexPath, why: "there is no index at \(indexPath)"), what)
      let index = built.index
      XCTAssertEqual(index.entries, expected.entries, what)
      XCTAssertEqual(index.dataBlocks, expected.end.dataBlocks, what)
      XCTAssertEqual(index.zeroBlocks, expected.end.zeroBlocks, what)
      let id = index.identity
      XCTAssertEqual(id.streamID, expected.header.streamID, what)
      XCTAssertEqual(id.baseStreamID, .none, what)
      XCTAssertEqual(id.streamLength, UInt64(bytes.count), what)
      XCTAssertEqual(UInt64(id.endCRC), le(bytes, bytes.count - 4, 4), what)
      XCTAssertEqual(id.geometry, expected.header.geometry, what)
      XCTAssertEqual(id.started, expected.header.started, what)
      XCTAssertEqual(id.encrypted, encrypted, what)
      XCTAssertEqual(id.standsFor, .none, what)
      // Kept as documented, and mode 0600 (less the umask).
      let kept = Array(try Data(contentsOf: URL(fileURLWithPath: indexPath)))
      XCTAssertEqual(kept, Format.encode(index), what)
      var st = stat()
      XCTAssertEqual(stat(indexPath, &st), 0)
      XCTAssertEqual(st.st_mode & 0o077, 0, "\(what): the index is private")
      // Opened again: loaded, the same.
      let loaded = try open()
      XCTAssertEqual(loaded.indexOrigin, .loaded(indexPath), what)
      XCTAssertEqual(loaded.index, index, what)

      // Damaged: refused, built again, replaced.
      var damaged = kept
      damaged[128 + 5] ^= 0x10
      try Data(damaged).write(to: URL(fileURLWithPath: indexPath))
      let rebuilt = try open()
      XCTAssertEqual(
        rebuilt.indexOrigin,
        .built(
          kept: indexPath,
          why: "the index \(indexPath) is not usable: the index entries' checksum does not match: the index is damaged"),
        what)
      XCTAssertEqual(rebuilt.index, index, what)
      XCTAssertEqual(Array(try Data(contentsOf: URL(fileURLWithPath: indexPath))), kept, what)

      // Stale: an index of another stream, its checksums right.
      var other = index
      other.identity.streamID = ID128(high: 1, low: 1)
      try Data(Format.encode(other)).write(to: URL(fileURLWithPath: indexPath))
      let stale = try open()
      XCTAssertEqual(
        stale.indexOrigin,
        .built(kept: indexPath, why: "the index \(indexPath) describes another stream or an older version of it"),
        what)
      XCTAssertEqual(stale.index, index, what)
      XCTAssertEqual(Array(try Data(contentsOf: URL(fileURLWithPath: indexPath))), kept, what)
      // Stale too when any one compared field differs.
      let changes: [(String, (inout Format.Identity) throws -> Void)] = [
        ("base", { $0.baseStreamID = ID128(high: 2, low: 2) }),
        ("length", { $0.streamLength -= 1 }),
        ("end CRC", { $0.endCRC ^= 1 }),
        ("encrypted", { $0.encrypted.toggle() }),
        ("block size", { $0.geometry = try BlockGeometry(blockSize: 8192, deviceSize: $0.geometry.deviceSize) }),
        ("device size", { $0.geometry = try BlockGeometry(blockSize: 4096, deviceSize: $0.geometry.deviceSize + 1) }),
      ]
      for (field, change) in changes {
        var wrong = index
        try change(&wrong.identity)
        try Data(Format.encode(wrong)).write(to: URL(fileURLWithPath: indexPath))
        guard case .built = try open().indexOrigin else {
          XCTFail("\(what): an index of another \(field) was used")
          continue
        }
        XCTAssertEqual(Array(try Data(contentsOf: URL(fileURLWithPath: indexPath))), kept, "\(what), \(field)")
      }
    }
  }

  func testAnIncrementalStreamIndexesOnlyItsBlocks() throws {
    let dir = try makeTempDirectory()
    let image = try makeImage(dir, seed: testSeed(44))
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 12 * 4096 + 1000)
    var map = BlockMap(
      geometry: geometry, deviceName: "disk", mapID: ID128(high: 5, low: 6),
      trackingStarted: Instant(nanosecondsSinceEpoch: 1))
    map.bits.set(2..<3)
    map.bits.set(4..<9)
    map.bits.set(12..<13)
    let streamPath = dir + "/inc.stream"
    let sink = try OutputSink(.file(streamPath), what: "stream")
    _ = try SnapshotWriter.write(
      try Device(path: image), to: sink,
      options: SnapshotWriter.Options(
        blockSize: 4096, selection: map, baseStreamID: ID128(high: 7, low: 8), workers: 2))
    try sink.finish()
    let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: streamPath)))
    let stream = try StoredStream(
      source: try Device(path: streamPath), name: streamPath, secret: nil, indexPath: { _ in nil })
    XCTAssertEqual(stream.indexOrigin, .built(kept: nil, why: "no index was kept"))
    XCTAssertEqual(stream.index.entries, try expectedEntries(bytes, secret: nil).entries)
    XCTAssertEqual(stream.identity.baseStreamID, ID128(high: 7, low: 8))
    // Blocks outside the map have no entry; those in it have one each.
    for block in UInt64(0)..<13 {
      XCTAssertEqual(stream.index.entry(for: block) != nil, map.bits[block], "block \(block)")
    }
  }
}
