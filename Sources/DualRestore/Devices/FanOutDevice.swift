// Several far copies behind one device, for synchronous mirroring (--ack
// all) to more than one: reads and block status come from the first (the
// backup a restore reads from); writes, zeros, trims and flushes go to every
// copy at once and return when all have answered, so a write or flush waits
// for the slowest copy's round trip, not for the sum of them.
//
// Invariants:
// - A change is acknowledged only when every copy took it; when one fails,
//   the others still got it (they are not rolled back), and the failure is
//   the caller's to handle (the restore engine owes the blocks to the
//   backup and sends them again to every copy).

public final class FanOutDevice: BlockDevice, Sendable {
  public let copies: [BlockDevice]
  private let offload: Offload

  public init(_ copies: [BlockDevice]) {
    precondition(!copies.isEmpty)
    self.copies = copies
    offload = Offload(threads: 32 * max(0, copies.count - 1) + 1)
  }

  public var name: String { copies.map(\.name).joined(separator: ", ") }
  public var size: UInt64 { copies[0].size }
  public var capabilities: DeviceCapabilities { copies[0].capabilities }
  public var maximumRequest: Int { copies.map(\.maximumRequest).min() ?? copies[0].maximumRequest }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try copies[0].read(into: buffer, at: offset)
  }

  public func read(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    try copies[0].read(at: offset, length: length, toFile: fd)
  }

  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    try copies[0].allocation(from: offset, length: length)
  }

  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { copies[0].dataRegion(at: offset) }

  /// Runs `body` on every copy at once (the first on this thread); throws
  /// the first copy's error in copy order once all have answered.
  private func everywhere(_ body: @escaping (BlockDevice) throws -> Void) throws {
    if copies.count == 1 { return try body(copies[0]) }
    let errors = copies.dropFirst().map { _ in ErrorBox() }
    let jobs = zip(copies.dropFirst(), errors).map { copy, box in
      offload.start {
        do { try body(copy) } catch { box.set(error) }
      }
    }
    var first: Error?
    do { try body(copies[0]) } catch { first = error }
    for j in jobs { j.wait() }
    if let first { throw first }
    if let e = errors.lazy.compactMap(\.error).first { throw e }
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    let data = Unchecked(buffer)
    try everywhere { try $0.write(data.value, at: offset, fua: fua) }
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try everywhere { try $0.writeZeroes(offset: offset, length: length, fua: fua) }
  }

  public func trim(offset: UInt64, length: UInt64) throws {
    try everywhere { try $0.trim(offset: offset, length: length) }
  }

  public func flush() throws {
    try everywhere { try $0.flush() }
  }

  public func close() {
    for c in copies { c.close() }
  }
}
