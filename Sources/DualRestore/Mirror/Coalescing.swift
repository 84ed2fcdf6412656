// Coalescing one batch of journaled changes before they cross the link:
// every byte goes once, from the last change in the batch that covers it,
// so a block overwritten ten times in an interval is sent once. The pieces
// that come out are disjoint, so they may be sent in any order and over
// several connections at once; the batch as a whole still ends with the
// copy holding, for every byte, what the last change wrote.
//
// A painter's sweep: the changes' starts and ends are sorted, and along
// the device the change with the highest index among those covering a
// point wins it. O(n log n) for n changes; nothing is allocated per byte.

/// A change as the journal holds it, for the shipper.
struct JournaledChange: Equatable, Sendable {
  var type: MirrorJournalRecordType
  /// The device range it changes.
  var offset: UInt64
  var length: UInt64
  /// Where a write's data starts in the journal (0 for zero and trim).
  var payloadAt: UInt64
}

/// A disjoint piece of a batch to send: `length` bytes at `offset`, written
/// from the journal at `payloadAt` (a write) or zeroed.
struct ShipPiece: Equatable, Sendable {
  var zero: Bool
  var offset: UInt64
  var length: UInt64
  var payloadAt: UInt64
}

enum Coalescing {
  /// The pieces that bring a copy from before `changes` to after them,
  /// each byte once, sorted by device offset. Adjacent pieces of zeros are
  /// joined, as are adjacent pieces of one write; no piece is longer than
  /// `maximumPiece` bytes.
  static func pieces(of changes: [JournaledChange], maximumPiece: UInt64 = 4 << 20) -> [ShipPiece] {
    guard !changes.isEmpty else { return [] }
    // Events: (position, change index, is start). Ends sort before starts
    // at the same position, so a change ending where another starts does
    // not cover it.
    var events: [(UInt64, Int32, Bool)] = []
    events.reserveCapacity(changes.count * 2)
    for (i, c) in changes.enumerated() {
      events.append((c.offset, Int32(i), true))
      events.append((c.offset + c.length, Int32(i), false))
    }
    events.sort { a, b in a.0 != b.0 ? a.0 < b.0 : (a.2 != b.2 ? !a.2 : a.1 < b.1) }
    var heap = MaxHeap()
    var ended = [Bool](repeating: false, count: changes.count)
    var out: [ShipPiece] = []
    var position: UInt64 = 0
    var k = 0
    while k < events.count {
      let here = events[k].0
      // The span [position, here) belongs to the top live change.
      if here > position, let top = heap.top(skipping: ended) {
        emit(changes[Int(top)], from: position, to: here, into: &out, maximumPiece: maximumPiece)
      }
      while k < events.count && events[k].0 == here {
        let (_, index, isStart) = events[k]
        if isStart { heap.push(index) } else { ended[Int(index)] = true }
        k += 1
      }
      position = here
    }
    return out
  }

  private static func emit(
    _ c: JournaledChange, from start: UInt64, to end: UInt64, into out: inout [ShipPiece], maximumPiece: UInt64
  ) {
    let zero = c.type != .write
    var a = start
    while a < end {
      let payloadAt = zero ? 0 : c.payloadAt + (a - c.offset)
      if var last = out.last, last.zero == zero, last.offset + last.length == a,
        zero || last.payloadAt + last.length == payloadAt, last.length < maximumPiece
      {
        let n = min(end - a, maximumPiece - last.length)
        last.length += n
        out[out.count - 1] = last
        a += n
        continue
      }
      let n = min(end - a, maximumPiece)
      out.append(ShipPiece(zero: zero, offset: a, length: n, payloadAt: payloadAt))
      a += n
    }
  }
}

/// A binary max-heap of change indices with lazy removal.
private struct MaxHeap {
  private var items: [Int32] = []

  mutating func push(_ v: Int32) {
    items.append(v)
    var i = items.count - 1
    while i > 0 {
      let parent = (i - 1) / 2
      guard items[parent] < items[i] else { break }
      items.swapAt(parent, i)
      i = parent
    }
  }

  /// The largest index not ended, dropping ended ones from the top.
  mutating func top(skipping ended: [Bool]) -> Int32? {
    while let first = items.first, ended[Int(first)] { pop() }
    return items.first
  }

  private mutating func pop() {
    let last = items.removeLast()
    guard !items.isEmpty else { return }
    items[0] = last
    var i = 0
    while true {
      let l = 2 * i + 1
      let r = l + 1
      var m = i
      if l < items.count && items[l] > items[m] { m = l }
      if r < items.count && items[r] > items[m] { m = r }
      if m == i { break }
      items.swapAt(i, m)
      i = m
    }
  }
}
