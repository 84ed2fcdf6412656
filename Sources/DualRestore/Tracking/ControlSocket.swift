// The control channel of a running server: a Unix socket taking request
// lines and answering each with lines of text.
//
// Request:  a command and its arguments, separated by spaces, then "\n";
//           an argument holding spaces is not needed (paths are sent as
//           `key=value` with the value percent-encoded).
// Answer:   "ok\n" or "error SENTENCE\n", then "KEY VALUE\n" lines, then
//           an empty line ("\n"): the end of the answer.
//
// Framing: a connection carries one request, answered, then the server
// closes it — except a connection whose first request is `hold`. That one
// is a session: after `hold` is answered the server reads further requests
// on it, one at a time, each answered in full before the next is read,
// until `release` (answered, then closed), the client's close, or the
// hold's limit. So a client sends a request only after the answer to the
// previous one, reads up to the empty line, and may send the next on the
// same connection only while it holds. (Clients that read up to the close
// — this toolkit's one-request clients of earlier versions — get the same
// lines, the empty one last.)
//
// Connections are served each on a thread of its own (at most
// `maximumConnections` at once; more are refused with a sentence), so that
// `status` is answered while another connection holds writes.

import Glibc

public enum ControlSocket {
  public static let maximumLine = 64 << 10
  /// Connections served at once; a request beyond is answered with an error.
  public static let maximumConnections = 16

  /// Serves `listener` until the returned server is stopped: each
  /// connection on its own thread, handed to `handler`, closed when the
  /// handler returns.
  public static func serve(
    _ listener: Listener, handler: @escaping @Sendable (ControlChannel) -> Void
  ) -> ControlServer {
    let server = ControlServer(listener)
    startThread {
      while true {
        guard let socket = try? listener.accept() else { return }
        let channel = ControlChannel(socket)
        if let refusal = server.admit(channel) {
          socket.setTimeout(1)
          try? channel.send(.error(refusal))
          socket.shutdown()
          continue
        }
        startThread {
          handler(channel)
          channel.close()
          server.leave(channel)
        }
      }
    }
    return server
  }

  /// Sends one request to the control socket at `path` and returns the
  /// answer's fields; throws the server's sentence when it says error.
  public static func request(_ path: String, _ words: [String], timeout: Double = 600) throws -> [(String, String)] {
    let connection = try ControlConnection(path: path, timeout: timeout)
    return try connection.request(words)
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

  /// Parses `key=value` arguments (values percent-decoded); a word that is
  /// not KEY=VALUE is an error sentence.
  public static func arguments(_ words: ArraySlice<String>) -> Result<[String: String], ToolkitError> {
    var arguments: [String: String] = [:]
    for w in words {
      guard let eq = w.firstIndex(of: "=") else { return .failure(ToolkitError("'\(w)' is not KEY=VALUE")) }
      arguments[String(w[..<eq])] = decode(String(w[w.index(after: eq)...]))
    }
    return .success(arguments)
  }
}

/// The running control server: its listener and the connections open.
// @unchecked Sendable: `open` and `stopping` are behind `lock`.
public final class ControlServer: @unchecked Sendable {
  private let listener: Listener
  private let lock = Monitor()
  private var open: [ObjectIdentifier: ControlChannel] = [:]
  private var stopping = false

  init(_ listener: Listener) { self.listener = listener }

  /// Admits `c`, or says why not.
  fileprivate func admit(_ c: ControlChannel) -> String? {
    lock.withLock {
      if stopping { return "the server is stopping" }
      if open.count >= ControlSocket.maximumConnections {
        return "\(ControlSocket.maximumConnections) control connections are open already; try again"
      }
      open[ObjectIdentifier(c)] = c
      return nil
    }
  }

  fileprivate func leave(_ c: ControlChannel) {
    _ = lock.withLock { open.removeValue(forKey: ObjectIdentifier(c)) }
  }

  /// Stops accepting and shuts every open connection down: a session
  /// holding writes sees its client gone and releases them.
  public func beginStop() {
    let channels = lock.withLock { () -> [ControlChannel] in
      stopping = true
      return Array(open.values)
    }
    listener.shutdown()
    for c in channels { c.socket.shutdown() }
  }
}

/// One connection to the control socket, server side: request lines in,
/// answers out.
public final class ControlChannel: Sendable {
  let socket: Socket

  init(_ socket: Socket) {
    self.socket = socket
    socket.setWriteTimeout(10)
  }

  public enum Request {
    case words([String])
    /// The client closed the connection (or it failed).
    case closed
    /// Nothing came within the time given.
    case timedOut
    /// A line longer than `maximumLine`.
    case tooLong
  }

  /// The next request line, waiting at most `timeout` seconds for it.
  /// Read a byte at a time: nothing past the line is consumed.
  public func next(timeout: Double) -> Request {
    let deadline = monotonicSeconds() + timeout
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while bytes.count < ControlSocket.maximumLine {
      var p = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
      switch Sys.poll(&p, limit: { max(0.001, deadline - monotonicSeconds()) }) {
      case .success(0): return .timedOut
      case .success: break
      case .failure: return .closed
      }
      guard case .success(let n) = Sys.read(socket.fd, &byte, 1), n > 0 else { return .closed }
      if byte == UInt8(ascii: "\n") {
        return .words(String(decoding: bytes, as: UTF8.self).split(separator: " ").map(String.init))
      }
      bytes.append(byte)
    }
    return .tooLong
  }

  /// Sends a whole answer, ended by its empty line.
  public func send(_ answer: ControlAnswer) throws {
    try socket.write(Array(answer.text.utf8))
  }

  func close() { socket.shutdown() }
}

/// A connection to a server's control socket, client side: requests sent
/// one at a time, each answer read up to its empty line.
// @unchecked Sendable: used by one thread at a time (the coordinator's, or
// a group's device thread of a phase, joined before the next).
public final class ControlConnection: @unchecked Sendable {
  public let path: String
  private let socket: Socket
  private var pending: [UInt8] = []
  /// Set when a request could not be sent or its answer not read in full:
  /// the connection is of no further use.
  public private(set) var isBroken = false

  /// Connects to the control socket at `path`; every read and write may
  /// then wait up to `timeout` seconds.
  public init(path: String, timeout: Double) throws {
    self.path = path
    do {
      socket = try Socket.connect(.unix(path: path), timeout: 5)
    } catch {
      throw ToolkitError("\(path): no server answers on this control socket (\(error))")
    }
    socket.setTimeout(timeout)
  }

  /// Sends `words` and returns the answer's fields; throws the server's
  /// sentence when it says error, and a sentence naming the socket when
  /// the connection fails.
  public func request(_ words: [String]) throws -> [(String, String)] {
    try send(words)
    return try receive(words)
  }

  /// Sends `words` without waiting for the answer, which `receive(words)`
  /// reads: several servers' requests are then in flight at once.
  public func send(_ words: [String]) throws {
    guard !isBroken else { throw ToolkitError("\(path): the connection failed earlier") }
    // Broken until the answer is read in full.
    isBroken = true
    do {
      try socket.write(Array((words.joined(separator: " ") + "\n").utf8))
    } catch {
      throw ToolkitError("\(path): the request '\(words.first ?? "")' could not be sent (\(error))")
    }
  }

  /// Reads the answer to `words`, sent by `send`: its fields, or the
  /// server's sentence thrown when it says error.
  public func receive(_ words: [String]) throws -> [(String, String)] {
    var lines: [String] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    answer: while true {
      while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
        let line = String(decoding: pending[..<nl], as: UTF8.self)
        pending.removeSubrange(...nl)
        if line.isEmpty { break answer }
        lines.append(line)
      }
      if pending.count >= ControlSocket.maximumLine { break }
      let got = chunk.withUnsafeMutableBytes { Sys.read(socket.fd, $0.baseAddress!, $0.count) }
      switch got {
      case .success(let n) where n > 0: pending += chunk[0..<n]
      case .success: break answer
      case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EWOULDBLOCK:
        throw ToolkitError("\(path): no answer to '\(words.first ?? "")' in time")
      case .failure(let e): throw ToolkitError("\(path): reading the answer failed: \(e)")
      }
    }
    guard let first = lines.first else {
      throw ToolkitError("\(path): the server closed without answering '\(words.first ?? "")'")
    }
    isBroken = false
    if first.hasPrefix("error ") { throw ToolkitError(String(first.dropFirst(6))) }
    guard first == "ok" else { throw ToolkitError("\(path): the server answered '\(first)', not ok or error") }
    return lines.dropFirst().map { line in
      guard let space = line.firstIndex(of: " ") else { return (line, "") }
      return (String(line[..<space]), String(line[line.index(after: space)...]))
    }
  }

  /// Closes the connection (a hold it kept ends with it).
  public func close() { socket.shutdown() }
}

/// What a control request answers.
public struct ControlAnswer: Sendable {
  public var error: String?
  public var fields: [(String, String)]

  public static func ok(_ fields: [(String, String)]) -> ControlAnswer { ControlAnswer(error: nil, fields: fields) }
  public static func error(_ sentence: String) -> ControlAnswer { ControlAnswer(error: sentence, fields: []) }

  var text: String {
    if let error { return "error " + error.replacingNewlines + "\n\n" }
    return "ok\n" + fields.map { "\($0.0) \($0.1.replacingNewlines)\n" }.joined() + "\n"
  }
}

extension String {
  fileprivate var replacingNewlines: String {
    String(map { $0 == "\n" ? " " : $0 })
  }
}
