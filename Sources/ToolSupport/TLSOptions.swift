// The TLS options of a tool that serves NBD: --tls, --tls-certificates and
// --tls-verify-peer, as nbdkit spells them.

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
