// One client connection of an NBD server: the handshake under its time
// limit, then transmission under the idle and stall limits, and the one
// line in the log when it ends for a reason worth one. A client that goes
// away between requests ends normally. Over TLS, close_notify goes out
// before the descriptor closes.

final class NBDServerConnection: Sendable {
  let server: NBDServer
  let transport: NBDTransport

  init(server: NBDServer, transport: NBDTransport) {
    self.server = server
    self.transport = transport
  }

  func run() {
    defer { transport.shutdown() }
    let options = server.options
    do {
      if options.handshakeTimeout > 0 {
        transport.setTimeout(options.handshakeTimeout)
        transport.deadline = monotonicSeconds() + options.handshakeTimeout
      }
      let session: NBDServerSession
      do {
        var handshake = NBDServerHandshake(server: server, transport: transport)
        guard let agreed = try handshake.run() else { return }
        session = agreed
      } catch let e as ToolkitError where e.cause == .timedOut {
        throw ToolkitError(
          "\(transport.peer): the handshake took longer than \(Socket.seconds(options.handshakeTimeout)) s; disconnected"
        )
      }
      // Transmission: waits wake up at the shorter limit to check both.
      transport.deadline = 0
      let limits = [options.idleTimeout, options.stallTimeout].filter { $0 > 0 }
      transport.setReadTimeout(limits.min() ?? 0)
      transport.setWriteTimeout(max(0, options.stallTimeout))
      try NBDServerTransmission(server: server, transport: transport, session: session).run()
    } catch {
      if let e = error as? ToolkitError, e.cause == .connectionClosed { return }
      if !server.isStopping { server.log("connection ended: \(error)") }
    }
  }
}
