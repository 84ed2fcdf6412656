// The transmission's messages: requests, simple replies, structured reply
// chunks and the payloads of the chunks this toolkit sends and takes.
// Layouts in NBDProtocol.swift. These are on the hot path: headers are
// encoded into memory the caller owns and decoded from a view of what was
// read, with nothing allocated.

/// A request's header; a WRITE's `length` bytes of data follow it.
public struct NBDRequest: Equatable, Sendable {
  public static let length = NBD.requestLength
  public var flags: UInt16
  public var type: UInt16
  public var cookie: UInt64
  public var offset: UInt64
  public var length: UInt32

  public init(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
    self.flags = flags
    self.type = type
    self.cookie = cookie
    self.offset = offset
    self.length = length
  }

  /// Writes the header into `bytes` (at least `NBDRequest.length` long).
  @inline(__always) public func encode(into bytes: UnsafeMutableRawBufferPointer) {
    var w = NBDWireWriter(bytes)
    w.write(NBD.requestMagic)
    w.write(flags)
    w.write(type)
    w.write(cookie)
    w.write(offset)
    w.write(length)
  }

  /// Throws for a bad magic: nothing after it can be framed.
  @inline(__always) public static func decode(_ bytes: UnsafeRawBufferPointer) throws -> (NBDRequest, Int)? {
    guard bytes.count >= NBDRequest.length else { return nil }
    var r = NBDWireReader(bytes)
    guard r.read(UInt32.self) == NBD.requestMagic else { throw NBDWireError.badRequestMagic }
    let request = NBDRequest(flags: r.read(), type: r.read(), cookie: r.read(), offset: r.read(), length: r.read())
    return (request, NBDRequest.length)
  }
}

/// A structured reply chunk's header; `length` bytes of payload follow.
public struct NBDChunkHeader: Equatable, Sendable {
  public static let length = NBD.structuredReplyLength
  public var flags: UInt16
  public var type: UInt16
  public var cookie: UInt64
  public var payloadLength: Int

  public init(flags: UInt16, type: UInt16, cookie: UInt64, payloadLength: Int) {
    self.flags = flags
    self.type = type
    self.cookie = cookie
    self.payloadLength = payloadLength
  }

  public var isDone: Bool { flags & NBD.replyFlagDone != 0 }
  public var isError: Bool { type & NBD.replyTypeErrorBit != 0 }
}

/// What a server sends back first: a simple reply (a READ's data follows
/// when `error` is 0) or, with structured replies, a chunk's header.
public enum NBDReplyHeader: Equatable, Sendable {
  case simple(error: UInt32, cookie: UInt64)
  case chunk(NBDChunkHeader)

  /// The bytes every reply starts with; a chunk's header is longer.
  public static let minimumLength = NBD.simpleReplyLength

  /// nil until the whole header is there (16 bytes, or 20 for a chunk).
  /// A chunk is taken only when structured replies were agreed; any other
  /// magic number breaks the protocol.
  @inline(__always) public static func decode(_ bytes: UnsafeRawBufferPointer, structured: Bool) throws -> (
    NBDReplyHeader, Int
  )? {
    guard bytes.count >= minimumLength else { return nil }
    var r = NBDWireReader(bytes)
    let magic = r.read(UInt32.self)
    if magic == NBD.simpleReplyMagic {
      return (.simple(error: r.read(), cookie: r.read()), minimumLength)
    }
    guard structured && magic == NBD.structuredReplyMagic else { throw NBDWireError.badReplyMagic(magic) }
    guard bytes.count >= NBDChunkHeader.length else { return nil }
    let header = NBDChunkHeader(
      flags: r.read(), type: r.read(), cookie: r.read(), payloadLength: Int(r.read(UInt32.self)))
    return (.chunk(header), NBDChunkHeader.length)
  }
}

/// What a server's reply starts with, as this toolkit's servers send it:
/// the header of a simple reply, or of one chunk marked done (with the
/// start of its payload where the payload is small). The data or payload
/// that follows goes out after it.
public enum NBDReplyHead: Equatable, Sendable {
  /// A simple reply (a successful READ's data follows).
  case simple(error: UInt32)
  /// OFFSET_DATA: the offset, then `dataLength` bytes of data follow.
  case offsetData(offset: UInt64, dataLength: Int)
  /// ERROR with an empty message.
  case error(UInt32)
  /// BLOCK_STATUS: `payloadLength` bytes of NBDBlockStatus follow.
  case blockStatus(payloadLength: Int)
  /// NONE (an empty READ).
  case empty

  /// The longest head encoded.
  public static let maximumLength = 32

  /// Writes the head for the request `cookie` into `bytes` (at least
  /// `maximumLength` long); returns its length.
  @inline(__always) public func encode(cookie: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Int {
    var w = NBDWireWriter(bytes)
    func chunk(_ type: UInt16, _ length: Int) {
      w.write(NBD.structuredReplyMagic)
      w.write(NBD.replyFlagDone)
      w.write(type)
      w.write(cookie)
      w.write(UInt32(truncatingIfNeeded: length))
    }
    switch self {
    case .simple(let error):
      w.write(NBD.simpleReplyMagic)
      w.write(error)
      w.write(cookie)
    case .offsetData(let offset, let dataLength):
      chunk(NBD.replyTypeOffsetData, 8 + dataLength)
      w.write(offset)
    case .error(let code):
      // The error, and a message of no bytes.
      chunk(NBD.replyTypeError, 6)
      w.write(code)
      w.write(UInt16(0))
    case .blockStatus(let payloadLength):
      chunk(NBD.replyTypeBlockStatus, payloadLength)
    case .empty:
      chunk(NBD.replyTypeNone, 0)
    }
    return w.count
  }
}

/// A BLOCK_STATUS chunk's payload: a metadata context and its runs.
public enum NBDBlockStatus {
  /// The payload's length for `count` runs.
  public static func length(runs count: Int) -> Int { 4 + 8 * count }

  public static func encode(context: UInt32, _ extents: [Extent]) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(length(runs: extents.count))
    out.appendBE(context)
    for e in extents {
      out.appendBE(e.length)
      out.appendBE(e.flags)
    }
    return out
  }

  /// The context id, with the runs appended to `runs`; throws for a
  /// payload that is not a context and at least one whole run.
  public static func decode(_ payload: UnsafeRawBufferPointer, into runs: inout [Extent]) throws -> UInt32 {
    guard payload.count >= 12, (payload.count - 4) % 8 == 0 else {
      throw NBDWireError.malformed("block status chunk (\(payload.count) bytes)")
    }
    var r = NBDWireReader(payload)
    let context = r.read(UInt32.self)
    runs.reserveCapacity(runs.count + r.remaining / 8)
    while r.remaining > 0 { runs.append(Extent(length: r.read(), flags: r.read())) }
    return context
  }

  /// Only the context id, for a payload `decode` would take.
  public static func context(_ payload: UnsafeRawBufferPointer) throws -> UInt32 {
    guard payload.count >= 12, (payload.count - 4) % 8 == 0 else {
      throw NBDWireError.malformed("block status chunk (\(payload.count) bytes)")
    }
    var r = NBDWireReader(payload)
    return r.read()
  }
}

/// An ERROR chunk's payload: the error number and a message.
public struct NBDErrorChunk: Equatable, Sendable {
  public var error: UInt32
  public var message: String

  public init(error: UInt32, message: String) {
    self.error = error
    self.message = message
  }

  public static func decode(_ payload: UnsafeRawBufferPointer) throws -> NBDErrorChunk {
    var r = NBDWireReader(payload)
    guard r.remaining >= 6 else { throw NBDWireError.malformed("error chunk") }
    let error = r.read(UInt32.self)
    let length = Int(r.read(UInt16.self))
    guard length <= r.remaining else { throw NBDWireError.malformed("error chunk") }
    return NBDErrorChunk(error: error, message: r.string(length))
  }
}
