// Rebuilding from an older local copy (restore-read-through --reuse OLD
// --backup-signature SIG): a block not yet current whose content an older
// copy at the restore site already holds is copied from there, checked,
// instead of fetched over the far link.
//
// What it knows:
// - The backup's digests, from SIG: the first 16 bytes (128 bits) of each
//   block's digest, in one allocation of 16 bytes a block, with two bits a
//   block beside it (signed, forgotten). SIG is read in the background and
//   trusted only once its closing checksum has matched; until then every
//   miss is fetched.
// - Each OLD's own digests: OLD is hashed in the background into a
//   signature beside the map (MAP.reuse-N.sig, removed once read back), and
//   indexed (SignatureIndex: 16 bytes per block of OLD that is not zeros).
//   Until OLD's index is ready, only OLD's block at the same offset is
//   tried; once it is, the index says where OLD holds the content, and an
//   OLD block it does not name is not read.
//
// Invariants:
// - Nothing unchecked: a block is taken from OLD only when the digest of
//   exactly the bytes read (over the block's real length) begins with the
//   backup's 128 bits for that block; those same bytes are what is written.
//   A damaged or changed OLD costs a fetch, never a wrong block.
// - The precondition is the caller's: at every block not current, the
//   backup holds what SIG says. The writes the restore itself sends to the
//   backup make their blocks current, except where the primary failed to
//   take one: those blocks are forgotten here, and never reused again.
// - A block whose backup digest is the digest of zeros (over its length)
//   needs no read: the caller writes zeros.

import Glibc
import Synchronization

// @unchecked Sendable: `expected` is written by the loader only before the
// signature is published (under `state`'s lock), and only read after;
// everything else that changes is behind `state` or atomic.
public final class LocalReuse: @unchecked Sendable {
  /// Where a block's content was found.
  public enum Found: Sendable {
    /// SIG gives the digest of zeros: nothing to read.
    case zeros
    /// In an older copy, at the block's own offset.
    case samePlace
    /// In an older copy, at another block (its index said where).
    case elsewhere
  }

  /// Bytes of each block's digest held and compared.
  public static let prefixLength = 16
  /// Candidates an index names that are read for one block, at most.
  static let triesPerBlock = 4

  public let signatureName: String
  public let geometry: BlockGeometry
  public let images: [BlockDevice]
  let algorithm: DigestAlgorithm
  /// Where OLD's signatures are written while they are made.
  let scratchPrefix: String
  private let log: @Sendable (String) -> Void
  /// The backup's digest prefixes, `prefixLength` bytes a block.
  private let expected: UnsafeMutableRawPointer
  private let zeroFull: [UInt8]
  private let zeroLast: [UInt8]
  private let signature: Unchecked<SignatureReader>

  private struct State {
    /// SIG read whole and its checksum matched.
    var ready = false
    /// Blocks whose digest SIG gives and that were not forgotten since.
    var usable: BlockBitmap
    /// Blocks whose content on the backup may differ from SIG's.
    var forgotten: BlockBitmap
    /// Per older copy: its index, once hashed.
    var indexes: [SignatureIndex?]
    /// Per older copy: a read failed, so it is no longer read.
    var failed: [Bool]
    /// SIG's reading, and each older copy's hashing, ended (or failed).
    var signatureSettled = false
    var indexSettled: [Bool]
  }
  private let state: Locked<State>
  private let digesters = Locked<[Digester]>([])
  private let stopping = AtomicFlag()
  private let mismatchCount = Atomic<UInt64>(0)

  /// Takes `signature` (its header read, its digests not yet) as the
  /// backup's, and `images` as the older copies, read only. Refuses a
  /// signature whose digests are too short to name content.
  public init(
    signature: SignatureReader, images: [BlockDevice], scratchPrefix: String,
    log: @escaping @Sendable (String) -> Void
  ) throws {
    let header = signature.header
    guard header.digestLength >= SignatureIndex.minimumDigestLength else {
      throw ToolkitError(
        "\(signature.name) has \(header.digestLength)-byte digests; taking a block from an older copy needs at "
          + "least \(SignatureIndex.minimumDigestLength) (sha256 gives 32)")
    }
    guard !images.isEmpty, images.count <= SignatureIndex.maximumImages else {
      throw ToolkitError("\(images.count) older copies are given; 1 to \(SignatureIndex.maximumImages) can be used")
    }
    algorithm = try DigestAlgorithm(named: header.digestName)
    guard algorithm.length == header.digestLength else {
      throw ToolkitError(
        "\(signature.name) says digest \(header.digestName) is \(header.digestLength) bytes, but it is \(algorithm.length)"
      )
    }
    signatureName = signature.name
    geometry = header.geometry
    self.images = images
    self.scratchPrefix = scratchPrefix
    self.log = log
    self.signature = Unchecked(signature)
    let count = geometry.blockCount
    guard count <= UInt64(Int.max / LocalReuse.prefixLength) else {
      throw ToolkitError("\(signature.name) signs \(count) blocks, too many to hold")
    }
    expected = .allocate(byteCount: max(1, Int(count) * LocalReuse.prefixLength), alignment: 16)
    zeroFull = Array(
      SignatureIndex.zeroDigest(algorithm, length: Int(geometry.blockSize)).prefix(LocalReuse.prefixLength))
    zeroLast = Array(
      SignatureIndex.zeroDigest(algorithm, length: geometry.length(ofBlock: max(count, 1) - 1))
        .prefix(LocalReuse.prefixLength))
    state = Locked(
      State(
        usable: BlockBitmap(count: count), forgotten: BlockBitmap(count: count),
        indexes: [SignatureIndex?](repeating: nil, count: images.count),
        failed: [Bool](repeating: false, count: images.count),
        indexSettled: [Bool](repeating: false, count: images.count)))
  }

  deinit { expected.deallocate() }

  /// Bytes held for the backup's digests: 16 a block, and two bits.
  public var memoryBytes: UInt64 { geometry.blockCount * UInt64(LocalReuse.prefixLength) + geometry.blockCount / 4 }

  /// Refuses a signature that does not describe the restore's blocks.
  func check(blockSize: UInt32, mapName: String, backup: BlockDevice) throws {
    if geometry.blockSize != blockSize {
      throw ToolkitError(
        "the backup's signature \(signatureName) was made with block size \(geometry.blockSize), but the map "
          + "\(mapName) has block size \(blockSize)")
    }
    if geometry.deviceSize != backup.size {
      throw ToolkitError(
        "the backup's signature \(signatureName) describes \(geometry.deviceSize) bytes, but the backup "
          + "\(backup.name) has \(backup.size)")
    }
  }

  /// Reads SIG and hashes each older copy, each on a thread of its own.
  func start() {
    startThread { [self] in loadSignature() }
    for i in images.indices { startThread { [self] in index(i) } }
  }

  /// Stops the background work without waiting for it (a signature read
  /// from a pipe may never end) and ends the older copies' connections:
  /// hashing ends at its next read. Call it once nothing else reads them.
  func stop() {
    guard stopping.setOnce() else { return }
    for image in images { image.close() }
  }

  /// Whether SIG has been read whole and checked.
  public var isReady: Bool { state.withLock { $0.ready } }

  /// Whether SIG's reading and every older copy's hashing have ended,
  /// whether or not they succeeded: from then on nothing more will be known.
  public var isSettled: Bool { state.withLock { $0.signatureSettled && !$0.indexSettled.contains(false) } }

  /// Reads from older copies that an index named but whose digest did not
  /// match (changed or damaged since hashed): fetched instead.
  public var mismatches: UInt64 { mismatchCount.load(ordering: .relaxed) }

  /// Blocks whose backup content may no longer be SIG's: never reused.
  func forget(_ blocks: Range<UInt64>) {
    guard !blocks.isEmpty else { return }
    state.withLock { s in
      s.forgotten.set(blocks)
      s.usable.clear(blocks)
    }
  }

  // MARK: Finding a block

  /// Fills `out` (block `b`'s real length) with its content from an older
  /// copy, checked against SIG; or says it is zeros. Nil when no older copy
  /// is known to hold it (or SIG is not read yet): fetch it.
  func find(_ b: UInt64, into out: UnsafeMutableRawBufferPointer) -> Found? {
    guard let (indexes, failed) = state.withLock({ s in s.ready && s.usable[b] ? (s.indexes, s.failed) : nil })
    else { return nil }
    let want = UnsafeRawPointer(expected + Int(b) * LocalReuse.prefixLength)
    let n = out.count
    let zero = n == Int(geometry.blockSize) ? zeroFull : zeroLast
    if memcmp(want, zero, LocalReuse.prefixLength) == 0 { return .zeros }
    let offset = geometry.offset(ofBlock: b)
    let digester = takeDigester()
    defer { giveBack(digester) }
    // The same place first, in each older copy whose index (when ready)
    // says the content is there.
    for (i, image) in images.enumerated() where !failed[i] && offset + UInt64(n) <= image.size {
      if let index = indexes[i] {
        guard Self.names(index, index.candidates(want), block: b) else { continue }
        if check(i, at: offset, into: out, want, digester) { return .samePlace }
        mismatchCount.add(1, ordering: .relaxed)
      } else if check(i, at: offset, into: out, want, digester) {
        return .samePlace
      }
    }
    // Elsewhere, where an index says.
    for (i, image) in images.enumerated() where !failed[i] {
      guard let index = indexes[i] else { continue }
      var tries = 0
      for p in index.candidates(want) where tries < Self.triesPerBlock {
        let at = index.location(at: p).block
        guard at != b, geometry.offset(ofBlock: at) + UInt64(n) <= image.size else { continue }
        tries += 1
        if check(i, at: geometry.offset(ofBlock: at), into: out, want, digester) { return .elsewhere }
        mismatchCount.add(1, ordering: .relaxed)
      }
    }
    return nil
  }

  /// Whether the candidates `range` of `index` (sorted by block within one
  /// content) include `block`: a binary search.
  private static func names(_ index: SignatureIndex, _ range: Range<Int>, block: UInt64) -> Bool {
    var lo = range.lowerBound
    var hi = range.upperBound
    while lo < hi {
      let mid = (lo + hi) >> 1
      if index.location(at: mid).block < block { lo = mid + 1 } else { hi = mid }
    }
    return lo < range.upperBound && index.location(at: lo).block == block
  }

  /// Reads `out.count` bytes of older copy `i` at `offset` into `out` and
  /// says whether their digest begins with `want`. A failed read retires
  /// the copy (each later try would cost a timeout).
  private func check(
    _ i: Int, at offset: UInt64, into out: UnsafeMutableRawBufferPointer, _ want: UnsafeRawPointer,
    _ digester: Digester
  ) -> Bool {
    do {
      try images[i].read(into: out, at: offset)
    } catch {
      let first = state.withLock { s -> Bool in
        defer { s.failed[i] = true }
        return !s.failed[i]
      }
      if first && !stopping.isSet {
        log("reading the older copy \(images[i].name) failed (\(error)): it is not read again; its blocks are fetched")
      }
      return false
    }
    return withUnsafeTemporaryAllocation(byteCount: 64, alignment: 16) { digest in
      guard let d = digest.baseAddress else { return false }
      digester.digest(UnsafeRawBufferPointer(out), into: d)
      return memcmp(d, want, LocalReuse.prefixLength) == 0
    }
  }

  private func takeDigester() -> Digester {
    digesters.withLock { $0.popLast() } ?? Digester(algorithm)
  }

  private func giveBack(_ d: Digester) {
    digesters.withLock { if $0.count < 64 { $0.append(d) } }
  }

  // MARK: The background work

  /// Reads SIG's digests into `expected`; publishes them once its closing
  /// checksum has matched.
  private func loadSignature() {
    defer { state.withLock { $0.signatureSettled = true } }
    let reader = signature.value
    let started = monotonicSeconds()
    var signed = BlockBitmap(count: geometry.blockCount)
    let length = algorithm.length
    let batch = 4096
    let blocks = UnsafeMutablePointer<UInt64>.allocate(capacity: batch)
    let digests = UnsafeMutableRawPointer.allocate(byteCount: batch * length, alignment: 16)
    defer {
      blocks.deallocate()
      digests.deallocate()
    }
    do {
      while !stopping.isSet {
        let n = try reader.readEntries(max: batch, blocks: blocks, digests: digests)
        if n == 0 { break }
        for k in 0..<n {
          let b = blocks[k]
          guard b < geometry.blockCount else {
            throw ToolkitError.path(
              reader.name, "gives a digest for block \(b), past its \(geometry.blockCount) blocks")
          }
          (expected + Int(b) * LocalReuse.prefixLength).copyMemory(
            from: digests + k * length, byteCount: LocalReuse.prefixLength)
          signed[b] = true
        }
      }
      if stopping.isSet { return }
      try reader.finish()
    } catch {
      if !stopping.isSet {
        log(
          "the backup's signature \(signatureName) cannot be used (\(error)): every block not current is fetched "
            + "from the backup")
      }
      return
    }
    let known = signed.population
    state.withLock { s in
      s.usable = signed.subtracting(s.forgotten)
      s.ready = true
    }
    let seconds = monotonicSeconds() - started
    log(
      "the backup's signature \(signatureName) is read (\(known) of \(geometry.blockCount) blocks signed, "
        + "\(formatBytes(memoryBytes)) held, \(formatFixed(seconds, digits: 1)) s): a block missed is now taken from "
        + "the older copies where its digest matches")
  }

  /// Hashes older copy `i` into a signature beside the map and indexes it.
  private func index(_ i: Int) {
    defer { state.withLock { $0.indexSettled[i] = true } }
    let image = images[i]
    let path = "\(scratchPrefix).reuse-\(i).sig"
    let started = monotonicSeconds()
    do {
      let source = StoppableSource(image, stopping)
      _ = try Signer.sign(
        source, algorithm: algorithm, blockSize: geometry.blockSize, to: .file(path), progress: false,
        workers: max(1, BlockHasher.defaultWorkers / 2))
      let reader = try SignatureReader(path: path)
      unlink(path)
      let index = try SignatureIndex(signatures: [reader], blockSize: geometry.blockSize)
      guard !stopping.isSet else { return }
      state.withLock { $0.indexes[i] = index }
      log(
        "hashed the older copy \(image.name) in \(formatFixed(monotonicSeconds() - started, digits: 1)) s: "
          + "\(index.count) block(s) indexed (\(formatBytes(UInt64(index.memoryBytes)))); a block it holds "
          + "elsewhere is now copied from there too")
    } catch {
      unlink(path)
      if !stopping.isSet {
        log("hashing the older copy \(image.name) failed (\(error)): only its block at the same offset is tried")
      }
    }
  }
}

/// An older copy as hashing reads it: reads fail once the restore stops,
/// so that hashing ends with it.
private final class StoppableSource: BlockDevice, Sendable {
  let device: BlockDevice
  let stopping: AtomicFlag

  init(_ device: BlockDevice, _ stopping: AtomicFlag) {
    self.device = device
    self.stopping = stopping
  }

  var name: String { device.name }
  var size: UInt64 { device.size }
  var maximumRequest: Int { device.maximumRequest }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    if stopping.isSet { throw ToolkitError("\(name): the restore is stopping") }
    try device.read(into: buffer, at: offset)
  }

  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { device.dataRegion(at: offset) }

  func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    try device.allocation(from: offset, length: length)
  }
}

extension RestoreEngine {
  /// What the older copies gave so far, for the log; nil without them.
  public var reuseSummary: String? {
    guard let reuse else { return nil }
    let c = counters
    let mismatches = reuse.mismatches
    return
      "reused \(c.reusedSamePlaceBlocks) block(s) from older copies at the same place, \(c.reusedElsewhereBlocks) "
      + "elsewhere, \(c.reusedZeroBlocks) as zeros by the backup's signature (\(formatBytes(c.reusedBytes)) not "
      + "fetched)"
      + (mismatches > 0 ? "; \(mismatches) read from them did not match and were fetched instead" : "")
  }
}
