// The server side of NBD: the fixed newstyle handshake, then transmission
// with several requests in flight, served concurrently.
//
// Each connection has a reader thread that reads and validates requests
// (before any I/O: magic, command, range, size) and a few worker threads
// that run them; replies are written whole under the connection's send
// lock, in completion order. A request that cannot be framed (bad magic, a
// WRITE larger than the limit) closes the connection: its payload cannot be
// skipped safely. Errors are mapped to NBD error numbers in one place
// (`NBDError`). Buffers come from a pool shared by the connections, not per
// request.
//
// TLS (NBD_OPT_STARTTLS) is off, offered, or required by `NBDServerOptions`;
// required, every option but STARTTLS and ABORT is refused with
// NBD_REP_ERR_TLS_REQD until TLS is on, and NBD_OPT_EXPORT_NAME (which has
// no error reply) closes the connection. After STARTTLS the socket's reads
// and writes go through the TLS session, which lets the reader and the
// repliers share the connection (TLS.swift).
//
// Against hostile or broken clients (`NBDServerOptions`): at most
// `maximumConnections` at once (more are closed at once, with a line in the
// log); the handshake must be over within `handshakeTimeout`, however the
// bytes trickle; a client silent between requests for `idleTimeout` (off by
// default: a mounted disk may be idle for hours) or paused in the middle of
// a request for `stallTimeout` is disconnected, as is one that does not take
// its replies for that long. Request buffers of all connections together
// stay under `maximumBufferedBytes` (a reader waits for room before it
// takes the next READ or WRITE), so memory is bounded whatever clients send.

import CShim
import Dispatch
import Glibc

/// An error to send to the client: an NBD error number and, for the log, why.
public struct NBDError: Error, CustomStringConvertible {
  public var code: UInt32
  public var message: String
  public init(_ code: UInt32, _ message: String) {
    self.code = code
    self.message = message
  }
  public var description: String { message }

  /// The NBD error number for any error a handler throws.
  static func code(for error: Error) -> UInt32 {
    if let e = error as? NBDError { return e.code }
    return NBD.errIO
  }
}

/// What the server exports. Handlers are called from several threads at once.
public protocol NBDExport: AnyObject, Sendable {
  var name: String { get }
  var description: String { get }
  var size: UInt64 { get }
  /// Transmission flags beyond HAS_FLAGS (READ_ONLY, SEND_FLUSH, ...).
  var flags: UInt16 { get }
  /// Preferred request size, for NBD_INFO_BLOCK_SIZE.
  var preferredBlockSize: UInt32 { get }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws
  func flush() throws
  func trim(offset: UInt64, length: UInt64, fua: Bool) throws
  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws
  /// Whether the export is offered now (listed and accepted); an export
  /// such as a frozen view comes and goes.
  var isOffered: Bool { get }
  /// The export a client that asks for `name` (this export's name, or it
  /// followed by `;` and parameters) is served by: itself, or one bound to
  /// what it stands for now (a frozen view, a merge of one stream). Throws
  /// the sentence to refuse the client with.
  func bind(name: String) throws -> NBDExport
  /// For a reply sent without a copy: makes `length` bytes at `offset`
  /// readable from a file (fetching or preserving what it must) and says
  /// where, so that they go from the page cache to the socket (sendfile);
  /// nil when the export reads into a buffer only. The file must stay open
  /// while the export exists; what the range holds may change once this
  /// returns, as with any read beside a write.
  func fileSpan(offset: UInt64, length: Int) throws -> FileSpan?
  /// base:allocation for NBD_CMD_BLOCK_STATUS: runs of (length, flags)
  /// from `offset` on, with NBD.stateHole and NBD.stateZero, covering at
  /// most `length` bytes (at least the first one), at most `limit` runs.
  /// A run said to be zero must read as zeros: clients skip it.
  func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent]
}

/// A run of the base:allocation context.
public struct Extent: Equatable, Sendable {
  public var length: UInt32
  public var flags: UInt32
  public init(length: UInt32, flags: UInt32) {
    self.length = length
    self.flags = flags
  }
}

extension Array where Element == Extent {
  /// Appends `run`, joined to the last run when their flags agree; false
  /// (nothing appended) when that would make more than `limit` runs.
  mutating func append(joining run: Extent, limit: Int) -> Bool {
    if let last = self.last, last.flags == run.flags {
      self[count - 1].length += run.length
      return true
    }
    guard count < limit else { return false }
    append(run)
    return true
  }
}

/// Bytes of a file an export's READ is served from.
public struct FileSpan: Sendable {
  public let fd: Int32
  public let offset: UInt64
  public init(fd: Int32, offset: UInt64) {
    self.fd = fd
    self.offset = offset
  }
}

extension NBDExport {
  public var isOffered: Bool { true }
  public func fileSpan(offset: UInt64, length: Int) throws -> FileSpan? { nil }
  /// Without better knowledge, everything is data.
  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    [Extent(length: length, flags: 0)]
  }
  public func bind(name: String) throws -> NBDExport {
    guard name == self.name || name.isEmpty else {
      throw NBDError(NBD.errInvalid, "the export \(self.name) takes no parameters")
    }
    return self
  }
}

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

public final class NBDServer: @unchecked Sendable {
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
  private let stateLock = DispatchSemaphore(value: 1)
  private var connections: [ObjectIdentifier: Socket] = [:]
  private var connectionCount = 0
  private let idle = DispatchSemaphore(value: 0)
  private var stopping = false
  private var lastRefusalLogged = 0.0
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
      stateLock.wait()
      if connectionCount >= max(1, options.maximumConnections) {
        // Closed before the greeting: the client sees the connection end.
        let now = monotonicSeconds()
        let say = now - lastRefusalLogged >= 1
        if say { lastRefusalLogged = now }
        let open = connectionCount
        stateLock.signal()
        socket.shutdown()
        if say { log("refused a connection: \(open) connections are open, the most allowed") }
        continue
      }
      connections[ObjectIdentifier(socket)] = socket
      connectionCount += 1
      stateLock.signal()
      startThread { [self] in
        let connection = Connection(server: self, socket: socket)
        connection.run()
        stateLock.wait()
        connections[ObjectIdentifier(socket)] = nil
        connectionCount -= 1
        // Only a stop waits for the last connection: a signal while serving
        // would be left over and let a later stop return too early.
        let last = connectionCount == 0 && stopping
        stateLock.signal()
        if last { idle.signal() }
      }
    }
  }

  var isStopping: Bool {
    stateLock.wait()
    defer { stateLock.signal() }
    return stopping
  }

  /// Makes `serve` return: no new connections are accepted.
  public func beginStop(_ listener: Listener) {
    stateLock.wait()
    stopping = true
    stateLock.signal()
    listener.shutdown()
  }

  /// Stops serving: open connections are shut down once their requests in
  /// flight are answered; returns when all have ended.
  public func stop() {
    stateLock.wait()
    stopping = true
    let open = Array(connections.values)
    let count = connectionCount
    stateLock.signal()
    for s in open { s.shutdown() }
    if count > 0 { idle.wait() }
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

/// One client connection: handshake, then the transmission loop.
private final class Connection: @unchecked Sendable {
  let server: NBDServer
  let socket: Socket
  let sendLock = DispatchSemaphore(value: 1)
  /// READs at least this long are sent from the file when the export can;
  /// shorter ones cost less copied than spliced.
  static let sendfileMinimum = 32 << 10

  /// Whether all of a span is in the page cache. Only then is it sent with
  /// sendfile: a read that must go to the disk is done before the reply's
  /// header, outside the send lock, so that its error is an error reply
  /// (not a cut connection) and other replies do not wait behind it.
  /// Where cachestat(2) is missing, no span is taken for cached.
  static func isCached(_ span: FileSpan, _ length: Int) -> Bool {
    let page = UInt64(4096)
    let first = span.offset / page * page
    let end = (span.offset + UInt64(length) + page - 1) / page * page
    return dr_cached_pages(span.fd, first, end - first) == Int((end - first) / page)
  }
  var noZeroes = false
  var export: NBDExport?
  /// NBD_OPT_STRUCTURED_REPLY was agreed: READ (and BLOCK_STATUS) replies
  /// are structured.
  var structuredReplies = false
  /// base:allocation was selected, and for which export name.
  var allocationSelectedFor: String?
  /// base:allocation is on for the export in transmission.
  var allocationContext = false

  init(server: NBDServer, socket: Socket) {
    self.server = server
    self.socket = socket
  }

  func run() {
    // Over TLS, close_notify before the descriptor closes.
    defer { socket.shutdown() }
    let options = server.options
    do {
      if options.handshakeTimeout > 0 {
        socket.setTimeout(options.handshakeTimeout)
        socket.deadline = monotonicSeconds() + options.handshakeTimeout
      }
      let export: NBDExport
      do {
        guard let chosen = try handshake() else { return }
        export = chosen
      } catch let e as ToolkitError where e.message.hasSuffix("timed out") {
        throw ToolkitError(
          "\(socket.peer): the handshake took longer than \(Socket.seconds(options.handshakeTimeout)) s; disconnected")
      }
      self.export = export
      // Transmission: waits wake up at the shorter limit to check both.
      socket.deadline = 0
      let limits = [options.idleTimeout, options.stallTimeout].filter { $0 > 0 }
      socket.setReadTimeout(limits.min() ?? 0)
      socket.setWriteTimeout(max(0, options.stallTimeout))
      try transmission(export)
    } catch {
      // A client that goes away between requests ends normally; anything
      // else is worth a line in the log.
      if let e = error as? ToolkitError, e.message.hasSuffix("connection closed") { return }
      if !server.isStopping { server.log("connection ended: \(error)") }
    }
  }

  // MARK: Handshake

  private func handshake() throws -> NBDExport? {
    var greeting = [UInt8](repeating: 0, count: 18)
    greeting.withUnsafeMutableBytes { raw in
      raw.baseAddress!.storeBE(NBD.initMagic, at: 0)
      raw.baseAddress!.storeBE(NBD.optionMagic, at: 8)
      raw.baseAddress!.storeBE(NBD.flagFixedNewstyle | NBD.flagNoZeroes, at: 16)
    }
    try socket.write(greeting)
    var clientFlags: UInt32 = 0
    try withUnsafeMutableBytes(of: &clientFlags) { try socket.read(into: $0.baseAddress!, count: 4) }
    clientFlags = UInt32(bigEndian: clientFlags)
    guard clientFlags & NBD.clientFlagFixedNewstyle != 0 else {
      throw ToolkitError("the client does not speak the fixed newstyle handshake")
    }
    guard clientFlags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
      throw ToolkitError("the client sent unknown flags 0x\(String(clientFlags, radix: 16))")
    }
    noZeroes = clientFlags & NBD.clientFlagNoZeroes != 0

    let head = AlignedBuffer(count: 16)
    var options = 0
    while true {
      options += 1
      // Bounded by the handshake timeout too; this stops a fast loop.
      guard options <= 1000 else { throw ToolkitError("the client sent more than 1000 options; disconnected") }
      try socket.read(into: head.pointer, count: 16)
      guard head.pointer.loadBE(at: 0, as: UInt64.self) == NBD.optionMagic else {
        throw ToolkitError("bad option magic from the client")
      }
      let option = head.pointer.loadBE(at: 8, as: UInt32.self)
      let length = Int(head.pointer.loadBE(at: 12, as: UInt32.self))
      guard length <= NBD.maximumOptionLength else {
        throw ToolkitError("option \(option) of \(length) bytes is too long")
      }
      var data = [UInt8](repeating: 0, count: length)
      if length > 0 { try data.withUnsafeMutableBytes { try socket.read(into: $0.baseAddress!, count: length) } }

      if option == NBD.optStartTLS {
        // What was agreed in the clear does not carry over into TLS.
        structuredReplies = false
        allocationSelectedFor = nil
        try startTLS(length: length)
        continue
      }
      if server.options.tls.isRequired && !socket.isTLS && option != NBD.optAbort {
        if option == NBD.optExportName {
          throw ToolkitError("the client asked for an export without TLS, which this server requires")
        }
        try optionReply(option, NBD.repErrTLSRequired, Array("TLS is required: send NBD_OPT_STARTTLS first".utf8))
        continue
      }

      switch option {
      case NBD.optExportName:
        let name = String(decoding: data, as: UTF8.self)
        let export: NBDExport
        switch server.export(named: name) {
        case .success(let e): export = e
        case .failure(let refusal):
          // EXPORT_NAME has no error reply: the connection just closes.
          throw ToolkitError("the client asked for the export '\(name)': \(refusal.message)")
        }
        var reply = [UInt8](repeating: 0, count: noZeroes ? 10 : 134)
        reply.withUnsafeMutableBytes { raw in
          raw.baseAddress!.storeBE(export.size, at: 0)
          raw.baseAddress!.storeBE(transmissionFlags(export), at: 8)
        }
        try socket.write(reply)
        allocationContext = allocationSelectedFor == name
        return export
      case NBD.optAbort:
        try optionReply(option, NBD.repAck, [])
        return nil
      case NBD.optList:
        guard length == 0 else {
          try optionReply(option, NBD.repErrInvalid, Array("LIST takes no data".utf8))
          continue
        }
        for e in server.exports where e.isOffered {
          var w = [UInt8](repeating: 0, count: 4)
          w.withUnsafeMutableBytes { $0.baseAddress!.storeBE(UInt32(e.name.utf8.count), at: 0) }
          try optionReply(option, NBD.repServer, w + Array(e.name.utf8))
        }
        try optionReply(option, NBD.repAck, [])
      case NBD.optInfo, NBD.optGo:
        guard length >= 6 else {
          try optionReply(option, NBD.repErrInvalid, Array("short INFO/GO request".utf8))
          continue
        }
        let nameLength = data.withUnsafeBytes { Int($0.baseAddress!.loadBE(at: 0, as: UInt32.self)) }
        guard nameLength <= length - 6 else {
          try optionReply(option, NBD.repErrInvalid, Array("bad export name length".utf8))
          continue
        }
        let name = String(decoding: data[4..<4 + nameLength], as: UTF8.self)
        let requests = data.withUnsafeBytes { Int($0.baseAddress!.loadBE(at: 4 + nameLength, as: UInt16.self)) }
        guard 6 + nameLength + 2 * requests == length else {
          try optionReply(option, NBD.repErrInvalid, Array("bad information request count".utf8))
          continue
        }
        let export: NBDExport
        switch server.export(named: name) {
        case .success(let e): export = e
        case .failure(let refusal):
          try optionReply(option, refusal.code, Array(refusal.message.utf8.prefix(4096)))
          continue
        }
        var info = [UInt8](repeating: 0, count: 12)
        info.withUnsafeMutableBytes { raw in
          raw.baseAddress!.storeBE(NBD.infoExport, at: 0)
          raw.baseAddress!.storeBE(export.size, at: 2)
          raw.baseAddress!.storeBE(transmissionFlags(export), at: 10)
        }
        try optionReply(option, NBD.repInfo, info)
        var sizes = [UInt8](repeating: 0, count: 14)
        sizes.withUnsafeMutableBytes { raw in
          raw.baseAddress!.storeBE(NBD.infoBlockSize, at: 0)
          raw.baseAddress!.storeBE(UInt32(1), at: 2)
          raw.baseAddress!.storeBE(export.preferredBlockSize, at: 6)
          raw.baseAddress!.storeBE(UInt32(NBD.maximumPayload), at: 10)
        }
        try optionReply(option, NBD.repInfo, sizes)
        var described = [UInt8](repeating: 0, count: 2)
        described.withUnsafeMutableBytes { $0.baseAddress!.storeBE(NBD.infoDescription, at: 0) }
        try optionReply(option, NBD.repInfo, described + Array(export.description.utf8.prefix(4096)))
        try optionReply(option, NBD.repAck, [])
        if option == NBD.optGo {
          allocationContext = allocationSelectedFor == name
          return export
        }
      case NBD.optStructuredReply:
        guard length == 0 else {
          try optionReply(option, NBD.repErrInvalid, Array("STRUCTURED_REPLY takes no data".utf8))
          continue
        }
        structuredReplies = true
        try optionReply(option, NBD.repAck, [])
      case NBD.optListMetaContext, NBD.optSetMetaContext:
        try metaContext(option, data)
      default:
        try optionReply(option, NBD.repErrUnsupported, Array("option \(option) is not supported".utf8))
      }
    }
  }

  /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The one
  /// context is base:allocation (asked for by name, or by "base:"); other
  /// names select nothing. SET replaces what an earlier SET selected.
  private func metaContext(_ option: UInt32, _ data: [UInt8]) throws {
    let set = option == NBD.optSetMetaContext
    guard structuredReplies else {
      try optionReply(option, NBD.repErrInvalid, Array("metadata contexts need structured replies first".utf8))
      return
    }
    // u32 name length, name, u32 query count, then u32 length + query each.
    func u32(_ at: Int) -> Int? {
      guard at + 4 <= data.count else { return nil }
      return data.withUnsafeBytes { Int($0.baseAddress!.loadBE(at: at, as: UInt32.self)) }
    }
    var queries: [String] = []
    var well = false
    parse: if let nameLength = u32(0), 4 + nameLength <= data.count, let count = u32(4 + nameLength) {
      var at = 8 + nameLength
      for _ in 0..<count {
        guard let n = u32(at), at + 4 + n <= data.count else { break parse }
        queries.append(String(decoding: data[at + 4..<at + 4 + n], as: UTF8.self))
        at += 4 + n
      }
      well = at == data.count
    }
    guard well, let nameLength = u32(0) else {
      try optionReply(option, NBD.repErrInvalid, Array("malformed metadata context request".utf8))
      return
    }
    let name = String(decoding: data[4..<4 + nameLength], as: UTF8.self)
    guard server.hasExport(named: name) else {
      try optionReply(option, NBD.repErrUnknown, Array("no export named '\(name)'".utf8))
      return
    }
    // LIST with no query lists every context; SET with none selects none.
    // A namespace alone ("base:") lists its contexts; SET names them.
    let selected =
      queries.contains { $0 == NBD.baseAllocation || (!set && $0 == "base:") } || (!set && queries.isEmpty)
    if set { allocationSelectedFor = selected ? name : nil }
    if selected {
      var reply = [UInt8](repeating: 0, count: 4)
      reply.withUnsafeMutableBytes { $0.baseAddress!.storeBE(set ? NBD.baseAllocationID : 0, at: 0) }
      try optionReply(option, NBD.repMetaContext, reply + Array(NBD.baseAllocation.utf8))
    }
    try optionReply(option, NBD.repAck, [])
  }

  /// NBD_OPT_STARTTLS: acknowledged, then the TLS handshake; a failed
  /// handshake ends the connection (the stream is no longer NBD).
  private func startTLS(length: Int) throws {
    let option = NBD.optStartTLS
    guard let context = server.options.tls.context else {
      try optionReply(option, NBD.repErrUnsupported, Array("TLS is not enabled on this server".utf8))
      return
    }
    guard length == 0 else {
      try optionReply(option, NBD.repErrInvalid, Array("STARTTLS takes no data".utf8))
      return
    }
    guard !socket.isTLS else {
      try optionReply(option, NBD.repErrInvalid, Array("TLS is already on".utf8))
      return
    }
    try optionReply(option, NBD.repAck, [])
    try context.accept(socket, timeout: 0)
  }

  private func transmissionFlags(_ export: NBDExport) -> UInt16 {
    NBD.flagHasFlags | export.flags | (structuredReplies ? NBD.flagSendDF : 0)
  }

  private func optionReply(_ option: UInt32, _ type: UInt32, _ data: [UInt8]) throws {
    var head = [UInt8](repeating: 0, count: 20)
    head.withUnsafeMutableBytes { raw in
      raw.baseAddress!.storeBE(NBD.optionReplyMagic, at: 0)
      raw.baseAddress!.storeBE(option, at: 8)
      raw.baseAddress!.storeBE(type, at: 12)
      raw.baseAddress!.storeBE(UInt32(data.count), at: 16)
    }
    try socket.write(head + data)
  }

  // MARK: Transmission
  //
  // Leader/follower: each worker takes the read lock, reads one request
  // (header and payload), lets go, runs it and sends its reply, so nothing is
  // handed between threads on the way. The first worker to see the end of
  // the connection (or DISC, or a request that cannot be framed) marks it
  // closed; the others finish what they hold and stop.

  struct Request {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var offset: UInt64
    var length: Int
    var buffer: AlignedBuffer?
    /// A READ answered from a file without a copy.
    var span: FileSpan?
    /// A BLOCK_STATUS reply's payload.
    var status: [UInt8]?
    var error: UInt32
    /// Bytes taken from the server's buffer budget, given back after the reply.
    var budgeted: Int
  }

  /// Leader/follower: each worker takes the read lock, reads one request
  /// (header and payload), lets go, runs it and sends its reply; so there
  /// is no hand-off between threads on the way. The first thread to see the
  /// end of the connection (or DISC, or a request that cannot be framed)
  /// marks it closed; the others finish what they hold and stop.
  private func transmission(_ export: NBDExport) throws {
    let workers = max(1, server.workersPerConnection)
    let reader = RequestReader(connection: self, export: export)
    let done = DispatchSemaphore(value: 0)
    for _ in 0..<workers {
      startThread { [self] in
        while var request = reader.next() {
          execute(&request, export)
          reply(request)
          if let b = request.buffer { reader.pool.put(b) }
          if request.budgeted > 0 { server.budget.release(request.budgeted) }
        }
        done.signal()
      }
    }
    for _ in 0..<workers { done.wait() }
    if let failure = reader.failure { throw failure }
  }

  /// The read side of a connection, shared by its workers.
  final class RequestReader: @unchecked Sendable {
    let connection: Connection
    let export: NBDExport
    var pool: BufferPool { connection.server.pool }
    private let lock = Monitor()
    private let header = AlignedBuffer(count: NBD.requestLength)
    private var closed = false
    private(set) var failure: Error?

    init(connection: Connection, export: NBDExport) {
      self.connection = connection
      self.export = export
    }

    /// Reads the next request under the read lock; nil when the connection is over.
    func next() -> Request? {
      lock.lock()
      defer { lock.unlock() }
      if closed { return nil }
      do {
        let p = header.pointer
        let options = connection.server.options
        try connection.socket.readRequest(
          into: p, count: NBD.requestLength, midRequest: false, idleLimit: options.idleTimeout,
          stallLimit: options.stallTimeout)
        guard p.loadBE(at: 0, as: UInt32.self) == NBD.requestMagic else {
          throw ToolkitError("bad request magic; closing the connection")
        }
        var request = Request(
          flags: p.loadBE(at: 4, as: UInt16.self), type: p.loadBE(at: 6, as: UInt16.self),
          cookie: p.loadBE(at: 8, as: UInt64.self), offset: p.loadBE(at: 16, as: UInt64.self),
          length: Int(p.loadBE(at: 24, as: UInt32.self)), buffer: nil, span: nil, status: nil, error: 0, budgeted: 0)
        if request.type == NBD.cmdDisconnect {
          closed = true
          return nil
        }
        if request.type == NBD.cmdWrite {
          // The payload follows whatever the verdict; too large cannot be skipped.
          guard request.length <= NBD.maximumPayload else {
            throw ToolkitError("WRITE of \(request.length) bytes exceeds the limit; closing the connection")
          }
          connection.server.budget.take(request.length)
          request.budgeted = request.length
          let buffer = pool.get(request.length)
          request.buffer = buffer
          do {
            try connection.socket.readRequest(
              into: buffer.pointer, count: request.length, midRequest: true, idleLimit: 0,
              stallLimit: options.stallTimeout)
          } catch {
            connection.server.budget.release(request.budgeted)
            throw error
          }
        }
        request.error = connection.validate(request, export)
        if request.error == 0 && request.type == NBD.cmdRead {
          // Counted against the budget whether the reply is sent from a
          // buffer or from a file (which holds the bytes in a pipe or the
          // socket's queue); the buffer is taken when needed.
          connection.server.budget.take(request.length)
          request.budgeted = request.length
        }
        return request
      } catch {
        closed = true
        failure = error
        return nil
      }
    }
  }

  /// Checks a request before any I/O; returns an NBD error number or 0.
  func validate(_ r: Request, _ export: NBDExport) -> UInt32 {
    let knownFlags = NBD.cmdFlagFUA | NBD.cmdFlagNoHole | NBD.cmdFlagFastZero | NBD.cmdFlagReqOne | NBD.cmdFlagDF
    if r.flags & ~knownFlags != 0 { return NBD.errInvalid }
    if r.flags & NBD.cmdFlagReqOne != 0 && r.type != NBD.cmdBlockStatus { return NBD.errInvalid }
    // DF only where offered (structured replies agreed), and only on READ,
    // whose data goes in one chunk anyway.
    if r.flags & NBD.cmdFlagDF != 0 && (!structuredReplies || r.type != NBD.cmdRead) { return NBD.errInvalid }
    switch r.type {
    case NBD.cmdBlockStatus:
      // Only with base:allocation selected for this export.
      guard allocationContext, r.length > 0 else { return NBD.errInvalid }
      let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
      return overflow || end > export.size ? NBD.errInvalid : 0
    case NBD.cmdRead, NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes, NBD.cmdCache:
      let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
      if overflow || end > export.size { return r.type == NBD.cmdWrite ? NBD.errNoSpace : NBD.errInvalid }
      // Too long: EINVAL (EOVERFLOW is kept for a READ with DF that cannot
      // go in one chunk, which never happens here).
      if r.type == NBD.cmdRead && r.length > NBD.maximumPayload { return NBD.errInvalid }
      if r.type != NBD.cmdRead && r.type != NBD.cmdCache && export.flags & NBD.flagReadOnly != 0 {
        return NBD.errPerm
      }
      return 0
    case NBD.cmdFlush:
      return 0
    default:
      return NBD.errInvalid
    }
  }

  private func execute(_ r: inout Request, _ export: NBDExport) {
    guard r.error == 0 else { return }
    let fua = r.flags & NBD.cmdFlagFUA != 0
    do {
      switch r.type {
      case NBD.cmdRead:
        if !socket.isTLS, r.length >= Connection.sendfileMinimum,
          let span = try export.fileSpan(offset: r.offset, length: r.length),
          Connection.isCached(span, r.length)
        {
          r.span = span
        } else {
          let b = server.pool.get(r.length)
          r.buffer = b
          try export.read(into: b.slice(0, r.length), at: r.offset)
        }
      case NBD.cmdWrite:
        if let b = r.buffer { try export.write(UnsafeRawBufferPointer(b.slice(0, r.length)), at: r.offset, fua: fua) }
      case NBD.cmdFlush:
        try export.flush()
      case NBD.cmdTrim:
        try export.trim(offset: r.offset, length: UInt64(r.length), fua: fua)
      case NBD.cmdWriteZeroes:
        try export.writeZeroes(offset: r.offset, length: UInt64(r.length), fua: fua)
      case NBD.cmdCache:
        break
      case NBD.cmdBlockStatus:
        let limit = r.flags & NBD.cmdFlagReqOne != 0 ? 1 : Connection.extentsPerReply
        let extents = try export.allocation(offset: r.offset, length: UInt32(r.length), limit: limit)
        r.status = try statusPayload(extents, length: r.length, limit: limit)
      default:
        r.error = NBD.errInvalid
      }
    } catch {
      r.error = NBDError.code(for: error)
      server.log("\(commandName(r.type)) of \(r.length) bytes at \(r.offset) failed: \(error)")
    }
  }

  /// The payload of a BLOCK_STATUS chunk: the context id, then each run's
  /// length and flags. Runs past the request, empty runs, and too many
  /// runs are the export's mistakes: refused, not sent.
  private func statusPayload(_ extents: [Extent], length: Int, limit: Int) throws -> [UInt8] {
    let total = extents.reduce(UInt64(0)) { $0 + UInt64($1.length) }
    guard !extents.isEmpty, extents.count <= limit, total <= UInt64(length), extents.allSatisfy({ $0.length > 0 })
    else {
      throw NBDError(NBD.errIO, "the export described \(extents.count) run(s) of \(total) bytes for \(length)")
    }
    var payload = [UInt8](repeating: 0, count: 4 + 8 * extents.count)
    payload.withUnsafeMutableBytes { raw in
      let p = raw.baseAddress!
      p.storeBE(NBD.baseAllocationID, at: 0)
      for (i, e) in extents.enumerated() {
        p.storeBE(e.length, at: 4 + 8 * i)
        p.storeBE(e.flags, at: 8 + 8 * i)
      }
    }
    return payload
  }

  /// Runs in one BLOCK_STATUS reply at most; the client asks again for more.
  static let extentsPerReply = 1024

  /// Sends a reply, and a READ's data with it, in as few system calls as it
  /// can: a simple reply, or with structured replies agreed, one chunk
  /// (OFFSET_DATA, BLOCK_STATUS, NONE or ERROR) marked done.
  private func reply(_ r: Request) {
    withUnsafeTemporaryAllocation(byteCount: 32, alignment: 8) { head in
      let h = head.baseAddress!
      var headLength = NBD.simpleReplyLength
      var data: UnsafeRawBufferPointer?
      let structured = structuredReplies && (r.type == NBD.cmdRead || r.type == NBD.cmdBlockStatus)
      if !structured {
        h.storeBE(NBD.simpleReplyMagic, at: 0)
        h.storeBE(r.error, at: 4)
        h.storeBE(r.cookie, at: 8)
        if r.type == NBD.cmdRead && r.error == 0, let b = r.buffer {
          data = UnsafeRawBufferPointer(start: b.pointer, count: r.length)
        }
      } else {
        h.storeBE(NBD.structuredReplyMagic, at: 0)
        h.storeBE(NBD.replyFlagDone, at: 4)
        h.storeBE(r.cookie, at: 8)
        headLength = NBD.structuredReplyLength
        if r.error != 0 {
          // error (u32) and an empty message (u16 length).
          h.storeBE(NBD.replyTypeError, at: 6)
          h.storeBE(UInt32(6), at: 16)
          h.storeBE(r.error, at: 20)
          h.storeBE(UInt16(0), at: 24)
          headLength += 6
        } else if r.type == NBD.cmdBlockStatus, let status = r.status {
          h.storeBE(NBD.replyTypeBlockStatus, at: 6)
          h.storeBE(UInt32(status.count), at: 16)
        } else if r.length == 0 {
          h.storeBE(NBD.replyTypeNone, at: 6)
          h.storeBE(UInt32(0), at: 16)
        } else {
          h.storeBE(NBD.replyTypeOffsetData, at: 6)
          h.storeBE(UInt32(8 + r.length), at: 16)
          h.storeBE(r.offset, at: 20)
          headLength += 8
          if let b = r.buffer { data = UnsafeRawBufferPointer(start: b.pointer, count: r.length) }
        }
      }
      let header = UnsafeRawBufferPointer(start: h, count: headLength)
      sendLock.wait()
      defer { sendLock.signal() }
      do {
        if r.error == 0, let span = r.span {
          try socket.send(header, from: span.fd, at: span.offset, count: r.length)
        } else if r.error == 0, let status = r.status {
          try status.withUnsafeBytes { try socket.send(header, $0) }
        } else {
          try socket.send(header, data)
        }
      } catch {
        // The reply is cut short (its header may be gone already): the
        // client must not take what it got for data, so it is cut off.
        if r.span != nil { server.log("READ of \(r.length) bytes at \(r.offset): \(error); disconnecting the client") }
        socket.shutdown()
      }
    }
  }

  private func commandName(_ type: UInt16) -> String {
    switch type {
    case NBD.cmdRead: return "READ"
    case NBD.cmdWrite: return "WRITE"
    case NBD.cmdFlush: return "FLUSH"
    case NBD.cmdTrim: return "TRIM"
    case NBD.cmdWriteZeroes: return "WRITE_ZEROES"
    case NBD.cmdBlockStatus: return "BLOCK_STATUS"
    default: return "command \(type)"
    }
  }
}

/// Reusable request buffers, by size. A few buffers up to `keepSize` are
/// kept for the next requests, so memory stays bounded: larger or surplus
/// buffers are freed when given back.
final class BufferPool: @unchecked Sendable {
  private let lock = DispatchSemaphore(value: 1)
  private var free: [AlignedBuffer] = []
  private var freeBytes = 0
  let keepCount: Int
  let keepSize: Int
  /// The most bytes kept in all, whatever their count.
  let keepBytes: Int

  init(keepCount: Int = 8, keepSize: Int = 1 << 20, keepBytes: Int = .max) {
    self.keepCount = keepCount
    self.keepSize = keepSize
    self.keepBytes = keepBytes
  }

  func get(_ size: Int) -> AlignedBuffer {
    lock.wait()
    if let i = free.firstIndex(where: { $0.count >= size && $0.count <= max(size * 4, 1 << 20) }) {
      let b = free.remove(at: i)
      freeBytes -= b.count
      lock.signal()
      return b
    }
    lock.signal()
    return AlignedBuffer(count: max(size, 4096))
  }

  func put(_ buffer: AlignedBuffer) {
    lock.wait()
    if free.count < keepCount && buffer.count <= keepSize && freeBytes + buffer.count <= keepBytes {
      free.append(buffer)
      freeBytes += buffer.count
    }
    lock.signal()
  }
}

/// Bytes of request buffers in use across a server's connections. A taker
/// waits until its bytes fit (one request always fits when nothing else
/// is taken, so no request waits forever).
final class ByteBudget: @unchecked Sendable {
  private let monitor = Monitor()
  private let limit: Int
  private var used = 0

  init(limit: Int) { self.limit = limit }

  func take(_ bytes: Int) {
    guard bytes > 0 else { return }
    monitor.lock()
    while used > 0 && used + bytes > limit { monitor.wait() }
    used += bytes
    monitor.unlock()
  }

  func release(_ bytes: Int) {
    guard bytes > 0 else { return }
    monitor.lock()
    used -= bytes
    monitor.broadcast()
    monitor.unlock()
  }
}
