// The block-device seam: what every engine reads from and writes to. Image
// files and block devices (`Device`), NBD exports (`NBDClient`) and several
// connections to one export (`MultiConnectionLink`) all conform, so the
// comparison, stream, merge and restore engines name none of them.
//
// Invariants:
// - Reads and writes are positional and full-length; a range past `size` is
//   an error, never silent zeros.
// - `flush()` is the durability promise: every completed write is durable
//   when it returns; a write with `fua` is durable when it returns.
// - `capabilities` says what a device does itself; what it lacks the
//   defaults below refuse (writes of a read-only source) or do without
//   (trim and flush of a source nothing is written to).
// - A run `allocation(from:length:)` says is zero reads as zeros: callers
//   skip it.

/// What a device does itself, rather than through the caller's buffers.
public struct DeviceCapabilities: OptionSet, Sendable {
  public let rawValue: UInt32
  public init(rawValue: UInt32) { self.rawValue = rawValue }

  /// Takes writes.
  public static let writable = DeviceCapabilities(rawValue: 1 << 0)
  /// Has a write cache that `flush()` empties.
  public static let flush = DeviceCapabilities(rawValue: 1 << 1)
  /// Makes a single write durable without a whole flush.
  public static let fua = DeviceCapabilities(rawValue: 1 << 2)
  /// Discards ranges (`trim`); without it trim does nothing.
  public static let trim = DeviceCapabilities(rawValue: 1 << 3)
  /// Zeroes ranges without being sent the zeros.
  public static let writeZeroes = DeviceCapabilities(rawValue: 1 << 4)
  /// Reads a range into a file without copying it through memory here.
  public static let splicesIntoFile = DeviceCapabilities(rawValue: 1 << 5)
  /// Says which runs are holes (`allocation(from:length:)` may answer).
  public static let reportsHoles = DeviceCapabilities(rawValue: 1 << 6)
}

/// A device the engines read from and write to; handlers may be called from
/// several threads at once.
public protocol BlockDevice: AnyObject, Sendable {
  /// How errors and outputs name the device: a path or URI.
  var name: String { get }
  var size: UInt64 { get }
  var capabilities: DeviceCapabilities { get }
  /// The largest read or write the device takes in one request.
  var maximumRequest: Int { get }
  /// Reads exactly `buffer.count` bytes at `offset`.
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
  /// Reads `length` bytes at `offset` into the file `fd` at the same offset,
  /// spliced where the device `splicesIntoFile`, else through a buffer. A
  /// failed write to the file is FileWriteError; the device is unharmed.
  func read(at offset: UInt64, length: Int, toFile fd: Int32) throws
  /// Writes all of `buffer` at `offset`; with `fua`, durably before returning.
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws
  /// Makes a range read as zeros (written zeros where the device cannot
  /// zero by itself); with `fua`, durably before returning.
  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws
  /// Says a range is no longer needed (advisory); its content is undefined.
  func trim(offset: UInt64, length: UInt64) throws
  /// Makes every completed write durable.
  func flush() throws
  /// Whether `offset` lies in data or in a known hole, and where that region
  /// ends (cheap: asked once per region while reading in order).
  func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64)
  /// base:allocation of a byte range: runs from `offset` on, covering it or
  /// a first part of it, with `Extent.hole` and `Extent.zero`; nil when the
  /// device does not say.
  func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]?
  /// Ends the device's connections, once nothing is in flight on them;
  /// later requests fail. Files close with the object.
  func close()
}

extension BlockDevice {
  public var capabilities: DeviceCapabilities { [] }
  public var maximumRequest: Int { 32 << 20 }

  public func read(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    try copyThroughBuffer(at: offset, length: length, toFile: fd)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    throw DeviceError(name, .readOnly)
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    throw DeviceError(name, .readOnly)
  }

  public func trim(offset: UInt64, length: UInt64) throws {}
  public func flush() throws {}
  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) { (true, size) }
  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? { nil }
  public func close() {}

  /// `read(at:length:toFile:)` through a buffer, for devices that cannot
  /// splice.
  func copyThroughBuffer(at offset: UInt64, length: Int, toFile fd: Int32) throws {
    guard length > 0 else { return }
    let chunk = min(length, 1 << 20)
    let buffer = AlignedBuffer(count: chunk)
    var done = 0
    while done < length {
      let n = min(chunk, length - done)
      let at = offset + UInt64(done)
      try read(into: buffer.slice(0, n), at: at)
      if case .failure(let e) = pwriteFull(fd, buffer.pointer, n, at) {
        throw FileWriteError(errno: e.rawValue, offset: at, length: n)
      }
      done += n
    }
  }
}

/// A failure crossing the seam: which device, and why, with the errno where
/// there is one.
public struct DeviceError: Error, CustomStringConvertible, Equatable, Sendable {
  public enum Cause: Equatable, Sendable {
    /// The system or the far end failed with this errno.
    case io(Int32)
    case noSpace
    case readOnly
    case outOfRange
    case timedOut
    case closed
    /// The far end refused, in its own words.
    case refused(String)
    /// The request makes no sense; the sentence says why.
    case invalid(String)
  }

  public let device: String
  public let cause: Cause
  /// What was being done, when the cause alone does not say.
  public let doing: String?

  public init(_ device: String, _ cause: Cause, _ doing: String? = nil) {
    self.device = device
    self.cause = cause
    self.doing = doing
  }

  public var description: String {
    let what: String
    switch cause {
    case .io(let e): what = Errno(e).description
    case .noSpace: what = "no space left"
    case .readOnly: what = "opened read-only"
    case .outOfRange: what = "the range is past the end"
    case .timedOut: what = "timed out"
    case .closed: what = "closed"
    case .refused(let words): what = "refused: \(words)"
    case .invalid(let sentence): what = sentence
    }
    if let doing { return "\(device): \(doing): \(what)" }
    return "\(device): \(what)"
  }
}

/// An error that stands for a cause of the seam, so that an adapter (the NBD
/// server's) maps it to its own codes without knowing its type.
public protocol DeviceFailure: Error {
  var deviceCause: DeviceError.Cause { get }
}

extension DeviceError: DeviceFailure {
  public var deviceCause: Cause { cause }
}

/// A range read from a device could not be written to the file it was read
/// into (`read(at:length:toFile:)`); the device is unharmed.
public struct FileWriteError: Error, CustomStringConvertible, Sendable {
  public let errno: Int32
  /// The device's range whose data was being written.
  public let offset: UInt64
  public let length: Int

  public init(errno: Int32, offset: UInt64, length: Int) {
    self.errno = errno
    self.offset = offset
    self.length = length
  }

  public var description: String { "cannot write \(length) bytes read at \(offset): \(Errno(errno))" }
}

/// A run of base:allocation: `length` bytes with the same flags.
public struct Extent: Equatable, Sendable {
  public var length: UInt32
  public var flags: UInt32
  public init(length: UInt32, flags: UInt32) {
    self.length = length
    self.flags = flags
  }

  /// The run is not allocated (the same bit as NBD_STATE_HOLE).
  public static let hole: UInt32 = 1 << 0
  /// The run reads as zeros (the same bit as NBD_STATE_ZERO).
  public static let zero: UInt32 = 1 << 1
}

extension Array where Element == Extent {
  /// Appends `run`, joined to the last run when their flags agree; false
  /// (nothing appended) when that would make more than `limit` runs.
  mutating func append(joining run: Extent, limit: Int) -> Bool {
    if let last = self.last, last.flags == run.flags {
      self[count - 1].length += run.length
      return true
    }
    guard count < limit else { return false }
    append(run)
    return true
  }
}
