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

  @OptionGroup var device: NewMapOptions

  @Flag(help: "Replace an existing map.")
  var force = false

  @Argument(help: ArgumentHelp("The map file to create, or - for standard output.", valueName: "map"))
  var map: String

  func validate() throws {
    if (device.size == nil) == (device.like == nil) {
      throw ValidationError("give exactly one of --size BYTES and --like DEVICE")
    }
  }

  func run() throws {
    let deviceSize = try device.givenSize() ?? 0
    if map != "-" && !force && pathExists(map) {
      throw ToolkitError.path(map, "already exists (use --force to replace it)")
    }
    try device.save(deviceSize: deviceSize, to: map)
  }
}
