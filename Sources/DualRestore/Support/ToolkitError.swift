// One error type for the library: a single sentence that names the object
// (a path, a field, a record) and the cause or the limit that was crossed.
// Executables print `description` to stderr as it is.

/// An error that describes itself in one sentence.
public struct ToolkitError: Error, CustomStringConvertible, Equatable, Sendable {
  public var message: String

  public init(_ message: String) {
    self.message = message
  }

  public var description: String { message }

  /// `path: cause`, the form every device and file error takes.
  public static func path(_ path: String, _ cause: String) -> ToolkitError {
    ToolkitError("\(path): \(cause)")
  }
}
