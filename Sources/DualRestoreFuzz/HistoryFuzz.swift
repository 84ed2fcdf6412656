// Fuzz entry point for the point-in-time history's log files
// (dualrestore-history(5)): a file's bytes as a crash or a damaged disk
// would leave them, through what a start runs on them: the current header
// of its two slots, then the scan of its records, blocks checked.

import CShim
import DualRestore

extension FuzzEntryPoints {
  /// Reads `bytes` as a history file: its header, then its records scanned
  /// both from where the header says the kept records start (as the first
  /// file is) and from the end of the header (as a later one is). The scan
  /// must never ask for a byte past the input, and what it accepts must
  /// hold up: records back to back from the start, inside the good bytes,
  /// each header encoding back to the very bytes it was read from, the
  /// segments in order, each before-image's blocks matching their CRCs.
  public static func scanHistoryFile(_ bytes: [UInt8]) -> String? {
    let header: HistoryFormat.FileHeader
    switch HistoryFormat.FileHeader.decode(file: bytes[...]) {
    case .success(let h): header = h
    case .failure(let e): return e.sentence
    }
    let fields = HistoryFormat.slotFields + 4
    let again = header.encoded().prefix(fields)
    precondition(
      again == bytes[0..<fields] || again == bytes[HistoryFormat.slotLength..<HistoryFormat.slotLength + fields],
      "the header accepted encodes to neither slot")
    precondition(header.live - header.position >= UInt64(HistoryFormat.fileHeaderLength), "live before the records")
    let blockCount = header.deviceSize / 4096 + (header.deviceSize % 4096 == 0 ? 0 : 1)
    let length = UInt64(bytes.count)
    var outcome: String?
    for start in [header.live - header.position, UInt64(HistoryFormat.fileHeaderLength)] {
      let scan = HistoryFormat.scan(
        from: start, length: length, blockCount: blockCount, openSegment: header.openSegment, checkData: { _ in true },
        read: { offset, count in
          precondition(
            count >= 0 && offset <= length && UInt64(count) <= length - offset,
            "the scan read \(count) bytes at \(offset) of \(length)")
          return Array(bytes[Int(offset)..<Int(offset) + count])
        })
      guard start <= length else {
        precondition(scan.records.isEmpty && scan.end == start, "records found past the input")
        continue
      }
      precondition(scan.end <= length, "the scan ends at \(scan.end), past the input")
      precondition((scan.stopped == nil) == (scan.end == length), "a clean scan ends before the bytes do")
      precondition(!scan.cutShort || scan.stopped != nil, "cut short without stopping")
      var at = start
      var segment = header.openSegment
      var closed = false
      for (offset, record) in scan.records {
        precondition(offset == at, "a record at \(offset) where \(at) is next")
        precondition(record.length <= scan.end - offset, "the record at \(offset) runs past the good bytes")
        var encoded = [UInt8](repeating: 0, count: HistoryFormat.recordHeaderLength)
        encoded.withUnsafeMutableBytes { record.encodeHeader(into: $0.baseAddress!) }
        precondition(
          encoded[...] == bytes[Int(offset)..<Int(offset) + HistoryFormat.recordHeaderLength],
          "the record at \(offset) encodes differently")
        precondition(record.segment == (closed ? segment + 1 : segment), "segment \(record.segment) out of order")
        if case .before(_, let first, let count, let zero) = record {
          precondition(first < blockCount && UInt64(count) <= blockCount - first, "blocks past the device")
          precondition(zero || blocksMatch(bytes, at: Int(offset), count: Int(count)), "a block's CRC was not checked")
          closed = false
        } else {
          closed = true
        }
        segment = record.segment
        at = offset + record.length
      }
      precondition(at == scan.end, "the good bytes end at \(scan.end), the records at \(at)")
      outcome = outcome ?? scan.stopped.map { "stopped at \(scan.end): \($0.sentence)" }
    }
    return outcome
  }

  /// `bytes` with both header slots' CRC-32C recomputed, and every record
  /// found from offset 4096 on (its magic at a 4-byte boundary) given the
  /// right CRCs for its blocks and its header, so that mutations reach the
  /// checks behind the checksums.
  public static func repairHistoryChecksums(_ bytes: [UInt8]) -> [UInt8] {
    var out = bytes
    func le(_ at: Int, _ width: Int) -> UInt64 {
      var v: UInt64 = 0
      for i in 0..<width { v |= UInt64(out[at + i]) << (8 * UInt64(i)) }
      return v
    }
    func put(_ v: UInt32, _ at: Int) {
      for i in 0..<4 { out[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }
    for slot in [0, HistoryFormat.slotLength] where out.count >= slot + HistoryFormat.slotFields + 4 {
      put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + slot, HistoryFormat.slotFields) }, slot + 88)
    }
    var p = HistoryFormat.fileHeaderLength
    let bs = Int(HistoryFormat.blockSize)
    while p + HistoryFormat.recordHeaderLength <= out.count {
      guard le(p, 4) == UInt64(HistoryFormat.recordMagic) else {
        p += 4
        continue
      }
      var length = HistoryFormat.recordHeaderLength
      if out[p + 4] == HistoryFormat.typeBefore && out[p + 5] & HistoryFormat.flagZero == 0 {
        let count = Int(le(p + 24, 4))
        if count <= Int(HistoryFormat.maximumRecordBlocks) && p + length + count * (4 + bs) <= out.count {
          for k in 0..<count {
            let crc = out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + p + length + 4 * count + k * bs, bs) }
            put(crc, p + length + 4 * k)
          }
          length += count * (4 + bs)
        }
      }
      put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + p, 44) }, p + 44)
      p += length
    }
    return out
  }

  private static func blocksMatch(_ bytes: [UInt8], at offset: Int, count: Int) -> Bool {
    let bs = Int(HistoryFormat.blockSize)
    let crcs = offset + HistoryFormat.recordHeaderLength
    let data = crcs + 4 * count
    return bytes.withUnsafeBytes { b in
      (0..<count).allSatisfy { k in
        dr_crc32c(0, b.baseAddress! + data + k * bs, bs)
          == UInt32(littleEndian: b.loadUnaligned(fromByteOffset: crcs + 4 * k, as: UInt32.self))
      }
    }
  }
}
