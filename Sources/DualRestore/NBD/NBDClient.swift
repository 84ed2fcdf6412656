// An NBD client: one connection to one export, shared by many threads.
//
// Invariants:
// - Requests go out whole: a lock serialises each header and its payload,
//   and the header buffer under that lock is reused, so a request allocates
//   nothing on the heap once the slot table has grown to the concurrency.
// - One reader thread per connection reads simple replies and hands each to
//   the request waiting on its cookie; a READ's data lands straight in the
//   caller's buffer, or, for a READ into a file, goes from the socket to the
//   file through a pipe (splice(2): not copied through memory here; over
//   TLS, through the reader's buffer). A caller's buffer is touched by the
//   reader only while its slot is `.receiving`, and the caller does not
//   return before that state has ended.
// - A READ into a file whose write fails still takes the reply's data off
//   the connection (discarded), so the connection goes on; the caller gets
//   NBDFileWriteError.
// - A client opened for allocation negotiates structured replies and the
//   base:allocation metadata context, and sends only BLOCK_STATUS: its
//   reader takes structured chunks (block status, errors, none) until the
//   one marked done; any other chunk breaks the protocol. Data requests go
//   over clients with simple replies, whose reader stays as above.
// - A connection that breaks (end of input, a socket error, a reply with a
//   bad magic or an unknown cookie, a request that timed out) fails every
//   request waiting on it and is never used again. The next request
//   connects anew, after an exponential backoff, within its own time limit;
//   the export must keep its size.
// - Every request ends within `timeout` seconds of its start (connecting
//   again included), except for a TCP connect(2) to an unreachable host,
//   which the kernel bounds.
// - Ranges past the end of the export, and writes to a read-only export,
//   are refused before anything is sent.
// - nbds:// and nbds+unix:// ask for NBD_OPT_STARTTLS first and verify the
//   server's certificate (against tls-certificates=DIR/ca-cert.pem or the
//   system's store; for TCP, against the host name); a server that does not
//   offer TLS is refused, never used in the clear. The TLS context is loaded
//   once per client and used by every connection made again.

import CShim
import Dispatch
import Glibc
import Synchronization

public final class NBDClient: BlockSource, @unchecked Sendable {
  public let uri: NBDURI
  /// The URI as given.
  public let name: String
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
  private let tlsContext: TLSClientContext?
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

  /// Set when the server answered ESHUTDOWN (it is stopping); cleared by reading.
  private var shutdownSeen = false

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

  // Guarded by `state`.
  private let state = Monitor()
  private var connection: NBDClientConnection?
  private var connecting = false
  private var isClosed = false
  private var reconnectCount = 0
  private var backoff = NBDClient.initialBackoff
  private var nextAttempt = 0.0
  private var lastConnectError: String?

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
  public init(uri text: String, timeout: Double = 30, allocation: Bool = false) throws {
    let uri = try NBDURI(text)
    guard timeout > 0, timeout.isFinite else { throw ToolkitError("\(text): the time limit must be positive") }
    let tlsContext = uri.tls ? try TLSClientContext(certificates: uri.tlsCertificates) : nil
    let connection: NBDClientConnection
    let export: NBDClientExport
    do {
      (connection, export) = try NBDClientConnection.open(
        uri, tls: tlsContext, allocation: allocation, deadline: monotonicSeconds() + timeout, timeout: timeout)
    } catch let failure as NBDClientFailure {
      throw ToolkitError("\(text): \(failure.cause)")
    }
    self.uri = uri
    self.name = text
    self.timeout = timeout
    self.tlsContext = tlsContext
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
  /// straight from the connection (see the invariants). A failed write to
  /// the file throws NBDFileWriteError; what the file holds of the range is
  /// then unknown.
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
    try checkWritable(NBD.cmdWrite, offset: offset, length: buffer.count)
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
    let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { zeroes.deallocate() }
    zeroes.initializeMemory(as: UInt8.self, repeating: 0)
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(chunk), length - done))
      try transfer(
        NBD.cmdWrite, flags: 0, offset: offset + done, length: n, into: nil, from: UnsafeRawPointer(zeroes.baseAddress!)
      )
      done += UInt64(n)
    }
    if fua { try flush() }
  }

  /// The whole export is data: block status is not asked for.
  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { (true, size) }

  // MARK: Checks and messages

  private func describe(_ command: UInt16, offset: UInt64, length: UInt64) -> String {
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

  private func checkWritable(_ command: UInt16, offset: UInt64, length: Int) throws {
    try checkWritable(command, offset: offset, length: UInt64(length))
  }

  /// The sentence for a request that failed: the server's error or the
  /// connection's failure.
  private func failure(
    _ command: UInt16, offset: UInt64, length: Int, serverError: UInt32, cause: String?
  ) -> ToolkitError {
    if serverError == NBD.errShutdown { state.withLock { shutdownSeen = true } }
    let what = describe(command, offset: offset, length: UInt64(length))
    if let cause { return ToolkitError("\(name): \(what) failed: \(cause)") }
    return ToolkitError("\(name): \(what) failed: \(NBDClient.errorText(serverError))")
  }

  // MARK: Sending and waiting

  /// A READ or WRITE, split at `maximumRequest` with a few chunks in flight.
  private func transfer(
    _ command: UInt16, flags: UInt16, offset: UInt64, length: Int,
    into: UnsafeMutableRawPointer?, from: UnsafeRawPointer?, file: FileTarget? = nil
  ) throws {
    if length <= maximumRequest {
      try request(command, flags: flags, offset: offset, length: length, into: into, from: from, file: file)
      return
    }
    var inFlight:
      [(connection: NBDClientConnection, slot: NBDClientSlot, deadline: Double, offset: UInt64, length: Int)] = []
    inFlight.reserveCapacity(NBDClient.splitWindow)
    var head = 0
    var done = 0
    var firstError: Error?
    while done < length || head < inFlight.count {
      if firstError == nil && done < length && inFlight.count - head < NBDClient.splitWindow {
        let n = min(maximumRequest, length - done)
        let deadline = monotonicSeconds() + timeout
        do {
          let (c, slot) = try submit(
            command, flags: flags, offset: offset + UInt64(done), length: n,
            into: into.map { $0 + done }, from: from.map { $0 + done },
            file: file.map { FileTarget(fd: $0.fd, offset: $0.offset + UInt64(done)) }, deadline: deadline)
          inFlight.append((c, slot, deadline, offset + UInt64(done), n))
        } catch {
          firstError = error
        }
        done += n
        continue
      }
      if head == inFlight.count { break }
      let entry = inFlight[head]
      head += 1
      let outcome = entry.connection.finish(entry.slot, deadline: entry.deadline, timeout: timeout)
      if firstError == nil, let error = failure(command, offset: entry.offset, length: entry.length, outcome) {
        firstError = error
      }
    }
    if let firstError { throw firstError }
  }

  /// TRIM or WRITE_ZEROES, split at `maximumRangeRequest`.
  private func ranged(_ command: UInt16, flags: UInt16, offset: UInt64, length: UInt64) throws {
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(NBDClient.maximumRangeRequest), length - done))
      try request(command, flags: flags, offset: offset + done, length: n, into: nil, from: nil)
      done += UInt64(n)
    }
  }

  /// One request on the wire, waited for; how it ended, when it worked.
  @discardableResult
  private func request(
    _ command: UInt16, flags: UInt16, offset: UInt64, length: Int,
    into: UnsafeMutableRawPointer?, from: UnsafeRawPointer?, file: FileTarget? = nil
  ) throws -> NBDClientOutcome {
    let deadline = monotonicSeconds() + timeout
    let (c, slot) = try submit(
      command, flags: flags, offset: offset, length: length, into: into, from: from, file: file,
      deadline: deadline)
    let outcome = c.finish(slot, deadline: deadline, timeout: timeout)
    if let error = failure(command, offset: offset, length: length, outcome) { throw error }
    return outcome
  }

  /// The error a finished request ends with, if any.
  private func failure(_ command: UInt16, offset: UInt64, length: Int, _ outcome: NBDClientOutcome) -> Error? {
    if outcome.serverError != 0 || outcome.cause != nil {
      return failure(command, offset: offset, length: length, serverError: outcome.serverError, cause: outcome.cause)
    }
    if outcome.fileErrno != 0 { return NBDFileWriteError(errno: outcome.fileErrno, offset: offset, length: length) }
    return nil
  }

  /// Registers and sends one request, connecting again first when the
  /// connection is gone. A request that could not be sent whole was not
  /// seen by the server and is sent again on the next connection.
  private func submit(
    _ command: UInt16, flags: UInt16, offset: UInt64, length: Int,
    into: UnsafeMutableRawPointer?, from: UnsafeRawPointer?, file: FileTarget? = nil, deadline: Double
  ) throws -> (NBDClientConnection, NBDClientSlot) {
    // A client opened for allocation gets structured replies: only
    // BLOCK_STATUS goes over it.
    guard forAllocation == (command == NBD.cmdBlockStatus) else {
      throw ToolkitError(
        "\(name): \(describe(command, offset: offset, length: UInt64(length))) goes over "
          + (forAllocation ? "a connection for data, not this one for block status" : "a connection for block status"))
    }
    while true {
      let c: NBDClientConnection
      do {
        c = try liveConnection(deadline: deadline)
      } catch let f as NBDClientFailure {
        throw failure(command, offset: offset, length: length, serverError: 0, cause: f.cause)
      }
      // A request that meets a connection the server broke by breaking the
      // protocol reports that; later requests connect again.
      if command == NBD.cmdBlockStatus && c.allocationID == nil {
        throw failure(
          command, offset: offset, length: length, serverError: 0,
          cause: "the server no longer gives base:allocation since it was connected again")
      }
      guard
        let slot = c.register(
          into: command == NBD.cmdRead ? into : nil, file: command == NBD.cmdRead ? file : nil, length: length,
          extents: command == NBD.cmdBlockStatus)
      else {
        if let v = c.protocolViolation {
          throw failure(command, offset: offset, length: length, serverError: 0, cause: v)
        }
        continue
      }
      if c.send(command, flags: flags, cookie: slot.cookie, offset: offset, length: length, payload: from) {
        return (c, slot)
      }
      // The send failed and failed the connection, which wakes the slot.
      let cause = c.finish(slot, deadline: deadline, timeout: timeout).cause
      if let v = c.protocolViolation {
        throw failure(command, offset: offset, length: length, serverError: 0, cause: v)
      }
      if monotonicSeconds() >= deadline {
        throw failure(command, offset: offset, length: length, serverError: 0, cause: cause ?? "the connection broke")
      }
    }
  }

  /// The current connection, or a new one once the backoff allows.
  private func liveConnection(deadline: Double) throws -> NBDClientConnection {
    state.lock()
    defer { state.unlock() }
    while true {
      if isClosed { throw NBDClientFailure("the client is closed") }
      if let c = connection {
        if !c.isFailed { return c }
        connection = nil
      }
      if connecting {
        // Another request is connecting; its outcome serves this one too.
        if !state.wait(until: deadline) { throw gaveUp() }
        continue
      }
      let now = monotonicSeconds()
      let start = max(now, nextAttempt)
      if start >= deadline { throw gaveUp() }
      connecting = true
      state.unlock()
      if start > now { sleepSeconds(start - now) }
      let outcome: Result<(NBDClientConnection, NBDClientExport), NBDClientFailure>
      do {
        outcome = .success(
          try NBDClientConnection.open(
            uri, tls: tlsContext, allocation: forAllocation, deadline: deadline, timeout: timeout))
      } catch let f as NBDClientFailure {
        outcome = .failure(f)
      } catch {
        outcome = .failure(NBDClientFailure("\(error)"))
      }
      state.lock()
      connecting = false
      state.broadcast()
      switch outcome {
      case .success(let (c, export)):
        if isClosed {
          c.disconnect()
          throw NBDClientFailure("the client is closed")
        }
        if export.size != size {
          c.disconnect()
          let why = "the export's size changed from \(size) to \(export.size) bytes since the first connection"
          noteAttemptFailed(why)
          throw NBDClientFailure(why)
        }
        if let first = exportDescription, export.description != first {
          c.disconnect()
          let why =
            "the export is no longer the one first connected to: it was '\(first)', it is now '\(export.description ?? "")'"
          noteAttemptFailed(why)
          throw NBDClientFailure(why)
        }
        connection = c
        reconnectCount += 1
        backoff = NBDClient.initialBackoff
        nextAttempt = 0
        lastConnectError = nil
        c.startReader()
        return c
      case .failure(let f):
        noteAttemptFailed(f.cause)
      }
    }
  }

  /// Called with `state` held.
  private func noteAttemptFailed(_ cause: String) {
    lastConnectError = cause
    nextAttempt = monotonicSeconds() + backoff
    backoff = min(backoff * 2, NBDClient.maximumBackoff)
  }

  /// Called with `state` held.
  private func gaveUp() -> NBDClientFailure {
    let last = lastConnectError.map { " (\($0))" } ?? ""
    return NBDClientFailure(
      "the connection broke and could not be made again within \(formatSeconds(timeout)) s\(last)")
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

// MARK: - The connection

fileprivate struct NBDClientFailure: Error {
  let cause: String
  init(_ cause: String) { self.cause = cause }
}

fileprivate struct NBDClientExport {
  var size: UInt64
  var flags: UInt16
  /// NBD_INFO_DESCRIPTION, when the server gives one.
  var description: String?
  var minimum: UInt32?
  var preferred: UInt32?
  var maximum: UInt32?
  /// Structured replies were agreed, and the id base:allocation was given.
  var structured = false
  var allocationID: UInt32?
}

/// A READ's data could not be written to the file it was read into (the
/// connection to the server is unharmed).
public struct NBDFileWriteError: Error, CustomStringConvertible {
  public let errno: Int32
  /// The export's range whose data was being written.
  public let offset: UInt64
  public let length: Int

  public var description: String { "cannot write \(length) bytes read at \(offset): \(Errno(errno))" }
}

/// Where a READ's data goes when not to memory: a file, at an offset.
fileprivate struct FileTarget {
  let fd: Int32
  let offset: UInt64
}

/// How a request ended: the server's error, why it got no reply, and the
/// error of writing a READ's data to its file (0 when none).
fileprivate struct NBDClientOutcome {
  var serverError: UInt32 = 0
  var cause: String?
  var fileErrno: Int32 = 0
  /// A BLOCK_STATUS reply's runs, as the server sent them.
  var extents: [Extent] = []
}

fileprivate enum NBDClientSlotState {
  case free, waiting, receiving, done, abandoned
}

/// One request in flight; reused for later requests once its waiter is done.
fileprivate final class NBDClientSlot {
  let index: Int
  let semaphore = DispatchSemaphore(value: 0)
  // Guarded by the connection's lock.
  var cookie: UInt64 = 0
  var state = NBDClientSlotState.free
  var buffer: UnsafeMutableRawPointer?
  var file: FileTarget?
  var length = 0
  var serverError: UInt32 = 0
  var failure: String?
  var fileErrno: Int32 = 0
  /// BLOCK_STATUS: its reply is structured chunks, gathered here.
  var wantsExtents = false
  var extents: [Extent] = []
  /// The connection's file-writing time when the request was registered.
  var fileWriteMark: UInt64 = 0

  init(index: Int) { self.index = index }
}

fileprivate final class NBDClientConnection: @unchecked Sendable {
  let socket: Socket
  /// Serialises requests on the wire; guards `header`.
  private let sendLock = Monitor()
  private let header = UnsafeMutableRawPointer.allocate(byteCount: NBD.requestLength, alignment: 8)
  /// The reader thread's.
  private let reply = UnsafeMutableRawPointer.allocate(byteCount: NBD.structuredReplyLength, alignment: 8)
  /// Replies may be structured chunks (a client opened for allocation).
  let structured: Bool
  /// The id of base:allocation on this connection, if the server gave it.
  let allocationID: UInt32?
  /// The reader's, for READs into files: a pipe (read end, write end, and
  /// its capacity; none over TLS or when the system has none to give), and
  /// a buffer for what cannot be spliced or is discarded.
  private var pipe: (out: Int32, in: Int32, capacity: Int)?
  private var pipeTried = false
  /// The file refused splice (EINVAL): replies go through the buffer.
  private var spliceRefused = false
  private var scratch: UnsafeMutableRawPointer?
  private static let scratchSize = 256 << 10
  /// The longest structured reply chunk taken (a million runs of block status).
  private static let maximumChunk = 8 << 20

  // Guarded by `lock`.
  private let lock = Monitor()
  private var slots: [NBDClientSlot] = []
  private var freeSlots: [Int] = []
  private var sequence: UInt32 = 0
  private var failure: String?
  /// Why the server was found breaking the protocol (a reply with a bad
  /// magic or an unknown cookie), when that is what ended the connection.
  private var violation: String?
  /// Time the reader has spent writing READ replies into files: the
  /// replies behind it wait for the local disk, not for the server, and
  /// that time does not count against their limit.
  private let fileWriteNanoseconds = Atomic<UInt64>(0)

  init(socket: Socket, export: NBDClientExport) {
    self.socket = socket
    self.structured = export.structured
    self.allocationID = export.allocationID
    slots.reserveCapacity(64)
    freeSlots.reserveCapacity(64)
  }

  deinit {
    header.deallocate()
    reply.deallocate()
    scratch?.deallocate()
    if let pipe {
      close(pipe.out)
      close(pipe.in)
    }
  }

  var isFailed: Bool { lock.withLock { failure != nil } }

  /// The protocol violation that ended this connection, if one did.
  var protocolViolation: String? { lock.withLock { violation } }

  // MARK: Opening

  /// Connects and negotiates; throws NBDClientFailure.
  static func open(
    _ uri: NBDURI, tls: TLSClientContext?, allocation: Bool, deadline: Double, timeout: Double
  ) throws -> (NBDClientConnection, NBDClientExport) {
    let remaining = deadline - monotonicSeconds()
    guard remaining > 0 else { throw NBDClientFailure("no time left to connect") }
    let socket: Socket
    do {
      socket = try Socket.connect(uri.endpoint, timeout: remaining)
    } catch {
      throw NBDClientFailure("\(error)")
    }
    let export = try NBDClientHandshake(socket: socket, uri: uri, tls: tls, allocation: allocation).run()
    // Replies may be far apart; the reader waits without a limit and the
    // requests time themselves. Sends stay bounded.
    socket.setWriteTimeout(timeout)
    socket.setReadTimeout(0)
    return (NBDClientConnection(socket: socket, export: export), export)
  }

  func startReader() {
    startThread { [self] in readReplies() }
  }

  // MARK: Requests

  /// A slot for a new request, or nil when the connection has failed.
  func register(
    into buffer: UnsafeMutableRawPointer?, file: FileTarget? = nil, length: Int, extents: Bool = false
  ) -> NBDClientSlot? {
    lock.lock()
    defer { lock.unlock() }
    if failure != nil { return nil }
    let slot: NBDClientSlot
    if let i = freeSlots.popLast() {
      slot = slots[i]
    } else {
      slot = NBDClientSlot(index: slots.count)
      slots.append(slot)
    }
    sequence &+= 1
    slot.cookie = UInt64(sequence) << 32 | UInt64(slot.index)
    slot.state = .waiting
    slot.buffer = buffer
    slot.file = file
    slot.length = buffer == nil && file == nil ? 0 : length
    slot.serverError = 0
    slot.failure = nil
    slot.fileErrno = 0
    slot.wantsExtents = extents
    slot.extents.removeAll(keepingCapacity: true)
    slot.fileWriteMark = fileWriteNanoseconds.load(ordering: .relaxed)
    return slot
  }

  /// Sends a request whole; false (and the connection failed) otherwise.
  func send(
    _ command: UInt16, flags: UInt16, cookie: UInt64, offset: UInt64, length: Int, payload: UnsafeRawPointer?
  ) -> Bool {
    sendLock.lock()
    defer { sendLock.unlock() }
    header.storeBE(NBD.requestMagic, at: 0)
    header.storeBE(flags, at: 4)
    header.storeBE(command, at: 6)
    header.storeBE(cookie, at: 8)
    header.storeBE(offset, at: 16)
    header.storeBE(UInt32(truncatingIfNeeded: length), at: 24)
    if let cause = sendRequest(payload: payload, length: length) {
      // Fail before other senders get the lock: the stream is cut mid-request.
      fail(cause)
      return false
    }
    return true
  }

  /// The header (and a WRITE's payload); over TLS, the header shares a
  /// record with the start of the payload.
  private func sendRequest(payload: UnsafeRawPointer?, length: Int) -> String? {
    if socket.isTLS, let payload {
      do {
        try socket.send(
          UnsafeRawBufferPointer(start: header, count: NBD.requestLength),
          UnsafeRawBufferPointer(start: payload, count: length))
        return nil
      } catch {
        return describeSendFailure(error)
      }
    }
    return sendAll(UnsafeRawPointer(header), NBD.requestLength, more: payload != nil)
      ?? payload.flatMap({ sendAll($0, length, more: false) })
  }

  private func describeSendFailure(_ error: Error) -> String {
    if let e = error as? ToolkitError, e.message.hasSuffix("timed out") {
      return "the server did not take the request in time"
    }
    return "the connection broke (\(error))"
  }

  private func sendAll(_ buffer: UnsafeRawPointer, _ count: Int, more: Bool) -> String? {
    if socket.isTLS {
      // The TLS session serialises records itself; the send lock keeps a
      // header and its payload together.
      do {
        try socket.write(buffer, count: count)
        return nil
      } catch {
        return describeSendFailure(error)
      }
    }
    var done = 0
    let flags = Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
    while done < count {
      let n = Glibc.send(socket.fd, buffer + done, count - done, flags)
      if n < 0 {
        let e = errno
        if e == EINTR { continue }
        if e == EAGAIN || e == EWOULDBLOCK { return "the server did not take the request in time" }
        return "the connection broke (\(Errno(e)))"
      }
      done += n
    }
    return nil
  }

  /// Waits for a registered request's reply and frees its slot: the
  /// server's error number, or why the request got no reply.
  func finish(_ slot: NBDClientSlot, deadline: Double, timeout: Double) -> NBDClientOutcome {
    var deadline = deadline
    var excused = 0.0
    while slot.semaphore.wait(timeout: .now() + max(0, deadline - monotonicSeconds())) == .timedOut {
      let cause = "no reply within \(formatSeconds(timeout)) s"
      lock.lock()
      // Time the reader spent writing files since the request began is
      // the local disk's, not the server's: it is added to the limit.
      let writing = Double(fileWriteNanoseconds.load(ordering: .relaxed) &- slot.fileWriteMark) / 1e9
      if writing > excused + 0.001 {
        deadline += writing - excused
        excused = writing
        lock.unlock()
        continue
      }
      let state = slot.state
      if state == .waiting {
        // The reader will never touch this slot again: its cookie is
        // unknown from now on, and the connection is dropped anyway.
        slot.state = .abandoned
        slot.buffer = nil
        slot.file = nil
        lock.unlock()
        fail(cause)
        return NBDClientOutcome(cause: cause)
      }
      lock.unlock()
      // The reply is arriving into the caller's buffer: cut it short and
      // wait for the reader to let go of the buffer.
      if state == .receiving { fail(cause) }
      slot.semaphore.wait()
      break
    }
    lock.lock()
    let result = NBDClientOutcome(
      serverError: slot.serverError, cause: slot.failure, fileErrno: slot.fileErrno, extents: slot.extents)
    slot.state = .free
    slot.buffer = nil
    slot.file = nil
    freeSlots.append(slot.index)
    lock.unlock()
    return result
  }

  /// `fail`, for a server that broke the protocol: the requests that meet
  /// the broken connection report that, rather than a new connection's fate.
  private func failViolating(_ cause: String) {
    lock.withLock { if failure == nil { violation = cause } }
    fail(cause)
  }

  /// Marks the connection broken (the first cause wins), fails the requests
  /// waiting on it and wakes the reader.
  func fail(_ cause: String) {
    lock.lock()
    if failure == nil { failure = cause }
    let reason = failure ?? cause
    for slot in slots where slot.state == .waiting {
      slot.state = .done
      slot.failure = reason
      slot.semaphore.signal()
    }
    lock.unlock()
    socket.shutdown()
  }

  /// The server answered ESHUTDOWN: it is going away and waits for us to
  /// leave. No new request uses this connection (the next one reconnects);
  /// the requests in flight get their replies, then NBD_CMD_DISC is sent
  /// and the connection closed (the protocol's soft disconnect).
  private func beginSoftDisconnect() {
    lock.withLock {
      if failure == nil { failure = "the server is shutting down" }
    }
  }

  /// Soft disconnect from outside the reader: no new requests here, and the
  /// disconnect is sent now if nothing is in flight (else by the reader
  /// after the last reply).
  func softDisconnect() {
    beginSoftDisconnect()
    if !hasWaiting { sendDisconnectAndClose() }
  }

  private var hasWaiting: Bool {
    lock.withLock { slots.contains { $0.state == .waiting } }
  }

  private func sendDisconnectAndClose() {
    sendLock.lock()
    sendDisconnect()
    sendLock.unlock()
    socket.shutdown()
  }

  /// NBD_CMD_DISC; the send lock is held.
  private func sendDisconnect() {
    header.storeBE(NBD.requestMagic, at: 0)
    header.storeBE(UInt16(0), at: 4)
    header.storeBE(NBD.cmdDisconnect, at: 6)
    header.storeBE(UInt64(0), at: 8)
    header.storeBE(UInt64(0), at: 16)
    header.storeBE(UInt32(0), at: 24)
    _ = sendAll(UnsafeRawPointer(header), NBD.requestLength, more: false)
  }

  /// Sends NBD_CMD_DISC (when the connection still works) and closes.
  func disconnect() {
    sendLock.lock()
    if !isFailed { sendDisconnect() }
    sendLock.unlock()
    fail("the client was closed")
  }

  // MARK: The reader thread

  /// One structured reply chunk, whose first 16 bytes are in `reply`: a
  /// BLOCK_STATUS reply's runs, an error, or the end. Returns the server's
  /// error number so far for the request (0 when none), or nil when the
  /// connection has ended.
  private func receiveChunk() -> UInt32? {
    do {
      try socket.read(into: reply + NBD.simpleReplyLength, count: NBD.structuredReplyLength - NBD.simpleReplyLength)
    } catch {
      fail("the connection broke (\(error))")
      return nil
    }
    let flags = reply.loadBE(at: 4, as: UInt16.self)
    let type = reply.loadBE(at: 6, as: UInt16.self)
    let cookie = reply.loadBE(at: 8, as: UInt64.self)
    let length = Int(reply.loadBE(at: 16, as: UInt32.self))
    lock.lock()
    let index = Int(truncatingIfNeeded: cookie & 0xffff_ffff)
    guard index < slots.count, slots[index].cookie == cookie, slots[index].state == .waiting else {
      lock.unlock()
      failViolating("the server replied to an unknown request (cookie 0x\(String(cookie, radix: 16)))")
      return nil
    }
    let slot = slots[index]
    guard slot.wantsExtents else {
      lock.unlock()
      failViolating("the server sent a structured reply to a request that takes a simple one")
      return nil
    }
    slot.state = .receiving
    lock.unlock()

    // A long block status (a fragmented file) gets a buffer of its own.
    let large = length > NBDClientConnection.scratchSize && length <= NBDClientConnection.maximumChunk
    let payload = large ? UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 8) : scratchBuffer()
    defer { if large { payload.deallocate() } }
    var broken: String?
    var violation: String?
    if length > NBDClientConnection.maximumChunk {
      violation = "the server sent a reply chunk of \(length) bytes (at most \(NBDClientConnection.maximumChunk) taken)"
    } else if length > 0 {
      do { try socket.read(into: payload, count: length) } catch { broken = "the connection broke (\(error))" }
    }
    let last = flags & NBD.replyFlagDone != 0
    if broken == nil && violation == nil {
      switch type {
      case NBD.replyTypeBlockStatus:
        if length < 12 || (length - 4) % 8 != 0 {
          violation = "the server sent a malformed block status chunk (\(length) bytes)"
        } else if payload.loadBE(at: 0, as: UInt32.self) != allocationID {
          violation = "the server sent block status of a metadata context not asked for"
        } else if !slot.extents.isEmpty {
          // One context asked for: one block status chunk.
          violation = "the server sent block status twice for one request"
        } else {
          for i in stride(from: 4, to: length, by: 8) {
            slot.extents.append(
              Extent(length: payload.loadBE(at: i, as: UInt32.self), flags: payload.loadBE(at: i + 4, as: UInt32.self)))
          }
        }
      case NBD.replyTypeNone:
        if length != 0 || !last { violation = "the server sent a malformed closing chunk" }
      case let t where t & 0x8000 != 0:
        if length < 6 || 6 + Int(payload.loadBE(at: 4, as: UInt16.self)) > length {
          violation = "the server sent a malformed error chunk"
        } else {
          let e = payload.loadBE(at: 0, as: UInt32.self)
          slot.serverError = e == 0 ? NBD.errIO : e
        }
      default:
        violation = "the server sent a reply chunk of type \(type) to BLOCK_STATUS"
      }
    }
    lock.lock()
    if let cause = broken ?? violation ?? failure {
      // Broken here, or failed meanwhile (a caller's time ran out): the
      // request ends now rather than waiting for chunks never read.
      slot.failure = failure ?? cause
      slot.state = .done
    } else {
      slot.state = last ? .done : .waiting
    }
    let finished = slot.state == .done
    let error = slot.serverError
    lock.unlock()
    if finished { slot.semaphore.signal() }
    if let broken {
      fail(broken)
      return nil
    }
    if let violation {
      failViolating(violation)
      return nil
    }
    return error
  }

  /// The reader's buffer, made on first use.
  private func scratchBuffer() -> UnsafeMutableRawPointer {
    if let scratch { return scratch }
    let b = UnsafeMutableRawPointer.allocate(byteCount: NBDClientConnection.scratchSize, alignment: 4096)
    scratch = b
    return b
  }

  /// A READ reply's data, into a file: spliced through the pipe, or read
  /// into the scratch buffer and written. After a failed write the rest is
  /// read and discarded. Returns why the connection broke, if it did, and
  /// the file's errno (0 when every byte was written).
  private func receive(_ length: Int, into file: FileTarget) -> (String?, Int32) {
    if !pipeTried && !socket.isTLS {
      pipeTried = true
      var fds: [Int32] = [-1, -1]
      let capacity = dr_pipe(&fds, 1 << 20)
      if capacity >= 4096 {
        pipe = (fds[0], fds[1], capacity)
      } else if capacity > 0 {
        close(fds[0])
        close(fds[1])
      }
    }
    let scratch = scratchBuffer()
    var remaining = length
    var position = file.offset
    var fileErrno: Int32 = 0
    guard let pipe, !socket.isTLS, !spliceRefused else {
      while remaining > 0 {
        let n = min(remaining, NBDClientConnection.scratchSize)
        do {
          try socket.read(into: scratch, count: n)
        } catch {
          return ("the connection broke (\(error))", fileErrno)
        }
        if fileErrno == 0, case .failure(let e) = writingFile({ pwriteFull(file.fd, scratch, n, position) }) {
          fileErrno = e.rawValue
        }
        remaining -= n
        position += UInt64(n)
      }
      return (nil, fileErrno)
    }
    let page: UInt64 = 4096
    while remaining > 0 {
      // The pipe is empty here, so the splice cannot wait for room in it.
      var n = dr_splice_in(socket.fd, pipe.in, UInt(min(remaining, pipe.capacity)), 1)
      if n < 0 && errno == EINTR { continue }
      if n < 0 { return ("the connection broke (\(Errno(errno)))", fileErrno) }
      if n == 0 { return ("the connection broke (\(socket.peer): connection closed)", fileErrno) }
      remaining -= n
      // Then more of the reply, as far as the pipe takes it, without
      // waiting for room in the pipe (a TCP socket may still wait for the
      // rest of the reply, which is on its way): fewer, longer writes.
      while remaining > 0 && n < pipe.capacity {
        let m = dr_splice_in(socket.fd, pipe.in, UInt(min(remaining, pipe.capacity - n)), 0)
        if m < 0 && errno == EINTR { continue }
        if m < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
        if m < 0 { return ("the connection broke (\(Errno(errno)))", fileErrno) }
        if m == 0 { return ("the connection broke (\(socket.peer): connection closed)", fileErrno) }
        n += m
        remaining -= m
      }
      // Into the file up to a page boundary (all of it at the reply's end):
      // a write ending inside a page that is not cached has the page read
      // from the device first.
      let end = position + UInt64(n)
      let whole = remaining == 0 ? end : max(position, end & ~(page - 1))
      if let cause = splice(Int(whole - position), from: pipe.out, to: file, at: &position, fileErrno: &fileErrno) {
        return (cause, fileErrno)
      }
      let tail = Int(end - whole)
      guard tail > 0 else { continue }
      // The start of a page: from the pipe into memory; the rest of the
      // page from the socket, and the page written whole.
      let more = min(Int(page - (end & (page - 1))), remaining)
      switch readFull(pipe.out, scratch, tail) {
      case .success(let got) where got == tail: break
      case .success: return ("the connection broke (its pipe ended)", fileErrno)
      case .failure(let e): return ("the connection broke (its pipe: \(e))", fileErrno)
      }
      do {
        try socket.read(into: scratch + tail, count: more)
      } catch {
        return ("the connection broke (\(error))", fileErrno)
      }
      remaining -= more
      if fileErrno == 0, case .failure(let e) = writingFile({ pwriteFull(file.fd, scratch, tail + more, position) }) {
        fileErrno = e.rawValue
      }
      position += UInt64(tail + more)
    }
    return (nil, fileErrno)
  }

  /// Moves `count` bytes from the pipe into the file at `position`; once
  /// the file has failed (`fileErrno`), reads them and drops them. A file
  /// that takes no splice (EINVAL) gets them through the scratch buffer,
  /// and later replies on this connection too. Returns why the connection
  /// must end, if the pipe itself failed.
  private func splice(
    _ count: Int, from pipe: Int32, to file: FileTarget, at position: inout UInt64, fileErrno: inout Int32
  ) -> String? {
    var left = count
    while left > 0 {
      if fileErrno == 0 && !spliceRefused {
        let (m, error) = writingFile { () -> (Int, Int32) in
          let m = dr_splice_out(pipe, file.fd, position, UInt(left))
          return (m, m < 0 ? errno : EIO)
        }
        if m > 0 {
          left -= m
          position += UInt64(m)
          continue
        }
        let e = error
        if e == EINTR { continue }
        if e == EINVAL || e == ENOSYS || e == EOPNOTSUPP {
          spliceRefused = true
        } else {
          fileErrno = e
        }
      }
      let m = Glibc.read(pipe, scratch!, min(left, NBDClientConnection.scratchSize))
      if m < 0 && errno == EINTR { continue }
      if m <= 0 { return "the connection broke (its pipe: \(Errno(m < 0 ? errno : EIO)))" }
      if fileErrno == 0, case .failure(let e) = writingFile({ pwriteFull(file.fd, scratch!, m, position) }) {
        fileErrno = e.rawValue
      }
      left -= m
      position += UInt64(m)
    }
    return nil
  }

  /// Runs a write to a file, counting its time in `fileWriteNanoseconds`.
  private func writingFile<T>(_ body: () -> T) -> T {
    let start = DispatchTime.now().uptimeNanoseconds
    let result = body()
    fileWriteNanoseconds.wrappingAdd(DispatchTime.now().uptimeNanoseconds &- start, ordering: .relaxed)
    return result
  }

  private func readReplies() {
    while true {
      do {
        try socket.read(into: reply, count: NBD.simpleReplyLength)
      } catch {
        fail("the connection broke (\(error))")
        return
      }
      let magic = reply.loadBE(at: 0, as: UInt32.self)
      if structured && magic == NBD.structuredReplyMagic {
        guard let error = receiveChunk() else { return }
        if error == NBD.errShutdown { beginSoftDisconnect() }
        if lock.withLock({ failure != nil }) && !hasWaiting {
          sendDisconnectAndClose()
          return
        }
        continue
      }
      let error = reply.loadBE(at: 4, as: UInt32.self)
      let cookie = reply.loadBE(at: 8, as: UInt64.self)
      guard magic == NBD.simpleReplyMagic else {
        failViolating("the server sent a reply with a bad magic number 0x\(String(magic, radix: 16))")
        return
      }
      lock.lock()
      let index = Int(truncatingIfNeeded: cookie & 0xffff_ffff)
      guard index < slots.count, slots[index].cookie == cookie, slots[index].state == .waiting else {
        lock.unlock()
        failViolating("the server replied to an unknown request (cookie 0x\(String(cookie, radix: 16)))")
        return
      }
      let slot = slots[index]
      if slot.wantsExtents && error == 0 {
        lock.unlock()
        failViolating("the server answered BLOCK_STATUS without block status")
        return
      }
      slot.state = .receiving
      let buffer = slot.buffer
      let file = slot.file
      let length = slot.length
      lock.unlock()

      var broken: String?
      var fileErrno: Int32 = 0
      if error == 0, length > 0 {
        if let file {
          (broken, fileErrno) = receive(length, into: file)
        } else if let buffer {
          do {
            try socket.read(into: buffer, count: length)
          } catch {
            broken = "the connection broke (\(error))"
          }
        }
      }
      lock.lock()
      if let b = broken { slot.failure = failure ?? b }
      slot.fileErrno = fileErrno
      slot.serverError = error
      slot.state = .done
      lock.unlock()
      slot.semaphore.signal()
      if let broken {
        fail(broken)
        return
      }
      if error == NBD.errShutdown { beginSoftDisconnect() }
      if lock.withLock({ failure != nil }) && !hasWaiting {
        sendDisconnectAndClose()
        return
      }
    }
  }
}

// MARK: - The handshake

/// Fixed newstyle negotiation: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME for a
/// server without it. Errors are NBDClientFailure with a cause for the URI.
fileprivate struct NBDClientHandshake {
  let socket: Socket
  let uri: NBDURI
  let tls: TLSClientContext?
  /// Ask for structured replies and base:allocation.
  let allocation: Bool

  var exportName: String { uri.exportName }

  func run() throws -> NBDClientExport {
    var greeting = [UInt8](repeating: 0, count: 18)
    try receive(&greeting, "the greeting")
    let magic = greeting.withUnsafeBytes { $0.baseAddress!.loadBE(at: 0, as: UInt64.self) }
    let second = greeting.withUnsafeBytes { $0.baseAddress!.loadBE(at: 8, as: UInt64.self) }
    let handshakeFlags = greeting.withUnsafeBytes { $0.baseAddress!.loadBE(at: 16, as: UInt16.self) }
    guard magic == NBD.initMagic else { throw NBDClientFailure("not an NBD server (bad greeting)") }
    if second == 0x0042_0281_8612_53 {
      throw NBDClientFailure("the server speaks only the oldstyle handshake, which is not supported")
    }
    guard second == NBD.optionMagic else { throw NBDClientFailure("not an NBD server (bad greeting)") }
    guard handshakeFlags & NBD.flagFixedNewstyle != 0 else {
      throw NBDClientFailure("the server does not speak the fixed newstyle handshake")
    }
    let noZeroes = handshakeFlags & NBD.flagNoZeroes != 0
    var clientFlags = NBD.clientFlagFixedNewstyle
    if noZeroes { clientFlags |= NBD.clientFlagNoZeroes }
    try transmit(bytesBE(clientFlags))
    if let tls { try startTLS(tls) }

    let name = Array(exportName.utf8)
    guard name.count <= 4096 else { throw NBDClientFailure("the export name is longer than 4096 bytes") }
    let (structured, allocationID) = allocation ? try askForAllocation(name) : (false, nil)
    var export = try go(name, noZeroes: noZeroes)
    export.structured = structured
    export.allocationID = allocationID
    return export
  }

  /// NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_SET_META_CONTEXT for
  /// base:allocation: whether structured replies were agreed, and the
  /// context's id if it was given. A server without either is no error.
  private func askForAllocation(_ name: [UInt8]) throws -> (Bool, UInt32?) {
    try sendOption(NBD.optStructuredReply, [])
    let (type, _) = try receiveOptionReply(NBD.optStructuredReply)
    guard type == NBD.repAck else {
      if type & 0x8000_0000 != 0 { return (false, nil) }
      throw NBDClientFailure("the server sent an unexpected reply \(type) to NBD_OPT_STRUCTURED_REPLY")
    }
    let context = Array(NBD.baseAllocation.utf8)
    try sendOption(
      NBD.optSetMetaContext,
      bytesBE(UInt32(name.count)) + name + bytesBE(UInt32(1)) + bytesBE(UInt32(context.count)) + context)
    var id: UInt32?
    while true {
      let (type, data) = try receiveOptionReply(NBD.optSetMetaContext)
      switch type {
      case NBD.repMetaContext:
        guard data.count >= 4 else { throw NBDClientFailure("the server sent a malformed metadata context reply") }
        if Array(data.dropFirst(4)) == context { id = loadBE(data, 0, as: UInt32.self) }
      case NBD.repAck:
        return (true, id)
      default:
        if type & 0x8000_0000 != 0 { return (true, nil) }
        throw NBDClientFailure("the server sent an unexpected reply \(type) to NBD_OPT_SET_META_CONTEXT")
      }
    }
  }

  /// NBD_OPT_GO (or NBD_OPT_EXPORT_NAME for a server without it).
  private func go(_ name: [UInt8], noZeroes: Bool) throws -> NBDClientExport {
    // NBD_OPT_GO: name length, name, one information request.
    var go = bytesBE(UInt32(name.count))
    go += name
    go += bytesBE(UInt16(2))
    go += bytesBE(NBD.infoBlockSize)
    go += bytesBE(NBD.infoDescription)
    try sendOption(NBD.optGo, go)

    var export = NBDClientExport(size: 0, flags: 0)
    var haveExport = false
    while true {
      let (type, data) = try receiveOptionReply(NBD.optGo)
      switch type {
      case NBD.repAck:
        guard haveExport else { throw NBDClientFailure("the server accepted the export without describing it") }
        return export
      case NBD.repInfo:
        guard data.count >= 2 else { throw NBDClientFailure("the server sent a malformed information reply") }
        let kind = loadBE(data, 0, as: UInt16.self)
        if kind == NBD.infoExport {
          guard data.count == 12 else { throw NBDClientFailure("the server sent a malformed export description") }
          export.size = loadBE(data, 2, as: UInt64.self)
          export.flags = loadBE(data, 10, as: UInt16.self)
          haveExport = true
        } else if kind == NBD.infoDescription {
          export.description = String(decoding: data.dropFirst(2).prefix(4096), as: UTF8.self)
        } else if kind == NBD.infoBlockSize {
          guard data.count == 14 else { throw NBDClientFailure("the server sent a malformed block size description") }
          let minimum = loadBE(data, 2, as: UInt32.self)
          let preferred = loadBE(data, 6, as: UInt32.self)
          let maximum = loadBE(data, 10, as: UInt32.self)
          guard minimum >= 1, minimum <= 65536, minimum & (minimum - 1) == 0,
            preferred >= minimum, maximum >= minimum
          else {
            throw NBDClientFailure(
              "the server sent impossible block sizes (minimum \(minimum), preferred \(preferred), maximum \(maximum))")
          }
          export.minimum = minimum
          export.preferred = preferred
          export.maximum = maximum
        }
      // Other information (name, description) is not needed.
      case NBD.repErrUnsupported:
        return try exportNameFallback(noZeroes: noZeroes)
      default:
        if type & 0x8000_0000 != 0 { throw refusal(type, data) }
        throw NBDClientFailure("the server sent an unexpected reply \(type) to NBD_OPT_GO")
      }
    }
  }

  /// NBD_OPT_STARTTLS, then the TLS handshake; the rest of the handshake
  /// runs over TLS.
  private func startTLS(_ tls: TLSClientContext) throws {
    try sendOption(NBD.optStartTLS, [])
    let (type, data) = try receiveOptionReply(NBD.optStartTLS)
    switch type {
    case NBD.repAck:
      break
    case NBD.repErrUnsupported, NBD.repErrPolicy:
      throw NBDClientFailure("the server does not offer TLS, which an nbds URI demands")
    default:
      if type & 0x8000_0000 != 0 { throw refusal(type, data) }
      throw NBDClientFailure("the server sent an unexpected reply \(type) to NBD_OPT_STARTTLS")
    }
    var host: String?
    if case .tcp(let name, _) = uri.endpoint { host = name }
    do {
      try tls.connect(socket, host: host, timeout: socket.readTimeout)
    } catch {
      throw NBDClientFailure("\(error)")
    }
  }

  /// NBD_OPT_EXPORT_NAME: the server answers with the export or hangs up.
  private func exportNameFallback(noZeroes: Bool) throws -> NBDClientExport {
    try sendOption(NBD.optExportName, Array(exportName.utf8))
    var answer = [UInt8](repeating: 0, count: noZeroes ? 10 : 134)
    do {
      try socket.read(into: &answer, count: answer.count)
    } catch {
      throw NBDClientFailure("the server has no export named '\(exportName)' (it closed the connection: \(error))")
    }
    return NBDClientExport(size: loadBE(answer, 0, as: UInt64.self), flags: loadBE(answer, 8, as: UInt16.self))
  }

  private func refusal(_ type: UInt32, _ data: [UInt8]) -> NBDClientFailure {
    let message = String(decoding: data.prefix(4096), as: UTF8.self)
      .filter { !$0.isASCII || ($0.asciiValue! >= 32 && $0.asciiValue! < 127) }
    let said = message.isEmpty ? "" : " (the server says: \(message))"
    switch type {
    case NBD.repErrUnknown: return NBDClientFailure("the server has no export named '\(exportName)'")
    case NBD.repErrPolicy: return NBDClientFailure("the server refused access to the export '\(exportName)'\(said)")
    case NBD.repErrInvalid:
      return NBDClientFailure("the server rejected the request for '\(exportName)' as invalid\(said)")
    case NBD.repErrShutdown: return NBDClientFailure("the server is shutting down\(said)")
    case 0x8000_0004: return NBDClientFailure("the server cannot serve the export on its platform\(said)")
    case NBD.repErrTLSRequired:
      return NBDClientFailure("the server requires TLS; use an nbds:// or nbds+unix:// URI\(said)")
    case 0x8000_0008: return NBDClientFailure("the server requires block size negotiation\(said)")
    case 0x8000_0009: return NBDClientFailure("the server found the request too big\(said)")
    default:
      return NBDClientFailure(
        "the server refused the export '\(exportName)' with error 0x\(String(type, radix: 16))\(said)")
    }
  }

  private func sendOption(_ option: UInt32, _ data: [UInt8]) throws {
    var message = bytesBE(NBD.optionMagic)
    message += bytesBE(option)
    message += bytesBE(UInt32(data.count))
    message += data
    try transmit(message)
  }

  /// One option reply: its type and data, the length checked before reading.
  private func receiveOptionReply(_ option: UInt32) throws -> (UInt32, [UInt8]) {
    var head = [UInt8](repeating: 0, count: 20)
    try receive(&head, "an option reply")
    guard loadBE(head, 0, as: UInt64.self) == NBD.optionReplyMagic else {
      throw NBDClientFailure("the server sent an option reply with a bad magic number")
    }
    guard loadBE(head, 8, as: UInt32.self) == option else {
      throw NBDClientFailure("the server answered an option that was not asked")
    }
    let type = loadBE(head, 12, as: UInt32.self)
    let length = Int(loadBE(head, 16, as: UInt32.self))
    guard length <= NBD.maximumOptionLength else {
      throw NBDClientFailure(
        "the server sent an option reply of \(length) bytes (at most \(NBD.maximumOptionLength) accepted)")
    }
    var data = [UInt8](repeating: 0, count: length)
    if length > 0 { try receive(&data, "an option reply") }
    return (type, data)
  }

  private func receive(_ buffer: inout [UInt8], _ what: String) throws {
    let count = buffer.count
    do {
      try buffer.withUnsafeMutableBytes { try socket.read(into: $0.baseAddress!, count: count) }
    } catch {
      throw NBDClientFailure("the handshake failed while reading \(what) (\(error))")
    }
  }

  private func transmit(_ bytes: [UInt8]) throws {
    do {
      try socket.write(bytes)
    } catch {
      throw NBDClientFailure("the handshake failed while sending (\(error))")
    }
  }
}

// MARK: - Helpers

fileprivate func bytesBE<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
  withUnsafeBytes(of: value.bigEndian) { Array($0) }
}

fileprivate func loadBE<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, as: T.Type) -> T {
  bytes.withUnsafeBytes { UnsafeRawPointer($0.baseAddress!).loadBE(at: offset, as: T.self) }
}

fileprivate func formatSeconds(_ s: Double) -> String {
  s == s.rounded() && s < 1e9 ? String(Int(s)) : String(s)
}

fileprivate func sleepSeconds(_ s: Double) {
  guard s > 0 else { return }
  var request = timespec(tv_sec: Int(s), tv_nsec: Int((s - Double(Int(s))) * 1e9))
  var left = timespec()
  while nanosleep(&request, &left) != 0 && errno == EINTR { request = left }
}
