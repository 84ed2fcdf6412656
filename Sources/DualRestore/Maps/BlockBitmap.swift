// One bit per block, packed into 64-bit words.
//
// Encoding: block i is bit (i % 64) of word (i / 64), least significant bit
// first. Bits past `count` in the last word are always zero: every operation
// that could set them (invert, setAll) clears them again, so `population`
// and word-wise comparisons never need to mask.
//
// Every operation works a word at a time; a 2^32-block bitmap is 512 MiB.

public struct BlockBitmap: Equatable, Sendable {
  public private(set) var count: UInt64
  @usableFromInline var words: [UInt64]

  public init(count: UInt64, filled: Bool = false) {
    self.count = count
    let wordCount = Int((count + 63) / 64)
    words = [UInt64](repeating: filled ? ~0 : 0, count: wordCount)
    if filled { clearTail() }
  }

  /// Builds a bitmap from its words (little-endian bit order); tail bits are cleared.
  public init(count: UInt64, words: [UInt64]) {
    precondition(UInt64(words.count) == (count + 63) / 64)
    self.count = count
    self.words = words
    clearTail()
  }

  public var wordCount: Int { words.count }

  /// Read-only access to the packed words.
  public func withWords<R>(_ body: (UnsafeBufferPointer<UInt64>) throws -> R) rethrows -> R {
    try words.withUnsafeBufferPointer(body)
  }

  /// Mutable access to the packed words; the tail is cleared afterwards.
  public mutating func withMutableWords<R>(_ body: (UnsafeMutableBufferPointer<UInt64>) throws -> R)
    rethrows -> R
  {
    defer { clearTail() }
    return try words.withUnsafeMutableBufferPointer { try body($0) }
  }

  private mutating func clearTail() {
    let rest = count & 63
    if rest != 0, !words.isEmpty {
      words[words.count - 1] &= (1 << rest) - 1
    }
  }

  // MARK: Single bits

  @inlinable
  public subscript(block: UInt64) -> Bool {
    get {
      precondition(block < count, "block \(block) out of range")
      return words[Int(block >> 6)] & (1 << (block & 63)) != 0
    }
    set {
      precondition(block < count, "block \(block) out of range")
      if newValue {
        words[Int(block >> 6)] |= 1 << (block & 63)
      } else {
        words[Int(block >> 6)] &= ~(1 << (block & 63))
      }
    }
  }

  // MARK: Ranges

  /// Sets every block in `range`.
  public mutating func set(_ range: Range<UInt64>) { apply(range, set: true) }

  /// Clears every block in `range`.
  public mutating func clear(_ range: Range<UInt64>) { apply(range, set: false) }

  private mutating func apply(_ range: Range<UInt64>, set: Bool) {
    precondition(range.upperBound <= count, "range \(range) out of \(count) blocks")
    if range.isEmpty { return }
    let first = Int(range.lowerBound >> 6)
    let last = Int((range.upperBound - 1) >> 6)
    let headMask: UInt64 = ~0 << (range.lowerBound & 63)
    let tailBits = range.upperBound & 63
    let tailMask: UInt64 = tailBits == 0 ? ~0 : (1 << tailBits) - 1
    words.withUnsafeMutableBufferPointer { w in
      if first == last {
        let mask = headMask & tailMask
        if set { w[first] |= mask } else { w[first] &= ~mask }
        return
      }
      if set { w[first] |= headMask } else { w[first] &= ~headMask }
      let fill: UInt64 = set ? ~0 : 0
      var i = first + 1
      while i < last {
        w[i] = fill
        i += 1
      }
      if set { w[last] |= tailMask } else { w[last] &= ~tailMask }
    }
  }

  /// Whether every block in `range` is set.
  public func allSet(_ range: Range<UInt64>) -> Bool {
    if range.isEmpty { return true }
    return nextClear(from: range.lowerBound, before: range.upperBound) == nil
  }

  /// Whether any block in `range` is set.
  public func anySet(_ range: Range<UInt64>) -> Bool {
    if range.isEmpty { return false }
    return nextSet(from: range.lowerBound, before: range.upperBound) != nil
  }

  // MARK: Counting and searching

  /// The number of set blocks.
  public var population: UInt64 {
    words.withUnsafeBufferPointer { w in
      var total: UInt64 = 0
      for word in w { total &+= UInt64(word.nonzeroBitCount) }
      return total
    }
  }

  /// The number of set blocks in `range`.
  public func population(in range: Range<UInt64>) -> UInt64 {
    precondition(range.upperBound <= count)
    if range.isEmpty { return 0 }
    let first = Int(range.lowerBound >> 6)
    let last = Int((range.upperBound - 1) >> 6)
    let headMask: UInt64 = ~0 << (range.lowerBound & 63)
    let tailBits = range.upperBound & 63
    let tailMask: UInt64 = tailBits == 0 ? ~0 : (1 << tailBits) - 1
    return words.withUnsafeBufferPointer { w in
      if first == last { return UInt64((w[first] & headMask & tailMask).nonzeroBitCount) }
      var total = UInt64((w[first] & headMask).nonzeroBitCount)
      var i = first + 1
      while i < last {
        total &+= UInt64(w[i].nonzeroBitCount)
        i += 1
      }
      return total + UInt64((w[last] & tailMask).nonzeroBitCount)
    }
  }

  /// The first set block at or after `start`.
  public func nextSet(from start: UInt64) -> UInt64? { next(from: start, before: count, invert: 0) }

  /// The first clear block at or after `start`.
  public func nextClear(from start: UInt64) -> UInt64? { next(from: start, before: count, invert: ~0) }

  /// The first set block in `start..<limit`: the search stops at `limit`,
  /// so asking about a short range of a huge bitmap costs a short scan.
  public func nextSet(from start: UInt64, before limit: UInt64) -> UInt64? {
    next(from: start, before: min(limit, count), invert: 0)
  }

  /// The first clear block in `start..<limit`.
  public func nextClear(from start: UInt64, before limit: UInt64) -> UInt64? {
    next(from: start, before: min(limit, count), invert: ~0)
  }

  @inline(__always)
  private func next(from start: UInt64, before limit: UInt64, invert: UInt64) -> UInt64? {
    if start >= limit { return nil }
    return words.withUnsafeBufferPointer { w -> UInt64? in
      var i = Int(start >> 6)
      let lastWord = Int((limit - 1) >> 6)
      var word = (w[i] ^ invert) & (~0 << (start & 63))
      while true {
        if word != 0 {
          let found = UInt64(i) << 6 + UInt64(word.trailingZeroBitCount)
          return found < limit ? found : nil
        }
        i += 1
        if i > lastWord { return nil }
        word = w[i] ^ invert
      }
    }
  }

  /// Runs of set blocks, in order, as block ranges.
  public var extents: ExtentSequence { ExtentSequence(bitmap: self) }

  public struct ExtentSequence: Sequence {
    let bitmap: BlockBitmap
    public func makeIterator() -> Iterator { Iterator(bitmap: bitmap, position: 0) }

    public struct Iterator: IteratorProtocol {
      let bitmap: BlockBitmap
      var position: UInt64
      public mutating func next() -> Range<UInt64>? {
        guard let start = bitmap.nextSet(from: position) else {
          position = bitmap.count
          return nil
        }
        let end = bitmap.nextClear(from: start) ?? bitmap.count
        position = end
        return start..<end
      }
    }
  }

  // MARK: Set algebra, word by word

  /// Sets every block set in `other`. Both bitmaps have the same count.
  public mutating func formUnion(_ other: BlockBitmap) { combine(other) { $0 | $1 } }

  /// Keeps only blocks set in both.
  public mutating func formIntersection(_ other: BlockBitmap) { combine(other) { $0 & $1 } }

  /// Clears every block set in `other`.
  public mutating func subtract(_ other: BlockBitmap) { combine(other) { $0 & ~$1 } }

  /// Flips every block.
  public mutating func invert() {
    words.withUnsafeMutableBufferPointer { w in
      for i in w.indices { w[i] = ~w[i] }
    }
    clearTail()
  }

  @inline(__always)
  private mutating func combine(_ other: BlockBitmap, _ op: (UInt64, UInt64) -> UInt64) {
    precondition(count == other.count, "bitmaps of \(count) and \(other.count) blocks")
    other.words.withUnsafeBufferPointer { o in
      words.withUnsafeMutableBufferPointer { w in
        for i in w.indices { w[i] = op(w[i], o[i]) }
      }
    }
  }

  public func union(_ other: BlockBitmap) -> BlockBitmap {
    var copy = self
    copy.formUnion(other)
    return copy
  }

  public func intersection(_ other: BlockBitmap) -> BlockBitmap {
    var copy = self
    copy.formIntersection(other)
    return copy
  }

  public func subtracting(_ other: BlockBitmap) -> BlockBitmap {
    var copy = self
    copy.subtract(other)
    return copy
  }

  public func inverted() -> BlockBitmap {
    var copy = self
    copy.invert()
    return copy
  }
}
