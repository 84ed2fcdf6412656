import ArgumentParser
import DualRestore
import ToolSupport

@main
struct BitmapDiff: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "bitmap-diff",
    abstract: "Compare two sources block by block and write the map of differing blocks.",
    usage: """
      bitmap-diff [options] A B
      bitmap-diff --signature [--map MAP] [--sample FRACTION [--seed N]] [options] SOURCE
      """,
    discussion: """
      A and B are image files, block devices or NBD exports \
      (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), or signatures made with \
      --signature. The map (dualrestore-map(5)) has one bit per block of B, \
      set where B differs from A; it goes to standard output, never to a \
      terminal, or to -o FILE. --extents prints START LENGTH lines instead.

      A signature holds one strong digest per block (SHA-256 by default) of a \
      source, so two copies far apart can be compared without moving the \
      data: run bitmap-diff --signature on one side, carry the signature to \
      the other, and run bitmap-diff SIG B there; the map is the one \
      bitmap-diff A B would give. Its format is dualrestore-signature(5).

      With --map MAP, the signature is sparse: it holds the digests of the \
      blocks MAP sets only, and only those blocks of SOURCE are read. \
      Compared with B (or with a signature), only those blocks are read and \
      compared; the map sets the ones that differ, and every block outside \
      MAP is clear. So a link is crossed in two steps: a coarse signature \
      finds the regions that differ, and a sparse fine one of those regions \
      (MAP made from the coarse map with overwrite-map rescale) finds the \
      blocks; see dualrestore(7).

      With --sample FRACTION (0.001 or 1/1000), the signature is sparse and \
      holds the digests of a pseudo-random sample of the blocks: each block \
      is chosen with probability FRACTION, from its number and the --seed \
      alone (dualrestore-signature(5) gives the function), so the sample is \
      drawn without reading SOURCE, only its blocks are read, and the same \
      FRACTION and seed choose the same blocks of any source of the same \
      size and block size. Compared with B, or with a signature of B drawn \
      with the same FRACTION and seed, it finds damage without reading \
      either side whole. If m blocks differ, the sample misses all of them \
      with probability (1 - FRACTION)^m, about e^(-FRACTION * m): with 1% \
      of 2^20 blocks damaged and a sample of 1/1000, about 3 in 100000. A \
      new seed each time checks other blocks: a given block has been checked \
      with probability 1 - (1 - FRACTION)^k after k seeds. Without --seed, \
      a random seed is drawn and told on standard error (the far side needs \
      it to draw the same sample). With --map, the sample is drawn among \
      the blocks MAP sets.

      Exit status, as cmp(1) and qemu-img compare: 0 the sources are the \
      same (over a sparse signature's blocks), 1 they differ, 2 trouble \
      (including bad usage).
      """)

  @Flag(help: "Write a signature of SOURCE instead of comparing.")
  var signature = false

  @Option(help: ArgumentHelp("Digest for --signature, by its OpenSSL name.", valueName: "name"))
  var digest: String = "sha256"

  @OptionGroup var blockSize: BlockSizeOption

  @Option(
    help: ArgumentHelp(
      "With --signature, sign only the blocks this map sets (a sparse signature); its block size is the signature's.",
      valueName: "map"))
  var map: String?

  @Option(
    help: ArgumentHelp(
      "With --signature, sign a pseudo-random sample of this fraction of the blocks (0.001 or 1/1000): a sparse signature.",
      valueName: "fraction"))
  var sample: String?

  @Option(
    help: ArgumentHelp(
      "The seed of --sample, 0 to 2^64 - 1: the same fraction and seed choose the same blocks (default: random, told on standard error).",
      valueName: "n"))
  var seed: String?

  @Option(
    name: .shortAndLong,
    help: ArgumentHelp("Write the map or signature to this file (saved atomically).", valueName: "file"))
  var output: String?

  @Flag(help: "Print the differing byte ranges as START LENGTH lines instead of a map.")
  var extents = false

  @Flag(help: "Compare sources of different sizes; the part of B past A's end differs.")
  var allowSizeChange = false

  @OptionGroup var threads: ThreadsOption

  @Flag(help: "Read with O_DIRECT, past the page cache, so a large compare does not evict a live system's cache.")
  var direct = false

  @OptionGroup var reporting: ProgressOptions

  @Argument(help: ArgumentHelp("A and B, or SOURCE with --signature.", valueName: "source"))
  var sources: [String] = []

  func validate() throws {
    if seed != nil && sample == nil { throw ValidationError("--seed applies only to --sample") }
    if sample != nil && !signature { throw ValidationError("--sample applies only to --signature") }
    do { _ = try drawnSample(announce: false) } catch let error as ToolkitError {
      throw ValidationError(error.message)
    }
    if signature {
      guard sources.count == 1 else { throw ValidationError("--signature takes exactly one SOURCE") }
      if extents { throw ValidationError("--extents does not apply to --signature") }
      if allowSizeChange { throw ValidationError("--allow-size-change does not apply to --signature") }
      if map == "-" && sources[0] == "-" {
        throw ValidationError("only one of --map and SOURCE can be standard input")
      }
    } else {
      if map != nil { throw ValidationError("--map applies only to --signature") }
      guard sources.count == 2 else { throw ValidationError("give two sources to compare, A and B") }
      if sources[0] == "-" && sources[1] == "-" {
        throw ValidationError("only one of A and B can be standard input")
      }
      if extents && output != nil { throw ValidationError("--extents writes text to standard output; drop -o") }
    }
  }

  var hashWorkers: Int { threads.value }

  /// The sample --sample and --seed ask for; without --seed, a random seed,
  /// told on standard error when `announce`.
  func drawnSample(announce: Bool) throws -> BlockSample? {
    guard let sample else { return nil }
    let fraction = try BlockSample.Fraction(parsing: sample)
    if let seed { return BlockSample(fraction: fraction, seed: try BlockSample.parseSeed(seed)) }
    let drawn = BlockSample(fraction: fraction, seed: UInt64.random(in: .min ... .max))
    if announce && !reporting.quiet {
      printError(
        "bitmap-diff: sampling \(drawn.fraction) of the blocks with seed \(drawn.seed) (--seed \(drawn.seed) draws the same sample)"
      )
    }
    return drawn
  }

  var showProgress: Bool { reporting.show }

  func run() throws {
    if signature {
      try writeSignature()
    } else {
      try compare()
    }
  }

  func writeSignature() throws {
    let algorithm = try DigestAlgorithm(named: digest)
    let target = OutputTarget(output)
    try target.refuseTerminal(for: "signature")
    let source = try openSource(sources[0], direct: direct)
    var size = blockSize.value
    var selection: BlockBitmap?
    if let map {
      // The map fixes the block size; an explicit --block-size must agree.
      let m = try MapFile.load(map)
      let mapName = map == "-" ? "standard input" : map
      if let given = blockSize.blockSize, given.value != UInt64(m.geometry.blockSize) {
        throw ToolkitError(
          "\(mapName) has block size \(m.geometry.blockSize), not \(given.value) (rescale it with overwrite-map rescale)"
        )
      }
      try m.geometry.check(
        matches: BlockGeometry(blockSize: m.geometry.blockSize, deviceSize: source.size), mapName, source.name)
      size = m.geometry.blockSize
      selection = m.bits
    }
    _ = try Signer.sign(
      source, algorithm: algorithm, blockSize: size, to: target, progress: showProgress,
      workers: hashWorkers, selection: selection, sample: drawnSample(announce: true))
  }

  func compare() throws {
    let target = OutputTarget(output)
    if !extents { try target.refuseTerminal(for: "map") }
    let (a, b) = (sources[0], sources[1])
    let aIsSignature = a == "-" || isSignature(a)
    let bIsSignature = b == "-" || isSignature(b)
    let result: ComparisonReport
    switch (aIsSignature, bIsSignature) {
    case (true, true):
      let sa = try SignatureReader(path: a)
      let sb = try SignatureReader(path: b)
      try checkBlockSize(sa.header.geometry.blockSize, a)
      result = try Comparison.compare(sa, sb, allowSizeChange: allowSizeChange)
    case (true, false), (false, true):
      let sig = try SignatureReader(path: aIsSignature ? a : b)
      try checkBlockSize(sig.header.geometry.blockSize, sig.name)
      let device = try openSource(aIsSignature ? b : a, direct: direct)
      result = try Comparison.compare(
        signature: sig, device, signatureIsA: aIsSignature, allowSizeChange: allowSizeChange,
        progress: showProgress, workers: hashWorkers)
    case (false, false):
      let da = try openSource(a, direct: direct)
      let db = try openSource(b, direct: direct)
      result = try Comparison.compare(
        da, db, blockSize: blockSize.value, allowSizeChange: allowSizeChange, progress: showProgress)
    }

    if extents {
      let out = TextOutput()
      for run in result.differing.extents {
        let (offset, length) = result.geometry.byteRange(blocks: run.lowerBound, count: UInt64(run.count))
        try out.line("\(offset) \(length)")
      }
      try out.flush()
    } else {
      let map = BlockMap(
        geometry: result.geometry, meaning: .differs, deviceName: b == "-" ? "standard input" : b,
        trackingStarted: result.signature?.started ?? .now(), bits: result.differing)
      try target.write(MapFormat.encode(map))
    }
    if result.differ { throw ExitCode(1) }
  }

  /// A signature fixes the block size; an explicit --block-size must agree.
  func checkBlockSize(_ signatureBlockSize: UInt32, _ name: String) throws {
    if let given = blockSize.blockSize, given.value != UInt64(signatureBlockSize) {
      throw ToolkitError("\(name) was made with block size \(signatureBlockSize), not \(given.value)")
    }
  }

  func isSignature(_ path: String) -> Bool {
    peekFile(path, count: SignatureFormat.magic.count).map(SignatureFormat.looksLikeSignature) ?? false
  }

  static func main() { ToolMain.run(Self.self, trouble: 2) }
}
