// The reader of an NBD client's connection: one reply at a time, handed to
// the request waiting on its cookie. It runs on a thread of its own, or,
// for a connection in memory, in the request that waits (`receiveReply`
// is one step).
//
// - A simple reply's READ data lands straight in the caller's buffer, or,
//   for a READ into a file, goes from the socket to the file through a
//   pipe (splice(2): not copied through memory here; over TLS, through the
//   reader's buffer). Writes into the file end on page boundaries, save at
//   the reply's end, so the kernel never reads a page to fill it.
// - A READ into a file whose write fails still takes the reply's data off
//   the connection (discarded), so the connection goes on; the caller gets
//   FileWriteError.
// - A client opened for allocation takes structured chunks (block status,
//   errors, none) for BLOCK_STATUS until the one marked done; any other
//   chunk breaks the protocol, as does a reply with a bad magic or a cookie
//   no request is waiting on.

import CShim
import Dispatch
import Glibc

extension NBDClientConnection {
  func startReader() {
    guard !readsInline else { return }
    startThread { [self] in
      while receiveReply() {}
    }
  }

  /// Reads one reply (a simple reply and its data, or one chunk) and hands
  /// it over; false when the connection has ended.
  func receiveReply() -> Bool {
    let head: NBDReplyHeader
    do {
      try transport.read(into: reply, count: NBDReplyHeader.minimumLength)
      var decoded = try NBDReplyHeader.decode(
        UnsafeRawBufferPointer(start: reply, count: NBDReplyHeader.minimumLength), structured: structured)
      if decoded == nil {
        // A chunk: the rest of its header.
        let rest = NBDChunkHeader.length - NBDReplyHeader.minimumLength
        try transport.read(into: reply + NBDReplyHeader.minimumLength, count: rest)
        decoded = try NBDReplyHeader.decode(
          UnsafeRawBufferPointer(start: reply, count: NBDChunkHeader.length), structured: structured)
      }
      guard let (h, _) = decoded else { throw NBDWireError.truncated("a reply header", have: NBDChunkHeader.length) }
      head = h
    } catch let e as NBDWireError {
      failViolating(e.description)
      return false
    } catch {
      fail(.broke(error))
      return false
    }
    let error: UInt32
    switch head {
    case .simple(let e, let cookie):
      guard receiveSimple(e, cookie) else { return false }
      error = e
    case .chunk(let chunk):
      guard let e = receiveChunk(chunk) else { return false }
      error = e
    }
    if error == NBD.errShutdown { beginSoftDisconnect() }
    if isFailed && !hasWaiting {
      sendDisconnectAndClose()
      return false
    }
    return true
  }

  /// The slot waiting on `cookie`, marked `.receiving` unless `refuse`
  /// finds the reply breaking the protocol; else the violation (the
  /// connection is failed). `refuse` runs with the state lock held.
  private func receiving(_ cookie: UInt64, refuse: (NBDClientSlot) -> String?) -> NBDClientSlot? {
    let found = state.withLock { s -> (NBDClientSlot?, String?) in
      let index = Int(truncatingIfNeeded: cookie & 0xffff_ffff)
      guard index < s.slots.count, s.slots[index].cookie == cookie, s.slots[index].state == .waiting else {
        return (nil, "the server replied to an unknown request (cookie 0x\(String(cookie, radix: 16)))")
      }
      let slot = s.slots[index]
      if let violation = refuse(slot) { return (nil, violation) }
      slot.state = .receiving
      return (slot, nil)
    }
    if let violation = found.1 { failViolating(violation) }
    return found.0
  }

  /// A simple reply: a READ's data into its buffer or file. False when the
  /// connection has ended.
  private func receiveSimple(_ error: UInt32, _ cookie: UInt64) -> Bool {
    guard
      let slot = receiving(
        cookie,
        refuse: {
          $0.wantsExtents && error == 0 ? "the server answered BLOCK_STATUS without block status" : nil
        })
    else { return false }
    // The request set these before sending it and leaves them while the
    // slot is `.receiving`.
    let buffer = slot.buffer
    let file = slot.file
    let length = slot.length

    var broken: NBDClientFailure?
    var fileErrno: Int32 = 0
    if error == 0, length > 0 {
      if let file {
        (broken, fileErrno) = receive(length, into: file)
      } else if let buffer {
        do {
          try transport.read(into: buffer, count: length)
        } catch {
          broken = .broke(error)
        }
      }
    }
    state.withLock { s in
      if let b = broken { slot.failure = s.failure ?? b }
      slot.fileErrno = fileErrno
      slot.serverError = error
      slot.state = .done
    }
    slot.semaphore.signal()
    if let broken {
      fail(broken)
      return false
    }
    return true
  }

  /// One structured reply chunk: a BLOCK_STATUS reply's runs, an error, or
  /// the end. Returns the server's error number so far for the request (0
  /// when none), or nil when the connection has ended.
  private func receiveChunk(_ chunk: NBDChunkHeader) -> UInt32? {
    guard
      let slot = receiving(
        chunk.cookie,
        refuse: {
          $0.wantsExtents ? nil : "the server sent a structured reply to a request that takes a simple one"
        })
    else { return nil }

    // A long block status (a fragmented file) gets a buffer of its own.
    let length = chunk.payloadLength
    let large = length > NBDClientConnection.scratchSize && length <= NBDClientConnection.maximumChunk
    let payload = large ? UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 8) : scratchBuffer()
    defer { if large { payload.deallocate() } }
    var broken: NBDClientFailure?
    var violation: String?
    if length > NBDClientConnection.maximumChunk {
      violation = "the server sent a reply chunk of \(length) bytes (at most \(NBDClientConnection.maximumChunk) taken)"
    } else if length > 0 {
      do { try transport.read(into: payload, count: length) } catch { broken = .broke(error) }
    }
    if broken == nil && violation == nil {
      violation = take(chunk, UnsafeRawBufferPointer(start: payload, count: length), into: slot)
    }
    let (finished, error) = state.withLock { s in
      if let cause = broken ?? violation.map({ NBDClientFailure($0) }) ?? s.failure {
        // Broken here, or failed meanwhile (a caller's time ran out): the
        // request ends now rather than waiting for chunks never read.
        slot.failure = s.failure ?? cause
        slot.state = .done
      } else {
        slot.state = chunk.isDone ? .done : .waiting
      }
      return (slot.state == .done, slot.serverError)
    }
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

  /// What a chunk's payload says, into the slot it answers (which only the
  /// reader touches while it is `.receiving`); the violation, if it is one.
  private func take(_ chunk: NBDChunkHeader, _ payload: UnsafeRawBufferPointer, into slot: NBDClientSlot) -> String? {
    do {
      switch chunk.type {
      case NBD.replyTypeBlockStatus:
        if try NBDBlockStatus.context(payload) != allocationID {
          return "the server sent block status of a metadata context not asked for"
        }
        // One context asked for: one block status chunk.
        if !slot.extents.isEmpty { return "the server sent block status twice for one request" }
        _ = try NBDBlockStatus.decode(payload, into: &slot.extents)
      case NBD.replyTypeNone:
        if payload.count != 0 || !chunk.isDone { return NBDWireError.malformed("closing chunk").description }
      case _ where chunk.isError:
        let e = try NBDErrorChunk.decode(payload).error
        slot.serverError = e == 0 ? NBD.errIO : e
      default:
        return "the server sent a reply chunk of type \(chunk.type) to BLOCK_STATUS"
      }
      return nil
    } catch {
      return "\(error)"
    }
  }

  /// The reader's buffer, made on first use.
  func scratchBuffer() -> UnsafeMutableRawPointer {
    if let scratch { return scratch }
    let b = UnsafeMutableRawPointer.allocate(byteCount: NBDClientConnection.scratchSize, alignment: 4096)
    scratch = b
    return b
  }

  // MARK: READs into files

  /// A READ reply's data, into a file: spliced through the pipe, or read
  /// into the scratch buffer and written. After a failed write the rest is
  /// read and discarded. Returns why the connection broke, if it did, and
  /// the file's errno (0 when every byte was written).
  private func receive(_ length: Int, into file: FileTarget) -> (NBDClientFailure?, Int32) {
    let socket = transport.spliceDescriptor
    if !pipeTried && socket != nil {
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
    guard let pipe, let socket, !spliceRefused else {
      while remaining > 0 {
        let n = min(remaining, NBDClientConnection.scratchSize)
        do {
          try transport.read(into: scratch, count: n)
        } catch {
          return (.broke(error), fileErrno)
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
    let closed = NBDClientFailure(
      "the connection broke (\(transport.peer): connection closed)", kind: .connectionClosed)
    while remaining > 0 {
      // The pipe is empty here, so the splice cannot wait for room in it.
      var n: Int
      switch Sys.spliceIn(socket, pipe.in, min(remaining, pipe.capacity), wait: true) {
      case .success(0): return (closed, fileErrno)
      case .success(let m): n = m
      case .failure(let e): return (NBDClientFailure("the connection broke (\(e))"), fileErrno)
      }
      remaining -= n
      // Then more of the reply, as far as the pipe takes it, without
      // waiting for room in the pipe (a TCP socket may still wait for the
      // rest of the reply, which is on its way): fewer, longer writes.
      more: while remaining > 0 && n < pipe.capacity {
        switch Sys.spliceIn(socket, pipe.in, min(remaining, pipe.capacity - n), wait: false) {
        case .success(0): return (closed, fileErrno)
        case .success(let m):
          n += m
          remaining -= m
        case .failure(let e) where e.rawValue == EAGAIN || e.rawValue == EWOULDBLOCK: break more
        case .failure(let e): return (NBDClientFailure("the connection broke (\(e))"), fileErrno)
        }
      }
      // Into the file up to a page boundary (all of it at the reply's end):
      // a write ending inside a page that is not cached has the page read
      // from the device first.
      let end = position + UInt64(n)
      let whole = remaining == 0 ? end : max(position, end & ~(page - 1))
      if let cause = splice(Int(whole - position), from: pipe.out, to: file, at: &position, fileErrno: &fileErrno) {
        return (NBDClientFailure(cause), fileErrno)
      }
      let tail = Int(end - whole)
      guard tail > 0 else { continue }
      // The start of a page: from the pipe into memory; the rest of the
      // page from the socket, and the page written whole.
      let more = min(Int(page - (end & (page - 1))), remaining)
      switch readFull(pipe.out, scratch, tail) {
      case .success(let got) where got == tail: break
      case .success: return (NBDClientFailure("the connection broke (its pipe ended)"), fileErrno)
      case .failure(let e): return (NBDClientFailure("the connection broke (its pipe: \(e))"), fileErrno)
      }
      do {
        try transport.read(into: scratch + tail, count: more)
      } catch {
        return (.broke(error), fileErrno)
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
    let scratch = scratchBuffer()
    var left = count
    while left > 0 {
      if fileErrno == 0 && !spliceRefused {
        let e: Int32
        switch writingFile({ Sys.spliceOut(pipe, file.fd, position, left) }) {
        case .success(0): e = EIO
        case .success(let m):
          left -= m
          position += UInt64(m)
          continue
        case .failure(let error): e = error.rawValue
        }
        if e == EINVAL || e == ENOSYS || e == EOPNOTSUPP {
          spliceRefused = true
        } else {
          fileErrno = e
        }
      }
      let m: Int
      switch Sys.read(pipe, scratch, min(left, NBDClientConnection.scratchSize)) {
      case .success(0): return "the connection broke (its pipe: \(Errno(EIO)))"
      case .success(let got): m = got
      case .failure(let e): return "the connection broke (its pipe: \(e))"
      }
      if fileErrno == 0, case .failure(let e) = writingFile({ pwriteFull(file.fd, scratch, m, position) }) {
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
}
