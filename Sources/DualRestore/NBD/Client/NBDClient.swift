// An NBD client: one connection to one export, shared by many threads.
// This file is its face: the requests, the checks made before anything is
// sent, and the sentences errors are told in. How requests go out, are
// split and wait (with reconnection and backoff) is in
// NBDClientRequests.swift; the connection, its slot table and send path in
// NBDClientConnection.swift; its reader in NBDClientReader.swift; the
// option handshake in NBDClientHandshake.swift.
//
// Invariants:
// - A connection that breaks (end of input, a socket error, a reply with a
//   bad magic or an unknown cookie, a request that timed out) fails every
//   request waiting on it and is never used again. The next request
//   connects anew, after an exponential backoff, within its own time limit;
//   the export must keep its size and description.
// - Every request ends within `timeout` seconds of its start (connecting
//   again included), except for a TCP connect(2) to an unreachable host,
//   which the kernel bounds.
// - Ranges past the end of the export, and writes to a read-only export,
//   are refused before anything is sent.
// - A READ or WRITE longer than `maximumRequest` is split: at most what the
//   server advertises (NBD_INFO_BLOCK_SIZE) and NBD.maximumPayload (64
//   MiB), or the protocol's interoperable 32 MiB when it advertises nothing.
// - Errors are ToolkitError, one sentence naming the URI and the request,
//   with `cause` set where a caller decides on it: the server's error
//   number, its refusal and words, a time-out, a closed connection.
// - nbds:// and nbds+unix:// ask for NBD_OPT_STARTTLS first and verify the
//   server's certificate; a server that does not offer TLS is refused,
//   never used in the clear. The TLS context is loaded once per client and
//   used by every connection made again.

import Glibc

// @unchecked Sendable: the connection state is behind `state`, which requests wait on for a reconnection.
public final class NBDClient: BlockDevice, @unchecked Sendable {
  public let uri: NBDURI
  /// The URI as given.
  public var name: String { uri.text }
  public let size: UInt64
  /// Transmission flags of the first connection.
  public let flags: UInt16
  /// The export's description on the first connection. A reconnection to an
  /// export that describes itself otherwise (a frozen view frozen anew) is
  /// refused: its blocks may be another instant's.
  public let exportDescription: String?
  /// The server's block size constraints (1, 4096 and nil when not told).
  public let minimumBlockSize: Int
  public let preferredBlockSize: Int
  public let maximumBlockSize: Int?
  /// The longest READ or WRITE sent; longer ones are split.
  public let maximumRequest: Int
  /// Seconds one request may take, reconnecting included.
  public let timeout: Double
  /// The certificates of an nbds URI, for every connection.
  let tlsContext: TLSClientContext?
  /// How connections are made.
  let connector: NBDConnector
  /// Opened for BLOCK_STATUS (structured replies, base:allocation asked for).
  public let forAllocation: Bool
  /// The server gave base:allocation on the first connection.
  public let hasAllocation: Bool

  public var isReadOnly: Bool { flags & NBD.flagReadOnly != 0 }
  public var canFlush: Bool { flags & NBD.flagSendFlush != 0 }
  public var canFUA: Bool { flags & NBD.flagSendFUA != 0 }
  public var canTrim: Bool { flags & NBD.flagSendTrim != 0 }
  public var canWriteZeroes: Bool { flags & NBD.flagSendWriteZeroes != 0 }

  /// How many times a broken connection was replaced.
  public var reconnects: Int { state.withLock { reconnectCount } }

  /// Whether the server said it is shutting down since the last call.
  public func takeShutdownSeen() -> Bool {
    state.withLock {
      defer { shutdownSeen = false }
      return shutdownSeen
    }
  }

  /// Leaves the server politely: once no request is in flight on the
  /// current connection, NBD_CMD_DISC is sent and it is closed; the next
  /// request connects again. For a server that is stopping (ESHUTDOWN).
  public func disconnectWhenIdle() {
    let c = state.withLock { connection }
    c?.softDisconnect()
  }

  // Guarded by `state` (the requests in NBDClientRequests.swift use them).
  let state = Monitor()
  var connection: NBDClientConnection?
  var connecting = false
  var isClosed = false
  var reconnectCount = 0
  var backoff = NBDClient.initialBackoff
  var nextAttempt = 0.0
  var lastConnectError: String?
  /// Set when the server answered ESHUTDOWN (it is stopping); cleared by reading.
  var shutdownSeen = false

  static let initialBackoff = 0.1
  static let maximumBackoff = 5.0
  /// TRIM and WRITE_ZEROES carry no payload; they are split at this length.
  static let maximumRangeRequest = 1 << 30
  /// Chunks of one split READ or WRITE in flight at once.
  static let splitWindow = 8

  /// Connects to `uri` (nbd://HOST[:PORT]/EXPORT,
  /// nbd+unix:///EXPORT?socket=PATH, or the nbds forms, over TLS) and
  /// negotiates the export.
  /// With `allocation`, the client asks for structured replies and the
  /// base:allocation context and serves `allocation(offset:length:)` only
  /// (`hasAllocation` says whether the server gave it).
  public convenience init(uri text: String, timeout: Double = 30, allocation: Bool = false) throws {
    try self.init(uri: text, timeout: timeout, allocation: allocation, connector: .sockets)
  }

  /// As the public initializer, with connections made by `connector`.
  package init(uri text: String, timeout: Double, allocation: Bool, connector: NBDConnector) throws {
    let uri = try NBDURI(text)
    guard timeout > 0, timeout.isFinite else { throw ToolkitError("\(text): the time limit must be positive") }
    let tlsContext = uri.tls ? try TLSClientContext(certificates: uri.tlsCertificates) : nil
    let connection: NBDClientConnection
    let export: NBDClientExport
    do {
      (connection, export) = try NBDClientConnection.open(
        uri, connector: connector, tls: tlsContext, allocation: allocation, deadline: monotonicSeconds() + timeout,
        timeout: timeout)
    } catch let failure as NBDClientFailure {
      throw ToolkitError("\(text): \(failure.text)", cause: failure.kind)
    }
    self.uri = uri
    self.timeout = timeout
    self.tlsContext = tlsContext
    self.connector = connector
    self.forAllocation = allocation
    self.hasAllocation = export.allocationID != nil
    self.size = export.size
    self.flags = export.flags
    self.exportDescription = export.description
    self.minimumBlockSize = Int(export.minimum ?? 1)
    self.preferredBlockSize = Int(export.preferred ?? 4096)
    self.maximumBlockSize = export.maximum.map { Int($0) }
    // Without an advertised maximum, the protocol's interoperable 32 MiB.
    var limit = min(maximumBlockSize ?? NBD.defaultMaximumPayload, NBD.maximumPayload)
    if limit >= minimumBlockSize { limit -= limit % minimumBlockSize }
    self.maximumRequest = max(limit, 1)
    self.connection = connection
    connection.startReader()
  }

  deinit { close() }

  /// Sends NBD_CMD_DISC and drops the connection; later requests fail.
  public func close() {
    state.lock()
    if isClosed {
      state.unlock()
      return
    }
    isClosed = true
    let c = connection
    connection = nil
    state.broadcast()
    state.unlock()
    c?.disconnect()
  }

  // MARK: Requests

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    try checkRange(NBD.cmdRead, offset: offset, length: buffer.count)
    try transfer(NBD.cmdRead, flags: 0, offset: offset, length: buffer.count, into: base, from: nil)
  }

  /// Reads `length` bytes at `offset` into the file `fd` at `fileOffset`,
  /// straight from the connection (spliced: not copied through memory
  /// here; over TLS, through the reader's buffer). A failed write to the
  /// file throws FileWriteError; what the file holds of the range is then
  /// unknown, and the connection goes on.
  public func read(at offset: UInt64, length: Int, toFile fd: Int32, at fileOffset: UInt64) throws {
    guard length > 0 else { return }
    try checkRange(NBD.cmdRead, offset: offset, length: length)
    try transfer(
      NBD.cmdRead, flags: 0, offset: offset, length: length, into: nil, from: nil,
      file: FileTarget(fd: fd, offset: fileOffset))
  }

  /// base:allocation of `length` bytes at `offset` (NBD_CMD_BLOCK_STATUS):
  /// runs from `offset` on, covering the range or a first part of it, each
  /// at least one byte, none past the range. Only on a client opened for
  /// allocation whose server gave the context.
  public func allocation(offset: UInt64, length: UInt32) throws -> [Extent] {
    guard forAllocation else { throw ToolkitError("\(name): this client was not opened for block status") }
    guard hasAllocation else { throw ToolkitError("\(name): the server does not report base:allocation") }
    guard length > 0 else { return [] }
    try checkRange(NBD.cmdBlockStatus, offset: offset, length: Int(length))
    let outcome = try request(
      NBD.cmdBlockStatus, flags: 0, offset: offset, length: Int(length), into: nil, from: nil)
    // Clipped to the range asked for; the first run must be there.
    var runs: [Extent] = []
    var left = length
    for e in outcome.extents where left > 0 && e.length > 0 {
      let n = min(e.length, left)
      runs.append(Extent(length: n, flags: e.flags))
      left -= n
    }
    guard !runs.isEmpty else {
      throw ToolkitError("\(name): the server's block status for \(length) bytes at \(offset) describes nothing")
    }
    return runs
  }

  /// Writes all of `buffer` at `offset`; with `fua`, durably before returning.
  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool = false) throws {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    try checkRange(NBD.cmdWrite, offset: offset, length: buffer.count)
    try checkWritable(NBD.cmdWrite, offset: offset, length: UInt64(buffer.count))
    let flags = fua && canFUA ? NBD.cmdFlagFUA : 0
    try transfer(NBD.cmdWrite, flags: flags, offset: offset, length: buffer.count, into: nil, from: base)
    if fua && !canFUA { try flush() }
  }

  /// Makes completed writes durable. Without NBD_FLAG_SEND_FLUSH the server
  /// has no write cache to flush, and nothing is sent.
  public func flush() throws {
    guard canFlush else { return }
    try request(NBD.cmdFlush, flags: 0, offset: 0, length: 0, into: nil, from: nil)
  }

  /// Tells the server that a range is no longer needed (advisory: nothing is
  /// sent when the server cannot trim). Its content is undefined afterwards.
  public func trim(offset: UInt64, length: UInt64) throws {
    guard length > 0 else { return }
    try checkRange(NBD.cmdTrim, offset: offset, length: length)
    try checkWritable(NBD.cmdTrim, offset: offset, length: length)
    guard canTrim else { return }
    try ranged(NBD.cmdTrim, flags: 0, offset: offset, length: length)
  }

  /// Makes a range read as zeroes; WRITEs of zeroes when the server has no
  /// WRITE_ZEROES.
  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool = false) throws {
    guard length > 0 else { return }
    try checkRange(NBD.cmdWriteZeroes, offset: offset, length: length)
    try checkWritable(NBD.cmdWriteZeroes, offset: offset, length: length)
    if canWriteZeroes {
      try ranged(NBD.cmdWriteZeroes, flags: fua && canFUA ? NBD.cmdFlagFUA : 0, offset: offset, length: length)
      if fua && !canFUA { try flush() }
      return
    }
    let chunk = Int(min(length, UInt64(maximumRequest), 1 << 20))
    let zeroes = AlignedBuffer(count: chunk)
    zeroes.buffer.initializeMemory(as: UInt8.self, repeating: 0)
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(chunk), length - done))
      try transfer(NBD.cmdWrite, flags: 0, offset: offset + done, length: n, into: nil, from: zeroes.pointer)
      done += UInt64(n)
    }
    if fua { try flush() }
  }

  /// The whole export is data: block status is not asked for.
  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { (true, size) }

  // MARK: Checks and sentences

  func describe(_ command: UInt16, offset: UInt64, length: UInt64) -> String {
    switch command {
    case NBD.cmdRead: return "read of \(length) bytes at \(offset)"
    case NBD.cmdWrite: return "write of \(length) bytes at \(offset)"
    case NBD.cmdFlush: return "flush"
    case NBD.cmdTrim: return "trim of \(length) bytes at \(offset)"
    case NBD.cmdWriteZeroes: return "write of \(length) zero bytes at \(offset)"
    case NBD.cmdBlockStatus: return "block status of \(length) bytes at \(offset)"
    default: return "command \(command) of \(length) bytes at \(offset)"
    }
  }

  private func checkRange(_ command: UInt16, offset: UInt64, length: Int) throws {
    try checkRange(command, offset: offset, length: UInt64(length))
  }

  private func checkRange(_ command: UInt16, offset: UInt64, length: UInt64) throws {
    let (end, overflow) = offset.addingReportingOverflow(length)
    if overflow || end > size {
      throw ToolkitError(
        "\(name): \(describe(command, offset: offset, length: length)) is past the end of the export (\(size) bytes)")
    }
  }

  private func checkWritable(_ command: UInt16, offset: UInt64, length: UInt64) throws {
    if isReadOnly {
      throw ToolkitError(
        "\(name): \(describe(command, offset: offset, length: length)) refused: the export is read-only")
    }
  }

  /// The sentence for a request that failed: the connection's failure, or
  /// the server's error number.
  func failure(
    _ command: UInt16, offset: UInt64, length: Int, serverError: UInt32, cause: NBDClientFailure?
  ) -> ToolkitError {
    if serverError == NBD.errShutdown { state.withLock { shutdownSeen = true } }
    let what = describe(command, offset: offset, length: UInt64(length))
    if let cause { return ToolkitError("\(name): \(what) failed: \(cause.text)", cause: cause.kind) }
    return ToolkitError(
      "\(name): \(what) failed: \(NBDClient.errorText(serverError))", cause: .serverError(serverError))
  }

  /// The text of an error number from the wire (the protocol's numbers, which
  /// are Linux's).
  static func errorText(_ error: UInt32) -> String {
    switch error {
    case NBD.errPerm: return Errno(EPERM).description
    case NBD.errIO: return Errno(EIO).description
    case NBD.errNoMem: return Errno(ENOMEM).description
    case NBD.errInvalid: return Errno(EINVAL).description
    case NBD.errNoSpace: return Errno(ENOSPC).description
    case NBD.errOverflow: return Errno(EOVERFLOW).description
    case NBD.errNotSupported: return Errno(ENOTSUP).description
    case NBD.errShutdown: return Errno(ESHUTDOWN).description
    default: return "unknown error \(error) from the server"
    }
  }
}

/// How a client reaches its server, each time it connects: a socket to the
/// URI's endpoint, or (the fuzz targets) a connection in memory, whose
/// replies the requests read themselves, without a reader thread.
package struct NBDConnector: Sendable {
  let connect: @Sendable (_ uri: NBDURI, _ timeout: Double) throws -> NBDTransport
  /// No reader thread: a request reads replies until its own has come.
  let readsInline: Bool

  static let sockets = NBDConnector(
    connect: { uri, timeout in try Socket.connect(uri.endpoint, timeout: timeout) }, readsInline: false)

  /// Connections from `next`, read without a thread.
  package static func memory(_ next: @escaping @Sendable () throws -> MemoryTransport) -> NBDConnector {
    NBDConnector(connect: { _, _ in try next() }, readsInline: true)
  }
}
