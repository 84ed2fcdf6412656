// A device's points in time, kept as the before-images of what each segment
// overwrote (dualrestore-history(5)): a point is the device's state at a
// FLUSH; the segment after it is the writes up to the next point; before
// the first write to a 4 KiB block in a segment, the block's old contents
// are appended to the log. The device as it was at point n is then, block by
// block, the before-image of the earliest segment after n that has one, or
// the device itself.
//
// Invariants:
// - Preserved before overwritten: a write reaches the device only after
//   the before-images of its blocks are durable (group commit: one
//   fdatasync for all writers waiting). Records are appended under the
//   lock, in order, so what a sync made durable is a prefix: after a crash
//   every block the device may hold newer than the last point has its
//   before-image in the log, and a torn tail holds nothing a write
//   depended on: it is cut.
// - A point is recorded only with no write inside (the caller holds its
//   writes) and after the device is durable: its record says the device
//   held exactly that state.
// - A point is read exactly: its reader holds the block locks the writers
//   take (the caller's), every before-image block is checked against its
//   CRC, and files are removed only when no reader is inside.
// - Trimming keeps the newest point always and removes only the oldest;
//   a point trimmed is refused by name, never served from a partial log.
// - The history never lies: a failed append or sync loses it (the log says
//   so, its points are refused), and the device goes on.

import CShim
import Glibc

public final class PointHistory: @unchecked Sendable {
  /// How long and how much to keep: 0 is no bound.
  public struct Retention: Sendable, Equatable {
    public var seconds: Double
    public var bytes: UInt64
    public init(seconds: Double, bytes: UInt64) {
      self.seconds = seconds
      self.bytes = bytes
    }
  }

  public struct Point: Sendable, Equatable {
    public var number: UInt64
    public var instant: Instant
    /// Bytes the history keeps for the segment that ended at this point
    /// (the before-images of what it overwrote); 0 for the oldest point.
    public var bytes: UInt64
    public var blocks: UInt64
  }

  public struct Summary: Sendable {
    public var id: ID128
    public var points: [Point]
    /// Bytes of the history's files on disk.
    public var spaceUsed: UInt64
    /// Bytes of before-images in the open segment (since the newest point).
    public var openBytes: UInt64
    public var retention: Retention
    public var lost: String?
  }

  public let directory: String
  public let id: ID128
  public let geometry: BlockGeometry
  public let retention: Retention
  let log: @Sendable (String) -> Void
  static let fileLimit: UInt64 = 256 << 20
  static let bs = UInt64(HistoryFormat.blockSize)

  /// A run of preserved blocks inside one before-image record.
  struct Run {
    var first: UInt64
    /// The record's log position.
    var position: UInt64
    var count: UInt32
    /// The index of `first` in the record.
    var index: UInt32
    var recordCount: UInt32
    var zero: Bool
  }

  struct Segment {
    var number: UInt64
    var runs: [Run] = []
    var bytes: UInt64 = 0
    var blocks: UInt64 = 0
    /// The log position of its first record (nil while it has none).
    var firstPosition: UInt64?
    var instant: Int64 = 0
  }

  struct LogFile {
    var position: UInt64
    var fd: Int32
    var header: HistoryFormat.FileHeader
  }

  /// Point n's before-images merged: for each block, the earliest segment's
  /// after n (non-overlapping runs sorted by block), through segment `upTo`.
  final class Overlay {
    let point: UInt64
    var upTo: UInt64
    var runs: [Run]
    var covered: BlockBitmap
    var built = false
    init(point: UInt64, count: UInt64) {
      self.point = point
      self.upTo = point
      self.runs = []
      self.covered = BlockBitmap(count: count)
    }
  }

  private struct State {
    var files: [LogFile] = []
    var closed: [Segment] = []
    var open: Segment
    var openSorted = true
    var oldest: (number: UInt64, instant: Int64)
    var preserved: BlockBitmap
    /// The log position reserved up to.
    var tail: UInt64
    /// The log is durable up to here.
    var synced: UInt64
    var syncing = false
    /// A point appended with durable false whose device is not durable
    /// yet: nothing may synchronise the log until `releasePoint`.
    var unsyncedPoint = false
    var lost: String?
    var overlays: [Overlay] = []
  }
  private let state: Monitor
  private var s: State
  /// Readers of before-images inside; removing a file waits for them.
  private let files = ReadWriteLock()
  private let lockFD: Int32
  private let buffers = BufferPool(keepCount: 8, keepSize: 4 << 20)

  /// Opens the history in `directory` (created when missing or empty) for
  /// a device of `deviceSize` bytes; an existing one is recovered: a torn
  /// tail is cut, damage is refused.
  public init(
    directory: String, deviceSize: UInt64, retention: Retention, log: @escaping @Sendable (String) -> Void
  ) throws {
    self.directory = directory
    self.retention = retention
    self.log = log
    geometry = try BlockGeometry(blockSize: HistoryFormat.blockSize, deviceSize: deviceSize)
    if !pathExists(directory), mkdir(directory, 0o700) != 0 {
      throw ToolkitError.path(directory, "cannot create the history directory: \(Errno(errno))")
    }
    // A directory of something else is refused before the lock file is
    // made in it (and listed again under the lock).
    _ = try Self.logFiles(in: directory)
    let lockPath = directory + "/lock"
    guard case .success(let fd) = Sys.open(lockPath, flags: O_RDWR | O_CREAT, mode: 0o600) else {
      throw ToolkitError.path(directory, "cannot open the history's lock file: \(Errno(errno))")
    }
    if flock(fd, LOCK_EX | LOCK_NB) != 0 {
      Sys.close(fd)
      throw ToolkitError.path(directory, "another server keeps this history (its lock is held)")
    }
    lockFD = fd
    state = Monitor()
    do {
      let names = try Self.logFiles(in: directory)
      if names.isEmpty {
        (id, s) = try Self.create(directory: directory, geometry: geometry)
        log("history \(directory): created; point 0 is the device as it is now")
      } else {
        (id, s) = try Self.recover(directory: directory, names: names, geometry: geometry, log: log)
      }
    } catch {
      Sys.close(fd)
      throw error
    }
    raiseFileLimit()
  }

  deinit {
    for f in s.files { Sys.close(f.fd) }
    Sys.close(lockFD)
  }

  // MARK: Opening

  static func logFiles(in directory: String) throws -> [(String, UInt64)] {
    guard let dir = opendir(directory) else {
      throw ToolkitError.path(directory, "cannot list the history directory: \(Errno(errno))")
    }
    defer { closedir(dir) }
    var found: [(String, UInt64)] = []
    var others: [String] = []
    while let e = readdir(dir) {
      let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      if name == "." || name == ".." || name == "lock" { continue }
      if let p = HistoryFormat.position(ofFileName: name) { found.append((name, p)) } else { others.append(name) }
    }
    if let other = others.sorted().first {
      throw ToolkitError.path(
        directory, "holds \(other), which is not a history file; give an empty or new directory for --history")
    }
    return found.sorted { $0.1 < $1.1 }
  }

  private static func create(directory: String, geometry: BlockGeometry) throws -> (ID128, State) {
    let id = ID128.random()
    let now = Instant.now().nanosecondsSinceEpoch
    let header = HistoryFormat.FileHeader(
      updates: 1, historyID: id, deviceSize: geometry.deviceSize, blockSize: HistoryFormat.blockSize,
      continues: false, position: 0, openSegment: 1, previousPoint: 0, previousInstant: now,
      live: UInt64(HistoryFormat.fileHeaderLength))
    let fd = try createFile(directory: directory, header: header)
    let start = UInt64(HistoryFormat.fileHeaderLength)
    let st = State(
      files: [LogFile(position: 0, fd: fd, header: header)], open: Segment(number: 1), oldest: (0, now),
      preserved: BlockBitmap(count: geometry.blockCount), tail: start, synced: start)
    return (id, st)
  }

  /// Creates a log file with both header slots written, durable with its
  /// directory entry.
  private static func createFile(directory: String, header: HistoryFormat.FileHeader) throws -> Int32 {
    let path = directory + "/" + HistoryFormat.fileName(header.position)
    let fd: Int32
    switch Sys.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, "cannot create a history file: \(e)")
    }
    let bytes = header.encoded() + header.encoded()
    let done = bytes.withUnsafeBytes { b in
      pwriteFull(fd, b.baseAddress!, b.count, 0).flatMap { Sys.fdatasync(fd).map { _ in } }
    }
    if case .failure(let e) = done {
      Sys.close(fd)
      unlink(path)
      throw ToolkitError.path(path, "cannot write a history file: \(e)")
    }
    syncDirectory(of: path)
    return fd
  }

  private static func recover(
    directory: String, names all: [(String, UInt64)], geometry: BlockGeometry, log: @Sendable (String) -> Void
  ) throws -> (ID128, State) {
    // A trim makes the header of the first file it keeps say where the
    // records kept start, punches the bytes before, and only then removes
    // the files before it: a file whose header says its records start past
    // its header's end was made the first, and files before it are what a
    // trim cut short by a crash left behind (the first file's records may
    // be zeros from its header on, which a scan from there would take for
    // a torn tail).
    var names = all
    if let first = names.indices.last(where: { i in
      guard i > 0, let h = readHeader(directory + "/" + names[i].0) else { return false }
      return h.live > h.position + UInt64(HistoryFormat.fileHeaderLength)
    }) {
      for (name, _) in names[..<first] { unlink(directory + "/" + name) }
      syncDirectory(of: directory + "/lock")
      log("history \(directory): \(first) file(s) that a trim cut short left behind are removed")
      names.removeFirst(first)
    }
    var opened: [LogFile] = []
    var records: [(position: UInt64, record: HistoryFormat.Record)] = []
    var ends: [UInt64] = []
    var cutAt: (file: Int, offset: UInt64, why: String)?
    // Files after a torn tail that ends a file before the last.
    var later: [String] = []
    var id: ID128?
    var fail: Error?
    for (i, (name, position)) in names.enumerated() {
      let path = directory + "/" + name
      guard case .success(let fd) = Sys.open(path, flags: O_RDWR) else {
        fail = ToolkitError.path(path, "cannot open the history file: \(Errno(errno))")
        break
      }
      let size: UInt64
      if case .success(let st) = Sys.fstat(fd) { size = UInt64(st.st_size) } else { size = 0 }
      var head = [UInt8](repeating: 0, count: HistoryFormat.fileHeaderLength)
      let got = head.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, $0.count, 0) }
      let decoded: Result<HistoryFormat.FileHeader, HistoryFormatError> =
        (try? got.get()) == HistoryFormat.fileHeaderLength
        ? HistoryFormat.FileHeader.decode(file: head[...]) : .failure(.init("is shorter than a history file's header"))
      guard case .success(let header) = decoded else {
        // The newest file's header may be torn by a crash at its creation:
        // nothing in it was ever made durable for a writer.
        if i == names.count - 1 && i > 0 {
          Sys.close(fd)
          log("history \(path): a file begun at a crash is removed (\(decodedErrorText(decoded)))")
          unlink(path)
          continue
        }
        Sys.close(fd)
        fail = ToolkitError.path(
          path, "\(decodedErrorText(decoded)); the history is damaged: move it aside to start anew")
        break
      }
      if id == nil { id = header.historyID }
      guard header.historyID == id, header.position == position else {
        Sys.close(fd)
        fail = ToolkitError.path(path, "belongs to another history or is misnamed; the history is damaged")
        break
      }
      guard header.deviceSize == geometry.deviceSize else {
        Sys.close(fd)
        fail = ToolkitError.path(
          directory,
          "is the history of a device of \(header.deviceSize) bytes; this device has \(geometry.deviceSize)")
        break
      }
      if let last = ends.last, last != position {
        Sys.close(fd)
        // Records were reserved at the end of the file before, and this
        // file begun, but they were not all written when a crash came:
        // nothing past them was made durable for a writer (the durable
        // prefix never passes a record still being written), so the tail
        // from there is torn, this file and the later ones with it.
        if last < position, let f = opened.last {
          cutAt = (opened.count - 1, last - f.position, "the file ends before the next one begins")
          later = names[i...].map(\.0)
        } else {
          fail = ToolkitError.path(path, "does not start where the file before it ends; the history is damaged")
        }
        break
      }
      opened.append(LogFile(position: position, fd: fd, header: header))
      let start = i == 0 ? header.live - position : UInt64(HistoryFormat.fileHeaderLength)
      let previousSegment = records.last.map { r -> UInt64 in
        if case .point = r.record { return r.record.segment + 1 }
        return r.record.segment
      }
      let scan = HistoryFormat.scan(
        from: start, length: size, blockCount: geometry.blockCount,
        openSegment: previousSegment ?? header.openSegment, checkData: { _ in false },
        read: { offset, count in
          var b = [UInt8](repeating: 0, count: count)
          let r = b.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, count, offset) }
          return (try? r.get()) == count ? b : nil
        })
      records += scan.records.map { (position + $0.offset, $0.record) }
      ends.append(position + scan.end)
      if let why = scan.stopped {
        cutAt = (opened.count - 1, scan.end, why.sentence)
        if i != names.count - 1 {
          // A record the file's end cuts short is torn as above; bad
          // bytes with later files after them are damage.
          if scan.cutShort {
            later = names[(i + 1)...].map(\.0)
          } else {
            fail = ToolkitError.path(path, "\(why.sentence), and later files follow; the history is damaged")
          }
        }
        break
      }
    }
    if let fail {
      for f in opened { Sys.close(f.fd) }
      throw fail
    }
    guard let id, let first = opened.first else {
      throw ToolkitError.path(directory, "holds no usable history file; move it aside to start anew")
    }
    // The records after the last point may be torn: their blocks are checked.
    let lastPoint = records.lastIndex { if case .point = $0.record { return true } else { return false } }
    var keep = records.count
    for k in (lastPoint.map { $0 + 1 } ?? 0)..<records.count {
      guard case .before(_, _, let count, let zero) = records[k].record, !zero else { continue }
      let position = records[k].position
      guard let f = opened.last(where: { $0.position <= position }) else { continue }
      let good = HistoryFormat.verifyBlocks(at: position - f.position, count: Int(count)) { offset, n in
        var b = [UInt8](repeating: 0, count: n)
        let r = b.withUnsafeMutableBytes { preadFull(f.fd, $0.baseAddress!, n, offset) }
        return (try? r.get()) == n ? b : nil
      }
      if !good {
        keep = k
        let fi = opened.lastIndex { $0.position <= position }!
        cutAt = (fi, position - f.position, "a before-image's blocks do not match their CRCs")
        break
      }
    }
    records.removeSubrange(keep...)
    // Cut the torn tail: what follows the last good record goes.
    if let cut = cutAt {
      for f in opened[(cut.file + 1)...] {
        Sys.close(f.fd)
        unlink(directory + "/" + HistoryFormat.fileName(f.position))
      }
      opened.removeSubrange((cut.file + 1)...)
      for name in later { unlink(directory + "/" + name) }
      if !later.isEmpty {
        syncDirectory(of: directory + "/lock")
        log("history \(directory): \(later.count) file(s) begun after the torn tail are removed")
      }
      let f = opened[cut.file]
      if ftruncate(f.fd, off_t(cut.offset)) != 0 || (try? Sys.fsync(f.fd).get()) == nil {
        for f in opened { Sys.close(f.fd) }
        throw ToolkitError.path(directory, "cannot cut the torn tail of the history: \(Errno(errno))")
      }
      log("history \(directory): a torn tail is cut at log position \(f.position + cut.offset) (\(cut.why))")
    }
    let tail: UInt64 = {
      let f = opened[opened.count - 1]
      var st = stat()
      return fstat(f.fd, &st) == 0 ? f.position + UInt64(st.st_size) : f.position
    }()
    // The segments, from the records.
    let h = first.header
    var oldest = (number: h.previousPoint, instant: h.previousInstant)
    var closed: [Segment] = []
    var open = Segment(number: h.openSegment)
    var openFirstIncomplete = h.continues
    for (position, record) in records {
      switch record {
      case .before(let segment, let first, let count, let zero):
        if segment != open.number {
          open = Segment(number: segment)
        }
        if open.firstPosition == nil { open.firstPosition = position }
        open.runs.append(
          Run(first: first, position: position, count: count, index: 0, recordCount: count, zero: zero))
        open.bytes += record.length
        open.blocks += UInt64(count)
      case .point(let segment, let instant, _):
        if open.firstPosition == nil { open.firstPosition = position }
        open.bytes += record.length
        open.instant = instant
        open.runs.sort { $0.first < $1.first }
        if openFirstIncomplete {
          // Its first records went with a file trimmed away: the point it
          // closes is the oldest one whole.
          oldest = (segment, instant)
          openFirstIncomplete = false
        } else {
          closed.append(open)
        }
        open = Segment(number: segment + 1)
      }
    }
    if openFirstIncomplete {
      // Only an incomplete segment is left: no point can be read until the
      // next one.
      oldest = (open.number, 0)
    }
    var preserved = BlockBitmap(count: geometry.blockCount)
    for r in open.runs { preserved.set(r.first..<r.first + UInt64(r.count)) }
    let st = State(
      files: opened, closed: closed, open: open, openSorted: false, oldest: oldest, preserved: preserved, tail: tail,
      synced: tail)
    log(
      "history \(directory): \(closed.count + (oldest.instant == 0 ? 0 : 1)) point(s) recovered, "
        + "\(records.count) record(s)")
    return (id, st)
  }

  /// The current header of the file at `path`, or nil.
  private static func readHeader(_ path: String) -> HistoryFormat.FileHeader? {
    guard case .success(let fd) = Sys.open(path, flags: O_RDONLY) else { return nil }
    defer { Sys.close(fd) }
    var head = [UInt8](repeating: 0, count: HistoryFormat.fileHeaderLength)
    let got = head.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, $0.count, 0) }
    guard (try? got.get()) == HistoryFormat.fileHeaderLength else { return nil }
    return try? HistoryFormat.FileHeader.decode(file: head[...]).get()
  }

  private static func decodedErrorText(_ r: Result<HistoryFormat.FileHeader, HistoryFormatError>) -> String {
    if case .failure(let e) = r { return e.sentence }
    return "is not a history file"
  }

  // MARK: Before-images

  /// Preserves the old contents of the blocks `offset..<offset+length`
  /// touches that this segment has not preserved yet, durably, before the
  /// caller writes them. The caller holds the blocks' locks, so no other
  /// write of them runs meanwhile, and no point is taken (its writes are
  /// held). Never throws: a failure loses the history, not the write.
  /// With `durable` false the log is not synchronised here: the caller
  /// (StagedWrites) calls `syncLog` before the write reaches the device.
  public func preserve(offset: UInt64, length: UInt64, from device: Device, durable: Bool = true) {
    let blocks = geometry.blocks(touching: offset, length: length)
    guard !blocks.isEmpty else { return }
    var wanted: [Range<UInt64>] = []
    let alive = state.withLock { () -> Bool in
      guard s.lost == nil else { return false }
      var b = blocks.lowerBound
      while b < blocks.upperBound {
        guard let start = s.preserved.nextClear(from: b, before: blocks.upperBound) else { break }
        let end = s.preserved.nextSet(from: start, before: blocks.upperBound) ?? blocks.upperBound
        wanted.append(start..<end)
        b = end
      }
      return true
    }
    guard alive, !wanted.isEmpty else { return }
    // 4 MiB of blocks per chunk at most; the last chunk's append waits for
    // the log to be durable, in the same turn of the lock.
    let chunk = UInt64(1024)
    var chunks: [Range<UInt64>] = []
    for range in wanted {
      var b = range.lowerBound
      while b < range.upperBound {
        let n = min(chunk, range.upperBound - b)
        chunks.append(b..<b + n)
        b += n
      }
    }
    for (i, c) in chunks.enumerated() {
      guard append(c, from: device, thenWait: durable && i == chunks.count - 1) else { return }
    }
  }

  /// Reads, frames and appends the before-images of `range`; with
  /// `thenWait`, returns once the log is durable up to them. False when
  /// the history is lost.
  private func append(_ range: Range<UInt64>, from device: Device, thenWait: Bool) -> Bool {
    let count = Int(range.count)
    let bs = Int(Self.bs)
    let buffer = buffers.get(count * bs + count * (4 + HistoryFormat.recordHeaderLength))
    defer { buffers.put(buffer) }
    let data = buffer.pointer
    let start = range.lowerBound * Self.bs
    let readable = Int(min(UInt64(count * bs), geometry.deviceSize - start))
    do {
      try device.read(into: UnsafeMutableRawBufferPointer(start: data, count: readable), at: start)
    } catch {
      lose("reading the device's old contents failed: \(error)")
      return false
    }
    if readable < count * bs { memset(data + readable, 0, count * bs - readable) }
    // Runs of zero and non-zero blocks, each one record; headers and CRCs
    // go after the data in the same buffer.
    var pieces: [(first: Int, count: Int, zero: Bool)] = []
    for k in 0..<count {
      let z = isZeroBlock(data + k * bs, bs)
      if let last = pieces.last, last.zero == z {
        pieces[pieces.count - 1].count += 1
      } else {
        pieces.append((k, 1, z))
      }
    }
    let meta = data + count * bs
    var vectors: [iovec] = []
    vectors.reserveCapacity(3 * pieces.count)
    var headers: [UnsafeMutableRawPointer] = []
    var metaUsed = 0
    var total: UInt64 = 0
    for p in pieces {
      let header = meta + metaUsed
      headers.append(header)
      vectors.append(iovec(iov_base: header, iov_len: HistoryFormat.recordHeaderLength))
      metaUsed += HistoryFormat.recordHeaderLength
      total += UInt64(HistoryFormat.recordHeaderLength)
      guard !p.zero else { continue }
      for k in 0..<p.count {
        let crc = dr_crc32c(0, data + (p.first + k) * bs, bs).littleEndian
        (meta + metaUsed + 4 * k).storeBytes(of: crc, as: UInt32.self)
      }
      vectors.append(iovec(iov_base: meta + metaUsed, iov_len: 4 * p.count))
      vectors.append(iovec(iov_base: data + p.first * bs, iov_len: p.count * bs))
      metaUsed += 4 * p.count
      total += UInt64(p.count * (4 + bs))
    }
    // Appended under the lock, so the log is written in the order it is
    // reserved and a sync of everything up to the tail is a sync of whole
    // records: a torn tail never hides a record a write waited for.
    state.lock()
    defer { state.unlock() }
    guard s.lost == nil, let place = reserve(total) else { return false }
    var at = place.position
    for (i, p) in pieces.enumerated() {
      let record = HistoryFormat.Record.before(
        segment: s.open.number, first: range.lowerBound + UInt64(p.first), count: UInt32(p.count), zero: p.zero)
      record.encodeHeader(into: headers[i])
      s.open.runs.append(
        Run(
          first: range.lowerBound + UInt64(p.first), position: at, count: UInt32(p.count), index: 0,
          recordCount: UInt32(p.count), zero: p.zero))
      s.open.bytes += record.length
      s.open.blocks += UInt64(p.count)
      if s.open.firstPosition == nil { s.open.firstPosition = at }
      at += record.length
    }
    let written = vectors.withUnsafeMutableBufferPointer { pwritevFull(place.fd, $0, place.position - place.fileStart) }
    if case .failure(let e) = written {
      loseLocked("appending before-images failed: \(e)")
      return false
    }
    s.openSorted = false
    s.preserved.set(range)
    if thenWait { waitDurableLocked(place.position + total) }
    return s.lost == nil
  }

  /// Room for `length` bytes at the log's tail, in a new file when the
  /// current one is full. Called with the state locked.
  private func reserve(_ length: UInt64) -> (position: UInt64, fd: Int32, fileStart: UInt64)? {
    var current = s.files[s.files.count - 1]
    let used = s.tail - current.position
    if used > UInt64(HistoryFormat.fileHeaderLength) && used + length > Self.fileLimit {
      // A new file, whose header is durable before anything is in it.
      let header = HistoryFormat.FileHeader(
        updates: 1, historyID: id, deviceSize: geometry.deviceSize, blockSize: HistoryFormat.blockSize,
        continues: s.open.firstPosition != nil, position: s.tail, openSegment: s.open.number,
        previousPoint: s.open.number - 1, previousInstant: s.closed.last?.instant ?? s.oldest.instant,
        live: s.tail + UInt64(HistoryFormat.fileHeaderLength))
      do {
        let fd = try Self.createFile(directory: directory, header: header)
        current = LogFile(position: s.tail, fd: fd, header: header)
        s.files.append(current)
        s.tail += UInt64(HistoryFormat.fileHeaderLength)
      } catch {
        loseLocked("\(error)")
        return nil
      }
    }
    let at = s.tail
    s.tail += length
    return (at, current.fd, current.position)
  }

  /// Lets the log be synchronised again once the device holds the state
  /// the last point names (`durable`), or loses the history when it could
  /// not be made durable.
  public func releasePoint(durable: Bool) {
    state.withLock {
      if !durable { loseLocked("the device could not be made durable at a point") }
      s.unsyncedPoint = false
      state.broadcast()
    }
  }

  /// Returns once everything appended so far is durable (or the history
  /// is lost).
  func syncLog() {
    state.withLock { waitDurableLocked(s.tail) }
  }

  /// Returns once the log is durable up to `end` (group commit: the first
  /// writer to find no sync running syncs everything appended so far; the
  /// others wait for it). Called with the state locked.
  private func waitDurableLocked(_ end: UInt64) {
    while s.synced < end && s.lost == nil {
      if s.syncing || s.unsyncedPoint {
        state.wait()
        continue
      }
      let target = s.tail
      s.syncing = true
      // Every file with bytes between the durable prefix and the target.
      var fds: [Int32] = []
      for (i, f) in s.files.enumerated() where f.position < target {
        let next = i + 1 < s.files.count ? s.files[i + 1].position : UInt64.max
        if next > s.synced { fds.append(f.fd) }
      }
      state.unlock()
      var failure: Errno?
      for fd in fds { if case .failure(let e) = Sys.fdatasync(fd) { failure = e } }
      state.lock()
      s.syncing = false
      if let failure {
        loseLocked("synchronising the history failed: \(failure)")
      } else {
        s.synced = max(s.synced, target)
      }
      state.broadcast()
    }
  }

  private func lose(_ why: String) { state.withLock { loseLocked(why) } }

  private func loseLocked(_ why: String) {
    guard s.lost == nil else { return }
    s.lost = why
    s.overlays = []
    state.broadcast()
    log("history \(directory) is lost: \(why); its points are refused from now on, the device goes on")
  }

  // MARK: Points

  /// Records a point: the device (durable, with no write inside) as it is
  /// now. Returns it, or nil when nothing was written since the last one or
  /// the history is lost: a lost history takes no points, and the FLUSH
  /// that would have made one goes on (the device goes on without it).
  /// With `durable` false the record is appended but not synchronised:
  /// the caller makes the device durable first and keeps every later
  /// append from being synchronised meanwhile (StagedWrites paused), so the
  /// record is never durable before the state it names. A crash before the
  /// next sync loses the point, not its before-images: its segment goes on.
  @discardableResult
  public func point(durable: Bool = true) throws -> Point? {
    let instant = Instant.now()
    return state.withLock {
      guard s.lost == nil, s.open.firstPosition != nil else { return nil }
      let record = HistoryFormat.Record.point(
        segment: s.open.number, instant: instant.nanosecondsSinceEpoch,
        bytes: s.open.bytes + UInt64(HistoryFormat.recordHeaderLength))
      guard let place = reserve(record.length) else { return nil }
      var header = [UInt8](repeating: 0, count: HistoryFormat.recordHeaderLength)
      header.withUnsafeMutableBytes { record.encodeHeader(into: $0.baseAddress!) }
      let written = header.withUnsafeBytes {
        pwriteFull(place.fd, $0.baseAddress!, $0.count, place.position - place.fileStart)
      }
      if case .failure(let e) = written { loseLocked("appending a point failed: \(e)") }
      if durable { waitDurableLocked(place.position + record.length) } else { s.unsyncedPoint = true }
      guard s.lost == nil else { return nil }
      var segment = s.open
      segment.bytes += record.length
      segment.instant = instant.nanosecondsSinceEpoch
      segment.runs.sort { $0.first < $1.first }
      for r in segment.runs { s.preserved.clear(r.first..<r.first + UInt64(r.count)) }
      s.closed.append(segment)
      s.open = Segment(number: segment.number + 1)
      s.openSorted = true
      return Point(number: segment.number, instant: instant, bytes: segment.bytes, blocks: segment.blocks)
    }
  }

  /// Trims the oldest points the retention no longer keeps, and the files
  /// only they needed. Called after each point and every few seconds.
  public func trim() {
    let now = Instant.now().nanosecondsSinceEpoch
    var doomed: [LogFile] = []
    var punch: (fd: Int32, from: UInt64, to: UInt64)?
    var header: (fd: Int32, bytes: [UInt8], offset: UInt64)?
    var dropped = 0
    state.withLock {
      // (A header's sync would make the log durable too: not now.)
      guard s.lost == nil, !s.unsyncedPoint else { return }
      var used = s.closed.reduce(UInt64(0)) { $0 + $1.bytes } + s.open.bytes
      while let first = s.closed.first {
        let old = retention.seconds > 0 && Double(now - s.oldest.instant) / 1e9 > retention.seconds
        let big = retention.bytes > 0 && used > retention.bytes
        guard old || big else { break }
        s.oldest = (first.number, first.instant)
        used -= first.bytes
        s.closed.removeFirst()
        dropped += 1
      }
      guard dropped > 0 else { return }
      // Not `s.oldest` inside the closure: `s` is being modified (a trap).
      let oldest = s.oldest.number
      s.overlays.removeAll { $0.point < oldest }
      // The first record kept; files wholly before it go, the rest of the
      // first one is punched out after its header says where to start.
      let live = s.closed.first?.firstPosition ?? s.open.firstPosition ?? s.tail
      while s.files.count > 1 && s.files[1].position <= live {
        doomed.append(s.files.removeFirst())
      }
      var f = s.files[0]
      let liveSegment = s.closed.first?.number ?? s.open.number
      if live > f.header.live {
        f.header.updates += 1
        f.header.live = live
        f.header.openSegment = liveSegment
        f.header.previousPoint = liveSegment - 1
        f.header.previousInstant = s.oldest.instant
        f.header.continues = false
        let slot = UInt64(f.header.updates % 2 == 1 ? 0 : HistoryFormat.slotLength)
        header = (f.fd, f.header.encoded(), slot)
        punch = (f.fd, f.position + UInt64(HistoryFormat.fileHeaderLength), live)
        s.files[0] = f
      }
    }
    guard dropped > 0 else { return }
    // Files change only with no reader inside.
    files.writeLock()
    defer { files.unlock() }
    if let h = header {
      let ok = h.bytes.withUnsafeBytes { pwriteFull(h.fd, $0.baseAddress!, $0.count, h.offset) }
      if case .failure(let e) = ok { return lose("updating a history file's header failed: \(e)") }
      if case .failure(let e) = Sys.fdatasync(h.fd) { return lose("updating a history file's header failed: \(e)") }
    }
    if let p = punch, let base = state.withLock({ s.files.first?.position }) {
      // Whole pages only: the page holding `live` keeps its records.
      let from = p.from - base
      let to = (p.to - base) & ~UInt64(4095)
      if to > from {
        _ = dr_punch_hole(p.fd, from, to - from)
      }
    }
    for f in doomed {
      Sys.close(f.fd)
      unlink(directory + "/" + HistoryFormat.fileName(f.position))
    }
    if !doomed.isEmpty { syncDirectory(of: directory + "/lock") }
  }

  /// Records the last point before a stop, when anything was written since.
  public func close() {
    if (try? point()) != nil { trim() }
  }

  public var summary: Summary {
    var space: UInt64 = 0
    let (sum, fds): (Summary, [Int32]) = state.withLock {
      (
        Summary(
          id: id, points: pointsLocked(), spaceUsed: 0, openBytes: s.open.bytes, retention: retention, lost: s.lost),
        s.files.map(\.fd)
      )
    }
    for fd in fds { if case .success(let st) = Sys.fstat(fd) { space += UInt64(st.st_blocks) * 512 } }
    var result = sum
    result.spaceUsed = space
    return result
  }

  /// The points kept, oldest first (none when the history is lost).
  public var points: [Point] { state.withLock { pointsLocked() } }

  private func pointsLocked() -> [Point] {
    guard s.lost == nil else { return [] }
    var points: [Point] = []
    if s.oldest.instant != 0 {
      points.append(
        Point(number: s.oldest.number, instant: Instant(nanosecondsSinceEpoch: s.oldest.instant), bytes: 0, blocks: 0))
    }
    for c in s.closed {
      points.append(
        Point(number: c.number, instant: Instant(nanosecondsSinceEpoch: c.instant), bytes: c.bytes, blocks: c.blocks))
    }
    return points
  }

  /// The newest point at or before `instant`, or why there is none. Points
  /// are compared at the millisecond their instants are listed to, so that
  /// the instant `points` shows for a point finds that point.
  public func point(at instant: Instant) throws -> UInt64 {
    let points = self.points
    func listed(_ i: Instant) -> Int64 {
      let ns = i.nanosecondsSinceEpoch
      return ns - ((ns % 1_000_000) + 1_000_000) % 1_000_000
    }
    guard let p = points.last(where: { listed($0.instant) <= instant.nanosecondsSinceEpoch }) else {
      if let first = points.first {
        throw ToolkitError(
          "\(instant) is before the oldest point kept, \(first.number) at \(first.instant): the history no longer "
            + "goes back that far")
      }
      throw ToolkitError("the history holds no point yet")
    }
    return p.number
  }

  /// The newest point.
  public var newest: UInt64? {
    state.withLock { s.lost != nil ? nil : s.closed.last?.number ?? (s.oldest.instant != 0 ? s.oldest.number : nil) }
  }

  /// Refuses a point that is not kept, with a sentence.
  public func check(point n: UInt64) throws {
    try state.withLock { try checkLocked(n) }
  }

  private func checkLocked(_ n: UInt64) throws {
    if let lost = s.lost { throw ToolkitError("the history is lost: \(lost)") }
    let newest = s.closed.last?.number ?? s.oldest.number
    if n > newest || (s.oldest.instant == 0 && s.closed.isEmpty) {
      throw ToolkitError("point \(n) does not exist; the newest point is \(newest)")
    }
    if n < s.oldest.number {
      throw ToolkitError(
        "point \(n) was trimmed: the oldest point kept is \(s.oldest.number), at "
          + "\(Instant(nanosecondsSinceEpoch: s.oldest.instant))")
    }
  }

  // MARK: Reading a point

  /// Where one block of point n comes from.
  private enum Source: Equatable {
    case device
    case zero
    /// A before-image block: its record's position, the record's block
    /// count and the block's index in it.
    case kept(position: UInt64, recordCount: UInt32, index: UInt32)
  }

  /// Reads point `n` (the caller holds the block locks of the range).
  public func read(point n: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, device: Device)
    throws
  {
    guard !buffer.isEmpty else { return }
    files.readLock()
    defer { files.unlock() }
    let blocks = geometry.blocks(touching: offset, length: UInt64(buffer.count))
    // The plan: one source per block, found under the state lock.
    var plan: [(blocks: Range<UInt64>, source: Source)] = []
    var fileTable: [(position: UInt64, fd: Int32)] = []
    try state.withLock {
      try checkLocked(n)
      let overlay = overlayLocked(n)
      if !s.openSorted {
        s.open.runs.sort { $0.first < $1.first }
        s.openSorted = true
      }
      let later = s.closed.filter { $0.number > overlay.upTo } + [s.open]
      for b in blocks {
        var source = Source.device
        if let r = Self.find(b, in: overlay.runs) {
          source = Self.source(of: r, at: b)
        } else {
          for seg in later {
            if let r = Self.find(b, in: seg.runs) {
              source = Self.source(of: r, at: b)
              break
            }
          }
        }
        if let last = plan.last, Self.continues(last.source, source, by: UInt64(last.blocks.count)) {
          plan[plan.count - 1].blocks = last.blocks.lowerBound..<b + 1
        } else {
          plan.append((b..<b + 1, source))
        }
      }
      fileTable = s.files.map { ($0.position, $0.fd) }
    }
    // Carry it out.
    for step in plan {
      let byteStart = max(offset, step.blocks.lowerBound * Self.bs)
      let byteEnd = min(offset + UInt64(buffer.count), step.blocks.upperBound * Self.bs)
      guard byteEnd > byteStart else { continue }
      let into = UnsafeMutableRawBufferPointer(
        start: buffer.baseAddress! + Int(byteStart - offset), count: Int(byteEnd - byteStart))
      switch step.source {
      case .device:
        try device.read(into: into, at: byteStart)
      case .zero:
        into.initializeMemory(as: UInt8.self, repeating: 0)
      case .kept(let position, let recordCount, let index):
        guard let f = fileTable.last(where: { $0.position <= position }) else {
          throw ToolkitError("point \(n): a before-image lies outside the history's files")
        }
        try readKept(
          fd: f.fd, recordOffset: position - f.position, recordCount: recordCount, index: index,
          blocks: UInt32(step.blocks.count), skip: Int(byteStart - step.blocks.lowerBound * Self.bs), into: into,
          point: n)
      }
    }
  }

  private static func continues(_ a: Source, _ b: Source, by count: UInt64) -> Bool {
    switch (a, b) {
    case (.device, .device), (.zero, .zero): return true
    case (.kept(let p, let c, let i), .kept(let q, let d, let j)):
      return p == q && c == d && UInt64(j) == UInt64(i) + count
    default: return false
    }
  }

  private static func source(of r: Run, at b: UInt64) -> Source {
    r.zero ? .zero : .kept(position: r.position, recordCount: r.recordCount, index: r.index + UInt32(b - r.first))
  }

  /// The run holding `b` in runs sorted by first block, if any.
  private static func find(_ b: UInt64, in runs: [Run]) -> Run? {
    var lo = 0
    var hi = runs.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if runs[mid].first <= b { lo = mid + 1 } else { hi = mid }
    }
    guard lo > 0 else { return nil }
    let r = runs[lo - 1]
    return b < r.first + UInt64(r.count) ? r : nil
  }

  /// Reads `blocks` before-image blocks from index `index` of the record at
  /// `recordOffset`, checks each against its CRC, and copies them from byte
  /// `skip` of the first into `into`.
  private func readKept(
    fd: Int32, recordOffset: UInt64, recordCount: UInt32, index: UInt32, blocks: UInt32, skip: Int,
    into: UnsafeMutableRawBufferPointer, point n: UInt64
  ) throws {
    let bs = Int(Self.bs)
    let crcAt = recordOffset + UInt64(HistoryFormat.recordHeaderLength) + 4 * UInt64(index)
    let dataAt =
      recordOffset + UInt64(HistoryFormat.recordHeaderLength) + 4 * UInt64(recordCount) + UInt64(index) * Self.bs
    let count = Int(blocks)
    // Whole blocks straight into the client's buffer when it is aligned.
    let direct = skip == 0 && into.count == count * bs
    let buffer = buffers.get(direct ? 4 * count : count * bs + 4 * count)
    defer { buffers.put(buffer) }
    let crcs = buffer.pointer + (direct ? 0 : count * bs)
    let data = direct ? into.baseAddress! : buffer.pointer
    // A whole record's CRCs and blocks lie end to end: one read for both.
    var done = false
    if index == 0 && blocks == recordCount {
      var vectors = [iovec(iov_base: crcs, iov_len: 4 * count), iovec(iov_base: data, iov_len: count * bs)]
      let n = preadv(fd, &vectors, 2, off_t(crcAt))
      done = n == 4 * count + count * bs
    }
    if !done {
      guard case .success = preadFull(fd, crcs, 4 * count, crcAt),
        case .success = preadFull(fd, data, count * bs, dataAt)
      else { throw ToolkitError("point \(n): reading a before-image failed: \(Errno(errno))") }
    }
    for k in 0..<count {
      let want = crcs.loadUnaligned(fromByteOffset: 4 * k, as: UInt32.self).littleEndian
      guard dr_crc32c(0, data + k * bs, bs) == want else {
        log("history \(directory): a before-image block of point \(n) does not match its CRC")
        throw ToolkitError("point \(n): a before-image block does not match its CRC; the history is damaged there")
      }
    }
    if !direct { into.copyMemory(from: UnsafeRawBufferPointer(start: data + skip, count: into.count)) }
  }

  /// Point n's overlay, built or brought up to the newest closed segment
  /// when it lags by many. Called with the state locked.
  private func overlayLocked(_ n: UInt64) -> Overlay {
    let overlay: Overlay
    if let i = s.overlays.firstIndex(where: { $0.point == n }) {
      overlay = s.overlays[i]
      s.overlays.remove(at: i)
    } else {
      overlay = Overlay(point: n, count: geometry.blockCount)
    }
    s.overlays.append(overlay)
    if s.overlays.count > 4 { s.overlays.removeFirst() }
    // Built whole at first; then brought up to date when many segments
    // have closed since (the few after it are looked up one by one).
    let newest = s.closed.last?.number ?? n
    guard newest > overlay.upTo, !overlay.built || newest - overlay.upTo >= 8 else { return overlay }
    overlay.built = true
    var added: [Run] = []
    for seg in s.closed where seg.number > overlay.upTo {
      for r in seg.runs {
        var b = r.first
        let end = r.first + UInt64(r.count)
        while b < end {
          guard let start = overlay.covered.nextClear(from: b, before: end) else { break }
          let stop = overlay.covered.nextSet(from: start, before: end) ?? end
          var piece = r
          piece.first = start
          piece.count = UInt32(stop - start)
          piece.index = r.index + UInt32(start - r.first)
          added.append(piece)
          b = stop
        }
        overlay.covered.set(r.first..<end)
      }
      overlay.upTo = seg.number
    }
    if !added.isEmpty {
      overlay.runs += added
      overlay.runs.sort { $0.first < $1.first }
    }
    return overlay
  }
}

/// Whether `count` bytes at `p` are all zero.
@inline(__always) func isZeroBlock(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
  p.load(as: UInt8.self) == 0 && memcmp(p, p + 1, count - 1) == 0
}

/// Lets this process open as many files as its hard limit allows: a long
/// history keeps one open per 256 MiB.
func raiseFileLimit() {
  var l = rlimit()
  if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &l) == 0 && l.rlim_cur < l.rlim_max {
    l.rlim_cur = l.rlim_max
    setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &l)
  }
}

/// A pthread read-write lock that prefers writers.
final class ReadWriteLock: @unchecked Sendable {
  private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
  init() {
    var a = pthread_rwlockattr_t()
    pthread_rwlockattr_init(&a)
    pthread_rwlockattr_setkind_np(&a, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
    pthread_rwlock_init(lock, &a)
    pthread_rwlockattr_destroy(&a)
  }
  deinit {
    pthread_rwlock_destroy(lock)
    lock.deallocate()
  }
  func readLock() { pthread_rwlock_rdlock(lock) }
  func writeLock() { pthread_rwlock_wrlock(lock) }
  func unlock() { pthread_rwlock_unlock(lock) }
}

extension Instant {
  /// Parses an RFC 3339 instant in UTC: `2026-12-07T01:30:00Z`, with an
  /// optional fraction of a second.
  public init?(rfc3339 text: String) {
    let u = Array(text.utf8)
    guard u.count >= 20, u.last == UInt8(ascii: "Z"), u[4] == 0x2D, u[7] == 0x2D,
      u[10] == UInt8(ascii: "T") || u[10] == UInt8(ascii: "t"), u[13] == 0x3A, u[16] == 0x3A
    else { return nil }
    func number(_ r: Range<Int>) -> Int? {
      var v = 0
      for i in r {
        guard u[i] >= 0x30 && u[i] <= 0x39 else { return nil }
        v = v * 10 + Int(u[i] - 0x30)
      }
      return v
    }
    guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10),
      let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19),
      (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61
    else { return nil }
    var nanos: Int64 = 0
    if u.count > 20 {
      guard u[19] == 0x2E, u.count - 21 >= 1, u.count - 21 <= 9, let f = number(20..<u.count - 1) else { return nil }
      nanos = Int64(f)
      for _ in 0..<(9 - (u.count - 21)) { nanos *= 10 }
    } else if u[19] != UInt8(ascii: "Z") {
      return nil
    }
    var t = tm()
    t.tm_year = Int32(year - 1900)
    t.tm_mon = Int32(month - 1)
    t.tm_mday = Int32(day)
    t.tm_hour = Int32(hour)
    t.tm_min = Int32(minute)
    t.tm_sec = Int32(second)
    // Nanoseconds since 1970 in 64 bits reach from 1677 to 2262.
    let (whole, over) = Int64(timegm(&t)).multipliedReportingOverflow(by: 1_000_000_000)
    let (all, past) = whole.addingReportingOverflow(nanos)
    guard !over, !past else { return nil }
    self.init(nanosecondsSinceEpoch: all)
  }
}
