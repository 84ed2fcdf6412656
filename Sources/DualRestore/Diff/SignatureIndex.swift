// A digest → (image, block) index of one or more signatures, held in memory:
// what a sender asks to learn whether the receiver already holds a block's
// content anywhere, and where.
//
// Memory is 16 bytes per signed block (blocks of zeros get no entry, but
// their room is allocated: the count is known before the digests), in one
// allocation made from the signatures' headers (at most 256 MiB for a TiB
// signed in 64 KiB blocks), sorted in place: no second copy while sorting.
// An entry keeps the first 10 bytes of the digest and the location (image
// 8 bits, block 40 bits); a lookup compares those 80 bits. A false match
// (two digests sharing 80 bits: about n / 2^80 per lookup, for n entries)
// costs no damage: whoever uses the location reads the block and checks its
// whole digest before trusting it, and a reference the receiver cannot
// resolve is refused there.
//
// Blocks of zeros are left out: streams carry them as ZERO runs already.
//
// Invariants: every image shares one digest algorithm and one block size;
// locations are within each image's block count; entries are sorted by
// (prefix, image, block), so all the places of one content are adjacent
// and a lookup is one binary search.

import Glibc

// @unchecked Sendable: immutable after init; lookups only read.
public final class SignatureIndex: @unchecked Sendable {
  /// One image the index knows: what its signature says of it.
  public struct Image: Sendable, Equatable {
    public var name: String
    public var signatureID: ID128
    public var geometry: BlockGeometry
    public var signedBlocks: UInt64
    public init(name: String, signatureID: ID128, geometry: BlockGeometry, signedBlocks: UInt64) {
      self.name = name
      self.signatureID = signatureID
      self.geometry = geometry
      self.signedBlocks = signedBlocks
    }
  }

  /// A place that held a content when its signature was made.
  public struct Location: Equatable, Sendable {
    public var image: Int
    public var block: UInt64
  }

  struct Entry {
    /// Digest bytes 0–7, big-endian, so integer order is byte order.
    var high: UInt64
    /// Digest bytes 8–9 (bits 63–48), the image (47–40), the block (39–0).
    var low: UInt64
  }

  public static let maximumImages = 255
  public static let maximumBlocks: UInt64 = 1 << 40
  /// The shortest digest trusted to name content.
  public static let minimumDigestLength = 16
  static let prefixMask: UInt64 = 0xFFFF_0000_0000_0000

  public let images: [Image]
  public let digestName: String
  public let digestLength: Int
  public let blockSize: UInt32
  private let entries: UnsafeMutableBufferPointer<Entry>
  /// Entries in use: signed blocks that are not zeros.
  public let count: Int
  /// Blocks of zeros left out.
  public let zeroBlocks: UInt64

  /// Bytes of memory the entries take.
  public var memoryBytes: Int { entries.count * MemoryLayout<Entry>.stride }

  /// Reads `signatures` whole (each checked to its closing checksum) into an
  /// index; `blockSize`, when given, is the block size they must share.
  public init(signatures: [SignatureReader], blockSize requiredBlockSize: UInt32? = nil) throws {
    guard let first = signatures.first else { throw ToolkitError("no signature to index") }
    guard signatures.count <= SignatureIndex.maximumImages else {
      throw ToolkitError(
        "\(signatures.count) signatures are more than the \(SignatureIndex.maximumImages) one index can hold")
    }
    let name = first.header.digestName
    let length = first.header.digestLength
    let size = requiredBlockSize ?? first.header.geometry.blockSize
    guard length >= SignatureIndex.minimumDigestLength else {
      throw ToolkitError(
        "\(first.name) has \(length)-byte digests; naming content by digest needs at least "
          + "\(SignatureIndex.minimumDigestLength) (sha256 gives 32)")
    }
    var total: UInt64 = 0
    var images: [Image] = []
    for s in signatures {
      let h = s.header
      guard h.digestName == name, h.digestLength == length else {
        throw ToolkitError(
          "\(s.name) uses digest \(h.digestName) (\(h.digestLength) bytes) but \(first.name) uses \(name) "
            + "(\(length) bytes); signatures indexed together must share one")
      }
      guard h.geometry.blockSize == size else {
        throw ToolkitError(
          "\(s.name) was made with block size \(h.geometry.blockSize), not \(size); make it with --block-size \(size)"
        )
      }
      guard h.geometry.blockCount <= SignatureIndex.maximumBlocks else {
        throw ToolkitError("\(s.name) signs \(h.geometry.blockCount) blocks, more than an index can place (2^40)")
      }
      total += s.signedBlocks
      images.append(
        Image(name: h.sourceName, signatureID: h.signatureID, geometry: h.geometry, signedBlocks: s.signedBlocks))
    }
    guard total <= UInt64(Int.max / MemoryLayout<Entry>.stride) else {
      throw ToolkitError("the signatures sign \(total) blocks, too many to index")
    }
    let algorithm = try DigestAlgorithm(named: name)
    guard algorithm.length == length else {
      throw ToolkitError("\(first.name) says digest \(name) is \(length) bytes, but it is \(algorithm.length)")
    }
    entries = .allocate(capacity: Int(total))
    var used = 0
    var zeros: UInt64 = 0
    do {
      let batch = 4096
      let blocks = UnsafeMutablePointer<UInt64>.allocate(capacity: batch)
      let digests = UnsafeMutableRawPointer.allocate(byteCount: batch * length, alignment: 16)
      defer {
        blocks.deallocate()
        digests.deallocate()
      }
      for (slot, s) in signatures.enumerated() {
        let geometry = s.header.geometry
        let zeroFull = SignatureIndex.zeroDigest(algorithm, length: Int(geometry.blockSize))
        let lastBlock = geometry.blockCount - 1
        let lastLength = geometry.length(ofBlock: lastBlock)
        let zeroLast = SignatureIndex.zeroDigest(algorithm, length: lastLength)
        while true {
          let n = try s.readEntries(max: batch, blocks: blocks, digests: digests)
          if n == 0 { break }
          guard used + n <= entries.count else {
            throw ToolkitError("\(s.name) holds more digests than its header says")
          }
          for i in 0..<n {
            let d = digests + i * length
            let zero = blocks[i] == lastBlock ? zeroLast : zeroFull
            if memcmp(d, zero, length) == 0 {
              zeros += 1
              continue
            }
            entries[used] = SignatureIndex.entry(d, image: slot, block: blocks[i])
            used += 1
          }
        }
        try s.finish()
      }
    } catch {
      entries.deallocate()
      throw error
    }
    count = used
    zeroBlocks = zeros
    self.images = images
    digestName = name
    digestLength = length
    blockSize = size
    SignatureIndex.sort(UnsafeMutableBufferPointer(rebasing: entries[0..<used]))
  }

  deinit { entries.deallocate() }

  static func zeroDigest(_ algorithm: DigestAlgorithm, length: Int) -> [UInt8] {
    let zeros = [UInt8](repeating: 0, count: length)
    let d = Digester(algorithm)
    zeros.withUnsafeBytes { d.update($0) }
    return d.finish()
  }

  @inline(__always)
  static func prefix(_ digest: UnsafeRawPointer) -> (high: UInt64, low: UInt64) {
    let high = UInt64(bigEndian: digest.loadUnaligned(as: UInt64.self))
    let low = UInt64(UInt16(bigEndian: digest.loadUnaligned(fromByteOffset: 8, as: UInt16.self))) << 48
    return (high, low)
  }

  @inline(__always)
  static func entry(_ digest: UnsafeRawPointer, image: Int, block: UInt64) -> Entry {
    let (high, low) = prefix(digest)
    return Entry(high: high, low: low | UInt64(image) << 40 | block)
  }

  @inline(__always)
  static func less(_ a: Entry, _ b: Entry) -> Bool { a.high < b.high || (a.high == b.high && a.low < b.low) }

  /// The entries whose content may be `digest` (its first 80 bits match), as
  /// a range of positions for `location(at:)`; empty when none does.
  public func candidates(_ digest: UnsafeRawPointer) -> Range<Int> {
    let (high, low) = SignatureIndex.prefix(digest)
    var lo = 0
    var hi = count
    while lo < hi {
      let mid = (lo + hi) >> 1
      let e = entries[mid]
      if e.high < high || (e.high == high && e.low & SignatureIndex.prefixMask < low) {
        lo = mid + 1
      } else {
        hi = mid
      }
    }
    var end = lo
    while end < count, entries[end].high == high, entries[end].low & SignatureIndex.prefixMask == low { end += 1 }
    return lo..<end
  }

  public func location(at position: Int) -> Location {
    let low = entries[position].low
    return Location(image: Int((low >> 40) & 0xFF), block: low & (SignatureIndex.maximumBlocks - 1))
  }

  /// Sorts in place: quicksort (median of three) falling back to heapsort
  /// past a depth limit, insertion sort for short ranges. Entries are
  /// distinct (each location appears once), so order is total.
  static func sort(_ a: UnsafeMutableBufferPointer<Entry>) {
    var depth = 0
    var n = a.count
    while n > 1 {
      depth += 2
      n >>= 1
    }
    introsort(a, 0, a.count, depth)
  }

  private static func introsort(_ a: UnsafeMutableBufferPointer<Entry>, _ from: Int, _ to: Int, _ depth: Int) {
    var from = from
    var to = to
    var depth = depth
    while to - from > 16 {
      if depth == 0 {
        heapsort(a, from, to)
        return
      }
      depth -= 1
      let mid = from + (to - from) / 2
      if less(a[mid], a[from]) { a.swapAt(mid, from) }
      if less(a[to - 1], a[from]) { a.swapAt(to - 1, from) }
      if less(a[to - 1], a[mid]) { a.swapAt(to - 1, mid) }
      let pivot = a[mid]
      var i = from
      var j = to - 1
      while true {
        while less(a[i], pivot) { i += 1 }
        while less(pivot, a[j]) { j -= 1 }
        if i >= j { break }
        a.swapAt(i, j)
        i += 1
        j -= 1
      }
      // Recurse into the smaller side, loop on the larger: stack depth stays logarithmic.
      if j + 1 - from < to - (j + 1) {
        introsort(a, from, j + 1, depth)
        from = j + 1
      } else {
        introsort(a, j + 1, to, depth)
        to = j + 1
      }
    }
    if to - from > 1 {
      for i in (from + 1)..<to {
        let x = a[i]
        var j = i
        while j > from && less(x, a[j - 1]) {
          a[j] = a[j - 1]
          j -= 1
        }
        a[j] = x
      }
    }
  }

  private static func heapsort(_ a: UnsafeMutableBufferPointer<Entry>, _ from: Int, _ to: Int) {
    let n = to - from
    func sift(_ start: Int, _ end: Int) {
      var root = start
      while 2 * root + 1 < end {
        var child = 2 * root + 1
        if child + 1 < end && less(a[from + child], a[from + child + 1]) { child += 1 }
        if !less(a[from + root], a[from + child]) { return }
        a.swapAt(from + root, from + child)
        root = child
      }
    }
    var start = n / 2 - 1
    while start >= 0 {
      sift(start, n)
      start -= 1
    }
    var end = n - 1
    while end > 0 {
      a.swapAt(from, from + end)
      sift(0, end)
      end -= 1
    }
  }
}
