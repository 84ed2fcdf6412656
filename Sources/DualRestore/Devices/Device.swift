// A source or target: an image file or a raw block device, opened once.
//
// Invariants:
// - Reads and writes are positional and full-length: short transfers and
//   EINTR are retried; a read past the end is an error, never silent zeros.
// - `sync()` is the only durability promise (fdatasync); callers that promise
//   durability call it before they record anything as done.
// - A block device opened for writing is opened O_EXCL, so a mounted or
//   otherwise claimed device is refused by the kernel.
// - Holes of image files are found with SEEK_DATA/SEEK_HOLE; reading them is
//   left to the caller's choice (`dataRegion(at:)`).

import CShim
import Glibc

/// How a device is opened.
public struct DeviceOpenOptions: Sendable {
  public var writable: Bool
  /// O_DIRECT: bypass the page cache. Buffers, offsets and lengths must then
  /// be multiples of `alignment` (see `Device.alignment`).
  public var direct: Bool
  /// Create a regular file of this size if `path` does not exist.
  public var createSize: UInt64?

  public init(writable: Bool = false, direct: Bool = false, createSize: UInt64? = nil) {
    self.writable = writable
    self.direct = direct
    self.createSize = createSize
  }

  public static let readOnly = DeviceOpenOptions()
  public static let readWrite = DeviceOpenOptions(writable: true)
}

// @unchecked Sendable: immutable after init; descriptors owned for its life, used with positional I/O only.
public final class Device: @unchecked Sendable {
  // Immutable after init; the descriptor is used with positional I/O only,
  // which is safe from several threads at once.
  public let path: String
  public let fd: Int32
  public let size: UInt64
  public let isBlockDevice: Bool
  /// The logical sector size (512 or 4096 for block devices; 512 for files).
  public let sectorSize: UInt32
  public let options: DeviceOpenOptions
  /// With O_DIRECT: a second descriptor without it, for the transfers that
  /// are not aligned (a partial last block, a small block size).
  private let bufferedFD: Int32?

  public init(path: String, options: DeviceOpenOptions = .readOnly) throws {
    self.path = path
    self.options = options
    var flags = options.writable ? O_RDWR : O_RDONLY
    if options.direct { flags |= dr_O_DIRECT }

    // Look before opening: a block device opened for writing gets O_EXCL.
    var st = stat()
    let exists = stat(path, &st) == 0
    if !exists && !(errno == ENOENT && options.createSize != nil) {
      throw ToolkitError.path(path, Errno.current.description)
    }
    let isBlock = exists && (st.st_mode & S_IFMT) == S_IFBLK
    if exists && !isBlock && (st.st_mode & S_IFMT) != S_IFREG {
      throw ToolkitError.path(path, "not an image file or a block device")
    }
    if isBlock && options.writable { flags |= O_EXCL }
    if !exists { flags |= O_CREAT | O_EXCL }

    let fd: Int32
    switch Sys.open(path, flags: flags) {
    case .success(let d): fd = d
    case .failure(let e):
      if isBlock && options.writable && e.rawValue == EBUSY {
        throw ToolkitError.path(path, "device is busy (mounted or opened exclusively by another program)")
      }
      if options.direct && e.rawValue == EINVAL {
        throw ToolkitError.path(path, "direct I/O (O_DIRECT) is not supported here")
      }
      throw ToolkitError.path(path, e.description)
    }

    do {
      if !exists, let createSize = options.createSize {
        if ftruncate(fd, off_t(createSize)) != 0 {
          throw ToolkitError.path(path, "cannot set size \(createSize): \(Errno.current)")
        }
      }
      var size: UInt64 = 0
      var sector: UInt32 = 512
      if isBlock {
        if dr_block_device_size(fd, &size) != 0 {
          throw ToolkitError.path(path, "cannot read the device size: \(Errno.current)")
        }
        if dr_block_device_sector_size(fd, &sector) != 0 {
          throw ToolkitError.path(path, "cannot read the sector size: \(Errno.current)")
        }
      } else {
        switch Sys.fstat(fd) {
        case .success(let s): size = UInt64(s.st_size)
        case .failure(let e): throw ToolkitError.path(path, e.description)
        }
      }
      var buffered: Int32? = nil
      if options.direct {
        switch Sys.open(path, flags: flags & ~(dr_O_DIRECT | O_EXCL | O_CREAT)) {
        case .success(let d): buffered = d
        case .failure(let e): throw ToolkitError.path(path, e.description)
        }
      }
      self.fd = fd
      self.bufferedFD = buffered
      self.size = size
      self.isBlockDevice = isBlock
      self.sectorSize = sector
    } catch {
      Sys.close(fd)
      throw error
    }
  }

  deinit {
    Sys.close(fd)
    if let bufferedFD { Sys.close(bufferedFD) }
  }

  /// The descriptor for a transfer: the O_DIRECT one when it is aligned.
  @inline(__always)
  private func descriptor(_ pointer: UnsafeRawPointer, _ count: Int, _ offset: UInt64) -> Int32 {
    guard let bufferedFD else { return fd }
    let a = alignment
    let aligned = Int(bitPattern: pointer) % a == 0 && count % a == 0 && offset % UInt64(a) == 0
    return aligned ? fd : bufferedFD
  }

  /// A descriptor that reads through the page cache (sendfile's source).
  public var pageCacheFD: Int32 { bufferedFD ?? fd }

  /// The alignment O_DIRECT requires of buffers, offsets and lengths.
  public var alignment: Int { max(Int(sectorSize), 4096) }

  /// Reads exactly `buffer.count` bytes at `offset`.
  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    guard offset <= size, UInt64(buffer.count) <= size - offset else {
      throw ToolkitError.path(path, "read of \(buffer.count) bytes at \(offset) is past the end (size \(size))")
    }
    switch preadFull(descriptor(base, buffer.count, offset), base, buffer.count, offset) {
    case .success(let n) where n == buffer.count: return
    case .success(let n):
      throw ToolkitError.path(path, "unexpected end of data at \(offset + UInt64(n)) (size changed?)")
    case .failure(let e):
      throw ToolkitError.path(path, "read at \(offset)", errno: e)
    }
  }

  /// Writes all of `buffer` at `offset`.
  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    guard options.writable else { throw ToolkitError.path(path, "opened read-only") }
    guard offset <= size, UInt64(buffer.count) <= size - offset else {
      throw ToolkitError.path(path, "write of \(buffer.count) bytes at \(offset) is past the end (size \(size))")
    }
    if case .failure(let e) = pwriteFull(descriptor(base, buffer.count, offset), base, buffer.count, offset) {
      throw ToolkitError.path(path, "write at \(offset)", errno: e)
    }
  }

  /// Makes every completed write durable (fdatasync).
  public func sync() throws {
    if case .failure(let e) = Sys.fdatasync(bufferedFD ?? fd) {
      throw ToolkitError.path(path, "cannot make writes durable", errno: e)
    }
  }

  /// Whether `offset` lies in data or in a hole, and where that region ends.
  /// Block devices and file systems without SEEK_DATA report all data.
  public func dataRegion(at offset: UInt64) -> (isData: Bool, end: UInt64) {
    if isBlockDevice || offset >= size { return (true, size) }
    switch Sys.lseek(fd, offset, dr_SEEK_DATA) {
    case .success(let dataStart) where UInt64(dataStart) > offset:
      return (false, min(UInt64(dataStart), size))
    case .success:
      switch Sys.lseek(fd, offset, dr_SEEK_HOLE) {
      case .success(let holeStart): return (true, min(max(UInt64(holeStart), offset), size))
      case .failure: return (true, size)
      }
    case .failure(let e) where e.rawValue == ENXIO:
      // No data after offset: the rest of the file is a hole, unless the
      // file has shrunk since it was opened; then report data, so that the
      // read fails instead of the vanished bytes passing for zeros.
      if case .success(let st) = Sys.fstat(fd), UInt64(st.st_size) < size { return (true, size) }
      return (false, size)
    case .failure:
      return (true, size)
    }
  }
}

extension Device {
  /// base:allocation of a byte range: holes (which read as zeros) and data,
  /// as SEEK_DATA and SEEK_HOLE see them, at most `limit` runs.
  public func allocation(offset: UInt64, length: UInt32, limit: Int) -> [Extent] {
    var runs: [Extent] = []
    let end = min(offset + UInt64(length), size)
    var position = offset
    while position < end {
      let (isData, regionEnd) = dataRegion(at: position)
      let stop = regionEnd > position ? min(regionEnd, end) : end
      let flags = isData ? 0 : Extent.hole | Extent.zero
      guard runs.append(joining: Extent(length: UInt32(stop - position), flags: flags), limit: limit) else { break }
      position = stop
    }
    return runs
  }
}

extension Device: BlockDevice {
  public var name: String { path }

  /// Zeros are made by the file system or the device (punched holes,
  /// BLKZEROOUT), written only where neither works.
  public var capabilities: DeviceCapabilities {
    var c: DeviceCapabilities = [.flush, .writeZeroes]
    if options.writable { c.insert(.writable) }
    if !isBlockDevice { c.insert(.reportsHoles) }
    return c
  }

  public var maximumRequest: Int { 1 << 30 }

  /// Writes all of `buffer` at `offset`; with `fua`, then makes the writes
  /// durable (fdatasync).
  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
    try write(buffer, at: offset)
    if fua { try sync() }
  }

  public func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws {
    try writeZeros(offset: offset, length: length, scratch: zeroBuffer)
    if fua { try sync() }
  }

  /// Zeros a byte range: a hole punched in an image file, BLKZEROOUT on a
  /// block device, or zeros written from `scratch` where neither works.
  public func writeZeros(offset: UInt64, length: UInt64, scratch: AlignedBuffer) throws {
    guard options.writable else { throw ToolkitError.path(path, "opened read-only") }
    if isBlockDevice {
      if dr_block_zero_out(fd, offset, length) == 0 { return }
    } else if dr_punch_hole(fd, offset, length) == 0 {
      return
    }
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(scratch.count), length - done))
      try write(UnsafeRawBufferPointer(scratch.slice(0, n)), at: offset + done)
      done += UInt64(n)
    }
  }

  public func flush() throws { try sync() }

  /// Holes of an image file; nil for a block device, which does not say.
  public func allocation(from offset: UInt64, length: UInt32) throws -> [Extent]? {
    isBlockDevice ? nil : allocation(offset: offset, length: length, limit: Int.max)
  }
}

/// Zeros to write from where a device cannot zero by itself; never written to.
private let zeroBuffer: AlignedBuffer = {
  let b = AlignedBuffer(count: 1 << 20)
  b.buffer.initializeMemory(as: UInt8.self, repeating: 0)
  return b
}()

/// Memory aligned for O_DIRECT, allocated once and reused.
// @unchecked Sendable: memory owned for its life; one holder at a time reads or writes it.
public final class AlignedBuffer: @unchecked Sendable {
  public let pointer: UnsafeMutableRawPointer
  public let count: Int

  public init(count: Int, alignment: Int = 4096) {
    self.count = count
    self.pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: alignment)
  }

  deinit { pointer.deallocate() }

  public var buffer: UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: pointer, count: count)
  }

  public func slice(_ offset: Int, _ length: Int) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: pointer + offset, count: length)
  }
}
