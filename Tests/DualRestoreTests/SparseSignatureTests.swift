// Sparse signatures: the digests of the blocks a selection sets, with the
// selection between the digest count and the digests. Read back in block
// order (readEntries, readDigests), compared over the selection only, and
// every damage refused: flipped bytes, cuts, fields that disagree.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class SparseSignatureTests: XCTestCase {
  /// An image of `blocks` blocks of `blockSize` and a `tail`-byte partial
  /// block, random but for a never-written hole over blocks 10..<20 (when
  /// it has them).
  private func makeImage(
    _ dir: String, _ name: String = "a.img", seed: UInt64, blockSize: Int = 4096, blocks: Int = 40, tail: Int = 1000
  ) throws -> (path: String, content: [UInt8]) {
    var g = SplitMix64(seed: seed)
    var content = g.bytes(blocks * blockSize + tail)
    let path = dir + "/" + name
    try createSparseFile(path, size: UInt64(content.count))
    if blocks >= 20 {
      for i in (10 * blockSize)..<(20 * blockSize) { content[i] = 0 }
      try writeBytes(path, Array(content[..<(10 * blockSize)]), at: 0)
      try writeBytes(path, Array(content[(20 * blockSize)...]), at: UInt64(20 * blockSize))
    } else {
      try writeBytes(path, content, at: 0)
    }
    XCTAssertEqual(try readFileBytes(path), content)
    return (path, content)
  }

  private func bitmap(_ count: UInt64, _ ranges: [Range<UInt64>]) -> BlockBitmap {
    var b = BlockBitmap(count: count)
    for r in ranges { b.set(r) }
    return b
  }

  @discardableResult
  private func sign(_ image: String, _ signature: String, blockSize: UInt32 = 4096, selection: BlockBitmap?) throws
    -> Signer.Summary
  {
    try Signer.sign(
      Device(path: image), algorithm: DigestAlgorithm.sha256, blockSize: blockSize, to: .file(signature),
      progress: false, selection: selection)
  }

  /// Every entry of a signature, read with readEntries `batch` at a time;
  /// the checksum is verified.
  private func entries(_ reader: SignatureReader, batch: Int) throws -> [(block: UInt64, digest: [UInt8])] {
    let length = reader.header.digestLength
    let blocks = UnsafeMutablePointer<UInt64>.allocate(capacity: batch)
    defer { blocks.deallocate() }
    var digests = [UInt8](repeating: 0, count: batch * length)
    var out: [(UInt64, [UInt8])] = []
    while true {
      let n = try digests.withUnsafeMutableBytes {
        try reader.readEntries(max: batch, blocks: blocks, digests: $0.baseAddress!)
      }
      if n == 0 { break }
      XCTAssertLessThanOrEqual(n, batch)
      for i in 0..<n { out.append((blocks[i], Array(digests[(i * length)..<((i + 1) * length)]))) }
    }
    try reader.finish()
    return out
  }

  private func blockDigest(_ content: [UInt8], _ block: UInt64, _ blockSize: Int = 4096) -> [UInt8] {
    let start = Int(block) * blockSize
    return sha256(content[start..<min(content.count, start + blockSize)])
  }

  private func le64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
    (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) }
  }

  // MARK: Writing and reading

  func testSparseSignatureRoundTrip() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(61)
    let (image, content) = try makeImage(dir, seed: seed)
    // The first block, a run into the hole, one zero-filled hole block, and
    // the last full block with the partial last one.
    let selection = bitmap(41, [0..<1, 5..<12, 15..<16, 39..<41])
    let selected: [UInt64] = [0, 5, 6, 7, 8, 9, 10, 11, 15, 39, 40]
    let sigPath = dir + "/a.sig"
    let summary = try sign(image, sigPath, selection: selection)
    XCTAssertTrue(summary.header.isSparse)
    XCTAssertEqual(summary.header.signedBlocks, 11)
    XCTAssertEqual(summary.bytesRead, 10 * 4096 + 1000, "only the selected blocks count")

    let reader = try SignatureReader(path: sigPath)
    XCTAssertTrue(reader.isSparse)
    XCTAssertEqual(reader.selection, selection)
    XCTAssertEqual(reader.signedBlocks, 11)
    XCTAssertEqual(reader.header, summary.header)
    let got = try entries(reader, batch: 3)
    XCTAssertEqual(got.map(\.block), selected)
    for (block, digest) in got { XCTAssertEqual(digest, blockDigest(content, block), "seed \(seed), block \(block)") }
    XCTAssertEqual(got.last?.digest, sha256(content.suffix(1000)))

    // The documented layout: flags bit 0, D, S, the runs, the digests, the checksum.
    let bytes = try readFileBytes(sigPath)
    let h = 82 + image.utf8.count
    XCTAssertEqual(Array(bytes[10..<12]), [1, 0])
    XCTAssertEqual(le64(bytes, h), 11 * 32)
    let s = Int(le64(bytes, h + 8))
    XCTAssertEqual(Array(bytes[(h + 16)..<(h + 16 + s)]), MapFormat.encodeRuns(selection))
    // clear 0, set 1, clear 4, set 7, clear 3, set 1, clear 23, set 2
    XCTAssertEqual(Array(bytes[(h + 16)..<(h + 16 + s)]), [0, 1, 4, 7, 3, 1, 23, 2])
    XCTAssertEqual(
      Array(bytes[(h + 16 + s)..<(h + 16 + s + 11 * 32)]), selected.flatMap { blockDigest(content, $0) })
    XCTAssertEqual(bytes.count, h + 16 + s + 11 * 32 + 32)
    XCTAssertEqual(Array(bytes.suffix(32)), sha256(bytes.dropLast(32)))

    // readDigests reads the same digests, and keeps readEntries in step.
    let mixed = try SignatureReader(path: sigPath)
    var first = [UInt8](repeating: 0, count: 4 * 32)
    try first.withUnsafeMutableBytes { try mixed.readDigests(count: 4, into: $0.baseAddress!) }
    XCTAssertEqual(first, selected.prefix(4).flatMap { blockDigest(content, $0) })
    let rest = try entries(mixed, batch: 100)
    XCTAssertEqual(rest.map(\.block), Array(selected.dropFirst(4)))
    XCTAssertEqual(rest.map(\.digest), selected.dropFirst(4).map { blockDigest(content, $0) })

    // A dense signature through the same calls: every block, in order.
    let densePath = dir + "/dense.sig"
    try sign(image, densePath, selection: nil)
    let dense = try SignatureReader(path: densePath)
    XCTAssertFalse(dense.isSparse)
    XCTAssertNil(dense.selection)
    XCTAssertEqual(dense.signedBlocks, 41)
    let all = try entries(dense, batch: 7)
    XCTAssertEqual(all.map(\.block), Array(0..<41))
    XCTAssertEqual(all.map(\.digest), (0..<41).map { blockDigest(content, $0) })
    XCTAssertEqual(try readFileBytes(densePath)[10], 0, "a dense signature keeps flags 0")
  }

  /// A selection longer than the reader's buffer streams through it, its
  /// runs cut at every odd place, and reads the same as from a file.
  func testLongSelectionStreamsThroughASmallBuffer() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(62)
    var g = SplitMix64(seed: seed)
    let (image, content) = try makeImage(dir, seed: seed, blockSize: 512, blocks: 40 * 8, tail: 100)
    var selection = BlockBitmap(count: 321)
    // Single blocks, long runs (two-byte lengths) and runs across words.
    var block: UInt64 = 0
    while block < 321 {
      let run = g.next() % 4 == 0 ? 130 + g.next() % 60 : 1 + g.next() % 3
      if g.next() % 2 == 0 { selection.set(block..<min(321, block + run)) }
      block += run
    }
    let sigPath = dir + "/a.sig"
    try sign(image, sigPath, blockSize: 512, selection: selection)
    let bytes = try readFileBytes(sigPath)
    let fromFile = try entries(SignatureReader(path: sigPath), batch: 1000)
    XCTAssertEqual(fromFile.map(\.block), Array(selection.extents.joined()))
    for (b, d) in fromFile { XCTAssertEqual(d, blockDigest(content, b, 512), "seed \(seed), block \(b)") }
    for bufferSize in [1, 2, 7, 16, 100] {
      let reader = try SignatureReader(bytes: bytes, name: "pipe", bufferSize: bufferSize)
      XCTAssertEqual(reader.selection, selection, "seed \(seed), buffer \(bufferSize)")
      let got = try entries(reader, batch: 5)
      XCTAssertEqual(got.map(\.block), fromFile.map(\.block))
      XCTAssertEqual(got.map(\.digest), fromFile.map(\.digest))
    }
  }

  /// The runs decoder gives the same bitmap whatever pieces its input comes
  /// in, and the same as the map format's own decoding.
  func testRunsDecodedPieceByPiece() throws {
    let seed = testSeed(63)
    var g = SplitMix64(seed: seed)
    let fail: (String) -> ToolkitError = { ToolkitError($0) }
    for round in 0..<200 {
      let count = g.next() % 700
      var bits = BlockBitmap(count: count)
      var block: UInt64 = 0
      while block < count {
        let run = g.next() % 3 == 0 ? 1 + g.next() % 300 : 1 + g.next() % 5
        if g.next() % 2 == 0 { bits.set(block..<min(count, block + run)) }
        block += run
      }
      let runs = try XCTUnwrap(MapFormat.encodeRuns(bits))
      XCTAssertLessThanOrEqual(UInt64(runs.count), MapFormat.longestRuns(count: count))
      XCTAssertEqual(
        try MapFormat.decodePayload(runs[...], encoding: .runs, count: count, fail: fail), bits, "seed \(seed)")
      // Fed in pieces of random sizes, what a piece leaves is fed again.
      var decoder = RunsDecoder(count: count)
      var at = 0
      var pending: [UInt8] = []
      while at < runs.count || !pending.isEmpty {
        let n = Int(g.next() % 4)
        pending += runs[at..<min(runs.count, at + n)]
        at = min(runs.count, at + n)
        let used = try decoder.decode(pending[...], final: at == runs.count, fail: fail)
        pending.removeFirst(used)
        if at == runs.count { XCTAssertTrue(pending.isEmpty, "seed \(seed), round \(round)") }
      }
      XCTAssertEqual(try decoder.finish(fail: fail), bits, "seed \(seed), round \(round)")
    }
    // A cut run is kept for later, but refused at the end.
    var decoder = RunsDecoder(count: 1000)
    XCTAssertEqual(try decoder.decode([0x05, 0x81][...], final: false, fail: fail), 1)
    assertThrows(try decoder.decode([0x81][...], final: true, fail: fail), containing: ["damaged run"])
    // Ten bytes that all go on are no cut run, but damage.
    var long = RunsDecoder(count: 1000)
    assertThrows(
      try long.decode([UInt8](repeating: 0x80, count: 10)[...], final: false, fail: fail), containing: ["damaged run"])
  }

  /// Only the selected blocks are read: a read anywhere else fails.
  func testOnlyTheSelectedBlocksAreRead() throws {
    let source = FailingOutside(size: 64 * 4096, readable: 8 * 4096..<12 * 4096)
    let dir = try makeTempDirectory()
    let selection = bitmap(64, [8..<12])
    let summary = try Signer.sign(
      source, algorithm: DigestAlgorithm.sha256, blockSize: 4096, to: .file(dir + "/s.sig"), progress: false,
      selection: selection)
    XCTAssertEqual(summary.bytesRead, 4 * 4096)
    let report = try Comparison.compare(
      signature: SignatureReader(path: dir + "/s.sig"), source, signatureIsA: true, allowSizeChange: false,
      progress: false)
    XCTAssertEqual(report.differing.population, 0)
    XCTAssertEqual(report.bytesCompared, 4 * 4096)
    // The same source signed densely fails on its first block.
    assertThrows(
      try Signer.sign(
        source, algorithm: DigestAlgorithm.sha256, blockSize: 4096, to: .file(dir + "/d.sig"), progress: false),
      containing: ["read error"])
    // A selection of another geometry is refused.
    assertThrows(
      try Signer.sign(
        source, algorithm: DigestAlgorithm.sha256, blockSize: 4096, to: .file(dir + "/x.sig"), progress: false,
        selection: BlockBitmap(count: 63)),
      containing: ["63 blocks", "64"])
  }

  // MARK: Comparing

  func testComparisonSeesOnlyTheSelection() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(64)
    let (a, content) = try makeImage(dir, seed: seed)
    // B: a copy with blocks 3, 6, 12 (in the hole), 30 and 40 (the partial
    // last block) changed.
    let b = dir + "/b.img"
    var modified = content
    for block in [3, 6, 12, 30, 40] { modified[block * 4096 + 17] ^= 0x5A }
    try writeDenseFile(b, modified)
    let selection = bitmap(41, [0..<8, 12..<13, 40..<41])
    var expected = BlockBitmap(count: 41)
    for block: UInt64 in [3, 6, 12, 40] { expected[block] = true }

    // Directly, block 30 differs too: the selection is what leaves it out.
    let direct = try Comparison.compare(
      Device(path: a), Device(path: b), blockSize: 4096, allowSizeChange: false, progress: false)
    XCTAssertTrue(direct.differing[30])
    XCTAssertEqual(direct.differing.intersection(selection), expected)

    let sparseA = dir + "/a.sig"
    try sign(a, sparseA, selection: selection)
    for signatureIsA in [true, false] {
      let report = try Comparison.compare(
        signature: SignatureReader(path: sparseA), Device(path: b), signatureIsA: signatureIsA,
        allowSizeChange: false, progress: false)
      XCTAssertEqual(report.differing, expected, "seed \(seed)")
      XCTAssertTrue(report.differ)
      XCTAssertEqual(report.bytesCompared, 9 * 4096 + 1000)
      XCTAssertEqual(report.geometry.blockCount, 41)
    }
    let same = try Comparison.compare(
      signature: SignatureReader(path: sparseA), Device(path: a), signatureIsA: true, allowSizeChange: false,
      progress: false)
    XCTAssertFalse(same.differ)

    // Signature against signature: sparse with dense either way, sparse
    // with sparse over the same selection.
    let denseA = dir + "/a-dense.sig"
    let denseB = dir + "/b-dense.sig"
    let sparseB = dir + "/b.sig"
    try sign(a, denseA, selection: nil)
    try sign(b, denseB, selection: nil)
    try sign(b, sparseB, selection: selection)
    for (x, y) in [(sparseA, denseB), (denseA, sparseB), (sparseA, sparseB), (sparseB, denseA)] {
      let report = try Comparison.compare(
        SignatureReader(path: x), SignatureReader(path: y), allowSizeChange: false)
      XCTAssertEqual(report.differing, expected, "\(x) against \(y), seed \(seed)")
    }
    XCTAssertEqual(
      try Comparison.compare(SignatureReader(path: denseA), SignatureReader(path: denseB), allowSizeChange: false)
        .differing, direct.differing, "two dense signatures still compare every block")

    // Two sparse signatures of different selections are refused.
    let otherB = dir + "/b-other.sig"
    try sign(b, otherB, selection: bitmap(41, [0..<9]))
    assertThrows(
      try Comparison.compare(SignatureReader(path: sparseA), SignatureReader(path: otherB), allowSizeChange: false),
      containing: [sparseA, otherB, "different selections"])

    // A sparse signature compares only with a side of its own size.
    let shorter = dir + "/short.img"
    try writeDenseFile(shorter, Array(content.prefix(30 * 4096)))
    assertThrows(
      try Comparison.compare(
        signature: SignatureReader(path: sparseA), Device(path: shorter), signatureIsA: true, allowSizeChange: true,
        progress: false),
      containing: [sparseA, "sparse signature", shorter])
    let shortSig = dir + "/short.sig"
    try sign(shorter, shortSig, selection: nil)
    assertThrows(
      try Comparison.compare(SignatureReader(path: shortSig), SignatureReader(path: sparseA), allowSizeChange: true),
      containing: [sparseA, "sparse signature"])

    // An empty selection signs nothing and finds nothing.
    let none = dir + "/none.sig"
    try sign(a, none, selection: BlockBitmap(count: 41))
    let empty = try Comparison.compare(
      signature: SignatureReader(path: none), Device(path: b), signatureIsA: true, allowSizeChange: false,
      progress: false)
    XCTAssertEqual(empty.differing.population, 0)
    XCTAssertEqual(empty.bytesCompared, 0)
  }

  // MARK: Damage

  private func compareFails(_ sig: String, _ image: String, _ what: String) {
    assertThrows(
      try Comparison.compare(
        signature: SignatureReader(path: sig), Device(path: image), signatureIsA: true, allowSizeChange: false,
        progress: false), what)
  }

  func testEverySparseByteFlipAndCutIsRefused() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(65)
    let (image, _) = try makeImage(dir, seed: seed, blockSize: 512, blocks: 6, tail: 100)
    let sigPath = dir + "/s.sig"
    try sign(image, sigPath, blockSize: 512, selection: bitmap(7, [1..<2, 3..<5, 6..<7]))
    let bytes = try readFileBytes(sigPath)
    let h = 82 + image.utf8.count
    XCTAssertEqual(bytes.count, h + 16 + 6 + 4 * 32 + 32, "runs 1 1 1 2 1 1")
    XCTAssertEqual(
      try Comparison.compare(
        signature: SignatureReader(path: sigPath), Device(path: image), signatureIsA: true, allowSizeChange: false,
        progress: false
      ).differing.population, 0)
    let damaged = dir + "/d.sig"
    for offset in bytes.indices {
      var b = bytes
      b[offset] ^= UInt8(1 << (offset % 8))
      try writeDenseFile(damaged, b)
      compareFails(damaged, image, "seed \(seed), byte \(offset) of \(bytes.count) flipped")
    }
    for cut in 0..<bytes.count {
      try writeDenseFile(damaged, Array(bytes.prefix(cut)))
      compareFails(damaged, image, "cut at \(cut) of \(bytes.count)")
    }
    try writeDenseFile(damaged, bytes + [0])
    compareFails(damaged, image, "one byte appended")
  }

  /// Fields that disagree, with the closing checksum made right again: each
  /// is refused in one sentence naming the file.
  func testInconsistentSparseFieldsAreRefused() throws {
    let dir = try makeTempDirectory()
    let (image, _) = try makeImage(dir, seed: testSeed(66), blockSize: 512, blocks: 6, tail: 100)
    let sigPath = dir + "/s.sig"
    try sign(image, sigPath, blockSize: 512, selection: bitmap(7, [1..<2, 3..<5, 6..<7]))
    let bytes = try readFileBytes(sigPath)
    let h = 82 + image.utf8.count
    let runs = Array(bytes[(h + 16)..<(h + 22)])
    let digests = Array(bytes[(h + 22)..<(bytes.count - 32)])
    func u64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
    func build(flags: UInt16 = 1, d: UInt64 = 4 * 32, s: UInt64? = nil, runs r: [UInt8], digests g: [UInt8]) -> [UInt8]
    {
      var head = Array(bytes[..<h])
      head[10] = UInt8(flags & 0xFF)
      head[11] = UInt8(flags >> 8)
      let body = head + u64(d) + u64(s ?? UInt64(r.count)) + r + g
      return body + sha256(body)
    }
    let path = dir + "/p.sig"
    let cases: [([UInt8], [String])] = [
      (build(runs: runs, digests: digests), []),  // the signature as written: accepted
      (build(flags: 3, runs: runs, digests: digests), ["flags 0x3"]),
      (build(flags: 0x8001, runs: runs, digests: digests), ["flags 0x8001"]),
      (build(runs: [0, 1, 1, 2, 1, 1], digests: digests), ["selection: runs cover 6 of 7 blocks"]),
      (build(runs: [0, 1, 1, 2, 1, 3], digests: digests), ["selection: runs cover more than 7 blocks"]),
      (build(runs: [1, 1, 0, 2, 1, 1, 1], digests: digests), ["selection: empty run"]),
      (build(s: 9, runs: runs + [0, 0], digests: digests), ["longer than the runs of 7 blocks"]),
      (build(d: 5 * 32, runs: runs, digests: digests), ["digest area of 160 bytes does not hold 4 digests"]),
      (build(d: 3 * 32, runs: runs, digests: digests), ["digest area of 96 bytes does not hold 4 digests"]),
      // One more selected block than there are digests.
      (build(d: 5 * 32, runs: [0, 2, 1, 2, 1, 1], digests: digests), ["truncated signature"]),
      // A run cut off where the digests begin.
      (build(s: 7, runs: runs + [0x80], digests: digests), ["selection: damaged run"]),
    ]
    for (i, (signature, needles)) in cases.enumerated() {
      try writeDenseFile(path, signature)
      if needles.isEmpty {
        XCTAssertEqual(try entries(SignatureReader(path: path), batch: 2).map(\.block), [1, 3, 4, 6])
        continue
      }
      assertThrows(
        try entries(SignatureReader(path: path), batch: 2), containing: [path] + needles, "case \(i)")
    }
    // The sparse flag cleared: a dense reader finds the digest count wrong.
    var dense = bytes
    dense[10] = 0
    try writeDenseFile(path, Array(dense.dropLast(32)) + sha256(dense.dropLast(32)))
    assertThrows(try SignatureReader(path: path), containing: [path, "digest area of 128 bytes does not hold 7"])
    // A selection of more blocks than a map holds in memory is refused from the header.
    var huge = bytes
    for (offset, value) in [(24, UInt64(1) << 43 + 512), (32, UInt64(1) << 34 + 1)] {
      huge.replaceSubrange(offset..<offset + 8, with: u64(value))
    }
    try writeDenseFile(path, Array(huge.dropLast(32)) + sha256(huge.dropLast(32)))
    assertThrows(try SignatureReader(path: path), containing: [path, "more than the 2^34"])
  }
}

/// A source of 0x42 bytes whose reads fail outside one byte range.
private final class FailingOutside: BlockDevice, @unchecked Sendable {
  let name = "failing source"
  let size: UInt64
  let readable: Range<UInt64>
  init(size: UInt64, readable: Range<UInt64>) {
    self.size = size
    self.readable = readable
  }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard offset >= readable.lowerBound, offset + UInt64(buffer.count) <= readable.upperBound else {
      throw ToolkitError("\(name): read error at \(offset)")
    }
    buffer.initializeMemory(as: UInt8.self, repeating: 0x42)
  }
  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { (true, size) }
}
