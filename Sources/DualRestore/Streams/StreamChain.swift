// A chain of stored streams — a full stream and the incrementals that
// follow it — read as one read-only device: a block reads from the newest
// stream that holds it, through the streams' indexes, one record at a time.
//
// Invariants:
// - The chain is checked when it is made: one geometry; the first stream
//   full; each next stream's base is the stream before it (or the stream a
//   compacted full stream stands for).
// - Every record read is checked against its index entry before anything in
//   it is used: framing, sequence number, length, CRC-32C, the AES-256-GCM
//   tag of an encrypted stream, the block number, the decoded length. A
//   record that fails makes its own blocks fail (EIO), with one line in the
//   log naming the stream and the record; every other block reads on.
// - A zero run is checked once, the first time it is read, then trusted.
// - Blocks no stream holds read as zeros.
// - Reads of consecutive records of one stream are joined into one read of
//   the source (one HTTP range request behind nbdkit's curl plugin), up to
//   `joinLimit` bytes. Buffers and ciphers are kept per reader and reused.

import CLZ4
import CShim
import Glibc

public final class StreamChain: Sendable {
  public let streams: [StoredStream]
  public let geometry: BlockGeometry
  /// How messages name the chain: its newest stream.
  public let name: String
  private let log: @Sendable (String) -> Void
  /// Readers' buffers and ciphers, kept for the next read.
  private let spares = Locked<[ChainReaderScratch]>([])
  /// Per stream, per entry: zero runs checked so far.
  private let checkedZeros: [Locked<Set<Int>>]
  /// Records whose failure was logged, so a damaged record is named once.
  private let reported = Locked<Set<String>>([])
  static let joinLimit = 8 << 20

  /// Checks that `streams` (oldest first) form a chain.
  public init(_ streams: [StoredStream], log: @escaping @Sendable (String) -> Void = { _ in }) throws {
    guard let first = streams.first, let last = streams.last else { throw ToolkitError("no stream to serve") }
    try StreamChain.checkOrder(streams.map { ($0.name, $0.header, $0.identity.standsFor) })
    self.streams = streams
    self.geometry = first.header.geometry
    self.name = last.name
    self.log = log
    self.checkedZeros = streams.map { _ in Locked(Set<Int>()) }
  }

  /// Checks that streams (oldest first; each a name, its HEADER and the
  /// stream its end stands for besides its own) form a chain: one
  /// geometry, a full stream first, each next stream on top of the one
  /// before it. Throws the sentence that says which does not follow.
  public static func checkOrder(_ streams: [(name: String, header: StreamFormat.Header, standsFor: ID128)]) throws {
    guard let first = streams.first else { throw ToolkitError("no stream to serve") }
    guard first.header.baseStreamID.isNone else {
      throw ToolkitError(
        "\(first.name) is an incremental stream on top of stream \(first.header.baseStreamID); "
          + "a chain starts with a full stream")
    }
    var seen: Set<ID128> = []
    for (i, s) in streams.enumerated() {
      guard s.header.geometry == first.header.geometry else {
        throw ToolkitError(
          "\(s.name) is of a device of \(s.header.geometry), but \(first.name) of \(first.header.geometry)")
      }
      guard seen.insert(s.header.streamID).inserted else {
        throw ToolkitError("\(s.name) is stream \(s.header.streamID), given twice")
      }
      guard i > 0 else { continue }
      let before = streams[i - 1]
      if s.header.baseStreamID.isNone {
        throw ToolkitError(
          "\(s.name) is a full stream after \(before.name): give a chain as one full stream and the incrementals "
            + "that follow it, oldest first")
      }
      let follows =
        s.header.baseStreamID == before.header.streamID
        || (!before.standsFor.isNone && s.header.baseStreamID == before.standsFor)
      guard follows else {
        throw ToolkitError(
          "\(s.name) applies on top of stream \(s.header.baseStreamID), but the stream before it, \(before.name), "
            + "is \(before.header.streamID)"
            + (before.standsFor.isNone ? "" : " (standing for \(before.standsFor))")
            + "; a stream of the chain is missing or out of order")
      }
    }
  }

  /// The newest stream holding `block` and its entry there.
  @inline(__always)
  func locate(_ block: UInt64) -> (stream: Int, entry: Int)? {
    var s = streams.count - 1
    while s >= 0 {
      if let e = streams[s].index.entry(for: block) { return (s, e) }
      s -= 1
    }
    return nil
  }

  /// The chain's end as a device.
  public func device() -> ChainDevice { ChainDevice(chain: self) }

  // MARK: Reading

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let out = buffer.baseAddress, buffer.count > 0 else { return }
    let end = offset + UInt64(buffer.count)
    guard end <= geometry.deviceSize else {
      throw DeviceError(name, .outOfRange, "read of \(buffer.count) bytes at \(offset)")
    }
    let scratch = takeScratch()
    defer { giveBack(scratch) }
    let shift = geometry.blockShift
    var position = offset
    while position < end {
      let block = position >> shift
      guard let (s, e) = locate(block) else {
        // No stream holds the block: zeros, up to the next block some stream holds.
        let stop = min(end, nextHeldOffset(after: block, newerThan: -1))
        memset(out + Int(position - offset), 0, Int(stop - position))
        position = stop
        continue
      }
      let stream = streams[s]
      let entry = stream.index.entries[e]
      if entry.type == .zero {
        try checkZero(s, e, scratch)
        // Up to the run's end or the first block a newer stream holds.
        let stop = min(end, geometry.offset(ofBlock: entry.endBlock), nextHeldOffset(after: block, newerThan: s))
        memset(out + Int(position - offset), 0, Int(stop - position))
        position = stop
        continue
      }
      // A run of DATA records of this stream, one after another in it and
      // in block order, that no newer stream overrides: one read.
      let (last, bytes) = joinedRun(stream: s, from: e, before: (end + UInt64(geometry.blockSize) - 1) >> shift)
      let records = scratch.records(bytes)
      do {
        try stream.source.read(into: UnsafeMutableRawBufferPointer(start: records, count: bytes), at: entry.offset)
      } catch {
        report(stream, entry, "the stored stream could not be read: \(error)")
        throw DeviceError(name, .io(EIO), "reading \(stream.name)")
      }
      var at = 0
      for i in e...last {
        let r = stream.index.entries[i]
        let blockStart = geometry.offset(ofBlock: r.firstBlock)
        let blockLength = geometry.length(ofBlock: r.firstBlock)
        let from = max(position, blockStart)
        let to = min(end, blockStart + UInt64(blockLength))
        let whole = from == blockStart && to == blockStart + UInt64(blockLength)
        let target = whole ? out + Int(blockStart - offset) : scratch.block(blockLength)
        try decode(records + at, r, stream: s, scratch: scratch, into: target, blockLength: blockLength)
        if !whole {
          (out + Int(from - offset)).copyMemory(from: target + Int(from - blockStart), byteCount: Int(to - from))
        }
        at += Int(r.length)
        position = to
      }
    }
  }

  /// The run of DATA records of stream `s` from entry `e` that one read of
  /// the source fetches: one after another in the stream and in block
  /// order, none of their blocks held by a newer stream, ending before
  /// block `endBlock`, at most `joinLimit` bytes. Its last entry and bytes.
  func joinedRun(stream s: Int, from e: Int, before endBlock: UInt64) -> (last: Int, bytes: Int) {
    let entries = streams[s].index.entries
    var last = e
    var bytes = Int(entries[e].length)
    while entries[last].endBlock < endBlock, last + 1 < entries.count {
      let next = entries[last + 1]
      let previous = entries[last]
      guard next.type == .data, next.firstBlock == previous.endBlock,
        next.offset == previous.offset + UInt64(previous.length), bytes + Int(next.length) <= StreamChain.joinLimit,
        let (ns, ne) = locate(next.firstBlock), ns == s, ne == last + 1
      else { break }
      last += 1
      bytes += Int(next.length)
    }
    return (last, bytes)
  }

  /// Where the next block held by a stream newer than `newerThan` starts,
  /// after `block`.
  private func nextHeldOffset(after block: UInt64, newerThan: Int) -> UInt64 {
    min(geometry.deviceSize, geometry.offset(ofBlock: nextHeldBlock(after: block, newerThan: newerThan)))
  }

  /// The next block after `block` held by a stream newer than `newerThan`.
  func nextHeldBlock(after block: UInt64, newerThan: Int) -> UInt64 {
    var next = geometry.blockCount
    for s in streams[(newerThan + 1)...] {
      let entries = s.index.entries
      var low = 0
      var high = entries.count
      while low < high {
        let mid = (low + high) >> 1
        if entries[mid].firstBlock <= block { low = mid + 1 } else { high = mid }
      }
      if low < entries.count { next = min(next, entries[low].firstBlock) }
    }
    return next
  }

  /// Checks one DATA record held at `record` against its entry and
  /// decodes its block into `target`.
  private func decode(
    _ record: UnsafeMutableRawPointer, _ entry: StreamIndexFormat.Entry, stream s: Int, scratch: ChainReaderScratch,
    into target: UnsafeMutableRawPointer, blockLength: Int
  ) throws {
    let stream = streams[s]
    do {
      let body = try open(record, entry, stream: s, scratch: scratch)
      try checkData(body, entry, stream: stream)
      let payload = body.baseAddress! + StreamFormat.dataFixedLength
      let payloadLength = body.count - StreamFormat.dataFixedLength
      if body.loadUnaligned(fromByteOffset: 12, as: UInt32.self) == 0 {
        target.copyMemory(from: payload, byteCount: blockLength)
        return
      }
      let n = LZ4_decompress_safe(
        payload.assumingMemoryBound(to: CChar.self), target.assumingMemoryBound(to: CChar.self),
        Int32(payloadLength), Int32(blockLength))
      guard n == Int32(blockLength) else { throw RecordFault("the LZ4 block does not decode to \(blockLength) bytes") }
    } catch let fault as RecordFault {
      throw fail(stream, entry, fault.why)
    }
  }

  /// Checks a DATA body against its entry: the block, its length, the
  /// encoding and the payload's length.
  func checkData(_ body: UnsafeRawBufferPointer, _ entry: StreamIndexFormat.Entry, stream: StoredStream) throws {
    guard body.count >= StreamFormat.dataFixedLength else { throw RecordFault("the DATA record is too short") }
    let block = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
    let length = Int(body.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian)
    let encoding = body.loadUnaligned(fromByteOffset: 12, as: UInt32.self).littleEndian
    guard block == entry.firstBlock, length == geometry.length(ofBlock: entry.firstBlock) else {
      throw RecordFault("the record holds block \(block) of \(length) bytes, not block \(entry.firstBlock)")
    }
    let payloadLength = body.count - StreamFormat.dataFixedLength
    switch encoding {
    case UInt32(StreamFormat.DataEncoding.raw.rawValue):
      guard payloadLength == length else { throw RecordFault("the raw block has \(payloadLength) bytes") }
    case UInt32(StreamFormat.DataEncoding.lz4.rawValue):
      guard stream.header.compression == .lz4, payloadLength > 0, payloadLength < length else {
        throw RecordFault("the LZ4 payload of \(payloadLength) bytes is out of range")
      }
    default:
      throw RecordFault("unknown block encoding \(encoding)")
    }
  }

  /// Checks a record's framing, CRC and sequence number against its entry,
  /// and opens it (decrypts it) when the stream is encrypted: its body.
  /// Throws RecordFault.
  func open(
    _ record: UnsafeMutableRawPointer, _ entry: StreamIndexFormat.Entry, stream s: Int, scratch: ChainReaderScratch
  ) throws -> UnsafeRawBufferPointer {
    let total = Int(entry.length)
    let type = record.loadUnaligned(fromByteOffset: 0, as: UInt16.self).littleEndian
    let bodyLength = Int(record.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian)
    let sequence = record.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
    guard bodyLength + StreamFormat.recordOverhead == total else {
      throw RecordFault("the record is \(bodyLength + StreamFormat.recordOverhead) bytes, not \(total)")
    }
    let stored = record.loadUnaligned(fromByteOffset: total - 4, as: UInt32.self).littleEndian
    guard dr_crc32c(0, record, total - 4) == stored else {
      throw RecordFault("checksum mismatch: the record is damaged")
    }
    guard type == entry.type.rawValue, sequence == entry.sequence else {
      throw RecordFault("record \(sequence) of type \(type) is not the one the index names")
    }
    let body = UnsafeRawBufferPointer(start: record + StreamFormat.recordHeaderLength, count: bodyLength)
    guard let cipher = try scratch.cipher(for: s, of: streams[s]) else { return body }
    guard let plain = cipher.open(framing: record, body: body) else {
      throw RecordFault("authentication failed: the record was altered, moved, or taken from another stream")
    }
    return plain
  }

  /// Reads and checks a ZERO record the first time one of its blocks is read.
  func checkZero(_ s: Int, _ e: Int, _ scratch: ChainReaderScratch) throws {
    if checkedZeros[s].withLock({ $0.contains(e) }) { return }
    let stream = streams[s]
    let entry = stream.index.entries[e]
    let record = scratch.records(Int(entry.length))
    do {
      try stream.source.read(
        into: UnsafeMutableRawBufferPointer(start: record, count: Int(entry.length)), at: entry.offset)
    } catch {
      report(stream, entry, "the stored stream could not be read: \(error)")
      throw DeviceError(name, .io(EIO), "reading \(stream.name)")
    }
    do {
      try checkZeroRun(try open(record, entry, stream: s, scratch: scratch), entry)
    } catch let fault as RecordFault {
      throw fail(stream, entry, fault.why)
    }
    _ = checkedZeros[s].withLock { $0.insert(e) }
  }

  /// Checks a ZERO body against its entry: the run covers the entry's
  /// blocks. Throws RecordFault.
  func checkZeroRun(_ body: UnsafeRawBufferPointer, _ entry: StreamIndexFormat.Entry) throws {
    guard body.count == StreamFormat.zeroBodyLength else { throw RecordFault("the ZERO record is malformed") }
    let first = body.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
    let count = body.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
    guard first <= entry.firstBlock, count >= entry.blockCount, entry.firstBlock - first <= count - entry.blockCount
    else { throw RecordFault("the zero run of blocks \(first) to \(first &+ count) is not the one the index names") }
  }

  /// "record 12 at byte 65572", for messages.
  func describe(_ entry: StreamIndexFormat.Entry) -> String { "record \(entry.sequence) at byte \(entry.offset)" }

  private func fail(_ stream: StoredStream, _ entry: StreamIndexFormat.Entry, _ why: String) -> DeviceError {
    report(stream, entry, why)
    return DeviceError(name, .io(EIO), "\(stream.name): record \(entry.sequence)")
  }

  /// Logs a record's failure once.
  private func report(_ stream: StoredStream, _ entry: StreamIndexFormat.Entry, _ why: String) {
    let key = "\(stream.name)#\(entry.sequence)"
    guard reported.withLock({ $0.insert(key).inserted }) else { return }
    let blocks =
      entry.blockCount == 1 ? "block \(entry.firstBlock)" : "blocks \(entry.firstBlock) to \(entry.endBlock - 1)"
    log("\(stream.name): \(describe(entry)): \(why); reads of \(blocks) fail with EIO")
  }

  // MARK: Block status

  /// base:allocation: zero runs (and blocks no stream holds) are holes that
  /// read as zeros; DATA records are data.
  public func allocation(offset: UInt64, length: UInt32, limit: Int) -> [Extent] {
    var runs: [Extent] = []
    let end = min(offset + UInt64(length), geometry.deviceSize)
    var position = offset
    while position < end {
      let block = position >> geometry.blockShift
      let stop: UInt64
      let flags: UInt32
      if let (s, e) = locate(block) {
        let entry = streams[s].index.entries[e]
        stop = min(end, geometry.offset(ofBlock: entry.endBlock), nextHeldOffset(after: block, newerThan: s))
        flags = entry.type == .zero ? Extent.hole | Extent.zero : 0
      } else {
        stop = min(end, nextHeldOffset(after: block, newerThan: -1))
        flags = Extent.hole | Extent.zero
      }
      guard runs.append(joining: Extent(length: UInt32(stop - position), flags: flags), limit: limit) else { break }
      position = stop
    }
    return runs
  }

  // MARK: Scratch

  private func takeScratch() -> ChainReaderScratch {
    spares.withLock { $0.popLast() } ?? ChainReaderScratch(streams: streams.count)
  }

  private func giveBack(_ scratch: ChainReaderScratch) {
    spares.withLock { if $0.count < 64 { $0.append(scratch) } }
  }
}

/// One reader's buffers and ciphers: records as read, a block decoded for a
/// read that wants part of it.
// @unchecked Sendable: used by one reader at a time, handed over through the chain's lock.
final class ChainReaderScratch: @unchecked Sendable {
  private var recordBuffer: UnsafeMutableRawPointer
  private var recordCapacity: Int
  private var blockBuffer: UnsafeMutableRawPointer
  private var blockCapacity: Int
  private var ciphers: [RecordCipher?]

  init(streams: Int) {
    recordCapacity = 1 << 20
    recordBuffer = .allocate(byteCount: recordCapacity, alignment: 4096)
    blockCapacity = 0
    blockBuffer = .allocate(byteCount: 1, alignment: 4096)
    ciphers = Array(repeating: nil, count: streams)
  }

  deinit {
    recordBuffer.deallocate()
    blockBuffer.deallocate()
  }

  func records(_ count: Int) -> UnsafeMutableRawPointer {
    if count > recordCapacity {
      recordBuffer.deallocate()
      recordCapacity = max(count, recordCapacity * 2)
      recordBuffer = .allocate(byteCount: recordCapacity, alignment: 4096)
    }
    return recordBuffer
  }

  func block(_ count: Int) -> UnsafeMutableRawPointer {
    if count > blockCapacity {
      blockBuffer.deallocate()
      blockCapacity = count
      blockBuffer = .allocate(byteCount: count, alignment: 4096)
    }
    return blockBuffer
  }

  func cipher(for s: Int, of stream: StoredStream) throws -> RecordCipher? {
    if let c = ciphers[s] { return c }
    guard let template = stream.cipher else { return nil }
    let c = try template.another()
    ciphers[s] = c
    return c
  }
}

/// The chain's end as a read-only block device: what snapshot-server
/// exports, and what compaction and a merge read.
public final class ChainDevice: BlockDevice {
  public let chain: StreamChain
  init(chain: StreamChain) { self.chain = chain }

  public var name: String { chain.name }
  public var size: UInt64 { chain.geometry.deviceSize }
  public var capabilities: DeviceCapabilities { [.reportsHoles] }
  public var maximumRequest: Int { 64 << 20 }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try chain.read(into: buffer, at: offset)
  }

  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) {
    guard offset < size else { return (true, size) }
    let runs = chain.allocation(offset: offset, length: UInt32(min(size - offset, 1 << 30)), limit: 1)
    guard let first = runs.first else { return (true, size) }
    return (first.flags & Extent.zero == 0, offset + UInt64(first.length))
  }

  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    chain.allocation(offset: offset, length: length, limit: Int.max)
  }
}

/// Why a record read through an index is refused.
struct RecordFault: Error {
  let why: String
  init(_ why: String) { self.why = why }
}
