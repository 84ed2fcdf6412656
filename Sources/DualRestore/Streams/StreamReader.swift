// Reads a block stream from a descriptor (a pipe, a file, standard input)
// through the pure parser. A reading thread (HashingInput) keeps the SHA-256
// the END record is checked against. Records point into the reader's buffer
// and stay valid until the next call. The same reader also takes bytes
// already in memory (MemoryInput), hashed without a thread: the fuzz
// targets check one input after another that way.
//
// Given a secret, the reader opens encrypted streams (and refuses plaintext
// ones); their records are authenticated by AES-256-GCM tags chained by
// sequence number, so the reading thread does not hash them. From a
// descriptor, such a stream is parsed on a thread of its own
// (RecordPipeline): opening the records there keeps an encrypted merge as
// fast as a plaintext one, whose hashing is on the reading thread.

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
    if secret != nil {
      // The pipeline's thread reads for itself: no reading thread, no copy.
      let inner = StreamReader(
        input: DescriptorInput(fd: fd, hashing: false), name: name, bufferSize: bufferSize, secret: secret)
      self.init(input: MemoryInput([]), name: name, bufferSize: 1, secret: nil)
      pipeline = RecordPipeline(inner)
      return
    }
    self.init(input: HashingInput(fd: fd), name: name, bufferSize: bufferSize, secret: nil)
  }

  /// Reads the stream kept on `device`, from its first byte to its last.
  package convenience init(device: BlockDevice, name: String, bufferSize: Int = 8 << 20, secret: StreamSecret? = nil) {
    self.init(
      input: DeviceInput(device: device, hashing: secret == nil), name: name, bufferSize: bufferSize, secret: secret)
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
    pipeline?.cancel()
    input.cancel()
    buffer.deallocate()
  }

  /// Set when the records come from another reader on a thread of its
  /// own; this reader's own input, buffer and parser are then unused.
  private var pipeline: RecordPipeline?
  /// In a pipeline: the header seen so far.
  private var pipelinedHeader: StreamFormat.Header?

  public var header: StreamFormat.Header? { pipeline == nil ? parser.header : pipelinedHeader }
  /// Where the next record starts.
  public var position: String { "record \(nextSequence) at byte \(nextOffset)" }
  /// Where the record `next()` returned last starts: "record 12 at byte 65572".
  public var recordPosition: String { "record \(recordSequence) at byte \(recordOffset)" }
  /// Its sequence number and offset, kept as numbers: a message is made
  /// only when one is needed, not for every record.
  package private(set) var recordSequence: UInt64 = 0
  package private(set) var recordOffset: UInt64 = 0
  /// Where the next record starts, as numbers.
  var nextSequence: UInt64 { pipeline?.last?.nextSequence ?? parser.sequence }
  package var nextOffset: UInt64 { pipeline?.last?.nextOffset ?? parser.offset }
  /// The cipher of an encrypted stream read without a pipeline, once open.
  package var recordCipher: RecordCipher? { parser.recordCipher }

  /// The next record, or nil after a complete stream (END verified, then end of input).
  public func next() throws -> StreamParser.Record? {
    if let pipeline {
      guard let record = try pipeline.next(), let entry = pipeline.last else { return nil }
      (recordSequence, recordOffset, bytesRead) = (entry.sequence, entry.offset, entry.bytesRead)
      if case .header(let h) = record { pipelinedHeader = h }
      return record
    }
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
        let endLength =
          StreamFormat.recordOverhead
          + (parser.formatVersion >= StreamFormat.referencesVersion
            ? StreamFormat.referencesEndBodyLength : StreamFormat.endBodyLength)
        let (digest, hashed) = input.digestOfAllButTheEnd(endRecordLength: endLength)
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
