// Threads and the small pieces the pipelines share between them. Long
// stages get threads of their own: they block on semaphores for most of
// their life, which the Dispatch pool does not expect of its workers (on a
// 2-core machine it would not start enough of them).

import Dispatch
import Glibc

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
public final class Offload: @unchecked Sendable {
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
final class Handoff<T>: @unchecked Sendable {
  private var items: [T] = []
  private let lock = DispatchSemaphore(value: 1)
  private let available = DispatchSemaphore(value: 0)

  func put(_ item: T) {
    lock.wait()
    items.append(item)
    lock.signal()
    available.signal()
  }

  func take() -> T? {
    available.wait()
    lock.wait()
    defer { lock.signal() }
    return items.isEmpty ? nil : items.removeFirst()
  }
}

/// The first error one thread saw, for another to read.
final class ErrorBox: @unchecked Sendable {
  private let lock = DispatchSemaphore(value: 1)
  private var stored: Error?

  var error: Error? {
    lock.wait()
    defer { lock.signal() }
    return stored
  }

  func set(_ error: Error) {
    lock.wait()
    if stored == nil { stored = error }
    lock.signal()
  }
}

/// Hands a value that is safe by construction to another thread.
struct Unchecked<T>: @unchecked Sendable {
  let value: T
  init(_ value: T) { self.value = value }
}

/// A flag set once, readable from any thread.
public final class AtomicFlag: @unchecked Sendable {
  private let lock = DispatchSemaphore(value: 1)
  private var value = false

  public init() {}

  public var isSet: Bool {
    lock.wait()
    defer { lock.signal() }
    return value
  }

  /// Sets the flag.
  public func set() { _ = setOnce() }

  /// Sets the flag; returns true for the call that set it.
  @discardableResult
  func setOnce() -> Bool {
    lock.wait()
    defer { lock.signal() }
    if value { return false }
    value = true
    return true
  }
}

/// Threads that run until told to stop, each pausing between rounds of its
/// work: a server's periodic jobs (checkpoints, progress lines, hydration).
/// stop() returns only once every thread started here has ended.
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
