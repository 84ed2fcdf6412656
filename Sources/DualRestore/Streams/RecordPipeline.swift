// Parses a stream on a thread of its own, one batch of records ahead of the
// consumer. An encrypted stream's records cost their AES-GCM opening on top
// of the CRC, and no SHA-256 on the reading thread: a merge of one on one
// thread does all of the verifying, decompressing and writing, while a
// plaintext merge hashes on the reading thread. With the pipeline, the
// producer thread runs a whole StreamReader (reading, CRCs, tags, every
// check of the parser) and the merge's thread only decompresses and writes.
//
// Invariants:
// - The consumer sees exactly what the inner reader returned, in order,
//   then exactly what it threw (or its end): nothing of a record the
//   parser refused, nothing after it.
// - A record's payload is copied into the batch, which is handed back only
//   when the consumer asks for the record after the batch's last one, so
//   a record stays valid until the next call, as with StreamReader.
// - Memory is bounded: `depth` batches of `batchBytes` (one grows to hold a
//   record larger than that); nothing is allocated per record.

import Glibc

// @unchecked Sendable: its state is behind `monitor`, which both stages wait on.
final class RecordPipeline: @unchecked Sendable {
  /// A record and where the inner reader was after it.
  struct Entry {
    var record: StreamParser.Record
    var sequence: UInt64
    var offset: UInt64
    var nextSequence: UInt64
    var nextOffset: UInt64
    var bytesRead: UInt64
  }

  final class Batch {
    var buffer: UnsafeMutableRawPointer
    var capacity: Int
    var used = 0
    var entries: [Entry] = []
    /// After the last entry: the inner reader's error, or its end.
    var failure: Error?
    var finished = false

    init(capacity: Int) {
      self.capacity = capacity
      buffer = .allocate(byteCount: capacity, alignment: 4096)
      entries.reserveCapacity(1024)
    }

    deinit { buffer.deallocate() }

    func reset() {
      used = 0
      entries.removeAll(keepingCapacity: true)
      failure = nil
      finished = false
    }

    /// Room for `count` more bytes, grown when the batch is empty and too small.
    func grow(toHold count: Int) {
      guard count > capacity else { return }
      buffer.deallocate()
      capacity = count
      buffer = .allocate(byteCount: count, alignment: 4096)
    }
  }

  private static let entriesPerBatch = 4096
  private let monitor = Monitor()
  private var free: [Batch]
  private var ready: [Batch] = []
  private var stopped = false
  private var exited = false
  // Consumer side.
  private var current: Batch?
  private var index = 0
  private(set) var last: Entry?

  init(_ inner: StreamReader, batchBytes: Int = 4 << 20, depth: Int = 3) {
    free = (0..<depth).map { _ in Batch(capacity: batchBytes) }
    // The inner reader is used by the producer thread alone from now on.
    let inner = Unchecked(inner)
    startThread { [self] in
      produce(inner.value)
      monitor.withLock { exited = true }
      monitor.broadcast()
    }
  }

  /// Stops the producer and waits for it; safe to call more than once.
  func cancel() {
    monitor.lock()
    stopped = true
    monitor.broadcast()
    while !exited { monitor.wait() }
    monitor.unlock()
  }

  private func takeFree() -> Batch? {
    monitor.lock()
    defer { monitor.unlock() }
    while free.isEmpty && !stopped { monitor.wait() }
    if stopped { return nil }
    let b = free.removeLast()
    b.reset()
    return b
  }

  private func publish(_ batch: Batch) {
    monitor.withLock { ready.append(batch) }
    monitor.broadcast()
  }

  private func produce(_ inner: StreamReader) {
    guard var batch = takeFree() else { return }
    do {
      while true {
        guard var record = try inner.next() else { break }
        // A payload (a DATA block, a REFERENCE run's digests) points into
        // the reader's buffer: it is copied into the batch.
        var payload: UnsafeRawBufferPointer?
        switch record {
        case .data(_, _, _, let p): payload = p
        case .reference(let r): payload = r.digests
        default: break
        }
        if let payload {
          if batch.used + payload.count > batch.capacity && !batch.entries.isEmpty {
            publish(batch)
            guard let next = takeFree() else { return }
            batch = next
          }
          batch.grow(toHold: payload.count)
          let at = batch.buffer + batch.used
          if payload.count > 0 { at.copyMemory(from: payload.baseAddress!, byteCount: payload.count) }
          batch.used += (payload.count + 63) & ~63
          let copied = UnsafeRawBufferPointer(start: at, count: payload.count)
          switch record {
          case .data(let block, let length, let encoding, _):
            record = .data(block: block, length: length, encoding: encoding, payload: copied)
          case .reference(var r):
            r.digests = copied
            record = .reference(r)
          default: break
          }
        }
        batch.entries.append(
          Entry(
            record: record, sequence: inner.recordSequence, offset: inner.recordOffset,
            nextSequence: inner.nextSequence, nextOffset: inner.nextOffset, bytesRead: inner.bytesRead))
        if batch.entries.count >= RecordPipeline.entriesPerBatch {
          publish(batch)
          guard let next = takeFree() else { return }
          batch = next
        }
      }
      batch.finished = true
    } catch {
      batch.failure = error
    }
    publish(batch)
  }

  /// The next record, or nil at the end; rethrows the inner reader's error.
  func next() throws -> StreamParser.Record? {
    while true {
      if let batch = current {
        if index < batch.entries.count {
          let entry = batch.entries[index]
          index += 1
          last = entry
          return entry.record
        }
        if let failure = batch.failure { throw failure }
        if batch.finished { return nil }
        // Every record of the batch has been returned and the last one is
        // no longer in use: the batch goes back to the producer.
        current = nil
        monitor.withLock { free.append(batch) }
        monitor.broadcast()
      }
      monitor.lock()
      while ready.isEmpty { monitor.wait() }
      current = ready.removeFirst()
      monitor.unlock()
      index = 0
    }
  }
}
