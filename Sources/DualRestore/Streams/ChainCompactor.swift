// Compaction: a chain of stored streams written out as one new full stream
// equal to the device at the chain's end. Each block's newest record is
// copied, not decoded: its body (the block number, length, encoding and the
// payload, LZ4 or raw, as stored) is checked as every read checks it (CRC,
// tag, block number), then framed again with the new stream's sequence
// numbers, CRC-32C and, when the output is encrypted, sealed under the new
// stream's key. Zero runs, and blocks no stream holds, become ZERO runs.
//
// Invariants:
// - Nothing unchecked is copied: a record that fails its check stops the
//   compaction with a sentence naming the stream and the record; the output
//   file is then never renamed into place (OutputSink).
// - Memory is fixed: one read buffer of at most StreamChain.joinLimit plus
//   the largest record, and one output buffer; nothing per block.
// - The new stream's instant is the newest stream's: it holds the device as
//   it was then, and a merge checks that instant against the target's map.
//   When the newest stream has a GENERATION record, the new one has one
//   too: every write, as of that stream's "as of".

import CShim
import Glibc

extension StreamChain {
  public struct CompactionSummary: Sendable {
    public var header: StreamFormat.Header
    public var dataBlocks: UInt64 = 0
    public var zeroBlocks: UInt64 = 0
    /// Bytes of stored records read.
    public var bytesRead: UInt64 = 0
    public var bytesOut: UInt64 = 0
    /// DATA records taken from each stream, oldest first.
    public var recordsFrom: [UInt64]
    public var seconds: Double = 0
    /// The LINEAGE record the new stream carries.
    public var lineage: StreamFormat.Lineage? = nil
    /// The GENERATION record it carries: the chain end's instant, when it has one.
    public var generation: StreamFormat.Generation? = nil
  }

  /// Writes the chain's end to `sink` as one full stream, encrypted with
  /// `encryption` when given.
  public func compact(
    to sink: OutputSink, encryption: StreamSecret?, sourceName: String, progress: Bool = false
  ) throws -> CompactionSummary {
    let started = Instant.now()
    let newest = streams[streams.count - 1].header
    let header = StreamFormat.Header(
      geometry: geometry, started: newest.started, coverage: .all, coveredBlocks: geometry.blockCount,
      compression: .lz4, sourceName: sourceName)
    // The new stream stands for the chain's end, so that the incrementals
    // made after it follow it; it compacts every stream the chain's
    // streams compacted.
    let first = streams[0]
    let end = streams[streams.count - 1]
    let lineage = StreamFormat.Lineage(
      standsFor: end.lineage?.standsFor ?? end.header.streamID,
      standsForStarted: end.lineage?.standsForStarted ?? end.header.started,
      firstCompacted: first.lineage?.firstCompacted ?? first.header.streamID,
      compactedCount: streams.reduce(0) { $0 + ($1.lineage?.compactedCount ?? 1) })
    // It holds every write up to the instant the chain's end was cut at,
    // when that stream says (its GENERATION record): the device as of then.
    let generation = end.generation.map {
      StreamFormat.Generation(generation: $0.generation, changesSince: .unset, asOf: $0.asOf)
    }
    let emitter = try RecordEmitter(
      header: header, lineage: lineage, generation: generation, sink: sink, encryption: encryption)
    var summary = CompactionSummary(header: header, recordsFrom: Array(repeating: 0, count: streams.count))
    summary.lineage = lineage
    summary.generation = generation
    let scratch = ChainReaderScratch(streams: streams.count)
    let meter = ProgressMeter(label: "compact", total: geometry.deviceSize, enabled: progress)
    var zeroStart: UInt64 = 0
    var zeroCount: UInt64 = 0
    func flushZeros() throws {
      guard zeroCount > 0 else { return }
      try emitter.zero(first: zeroStart, count: zeroCount)
      summary.zeroBlocks += zeroCount
      zeroCount = 0
    }
    func addZeros(_ first: UInt64, _ count: UInt64) throws {
      if zeroCount > 0 && zeroStart + zeroCount == first {
        zeroCount += count
      } else {
        try flushZeros()
        (zeroStart, zeroCount) = (first, count)
      }
    }

    // Per stream, the zero runs checked so far: a run that newer blocks
    // interrupt is met again, and read once.
    var checkedZeros = Array(repeating: Set<Int>(), count: streams.count)
    var block: UInt64 = 0
    let count = geometry.blockCount
    while block < count {
      guard let (s, e) = locate(block) else {
        let stop = min(count, nextHeldBlock(after: block, newerThan: -1))
        try addZeros(block, stop - block)
        block = stop
        continue
      }
      let stream = streams[s]
      let entries = stream.index.entries
      let entry = entries[e]
      if entry.type == .zero {
        if !checkedZeros[s].contains(e) {
          do {
            try checkZeroRecord(s, entry, scratch)
          } catch let fault as RecordFault {
            throw ToolkitError("\(stream.name): \(describe(entry)): \(fault.why); nothing was compacted")
          }
          checkedZeros[s].insert(e)
        }
        let stop = min(entry.endBlock, nextHeldBlock(after: block, newerThan: s))
        try addZeros(block, stop - block)
        block = stop
        continue
      }
      try flushZeros()
      let (last, bytes) = joinedRun(stream: s, from: e, before: count)
      let records = scratch.records(bytes)
      do {
        try stream.source.read(into: UnsafeMutableRawBufferPointer(start: records, count: bytes), at: entry.offset)
      } catch {
        throw ToolkitError("\(stream.name): the stored stream could not be read at byte \(entry.offset): \(error)")
      }
      var at = 0
      for i in e...last {
        let r = entries[i]
        let body: UnsafeRawBufferPointer
        do {
          body = try open(records + at, r, stream: s, scratch: scratch)
          try checkData(body, r, stream: stream)
        } catch let fault as RecordFault {
          throw ToolkitError("\(stream.name): \(describe(r)): \(fault.why); nothing was compacted")
        }
        try emitter.data(body)
        summary.dataBlocks += 1
        summary.recordsFrom[s] += 1
        at += Int(r.length)
      }
      summary.bytesRead += UInt64(bytes)
      block = entries[last].endBlock
      meter.update(min(geometry.deviceSize, geometry.offset(ofBlock: block)))
    }
    try flushZeros()
    try emitter.finish()
    meter.finish(geometry.deviceSize)
    summary.bytesOut = sink.bytesWritten
    summary.seconds = started.secondsAgo
    return summary
  }

  /// Reads the ZERO record of `entry` in stream `s` and checks it as a read
  /// does (framing, CRC, tag, the run the index names), throwing
  /// RecordFault with why: a compaction stops with one sentence, without
  /// the line a server logs for reads that fail.
  private func checkZeroRecord(_ s: Int, _ entry: StreamIndexFormat.Entry, _ scratch: ChainReaderScratch) throws {
    let stream = streams[s]
    let record = scratch.records(Int(entry.length))
    do {
      try stream.source.read(
        into: UnsafeMutableRawBufferPointer(start: record, count: Int(entry.length)), at: entry.offset)
    } catch {
      throw ToolkitError("\(stream.name): the stored stream could not be read at byte \(entry.offset): \(error)")
    }
    try checkZeroRun(try open(record, entry, stream: s, scratch: scratch), entry)
  }
}

/// Frames records into a stream from bodies already encoded: the preamble,
/// the CRYPTO record and HEADER, then DATA and ZERO records, then END with
/// its counts and (plaintext) digest. Output goes through one buffer,
/// written when full.
// @unchecked Sendable: used by one thread.
final class RecordEmitter: @unchecked Sendable {
  private let sink: OutputSink
  private let cipher: RecordCipher?
  private let digest = Digester(DigestAlgorithm.sha256)
  private let buffer: AlignedBuffer
  private var used = 0
  private var sequence: UInt64 = 0
  private let geometry: BlockGeometry
  private var dataBlocks: UInt64 = 0
  private var zeroBlocks: UInt64 = 0
  private var blockBytes: UInt64 = 0
  private let tagLength: Int

  init(
    header: StreamFormat.Header, lineage: StreamFormat.Lineage?, generation: StreamFormat.Generation? = nil,
    sink: OutputSink, encryption: StreamSecret?
  ) throws {
    if let lineage {
      // The parser's own checks, so that no stream is written that a reader refuses.
      try StreamFormat.lineageBody(lineage).withUnsafeBytes { _ = try StreamFormat.decodeLineage($0, header: header) }
    }
    self.sink = sink
    geometry = header.geometry
    buffer = AlignedBuffer(count: 8 << 20)
    let sealed = try encryption.map { try StreamCrypto.seal($0) }
    cipher = sealed?.cipher
    tagLength = sealed == nil ? 0 : StreamCrypto.tagLength
    let head = StreamFormat.head(header, lineage: lineage, generation: generation, encryption: sealed)
    for record in head.records { try put(record) }
    sequence = head.nextSequence
  }

  private func put(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { raw in
      try room(raw.count)
      (buffer.pointer + used).copyMemory(from: raw.baseAddress!, byteCount: raw.count)
      used += raw.count
    }
  }

  /// Makes room for `count` bytes, writing out what the buffer holds.
  private func room(_ count: Int) throws {
    guard used + count > buffer.count else { return }
    try drain()
  }

  private func drain() throws {
    guard used > 0 else { return }
    let bytes = UnsafeRawBufferPointer(start: buffer.pointer, count: used)
    if cipher == nil { digest.update(bytes) }
    try sink.write(bytes)
    used = 0
  }

  /// One record of `type` from a plaintext body at `body`.
  private func record(_ type: StreamFormat.RecordType, _ body: UnsafeRawBufferPointer) throws {
    let total = StreamFormat.recordOverhead + body.count + tagLength
    try room(total)
    let frame = buffer.pointer + used
    StreamFormat.storeRecordHeader(frame, type: type, bodyLength: body.count + tagLength, sequence: sequence)
    let out = frame + StreamFormat.recordHeaderLength
    if let cipher {
      cipher.begin(framing: frame)
      cipher.update(body.baseAddress!, out, count: body.count)
      cipher.seal(tag: out + body.count)
    } else {
      out.copyMemory(from: body.baseAddress!, byteCount: body.count)
    }
    let crc = dr_crc32c(0, frame, StreamFormat.recordHeaderLength + body.count + tagLength)
    (out + body.count + tagLength).storeBytes(of: crc.littleEndian, as: UInt32.self)
    used += total
    sequence += 1
  }

  /// A DATA record from a checked plaintext DATA body.
  func data(_ body: UnsafeRawBufferPointer) throws {
    try record(.data, body)
    let block = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
    dataBlocks += 1
    blockBytes += UInt64(geometry.length(ofBlock: block))
  }

  func zero(first: UInt64, count: UInt64) throws {
    var fields = (first.littleEndian, count.littleEndian)
    try withUnsafeBytes(of: &fields) { try record(.zero, $0) }
    zeroBlocks += count
    blockBytes += geometry.byteRange(blocks: first, count: count).length
  }

  func finish() throws {
    try drain()
    let end = StreamFormat.End(
      dataBlocks: dataBlocks, zeroBlocks: zeroBlocks, bytes: blockBytes, records: sequence,
      digest: cipher == nil ? digest.finish() : [UInt8](repeating: 0, count: 32))
    try sink.write(StreamFormat.endRecord(end, cipher: cipher))
  }
}
