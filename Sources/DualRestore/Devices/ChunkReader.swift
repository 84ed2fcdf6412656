// Sequential, read-ahead reading of a source in chunks of whole blocks.
//
// A producer thread fills a small ring of reusable buffers while the caller
// works on the previous chunk, so reading overlaps comparing or hashing.
// Memory is fixed at `depth` chunks; nothing is allocated per block.
//
// Blocks that lie entirely in a hole of an image file are not read: they are
// flagged in `Chunk.isHole` and their bytes in the buffer are undefined.
// A block partly in a hole is read normally (the hole reads as zeros).

import Dispatch

// @unchecked Sendable: slots pass between producer and consumer by the `filled`/`free` semaphores.
public final class ChunkReader: @unchecked Sendable {
  public struct Chunk {
    /// Index of the first block of the chunk.
    public let firstBlock: UInt64
    public let blockCount: Int
    /// Bytes in the chunk (the last block may be partial).
    public let length: Int
    public let bytes: UnsafeRawBufferPointer
    /// `isHole[i]`: block `firstBlock + i` is entirely in a hole.
    public let isHole: UnsafeBufferPointer<Bool>
    public let holeCount: Int
    /// `isSkipped[i]`: block `firstBlock + i` is not in the selection; not read.
    public let isSkipped: UnsafeBufferPointer<Bool>
  }

  private final class Slot {
    let buffer: AlignedBuffer
    let holes: UnsafeMutableBufferPointer<Bool>
    let skipped: UnsafeMutableBufferPointer<Bool>
    var firstBlock: UInt64 = 0
    var blockCount = 0
    var length = 0
    var holeCount = 0
    var error: Error?
    var end = false

    init(bytes: Int, blocks: Int) {
      buffer = AlignedBuffer(count: bytes)
      holes = .allocate(capacity: max(blocks, 1))
      holes.initialize(repeating: false)
      skipped = .allocate(capacity: max(blocks, 1))
      skipped.initialize(repeating: false)
    }
    deinit {
      holes.deallocate()
      skipped.deallocate()
    }
  }

  public let source: BlockDevice
  public let geometry: BlockGeometry
  public let blocksPerChunk: Int
  /// Only these blocks are read, when set.
  public let selection: BlockBitmap?
  private let slots: [Slot]
  private let filled = DispatchSemaphore(value: 0)
  // Created at 0 and signalled up: libdispatch traps when a semaphore is
  // freed with a value below the one it was created with.
  private let free = DispatchSemaphore(value: 0)
  private var consumed = 0
  private var holding = false
  private var ended = false
  private let cancelled = AtomicFlag()
  private let finished = DispatchSemaphore(value: 0)

  /// Starts reading `source` (cut by `geometry`) in the background.
  /// Chunks hold about `chunkBytes` bytes, and at least one block.
  public init(
    source: BlockDevice, geometry: BlockGeometry, chunkBytes: Int = 4 << 20, depth: Int = 3,
    skipHoles: Bool = true, selection: BlockBitmap? = nil
  ) {
    precondition(selection == nil || selection?.count == geometry.blockCount)
    self.source = source
    self.geometry = geometry
    self.selection = selection
    let perChunk = max(1, chunkBytes / Int(geometry.blockSize))
    blocksPerChunk = perChunk
    let ringDepth = max(2, depth)
    slots = (0..<ringDepth).map { _ in Slot(bytes: perChunk * Int(geometry.blockSize), blocks: perChunk) }
    for _ in 0..<ringDepth { free.signal() }
    startThread { [self] in
      produce(skipHoles: skipHoles)
      finished.signal()
    }
  }

  deinit {
    cancel()
  }

  /// Stops the producer and waits for it; safe to call more than once.
  public func cancel() {
    if cancelled.setOnce() {
      // Wake the producer if it waits for a free slot, then wait for it.
      free.signal()
      finished.wait()
    }
  }

  private func produce(skipHoles: Bool) {
    let total = geometry.blockCount
    var block: UInt64 = 0
    var index = 0
    var region: (isData: Bool, end: UInt64) = (true, 0)
    while !cancelled.isSet {
      free.wait()
      if cancelled.isSet { return }
      let slot = slots[index % slots.count]
      index += 1
      if block >= total {
        slot.end = true
        filled.signal()
        return
      }
      let count = Int(min(UInt64(blocksPerChunk), total - block))
      slot.firstBlock = block
      slot.blockCount = count
      let (start, length) = geometry.byteRange(blocks: block, count: UInt64(count))
      slot.length = Int(length)
      slot.holeCount = 0
      do {
        // Walk the chunk, reading runs of blocks that are not entirely holes.
        // Blocks outside the selection are passed over a run at a time: a
        // sparse selection costs its selected blocks, not every block.
        var runStart = -1
        var i = 0
        while i < count {
          if let selection {
            let here = block + UInt64(i)
            let end = block + UInt64(count)
            let next = selection.nextSet(from: here, before: end) ?? end
            if next > here {
              let skipped = Int(next - here)
              (slot.skipped.baseAddress! + i).update(repeating: true, count: skipped)
              (slot.holes.baseAddress! + i).update(repeating: false, count: skipped)
              if runStart >= 0 {
                try readRun(slot, start, from: runStart, to: i)
                runStart = -1
              }
              i += skipped
              continue
            }
          }
          slot.skipped[i] = false
          var hole = false
          if skipHoles {
            let offset = geometry.offset(ofBlock: block + UInt64(i))
            let blockEnd = offset + UInt64(geometry.length(ofBlock: block + UInt64(i)))
            if offset >= region.end { region = source.dataRegion(at: offset) }
            hole = !region.isData && blockEnd <= region.end
          }
          slot.holes[i] = hole
          if hole {
            slot.holeCount += 1
            if runStart >= 0 {
              try readRun(slot, start, from: runStart, to: i)
              runStart = -1
            }
          } else if runStart < 0 {
            runStart = i
          }
          i += 1
        }
        if runStart >= 0 { try readRun(slot, start, from: runStart, to: count) }
      } catch {
        slot.error = error
        filled.signal()
        return
      }
      block += UInt64(count)
      filled.signal()
    }
  }

  private func readRun(_ slot: Slot, _ chunkStart: UInt64, from: Int, to: Int) throws {
    let first = slot.firstBlock + UInt64(from)
    let (offset, length) = geometry.byteRange(blocks: first, count: UInt64(to - from))
    try source.read(
      into: slot.buffer.slice(Int(offset - chunkStart), Int(length)), at: offset)
  }

  /// The next chunk, or nil at the end. The chunk stays valid until the next
  /// call; read errors of the source are thrown here.
  public func next() throws -> Chunk? {
    if holding {
      free.signal()
      holding = false
    }
    let chunk = try nextRetained()
    holding = true
    return chunk
  }

  /// The next chunk, kept valid until `release()` is called for it; chunks
  /// are released in the order they were taken, possibly from another
  /// thread. At most `depth - 1` chunks may be held at once.
  public func nextRetained() throws -> Chunk? {
    if ended { return nil }
    filled.wait()
    let slot = slots[consumed % slots.count]
    consumed += 1
    if let error = slot.error { throw error }
    if slot.end {
      ended = true
      return nil
    }
    return Chunk(
      firstBlock: slot.firstBlock, blockCount: slot.blockCount, length: slot.length,
      bytes: UnsafeRawBufferPointer(start: slot.buffer.pointer, count: slot.length),
      isHole: UnsafeBufferPointer(start: slot.holes.baseAddress, count: slot.blockCount),
      holeCount: slot.holeCount,
      isSkipped: UnsafeBufferPointer(start: slot.skipped.baseAddress, count: slot.blockCount))
  }

  /// Gives back the oldest chunk taken with `nextRetained()`.
  public func release() {
    free.signal()
  }
}
