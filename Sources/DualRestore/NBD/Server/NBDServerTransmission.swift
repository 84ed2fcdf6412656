// The server's transmission phase, as nbdkit's protocol.c: requests read
// and validated (before any I/O: magic, command, flags, range, size), run
// on the export, and answered (NBDServerReplies.swift).
//
// Leader/follower: each worker takes the read lock, reads one request
// (header and payload), lets go, runs it and sends its reply, so nothing is
// handed between threads on the way; the connection's own thread is one of
// the workers. The first worker to see the end of the connection (or DISC,
// or a request that cannot be framed: a bad magic, a WRITE longer than
// NBD.maximumPayload, whose payload cannot be skipped safely) marks it
// closed; the others finish what they hold and stop.
//
// Memory: a READ or WRITE takes its length from the server's byte budget
// before its buffer is taken (from the server's pool) and gives it back
// after its reply, so buffers stay under `maximumBufferedBytes` whatever
// the clients send. Errors become NBD error numbers in one place
// (`NBDError.code(for:)`).

import Dispatch

final class NBDServerTransmission: Sendable {
  let server: NBDServer
  let transport: NBDTransport
  let session: NBDServerSession
  /// Replies are written whole under this lock, in completion order.
  let sendLock = Locked(())

  init(server: NBDServer, transport: NBDTransport, session: NBDServerSession) {
    self.server = server
    self.transport = transport
    self.session = session
  }

  /// A request as read, then as run: what its reply needs.
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

  /// Serves requests until the connection ends; throws why, unless the
  /// client said goodbye.
  func run() throws {
    let workers = max(1, server.workersPerConnection)
    let reader = RequestReader(transmission: self)
    let done = DispatchSemaphore(value: 0)
    for _ in 1..<workers {
      startThread { [self] in
        serve(reader)
        done.signal()
      }
    }
    serve(reader)
    for _ in 1..<workers { done.wait() }
    if let failure = reader.failure { throw failure }
  }

  private func serve(_ reader: RequestReader) {
    let export = session.export
    while var request = reader.next() {
      execute(&request, export)
      reply(request)
      if let b = request.buffer { server.pool.put(b) }
      if request.budgeted > 0 { server.budget.release(request.budgeted) }
    }
  }

  /// The read side of a connection, shared by its workers.
  final class RequestReader: Sendable {
    let transmission: NBDServerTransmission
    /// The read side: taken by one worker at a time for a whole request.
    private struct ReadSide {
      let header = AlignedBuffer(count: NBDRequest.length)
      var closed = false
      var failure: Error?
    }
    private let readSide = Locked(ReadSide())

    init(transmission: NBDServerTransmission) {
      self.transmission = transmission
    }

    /// Why the connection ended, unless the client said goodbye.
    var failure: Error? { readSide.withLock { $0.failure } }

    /// Reads the next request under the read lock; nil when the connection is over.
    func next() -> Request? {
      readSide.withLock { side in next(&side) }
    }

    private func next(_ side: inout ReadSide) -> Request? {
      let header = side.header
      if side.closed { return nil }
      do {
        let t = transmission
        let server = t.server
        let options = server.options
        try t.transport.readRequest(
          into: header.pointer, count: NBDRequest.length, midRequest: false, idleLimit: options.idleTimeout,
          stallLimit: options.stallTimeout)
        guard let (wire, _) = try NBDRequest.decode(UnsafeRawBufferPointer(header.buffer)) else {
          throw NBDWireError.truncated("a request", have: NBDRequest.length)
        }
        var request = Request(
          flags: wire.flags, type: wire.type, cookie: wire.cookie, offset: wire.offset, length: Int(wire.length),
          buffer: nil, span: nil, status: nil, error: 0, budgeted: 0)
        if request.type == NBD.cmdDisconnect {
          side.closed = true
          return nil
        }
        if request.type == NBD.cmdWrite {
          // The payload follows whatever the verdict; too large cannot be skipped.
          guard request.length <= NBD.maximumPayload else {
            throw ToolkitError("WRITE of \(request.length) bytes exceeds the limit; closing the connection")
          }
          server.budget.take(request.length)
          request.budgeted = request.length
          let buffer = server.pool.get(request.length)
          request.buffer = buffer
          do {
            try t.transport.readRequest(
              into: buffer.pointer, count: request.length, midRequest: true, idleLimit: 0,
              stallLimit: options.stallTimeout)
          } catch {
            server.budget.release(request.budgeted)
            throw error
          }
        }
        request.error = t.validate(request)
        if request.error == 0 && request.type == NBD.cmdRead {
          // Counted against the budget whether the reply is sent from a
          // buffer or from a file (which holds the bytes in a pipe or the
          // socket's queue); the buffer is taken when needed.
          server.budget.take(request.length)
          request.budgeted = request.length
        }
        return request
      } catch {
        side.closed = true
        side.failure = error
        return nil
      }
    }
  }

  /// Checks a request before any I/O; returns an NBD error number or 0.
  func validate(_ r: Request) -> UInt32 {
    let export = session.export
    let knownFlags = NBD.cmdFlagFUA | NBD.cmdFlagNoHole | NBD.cmdFlagFastZero | NBD.cmdFlagReqOne | NBD.cmdFlagDF
    if r.flags & ~knownFlags != 0 { return NBD.errInvalid }
    if r.flags & NBD.cmdFlagReqOne != 0 && r.type != NBD.cmdBlockStatus { return NBD.errInvalid }
    // DF only where offered (structured replies agreed), and only on READ,
    // whose data goes in one chunk anyway.
    if r.flags & NBD.cmdFlagDF != 0 && (!session.structuredReplies || r.type != NBD.cmdRead) {
      return NBD.errInvalid
    }
    switch r.type {
    case NBD.cmdBlockStatus:
      // Only with base:allocation selected for this export.
      guard session.allocationContext, r.length > 0 else { return NBD.errInvalid }
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

  /// Runs a valid request on the export; a failure becomes its error number.
  private func execute(_ r: inout Request, _ export: NBDExport) {
    guard r.error == 0 else { return }
    let fua = r.flags & NBD.cmdFlagFUA != 0
    do {
      switch r.type {
      case NBD.cmdRead:
        if transport.spliceDescriptor != nil, r.length >= NBDServerTransmission.sendfileMinimum,
          let span = try export.makeReadableInFile(offset: r.offset, length: r.length),
          NBDServerTransmission.isCached(span, r.length)
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
        let limit = r.flags & NBD.cmdFlagReqOne != 0 ? 1 : NBDServerTransmission.extentsPerReply
        let extents = try export.allocation(offset: r.offset, length: UInt32(r.length), limit: limit)
        r.status = try statusPayload(extents, length: r.length, limit: limit)
      default:
        r.error = NBD.errInvalid
      }
    } catch {
      r.error = NBDError.code(for: error)
      server.log("\(NBDServerTransmission.commandName(r.type)) of \(r.length) bytes at \(r.offset) failed: \(error)")
    }
  }

  static func commandName(_ type: UInt16) -> String {
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
