// The merge export's names and report (dualrestore-merge(5)): round trips,
// every refusal, and a report cut or damaged at every byte.

import CShim
import DualRestoreFuzz
import XCTest

@testable import DualRestore

final class MergeExportFormatTests: XCTestCase {
  let id = ID128(high: 0x0123_4567_89ab_cdef, low: 0xfedc_ba98_7654_3210)
  let base = ID128(high: 7, low: 9)

  func testNamesRoundTrip() throws {
    let names: [MergeExportName] = [
      .any,
      .admit(
        MergeAdmission(stream: id, base: .none, started: Instant(nanosecondsSinceEpoch: 1), skew: 0, force: false)),
      .admit(
        MergeAdmission(
          stream: id, base: base, started: Instant(nanosecondsSinceEpoch: -5), skew: 1_000_000_000, force: true)),
      .report(id),
      .complete(id),
    ]
    for name in names {
      XCTAssertEqual(try MergeExportName(parsing: name.encoded), name, name.encoded)
    }
    XCTAssertEqual(MergeExportName.complete(id).encoded, "merge;complete=0123456789abcdeffedcba9876543210")
  }

  func testNamesInAnyOrderWithDefaults() throws {
    let parsed = try MergeExportName(parsing: "merge;started=42;stream=\(id)")
    XCTAssertEqual(
      parsed,
      .admit(
        MergeAdmission(stream: id, base: .none, started: Instant(nanosecondsSinceEpoch: 42), skew: 0, force: false)))
  }

  func testNamesRefused() {
    let cases: [(String, String)] = [
      ("primary", "is not the merge export"),
      ("merged", "is not the merge export"),
      ("merge;", "is not KEY=VALUE"),
      ("merge;stream", "is not KEY=VALUE"),
      ("merge;=1", "is not KEY=VALUE"),
      ("merge;report=\(id);report=\(id)", "report is given twice"),
      ("merge;report=\(ID128.none)", "is not a stream id"),
      ("merge;report=none", "is not a stream id"),
      ("merge;complete=\(id);stream=\(id)", "stream is not a field"),
      ("merge;stream=\(id)", "takes started=NS"),
      ("merge;stream=\(id);started=x", "takes started=NS"),
      ("merge;stream=\(id);started=1;skew=-1", "skew=-1 is not a count"),
      ("merge;stream=\(id);started=1;force=yes", "force=yes is not 0 or 1"),
      ("merge;stream=\(id);started=1;base=zz", "base=zz is not a stream id"),
      ("merge;colour=red", "takes stream=ID and started=NS"),
      ("merge;report=" + String(repeating: "a", count: 5000), "too long"),
    ]
    for (name, said) in cases {
      XCTAssertThrowsError(try MergeExportName(parsing: name), name) { error in
        XCTAssertTrue("\(error)".contains(said), "\(name.prefix(80)): \(error)")
      }
    }
  }

  func testReportRoundTrip() throws {
    var r = MergeReport(stream: id)
    r.recorded = true
    r.dataBlocks = 243
    r.zeroBlocks = 7
    r.skippedCurrent = 6
    r.bytesWritten = 250 << 16
    let bytes = r.encoded
    XCTAssertEqual(bytes.count, MergeReport.length)
    XCTAssertEqual(Array(bytes.prefix(8)), Array("DRMERGE\n".utf8))
    XCTAssertEqual(try MergeReport(decoding: bytes[...]), r)
  }

  func testReportDamagedAnywhereIsRefused() {
    let good = MergeReport(stream: id).encoded
    for n in 0..<good.count {
      XCTAssertThrowsError(try MergeReport(decoding: good[0..<n]), "cut at \(n)")
    }
    XCTAssertThrowsError(try MergeReport(decoding: (good + [0])[...]), "one byte too many")
    for i in 0..<good.count {
      for bit in [0, 7] {
        var bad = good
        bad[i] ^= UInt8(1 << bit)
        XCTAssertThrowsError(try MergeReport(decoding: bad[...]), "bit \(bit) of byte \(i) flipped")
      }
    }
  }

  func testReportOfAnotherVersionIsRefusedEvenWithItsChecksum() {
    var bytes = MergeReport(stream: id).encoded
    bytes[8] = 2
    let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 68) }
    for i in 0..<4 { bytes[68 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    XCTAssertThrowsError(try MergeReport(decoding: bytes[...])) { error in
      XCTAssertTrue("\(error)".contains("version 2"), "\(error)")
    }
  }

  /// The fuzz target's checks hold for what the encoders make, and its
  /// checksum repair makes a damaged report reach the checks behind it.
  func testFuzzEntryPoints() {
    XCTAssertNil(FuzzEntryPoints.parseMergeExportName(Array(MergeExportName.complete(id).encoded.utf8)))
    XCTAssertEqual(
      FuzzEntryPoints.parseMergeExportName(Array("merge;x".utf8)), "'x' in the export name is not KEY=VALUE")
    var report = MergeReport(stream: id)
    report.dataBlocks = 3
    XCTAssertNil(FuzzEntryPoints.decodeMergeReport(report.encoded))
    var damaged = report.encoded
    damaged[10] = 71
    XCTAssertEqual(
      FuzzEntryPoints.decodeMergeReport(damaged), "its CRC-32C does not match: it is damaged")
    XCTAssertEqual(
      FuzzEntryPoints.decodeMergeReport(FuzzEntryPoints.repairMergeReportChecksum(damaged)),
      "it says it has 71 bytes, not 72")
  }
}
