// The handshake's messages (fixed newstyle): the greeting, the client's
// flags, options and their replies, and the data of the options and replies
// this toolkit speaks. Layouts in NBDProtocol.swift. Decoders of fixed
// headers return nil until all their bytes are there; decoders of option
// data take the whole data, whose length the header gave.

/// The server's first message: the magic numbers and the handshake flags.
public struct NBDGreeting: Equatable, Sendable {
  public static let length = 18
  public var flags: UInt16

  public init(flags: UInt16) { self.flags = flags }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(NBDGreeting.length)
    out.appendBE(NBD.initMagic)
    out.appendBE(NBD.optionMagic)
    out.appendBE(flags)
    return out
  }

  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> (NBDGreeting, Int)? {
    guard bytes.count >= length else { return nil }
    var r = NBDWireReader(bytes)
    guard r.read(UInt64.self) == NBD.initMagic else { throw NBDWireError.badGreeting }
    let second = r.read(UInt64.self)
    if second == NBD.oldstyleMagic { throw NBDWireError.oldstyleServer }
    guard second == NBD.optionMagic else { throw NBDWireError.badGreeting }
    return (NBDGreeting(flags: r.read()), length)
  }
}

/// The client's answer to the greeting.
public struct NBDClientFlags: Equatable, Sendable {
  public static let length = 4
  public var flags: UInt32

  public init(flags: UInt32) { self.flags = flags }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(flags)
    return out
  }

  public static func decode(_ bytes: UnsafeRawBufferPointer) -> (NBDClientFlags, Int)? {
    guard bytes.count >= length else { return nil }
    var r = NBDWireReader(bytes)
    return (NBDClientFlags(flags: r.read()), length)
  }
}

/// An option's header, sent by the client; `length` bytes of data follow.
public struct NBDOptionHeader: Equatable, Sendable {
  public static let length = 16
  public var option: UInt32
  public var dataLength: Int

  public init(option: UInt32, dataLength: Int) {
    self.option = option
    self.dataLength = dataLength
  }

  /// The whole option: header and data.
  public static func encode(_ option: UInt32, _ data: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(length + data.count)
    out.appendBE(NBD.optionMagic)
    out.appendBE(option)
    out.appendBE(UInt32(truncatingIfNeeded: data.count))
    out += data
    return out
  }

  /// Throws for a bad magic, and for data longer than this toolkit takes
  /// (which cannot be skipped safely).
  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> (NBDOptionHeader, Int)? {
    guard bytes.count >= length else { return nil }
    var r = NBDWireReader(bytes)
    guard r.read(UInt64.self) == NBD.optionMagic else { throw NBDWireError.badOptionMagic }
    let option = r.read(UInt32.self)
    let dataLength = Int(r.read(UInt32.self))
    guard dataLength <= NBD.maximumOptionLength else {
      throw NBDWireError.optionTooLong(option: option, length: dataLength)
    }
    return (NBDOptionHeader(option: option, dataLength: dataLength), length)
  }
}

/// An option reply's header, sent by the server; `length` bytes of data follow.
public struct NBDOptionReplyHeader: Equatable, Sendable {
  public static let length = 20
  public var option: UInt32
  public var type: UInt32
  public var dataLength: Int

  public init(option: UInt32, type: UInt32, dataLength: Int) {
    self.option = option
    self.type = type
    self.dataLength = dataLength
  }

  public var isError: Bool { type & NBD.repErrorBit != 0 }

  /// The whole reply: header and data.
  public static func encode(_ option: UInt32, _ type: UInt32, _ data: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(length + data.count)
    out.appendBE(NBD.optionReplyMagic)
    out.appendBE(option)
    out.appendBE(type)
    out.appendBE(UInt32(truncatingIfNeeded: data.count))
    out += data
    return out
  }

  /// Throws for a bad magic, and for data longer than this toolkit takes.
  public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> (NBDOptionReplyHeader, Int)? {
    guard bytes.count >= length else { return nil }
    var r = NBDWireReader(bytes)
    guard r.read(UInt64.self) == NBD.optionReplyMagic else { throw NBDWireError.badOptionReplyMagic }
    let option = r.read(UInt32.self)
    let type = r.read(UInt32.self)
    let dataLength = Int(r.read(UInt32.self))
    guard dataLength <= NBD.maximumOptionLength else { throw NBDWireError.optionReplyTooLong(dataLength) }
    return (NBDOptionReplyHeader(option: option, type: type, dataLength: dataLength), length)
  }
}

/// The data of NBD_OPT_GO and NBD_OPT_INFO: an export name and the
/// information asked for.
public struct NBDExportRequest: Equatable, Sendable {
  public var name: [UInt8]
  public var infos: [UInt16]

  public init(name: [UInt8], infos: [UInt16]) {
    self.name = name
    self.infos = infos
  }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(UInt32(truncatingIfNeeded: name.count))
    out += name
    out.appendBE(UInt16(truncatingIfNeeded: infos.count))
    for i in infos { out.appendBE(i) }
    return out
  }

  public static func decode(_ data: [UInt8]) throws -> NBDExportRequest {
    try data.decode { r in
      guard r.remaining >= 6 else { throw NBDWireError.invalidOption("short INFO/GO request") }
      let nameLength = Int(r.read(UInt32.self))
      guard nameLength <= r.remaining - 2 else { throw NBDWireError.invalidOption("bad export name length") }
      let name = r.array(nameLength)
      let count = Int(r.read(UInt16.self))
      guard r.remaining == 2 * count else { throw NBDWireError.invalidOption("bad information request count") }
      return NBDExportRequest(name: name, infos: (0..<count).map { _ in r.read(UInt16.self) })
    }
  }
}

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an
/// export name and the queries.
public struct NBDMetaContextRequest: Equatable, Sendable {
  public var name: [UInt8]
  public var queries: [[UInt8]]

  public init(name: [UInt8], queries: [[UInt8]]) {
    self.name = name
    self.queries = queries
  }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(UInt32(truncatingIfNeeded: name.count))
    out += name
    out.appendBE(UInt32(truncatingIfNeeded: queries.count))
    for q in queries {
      out.appendBE(UInt32(truncatingIfNeeded: q.count))
      out += q
    }
    return out
  }

  /// Every byte must belong to the name or a query.
  public static func decode(_ data: [UInt8]) throws -> NBDMetaContextRequest {
    let malformed = NBDWireError.invalidOption("malformed metadata context request")
    return try data.decode { r in
      guard r.remaining >= 4 else { throw malformed }
      let nameLength = Int(r.read(UInt32.self))
      guard r.remaining >= nameLength + 4 else { throw malformed }
      let name = r.array(nameLength)
      let count = Int(r.read(UInt32.self))
      var queries: [[UInt8]] = []
      for _ in 0..<count {
        guard r.remaining >= 4 else { throw malformed }
        let n = Int(r.read(UInt32.self))
        guard r.remaining >= n else { throw malformed }
        queries.append(r.array(n))
      }
      guard r.remaining == 0 else { throw malformed }
      return NBDMetaContextRequest(name: name, queries: queries)
    }
  }
}

/// The data of an NBD_REP_INFO reply.
public enum NBDInfo: Equatable, Sendable {
  case export(size: UInt64, flags: UInt16)
  case blockSize(minimum: UInt32, preferred: UInt32, maximum: UInt32)
  /// At most 4096 bytes are kept.
  case description(String)
  /// Information this toolkit does not use (a name, or unknown).
  case other(UInt16)

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    switch self {
    case .export(let size, let flags):
      out.appendBE(NBD.infoExport)
      out.appendBE(size)
      out.appendBE(flags)
    case .blockSize(let minimum, let preferred, let maximum):
      out.appendBE(NBD.infoBlockSize)
      out.appendBE(minimum)
      out.appendBE(preferred)
      out.appendBE(maximum)
    case .description(let text):
      out.appendBE(NBD.infoDescription)
      out += text.utf8.prefix(4096)
    case .other(let kind):
      out.appendBE(kind)
    }
    return out
  }

  public static func decode(_ data: [UInt8]) throws -> NBDInfo {
    try data.decode { r in
      guard r.remaining >= 2 else { throw NBDWireError.malformed("information reply") }
      let kind = r.read(UInt16.self)
      switch kind {
      case NBD.infoExport:
        guard r.remaining == 10 else { throw NBDWireError.malformed("export description") }
        return .export(size: r.read(), flags: r.read())
      case NBD.infoBlockSize:
        guard r.remaining == 12 else { throw NBDWireError.malformed("block size description") }
        return .blockSize(minimum: r.read(), preferred: r.read(), maximum: r.read())
      case NBD.infoDescription:
        return .description(r.string(min(r.remaining, 4096)))
      default:
        return .other(kind)
      }
    }
  }
}

/// The data of an NBD_REP_META_CONTEXT reply: a context's id and name.
public struct NBDMetaContext: Equatable, Sendable {
  public var id: UInt32
  public var name: [UInt8]

  public init(id: UInt32, name: [UInt8]) {
    self.id = id
    self.name = name
  }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(id)
    return out + name
  }

  public static func decode(_ data: [UInt8]) throws -> NBDMetaContext {
    try data.decode { r in
      guard r.remaining >= 4 else { throw NBDWireError.malformed("metadata context reply") }
      return NBDMetaContext(id: r.read(), name: r.array(r.remaining))
    }
  }
}

/// The data of an NBD_REP_SERVER reply (NBD_OPT_LIST): an export's name.
public struct NBDExportEntry: Equatable, Sendable {
  public var name: [UInt8]

  public init(name: [UInt8]) { self.name = name }

  public func encode() -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(UInt32(truncatingIfNeeded: name.count))
    return out + name
  }
}

/// The answer to NBD_OPT_EXPORT_NAME: the export's size and transmission
/// flags, then 124 zero bytes unless the client asked for none.
public struct NBDExportNameReply: Equatable, Sendable {
  public var size: UInt64
  public var flags: UInt16

  public init(size: UInt64, flags: UInt16) {
    self.size = size
    self.flags = flags
  }

  public static func length(noZeroes: Bool) -> Int { noZeroes ? 10 : 134 }

  public func encode(noZeroes: Bool) -> [UInt8] {
    var out: [UInt8] = []
    out.appendBE(size)
    out.appendBE(flags)
    if !noZeroes { out += repeatElement(0, count: 124) }
    return out
  }

  public static func decode(_ bytes: UnsafeRawBufferPointer, noZeroes: Bool) -> (NBDExportNameReply, Int)? {
    let length = length(noZeroes: noZeroes)
    guard bytes.count >= length else { return nil }
    var r = NBDWireReader(bytes)
    return (NBDExportNameReply(size: r.read(), flags: r.read()), length)
  }
}
