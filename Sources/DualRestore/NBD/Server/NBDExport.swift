// What an NBD server serves: the NBDExport protocol an export implements
// (the restore's exports, the tracking server's device and views), the runs
// of base:allocation it describes (`Extent`, from Devices), and the file spans a READ may be sent
// from without a copy.

/// What the server exports. Handlers are called from several threads at once.
public protocol NBDExport: AnyObject, Sendable {
  var name: String { get }
  var description: String { get }
  var size: UInt64 { get }
  /// Transmission flags beyond HAS_FLAGS (READ_ONLY, SEND_FLUSH, ...).
  var flags: UInt16 { get }
  /// Preferred request size, for NBD_INFO_BLOCK_SIZE.
  var preferredBlockSize: UInt32 { get }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws
  func flush() throws
  func trim(offset: UInt64, length: UInt64, fua: Bool) throws
  func writeZeroes(offset: UInt64, length: UInt64, fua: Bool) throws
  /// Whether the export is offered now (listed and accepted); an export
  /// such as a frozen view comes and goes.
  var isOffered: Bool { get }
  /// The export a client that asks for `name` (this export's name, or it
  /// followed by `;` and parameters) is served by: itself, or one bound to
  /// what it stands for now (a frozen view, a merge of one stream). Throws
  /// the sentence to refuse the client with.
  func bind(name: String) throws -> NBDExport
  /// For a reply sent without a copy: makes `length` bytes at `offset`
  /// readable from a file (fetching or preserving what it must) and says
  /// where, so that they go from the page cache to the socket (sendfile);
  /// nil when the export reads into a buffer only. The file must stay open
  /// while the export exists; what the range holds may change once this
  /// returns, as with any read beside a write.
  func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan?
  /// base:allocation for NBD_CMD_BLOCK_STATUS: runs of (length, flags)
  /// from `offset` on, with NBD.stateHole and NBD.stateZero, covering at
  /// most `length` bytes (at least the first one), at most `limit` runs.
  /// A run said to be zero must read as zeros: clients skip it.
  func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent]
}

/// Bytes of a file an export's READ is served from.
public struct FileSpan: Sendable {
  public let fd: Int32
  public let offset: UInt64
  public init(fd: Int32, offset: UInt64) {
    self.fd = fd
    self.offset = offset
  }
}

extension NBDExport {
  public var isOffered: Bool { true }
  public func makeReadableInFile(offset: UInt64, length: Int) throws -> FileSpan? { nil }
  /// Without better knowledge, everything is data.
  public func allocation(offset: UInt64, length: UInt32, limit: Int) throws -> [Extent] {
    [Extent(length: length, flags: 0)]
  }
  public func bind(name: String) throws -> NBDExport {
    guard name == self.name || name.isEmpty else {
      throw NBDError(NBD.errInvalid, "the export \(self.name) takes no parameters")
    }
    return self
  }
}
