import ArgumentParser
import DualRestore
import ToolSupport

struct Extents: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print the runs of set blocks as byte ranges.",
    discussion: """
      One line per run of set blocks: START LENGTH, in bytes, decimal, \
      separated by one space. The last run ends at the device end when it \
      covers a partial last block. Nothing else is written to standard output.
      """)

  @OptionGroup var input: MapInput

  func run() throws {
    let m = try input.load()
    let out = TextOutput()
    for run in m.bits.extents {
      let (offset, length) = m.geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
      try out.line("\(offset) \(length)")
    }
    try out.flush()
  }
}
