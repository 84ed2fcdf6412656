// Fuzz entry point for the stream index (dualrestore-index(5)): an index
// file's bytes as a damaged disk or an object store would give them,
// through the decoder snapshot-server loads an index with, and the lookup
// every read of a stored stream makes in what it accepted.

import CShim
import DualRestore

extension FuzzEntryPoints {
  /// Decodes `bytes` as a stream index. What it accepts must encode back to
  /// the very bytes it was read from, and the entry it finds for a block
  /// must be the one a scan of every entry finds: for the blocks at the
  /// edges of a few entries the input picks, and for blocks the input names.
  public static func decodeStreamIndex(_ bytes: [UInt8]) -> String? {
    let index: StreamIndexFormat.Index
    do {
      index = try StreamIndexFormat.decode(bytes)
    } catch {
      return "\(error)"
    }
    precondition(StreamIndexFormat.encode(index) == bytes, "an accepted index encodes to other bytes")
    let entries = index.entries
    let blockCount = index.identity.geometry.blockCount
    var blocks: [UInt64] = [0, blockCount &- 1, blockCount, .max]
    // The input's bytes after the header, 8 at a time, as entry numbers and
    // as blocks; at most 8 of each, so an input is a few scans of its entries.
    var words: [UInt64] = []
    var at = StreamIndexFormat.headerLength
    while at + 8 <= bytes.count && words.count < 8 {
      var v: UInt64 = 0
      for i in 0..<8 { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
      words.append(v)
      at += 37  // not a multiple of 40: each word is another field of an entry
    }
    for w in words {
      if !entries.isEmpty {
        let e = entries[Int(w % UInt64(entries.count))]
        blocks += [e.firstBlock &- 1, e.firstBlock, e.endBlock &- 1, e.endBlock]
      }
      blocks += [w, blockCount == 0 ? w : w % blockCount]
    }
    for block in blocks {
      let scanned = entries.firstIndex { $0.firstBlock <= block && block < $0.endBlock }
      let found = index.entry(for: block)
      precondition(
        found == scanned,
        "block \(block): the search finds entry \(String(describing: found)), a scan \(String(describing: scanned))")
    }
    return nil
  }

  /// `bytes` with the header's CRC-32C (bytes 124 to 127) and the entries'
  /// (the last 4 bytes) recomputed, so that mutations reach the checks
  /// behind the checksums.
  public static func repairStreamIndexChecksums(_ bytes: [UInt8]) -> [UInt8] {
    let header = StreamIndexFormat.headerLength
    guard bytes.count >= header + StreamIndexFormat.trailerLength else { return bytes }
    var out = bytes
    func put(_ v: UInt32, _ at: Int) {
      for i in 0..<4 { out[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }
    put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, header - 4) }, header - 4)
    put(out.withUnsafeBytes { dr_crc32c(0, $0.baseAddress! + header, out.count - header - 4) }, out.count - 4)
    return out
  }
}
