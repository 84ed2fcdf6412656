// How every executable starts and ends: parse, run, and turn any error into
// one sentence on stderr and an exit status.

import ArgumentParser
import DualRestore
import Glibc

public enum ToolMain {
  /// Runs `root` with the process arguments and exits.
  /// `trouble` replaces every failing exit status when set (bitmap-diff's 2).
  public static func run(_ root: any ParsableCommand.Type, trouble: Int32? = nil) -> Never {
    let name = root.configuration.commandName ?? "dualrestore"
    do {
      var command = try root.parseAsRoot()
      try command.run()
      exit(0)
    } catch let error as ToolkitError {
      printError("\(name): \(error.message)")
      exit(trouble ?? 1)
    } catch let error as ExitCode {
      exit(error.rawValue)
    } catch {
      let code = root.exitCode(for: error)
      if code.isSuccess || trouble == nil {
        root.exit(withError: error)
      }
      printError(root.fullMessage(for: error))
      exit(trouble ?? code.rawValue)
    }
  }
}

/// Writes a line to standard error.
public func printError(_ message: String) {
  var line = message
  if !line.hasSuffix("\n") { line += "\n" }
  line.withUTF8 { raw in
    // Nothing is left to tell of a standard error that fails.
    if let base = raw.baseAddress { _ = writeFull(2, base, raw.count) }
  }
}

/// Buffered text on standard output; a failed write is an error, never a
/// silent truncation.
public final class TextOutput {
  private var buffer: [UInt8] = []
  private let fd: Int32

  public init(fd: Int32 = 1) {
    self.fd = fd
    buffer.reserveCapacity(1 << 16)
  }

  public func line(_ text: String) throws {
    buffer.append(contentsOf: text.utf8)
    buffer.append(0x0A)
    if buffer.count >= 1 << 16 { try flush() }
  }

  public func flush() throws {
    guard !buffer.isEmpty else { return }
    if case .failure(let e) = buffer.withUnsafeBytes({ writeFull(fd, $0.baseAddress!, $0.count) }) {
      throw ToolkitError("standard output: \(e)")
    }
    buffer.removeAll(keepingCapacity: true)
  }
}

/// A tiny JSON writer for `--json` outputs: keys in the order given.
public struct JSONObject {
  private var fields: [(String, String)] = []
  public init() {}

  public mutating func add(_ key: String, _ value: String?) {
    fields.append((key, value.map(JSONObject.quote) ?? "null"))
  }
  public mutating func add(_ key: String, _ value: UInt64) { fields.append((key, String(value))) }
  public mutating func add(_ key: String, _ value: Int) { fields.append((key, String(value))) }
  public mutating func add(_ key: String, _ value: Bool) { fields.append((key, value ? "true" : "false")) }
  public mutating func add(_ key: String, number: String) { fields.append((key, number)) }
  public mutating func add(_ key: String, object: JSONObject) { fields.append((key, object.render())) }
  /// An array of values already rendered as JSON (objects, quoted strings).
  public mutating func add(_ key: String, array rendered: [String]) {
    fields.append((key, "[" + rendered.joined(separator: ", ") + "]"))
  }

  public func render() -> String {
    "{" + fields.map { "\(JSONObject.quote($0.0)): \($0.1)" }.joined(separator: ", ") + "}"
  }

  public static func quote(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars {
      switch scalar {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      case _ where scalar.value < 0x20:
        let hex = String(scalar.value, radix: 16)
        out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
      default: out.unicodeScalars.append(scalar)
      }
    }
    return out + "\""
  }
}
