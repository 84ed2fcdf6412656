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

/// The operands of union, intersect and subtract: two maps that must
/// describe the same blocks (at most one from stdin), and where the result goes.
struct MapPairArguments: ParsableArguments {
  @Argument(help: "First map (- for standard input).") var a: String
  @Argument(help: "Second map (- for standard input).") var b: String
  @OptionGroup var out: OutputOption

  /// Loads both maps, applies `combine` to A's bits with B's, saves A.
  /// The result names a whole generation's writes (a recorded end) only
  /// when `spans` and both are change maps of generations that touch or
  /// overlap: it then runs from the earlier start to the later end.
  func combine(spans: Bool = false, _ combine: (inout BlockBitmap, BlockBitmap) -> Void) throws {
    if a == "-" && b == "-" { throw ValidationError("only one map can come from standard input") }
    var ma = try MapFile.load(a)
    let mb = try MapFile.load(b)
    try ma.check(matches: mb, inputName(a), inputName(b))
    combine(&ma.bits, mb.bits)
    let ended = ma.trackingEnded != .unset && mb.trackingEnded != .unset
    if spans, ended, ma.meaning == .changed, mb.meaning == .changed, ma.trackingStarted <= mb.trackingEnded,
      mb.trackingStarted <= ma.trackingEnded
    {
      ma.trackingStarted = min(ma.trackingStarted, mb.trackingStarted)
      ma.trackingEnded = max(ma.trackingEnded, mb.trackingEnded)
    } else {
      ma.trackingEnded = .unset
    }
    try MapFile.save(ma, to: out.output ?? "-")
  }
}

private let identityNote =
  "The result keeps the identity of A (device name, map id, tracking start, last merged stream)."

private let generationNote =
  " A union of the change maps of adjacent generations (tracking-server --changes-out) spans both: from the"
  + " earlier tracking start to the later end. Otherwise the result records no generation end."

struct Union: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in A or in B.", discussion: identityNote + generationNote)
  @OptionGroup var maps: MapPairArguments

  func run() throws { try maps.combine(spans: true) { $0.formUnion($1) } }
}

struct Intersect: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in both A and B.", discussion: identityNote)
  @OptionGroup var maps: MapPairArguments

  func run() throws { try maps.combine { $0.formIntersection($1) } }
}

struct Subtract: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Blocks set in A and not in B.", discussion: identityNote)
  @OptionGroup var maps: MapPairArguments

  func run() throws { try maps.combine { $0.subtract($1) } }
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
    m.trackingEnded = .unset
    try MapFile.save(m, to: out.output ?? "-")
  }
}
