// Inputs from fuzzing the readers of hostile input (scripts/fuzz), kept as
// regression tests: each is refused with its one sentence, never a trap.
// They run through the same entry points as the fuzz targets
// (FuzzEntryPoints), so a test here is the fuzz target on one input. The
// inputs are built here from the formats' own writers and then damaged the
// way the fuzzer damaged them (truncations, huge lengths, bad magic,
// counts that overflow), or written out as bytes.

import CLZ4
import CShim
import DualRestoreFuzz
import Foundation
import XCTest

@testable import DualRestore

final class FuzzRegressionTests: XCTestCase {

  // MARK: Building inputs

  /// A valid stream of a 10 KiB device in 4 KiB blocks: a raw block, an
  /// LZ4 block (`lz4` replaces its payload), a zero run of the last
  /// (partial) block, the END record; and where each record starts. With
  /// `lineage`, a LINEAGE record follows the HEADER.
  func validStream(
    lz4: [UInt8]? = nil, lineage: StreamFormat.Lineage? = nil, generation: StreamFormat.Generation? = nil
  ) throws -> (bytes: [UInt8], at: [Int]) {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 10240)
    let header = StreamFormat.Header(
      geometry: geometry, streamID: ID128(high: 1, low: 2), started: Instant(nanosecondsSinceEpoch: 1),
      sourceName: "fuzz")
    var out = StreamFormat.preamble()
    var at: [Int] = []
    func add(_ type: StreamFormat.RecordType, _ body: [UInt8]) {
      at.append(out.count)
      out += StreamFormat.record(type, sequence: UInt64(at.count - 1), body: body)
    }
    add(.header, StreamFormat.headerBody(header))
    if let lineage { add(.lineage, StreamFormat.lineageBody(lineage)) }
    if let generation { add(.generation, StreamFormat.generationBody(generation)) }
    add(.data, dataBody(block: 0, length: 4096, encoding: .raw, (0..<4096).map { UInt8($0 % 251) }))
    add(.data, dataBody(block: 1, length: 4096, encoding: .lz4, lz4 ?? compressedZeros()))
    add(.zero, StreamFormat.zeroBody(first: 2, count: 1))
    let end = StreamFormat.End(
      dataBlocks: 2, zeroBlocks: 1, bytes: 10240, records: UInt64(at.count), digest: sha256(out))
    add(.end, StreamFormat.endBody(end))
    return (out, at)
  }

  /// 4096 zero bytes in LZ4.
  func compressedZeros() -> [UInt8] {
    let zeros = [CChar](repeating: 0, count: 4096)
    var out = [CChar](repeating: 0, count: 4200)
    let n = LZ4_compress_default(zeros, &out, 4096, 4200)
    return out.prefix(Int(n)).map { UInt8(bitPattern: $0) }
  }

  func dataBody(block: UInt64, length: Int, encoding: StreamFormat.DataEncoding, _ payload: [UInt8]) -> [UInt8] {
    var body = [UInt8](repeating: 0, count: 16)
    body.withUnsafeMutableBytes {
      StreamFormat.storeDataFields($0.baseAddress!, block: block, length: length, encoding: encoding)
    }
    return body + payload
  }

  func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
  func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
  func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
  func be32(_ v: UInt32) -> [UInt8] { (0..<4).reversed().map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
  func be64(_ v: UInt64) -> [UInt8] { (0..<8).reversed().map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

  /// `bytes` with `patch` written at `offset`.
  func patched(_ bytes: [UInt8], at offset: Int, _ patch: [UInt8]) -> [UInt8] {
    var out = bytes
    out.replaceSubrange(offset..<offset + patch.count, with: patch)
    return out
  }

  // MARK: Block streams

  func testTheValidStreamIsAcceptedByBothReaders() throws {
    let stream = try validStream().bytes
    XCTAssertNil(FuzzEntryPoints.parseStream(stream))
    XCTAssertNil(FuzzEntryPoints.checkStream(stream))
    XCTAssertEqual(FuzzEntryPoints.repairStreamChecksums(stream), stream)
  }

  static let lineage = StreamFormat.Lineage(
    standsFor: ID128(high: 3, low: 4), standsForStarted: Instant(nanosecondsSinceEpoch: 1),
    firstCompacted: ID128(high: 5, low: 6),
    compactedCount: 2)

  /// The seed of a compacted stream in fuzz/seeds: the valid stream with a
  /// LINEAGE record, plaintext (the encrypted target seals it too) and
  /// encrypted with the fuzz targets' key.
  func testTheLineageSeedsAreAcceptedByBothReaders() throws {
    let stream = try validStream(lineage: Self.lineage).bytes
    XCTAssertNil(FuzzEntryPoints.parseStream(stream))
    XCTAssertNil(FuzzEntryPoints.checkStream(stream))
    let seeds = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent().appendingPathComponent("fuzz/seeds")
    for target in ["stream", "stream-encrypted"] {
      let seed = try Data(contentsOf: seeds.appendingPathComponent("\(target)/lineage.stream"))
      XCTAssertEqual(Array(seed), stream, "fuzz/seeds/\(target)/lineage.stream is the stream built here")
    }
    let sealed = Array(try Data(contentsOf: seeds.appendingPathComponent("stream-encrypted/lineage-encrypted.stream")))
    let key: [UInt8] = (1...32).map { UInt8($0) }
    XCTAssertNil(FuzzEntryPoints.parseStream(sealed, key: key))
    XCTAssertNil(FuzzEntryPoints.checkStream(sealed, key: key))
    // It is the plaintext stream sealed: record 2 is a LINEAGE record (flags
    // 0) of 48 bytes and a tag, after the CRYPTO record and the HEADER.
    let crypto = 16 + 80 + 4
    let header = 16 + 98 + 4 + 16 + 4
    let lineageAt = 16 + crypto + header
    XCTAssertEqual(Array(sealed[lineageAt..<lineageAt + 8]), le32(6) + le32(48 + 16))
  }

  static let generation = StreamFormat.Generation(
    generation: ID128(high: 7, low: 8), changesSince: Instant(nanosecondsSinceEpoch: 2),
    asOf: Instant(nanosecondsSinceEpoch: 3))

  /// The seeds of a stream with a GENERATION record and of a map with the
  /// generation fields in fuzz/seeds: built here, accepted by the readers.
  func testTheGenerationSeedsAreAcceptedByTheReaders() throws {
    let stream = try validStream(lineage: Self.lineage, generation: Self.generation).bytes
    XCTAssertNil(FuzzEntryPoints.parseStream(stream))
    XCTAssertNil(FuzzEntryPoints.checkStream(stream))
    let map = MapFormat.encode(
      BlockMap(
        geometry: try BlockGeometry(blockSize: 512, deviceSize: 10000), meaning: .current, deviceName: "fuzz",
        mapID: ID128(high: 9, low: 10), trackingStarted: Instant(nanosecondsSinceEpoch: 1),
        lastMergedStream: ID128(high: 1, low: 2), trackingEnded: Instant(nanosecondsSinceEpoch: 4),
        mergedAsOf: Instant(nanosecondsSinceEpoch: 3), mergedAsOfGeneration: Self.generation.generation,
        bits: BlockBitmap(count: 20, words: [0b1011_0000])))
    XCTAssertNoThrow(try MapFormat.decode(map, name: "seed"))
    let seeds = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent().appendingPathComponent("fuzz/seeds")
    for (path, bytes) in [("stream/generation.stream", stream), ("map/generation-fields.map", map)] {
      let seed = try Data(contentsOf: seeds.appendingPathComponent(path))
      XCTAssertEqual(Array(seed), bytes, "fuzz/seeds/\(path) is the one built here")
    }
  }

  func testStreamWithBadMagicOrNothing() {
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(Array("DRMAP\r\n\u{1a}".utf8)), "not a dualrestore block stream (bad magic)")
    XCTAssertEqual(FuzzEntryPoints.checkStream([]), "fuzz input: empty input, not a block stream")
    XCTAssertEqual(
      FuzzEntryPoints.checkStream(Array(StreamFormat.magic.prefix(5))),
      "fuzz input: truncated stream: the preamble is incomplete")
  }

  func testStreamCutAnywhereIsTruncatedNotComplete() throws {
    let stream = try validStream().bytes
    for cut in [16, 17, 35, 36, 200, 4096, stream.count - 84, stream.count - 1] {
      let cutStream = Array(stream[..<cut])
      for result in [FuzzEntryPoints.parseStream(cutStream), FuzzEntryPoints.checkStream(cutStream)] {
        XCTAssertTrue(result?.contains("truncated stream") ?? false, "cut at \(cut): \(result ?? "accepted")")
      }
    }
  }

  func testStreamRecordOfFourGiBIsRefusedBeforeAnyAllocation() {
    let input = StreamFormat.preamble() + le32(0x0001_0001) + le32(0xFFFF_FFFF) + le64(0)
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(input),
      "record 0 at byte 16: body length 4294967295 exceeds the limit of 67112960 bytes")
    XCTAssertEqual(
      FuzzEntryPoints.checkStream(input),
      "fuzz input: record 0 at byte 16: body length 4294967295 exceeds the limit of 67112960 bytes")
  }

  func testStreamZeroRunThatWouldOverflowIsRefused() throws {
    let (stream, at) = try validStream()
    // The ZERO record: from block 1, UInt64.max blocks (first + count overflows).
    let damaged = FuzzEntryPoints.repairStreamChecksums(patched(stream, at: at[3] + 16, le64(1) + le64(.max)))
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(damaged),
      "record 3 at byte \(at[3]): zero run of 18446744073709551615 blocks from block 1 is out of range")
  }

  func testStreamLZ4PayloadThatDoesNotDecodeIsDamaged() throws {
    // The payload less its last byte: the framing is right, the block is not.
    let (stream, at) = try validStream(lz4: compressedZeros().dropLast())
    XCTAssertNil(FuzzEntryPoints.parseStream(stream), "the framing is right")
    XCTAssertEqual(
      FuzzEntryPoints.checkStream(stream),
      "fuzz input: record 2 at byte \(at[2]): block 1 does not decompress to 4096 bytes; the record is damaged")
  }

  func testStreamWithRightCRCsButWrongDigestIsDamaged() throws {
    let (stream, at) = try validStream()
    var flipped = stream
    flipped[at[1] + 16 + 16] ^= 1  // the first byte of block 0
    // Every CRC made right again, the END record (and its digest) as it was.
    let damaged = FuzzEntryPoints.repairStreamChecksums(Array(flipped[..<at[4]])) + stream[at[4]...]
    XCTAssertNil(FuzzEntryPoints.parseStream(damaged), "the parser checks CRCs, not the digest")
    XCTAssertEqual(
      FuzzEntryPoints.checkStream(damaged),
      "fuzz input: record 4 at byte \(at[4]): the stream digest does not match; the stream is damaged")
    XCTAssertNil(FuzzEntryPoints.checkStream(FuzzEntryPoints.repairStreamChecksums(damaged)))
  }

  func testStreamHeaderWithImpossibleGeometryIsRefused() throws {
    let stream = try validStream().bytes
    // Block size 3 (not a power of two) in the HEADER record.
    let damaged = FuzzEntryPoints.repairStreamChecksums(patched(stream, at: 16 + 16, le32(3)))
    let result = FuzzEntryPoints.parseStream(damaged)
    XCTAssertTrue(result?.hasPrefix("record 0 at byte 16: ") ?? false, result ?? "accepted")
    XCTAssertTrue(result?.contains("3") ?? false, result ?? "accepted")
  }

  /// A valid version 2 stream of the same device: a SOURCES record naming
  /// one image, a REFERENCE run of blocks 0 and 1 (at the image's 0 and 1),
  /// a zero run of the last block, and the END record of 80 bytes.
  func validReferencesStream() throws -> (bytes: [UInt8], at: [Int]) {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 10240)
    let header = StreamFormat.Header(
      geometry: geometry, streamID: ID128(high: 1, low: 2), started: Instant(nanosecondsSinceEpoch: 1),
      sourceName: "fuzz")
    let sources = StreamFormat.Sources(
      digestName: "sha256", digestLength: 32,
      images: [
        SignatureIndex.Image(name: "held", signatureID: ID128(high: 7, low: 8), geometry: geometry, signedBlocks: 3)
      ])
    var out = StreamFormat.preamble(version: StreamFormat.referencesVersion)
    var at: [Int] = []
    func add(_ type: StreamFormat.RecordType, _ body: [UInt8]) {
      at.append(out.count)
      out += StreamFormat.record(type, sequence: UInt64(at.count - 1), body: body)
    }
    add(.header, StreamFormat.headerBody(header))
    add(.sources, StreamFormat.sourcesBody(sources))
    var fields = [UInt8](repeating: 0, count: 24)
    fields.withUnsafeMutableBytes {
      StreamFormat.storeReferenceFields($0.baseAddress!, first: 0, count: 2, image: 0, sourceFirst: 0)
    }
    add(.reference, fields + sha256([1]) + sha256([2]))
    add(.zero, StreamFormat.zeroBody(first: 2, count: 1))
    let end = StreamFormat.End(
      dataBlocks: 0, zeroBlocks: 1, bytes: 10240, records: UInt64(at.count), digest: sha256(out), referencedBlocks: 2)
    add(.end, StreamFormat.endBody(end, version: StreamFormat.referencesVersion))
    return (out, at)
  }

  /// The harness's repairs know the END of version 2 (80 bytes): a
  /// mutated digest of a REFERENCE run is made whole again, END digest
  /// included, and a stream with references is sealed as version 2.
  func testTheHarnessRepairsAndSealsStreamsWithReferences() throws {
    let (stream, at) = try validReferencesStream()
    XCTAssertNil(FuzzEntryPoints.parseStream(stream))
    XCTAssertNil(FuzzEntryPoints.checkStream(stream))
    XCTAssertEqual(FuzzEntryPoints.repairStreamChecksums(stream), stream)
    var mutated = stream
    mutated[at[2] + 16 + 24 + 3] ^= 0x10  // a byte of the first digest
    XCTAssertEqual(
      FuzzEntryPoints.checkStream(mutated),
      "fuzz input: record 2 at byte \(at[2]): checksum mismatch: the record is damaged")
    XCTAssertNil(FuzzEntryPoints.checkStream(FuzzEntryPoints.repairStreamChecksums(mutated)))

    let key = (1...32).map { UInt8($0) }
    let sealed = try FuzzEntryPoints.encryptStream(stream, key: key)
    XCTAssertEqual(Array(sealed[8..<10]), [2, 0], "sealed as the version it is")
    XCTAssertNil(FuzzEntryPoints.parseStream(sealed, key: key))
    XCTAssertNil(FuzzEntryPoints.checkStream(sealed, key: key))
    // Version 1 streams are still sealed as version 1, with the same key.
    let plain = try validStream().bytes
    let sealedPlain = try FuzzEntryPoints.encryptStream(plain, key: key)
    XCTAssertEqual(Array(sealedPlain[8..<10]), [1, 0])
    XCTAssertNil(FuzzEntryPoints.checkStream(sealedPlain, key: key))
    XCTAssertNil(FuzzEntryPoints.checkStream(try FuzzEntryPoints.encryptStream(stream, key: key), key: key))
  }

  func testEncryptedStreamsAndKeys() throws {
    let key = (1...32).map { UInt8($0) }
    let stream = try validStream().bytes
    let sealed = try FuzzEntryPoints.encryptStream(stream, key: key)
    XCTAssertNil(FuzzEntryPoints.parseStream(sealed, key: key))
    XCTAssertNil(FuzzEntryPoints.checkStream(sealed, key: key))
    // A plaintext stream is refused when a key is given.
    XCTAssertTrue(
      FuzzEntryPoints.parseStream(stream, key: key)?.contains("the stream is not encrypted") ?? false)
    // Without the key, or with another, it does not open.
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(sealed),
      "record 0 at byte 16: the stream is encrypted with a key file; give it with --key-file FILE")
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(sealed, key: key.reversed()),
      "record 0 at byte 16: wrong key: the fuzz key does not open this stream (or its CRYPTO record was altered)")
    // A sealed record whose ciphertext changed (its CRC repaired) fails its tag.
    var altered = sealed
    altered[16 + 100 + 16 + 5] ^= 0x40
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(FuzzEntryPoints.repairStreamChecksums(altered), key: key),
      "record 1 at byte 116: authentication failed: the record was altered, moved, or taken from another stream")
    // scrypt parameters in a CRYPTO record of a key-file stream.
    let withParameters = FuzzEntryPoints.repairStreamChecksums(patched(sealed, at: 16 + 16 + 2, [17]))
    XCTAssertEqual(
      FuzzEntryPoints.parseStream(withParameters, key: key),
      "record 0 at byte 16: the CRYPTO record gives scrypt parameters for a key file")
  }

  // MARK: Maps

  func validMap() throws -> [UInt8] {
    var map = BlockMap(
      geometry: try BlockGeometry(blockSize: 4096, deviceSize: 1 << 20), deviceName: "fuzz",
      mapID: ID128(high: 3, low: 4), trackingStarted: Instant(nanosecondsSinceEpoch: 5))
    map.bits.set(3..<100)
    return MapFormat.encode(map)
  }

  func testMapDamage() throws {
    let map = try validMap()
    XCTAssertNil(FuzzEntryPoints.decodeMap(map))
    XCTAssertEqual(FuzzEntryPoints.decodeMap([]), "fuzz input: empty input, not a map")
    XCTAssertEqual(FuzzEntryPoints.decodeMap(Array(map.dropFirst())), "fuzz input: not a dualrestore map (bad magic)")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(Array(map.prefix(60))), "fuzz input: truncated map (60 bytes)")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(Array(map.dropLast())), "fuzz input: checksum mismatch: the map is damaged or truncated"
    )
    let repair = FuzzEntryPoints.repairClosingChecksum
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(patched(map, at: 12, le32(0xFFFF_FFFF)))),
      "fuzz input: header length 4294967295 is out of range")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(patched(map, at: 88, [0xFF, 0xFF]))),
      "fuzz input: device name length 65535 is out of range")
    // Block count one more than the device holds.
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(patched(map, at: 32, le64(257)))),
      "fuzz input: block count 257 does not fit 1048576 bytes in blocks of 4096")
    // The set count in the header disagrees with the payload.
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(patched(map, at: 40, le64(.max)))),
      "fuzz input: payload has 97 set blocks but the header says 18446744073709551615")
  }

  func testMapRunsThatOverflowOrFallShort() throws {
    let map = try validMap()
    let headerLength = Int(map[12]) | Int(map[13]) << 8
    let repair = FuzzEntryPoints.repairClosingChecksum
    // Runs payload: 3 clear, then a run of 2^63 set blocks.
    let huge: [UInt8] = [0x03, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]
    let base = Array(map[..<headerLength])
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(base + le64(UInt64(huge.count)) + huge + [UInt8](repeating: 0, count: 32))),
      "fuzz input: runs cover more than 256 blocks")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(base + le64(1) + [0x03] + [UInt8](repeating: 0, count: 32))),
      "fuzz input: runs cover 3 of 256 blocks")
    // A varint that never ends.
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(repair(base + le64(2) + [0x83, 0x80] + [UInt8](repeating: 0, count: 32))),
      "fuzz input: damaged run in payload at byte 2")
  }

  /// Bytes from hex digits.
  func hex(_ text: String) -> [UInt8] {
    let digits = Array(text.utf8)
    return stride(from: 0, to: digits.count, by: 2).map {
      UInt8(String(decoding: digits[$0..<$0 + 2], as: UTF8.self), radix: 16)!
    }
  }

  /// Found by the map target, as an out-of-memory: 163 bytes, their
  /// checksum right, describing a device of 512 TiB in 4 KiB blocks (2^37
  /// blocks, a bitmap of 16 GiB) with runs that cover 6 blocks. The bitmap
  /// was allocated before the runs were checked, so `overwrite-map show`
  /// died of it; at 4 EiB in 512-byte blocks it wanted 1 PiB and trapped
  /// anywhere. Now a map of more blocks than a bitmap in memory may hold is
  /// refused from its header, whatever its runs; and a map of a smaller
  /// device whose runs fall short is refused before its bitmap too.
  func testMapWhoseRunsDoNotCoverItsHugeDeviceIsRefusedBeforeTheBitmap() {
    let found = hex(
      "44524d41500d0a1a01000000780000000010000001010000ca5400000000020006000000200000000200000000000000"
        + "d6767a1afcfc4eb18cb5214dbad5f61a0000000000000000000000000000000067439e5c8036ea181e002f776f726b2f"
        + "66757a7a2d6275696c642f776f726b2f6469736b2e696d67030000000000000001020333e9ebb303bbaaaad444dbad33"
        + "62740c10ae9eacde5886ed85a4415fa7184c1b")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(found),
      "fuzz input: 137438953478 blocks of 4096 bytes are more than the 2^34 a map holds in memory; use a larger block size"
    )
    let largest = FuzzEntryPoints.repairClosingChecksum(
      patched(patched(patched(found, at: 16, le32(512)), at: 24, le64(1 << 62)), at: 32, le64(1 << 53)))
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(largest),
      "fuzz input: 9007199254740992 blocks of 512 bytes are more than the 2^34 a map holds in memory; use a larger block size"
    )
    // A device small enough to be mapped (1 TiB in 4 KiB blocks), whose
    // runs cover 6 blocks, is refused by its runs.
    let small = FuzzEntryPoints.repairClosingChecksum(
      patched(patched(found, at: 24, le64(1 << 40)), at: 32, le64(1 << 28)))
    XCTAssertEqual(FuzzEntryPoints.decodeMap(small), "fuzz input: runs cover 6 of 268435456 blocks")
  }

  /// Found by the map target after the fix above: 168 bytes, valid, whose
  /// runs do cover all 2^53 blocks of a 4 EiB device, asking for a bitmap
  /// of 1 PiB. Refused from the header.
  func testValidMapOfAHugeDeviceIsRefusedFromItsHeader() {
    let found = hex(
      "44524d41500d0a1a01000000780000000002000001010000000000000000004000000000000020000000000000000000"
        + "d6767a1afcfc4eb18cb5214dbad5f61a0000000000000000000000000000000067439e5c8036ea181e002f776f726b2f"
        + "66757a7a2d6275696c642f776f726b2f6469736b2e696d6708000000000000008080808080808010620ad1ac409aa630"
        + "ed0733eb49b0ea36d33764d6cab6ba92c6f9cfbbc0f7240c")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMap(found),
      "fuzz input: 9007199254740992 blocks of 512 bytes are more than the 2^34 a map holds in memory; use a larger block size"
    )
  }

  // MARK: ddrescue mapfiles

  func testDdrescueMapfileDamage() {
    func text(_ s: String) -> [UInt8] { Array(s.utf8) }
    XCTAssertNil(FuzzEntryPoints.importDdrescueMapfile(text("0x0 +\n0x0 0x2000 +\n0x2000 0x1000 -\n")))
    XCTAssertEqual(
      FuzzEntryPoints.importDdrescueMapfile(text("0x0 +\n0x10 0xFFFFFFFFFFFFFFFF +\n")),
      "fuzz input: line 2: extent overflows")
    XCTAssertEqual(
      FuzzEntryPoints.importDdrescueMapfile(text("0x0 +\n0x2000 0x10 +\n0x0 0x10 +\n")),
      "fuzz input: line 3: position 0 overlaps or precedes the line before")
    XCTAssertEqual(
      FuzzEntryPoints.importDdrescueMapfile(text("# nothing\n")), "fuzz input: not a ddrescue mapfile (no status line)")
    XCTAssertEqual(
      FuzzEntryPoints.importDdrescueMapfile(text("0x0 +\n0x0 0x10 ++\n")),
      "fuzz input: line 2: expected 'pos size status' with status one of ?*/-+")
  }

  // MARK: Signatures

  func validSignature(blocks: UInt64 = 3, digestLength: Int = 4) throws -> [UInt8] {
    let header = SignatureFormat.Header(
      geometry: try BlockGeometry(blockSize: 512, deviceSize: blocks * 512), digestName: "sha256",
      digestLength: digestLength, signatureID: ID128(high: 5, low: 6), started: Instant(nanosecondsSinceEpoch: 7),
      sourceName: "fuzz")
    let body = SignatureFormat.encodeHeader(header) + (0..<Int(blocks) * digestLength).map { UInt8($0 & 0xFF) }
    return body + sha256(body)
  }

  func testSignatureDamage() throws {
    let signature = try validSignature()
    let repair = FuzzEntryPoints.repairClosingChecksum
    XCTAssertNil(FuzzEntryPoints.readSignature(signature))
    func refused(_ bytes: [UInt8]) -> String {
      // The reader names the file by its descriptor; drop that part.
      guard let e = FuzzEntryPoints.readSignature(bytes) else { return "accepted" }
      return e.split(separator: ":", maxSplits: 1).last.map { String($0.dropFirst()) } ?? e
    }
    XCTAssertEqual(refused([]), "empty input, not a signature")
    XCTAssertEqual(refused(Array(signature.prefix(40))), "truncated signature header")
    XCTAssertEqual(refused(Array(signature.dropLast())), "truncated signature: the closing checksum is missing")
    XCTAssertEqual(refused(patched(signature, at: 100, [0xEE])), "checksum mismatch: the signature is damaged")
    XCTAssertEqual(refused(Array(signature.dropLast(32 + 5))), "truncated signature: digests end at block 1")
    XCTAssertEqual(refused(repair(signature + [0])), "checksum mismatch: the signature is damaged")
    XCTAssertEqual(refused(signature + [0]), "unexpected data after the closing checksum")
    XCTAssertEqual(refused(repair(patched(signature, at: 20, [0]))), "digest length 0 is out of range")
    XCTAssertEqual(
      refused(repair(patched(signature, at: 12, le32(0xFFFF_FFFF)))), "header length 4294967295 is out of range")
    // A header promising 2^53 blocks (4 EiB, the largest device), and a
    // digest area to match, then nothing: the reader waits for no more.
    let blocks: UInt64 = 1 << 53
    let huge = patched(patched(signature, at: 24, le64(blocks * 512)), at: 32, le64(blocks))
    let headerLength = Int(signature[12]) | Int(signature[13]) << 8
    let promised = patched(huge, at: headerLength, le64(blocks * 4))
    // (The 12 digest bytes and the 32 of the checksum make 11 digests.)
    XCTAssertEqual(refused(repair(promised)), "truncated signature: digests end at block 11")
  }

  // MARK: NBD, server side

  /// The client's side of a connection: flags (fixed newstyle, no zeroes), NBD_OPT_GO for `disk`.
  func clientHandshake() -> [UInt8] {
    var go = be32(4) + Array("disk".utf8) + be16(0)
    go = be64(NBD.optionMagic) + be32(NBD.optGo) + be32(UInt32(go.count)) + go
    return be32(3) + go
  }

  func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 1, offset: UInt64, length: UInt32) -> [UInt8] {
    be32(NBD.requestMagic) + be16(flags) + be16(type) + be64(cookie) + be64(offset) + be32(length)
  }

  func testServerRefusesBadHandshakes() {
    XCTAssertEqual(
      FuzzEntryPoints.serveNBD(be32(0)), "connection ended: the client does not speak the fixed newstyle handshake")
    XCTAssertEqual(
      FuzzEntryPoints.serveNBD(be32(0x8000_0001)), "connection ended: the client sent unknown flags 0x80000001")
    XCTAssertEqual(
      FuzzEntryPoints.serveNBD(be32(3) + be64(NBD.optionMagic) + be32(NBD.optGo) + be32(0xFFFF_FFFF)),
      "connection ended: option 7 of 4294967295 bytes is too long")
    XCTAssertEqual(
      FuzzEntryPoints.serveNBD(be32(3) + be64(0x1234) + be32(NBD.optGo) + be32(0)),
      "connection ended: bad option magic from the client")
    let unknown = FuzzEntryPoints.serveNBD(
      be32(3) + be64(NBD.optionMagic) + be32(NBD.optExportName) + be32(4) + Array("none".utf8))
    XCTAssertTrue(unknown?.hasPrefix("connection ended: the client asked for ") ?? false, unknown ?? "accepted")
    XCTAssertTrue(unknown?.contains("'none'") ?? false, unknown ?? "accepted")
    // NBD_OPT_GO whose name length runs past its data is answered with an
    // error, and the haggling goes on until the client goes away.
    let badGo = be32(0xFFFF_FFFF) + be16(0)
    XCTAssertNil(
      FuzzEntryPoints.serveNBD(
        be32(3) + be64(NBD.optionMagic) + be32(NBD.optGo) + be32(UInt32(badGo.count)) + badGo))
    let options = (0..<1001).flatMap { _ in be64(NBD.optionMagic) + be32(99) + be32(0) }
    XCTAssertEqual(
      FuzzEntryPoints.serveNBD(be32(3) + options),
      "connection ended: the client sent more than 1000 options; disconnected")
  }

  func testServerRefusesBadRequests() {
    let hello = clientHandshake()
    XCTAssertNil(FuzzEntryPoints.serveNBD(hello + request(NBD.cmdRead, offset: 0, length: 4096)))
    let badMagic = FuzzEntryPoints.serveNBD(hello + be32(0xDEAD_BEEF) + [UInt8](repeating: 0, count: 24))
    XCTAssertTrue(badMagic?.contains("magic") ?? false, badMagic ?? "accepted")
    let hugeWrite = FuzzEntryPoints.serveNBD(hello + request(NBD.cmdWrite, offset: 0, length: 0xFFFF_FFFF))
    XCTAssertNotNil(hugeWrite, "a WRITE of 4 GiB cannot be framed")
    // Past the end, and a range that wraps: answered with errors, the
    // connection goes on.
    XCTAssertNil(FuzzEntryPoints.serveNBD(hello + request(NBD.cmdRead, offset: 1 << 20, length: 1)))
    XCTAssertNil(FuzzEntryPoints.serveNBD(hello + request(NBD.cmdTrim, offset: .max, length: 2)))
    XCTAssertNil(FuzzEntryPoints.serveNBD(hello + request(NBD.cmdWriteZeroes, offset: .max - 1, length: 0xFFFF_FFFF)))
    // A WRITE whose data never comes.
    // A WRITE whose data stops short: the client went away, which ends the
    // connection as quietly as between requests (and serveNBD returns:
    // the server does not wait for the rest).
    XCTAssertNil(FuzzEntryPoints.serveNBD(hello + request(NBD.cmdWrite, offset: 0, length: 512) + [1, 2, 3]))
  }

  // MARK: NBD, client side

  func greeting() -> [UInt8] { Array("NBDMAGICIHAVEOPT".utf8) + be16(3) }

  func optionReply(_ type: UInt32, _ data: [UInt8], option: UInt32 = NBD.optGo) -> [UInt8] {
    be64(NBD.optionReplyMagic) + be32(option) + be32(type) + be32(UInt32(data.count)) + data
  }

  /// The peer FuzzEntryPoints.negotiateNBD's client names (the bytes are
  /// served in memory, not on this socket).
  static let peer = "/tmp/dualrestore-fuzz-\(getpid())-client.sock"

  /// The client's error less the URI it starts with. The client's time
  /// limit is 1 s, longer than the fuzz target's, so that a busy machine does
  /// not turn an error into a timeout. `repliesFrom`: where the replies to
  /// requests start.
  func refused(_ bytes: [UInt8], repliesFrom: Int? = nil) -> String {
    guard let e = FuzzEntryPoints.negotiateNBD(bytes, timeout: 1, repliesFrom: repliesFrom) else { return "accepted" }
    let uri = "nbd+unix:///disk?socket=\(FuzzRegressionTests.peer): "
    return e.hasPrefix(uri) ? String(e.dropFirst(uri.count)) : e
  }

  func testClientRefusesBadServers() {
    XCTAssertEqual(
      refused([]), "the handshake failed while reading the greeting (\(FuzzRegressionTests.peer): connection closed)")
    XCTAssertEqual(refused(Array("NBDMAGICIHAVEOPX".utf8) + be16(3)), "not an NBD server (bad greeting)")
    XCTAssertEqual(
      refused(Array("NBDMAGIC".utf8) + be64(0x0042_0281_8612_53) + be16(3)),
      "the server speaks only the oldstyle handshake, which is not supported")
    XCTAssertEqual(
      refused(greeting() + be64(NBD.optionReplyMagic) + be32(NBD.optGo) + be32(3) + be32(0xFFFF_FFFF)),
      "the server sent an option reply of 4294967295 bytes (at most 65536 accepted)")
    XCTAssertEqual(
      refused(greeting() + optionReply(NBD.repAck, [])), "the server accepted the export without describing it")
    XCTAssertEqual(refused(greeting() + optionReply(NBD.repInfo, [0])), "the server sent a malformed information reply")
    XCTAssertEqual(
      refused(greeting() + optionReply(NBD.repInfo, be16(3) + be32(3) + be32(4096) + be32(1 << 20))),
      "the server sent impossible block sizes (minimum 3, preferred 4096, maximum 1048576)")
    XCTAssertEqual(
      refused(greeting() + optionReply(NBD.repAck, [], option: NBD.optList)),
      "the server answered an option that was not asked")
    XCTAssertEqual(
      refused(greeting() + optionReply(NBD.repErrUnknown, Array("no".utf8))), "the server has no export named 'disk'")
  }

  func testClientRefusesBadReplies() {
    let export = optionReply(NBD.repInfo, be16(0) + be64(1 << 20) + be16(NBD.flagHasFlags | NBD.flagReadOnly))
    let hello = greeting() + export + optionReply(NBD.repAck, [])
    func reply(_ error: UInt32, _ cookie: UInt64) -> [UInt8] { be32(NBD.simpleReplyMagic) + be32(error) + be64(cookie) }
    // The first READ's cookie is sequence 1, slot 0.
    // Replies wait for the request: one read before it would be a reply
    // to no request.
    let at = hello.count
    XCTAssertNil(
      FuzzEntryPoints.negotiateNBD(
        hello + reply(0, 1 << 32) + [UInt8](repeating: 7, count: 4096), timeout: 1, repliesFrom: at))
    let read = "read of 4096 bytes at 0 failed: "
    XCTAssertEqual(
      refused(hello + reply(0, 99), repliesFrom: at), read + "the server replied to an unknown request (cookie 0x63)")
    XCTAssertEqual(
      refused(hello + be32(0x1234_5678) + be32(0) + be64(1 << 32), repliesFrom: at),
      read + "the server sent a reply with a bad magic number 0x12345678")
    XCTAssertEqual(
      refused(hello + reply(0, 1 << 32) + [1, 2, 3], repliesFrom: at),
      read + "the connection broke (\(FuzzRegressionTests.peer): connection closed)")
    XCTAssertEqual(refused(hello + reply(5, 1 << 32), repliesFrom: at), read + "Input/output error")
  }

  // MARK: NBD, a client opened for allocation

  func testAllocationClientRefusesBadChunks() {
    let export = optionReply(NBD.repInfo, be16(0) + be64(1 << 20) + be16(NBD.flagHasFlags | NBD.flagReadOnly))
    let go = export + optionReply(NBD.repAck, [])
    let context = optionReply(
      NBD.repMetaContext, be32(7) + Array("base:allocation".utf8), option: NBD.optSetMetaContext)
    let hello =
      greeting() + optionReply(NBD.repAck, [], option: NBD.optStructuredReply) + context
      + optionReply(NBD.repAck, [], option: NBD.optSetMetaContext) + go
    func chunk(_ flags: UInt16, _ type: UInt16, _ data: [UInt8], length: UInt32? = nil) -> [UInt8] {
      be32(NBD.structuredReplyMagic) + be16(flags) + be16(type) + be64(1 << 32) + be32(length ?? UInt32(data.count))
        + data
    }
    let status = be32(7) + be32(65536) + be32(3) + be32(983_040) + be32(0)
    func outcome(_ replies: [UInt8], _ start: [UInt8] = hello) -> String {
      guard
        let e = FuzzEntryPoints.negotiateNBD(start + replies, timeout: 1, repliesFrom: start.count, allocation: true)
      else { return "accepted" }
      let prefix = "nbd+unix:///disk?socket=\(FuzzRegressionTests.peer): block status of 1048576 bytes at 0 failed: "
      return e.hasPrefix(prefix) ? String(e.dropFirst(prefix.count)) : e
    }
    XCTAssertEqual(outcome(chunk(1, NBD.replyTypeBlockStatus, status)), "accepted")
    XCTAssertEqual(
      outcome(chunk(0, NBD.replyTypeBlockStatus, status) + chunk(1, NBD.replyTypeNone, [])), "accepted")
    XCTAssertEqual(
      outcome(chunk(0, NBD.replyTypeBlockStatus, status) + chunk(1, NBD.replyTypeBlockStatus, status)),
      "the server sent block status twice for one request")
    XCTAssertEqual(
      outcome(chunk(1, NBD.replyTypeBlockStatus, be32(8) + be32(4096) + be32(0))),
      "the server sent block status of a metadata context not asked for")
    XCTAssertEqual(
      outcome(chunk(1, NBD.replyTypeBlockStatus, be32(7) + be32(4096))),
      "the server sent a malformed block status chunk (8 bytes)")
    XCTAssertEqual(
      outcome(chunk(1, NBD.replyTypeOffsetData, be64(0) + [1, 2, 3])),
      "the server sent a reply chunk of type 1 to BLOCK_STATUS")
    XCTAssertEqual(outcome(chunk(0, NBD.replyTypeNone, [])), "the server sent a malformed closing chunk")
    XCTAssertEqual(outcome(chunk(1, NBD.replyTypeError, be32(5) + be16(4) + Array("oops".utf8))), "Input/output error")
    XCTAssertEqual(
      outcome(chunk(1, NBD.replyTypeError, be32(5) + be16(9) + Array("oops".utf8))),
      "the server sent a malformed error chunk")
    XCTAssertEqual(
      outcome(chunk(1, NBD.replyTypeBlockStatus, [], length: 0xFFFF_FFFF)),
      "the server sent a reply chunk of 4294967295 bytes (at most 8388608 taken)")
    XCTAssertEqual(
      outcome(be32(NBD.simpleReplyMagic) + be32(0) + be64(1 << 32)),
      "the server answered BLOCK_STATUS without block status")
    // Structured replies or the context refused: no block status, no error.
    let noStructured = greeting() + optionReply(NBD.repErrUnsupported, [], option: NBD.optStructuredReply) + go
    XCTAssertEqual(outcome([], noStructured), "accepted")
    let noContext =
      greeting() + optionReply(NBD.repAck, [], option: NBD.optStructuredReply)
      + optionReply(NBD.repAck, [], option: NBD.optSetMetaContext) + go
    XCTAssertEqual(outcome([], noContext), "accepted")
  }

  // MARK: Stream indexes

  /// The index scripts/fuzz writes as bytes (its seed long-zero-run, there
  /// with its checksums zero): an encrypted stream of 2^33 blocks of 512
  /// bytes that stands for another, whose ZERO run of 2^33 - 2 blocks takes
  /// two entries naming one record, between two DATA records.
  func longZeroRunIndex() throws -> StreamIndexFormat.Index {
    let identity = StreamIndexFormat.Identity(
      streamID: ID128(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210), baseStreamID: .none,
      streamLength: 1_000_000, endCRC: 0x89AB_CDEF, geometry: try BlockGeometry(blockSize: 512, deviceSize: 1 << 42),
      started: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_000), encrypted: true,
      standsFor: ID128(high: 0x1032_5476_98BA_DCFE, low: 0xEFCD_AB89_6745_2301))
    let run = UInt64(UInt32.max)
    return StreamIndexFormat.Index(
      identity: identity,
      entries: [
        .init(firstBlock: 0, blockCount: 1, offset: 116, sequence: 2, length: 4148, type: .data),
        .init(firstBlock: 1, blockCount: run, offset: 4264, sequence: 3, length: 52, type: .zero),
        .init(firstBlock: 1 << 32, blockCount: run, offset: 4264, sequence: 3, length: 52, type: .zero),
        .init(firstBlock: (1 << 33) - 1, blockCount: 1, offset: 4316, sequence: 4, length: 300, type: .data),
      ], dataBlocks: 2, zeroBlocks: (1 << 33) - 2)
  }

  func testStreamIndexDamage() throws {
    let valid = StreamIndexFormat.encode(try longZeroRunIndex())
    func decode(_ bytes: [UInt8]) -> String? { FuzzEntryPoints.decodeStreamIndex(bytes) }
    let repair = FuzzEntryPoints.repairStreamIndexChecksums
    XCTAssertNil(decode(valid))
    XCTAssertEqual(repair(valid), valid)
    // As scripts/fuzz writes it: refused by its checksums, accepted once they are made right.
    // The index of an encrypted stream: its HMAC follows the entries' CRC.
    let zeroed = patched(patched(valid, at: 124, le32(0)), at: valid.count - 36, le32(0))
    XCTAssertEqual(decode(zeroed), "the index header's checksum does not match: the index is damaged")
    XCTAssertEqual(repair(zeroed), valid)
    XCTAssertEqual(decode([]), "the index is 0 bytes, shorter than its header")
    XCTAssertEqual(repair(Array(valid.prefix(131))), Array(valid.prefix(131)))
    XCTAssertEqual(decode(Array(valid.dropFirst())), "not a dualrestore stream index (bad magic)")
    // The second zero entry one block longer: over the last DATA block.
    XCTAssertEqual(
      decode(repair(patched(valid, at: 128 + 80 + 8, le64(1 << 32)))),
      "index entry 3 (blocks 8589934591 to 8589934592) is out of order or out of range")
    // The last DATA block one further: past the device's last block.
    XCTAssertEqual(
      decode(repair(patched(valid, at: 128 + 120, le64(1 << 33)))),
      "index entry 3 (blocks 8589934592 to 8589934593) is out of order or out of range")
    // The first zero entry reaching into the second.
    XCTAssertEqual(
      decode(repair(patched(valid, at: 128 + 40 + 8, le64(1 << 32)))),
      "index entry 2 (blocks 4294967296 to 8589934591) is out of order or out of range")
    // The entry count 2^59, whose bytes would overflow a length in bytes.
    XCTAssertEqual(
      decode(repair(patched(valid, at: 80, le64(1 << 59)))),
      "the index says 576460752303423488 entries but is 324 bytes long")
  }

  // MARK: Mirror positions

  func testMirrorPositionsDamage() {
    let one = MirrorPositions(
      journal: ID128(high: 1, low: 2), nextInterval: 5, nextSequence: 40,
      copies: [
        MirrorPosition(
          name: "nbd+unix:///disk?socket=/run/far.sock", interval: 4, offset: 8192,
          shipped: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_000))
      ])
    let valid = one.encoded
    let empty = MirrorPositions(journal: one.journal, nextInterval: 1, nextSequence: 1, copies: []).encoded
    let refused = "fuzz input is not a usable positions file: "
    func decode(_ bytes: [UInt8]) -> String? { FuzzEntryPoints.decodeMirrorPositions(bytes) }
    func repair(_ bytes: [UInt8]) -> [UInt8] { FuzzEntryPoints.repairMirrorPositionsChecksum(bytes) }
    XCTAssertNil(decode(valid))
    XCTAssertNil(decode(empty))
    XCTAssertEqual(repair(valid), valid)
    let zeroed = patched(valid, at: valid.count - 4, [0, 0, 0, 0])
    XCTAssertEqual(decode(zeroed), refused + "its checksum does not match its bytes")
    XCTAssertEqual(repair(zeroed), valid)
    // The name (37 bytes at 74) is followed by one byte of padding, at 111:
    // not zero, it was accepted and then encoded back otherwise.
    XCTAssertEqual(
      decode(repair(patched(valid, at: 111, [1]))), refused + "a copy's name is followed by non-zero padding")
    XCTAssertEqual(
      decode(repair(patched(empty, at: 44, le32(.max)))), refused + "it names 4294967295 copies, more than 64")
    XCTAssertEqual(decode(repair(patched(valid, at: 72, [0xFF, 0x03]))), refused + "it ends inside a field")
    XCTAssertEqual(decode(repair(patched(valid, at: 72, [0x01, 0x04]))), refused + "a copy's name has 1025 bytes")
    XCTAssertEqual(decode(Array(valid.prefix(51))), refused + "it has 51 bytes, fewer than the 52 of an empty one")
    XCTAssertEqual(decode(repair(valid + [0, 0, 0, 0, 0, 0, 0, 0])), refused + "it has bytes after its last copy")
  }

  // MARK: History files

  /// A history file as scripts/fuzz writes its seed `segments`: both header
  /// slots, segment 1 (a before-image of two blocks, one of three zero
  /// blocks, its point), segment 2 left open with one block; checksums right.
  func historyFile() -> [UInt8] {
    let header = HistoryFormat.FileHeader(
      updates: 1, historyID: ID128(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210), deviceSize: 40000,
      blockSize: 4096, continues: false, position: 0, openSegment: 1, previousPoint: 0,
      previousInstant: 1_764_000_000_000_000_000, live: 4096)
    var out = header.encoded() + header.encoded()
    func record(_ r: HistoryFormat.Record, blocks: [[UInt8]] = []) {
      var h = [UInt8](repeating: 0, count: HistoryFormat.recordHeaderLength)
      h.withUnsafeMutableBytes { r.encodeHeader(into: $0.baseAddress!) }
      out += h
      for b in blocks { out += le32(b.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 4096) }) }
      for b in blocks { out += b }
    }
    let block = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13) }
    record(.before(segment: 1, first: 1, count: 2, zero: false), blocks: [block, block.reversed()])
    record(.before(segment: 1, first: 4, count: 3, zero: true))
    record(.point(segment: 1, instant: 1_764_000_000_500_000_000, bytes: 8392))
    record(.before(segment: 2, first: 9, count: 1, zero: false), blocks: [block])
    return out
  }

  func testHistoryFileDamage() {
    let valid = historyFile()
    func scan(_ bytes: [UInt8]) -> String? { FuzzEntryPoints.scanHistoryFile(bytes) }
    let repair = FuzzEntryPoints.repairHistoryChecksums
    XCTAssertNil(scan(valid))
    XCTAssertEqual(repair(valid), valid)
    // As scripts/fuzz writes it: every checksum zero, refused, then repaired.
    var zeroed = patched(patched(valid, at: 88, le32(0)), at: 2048 + 88, le32(0))
    for at in [4096 + 44, 4096 + 48, 4096 + 52, 4096 + 8248 + 44, 4096 + 8296 + 44, 4096 + 8344 + 44] {
      zeroed = patched(zeroed, at: at, le32(0))
    }
    XCTAssertEqual(scan(zeroed), "has a header whose CRC does not match")
    XCTAssertEqual(repair(zeroed), valid)
    XCTAssertEqual(scan(Array(valid.prefix(4095))), "is shorter than a history file's header")
    // Cut inside the last record: the records before it stand.
    XCTAssertEqual(
      scan(Array(valid.prefix(valid.count - 100))),
      "stopped at 12440: a before-image is cut short at offset 12440")
    // A block's byte flipped: its CRC no longer matches, the scan stops there.
    XCTAssertEqual(
      scan(patched(valid, at: 4096 + 56 + 9, [0x55])),
      "stopped at 4096: a before-image's blocks do not match their CRCs at offset 4096")
    // Blocks past a device of 10 blocks (40000 bytes).
    XCTAssertEqual(
      scan(repair(patched(valid, at: 12440 + 16, le64(10)))),
      "stopped at 12440: a before-image at offset 12440 lies past the device's end")
    // A file position within 4 KiB of 2^64 (in both slots): refused, where
    // adding the header's length to it trapped.
    let high = repair(patched(patched(valid, at: 48, le64(.max - 100)), at: 2048 + 48, le64(.max - 100)))
    XCTAssertEqual(scan(high), "has a header whose positions or segments do not agree")
    // Kept records said to start past the file's end: nothing found, no read past it.
    XCTAssertNil(scan(repair(patched(patched(valid, at: 80, le64(1 << 40)), at: 2048 + 80, le64(1 << 40)))))
  }

  // MARK: Change map journals

  /// A change map's journal (dualrestore-map(5)) of three records.
  func markJournal() -> [UInt8] {
    var out = MarkJournalFormat.header(journalID: 0x0123_4567_89ab_cdef) + [UInt8](repeating: 0, count: 3 * 48)
    for (i, blocks) in [0..<4, 100..<101, 3..<5 as Range<UInt64>].enumerated() {
      MarkJournalFormat.encodeRecord(
        into: &out, at: 4096 + 48 * i, journalID: 0x0123_4567_89ab_cdef, map: ID128(high: 5, low: 6),
        blocks: blocks, sequence: UInt32(i))
    }
    return out
  }

  func testMarkJournalDamage() throws {
    let valid = markJournal()
    func scan(_ bytes: [UInt8]) -> String? { FuzzEntryPoints.scanMarkJournal(bytes) }
    let repair = FuzzEntryPoints.repairMarkJournalChecksums
    XCTAssertNil(scan(valid))
    XCTAssertEqual(repair(valid), valid)
    XCTAssertEqual(scan(patched(valid, at: 16, le32(0))), "not a change map's journal")
    // A record of 2^63 blocks or more, which the scan takes (they end
    // before 2^64) and a restart does not replay (past the device): its
    // count was taken as an Int to encode it again, and trapped.
    for count: UInt64 in [1 << 63, .max] {
      let huge = repair(patched(patched(valid, at: 4096 + 48 + 24, le64(0)), at: 4096 + 48 + 32, le64(count)))
      XCTAssertNil(scan(huge))
      let records = try XCTUnwrap(MarkJournalFormat.scan(huge)).records
      XCTAssertEqual(records.map(\.blocks.upperBound), [4, count, 5])
    }
  }
}
