// Reads a stream's bytes ahead on a thread of its own and keeps their
// SHA-256 there, so the merge's own thread only parses, checks CRCs,
// decompresses and writes.
//
// The END record's digest covers every byte before the END record, which is
// always the last 84 bytes of a well-formed stream. The thread therefore
// hashes everything but the last 84 bytes it has seen; at end of input its
// digest is the one the END record must carry, and the number of bytes it
// hashed must equal the END record's offset (anything else means bytes after
// END, which the parser reports).

import Dispatch
import Glibc

final class HashingInput: @unchecked Sendable {
  static let withheld = StreamFormat.recordOverhead + StreamFormat.endBodyLength

  private final class Slot {
    let buffer: AlignedBuffer
    var length = 0
    var error: Errno?
    init(_ size: Int) { buffer = AlignedBuffer(count: size) }
  }

  private let fd: Int32
  private let slots: [Slot]
  private let filled = DispatchSemaphore(value: 0)
  private let free = DispatchSemaphore(value: 0)
  private let finished = DispatchSemaphore(value: 0)
  private let stop = AtomicFlag()
  // Consumer side.
  private var current = 0
  private var offsetInSlot = 0
  private var holding = false
  private var sawEnd = false
  // Hasher side, read by the consumer only after `finished`.
  private let digest = Digester(DigestAlgorithm.sha256)
  private var tail = [UInt8](repeating: 0, count: HashingInput.withheld)
  private var tailCount = 0
  private var hashed: UInt64 = 0

  /// Without `hashing`, only reads ahead (encrypted streams, whose records
  /// are authenticated by their tags).
  private let hashing: Bool

  init(fd: Int32, hashing: Bool = true, slotSize: Int = 4 << 20, depth: Int = 4) {
    self.fd = fd
    self.hashing = hashing
    slots = (0..<depth).map { _ in Slot(slotSize) }
    for _ in 0..<depth { free.signal() }
    startThread { [self] in
      run()
      finished.signal()
    }
  }

  deinit { cancel() }

  /// Stops the reading thread; safe to call more than once.
  func cancel() {
    if stop.setOnce() {
      free.signal()
      finished.wait()
      finished.signal()
    }
  }

  private func run() {
    var index = 0
    while true {
      free.wait()
      if stop.isSet { return }
      let slot = slots[index % slots.count]
      index += 1
      switch Sys.read(fd, slot.buffer.pointer, slot.buffer.count) {
      case .failure(let e):
        slot.length = 0
        slot.error = e
        filled.signal()
        return
      case .success(let n):
        slot.length = n
        slot.error = nil
        if n > 0 && hashing { hash(UnsafeRawBufferPointer(start: slot.buffer.pointer, count: n)) }
        filled.signal()
        if n == 0 { return }
      }
    }
  }

  /// Hashes all but the last `withheld` bytes seen so far.
  private func hash(_ bytes: UnsafeRawBufferPointer) {
    let total = tailCount + bytes.count
    let count = max(0, total - HashingInput.withheld)
    let fromTail = min(count, tailCount)
    if fromTail > 0 {
      tail.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[0..<fromTail])) }
    }
    let fromBytes = count - fromTail
    if fromBytes > 0 { digest.update(UnsafeRawBufferPointer(rebasing: bytes[0..<fromBytes])) }
    hashed += UInt64(count)
    // The new tail: what is left of the old one, then the rest of the bytes.
    var newTail = [UInt8]()
    newTail.reserveCapacity(HashingInput.withheld)
    newTail.append(contentsOf: tail[fromTail..<tailCount])
    newTail.append(contentsOf: bytes[fromBytes...])
    tailCount = newTail.count
    for (i, b) in newTail.enumerated() { tail[i] = b }
  }

  /// Copies up to `count` bytes into `into`; 0 at end of input.
  func read(into: UnsafeMutableRawPointer, count: Int) throws -> Int {
    if sawEnd { return 0 }
    if !holding {
      filled.wait()
      holding = true
      offsetInSlot = 0
    }
    let slot = slots[current % slots.count]
    if let error = slot.error { throw error }
    if slot.length == 0 {
      sawEnd = true
      return 0
    }
    let n = min(count, slot.length - offsetInSlot)
    into.copyMemory(from: slot.buffer.pointer + offsetInSlot, byteCount: n)
    offsetInSlot += n
    if offsetInSlot == slot.length {
      holding = false
      current += 1
      free.signal()
    }
    return n
  }

  /// After end of input: the digest of all but the last 84 bytes, and how
  /// many bytes it covers.
  func digestOfAllButTheEnd() -> (digest: [UInt8], bytes: UInt64) {
    finished.wait()
    finished.signal()
    return (digest.finish(), hashed)
  }
}
