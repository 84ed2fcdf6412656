// Memory for requests, bounded: a pool of reusable aligned buffers (kept
// up to a size, a count and a total, so that a burst of large requests does
// not stay allocated), and a budget of bytes in use that makes a taker wait
// for room.

import Dispatch

/// Reusable request buffers, by size. A few buffers up to `keepSize` are
/// kept for the next requests, so memory stays bounded: larger or surplus
/// buffers are freed when given back.
final class BufferPool: @unchecked Sendable {
  private let lock = DispatchSemaphore(value: 1)
  private var free: [AlignedBuffer] = []
  private var freeBytes = 0
  let keepCount: Int
  let keepSize: Int
  /// The most bytes kept in all, whatever their count.
  let keepBytes: Int

  init(keepCount: Int = 8, keepSize: Int = 1 << 20, keepBytes: Int = .max) {
    self.keepCount = keepCount
    self.keepSize = keepSize
    self.keepBytes = keepBytes
  }

  func get(_ size: Int) -> AlignedBuffer {
    lock.wait()
    if let i = free.firstIndex(where: { $0.count >= size && $0.count <= max(size * 4, 1 << 20) }) {
      let b = free.remove(at: i)
      freeBytes -= b.count
      lock.signal()
      return b
    }
    lock.signal()
    return AlignedBuffer(count: max(size, 4096))
  }

  func put(_ buffer: AlignedBuffer) {
    lock.wait()
    if free.count < keepCount && buffer.count <= keepSize && freeBytes + buffer.count <= keepBytes {
      free.append(buffer)
      freeBytes += buffer.count
    }
    lock.signal()
  }
}

/// Bytes of request buffers in use across a server's connections. A taker
/// waits until its bytes fit (one request always fits when nothing else
/// is taken, so no request waits forever).
final class ByteBudget: @unchecked Sendable {
  private let monitor = Monitor()
  private let limit: Int
  private var used = 0

  init(limit: Int) { self.limit = limit }

  func take(_ bytes: Int) {
    guard bytes > 0 else { return }
    monitor.lock()
    while used > 0 && used + bytes > limit { monitor.wait() }
    used += bytes
    monitor.unlock()
  }

  func release(_ bytes: Int) {
    guard bytes > 0 else { return }
    monitor.lock()
    used -= bytes
    monitor.broadcast()
    monitor.unlock()
  }
}
