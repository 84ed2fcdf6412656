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
  /// (Not while writes staged for the device touch the range: the read
  /// lays them over the device's bytes.)
  public func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan? {
    if let staging = engine.staging, staging.overlaps(offset, UInt64(length)) { return nil }
    return FileSpan(fd: engine.device.pageCacheFD, offset: offset)
  }

  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    if let staging = engine.staging, staging.overlaps(offset, UInt64(length)) {
      return [Extent(length: length, flags: 0)]
    }
    return engine.device.allocation(offset: offset, length: length, limit: limit)
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

/// A point of the history, read-only: `point` is the newest, `point;N`
/// point N, `point;at=INSTANT` the newest at or before an RFC 3339 instant
/// in UTC. A client is bound to the point it asked for; once retention
/// trims it, its reads fail with EIO rather than read another point.
public final class PointExport: NBDExport, Sendable {
  let engine: TrackingEngine
  /// The point a connected client reads; nil for the export as listed.
  let point: UInt64?
  public let name = "point"
  public var description: String {
    guard let h = engine.history else { return "no history" }
    guard let n = point ?? h.newest else { return "no point yet" }
    return "\(canonicalPath(engine.device.path)) as it was at point \(n)"
  }
  public var size: UInt64 { engine.geometry.deviceSize }
  public var flags: UInt16 { NBD.flagReadOnly | NBD.flagSendFlush | NBD.flagCanMultiConn }
  public var preferredBlockSize: UInt32 { engine.geometry.blockSize }
  public var isOffered: Bool { engine.history?.newest != nil }

  public init(engine: TrackingEngine) {
    self.engine = engine
    self.point = nil
  }

  init(engine: TrackingEngine, point: UInt64) {
    self.engine = engine
    self.point = point
  }

  public func bind(name: String) throws -> NBDExport {
    guard let h = engine.history else { throw NBDError(NBD.errInvalid, "the server keeps no history") }
    let n: UInt64
    if name == self.name {
      guard let newest = h.newest else { throw NBDError(NBD.errInvalid, "the history holds no point yet") }
      n = newest
    } else {
      let parameter = String(name.dropFirst(self.name.count + 1))
      if parameter.hasPrefix("at=") {
        guard let instant = Instant(rfc3339: String(parameter.dropFirst(3))) else {
          throw NBDError(
            NBD.errInvalid, "'\(parameter.dropFirst(3))' is not an instant such as 2026-12-07T01:30:00Z")
        }
        do { n = try h.point(at: instant) } catch { throw NBDError(NBD.errInvalid, "\(error)") }
      } else {
        guard let v = UInt64(parameter) else {
          throw NBDError(NBD.errInvalid, "the export point takes a point number or at=INSTANT, not '\(parameter)'")
        }
        n = v
      }
    }
    do { try h.check(point: n) } catch { throw NBDError(NBD.errInvalid, "\(error)") }
    return PointExport(engine: engine, point: n)
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let n = point else { throw NBDError(NBD.errIO, "no point is bound") }
    do {
      try engine.readPoint(n, into: buffer, at: offset)
    } catch let e as NBDError {
      throw e
    } catch {
      throw NBDError(NBD.errIO, "\(error)")
    }
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "a point in time is read-only")
  }

  public func flush() throws {}

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "a point in time is read-only")
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    throw NBDError(NBD.errPerm, "a point in time is read-only")
  }
}
