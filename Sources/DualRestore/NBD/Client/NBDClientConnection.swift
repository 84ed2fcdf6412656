// One connection of an NBD client: its slot table (the requests in flight,
// by cookie), its send path, and how it fails. Its reader is in
// NBDClientReader.swift.
//
// Invariants:
// - Requests go out whole: a lock serialises each header and its payload,
//   and the header buffer under that lock is reused, so a request allocates
//   nothing on the heap once the slot table has grown to the concurrency.
// - A cookie is the slot's index and a sequence number: a reply to a
//   request that timed out (its slot reused) is told from one to the next.
// - A caller's buffer is touched by the reader only while its slot is
//   `.receiving`, and the caller does not return before that state has
//   ended.
// - The first cause of failure wins; every request waiting then fails with
//   it, and the connection is never used again. A server that broke the
//   protocol is reported as such to the requests that meet the connection.
// - ESHUTDOWN from the server: no new request uses the connection, and
//   once the requests in flight are answered NBD_CMD_DISC goes out (the
//   protocol's soft disconnect).

import Dispatch
import Glibc
import Synchronization

/// What the handshake found out about the export.
struct NBDClientExport {
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

/// Where a READ's data goes when not to memory: a file, at an offset.
struct FileTarget {
  let fd: Int32
  let offset: UInt64
}

/// How a request ended: the server's error, why it got no reply, and the
/// error of writing a READ's data to its file (0 when none).
struct NBDClientOutcome {
  var serverError: UInt32 = 0
  var cause: NBDClientFailure?
  var fileErrno: Int32 = 0
  /// A BLOCK_STATUS reply's runs, as the server sent them.
  var extents: [Extent] = []
}

enum NBDClientSlotState {
  case free, waiting, receiving, done, abandoned
}

/// One request in flight; reused for later requests once its waiter is done.
// @unchecked Sendable: shared by a request and the reader; its fields change only under the connection's `state` lock.
final class NBDClientSlot: @unchecked Sendable {
  let index: Int
  let semaphore = DispatchSemaphore(value: 0)
  // Guarded by the connection's `state` lock.
  var cookie: UInt64 = 0
  var state = NBDClientSlotState.free
  var buffer: UnsafeMutableRawPointer?
  var file: FileTarget?
  var length = 0
  var serverError: UInt32 = 0
  var failure: NBDClientFailure?
  var fileErrno: Int32 = 0
  /// BLOCK_STATUS: its reply is structured chunks, gathered here.
  var wantsExtents = false
  var extents: [Extent] = []
  /// The connection's file-writing time when the request was registered.
  var fileWriteMark: UInt64 = 0

  init(index: Int) { self.index = index }
}

// @unchecked Sendable: the slot table is in a Locked, requests go out under `sendLock`, and the rest is the reader's.
final class NBDClientConnection: @unchecked Sendable {
  let transport: NBDTransport
  /// A request reads the replies itself (no reader thread): a connection
  /// in memory.
  let readsInline: Bool
  /// Serialises requests on the wire; guards `header`.
  private let sendLock = Locked<Void>(())
  private let header = UnsafeMutableRawPointer.allocate(byteCount: NBDRequest.length, alignment: 8)
  /// The reader's: a reply's header.
  let reply = UnsafeMutableRawPointer.allocate(byteCount: NBDChunkHeader.length, alignment: 8)
  /// Replies may be structured chunks (a client opened for allocation).
  let structured: Bool
  /// The id of base:allocation on this connection, if the server gave it.
  let allocationID: UInt32?
  /// The reader's, for READs into files: a pipe (read end, write end, and
  /// its capacity; none over TLS or when the system has none to give), and
  /// a buffer for what cannot be spliced or is discarded.
  var pipe: (out: Int32, in: Int32, capacity: Int)?
  var pipeTried = false
  /// The file refused splice (EINVAL): replies go through the buffer.
  var spliceRefused = false
  var scratch: UnsafeMutableRawPointer?
  static let scratchSize = 256 << 10
  /// The longest structured reply chunk taken (a million runs of block status).
  static let maximumChunk = 8 << 20

  /// The slot table and how the connection failed; its lock also guards
  /// the slots' fields.
  struct State {
    var slots: [NBDClientSlot] = []
    var freeSlots: [Int] = []
    var sequence: UInt32 = 0
    var failure: NBDClientFailure?
    /// Why the server was found breaking the protocol (a reply with a bad
    /// magic or an unknown cookie), when that is what ended the connection.
    var violation: NBDClientFailure?
  }
  let state: Locked<State>
  /// Time the reader has spent writing READ replies into files: the
  /// replies behind it wait for the local disk, not for the server, and
  /// that time does not count against their limit.
  let fileWriteNanoseconds = Atomic<UInt64>(0)

  init(transport: NBDTransport, export: NBDClientExport, readsInline: Bool) {
    self.transport = transport
    self.readsInline = readsInline
    self.structured = export.structured
    self.allocationID = export.allocationID
    var initial = State()
    initial.slots.reserveCapacity(64)
    initial.freeSlots.reserveCapacity(64)
    state = Locked(initial)
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

  var isFailed: Bool { state.withLock { $0.failure != nil } }

  /// The protocol violation that ended this connection, if one did.
  var protocolViolation: NBDClientFailure? { state.withLock { $0.violation } }

  // MARK: Opening

  /// Connects and negotiates; throws NBDClientFailure.
  static func open(
    _ uri: NBDURI, connector: NBDConnector, tls: TLSClientContext?, allocation: Bool, deadline: Double,
    timeout: Double
  ) throws -> (NBDClientConnection, NBDClientExport) {
    let remaining = deadline - monotonicSeconds()
    guard remaining > 0 else { throw NBDClientFailure("no time left to connect") }
    let transport: NBDTransport
    do {
      transport = try connector.connect(uri, remaining)
    } catch {
      throw NBDClientFailure(describing: error)
    }
    let export = try NBDClientHandshake(transport: transport, uri: uri, tls: tls, allocation: allocation).run()
    // Replies may be far apart; the reader waits without a limit and the
    // requests time themselves. Sends stay bounded.
    transport.setWriteTimeout(timeout)
    transport.setReadTimeout(0)
    let connection = NBDClientConnection(transport: transport, export: export, readsInline: connector.readsInline)
    return (connection, export)
  }

  // MARK: Requests

  /// A slot for a new request, or nil when the connection has failed.
  func register(
    into buffer: UnsafeMutableRawPointer?, file: FileTarget? = nil, length: Int, extents: Bool = false
  ) -> NBDClientSlot? {
    state.withLock { s in
      if s.failure != nil { return nil }
      let slot: NBDClientSlot
      if let i = s.freeSlots.popLast() {
        slot = s.slots[i]
      } else {
        slot = NBDClientSlot(index: s.slots.count)
        s.slots.append(slot)
      }
      s.sequence &+= 1
      slot.cookie = UInt64(s.sequence) << 32 | UInt64(slot.index)
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
  }

  /// Sends a request whole (a WRITE with its payload); false (and the
  /// connection failed) otherwise.
  func send(_ request: NBDRequest, payload: UnsafeRawPointer?) -> Bool {
    sendLock.withLock { _ in
      request.encode(into: UnsafeMutableRawBufferPointer(start: header, count: NBDRequest.length))
      if let cause = sendRequest(payload: payload, length: Int(request.length)) {
        // Fail before other senders get the lock: the stream is cut mid-request.
        fail(cause)
        return false
      }
      return true
    }
  }

  /// The header (and a WRITE's payload); over TLS, the header shares a
  /// record with the start of the payload.
  private func sendRequest(payload: UnsafeRawPointer?, length: Int) -> NBDClientFailure? {
    let head = UnsafeRawPointer(header)
    if transport.spliceDescriptor == nil, let payload {
      do {
        try transport.send(
          UnsafeRawBufferPointer(start: head, count: NBDRequest.length),
          UnsafeRawBufferPointer(start: payload, count: length))
        return nil
      } catch {
        return describeSendFailure(error)
      }
    }
    return sendAll(head, NBDRequest.length, more: payload != nil)
      ?? payload.flatMap({ sendAll($0, length, more: false) })
  }

  private func describeSendFailure(_ error: Error) -> NBDClientFailure {
    if let e = error as? ToolkitError, e.cause == .timedOut {
      return NBDClientFailure("the server did not take the request in time", kind: .timedOut)
    }
    return NBDClientFailure.broke(error)
  }

  /// The bytes, whole: send(2) with MSG_MORE on a plain socket, else
  /// through the transport (the TLS session serialises records itself; the
  /// send lock keeps a header and its payload together).
  private func sendAll(_ buffer: UnsafeRawPointer, _ count: Int, more: Bool) -> NBDClientFailure? {
    guard let fd = transport.spliceDescriptor else {
      do {
        try transport.write(buffer, count: count)
        return nil
      } catch {
        return describeSendFailure(error)
      }
    }
    let flags = Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
    guard case .failure(let e) = sendFull(fd, buffer, count, flags: flags) else { return nil }
    let code = e.rawValue
    if code == EAGAIN || code == EWOULDBLOCK {
      return NBDClientFailure("the server did not take the request in time", kind: .timedOut)
    }
    let closed = code == EPIPE || code == ECONNRESET
    return NBDClientFailure("the connection broke (\(e))", kind: closed ? .connectionClosed : nil)
  }

  /// Waits for a registered request's reply and frees its slot: the
  /// server's error number, or why the request got no reply.
  func finish(_ slot: NBDClientSlot, deadline: Double, timeout: Double) -> NBDClientOutcome {
    if readsInline {
      // No reader thread: read replies until this one's is in (or the
      // connection has ended, which fails every waiting request).
      while state.withLock({ _ in slot.state == .waiting }) && receiveReply() {}
    }
    var deadline = deadline
    var excused = 0.0
    while slot.semaphore.wait(timeout: .now() + max(0, deadline - monotonicSeconds())) == .timedOut {
      let cause = NBDClientFailure("no reply within \(formatSeconds(timeout)) s", kind: .timedOut)
      // Time the reader spent writing files since the request began is
      // the local disk's, not the server's: it is added to the limit.
      let writing = Double(fileWriteNanoseconds.load(ordering: .relaxed) &- slot.fileWriteMark) / 1e9
      if writing > excused + 0.001 {
        deadline += writing - excused
        excused = writing
        continue
      }
      let state = self.state.withLock { _ in
        let state = slot.state
        if state == .waiting {
          // The reader will never touch this slot again: its cookie is
          // unknown from now on, and the connection is dropped anyway.
          slot.state = .abandoned
          slot.buffer = nil
          slot.file = nil
        }
        return state
      }
      if state == .waiting {
        fail(cause)
        return NBDClientOutcome(cause: cause)
      }
      // The reply is arriving into the caller's buffer: cut it short and
      // wait for the reader to let go of the buffer.
      if state == .receiving { fail(cause) }
      slot.semaphore.wait()
      break
    }
    return state.withLock { s in
      let result = NBDClientOutcome(
        serverError: slot.serverError, cause: slot.failure, fileErrno: slot.fileErrno, extents: slot.extents)
      slot.state = .free
      slot.buffer = nil
      slot.file = nil
      s.freeSlots.append(slot.index)
      return result
    }
  }

  // MARK: Failing and leaving

  /// `fail`, for a server that broke the protocol: the requests that meet
  /// the broken connection report that, rather than a new connection's fate.
  func failViolating(_ cause: String) {
    let failure = NBDClientFailure(cause)
    state.withLock { if $0.failure == nil { $0.violation = failure } }
    fail(failure)
  }

  /// Marks the connection broken (the first cause wins), fails the requests
  /// waiting on it and wakes the reader.
  func fail(_ cause: NBDClientFailure) {
    state.withLock { s in
      if s.failure == nil { s.failure = cause }
      let reason = s.failure ?? cause
      for slot in s.slots where slot.state == .waiting {
        slot.state = .done
        slot.failure = reason
        slot.semaphore.signal()
      }
    }
    transport.shutdown()
  }

  /// The server answered ESHUTDOWN: it is going away and waits for us to
  /// leave. No new request uses this connection (the next one reconnects);
  /// the requests in flight get their replies, then NBD_CMD_DISC is sent
  /// and the connection closed (the protocol's soft disconnect).
  func beginSoftDisconnect() {
    state.withLock {
      if $0.failure == nil { $0.failure = NBDClientFailure("the server is shutting down") }
    }
  }

  /// Soft disconnect from outside the reader: no new requests here, and the
  /// disconnect is sent now if nothing is in flight (else by the reader
  /// after the last reply).
  func softDisconnect() {
    beginSoftDisconnect()
    if !hasWaiting { sendDisconnectAndClose() }
  }

  var hasWaiting: Bool {
    state.withLock { $0.slots.contains { $0.state == .waiting } }
  }

  func sendDisconnectAndClose() {
    sendLock.withLock { _ in sendDisconnect() }
    transport.shutdown()
  }

  /// NBD_CMD_DISC; the send lock is held.
  private func sendDisconnect() {
    NBDRequest(flags: 0, type: NBD.cmdDisconnect, cookie: 0, offset: 0, length: 0)
      .encode(into: UnsafeMutableRawBufferPointer(start: header, count: NBDRequest.length))
    _ = sendAll(UnsafeRawPointer(header), NBDRequest.length, more: false)
  }

  /// Sends NBD_CMD_DISC (when the connection still works) and closes.
  func disconnect() {
    sendLock.withLock { _ in if !isFailed { sendDisconnect() } }
    fail(NBDClientFailure("the client was closed"))
  }
}
