// Long-running pipeline stages get threads of their own. They block on
// semaphores for most of their life, which the Dispatch pool does not
// expect of its worker threads: on a 2-core machine it would not start
// enough of them, and the stages would wait for each other.

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
