// Interim: dense signatures only, until sparse signatures land.
extension SignatureReader {
  public var signedBlocks: UInt64 { header.geometry.blockCount }
  public func readEntries(max: Int, blocks: UnsafeMutablePointer<UInt64>, digests: UnsafeMutableRawPointer) throws
    -> Int
  {
    let done = entriesRead
    let n = Int(Swift.min(UInt64(max), header.geometry.blockCount - done))
    guard n > 0 else { return 0 }
    try readDigests(count: n, into: digests)
    for i in 0..<n { blocks[i] = done + UInt64(i) }
    return n
  }
}
