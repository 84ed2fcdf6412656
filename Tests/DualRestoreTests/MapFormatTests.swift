// The binary map format: round trips, size of uniform maps, the documented
// byte layout (checked with an encoder written here from the layout table),
// refusal of damaged or inconsistent input, and atomic saving.

import Foundation
import Glibc
import TestSupport
import XCTest

@testable import DualRestore

/// Encodes a map from the documented layout, independently of MapFormat.
private struct SpecEncoder {
  var blockSize: UInt32
  var meaning: UInt8
  var encoding: UInt8
  var deviceSize: UInt64
  var blockCount: UInt64
  var setCount: UInt64
  var mapID: [UInt8]
  var lastMerged: [UInt8]
  var started: Int64
  var name: [UInt8]
  var extraHeader: [UInt8] = []
  var flags: UInt16 = 0
  var version: UInt16 = 1
  var payload: [UInt8]

  func bytes() -> [UInt8] {
    var out: [UInt8] = [0x44, 0x52, 0x4D, 0x41, 0x50, 0x0D, 0x0A, 0x1A]
    func le(_ v: UInt64, _ n: Int) { for i in 0..<n { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    le(UInt64(version), 2)
    le(UInt64(flags), 2)
    le(UInt64(90 + name.count + extraHeader.count), 4)
    le(UInt64(blockSize), 4)
    out.append(meaning)
    out.append(encoding)
    le(0, 2)
    le(deviceSize, 8)
    le(blockCount, 8)
    le(setCount, 8)
    out += mapID
    out += lastMerged
    le(UInt64(bitPattern: started), 8)
    le(UInt64(name.count), 2)
    out += name
    out += extraHeader
    le(UInt64(payload.count), 8)
    out += payload
    out += sha256(out)
    return out
  }

  /// Run-length payload (encoding 1) of a [Bool] model.
  static func runs(_ bits: [Bool]) -> [UInt8] {
    var out: [UInt8] = []
    func varint(_ v: UInt64) {
      var v = v
      while v >= 0x80 {
        out.append(UInt8(v & 0x7F) | 0x80)
        v >>= 7
      }
      out.append(UInt8(v))
    }
    var i = 0
    var want = false
    while i < bits.count {
      var j = i
      while j < bits.count && bits[j] == want { j += 1 }
      varint(UInt64(j - i))
      i = j
      want.toggle()
    }
    return out
  }

  /// Raw payload (encoding 0) of a [Bool] model.
  static func raw(_ bits: [Bool]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: (bits.count + 63) / 64 * 8)
    for (i, b) in bits.enumerated() where b { out[i / 8] |= 1 << UInt8(i % 8) }
    return out
  }
}

/// Recomputes the trailing SHA-256 after a patch.
private func rechecksum(_ bytes: inout [UInt8]) {
  let body = Array(bytes.dropLast(32))
  bytes = body + sha256(body)
}

private func patchLE(_ bytes: inout [UInt8], at offset: Int, _ value: UInt64, width: Int) {
  for i in 0..<width { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
}

final class MapFormatTests: XCTestCase {
  static let names = [
    "", "/dev/sda", "nbd://backup.example:10809/export", "ディスク/ünïcødé/💾 with spaces", "a",
  ]

  private func randomGeometry(_ g: inout SplitMix64, maxBlocks: UInt64 = 3000) throws -> BlockGeometry {
    let shift = UInt32(9 + g.next() % 18)
    let bs = UInt64(1) << UInt64(shift)
    let blocks = g.next() % maxBlocks
    let device: UInt64
    switch g.next() % 3 {
    case 0: device = blocks * bs
    case 1: device = blocks * bs + g.next() % bs  // partial last block, maybe
    default: device = g.next() % 4 == 0 ? 0 : blocks * bs + 1
    }
    return try BlockGeometry(blockSize: UInt32(bs), deviceSize: device)
  }

  private func randomBits(count: UInt64, _ g: inout SplitMix64) -> [Bool] {
    let n = Int(count)
    switch g.next() % 5 {
    case 0: return [Bool](repeating: false, count: n)
    case 1: return [Bool](repeating: true, count: n)
    case 2: return (0..<n).map { $0 % 2 == 1 }  // alternating: raw wins
    case 3:
      var bits = [Bool](repeating: false, count: n)
      var i = 0
      var v = false
      while i < n {
        let run = Int(g.next() % 300) + 1
        for j in i..<min(n, i + run) { bits[j] = v }
        i += run
        v.toggle()
      }
      return bits
    default:
      let density = g.next() % 101
      return (0..<n).map { _ in g.next() % 100 < density }
    }
  }

  private func bitmap(_ bits: [Bool]) -> BlockBitmap {
    var b = BlockBitmap(count: UInt64(bits.count))
    for (i, v) in bits.enumerated() where v { b[UInt64(i)] = true }
    return b
  }

  private func randomID(_ g: inout SplitMix64) -> ID128 {
    g.next() % 4 == 0 ? .none : ID128(high: g.next(), low: g.next())
  }

  // MARK: Round trips

  func testRandomRoundTripsPreserveEveryField() throws {
    let seed = testSeed(21)
    var g = SplitMix64(seed: seed)
    var sawRaw = false
    var sawRuns = false
    for iteration in 0..<150 {
      let geometry = try randomGeometry(&g)
      let bits = randomBits(count: geometry.blockCount, &g)
      let meaning = MapMeaning.allCases[iteration % MapMeaning.allCases.count]
      let name = Self.names[Int(g.next() % UInt64(Self.names.count))]
      let started = Instant(nanosecondsSinceEpoch: Int64(bitPattern: g.next()))
      let map = BlockMap(
        geometry: geometry, meaning: meaning, deviceName: name, mapID: randomID(&g), trackingStarted: started,
        lastMergedStream: randomID(&g),
        trackingEnded: Instant(nanosecondsSinceEpoch: Int64(g.next() >> 2)),
        mergedAsOf: Instant(nanosecondsSinceEpoch: Int64(g.next() >> 2)), mergedAsOfGeneration: randomID(&g),
        bits: bitmap(bits))
      let ctx = "seed \(seed), iteration \(iteration), geometry \(geometry)"
      let encoded = MapFormat.encode(map)
      XCTAssertTrue(MapFormat.looksLikeMap(encoded), ctx)
      let decoded = try MapFormat.decode(encoded, name: "test")
      XCTAssertEqual(decoded, map, ctx)
      XCTAssertEqual(decoded.geometry, geometry, ctx)
      XCTAssertEqual(decoded.meaning, meaning, ctx)
      XCTAssertEqual(decoded.deviceName, name, ctx)
      XCTAssertEqual(decoded.mapID, map.mapID, ctx)
      XCTAssertEqual(decoded.lastMergedStream, map.lastMergedStream, ctx)
      XCTAssertEqual(decoded.trackingStarted, started, ctx)
      XCTAssertEqual(decoded.trackingEnded, map.trackingEnded, ctx)
      XCTAssertEqual(decoded.mergedAsOf, map.mergedAsOf, ctx)
      XCTAssertEqual(decoded.mergedAsOfGeneration, map.mergedAsOfGeneration, ctx)
      XCTAssertEqual(decoded.bits, map.bits, ctx)

      // The bytes follow the documented layout, with the shorter payload.
      let runs = SpecEncoder.runs(bits)
      let raw = SpecEncoder.raw(bits)
      let encodingByte = encoded[21]
      XCTAssertTrue(encodingByte == 0 || encodingByte == 1, ctx)
      let payload = encodingByte == 0 ? raw : runs
      if encodingByte == 0 { sawRaw = true } else { sawRuns = true }
      XCTAssertLessThanOrEqual(payload.count, min(raw.count, runs.count), "\(ctx): the writer picks the shorter")
      var spec = SpecEncoder(
        blockSize: geometry.blockSize, meaning: meaning.rawValue, encoding: encodingByte,
        deviceSize: geometry.deviceSize, blockCount: geometry.blockCount,
        setCount: UInt64(bits.filter { $0 }.count), mapID: map.mapID.bytes, lastMerged: map.lastMergedStream.bytes,
        started: started.nanosecondsSinceEpoch, name: Array(name.utf8), payload: payload)
      // The generation fields: tracking ended, merged as of, that generation's id.
      for v in [map.trackingEnded, map.mergedAsOf] {
        spec.extraHeader += (0..<8).map { UInt8(truncatingIfNeeded: v.nanosecondsSinceEpoch >> (8 * Int64($0))) }
      }
      spec.extraHeader += map.mergedAsOfGeneration.bytes
      XCTAssertEqual(encoded, spec.bytes(), "\(ctx): bytes differ from the documented layout")
      // And the decoder reads the other encoding as well.
      var other = spec
      other.encoding = encodingByte == 0 ? 1 : 0
      other.payload = encodingByte == 0 ? runs : raw
      XCTAssertEqual(try MapFormat.decode(other.bytes(), name: "spec"), map, "\(ctx): other encoding")
    }
    XCTAssertTrue(sawRaw, "seed \(seed): no map chose the raw encoding")
    XCTAssertTrue(sawRuns, "seed \(seed): no map chose the runs encoding")
  }

  func testEdgeMapsRoundTrip() throws {
    var cases: [(BlockGeometry, [Bool])] = []
    for device: UInt64 in [0, 1, 511, 512, 513, 64 * 512, 64 * 512 + 1, 65 * 512 - 1] {
      let g = try BlockGeometry(blockSize: 512, deviceSize: device)
      let n = Int(g.blockCount)
      cases.append((g, [Bool](repeating: false, count: n)))
      cases.append((g, [Bool](repeating: true, count: n)))
      cases.append((g, (0..<n).map { $0 % 2 == 0 }))
      cases.append((g, (0..<n).map { $0 == n - 1 }))
    }
    for (geometry, bits) in cases {
      for meaning in MapMeaning.allCases {
        let map = BlockMap(
          geometry: geometry, meaning: meaning, deviceName: "edge", mapID: .random(), trackingStarted: .unset,
          lastMergedStream: .none, bits: bitmap(bits))
        let decoded = try MapFormat.decode(MapFormat.encode(map), name: "edge")
        XCTAssertEqual(decoded, map, "\(geometry), \(meaning), bits \(bits.filter { $0 }.count)")
        XCTAssertEqual(decoded.trackingStarted, .unset)
        XCTAssertTrue(decoded.lastMergedStream.isNone)
      }
    }
  }

  func testAlternatingBitsUseTheRawEncoding() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 1000 * 4096 + 5)
    let bits = (0..<Int(geometry.blockCount)).map { $0 % 2 == 0 }
    let map = BlockMap(geometry: geometry, deviceName: "alt", bits: bitmap(bits))
    let encoded = MapFormat.encode(map)
    XCTAssertEqual(encoded[21], 0, "alternating bits should be stored raw")
    // Raw payload: ceil(1001 / 64) words; header 90 + name + 32 (the
    // generation fields); 8-byte length; checksum.
    XCTAssertEqual(encoded.count, 90 + 3 + 32 + 8 + (1001 + 63) / 64 * 8 + 32)
    XCTAssertEqual(try MapFormat.decode(encoded, name: "alt"), map)
  }

  func testLongNamesAreCutAtACharacterBoundary() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 4096)
    let names = [
      String(repeating: "a", count: 4096),
      String(repeating: "a", count: 5000),
      String(repeating: "a", count: 4095) + "€",
      String(repeating: "a", count: 4094) + "€z",
      String(repeating: "a", count: 4093) + "€z",
      String(repeating: "💾", count: 1100),
    ]
    for name in names {
      let map = BlockMap(geometry: geometry, deviceName: name)
      let decoded = try MapFormat.decode(MapFormat.encode(map), name: "long")
      let bytes = Array(decoded.deviceName.utf8)
      // Expected: the longest prefix of whole characters within 4096 bytes.
      var expected = ""
      var used = 0
      for scalar in name.unicodeScalars {
        let n = String(scalar).utf8.count
        if used + n > MapFormat.maximumNameLength { break }
        expected.unicodeScalars.append(scalar)
        used += n
      }
      let ctx = "name of \(name.utf8.count) bytes ending \(String(name.suffix(3)).debugDescription)"
      XCTAssertLessThanOrEqual(bytes.count, MapFormat.maximumNameLength, ctx)
      XCTAssertTrue(name.hasPrefix(decoded.deviceName), "\(ctx): cut at a character boundary")
      XCTAssertFalse(decoded.deviceName.contains("\u{FFFD}"), "\(ctx): no replacement characters")
      XCTAssertEqual(bytes.count, expected.utf8.count, "\(ctx): no more than needed is cut")
      XCTAssertTrue(decoded.deviceName == expected, "\(ctx): stored name differs from the longest fitting prefix")
    }
  }

  func testUniformMapsOfA16TiBDeviceAreTiny() throws {
    let geometry = try BlockGeometry(blockSize: 64 << 10, deviceSize: 16 << 40)
    XCTAssertEqual(geometry.blockCount, 1 << 28)
    for filled in [false, true] {
      let map = BlockMap(
        geometry: geometry, deviceName: "/dev/sdz", bits: BlockBitmap(count: geometry.blockCount, filled: filled))
      let encoded = MapFormat.encode(map)
      XCTAssertLessThan(encoded.count, 200, "filled \(filled)")
      let decoded = try MapFormat.decode(encoded, name: "big")
      XCTAssertEqual(decoded.bits.population, filled ? 1 << 28 : 0)
      XCTAssertEqual(decoded, map, "filled \(filled)")
    }
  }

  // MARK: Damage

  private func smallEncodedMap() throws -> [UInt8] {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 150 * 4096 + 100)
    var bits = BlockBitmap(count: geometry.blockCount)
    bits.set(3..<40)
    bits.set(64..<65)
    bits[150] = true
    return MapFormat.encode(
      BlockMap(geometry: geometry, meaning: .changed, deviceName: "/dev/vdb", bits: bits))
  }

  func testEverySingleByteFlipIsRefused() throws {
    for encoded in [try smallEncodedMap(), rawEncodedMap()] {
      XCTAssertNoThrow(try MapFormat.decode(encoded, name: "ok"))
      for offset in encoded.indices {
        for mask: UInt8 in [0x01, 0x80, 0xFF] {
          var damaged = encoded
          damaged[offset] ^= mask
          assertThrows(
            try MapFormat.decode(damaged, name: "damaged.map"), containing: ["damaged.map"],
            "byte \(offset) ^ \(mask) of \(encoded.count)")
        }
      }
    }
  }

  private func rawEncodedMap() -> [UInt8] {
    let geometry = try! BlockGeometry(blockSize: 512, deviceSize: 100 * 512 + 1)
    var bits = BlockBitmap(count: geometry.blockCount)
    for i in stride(from: 0, to: 101, by: 2) { bits[UInt64(i)] = true }
    let encoded = MapFormat.encode(BlockMap(geometry: geometry, deviceName: "r", bits: bits))
    XCTAssertEqual(encoded[21], 0)
    return encoded
  }

  func testEveryTruncationIsRefused() throws {
    for encoded in [try smallEncodedMap(), rawEncodedMap()] {
      for length in 0..<encoded.count {
        assertThrows(
          try MapFormat.decode(Array(encoded.prefix(length)), name: "cut.map"), containing: ["cut.map"],
          "truncated to \(length) of \(encoded.count)")
      }
      // A byte too many is refused as well.
      assertThrows(try MapFormat.decode(encoded + [0], name: "long.map"))
    }
  }

  func testBadMagicAndOtherFiles() throws {
    var encoded = try smallEncodedMap()
    encoded[0] = UInt8(ascii: "X")
    assertThrows(try MapFormat.decode(encoded, name: "m"), containing: ["m:", "not a dualrestore map"])
    assertThrows(try MapFormat.decode(Array("hello, world\n".utf8), name: "t"), containing: ["not a dualrestore map"])
    assertThrows(try MapFormat.decode([], name: "e"), containing: ["e:"])
    // A signature is not a map.
    assertThrows(
      try MapFormat.decode(SignatureFormat.magic + [UInt8](repeating: 0, count: 200), name: "s"),
      containing: ["not a dualrestore map"])
    XCTAssertFalse(MapFormat.looksLikeMap(encoded))
    XCTAssertFalse(MapFormat.looksLikeMap(MapFormat.magic.dropLast()))
  }

  func testVersion2IsRefusedByName() throws {
    var encoded = try smallEncodedMap()
    patchLE(&encoded, at: 8, 2, width: 2)
    rechecksum(&encoded)
    assertThrows(try MapFormat.decode(encoded, name: "v2.map"), containing: ["v2.map", "version 2 is not supported"])
    // Without re-checksumming it is refused as well.
    var unsummed = try smallEncodedMap()
    unsummed[8] = 2
    assertThrows(try MapFormat.decode(unsummed, name: "v2.map"))
  }

  func testUnknownFlagsAreRefused() throws {
    var encoded = try smallEncodedMap()
    patchLE(&encoded, at: 10, 0x0004, width: 2)
    rechecksum(&encoded)
    assertThrows(try MapFormat.decode(encoded, name: "f"), containing: ["flags"])
  }

  /// Consistent checksums over inconsistent content: built by patching an
  /// encoded map (or with the spec encoder) and checksumming again.
  func testSemanticallyWrongContentIsRefused() throws {
    let base = try smallEncodedMap()
    XCTAssertEqual(base[21], 1, "the small map should use runs")
    func patched(_ offset: Int, _ value: UInt64, _ width: Int) -> [UInt8] {
      var b = base
      patchLE(&b, at: offset, value, width: width)
      rechecksum(&b)
      return b
    }
    let blockCount: UInt64 = 151
    let setCount: UInt64 = 37 + 1 + 1
    // Block count not fitting the device size.
    assertThrows(try MapFormat.decode(patched(32, blockCount + 1, 8), name: "m"), containing: ["block count"])
    assertThrows(try MapFormat.decode(patched(32, blockCount - 1, 8), name: "m"), containing: ["block count"])
    // Device size that no longer fits the block count.
    assertThrows(try MapFormat.decode(patched(24, 150 * 4096, 8), name: "m"), containing: ["block count"])
    // Set count disagreeing with the payload.
    assertThrows(try MapFormat.decode(patched(40, setCount + 1, 8), name: "m"), containing: ["set blocks"])
    assertThrows(try MapFormat.decode(patched(40, setCount - 1, 8), name: "m"), containing: ["set blocks"])
    assertThrows(try MapFormat.decode(patched(40, 0, 8), name: "m"), containing: ["set blocks"])
    // Meaning and encoding outside the documented values.
    for m: UInt64 in [0, 5, 255] {
      assertThrows(try MapFormat.decode(patched(20, m, 1), name: "m"), containing: ["meaning"], "meaning \(m)")
    }
    assertThrows(try MapFormat.decode(patched(21, 2, 1), name: "m"), containing: ["encoding"])
    // Runs payload read as raw words.
    assertThrows(try MapFormat.decode(patched(21, 0, 1), name: "m"))
    // Block sizes that are not valid.
    for bs: UInt64 in [0, 3000, 256, 128 << 20] {
      assertThrows(try MapFormat.decode(patched(16, bs, 4), name: "m"), containing: ["\(bs)"], "block size \(bs)")
    }
    // Header length below the fixed header, or past the file.
    assertThrows(try MapFormat.decode(patched(12, 89, 4), name: "m"))
    assertThrows(try MapFormat.decode(patched(12, UInt64(base.count), 4), name: "m"))
    // Name length past the header length.
    assertThrows(try MapFormat.decode(patched(88, 100, 2), name: "m"))
    assertThrows(try MapFormat.decode(patched(88, 5000, 2), name: "m"))
    // Payload length not matching the file.
    let headerLength = 90 + "/dev/vdb".utf8.count + 32
    assertThrows(try MapFormat.decode(patched(headerLength, 1, 8), name: "m"), containing: ["payload length"])
  }

  func testDamagedPayloadsAreRefused() throws {
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: 100 * 512)
    func spec(encoding: UInt8, setCount: UInt64, payload: [UInt8]) -> [UInt8] {
      SpecEncoder(
        blockSize: 512, meaning: 1, encoding: encoding, deviceSize: geometry.deviceSize, blockCount: 100,
        setCount: setCount, mapID: ID128.random().bytes, lastMerged: ID128.none.bytes, started: 1, name: [],
        payload: payload
      ).bytes()
    }
    // Sanity: a correct spec-built map decodes.
    XCTAssertEqual(
      try MapFormat.decode(spec(encoding: 1, setCount: 50, payload: [50, 50]), name: "ok").bits.population, 50)
    XCTAssertEqual(
      try MapFormat.decode(spec(encoding: 1, setCount: 100, payload: [0, 100]), name: "ok").bits.population, 100)
    // Runs covering too few or too many blocks.
    assertThrows(try MapFormat.decode(spec(encoding: 1, setCount: 49, payload: [50, 49]), name: "m"))
    assertThrows(try MapFormat.decode(spec(encoding: 1, setCount: 51, payload: [50, 51]), name: "m"))
    assertThrows(try MapFormat.decode(spec(encoding: 1, setCount: 0, payload: []), name: "m"))
    // An empty run after the first.
    assertThrows(try MapFormat.decode(spec(encoding: 1, setCount: 50, payload: [50, 0, 0, 50]), name: "m"))
    // A varint cut off, and a varint too long for 64 bits.
    assertThrows(try MapFormat.decode(spec(encoding: 1, setCount: 0, payload: [0x80]), name: "m"))
    assertThrows(
      try MapFormat.decode(
        spec(encoding: 1, setCount: 0, payload: [UInt8](repeating: 0xFF, count: 10) + [0x7F]), name: "m"))
    // Raw: wrong length, and bits past the last block.
    assertThrows(
      try MapFormat.decode(spec(encoding: 0, setCount: 0, payload: [UInt8](repeating: 0, count: 8)), name: "m"))
    var raw = [UInt8](repeating: 0, count: 16)
    raw[15] = 0x80  // block 127 of 100
    assertThrows(
      try MapFormat.decode(spec(encoding: 0, setCount: 1, payload: raw), name: "m"), containing: ["past the last block"]
    )
    // Bytes the version ignores between the name and H are skipped.
    var extra = SpecEncoder(
      blockSize: 512, meaning: 2, encoding: 1, deviceSize: geometry.deviceSize, blockCount: 100, setCount: 100,
      mapID: ID128.random().bytes, lastMerged: ID128.none.bytes, started: 5, name: Array("dev".utf8), payload: [0, 100])
    extra.extraHeader = [1, 2, 3, 4, 5, 6, 7]
    let decoded = try MapFormat.decode(extra.bytes(), name: "extra")
    XCTAssertEqual(decoded.deviceName, "dev")
    XCTAssertEqual(decoded.meaning, .differs)
    XCTAssertEqual(decoded.bits.population, 100)
    // Fewer than the 32 bytes of the generation fields: they read as unset.
    XCTAssertEqual(decoded.trackingEnded, .unset)
    XCTAssertEqual(decoded.mergedAsOf, .unset)
    XCTAssertEqual(decoded.mergedAsOfGeneration, .none)
  }

  func testTheGenerationFieldsFollowTheNameAndOlderMapsHaveNone() throws {
    let geometry = try BlockGeometry(blockSize: 512, deviceSize: 100 * 512)
    let generation = ID128.random()
    func le(_ v: Int64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * Int64($0))) } }
    // By the table: tracking ended, merged as of, the generation's id, then bytes ignored.
    var spec = SpecEncoder(
      blockSize: 512, meaning: 1, encoding: 1, deviceSize: geometry.deviceSize, blockCount: 100, setCount: 0,
      mapID: ID128.random().bytes, lastMerged: ID128.random().bytes, started: 5, name: Array("dev".utf8),
      payload: [100])
    spec.extraHeader = le(1_700_000_000_000_000_001) + le(1_700_000_000_000_000_002) + generation.bytes + [9, 9]
    let m = try MapFormat.decode(spec.bytes(), name: "spec")
    XCTAssertEqual(m.trackingEnded.nanosecondsSinceEpoch, 1_700_000_000_000_000_001)
    XCTAssertEqual(m.mergedAsOf.nanosecondsSinceEpoch, 1_700_000_000_000_000_002)
    XCTAssertEqual(m.mergedAsOfGeneration, generation)
    // The encoder writes the same fields at the same place (H = 90 + N + 32), and reads them back.
    let encoded = MapFormat.encode(m)
    XCTAssertEqual(Array(encoded[12..<16]), [UInt8(90 + 3 + 32), 0, 0, 0])
    XCTAssertEqual(Array(encoded[93..<125]), Array(spec.extraHeader.prefix(32)))
    XCTAssertEqual(try MapFormat.decode(encoded, name: "again"), m)
    // An instant before 1970 is refused.
    spec.extraHeader = le(-1) + le(0) + ID128.none.bytes
    assertThrows(try MapFormat.decode(spec.bytes(), name: "m"), containing: ["before 1970"])
    // A map of an older build (H = 90 + N) has none: unset.
    spec.extraHeader = []
    let old = try MapFormat.decode(spec.bytes(), name: "old")
    XCTAssertEqual(old.trackingEnded, .unset)
    XCTAssertEqual(old.mergedAsOf, .unset)
  }

  // MARK: Files

  func testSaveAndLoadAtomically() throws {
    let dir = try makeTempDirectory()
    let path = dir + "/device.drmap"
    let seed = testSeed(22)
    var g = SplitMix64(seed: seed)
    let geometry = try randomGeometry(&g, maxBlocks: 5000)
    let map = BlockMap(
      geometry: geometry, meaning: .current, deviceName: "/dev/sdb",
      bits: bitmap(randomBits(count: geometry.blockCount, &g)))
    try MapFile.save(map, to: path)
    XCTAssertEqual(try MapFile.load(path), map, "seed \(seed)")
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["device.drmap"], "no temp files left")
    XCTAssertEqual(try readFileBytes(path), MapFormat.encode(map))

    // A new file gets 0600 less the umask: other users are kept out.
    let mask = umask(0o022)
    umask(mask)
    XCTAssertEqual(try permissions(path), 0o600 & ~UInt16(mask))

    // Overwriting keeps the permission bits and leaves nothing behind.
    for mode: mode_t in [0o600, 0o640, 0o604] {
      XCTAssertEqual(chmod(path, mode), 0)
      var changed = map
      changed.bits.invert()
      changed.meaning = .selected
      try MapFile.save(changed, to: path)
      XCTAssertEqual(try permissions(path), UInt16(mode), "mode \(String(mode, radix: 8))")
      XCTAssertEqual(try MapFile.load(path), changed)
      XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["device.drmap"])
    }
  }

  func testLoadErrorsNameThePath() throws {
    let dir = try makeTempDirectory()
    let missing = dir + "/missing.drmap"
    assertThrows(try MapFile.load(missing), containing: [missing, "No such file or directory"])
    let damaged = dir + "/damaged.drmap"
    var bytes = try smallEncodedMap()
    bytes[bytes.count / 2] ^= 1
    try writeDenseFile(damaged, bytes)
    assertThrows(try MapFile.load(damaged), containing: [damaged, "checksum"])
    // Saving into a missing directory fails and creates nothing.
    let map = BlockMap(geometry: try BlockGeometry(blockSize: 512, deviceSize: 512))
    assertThrows(try MapFile.save(map, to: dir + "/nope/x.drmap"))
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["damaged.drmap"])
    // A save that fails after the temporary file exists (the target is a
    // directory, so the rename fails) removes its temporary file.
    let blocker = dir + "/blocker.drmap"
    try FileManager.default.createDirectory(atPath: blocker, withIntermediateDirectories: false)
    try writeDenseFile(blocker + "/keep", [1])
    assertThrows(try MapFile.save(map, to: blocker), containing: [blocker])
    XCTAssertEqual(
      try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), ["blocker.drmap", "damaged.drmap"],
      "a failed save leaves no temporary file")
  }

  private func permissions(_ path: String) throws -> UInt16 {
    var st = stat()
    guard stat(path, &st) == 0 else { throw TestFileError.failed("stat \(path)", errno) }
    return UInt16(st.st_mode & 0o7777)
  }
}
