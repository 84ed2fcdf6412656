// The positions file of a mirror journal (MirrorPositions): it round trips,
// in memory and through a file; every single-byte change and every
// truncation is refused with one sentence, and with its checksum made
// right again a change is either refused or encodes back to the very bytes
// read; more copies or longer names than the format holds are refused both
// when read and when saved.

import CShim
import Foundation
import TestSupport
import XCTest

@testable import DualRestore

final class MirrorPositionsTests: XCTestCase {
  let path = "/var/lib/dualrestore/disk.map.journal.positions"

  /// Positions of copies whose names have every length modulo 8, one
  /// not ASCII and one as long as a name may be.
  func sample() -> MirrorPositions {
    var copies: [MirrorPosition] = []
    for n in 1...9 {
      copies.append(
        MirrorPosition(
          name: String(String("nbd://far/disk".prefix(n))), interval: UInt64(n * 1000 + 7),
          offset: UInt64(4096 + n * 4144), shipped: Instant(nanosecondsSinceEpoch: 1_764_000_000_000_000_000 + Int64(n))
        ))
    }
    copies.append(
      MirrorPosition(name: "nbd://ferne-kopie/scheibe-ü", interval: 0, offset: 4096, shipped: .unset))
    copies.append(
      MirrorPosition(
        name: String(repeating: "z", count: MirrorPositions.maximumName), interval: .max, offset: .max,
        shipped: Instant(nanosecondsSinceEpoch: -1)))
    return MirrorPositions(
      journal: ID128(high: 0x0123_4567_89ab_cdef, low: 0x0f1e_2d3c_4b5a_6978), nextInterval: 77,
      nextSequence: 123_456, copies: copies)
  }

  func decode(_ bytes: [UInt8]) throws(ToolkitError) -> MirrorPositions {
    try MirrorPositions(decoding: bytes, path: path)
  }

  /// `bytes` with its last four bytes set to the CRC-32C of the rest.
  func repaired(_ bytes: [UInt8]) -> [UInt8] {
    guard bytes.count >= 4 else { return bytes }
    var out = bytes
    let crc = out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, out.count - 4) }
    for i in 0..<4 { out[out.count - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    return out
  }

  /// The sentence `bytes` are refused with, nil when they are accepted.
  func refusal(_ bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) -> String? {
    do {
      _ = try decode(bytes)
      return nil
    } catch {
      let text = error.message
      XCTAssertTrue(text.hasPrefix("\(path) is not a usable positions file: "), text, file: file, line: line)
      XCTAssertFalse(text.contains("\n"), text, file: file, line: line)
      return text
    }
  }

  func testRoundTripsInMemoryAndThroughAFile() throws {
    let positions = sample()
    let bytes = positions.encoded
    XCTAssertEqual(Array(bytes[0..<8]), Array("DRMIRPOS".utf8))
    XCTAssertEqual(Array(bytes[8..<12]), [1, 0, 0, 0])
    XCTAssertEqual(Array(bytes[28..<36]), [77, 0, 0, 0, 0, 0, 0, 0])
    XCTAssertEqual(Array(bytes[44..<48]), [UInt8(positions.copies.count), 0, 0, 0])
    XCTAssertEqual(bytes.count % 8, 4, "entries are padded to 8 bytes; the CRC follows")
    XCTAssertEqual(try decode(bytes), positions)
    let empty = MirrorPositions(journal: ID128(high: 1, low: 2), nextInterval: 1, nextSequence: 1, copies: [])
    XCTAssertEqual(empty.encoded.count, 52)
    XCTAssertEqual(try decode(empty.encoded), empty)

    let dir = try makeTempDirectory()
    let file = dir + "/journal.positions"
    XCTAssertNil(try MirrorPositions.load(file))
    try positions.save(to: file)
    XCTAssertEqual(try MirrorPositions.load(file), positions)
    XCTAssertEqual(try readFileBytes(file), bytes)
    try empty.save(to: file)
    XCTAssertEqual(try MirrorPositions.load(file), empty)
    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["journal.positions"], "no temporary left")
  }

  func testEverySingleByteChangeIsRefusedWithASentence() throws {
    let bytes = sample().encoded
    var accepted = 0
    for i in bytes.indices {
      for delta: UInt8 in [0x01, 0x80, 0xFF] {
        var changed = bytes
        changed[i] ^= delta
        XCTAssertNotNil(refusal(changed), "byte \(i) ^ \(delta) was accepted")
        // With the checksum right again, the change reaches the checks
        // behind it: refused, or what is read encodes back to these bytes.
        guard i < bytes.count - 4 else { continue }
        let fixed = repaired(changed)
        if refusal(fixed) == nil {
          accepted += 1
          XCTAssertTrue(
            try decode(fixed).encoded == fixed, "byte \(i) ^ \(delta), checksum made right: accepted, encodes otherwise"
          )
        }
      }
    }
    XCTAssertGreaterThan(accepted, 0)
  }

  func testTruncationsAreRefused() {
    let bytes = sample().encoded
    for n in 0..<bytes.count {
      XCTAssertNotNil(refusal(Array(bytes[0..<n])), "the first \(n) bytes were accepted")
      XCTAssertNotNil(refusal(repaired(Array(bytes[0..<n]))), "the first \(n) bytes, checksum made right")
    }
    XCTAssertEqual(
      refusal([]), "\(path) is not a usable positions file: it has 0 bytes, fewer than the 52 of an empty one")
  }

  func testMoreThanSixtyFourCopiesAreRefused() throws {
    var positions = sample()
    positions.copies = (0..<64).map {
      MirrorPosition(name: "copy-\($0)", interval: UInt64($0), offset: 4096, shipped: .unset)
    }
    XCTAssertEqual(try decode(positions.encoded), positions)
    positions.copies.append(MirrorPosition(name: "one too many", interval: 1, offset: 4096, shipped: .unset))
    XCTAssertEqual(
      refusal(positions.encoded), "\(path) is not a usable positions file: it names 65 copies, more than 64")
    // A huge count in a small file is refused without reading on.
    var huge = MirrorPositions(journal: ID128(high: 1, low: 2), nextInterval: 1, nextSequence: 1, copies: []).encoded
    for i in 44..<48 { huge[i] = 0xFF }
    XCTAssertEqual(
      refusal(repaired(huge)), "\(path) is not a usable positions file: it names 4294967295 copies, more than 64")
    // Nor is such a file ever written.
    let dir = try makeTempDirectory()
    assertThrows(try positions.save(to: dir + "/p"), containing: ["65 far copies"])
    XCTAssertFalse(pathExists(dir + "/p"))
  }

  func testHandMadeRefusals() {
    let one = MirrorPositions(
      journal: ID128(high: 1, low: 2), nextInterval: 1, nextSequence: 1,
      copies: [MirrorPosition(name: "abcde", interval: 1, offset: 4096, shipped: .unset)])
    let bytes = one.encoded
    let entry = 48  // the copy's fields; its name of 5 bytes at 74, padding at 79
    func with(_ change: (inout [UInt8]) -> Void) -> String? {
      var b = bytes
      change(&b)
      return refusal(repaired(b))
    }
    let prefix = "\(path) is not a usable positions file: "
    XCTAssertEqual(with { $0[0] = UInt8(ascii: "X") }, prefix + "it does not start with DRMIRPOS")
    XCTAssertEqual(
      refusal(Array(bytes.dropLast(1)) + [bytes.last! ^ 1]), prefix + "its checksum does not match its bytes")
    XCTAssertEqual(with { $0[8] = 2 }, prefix + "it is of version 2; this build reads version 1")
    XCTAssertEqual(with { $0[entry + 24] = 0 }, prefix + "a copy's name has 0 bytes")
    XCTAssertEqual(
      with {
        $0[entry + 24] = 0x01; $0[entry + 25] = 0x04
      }, prefix + "a copy's name has 1025 bytes")
    XCTAssertEqual(with { $0[entry + 24] = 7 }, prefix + "it ends inside a field")
    XCTAssertEqual(with { $0[entry + 26] = 0xC3 }, prefix + "a copy's name is not UTF-8")
    XCTAssertEqual(with { $0[entry + 31] = 1 }, prefix + "a copy's name is followed by non-zero padding")
    XCTAssertEqual(
      refusal(repaired(Array(bytes.dropLast(4)) + [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
      prefix + "it has bytes after its last copy")
    XCTAssertEqual(with { $0[44] = 0 }, prefix + "it has bytes after its last copy")
  }

  func testCopyNamesItCannotHoldAreNotSaved() throws {
    let dir = try makeTempDirectory()
    for (names, needle) in [
      ([String(repeating: "n", count: 1025)], "1025 bytes"), ([""], "empty"), (["a", "b", "a"], "named twice"),
    ] {
      let p = MirrorPositions(
        journal: ID128(high: 1, low: 2), nextInterval: 1, nextSequence: 1,
        copies: names.map { MirrorPosition(name: $0, interval: 0, offset: 4096, shipped: .unset) })
      assertThrows(try p.save(to: dir + "/p"), containing: [needle])
      XCTAssertFalse(pathExists(dir + "/p"))
    }
  }
}
