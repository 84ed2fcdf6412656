// The NBD exports of a tracking server: the device itself (reads, tracked
// writes, flushes) and, while one is frozen, the read-only view.

public final class TrackedExport: NBDExport, Sendable {
  let engine: TrackingEngine
  public let name = "device"
  /// Absolute paths: a client that reconnects after a restart of the server
  /// compares descriptions, and the same device must read the same.
  public var description: String {
    "\(canonicalPath(engine.device.path)), writes tracked in \(canonicalPath(engine.changesPath))"
  }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 {
    NBD.flagSendFlush | NBD.flagSendFUA | NBD.flagSendTrim | NBD.flagSendWriteZeroes | NBD.flagCanMultiConn
  }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }

  public init(engine: TrackingEngine) { self.engine = engine }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try engine.read(into: buffer, at: offset)
  }

  /// Reads of the live device go from its page cache to the client.
  public func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan? {
    FileSpan(fd: engine.device.pageCacheFD, offset: offset)
  }

  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    engine.device.allocation(offset: offset, length: length, limit: limit)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try engine.write(buffer, at: offset, fua: fua)
  }

  public func flush() throws { try engine.flush() }

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.writeZeroes(offset: offset, length: length, fua: fua)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try engine.writeZeroes(offset: offset, length: length, fua: fua)
  }
}

/// The frozen view, offered only while one is held. A client is bound to
/// the view held when it connected: once that view is dropped or lost its
/// reads fail with EIO, never reading another view's (or the live
/// device's) blocks in its place.
public final class ViewExport: NBDExport, Sendable {
  let engine: TrackingEngine
  /// The view a connected client reads; nil for the export as listed.
  let view: FrozenView?
  public let name = "view"
  public var description: String {
    guard let v = view ?? engine.currentView else { return "no frozen view" }
    return "\(canonicalPath(engine.device.path)) as frozen at \(v.frozen) (view \(v.id))"
  }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 { NBD.flagReadOnly | NBD.flagSendFlush | NBD.flagCanMultiConn }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }
  public var isOffered: Bool { engine.currentView.map { !$0.isLost } ?? false }

  public init(engine: TrackingEngine) {
    self.engine = engine
    self.view = nil
  }

  init(engine: TrackingEngine, view: FrozenView) {
    self.engine = engine
    self.view = view
  }

  public func bind(name: String) throws -> NBDExport {
    guard name == self.name else { throw NBDError(NBD.errInvalid, "the export view takes no parameters") }
    guard let v = engine.currentView else {
      throw NBDError(NBD.errInvalid, "no view is frozen; run tracking-server freeze first")
    }
    if let lost = v.status.lost {
      throw NBDError(NBD.errIO, "the frozen view \(v.id) is lost: \(lost); drop it and freeze anew")
    }
    return ViewExport(engine: engine, view: v)
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let v = view, !v.isLost else {
      throw NBDError(NBD.errIO, "the frozen view this client opened was dropped")
    }
    try engine.readView(v, into: buffer, at: offset)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "the frozen view is read-only")
  }

  public func flush() throws {}

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "the frozen view is read-only")
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "the frozen view is read-only")
  }
}
