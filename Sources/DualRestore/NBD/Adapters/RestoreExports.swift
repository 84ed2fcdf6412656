// The NBD exports of a running restore: the primary itself (read-through,
// mirrored writes), and `merge`, through which merge-snapshot lands a
// shipped snapshot where the map says not current.

public final class RestoreExport: NBDExport, Sendable {
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
  public func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan? {
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

  public func flush() throws { try engine.clientFlush() }

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

public final class MergeExport: NBDExport, Sendable {
  let engine: RestoreEngine
  /// The stream this connection merges, once admitted (dualrestore-merge(5)).
  let stream: ID128?
  public let name = MergeExportName.exportName
  public var description: String {
    "merge a snapshot into \(engine.primary.path) where the overwrite map says not current"
  }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 { NBD.flagSendFlush | NBD.flagSendWriteZeroes | NBD.flagSendTrim }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }

  public init(engine: RestoreEngine) {
    self.engine = engine
    self.stream = nil
  }

  init(engine: RestoreEngine, stream: ID128) {
    self.engine = engine
    self.stream = stream
  }

  /// `merge` alone takes blocks from any writer. merge-snapshot names the
  /// stream it merges so the server can make the checks a map allows,
  /// counts what it does with the stream's blocks, and after a whole stream
  /// records it and says what it did (MergeExportName).
  public func bind(name: String) throws -> NBDExport {
    let asked: MergeExportName
    do {
      asked = try MergeExportName(parsing: name)
    } catch {
      throw NBDError(NBD.errInvalid, error.description)
    }
    switch asked {
    case .any:
      return self
    case .admit(let admission):
      try engine.admitMerge(admission)
      return MergeExport(engine: engine, stream: admission.stream)
    case .report(let id):
      return MergeReportExport(report: try engine.mergeReport(stream: id))
    case .complete(let id):
      return MergeReportExport(report: try engine.recordMerged(stream: id))
    }
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try engine.read(into: buffer, at: offset)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try engine.mergeWrite(buffer, at: offset, stream: stream)
    if fua { try engine.flush() }
  }

  /// A merge flushes at its checkpoints and at its end: say where it stands.
  public func flush() throws {
    try engine.flush()
    let counted = engine.counters
    engine.log(
      "merge: \(counted.mergedBlocks) block(s) merged, \(counted.mergeSkippedBlocks) skipped as current (newer than the snapshot)"
    )
  }

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.mergeZeroes(offset: offset, length: length, stream: stream)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.mergeZeroes(offset: offset, length: length, stream: stream)
    if fua { try engine.flush() }
  }
}

/// The server's report on one stream's merge (`merge;report=ID`,
/// `merge;complete=ID`): a read-only export whose bytes are the report.
final class MergeReportExport: NBDExport, Sendable {
  let bytes: [UInt8]
  let name = MergeExportName.exportName
  var description: String { "what the merge export did with the blocks of one stream" }
  var size: UInt64 { UInt64(bytes.count) }
  var flags: UInt16 { NBD.flagReadOnly }
  var preferredBlockSize: UInt32 { 512 }

  init(report: MergeReport) { bytes = report.encoded }

  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard offset <= size, UInt64(buffer.count) <= size - offset else {
      throw NBDError(NBD.errInvalid, "the report has \(size) bytes")
    }
    bytes.withUnsafeBytes { all in
      buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: all[Int(offset)..<Int(offset) + buffer.count]))
    }
  }

  private func readOnly() -> NBDError { NBDError(NBD.errPerm, "the merge report is read-only") }
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws { throw readOnly() }
  func flush() throws {}
  func trim(offset: UInt64, length: UInt64, fua: Bool) throws { throw readOnly() }
  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws { throw readOnly() }
}
