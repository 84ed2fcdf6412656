// Reads a block stream from a descriptor (a pipe, a file, standard input)
// through the pure parser. A reading thread (HashingInput) keeps the SHA-256
// the END record is checked against. Records point into the reader's buffer
// and stay valid until the next call. The same reader also takes bytes
// already in memory (MemoryInput), hashed without a thread: the fuzz
// targets check one input after another that way.
//
// Given a secret, the reader opens encrypted streams (and refuses plaintext
// ones); their records are authenticated by AES-256-GCM tags chained by
// sequence number, so the reading thread does not hash them.

import Glibc

public final class StreamReader {
  public let name: String
  private let input: any StreamInput
  private var buffer: UnsafeMutableRawPointer
  private var capacity: Int
  private var start = 0
  private var end = 0
  private var eof = false
  private var parser: StreamParser
  /// The END record, held back until the end of input confirms the digest.
  private var pendingEnd: (StreamFormat.End, String, UInt64)?
  /// Bytes of stream consumed so far.
  public private(set) var bytesRead: UInt64 = 0

  /// Reads from `fd`; `name` is how messages refer to the stream. With
  /// `secret`, the stream must be encrypted with it.
  public convenience init(fd: Int32, name: String, bufferSize: Int = 4 << 20, secret: StreamSecret? = nil) {
    self.init(
      input: HashingInput(fd: fd, hashing: secret == nil), name: name, bufferSize: bufferSize, secret: secret)
  }

  /// Reads `bytes`, handed over `chunk` bytes at a time as a pipe would.
  package convenience init(
    bytes: [UInt8], name: String, bufferSize: Int = 4 << 20, chunk: Int = 1 << 16, secret: StreamSecret? = nil
  ) {
    self.init(
      input: MemoryInput(bytes, hashing: secret == nil, chunk: chunk), name: name, bufferSize: bufferSize,
      secret: secret)
  }

  private init(input: any StreamInput, name: String, bufferSize: Int, secret: StreamSecret?) {
    self.input = input
    parser = StreamParser(secret: secret)
    self.name = name
    capacity = bufferSize
    buffer = .allocate(byteCount: bufferSize, alignment: 4096)
  }

  deinit {
    input.cancel()
    buffer.deallocate()
  }

  public var header: StreamFormat.Header? { parser.header }
  /// Where the next record starts.
  public var position: String { parser.position }
  /// Where the record `next()` returned last starts: "record 12 at byte 65572".
  public var recordPosition: String { "record \(recordSequence) at byte \(recordOffset)" }
  /// Its sequence number and offset, kept as numbers: a message is made
  /// only when one is needed, not for every record.
  private var recordSequence: UInt64 = 0
  private var recordOffset: UInt64 = 0

  /// The next record, or nil after a complete stream (END verified, then end of input).
  public func next() throws -> StreamParser.Record? {
    while true {
      let available = UnsafeRawBufferPointer(start: buffer + start, count: end - start)
      let (hereSequence, hereOffset) = (parser.sequence, parser.offset)
      let parsed: (record: StreamParser.Record, consumed: Int)?
      do {
        parsed = try parser.next(available)
      } catch let error as ToolkitError {
        throw ToolkitError("\(name): \(error.message)")
      }
      if let (record, consumed) = parsed {
        (recordSequence, recordOffset) = (hereSequence, hereOffset)
        if case .end(let e) = record {
          // Checked at the end of input, when the reading thread has hashed
          // everything before this record.
          pendingEnd = (e, recordPosition, bytesRead)
          start += consumed
          bytesRead += UInt64(consumed)
          continue
        }
        start += consumed
        bytesRead += UInt64(consumed)
        return record
      }
      if eof {
        do {
          try parser.finish(leftover: end - start)
        } catch let error as ToolkitError {
          throw ToolkitError("\(name): \(error.message)")
        }
        guard let (e, position, offset) = pendingEnd else { return nil }
        pendingEnd = nil
        if parser.isEncrypted { return .end(e) }
        let (digest, hashed) = input.digestOfAllButTheEnd()
        if hashed != offset || digest != e.digest {
          throw ToolkitError("\(name): \(position): the stream digest does not match; the stream is damaged")
        }
        return .end(e)
      }
      try fill()
    }
  }

  /// Reads more input, moving unread bytes to the front and growing the
  /// buffer when one record needs more room (records are bounded).
  private func fill() throws {
    if start > 0 {
      let live = end - start
      if live > 0 { buffer.copyMemory(from: buffer + start, byteCount: live) }
      start = 0
      end = live
    }
    if end == capacity {
      let bigger = capacity * 2
      let grown = UnsafeMutableRawPointer.allocate(byteCount: bigger, alignment: 4096)
      grown.copyMemory(from: buffer, byteCount: end)
      buffer.deallocate()
      buffer = grown
      capacity = bigger
    }
    do {
      let n = try input.read(into: buffer + end, count: capacity - end)
      if n == 0 { eof = true } else { end += n }
    } catch let e as Errno {
      throw ToolkitError("\(name): \(e)")
    }
  }
}
