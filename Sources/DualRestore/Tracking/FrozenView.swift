// A point-in-time view of a device that keeps changing: before the first
// write to a block after the freeze, the block's old contents are copied to
// the preservation store; the view reads preserved blocks from the store and
// the others from the device.
//
// The store is a file: a 4 KiB text header naming the view (so a store left
// behind by a crash can be reported), then one slot per preserved block, in
// the order they were preserved. The index (block → slot) is in memory only:
// a view does not survive a restart of its server, and says so.
//
// The store grows by steps of 64 MiB allocated ahead of the slots
// (fallocate). Blocks allocated one write at a time, as the page cache's
// write-out of the store gets to them, made the first writes after a freeze
// several times slower than the copy they need: measured with 1 GiB written
// by nbdcopy --flush, 5.3 s against 1.9 s with the steps, and 1.1 s with no
// view held. Slots are written past the page cache where the file system
// allows (see `writeSlots`). No write to the store is made durable: a view does not outlive
// its server, so after a crash there is nothing its store would be read for.

import CShim
import Glibc
import Synchronization

public final class FrozenView: Sendable {
  public let id = ID128.random()
  public let frozen: Instant
  public let geometry: BlockGeometry
  public let limit: UInt64
  let path: String
  let fd: Int32
  /// The store opened with O_DIRECT for the slots' writes, or -1 where the
  /// file system refuses it (tmpfs) or blocks are smaller than a page: see
  /// `writeSlots`.
  private let directFD: Int32
  let log: @Sendable (String) -> Void
  static let headerLength: UInt64 = 4096

  /// The store's slots: which block each holds, and how far they reach.
  private struct Store {
    var slots: [UInt64: UInt64] = [:]
    var nextSlot: UInt64 = 0
    /// Where the store's allocated blocks end (fallocate, ahead of the slots).
    var allocated: UInt64 = FrozenView.headerLength
    var lostReason: String?
  }
  private let store = Locked(Store())
  static let allocationStep: UInt64 = 64 << 20

  /// Creates the store at `path`. `generation`, the change map's at the
  /// freeze, is only named in the store's header, for whoever finds a store
  /// left behind.
  init(
    path: String, geometry: BlockGeometry, limit: UInt64, instant: Instant, generation: ID128,
    log: @escaping @Sendable (String) -> Void
  ) throws {
    self.path = path
    self.geometry = geometry
    self.limit = limit
    self.frozen = instant
    self.log = log
    switch Sys.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, "cannot create the preservation store: \(e)")
    }
    // Direct writes need whole pages: slots of whole pages, at page offsets.
    if geometry.blockSize % 4096 == 0, case .success(let d) = Sys.open(path, flags: O_RDWR | dr_O_DIRECT) {
      directFD = d
    } else {
      directFD = -1
    }
    let text = FrozenView.headerText + "view \(id)\nfrozen \(frozen)\ngeneration \(generation)\n"
    var header = Array(text.utf8)
    header += [UInt8](repeating: 0, count: Int(FrozenView.headerLength) - header.count)
    let written = header.withUnsafeBytes { pwriteFull(fd, $0.baseAddress!, $0.count, 0) }
    if case .failure(let e) = written {
      Sys.close(fd)
      if directFD >= 0 { Sys.close(directFD) }
      unlink(path)
      throw ToolkitError.path(path, "cannot write the preservation store: \(e)")
    }
  }

  deinit {
    Sys.close(fd)
    if directFD >= 0 { Sys.close(directFD) }
  }

  static let headerText = "dualrestore preservation store\n"

  /// Whether the file at `path` is a preservation store (by its header).
  static func isStore(_ path: String) -> Bool {
    guard let bytes = peekFile(path, count: headerText.utf8.count) else { return false }
    return bytes == Array(headerText.utf8)
  }

  /// Drops the preserved blocks, keeping the header.
  func discardSlots() { _ = ftruncate(fd, off_t(FrozenView.headerLength)) }

  /// "VIEW frozen at INSTANT" from a store left behind, for the log.
  static func describeLeftover(_ path: String) -> String {
    guard let bytes = peekFile(path, count: 512) else { return "in \(path)" }
    let text = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    var view = "?"
    var frozen = "?"
    for line in text.split(separator: "\n") {
      if line.hasPrefix("view ") { view = String(line.dropFirst(5)) }
      if line.hasPrefix("frozen ") { frozen = String(line.dropFirst(7)) }
    }
    return "\(view) (frozen at \(frozen))"
  }

  public var status: TrackingEngine.ViewStatus {
    store.withLock { s in
      TrackingEngine.ViewStatus(
        id: id, frozen: frozen, preservedBlocks: UInt64(s.slots.count), storeBytes: storeBytes(s), storeLimit: limit,
        lost: s.lostReason)
    }
  }

  public var isLost: Bool { store.withLock { $0.lostReason != nil } }

  private func storeBytes(_ s: borrowing Store) -> UInt64 {
    FrozenView.headerLength + s.nextSlot * UInt64(geometry.blockSize)
  }

  /// Marks the view lost; its reads fail from now on.
  func close(reason: String) {
    store.withLock { if $0.lostReason == nil { $0.lostReason = reason } }
  }

  private func lose(_ reason: String) {
    let first = store.withLock { s -> Bool in
      guard s.lostReason == nil else { return false }
      s.lostReason = reason
      return true
    }
    if first {
      log("the frozen view \(id) is lost: \(reason); the live device is unaffected, drop the view and freeze anew")
    }
  }

  /// Copies the old contents of the blocks of `blocks` not yet preserved
  /// into the store. Called with the blocks locked, before they are written.
  func preserve(_ blocks: Range<UInt64>, from device: Device, buffers: BufferPool) {
    let blockSize = UInt64(geometry.blockSize)
    var b = blocks.lowerBound
    while b < blocks.upperBound {
      // The next run of blocks not yet preserved.
      let run: Range<UInt64>? = store.withLock { s in
        if s.lostReason != nil { return nil }
        var start = b
        while start < blocks.upperBound && s.slots[start] != nil { start += 1 }
        guard start < blocks.upperBound else { return nil }
        var end = start + 1
        let most = max(1, (4 << 20) / blockSize)
        while end < blocks.upperBound && s.slots[end] == nil && end - start < most { end += 1 }
        return start..<end
      }
      guard let run else { return }
      let (offset, length) = geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
      let buffer = buffers.get(Int(run.count) * Int(blockSize))
      defer { buffers.put(buffer) }
      do {
        try device.read(into: buffer.slice(0, Int(length)), at: offset)
      } catch {
        lose("reading the old contents of block \(run.lowerBound) failed: \(error)")
        return
      }
      let claimed: (first: UInt64, grow: Range<UInt64>?)? = store.withLock { s in
        let bytes = storeBytes(s) + UInt64(run.count) * blockSize
        guard bytes <= limit else { return nil }
        let first = s.nextSlot
        s.nextSlot += UInt64(run.count)
        // Room ahead of the slots, allocated a step at a time.
        var grow: Range<UInt64>?
        if bytes > s.allocated {
          let end = min(limit, max(bytes, s.allocated + FrozenView.allocationStep))
          grow = s.allocated..<end
          s.allocated = end
        }
        return (first, grow)
      }
      if let grow = claimed?.grow {
        // Only faster when it works: where it fails, the write allocates.
        _ = dr_allocate(fd, grow.lowerBound, UInt64(grow.count))
      }
      guard let first = claimed?.first else {
        lose("the preservation store \(path) is full (limit \(formatBytes(limit)))")
        return
      }
      let at = FrozenView.headerLength + first * blockSize
      if case .failure(let e) = writeSlots(buffer.pointer, length: Int(length), at: at) {
        lose("writing the preservation store \(path) failed: \(e)")
        return
      }
      store.withLock { s in
        for (i, block) in run.enumerated() { s.slots[block] = first + UInt64(i) }
      }
      b = run.upperBound
    }
  }

  private let directRefused = Atomic<Bool>(false)

  /// Writes slots past the page cache where the file system allows it:
  /// before-images are written once and read at most once (by a stream of
  /// the view), so caching them would only push the live device's pages
  /// out (and a cache that grows by the store's size costs fresh memory:
  /// on a VM with free page reporting that made the first writes after a
  /// freeze 4–5 times slower than a copy). The length is rounded up to whole
  /// pages (the buffer and the slots, whole blocks of whole pages, have
  /// room). Reads go through `fd`, which the kernel keeps coherent with
  /// direct writes.
  private func writeSlots(_ pointer: UnsafeMutableRawPointer, length: Int, at: UInt64) -> Result<Void, Errno> {
    if directFD >= 0 && !directRefused.load(ordering: .relaxed) {
      let whole = (length + 4095) & ~4095
      switch pwriteFull(directFD, pointer, whole, at) {
      case .success: return .success(())
      case .failure(let e) where e.rawValue == EINVAL: directRefused.store(true, ordering: .relaxed)
      case .failure(let e): return .failure(e)
      }
    }
    return pwriteFull(fd, pointer, length, at)
  }

  /// Reads the view's bytes at `offset`. Called with the blocks locked.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, device: Device) throws {
    let blockSize = UInt64(geometry.blockSize)
    let end = offset + UInt64(buffer.count)
    var position = offset
    while position < end {
      let block = position >> geometry.blockShift
      let (slot, lost) = store.withLock { ($0.slots[block], $0.lostReason) }
      if let lost { throw TrackingError.viewLost(view: id, reason: lost) }
      let blockEnd = min((block + 1) * blockSize, end)
      let into = buffer.baseAddress! + Int(position - offset)
      if let slot {
        let at = FrozenView.headerLength + slot * blockSize + (position - block * blockSize)
        if case .failure(let e) = preadFull(fd, into, Int(blockEnd - position), at) {
          throw ToolkitError.path(path, "cannot read the preservation store: \(e)")
        }
        position = blockEnd
        continue
      }
      // A run of blocks unchanged since the freeze: one read of the device.
      var runEnd = blockEnd
      while runEnd < end {
        let next = runEnd >> geometry.blockShift
        if store.withLock({ $0.slots[next] }) != nil { break }
        runEnd = min((next + 1) * blockSize, end)
      }
      try device.read(
        into: UnsafeMutableRawBufferPointer(start: into, count: Int(runEnd - position)), at: position)
      position = runEnd
    }
    if let lost = store.withLock({ $0.lostReason }) {
      throw TrackingError.viewLost(view: id, reason: lost)
    }
  }
}
