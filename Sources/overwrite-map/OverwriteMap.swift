import ArgumentParser
import DualRestore
import ToolSupport

@main
struct OverwriteMap: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "overwrite-map",
    abstract: "Create, inspect and combine block maps.",
    discussion: """
      A map has one bit per block of a device. The overwrite map of a restore \
      marks the blocks of the primary that hold current data: restored or \
      written since tracking started. merge-snapshot never overwrites them. \
      Other tools write maps of the same format: bitmap-diff's map of \
      differing blocks, a selection for snapshot --map.

      A MAP argument of - means standard input or standard output. A binary \
      map is never written to a terminal. The format is described in \
      dualrestore-map(5).
      """,
    subcommands: [
      Create.self, Show.self, Stats.self, Extents.self, SetBlocks.self, ClearBlocks.self,
      Union.self, Intersect.self, Subtract.self, Invert.self, Rescale.self, Import.self, Export.self, Owed.self,
    ])

  static func main() { ToolMain.run(Self.self) }
}
