import ArgumentParser
import DualRestore
import ToolSupport

struct OutputOption: ParsableArguments {
  @Option(
    name: .shortAndLong,
    help: ArgumentHelp(
      "Write the result to this file (saved atomically) instead of standard output.", valueName: "file"))
  var output: String?
}

/// Loads two maps that must describe the same blocks; at most one from stdin.
func loadPair(_ a: String, _ b: String) throws -> (BlockMap, BlockMap) {
  if a == "-" && b == "-" { throw ValidationError("only one map can come from standard input") }
  let ma = try MapFile.load(a)
  let mb = try MapFile.load(b)
  try ma.check(matches: mb, a == "-" ? "standard input" : a, b == "-" ? "standard input" : b)
  return (ma, mb)
}

private let identityNote =
  "The result keeps the identity of A (device name, map id, tracking start, last merged stream)."

struct Union: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in A or in B.", discussion: identityNote)
  @Argument(help: "First map (- for standard input).") var a: String
  @Argument(help: "Second map (- for standard input).") var b: String
  @OptionGroup var out: OutputOption

  func run() throws {
    var (ma, mb) = try loadPair(a, b)
    ma.bits.formUnion(mb.bits)
    mb = ma
    try MapFile.save(mb, to: out.output ?? "-")
  }
}

struct Intersect: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in both A and B.", discussion: identityNote)
  @Argument(help: "First map (- for standard input).") var a: String
  @Argument(help: "Second map (- for standard input).") var b: String
  @OptionGroup var out: OutputOption

  func run() throws {
    var (ma, mb) = try loadPair(a, b)
    ma.bits.formIntersection(mb.bits)
    mb = ma
    try MapFile.save(mb, to: out.output ?? "-")
  }
}

struct Subtract: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in A and not in B.", discussion: identityNote)
  @Argument(help: "First map (- for standard input).") var a: String
  @Argument(help: "Second map (- for standard input).") var b: String
  @OptionGroup var out: OutputOption

  func run() throws {
    var (ma, mb) = try loadPair(a, b)
    ma.bits.subtract(mb.bits)
    mb = ma
    try MapFile.save(mb, to: out.output ?? "-")
  }
}

struct Invert: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks not set in A.",
    discussion: """
      For example, the blocks of an overwrite map that are not yet current: \
      overwrite-map invert current.map | snapshot --map - /dev/backup. \
      The result keeps the identity of A.
      """)
  @Argument(help: "The map (- for standard input).") var a: String
  @OptionGroup var out: OutputOption

  func run() throws {
    var m = try MapFile.load(a)
    m.bits.invert()
    try MapFile.save(m, to: out.output ?? "-")
  }
}
