// Thin wrappers around the system calls the toolkit needs, and the loops
// that move a whole buffer with them.
//
// The EINTR rule: every system call that a signal can interrupt is retried
// on EINTR here, inside `Sys` and the helpers below, and nowhere else. Code
// outside this file calls these and never tests EINTR itself. Failure comes
// back as an Errno the caller names its object with.
//
// One full-write loop (`writingAll`) serves write, pwrite and send of a
// whole buffer, and one (`writingAllVectors`) writev and sendmsg of a list
// of buffers: short transfers go on from where they stopped, and a call
// that takes nothing is EIO. On a socket with a send timeout, EAGAIN ends
// the loop as a failure for the caller to report as a timeout. TLS has its
// own loop around SSL_write (TLSSession.transferAll).

import CShim
import Glibc

/// A system error number with the C library's message.
public struct Errno: Error, Equatable, Sendable, CustomStringConvertible {
  public var rawValue: Int32
  public init(_ rawValue: Int32) { self.rawValue = rawValue }
  public static var current: Errno { Errno(errno) }
  public var description: String { String(cString: strerror(rawValue)) }

  public static let interrupted = Errno(EINTR)
  public static let noSuchDeviceOrAddress = Errno(ENXIO)
}

/// Runs `body` until it does not fail with EINTR.
@inline(__always)
func retryingInterrupts<T: BinaryInteger>(_ body: () -> T) -> Result<T, Errno> {
  while true {
    let rc = body()
    if rc >= 0 { return .success(rc) }
    if errno == EINTR { continue }
    return .failure(.current)
  }
}

enum Sys {
  /// Opens `path`. Calls `open(2)`.
  static func open(_ path: String, flags: Int32, mode: mode_t = 0o600) -> Result<Int32, Errno> {
    retryingInterrupts { dr_open(path, flags | dr_O_CLOEXEC, mode) }
  }

  /// Reads up to `count` bytes at `offset`. Calls `pread(2)`.
  static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64)
    -> Result<Int, Errno>
  {
    retryingInterrupts { Glibc.pread(fd, buffer, count, off_t(offset)) }
  }

  /// Writes up to `count` bytes at `offset`. Calls `pwrite(2)`.
  static func pwrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, _ offset: UInt64)
    -> Result<Int, Errno>
  {
    retryingInterrupts { Glibc.pwrite(fd, buffer, count, off_t(offset)) }
  }

  /// Reads up to `count` bytes from the current position. Calls `read(2)`.
  static func read(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Result<Int, Errno> {
    retryingInterrupts { Glibc.read(fd, buffer, count) }
  }

  /// Writes up to `count` bytes at the current position. Calls `write(2)`.
  static func write(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Result<Int, Errno> {
    retryingInterrupts { Glibc.write(fd, buffer, count) }
  }

  /// Makes written data durable, without metadata that reads do not need.
  /// Calls `fdatasync(2)`.
  static func fdatasync(_ fd: Int32) -> Result<Int32, Errno> {
    retryingInterrupts { Glibc.fdatasync(fd) }
  }

  /// Makes written data and metadata durable. Calls `fsync(2)`.
  static func fsync(_ fd: Int32) -> Result<Int32, Errno> {
    retryingInterrupts { Glibc.fsync(fd) }
  }

  /// Calls `lseek(2)`.
  static func lseek(_ fd: Int32, _ offset: UInt64, _ whence: Int32) -> Result<Int64, Errno> {
    let rc = Glibc.lseek(fd, off_t(offset), whence)
    return rc < 0 ? .failure(.current) : .success(Int64(rc))
  }

  /// Calls `close(2)`; EINTR is not retried, since the descriptor is gone.
  static func close(_ fd: Int32) {
    _ = Glibc.close(fd)
  }

  /// Calls `fstat(2)`.
  static func fstat(_ fd: Int32) -> Result<stat, Errno> {
    var st = stat()
    return Glibc.fstat(fd, &st) == 0 ? .success(st) : .failure(.current)
  }

  /// Whether the descriptor is a terminal. Calls `isatty(3)`.
  static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

  /// Sends up to `count` bytes. Calls `send(2)`.
  static func send(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, _ flags: Int32) -> Result<Int, Errno> {
    retryingInterrupts { Glibc.send(fd, buffer, count, flags) }
  }

  /// Receives up to `count` bytes. Calls `recv(2)`.
  static func recv(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ flags: Int32)
    -> Result<Int, Errno>
  {
    retryingInterrupts { Glibc.recv(fd, buffer, count, flags) }
  }

  /// Writes the first `count` of `vectors` in order. Calls `writev(2)`.
  static func writev(_ fd: Int32, _ vectors: UnsafePointer<iovec>, _ count: Int) -> Result<Int, Errno> {
    retryingInterrupts { Glibc.writev(fd, vectors, Int32(count)) }
  }

  /// Writes the first `count` of `vectors` in order at `offset`. Calls
  /// `pwritev(2)`.
  static func pwritev(_ fd: Int32, _ vectors: UnsafePointer<iovec>, _ count: Int, _ offset: UInt64)
    -> Result<Int, Errno>
  {
    retryingInterrupts { Glibc.pwritev(fd, vectors, Int32(count), off_t(offset)) }
  }

  /// Sends the first `count` of `vectors` in order. Calls `sendmsg(2)`.
  static func sendmsg(_ fd: Int32, _ vectors: UnsafeMutablePointer<iovec>, _ count: Int, _ flags: Int32)
    -> Result<Int, Errno>
  {
    var message = msghdr()
    message.msg_iov = vectors
    message.msg_iovlen = count
    return retryingInterrupts { Glibc.sendmsg(fd, &message, flags) }
  }

  /// Sends up to `count` bytes of `file` from `position`, which it
  /// advances. Calls `sendfile(2)`.
  static func sendfile(_ fd: Int32, _ file: Int32, _ position: inout off_t, _ count: Int) -> Result<Int, Errno> {
    retryingInterrupts { Glibc.sendfile(fd, file, &position, count) }
  }

  /// Moves up to `count` bytes from a descriptor into a pipe; `wait` false
  /// does not wait for room in the pipe. Calls `splice(2)`.
  static func spliceIn(_ from: Int32, _ pipe: Int32, _ count: Int, wait: Bool) -> Result<Int, Errno> {
    retryingInterrupts { dr_splice_in(from, pipe, UInt(count), wait ? 1 : 0) }
  }

  /// Moves up to `count` bytes from a pipe into a file at `offset`. Calls
  /// `splice(2)`.
  static func spliceOut(_ pipe: Int32, _ to: Int32, _ offset: UInt64, _ count: Int) -> Result<Int, Errno> {
    retryingInterrupts { dr_splice_out(pipe, to, offset, UInt(count)) }
  }

  /// Connects a socket. Calls `connect(2)`. An interrupted connect goes on
  /// in the background, so it is not called again: its end is waited for
  /// (poll, no limit, as connect itself waits) and its result taken
  /// (SO_ERROR).
  static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) -> Result<Void, Errno> {
    if Glibc.connect(fd, address, length) == 0 { return .success(()) }
    guard errno == EINTR else { return .failure(.current) }
    var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
    if case .failure(let e) = poll(&p, limit: { 0 }) { return .failure(e) }
    var error: Int32 = 0
    var size = socklen_t(MemoryLayout<Int32>.size)
    guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) == 0 else { return .failure(.current) }
    return error == 0 ? .success(()) : .failure(Errno(error))
  }

  /// Takes the next connection on a listening socket. Calls `accept(2)`.
  static func accept(_ fd: Int32) -> Result<Int32, Errno> {
    retryingInterrupts { Glibc.accept(fd, nil, nil) }
  }

  /// Waits for `p`'s events: 1 when they came, 0 when the wait ran out.
  /// `limit` gives the seconds a wait may last (0: no limit); it is asked
  /// again before a wait that follows an interruption, so a deadline holds.
  /// Calls `poll(2)`.
  static func poll(_ p: inout pollfd, limit: () throws -> Double) rethrows -> Result<Int32, Errno> {
    while true {
      let seconds = try limit()
      let rc = Glibc.poll(&p, 1, seconds > 0 ? Int32(min(seconds * 1000, 2e9).rounded(.up)) : -1)
      if rc >= 0 { return .success(rc) }
      if errno != EINTR { return .failure(.current) }
    }
  }

  /// Sleeps `seconds`, however often interrupted. Calls `nanosleep(2)`.
  static func sleep(_ seconds: Double) {
    guard seconds > 0 else { return }
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
    var left = timespec()
    while nanosleep(&request, &left) != 0 && errno == EINTR { request = left }
  }
}

/// The full-write loop: `step(done)` writes from `done` bytes in and
/// returns how many it took, until all of `count` are written. A step that
/// takes nothing is EIO; the first failure ends the loop.
@inline(__always)
func writingAll(_ count: Int, _ step: (Int) -> Result<Int, Errno>) -> Result<Void, Errno> {
  var done = 0
  while done < count {
    switch step(done) {
    case .failure(let e): return .failure(e)
    case .success(0): return .failure(Errno(EIO))
    case .success(let n): done += n
    }
  }
  return .success(())
}

/// The full-write loop for a list of buffers: `step(first, count)` writes
/// `count` vectors from `first` and returns how many bytes it took, until
/// every vector is written. Vectors written in part are advanced in place;
/// `written` counts the bytes as they go. A step that takes nothing is EIO.
@inline(__always)
func writingAllVectors(
  _ vectors: UnsafeMutableBufferPointer<iovec>, written: inout UInt64,
  _ step: (UnsafeMutablePointer<iovec>, Int) -> Result<Int, Errno>
) -> Result<Void, Errno> {
  guard let base = vectors.baseAddress else { return .success(()) }
  var index = 0
  let count = vectors.count
  while true {
    // Empty vectors (a reply without payload) are not written.
    while index < count && vectors[index].iov_len == 0 { index += 1 }
    guard index < count else { break }
    let n: Int
    switch step(base + index, count - index) {
    case .failure(let e): return .failure(e)
    case .success(0): return .failure(Errno(EIO))
    case .success(let m): n = m
    }
    written += UInt64(n)
    // Skip what was written; a pipe or a socket may take part of a vector.
    var left = n
    while left > 0 && index < count {
      let length = vectors[index].iov_len
      if left >= length {
        left -= length
        index += 1
      } else {
        vectors[index].iov_base = vectors[index].iov_base.map { $0 + left }
        vectors[index].iov_len -= left
        left = 0
      }
    }
  }
  return .success(())
}

/// Reads exactly `count` bytes at `offset`, surviving short transfers.
/// Returns the number read, smaller than `count` only at end of file.
func preadFull(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64)
  -> Result<Int, Errno>
{
  var done = 0
  while done < count {
    switch Sys.pread(fd, buffer + done, count - done, offset + UInt64(done)) {
    case .failure(let e): return .failure(e)
    case .success(0): return .success(done)
    case .success(let n): done += n
    }
  }
  return .success(done)
}

/// Writes exactly `count` bytes at `offset`, surviving short transfers.
func pwriteFull(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, _ offset: UInt64)
  -> Result<Void, Errno>
{
  writingAll(count) { Sys.pwrite(fd, buffer + $0, count - $0, offset + UInt64($0)) }
}

/// Writes every vector at `offset` on, in order, surviving short transfers.
func pwritevFull(_ fd: Int32, _ vectors: UnsafeMutableBufferPointer<iovec>, _ offset: UInt64) -> Result<Void, Errno> {
  var written: UInt64 = 0
  var done: UInt64 = 0
  return writingAllVectors(vectors, written: &written) { first, count in
    let result = Sys.pwritev(fd, first, count, offset + done)
    if case .success(let n) = result { done += UInt64(n) }
    return result
  }
}

/// Writes all of `count` bytes to a stream descriptor (pipe, socket, file).
package func writeFull(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Result<Void, Errno> {
  writingAll(count) { Sys.write(fd, buffer + $0, count - $0) }
}

/// Sends all of `count` bytes on a socket with `flags` (MSG_NOSIGNAL,
/// MSG_MORE). EAGAIN is a send timeout that ran out.
func sendFull(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, flags: Int32) -> Result<Void, Errno> {
  writingAll(count) { Sys.send(fd, buffer + $0, count - $0, flags) }
}

/// Reads from a stream descriptor until `count` bytes or end of input.
package func readFull(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Result<Int, Errno> {
  var done = 0
  while done < count {
    switch Sys.read(fd, buffer + done, count - done) {
    case .failure(let e): return .failure(e)
    case .success(0): return .success(done)
    case .success(let n): done += n
    }
  }
  return .success(done)
}
