// One error type for the library: a single sentence that names the object
// (a path, a field, a record) and the cause or the limit that was crossed.
// Executables print `description` to stderr as it is. Where a caller
// decides on the kind of failure (a peer that timed out or went away, an
// NBD server's refusal or error number), `cause` says it: no caller reads
// the sentence to tell.

/// An error that describes itself in one sentence.
public struct ToolkitError: Error, CustomStringConvertible, Equatable, Sendable {
  public var message: String
  /// The kind of failure, for callers that act on it; nil when the sentence
  /// is all there is.
  public var cause: Cause?

  public init(_ message: String, cause: Cause? = nil) {
    self.message = message
    self.cause = cause
  }

  public var description: String { message }

  /// `path: cause`, the form every device and file error takes.
  public static func path(_ path: String, _ cause: String) -> ToolkitError {
    ToolkitError("\(path): \(cause)")
  }

  /// `path: doing: errno's words`, for a system call on a file or device
  /// that failed; `cause` keeps the errno.
  public static func path(_ path: String, _ doing: String, errno: Errno) -> ToolkitError {
    ToolkitError("\(path): \(doing): \(errno)", cause: .system(errno.rawValue))
  }
}
