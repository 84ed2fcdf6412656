import ArgumentParser
import DualRestore
import ToolSupport

struct Create: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Create an empty map (no block set) for a device.",
    discussion: """
      Give the device size with --size, or take it from an image file or \
      block device with --like. Tracking starts now: the map records the \
      current UTC instant and a fresh map id. An existing MAP is not \
      replaced unless --force is given.
      """)

  @Option(help: ArgumentHelp("Size of the device in bytes (K, M, G, T: powers of 1024).", valueName: "bytes"))
  var size: ByteCount?

  @Option(help: ArgumentHelp("Take the size from this image file or block device.", valueName: "device"))
  var like: String?

  @OptionGroup var blockSize: BlockSizeOption

  @Option(help: "Name of the device the map describes, for people (default: the --like path).")
  var name: String?

  @Option(
    name: .customLong("meaning"),
    help: ArgumentHelp("What a set bit means (default: current).", valueName: "meaning"))
  var meaningOption: MapMeaning?
  var meaning: MapMeaning { meaningOption ?? .current }

  @Flag(help: "Replace an existing map.")
  var force = false

  @Argument(help: ArgumentHelp("The map file to create, or - for standard output.", valueName: "map"))
  var map: String

  func validate() throws {
    if (size == nil) == (like == nil) {
      throw ValidationError("give exactly one of --size BYTES and --like DEVICE")
    }
  }

  func run() throws {
    let deviceSize: UInt64
    var deviceName = name ?? ""
    if let like {
      let device = try Device(path: like)
      deviceSize = device.size
      if name == nil { deviceName = like }
    } else {
      deviceSize = size?.value ?? 0
    }
    if map != "-" && !force && pathExists(map) {
      throw ToolkitError.path(map, "already exists (use --force to replace it)")
    }
    let geometry = try BlockGeometry(blockSize: blockSize.value, deviceSize: deviceSize)
    try geometry.checkMappable()
    try MapFile.save(BlockMap(geometry: geometry, meaning: meaning, deviceName: deviceName), to: map)
  }
}
