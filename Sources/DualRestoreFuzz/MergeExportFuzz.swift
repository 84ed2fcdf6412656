// Fuzz entry points for the merge export (dualrestore-merge(5)): the export
// names a server parses from any client, and the report a client reads back
// from a server.

import CShim
import DualRestore

extension FuzzEntryPoints {
  /// Parses `bytes` as an export name, as the merge export's bind does; a
  /// name it accepts must encode to a name that parses to the same request.
  public static func parseMergeExportName(_ bytes: [UInt8]) -> String? {
    let name = String(decoding: bytes, as: UTF8.self)
    do {
      let parsed = try MergeExportName(parsing: name)
      let again = try MergeExportName(parsing: parsed.encoded)
      precondition(again == parsed, "\(name) parsed as \(parsed), whose encoding parses as \(again)")
      return nil
    } catch {
      return error.description
    }
  }

  /// Decodes `bytes` as a merge report; a report it accepts must encode to
  /// the same fields (flag bits a reader ignores and the reserved word aside).
  public static func decodeMergeReport(_ bytes: [UInt8]) -> String? {
    do {
      let report = try MergeReport(decoding: bytes[...])
      let again = report.encoded
      precondition(
        again[0..<12] == bytes[0..<12] && again[16..<64] == bytes[16..<64] && again[12] == bytes[12] & 1,
        "a report decoded to \(report) encodes differently")
      return nil
    } catch {
      return error.description
    }
  }

  /// `bytes` with a merge report's CRC-32C recomputed, when it is long enough
  /// to have one, so that mutations reach the checks behind it.
  public static func repairMergeReportChecksum(_ bytes: [UInt8]) -> [UInt8] {
    guard bytes.count == MergeReport.length else { return bytes }
    var out = bytes
    let crc = out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, MergeReport.length - 4) }
    for i in 0..<4 { out[MergeReport.length - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    return out
  }
}
