// A mutex with a condition variable, and per-block locks built on them.

import Glibc

/// pthread mutex and condition variable.
final class Monitor: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

  init() {
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(condition, nil)
  }

  deinit {
    pthread_cond_destroy(condition)
    pthread_mutex_destroy(mutex)
    condition.deallocate()
    mutex.deallocate()
  }

  @inline(__always) func lock() { pthread_mutex_lock(mutex) }
  @inline(__always) func unlock() { pthread_mutex_unlock(mutex) }
  /// Waits for a broadcast; call with the lock held.
  func wait() { pthread_cond_wait(condition, mutex) }
  func broadcast() { pthread_cond_broadcast(condition) }

  @inline(__always) func withLock<R>(_ body: () throws -> R) rethrows -> R {
    lock()
    defer { unlock() }
    return try body()
  }
}

/// Exclusive locks on ranges of blocks. A range is taken whole or waited
/// for; ranges are taken one at a time per thread, so there is no lock order
/// to get wrong.
final class BlockLocks: @unchecked Sendable {
  private let monitor = Monitor()
  private var busy: [Range<UInt64>] = []

  func lock(_ range: Range<UInt64>) {
    monitor.lock()
    while busy.contains(where: { $0.overlaps(range) }) { monitor.wait() }
    busy.append(range)
    monitor.unlock()
  }

  /// Takes the range only if it is free now.
  func tryLock(_ range: Range<UInt64>) -> Bool {
    monitor.withLock {
      if busy.contains(where: { $0.overlaps(range) }) { return false }
      busy.append(range)
      return true
    }
  }

  func unlock(_ range: Range<UInt64>) {
    monitor.lock()
    if let i = busy.firstIndex(of: range) { busy.remove(at: i) }
    monitor.broadcast()
    monitor.unlock()
  }
}
