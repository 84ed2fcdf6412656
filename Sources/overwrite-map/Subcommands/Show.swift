import ArgumentParser
import DualRestore
import ToolSupport

struct Show: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print a summary of a map for people.",
    discussion: "Sizes, identity, and how many blocks are set. For scripts, use stats --json.")

  @OptionGroup var input: MapInput

  func run() throws {
    let m = try input.load()
    let g = m.geometry
    let set = m.bits.population
    let out = TextOutput()
    func row(_ key: String, _ value: String) throws {
      try out.line(key.padding(to: 20) + value)
    }
    try row("map:", inputName(input.map))
    try row("device:", m.deviceName.isEmpty ? "(unnamed)" : m.deviceName)
    try row("meaning:", "\(m.meaning) (\(explain(m.meaning)))")
    try row("map id:", "\(m.mapID)")
    try row("tracking started:", "\(m.trackingStarted)")
    if m.trackingEnded != .unset { try row("tracking ended:", "\(m.trackingEnded)") }
    try row("last merged stream:", m.lastMergedStream.isNone ? "none" : "\(m.lastMergedStream)")
    if m.mergedAsOf != .unset {
      let generation = m.mergedAsOfGeneration.isNone ? "" : " (the end of generation \(m.mergedAsOfGeneration))"
      try row("merged as of:", "\(m.mergedAsOf)\(generation)")
    }
    try row("block size:", "\(formatBytes(UInt64(g.blockSize))) (\(g.blockSize) bytes)")
    try row("device size:", "\(formatBytes(g.deviceSize)) (\(g.deviceSize) bytes)")
    try row(
      "blocks:",
      "\(set) of \(g.blockCount) \(m.meaning) (\(percent(set, g.blockCount))%)")
    try row("bytes:", "\(formatBytes(m.setBytes)) of \(formatBytes(g.deviceSize)) \(m.meaning)")
    try row("extents:", "\(m.bits.extents.reduce(0) { n, _ in n + 1 })")
    try out.flush()
  }

  func explain(_ meaning: MapMeaning) -> String {
    switch meaning {
    case .current: return "a set block holds current data and is never overwritten by a merge"
    case .differs: return "a set block differs between the two compared sources"
    case .changed: return "a set block was written since tracking started"
    case .selected: return "a set block is selected"
    }
  }
}

struct Stats: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print a map's figures for scripts.",
    discussion: "One `key value` line each, or one JSON object with --json.")

  @Flag(help: "Print one JSON object.")
  var json = false

  @OptionGroup var input: MapInput

  func run() throws {
    let m = try input.load()
    let g = m.geometry
    let set = m.bits.population
    var o = JSONObject()
    o.add("format_version", Int(MapFormat.version))
    o.add("device_name", m.deviceName)
    o.add("meaning", m.meaning.description)
    o.add("map_id", m.mapID.description)
    o.add("tracking_started", m.trackingStarted == .unset ? nil : m.trackingStarted.description)
    o.add("tracking_ended", m.trackingEnded == .unset ? nil : m.trackingEnded.description)
    o.add("last_merged_stream", m.lastMergedStream.isNone ? nil : m.lastMergedStream.description)
    o.add("merged_as_of", m.mergedAsOf == .unset ? nil : m.mergedAsOf.description)
    o.add("merged_as_of_generation", m.mergedAsOfGeneration.isNone ? nil : m.mergedAsOfGeneration.description)
    o.add("block_size", UInt64(g.blockSize))
    o.add("device_size", g.deviceSize)
    o.add("block_count", g.blockCount)
    o.add("set_blocks", set)
    o.add("set_bytes", m.setBytes)
    o.add("percent", number: percent(set, g.blockCount))
    let out = TextOutput()
    if json {
      try out.line(o.render())
    } else {
      try out.line("device_name \(m.deviceName)")
      try out.line("meaning \(m.meaning)")
      try out.line("map_id \(m.mapID)")
      try out.line("tracking_started \(m.trackingStarted)")
      try out.line("last_merged_stream \(m.lastMergedStream.isNone ? "none" : m.lastMergedStream.description)")
      try out.line("block_size \(g.blockSize)")
      try out.line("device_size \(g.deviceSize)")
      try out.line("block_count \(g.blockCount)")
      try out.line("set_blocks \(set)")
      try out.line("set_bytes \(m.setBytes)")
      try out.line("percent \(percent(set, g.blockCount))")
    }
    try out.flush()
  }
}

func percent(_ part: UInt64, _ whole: UInt64) -> String {
  if whole == 0 { return "0.0" }
  // Never round a nearly complete map up to 100 or a nearly empty one down to 0.
  var p = Double(part) * 100 / Double(whole)
  if part < whole { p = min(p, 99.9) }
  if part > 0 { p = max(p, 0.1) }
  return formatFixed(p, digits: 1)
}

extension String {
  func padding(to width: Int) -> String {
    count >= width ? self + " " : self + String(repeating: " ", count: width - count)
  }
}
