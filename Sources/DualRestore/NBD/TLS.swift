// NBD over TLS with OpenSSL's libssl: the server's and the client's
// certificates, and the session a connection runs through after
// NBD_OPT_STARTTLS.
//
// Certificates come from a directory laid out as nbdkit and qemu expect:
// ca-cert.pem, server-cert.pem and server-key.pem for a server;
// ca-cert.pem and, optionally, client-cert.pem and client-key.pem for a
// client. TLS 1.2 is the minimum; 1.3 is negotiated when both sides have it.
//
// Concurrency: an SSL object must not be used by two threads at once, yet a
// connection has one thread reading and others writing. The socket is made
// non-blocking and every SSL call runs under one short lock; a call that
// would block (WANT_READ, WANT_WRITE) lets the lock go and waits in poll(2)
// outside it, so a reader waiting for the next request never holds up a
// reply being written. Whole messages are serialised by a second lock, and a
// small header is sent in the same record as the start of its payload.

import COpenSSL
import Glibc

/// Whether a server offers TLS: not at all, to clients that ask, or to
/// every client (nothing but NBD_OPT_STARTTLS and NBD_OPT_ABORT before it).
public enum TLSMode: String, Sendable, CaseIterable {
  case off, on, require
}

enum TLSText {
  /// The reasons on OpenSSL's error queue (of this thread), which is emptied.
  static func drainErrors() -> String {
    var reasons: [String] = []
    while true {
      let e = ERR_get_error()
      if e == 0 { break }
      if let r = ERR_reason_error_string(e) {
        let text = String(cString: r)
        if !reasons.contains(text) { reasons.append(text) }
      } else {
        reasons.append("error 0x\(String(e, radix: 16))")
      }
    }
    return reasons.joined(separator: "; ")
  }

  static func verifyText(_ result: Int) -> String {
    String(cString: X509_verify_cert_error_string(result))
  }
}

/// Files of a certificate directory, checked before OpenSSL reads them so
/// that a missing or unsafe file is named in one sentence.
enum TLSFiles {
  static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

  static func requireReadable(_ path: String, _ what: String) throws {
    if access(path, R_OK) != 0 { throw ToolkitError.path(path, "cannot read the \(what): \(Errno.current)") }
  }

  /// A private key must not be readable or writable by every user; a group
  /// (for example the group a hypervisor runs as) may read it.
  static func requirePrivate(_ path: String) throws {
    try requireReadable(path, "private key")
    var st = stat()
    guard stat(path, &st) == 0 else { throw ToolkitError.path(path, "cannot read the private key: \(Errno.current)") }
    if st.st_mode & (S_IROTH | S_IWOTH) != 0 {
      let mode = String(st.st_mode & 0o777, radix: 8)
      throw ToolkitError.path(
        path, "the private key is open to every user (mode 0\(mode)); make it mode 0600 or 0640")
    }
  }

  static func loadKeyPair(_ context: OpaquePointer, certificate: String, key: String) throws {
    try requireReadable(certificate, "certificate")
    try requirePrivate(key)
    ERR_clear_error()
    guard SSL_CTX_use_certificate_chain_file(context, certificate) == 1 else {
      throw ToolkitError.path(certificate, "not a usable PEM certificate (\(TLSText.drainErrors()))")
    }
    guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
      throw ToolkitError.path(key, "not a usable unencrypted PEM private key (\(TLSText.drainErrors()))")
    }
    guard SSL_CTX_check_private_key(context) == 1 else {
      throw ToolkitError.path(key, "does not match the certificate \(certificate)")
    }
  }

  static func loadCA(_ context: OpaquePointer, _ path: String) throws {
    try requireReadable(path, "CA certificate")
    ERR_clear_error()
    guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
      throw ToolkitError.path(path, "not a usable PEM CA certificate (\(TLSText.drainErrors()))")
    }
  }

  /// A context with the settings both sides share.
  static func newContext(_ method: OpaquePointer?) throws -> OpaquePointer {
    guard let context = SSL_CTX_new(method) else {
      throw ToolkitError("cannot set up TLS: \(TLSText.drainErrors())")
    }
    _ = dr_ssl_ctx_set_min_proto_version(context, dr_tls1_2_version())
    _ = SSL_CTX_set_options(context, dr_ssl_options_nbd())
    _ = dr_ssl_ctx_set_mode(context, dr_ssl_mode_nbd())
    _ = dr_ssl_ctx_set_read_ahead(context, 1)
    // An encrypted key fails to load instead of prompting on the terminal.
    SSL_CTX_set_default_passwd_cb(context) { _, _, _, _ in 0 }
    return context
  }
}

/// A server's certificate, key and (with peer verification) CA, loaded
/// once and shared by every connection.
// @unchecked Sendable: set up by init and never changed; OpenSSL allows an SSL_CTX to be shared by threads.
public final class TLSServerContext: @unchecked Sendable {
  let context: OpaquePointer
  public let directory: String
  public let verifiesPeer: Bool

  /// Loads DIR/server-cert.pem and DIR/server-key.pem; with `verifyPeer`,
  /// clients must present a certificate signed by DIR/ca-cert.pem.
  public init(directory: String, verifyPeer: Bool) throws {
    var st = stat()
    guard stat(directory, &st) == 0 else {
      throw ToolkitError.path(directory, "cannot read the TLS certificate directory: \(Errno.current)")
    }
    guard st.st_mode & S_IFMT == S_IFDIR else {
      throw ToolkitError.path(directory, "is not a directory (the TLS certificates are read from a directory)")
    }
    let context = try TLSFiles.newContext(TLS_server_method())
    do {
      try TLSFiles.loadKeyPair(
        context, certificate: directory + "/server-cert.pem", key: directory + "/server-key.pem")
      if verifyPeer {
        let ca = directory + "/ca-cert.pem"
        try TLSFiles.loadCA(context, ca)
        if let names = SSL_load_client_CA_file(ca) { SSL_CTX_set_client_CA_list(context, names) }
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
      }
      // No session tickets: nothing is written on a connection but replies.
      _ = SSL_CTX_set_num_tickets(context, 0)
    } catch {
      SSL_CTX_free(context)
      throw error
    }
    self.context = context
    self.directory = directory
    self.verifiesPeer = verifyPeer
  }

  deinit { SSL_CTX_free(context) }

  /// Runs the server side of the TLS handshake on `socket`.
  func accept(_ socket: Socket, timeout: Double) throws {
    guard let ssl = SSL_new(context) else { throw ToolkitError("\(socket.peer): TLS: \(TLSText.drainErrors())") }
    SSL_set_accept_state(ssl)
    let session = try TLSSession(ssl: ssl, socket: socket)
    do {
      try session.handshake(timeout: timeout)
    } catch let e as TLSSession.HandshakeFailure {
      let result = SSL_get_verify_result(ssl)
      if verifiesPeer && result != X509_V_OK {
        throw ToolkitError(
          "\(socket.peer): TLS handshake failed: the client's certificate was not accepted (\(TLSText.verifyText(result)))"
        )
      }
      throw ToolkitError("\(socket.peer): TLS handshake failed: \(e.reason)", cause: e.timedOut ? .timedOut : nil)
    }
    socket.tls = session
  }
}

/// What a client trusts and shows: the CA (DIR/ca-cert.pem, or the
/// system's store) and, when DIR has them, client-cert.pem and client-key.pem.
// @unchecked Sendable: set up by init and never changed; OpenSSL allows an SSL_CTX to be shared by threads.
public final class TLSClientContext: @unchecked Sendable {
  let context: OpaquePointer
  public let directory: String?

  public init(certificates directory: String?) throws {
    let context = try TLSFiles.newContext(TLS_client_method())
    do {
      if let directory {
        var st = stat()
        guard stat(directory, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
          throw ToolkitError.path(directory, "cannot read the TLS certificate directory: \(Errno(ENOTDIR))")
        }
        try TLSFiles.loadCA(context, directory + "/ca-cert.pem")
        let cert = directory + "/client-cert.pem"
        let key = directory + "/client-key.pem"
        switch (TLSFiles.exists(cert), TLSFiles.exists(key)) {
        case (true, true): try TLSFiles.loadKeyPair(context, certificate: cert, key: key)
        case (true, false): throw ToolkitError.path(key, "is missing (client-cert.pem needs its key)")
        case (false, true): throw ToolkitError.path(cert, "is missing (client-key.pem needs its certificate)")
        case (false, false): break
        }
      } else if SSL_CTX_set_default_verify_paths(context) != 1 {
        throw ToolkitError("cannot load the system's CA certificates: \(TLSText.drainErrors())")
      }
      SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
    } catch {
      SSL_CTX_free(context)
      throw error
    }
    self.context = context
    self.directory = directory
  }

  deinit { SSL_CTX_free(context) }

  /// Runs the client side of the TLS handshake on `socket`; `host` (for TCP)
  /// must be named by the server's certificate.
  func connect(_ socket: Socket, host: String?, timeout: Double) throws {
    guard let ssl = SSL_new(context) else { throw ToolkitError("TLS: \(TLSText.drainErrors())") }
    SSL_set_connect_state(ssl)
    if let host {
      let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
      if TLSClientContext.isAddress(bare) {
        _ = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), bare)
      } else {
        _ = SSL_set1_host(ssl, bare)
        _ = dr_ssl_set_sni(ssl, bare)
      }
    }
    let session = try TLSSession(ssl: ssl, socket: socket)
    do {
      try session.handshake(timeout: timeout)
    } catch let e as TLSSession.HandshakeFailure {
      let result = SSL_get_verify_result(ssl)
      if result != X509_V_OK {
        throw ToolkitError(
          "the server's TLS certificate was not accepted (\(TLSText.verifyText(result)))")
      }
      throw ToolkitError("the TLS handshake failed (\(e.reason))", cause: e.timedOut ? .timedOut : nil)
    }
    socket.tls = session
  }

  static func isAddress(_ text: String) -> Bool {
    var v4 = in_addr()
    var v6 = in6_addr()
    return inet_pton(AF_INET, text, &v4) == 1 || inet_pton(AF_INET6, text, &v6) == 1
  }
}

/// Sockets are attached to SSL objects through a BIO that sends with
/// MSG_NOSIGNAL (made once, never freed).
nonisolated(unsafe) private let socketMethod: OpaquePointer? = dr_bio_method_new()

/// One TLS connection over a socket's (now non-blocking) descriptor.
// @unchecked Sendable: the SSL object is used only under `sslLock`, the staging buffer only under `writeLock`.
final class TLSSession: @unchecked Sendable {
  struct HandshakeFailure: Error {
    let reason: String
    var timedOut = false
  }
  /// A wait for the socket ran out of time.
  struct TimedOut: Error {}
  /// An SSL call or a wait failed: OpenSSL's reasons (`tls`) or the system's.
  struct CallFailure: Error {
    let reason: String
    let tls: Bool

    /// The sentence for the connection to `peer`.
    func error(_ peer: String) -> ToolkitError { ToolkitError("\(peer): \(tls ? "TLS: " : "")\(reason)") }
  }

  private let ssl: OpaquePointer
  private let fd: Int32
  private let peer: String
  private unowned let socket: Socket
  /// Guards every SSL call on `ssl`; never held while waiting for the socket.
  private let sslLock = Locked<Void>(())
  /// Serialises whole messages and guards `staging`.
  private let writeLock = Locked<Void>(())
  /// A header and the start of its payload go out in one record.
  private let staging: UnsafeMutableRawPointer
  static let recordSize = 16384

  init(ssl: OpaquePointer, socket: Socket) throws {
    let fd = socket.fd
    let flags = fcntl(fd, F_GETFL)
    guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0, let method = socketMethod,
      dr_ssl_attach(ssl, method, fd) == 1
    else {
      SSL_free(ssl)
      throw ToolkitError("\(socket.peer): cannot start TLS: \(Errno.current)")
    }
    self.ssl = ssl
    self.fd = fd
    self.peer = socket.peer
    self.socket = socket
    staging = UnsafeMutableRawPointer.allocate(byteCount: TLSSession.recordSize, alignment: 64)
  }

  deinit {
    SSL_free(ssl)
    staging.deallocate()
  }

  func handshake(timeout: Double) throws {
    do {
      _ = try drive(timeout: timeout) { SSL_do_handshake($0) }
    } catch is TimedOut {
      throw HandshakeFailure(reason: "timed out", timedOut: true)
    } catch let e as CallFailure {
      throw HandshakeFailure(reason: e.reason)
    }
  }

  /// The negotiated protocol and cipher, for the log.
  var summary: String {
    let version = SSL_get_version(ssl).map { String(cString: $0) } ?? "?"
    let cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(ssl)).map { String(cString: $0) } ?? "?"
    return "\(version) \(cipher)"
  }

  /// Reads exactly `count` bytes, as `Socket.read`.
  func read(into buffer: UnsafeMutableRawPointer, count: Int) throws {
    try transferAll(count, most: Int(Int32.max), timeout: socket.readTimeout) {
      SSL_read($0, buffer + $1, $2)
    }
  }

  /// As `Socket.readRequest`: pauses are checked when a wait of the read
  /// timeout ends.
  func readRequest(
    into buffer: UnsafeMutableRawPointer, count: Int, midRequest: Bool, idleLimit: Double, stallLimit: Double
  ) throws {
    var done = 0
    var waitingSince = 0.0
    while done < count {
      let chunk = Int32(min(count - done, Int(Int32.max)))
      let n: Int32
      do {
        n = try drive(timeout: socket.readTimeout) { SSL_read($0, buffer + done, chunk) }
      } catch is TimedOut {
        let now = monotonicSeconds()
        if waitingSince == 0 { waitingSince = now - socket.readTimeout }
        try socket.checkPause(
          now - waitingSince, begun: midRequest || done > 0, idleLimit: idleLimit, stallLimit: stallLimit)
        continue
      } catch let e as CallFailure {
        throw e.error(peer)
      }
      if n <= 0 { throw Socket.closed(peer) }
      done += Int(n)
      waitingSince = 0
    }
  }

  /// Writes `first` and then `second` as one message: no other message
  /// starts in between.
  func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer?) throws {
    try writeLock.withLock { _ in
      let firstCount = first.count
      let secondCount = second?.count ?? 0
      if firstCount > 0 && firstCount < TLSSession.recordSize && secondCount > 0, let s = second?.baseAddress {
        let lead = min(secondCount, TLSSession.recordSize - firstCount)
        staging.copyMemory(from: first.baseAddress!, byteCount: firstCount)
        (staging + firstCount).copyMemory(from: s, byteCount: lead)
        try writeAll(UnsafeRawPointer(staging), firstCount + lead)
        if secondCount > lead { try writeAll(s + lead, secondCount - lead) }
        return
      }
      if let f = first.baseAddress, firstCount > 0 { try writeAll(f, firstCount) }
      if let s = second?.baseAddress, secondCount > 0 { try writeAll(s, secondCount) }
    }
  }

  func write(_ buffer: UnsafeRawPointer, count: Int) throws {
    try writeLock.withLock { _ in try writeAll(buffer, count) }
  }

  /// The TLS write loop: SSL_write until all of `count` bytes are written.
  private func writeAll(_ buffer: UnsafeRawPointer, _ count: Int) throws {
    try transferAll(count, most: 1 << 30, timeout: socket.writeTimeout) {
      SSL_write($0, buffer + $1, $2)
    }
  }

  /// Runs `call(ssl, done, chunk)` (SSL_read or SSL_write of `chunk` bytes,
  /// at most `most`, from `done` bytes in) until all of `count` are moved.
  /// Errors as a plain socket's: a wait past `timeout` throws with cause
  /// .timedOut, a peer gone away .connectionClosed.
  @inline(__always)
  private func transferAll(
    _ count: Int, most: Int, timeout: Double, _ call: (OpaquePointer, Int, Int32) -> Int32
  ) throws {
    var done = 0
    while done < count {
      let chunk = Int32(min(count - done, most))
      let n: Int32
      do {
        n = try drive(timeout: timeout) { [done] in call($0, done, chunk) }
      } catch is TimedOut {
        throw Socket.timedOut(peer)
      } catch let e as CallFailure {
        throw e.error(peer)
      }
      if n <= 0 { throw Socket.closed(peer) }
      done += Int(n)
    }
  }

  /// Sends close_notify if it can without waiting; the socket is shut down
  /// by the caller.
  func closeNotify() {
    sslLock.withLock { _ in
      ERR_clear_error()
      if SSL_is_init_finished(ssl) == 1 { _ = SSL_shutdown(ssl) }
      ERR_clear_error()
    }
  }

  /// Runs one SSL call until it completes: under the lock, and waiting for
  /// the socket outside it. Returns the call's result, or 0 when the peer
  /// closed the connection; throws TimedOut or CallFailure. An interrupted
  /// send or receive never shows here: the socket BIO reports EINTR as a
  /// retry (WANT_READ, WANT_WRITE), and the wait is `Sys.poll`.
  @inline(__always)
  private func drive(timeout: Double, _ call: (OpaquePointer) -> Int32) throws -> Int32 {
    while true {
      let (rc, kind, savedErrno, detail) = sslLock.withLock { _ -> (Int32, Int32, Int32, String) in
        ERR_clear_error()
        let rc = call(ssl)
        let kind = rc > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl, rc)
        let savedErrno = errno
        var detail = ""
        if kind == SSL_ERROR_SSL || kind == SSL_ERROR_SYSCALL { detail = TLSText.drainErrors() }
        return (rc, kind, savedErrno, detail)
      }
      switch kind {
      case SSL_ERROR_NONE: return rc
      case SSL_ERROR_WANT_READ: try wait(for: Int16(POLLIN), timeout: timeout)
      case SSL_ERROR_WANT_WRITE: try wait(for: Int16(POLLOUT), timeout: timeout)
      case SSL_ERROR_ZERO_RETURN: return 0
      case SSL_ERROR_SYSCALL:
        if !detail.isEmpty { throw CallFailure(reason: detail, tls: true) }
        if savedErrno == 0 || savedErrno == EPIPE || savedErrno == ECONNRESET { return 0 }
        throw CallFailure(reason: Errno(savedErrno).description, tls: false)
      default:
        throw CallFailure(reason: detail.isEmpty ? "error \(kind)" : detail, tls: true)
      }
    }
  }

  /// Waits until the socket is ready; `timeout` 0 waits without a limit
  /// (but never past the socket's deadline).
  private func wait(for events: Int16, timeout: Double) throws {
    var p = pollfd(fd: fd, events: events, revents: 0)
    let waited = try Sys.poll(&p) {
      do { return try socket.waitLimit(timeout) } catch { throw TimedOut() }
    }
    switch waited {
    case .success(0): throw TimedOut()
    case .success: return
    case .failure(let e): throw CallFailure(reason: e.description, tls: false)
    }
  }
}
