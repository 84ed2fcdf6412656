// Locks: state behind a mutex, a mutex with a condition variable, and
// per-block locks built on them.
//
// One lock style: Locked<State> for guarded state, so that the state is
// reached only inside withLock and the compiler ties it to its lock;
// Monitor only where a thread waits for a condition (wait, broadcast, timed
// wait). Counters and flags that need no lock are Atomic.
//
// Locked has the shape of Swift's Mutex<State> (Synchronization) but sleeps
// at once when the lock is taken, as a default pthread mutex does. Swift's
// Mutex spins before it sleeps and takes a priority-inheritance futex on
// Linux; with it on a connection's send and read sides, 4 KiB random reads
// at QD 16 through restore-read-through fell from 1.21x nbdkit's IOPS to
// 0.20x on 2 cores (perf: 44 % of the server in Mutex._lockSlow), because
// those locks are held across a system call while 32 threads want them.

import Glibc

/// State that is reached only with its lock held.
// @unchecked Sendable: `state` is touched only inside withLock, under the pthread mutex.
package final class Locked<State>: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private var state: State

  package init(_ state: State) {
    self.state = state
    pthread_mutex_init(mutex, nil)
  }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  /// Runs `body` with the lock held and the state to read and change.
  @inline(__always) package func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body(&state)
  }
}

/// pthread mutex and condition variable (on the monotonic clock).
// @unchecked Sendable: a pthread mutex and condition owned for its life; pthreads makes them thread-safe.
package final class Monitor: @unchecked Sendable {
  private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
  private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

  package init() {
    pthread_mutex_init(mutex, nil)
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(condition, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(condition)
    pthread_mutex_destroy(mutex)
    condition.deallocate()
    mutex.deallocate()
  }

  @inline(__always) package func lock() { pthread_mutex_lock(mutex) }
  @inline(__always) package func unlock() { pthread_mutex_unlock(mutex) }
  /// Waits for a broadcast; call with the lock held.
  package func wait() { pthread_cond_wait(condition, mutex) }
  package func broadcast() { pthread_cond_broadcast(condition) }

  /// With the lock held: waits for a broadcast or `deadline` (monotonic
  /// seconds); false when the deadline passed first.
  package func wait(until deadline: Double) -> Bool {
    let remaining = deadline - monotonicSeconds()
    if remaining <= 0 { return false }
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    let total = Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9 + remaining
    var target = timespec(tv_sec: Int(total), tv_nsec: Int((total - Double(Int(total))) * 1e9))
    return pthread_cond_timedwait(condition, mutex, &target) != ETIMEDOUT
  }

  @inline(__always) package func withLock<R>(_ body: () throws -> R) rethrows -> R {
    lock()
    defer { unlock() }
    return try body()
  }
}

/// Exclusive locks on ranges of blocks. A range is taken whole or waited
/// for; ranges are taken one at a time per thread, so there is no lock order
/// to get wrong.
// @unchecked Sendable: `busy` is behind `monitor`, which lock() waits on.
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

/// Seconds on the monotonic clock, for deadlines.
package func monotonicSeconds() -> Double {
  var ts = timespec()
  clock_gettime(CLOCK_MONOTONIC, &ts)
  return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
