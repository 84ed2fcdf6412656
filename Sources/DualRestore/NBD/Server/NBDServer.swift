// The server side of NBD, as nbdkit's connections.c: the accept loop,
// the count of connections and a clean stop. Each connection
// (NBDServerConnection.swift) runs the handshake (NBDServerHandshake.swift),
// then transmission with several requests in flight, served concurrently
// (NBDServerTransmission.swift), and its replies (NBDServerReplies.swift).
//
// TLS (NBD_OPT_STARTTLS) is off, offered, or required by `NBDServerOptions`.
// Against hostile or broken clients (`NBDServerOptions`): at most
// `maximumConnections` at once (more are closed at once, with a line in the
// log); the handshake must be over within `handshakeTimeout`, however the
// bytes trickle; a client silent between requests for `idleTimeout` (off by
// default: a mounted disk may be idle for hours) or paused in the middle of
// a request for `stallTimeout` is disconnected, as is one that does not take
// its replies for that long. Request buffers of all connections together
// stay under `maximumBufferedBytes` (a reader waits for room before it
// takes the next READ or WRITE), so memory is bounded whatever clients send;
// a READ or WRITE is at most NBD.maximumPayload (64 MiB) long.

import Dispatch
import Glibc

/// How a server offers TLS.
public enum NBDServerTLS: Sendable {
  case off
  /// Clients may ask for TLS.
  case on(TLSServerContext)
  /// Clients must use TLS before anything else.
  case require(TLSServerContext)

  var context: TLSServerContext? {
    switch self {
    case .off: return nil
    case .on(let c), .require(let c): return c
    }
  }

  var isRequired: Bool {
    if case .require = self { return true }
    return false
  }
}

/// What a server is told beyond its exports. Times are seconds; 0 turns a
/// time limit off.
public struct NBDServerOptions: Sendable {
  public var tls: NBDServerTLS
  /// Connections served at once; more are closed as they arrive.
  public var maximumConnections: Int
  /// From accept to the end of option haggling (TLS handshake included).
  public var handshakeTimeout: Double
  /// Silence between requests in transmission.
  public var idleTimeout: Double
  /// A pause inside a request (its header or WRITE data), or in taking a reply.
  public var stallTimeout: Double
  /// READ and WRITE buffers of all connections together.
  public var maximumBufferedBytes: Int

  public init(
    tls: NBDServerTLS = .off, maximumConnections: Int = 64, handshakeTimeout: Double = 10, idleTimeout: Double = 0,
    stallTimeout: Double = 30, maximumBufferedBytes: Int = 512 << 20
  ) {
    self.tls = tls
    self.maximumConnections = maximumConnections
    self.handshakeTimeout = handshakeTimeout
    self.idleTimeout = idleTimeout
    self.stallTimeout = stallTimeout
    self.maximumBufferedBytes = maximumBufferedBytes
  }
}

public final class NBDServer: Sendable {
  public let exports: [NBDExport]
  public let options: NBDServerOptions
  public let log: @Sendable (String) -> Void
  /// Requests in flight per connection, and the threads serving them.
  public let workersPerConnection: Int
  /// Request buffers, shared by the connections: kept up to 8 MiB each (the
  /// size snapshot and bitmap-diff read in; a buffer made per request would
  /// be faulted in and zeroed every time) and 48 MiB in all, so the server's
  /// memory stays bounded whatever the number of clients.
  let pool = BufferPool(keepCount: 64, keepSize: 8 << 20, keepBytes: 48 << 20)
  private struct Connections {
    var open: [ObjectIdentifier: Socket] = [:]
    var count = 0
    var stopping = false
    var lastRefusalLogged = 0.0
  }
  private let connections = Locked(Connections())
  private let idle = DispatchSemaphore(value: 0)
  let budget: ByteBudget

  public init(
    exports: [NBDExport], workersPerConnection: Int = 16, options: NBDServerOptions = NBDServerOptions(),
    log: @escaping @Sendable (String) -> Void
  ) {
    self.exports = exports
    self.options = options
    self.budget = ByteBudget(limit: max(options.maximumBufferedBytes, NBD.maximumPayload))
    // A client gone in the middle of a reply must fail the send, not kill
    // the process: sendfile(2) has no MSG_NOSIGNAL.
    signal(SIGPIPE, SIG_IGN)
    self.workersPerConnection = workersPerConnection
    self.log = log
  }

  /// Accepts connections until `stop()`; each is served on its own threads.
  public func serve(_ listener: Listener) {
    while true {
      let socket: Socket
      do {
        socket = try listener.accept()
      } catch {
        if isStopping { return }
        log("\(error)")
        usleep(100_000)
        continue
      }
      if isStopping {
        socket.shutdown()
        return
      }
      // nil when admitted; else whether to log the refusal, and how many are open.
      let refusal = connections.withLock { c -> (say: Bool, open: Int)? in
        if c.count >= max(1, options.maximumConnections) {
          let now = monotonicSeconds()
          let say = now - c.lastRefusalLogged >= 1
          if say { c.lastRefusalLogged = now }
          return (say, c.count)
        }
        c.open[ObjectIdentifier(socket)] = socket
        c.count += 1
        return nil
      }
      if let refusal {
        // Closed before the greeting: the client sees the connection end.
        socket.shutdown()
        if refusal.say { log("refused a connection: \(refusal.open) connections are open, the most allowed") }
        continue
      }
      startThread { [self] in
        NBDServerConnection(server: self, transport: socket).run()
        let last = connections.withLock { c in
          c.open[ObjectIdentifier(socket)] = nil
          c.count -= 1
          // Only a stop waits for the last connection: a signal while serving
          // would be left over and let a later stop return too early.
          return c.count == 0 && c.stopping
        }
        if last { idle.signal() }
      }
    }
  }

  var isStopping: Bool { connections.withLock { $0.stopping } }

  /// Makes `serve` return: no new connections are accepted.
  public func beginStop(_ listener: Listener) {
    connections.withLock { $0.stopping = true }
    listener.shutdown()
  }

  /// Stops serving: open connections are shut down once their requests in
  /// flight are answered; returns when all have ended.
  public func stop() {
    let (open, count) = connections.withLock { c in
      c.stopping = true
      return (Array(c.open.values), c.count)
    }
    for s in open { s.shutdown() }
    if count > 0 { idle.wait() }
  }

  /// Serves one connection on the calling thread, outside the count of
  /// connections: for a transport in memory (the fuzz targets).
  package func serve(_ transport: MemoryTransport) {
    NBDServerConnection(server: self, transport: transport).run()
  }

  /// Whether a name would find an export, without binding it (binding may
  /// act: a merge export admits a stream).
  func hasExport(named name: String) -> Bool {
    name.isEmpty
      ? exports.contains { $0.isOffered }
      : exports.contains { name == $0.name || name.hasPrefix($0.name + ";") }
  }

  /// The export for a client's name, or why not.
  func export(named name: String) -> Result<NBDExport, NBDError> {
    let candidate =
      name.isEmpty
      ? exports.first { $0.isOffered }
      : exports.first { name == $0.name || name.hasPrefix($0.name + ";") }
    guard let candidate else {
      return .failure(NBDError(NBD.repErrUnknown, "no export named '\(name)'"))
    }
    do {
      return .success(try candidate.bind(name: name))
    } catch let e as NBDError {
      return .failure(NBDError(NBD.repErrPolicy, e.message))
    } catch {
      return .failure(NBDError(NBD.repErrPolicy, "\(error)"))
    }
  }
}
