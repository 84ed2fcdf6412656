// Fuzz entry point for the change map's journal (dualrestore-map(5), "THE
// CHANGE MAP'S JOURNAL"): a journal's bytes as a crash or a damaged disk
// would leave them, through the scan a change map's restart runs on them.

import CShim
import DualRestore

extension FuzzEntryPoints {
  /// Scans `bytes` as a change map's journal. What the scan accepts must
  /// hold up: the header is its version's with its CRC, the good records
  /// run back to back from the header, each encoding back to the very
  /// bytes it was read from, and end where the first that fails stands;
  /// the cut encodes back to the bytes of a slot, and no other good cut is
  /// numbered higher.
  public static func scanMarkJournal(_ bytes: [UInt8]) -> String? {
    typealias F = MarkJournalFormat
    guard let c = F.scan(bytes) else { return "not a change map's journal" }
    precondition(c.version == 1 || c.version == 2, "version \(c.version)")
    var header = Array(F.header(journalID: c.journalID).prefix(20))
    if c.version == 1 {
      header.replaceSubrange(0..<8, with: F.magicV1)
      put(crc(header, 0, 16), into: &header, at: 16)
    }
    precondition(header[...] == bytes[0..<20], "the header accepted encodes differently")
    precondition(
      c.end >= F.headerLength && c.end <= bytes.count && (c.end - F.headerLength) % F.recordLength == 0,
      "the records end at \(c.end) of \(bytes.count)")
    // Every record up to the end holds; the one at the end does not.
    var kept = c.records[...]
    var sequence: UInt32 = 0
    for at in stride(from: F.headerLength, to: c.end, by: F.recordLength) {
      precondition(holds(bytes, at: at, journalID: c.journalID, sequence: sequence), "a record at \(at) fails")
      let first = readLE(bytes, at + 24)
      let count = readLE(bytes, at + 32)
      if count > 0, first <= UInt64.max - count {
        guard let r = kept.popFirst() else { preconditionFailure("the record at \(at) is missing") }
        var again = [UInt8](repeating: 0, count: F.recordLength)
        F.encodeRecord(into: &again, at: 0, journalID: c.journalID, map: r.map, blocks: r.blocks, sequence: sequence)
        precondition(again[...] == bytes[at..<at + F.recordLength], "the record at \(at) encodes differently")
      }
      sequence &+= 1
    }
    precondition(kept.isEmpty, "\(kept.count) record(s) past the end")
    if c.end + F.recordLength <= bytes.count {
      precondition(
        !holds(bytes, at: c.end, journalID: c.journalID, sequence: sequence), "the record at the end holds")
    }
    guard let cut = c.cut else { return nil }
    precondition(c.version == 2, "a cut in a version-\(c.version) journal")
    precondition(!cut.output.isEmpty && cut.output.utf8.count <= F.maximumOutputPath, "an output of that length")
    guard let again = F.encode(cut, journalID: c.journalID) else { preconditionFailure("the cut does not encode") }
    guard let slot = F.cutSlots.first(where: { again[...] == bytes[$0..<$0 + again.count] }) else {
      preconditionFailure("the cut accepted encodes to neither slot")
    }
    // The other slot's cut, if good, is numbered no higher.
    var other = bytes
    other.replaceSubrange(slot..<slot + F.cutSlotLength, with: [UInt8](repeating: 0, count: F.cutSlotLength))
    if let o = F.scan(other)?.cut {
      precondition(o.number <= cut.number, "cut \(o.number) loses to cut \(cut.number)")
    }
    return nil
  }

  /// `bytes` with the CRC-32C of the header, of each cut slot whose magic
  /// and length hold, and of every record recomputed, so that mutations
  /// reach the checks behind the checksums.
  public static func repairMarkJournalChecksums(_ bytes: [UInt8]) -> [UInt8] {
    typealias F = MarkJournalFormat
    var out = bytes
    guard out.count >= F.headerLength else { return out }
    put(crc(out, 0, 16), into: &out, at: 16)
    for slot in F.cutSlots where Array(out[slot..<slot + 8]) == F.cutMagic {
      let length = Int(readLE(out, slot + 72, 4))
      guard length <= F.maximumOutputPath else { continue }
      put(crc(out, slot, F.cutFixedLength + length), into: &out, at: slot + F.cutFixedLength + length)
    }
    for at in stride(from: F.headerLength, through: out.count - F.recordLength, by: F.recordLength) {
      put(crc(out, at, 44), into: &out, at: at + 44)
    }
    return out
  }

  /// Whether the record at `at` counts: the journal's id, the sequence
  /// expected, its CRC.
  private static func holds(_ bytes: [UInt8], at: Int, journalID: UInt64, sequence: UInt32) -> Bool {
    readLE(bytes, at) == journalID && readLE(bytes, at + 40, 4) == UInt64(sequence)
      && readLE(bytes, at + 44, 4) == UInt64(crc(bytes, at, 44))
  }

  private static func crc(_ bytes: [UInt8], _ at: Int, _ count: Int) -> UInt32 {
    bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + at, count) }
  }

  private static func put(_ v: UInt32, into bytes: inout [UInt8], at: Int) {
    for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
  }

  private static func readLE(_ bytes: [UInt8], _ at: Int, _ width: Int = 8) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<width { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
    return v
  }
}
