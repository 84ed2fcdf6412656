// What the comparison and streaming engines read from. Image files and block
// devices are `Device`s; NBD exports join later behind the same protocol.

public protocol BlockSource: AnyObject, Sendable {
  /// How errors and outputs name the source: a path or URI.
  var name: String { get }
  var size: UInt64 { get }
  /// Reads exactly `buffer.count` bytes at `offset`; safe from several threads.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
  /// Whether `offset` is in data or a known hole, and where that region ends.
  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64)
}

extension Device: BlockSource {
  public var name: String { path }
}
