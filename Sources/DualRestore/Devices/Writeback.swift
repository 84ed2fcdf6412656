// Early writeback: once enough has been written to a device through its page
// cache, a background thread asks the kernel to start writing that range out
// (sync_file_range with SYNC_FILE_RANGE_WRITE, which does not wait for it).
// The disk then works while data still arrives, and the next fdatasync has
// little left to do, instead of everything since the last one: a FLUSH after
// a large write waits for the tail, not for the whole. PostgreSQL's
// *_flush_after settings do the same. Nothing here makes anything durable;
// durability still comes from fdatasync alone, and a write-out error shows
// there.

import CShim
import Dispatch
import Glibc

// @unchecked Sendable: its state is behind `monitor`, which the write-out thread waits on.
public final class EarlyWriteback: @unchecked Sendable {
  private let fd: Int32
  private let threshold: UInt64
  private let monitor = Monitor()
  // Under `monitor`: the range written since the last start of write-out.
  private var low = UInt64.max
  private var high: UInt64 = 0
  private var bytes: UInt64 = 0
  private var stopped = false
  /// The thread starts with the first write-out due, so an owner that
  /// never writes (or fails to open) has none.
  private var started = false
  private let exited = DispatchSemaphore(value: 0)

  /// Starts write-out of `device` after every `threshold` bytes written.
  public init(_ device: Device, threshold: UInt64 = 2 << 20) {
    fd = device.pageCacheFD
    self.threshold = threshold
  }

  /// Notes `length` bytes written at `offset`.
  public func written(_ offset: UInt64, _ length: UInt64) {
    monitor.lock()
    low = min(low, offset)
    high = max(high, offset + length)
    bytes += length
    let due = bytes >= threshold
    let start = due && !started && !stopped
    if start { started = true }
    monitor.unlock()
    if start { startThread { [self] in run() } }
    if due { monitor.broadcast() }
  }

  /// Ends the background thread and waits for it (so the descriptor is not
  /// used after this returns). Later calls return at once.
  public func stop() {
    let running = monitor.withLock { () -> Bool in
      defer { stopped = true }
      return !stopped && started
    }
    guard running else { return }
    monitor.broadcast()
    exited.wait()
  }

  private func run() {
    defer { exited.signal() }
    while true {
      monitor.lock()
      while !stopped && bytes < threshold { monitor.wait() }
      if stopped {
        monitor.unlock()
        return
      }
      let range = (low, high)
      low = .max
      high = 0
      bytes = 0
      monitor.unlock()
      _ = dr_start_writeback(fd, range.0, range.1 - range.0)
    }
  }
}
