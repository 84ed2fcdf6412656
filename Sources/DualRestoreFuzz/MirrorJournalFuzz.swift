// Fuzz entry points for the mirror journal (dualrestore-journal(5)): a whole
// journal's bytes as a crash or a damaged disk would leave them, through the
// scan a restart will run on them; and its positions file, through the
// reader a restart loads it with.

import CShim
import DualRestore

extension FuzzEntryPoints {
  /// Scans `bytes` as a mirror journal. What a scan accepts must hold up:
  /// every record it hands on lies inside the good bytes, in sequence order,
  /// and encodes back to the very bytes it was read from.
  public static func scanMirrorJournal(_ bytes: [UInt8]) -> String? {
    let result = bytes.withUnsafeBytes { p in
      Result { () throws(MirrorJournalDamage) in try MirrorJournalFormat.scan(p) }
    }
    let scan: MirrorJournalScan
    switch result {
    case .success(let s): scan = s
    case .failure(let damage): return damage.description
    }
    precondition(scan.end >= MirrorJournalHeader.length && scan.end <= bytes.count, "scan ends at \(scan.end)")
    precondition((scan.torn == nil) == (scan.end == bytes.count), "a clean scan ends before the bytes do")
    var previous: UInt64? = nil
    let records = scan.intervals.flatMap { i in
      i.records + [(i.endPosition, MirrorJournalRecord.intervalEnd(i.interval, sequence: 0))]
    }
    for (position, record) in records + scan.open {
      precondition(position >= MirrorJournalHeader.length && position % 8 == 0 && position < scan.end)
      let size = MirrorJournalFormat.recordSize(payload: record.payload.count)
      precondition(position + size <= scan.end, "the record at \(position) runs past the good bytes")
      let again = MirrorJournalFormat.encode(
        MirrorJournalRecord.change(
          record.type, interval: record.interval,
          sequence: record.type == .intervalEnd ? readLE(bytes, position + 20) : record.sequence,
          offset: record.offset, length: record.length),
        payload: Array(bytes[record.payload]))
      precondition(again[...] == bytes[position..<position + size], "the record at \(position) encodes differently")
      let sequence = readLE(bytes, position + 20)
      if let previous { precondition(sequence > previous, "sequence \(sequence) after \(previous)") }
      previous = sequence
    }
    return scan.torn.map { "torn at \(scan.end): \($0)" }
  }

  /// `bytes` with the header's CRC-32C and every record's recomputed, where
  /// a record's magic stands at an 8-byte boundary and its payload fits, so
  /// that mutations reach the checks behind the checksums.
  public static func repairMirrorJournalChecksums(_ bytes: [UInt8]) -> [UInt8] {
    var out = bytes
    guard out.count >= MirrorJournalHeader.length else { return out }
    func put(_ v: UInt32, _ at: Int) {
      for i in 0..<4 { out[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }
    put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, 64) }, 64)
    var p = MirrorJournalHeader.length
    while p + MirrorJournalFormat.recordHeaderLength <= out.count {
      guard readLE(out, p, 4) == UInt64(MirrorJournalFormat.recordMagic) else {
        p += 8
        continue
      }
      let payload = Int(readLE(out, p + 8, 4))
      let size = MirrorJournalFormat.recordSize(payload: payload)
      guard payload <= out.count, p + size <= out.count else { break }
      let checked = MirrorJournalFormat.recordHeaderLength + payload
      put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + p, checked) }, p + checked)
      p += size
    }
    return out
  }

  /// Reads `bytes` as a mirror journal's positions file. What it accepts
  /// must encode back to the very bytes it was read from.
  public static func decodeMirrorPositions(_ bytes: [UInt8]) -> String? {
    do {
      let positions = try MirrorPositions(decoding: bytes, path: "fuzz input")
      precondition(positions.copies.count <= MirrorPositions.maximumCopies, "more copies than a file holds")
      precondition(positions.encoded == bytes, "accepted positions encode to other bytes")
      return nil
    } catch {
      return error.message
    }
  }

  /// `bytes` with their last four bytes set to the CRC-32C of the bytes
  /// before them, as a positions file ends, so that mutations reach the
  /// checks behind the checksum.
  public static func repairMirrorPositionsChecksum(_ bytes: [UInt8]) -> [UInt8] {
    guard bytes.count >= 4 else { return bytes }
    var out = bytes
    let crc = out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, out.count - 4) }
    for i in 0..<4 { out[out.count - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    return out
  }

  private static func readLE(_ bytes: [UInt8], _ at: Int, _ width: Int = 8) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<width { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
    return v
  }
}
