// Writes held in memory on their way to a device that keeps a history, so
// that the history's sync is not in every write's path: a write's
// before-images are appended to the history's log (not yet durable), its
// data is copied here and the client is answered; a thread then makes the
// log durable once for every write staged meanwhile and only then writes
// them to the device, in the order they were staged. A FLUSH (and a FUA
// write, and anything that needs the device as it stands: a point, a
// freeze, a stop) waits until what was staged before it is on the device;
// a FLUSH then makes the device durable with writes going on, staged,
// while nothing is applied.
//
// Invariants:
// - Preserved before overwritten, as without staging: no staged write
//   reaches the device before the log holding its before-images is durable.
// - Reads see every write answered before they were asked: what is staged
//   is copied out before the device is read and laid over it in order, so
//   a write applied and dropped meanwhile is still seen.
// - A write answered is not durable until a FLUSH returns, as NBD allows;
//   after a crash the staged writes are gone and the device is at its last
//   flush or later, its before-images all in the log.
// - Memory: one ring of `capacity` bytes; a write waits while it is full.
// - A device write that fails keeps the writes staged (reads still see
//   them), is tried again every second, and fails every FLUSH meanwhile.

import Glibc

final class StagedWrites: @unchecked Sendable {
  struct Entry {
    var id: UInt64
    var offset: UInt64
    var length: UInt64
    /// Where its data is in the ring; -1 for zeros.
    var at: Int
  }

  let device: Device
  let history: PointHistory
  let log: @Sendable (String) -> Void
  let capacity: Int
  private let ring: AlignedBuffer
  private let zeros: AlignedBuffer
  private let monitor = Monitor()
  // Guarded by `monitor`.
  private var entries: [Entry] = []
  private var first = 0
  private var head = 0
  private var nextID: UInt64 = 1
  private var applied: UInt64 = 0
  private var failure: String?
  private var stopping = false
  /// While a FLUSH makes the device durable: nothing is applied, nor is
  /// the log synchronised (see PointHistory.point(durable:)).
  private var paused = false
  private let thread = StoppableThreads()

  init(device: Device, history: PointHistory, capacity: Int = 64 << 20, log: @escaping @Sendable (String) -> Void) {
    self.device = device
    self.history = history
    self.capacity = capacity
    self.log = log
    ring = AlignedBuffer(count: capacity)
    zeros = AlignedBuffer(count: 1 << 20)
    zeros.buffer.initializeMemory(as: UInt8.self, repeating: 0)
  }

  func start() {
    thread.start { [self] in run() }
  }

  /// Stages a write (`data`) or zeros (`data` nil) and returns its id.
  func stage(_ data: UnsafeRawBufferPointer?, offset: UInt64, length: UInt64) -> UInt64 {
    let n = data == nil ? 0 : Int(length)
    precondition(n <= capacity)
    monitor.lock()
    defer { monitor.unlock() }
    var at = -1
    if n > 0 {
      while true {
        if let place = allocate(n) {
          at = place
          break
        }
        monitor.wait()
      }
      (ring.pointer + at).copyMemory(from: data!.baseAddress!, byteCount: n)
    }
    let id = nextID
    nextID += 1
    entries.append(Entry(id: id, offset: offset, length: length, at: at))
    monitor.broadcast()
    return id
  }

  /// Room for `n` bytes in the ring, or nil; called locked.
  private func allocate(_ n: Int) -> Int? {
    guard let oldest = entries.dropFirst(first).first(where: { $0.at >= 0 }) else {
      head = n
      return 0
    }
    let tail = oldest.at
    if head > tail {
      if capacity - head >= n {
        defer { head += n }
        return head
      }
      if tail >= n {
        head = n
        return 0
      }
      return nil
    }
    if tail - head >= n {
      defer { head += n }
      return head
    }
    return nil
  }

  /// Returns once every write staged so far (or up to `id`) is on the
  /// device; throws when writing the device fails.
  func drain(through id: UInt64? = nil) throws {
    monitor.lock()
    defer { monitor.unlock() }
    let target = id ?? nextID - 1
    while applied < target {
      if let failure { throw ToolkitError("writing the device failed: \(failure)") }
      monitor.wait()
    }
  }

  /// Whether a staged write touches `offset..<offset+length`.
  func overlaps(_ offset: UInt64, _ length: UInt64) -> Bool {
    monitor.withLock {
      entries[first...].contains { $0.offset < offset + length && offset < $0.offset + $0.length }
    }
  }

  /// Reads the device as the staged writes make it.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    let length = UInt64(buffer.count)
    // Copied out first: a write applied and dropped while the device is
    // read is still laid over it.
    var pieces: [(at: Int, count: Int, data: [UInt8]?)] = []
    monitor.withLock {
      for e in entries[first...] where e.offset < offset + length && offset < e.offset + e.length {
        let from = max(e.offset, offset)
        let to = min(e.offset + e.length, offset + length)
        let count = Int(to - from)
        if e.at < 0 {
          pieces.append((Int(from - offset), count, nil))
        } else {
          let src = ring.pointer + e.at + Int(from - e.offset)
          pieces.append((Int(from - offset), count, Array(UnsafeRawBufferPointer(start: src, count: count))))
        }
      }
    }
    try device.read(into: buffer, at: offset)
    for p in pieces {
      let dst = buffer.baseAddress! + p.at
      if let data = p.data {
        data.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: p.count) }
      } else {
        memset(dst, 0, p.count)
      }
    }
  }

  private func run() {
    while true {
      monitor.lock()
      while (entries.count == first || paused) && !stopping { monitor.wait() }
      if entries.count == first && stopping {
        monitor.unlock()
        return
      }
      let batch = Array(entries[first...])
      monitor.unlock()
      // The before-images of every write in the batch are in the log:
      // durable first, then the writes. (A history lost on the way no
      // longer orders anything: the writes go on.)
      history.syncLog()
      var error: String?
      for e in batch {
        do {
          if e.at < 0 {
            try device.writeZeros(offset: e.offset, length: e.length, scratch: zeros)
          } else {
            try device.write(UnsafeRawBufferPointer(start: ring.pointer + e.at, count: Int(e.length)), at: e.offset)
          }
        } catch let e {
          error = "\(e)"
          break
        }
      }
      monitor.lock()
      if let error {
        if failure == nil { log("writes staged for the device could not be written: \(error); trying again") }
        failure = error
        monitor.broadcast()
        monitor.unlock()
        if !thread.pause(1) { return }
        continue
      }
      failure = nil
      first += batch.count
      applied = batch.last?.id ?? applied
      if first > 4096 || first == entries.count {
        entries.removeFirst(first)
        first = 0
      }
      if entries.isEmpty { head = 0 }
      monitor.broadcast()
      monitor.unlock()
    }
  }

  func pause() { monitor.withLock { paused = true } }

  func resume() {
    monitor.withLock {
      paused = false
      monitor.broadcast()
    }
  }

  /// Writes what is staged and stops the thread.
  func stop() throws {
    defer {
      monitor.withLock {
        stopping = true
        monitor.broadcast()
      }
      thread.stop()
    }
    try drain()
  }
}
