// An NBD client as a block device: the backup of a restore, a merge target
// (the `merge` export of a running restore-read-through), a source to read.

extension NBDClient {
  public var capabilities: DeviceCapabilities {
    var c: DeviceCapabilities = [.splicesIntoFile]
    if !isReadOnly { c.insert(.writable) }
    if canFlush { c.insert(.flush) }
    if canFUA { c.insert(.fua) }
    if canTrim { c.insert(.trim) }
    if canWriteZeroes { c.insert(.writeZeroes) }
    if hasAllocation { c.insert(.reportsHoles) }
    return c
  }

  /// Spliced from the connection; a failed write to the file is
  /// FileWriteError (the connection goes on).
  public func read(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    try read(at: offset, length: length, toFile: fd, at: offset)
  }

  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    hasAllocation ? try allocation(offset: offset, length: length) : nil
  }
}

/// Several connections to one backup export, used in turn, so that more
/// requests are in flight at the backup than one connection's server
/// threads take (NBD multi-conn). Flushes go to every connection.
public final class MultiConnectionLink: BlockDevice, Sendable {
  public let connections: [NBDClient]
  /// The connection used last.
  private let index = Locked(0)

  private let uri: String
  private let timeout: Double
  /// A connection of its own for block status, opened when first asked
  /// for (hydration): nil when the backup does not give base:allocation.
  private struct StatusConnection {
    var client: NBDClient?
    var tried = false
  }
  private let status = Locked(StatusConnection())

  public init(uri: String, timeout: Double, count: Int) throws {
    var list: [NBDClient] = []
    for _ in 0..<max(1, count) { list.append(try NBDClient(uri: uri, timeout: timeout)) }
    connections = list
    self.uri = uri
    self.timeout = timeout
  }

  public var name: String { connections[0].name }
  public var size: UInt64 { connections[0].size }
  public var maximumRequest: Int { connections[0].maximumRequest }
  /// The connections' own, and holes when a connection for block status
  /// can be made (`allocation(from:length:)` is nil when the backup gives
  /// no base:allocation).
  public var capabilities: DeviceCapabilities { connections[0].capabilities.union(.reportsHoles) }

  private func pick() -> NBDClient {
    index.withLock {
      $0 = ($0 + 1) % connections.count
      return connections[$0]
    }
  }

  /// Runs a request on the next connection. When the server says it is
  /// shutting down, every connection leaves it (the others would otherwise
  /// sit idle and keep a stopping server waiting).
  private func run<T>(_ c: NBDClient, _ body: (NBDClient) throws -> T) throws -> T {
    do {
      return try body(c)
    } catch {
      if c.takeShutdownSeen() {
        for other in connections { other.disconnectWhenIdle() }
        status.withLock { $0.client }?.disconnectWhenIdle()
      }
      throw error
    }
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try run(pick()) { try $0.read(into: buffer, at: offset) }
  }

  public func read(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    try run(pick()) { try $0.read(at: offset, length: length, toFile: fd) }
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try run(pick()) { try $0.write(buffer, at: offset, fua: fua) }
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try run(pick()) { try $0.writeZeroes(offset: offset, length: length, fua: fua) }
  }

  public func trim(offset: UInt64, length: UInt64) throws {
    try run(pick()) { try $0.trim(offset: offset, length: length) }
  }

  /// Throws when the status connection cannot be made (it is tried again
  /// at the next call); nil when the backup gives no base:allocation.
  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    let client = try status.withLock { s throws -> NBDClient? in
      if !s.tried {
        let c = try NBDClient(uri: uri, timeout: timeout, allocation: true)
        s.tried = true
        if c.hasAllocation { s.client = c } else { c.close() }
      }
      return s.client
    }
    guard let client else { return nil }
    return try run(client) { try $0.allocation(offset: offset, length: length) }
  }

  /// A completed write may have gone over any connection: a server that
  /// offers multi-conn makes a flush on one cover them all (NBD's
  /// NBD_FLAG_CAN_MULTI_CONN); any other is flushed on each.
  public func flush() throws {
    if connections[0].flags & NBD.flagCanMultiConn != 0 { return try run(pick()) { try $0.flush() } }
    for c in connections { try run(c) { try $0.flush() } }
  }

  /// Ends every connection, the block status one too, with NBD_CMD_DISC.
  public func close() {
    for c in connections { c.close() }
    status.withLock {
      $0.tried = true
      return $0.client
    }?.close()
  }
}

/// A far copy that need not answer when the server starts: its connections
/// are made at its first request, and again at the next request after an
/// attempt failed. Until then every request fails, which the journal's
/// shipper takes as the copy being unreachable (it keeps what the copy
/// lacks and tries again). The copy must have the expected size.
public final class DeferredLink: BlockDevice, Sendable {
  public let name: String
  public let size: UInt64
  private let uri: String
  private let timeout: Double
  private let count: Int
  private let link = Locked<MultiConnectionLink?>(nil)

  public init(uri: String, timeout: Double, count: Int, size: UInt64) throws {
    name = try NBDURI(uri).text
    self.uri = uri
    self.timeout = timeout
    self.count = count
    self.size = size
  }

  private func connected() throws -> MultiConnectionLink {
    if let l = link.withLock({ $0 }) { return l }
    let l = try MultiConnectionLink(uri: uri, timeout: timeout, count: count)
    guard l.size == size else {
      l.close()
      throw ToolkitError("the far copy \(name) has \(l.size) bytes, not the \(size) of the device it copies")
    }
    return link.withLock { existing in
      if let e = existing {
        l.close()
        return e
      }
      existing = l
      return l
    }
  }

  public var capabilities: DeviceCapabilities { link.withLock { $0 }?.capabilities ?? [.writable, .flush] }
  public var maximumRequest: Int { link.withLock { $0 }?.maximumRequest ?? (32 << 20) }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try connected().read(into: buffer, at: offset)
  }

  public func read(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    try connected().read(at: offset, length: length, toFile: fd)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try connected().write(buffer, at: offset, fua: fua)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try connected().writeZeroes(offset: offset, length: length, fua: fua)
  }

  public func trim(offset: UInt64, length: UInt64) throws {
    try connected().trim(offset: offset, length: length)
  }

  public func flush() throws { try connected().flush() }

  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    try connected().allocation(from: offset, length: length)
  }

  public func close() { link.withLock { $0 }?.close() }
}
