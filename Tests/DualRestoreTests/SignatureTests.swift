// Signatures end to end: Signer writes one, SignatureReader reads it back,
// Comparison uses it; damage is detected; holes hash like zeros.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

final class SignatureTests: XCTestCase {
  static let blockSize: UInt32 = 4096
  static let fullBlocks = 40
  static let tail = 1000
  static let holeBlocks: Range<Int> = 10..<20
  static let zeroBlock = 25

  struct Images {
    let sparse: String
    let dense: String
    let content: [UInt8]
    var size: UInt64 { UInt64(content.count) }
  }

  /// Random content over 40 blocks and a 1000-byte partial block, with a
  /// 10-block hole (never written in the sparse file, written as zeros in
  /// the dense one) and one block of real zeros.
  private func makeImages(_ dir: String, seed: UInt64) throws -> Images {
    var g = SplitMix64(seed: seed)
    let bs = Int(Self.blockSize)
    var content = g.bytes(Self.fullBlocks * bs + Self.tail)
    for i in (Self.holeBlocks.lowerBound * bs)..<(Self.holeBlocks.upperBound * bs) { content[i] = 0 }
    for i in (Self.zeroBlock * bs)..<((Self.zeroBlock + 1) * bs) { content[i] = 0 }
    let sparse = dir + "/sparse.img"
    let dense = dir + "/dense.img"
    try createSparseFile(sparse, size: UInt64(content.count))
    try writeBytes(sparse, Array(content[0..<(Self.holeBlocks.lowerBound * bs)]), at: 0)
    try writeBytes(
      sparse, Array(content[(Self.holeBlocks.upperBound * bs)...]), at: UInt64(Self.holeBlocks.upperBound * bs))
    try writeDenseFile(dense, content)
    XCTAssertEqual(try readFileBytes(sparse), content)
    XCTAssertEqual(try readFileBytes(dense), content)
    let hole = UInt64(Self.holeBlocks.lowerBound * bs)..<UInt64(Self.holeBlocks.upperBound * bs)
    let holes = try holeRanges(sparse)
    XCTAssertTrue(isInside(hole, holes), "the file system should keep the hole: \(holes)")
    XCTAssertTrue(try holeRanges(dense).isEmpty, "the dense copy has no holes")
    return Images(sparse: sparse, dense: dense, content: content)
  }

  private func sign(_ image: String, _ signature: String, blockSize: UInt32 = blockSize) throws -> Signer.Summary {
    try Signer.sign(
      Device(path: image), algorithm: DigestAlgorithm.sha256, blockSize: blockSize, to: .file(signature),
      progress: false)
  }

  /// Header and every digest of a signature, checksum verified.
  private func readSignature(_ path: String) throws -> (SignatureFormat.Header, [[UInt8]]) {
    let reader = try SignatureReader(path: path)
    let n = Int(reader.header.geometry.blockCount)
    let length = reader.header.digestLength
    var all = [UInt8](repeating: 0, count: n * length)
    if n > 0 { try all.withUnsafeMutableBytes { try reader.readDigests(count: n, into: $0.baseAddress!) } }
    try reader.finish()
    return (reader.header, (0..<n).map { Array(all[($0 * length)..<(($0 + 1) * length)]) })
  }

  private func compare(signature: String, with image: String, signatureIsA: Bool = true) throws -> ComparisonReport {
    try Comparison.compare(
      signature: SignatureReader(path: signature), Device(path: image), signatureIsA: signatureIsA,
      allowSizeChange: false, progress: false)
  }

  private func blocks(of content: [UInt8], blockSize: Int) -> [ArraySlice<UInt8>] {
    stride(from: 0, to: content.count, by: blockSize).map { content[$0..<min(content.count, $0 + blockSize)] }
  }

  // MARK: Writing and reading

  func testSignAndReadBack() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(31)
    let images = try makeImages(dir, seed: seed)
    let sigPath = dir + "/sparse.sig"
    let summary = try sign(images.sparse, sigPath)
    XCTAssertEqual(summary.bytesRead, images.size)
    XCTAssertEqual(
      Set(try FileManager.default.contentsOfDirectory(atPath: dir)), ["sparse.img", "dense.img", "sparse.sig"],
      "no temporary file is left behind")

    let (header, digests) = try readSignature(sigPath)
    XCTAssertEqual(header.geometry.blockSize, Self.blockSize)
    XCTAssertEqual(header.geometry.deviceSize, images.size)
    XCTAssertEqual(header.geometry.blockCount, UInt64(Self.fullBlocks + 1))
    XCTAssertEqual(header.digestName, "sha256")
    XCTAssertEqual(header.digestLength, 32)
    XCTAssertEqual(header.sourceName, images.sparse)
    XCTAssertEqual(header, summary.header)
    XCTAssertFalse(header.signatureID.isNone)

    // One SHA-256 per block, the partial last block over its real length.
    let expected = blocks(of: images.content, blockSize: Int(Self.blockSize)).map { sha256($0) }
    XCTAssertEqual(digests.count, expected.count)
    for (i, (d, e)) in zip(digests, expected).enumerated() {
      XCTAssertEqual(d, e, "seed \(seed), block \(i)")
    }
    XCTAssertEqual(digests.last, sha256(images.content.suffix(Self.tail)))

    // The documented layout: magic, H = 82 + name, digest count, digests, checksum.
    let bytes = try readFileBytes(sigPath)
    XCTAssertTrue(SignatureFormat.looksLikeSignature(bytes))
    XCTAssertEqual(Array(bytes.prefix(8)), Array("DRSIG\r\n".utf8) + [0x1A])
    let h = 82 + images.sparse.utf8.count
    XCTAssertEqual(Int(bytes[12]) | Int(bytes[13]) << 8 | Int(bytes[14]) << 16 | Int(bytes[15]) << 24, h)
    XCTAssertEqual(bytes.count, h + 8 + 41 * 32 + 32)
    XCTAssertEqual(Array(bytes[(h + 8)..<(h + 8 + 41 * 32)]), expected.flatMap { $0 })
    XCTAssertEqual(Array(bytes.suffix(32)), sha256(bytes.dropLast(32)))
  }

  func testHoleBlocksHashLikeZeroBlocks() throws {
    let dir = try makeTempDirectory()
    let images = try makeImages(dir, seed: testSeed(32))
    let (_, sparseDigests) = try readSignature(dir + "/s.sig", signing: images.sparse)
    let (_, denseDigests) = try readSignature(dir + "/d.sig", signing: images.dense)
    XCTAssertEqual(sparseDigests, denseDigests)
    let zero = sha256([UInt8](repeating: 0, count: Int(Self.blockSize)))
    for b in Self.holeBlocks { XCTAssertEqual(sparseDigests[b], zero, "hole block \(b)") }
    XCTAssertEqual(sparseDigests[Self.zeroBlock], zero)

    // A partial last block inside a trailing hole hashes like its zeros.
    let tailSparse = dir + "/tail-sparse.img"
    let tailDense = dir + "/tail-dense.img"
    let bs = Int(Self.blockSize)
    let size = 8 * bs + 700
    var g = SplitMix64(seed: 7)
    let head = g.bytes(2 * bs)
    try createSparseFile(tailSparse, size: UInt64(size))
    try writeBytes(tailSparse, head, at: 0)
    try writeDenseFile(tailDense, head + [UInt8](repeating: 0, count: size - head.count))
    XCTAssertTrue(isInside(UInt64(2 * bs)..<UInt64(size), try holeRanges(tailSparse)), "trailing hole")
    let (_, a) = try readSignature(dir + "/ts.sig", signing: tailSparse)
    let (_, b) = try readSignature(dir + "/td.sig", signing: tailDense)
    XCTAssertEqual(a, b)
    XCTAssertEqual(a.count, 9)
    XCTAssertEqual(a.last, sha256([UInt8](repeating: 0, count: 700)))
    XCTAssertEqual(a[5], zero)
    // Identical content with holes compares equal to the dense copy.
    XCTAssertEqual(try compare(signature: dir + "/ts.sig", with: tailDense).differing.population, 0)
    let direct = try Comparison.compare(
      Device(path: tailSparse), Device(path: tailDense), blockSize: Self.blockSize, allowSizeChange: false,
      progress: false)
    XCTAssertEqual(direct.differing.population, 0)
  }

  private func readSignature(_ path: String, signing image: String) throws -> (SignatureFormat.Header, [[UInt8]]) {
    _ = try sign(image, path)
    return try readSignature(path)
  }

  // MARK: Comparing

  func testCompareWithSameAndModifiedImages() throws {
    let dir = try makeTempDirectory()
    let seed = testSeed(33)
    let images = try makeImages(dir, seed: seed)
    let sigPath = dir + "/sparse.sig"
    let summary = try sign(images.sparse, sigPath)

    // Against the image it was made from, and against the dense copy.
    for image in [images.sparse, images.dense] {
      let same = try compare(signature: sigPath, with: image)
      XCTAssertEqual(same.differing.count, UInt64(Self.fullBlocks + 1))
      XCTAssertEqual(same.differing.population, 0, "\(image)")
      XCTAssertEqual(same.geometry, summary.header.geometry)
      XCTAssertEqual(same.signature?.signatureID, summary.header.signatureID)
    }

    // A sparse copy with one byte changed in some blocks, including one in
    // the hole, the real-zero block and the partial last block; block 30 is
    // rewritten with the same bytes and must not count.
    let bs = Int(Self.blockSize)
    let modifiedPath = dir + "/modified.img"
    try createSparseFile(modifiedPath, size: images.size)
    try writeBytes(modifiedPath, Array(images.content[0..<(10 * bs)]), at: 0)
    try writeBytes(modifiedPath, Array(images.content[(20 * bs)...]), at: UInt64(20 * bs))
    var g = SplitMix64(seed: seed ^ 0x5EED)
    var modified = images.content
    let changed: [Int] = [0, 7, 12, Self.zeroBlock, 39, 40]
    for b in changed {
      let length = b == 40 ? Self.tail : bs
      let at = b * bs + Int(g.next() % UInt64(length - 1))  // not the last byte: changed below
      modified[at] ^= UInt8(g.next() % 255 + 1)
      try writeBytes(modifiedPath, [modified[at]], at: UInt64(at))
    }
    // The last byte of a full block, and the very last byte of the image.
    for at in [4 * bs - 1, modified.count - 1] {
      modified[at] ^= 0xFF
      try writeBytes(modifiedPath, [modified[at]], at: UInt64(at))
    }
    try writeBytes(modifiedPath, Array(images.content[(30 * bs)..<(31 * bs)]), at: UInt64(30 * bs))
    XCTAssertEqual(try readFileBytes(modifiedPath), modified)

    var expected = BlockBitmap(count: UInt64(Self.fullBlocks + 1))
    for b in changed + [3] { expected[UInt64(b)] = true }

    let viaSignature = try compare(signature: sigPath, with: modifiedPath)
    XCTAssertEqual(Array(viaSignature.differing.extents), Array(expected.extents), "seed \(seed)")
    XCTAssertEqual(viaSignature.differing, expected, "seed \(seed)")
    let reversed = try compare(signature: sigPath, with: modifiedPath, signatureIsA: false)
    XCTAssertEqual(reversed.differing, expected, "seed \(seed)")

    // The same as comparing the two images directly, both ways.
    let direct = try Comparison.compare(
      Device(path: images.sparse), Device(path: modifiedPath), blockSize: Self.blockSize, allowSizeChange: false,
      progress: false)
    XCTAssertEqual(direct.differing, viaSignature.differing, "seed \(seed)")
    XCTAssertEqual(direct.bytesCompared, images.size)
    let directDense = try Comparison.compare(
      Device(path: modifiedPath), Device(path: images.dense), blockSize: Self.blockSize, allowSizeChange: false,
      progress: false)
    XCTAssertEqual(directDense.differing, expected, "seed \(seed)")

    // And the same as comparing two signatures.
    let modifiedSig = dir + "/modified.sig"
    _ = try sign(modifiedPath, modifiedSig)
    let viaTwo = try Comparison.compare(
      SignatureReader(path: sigPath), SignatureReader(path: modifiedSig), allowSizeChange: false)
    XCTAssertEqual(viaTwo.differing, expected, "seed \(seed)")
  }

  func testSizeMismatchIsRefusedUnlessAllowed() throws {
    let dir = try makeTempDirectory()
    let images = try makeImages(dir, seed: testSeed(34))
    let sigPath = dir + "/s.sig"
    _ = try sign(images.sparse, sigPath)
    let shorter = dir + "/short.img"
    try writeDenseFile(shorter, Array(images.content.prefix(30 * Int(Self.blockSize) + 5)))
    assertThrows(try compare(signature: sigPath, with: shorter), containing: ["\(images.size)", "\(30 * 4096 + 5)"])
    // With a size change allowed, blocks of the signature past the image end differ.
    let result = try Comparison.compare(
      signature: SignatureReader(path: sigPath), Device(path: shorter), signatureIsA: false, allowSizeChange: true,
      progress: false)
    var expected = BlockBitmap(count: 41)
    expected.set(30..<41)
    XCTAssertEqual(result.differing, expected)
  }

  // MARK: Damage

  private func assertComparisonFails(_ sigPath: String, _ image: String, _ what: String) {
    assertThrows(try compare(signature: sigPath, with: image), what)
  }

  func testTruncatedSignaturesAreRefused() throws {
    let dir = try makeTempDirectory()
    let images = try makeImages(dir, seed: testSeed(35))
    let sigPath = dir + "/s.sig"
    _ = try sign(images.sparse, sigPath)
    let bytes = try readFileBytes(sigPath)
    let h = 82 + images.sparse.utf8.count
    let digestsEnd = h + 8 + 41 * 32
    let cuts = [
      0, 1, 7, 8, 12, 16, 40, 81, 82, h - 1, h, h + 7, h + 8, h + 9, h + 8 + 32, h + 8 + 20 * 32 + 5,
      digestsEnd - 1, digestsEnd, digestsEnd + 1, bytes.count - 1,
    ]
    let cutPath = dir + "/cut.sig"
    for cut in cuts {
      try writeDenseFile(cutPath, Array(bytes.prefix(cut)))
      assertComparisonFails(cutPath, images.sparse, "cut at \(cut) of \(bytes.count)")
    }
    // Extra bytes after the checksum are refused too.
    try writeDenseFile(cutPath, bytes + [0])
    assertComparisonFails(cutPath, images.sparse, "one byte appended")
    // The intact file still compares.
    XCTAssertEqual(try compare(signature: sigPath, with: images.sparse).differing.population, 0)
  }

  func testEverySingleByteFlipIsRefused() throws {
    // A small image with 512-byte blocks keeps the signature short.
    let dir = try makeTempDirectory()
    let seed = testSeed(36)
    var g = SplitMix64(seed: seed)
    let image = dir + "/i.img"
    try writeDenseFile(image, g.bytes(6 * 512 + 100))
    let sigPath = dir + "/s.sig"
    _ = try sign(image, sigPath, blockSize: 512)
    let bytes = try readFileBytes(sigPath)
    XCTAssertEqual(try compare(signature: sigPath, with: image).differing.population, 0)
    let flipped = dir + "/f.sig"
    for offset in bytes.indices {
      var damaged = bytes
      damaged[offset] ^= UInt8(1 << (offset % 8))
      try writeDenseFile(flipped, damaged)
      assertComparisonFails(flipped, image, "seed \(seed), byte \(offset) of \(bytes.count) flipped")
    }
  }

  /// Headers with a valid closing checksum but impossible content: built by
  /// patching a real signature and checksumming it again.
  func testInconsistentHeadersAreRefused() throws {
    let dir = try makeTempDirectory()
    let image = dir + "/i.img"
    var g = SplitMix64(seed: testSeed(37))
    try writeDenseFile(image, g.bytes(5 * 512 + 10))
    let sigPath = dir + "/s.sig"
    _ = try sign(image, sigPath, blockSize: 512)
    let bytes = try readFileBytes(sigPath)
    let h = 82 + image.utf8.count
    func patched(_ offset: Int, _ value: UInt64, _ width: Int) -> [UInt8] {
      var b = bytes
      for i in 0..<width { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
      let body = Array(b.dropLast(32))
      return body + sha256(body)
    }
    let patchedPath = dir + "/p.sig"
    let cases: [(Int, UInt64, Int, [String])] = [
      (8, 2, 2, ["version 2 is not supported"]),
      (10, 2, 2, ["flags 0x2"]),  // bit 0 is sparse; bit 1 is unknown
      (h, 6 * 32 + 32, 8, ["digest area"]),  // digest count not blocks × length
      (32, 7, 8, ["block count"]),  // block count not fitting the device size
      (16, 3000, 4, ["3000"]),  // block size
      (20, 0, 1, ["digest length"]),
      (20, 65, 1, ["digest length"]),
      (80, UInt64(image.utf8.count + 1), 2, ["source name length"]),
    ]
    for (offset, value, width, needles) in cases {
      try writeDenseFile(patchedPath, patched(offset, value, width))
      assertThrows(
        try compare(signature: patchedPath, with: image), containing: [patchedPath] + needles,
        "field at \(offset) set to \(value)")
    }
    // A digest name OpenSSL does not know, or one of another length.
    var unknown = bytes
    unknown.replaceSubrange(64..<80, with: Array("nosuchdigest".utf8) + [0, 0, 0, 0])
    try writeDenseFile(patchedPath, Array(unknown.dropLast(32)) + sha256(unknown.dropLast(32)))
    assertThrows(try compare(signature: patchedPath, with: image), containing: ["nosuchdigest"])
    var other = bytes
    other.replaceSubrange(64..<80, with: Array("sha512".utf8) + [UInt8](repeating: 0, count: 10))
    try writeDenseFile(patchedPath, Array(other.dropLast(32)) + sha256(other.dropLast(32)))
    assertThrows(try compare(signature: patchedPath, with: image), containing: ["sha512"])
  }

  func testFailedSigningLeavesNothingBehind() throws {
    let dir = try makeTempDirectory()
    let source = FailingSource(size: 64 * 4096, failAt: 40 * 4096)
    assertThrows(
      try Signer.sign(
        source, algorithm: DigestAlgorithm.sha256, blockSize: 4096, to: .file(dir + "/s.sig"), progress: false),
      containing: ["failing source", "read error"])
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "no signature or temporary file")
  }

  /// A Device keeps the size it had when opened; if the file then shrinks,
  /// signing must fail ("a read past the end is an error, never silent
  /// zeros"), not hash the vanished bytes as zeros.
  func testFileShrinkingWhileSigningIsAnError() throws {
    let dir = try makeTempDirectory()
    let image = dir + "/shrinking.img"
    var g = SplitMix64(seed: testSeed(38))
    try writeDenseFile(image, g.bytes(64 * 4096))
    let device = try Device(path: image)
    XCTAssertEqual(truncate(image, 4096), 0)
    assertThrows(
      try Signer.sign(
        device, algorithm: DigestAlgorithm.sha256, blockSize: 4096, to: .file(dir + "/s.sig"), progress: false),
      containing: [image])
    // Reading the vanished range directly is an error, as documented.
    var buffer = [UInt8](repeating: 0, count: 4096)
    assertThrows(try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 10 * 4096) }, containing: [image])
  }

  func testNotASignature() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/x.sig"
    try writeDenseFile(path, Array("plain text, not a signature at all".utf8))
    assertThrows(try SignatureReader(path: path), containing: [path, "not a dualrestore signature"])
    try writeDenseFile(path, [])
    assertThrows(try SignatureReader(path: path), containing: [path, "empty input"])
    let map = MapFormat.encode(BlockMap(geometry: try BlockGeometry(blockSize: 512, deviceSize: 512)))
    try writeDenseFile(path, map)
    assertThrows(try SignatureReader(path: path), containing: ["not a dualrestore signature"])
    assertThrows(try SignatureReader(path: dir + "/missing.sig"), containing: [dir + "/missing.sig", "No such file"])
  }
}

/// A source whose reads fail at one offset; everything else reads as 0x42.
private final class FailingSource: BlockDevice, @unchecked Sendable {
  let name = "failing source"
  let size: UInt64
  let failAt: UInt64
  init(size: UInt64, failAt: UInt64) {
    self.size = size
    self.failAt = failAt
  }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    if (offset..<(offset + UInt64(buffer.count))).contains(failAt) {
      throw ToolkitError("\(name): read error at \(failAt)")
    }
    buffer.initializeMemory(as: UInt8.self, repeating: 0x42)
  }
  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { (true, size) }
}
