// Where a StreamReader's bytes come from, with the SHA-256 its END record is
// checked against: a descriptor read ahead on a thread of its own, which
// keeps the digest there so the merge's own thread only parses, checks CRCs,
// decompresses and writes; or bytes already in memory, hashed as they are
// handed over, without a thread (the fuzz targets read one input at a time).
//
// The END record's digest covers every byte before the END record, which is
// the last 84 bytes of a well-formed stream (100 in version 2). The inputs
// therefore hash everything but the last 100 bytes they have seen
// (WithholdingDigest); at end of input, the withheld bytes before the END
// record are hashed too, and the digest is the one the END record must carry, and the
// number of bytes hashed must equal the END record's offset (anything else
// means bytes after END, which the parser reports).

import Dispatch
import Glibc

/// What a StreamReader reads from.
protocol StreamInput: AnyObject {
  /// Copies up to `count` bytes into `into`; 0 at end of input.
  func read(into: UnsafeMutableRawPointer, count: Int) throws -> Int
  /// After end of input: the digest of all but the last `endRecordLength`
  /// bytes, and how many bytes it covers.
  func digestOfAllButTheEnd(endRecordLength: Int) -> (digest: [UInt8], bytes: UInt64)
  /// Stops reading; safe to call more than once.
  func cancel()
}

/// A SHA-256 of all but the last `withheld` bytes given to it so far.
struct WithholdingDigest {
  static let withheld = StreamFormat.recordOverhead + StreamFormat.referencesEndBodyLength

  private let digest = Digester(DigestAlgorithm.sha256)
  /// The bytes held back, in order; `tailCount` of them.
  private var tail = [UInt8](repeating: 0, count: WithholdingDigest.withheld)
  private var tailCount = 0
  private(set) var hashed: UInt64 = 0

  /// Hashes all but the last `withheld` bytes seen so far, `bytes` included.
  mutating func update(_ bytes: UnsafeRawBufferPointer) {
    let withheld = WithholdingDigest.withheld
    let count = max(0, tailCount + bytes.count - withheld)
    let fromTail = min(count, tailCount)
    let fromBytes = count - fromTail
    let kept = tailCount - fromTail
    let taken = bytes.count - fromBytes
    let digest = self.digest
    tail.withUnsafeMutableBytes { t in
      let base = t.baseAddress!
      if fromTail > 0 { digest.update(UnsafeRawBufferPointer(start: base, count: fromTail)) }
      if fromBytes > 0 { digest.update(UnsafeRawBufferPointer(rebasing: bytes[0..<fromBytes])) }
      // The new tail: what is left of the old one, then the rest of the bytes.
      if fromTail > 0 && kept > 0 { base.copyMemory(from: base + fromTail, byteCount: kept) }
      if taken > 0 { (base + kept).copyMemory(from: bytes.baseAddress! + fromBytes, byteCount: taken) }
    }
    tailCount = kept + taken
    hashed += UInt64(count)
  }

  /// The digest of all but the last `endRecordLength` bytes seen: the
  /// withheld bytes before those are hashed first. Once, at the end.
  mutating func finish(endRecordLength: Int) -> [UInt8] {
    let extra = max(0, tailCount - endRecordLength)
    if extra > 0 {
      let digest = self.digest
      tail.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[0..<extra])) }
      hashed += UInt64(extra)
      tailCount -= extra
    }
    return digest.finish()
  }
}

/// Reads a descriptor ahead on a thread of its own, hashing there.
// @unchecked Sendable: slots pass between reader thread and consumer by semaphores; each side's vars are its own.
final class HashingInput: StreamInput, @unchecked Sendable {
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
  private var digest = WithholdingDigest()

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
        if n > 0 && hashing { digest.update(UnsafeRawBufferPointer(start: slot.buffer.pointer, count: n)) }
        filled.signal()
        if n == 0 { return }
      }
    }
  }

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

  func digestOfAllButTheEnd(endRecordLength: Int) -> (digest: [UInt8], bytes: UInt64) {
    finished.wait()
    finished.signal()
    let d = digest.finish(endRecordLength: endRecordLength)
    return (d, digest.hashed)
  }
}

/// A descriptor read on the caller's thread, straight into the caller's
/// buffer: for a reader that runs on a thread of its own (RecordPipeline).
final class DescriptorInput: StreamInput {
  private let fd: Int32
  private let hashing: Bool
  private var digest = WithholdingDigest()

  init(fd: Int32, hashing: Bool = true) {
    self.fd = fd
    self.hashing = hashing
  }

  func read(into: UnsafeMutableRawPointer, count: Int) throws -> Int {
    switch Sys.read(fd, into, count) {
    case .failure(let e): throw e
    case .success(let n):
      if n > 0 && hashing { digest.update(UnsafeRawBufferPointer(start: into, count: n)) }
      return n
    }
  }

  func digestOfAllButTheEnd(endRecordLength: Int) -> (digest: [UInt8], bytes: UInt64) {
    let d = digest.finish(endRecordLength: endRecordLength)
    return (d, digest.hashed)
  }

  func cancel() {}
}

/// Bytes in memory, handed over in reads of at most `chunk` bytes (as a pipe
/// would) and hashed as they are.
final class MemoryInput: StreamInput {
  private let bytes: [UInt8]
  private let chunk: Int
  private let hashing: Bool
  private var offset = 0
  private var digest = WithholdingDigest()

  init(_ bytes: [UInt8], hashing: Bool = true, chunk: Int = 1 << 16) {
    self.bytes = bytes
    self.hashing = hashing
    self.chunk = max(chunk, 1)
  }

  func read(into: UnsafeMutableRawPointer, count: Int) throws -> Int {
    let n = min(count, chunk, bytes.count - offset)
    guard n > 0 else { return 0 }
    let from = offset
    bytes.withUnsafeBytes { all in
      let part = UnsafeRawBufferPointer(rebasing: all[from..<from + n])
      into.copyMemory(from: part.baseAddress!, byteCount: n)
      if hashing { digest.update(part) }
    }
    offset += n
    return n
  }

  func digestOfAllButTheEnd(endRecordLength: Int) -> (digest: [UInt8], bytes: UInt64) {
    let d = digest.finish(endRecordLength: endRecordLength)
    return (d, digest.hashed)
  }

  func cancel() {}
}

/// A stream kept on a device (an image file, an NBD export of an object),
/// read in order from its start, on the caller's thread, and hashed as it is.
final class DeviceInput: StreamInput {
  private let device: BlockDevice
  private let hashing: Bool
  private var offset: UInt64 = 0
  private var digest = WithholdingDigest()

  init(device: BlockDevice, hashing: Bool = true) {
    self.device = device
    self.hashing = hashing
  }

  func read(into: UnsafeMutableRawPointer, count: Int) throws -> Int {
    let n = Int(min(UInt64(min(count, device.maximumRequest, 8 << 20)), device.size - offset))
    guard n > 0 else { return 0 }
    let buffer = UnsafeMutableRawBufferPointer(start: into, count: n)
    try device.read(into: buffer, at: offset)
    if hashing { digest.update(UnsafeRawBufferPointer(buffer)) }
    offset += UInt64(n)
    return n
  }

  func digestOfAllButTheEnd(endRecordLength: Int) -> (digest: [UInt8], bytes: UInt64) {
    let d = digest.finish(endRecordLength: endRecordLength)
    return (d, digest.hashed)
  }

  func cancel() {}
}
