// Finds the content a REFERENCE record names where the receiver holds it,
// and checks it, before anything is written from it.
//
// Where it looks for a run: first the place that served the image's last
// run (one read for the whole run); then, for each block not found there,
// the blocks kept from before the merge overwrote them, and the target and
// each --reuse image at that block, in order.
//
// Invariants:
// - Nothing unchecked: a block is handed back only when its digest, over
//   exactly its length, equals the one the record gives; otherwise the
//   merge stops with a sentence naming the block and where it was sought.
// - In place (the target is one of the places): before the merge overwrites
//   target blocks, their old contents are read and kept, up to `keepBytes`
//   (the oldest dropped first), so that a later reference to them (a copy
//   shifted forward) still finds them. Past that bound the content must
//   come from a --reuse image, or the merge stops, with the target's blocks
//   not yet replaced intact.
// - Memory is fixed at start: the kept blocks' buffer and index, one run.

import Glibc

final class ReferenceResolver {
  struct Place {
    let device: any BlockDevice
    let isTarget: Bool
  }

  let places: [Place]
  let sources: StreamFormat.Sources
  let geometry: BlockGeometry
  private let digester: Digester
  private let digestLength: Int
  private let computed: UnsafeMutableRawPointer
  /// Per image: the place that served its last run.
  private var preferred: [Int]
  /// Per block of the run being resolved: found yet.
  private let found: UnsafeMutableBufferPointer<Bool>
  /// Blocks kept from before the merge overwrote them: a ring of slots.
  private let keptSlots: Int
  private let kept: AlignedBuffer?
  private var keptAt: [UInt64: Int] = [:]
  private var keptBlock: [UInt64]
  private var nextSlot = 0

  /// Blocks found where they already were (the target, at their own block).
  private(set) var alreadyInPlace: UInt64 = 0
  /// Blocks found in each place, by place.
  private(set) var foundIn: [UInt64]
  private(set) var foundKept: UInt64 = 0

  /// `keepBytes` > 0 keeps the old contents of the target's overwritten blocks.
  init(
    sources: StreamFormat.Sources, geometry: BlockGeometry, target: (any BlockDevice)?, reuse: [any BlockDevice],
    keepBytes: Int
  ) throws {
    let algorithm = try DigestAlgorithm(named: sources.digestName)
    guard algorithm.length == sources.digestLength else {
      throw ToolkitError(
        "the stream names content by \(sources.digestName) in \(sources.digestLength) bytes, but that digest has \(algorithm.length)"
      )
    }
    self.sources = sources
    self.geometry = geometry
    digester = Digester(algorithm)
    digestLength = algorithm.length
    computed = .allocate(byteCount: 64, alignment: 16)
    var places: [Place] = []
    if let target { places.append(Place(device: target, isTarget: true)) }
    places += reuse.map { Place(device: $0, isTarget: false) }
    self.places = places
    preferred = [Int](repeating: 0, count: sources.images.count)
    foundIn = [UInt64](repeating: 0, count: places.count)
    let run = StreamFormat.maximumReferenceRun(blockSize: geometry.blockSize)
    found = .allocate(capacity: run)
    found.initialize(repeating: false)
    let keeps = target != nil && keepBytes > 0
    keptSlots = keeps ? max(1, keepBytes / Int(geometry.blockSize)) : 0
    kept = keeps ? AlignedBuffer(count: keptSlots * Int(geometry.blockSize)) : nil
    keptBlock = [UInt64](repeating: .max, count: keptSlots)
    keptAt.reserveCapacity(keptSlots)
  }

  deinit {
    computed.deallocate()
    found.deallocate()
  }

  /// Whether `length` bytes at `at` have the digest at `expected`.
  @inline(__always)
  private func matches(_ at: UnsafeRawPointer, length: Int, _ expected: UnsafeRawPointer) -> Bool {
    digester.digest(UnsafeRawBufferPointer(start: at, count: length), into: computed)
    return memcmp(computed, expected, digestLength) == 0
  }

  /// Reads into `out` (room for the run's blocks, block i at i × block size)
  /// the content of every block of `r` that `needed(i)` asks for, each
  /// checked; `inPlace[i]` says the target already holds block i's content
  /// at block i, so it need not be written.
  func resolve(
    _ r: StreamFormat.Reference, into out: UnsafeMutableRawPointer, inPlace: UnsafeMutableBufferPointer<Bool>,
    needed: (Int) -> Bool
  ) throws {
    let blockSize = Int(geometry.blockSize)
    let image = sources.images[r.image].geometry
    let (sourceOffset, runBytes) = image.byteRange(blocks: r.sourceFirst, count: UInt64(r.count))
    var wanted = 0
    for i in 0..<r.count {
      found[i] = !needed(i)
      inPlace[i] = false
      if !found[i] { wanted += 1 }
    }
    guard wanted > 0 else { return }
    func digest(_ i: Int) -> UnsafeRawPointer { r.digests.baseAddress! + i * digestLength }
    func length(_ i: Int) -> Int { geometry.length(ofBlock: r.first + UInt64(i)) }

    // The whole run from where the image's last run was found.
    let first = preferred[r.image]
    if first < places.count, sourceOffset + runBytes <= places[first].device.size,
      (try? places[first].device.read(
        into: UnsafeMutableRawBufferPointer(start: out, count: Int(runBytes)), at: sourceOffset)) != nil
    {
      for i in 0..<r.count where !found[i] && matches(out + i * blockSize, length: length(i), digest(i)) {
        found[i] = true
        wanted -= 1
        foundIn[first] += 1
        if places[first].isTarget && r.sourceFirst == r.first {
          inPlace[i] = true
          alreadyInPlace += 1
        }
      }
    }
    guard wanted > 0 else { return }
    for i in 0..<r.count where !found[i] {
      let block = r.sourceFirst + UInt64(i)
      let at = out + i * blockSize
      let n = length(i)
      if let kept, let slot = keptAt[block] {
        at.copyMemory(from: kept.pointer + slot * blockSize, byteCount: n)
        if matches(at, length: n, digest(i)) {
          found[i] = true
          foundKept += 1
          continue
        }
      }
      let offset = image.offset(ofBlock: block)
      for (p, place) in places.enumerated() where offset + UInt64(n) <= place.device.size {
        guard (try? place.device.read(into: UnsafeMutableRawBufferPointer(start: at, count: n), at: offset)) != nil
        else { continue }
        if matches(at, length: n, digest(i)) {
          found[i] = true
          foundIn[p] += 1
          preferred[r.image] = p
          if place.isTarget && block == r.first + UInt64(i) {
            inPlace[i] = true
            alreadyInPlace += 1
          }
          break
        }
      }
      guard found[i] else {
        var names = places.map { $0.isTarget ? "the target" : $0.device.name }
        if kept != nil { names.append("the blocks kept from before the merge overwrote them") }
        let sought =
          names.isEmpty
          ? "there is no image to take it from (give it with --reuse)"
          : names.count == 1
            ? "\(names[0]) does not hold that content there (digest mismatch)"
            : "neither " + names.joined(separator: " nor ") + " holds that content there (digest mismatch)"
        throw ToolkitError(
          "block \(r.first + UInt64(i)) refers to the content of block \(block) of \(sources.describe(r.image)), but "
            + sought + "; nothing of its run was written")
      }
    }
  }

  /// Before the merge overwrites target blocks `first..<first+count`: keeps
  /// their old contents (the last ones, as many as fit), in place only.
  func willOverwrite(first: UInt64, count: UInt64) throws {
    guard let kept, let target = places.first, target.isTarget, count > 0 else { return }
    let blockSize = Int(geometry.blockSize)
    let take = min(count, UInt64(keptSlots))
    var block = first + count - take
    while block < first + count {
      // Contiguous slots up to the ring's end, in one read.
      let n = Int(min(first + count - block, UInt64(keptSlots - nextSlot)))
      let (offset, length) = geometry.byteRange(blocks: block, count: UInt64(n))
      try target.device.read(
        into: UnsafeMutableRawBufferPointer(start: kept.pointer + nextSlot * blockSize, count: Int(length)),
        at: offset)
      for k in 0..<n {
        let slot = nextSlot + k
        if keptBlock[slot] != .max { keptAt.removeValue(forKey: keptBlock[slot]) }
        keptBlock[slot] = block + UInt64(k)
        keptAt[block + UInt64(k)] = slot
      }
      block += UInt64(n)
      nextSlot = (nextSlot + n) % keptSlots
    }
  }
}
