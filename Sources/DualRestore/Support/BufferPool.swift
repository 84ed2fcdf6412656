// Memory for requests, bounded: a pool of reusable aligned buffers (kept
// up to a size, a count and a total, so that a burst of large requests does
// not stay allocated), and a budget of bytes in use that makes a taker wait
// for room.

/// Reusable request buffers, by size. A few buffers up to `keepSize` are
/// kept for the next requests, so memory stays bounded: larger or surplus
/// buffers are freed when given back.
final class BufferPool: Sendable {
  private struct Kept {
    var buffers: [AlignedBuffer] = []
    var bytes = 0
  }
  private let kept = Locked(Kept())
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
    let reused = kept.withLock { kept -> AlignedBuffer? in
      guard
        let i = kept.buffers.firstIndex(where: { $0.count >= size && $0.count <= max(size * 4, 1 << 20) })
      else { return nil }
      let b = kept.buffers.remove(at: i)
      kept.bytes -= b.count
      return b
    }
    return reused ?? AlignedBuffer(count: max(size, 4096))
  }

  func put(_ buffer: AlignedBuffer) {
    kept.withLock { kept in
      if kept.buffers.count < keepCount && buffer.count <= keepSize && kept.bytes + buffer.count <= keepBytes {
        kept.buffers.append(buffer)
        kept.bytes += buffer.count
      }
    }
  }
}

/// Bytes of request buffers in use across a server's connections. A taker
/// waits until its bytes fit (one request always fits when nothing else
/// is taken, so no request waits forever).
// @unchecked Sendable: `used` is behind `monitor`, which takers wait on for room.
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
