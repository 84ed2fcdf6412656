// Block-by-block comparison of two sources, or of a source and a signature,
// into a map of the blocks that differ.
//
// The result is a bitmap over B's geometry: bit i set means block i of B
// differs from A. With a size change allowed, a block of B with no
// counterpart in A (or only a shorter one) differs; blocks of A past B's end
// have no place in the map.
//
// A sparse signature holds the digests of the blocks its selection sets:
// compared with it, only those blocks are read, hashed and compared, and
// the blocks outside it are clear in the map. It compares only with a
// source or signature of its own size; two sparse signatures compare only
// over the same selection (two samples, when drawn with the same fraction
// and seed).

import Glibc

public struct ComparisonReport: Sendable {
  public var geometry: BlockGeometry
  public var differing: BlockBitmap
  public var bytesCompared: UInt64
  /// The signature's identity when one side was a signature.
  public var signature: SignatureFormat.Header?
  /// Whether A and B have different sizes (allowed with a size change).
  public var sizesDiffer: Bool

  /// The sources differ: some block of B differs, or A is longer or shorter.
  public var differ: Bool { sizesDiffer || differing.population > 0 }
}

public enum Comparison {
  public static let chunkBytes = 8 << 20

  /// Compares two sources.
  public static func compare(
    _ a: BlockDevice, _ b: BlockDevice, blockSize: UInt32, allowSizeChange: Bool, progress: Bool
  ) throws -> ComparisonReport {
    try checkSizes(a.name, a.size, b.name, b.size, allowSizeChange)
    let geometryA = try BlockGeometry(blockSize: blockSize, deviceSize: a.size)
    let geometryB = try BlockGeometry(blockSize: blockSize, deviceSize: b.size)
    try geometryB.checkMappable()
    var differing = BlockBitmap(count: geometryB.blockCount)
    let readerA = ChunkReader(source: a, geometry: geometryA, chunkBytes: chunkBytes)
    let readerB = ChunkReader(source: b, geometry: geometryB, chunkBytes: chunkBytes)
    defer {
      readerA.cancel()
      readerB.cancel()
    }
    let zeros = AlignedBuffer(count: Int(blockSize))
    zeros.buffer.initializeMemory(as: UInt8.self, repeating: 0)
    let meter = ProgressMeter(label: "comparing", total: b.size, enabled: progress)
    var aDone = false
    var compared: UInt64 = 0
    while let cb = try readerB.next() {
      let ca = aDone ? nil : try readerA.next()
      if ca == nil { aDone = true }
      for i in 0..<cb.blockCount {
        let block = cb.firstBlock + UInt64(i)
        let lengthB = geometryB.length(ofBlock: block)
        guard let ca, i < ca.blockCount else {
          differing[block] = true
          continue
        }
        let lengthA = geometryA.length(ofBlock: block)
        if lengthA != lengthB {
          differing[block] = true
          continue
        }
        let holeA = ca.isHole[i]
        let holeB = cb.isHole[i]
        if holeA && holeB { continue }
        let start = i * Int(blockSize)
        let pa = holeA ? UnsafeRawPointer(zeros.pointer) : ca.bytes.baseAddress! + start
        let pb = holeB ? UnsafeRawPointer(zeros.pointer) : cb.bytes.baseAddress! + start
        if memcmp(pa, pb, lengthB) != 0 { differing[block] = true }
      }
      compared += UInt64(cb.length)
      meter.update(compared)
    }
    meter.finish(compared)
    return ComparisonReport(
      geometry: geometryB, differing: differing, bytesCompared: compared, signature: nil, sizesDiffer: a.size != b.size)
  }

  /// Compares a source with a signature of the other side. `signatureIsA`
  /// says which argument the signature was, for the map's orientation.
  public static func compare(
    signature: SignatureReader, _ b: BlockDevice, signatureIsA: Bool, allowSizeChange: Bool, progress: Bool,
    workers: Int = BlockHasher.defaultWorkers
  ) throws -> ComparisonReport {
    let header = signature.header
    let sigGeometry = header.geometry
    let (nameA, sizeA, nameB, sizeB) =
      signatureIsA
      ? (signature.name, sigGeometry.deviceSize, b.name, b.size)
      : (b.name, b.size, signature.name, sigGeometry.deviceSize)
    try checkSizes(nameA, sizeA, nameB, sizeB, allowSizeChange)
    let algorithm = try DigestAlgorithm(named: header.digestName)
    guard algorithm.length == header.digestLength else {
      throw ToolkitError.path(
        signature.name, "digest \(header.digestName) has \(algorithm.length) bytes, not \(header.digestLength)")
    }
    if let selection = header.selection {
      try checkSparseSizes(signature.name, sigGeometry.deviceSize, b.name, b.size)
      return try compare(
        sparse: signature, selection: selection, b, algorithm: algorithm, progress: progress, workers: workers)
    }
    let sourceGeometry = try BlockGeometry(blockSize: sigGeometry.blockSize, deviceSize: b.size)
    let outGeometry = signatureIsA ? sourceGeometry : sigGeometry
    try outGeometry.checkMappable()
    var differing = BlockBitmap(count: outGeometry.blockCount)
    let reader = ChunkReader(source: b, geometry: sourceGeometry, chunkBytes: chunkBytes)
    defer { reader.cancel() }
    let hasher = BlockHasher(algorithm: algorithm, geometry: sourceGeometry, workers: workers)
    let length = header.digestLength
    let ours = AlignedBuffer(count: reader.blocksPerChunk * length)
    let theirs = AlignedBuffer(count: reader.blocksPerChunk * length)
    let meter = ProgressMeter(label: "hashing", total: b.size, enabled: progress)
    var compared: UInt64 = 0
    var sigRead: UInt64 = 0
    let sigBlocks = sigGeometry.blockCount
    let lastSigLength = sigBlocks == 0 ? 0 : sigGeometry.length(ofBlock: sigBlocks - 1)
    while let chunk = try reader.next() {
      hasher.hash(chunk, into: ours.pointer)
      let available = Int(min(UInt64(chunk.blockCount), sigBlocks > sigRead ? sigBlocks - sigRead : 0))
      if available > 0 { try signature.readDigests(count: available, into: theirs.pointer) }
      sigRead += UInt64(available)
      for i in 0..<chunk.blockCount {
        let block = chunk.firstBlock + UInt64(i)
        guard block < outGeometry.blockCount else { break }
        var same = i < available
        if same, block == sigBlocks - 1,
          lastSigLength != sourceGeometry.length(ofBlock: block)
        {
          same = false
        }
        if same {
          same = memcmp(ours.pointer + i * length, theirs.pointer + i * length, length) == 0
        }
        if !same { differing[block] = true }
      }
      compared += UInt64(chunk.length)
      meter.update(compared)
    }
    // Blocks of the signature past the source's end differ when the map is over the signature's side.
    if !signatureIsA, sigBlocks > sourceGeometry.blockCount {
      differing.set(sourceGeometry.blockCount..<sigBlocks)
    }
    try signature.finish()
    meter.finish(compared)
    return ComparisonReport(
      geometry: outGeometry, differing: differing, bytesCompared: compared, signature: header,
      sizesDiffer: sizeA != sizeB)
  }

  /// Compares a source with a sparse signature of the same size: reads and
  /// hashes only the selected blocks of `b`.
  private static func compare(
    sparse signature: SignatureReader, selection: BlockBitmap, _ b: BlockDevice, algorithm: DigestAlgorithm,
    progress: Bool, workers: Int
  ) throws -> ComparisonReport {
    let geometry = signature.header.geometry
    try geometry.checkMappable()
    var differing = BlockBitmap(count: geometry.blockCount)
    let reader = ChunkReader(source: b, geometry: geometry, chunkBytes: chunkBytes, selection: selection)
    defer { reader.cancel() }
    let hasher = BlockHasher(algorithm: algorithm, geometry: geometry, workers: workers)
    let length = algorithm.length
    let ours = AlignedBuffer(count: reader.blocksPerChunk * length)
    let theirs = SignedBlocks(signature, batch: reader.blocksPerChunk)
    let meter = ProgressMeter(
      label: "hashing", total: Signer.selectedBytes(selection, geometry), enabled: progress)
    var compared: UInt64 = 0
    while let chunk = try reader.next() {
      if !chunk.isSkipped.contains(false) { continue }
      hasher.hash(chunk, into: ours.pointer)
      for i in 0..<chunk.blockCount where !chunk.isSkipped[i] {
        let block = chunk.firstBlock + UInt64(i)
        if memcmp(ours.pointer + i * length, try theirs.digest(of: block), length) != 0 { differing[block] = true }
        compared += UInt64(geometry.length(ofBlock: block))
      }
      meter.update(compared)
    }
    try signature.finish()
    meter.finish(compared)
    return ComparisonReport(
      geometry: geometry, differing: differing, bytesCompared: compared, signature: signature.header,
      sizesDiffer: false)
  }

  /// Compares two signatures; no data is read.
  public static func compare(_ a: SignatureReader, _ b: SignatureReader, allowSizeChange: Bool) throws
    -> ComparisonReport
  {
    let ha = a.header
    let hb = b.header
    try checkSizes(a.name, ha.geometry.deviceSize, b.name, hb.geometry.deviceSize, allowSizeChange)
    guard ha.geometry.blockSize == hb.geometry.blockSize else {
      throw ToolkitError(
        "\(a.name) has block size \(ha.geometry.blockSize) but \(b.name) has block size \(hb.geometry.blockSize)")
    }
    guard ha.digestName == hb.digestName, ha.digestLength == hb.digestLength else {
      throw ToolkitError("\(a.name) uses digest \(ha.digestName) but \(b.name) uses \(hb.digestName)")
    }
    if let selection = ha.selection ?? hb.selection {
      try checkSparseSizes(
        ha.isSparse ? a.name : b.name, ha.geometry.deviceSize, ha.isSparse ? b.name : a.name,
        hb.geometry.deviceSize)
      if let sa = ha.selection, let sb = hb.selection, sa != sb {
        if let pa = ha.sample, let pb = hb.sample, pa != pb {
          throw ToolkitError(
            "\(a.name) samples \(pa) but \(b.name) samples \(pb); sampled signatures compare only when drawn with the same fraction and seed"
          )
        }
        throw ToolkitError(
          "\(a.name) and \(b.name) are sparse signatures of different selections; they compare only over the same one")
      }
      return try compare(sparse: a, b, selection: selection)
    }
    let length = ha.digestLength
    let blocksA = ha.geometry.blockCount
    let blocksB = hb.geometry.blockCount
    try hb.geometry.checkMappable()
    var differing = BlockBitmap(count: blocksB)
    let batch = 4096
    let da = AlignedBuffer(count: batch * length)
    let db = AlignedBuffer(count: batch * length)
    var block: UInt64 = 0
    while block < blocksB {
      let n = Int(min(UInt64(batch), blocksB - block))
      try b.readDigests(count: n, into: db.pointer)
      let inA = Int(min(UInt64(n), blocksA > block ? blocksA - block : 0))
      if inA > 0 { try a.readDigests(count: inA, into: da.pointer) }
      for i in 0..<n {
        let index = block + UInt64(i)
        var same = i < inA && memcmp(da.pointer + i * length, db.pointer + i * length, length) == 0
        if same, index == blocksA - 1 || index == blocksB - 1 {
          same = ha.geometry.length(ofBlock: index) == hb.geometry.length(ofBlock: index)
        }
        if !same { differing[index] = true }
      }
      block += UInt64(n)
    }
    try a.finish()
    try b.finish()
    return ComparisonReport(
      geometry: hb.geometry, differing: differing, bytesCompared: 0, signature: ha,
      sizesDiffer: ha.geometry.deviceSize != hb.geometry.deviceSize)
  }

  /// Compares two signatures of the same size, one of them or both sparse
  /// (then of the same selection), over the selection.
  private static func compare(sparse a: SignatureReader, _ b: SignatureReader, selection: BlockBitmap) throws
    -> ComparisonReport
  {
    let geometry = b.header.geometry
    try geometry.checkMappable()
    let length = a.header.digestLength
    var differing = BlockBitmap(count: geometry.blockCount)
    let da = SignedBlocks(a, batch: 4096)
    let db = SignedBlocks(b, batch: 4096)
    for run in selection.extents {
      for block in run where memcmp(try da.digest(of: block), try db.digest(of: block), length) != 0 {
        differing[block] = true
      }
    }
    try a.finish()
    try b.finish()
    return ComparisonReport(
      geometry: geometry, differing: differing, bytesCompared: 0, signature: a.header, sizesDiffer: false)
  }

  /// A sparse signature's selection is of its own blocks: it compares only
  /// with a side of the same size, whatever --allow-size-change says.
  static func checkSparseSizes(_ sparseName: String, _ sparseSize: UInt64, _ otherName: String, _ otherSize: UInt64)
    throws
  {
    if sparseSize != otherSize {
      throw ToolkitError(
        "\(sparseName) is a sparse signature of \(sparseSize) bytes and compares only with a source of that size, not \(otherName) of \(otherSize) bytes"
      )
    }
  }

  static func checkSizes(_ nameA: String, _ sizeA: UInt64, _ nameB: String, _ sizeB: UInt64, _ allow: Bool) throws {
    if sizeA != sizeB && !allow {
      throw ToolkitError(
        "\(nameA) has \(sizeA) bytes but \(nameB) has \(sizeB) bytes (use --allow-size-change to compare anyway)")
    }
  }
}

/// The digests of a signature's signed blocks, read a batch at a time and
/// asked for in increasing block order; blocks the caller does not ask for
/// are passed over.
final class SignedBlocks {
  private let reader: SignatureReader
  private let length: Int
  private let capacity: Int
  private let blocks: UnsafeMutablePointer<UInt64>
  private let digests: AlignedBuffer
  private var count = 0
  private var index = 0

  init(_ reader: SignatureReader, batch: Int) {
    self.reader = reader
    length = reader.header.digestLength
    capacity = max(1, batch)
    blocks = .allocate(capacity: capacity)
    digests = AlignedBuffer(count: capacity * length)
  }

  deinit { blocks.deallocate() }

  /// The digest of `block`, valid until the next call; throws when the
  /// signature holds none (its selection leaves the block out).
  func digest(of block: UInt64) throws -> UnsafeRawPointer {
    while true {
      while index < count {
        let at = blocks[index]
        if at == block { return UnsafeRawPointer(digests.pointer + index * length) }
        if at > block { throw ToolkitError.path(reader.name, "holds no digest of block \(block)") }
        index += 1
      }
      count = try reader.readEntries(max: capacity, blocks: blocks, digests: digests.pointer)
      index = 0
      if count == 0 { throw ToolkitError.path(reader.name, "holds no digest of block \(block)") }
    }
  }
}
