// The control channel of a running server: a Unix socket taking one request
// line per connection and answering with lines of text.
//
// Request:  a command and its arguments, separated by spaces, then "\n";
//           an argument holding spaces is not needed (paths are sent as
//           `key=value` with the value percent-encoded).
// Answer:   "ok\n" or "error SENTENCE\n", then "KEY VALUE\n" lines, then
//           the connection closes.

import Glibc

public enum ControlSocket {
  public static let maximumLine = 64 << 10

  /// Serves `listener` until it is shut down, one request at a time (the
  /// requests are rare and each holds the server's writes briefly).
  public static func serve(
    _ listener: Listener, handler: @escaping @Sendable ([String]) -> ControlAnswer
  ) {
    startThread {
      while true {
        guard let socket = try? listener.accept() else { return }
        socket.setTimeout(10)
        let answer: ControlAnswer
        if let line = readLine(socket.fd) {
          answer = handler(line.split(separator: " ").map(String.init))
        } else {
          answer = .error("the request was not one line of at most \(maximumLine) bytes")
        }
        try? socket.write(Array(answer.text.utf8))
        socket.shutdown()
      }
    }
  }

  /// Sends one request to the control socket at `path` and returns the
  /// answer's fields; throws the server's sentence when it says error.
  public static func request(_ path: String, _ words: [String], timeout: Double = 600, limit: Int = maximumLine)
    throws -> [(String, String)]
  {
    let socket: Socket
    do {
      socket = try Socket.connect(.unix(path: path), timeout: 5)
    } catch {
      throw ToolkitError("\(path): no server answers on this control socket (\(error))")
    }
    socket.setTimeout(timeout)
    try socket.write(Array((words.joined(separator: " ") + "\n").utf8))
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while bytes.count < limit {
      guard case .success(let n) = chunk.withUnsafeMutableBytes({ Sys.read(socket.fd, $0.baseAddress!, $0.count) }),
        n > 0
      else { break }
      bytes += chunk[0..<n]
    }
    let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init)
    guard let first = lines.first else { throw ToolkitError("\(path): the server closed without answering") }
    if first.hasPrefix("error ") { throw ToolkitError(String(first.dropFirst(6))) }
    guard first == "ok" else { throw ToolkitError("\(path): the server answered '\(first)', not ok or error") }
    return lines.dropFirst().map { line in
      guard let space = line.firstIndex(of: " ") else { return (line, "") }
      return (String(line[..<space]), String(line[line.index(after: space)...]))
    }
  }

  private static func readLine(_ fd: Int32) -> String? {
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while bytes.count < maximumLine {
      guard case .success(let n) = Sys.read(fd, &byte, 1), n > 0 else { return nil }
      if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
      bytes.append(byte)
    }
    return nil
  }

  /// Percent-encodes spaces, newlines and percent signs, for `key=value`.
  public static func encode(_ value: String) -> String {
    var out: [UInt8] = []
    let hex = Array("0123456789ABCDEF".utf8)
    for u in value.utf8 {
      if u == 0x20 || u == 0x0A || u == 0x0D || u == 0x25 {
        out += [0x25, hex[Int(u >> 4)], hex[Int(u & 15)]]
      } else {
        out.append(u)
      }
    }
    return String(decoding: out, as: UTF8.self)
  }

  public static func decode(_ value: String) -> String {
    var bytes: [UInt8] = []
    var u = Array(value.utf8)[...]
    while let c = u.first {
      u = u.dropFirst()
      if c == 0x25, u.count >= 2, let v = UInt8(String(decoding: u.prefix(2), as: UTF8.self), radix: 16) {
        bytes.append(v)
        u = u.dropFirst(2)
      } else {
        bytes.append(c)
      }
    }
    return String(decoding: bytes, as: UTF8.self)
  }
}

/// What a control request answers.
public struct ControlAnswer: Sendable {
  public var error: String?
  public var fields: [(String, String)]

  public static func ok(_ fields: [(String, String)]) -> ControlAnswer { ControlAnswer(error: nil, fields: fields) }
  public static func error(_ sentence: String) -> ControlAnswer { ControlAnswer(error: sentence, fields: []) }

  var text: String {
    if let error { return "error " + error.replacingNewlines + "\n" }
    return "ok\n" + fields.map { "\($0.0) \($0.1.replacingNewlines)\n" }.joined()
  }
}

extension String {
  fileprivate var replacingNewlines: String {
    String(map { $0 == "\n" ? " " : $0 })
  }
}
