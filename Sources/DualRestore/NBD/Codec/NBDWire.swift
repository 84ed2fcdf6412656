// The NBD wire codec: every message's layout (NBDProtocol.swift draws them)
// and the only code that knows where a field sits. It touches no socket:
// a decoder takes the bytes received so far and returns the message and how
// many bytes it took, nil when it needs more, or throws NBDWireError when
// the bytes cannot begin one; `NBDWire.finish` turns bytes left over at the
// end of input into a typed error. Encoders write into memory the caller
// gives (the transmission's headers: nothing allocated) or return bytes
// (the handshake's messages).
//
// Fields are big-endian and read and written in order, by NBDWireReader
// and NBDWireWriter, so no offset is written out by hand.

/// Why bytes are not the message they should be, in the sentence the
/// connection is ended or answered with.
public enum NBDWireError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The input ended inside a message: `have` of its bytes came.
  case truncated(String, have: Int)

  // Sent by a server, read by a client.
  case badGreeting
  case oldstyleServer
  case badOptionReplyMagic
  case optionReplyTooLong(Int)
  case badReplyMagic(UInt32)
  /// "the server sent a malformed …"
  case malformed(String)

  // Sent by a client, read by a server.
  case badOptionMagic
  case optionTooLong(option: UInt32, length: Int)
  case badRequestMagic
  /// Option data that does not parse: answered with NBD_REP_ERR_INVALID
  /// and this text; the haggling goes on.
  case invalidOption(String)

  public var description: String {
    switch self {
    case .truncated(let what, let have): return "the input ended inside \(what) (after \(have) bytes)"
    case .badGreeting: return "not an NBD server (bad greeting)"
    case .oldstyleServer: return "the server speaks only the oldstyle handshake, which is not supported"
    case .badOptionReplyMagic: return "the server sent an option reply with a bad magic number"
    case .optionReplyTooLong(let length):
      return "the server sent an option reply of \(length) bytes (at most \(NBD.maximumOptionLength) accepted)"
    case .badReplyMagic(let magic):
      return "the server sent a reply with a bad magic number 0x\(String(magic, radix: 16))"
    case .malformed(let what): return "the server sent a malformed \(what)"
    case .badOptionMagic: return "bad option magic from the client"
    case .optionTooLong(let option, let length): return "option \(option) of \(length) bytes is too long"
    case .badRequestMagic: return "bad request magic; closing the connection"
    case .invalidOption(let text): return text
    }
  }
}

public enum NBDWire {
  /// The end-of-input step: bytes left over (`leftover`, of a message
  /// `what`) are a message cut short; none is a clean end.
  public static func finish(leftover: Int, inside what: String) throws {
    if leftover > 0 { throw NBDWireError.truncated(what, have: leftover) }
  }
}

/// Reads big-endian fields in order. Decoders check `remaining` before
/// they read; a read past the end is a bug (caught in debug builds).
struct NBDWireReader {
  let bytes: UnsafeRawBufferPointer
  private(set) var position = 0

  init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

  var remaining: Int { bytes.count - position }

  @inline(__always) mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
    let value = T(bigEndian: bytes.loadUnaligned(fromByteOffset: position, as: T.self))
    position += MemoryLayout<T>.size
    return value
  }

  /// The next `count` bytes, as a view of the input.
  mutating func view(_ count: Int) -> UnsafeRawBufferPointer {
    defer { position += count }
    return UnsafeRawBufferPointer(rebasing: bytes[position..<position + count])
  }

  mutating func array(_ count: Int) -> [UInt8] { Array(view(count)) }

  mutating func string(_ count: Int) -> String { String(decoding: view(count), as: UTF8.self) }

  mutating func skip(_ count: Int) { position += count }
}

/// Writes big-endian fields in order into memory the caller gives, which
/// must hold them (checked in debug builds).
struct NBDWireWriter {
  let bytes: UnsafeMutableRawBufferPointer
  private(set) var count = 0

  init(_ bytes: UnsafeMutableRawBufferPointer) { self.bytes = bytes }

  @inline(__always) mutating func write<T: FixedWidthInteger>(_ value: T) {
    bytes.storeBytes(of: value.bigEndian, toByteOffset: count, as: T.self)
    count += MemoryLayout<T>.size
  }

  mutating func zeroes(_ n: Int) {
    UnsafeMutableRawBufferPointer(rebasing: bytes[count..<count + n]).initializeMemory(as: UInt8.self, repeating: 0)
    count += n
  }
}

extension Array where Element == UInt8 {
  /// Appends `value` big-endian (the handshake's messages are built so).
  mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
    Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
  }

  /// Runs `body` on a reader of these bytes.
  func decode<T>(_ body: (inout NBDWireReader) throws -> T) rethrows -> T {
    try withUnsafeBytes { raw in
      var reader = NBDWireReader(raw)
      return try body(&reader)
    }
  }
}

/// A big-endian load at an offset, for tests that read bytes they forge;
/// the library reads through NBDWireReader.
extension UnsafeRawPointer {
  @inline(__always) func loadBE<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
    T(bigEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
  }
}
