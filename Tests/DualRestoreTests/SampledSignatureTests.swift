// Sampled signatures: a sparse signature of a BlockSample's blocks, with the
// sample in the header's SMPL field. On a device of 2^20 blocks with 1% of
// them damaged, a sample of 1/1000 must find the damage for every one of
// 100 seeds while reading at most 0.2% of each side, counted at the
// device; the same sample drawn at two sites selects the same blocks; and
// the SMPL field is written as documented and every inconsistency in it
// refused.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// A file device whose reads are counted: the bytes a signer or a
/// comparison really asked the device for. It reports no holes, as a block
/// device or an NBD export without block status: every block asked for is
/// read, none is known to be zeros.
final class CountingDevice: BlockDevice, @unchecked Sendable {
  let inner: Device
  private let lock = NSLock()
  private var counted: UInt64 = 0
  private var requests = 0

  init(_ path: String) throws { inner = try Device(path: path) }

  var name: String { inner.name }
  var size: UInt64 { inner.size }
  var capabilities: DeviceCapabilities { inner.capabilities }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    lock.lock()
    counted += UInt64(buffer.count)
    requests += 1
    lock.unlock()
    try inner.read(into: buffer, at: offset)
  }

  /// Bytes read since the last call, and the requests that read them.
  func take() -> (bytes: UInt64, requests: Int) {
    lock.lock()
    defer {
      counted = 0
      requests = 0
      lock.unlock()
    }
    return (counted, requests)
  }
}

final class SampledSignatureTests: XCTestCase {
  static let blockSize = 4096
  /// 2^20 blocks of 4 KiB: 4 GiB, mostly holes.
  static let blocks: UInt64 = 1 << 20
  static var size: UInt64 { blocks * UInt64(blockSize) }

  /// A: 64 pieces of 1 MiB of random data at seeded places over holes. B:
  /// the same, with 1% of the blocks (10486) damaged at seeded places, in
  /// data and in holes alike: one byte of each made its complement.
  /// Returns the paths and the damaged blocks.
  private func makeImages(_ dir: String) throws -> (a: String, b: String, damaged: BlockBitmap) {
    var g = SplitMix64(seed: 20_260_101)
    let a = dir + "/a.img"
    let b = dir + "/b.img"
    for path in [a, b] { try createSparseFile(path, size: Self.size) }
    let fa = open(a, O_RDWR)
    let fb = open(b, O_RDWR)
    XCTAssertGreaterThanOrEqual(fa, 0)
    XCTAssertGreaterThanOrEqual(fb, 0)
    defer {
      close(fa)
      close(fb)
    }
    func pwriteAll(_ fd: Int32, _ bytes: [UInt8], _ offset: UInt64) {
      let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }
      XCTAssertEqual(n, bytes.count)
    }
    for _ in 0..<64 {
      let piece = g.bytes(1 << 20)
      let at = (g.next() % (Self.size >> 20)) << 20
      pwriteAll(fa, piece, at)
      pwriteAll(fb, piece, at)
    }
    var damaged = BlockBitmap(count: Self.blocks)
    let wanted = (Self.blocks + 99) / 100
    while damaged.population < wanted {
      let block = g.next() % Self.blocks
      if damaged[block] { continue }
      damaged[block] = true
      let offset = block * UInt64(Self.blockSize) + g.next() % UInt64(Self.blockSize)
      var byte: UInt8 = 0
      XCTAssertEqual(pread(fa, &byte, 1, off_t(offset)), 1)
      pwriteAll(fb, [~byte], offset)
    }
    XCTAssertEqual(fsync(fa), 0)
    XCTAssertEqual(fsync(fb), 0)
    return (a, b, damaged)
  }

  @discardableResult
  private func signSample(_ device: BlockDevice, _ path: String, _ sample: BlockSample, selection: BlockBitmap? = nil)
    throws -> Signer.Summary
  {
    try Signer.sign(
      device, algorithm: DigestAlgorithm.sha256, blockSize: UInt32(Self.blockSize), to: .file(path), progress: false,
      selection: selection, sample: sample)
  }

  /// 1% of 2^20 blocks damaged; a 1/1000 sample of A compared with B finds
  /// damage for each of 100 seeds (missing it has probability about
  /// e^-10.5 a seed), and the map is exactly the damaged blocks the sample
  /// chose; each side reads at most 0.2% of its 4 GiB.
  func testAThousandthFindsOnePercentOfDamageEveryTime() throws {
    let dir = try makeTempDirectory()
    let (a, b, damaged) = try makeImages(dir)
    let da = try CountingDevice(a)
    let db = try CountingDevice(b)
    let limit = Self.size / 500
    let fraction = try BlockSample.Fraction(parsing: "1/1000")
    var found = 0
    var mostRead: UInt64 = 0
    var caught: [UInt64] = []
    for seed: UInt64 in 1...100 {
      let sample = BlockSample(fraction: fraction, seed: seed)
      let sig = dir + "/a.sig"
      let summary = try signSample(da, sig, sample)
      let selection = try XCTUnwrap(summary.header.selection)
      XCTAssertEqual(selection, sample.selection(blockCount: Self.blocks), "seed \(seed)")
      XCTAssertEqual(summary.header.sample, sample)
      let readA = da.take()
      let report = try Comparison.compare(
        signature: SignatureReader(path: sig), db, signatureIsA: true, allowSizeChange: false, progress: false)
      let readB = db.take()
      XCTAssertEqual(report.differing, damaged.intersection(selection), "seed \(seed): the damaged blocks sampled")
      if report.differ { found += 1 }
      caught.append(report.differing.population)
      // The sampled blocks and nothing else, on both sides.
      let sampledBytes = selection.population * UInt64(Self.blockSize)
      XCTAssertEqual(readA.bytes, sampledBytes, "seed \(seed): A read \(readA.bytes) bytes")
      XCTAssertEqual(readB.bytes, sampledBytes, "seed \(seed): B read \(readB.bytes) bytes")
      XCTAssertLessThanOrEqual(readA.bytes, limit, "seed \(seed): A read \(readA.bytes) bytes")
      XCTAssertLessThanOrEqual(UInt64(readB.requests), selection.population, "one request a block at most")
      mostRead = max(mostRead, readA.bytes, readB.bytes)
    }
    XCTAssertEqual(found, 100, "the damage was found with \(found) of 100 seeds")
    print(
      "sampled 1/1000 of 2^20 blocks with 1% damaged: found with \(found) of 100 seeds, "
        + "\(caught.min() ?? 0) to \(caught.max() ?? 0) damaged blocks caught, "
        + "at most \(mostRead) bytes read of \(Self.size) (\(Double(mostRead) * 100 / Double(Self.size))%)")
  }

  /// The same sample drawn from two images of the same geometry selects the
  /// same blocks; the two signatures compare, and give the damaged blocks
  /// of the selection; one drawn with another seed (or fraction) is refused
  /// in a sentence naming both samples; with a map, the sample is drawn
  /// among its blocks.
  func testTheSameSampleAtTwoSitesSelectsTheSameBlocks() throws {
    let dir = try makeTempDirectory()
    let (a, b, damaged) = try makeImages(dir)
    let sample = BlockSample(fraction: try BlockSample.Fraction(parsing: "0.001"), seed: 424_242)
    let sa = try signSample(Device(path: a), dir + "/a.sig", sample)
    let sb = try signSample(Device(path: b), dir + "/b.sig", sample)
    XCTAssertEqual(sa.header.selection, sb.header.selection)
    let ra = try SignatureReader(path: dir + "/a.sig")
    let rb = try SignatureReader(path: dir + "/b.sig")
    XCTAssertEqual(ra.header.sample, sample)
    XCTAssertEqual(rb.header.sample, sample)
    XCTAssertEqual(ra.selection, rb.selection)
    let selection = try XCTUnwrap(ra.selection)
    let report = try Comparison.compare(ra, rb, allowSizeChange: false)
    XCTAssertTrue(report.differ)
    XCTAssertEqual(report.differing, damaged.intersection(selection))
    XCTAssertEqual(report.bytesCompared, 0, "two signatures: no data read")
    // Each against its own image: nothing differs.
    for (sig, image) in [("a.sig", a), ("b.sig", b)] {
      let same = try Comparison.compare(
        signature: SignatureReader(path: dir + "/" + sig), Device(path: image), signatureIsA: true,
        allowSizeChange: false, progress: false)
      XCTAssertFalse(same.differ, sig)
    }

    for other in ["1/1000 424243", "1/999 424242"] {
      let parts = other.split(separator: " ")
      let drawn = BlockSample(
        fraction: try BlockSample.Fraction(parsing: String(parts[0])), seed: UInt64(parts[1]) ?? 0)
      try signSample(Device(path: b), dir + "/c.sig", drawn)
      assertThrows(
        try Comparison.compare(
          SignatureReader(path: dir + "/a.sig"), SignatureReader(path: dir + "/c.sig"), allowSizeChange: false),
        containing: [
          "\(dir)/a.sig samples 1/1000 with seed 424242 but \(dir)/c.sig samples \(drawn)",
          "compare only when drawn with the same fraction and seed",
        ])
    }

    // Within a map: the sample's blocks the map sets, and no others.
    var map = BlockBitmap(count: Self.blocks)
    map.set(0..<Self.blocks / 4)
    map.set(Self.blocks / 2..<Self.blocks / 2 + 1000)
    let within = try signSample(Device(path: a), dir + "/m.sig", sample, selection: map)
    XCTAssertEqual(within.header.selection, selection.intersection(map))
    XCTAssertEqual(within.header.sample, sample)
    XCTAssertLessThan(within.header.signedBlocks, selection.population)
    XCTAssertGreaterThan(within.header.signedBlocks, 0)
  }

  // MARK: The SMPL field

  private func smallSignature(_ dir: String, sample: BlockSample?) throws -> (path: String, bytes: [UInt8]) {
    let image = dir + "/small.img"
    var g = SplitMix64(seed: 3)
    try writeDenseFile(image, g.bytes(64 * 512 + 100))
    let path = dir + "/small.sig"
    _ = try Signer.sign(
      Device(path: image), algorithm: DigestAlgorithm.sha256, blockSize: 512, to: .file(path), progress: false,
      selection: sample == nil ? BlockBitmap(count: 65, filled: true) : nil, sample: sample)
    return (path, try readFileBytes(path))
  }

  private func u64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

  /// The documented layout: "SMPL", 24, numerator, denominator, seed right
  /// after the source name, counted in the header length.
  func testTheSampleFieldIsWrittenAsDocumented() throws {
    let dir = try makeTempDirectory()
    let sample = BlockSample(fraction: try BlockSample.Fraction(parsing: "3/12"), seed: 0x0102_0304_0506_0708)
    let (path, bytes) = try smallSignature(dir, sample: sample)
    let n = Int(bytes[80]) | Int(bytes[81]) << 8
    let field = 82 + n
    XCTAssertEqual(Array(bytes[field..<field + 4]), Array("SMPL".utf8))
    XCTAssertEqual(Array(bytes[field + 4..<field + 6]), [24, 0])
    XCTAssertEqual(Array(bytes[field + 6..<field + 30]), u64(1) + u64(4) + u64(0x0102_0304_0506_0708))
    XCTAssertEqual(Array(bytes[12..<16]), [UInt8(field + 30), 0, 0, 0], "the header length counts the field")
    XCTAssertEqual(Array(bytes[10..<12]), [1, 0], "sparse")
    let reader = try SignatureReader(path: path)
    XCTAssertEqual(reader.header.sample, sample)
    XCTAssertEqual(reader.selection, sample.selection(blockCount: 65))
    try reader.finish()
    // A sparse signature without a sample has no field.
    let (plainPath, plain) = try smallSignature(dir, sample: nil)
    XCTAssertEqual(Int(plain[12]), 82 + n)
    XCTAssertEqual(Array(plain[10..<12]), [1, 0], "sparse")
    XCTAssertNil(try SignatureReader(path: plainPath).header.sample)
  }

  /// The fields between the source name and H, rewritten with the header
  /// length and the closing checksum made right: unknown tags are skipped,
  /// every inconsistent sample is refused in one sentence naming the file.
  func testInconsistentSampleFieldsAreRefused() throws {
    let dir = try makeTempDirectory()
    let sample = BlockSample(fraction: try BlockSample.Fraction(parsing: "1/2"), seed: 9)
    let (_, bytes) = try smallSignature(dir, sample: sample)
    let n = Int(bytes[80]) | Int(bytes[81]) << 8
    let nameEnd = 82 + n
    let h = nameEnd + 30
    let rest = Array(bytes[h..<(bytes.count - 32)])
    let smpl = Array("SMPL".utf8)
    func field(_ tag: [UInt8], _ body: [UInt8]) -> [UInt8] {
      tag + [UInt8(body.count & 0xFF), UInt8(body.count >> 8)] + body
    }
    func build(_ fields: [UInt8], flags: UInt8 = 1, after: [UInt8]? = nil) -> [UInt8] {
      var head = Array(bytes[..<nameEnd]) + fields
      head[10] = flags
      let length = UInt32(head.count)
      for i in 0..<4 { head[12 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
      let body = head + (after ?? rest)
      return body + sha256(body)
    }
    let good = field(smpl, u64(1) + u64(2) + u64(9))
    XCTAssertEqual(build(good), bytes, "the signature as written, rebuilt")
    let path = dir + "/p.sig"
    func read(_ signature: [UInt8]) throws -> SignatureReader {
      try writeDenseFile(path, signature)
      let r = try SignatureReader(path: path)
      try r.finish()
      return r
    }
    // Unknown fields before and after are skipped; no field at all is a plain sparse signature.
    XCTAssertEqual(
      try read(build(field(Array("ABCD".utf8), [1, 2, 3]) + good + field([0, 0, 0, 0], []))).header.sample, sample)
    XCTAssertNil(try read(build([])).header.sample)
    XCTAssertNil(try read(build(field(Array("SMPX".utf8), u64(1) + u64(2) + u64(9)))).header.sample)

    let refused: [([UInt8], String)] = [
      (build(good + good), "the sample is recorded twice"),
      (build(field(smpl, u64(1) + u64(2))), "sample field of 16 bytes is not 24"),
      (build(field(smpl, u64(1) + u64(2) + u64(9) + [0])), "sample field of 25 bytes is not 24"),
      (build(field(smpl, u64(0) + u64(2) + u64(9))), "sample fraction 0/2 is out of range"),
      (build(field(smpl, u64(3) + u64(2) + u64(9))), "sample fraction 3/2 is out of range"),
      (build(field(smpl, u64(1) + u64(0) + u64(9))), "sample fraction 1/0 is out of range"),
      (build(good + [0x41, 0x42, 0x43]), "header field at byte \(h) is cut off by the header length \(h + 3)"),
      (build(good + field(smpl, []).dropLast(1)), "is cut off by the header length"),
      (build(Array(good.prefix(6)) + Array(good.prefix(10))), "of 24 bytes runs past the header length"),
    ]
    for (signature, needle) in refused {
      assertThrows(try read(signature), containing: [path, needle], needle)
      do { _ = try read(signature) } catch { XCTAssertFalse("\(error)".contains("\n")) }
    }
    // A dense signature with a sample field.
    _ = try Signer.sign(
      Device(path: dir + "/small.img"), algorithm: DigestAlgorithm.sha256, blockSize: 512,
      to: .file(dir + "/d.sig"), progress: false)
    let denseBytes = try readFileBytes(dir + "/d.sig")
    var dense = Array(denseBytes[..<nameEnd])
    dense[10] = 0
    dense += good
    let length = UInt32(dense.count)
    for i in 0..<4 { dense[12 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
    let body = dense + denseBytes[nameEnd..<(denseBytes.count - 32)]
    assertThrows(try read(body + sha256(body)), containing: [path, "a dense signature records a sample"])
  }
}
