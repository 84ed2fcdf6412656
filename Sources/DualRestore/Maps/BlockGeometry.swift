// How a device is cut into blocks: a power-of-two block size from 512 B to
// 64 MiB and the device size in bytes. The last block may be partial.

public struct BlockGeometry: Hashable, Sendable, CustomStringConvertible {
  public static let minimumBlockSize: UInt32 = 512
  public static let maximumBlockSize: UInt32 = 64 << 20
  public static let defaultBlockSize: UInt32 = 64 << 10
  /// The largest device size: 4 EiB, so that no byte offset computation
  /// (block count times block size, plus a block) can overflow.
  public static let maximumDeviceSize: UInt64 = 1 << 62

  public let blockSize: UInt32
  public let deviceSize: UInt64

  public init(blockSize: UInt32, deviceSize: UInt64) throws {
    try BlockGeometry.validate(blockSize: UInt64(blockSize))
    guard deviceSize <= BlockGeometry.maximumDeviceSize else {
      throw ToolkitError("device size \(deviceSize) exceeds the largest supported, 4 EiB")
    }
    self.blockSize = blockSize
    self.deviceSize = deviceSize
  }

  /// Checks a block size the user gave.
  public static func validate(blockSize: UInt64) throws {
    guard blockSize >= UInt64(minimumBlockSize), blockSize <= UInt64(maximumBlockSize),
      blockSize.nonzeroBitCount == 1
    else {
      throw ToolkitError("block size \(blockSize) is not a power of two from 512 B to 64 MiB")
    }
  }

  /// The most blocks a map held in memory may cover: 2^34, a 2 GiB bitmap
  /// (1 PiB in 64 KiB blocks, 8 TiB in 512-byte ones).
  public static let maximumMappedBlocks: UInt64 = 1 << 34

  /// Throws unless a map of this geometry can be held in memory.
  public func checkMappable() throws {
    guard blockCount <= BlockGeometry.maximumMappedBlocks else {
      throw ToolkitError(
        "\(blockCount) blocks of \(blockSize) bytes are more than the 2^34 a map holds in memory; use a larger block size"
      )
    }
  }

  public var blockShift: UInt64 { UInt64(blockSize.trailingZeroBitCount) }

  /// Blocks covering the device, the last one possibly partial.
  public var blockCount: UInt64 {
    (deviceSize >> blockShift) + (deviceSize & UInt64(blockSize - 1) == 0 ? 0 : 1)
  }

  /// Byte offset of `block`.
  @inline(__always)
  public func offset(ofBlock block: UInt64) -> UInt64 { block << blockShift }

  /// Bytes in `block`: the block size, less for a partial last block.
  @inline(__always)
  public func length(ofBlock block: UInt64) -> Int {
    let start = block << blockShift
    return Int(min(UInt64(blockSize), deviceSize - start))
  }

  /// The byte range of `count` blocks from `first`, clipped to the device.
  public func byteRange(blocks first: UInt64, count: UInt64) -> (offset: UInt64, length: UInt64) {
    let start = first << blockShift
    let end = min((first + count) << blockShift, deviceSize)
    return (start, end - start)
  }

  /// The blocks a byte range covers exactly. Throws when the range does not
  /// start and end on block boundaries (the device end counts as one).
  public func blocks(offset: UInt64, length: UInt64) throws -> Range<UInt64> {
    let (end, overflow) = offset.addingReportingOverflow(length)
    guard !overflow, end <= deviceSize else {
      throw ToolkitError("range \(offset)+\(length) ends past the device end \(deviceSize)")
    }
    let mask = UInt64(blockSize) - 1
    guard offset & mask == 0 || offset == deviceSize else {
      throw ToolkitError("offset \(offset) is not a multiple of the block size \(blockSize)")
    }
    guard end & mask == 0 || end == deviceSize else {
      throw ToolkitError(
        "range end \(end) is not a multiple of the block size \(blockSize) nor the device end \(deviceSize)")
    }
    let first = offset == deviceSize ? blockCount : offset >> blockShift
    let last = length == 0 ? first : (end + mask) >> blockShift
    return first..<last
  }

  /// The blocks a byte range inside the device touches, whole or in part.
  public func blocks(touching offset: UInt64, length: UInt64) -> Range<UInt64> {
    let first = offset >> blockShift
    let last = (offset + length + UInt64(blockSize) - 1) >> blockShift
    return first..<max(first, last)
  }

  /// Throws unless `other` has the same block size and device size, naming
  /// both sides in the sentence.
  public func check(matches other: BlockGeometry, _ what: String, _ otherWhat: String) throws {
    if blockSize != other.blockSize {
      throw ToolkitError("\(what) has block size \(blockSize) but \(otherWhat) has block size \(other.blockSize)")
    }
    if deviceSize != other.deviceSize {
      throw ToolkitError("\(what) describes \(deviceSize) bytes but \(otherWhat) has \(other.deviceSize) bytes")
    }
  }

  public var description: String {
    "\(blockCount) blocks of \(formatBytes(UInt64(blockSize))) over \(deviceSize) bytes"
  }
}
