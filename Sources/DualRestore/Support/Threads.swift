// Long-running pipeline stages get threads of their own. They block on
// semaphores for most of their life, which the Dispatch pool does not
// expect of its worker threads: on a 2-core machine it would not start
// enough of them, and the stages would wait for each other.

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

import Dispatch
