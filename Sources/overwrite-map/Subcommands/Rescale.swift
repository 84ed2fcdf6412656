// overwrite-map rescale: a map at another block size over the same device,
// for example the coarse map of differing regions a coarse signature gave,
// made fine to select the blocks of a sparse fine signature.

import ArgumentParser
import DualRestore
import ToolSupport

struct Rescale: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Change a map's block size, over the same device.",
    discussion: """
      To finer blocks, every fine block of a set block is set. To coarser \
      blocks, a block is set when any fine block in it is; a map whose \
      meaning is current is not coarsened, since a coarse current block \
      would hold back the fine blocks in it that are not current. The result \
      keeps the meaning, device name, tracking start and last merged stream, \
      with a new map id. For the two-step comparison across a link \
      (dualrestore(7)): bitmap-diff gives the map of differing 8 MiB \
      regions, overwrite-map rescale --block-size 64K makes it a selection \
      of their 64 KiB blocks for bitmap-diff --signature --map.
      """)

  @Option(
    name: .customLong("block-size"),
    help: ArgumentHelp(
      "The new block size: a power of two from 512 to 64M (K, M: powers of 1024).", valueName: "bytes"))
  var blockSize: ByteCount

  @Argument(help: "The map (- for standard input).") var map: String
  @OptionGroup var out: OutputOption

  func validate() throws {
    do { try BlockGeometry.validate(blockSize: blockSize.value) } catch { throw ValidationError("\(error)") }
  }

  func run() throws {
    let m = try MapFile.load(map)
    try MapFile.save(m.rescaled(to: UInt32(blockSize.value), name: inputName(map)), to: out.output ?? "-")
  }
}
