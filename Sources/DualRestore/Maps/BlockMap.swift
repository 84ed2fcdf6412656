// A map as the tools exchange it: a bitmap over a device plus what it
// describes (which device, which tracking session, since when, what was last
// merged) and what its bits mean. The on-disk form is in Formats/MapFormat.swift.

/// What a set bit means.
public enum MapMeaning: UInt8, Sendable, CaseIterable, CustomStringConvertible {
  /// The block holds current data: written or restored since tracking started.
  /// This is the overwrite map; a merge never replaces such a block.
  case current = 1
  /// The block differs between two sources (bitmap-diff's output).
  case differs = 2
  /// The block was written since tracking started (a change map).
  case changed = 3
  /// The block is selected (an imported or hand-made selection).
  case selected = 4

  public var description: String {
    switch self {
    case .current: return "current"
    case .differs: return "differs"
    case .changed: return "changed"
    case .selected: return "selected"
    }
  }

  public init?(name: String) {
    guard let m = MapMeaning.allCases.first(where: { $0.description == name }) else { return nil }
    self = m
  }
}

public struct BlockMap: Equatable, Sendable {
  public var geometry: BlockGeometry
  public var meaning: MapMeaning
  /// The device the map describes, for people: a path or URI.
  public var deviceName: String
  /// Identifies this map (this tracking session); kept across updates.
  public var mapID: ID128
  /// When tracking started; blocks written before it are not in the map.
  public var trackingStarted: Instant
  /// The id of the last block stream merged into the device, or `.none`.
  public var lastMergedStream: ID128
  /// A change map saved at its generation's end: the instant it ended,
  /// which is the next generation's start (`.unset`: still running).
  public var trackingEnded: Instant
  /// The instant the device's contents were cut at, as the last merged
  /// stream's GENERATION record says (`.unset`: unknown). An incremental
  /// stream whose changes start later left a generation out.
  public var mergedAsOf: Instant
  /// The generation (change map id) that ended at `mergedAsOf`, or `.none`.
  public var mergedAsOfGeneration: ID128
  public var bits: BlockBitmap

  public init(
    geometry: BlockGeometry, meaning: MapMeaning = .current, deviceName: String = "",
    mapID: ID128 = .random(), trackingStarted: Instant = .now(),
    lastMergedStream: ID128 = .none, trackingEnded: Instant = .unset, mergedAsOf: Instant = .unset,
    mergedAsOfGeneration: ID128 = .none, bits: BlockBitmap? = nil
  ) {
    self.geometry = geometry
    self.meaning = meaning
    self.deviceName = deviceName
    self.mapID = mapID
    self.trackingStarted = trackingStarted
    self.lastMergedStream = lastMergedStream
    self.trackingEnded = trackingEnded
    self.mergedAsOf = mergedAsOf
    self.mergedAsOfGeneration = mergedAsOfGeneration
    self.bits = bits ?? BlockBitmap(count: geometry.blockCount)
    precondition(self.bits.count == geometry.blockCount)
  }

  /// Throws unless the map fits `device` in size (block size is the map's own).
  public func check(fits device: Device, mapName: String) throws {
    if geometry.deviceSize != device.size {
      throw ToolkitError(
        "\(mapName) describes a device of \(geometry.deviceSize) bytes but \(device.path) has \(device.size) bytes")
    }
  }

  /// Throws unless both maps cover the same blocks of the same size.
  public func check(matches other: BlockMap, _ name: String, _ otherName: String) throws {
    try geometry.check(matches: other.geometry, name, otherName)
  }

  /// Set bytes: set blocks weighted by their length (the partial last block counts short).
  public var setBytes: UInt64 {
    let count = bits.population
    guard count > 0 else { return 0 }
    let last = geometry.blockCount - 1
    if bits[last] {
      return (count - 1) * UInt64(geometry.blockSize) + UInt64(geometry.length(ofBlock: last))
    }
    return count * UInt64(geometry.blockSize)
  }
}

extension BlockMap {
  /// Why a stream that started reading at `started`, on top of stream `base`
  /// (`.none` for a full stream), does not fit this map: it started before the
  /// map's tracking (plus `clockSkew` nanoseconds), so it could bring back
  /// data older than writes the map never saw; or it applies on top of
  /// another stream than the last one merged. Empty when it fits. Used by
  /// merges into a file and by a running server's merge export alike.
  public func problems(
    admittingStreamStarted started: Instant, base: ID128, clockSkew: Int64, checkTime: Bool = true
  ) -> [String] {
    let map = self
    var problems: [String] = []
    if checkTime && started.nanosecondsSinceEpoch < map.trackingStarted.nanosecondsSinceEpoch + clockSkew {
      problems.append(
        "the stream started reading at \(started), before the map started tracking at \(map.trackingStarted)"
          + (clockSkew > 0 ? " plus the allowed clock skew" : "")
          + ", so it could bring back data older than writes the map never saw")
    }
    if !base.isNone && base != map.lastMergedStream {
      let last = map.lastMergedStream.isNone ? "none" : map.lastMergedStream.description
      problems.append(
        "the stream applies on top of stream \(base), but the last stream merged into this device is \(last)")
    }
    return problems
  }
}
