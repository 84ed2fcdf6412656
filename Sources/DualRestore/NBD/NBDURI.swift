// NBD URIs as libnbd and qemu write them: where the server is (TCP or a
// Unix socket), the export's name, and whether the connection runs over TLS.

/// An NBD URI: `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`,
/// and their TLS forms `nbds://` and `nbds+unix://`, which may name the
/// certificate directory as libnbd does: `?tls-certificates=DIR`.
public struct NBDURI: Equatable, Sendable, CustomStringConvertible {
  public enum Endpoint: Equatable, Sendable {
    case tcp(host: String, port: UInt16)
    case unix(path: String)
  }

  public var endpoint: Endpoint
  public var exportName: String
  /// Whether the connection must run over TLS (nbds, nbds+unix).
  public var tls: Bool
  /// DIR with ca-cert.pem (and client-cert.pem, client-key.pem); nil: the
  /// system's CA store.
  public var tlsCertificates: String?
  public let text: String

  public var description: String { text }

  /// Whether `text` looks like an NBD URI rather than a path.
  public static func isURI(_ text: String) -> Bool {
    text.hasPrefix("nbd://") || text.hasPrefix("nbd+unix://") || text.hasPrefix("nbds://")
      || text.hasPrefix("nbds+unix://")
  }

  public init(_ text: String) throws {
    self.text = text
    func fail(_ why: String) -> ToolkitError { ToolkitError("\(text): \(why)") }
    let scheme = ["nbds+unix", "nbd+unix", "nbds", "nbd"].first { text.hasPrefix($0 + "://") } ?? ""
    guard ["nbd", "nbds", "nbd+unix", "nbds+unix"].contains(scheme) else {
      throw fail("not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    }
    tls = scheme.hasPrefix("nbds")
    let isUnix = scheme.hasSuffix("+unix")
    var rest = Substring(text.dropFirst(scheme.count + 3))
    // The query: socket= for Unix sockets, tls-certificates= for TLS.
    var socket: String?
    var certificates: String?
    if let q = rest.firstIndex(of: "?") {
      for pair in rest[rest.index(after: q)...].split(separator: "&") {
        let kv = pair.split(separator: "=", maxSplits: 1)
        let key = String(kv[0])
        let value = kv.count == 2 ? NBDURI.percentDecode(String(kv[1])) : ""
        switch key {
        case "socket": socket = value
        case "tls-certificates": certificates = value
        case "tls-verify-peer", "tls-username", "tls-psk-file", "tls-hostname":
          throw fail("the query parameter \(key) is not supported (only tls-certificates=DIR is)")
        default: break
        }
      }
      rest = rest[..<q]
    }
    if let certificates {
      guard tls else { throw fail("tls-certificates= needs an nbds:// or nbds+unix:// URI") }
      guard !certificates.isEmpty else { throw fail("tls-certificates= names no directory") }
    }
    tlsCertificates = certificates
    if isUnix {
      // An authority is not allowed: nbd+unix:///export?socket=PATH
      guard rest.hasPrefix("/") else { throw fail("expected \(scheme):///EXPORT?socket=PATH") }
      guard let socket, !socket.isEmpty else { throw fail("the socket=PATH query is missing") }
      endpoint = .unix(path: socket)
      exportName = NBDURI.percentDecode(String(rest.dropFirst()))
      return
    }
    let slash = rest.firstIndex(of: "/") ?? rest.endIndex
    var authority = rest[..<slash]
    let export = slash < rest.endIndex ? String(rest[rest.index(after: slash)...]) : ""
    var port = NBD.defaultPort
    var host: Substring
    if authority.hasPrefix("[") {
      guard let close = authority.firstIndex(of: "]") else { throw fail("unclosed [ in the host") }
      host = authority[authority.index(after: authority.startIndex)..<close]
      authority = authority[authority.index(after: close)...]
      if authority.hasPrefix(":") {
        guard let p = UInt16(authority.dropFirst()) else { throw fail("bad port") }
        port = p
      }
    } else if let colon = authority.lastIndex(of: ":") {
      host = authority[..<colon]
      guard let p = UInt16(authority[authority.index(after: colon)...]) else { throw fail("bad port") }
      port = p
    } else {
      host = authority
    }
    guard !host.isEmpty else { throw fail("the host is missing") }
    endpoint = .tcp(host: String(host), port: port)
    exportName = NBDURI.percentDecode(export)
  }

  static func percentDecode(_ s: String) -> String {
    var out: [UInt8] = []
    var bytes = Array(s.utf8)[...]
    while let b = bytes.first {
      bytes = bytes.dropFirst()
      if b == UInt8(ascii: "%"), bytes.count >= 2,
        let v = UInt8(String(decoding: bytes.prefix(2), as: UTF8.self), radix: 16)
      {
        out.append(v)
        bytes = bytes.dropFirst(2)
      } else {
        out.append(b)
      }
    }
    return String(decoding: out, as: UTF8.self)
  }
}
