// The block stream parser: whole streams and one byte at a time give the same
// records, truncation anywhere is never taken as complete, a flipped byte
// anywhere is caught (by a record's CRC-32C or the END record's SHA-256), and
// hand-built adversarial records are refused with the record and its offset.
//
// Expected values come from the format table in StreamFormat.swift and from
// the images the tests build; the CRC-32C and SHA-256 used to build and check
// streams by hand are computed here (CRC) or by OpenSSL/liblz4 directly.

import CLZ4
import COpenSSL
import CShim
import Foundation
import Glibc
import XCTest

@testable import DualRestore

final class StreamParserTests: XCTestCase {

  // MARK: Records copied out of the parser

  /// A parsed record with its payload copied (the parser's points into the caller's bytes).
  enum Rec: Equatable, CustomStringConvertible {
    case preamble
    case header(StreamFormat.Header)
    case data(block: UInt64, length: Int, encoding: UInt8, payload: [UInt8])
    case zero(first: UInt64, count: UInt64)
    case end(StreamFormat.End)
    case lineage(StreamFormat.Lineage)
    case generation(StreamFormat.Generation)
    case sources(StreamFormat.Sources)
    case reference(first: UInt64, count: Int, image: Int, sourceFirst: UInt64, digests: [UInt8])
    case skipped(UInt16)

    init(_ r: StreamParser.Record) {
      switch r {
      case .preamble: self = .preamble
      case .header(let h): self = .header(h)
      case .data(let block, let length, let encoding, let payload):
        self = .data(block: block, length: length, encoding: encoding.rawValue, payload: Array(payload))
      case .zero(let first, let count): self = .zero(first: first, count: count)
      case .end(let e): self = .end(e)
      case .lineage(let l): self = .lineage(l)
      case .generation(let g): self = .generation(g)
      case .sources(let s): self = .sources(s)
      case .reference(let r):
        self = .reference(
          first: r.first, count: r.count, image: r.image, sourceFirst: r.sourceFirst, digests: Array(r.digests))
      case .skipped(let t): self = .skipped(t)
      }
    }

    var description: String {
      switch self {
      case .preamble: return "preamble"
      case .header(let h): return "header(\(h.geometry))"
      case .data(let b, let l, let e, let p): return "data(\(b), \(l), enc \(e), \(p.count) bytes)"
      case .zero(let f, let c): return "zero(\(f), \(c))"
      case .end(let e): return "end(\(e.dataBlocks), \(e.zeroBlocks), \(e.bytes), \(e.records))"
      case .lineage(let l): return "lineage(\(l.standsFor))"
      case .generation(let g): return "generation(\(g.generation))"
      case .sources(let s): return "sources(\(s.images.count) images, \(s.digestName))"
      case .reference(let f, let c, let i, let s, _): return "reference(\(f), \(c), image \(i) from \(s))"
      case .skipped(let t): return "skipped(\(t))"
      }
    }

    /// A shape without payloads, for comparing with expectations.
    var shape: String {
      switch self {
      case .data(let b, let l, let e, _): return "D\(b):\(l):\(e == 0 ? "raw" : "lz4")"
      case .zero(let f, let c): return "Z\(f)+\(c)"
      case .preamble: return "P"
      case .header: return "H"
      case .end: return "E"
      case .lineage: return "L"
      case .generation: return "G"
      case .sources: return "SRC"
      case .reference(let f, let c, let i, let s, _): return "R\(f)+\(c)@\(i):\(s)"
      case .skipped(let t): return "S\(t)"
      }
    }
  }

  /// Result of feeding a stream to a parser: records, where each started, and
  /// the error (if any) and unparsed bytes.
  struct Parsed {
    var records: [Rec] = []
    var starts: [Int] = []
    var error: String?
    var leftover = 0
    var parser = StreamParser()
  }

  /// Feeds all of `bytes` at once (the remainder after each record), then
  /// calls finish. Never throws; the error is in the result.
  static func parseWhole(_ bytes: [UInt8]) -> Parsed {
    var p = Parsed()
    var at = 0
    bytes.withUnsafeBytes { raw in
      do {
        while true {
          let rest = UnsafeRawBufferPointer(rebasing: raw[at...])
          guard let (record, consumed) = try p.parser.next(rest) else { break }
          p.records.append(Rec(record))
          p.starts.append(at)
          at += consumed
        }
        p.leftover = bytes.count - at
        try p.parser.finish(leftover: p.leftover)
      } catch {
        p.error = "\(error)"
        p.leftover = bytes.count - at
      }
    }
    return p
  }

  /// Reads a stream through StreamReader from a pipe (small streams) or a file.
  static func readWithReader(_ bytes: [UInt8], bufferSize: Int = 4096) -> (records: [Rec], error: String?) {
    var fds: [Int32] = [-1, -1]
    var path: String?
    let fd: Int32
    if bytes.count < 60000 {
      precondition(pipe(&fds) == 0)
      var done = 0
      while done < bytes.count {
        let n = bytes.withUnsafeBytes { Glibc.write(fds[1], $0.baseAddress! + done, bytes.count - done) }
        precondition(n > 0)
        done += n
      }
      close(fds[1])
      fd = fds[0]
    } else {
      let p = FileManager.default.temporaryDirectory.appendingPathComponent("spt-\(UUID().uuidString)").path
      _ = FileManager.default.createFile(atPath: p, contents: Data(bytes))
      path = p
      fd = open(p, O_RDONLY)
      precondition(fd >= 0)
    }
    defer {
      close(fd)
      if let path { unlink(path) }
    }
    let reader = StreamReader(fd: fd, name: "test-stream", bufferSize: bufferSize)
    var out: [Rec] = []
    do {
      while let r = try reader.next() { out.append(Rec(r)) }
      return (out, nil)
    } catch {
      return (out, "\(error)")
    }
  }

  // MARK: Independent encoders

  /// CRC-32C (Castagnoli, reflected 0x82F63B78), bit by bit: the reference
  /// the stream's checksums are compared with.
  static func crc32c(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes {
      crc ^= UInt32(b)
      for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
  }

  static func sha256(_ bytes: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 32)
    var length: UInt32 = 0
    let ok = bytes.withUnsafeBytes { raw in
      out.withUnsafeMutableBufferPointer {
        EVP_Digest(raw.baseAddress, raw.count, $0.baseAddress, &length, EVP_sha256(), nil)
      }
    }
    precondition(ok == 1 && length == 32)
    return out
  }

  static func le(_ v: UInt64, _ width: Int) -> [UInt8] {
    (0..<width).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
  }

  static let magic: [UInt8] = [0x44, 0x52, 0x53, 0x54, 0x52, 0x0D, 0x0A, 0x1A]

  static func preamble(version: UInt16 = 1, flags: UInt16 = 0, reserved: UInt32 = 0) -> [UInt8] {
    magic + le(UInt64(version), 2) + le(UInt64(flags), 2) + le(UInt64(reserved), 4)
  }

  /// A record framed by hand: type, flags, length, sequence, body, CRC-32C.
  static func record(type: UInt16, flags: UInt16 = 1, seq: UInt64, body: [UInt8], length: UInt32? = nil) -> [UInt8] {
    let head = le(UInt64(type), 2) + le(UInt64(flags), 2) + le(UInt64(length ?? UInt32(body.count)), 4) + le(seq, 8)
    return head + body + le(UInt64(crc32c(head + body)), 4)
  }

  static let streamIDBytes: [UInt8] = Array(0x10...0x1F)
  static let streamIDHex = "101112131415161718191a1b1c1d1e1f"

  static func headerBody(
    blockSize: UInt32 = 4096, deviceSize: UInt64, blockCount: UInt64? = nil, streamID: [UInt8] = streamIDBytes,
    base: [UInt8] = Array(repeating: 0, count: 16), started: Int64 = 1_700_000_000_123_456_789, coverage: UInt8 = 0,
    compression: UInt8 = 1, checksum: UInt8 = 1, mapID: [UInt8] = Array(repeating: 0, count: 16),
    covered: UInt64? = nil,
    name: String = "hand.img"
  ) -> [UInt8] {
    let count = blockCount ?? (deviceSize + UInt64(blockSize) - 1) / UInt64(blockSize)
    var b: [UInt8] = le(UInt64(blockSize), 4) + le(0, 4) + le(deviceSize, 8) + le(count, 8)
    b += streamID + base + le(UInt64(bitPattern: started), 8)
    b += [coverage, compression, checksum] + [0, 0, 0, 0, 0]
    b += mapID + le(covered ?? count, 8)
    let n = Array(name.utf8)
    b += le(UInt64(n.count), 2) + n
    return b
  }

  static func dataBody(block: UInt64, length: UInt32, encoding: UInt8 = 0, payload: [UInt8]) -> [UInt8] {
    le(block, 8) + le(UInt64(length), 4) + [encoding, 0, 0, 0] + payload
  }

  static func zeroBody(first: UInt64, count: UInt64) -> [UInt8] { le(first, 8) + le(count, 8) }

  static func endBody(data: UInt64, zero: UInt64, bytes: UInt64, records: UInt64, digest: [UInt8]) -> [UInt8] {
    le(data, 8) + le(zero, 8) + le(bytes, 8) + le(records, 8) + digest
  }

  /// preamble + HEADER (seq 0) for a device of `deviceSize` bytes in 4 KiB blocks.
  static func handStart(deviceSize: UInt64 = 10 * 4096 + 100, compression: UInt8 = 1) -> [UInt8] {
    preamble() + record(type: 1, seq: 0, body: headerBody(deviceSize: deviceSize, compression: compression))
  }

  // MARK: Images

  /// A temporary directory for one test.
  func tempDir() throws -> String {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent(
      "spt-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    addTeardownBlock { try? FileManager.default.removeItem(at: url) }
    return url.path
  }

  static func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
      state &+= 0x9E37_79B9_7F4A_7C15
      var z = state
      z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
      z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
      z ^= z >> 31
      for _ in 0..<8 where i < count {
        out[i] = UInt8(truncatingIfNeeded: z)
        z >>= 8
        i += 1
      }
    }
    return out
  }

  /// Text repeated: LZ4 makes it much smaller.
  static func compressible(_ count: Int, tag: Int) -> [UInt8] {
    let unit = Array("dualrestore block \(tag) compresses well. ".utf8)
    return (0..<count).map { unit[$0 % unit.count] }
  }

  /// Creates a sparse file of `size` bytes (ftruncate) and writes `parts` at their offsets.
  static func makeImage(_ path: String, size: Int, parts: [(Int, [UInt8])]) throws {
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw ToolkitError("open \(path) failed") }
    defer { close(fd) }
    guard ftruncate(fd, off_t(size)) == 0 else { throw ToolkitError("ftruncate \(path) failed") }
    for (offset, bytes) in parts {
      let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }
      guard n == bytes.count else { throw ToolkitError("pwrite \(path) failed") }
    }
    _ = fsync(fd)
  }

  static func snapshot(
    _ image: String, to out: String, blockSize: UInt32, compress: Bool = true, selection: BlockMap? = nil
  )
    throws -> [UInt8]
  {
    let device = try Device(path: image)
    let sink = try OutputSink(.file(out), what: "stream")
    _ = try SnapshotWriter.write(
      device, to: sink,
      options: SnapshotWriter.Options(blockSize: blockSize, selection: selection, compress: compress, workers: 3))
    try sink.finish()
    return Array(try Data(contentsOf: URL(fileURLWithPath: out)))
  }

  /// The small image (4 KiB blocks, 21 blocks, the last one 1000 bytes):
  ///   0-3 random, 4-6 zeros written densely, 7-8 compressible, 9-15 a hole,
  ///   16 random, 17 compressible, 18-19 a hole, 20 random (partial).
  static let smallSize = 20 * 4096 + 1000

  static func smallImageContent() -> (parts: [(Int, [UInt8])], content: [UInt8]) {
    let parts: [(Int, [UInt8])] = [
      (0, randomBytes(4 * 4096, seed: 11)),
      (4 * 4096, [UInt8](repeating: 0, count: 3 * 4096)),
      (7 * 4096, compressible(4096, tag: 7) + compressible(4096, tag: 8)),
      (16 * 4096, randomBytes(4096, seed: 16)),
      (17 * 4096, compressible(4096, tag: 17)),
      (20 * 4096, randomBytes(1000, seed: 20)),
    ]
    var content = [UInt8](repeating: 0, count: smallSize)
    for (o, b) in parts { content.replaceSubrange(o..<o + b.count, with: b) }
    return (parts, content)
  }

  /// Record shapes the small image must give (compressed).
  static let smallShapes = [
    "P", "H", "D0:4096:raw", "D1:4096:raw", "D2:4096:raw", "D3:4096:raw", "Z4+3", "D7:4096:lz4", "D8:4096:lz4",
    "Z9+7", "D16:4096:raw", "D17:4096:lz4", "Z18+2", "D20:1000:raw", "E",
  ]

  func smallStream(compress: Bool = true, file: StaticString = #filePath, line: UInt = #line) throws -> (
    stream: [UInt8], content: [UInt8], image: String
  ) {
    let dir = try tempDir()
    let image = dir + "/small.img"
    let (parts, content) = Self.smallImageContent()
    try Self.makeImage(image, size: Self.smallSize, parts: parts)
    let stream = try Self.snapshot(image, to: dir + "/small.stream", blockSize: 4096, compress: compress)
    return (stream, content, image)
  }

  /// Checks every DATA payload against the image content (LZ4 decoded by liblz4 here).
  func checkPayloads(
    _ records: [Rec], _ content: [UInt8], blockSize: Int, file: StaticString = #filePath, line: UInt = #line
  ) {
    for r in records {
      guard case .data(let block, let length, let encoding, let payload) = r else { continue }
      let start = Int(block) * blockSize
      let expected = Array(content[start..<start + length])
      if encoding == 0 {
        XCTAssertEqual(payload, expected, "raw block \(block)", file: file, line: line)
      } else {
        XCTAssertLessThan(
          payload.count, length, "an LZ4 payload must be smaller than the block", file: file, line: line)
        var out = [UInt8](repeating: 0, count: length)
        let n = payload.withUnsafeBytes { src in
          out.withUnsafeMutableBytes { dst in
            LZ4_decompress_safe(
              src.baseAddress!.assumingMemoryBound(to: CChar.self),
              dst.baseAddress!.assumingMemoryBound(to: CChar.self),
              Int32(src.count), Int32(length))
          }
        }
        XCTAssertEqual(Int(n), length, "LZ4 block \(block) decodes to \(n) bytes", file: file, line: line)
        XCTAssertEqual(out, expected, "LZ4 block \(block) content", file: file, line: line)
      }
    }
  }

  // MARK: (1) Whole streams

  func testWholeStreamGivesHeaderBlocksAndEnd() throws {
    let before = Instant.now().nanosecondsSinceEpoch
    let (stream, content, image) = try smallStream()
    let after = Instant.now().nanosecondsSinceEpoch
    let p = Self.parseWhole(stream)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), Self.smallShapes)
    XCTAssertEqual(p.leftover, 0)
    XCTAssertTrue(p.parser.sawEnd)
    XCTAssertEqual(p.parser.offset, UInt64(stream.count))
    XCTAssertEqual(p.parser.sequence, 14, "HEADER, 9 DATA, 3 ZERO, END")

    // Preamble bytes as the table gives them.
    XCTAssertEqual(Array(stream[0..<16]), Self.preamble())

    guard case .header(let h) = p.records[1] else { return XCTFail("no header") }
    XCTAssertEqual(h.geometry.blockSize, 4096)
    XCTAssertEqual(h.geometry.deviceSize, UInt64(Self.smallSize))
    XCTAssertEqual(h.geometry.blockCount, 21)
    XCTAssertEqual(h.coveredBlocks, 21)
    XCTAssertEqual(h.coverage, .all)
    XCTAssertEqual(h.compression, .lz4)
    XCTAssertTrue(h.baseStreamID.isNone)
    XCTAssertFalse(h.isIncremental)
    XCTAssertFalse(h.streamID.isNone)
    XCTAssertEqual(h.sourceName, image)
    XCTAssertGreaterThanOrEqual(h.started.nanosecondsSinceEpoch, before)
    XCTAssertLessThanOrEqual(h.started.nanosecondsSinceEpoch, after)

    guard case .end(let e) = p.records.last else { return XCTFail("no end") }
    XCTAssertEqual(e.dataBlocks, 9)
    XCTAssertEqual(e.zeroBlocks, 12)
    XCTAssertEqual(e.bytes, UInt64(Self.smallSize))
    XCTAssertEqual(e.records, 13)
    // The END digest is the SHA-256 of every byte before the END record (16 + 64 + 4 bytes).
    XCTAssertEqual(e.digest, Self.sha256(Array(stream[0..<(stream.count - 84)])))
    // Every record's CRC-32C matches the reference CRC over its 16 framing bytes and body.
    for (i, start) in p.starts.enumerated().dropFirst() {
      let end = i + 1 < p.starts.count ? p.starts[i + 1] : stream.count
      let crc = Array(stream[(end - 4)..<end])
      XCTAssertEqual(crc, Self.le(UInt64(Self.crc32c(Array(stream[start..<(end - 4)]))), 4), "record \(i - 1)")
    }

    // Blocks covered: each block exactly once, all 21.
    var covered = [Int](repeating: 0, count: 21)
    for r in p.records {
      if case .data(let b, _, _, _) = r { covered[Int(b)] += 1 }
      if case .zero(let f, let c) = r { for b in f..<f + c { covered[Int(b)] += 1 } }
    }
    XCTAssertEqual(covered, [Int](repeating: 1, count: 21))
    checkPayloads(p.records, content, blockSize: 4096)

    // The same stream through StreamReader, with a buffer far smaller than a record.
    let viaReader = Self.readWithReader(stream, bufferSize: 16)
    XCTAssertNil(viaReader.error)
    XCTAssertEqual(viaReader.records, p.records)
  }

  func testUncompressedStreamCarriesRawBlocks() throws {
    let (stream, content, _) = try smallStream(compress: false)
    let p = Self.parseWhole(stream)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), Self.smallShapes.map { $0.replacingOccurrences(of: "lz4", with: "raw") })
    guard case .header(let h) = p.records[1] else { return XCTFail("no header") }
    XCTAssertEqual(h.compression, StreamFormat.Compression.none)
    checkPayloads(p.records, content, blockSize: 4096)
    // 9 DATA records raw: 8 whole blocks and 1000 bytes, 3 ZERO, HEADER, END.
    let headerRecord = 20 + 98 + h.sourceName.utf8.count
    XCTAssertEqual(stream.count, 16 + headerRecord + 8 * (36 + 4096) + (36 + 1000) + 3 * 36 + 84)
  }

  func testSelectionCarriesOnlyTheMapsBlocks() throws {
    let dir = try tempDir()
    let image = dir + "/small.img"
    let (parts, content) = Self.smallImageContent()
    try Self.makeImage(image, size: Self.smallSize, parts: parts)
    var map = BlockMap(
      geometry: try BlockGeometry(blockSize: 4096, deviceSize: UInt64(Self.smallSize)), meaning: .selected)
    for b: UInt64 in [1, 5, 8, 9, 10, 11, 12, 20] { map.bits.set(b..<b + 1) }
    let stream = try Self.snapshot(image, to: dir + "/sel.stream", blockSize: 4096, selection: map)
    let p = Self.parseWhole(stream)
    XCTAssertNil(p.error)
    XCTAssertEqual(
      p.records.map(\.shape), ["P", "H", "D1:4096:raw", "Z5+1", "D8:4096:lz4", "Z9+4", "D20:1000:raw", "E"])
    guard case .header(let h) = p.records[1], case .end(let e) = p.records.last else { return XCTFail() }
    XCTAssertEqual(h.coverage, .map(id: map.mapID))
    XCTAssertEqual(h.coveredBlocks, 8)
    XCTAssertEqual(e.dataBlocks, 3)
    XCTAssertEqual(e.zeroBlocks, 5)
    XCTAssertEqual(e.bytes, 7 * 4096 + 1000)
    XCTAssertEqual(e.records, 6)
    checkPayloads(p.records, content, blockSize: 4096)
  }

  func testZeroRunAcrossReadChunksAndAHole() throws {
    // 64 KiB blocks over 9 MiB + 100 bytes: 145 blocks, more than one 8 MiB read chunk.
    let dir = try tempDir()
    let image = dir + "/big.img"
    let size = 9 << 20 + 100
    let b0 = Self.randomBytes(65536, seed: 1)
    let b140 = Self.randomBytes(65536, seed: 140)
    let tail = Self.randomBytes(100, seed: 144)
    try Self.makeImage(
      image, size: size,
      parts: [
        (0, b0), (140 * 65536, b140), (141 * 65536, [UInt8](repeating: 0, count: 3 * 65536)), (144 * 65536, tail),
      ])
    let stream = try Self.snapshot(image, to: dir + "/big.stream", blockSize: 65536)
    let p = Self.parseWhole(stream)
    XCTAssertNil(p.error)
    var data: [UInt64] = []
    var zero: [UInt64] = []
    for r in p.records {
      if case .data(let b, _, _, _) = r { data.append(b) }
      if case .zero(let f, let c) = r { zero += Array(f..<f + c) }
    }
    XCTAssertEqual(data, [0, 140, 144])
    XCTAssertEqual(zero, Array(1..<140) + [141, 142, 143])
    guard case .end(let e) = p.records.last else { return XCTFail("no END") }
    XCTAssertEqual(e.bytes, UInt64(size))
    XCTAssertEqual(e.dataBlocks, 3)
    XCTAssertEqual(e.zeroBlocks, 142)
    XCTAssertLessThan(stream.count, 3 * 65536 + 2000, "zeros and holes are not carried as data")
    var content = [UInt8](repeating: 0, count: size)
    content.replaceSubrange(0..<65536, with: b0)
    content.replaceSubrange(140 * 65536..<141 * 65536, with: b140)
    content.replaceSubrange(144 * 65536..<size, with: tail)
    checkPayloads(p.records, content, blockSize: 65536)
  }

  // MARK: (2) One byte at a time

  func testOneByteAtATimeGivesTheSameRecords() throws {
    let (stream, _, _) = try smallStream()
    let whole = Self.parseWhole(stream)
    XCTAssertNil(whole.error)

    var parser = StreamParser()
    var buffer: [UInt8] = []
    var records: [Rec] = []
    var offsets: [Int] = []
    var fed = 0
    for byte in stream {
      buffer.append(byte)
      fed += 1
      let got: (Rec, Int)? = try buffer.withUnsafeBytes { raw in
        guard let (r, n) = try parser.next(raw) else { return nil }
        return (Rec(r), n)
      }
      if let (r, n) = got {
        XCTAssertEqual(n, buffer.count, "a record is returned exactly when its last byte arrives (at byte \(fed))")
        records.append(r)
        offsets.append(fed - n)
        buffer.removeFirst(n)
      }
    }
    XCTAssertEqual(buffer.count, 0)
    XCTAssertNoThrow(try parser.finish(leftover: 0))
    XCTAssertEqual(records, whole.records)
    XCTAssertEqual(offsets, whole.starts)
    XCTAssertEqual(records.map(\.shape), Self.smallShapes)
    // Nothing more after END: an empty buffer is "need more", any byte an error.
    XCTAssertNil(try [UInt8]().withUnsafeBytes { try parser.next($0) }.map { _ in 1 })
    XCTAssertThrowsError(try [UInt8]([0]).withUnsafeBytes { try parser.next($0) }) { error in
      XCTAssertTrue("\(error)".contains("after the END record"), "\(error)")
    }
  }

  // MARK: (3) Truncation

  func testTruncationIsNeverComplete() throws {
    let (stream, _, _) = try smallStream()
    let whole = Self.parseWhole(stream)
    XCTAssertNil(whole.error)
    var cuts = Set<Int>()
    for (i, start) in whole.starts.enumerated() {
      let end = i + 1 < whole.starts.count ? whole.starts[i + 1] : stream.count
      cuts.insert(start)
      for d in [1, 2, 7, 8, 15, 16, 17, 31, 32, (end - start) / 2, end - start - 4, end - start - 1]
      where d > 0 && start + d < end {
        cuts.insert(start + d)
      }
    }
    cuts.remove(0)
    XCTAssertGreaterThan(cuts.count, 100)
    for cut in cuts.sorted() {
      let p = Self.parseWhole(Array(stream[0..<cut]))
      XCTAssertNotNil(p.error, "cut at \(cut) parsed as complete")
      XCTAssertTrue(p.error?.contains("truncated") ?? false, "cut at \(cut): \(p.error ?? "")")
      XCTAssertFalse(p.parser.sawEnd, "cut at \(cut)")
      XCTAssertFalse(p.records.contains { $0.shape == "E" }, "cut at \(cut)")
      // Records before the cut were all returned, none after it.
      let expectedCount = whole.starts.enumerated().filter { i, s in
        (i + 1 < whole.starts.count ? whole.starts[i + 1] : stream.count) <= cut
      }.count
      XCTAssertEqual(p.records.count, expectedCount, "cut at \(cut)")
      if cut >= 16 {
        // "record N at byte X": the record the cut fell in (or the one that never came).
        let n = expectedCount - 1
        let x = whole.starts[expectedCount]
        XCTAssertTrue(p.error?.contains("record \(n) at byte \(x)") ?? false, "cut at \(cut): \(p.error ?? "")")
      }
    }
    // The same through StreamReader.
    for cut in [5, 16, whole.starts[2], whole.starts[5] + 20, stream.count - 84, stream.count - 1] {
      let r = Self.readWithReader(Array(stream[0..<cut]))
      XCTAssertTrue(r.error?.contains("truncated") ?? false, "cut at \(cut): \(r.error ?? "accepted")")
      XCTAssertTrue(r.error?.hasPrefix("test-stream: ") ?? false, "the stream is named: \(r.error ?? "")")
    }
    // Empty input is not a stream at all.
    let empty = Self.parseWhole([])
    XCTAssertTrue(empty.error?.contains("empty input") ?? false, empty.error ?? "accepted")
  }

  // MARK: (4) Flipped bytes

  /// A tiny stream: 512-byte blocks; random, zeros, compressible, a hole, a partial block.
  func tinyStream() throws -> [UInt8] {
    let dir = try tempDir()
    let image = dir + "/t.img"
    try Self.makeImage(
      image, size: 6 * 512 + 100,
      parts: [
        (0, Self.randomBytes(512, seed: 3)), (512, [UInt8](repeating: 0, count: 1024)),
        (3 * 512, Self.compressible(512, tag: 3)),
        (4 * 512, Self.randomBytes(512, seed: 4)), (6 * 512, Self.randomBytes(100, seed: 6)),
      ])
    // Name it shortly so the stream stays small.
    return try Self.snapshot(image, to: dir + "/t.stream", blockSize: 512)
  }

  func testEveryFlippedByteIsCaught() throws {
    let stream = try tinyStream()
    let whole = Self.parseWhole(stream)
    XCTAssertNil(whole.error)
    XCTAssertEqual(
      whole.records.map(\.shape),
      ["P", "H", "D0:512:raw", "Z1+2", "D3:512:lz4", "D4:512:raw", "Z5+1", "D6:100:raw", "E"])
    XCTAssertNil(Self.readWithReader(stream).error)
    let recordIndex: (Int) -> Int = { offset in whole.starts.lastIndex { $0 <= offset }! }
    for offset in 0..<stream.count {
      for mask: UInt8 in [0x01, 0x80] {
        var bad = stream
        bad[offset] ^= mask
        let r = Self.readWithReader(bad)
        guard let error = r.error else {
          XCTFail("flip 0x\(String(mask, radix: 16)) at byte \(offset) read as a complete, clean stream")
          continue
        }
        XCTAssertFalse(r.records.contains { $0.shape == "E" }, "flip at \(offset): END returned")
        let i = recordIndex(offset)
        if i == 0 {
          // The preamble: magic, version, flags; its reserved bytes only the digest covers.
          switch offset {
          case 0..<8: XCTAssertTrue(error.contains("bad magic"), "\(offset): \(error)")
          case 8..<10: XCTAssertTrue(error.contains("version"), "\(offset): \(error)")
          case 10..<12: XCTAssertTrue(error.contains("flags"), "\(offset): \(error)")
          default: XCTAssertTrue(error.contains("digest does not match"), "\(offset): \(error)")
          }
        } else {
          // Record i-1 (sequence numbers start at 0 after the preamble).
          let where_ = "record \(i - 1) at byte \(whole.starts[i])"
          XCTAssertTrue(error.contains(where_), "flip at \(offset) should name \(where_): \(error)")
          // Nothing from the damaged record on was returned.
          XCTAssertEqual(r.records.count, i, "flip at \(offset)")
        }
      }
    }
  }

  func testFlipsInALargerStreamAreCaught() throws {
    let (stream, _, _) = try smallStream()
    let whole = Self.parseWhole(stream)
    XCTAssertNil(whole.error)
    var rng = SystemRandomNumberGenerator()
    var offsets = Set(whole.starts.flatMap { [$0, $0 + 4, $0 + 9, $0 + 16, $0 + 20] }.filter { $0 < stream.count })
    for _ in 0..<200 { offsets.insert(Int.random(in: 16..<stream.count, using: &rng)) }
    for offset in offsets.sorted() {
      var bad = stream
      bad[offset] ^= UInt8.random(in: 1...255, using: &rng)
      let r = Self.readWithReader(bad)
      XCTAssertNotNil(r.error, "flip at \(offset) accepted")
    }
  }

  /// The digest check names where the damage shows: the END record.
  func testDigestMismatchNamesTheEndRecord() throws {
    let stream = try tinyStream()
    let whole = Self.parseWhole(stream)
    var bad = stream
    bad[13] ^= 0x40  // preamble reserved: not checked by the parser, covered by the SHA-256
    let pure = Self.parseWhole(bad)
    XCTAssertNil(pure.error, "the parser alone does not see it (no digest)")
    let r = Self.readWithReader(bad)
    let endSeq = whole.starts.count - 2
    let endStart = whole.starts.last!
    XCTAssertTrue(r.error?.contains("digest does not match") ?? false, r.error ?? "accepted")
    XCTAssertTrue(
      r.error?.contains("record \(endSeq) at byte \(endStart)") ?? false,
      "the END record is record \(endSeq) at byte \(endStart) (the stream has \(stream.count) bytes): \(r.error ?? "")")
  }

  // MARK: (5) Hand-built records

  /// Parses hand-built bytes and returns the records and the error.
  func parse(_ bytes: [UInt8]) -> Parsed { Self.parseWhole(bytes) }

  func assertRefused(
    _ bytes: [UInt8], _ needles: [String], records: Int? = nil, file: StaticString = #filePath, line: UInt = #line
  ) {
    let p = parse(bytes)
    guard let error = p.error else { return XCTFail("accepted: \(p.records)", file: file, line: line) }
    for n in needles { XCTAssertTrue(error.contains(n), "\"\(error)\" lacks \"\(n)\"", file: file, line: line) }
    if let records { XCTAssertEqual(p.records.count, records, error, file: file, line: line) }
  }

  func testHandBuiltStreamParsesAsTheTableSays() throws {
    let payload = Self.randomBytes(4096, seed: 5)
    let tail = Self.randomBytes(100, seed: 6)
    var s = Self.handStart()
    let headerRecordLength = s.count - 16
    s += Self.record(type: 2, seq: 1, body: Self.dataBody(block: 2, length: 4096, payload: payload))
    s += Self.record(type: 3, seq: 2, body: Self.zeroBody(first: 3, count: 7))
    s += Self.record(type: 2, seq: 3, body: Self.dataBody(block: 10, length: 100, payload: tail))
    let digest = Self.sha256(s)
    s += Self.record(
      type: 4, seq: 4, body: Self.endBody(data: 2, zero: 7, bytes: 4096 + 7 * 4096 + 100, records: 4, digest: digest))
    let p = parse(s)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "D2:4096:raw", "Z3+7", "D10:100:raw", "E"])
    XCTAssertEqual(
      p.starts,
      [0, 16, 16 + headerRecordLength, 16 + headerRecordLength + 4132, 16 + headerRecordLength + 4168, s.count - 84])
    guard case .header(let h) = p.records[1] else { return XCTFail() }
    XCTAssertEqual(h.geometry.blockSize, 4096)
    XCTAssertEqual(h.geometry.deviceSize, 10 * 4096 + 100)
    XCTAssertEqual(h.streamID.description, Self.streamIDHex)
    XCTAssertTrue(h.baseStreamID.isNone)
    XCTAssertEqual(h.started.nanosecondsSinceEpoch, 1_700_000_000_123_456_789)
    XCTAssertEqual(h.sourceName, "hand.img")
    XCTAssertEqual(h.compression, .lz4)
    XCTAssertEqual(h.coverage, .all)
    XCTAssertEqual(h.coveredBlocks, 11)
    if case .data(_, _, _, let got) = p.records[2] { XCTAssertEqual(got, payload) }
    if case .end(let e) = p.records[5] { XCTAssertEqual(e.digest, digest) }
    // And StreamReader checks the digest we computed.
    XCTAssertNil(Self.readWithReader(s).error)

    // The writer's encoders produce the table's bytes.
    XCTAssertEqual(StreamFormat.preamble(), Self.preamble())
    XCTAssertEqual(StreamFormat.headerBody(h), Self.headerBody(deviceSize: 10 * 4096 + 100))
    XCTAssertEqual(
      StreamFormat.record(.zero, sequence: 2, body: StreamFormat.zeroBody(first: 3, count: 7)),
      Self.record(type: 3, seq: 2, body: Self.zeroBody(first: 3, count: 7)))
    let end = StreamFormat.End(dataBlocks: 2, zeroBlocks: 7, bytes: 9, records: 4, digest: digest)
    XCTAssertEqual(StreamFormat.endBody(end), Self.endBody(data: 2, zero: 7, bytes: 9, records: 4, digest: digest))

    // An incremental, map-covered header.
    let base = Array(repeating: UInt8(0xAB), count: 16)
    let mapID = Array(repeating: UInt8(0xCD), count: 16)
    let inc =
      Self.preamble()
      + Self.record(
        type: 1, seq: 0, body: Self.headerBody(deviceSize: 8192, base: base, coverage: 1, mapID: mapID, covered: 1))
    let q = parse(inc)
    guard q.records.count == 2, case .header(let ih) = q.records[1] else { return XCTFail("\(q.error ?? "")") }
    XCTAssertEqual(ih.baseStreamID.description, String(repeating: "ab", count: 16))
    XCTAssertTrue(ih.isIncremental)
    XCTAssertEqual(ih.coverage, .map(id: ID128(hex: String(repeating: "cd", count: 16))!))
    XCTAssertEqual(ih.coveredBlocks, 1)
  }

  func testBodyLengthOverTheLimitIsRefusedFromTheFramingAlone() throws {
    let start = Self.handStart()
    for length in [UInt32(StreamFormat.maximumBodyLength + 1), UInt32.max] {
      // Only the 16 framing bytes: the parser must refuse without waiting for the body.
      let head = Self.le(2, 2) + Self.le(1, 2) + Self.le(UInt64(length), 4) + Self.le(1, 8)
      assertRefused(start + head, ["record 1 at byte \(start.count)", "body length \(length)", "limit"], records: 2)
    }
    // At the limit it waits for more bytes, as it must for a 64 MiB block.
    let head = Self.le(2, 2) + Self.le(1, 2) + Self.le(UInt64(StreamFormat.maximumBodyLength), 4) + Self.le(1, 8)
    var parser = StreamParser()
    let bytes = start + head
    var at = 0
    try bytes.withUnsafeBytes { raw in
      while let (_, n) = try parser.next(UnsafeRawBufferPointer(rebasing: raw[at...])) { at += n }
    }
    XCTAssertEqual(at, start.count, "preamble and header consumed, the big record awaited")
    XCTAssertEqual(StreamFormat.maximumBodyLength, 64 * 1024 * 1024 + 4096)
  }

  func testOutOfPlaceRecordsAreRefused() throws {
    let start = Self.handStart()  // 11 blocks of 4 KiB, the last 100 bytes
    let at = start.count
    let block = Self.randomBytes(4096, seed: 9)
    func data(_ b: UInt64, seq: UInt64, length: UInt32 = 4096, payload: [UInt8]? = nil) -> [UInt8] {
      Self.record(type: 2, seq: seq, body: Self.dataBody(block: b, length: length, payload: payload ?? block))
    }
    // Wrong sequence numbers: a gap, a repeat, HEADER not 0.
    assertRefused(
      start + data(0, seq: 2), ["record 1 at byte \(at)", "sequence number 2 where 1 was expected"], records: 2)
    assertRefused(
      start + data(0, seq: 1) + data(1, seq: 1),
      ["record 2 at byte \(at + 4132)", "sequence number 1 where 2 was expected"],
      records: 3)
    assertRefused(
      Self.preamble() + Self.record(type: 1, seq: 1, body: Self.headerBody(deviceSize: 8192)),
      ["sequence number 1 where 0"])
    // DATA or ZERO before the HEADER; a second HEADER.
    assertRefused(Self.preamble() + data(0, seq: 0), ["record 0 at byte 16", "not a HEADER"], records: 1)
    assertRefused(
      Self.preamble() + Self.record(type: 3, seq: 0, body: Self.zeroBody(first: 0, count: 1)),
      ["record 0 at byte 16", "not a HEADER"])
    assertRefused(
      Self.preamble()
        + Self.record(
          type: 4, seq: 0,
          body: Self.endBody(data: 0, zero: 0, bytes: 0, records: 0, digest: Array(repeating: 0, count: 32))),
      ["not a HEADER"])
    assertRefused(
      start + Self.record(type: 1, seq: 1, body: Self.headerBody(deviceSize: 8192)), ["record 1", "second HEADER"])
    // A block past the end; a zero run past the end; an empty zero run.
    assertRefused(
      start + data(11, seq: 1), ["record 1 at byte \(at)", "block 11 is past the end of the device's 11 blocks"])
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 10, count: 2)), ["record 1", "out of range"])
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 11, count: 1)), ["record 1", "out of range"])
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 4, count: 0)), ["record 1", "out of range"])
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 1, count: UInt64.max)),
      ["record 1", "out of range"])
    // Out of order, repeated, overlapping.
    assertRefused(
      start + data(3, seq: 1) + data(2, seq: 2),
      ["record 2 at byte \(at + 4132)", "block 2 is out of order or repeated"], records: 3)
    assertRefused(start + data(3, seq: 1) + data(3, seq: 2), ["record 2", "block 3 is out of order or repeated"])
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 2, count: 3)) + data(4, seq: 2),
      ["record 2 at byte \(at + 36)", "block 4 is out of order or repeated"])
    assertRefused(
      start + data(5, seq: 1) + Self.record(type: 3, seq: 2, body: Self.zeroBody(first: 5, count: 1)),
      ["record 2", "block 5 is out of order or repeated"])
    // Block lengths: a whole block where the partial last one is 100 bytes, and a short one.
    assertRefused(start + data(10, seq: 1), ["record 1", "block 10 has length 4096, not 100"])
    assertRefused(
      start + data(1, seq: 1, length: 100, payload: Array(block[0..<100])), ["block 1 has length 100, not 4096"])
    // A raw payload of the wrong size; an LZ4 payload not smaller than the block; an unknown encoding.
    assertRefused(start + data(1, seq: 1, payload: Array(block[0..<4000])), ["raw block 1 has 4000 bytes, not 4096"])
    assertRefused(
      start + Self.record(type: 2, seq: 1, body: Self.dataBody(block: 1, length: 4096, encoding: 1, payload: block)),
      ["LZ4 payload of 4096 bytes"])
    assertRefused(
      start + Self.record(type: 2, seq: 1, body: Self.dataBody(block: 1, length: 4096, encoding: 7, payload: block)),
      ["unknown block encoding 7"])
    // LZ4 in a stream whose header says no compression.
    let plain = Self.handStart(compression: 0)
    assertRefused(
      plain
        + Self.record(
          type: 2, seq: 1, body: Self.dataBody(block: 1, length: 4096, encoding: 1, payload: Array(block[0..<50]))),
      ["LZ4 payload"])
    // Bad body sizes for ZERO and END; END with counts that do not match.
    assertRefused(
      start + Self.record(type: 3, seq: 1, body: Self.zeroBody(first: 1, count: 1) + [0]), ["ZERO record has 17 bytes"])
    assertRefused(
      start + Self.record(type: 4, seq: 1, body: Array(repeating: 0, count: 63)), ["END record has 63 bytes"])
    assertRefused(
      start + data(0, seq: 1)
        + Self.record(
          type: 4, seq: 2,
          body: Self.endBody(data: 2, zero: 0, bytes: 4096, records: 2, digest: Array(repeating: 0, count: 32))),
      ["record 2", "END record counts"])
    assertRefused(
      start + data(0, seq: 1)
        + Self.record(
          type: 4, seq: 2,
          body: Self.endBody(data: 1, zero: 0, bytes: 4096, records: 1, digest: Array(repeating: 0, count: 32))),
      ["END record counts"])
    // A DATA record too short for its fields.
    assertRefused(
      start + Self.record(type: 2, seq: 1, body: Array(repeating: 0, count: 10)), ["DATA record is too short"])
  }

  func testUnknownRecordTypesAndDataAfterEnd() throws {
    let start = Self.handStart()
    let extra = Self.record(type: 77, flags: 0, seq: 1, body: [1, 2, 3, 4, 5])
    let zero = Self.record(type: 3, seq: 2, body: Self.zeroBody(first: 0, count: 11))
    var s = start + extra + zero
    s += Self.record(
      type: 4, seq: 3, body: Self.endBody(data: 0, zero: 11, bytes: 10 * 4096 + 100, records: 3, digest: Self.sha256(s))
    )
    let p = parse(s)
    XCTAssertNil(p.error)
    XCTAssertEqual(p.records.map(\.shape), ["P", "H", "S77", "Z0+11", "E"])
    XCTAssertNil(Self.readWithReader(s).error, "a stream with a skipped record is complete")
    // An unknown type marked critical stops the reader; with other flag bits but not bit 0 it is skipped.
    assertRefused(
      start + Self.record(type: 77, flags: 1, seq: 1, body: [1, 2, 3]),
      ["record 1 at byte \(start.count)", "type 77", "critical"], records: 2)
    let skipped2 = parse(start + Self.record(type: 79, flags: 0x8000, seq: 1, body: []))
    XCTAssertEqual(skipped2.records.map(\.shape), ["P", "H", "S79"])
    XCTAssertTrue(skipped2.error?.contains("truncated") ?? false, "no END yet: \(skipped2.error ?? "")")
    XCTAssertFalse(skipped2.error?.contains("critical") ?? true)
    // Even an unknown record needs the HEADER first.
    assertRefused(Self.preamble() + Self.record(type: 77, flags: 0, seq: 0, body: []), ["not a HEADER"])
    // Anything after END: another record, or one stray byte.
    assertRefused(
      s + Self.record(type: 3, seq: 4, body: Self.zeroBody(first: 0, count: 1)),
      ["record 4 at byte \(s.count)", "after the END record"])
    assertRefused(s + [0], ["after the END record"])
    XCTAssertNotNil(Self.readWithReader(s + [0]).error)
  }

  func testBadPreambleAndHeaderFields() throws {
    // Bad magic: seen from the first byte, without waiting for 16.
    var parser = StreamParser()
    XCTAssertThrowsError(try [UInt8]([0x45]).withUnsafeBytes { try parser.next($0) }) { e in
      XCTAssertTrue("\(e)".contains("bad magic"), "\(e)")
    }
    var parser2 = StreamParser()
    XCTAssertNil(
      try Array(Self.magic[0..<5]).withUnsafeBytes { try parser2.next($0) }.map { _ in 1 }, "a good partial magic waits"
    )
    var wrong = Self.handStart()
    wrong[7] = 0x00
    assertRefused(wrong, ["bad magic"], records: 0)
    assertRefused(Array("hello, this is not a stream".utf8), ["bad magic"])
    // Version 3 (this build reads 1 and 2), and unknown preamble flags.
    assertRefused(
      Self.preamble(version: 3) + Array(Self.handStart()[16...]),
      ["version 3 is not supported (this build reads versions 1 and 2)"], records: 0)
    assertRefused(Self.preamble(version: 0), ["version 0"], records: 0)
    assertRefused(Self.preamble(flags: 4), ["flags 0x4"], records: 0)
    // Header fields out of range.
    func header(_ body: [UInt8]) -> [UInt8] { Self.preamble() + Self.record(type: 1, seq: 0, body: body) }
    assertRefused(
      header(Self.headerBody(blockSize: 1000, deviceSize: 8192, blockCount: 9)),
      ["record 0 at byte 16", "block size 1000"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, blockCount: 3)), ["block count 3"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, streamID: Array(repeating: 0, count: 16))), ["no id"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, coverage: 2)), ["unknown coverage 2"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, compression: 5)), ["unknown compression 5"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, checksum: 2)), ["unknown checksum algorithm 2"])
    assertRefused(header(Self.headerBody(deviceSize: 8192, covered: 3)), ["covers 3 of 2 blocks"])
    assertRefused(header(Array(Self.headerBody(deviceSize: 8192).prefix(60))), ["too short"])
    var longName = Self.headerBody(deviceSize: 8192, name: "abc")
    longName[96] = 50  // name length past the body
    assertRefused(header(longName), ["source name length 50"])
  }

  // MARK: (6) CRC-32C

  func testCRC32CKnownAnswer() {
    let digits = Array("123456789".utf8)
    XCTAssertEqual(digits.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }, 0xE306_9283)
    XCTAssertEqual(Self.crc32c(digits), 0xE306_9283, "the reference in this file")
    // Chained calls continue a CRC (the writer relies on it).
    let first = digits.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 4) }
    XCTAssertEqual(digits.withUnsafeBytes { dr_crc32c(first, $0.baseAddress! + 4, 5) }, 0xE306_9283)
    XCTAssertEqual(dr_crc32c(0, nil, 0), 0)
    // 32 zero bytes (RFC 3720 B.4): 0x8A9136AA.
    let zeros = [UInt8](repeating: 0, count: 32)
    XCTAssertEqual(zeros.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 32) }, 0x8A91_36AA)
    // Random lengths and alignments agree with the bitwise reference.
    let data = Self.randomBytes(5000, seed: 77)
    for (from, count) in [(0, 1), (1, 7), (3, 64), (5, 1000), (0, 5000), (13, 4987)] {
      let slice = Array(data[from..<from + count])
      XCTAssertEqual(
        data.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + from, count) }, Self.crc32c(slice), "\(from)+\(count)")
    }
  }
}
