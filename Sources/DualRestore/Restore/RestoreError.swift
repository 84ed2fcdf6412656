// What the restore engine fails with or refuses, typed: the server that
// serves the engine (the NBD adapter) maps each to its own error codes
// through `deviceCause`, in one place; the sentences are what clients and
// logs see.

import Glibc

public enum RestoreError: Error, CustomStringConvertible, Sendable {
  /// The backup could not give a range a read needed.
  case fetchFailed(offset: UInt64, length: UInt64, cause: any Error)
  /// A range fetched from the backup could not be written to the primary.
  case fetchNotKept(primary: String, offset: UInt64, length: UInt64, errno: Int32)
  /// A client's write failed on the primary.
  case writeFailed(cause: any Error)
  /// A flush could not make the primary, the backup and the map agree.
  case flushFailed(cause: any Error)
  /// A stream's identity does not fit the overwrite map: the first problem.
  case streamRefused(problem: String)
  /// A report or completion was asked for a stream never admitted.
  case streamNotAdmitted(ID128)
  /// The merge export was sent part of a block.
  case partialBlocks(blockSize: UInt32, offset: UInt64, length: UInt64)

  public var description: String {
    switch self {
    case .fetchFailed(let offset, let length, let cause):
      return "cannot fetch \(length) bytes at \(offset) from the backup: \(cause)"
    case .fetchNotKept(let primary, let offset, let length, let errno):
      return "\(primary): cannot write the \(length) bytes at \(offset) fetched from the backup: \(Errno(errno))"
    case .writeFailed(let cause):
      return "\(cause)"
    case .flushFailed(let cause):
      return "flush failed: \(cause)"
    case .streamRefused(let problem):
      return problem + " (--force merges it anyway)"
    case .streamNotAdmitted(let stream):
      return "stream \(stream) was not merged through this server"
    case .partialBlocks(let blockSize, let offset, let length):
      return "the merge export takes whole blocks of \(blockSize) bytes; got \(length) bytes at \(offset)"
    }
  }
}

extension RestoreError: DeviceFailure {
  /// Failures are I/O errors to a client, whatever the errno underneath (a
  /// client retries or gives up alike); refusals are invalid requests.
  public var deviceCause: DeviceError.Cause {
    switch self {
    case .fetchFailed, .fetchNotKept, .writeFailed, .flushFailed: return .io(EIO)
    case .streamRefused(let problem): return .invalid(problem)
    case .streamNotAdmitted, .partialBlocks: return .invalid(description)
    }
  }
}
