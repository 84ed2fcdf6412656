// Threads and the small pieces the pipelines share between them. Long
// stages get threads of their own: they block on semaphores for most of
// their life, which the Dispatch pool does not expect of its workers (on a
// 2-core machine it would not start enough of them).

import Dispatch
import Glibc
import Synchronization

private final class ThreadBody: Sendable {
  let body: @Sendable () -> Void
  init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// Runs `body` on a new detached thread.
public func startThread(_ body: @escaping @Sendable () -> Void) {
  let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
  var thread = pthread_t()
  let rc = pthread_create(
    &thread, nil,
    { raw in
      guard let raw else { return nil }
      let work = Unmanaged<ThreadBody>.fromOpaque(raw).takeRetainedValue()
      work.body()
      return nil
    }, context)
  if rc != 0 {
    // No thread to be had: run the stage on a Dispatch worker instead.
    let work = Unmanaged<ThreadBody>.fromOpaque(context).takeRetainedValue()
    DispatchQueue.global().async { work.body() }
    return
  }
  pthread_detach(thread)
}

/// A few threads that run blocking jobs handed to them, so that a caller
/// can overlap two blocking calls (a local write and a network round trip).
public final class Offload: Sendable {
  // @unchecked Sendable: `body` is handed to one worker thread and runs once there; `done` is a semaphore.
  public final class Job: @unchecked Sendable {
    let body: () -> Void
    let done = DispatchSemaphore(value: 0)
    init(_ body: @escaping () -> Void) { self.body = body }
    /// Waits until the job has run.
    public func wait() { done.wait() }
  }

  private let queue = Handoff<Job?>()

  public init(threads: Int) {
    for _ in 0..<max(1, threads) {
      startThread { [queue] in
        while let item = queue.take(), let job = item {
          job.body()
          job.done.signal()
        }
      }
    }
  }

  /// Runs `body` on one of the threads; `wait()` on the result joins it.
  public func start(_ body: @escaping () -> Void) -> Job {
    let job = Job(body)
    queue.put(job)
    return job
  }
}

/// A queue between two threads, unbounded (its users bound it by how many
/// items exist).
final class Handoff<T: Sendable>: Sendable {
  private let items = Locked<[T]>([])
  private let available = DispatchSemaphore(value: 0)

  func put(_ item: T) {
    items.withLock { $0.append(item) }
    available.signal()
  }

  func take() -> T? {
    available.wait()
    return items.withLock { $0.isEmpty ? nil : $0.removeFirst() }
  }
}

/// The first error one thread saw, for another to read.
final class ErrorBox: Sendable {
  private let stored = Locked<Error?>(nil)

  var error: Error? { stored.withLock { $0 } }

  func set(_ error: Error) {
    stored.withLock { if $0 == nil { $0 = error } }
  }
}

/// Hands a value that is safe by construction to another thread.
// @unchecked Sendable: the caller vouches that `value` is safe to hand over (no thread shares it after).
struct Unchecked<T>: @unchecked Sendable {
  let value: T
  init(_ value: T) { self.value = value }
}

/// A flag set once, readable from any thread.
public final class AtomicFlag: Sendable {
  private let value = Locked(false)

  public init() {}

  public var isSet: Bool { value.withLock { $0 } }

  /// Sets the flag.
  public func set() { _ = setOnce() }

  /// Sets the flag; returns true for the call that set it.
  @discardableResult
  func setOnce() -> Bool {
    value.withLock {
      if $0 { return false }
      $0 = true
      return true
    }
  }
}

/// Threads that run until told to stop, each pausing between rounds of its
/// work: a server's periodic jobs (checkpoints, progress lines, hydration).
/// stop() returns only once every thread started here has ended.
// @unchecked Sendable: `stopping` and `running` are behind `lock`, which pause() and stop() wait on.
package final class StoppableThreads: @unchecked Sendable {
  // Guarded by `lock`.
  private let lock = Monitor()
  private var stopping = false
  private var running = 0

  package init() {}

  /// Runs `body` on a thread of its own.
  package func start(_ body: @escaping @Sendable () -> Void) {
    lock.withLock { running += 1 }
    startThread { [self] in
      body()
      lock.withLock {
        running -= 1
        lock.broadcast()
      }
    }
  }

  /// Waits `seconds` unless a stop comes first; false when stopping.
  package func pause(_ seconds: Double) -> Bool {
    let deadline = monotonicSeconds() + seconds
    return lock.withLock {
      while !stopping && lock.wait(until: deadline) {}
      return !stopping
    }
  }

  package var isStopping: Bool { lock.withLock { stopping } }

  /// Asks every thread to end, without waiting (from a signal handler).
  package func beginStop() {
    lock.withLock {
      stopping = true
      lock.broadcast()
    }
  }

  /// Ends every thread and waits until they have ended.
  package func stop() {
    beginStop()
    lock.withLock {
      while running > 0 { lock.wait() }
    }
  }
}
