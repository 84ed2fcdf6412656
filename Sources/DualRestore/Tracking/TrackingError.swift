// What the tracking engine fails with, typed: the NBD adapter maps it to a
// wire code through `deviceCause`, in one place; the sentence is what
// clients and logs see.

import Glibc

public enum TrackingError: Error, CustomStringConvertible, Sendable {
  /// The frozen view can no longer be read exactly (its store filled up or
  /// failed); it stays lost until dropped.
  case viewLost(view: ID128, reason: String)

  public var description: String {
    switch self {
    case .viewLost(let view, let reason): return "the frozen view \(view) is lost: \(reason)"
    }
  }
}

extension TrackingError: DeviceFailure {
  /// A lost view is an I/O error to a client reading it.
  public var deviceCause: DeviceError.Cause { .io(EIO) }
}
