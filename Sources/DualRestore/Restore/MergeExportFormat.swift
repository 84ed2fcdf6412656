// The `merge` export of a running restore-read-through, as merge-snapshot
// speaks to it (dualrestore-merge(5)): what an export name asks for, and the
// report the server gives back at the end of a merge.
//
// Export names (NBD_OPT_GO/INFO, up to 4096 bytes, fields in any order):
//   merge                                        any writer; no checks
//   merge;stream=ID;base=ID|none;started=NS;skew=NS;force=0|1
//                                                admit one stream's merge
//   merge;report=ID                              read what the server did
//   merge;complete=ID                            record the stream merged
//                                                whole, then as report=ID
// ID is 32 hex digits, NS a signed decimal count of nanoseconds.
//
// The report (`report=`, `complete=`) is a read-only export of 72 bytes,
// little-endian:
//   offset size  field
//        0    8  magic "DRMERGE\n"
//        8    2  version, 1
//       10    2  length of the report, 72
//       12    4  flags, 0 (bit 0: the stream is recorded as merged whole)
//       16   16  stream id
//       32    8  data blocks written
//       40    8  zero blocks written
//       48    8  blocks left alone as current (newer than the stream)
//       56    8  bytes written
//       64    4  reserved, 0
//       68    4  CRC-32C of bytes 0..<68
// The counts cover what the server did with the stream's blocks since its
// merge was last admitted (one merge-snapshot run; a re-run counts afresh). A reader refuses another magic, a version it does not know, a
// wrong length and a wrong CRC; it ignores flag bits it does not know.

import CShim

/// What a client asks of the `merge` export by the name it gives.
public enum MergeExportName: Equatable, Sendable {
  /// Blocks from any writer, without identity checks.
  case any
  /// The merge of one stream, checked against the server's map first.
  case admit(MergeAdmission)
  /// The server's counts for a stream merged through it.
  case report(ID128)
  /// Record the stream as merged whole, then report.
  case complete(ID128)

  public static let exportName = "merge"
  /// NBD's limit on an export name.
  public static let maximumLength = 4096

  /// The export name that asks for this.
  public var encoded: String {
    switch self {
    case .any:
      return Self.exportName
    case .admit(let a):
      let base = a.base.isNone ? "none" : a.base.description
      return
        "\(Self.exportName);stream=\(a.stream);base=\(base);started=\(a.started.nanosecondsSinceEpoch);"
        + "skew=\(a.skew);force=\(a.force ? 1 : 0)"
    case .report(let id):
      return "\(Self.exportName);report=\(id)"
    case .complete(let id):
      return "\(Self.exportName);complete=\(id)"
    }
  }

  /// Reads an export name; the error is the sentence to refuse it with.
  public init(parsing name: String) throws(MergeExportNameError) {
    guard name.utf8.count <= Self.maximumLength else { throw .init("the export name is too long") }
    var parts = name.split(separator: ";", omittingEmptySubsequences: false)[...]
    guard parts.popFirst() == Substring(Self.exportName) else {
      throw .init("'\(name.prefix(64))' is not the merge export")
    }
    if parts.isEmpty {
      self = .any
      return
    }
    var fields: [Substring: Substring] = [:]
    for part in parts {
      let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
      guard kv.count == 2, !kv[0].isEmpty else {
        throw .init("'\(part.prefix(64))' in the export name is not KEY=VALUE")
      }
      guard fields.updateValue(kv[1], forKey: kv[0]) == nil else {
        throw .init("\(kv[0].prefix(64)) is given twice in the export name")
      }
    }
    func id(_ key: Substring, noneAllowed: Bool = false) throws(MergeExportNameError) -> ID128 {
      guard let text = fields[key] else { throw .init("the export name lacks \(key)=ID") }
      if noneAllowed && text == "none" { return .none }
      guard let v = ID128(hex: String(text)), !v.isNone else {
        throw .init("\(key)=\(text.prefix(64)) is not a stream id")
      }
      return v
    }
    func only(_ keys: Set<Substring>) throws(MergeExportNameError) {
      if let extra = fields.keys.first(where: { !keys.contains($0) }) {
        throw .init("\(extra.prefix(64)) is not a field of this merge export name")
      }
    }
    if fields["complete"] != nil {
      try only(["complete"])
      self = .complete(try id("complete"))
    } else if fields["report"] != nil {
      try only(["report"])
      self = .report(try id("report"))
    } else if fields["stream"] != nil {
      try only(["stream", "base", "started", "skew", "force"])
      guard let started = fields["started"].flatMap({ Int64($0) }) else {
        throw .init("the merge of a stream takes started=NS, the instant it started reading in nanoseconds")
      }
      let skew: Int64
      if let text = fields["skew"] {
        guard let v = Int64(text), v >= 0 else { throw .init("skew=\(text.prefix(64)) is not a count of nanoseconds") }
        skew = v
      } else {
        skew = 0
      }
      let force: Bool
      switch fields["force"] {
      case nil, "0": force = false
      case "1": force = true
      case let text?: throw .init("force=\(text.prefix(64)) is not 0 or 1")
      }
      self = .admit(
        MergeAdmission(
          stream: try id("stream"), base: fields["base"] == nil ? .none : try id("base", noneAllowed: true),
          started: Instant(nanosecondsSinceEpoch: started), skew: skew, force: force))
    } else {
      throw .init("the merge export takes stream=ID and started=NS, report=ID or complete=ID")
    }
  }
}

/// The identity of a stream whose merge a client asks the server to admit.
public struct MergeAdmission: Equatable, Sendable {
  public var stream: ID128
  /// The stream it applies on top of; `.none` for a full stream.
  public var base: ID128
  /// When the stream started reading its source.
  public var started: Instant
  /// Nanoseconds the stream must have started after the map's tracking.
  public var skew: Int64
  /// Merge even when the time or base check fails (logged by the server).
  public var force: Bool

  public init(stream: ID128, base: ID128, started: Instant, skew: Int64, force: Bool) {
    self.stream = stream
    self.base = base
    self.started = started
    self.skew = skew
    self.force = force
  }
}

/// Why an export name was refused: one sentence.
public struct MergeExportNameError: Error, CustomStringConvertible, Sendable {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// What the server did with the blocks of one stream.
public struct MergeReport: Equatable, Sendable {
  public var stream: ID128
  /// The server recorded the stream as merged whole.
  public var recorded = false
  public var dataBlocks: UInt64 = 0
  public var zeroBlocks: UInt64 = 0
  /// Blocks left alone: the map marks them current, newer than the stream.
  public var skippedCurrent: UInt64 = 0
  public var bytesWritten: UInt64 = 0

  public static let magic: [UInt8] = Array("DRMERGE\n".utf8)
  public static let version: UInt16 = 1
  public static let length = 72

  public init(stream: ID128) { self.stream = stream }

  public var encoded: [UInt8] {
    var w = ByteWriter()
    w.raw(Self.magic)
    w.u16(Self.version)
    w.u16(UInt16(Self.length))
    w.u32(recorded ? 1 : 0)
    w.id(stream)
    w.u64(dataBlocks)
    w.u64(zeroBlocks)
    w.u64(skippedCurrent)
    w.u64(bytesWritten)
    w.u32(0)
    let crc = w.bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, $0.count) }
    w.u32(crc)
    return w.bytes
  }

  /// Reads a report; the error is one sentence on what is wrong with it.
  public init(decoding bytes: ArraySlice<UInt8>) throws(MergeReportError) {
    guard bytes.count == Self.length else {
      throw .init("it has \(bytes.count) bytes, not \(Self.length)")
    }
    guard bytes.prefix(8).elementsEqual(Self.magic) else { throw .init("it does not start with the report's magic") }
    let crc = bytes.withUnsafeBytes { dr_crc32c(0, $0.baseAddress, Self.length - 4) }
    var r = ByteReader(bytes)
    _ = r.take(8)
    guard let version = r.u16(), let length = r.u16(), let flags = r.u32(), let id = r.id(),
      let data = r.u64(), let zero = r.u64(), let skipped = r.u64(), let written = r.u64(), r.u32() != nil,
      let stored = r.u32()
    else { throw .init("it is cut short") }
    guard stored == crc else { throw .init("its CRC-32C does not match: it is damaged") }
    guard version == Self.version else { throw .init("it is of version \(version); this reader knows \(Self.version)") }
    guard Int(length) == Self.length else { throw .init("it says it has \(length) bytes, not \(Self.length)") }
    stream = id
    recorded = flags & 1 != 0
    dataBlocks = data
    zeroBlocks = zero
    skippedCurrent = skipped
    bytesWritten = written
  }
}

/// Why a merge report was refused: one sentence, after "the report ".
public struct MergeReportError: Error, CustomStringConvertible, Sendable {
  public let description: String
  init(_ description: String) { self.description = description }
}
