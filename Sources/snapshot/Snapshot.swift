import ArgumentParser
import DualRestore
import ToolSupport

@main
struct Snapshot: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "snapshot",
    abstract: "Write a block stream of a source, for media or a pipe.",
    discussion: """
      SOURCE is an image file, a block device, or an NBD export \
      (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). The stream \
      (dualrestore-stream(5)) goes to standard output, never to a terminal, \
      or to -o FILE, which appears only when complete. Blocks that read as \
      zeros (holes of image files are not even read) become ZERO records; \
      other blocks are LZ4-compressed when that makes them smaller. Every \
      record has a CRC-32C and the END record a SHA-256 of the whole stream.

      With --map (a file, or - for standard input), only the blocks set in \
      the map are carried: bitmap-diff A B | snapshot --map - A | \
      merge-snapshot B sends only the blocks that differ. The map's block \
      size and device size must match SOURCE.

      With --encrypt, the stream is encrypted and authenticated with \
      AES-256-GCM after compression, under the key in --key-file or a key \
      derived with scrypt from the passphrase in --passphrase-file. Every \
      record is sealed under a key of this stream alone and bound to its \
      place, so merge-snapshot refuses a wrong key, and any record altered, \
      removed, reordered, taken from another stream or cut off, before it \
      writes a block of it. Keys and passphrases are read from files only, \
      never from the command line or the environment.

      With --have SIG (repeatable), SIG being signatures \
      (bitmap-diff --signature, dualrestore-signature(5)) of what the receiver \
      already holds — the target the stream will be merged onto, and any other \
      images it keeps — a block whose content the receiver holds anywhere is \
      not carried: a REFERENCE record names the image and block holding it and \
      its digest (stream format version 2). merge-snapshot takes the content \
      from the target or from its --reuse images and checks each digest before \
      writing. The signatures are held in memory as an index, 16 bytes per \
      signed block (256 MiB for a TiB signed in 64 KiB blocks), \
      and fix the block size.

      For a consistent copy, SOURCE should not change while it is read: \
      snapshot a frozen view (an LVM or file system snapshot, a quiesced \
      device). A summary goes to standard error at the end.
      """)

  @Option(help: ArgumentHelp("Carry only the blocks set in this map (- for standard input).", valueName: "map"))
  var map: String?

  @Option(
    help: ArgumentHelp(
      "A signature of content the receiver holds; blocks it has are sent as references (repeatable).",
      valueName: "sig"))
  var have: [String] = []

  @Option(
    help: ArgumentHelp(
      "The change map saved when SOURCE, a frozen view, was frozen: the stream is the device as of its end.",
      valueName: "map"))
  var asOf: String?

  @OptionGroup var blockSize: BlockSizeOption

  @Option(
    name: .shortAndLong,
    help: ArgumentHelp("Write the stream to this file instead of standard output.", valueName: "file"))
  var output: String?

  @Option(help: ArgumentHelp("Mark the stream incremental on top of this stream id (32 hex digits).", valueName: "id"))
  var base: String?

  @Flag(help: "Store every block raw, without LZ4.")
  var noCompress = false

  @Flag(help: "Encrypt and authenticate the stream (AES-256-GCM); needs --key-file or --passphrase-file.")
  var encrypt = false

  @OptionGroup var keys: KeyOptions

  @OptionGroup var threads: ThreadsOption

  @Flag(help: "Read with O_DIRECT, past the page cache.")
  var direct = false

  @OptionGroup var reporting: ProgressOptions

  @Flag(help: "Print the summary as one JSON object (on standard error when the stream is on standard output).")
  var json = false

  @Argument(help: ArgumentHelp("The image file, block device or NBD URI to read.", valueName: "source"))
  var source: String

  func validate() throws {
    if let base, ID128(hex: base) == nil || ID128(hex: base) == ID128.none {
      throw ValidationError("--base takes a stream id of 32 hex digits, not '\(base)'")
    }
    if encrypt && !keys.given {
      throw ValidationError("--encrypt needs --key-file FILE or --passphrase-file FILE (keys are read from files only)")
    }
    if have.filter({ $0 == "-" }).count + (map == "-" ? 1 : 0) > 1 {
      throw ValidationError("only one of --map and --have can be standard input")
    }
    if asOf != nil && map != nil {
      throw ValidationError("--as-of is for a full stream; with --map, a change map gives its own instants")
    }
    if asOf == "-" && have.contains("-") {
      throw ValidationError("only one of --as-of and --have can be standard input")
    }
    if !encrypt && keys.given {
      throw ValidationError("\(keys.optionName) gives the key to encrypt with; add --encrypt to encrypt the stream")
    }
  }

  func run() throws {
    let target = OutputTarget(output)
    try target.refuseTerminal(for: "stream")
    // Read (and refused) before anything else is opened or written.
    let secret = try keys.load()
    var selection: BlockMap?
    var size = blockSize.value
    if let map {
      let m = try MapFile.load(map)
      if let given = blockSize.blockSize, given.value != UInt64(m.geometry.blockSize) {
        throw ToolkitError("the map has block size \(m.geometry.blockSize), not \(given.value)")
      }
      size = m.geometry.blockSize
      selection = m
    }
    // The generations carried: a change map's, from the map's own instants.
    var generation: StreamFormat.Generation?
    if let m = selection, m.meaning == .changed, m.trackingEnded != .unset {
      generation = StreamFormat.Generation(generation: m.mapID, changesSince: m.trackingStarted, asOf: m.trackingEnded)
    }
    var asOfMap: BlockMap?
    if let asOf {
      let m = try MapFile.load(asOf)
      guard m.meaning == .changed, m.trackingEnded != .unset else {
        throw ToolkitError(
          "\(asOf) is not a change map saved at a generation's end (tracking-server freeze --changes-out), so it gives no instant the stream is as of"
        )
      }
      generation = StreamFormat.Generation(generation: m.mapID, changesSince: .unset, asOf: m.trackingEnded)
      asOfMap = m
    }
    var index: SignatureIndex?
    if !have.isEmpty {
      let signatures = try have.map { try SignatureReader(path: $0) }
      let signed = signatures[0].header.geometry.blockSize
      if selection == nil {
        if let given = blockSize.blockSize, given.value != UInt64(signed) {
          throw ToolkitError("\(signatures[0].name) was made with block size \(signed), not \(given.value)")
        }
        size = signed
      }
      index = try SignatureIndex(signatures: signatures, blockSize: size)
    }
    let device = try openSource(source, direct: direct)
    if let m = selection, m.geometry.deviceSize != device.size {
      throw ToolkitError(
        "\(map == "-" ? "the map on standard input" : map ?? "") describes \(m.geometry.deviceSize) bytes but \(source) has \(device.size) bytes"
      )
    }
    if let m = asOfMap, let asOf, m.geometry.deviceSize != device.size {
      throw ToolkitError("\(asOf) describes \(m.geometry.deviceSize) bytes but \(source) has \(device.size) bytes")
    }
    let sink = try OutputSink(target, what: "stream")
    var options = SnapshotWriter.Options(
      blockSize: size, selection: selection, baseStreamID: base.flatMap(ID128.init(hex:)) ?? .none,
      compress: !noCompress, workers: threads.value, progress: reporting.show, encryption: secret)
    options.have = index
    options.generation = generation
    let s = try SnapshotWriter.write(device, to: sink, options: options)
    try sink.finish()
    report(s, index: index, generation: generation, onStdout: output != nil)
  }

  func report(
    _ s: SnapshotWriter.Summary, index: SignatureIndex?, generation: StreamFormat.Generation?, onStdout: Bool
  ) {
    let referencedBytes = s.referencedBytes
    if json {
      var o = JSONObject()
      o.add("stream_id", s.header.streamID.description)
      o.add("base_stream_id", s.header.isIncremental ? s.header.baseStreamID.description : nil)
      o.add("started", s.header.started.description)
      o.add("source", s.header.sourceName)
      o.add("block_size", UInt64(s.header.geometry.blockSize))
      o.add("device_size", s.header.geometry.deviceSize)
      o.add("covered_blocks", s.header.coveredBlocks)
      o.add("generation", generation?.generation.description)
      o.add("changes_since", generation.map { $0.changesSince == .unset ? "start" : $0.changesSince.description })
      o.add("as_of", generation?.asOf.description)
      o.add("encrypted", encrypt)
      o.add("data_blocks", s.dataBlocks)
      o.add("compressed_blocks", s.compressedBlocks)
      o.add("zero_blocks", s.zeroBlocks)
      if let index {
        o.add("format_version", UInt64(StreamFormat.referencesVersion))
        o.add("referenced_blocks", s.referencedBlocks)
        o.add("reference_records", s.referenceRecords)
        o.add("bytes_saved", referencedBytes)
        o.add("have_images", UInt64(index.images.count))
        o.add("index_entries", UInt64(index.count))
        o.add("index_bytes", UInt64(index.memoryBytes))
      }
      o.add("bytes_in", s.bytesIn)
      o.add("bytes_out", s.bytesOut)
      o.add("seconds", number: formatFixed(s.seconds, digits: 3))
      if onStdout {
        let out = TextOutput()
        try? out.line(o.render())
        try? out.flush()
      } else {
        printError(o.render())
      }
      return
    }
    if reporting.quiet { return }
    let ratio = s.bytesIn == 0 ? 0 : Double(s.bytesOut) / Double(s.bytesIn)
    let rate = s.seconds > 0 ? Double(s.bytesIn) / s.seconds : 0
    printError(
      "snapshot: \(encrypt ? "encrypted " : "")stream \(s.header.streamID): "
        + "\(s.dataBlocks + s.zeroBlocks + s.referencedBlocks) blocks "
        + "(\(s.dataBlocks) data, \(s.compressedBlocks) compressed, \(s.zeroBlocks) zero"
        + (index == nil
          ? ""
          : ", \(s.referencedBlocks) referenced in \(s.referenceRecords) records, \(formatBytes(referencedBytes)) not sent")
        + "), "
        + "\(formatBytes(s.bytesIn)) in, \(formatBytes(s.bytesOut)) out "
        + "(\(formatFixed(ratio * 100, digits: 1))%), \(formatFixed(s.seconds, digits: 2)) s, "
        + "\(formatBytes(UInt64(rate)))/s")
  }

  static func main() { ToolMain.run(Self.self) }
}
