// The client's side of the fixed newstyle handshake: the greeting, the
// client's flags, NBD_OPT_STARTTLS for an nbds URI, structured replies
// and base:allocation for a client opened for block status, then
// NBD_OPT_GO asking for the block sizes and the description (or
// NBD_OPT_EXPORT_NAME for a server without GO).
//
// Every reply is checked before it is used: its magic, that it answers the
// option asked, its length (at most NBD.maximumOptionLength) before its
// data is read, and its data's layout. A server that refuses (an error
// reply) is quoted in the error, with the refusal's code and words in its
// cause. Errors are NBDClientFailure with a sentence for the URI.

struct NBDClientHandshake {
  let transport: NBDTransport
  let uri: NBDURI
  let tls: TLSClientContext?
  /// Ask for structured replies and base:allocation.
  let allocation: Bool

  var exportName: String { uri.exportName }

  func run() throws -> NBDClientExport {
    let greeting: NBDGreeting
    do {
      greeting = try receive(NBDGreeting.length, "the greeting") { try NBDGreeting.decode($0) }
    } catch let e as NBDWireError {
      throw NBDClientFailure(e.description)
    }
    guard greeting.flags & NBD.flagFixedNewstyle != 0 else {
      throw NBDClientFailure("the server does not speak the fixed newstyle handshake")
    }
    let noZeroes = greeting.flags & NBD.flagNoZeroes != 0
    var clientFlags = NBD.clientFlagFixedNewstyle
    if noZeroes { clientFlags |= NBD.clientFlagNoZeroes }
    try transmit(NBDClientFlags(flags: clientFlags).encode())
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
    let (reply, _) = try receiveOptionReply(NBD.optStructuredReply)
    guard reply.type == NBD.repAck else {
      if reply.isError { return (false, nil) }
      throw NBDClientFailure("the server sent an unexpected reply \(reply.type) to NBD_OPT_STRUCTURED_REPLY")
    }
    let context = Array(NBD.baseAllocation.utf8)
    try sendOption(NBD.optSetMetaContext, NBDMetaContextRequest(name: name, queries: [context]).encode())
    var id: UInt32?
    while true {
      let (reply, data) = try receiveOptionReply(NBD.optSetMetaContext)
      switch reply.type {
      case NBD.repMetaContext:
        let given = try decoded { try NBDMetaContext.decode(data) }
        if given.name == context { id = given.id }
      case NBD.repAck:
        return (true, id)
      default:
        if reply.isError { return (true, nil) }
        throw NBDClientFailure("the server sent an unexpected reply \(reply.type) to NBD_OPT_SET_META_CONTEXT")
      }
    }
  }

  /// NBD_OPT_GO (or NBD_OPT_EXPORT_NAME for a server without it).
  private func go(_ name: [UInt8], noZeroes: Bool) throws -> NBDClientExport {
    let request = NBDExportRequest(name: name, infos: [NBD.infoBlockSize, NBD.infoDescription])
    try sendOption(NBD.optGo, request.encode())
    var export = NBDClientExport(size: 0, flags: 0)
    var haveExport = false
    while true {
      let (reply, data) = try receiveOptionReply(NBD.optGo)
      switch reply.type {
      case NBD.repAck:
        guard haveExport else { throw NBDClientFailure("the server accepted the export without describing it") }
        return export
      case NBD.repInfo:
        switch try decoded({ try NBDInfo.decode(data) }) {
        case .export(let size, let flags):
          export.size = size
          export.flags = flags
          haveExport = true
        case .description(let text):
          export.description = text
        case .blockSize(let minimum, let preferred, let maximum):
          guard minimum >= 1, minimum <= 65536, minimum & (minimum - 1) == 0, preferred >= minimum, maximum >= minimum
          else {
            throw NBDClientFailure(
              "the server sent impossible block sizes (minimum \(minimum), preferred \(preferred), maximum \(maximum))")
          }
          export.minimum = minimum
          export.preferred = preferred
          export.maximum = maximum
        case .other:
          // Other information (the name) is not needed.
          break
        }
      case NBD.repErrUnsupported:
        return try exportNameFallback(noZeroes: noZeroes)
      default:
        if reply.isError { throw refusal(reply.type, data) }
        throw NBDClientFailure("the server sent an unexpected reply \(reply.type) to NBD_OPT_GO")
      }
    }
  }

  /// NBD_OPT_STARTTLS, then the TLS handshake; the rest of the handshake
  /// runs over TLS.
  private func startTLS(_ tls: TLSClientContext) throws {
    try sendOption(NBD.optStartTLS, [])
    let (reply, data) = try receiveOptionReply(NBD.optStartTLS)
    switch reply.type {
    case NBD.repAck:
      break
    case NBD.repErrUnsupported, NBD.repErrPolicy:
      throw NBDClientFailure(
        "the server does not offer TLS, which an nbds URI demands",
        kind: .refused(code: reply.type, serverSays: NBDClientHandshake.message(data)))
    default:
      if reply.isError { throw refusal(reply.type, data) }
      throw NBDClientFailure("the server sent an unexpected reply \(reply.type) to NBD_OPT_STARTTLS")
    }
    var host: String?
    if case .tcp(let name, _) = uri.endpoint { host = name }
    do {
      try transport.startTLS(client: tls, host: host)
    } catch {
      throw NBDClientFailure(describing: error)
    }
  }

  /// NBD_OPT_EXPORT_NAME: the server answers with the export or hangs up.
  private func exportNameFallback(noZeroes: Bool) throws -> NBDClientExport {
    try sendOption(NBD.optExportName, Array(exportName.utf8))
    let answer: NBDExportNameReply
    do {
      let bytes = try transport.read(count: NBDExportNameReply.length(noZeroes: noZeroes))
      guard let (reply, _) = bytes.withUnsafeBytes({ NBDExportNameReply.decode($0, noZeroes: noZeroes) }) else {
        throw NBDWireError.truncated("the export's description", have: bytes.count)
      }
      answer = reply
    } catch {
      throw NBDClientFailure(
        "the server has no export named '\(exportName)' (it closed the connection: \(error))",
        kind: (error as? ToolkitError)?.cause)
    }
    return NBDClientExport(size: answer.size, flags: answer.flags)
  }

  /// The server's words in an error reply: printable, at most 4096 bytes;
  /// nil when it sent none.
  static func message(_ data: [UInt8]) -> String? {
    let text = String(decoding: data.prefix(4096), as: UTF8.self).filter { c in
      guard let a = c.asciiValue else { return true }
      return a >= 32 && a < 127
    }
    return text.isEmpty ? nil : text
  }

  /// The sentence for an error reply to GO or STARTTLS, quoting the server.
  private func refusal(_ type: UInt32, _ data: [UInt8]) -> NBDClientFailure {
    let words = NBDClientHandshake.message(data)
    let said = words.map { " (the server says: \($0))" } ?? ""
    let text: String
    switch type {
    case NBD.repErrUnknown: text = "the server has no export named '\(exportName)'"
    case NBD.repErrPolicy: text = "the server refused access to the export '\(exportName)'\(said)"
    case NBD.repErrInvalid: text = "the server rejected the request for '\(exportName)' as invalid\(said)"
    case NBD.repErrShutdown: text = "the server is shutting down\(said)"
    case NBD.repErrPlatform: text = "the server cannot serve the export on its platform\(said)"
    case NBD.repErrTLSRequired: text = "the server requires TLS; use an nbds:// or nbds+unix:// URI\(said)"
    case NBD.repErrBlockSizeRequired: text = "the server requires block size negotiation\(said)"
    case NBD.repErrTooBig: text = "the server found the request too big\(said)"
    default: text = "the server refused the export '\(exportName)' with error 0x\(String(type, radix: 16))\(said)"
    }
    return NBDClientFailure(text, kind: .refused(code: type, serverSays: words))
  }

  private func sendOption(_ option: UInt32, _ data: [UInt8]) throws {
    try transmit(NBDOptionHeader.encode(option, data))
  }

  /// One option reply: its header and data, the length checked before the
  /// data is read.
  private func receiveOptionReply(_ option: UInt32) throws -> (NBDOptionReplyHeader, [UInt8]) {
    let reply = try decoded {
      try receive(NBDOptionReplyHeader.length, "an option reply") { try NBDOptionReplyHeader.decode($0) }
    }
    guard reply.option == option else { throw NBDClientFailure("the server answered an option that was not asked") }
    var data: [UInt8] = []
    if reply.dataLength > 0 {
      do {
        data = try transport.read(count: reply.dataLength)
      } catch {
        throw NBDClientFailure.handshakeRead("an option reply", error)
      }
    }
    return (reply, data)
  }

  /// `body`, whose wire errors are the server's fault.
  private func decoded<T>(_ body: () throws -> T) throws -> T {
    do {
      return try body()
    } catch let e as NBDWireError {
      throw NBDClientFailure(e.description)
    }
  }

  /// Reads a fixed-length message and decodes it.
  private func receive<M>(
    _ length: Int, _ what: String, _ decode: (UnsafeRawBufferPointer) throws -> (M, Int)?
  ) throws -> M {
    let bytes: [UInt8]
    do {
      bytes = try transport.read(count: length)
    } catch {
      throw NBDClientFailure.handshakeRead(what, error)
    }
    guard let (message, _) = try bytes.withUnsafeBytes(decode) else {
      throw NBDWireError.truncated(what, have: bytes.count)
    }
    return message
  }

  private func transmit(_ bytes: [UInt8]) throws {
    do {
      try transport.write(bytes)
    } catch {
      throw NBDClientFailure(
        "the handshake failed while sending (\(error))", kind: (error as? ToolkitError)?.cause)
    }
  }
}

extension NBDClientFailure {
  /// A read of the handshake that failed.
  static func handshakeRead(_ what: String, _ error: Error) -> NBDClientFailure {
    NBDClientFailure(
      "the handshake failed while reading \(what) (\(error))", kind: (error as? ToolkitError)?.cause)
  }
}
