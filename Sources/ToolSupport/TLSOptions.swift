// The options of a tool that serves NBD: TLS (--tls, --tls-certificates and
// --tls-verify-peer, as nbdkit spells them) and the limits that protect the
// server from hostile or broken clients.

import ArgumentParser
import DualRestore

public struct TLSOptions: ParsableArguments {
  /// off, on (offered) or require.
  public enum Mode: String, ExpressibleByArgument, CaseIterable, Sendable {
    case off, on, require
  }

  @Option(
    help: ArgumentHelp(
      "Offer NBD over TLS to clients that ask (on), demand it (require), or not (off).", valueName: "mode"))
  public var tls: Mode = .off

  @Option(
    help: ArgumentHelp(
      "Directory with ca-cert.pem, server-cert.pem and server-key.pem (the key mode 0600 or 0640).",
      valueName: "dir"),
    completion: .directory)
  public var tlsCertificates: String?

  @Flag(help: "Accept only clients with a certificate signed by the directory's ca-cert.pem.")
  public var tlsVerifyPeer = false

  public init() {}

  public func validate() throws {
    if tls == .off {
      if tlsCertificates != nil { throw ValidationError("--tls-certificates needs --tls on or --tls require") }
      if tlsVerifyPeer { throw ValidationError("--tls-verify-peer needs --tls on or --tls require") }
    } else if tlsCertificates == nil {
      throw ValidationError("--tls \(tls.rawValue) needs --tls-certificates DIR")
    }
  }

  /// The server's TLS setting, its certificates loaded (errors name the file).
  public func serverTLS() throws -> NBDServerTLS {
    guard tls != .off, let directory = tlsCertificates else { return .off }
    let context = try TLSServerContext(directory: directory, verifyPeer: tlsVerifyPeer)
    return tls == .require ? .require(context) : .on(context)
  }
}

/// --max-connections, --handshake-timeout, --idle-timeout, --stall-timeout.
public struct ServerLimitOptions: ParsableArguments {
  @Option(help: ArgumentHelp("Clients served at once; more are disconnected as they arrive.", valueName: "n"))
  public var maxConnections: Int = 64

  @Option(
    help: ArgumentHelp(
      "Seconds a client has to finish the NBD handshake (TLS included; 0: no limit).", valueName: "seconds"))
  public var handshakeTimeout: Double = 10

  @Option(
    help: ArgumentHelp(
      "Disconnect a client silent this many seconds between requests (0: never, as a mounted disk may idle).",
      valueName: "seconds"))
  public var idleTimeout: Double = 0

  @Option(
    help: ArgumentHelp(
      "Disconnect a client that pauses this many seconds inside a request or in taking a reply (0: never).",
      valueName: "seconds"))
  public var stallTimeout: Double = 30

  public init() {}

  public func validate() throws {
    guard (1...4096).contains(maxConnections) else {
      throw ValidationError("--max-connections must be between 1 and 4096")
    }
    for (name, value) in [
      ("--handshake-timeout", handshakeTimeout), ("--idle-timeout", idleTimeout), ("--stall-timeout", stallTimeout),
    ] where !(value >= 0 && value <= 86400) {
      throw ValidationError("\(name) must be between 0 and 86400 seconds")
    }
  }

  /// The server options with these limits and `tls`.
  public func serverOptions(tls: NBDServerTLS) -> NBDServerOptions {
    NBDServerOptions(
      tls: tls, maximumConnections: maxConnections, handshakeTimeout: handshakeTimeout, idleTimeout: idleTimeout,
      stallTimeout: stallTimeout)
  }
}
