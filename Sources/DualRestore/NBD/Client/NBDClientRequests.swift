// How an NBD client's requests go out and are waited for: a long READ or
// WRITE split at `maximumRequest` with a few chunks in flight, TRIM and
// WRITE_ZEROES split at 1 GiB, and a connection made again when the last
// one broke, after an exponential backoff (0.1 s doubling to 5 s), within
// the request's own time limit. Another request already connecting is
// waited for rather than raced; a new connection to an export of another
// size or description is refused.

import Glibc

extension NBDClient {
  /// A READ or WRITE, split at `maximumRequest` with a few chunks in flight.
  func transfer(
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
  func ranged(_ command: UInt16, flags: UInt16, offset: UInt64, length: UInt64) throws {
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(NBDClient.maximumRangeRequest), length - done))
      try request(command, flags: flags, offset: offset + done, length: n, into: nil, from: nil)
      done += UInt64(n)
    }
  }

  /// One request on the wire, waited for; how it ended, when it worked.
  @discardableResult
  func request(
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
    if outcome.fileErrno != 0 { return FileWriteError(errno: outcome.fileErrno, offset: offset, length: length) }
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
        throw failure(command, offset: offset, length: length, serverError: 0, cause: f)
      }
      // A request that meets a connection the server broke by breaking the
      // protocol reports that; later requests connect again.
      if command == NBD.cmdBlockStatus && c.allocationID == nil {
        throw failure(
          command, offset: offset, length: length, serverError: 0,
          cause: NBDClientFailure("the server no longer gives base:allocation since it was connected again"))
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
      let request = NBDRequest(
        flags: flags, type: command, cookie: slot.cookie, offset: offset, length: UInt32(truncatingIfNeeded: length))
      if c.send(request, payload: from) { return (c, slot) }
      // The send failed and failed the connection, which wakes the slot.
      let cause = c.finish(slot, deadline: deadline, timeout: timeout).cause
      if let v = c.protocolViolation {
        throw failure(command, offset: offset, length: length, serverError: 0, cause: v)
      }
      if monotonicSeconds() >= deadline {
        throw failure(
          command, offset: offset, length: length, serverError: 0,
          cause: cause ?? NBDClientFailure("the connection broke", kind: .connectionClosed))
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
            uri, connector: connector, tls: tlsContext, allocation: forAllocation, deadline: deadline,
            timeout: timeout))
      } catch let f as NBDClientFailure {
        outcome = .failure(f)
      } catch {
        outcome = .failure(NBDClientFailure(describing: error))
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
        noteAttemptFailed(f.text)
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
}

/// Why a request got no reply, or a connection could not be made: the
/// sentence, and its kind where a caller may act on it.
struct NBDClientFailure: Error {
  let text: String
  let kind: ToolkitError.Cause?

  init(_ text: String, kind: ToolkitError.Cause? = nil) {
    self.text = text
    self.kind = kind
  }

  /// Another error, as it describes itself, keeping its kind.
  init(describing error: Error) {
    self.init("\(error)", kind: (error as? ToolkitError)?.cause)
  }

  /// The connection broke because of `error` (of a socket, or the peer
  /// going away).
  static func broke(_ error: Error) -> NBDClientFailure {
    NBDClientFailure("the connection broke (\(error))", kind: (error as? ToolkitError)?.cause)
  }
}

func formatSeconds(_ s: Double) -> String {
  s == s.rounded() && s < 1e9 ? String(Int(s)) : String(s)
}

func sleepSeconds(_ s: Double) { Sys.sleep(s) }
