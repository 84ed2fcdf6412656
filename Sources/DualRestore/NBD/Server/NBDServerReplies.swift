// The server's replies: a simple reply, or with structured replies agreed,
// one chunk marked done (OFFSET_DATA, BLOCK_STATUS, NONE or ERROR) for READ
// and BLOCK_STATUS, each written whole under the send lock in as few
// system calls as it can.
//
// Over plain sockets, READs of 32 KiB or more whose range is in the page
// cache go from the file to the socket with sendfile(2): no copy through
// this process. A range that must come from the disk is read into a buffer
// before the reply starts, so its error is an error reply; a failure after
// a reply's header has gone can only be told by cutting the connection, so
// the client never takes what it got for data.

import CShim

extension NBDServerTransmission {
  /// READs at least this long are sent from the file when the export can;
  /// shorter ones cost less copied than spliced.
  static let sendfileMinimum = 32 << 10

  /// Runs in one BLOCK_STATUS reply at most; the client asks again for more.
  static let extentsPerReply = 1024

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

  /// The payload of a BLOCK_STATUS chunk. Runs past the request, empty
  /// runs, and too many runs are the export's mistakes: refused, not sent.
  func statusPayload(_ extents: [Extent], length: Int, limit: Int) throws -> [UInt8] {
    let total = extents.reduce(UInt64(0)) { $0 + UInt64($1.length) }
    guard !extents.isEmpty, extents.count <= limit, total <= UInt64(length), extents.allSatisfy({ $0.length > 0 })
    else {
      throw NBDError(NBD.errIO, "the export described \(extents.count) run(s) of \(total) bytes for \(length)")
    }
    return NBDBlockStatus.encode(context: NBD.baseAllocationID, extents)
  }

  /// The head of a request's reply: what goes before its data or payload.
  func replyHead(_ r: Request) -> NBDReplyHead {
    let structured = session.structuredReplies && (r.type == NBD.cmdRead || r.type == NBD.cmdBlockStatus)
    if !structured { return .simple(error: r.error) }
    if r.error != 0 { return .error(r.error) }
    if r.type == NBD.cmdBlockStatus, let status = r.status { return .blockStatus(payloadLength: status.count) }
    if r.length == 0 { return .empty }
    return .offsetData(offset: r.offset, dataLength: r.length)
  }

  /// Sends a reply, and a READ's data with it.
  func reply(_ r: Request) {
    withUnsafeTemporaryAllocation(byteCount: NBDReplyHead.maximumLength, alignment: 8) { head in
      let headLength = replyHead(r).encode(cookie: r.cookie, into: head)
      let header = UnsafeRawBufferPointer(rebasing: head[0..<headLength])
      // A READ's data, from its buffer (a simple reply has it only when the
      // READ worked; a chunk head says where it goes).
      var data: UnsafeRawBufferPointer?
      if r.type == NBD.cmdRead && r.error == 0, let b = r.buffer {
        data = UnsafeRawBufferPointer(start: b.pointer, count: r.length)
      }
      sendLock.withLock { _ in
        do {
          if r.error == 0, let span = r.span {
            try transport.send(header, from: span.fd, at: span.offset, count: r.length)
          } else if r.error == 0, let status = r.status {
            try status.withUnsafeBytes { try transport.send(header, $0) }
          } else {
            try transport.send(header, data)
          }
        } catch {
          // The reply is cut short (its header may be gone already): the
          // client must not take what it got for data, so it is cut off.
          if r.span != nil {
            server.log("READ of \(r.length) bytes at \(r.offset): \(error); disconnecting the client")
          }
          transport.shutdown()
        }
      }
    }
  }
}
