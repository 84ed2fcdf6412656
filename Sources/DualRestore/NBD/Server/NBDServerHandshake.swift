// The server's side of the fixed newstyle handshake, as nbdkit's
// protocol-handshake-newstyle.c: the greeting, the client's flags, then
// options until NBD_OPT_EXPORT_NAME or an acknowledged NBD_OPT_GO names the
// export served in transmission, or NBD_OPT_ABORT ends the connection.
//
// - Every option's data is read whole (at most NBD.maximumOptionLength)
//   before it is looked at; data that does not parse is answered with
//   NBD_REP_ERR_INVALID and the haggling goes on. At most 1000 options.
// - TLS required: every option but STARTTLS and ABORT is refused with
//   NBD_REP_ERR_TLS_REQD until TLS is on, and NBD_OPT_EXPORT_NAME (which has
//   no error reply) closes the connection. What was agreed in the clear
//   (structured replies, a metadata context) does not carry over into TLS.
// - base:allocation is the one metadata context; SET selects it for the
//   export named, and transmission has it only for that export.

/// What the handshake agreed: the export and how its replies go.
struct NBDServerSession {
  let export: NBDExport
  /// NBD_OPT_STRUCTURED_REPLY was agreed: READ and BLOCK_STATUS replies are
  /// structured, and READ takes NBD_CMD_FLAG_DF.
  let structuredReplies: Bool
  /// base:allocation is selected for the export: BLOCK_STATUS is served.
  let allocationContext: Bool
}

struct NBDServerHandshake {
  let server: NBDServer
  let transport: NBDTransport
  private var noZeroes = false
  private var structuredReplies = false
  /// The export name base:allocation was selected for.
  private var allocationSelectedFor: String?

  init(server: NBDServer, transport: NBDTransport) {
    self.server = server
    self.transport = transport
  }

  /// The session agreed, or nil when the client aborted.
  mutating func run() throws -> NBDServerSession? {
    try transport.write(NBDGreeting(flags: NBD.flagFixedNewstyle | NBD.flagNoZeroes).encode())
    let clientFlags = try receive(NBDClientFlags.length) { NBDClientFlags.decode($0) }.flags
    guard clientFlags & NBD.clientFlagFixedNewstyle != 0 else {
      throw ToolkitError("the client does not speak the fixed newstyle handshake")
    }
    guard clientFlags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
      throw ToolkitError("the client sent unknown flags 0x\(String(clientFlags, radix: 16))")
    }
    noZeroes = clientFlags & NBD.clientFlagNoZeroes != 0

    var count = 0
    while true {
      count += 1
      // Bounded by the handshake timeout too; this stops a fast loop.
      guard count <= 1000 else { throw ToolkitError("the client sent more than 1000 options; disconnected") }
      let header = try receive(NBDOptionHeader.length) { try NBDOptionHeader.decode($0) }
      let option = header.option
      let data = try transport.read(count: header.dataLength)

      if option == NBD.optStartTLS {
        structuredReplies = false
        allocationSelectedFor = nil
        try startTLS(data)
        continue
      }
      if server.options.tls.isRequired && !transport.isTLS && option != NBD.optAbort {
        if option == NBD.optExportName {
          throw ToolkitError("the client asked for an export without TLS, which this server requires")
        }
        try reply(option, NBD.repErrTLSRequired, "TLS is required: send NBD_OPT_STARTTLS first")
        continue
      }
      do {
        if let session = try answer(option, data) { return session }
        if option == NBD.optAbort { return nil }
      } catch let e as NBDWireError {
        guard case .invalidOption(let text) = e else { throw e }
        try reply(option, NBD.repErrInvalid, text)
      }
    }
  }

  /// Answers one option: the session when it starts transmission.
  private mutating func answer(_ option: UInt32, _ data: [UInt8]) throws -> NBDServerSession? {
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
      try transport.write(
        NBDExportNameReply(size: export.size, flags: transmissionFlags(export)).encode(noZeroes: noZeroes))
      return session(export, name)
    case NBD.optAbort:
      try reply(option, NBD.repAck)
    case NBD.optList:
      guard data.isEmpty else { throw NBDWireError.invalidOption("LIST takes no data") }
      for e in server.exports where e.isOffered {
        try reply(option, NBD.repServer, NBDExportEntry(name: Array(e.name.utf8)).encode())
      }
      try reply(option, NBD.repAck)
    case NBD.optInfo, NBD.optGo:
      let request = try NBDExportRequest.decode(data)
      let name = String(decoding: request.name, as: UTF8.self)
      let export: NBDExport
      switch server.export(named: name) {
      case .success(let e): export = e
      case .failure(let refusal):
        try reply(option, refusal.code, refusal.message)
        return nil
      }
      try reply(option, NBD.repInfo, NBDInfo.export(size: export.size, flags: transmissionFlags(export)).encode())
      try reply(
        option, NBD.repInfo,
        NBDInfo.blockSize(minimum: 1, preferred: export.preferredBlockSize, maximum: UInt32(NBD.maximumPayload))
          .encode())
      try reply(option, NBD.repInfo, NBDInfo.description(export.description).encode())
      try reply(option, NBD.repAck)
      if option == NBD.optGo { return session(export, name) }
    case NBD.optStructuredReply:
      guard data.isEmpty else { throw NBDWireError.invalidOption("STRUCTURED_REPLY takes no data") }
      structuredReplies = true
      try reply(option, NBD.repAck)
    case NBD.optListMetaContext, NBD.optSetMetaContext:
      try metaContext(option, data)
    default:
      try reply(option, NBD.repErrUnsupported, "option \(option) is not supported")
    }
    return nil
  }

  private func session(_ export: NBDExport, _ name: String) -> NBDServerSession {
    NBDServerSession(
      export: export, structuredReplies: structuredReplies, allocationContext: allocationSelectedFor == name)
  }

  /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The one
  /// context is base:allocation (asked for by name, or by "base:"); other
  /// names select nothing. SET replaces what an earlier SET selected.
  private mutating func metaContext(_ option: UInt32, _ data: [UInt8]) throws {
    let set = option == NBD.optSetMetaContext
    guard structuredReplies else {
      throw NBDWireError.invalidOption("metadata contexts need structured replies first")
    }
    let request = try NBDMetaContextRequest.decode(data)
    let name = String(decoding: request.name, as: UTF8.self)
    guard server.hasExport(named: name) else {
      try reply(option, NBD.repErrUnknown, "no export named '\(name)'")
      return
    }
    // LIST with no query lists every context; SET with none selects none.
    // A namespace alone ("base:") lists its contexts; SET names them.
    let queries = request.queries.map { String(decoding: $0, as: UTF8.self) }
    let selected =
      queries.contains { $0 == NBD.baseAllocation || (!set && $0 == "base:") } || (!set && queries.isEmpty)
    if set { allocationSelectedFor = selected ? name : nil }
    if selected {
      let context = NBDMetaContext(id: set ? NBD.baseAllocationID : 0, name: Array(NBD.baseAllocation.utf8))
      try reply(option, NBD.repMetaContext, context.encode())
    }
    try reply(option, NBD.repAck)
  }

  /// NBD_OPT_STARTTLS: acknowledged, then the TLS handshake; a failed
  /// handshake ends the connection (the stream is no longer NBD).
  private func startTLS(_ data: [UInt8]) throws {
    let option = NBD.optStartTLS
    guard let context = server.options.tls.context else {
      try reply(option, NBD.repErrUnsupported, "TLS is not enabled on this server")
      return
    }
    guard data.isEmpty else {
      try reply(option, NBD.repErrInvalid, "STARTTLS takes no data")
      return
    }
    guard !transport.isTLS else {
      try reply(option, NBD.repErrInvalid, "TLS is already on")
      return
    }
    try reply(option, NBD.repAck)
    try transport.startTLS(server: context)
  }

  private func transmissionFlags(_ export: NBDExport) -> UInt16 {
    NBD.flagHasFlags | export.flags | (structuredReplies ? NBD.flagSendDF : 0)
  }

  private func reply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) throws {
    try transport.write(NBDOptionReplyHeader.encode(option, type, data))
  }

  /// An error reply with a message (at most 4096 bytes, as the protocol says).
  private func reply(_ option: UInt32, _ type: UInt32, _ message: String) throws {
    try reply(option, type, Array(message.utf8.prefix(4096)))
  }

  /// Reads a fixed-length message of `length` bytes and decodes it.
  private func receive<M>(_ length: Int, _ decode: (UnsafeRawBufferPointer) throws -> (M, Int)?) throws -> M {
    let bytes = try transport.read(count: length)
    guard let (message, _) = try bytes.withUnsafeBytes(decode) else {
      throw NBDWireError.truncated("a handshake message", have: bytes.count)
    }
    return message
  }
}
