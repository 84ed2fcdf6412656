// Stream sockets for NBD: Unix domain and TCP, connect and listen, with full
// reads and writes and optional time limits. TCP listens on 127.0.0.1 unless
// told otherwise. After NBD_OPT_STARTTLS a socket's reads and writes go
// through its TLS session (TLS.swift). A read or write that waited too long
// throws with cause .timedOut, one whose peer went away .connectionClosed.

import Glibc

// @unchecked Sendable: fd and peer never change; tls, the timeouts and the deadline are set before threads share it.
public final class Socket: @unchecked Sendable {
  public let fd: Int32
  public let peer: String
  /// Set once, by the TLS handshake, before the socket is shared by threads.
  var tls: TLSSession?
  /// Seconds one read or write may wait (0: no limit); see `setTimeout`.
  private(set) var readTimeout: Double = 0
  private(set) var writeTimeout: Double = 0
  /// When set (monotonic seconds), every read and write must end by then,
  /// however the bytes trickle in: the handshake's time limit.
  var deadline: Double = 0

  init(fd: Int32, peer: String) {
    self.fd = fd
    self.peer = peer
  }

  deinit { Glibc.close(fd) }

  /// Whether the connection runs over TLS.
  public var isTLS: Bool { tls != nil }

  /// The TLS protocol and cipher, or nil for a plain connection.
  public var tlsSummary: String? { tls?.summary }

  /// Shuts the connection down both ways; blocked readers wake with end of
  /// input. Over TLS, close_notify goes first when it can be sent at once.
  public func shutdown() {
    tls?.closeNotify()
    _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
  }

  /// Connects to an NBD URI's endpoint.
  public static func connect(_ endpoint: NBDURI.Endpoint, timeout: Double? = nil) throws -> Socket {
    switch endpoint {
    case .unix(let path):
      let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard fd >= 0 else { throw ToolkitError.path(path, "cannot create a socket: \(Errno.current)") }
      var address = try unixAddress(path)
      let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          Sys.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
      }
      if case .failure(let e) = rc {
        Glibc.close(fd)
        throw ToolkitError.path(path, "cannot connect: \(e)")
      }
      let s = Socket(fd: fd, peer: path)
      if let timeout { s.setTimeout(timeout) }
      return s
    case .tcp(let host, let port):
      var hints = addrinfo()
      hints.ai_family = AF_UNSPEC
      hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
      var list: UnsafeMutablePointer<addrinfo>?
      let rc = getaddrinfo(host, String(port), &hints, &list)
      guard rc == 0, let first = list else {
        throw ToolkitError("\(host):\(port): cannot resolve: \(String(cString: gai_strerror(rc)))")
      }
      defer { freeaddrinfo(list) }
      var lastError = Errno(ECONNREFUSED)
      var entry: UnsafeMutablePointer<addrinfo>? = first
      while let ai = entry {
        let fd = socket(
          ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
        if fd >= 0 {
          switch Sys.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) {
          case .success:
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let s = Socket(fd: fd, peer: "\(host):\(port)")
            if let timeout { s.setTimeout(timeout) }
            return s
          case .failure(let e):
            lastError = e
            Glibc.close(fd)
          }
        }
        entry = ai.pointee.ai_next
      }
      throw ToolkitError("\(host):\(port): cannot connect: \(lastError)")
    }
  }

  /// Limits how long one read or write may block (0: no limit).
  public func setTimeout(_ seconds: Double) {
    setReadTimeout(seconds)
    setWriteTimeout(seconds)
  }

  /// Limits how long one read may block (0: no limit).
  public func setReadTimeout(_ seconds: Double) {
    readTimeout = seconds
    var tv = Socket.timeval(seconds)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
  }

  /// Limits how long one write may block (0: no limit).
  public func setWriteTimeout(_ seconds: Double) {
    writeTimeout = seconds
    var tv = Socket.timeval(seconds)
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
  }

  private static func timeval(_ seconds: Double) -> Glibc.timeval {
    Glibc.timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
  }

  /// Reads exactly `count` bytes; throws at end of input or on error.
  public func read(into buffer: UnsafeMutableRawPointer, count: Int) throws {
    if let tls { return try tls.read(into: buffer, count: count) }
    if deadline > 0 { return try readBeforeDeadline(buffer, count) }
    switch readFull(fd, buffer, count) {
    case .success(let n) where n == count: return
    case .success: throw Socket.closed(peer)
    case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EWOULDBLOCK:
      throw Socket.timedOut(peer)
    case .failure(let e): throw ToolkitError("\(peer): \(e)")
    }
  }

  /// Reads with `deadline`: each wait is bounded by the time left.
  private func readBeforeDeadline(_ buffer: UnsafeMutableRawPointer, _ count: Int) throws {
    var done = 0
    while done < count {
      try waitReadable()
      switch Sys.recv(fd, buffer + done, count - done, Int32(MSG_DONTWAIT)) {
      case .success(0): throw Socket.closed(peer)
      case .success(let n): done += n
      case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EWOULDBLOCK: continue
      case .failure(let e): throw ToolkitError("\(peer): \(e)")
      }
    }
  }

  /// The seconds a wait may last now: the time left before `deadline`
  /// (throwing when none is), else `timeout` (0: no limit).
  func waitLimit(_ timeout: Double) throws -> Double {
    guard deadline > 0 else { return timeout }
    let left = deadline - monotonicSeconds()
    if left <= 0 { throw Socket.timedOut(peer) }
    return timeout > 0 ? min(timeout, left) : left
  }

  private func waitReadable() throws {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    switch try Sys.poll(&p, limit: { try waitLimit(readTimeout) }) {
    case .success(0): throw Socket.timedOut(peer)
    case .success: return
    case .failure(let e): throw ToolkitError("\(peer): \(e)")
    }
  }

  /// Reads part of a request in transmission. Before its first byte
  /// (`midRequest` false) the client may wait up to `idleLimit` seconds
  /// between requests; once a request has begun, a pause of `stallLimit`
  /// ends the connection (0: no limit). The limits are checked when a wait
  /// of the read timeout ends, so a busy connection pays nothing for them.
  public func readRequest(
    into buffer: UnsafeMutableRawPointer, count: Int, midRequest: Bool, idleLimit: Double, stallLimit: Double
  ) throws {
    if let tls {
      return try tls.readRequest(
        into: buffer, count: count, midRequest: midRequest, idleLimit: idleLimit, stallLimit: stallLimit)
    }
    var done = 0
    var waitingSince = 0.0
    while done < count {
      switch Sys.recv(fd, buffer + done, count - done, 0) {
      case .success(0): throw Socket.closed(peer)
      case .success(let n):
        done += n
        waitingSince = 0
        continue
      case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EWOULDBLOCK: break
      case .failure(let e): throw ToolkitError("\(peer): \(e)")
      }
      let now = monotonicSeconds()
      if waitingSince == 0 { waitingSince = now - readTimeout }
      try checkPause(now - waitingSince, begun: midRequest || done > 0, idleLimit: idleLimit, stallLimit: stallLimit)
    }
  }

  /// Throws when a pause of `waited` seconds is over its limit.
  func checkPause(_ waited: Double, begun: Bool, idleLimit: Double, stallLimit: Double) throws {
    let limit = begun ? stallLimit : idleLimit
    guard limit > 0, waited >= limit - 0.001 else { return }
    if begun {
      throw ToolkitError("\(peer): stopped in the middle of a request for \(Socket.seconds(limit)) s; disconnected")
    }
    throw ToolkitError("\(peer): idle for \(Socket.seconds(limit)) s; disconnected")
  }

  /// A wait for `peer` that ran out of time.
  static func timedOut(_ peer: String) -> ToolkitError { ToolkitError("\(peer): timed out", cause: .timedOut) }

  /// `peer` closed the connection.
  static func closed(_ peer: String) -> ToolkitError {
    ToolkitError("\(peer): connection closed", cause: .connectionClosed)
  }

  static func seconds(_ s: Double) -> String {
    s == s.rounded() && s < 1e9 ? String(Int(s)) : String(s)
  }

  /// Writes all of `count` bytes.
  public func write(_ buffer: UnsafeRawPointer, count: Int) throws {
    if let tls { return try tls.write(buffer, count: count) }
    try sendAll(buffer, count, flags: Int32(MSG_NOSIGNAL))
  }

  /// send(2) until all of `count` bytes are gone (plain connections).
  private func sendAll(_ buffer: UnsafeRawPointer, _ count: Int, flags: Int32) throws {
    if case .failure(let e) = sendFull(fd, buffer, count, flags: flags) { throw writeError(e) }
  }

  /// Sends `first` and then `second` with as few system calls as it can.
  public func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer?) throws {
    if let tls { return try tls.send(first, second) }
    let count = second == nil || second?.count == 0 ? 1 : 2
    // The vectors live on the stack: a reply allocates nothing.
    let result = withUnsafeTemporaryAllocation(of: iovec.self, capacity: 2) { vectors in
      vectors[0] = iovec(iov_base: UnsafeMutableRawPointer(mutating: first.baseAddress), iov_len: first.count)
      vectors[1] = iovec(
        iov_base: UnsafeMutableRawPointer(mutating: second?.baseAddress), iov_len: second?.count ?? 0)
      var written: UInt64 = 0
      return writingAllVectors(UnsafeMutableBufferPointer(rebasing: vectors[0..<count]), written: &written) {
        Sys.sendmsg(fd, $0, $1, Int32(MSG_NOSIGNAL))
      }
    }
    if case .failure(let e) = result { throw writeError(e) }
  }

  /// Sends `head`, then `count` bytes of the file `file` at `offset` straight
  /// from the page cache (sendfile: no copy through this process). Plain
  /// connections only. A file that ends early is an error, as is any failure
  /// after `head` is sent: the caller must then end the connection.
  public func send(_ head: UnsafeRawBufferPointer, from file: Int32, at offset: UInt64, count: Int) throws {
    precondition(tls == nil, "sendfile on a TLS connection")
    try sendAll(head.baseAddress!, head.count, flags: Int32(MSG_NOSIGNAL | MSG_MORE))
    var position = off_t(offset)
    var left = count
    while left > 0 {
      let n: Int
      switch Sys.sendfile(fd, file, &position, left) {
      case .success(let m): n = m
      case .failure(let e): throw writeError(e)
      }
      if n == 0 { throw ToolkitError("\(peer): the file ended \(left) bytes short of the reply") }
      left -= n
    }
  }

  /// A failed send: a peer that went away has closed the connection.
  private func writeError(_ e: Errno) -> ToolkitError {
    let code = e.rawValue
    if code == EAGAIN || code == EWOULDBLOCK { return Socket.timedOut(peer) }
    if code == EPIPE || code == ECONNRESET { return Socket.closed(peer) }
    return ToolkitError("\(peer): \(e)")
  }

  public func write(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { raw in
      guard let base = raw.baseAddress else { return }
      try write(base, count: raw.count)
    }
  }

  package static func unixAddress(_ path: String) throws -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard bytes.count < capacity else { throw ToolkitError.path(path, "socket path longer than \(capacity - 1) bytes") }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (i, b) in bytes.enumerated() { raw[i] = b }
      raw[bytes.count] = 0
    }
    return address
  }
}

/// A listening socket.
// @unchecked Sendable: every field is set once by init; accept and shutdown are plain system calls.
public final class Listener: @unchecked Sendable {
  public let fd: Int32
  public let name: String
  private let unixPath: String?

  deinit {
    Glibc.close(fd)
    if let unixPath { unlink(unixPath) }
  }

  /// Listens on a Unix socket at `path`, readable and writable by its owner
  /// only (mode 0600; chmod it afterwards to let a group in). An existing
  /// socket is replaced only when it is stale (nobody accepts on it): a
  /// running server's socket is never taken over, and a file that is not a
  /// socket is never removed.
  public init(unixPath path: String) throws {
    var st = stat()
    if lstat(path, &st) == 0 {
      guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw ToolkitError.path(path, "exists and is not a socket") }
      switch Listener.probe(path) {
      case 0:
        throw ToolkitError.path(path, "another server is listening on this socket; stop it or choose another path")
      case ECONNREFUSED:
        // Left by a server that ended: replace it.
        unlink(path)
      case let e:
        throw ToolkitError.path(path, "exists, and whether a server listens on it is unknown (\(Errno(e)))")
      }
    }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw ToolkitError.path(path, "cannot create a socket: \(Errno.current)") }
    var address = try Socket.unixAddress(path)
    let rc = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    // Private before anyone can connect: connections wait for listen(2).
    guard rc == 0, chmod(path, 0o600) == 0, Glibc.listen(fd, 64) == 0 else {
      let e = Errno.current
      Glibc.close(fd)
      throw ToolkitError.path(path, "cannot listen: \(e)")
    }
    self.fd = fd
    self.name = path
    self.unixPath = path
  }

  /// 0 when something accepts connections on the Unix socket `path`, else
  /// why connecting failed.
  static func probe(_ path: String) -> Int32 {
    guard var address = try? Socket.unixAddress(path) else { return ENAMETOOLONG }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return errno }
    defer { Glibc.close(fd) }
    let rc = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        Sys.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    switch rc {
    case .success: return 0
    case .failure(let e): return e.rawValue
    }
  }

  /// Listens on TCP `host:port` (host 127.0.0.1 when empty; port 0 picks one).
  public init(host: String, port: UInt16) throws {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_PASSIVE
    var list: UnsafeMutablePointer<addrinfo>?
    let h = host.isEmpty ? "127.0.0.1" : host
    let rc = getaddrinfo(h, String(port), &hints, &list)
    guard rc == 0, let ai = list else {
      throw ToolkitError("\(h):\(port): cannot resolve: \(String(cString: gai_strerror(rc)))")
    }
    defer { freeaddrinfo(list) }
    let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
    guard fd >= 0 else { throw ToolkitError("\(h):\(port): cannot create a socket: \(Errno.current)") }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, Glibc.listen(fd, 64) == 0 else {
      let e = Errno.current
      Glibc.close(fd)
      throw ToolkitError("\(h):\(port): cannot listen: \(e)")
    }
    self.fd = fd
    self.unixPath = nil
    var bound = sockaddr_storage()
    var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
    var actualPort = port
    withUnsafeMutablePointer(to: &bound) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
    }
    if bound.ss_family == sa_family_t(AF_INET) {
      actualPort = withUnsafePointer(to: &bound) {
        $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
      }
    } else if bound.ss_family == sa_family_t(AF_INET6) {
      actualPort = withUnsafePointer(to: &bound) {
        $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
      }
    }
    self.name = "\(h):\(actualPort)"
  }

  /// Makes a blocked `accept` return, for a shutdown.
  public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

  /// Waits for the next connection.
  public func accept() throws -> Socket {
    while true {
      switch Sys.accept(fd) {
      case .success(let c):
        _ = fcntl(c, F_SETFD, FD_CLOEXEC)
        var one: Int32 = 1
        setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return Socket(fd: c, peer: "client of \(name)")
      case .failure(let e) where e.rawValue == ECONNABORTED: continue
      case .failure(let e): throw ToolkitError("\(name): accept failed: \(e)")
      }
    }
  }
}
