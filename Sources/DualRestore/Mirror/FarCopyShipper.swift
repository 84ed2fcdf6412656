// Brings one far copy up to date from the mirror journal, interval by
// interval, in order: an interval's changes are read from the journal,
// coalesced (each byte once, from its last change), sent over the link's
// connections several at a time, then the copy is flushed, and only then
// is its position advanced and the next interval started. So the copy is
// always at a consistency point: it holds every change of the intervals
// before the one in flight and some of that one's, never a later one's.
//
// Invariants:
// - Any standard NBD server can be the copy: ordering comes from here (an
//   interval's flush answered before the next interval's first write is
//   sent), not from the receiver.
// - An interval too large to hold in memory at once is sent in batches in
//   journal order; a part of an interval is still a consistency point.
// - A failed batch is sent again whole; sending a change twice within its
//   interval is harmless. The copy's position never moves past what it
//   flushed.
// - Memory: one batch of change descriptors (at most `batchChanges`) and
//   one buffer per sender, whatever the lag.

import Glibc

final class FarCopyShipper: Sendable {
  let journal: MirrorJournal
  let index: Int
  let copy: BlockDevice
  let log: @Sendable (String) -> Void
  /// Requests in flight at the copy at once.
  let senders: Int
  static let batchChanges = 65536
  static let pieceBytes = 4 << 20
  private let threads = StoppableThreads()
  private let pool: Offload
  private let buffers: [AlignedBuffer]
  /// Whether the copy failed last time, and when that was logged.
  private struct Health {
    var failing = false
    var failures = 0
    var lastLogged = -1e9
    /// The failure was logged, so its end is too.
    var logged = false
    var sentBytes: UInt64 = 0
    var sentIntervals: UInt64 = 0
  }
  private let health = Locked(Health())

  init(journal: MirrorJournal, index: Int, copy: BlockDevice, senders: Int, log: @escaping @Sendable (String) -> Void) {
    self.journal = journal
    self.index = index
    self.copy = copy
    self.log = log
    self.senders = max(1, senders)
    pool = Offload(threads: self.senders)
    buffers = (0..<self.senders).map { _ in AlignedBuffer(count: Self.pieceBytes) }
  }

  /// Bytes and intervals sent since the start.
  var sent: (bytes: UInt64, intervals: UInt64) { health.withLock { ($0.sentBytes, $0.sentIntervals) } }

  /// Whether the copy could not be reached at the last try.
  var failing: Bool { health.withLock { $0.failing } }

  func start() {
    threads.start { [self] in run() }
  }

  /// Stops after the batch in flight (the journal must be stopping too).
  /// With `closingLink`, the copy's connections are ended first, so that a
  /// request waiting on a copy that does not answer fails now rather than
  /// at its time limit: a stop is prompt whatever the link does.
  func stop(closingLink: Bool = false) {
    if closingLink { copy.close() }
    threads.stop()
  }

  private func run() {
    while true {
      let held = journal.position(of: index)
      guard let work = journal.next(after: held, timeout: 1) else { continue }
      switch work {
      case .stop:
        return
      case .closeOpen:
        do {
          try journal.closeInterval(sync: true)
        } catch {
          log("mirror journal: \(error)")
          if !threads.pause(1) { return }
        }
      case .ship(let interval):
        do {
          try ship(interval)
          try journal.shipped(copy: index, interval)
          recovered()
        } catch {
          failed(error)
          // Again after a pause that grows to 10 s, unless stopping.
          let wait = health.withLock { min(10, 0.25 * Double(1 << min($0.failures, 6))) }
          if !threads.pause(wait) { return }
        }
      }
    }
  }

  private func ship(_ interval: ClosedInterval) throws {
    var from = interval.start
    var bytes: UInt64 = 0
    while true {
      let (changes, next) = try journal.changes(of: interval, from: from, limit: Self.batchChanges)
      if !changes.isEmpty {
        let pieces = Coalescing.pieces(of: changes, maximumPiece: UInt64(Self.pieceBytes))
        try send(pieces)
        bytes += pieces.reduce(UInt64(0)) { $0 + ($1.zero ? 0 : $1.length) }
      }
      if changes.count < Self.batchChanges { break }
      from = next
    }
    // A failed flush may have lost writes it covered: the whole interval
    // is sent again (after a pause), never the flush alone.
    try copy.flush()
    health.withLock {
      $0.sentBytes += bytes
      $0.sentIntervals += 1
    }
  }

  /// Sends disjoint pieces, `senders` at a time.
  private func send(_ pieces: [ShipPiece]) throws {
    let nextPiece = Locked(0)
    let failure = ErrorBox()
    let workers = min(senders, pieces.count)
    var jobs: [Offload.Job] = []
    for w in 0..<workers {
      let buffer = buffers[w]
      jobs.append(
        pool.start { [self] in
          while failure.error == nil && !journal.isStopping {
            let i = nextPiece.withLock { n -> Int in
              defer { n += 1 }
              return n
            }
            guard i < pieces.count else { return }
            let p = pieces[i]
            // A request the copy refused is sent again at once, twice:
            // one failed write should not cost the whole batch a pause.
            for attempt in 1...3 {
              do {
                if p.zero {
                  try copy.writeZeroes(offset: p.offset, length: p.length, fua: false)
                } else {
                  let slice = UnsafeMutableRawBufferPointer(start: buffer.pointer, count: Int(p.length))
                  try journal.read(into: slice, at: p.payloadAt)
                  try copy.write(UnsafeRawBufferPointer(slice), at: p.offset, fua: false)
                }
                break
              } catch {
                // Only a request the copy answered with an error is sent
                // again; one that found no connection would wait as long.
                if attempt == 3 || journal.isStopping || !Self.answeredWithError(error) {
                  failure.set(error)
                  break
                }
              }
            }
          }
        })
    }
    for j in jobs { j.wait() }
    if let e = failure.error { throw e }
  }

  /// Whether `error` is the copy's own answer to a request (NBD_E*).
  static func answeredWithError(_ error: Error) -> Bool {
    guard let e = error as? ToolkitError, case .serverError = e.cause else { return false }
    return true
  }

  private func failed(_ error: Error) {
    let now = monotonicSeconds()
    let line = health.withLock { h -> Bool in
      h.failures += 1
      let first = !h.failing
      h.failing = true
      // A copy that fails now and then is not worth a line each time.
      guard now - h.lastLogged >= (first ? 10 : 60) else { return false }
      h.lastLogged = now
      h.logged = true
      return true
    }
    if line {
      let owed = journal.lag[index]
      // NBD errors name the copy already.
      let what = "\(error)".hasPrefix(owed.name) ? "far copy \(error)" : "far copy \(owed.name): \(error)"
      log(
        "\(what); it lacks \(owed.intervals) interval(s), \(formatBytes(owed.bytes)), kept in the journal; "
          + "trying again")
    }
  }

  private func recovered() {
    let was = health.withLock { h -> Bool in
      defer {
        h.failing = false
        h.failures = 0
        h.logged = false
      }
      return h.failing && h.logged
    }
    if was {
      let owed = journal.lag[index]
      log(
        "far copy \(owed.name) is back: it holds interval \(owed.interval); \(owed.intervals) interval(s) "
          + "(\(formatBytes(owed.bytes))) to go")
    }
  }
}
