// Thin wrappers around the system calls the toolkit needs. Each retries EINTR
// in one place and turns failure into an Errno the caller names a path with.

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
  var done = 0
  while done < count {
    switch Sys.pwrite(fd, buffer + done, count - done, offset + UInt64(done)) {
    case .failure(let e): return .failure(e)
    case .success(0): return .failure(Errno(EIO))
    case .success(let n): done += n
    }
  }
  return .success(())
}

/// Writes all of `count` bytes to a stream descriptor (pipe, socket, file).
func writeFull(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Result<Void, Errno> {
  var done = 0
  while done < count {
    switch Sys.write(fd, buffer + done, count - done) {
    case .failure(let e): return .failure(e)
    case .success(0): return .failure(Errno(EIO))
    case .success(let n): done += n
    }
  }
  return .success(())
}

/// Reads from a stream descriptor until `count` bytes or end of input.
func readFull(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Result<Int, Errno> {
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
