// The export of snapshot-server: a chain of stored streams, read-only, as
// the device at the chain's end. Several connections may read it at once
// (multi-conn): nothing changes under them.

public final class ChainExport: NBDExport, Sendable {
  public let device: ChainDevice
  public let name: String
  public var description: String {
    "\(device.chain.streams.count) stored stream(s) ending with \(device.chain.name), read-only"
  }
  public var size: UInt64 { device.size }
  public var flags: UInt16 { NBD.flagReadOnly | NBD.flagCanMultiConn }
  public var preferredBlockSize: UInt32 { device.chain.geometry.blockSize }

  public init(device: ChainDevice, name: String = "chain") {
    self.device = device
    self.name = name
  }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    try device.read(into: buffer, at: offset)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    throw DeviceError(name, .readOnly)
  }

  public func flush() throws {}

  public func trim(offset: UInt64, length: UInt64, fua: Bool) throws { throw DeviceError(name, .readOnly) }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws { throw DeviceError(name, .readOnly) }

  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    device.chain.allocation(offset: offset, length: length, limit: limit)
  }
}
