// An NBD client plays two roles: the backup link of a restore, and a merge
// target (the `merge` export of a running restore-read-through).

extension NBDClient: BackupLink {}

extension NBDClient: BlockTarget {
  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
    try write(buffer, at: offset, fua: false)
  }

  public func writeZeros(offset: UInt64, length: UInt64, scratch: AlignedBuffer) throws {
    if canWriteZeroes {
      try writeZeroes(offset: offset, length: length, fua: false)
      return
    }
    var done: UInt64 = 0
    while done < length {
      let n = Int(min(UInt64(scratch.count), length - done))
      try write(UnsafeRawBufferPointer(scratch.slice(0, n)), at: offset + done, fua: false)
      done += UInt64(n)
    }
  }

  public func sync() throws {
    if canFlush { try flush() }
  }
}
