// What an NBD connection runs over: a socket (plain, or TLS after
// NBD_OPT_STARTTLS), or bytes in memory. The server's handshake and
// transmission and the client's handshake and reply reader use nothing
// else, so the fuzz targets run them on an input in memory: no thread,
// pipe or socket per input.
//
// Reads are whole (exactly `count` bytes, or an error); a peer gone away
// is an error with cause .connectionClosed, a wait too long .timedOut.
// sendfile(2) and splice(2) need a plain socket's descriptor
// (`spliceDescriptor`); without one, data goes through memory.

/// A byte stream with time limits.
protocol NBDTransport: AnyObject, Sendable {
  /// Names the peer in errors and the log.
  var peer: String { get }
  var isTLS: Bool { get }
  /// The descriptor of a plain socket, for sendfile and splice; nil over
  /// TLS or in memory.
  var spliceDescriptor: Int32? { get }

  func read(into buffer: UnsafeMutableRawPointer, count: Int) throws
  /// Part of a request in transmission, with the limits of
  /// `Socket.readRequest`.
  func readRequest(
    into buffer: UnsafeMutableRawPointer, count: Int, midRequest: Bool, idleLimit: Double, stallLimit: Double) throws
  func write(_ buffer: UnsafeRawPointer, count: Int) throws
  /// `first` then `second`, as one message.
  func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer?) throws
  /// `head`, then `count` bytes of `file` at `offset` (spliceDescriptor only).
  func send(_ head: UnsafeRawBufferPointer, from file: Int32, at offset: UInt64, count: Int) throws
  /// Ends the connection both ways; blocked readers wake.
  func shutdown()

  /// Seconds one read may block (0: no limit).
  var readTimeout: Double { get }
  func setReadTimeout(_ seconds: Double)
  func setWriteTimeout(_ seconds: Double)
  /// Every read and write must end by then (monotonic seconds; 0: none).
  var deadline: Double { get set }

  /// The server's side of NBD_OPT_STARTTLS; reads and writes go through
  /// TLS afterwards.
  func startTLS(server context: TLSServerContext) throws
  /// The client's side; `host` (TCP) must be named by the certificate.
  func startTLS(client context: TLSClientContext, host: String?) throws
}

extension NBDTransport {
  func setTimeout(_ seconds: Double) {
    setReadTimeout(seconds)
    setWriteTimeout(seconds)
  }

  func write(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { raw in
      guard let base = raw.baseAddress else { return }
      try write(base, count: raw.count)
    }
  }

  /// Reads exactly `count` bytes into a new array.
  func read(count: Int) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    try bytes.withUnsafeMutableBytes { raw in
      guard let base = raw.baseAddress else { return }
      try read(into: base, count: count)
    }
    return bytes
  }
}

extension Socket: NBDTransport {
  var spliceDescriptor: Int32? { isTLS ? nil : fd }

  func startTLS(server context: TLSServerContext) throws { try context.accept(self, timeout: 0) }

  func startTLS(client context: TLSClientContext, host: String?) throws {
    try context.connect(self, host: host, timeout: readTimeout)
  }
}

/// A connection whose peer's side is bytes given in advance: reads take
/// them in order and find the end of input after them; what is written is
/// counted and dropped. For the fuzz targets and their regression tests,
/// one connection per input.
package final class MemoryTransport: NBDTransport, Sendable {
  package let peer: String
  private let input: [UInt8]
  private struct Ends {
    var position = 0
    var closed = false
    var written = 0
  }
  private let ends = Locked(Ends())

  package init(_ input: [UInt8], peer: String) {
    self.input = input
    self.peer = peer
  }

  /// Bytes written so far.
  package var bytesWritten: Int { ends.withLock { $0.written } }

  var isTLS: Bool { false }
  var spliceDescriptor: Int32? { nil }
  var readTimeout: Double { 0 }
  var deadline: Double {
    get { 0 }
    set {}
  }
  func setReadTimeout(_ seconds: Double) {}
  func setWriteTimeout(_ seconds: Double) {}

  func read(into buffer: UnsafeMutableRawPointer, count: Int) throws {
    try ends.withLock { e in
      guard !e.closed, input.count - e.position >= count else {
        // What there is is taken, as a socket's reader would have.
        e.position = input.count
        throw Socket.closed(peer)
      }
      let position = e.position
      input.withUnsafeBytes { raw in
        if count > 0, let base = raw.baseAddress { buffer.copyMemory(from: base + position, byteCount: count) }
      }
      e.position += count
    }
  }

  func readRequest(
    into buffer: UnsafeMutableRawPointer, count: Int, midRequest: Bool, idleLimit: Double, stallLimit: Double
  ) throws {
    try read(into: buffer, count: count)
  }

  func write(_ buffer: UnsafeRawPointer, count: Int) throws {
    try ends.withLock { e in
      if e.closed { throw Socket.closed(peer) }
      e.written += count
    }
  }

  func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer?) throws {
    try ends.withLock { e in
      if e.closed { throw Socket.closed(peer) }
      e.written += first.count + (second?.count ?? 0)
    }
  }

  func send(_ head: UnsafeRawBufferPointer, from file: Int32, at offset: UInt64, count: Int) throws {
    throw ToolkitError("\(peer): sendfile needs a socket")
  }

  func shutdown() { ends.withLock { $0.closed = true } }

  func startTLS(server context: TLSServerContext) throws {
    throw ToolkitError("\(peer): TLS needs a socket")
  }

  func startTLS(client context: TLSClientContext, host: String?) throws {
    throw ToolkitError("\(peer): TLS needs a socket")
  }
}
