// The arguments several subcommands share, with the steps they take on them:
// reading the one map a subcommand inspects, and making the new map of a
// device (create, import). A path of - is standard input or output.

import ArgumentParser
import DualRestore
import ToolSupport

/// How a path argument is named in messages.
func inputName(_ path: String) -> String { path == "-" ? "standard input" : path }

/// The one map a subcommand reads.
struct MapInput: ParsableArguments {
  @Argument(help: ArgumentHelp("The map, or - for standard input.", valueName: "map"))
  var map: String

  func load() throws -> BlockMap { try MapFile.load(map) }
}

/// The device a new map describes: its size (given, or taken from an image
/// file or block device), its block size, its name and what a set bit means.
struct NewMapOptions: ParsableArguments {
  @Option(help: ArgumentHelp("Size of the device in bytes (K, M, G, T: powers of 1024).", valueName: "bytes"))
  var size: ByteCount?

  @Option(help: ArgumentHelp("Take the size and name from this image file or block device.", valueName: "device"))
  var like: String?

  @OptionGroup var blockSize: BlockSizeOption

  @Option(help: "Name of the device the map describes, for people (default: the --like path).")
  var name: String?

  @Option(
    name: .customLong("meaning"),
    help: ArgumentHelp("What a set bit means (default: current).", valueName: "meaning"))
  var meaningOption: MapMeaning?
  var meaning: MapMeaning { meaningOption ?? .current }

  /// The size --like or --size gives, or nil when neither is given.
  func givenSize() throws -> UInt64? {
    if let like { return try Device(path: like).size }
    return size?.value
  }

  /// Saves to `path` the map of a device of `deviceSize` bytes, with the
  /// bits `bits` makes for its geometry (none set when it gives nil).
  func save(deviceSize: UInt64, to path: String, bits: (BlockGeometry) -> BlockBitmap? = { _ in nil }) throws {
    let geometry = try BlockGeometry(blockSize: blockSize.value, deviceSize: deviceSize)
    try geometry.checkMappable()
    let map = BlockMap(geometry: geometry, meaning: meaning, deviceName: name ?? like ?? "", bits: bits(geometry))
    try MapFile.save(map, to: path)
  }
}
