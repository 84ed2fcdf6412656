// A map at another block size over the same device. To finer blocks every
// fine block of a set coarse block is set; to coarser blocks a coarse block
// is set when any fine block in it is. A map of current blocks is never
// coarsened: a coarse current bit would claim fine blocks that are not
// current, and a merge would then skip them, older data standing.

extension BlockMap {
  /// This map with blocks of `blockSize` bytes: the same device, meaning,
  /// device name, tracking start and last merged stream, and a new map id.
  public func rescaled(to blockSize: UInt32, name: String) throws -> BlockMap {
    let target = try BlockGeometry(blockSize: blockSize, deviceSize: geometry.deviceSize)
    if blockSize > geometry.blockSize && meaning == .current {
      throw ToolkitError(
        "\(name) is a map of current blocks, and a coarse block set as current would hold back the fine blocks in it that are not current; rescale it to \(geometry.blockSize) bytes or less"
      )
    }
    do { try target.checkMappable() } catch let error as ToolkitError { throw ToolkitError.path(name, error.message) }
    var bits = BlockBitmap(count: target.blockCount)
    let from = geometry.blockShift
    let to = target.blockShift
    for run in self.bits.extents {
      if to <= from {
        let k = from - to
        bits.set((run.lowerBound << k)..<min(run.upperBound << k, target.blockCount))
      } else {
        // ceil(blocks / 2^k) of the same device is the coarse block count.
        let k = to - from
        bits.set((run.lowerBound >> k)..<((run.upperBound + (1 << k) - 1) >> k))
      }
    }
    return BlockMap(
      geometry: target, meaning: meaning, deviceName: deviceName, mapID: .random(),
      trackingStarted: trackingStarted, lastMergedStream: lastMergedStream, trackingEnded: trackingEnded,
      mergedAsOf: mergedAsOf, mergedAsOfGeneration: mergedAsOfGeneration, bits: bits)
  }
}
