// What the servers share: where they listen, and a clean stop on a signal.

import ArgumentParser
import DualRestore
import Glibc

/// `--socket PATH` or `--listen HOST:PORT`: where a server listens.
public struct ListenOptions: ParsableArguments {
  @Option(help: ArgumentHelp("Serve on this Unix socket.", valueName: "path"))
  public var socket: String?

  @Option(help: ArgumentHelp("Serve on TCP HOST:PORT (HOST defaults to 127.0.0.1).", valueName: "host:port"))
  public var listen: String?

  public init() {}

  public func validate() throws {
    if (socket == nil) == (listen == nil) {
      throw ValidationError("give exactly one of --socket PATH and --listen HOST:PORT")
    }
  }

  /// Creates the listener: a Unix socket of mode 0600, or TCP (HOST
  /// defaults to 127.0.0.1; an IPv6 address goes in brackets).
  public func listener() throws -> Listener {
    if let socket { return try Listener(unixPath: socket) }
    let text = listen ?? ""
    guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
      throw ToolkitError("--listen takes HOST:PORT, not '\(text)'")
    }
    var host = String(text[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return try Listener(host: host, port: port)
  }
}

/// SIGINT and SIGTERM, turned into a clean stop. Create it before starting
/// any thread: it blocks them in the creating thread, and every thread
/// started afterwards inherits that, so only the thread of `onSignal` takes
/// them. SIGPIPE is ignored: a client gone is an error on its socket, not
/// the end of the server.
public struct StopSignals: Sendable {
  private let signals: sigset_t

  public init() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    signal(SIGPIPE, SIG_IGN)
    signals = set
  }

  /// Runs `stop` on a thread of its own when a signal arrives.
  public func onSignal(_ stop: @escaping @Sendable (Int32) -> Void) {
    let waitFor = signals
    startThread {
      var set = waitFor
      var received: Int32 = 0
      sigwait(&set, &received)
      stop(received)
    }
  }
}
