import ArgumentParser
import DualRestore
import ToolSupport

struct RangeArguments: ParsableArguments {
  @Argument(
    help: ArgumentHelp(
      "The map to change in place, or - to filter standard input to standard output.", valueName: "map"))
  var map: String

  @Argument(help: ArgumentHelp("First byte of the range; a multiple of the block size.", valueName: "offset"))
  var offset: ByteCount

  @Argument(
    help: ArgumentHelp("Bytes in the range; it ends on a block boundary or at the device end.", valueName: "length"))
  var length: ByteCount

  /// Loads the map, applies `change` to the blocks of the range, saves it back.
  func apply(_ change: (inout BlockBitmap, Range<UInt64>) -> Void) throws {
    var m = try MapFile.load(map)
    let blocks: Range<UInt64>
    do {
      blocks = try m.geometry.blocks(offset: offset.value, length: length.value)
    } catch let error as ToolkitError {
      throw ToolkitError.path(inputName(map), error.message)
    }
    change(&m.bits, blocks)
    try MapFile.save(m, to: map)
  }
}

private let wholeBlocksNote = """
  The range must cover whole blocks: OFFSET is a multiple of the block \
  size and OFFSET+LENGTH is one too, or the device end. The map is saved \
  atomically.
  """

struct SetBlocks: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "set",
    abstract: "Set the blocks of a byte range.",
    discussion: wholeBlocksNote)

  @OptionGroup var range: RangeArguments

  func run() throws { try range.apply { $0.set($1) } }
}

struct ClearBlocks: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "clear",
    abstract: "Clear the blocks of a byte range.",
    discussion: wholeBlocksNote)

  @OptionGroup var range: RangeArguments

  func run() throws { try range.apply { $0.clear($1) } }
}
