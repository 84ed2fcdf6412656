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

  @OptionGroup var device: NewMapOptions

  @Option(help: "ddrescue status characters that set a block (from ?*/-+).")
  var status: String = "+"

  @Flag(help: "Set a block when any byte of it has a selected status.")
  var anyByte = false

  @Argument(help: ArgumentHelp("The ddrescue mapfile, or - for standard input.", valueName: "mapfile"))
  var mapfile: String

  @Argument(help: ArgumentHelp("The map to write, or - for standard output.", valueName: "map"))
  var map: String

  func validate() throws {
    if device.size != nil && device.like != nil { throw ValidationError("give at most one of --size and --like") }
    if status.isEmpty || !status.allSatisfy({ "?*/-+".contains($0) }) {
      throw ValidationError("--status takes characters from ?*/-+, not '\(status)'")
    }
    if mapfile == "-" && map == "-" { throw ValidationError("only one of MAPFILE and MAP can be -") }
  }

  func run() throws {
    let sourceName = inputName(mapfile)
    let text = String(decoding: try readWholeFile(mapfile, limit: 1 << 30), as: UTF8.self)
    let extents = try DdrescueMapfile.parse(text, name: sourceName)
    let deviceSize: UInt64
    if let given = try device.givenSize() {
      deviceSize = given
    } else {
      guard let last = extents.last else {
        throw ToolkitError.path(sourceName, "has no extents; give the device size with --size")
      }
      deviceSize = last.position + last.size
    }
    try device.save(deviceSize: deviceSize, to: map) {
      DdrescueMapfile.bitmap(extents, geometry: $0, statuses: Set(status), anyByte: anyByte)
    }
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

  @OptionGroup var input: MapInput

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
    let m = try input.load()
    let text = DdrescueMapfile.render(
      m, setStatus: setStatus.first ?? "+", clearStatus: clearStatus.first ?? "?", tool: "overwrite-map export")
    try OutputTarget(mapfile).write(text: text)
  }
}
