// The NBD exports of a running restore: the primary itself (read-through,
// mirrored writes), and `merge`, through which merge-snapshot lands a
// shipped snapshot where the map says not current.

public final class RestoreExport: NBDExport, @unchecked Sendable {
  let engine: RestoreEngine
  public let name = "primary"
  public var description: String { "\(canonicalPath(engine.primary.path)), restored from \(engine.backup.name)" }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 {
    NBD.flagSendFlush | NBD.flagSendFUA | NBD.flagSendTrim | NBD.flagSendWriteZeroes | NBD.flagCanMultiConn
  }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }

  public init(engine: RestoreEngine) { self.engine = engine }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    engine.beginRequest()
    defer { engine.endRequest() }
    try engine.read(into: buffer, at: offset)
  }

  /// Replies go from the primary's page cache once the range is current:
  /// a cold read's data is copied once here (from the backup's connection
  /// into the primary, spliced), not through a buffer and to the client.
  public func fileSpan(offset: UInt64, length: Int) throws -> FileSpan? {
    engine.beginRequest()
    defer { engine.endRequest() }
    try engine.makeCurrent(offset: offset, length: UInt64(length))
    return FileSpan(fd: engine.primary.pageCacheFD, offset: offset)
  }

  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    engine.beginRequest()
    defer { engine.endRequest() }
    return engine.allocation(offset: offset, length: length, limit: limit)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    engine.beginRequest()
    defer { engine.endRequest() }
    try engine.write(buffer, at: offset, fua: fua)
  }

  public func flush() throws { try engine.flush() }

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    engine.beginRequest()
    defer { engine.endRequest() }
    try engine.writeZeroes(offset: offset, length: length, fua: fua)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    engine.beginRequest()
    defer { engine.endRequest() }
    try engine.writeZeroes(offset: offset, length: length, fua: fua)
  }
}

public final class MergeExport: NBDExport, @unchecked Sendable {
  let engine: RestoreEngine
  public let name = "merge"
  public var description: String {
    "merge a snapshot into \(engine.primary.path) where the overwrite map says not current"
  }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 { NBD.flagSendFlush | NBD.flagSendWriteZeroes | NBD.flagSendTrim }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }

  public init(engine: RestoreEngine) { self.engine = engine }

  /// `merge` alone takes blocks from any writer. merge-snapshot names the
  /// stream it merges so the server can make the checks a map allows:
  /// `merge;stream=ID;base=ID;started=NS;skew=NS;force=0|1` before the
  /// merge (refused when the stream does not fit), and
  /// `merge;complete=ID` after a whole stream, to record it.
  public func bind(name: String) throws -> NBDExport {
    guard name != self.name else { return self }
    var fields: [String: String] = [:]
    for part in name.split(separator: ";").dropFirst() {
      let kv = part.split(separator: "=", maxSplits: 1)
      guard kv.count == 2 else { throw NBDError(NBD.errInvalid, "'\(part)' in the export name is not KEY=VALUE") }
      fields[String(kv[0])] = String(kv[1])
    }
    func id(_ key: String) throws -> ID128 {
      guard let text = fields[key] else { return .none }
      if text == "none" { return .none }
      guard let v = ID128(hex: text) else { throw NBDError(NBD.errInvalid, "\(key)=\(text) is not a stream id") }
      return v
    }
    if fields["complete"] != nil {
      try engine.recordMerged(stream: try id("complete"))
      return self
    }
    guard fields["stream"] != nil, let started = fields["started"].flatMap({ Int64($0) }) else {
      throw NBDError(NBD.errInvalid, "the merge export takes stream=ID and started=NS, or complete=ID")
    }
    try engine.admitMerge(
      stream: try id("stream"), base: try id("base"), started: Instant(nanosecondsSinceEpoch: started),
      skew: fields["skew"].flatMap { Int64($0) } ?? 0, force: fields["force"] == "1")
    return self
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try engine.read(into: buffer, at: offset)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try engine.mergeWrite(buffer, at: offset)
    if fua { try engine.flush() }
  }

  /// A merge flushes at its checkpoints and at its end: say where it stands.
  public func flush() throws {
    try engine.flush()
    engine.log(
      "merge: \(engine.mergedBlocks) block(s) merged, \(engine.mergeSkippedBlocks) skipped as current (newer than the snapshot)"
    )
  }

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.mergeZeroes(offset: offset, length: length)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.mergeZeroes(offset: offset, length: length)
    if fua { try engine.flush() }
  }
}
