import ArgumentParser
import DualRestore
import ToolSupport

struct Import: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Make a map from a GNU ddrescue mapfile.",
    discussion: """
      A block is set when every byte of it has one of the --status \
      characters (default +, finished), or with --any-byte when at least one \
      byte has. The device size is the end of the mapfile's last line unless \
      --size or --like says otherwise. A mapfile records no device identity: \
      give --name, or --like, to record one.
      """)

  @Option(help: ArgumentHelp("Size of the device in bytes.", valueName: "bytes"))
  var size: ByteCount?

  @Option(help: ArgumentHelp("Take the size and name from this image file or block device.", valueName: "device"))
  var like: String?

  @OptionGroup var blockSize: BlockSizeOption

  @Option(help: "ddrescue status characters that set a block (from ?*/-+).")
  var status: String = "+"

  @Flag(help: "Set a block when any byte of it has a selected status.")
  var anyByte = false

  @Option(help: "Name of the device, for people.")
  var name: String?

  @Option(
    name: .customLong("meaning"),
    help: ArgumentHelp("What a set bit means (default: current).", valueName: "meaning"))
  var meaningOption: MapMeaning?
  var meaning: MapMeaning { meaningOption ?? .current }

  @Argument(help: ArgumentHelp("The ddrescue mapfile, or - for standard input.", valueName: "mapfile"))
  var mapfile: String

  @Argument(help: ArgumentHelp("The map to write, or - for standard output.", valueName: "map"))
  var map: String

  func validate() throws {
    if size != nil && like != nil { throw ValidationError("give at most one of --size and --like") }
    if status.isEmpty || !status.allSatisfy({ "?*/-+".contains($0) }) {
      throw ValidationError("--status takes characters from ?*/-+, not '\(status)'")
    }
    if mapfile == "-" && map == "-" { throw ValidationError("only one of MAPFILE and MAP can be -") }
  }

  func run() throws {
    let sourceName = mapfile == "-" ? "standard input" : mapfile
    let text = String(decoding: try readWholeFile(mapfile, limit: 1 << 30), as: UTF8.self)
    let extents = try DdrescueMapfile.parse(text, name: sourceName)
    var deviceName = name ?? ""
    let deviceSize: UInt64
    if let like {
      deviceSize = try Device(path: like).size
      if name == nil { deviceName = like }
    } else if let size {
      deviceSize = size.value
    } else {
      guard let last = extents.last else {
        throw ToolkitError.path(sourceName, "has no extents; give the device size with --size")
      }
      deviceSize = last.position + last.size
    }
    let geometry = try BlockGeometry(blockSize: blockSize.value, deviceSize: deviceSize)
    try geometry.checkMappable()
    let bits = DdrescueMapfile.bitmap(
      extents, geometry: geometry, statuses: Set(status), anyByte: anyByte)
    try MapFile.save(BlockMap(geometry: geometry, meaning: meaning, deviceName: deviceName, bits: bits), to: map)
  }
}

struct Export: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Write a map as a GNU ddrescue mapfile.",
    discussion: """
      Set blocks get --set-status (default +, finished), clear blocks \
      --clear-status (default ?, non-tried), one line per run. The mapfile \
      works with ddrescue and ddrescuelog; its comments carry the map's \
      device name and id, which ddrescue itself ignores.
      """)

  @Option(help: "Status character of set blocks.")
  var setStatus: String = "+"

  @Option(help: "Status character of clear blocks.")
  var clearStatus: String = "?"

  @Argument(help: ArgumentHelp("The map, or - for standard input.", valueName: "map"))
  var map: String

  @Argument(help: ArgumentHelp("The mapfile to write (default: standard output).", valueName: "mapfile"))
  var mapfile: String?

  func validate() throws {
    for (flag, value) in [("--set-status", setStatus), ("--clear-status", clearStatus)] {
      if value.count != 1 || !"?*/-+".contains(value) {
        throw ValidationError("\(flag) takes one character from ?*/-+, not '\(value)'")
      }
    }
  }

  func run() throws {
    let m = try MapFile.load(map)
    let text = DdrescueMapfile.render(
      m, setStatus: setStatus.first ?? "+", clearStatus: clearStatus.first ?? "?", tool: "overwrite-map export")
    try OutputTarget(mapfile).write(text: text)
  }
}
