// The NBD layer's errors, typed where a caller decides on them. Sentences
// stay what they were; decisions read `ToolkitError.cause`, the NBD error
// number of NBDError, or the type of FileWriteError, never the text.
// Errors thrown by exports become wire codes in `NBDError.code(for:)`.
//
// - A socket (plain or TLS) that waited too long, or whose peer went away,
//   says so in `cause` (.timedOut, .connectionClosed): the server rewords a
//   handshake that took too long and ends quietly when a client leaves.
// - A file or device whose system call failed carries the errno (.system),
//   so that a tracking server's client sees ENOSPC for a full disk, as
//   from nbdkit's file plugin, rather than EIO.
// - A client's failed request carries the server's error number
//   (.serverError), and a refused handshake the option reply's error and
//   the server's words (.refused), so that a tool can show those instead of
//   the client's sentence.

import Glibc

extension ToolkitError {
  /// The kinds of failure callers act on.
  public enum Cause: Equatable, Sendable {
    /// A wait for a peer ran out of time.
    case timedOut
    /// The peer closed the connection (end of input, a reset, a broken pipe).
    case connectionClosed
    /// An NBD server refused the export or an option: its NBD_REP_ERR_*
    /// reply type and its message, when it sent one.
    case refused(code: UInt32, serverSays: String?)
    /// An NBD server answered a request with this error number (NBD_E*).
    case serverError(UInt32)
    /// A system call on a file or device failed with this errno.
    case system(Int32)
  }

  /// What an NBD server said in refusing, when it said something.
  public var serverSays: String? {
    if case .refused(_, let words) = cause { return words }
    return nil
  }
}

/// ToolkitError crosses the block-device seam too (a file or device's
/// failure): its cause says which.
extension ToolkitError: DeviceFailure {
  public var deviceCause: DeviceError.Cause {
    switch cause {
    case .system(let errno): return .io(errno)
    case .timedOut: return .timedOut
    case .connectionClosed: return .closed
    case .refused, .serverError, nil: return .io(EIO)
    }
  }
}

/// An error to send to an NBD client: an NBD error number and, for the log,
/// why. Exports throw it; any other error is sent as EIO.
public struct NBDError: Error, CustomStringConvertible {
  public var code: UInt32
  public var message: String
  public init(_ code: UInt32, _ message: String) {
    self.code = code
    self.message = message
  }
  public var description: String { message }

  /// The NBD error number for any error a handler throws: the one place
  /// errors become wire codes (as nbdkit's server/protocol.c). An engine's
  /// typed error says its cause at the block-device seam; anything else is
  /// EIO.
  static func code(for error: Error) -> UInt32 {
    if let e = error as? NBDError { return e.code }
    guard let failure = error as? DeviceFailure else { return NBD.errIO }
    switch failure.deviceCause {
    case .io(let errno):
      switch errno {
      case EPERM, EROFS: return NBD.errPerm
      case ENOMEM: return NBD.errNoMem
      case EINVAL: return NBD.errInvalid
      case ENOSPC, EDQUOT, EFBIG: return NBD.errNoSpace
      case EOVERFLOW: return NBD.errOverflow
      case ENOTSUP: return NBD.errNotSupported
      case ESHUTDOWN: return NBD.errShutdown
      default: return NBD.errIO
      }
    case .noSpace: return NBD.errNoSpace
    case .readOnly: return NBD.errPerm
    case .outOfRange, .invalid: return NBD.errInvalid
    case .timedOut, .closed, .refused: return NBD.errIO
    }
  }
}

/// A READ's data could not be written to the file it was read into (the
/// connection to the server is unharmed): the seam's FileWriteError.
public typealias NBDFileWriteError = FileWriteError
