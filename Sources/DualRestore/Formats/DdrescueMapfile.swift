// GNU ddrescue mapfiles, the text lingua franca for "which bytes are done".
//
//   # comment lines
//   0x00000000     +     1          <- status line: current pos, status, pass
//   #      pos        size  status
//   0x00000000  0x00010000  +       <- data lines: sorted, not overlapping
//
// Positions and sizes are hexadecimal with 0x, or decimal. A mapfile records
// no device identity (ddrescue's own manual warns about it); a map imported
// from one gets its identity from the import's options.

public enum DdrescueMapfile {
  public struct Extent: Equatable, Sendable {
    public var position: UInt64
    public var size: UInt64
    public var status: Character
  }

  static let statuses: Set<Character> = ["?", "*", "/", "-", "+"]

  /// Parses a mapfile's data lines.
  public static func parse(_ text: String, name: String) throws -> [Extent] {
    var extents: [Extent] = []
    var sawStatusLine = false
    var lineNumber = 0
    var end: UInt64 = 0
    // "\r\n" is one Character in Swift: split on every kind of line end.
    for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
      lineNumber += 1
      let line = rawLine.trimmingWhitespace()
      if line.isEmpty || line.hasPrefix("#") { continue }
      let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
      if !sawStatusLine {
        guard fields.count >= 2, parseNumber(fields[0]) != nil else {
          throw ToolkitError.path(name, "line \(lineNumber): expected the status line 'pos status [pass]'")
        }
        sawStatusLine = true
        continue
      }
      guard fields.count >= 3, let pos = parseNumber(fields[0]), let size = parseNumber(fields[1]),
        fields[2].count == 1, let status = fields[2].first, statuses.contains(status)
      else {
        throw ToolkitError.path(name, "line \(lineNumber): expected 'pos size status' with status one of ?*/-+")
      }
      guard pos >= end else {
        throw ToolkitError.path(name, "line \(lineNumber): position \(pos) overlaps or precedes the line before")
      }
      let (e, overflow) = pos.addingReportingOverflow(size)
      guard !overflow else { throw ToolkitError.path(name, "line \(lineNumber): extent overflows") }
      if size > 0 { extents.append(Extent(position: pos, size: size, status: status)) }
      end = e
    }
    guard sawStatusLine else { throw ToolkitError.path(name, "not a ddrescue mapfile (no status line)") }
    return extents
  }

  static func parseNumber(_ s: Substring) -> UInt64? {
    if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt64(s.dropFirst(2), radix: 16) }
    return UInt64(s)
  }

  /// The blocks whose bytes have one of `statuses`: every byte of the block
  /// (`anyByte` false, the safe choice for "current"), or at least one.
  public static func bitmap(
    _ extents: [Extent], geometry: BlockGeometry, statuses: Set<Character>, anyByte: Bool
  ) -> BlockBitmap {
    var bits = BlockBitmap(count: geometry.blockCount)
    let mask = UInt64(geometry.blockSize) - 1
    let shift = geometry.blockShift
    // Merge adjacent selected extents so that a block split between two
    // selected lines still counts as wholly covered.
    var runs: [(UInt64, UInt64)] = []
    for e in extents where statuses.contains(e.status) {
      let start = min(e.position, geometry.deviceSize)
      let end = min(e.position + e.size, geometry.deviceSize)
      if start >= end { continue }
      if let last = runs.last, last.1 == start {
        runs[runs.count - 1].1 = end
      } else {
        runs.append((start, end))
      }
    }
    for (start, end) in runs {
      let first: UInt64
      let last: UInt64
      if anyByte {
        first = start >> shift
        last = (end + mask) >> shift
      } else {
        first = (start + mask) >> shift
        last = end == geometry.deviceSize ? geometry.blockCount : end >> shift
      }
      if first < last { bits.set(first..<last) }
    }
    return bits
  }

  /// A mapfile with one line per run: set blocks get `setStatus`, clear ones `clearStatus`.
  public static func render(_ map: BlockMap, setStatus: Character, clearStatus: Character, tool: String) -> String {
    var out = "# Mapfile. Created by \(tool) from a dualrestore map\n"
    out += "# device: \(map.deviceName.isEmpty ? "(unnamed)" : map.deviceName)\n"
    out += "# map id: \(map.mapID), meaning of \(setStatus): \(map.meaning)\n"
    out += "# current_pos  current_status  current_pass\n"
    out += "0x00000000     +               1\n"
    out += "#      pos        size  status\n"
    let g = map.geometry
    var position: UInt64 = 0
    var isSet = false
    while position < g.blockCount {
      let end = (isSet ? map.bits.nextClear(from: position) : map.bits.nextSet(from: position)) ?? g.blockCount
      if end > position {
        let (offset, length) = g.byteRange(blocks: position, count: end - position)
        out += "\(hex(offset))  \(hex(length))  \(isSet ? setStatus : clearStatus)\n"
      }
      position = end
      isSet.toggle()
    }
    return out
  }

  static func hex(_ v: UInt64) -> String {
    let digits = String(v, radix: 16, uppercase: true)
    return "0x" + String(repeating: "0", count: max(0, 8 - digits.count)) + digits
  }
}
