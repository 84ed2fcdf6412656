// Streams with references (format version 2), in the library: what
// snapshot --have writes and what every reader refuses.
//
// - Round trip: the writer, given an index of real signatures, names each
//   block the receiver holds in a REFERENCE run (preferring the block's own
//   place), and the device rebuilt from the records, each referenced block
//   taken from its image and its digest checked here, is the source; the
//   SOURCES, REFERENCE and END bodies are the bytes the table in
//   StreamFormat.swift gives, encoded independently here.
// - Damage: every byte of a small version 2 stream, plain or encrypted,
//   flipped in several ways, is refused (CRC, tag or digest), naming the
//   record it fell in, and nothing from that record on is returned.
// - Semantics: each check of the parser on SOURCES, REFERENCE and the END of
//   version 2 refuses a hand-built stream with its own sentence.
// - The signature index: every block that is not zeros is found at every
//   place it is, zeros are left out, memory is 16 bytes per signed block,
//   the in-place sort agrees with the standard library's on 10^6 entries,
//   and digests shorter than 16 bytes or mixed block sizes are refused.

import CLZ4
import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class StreamReferencesTests: XCTestCase {
  typealias Rec = StreamParserTests.Rec
  static let bs = 4096

  // MARK: Helpers

  static func sha256(_ bytes: some Collection<UInt8>) -> [UInt8] { StreamParserTests.sha256(Array(bytes)) }
  static func le(_ v: UInt64, _ width: Int) -> [UInt8] { StreamParserTests.le(v, width) }

  /// Block `i` of `content` in blocks of `size` (the last one may be short).
  static func block(_ content: [UInt8], _ i: Int, _ size: Int = bs) -> ArraySlice<UInt8> {
    content[(i * size)..<min((i + 1) * size, content.count)]
  }

  /// `content` written densely to a new file in `dir`.
  func image(_ dir: String, _ name: String, _ content: [UInt8]) throws -> String {
    let path = dir + "/" + name
    try writeDenseFile(path, content)
    return path
  }

  /// A signature of `path` beside it.
  @discardableResult
  func sign(_ path: String, blockSize: UInt32 = UInt32(bs), digest: String = "sha256") throws -> String {
    let signature = path + ".\(blockSize).\(digest).sig"
    _ = try Signer.sign(
      Device(path: path), algorithm: DigestAlgorithm(named: digest), blockSize: blockSize, to: .file(signature),
      progress: false)
    return signature
  }

  func index(_ signatures: [String], blockSize: UInt32? = nil) throws -> SignatureIndex {
    try SignatureIndex(signatures: signatures.map { try SignatureReader(path: $0) }, blockSize: blockSize)
  }

  /// The stream snapshot --have writes of `path`, with `have` as the index.
  func snapshot(
    _ path: String, have: SignatureIndex?, blockSize: UInt32 = UInt32(bs), secret: StreamSecret? = nil
  ) throws -> (bytes: [UInt8], summary: SnapshotWriter.Summary) {
    let out = try makeTempDirectory() + "/s.stream"
    let sink = try OutputSink(.file(out), what: "stream")
    var options = SnapshotWriter.Options(blockSize: blockSize, workers: 3, encryption: secret)
    options.have = have
    let summary = try SnapshotWriter.write(try Device(path: path), to: sink, options: options)
    try sink.finish()
    return (try readFileBytes(out), summary)
  }

  /// Reads `bytes` as merge-snapshot does (the END digest checked), from memory.
  static func read(_ bytes: [UInt8], secret: StreamSecret? = nil) -> (records: [Rec], error: String?) {
    let reader = StreamReader(bytes: bytes, name: "v2", bufferSize: 4096, chunk: 1000, secret: secret)
    var records: [Rec] = []
    do {
      while let r = try reader.next() { records.append(Rec(r)) }
      return (records, nil)
    } catch {
      return (records, "\(error)")
    }
  }

  /// The device a stream's records describe: DATA decoded, ZERO runs, and
  /// each referenced block taken from `images` at the place its record names,
  /// its digest checked against the record's first.
  func rebuild(
    _ records: [Rec], size: Int, images: [[UInt8]], blockSize: Int = bs, file: StaticString = #filePath,
    line: UInt = #line
  ) -> [UInt8] {
    var out = [UInt8](repeating: 0xEE, count: size)
    func put(_ b: Int, _ bytes: some Collection<UInt8>) {
      out.replaceSubrange((b * blockSize)..<(b * blockSize + bytes.count), with: bytes)
    }
    for r in records {
      switch r {
      case .data(let b, let length, let encoding, let payload):
        if encoding == 0 {
          put(Int(b), payload)
        } else {
          var decoded = [UInt8](repeating: 0, count: length)
          let n = payload.withUnsafeBytes { src in
            decoded.withUnsafeMutableBytes { dst in
              LZ4_decompress_safe(
                src.baseAddress!.assumingMemoryBound(to: CChar.self),
                dst.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(src.count), Int32(length))
            }
          }
          XCTAssertEqual(Int(n), length, "LZ4 block \(b)", file: file, line: line)
          put(Int(b), decoded)
        }
      case .zero(let first, let count):
        for b in first..<first + count {
          put(Int(b), [UInt8](repeating: 0, count: min(blockSize, size - Int(b) * blockSize)))
        }
      case .reference(let first, let count, let image, let sourceFirst, let digests):
        XCTAssertEqual(digests.count, count * 32, file: file, line: line)
        for i in 0..<count {
          let content = Self.block(images[image], Int(sourceFirst) + i, blockSize)
          XCTAssertEqual(
            Array(digests[(i * 32)..<((i + 1) * 32)]), Self.sha256(content),
            "block \(first + UInt64(i)): the digest is that of block \(sourceFirst + UInt64(i)) of image \(image)",
            file: file, line: line)
          put(Int(first) + i, content)
        }
      default: break
      }
    }
    return out
  }

  // MARK: Hand-built streams (the table in StreamFormat.swift)

  /// A SOURCES body, encoded here: digest length, image count, reserved,
  /// the digest name NUL-padded to 16, then each image.
  static func sourcesBody(
    digestLength: UInt8 = 32, digestName: String = "sha256", count: UInt8? = nil,
    images: [(id: [UInt8], size: UInt64, blockSize: UInt32, signed: UInt64, name: String)], reserved: UInt8 = 0
  ) -> [UInt8] {
    var b: [UInt8] = [digestLength, count ?? UInt8(images.count), reserved, 0, 0, 0, 0, 0]
    let name = Array(digestName.utf8)
    b += name + [UInt8](repeating: 0, count: 16 - name.count)
    for i in images {
      let n = Array(i.name.utf8)
      b += i.id + le(i.size, 8) + le(UInt64(i.blockSize), 4) + le(0, 4) + le(i.signed, 8) + le(UInt64(n.count), 2)
      b += [UInt8](repeating: 0, count: 6) + n
    }
    return b
  }

  /// A REFERENCE body, encoded here; `digests` defaults to `count` distinct ones.
  static func referenceBody(
    first: UInt64, count: UInt32, image: UInt8, source: UInt64, digests: [UInt8]? = nil, reserved: [UInt8] = [0, 0, 0]
  ) -> [UInt8] {
    let d = digests ?? (0..<Int(count)).flatMap { sha256(le(UInt64($0) &+ first, 8)) }
    return le(first, 8) + le(UInt64(count), 4) + [image] + reserved + le(source, 8) + d
  }

  /// A version 2 END body, encoded here.
  static func endBody(
    data: UInt64, zero: UInt64, bytes: UInt64, records: UInt64, digest: [UInt8], referenced: UInt64,
    reserved: UInt64 = 0
  ) -> [UInt8] {
    StreamParserTests.endBody(data: data, zero: zero, bytes: bytes, records: records, digest: digest)
      + le(referenced, 8) + le(reserved, 8)
  }

  /// The hand-built device: 10 blocks of 4 KiB and 100 bytes (11 blocks).
  static let deviceSize: UInt64 = 10 * 4096 + 100
  static let image0ID = [UInt8](repeating: 0xA0, count: 16)
  static let image1ID = [UInt8](repeating: 0xA1, count: 16)
  /// Image 0: 8 blocks and 100 bytes (9 blocks, the last short); image 1: 20 whole blocks.
  static let handImages: [(id: [UInt8], size: UInt64, blockSize: UInt32, signed: UInt64, name: String)] = [
    (image0ID, 8 * 4096 + 100, 4096, 9, "img0"), (image1ID, 20 * 4096, 4096, 20, "img1"),
  ]
  static let image0 = "image 0 (img0, signature \(String(repeating: "a0", count: 16)))"
  static let image1 = "image 1 (img1, signature \(String(repeating: "a1", count: 16)))"

  /// A stream built record by record; `starts` holds where each record begins.
  struct Hand {
    var bytes: [UInt8]
    var sequence: UInt64 = 0
    var starts: [Int] = []

    /// The preamble of `version` and the HEADER of the hand-built device;
    /// with `sources`, the SOURCES record naming the two images.
    init(version: UInt16 = 2, sources: Bool = true) {
      bytes = StreamParserTests.preamble(version: version)
      add(1, StreamParserTests.headerBody(deviceSize: StreamReferencesTests.deviceSize))
      if sources { add(7, StreamReferencesTests.sourcesBody(images: StreamReferencesTests.handImages)) }
    }

    mutating func add(_ type: UInt16, _ body: [UInt8], flags: UInt16 = 1) {
      starts.append(bytes.count)
      bytes += StreamParserTests.record(type: type, flags: flags, seq: sequence, body: body)
      sequence += 1
    }

    mutating func reference(_ first: UInt64, _ count: UInt32, image: UInt8, source: UInt64) {
      add(8, StreamReferencesTests.referenceBody(first: first, count: count, image: image, source: source))
    }

    mutating func data(_ b: UInt64, length: UInt32 = 4096) {
      add(2, StreamParserTests.dataBody(block: b, length: length, payload: [UInt8](repeating: 7, count: Int(length))))
    }

    mutating func zero(_ first: UInt64, _ count: UInt64) {
      add(3, StreamParserTests.zeroBody(first: first, count: count))
    }

    mutating func end(data: UInt64, zero: UInt64, bytes: UInt64, referenced: UInt64) {
      let digest = StreamReferencesTests.sha256(self.bytes)
      add(
        4,
        StreamReferencesTests.endBody(
          data: data, zero: zero, bytes: bytes, records: sequence, digest: digest, referenced: referenced))
    }

    /// "record N at byte X" of the record added last.
    var last: String { "record \(starts.count - 1) at byte \(starts[starts.count - 1])" }
  }

  func assertRefused(
    _ hand: Hand, _ sentence: String, file: StaticString = #filePath, line: UInt = #line
  ) {
    let p = StreamParserTests.parseWhole(hand.bytes)
    let expected = "\(hand.last): \(sentence)"
    XCTAssertEqual(p.error, expected, file: file, line: line)
    XCTAssertEqual(p.records.count, hand.starts.count, "every record before the refused one", file: file, line: line)
  }

  // MARK: Round trips

  /// Two held images and a source made of their blocks, moved, in place
  /// and new: the writer's records, their bytes, and the device rebuilt.
  func testTheWriterReferencesWhatTheImagesHoldAndTheStreamRebuildsTheSource() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: 2026)
    let bs = Self.bs
    // Held image 0: 24 blocks and a 1000-byte tail; block 6 zeros, block 9 a copy of block 5.
    var h0 = g.bytes(24 * bs + 1000)
    h0.replaceSubrange((6 * bs)..<(7 * bs), with: [UInt8](repeating: 0, count: bs))
    h0.replaceSubrange((9 * bs)..<(10 * bs), with: Self.block(h0, 5))
    // Held image 1: 16 blocks, block 15 zeros.
    var h1 = g.bytes(16 * bs)
    h1.replaceSubrange((15 * bs)..<(16 * bs), with: [UInt8](repeating: 0, count: bs))
    let unit = Array("references name what the receiver holds. ".utf8)
    let text = (0..<bs).map { unit[$0 % unit.count] }
    var x: [UInt8] = []
    x += g.bytes(bs)  // 0: new
    x += h0[(1 * bs)..<(4 * bs)]  // 1-3: image 0's, in place
    x += [UInt8](repeating: 0, count: bs)  // 4: zeros
    x += h1[(2 * bs)..<(5 * bs)]  // 5-7: image 1's 2-4
    x += text  // 8: new, compressible
    x += Self.block(h0, 5)  // 9: the content of image 0's 5 and 9: its own place wins
    x += Self.block(h0, 10)  // 10: continues the run at 9
    x += h0[(20 * bs)..<(22 * bs)]  // 11-12: image 0's 20-21, moved
    x += Self.block(h1, 7)  // 13: image 1's 7
    x += h0[(14 * bs)..<(20 * bs)]  // 14-19: image 0's, in place
    x += h0[(24 * bs)...]  // 20: image 0's short last block
    let paths = [try image(dir, "h0.img", h0), try image(dir, "h1.img", h1)]
    let signatures = try paths.map { try sign($0) }
    let have = try index(signatures)
    XCTAssertEqual(have.count, 24 + 15, "every signed block but the two of zeros")
    let source = try image(dir, "x.img", x)

    let (stream, summary) = try snapshot(source, have: have)
    XCTAssertEqual(summary.referencedBlocks, 18)
    XCTAssertEqual(summary.referenceRecords, 7)
    XCTAssertEqual(summary.dataBlocks, 2)
    XCTAssertEqual(summary.zeroBlocks, 1)
    let p = StreamParserTests.parseWhole(stream)
    XCTAssertNil(p.error)
    XCTAssertEqual(
      p.records.map(\.shape),
      [
        "P", "H", "SRC", "D0:4096:raw", "R1+3@0:1", "Z4+1", "R5+3@1:2", "D8:4096:lz4", "R9+2@0:9", "R11+2@0:20",
        "R13+1@1:7", "R14+6@0:14", "R20+1@0:24", "E",
      ])
    XCTAssertEqual(Array(stream[0..<16]), StreamParserTests.preamble(version: 2))
    XCTAssertEqual(rebuild(p.records, size: x.count, images: [h0, h1]), x, "the stream rebuilds the source")

    // SOURCES: the signatures' images, in the order given.
    guard case .sources(let sources) = p.records[2] else { return XCTFail("no SOURCES: \(p.records)") }
    XCTAssertEqual(sources.digestName, "sha256")
    XCTAssertEqual(sources.digestLength, 32)
    XCTAssertEqual(sources.images, have.images)
    for (i, signature) in signatures.enumerated() {
      let header = try SignatureReader(path: signature).header
      XCTAssertEqual(sources.images[i].signatureID, header.signatureID)
      XCTAssertEqual(sources.images[i].name, paths[i])
      XCTAssertEqual(sources.images[i].geometry, header.geometry)
      XCTAssertEqual(sources.images[i].signedBlocks, header.geometry.blockCount)
    }
    // Its bytes, and a REFERENCE record's and the END's, as the table gives them.
    let at = p.starts[2]
    let expectedSources = Self.sourcesBody(
      images: sources.images.map {
        (
          $0.signatureID.bytes, $0.geometry.deviceSize, $0.geometry.blockSize, $0.signedBlocks, $0.name
        )
      })
    XCTAssertEqual(Array(stream[(at + 16)..<(at + 16 + expectedSources.count)]), expectedSources)
    XCTAssertEqual(StreamFormat.sourcesBody(sources), expectedSources)
    let r = p.starts[4]
    let firstRun = Self.referenceBody(
      first: 1, count: 3, image: 0, source: 1, digests: (1...3).flatMap { Self.sha256(Self.block(h0, $0)) })
    XCTAssertEqual(Array(stream[r..<(r + 8)]), Self.le(8, 2) + Self.le(1, 2) + Self.le(UInt64(firstRun.count), 4))
    XCTAssertEqual(Array(stream[(r + 16)..<(r + 16 + firstRun.count)]), firstRun)
    let image1Run = p.starts[6]
    XCTAssertEqual(stream[image1Run + 16 + 12], 1, "byte 12 of the body is the image")
    guard case .end(let end) = p.records.last else { return XCTFail("no END") }
    let endAt = p.starts.last ?? 0
    XCTAssertEqual(stream.count - endAt, 16 + 80 + 4, "END is 80 bytes in version 2")
    XCTAssertEqual(
      Array(stream[(endAt + 16)..<(stream.count - 4)]),
      Self.endBody(
        data: 2, zero: 1, bytes: UInt64(x.count), records: UInt64(p.records.count - 2),
        digest: Self.sha256(stream[0..<endAt]), referenced: 18))
    XCTAssertEqual(end.referencedBlocks, 18)
    XCTAssertEqual(StreamFormat.endBody(end, version: 2), Array(stream[(endAt + 16)..<(stream.count - 4)]))

    // As merge-snapshot reads it, END digest checked.
    let read = Self.read(stream)
    XCTAssertNil(read.error)
    XCTAssertEqual(read.records, p.records)

    // Encrypted: the same records after the CRYPTO record.
    let secret = try StreamSecret(key: (0..<32).map { UInt8($0 &* 5 &+ 1) })
    let sealed = try snapshot(source, have: have, secret: secret).bytes
    let opened = Self.read(sealed, secret: secret)
    XCTAssertNil(opened.error)
    XCTAssertEqual(opened.records.map(\.shape), ["P", "S5"] + p.records.map(\.shape).dropFirst())
    // SOURCES and the blocks' records alike (the HEADER's id and instant, and the END, are the stream's own).
    XCTAssertEqual(Array(opened.records.dropFirst(3).dropLast()), Array(p.records.dropFirst(2).dropLast()))
    XCTAssertEqual(rebuild(opened.records, size: x.count, images: [h0, h1]), x)
    XCTAssertEqual(Array(sealed[8..<10]), [2, 0], "an encrypted stream with references is of version 2 too")
    XCTAssertNotNil(Self.read(sealed).error, "no key, no stream")
  }

  /// A run stops at 8 MiB of blocks (2048 of 4 KiB) and the next starts
  /// where it stopped; without an index the same source is a version 1
  /// stream of DATA records.
  func testLongRunsAreCutAt8MiBAndNoIndexMeansVersion1() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: 11)
    let content = g.bytes(5000 * Self.bs + 123)
    let path = try image(dir, "big.img", content)
    let have = try index([try sign(path)])
    let stream = try snapshot(path, have: have).bytes
    let p = StreamParserTests.parseWhole(stream)
    XCTAssertNil(p.error)
    XCTAssertEqual(
      p.records.map(\.shape), ["P", "H", "SRC", "R0+2048@0:0", "R2048+2048@0:2048", "R4096+905@0:4096", "E"])
    XCTAssertEqual(StreamFormat.maximumReferenceRun(blockSize: 4096), 2048)
    XCTAssertEqual(StreamFormat.maximumReferenceRun(blockSize: 64 << 20), 1)
    XCTAssertEqual(rebuild(p.records, size: content.count, images: [content]), content)
    XCTAssertLessThan(stream.count, 5001 * 32 + 1000, "32 bytes a block and the records' fields")

    let plain = try snapshot(path, have: nil).bytes
    let q = StreamParserTests.parseWhole(plain)
    XCTAssertNil(q.error)
    XCTAssertEqual(Array(plain[8..<10]), [1, 0])
    XCTAssertFalse(q.records.contains { $0.shape == "SRC" || $0.shape.hasPrefix("R") })
    XCTAssertEqual(plain.count - (q.starts.last ?? 0), 84, "END is 64 bytes in version 1")
  }

  /// A hand-built stream the table allows: LINEAGE then SOURCES, a run
  /// ending on the short last blocks of both sides, DATA and ZERO between runs.
  func testAHandBuiltVersion2StreamIsAccepted() throws {
    var h = Hand(version: 2, sources: false)
    h.add(
      6,
      StreamFormat.lineageBody(
        StreamFormat.Lineage(
          standsFor: ID128(high: 9, low: 9), standsForStarted: Instant(nanosecondsSinceEpoch: 5),
          firstCompacted: ID128(high: 9, low: 9), compactedCount: 1)), flags: 0)
    h.add(7, Self.sourcesBody(images: Self.handImages))
    h.reference(0, 2, image: 1, source: 18)
    h.data(2)
    h.zero(3, 2)
    h.reference(5, 4, image: 1, source: 0)
    // Blocks 9-10 (the last 100 bytes) from image 0's 7-8 (its last 100 bytes).
    h.reference(9, 2, image: 0, source: 7)
    h.end(data: 1, zero: 2, bytes: Self.deviceSize, referenced: 8)
    let p = StreamParserTests.parseWhole(h.bytes)
    XCTAssertNil(p.error)
    XCTAssertEqual(
      p.records.map(\.shape), ["P", "H", "L", "SRC", "R0+2@1:18", "D2:4096:raw", "Z3+2", "R5+4@1:0", "R9+2@0:7", "E"])
    XCTAssertEqual(p.parser.referencedBlocks, 8)
    XCTAssertEqual(p.parser.sources?.images.map(\.name), ["img0", "img1"])
    XCTAssertEqual(p.parser.formatVersion, 2)
    XCTAssertNil(Self.read(h.bytes).error, "the END digest matches")
    guard case .reference(_, _, _, _, let digests) = p.records[4] else { return XCTFail() }
    XCTAssertEqual(digests, Self.sha256(Self.le(0, 8)) + Self.sha256(Self.le(1, 8)))
  }

  // MARK: Damage

  /// 512-byte blocks: a reference in place, new data, zeros, a moved run,
  /// compressible data, a single reference, a short last block.
  func tinyStream(secret: StreamSecret?) throws -> [UInt8] {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: 77)
    let held = g.bytes(8 * 512)
    var x = Array(held[0..<512]) + g.bytes(512) + [UInt8](repeating: 0, count: 512)
    x += held[(5 * 512)..<(7 * 512)]
    x += (0..<512).map { Array("tiny ".utf8)[$0 % 5] }
    x += held[(7 * 512)...]
    x += g.bytes(100)
    let have = try index([try sign(try image(dir, "held.img", held), blockSize: 512)])
    return try snapshot(try image(dir, "x.img", x), have: have, blockSize: 512, secret: secret).bytes
  }

  func testEveryFlippedByteOfASmallVersion2StreamIsRefused() throws {
    let secret = try StreamSecret(key: (0..<32).map { UInt8($0 &+ 40) })
    for key in [nil, secret] {
      let stream = try tinyStream(secret: key)
      let clean = Self.read(stream, secret: key)
      XCTAssertNil(clean.error)
      let shapes = ["R0+1@0:0", "D1:512:raw", "Z2+1", "R3+2@0:5", "D5:512:lz4", "R6+1@0:7", "D7:100:raw", "E"]
      XCTAssertEqual(clean.records.map(\.shape), ["P"] + (key == nil ? [] : ["S5"]) + ["H", "SRC"] + shapes)
      let starts = EncryptedStreamTests.recordRanges(stream).map(\.lowerBound)
      XCTAssertEqual(starts.count, clean.records.count - 1)
      var g = SplitMix64(seed: 5)
      var flips = 0
      for offset in 0..<stream.count {
        for mask: UInt8 in [0x01, 0x80, 0xFF, UInt8(truncatingIfNeeded: g.next() % 254 + 1)] {
          var bad = stream
          bad[offset] ^= mask
          flips += 1
          let r = Self.read(bad, secret: key)
          let what = "\(key == nil ? "plain" : "encrypted"): flip 0x\(String(mask, radix: 16)) at byte \(offset)"
          guard let error = r.error else {
            XCTFail("\(what) was read as a whole stream")
            continue
          }
          XCTAssertFalse(r.records.contains { $0.shape == "E" }, "\(what): END returned")
          guard let i = starts.lastIndex(where: { $0 <= offset }) else { continue }
          // The damaged record is named, and nothing from it on was returned.
          XCTAssertTrue(error.contains("record \(i) at byte \(starts[i])"), "\(what): \(error)")
          XCTAssertEqual(r.records.count, i + 1, "\(what): \(error)")
        }
      }
      XCTAssertEqual(flips, 4 * stream.count)
    }
  }

  // MARK: Semantic checks

  func testSourcesAndReferencesNeedVersion2() {
    var h = Hand(version: 1, sources: false)
    h.add(7, Self.sourcesBody(images: Self.handImages))
    assertRefused(h, "a SOURCES record in a version 1 stream; references need version 2")
    h = Hand(version: 1, sources: false)
    h.reference(0, 1, image: 0, source: 0)
    assertRefused(h, "a REFERENCE record in a version 1 stream; references need version 2")
    // An END of version 2's length in a version 1 stream, and the reverse.
    h = Hand(version: 1, sources: false)
    h.add(
      4, Self.endBody(data: 0, zero: 0, bytes: 0, records: 1, digest: Array(repeating: 0, count: 32), referenced: 0))
    assertRefused(h, "END record has 80 bytes, not the 64 of a version 1 stream")
    h = Hand()
    h.add(4, StreamParserTests.endBody(data: 0, zero: 0, bytes: 0, records: 2, digest: Array(repeating: 0, count: 32)))
    assertRefused(h, "END record has 64 bytes, not the 80 of a version 2 stream")
  }

  func testSourcesMustComeOnceBeforeAnyBlock() {
    var h = Hand(sources: false)
    h.reference(0, 1, image: 0, source: 0)
    assertRefused(h, "a REFERENCE record before the SOURCES record")
    for block in 0..<3 {
      h = Hand(sources: false)
      switch block {
      case 0: h.data(0)
      case 1: h.zero(0, 1)
      default:
        h.add(
          4, Self.endBody(data: 0, zero: 0, bytes: 0, records: 1, digest: Array(repeating: 0, count: 32), referenced: 0)
        )
      }
      assertRefused(h, "a version 2 stream whose SOURCES record does not come before its blocks")
    }
    h = Hand()
    h.add(7, Self.sourcesBody(images: Self.handImages))
    assertRefused(h, "a second SOURCES record")
    h = Hand()
    h.reference(0, 1, image: 0, source: 0)
    h.add(7, Self.sourcesBody(images: Self.handImages))
    assertRefused(h, "a second SOURCES record")
    // SOURCES before the HEADER; LINEAGE after SOURCES.
    var early = Hand(version: 2, sources: false)
    early.bytes = StreamParserTests.preamble(version: 2)
    early.starts = []
    early.sequence = 0
    early.add(7, Self.sourcesBody(images: Self.handImages))
    assertRefused(early, "the first record is not a HEADER")
    h = Hand()
    h.add(
      6,
      StreamFormat.lineageBody(
        StreamFormat.Lineage(
          standsFor: ID128(high: 9, low: 9), standsForStarted: Instant(nanosecondsSinceEpoch: 5),
          firstCompacted: ID128(high: 9, low: 9), compactedCount: 1)), flags: 0)
    assertRefused(h, "a LINEAGE record after other records; it must follow the HEADER directly")
  }

  func testSourcesBodiesOutOfTheTableAreRefused() {
    func refused(_ body: [UInt8], _ sentence: String, line: UInt = #line) {
      var h = Hand(sources: false)
      h.add(7, body)
      assertRefused(h, sentence, line: line)
    }
    let images = Self.handImages
    refused(Self.sourcesBody(images: images).prefix(20).map { $0 }, "SOURCES record is too short")
    refused(
      Self.sourcesBody(digestLength: 15, images: images),
      "SOURCES record gives a digest length of 15 bytes, outside 16 to 64")
    refused(
      Self.sourcesBody(digestLength: 65, images: images),
      "SOURCES record gives a digest length of 65 bytes, outside 16 to 64")
    refused(Self.sourcesBody(images: []), "SOURCES record names no image")
    refused(Self.sourcesBody(images: images, reserved: 1), "SOURCES record has reserved bytes that are not zero")
    refused(Self.sourcesBody(digestName: "", images: images), "SOURCES record has no readable digest name")
    refused(Self.sourcesBody(digestName: "sha 256", images: images), "SOURCES record has no readable digest name")
    refused(
      Self.sourcesBody(count: 3, images: images), "SOURCES record is too short for its 3 images")
    refused(Self.sourcesBody(count: 1, images: images), "SOURCES record has \(48 + 4) bytes after its images")
    refused(
      Self.sourcesBody(images: [(Self.image0ID, 8192, 8192, 1, "x")]),
      "SOURCES record gives image 0 block size 8192, not the stream's 4096")
    refused(
      Self.sourcesBody(images: [(Self.image0ID, 8192, 4096, 3, "x")]),
      "SOURCES record says image 0 has 3 blocks signed of 2")
    refused(
      Self.sourcesBody(images: images + [(Self.image1ID, 0, 4096, 0, String(repeating: "n", count: 4097))]),
      "SOURCES record's name of image 2 is out of range")
    var reservedInImage = Self.sourcesBody(images: images)
    reservedInImage[24 + 28] = 1
    refused(reservedInImage, "SOURCES record has reserved bytes that are not zero in image 0")
  }

  func testReferenceRunsOutOfRangeOrOrderAreRefused() {
    func refused(_ sentence: String, line: UInt = #line, _ build: (inout Hand) -> Void) {
      var h = Hand()
      build(&h)
      assertRefused(h, sentence, line: line)
    }
    // Image out of range.
    refused("REFERENCE record names image 2; the SOURCES record lists 2") { $0.reference(0, 1, image: 2, source: 0) }
    // Past the image's blocks (image 0 has 9), past the device's (11).
    refused("reference run of 1 blocks from block 9 of \(Self.image0) is past its 9 blocks") {
      $0.reference(0, 1, image: 0, source: 9)
    }
    refused("reference run of 3 blocks from block 7 of \(Self.image0) is past its 9 blocks") {
      $0.reference(0, 3, image: 0, source: 7)
    }
    refused("reference run of 3 blocks from block \(UInt64.max - 1) of \(Self.image1) is past its 20 blocks") {
      $0.reference(0, 3, image: 1, source: .max - 1)
    }
    refused("reference run of 2 blocks from block 10 is out of range") { $0.reference(10, 2, image: 1, source: 0) }
    refused("reference run of 1 blocks from block 11 is out of range") { $0.reference(11, 1, image: 1, source: 0) }
    // Counts: none, and more than 8 MiB of blocks.
    refused("REFERENCE record names 0 blocks, outside 1 to 2048") { $0.reference(0, 0, image: 0, source: 0) }
    refused("REFERENCE record names 2049 blocks, outside 1 to 2048") { $0.reference(0, 2049, image: 1, source: 0) }
    // Bodies: too short, digests missing or extra, reserved bytes.
    refused("REFERENCE record is too short") {
      $0.add(8, Array(Self.referenceBody(first: 0, count: 1, image: 0, source: 0).prefix(23)))
    }
    refused("REFERENCE record has 56 bytes, not 88 for 2 digests") {
      $0.add(8, Self.referenceBody(first: 0, count: 2, image: 1, source: 0, digests: Array(repeating: 1, count: 32)))
    }
    refused("REFERENCE record has 57 bytes, not 56 for 1 digests") {
      $0.add(8, Self.referenceBody(first: 0, count: 1, image: 1, source: 0, digests: Array(repeating: 1, count: 33)))
    }
    for reserved in [[1, 0, 0], [0, 0, 0x80]] as [[UInt8]] {
      refused("REFERENCE record has reserved bytes that are not zero") {
        $0.add(8, Self.referenceBody(first: 0, count: 1, image: 1, source: 0, reserved: reserved))
      }
    }
    // Order: blocks increase, each at most once, across DATA, ZERO and REFERENCE.
    refused("block 3 is out of order or repeated") {
      $0.data(5)
      $0.reference(3, 1, image: 1, source: 0)
    }
    refused("block 4 is out of order or repeated") {
      $0.reference(2, 3, image: 1, source: 0)
      $0.data(4)
    }
    refused("block 4 is out of order or repeated") {
      $0.reference(2, 3, image: 1, source: 0)
      $0.reference(4, 1, image: 1, source: 9)
    }
    refused("block 4 is out of order or repeated") {
      $0.zero(0, 5)
      $0.reference(4, 1, image: 1, source: 9)
    }
    refused("block 2 is out of order or repeated") {
      $0.reference(2, 1, image: 1, source: 0)
      $0.zero(2, 1)
    }
    // The last blocks of a run: a short one against a whole one, either way.
    refused("block 10 has 100 bytes but the block it refers to in \(Self.image1) has 4096") {
      $0.reference(9, 2, image: 1, source: 3)
    }
    refused("block 3 has 4096 bytes but the block it refers to in \(Self.image0) has 100") {
      $0.reference(2, 2, image: 0, source: 7)
    }
  }

  func testEndCountsOfVersion2AreChecked() {
    func refused(_ sentence: String, line: UInt = #line, _ end: (inout Hand) -> Void) {
      var h = Hand()
      h.reference(0, 2, image: 1, source: 0)
      h.data(2)
      h.zero(3, 8)
      end(&h)
      assertRefused(h, sentence, line: line)
    }
    let bytes = Self.deviceSize
    let digest = [UInt8](repeating: 0, count: 32)
    refused(
      "END record counts 1 data, 8 zero and 3 referenced blocks in 5 records, but the stream had 1, 8 and 2 in 5"
    ) {
      $0.add(4, Self.endBody(data: 1, zero: 8, bytes: bytes, records: 5, digest: digest, referenced: 3))
    }
    refused(
      "END record counts 1 data, 8 zero and 0 referenced blocks in 5 records, but the stream had 1, 8 and 2 in 5"
    ) {
      $0.add(4, Self.endBody(data: 1, zero: 8, bytes: bytes, records: 5, digest: digest, referenced: 0))
    }
    // Bytes that leave out the referenced blocks.
    refused(
      "END record counts 1 data, 8 zero and 2 referenced blocks in 5 records, but the stream had 1, 8 and 2 in 5"
    ) {
      $0.add(4, Self.endBody(data: 1, zero: 8, bytes: bytes - 8192, records: 5, digest: digest, referenced: 2))
    }
    refused("END record has reserved bytes that are not zero") {
      $0.add(4, Self.endBody(data: 1, zero: 8, bytes: bytes, records: 5, digest: digest, referenced: 2, reserved: 1))
    }
    var h = Hand()
    h.reference(0, 2, image: 1, source: 0)
    h.data(2)
    h.zero(3, 8)
    h.end(data: 1, zero: 8, bytes: bytes, referenced: 2)
    XCTAssertNil(StreamParserTests.parseWhole(h.bytes).error, "the counts right")
    XCTAssertNil(Self.read(h.bytes).error)
  }

  // MARK: The signature index

  func testTheIndexFindsEveryBlockThatIsNotZerosWhereverItIs() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: 404)
    let bs = Self.bs
    let zeros = [UInt8](repeating: 0, count: bs)
    // Three images sharing content: copies within an image and across
    // images, blocks of zeros, a short last block of zeros and one of data.
    var a = g.bytes(40 * bs + 700)
    var b = g.bytes(33 * bs)
    var c = g.bytes(20 * bs + 300)
    for z in [3, 4, 17] { a.replaceSubrange((z * bs)..<((z + 1) * bs), with: zeros) }
    b.replaceSubrange((0 * bs)..<(1 * bs), with: zeros)
    a.replaceSubrange((10 * bs)..<(11 * bs), with: Self.block(a, 2))
    a.replaceSubrange((11 * bs)..<(12 * bs), with: Self.block(a, 2))
    b.replaceSubrange((5 * bs)..<(8 * bs), with: a[(20 * bs)..<(23 * bs)])
    c.replaceSubrange((1 * bs)..<(2 * bs), with: Self.block(a, 2))
    c.replaceSubrange((20 * bs)..<c.count, with: [UInt8](repeating: 0, count: 300))
    let contents = [a, b, c]
    let have = try index(try contents.enumerated().map { try sign(try image(dir, "i\($0.offset).img", $0.element)) })

    var expected: [[UInt8]: Set<[Int]>] = [:]
    var zeroBlocks = 0
    var signed = 0
    for (i, content) in contents.enumerated() {
      let n = (content.count + bs - 1) / bs
      signed += n
      for k in 0..<n {
        let blk = Self.block(content, k)
        if blk.allSatisfy({ $0 == 0 }) {
          zeroBlocks += 1
          continue
        }
        expected[Self.sha256(blk), default: []].insert([i, k])
      }
    }
    XCTAssertEqual(zeroBlocks, 5)
    XCTAssertEqual(have.count, signed - zeroBlocks)
    XCTAssertEqual(have.zeroBlocks, UInt64(zeroBlocks))
    XCTAssertEqual(have.memoryBytes, 16 * signed, "16 bytes per signed block")
    XCTAssertEqual(have.images.map(\.signedBlocks), [41, 33, 21])
    XCTAssertEqual(expected[Self.sha256(Self.block(a, 2))]?.count, 4, "a's 2, 10 and 11, c's 1")
    var found = 0
    for (digest, places) in expected {
      let range = digest.withUnsafeBytes { have.candidates($0.baseAddress!) }
      let got = Set(
        range.map { p -> [Int] in
          let l = have.location(at: p)
          return [l.image, Int(l.block)]
        })
      XCTAssertEqual(got, places, "every place of the content, and only those")
      found += got.count
    }
    XCTAssertEqual(found, have.count)
    // Zeros, whole or short, and content nobody holds are not found.
    for missing in [zeros, [UInt8](repeating: 0, count: 700), [UInt8](repeating: 0, count: 300), g.bytes(bs)] {
      let digest = Self.sha256(missing)
      XCTAssertTrue(digest.withUnsafeBytes { have.candidates($0.baseAddress!) }.isEmpty)
    }
  }

  func testTheInPlaceSortAgreesWithTheStandardLibrarysOnAMillionEntries() {
    typealias Entry = SignatureIndex.Entry
    let seed = testSeed()
    var g = SplitMix64(seed: seed)
    func check(_ entries: [Entry], _ what: String) {
      var sorted = entries
      sorted.withUnsafeMutableBufferPointer { SignatureIndex.sort($0) }
      let reference = entries.sorted { ($0.high, $0.low) < ($1.high, $1.low) }
      XCTAssertTrue(
        sorted.elementsEqual(reference) { $0.high == $1.high && $0.low == $1.low }, "\(what), seed \(seed)")
    }
    // Random entries; a tenth share their high word with others, so the
    // low word (digest bytes 8-9, image, block) decides.
    let n = 1_000_000
    check(
      (0..<n).map { i in
        Entry(high: i % 10 == 0 ? g.next() % 1000 : g.next(), low: g.next())
      }, "random")
    // Ordered, reversed, few distinct keys, organ pipe: the quicksort's bad cases.
    let m = 100_000
    check((0..<m).map { Entry(high: UInt64($0), low: 0) }, "ordered")
    check((0..<m).map { Entry(high: UInt64(m - $0), low: UInt64($0)) }, "reversed")
    check((0..<m).map { _ in Entry(high: g.next() % 3, low: g.next() % 5) }, "few keys")
    check((0..<m).map { Entry(high: UInt64(min($0, m - $0)), low: UInt64($0)) }, "organ pipe")
    check([], "empty")
    check([Entry(high: 1, low: 2)], "one")
  }

  func testDigestsShorterThan16BytesAndMixedSignaturesAreRefused() throws {
    let dir = try makeTempDirectory()
    var g = SplitMix64(seed: 3)
    let path = try image(dir, "a.img", g.bytes(10 * Self.bs))
    // A signature with 8-byte digests (SHA-256 cut short), written here by the format's table.
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: UInt64(10 * Self.bs))
    var short = SignatureFormat.encodeHeader(
      SignatureFormat.Header(geometry: geometry, digestName: "sha256", digestLength: 8, sourceName: "short"))
    short += g.bytes(10 * 8)
    short += Self.sha256(short)
    let shortPath = dir + "/short.sig"
    try writeDenseFile(shortPath, short)
    assertThrows(
      try index([shortPath]),
      containing: ["short.sig has 8-byte digests; naming content by digest needs at least 16 (sha256 gives 32)"])
    // 16 bytes (MD5) is enough.
    let md5 = try index([try sign(path, digest: "md5")])
    XCTAssertEqual(md5.digestLength, 16)
    XCTAssertEqual(md5.count, 10)
    // Block sizes and digests must agree, and match a block size asked for.
    let four = try sign(path)
    let eight = try sign(path, blockSize: 8192)
    assertThrows(
      try index([four, eight]),
      containing: ["\(eight) was made with block size 8192, not 4096; make it with --block-size 4096"])
    assertThrows(try index([four], blockSize: 8192), containing: ["was made with block size 4096, not 8192"])
    let sha512 = try sign(path, digest: "sha512")
    assertThrows(
      try index([four, sha512]),
      containing: [
        "uses digest sha512 (64 bytes) but", "uses sha256 (32 bytes); signatures indexed together must share one",
      ])
    XCTAssertEqual(try index([four, four]).count, 20, "one image twice is two images")
  }
}
