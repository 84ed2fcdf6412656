// A long output written front to back: standard output, or a file that
// appears under its name only when complete (written to a temporary file
// beside it, synchronised, renamed, directory synchronised). An unfinished
// file output is removed; an unfinished stdout output simply stops, and the
// formats' closing checksums or END records show it incomplete. A path that
// names a device or a FIFO (/dev/null, a tape, a raw disk used as media, a
// named pipe) is written in place, like standard output: renaming over it
// would replace the device node with a file.

import CShim
import Glibc

public final class OutputSink {
  /// Temporary files of outputs not finished yet, removed at exit: a tool
  /// that fails exits while its writer threads may still hold the sink.
  /// And whether the exit handler that removes them is installed.
  private static let registry = Locked<(unfinished: Set<String>, registered: Bool)>(([], false))

  private static func track(_ path: String) {
    registry.withLock {
      $0.unfinished.insert(path)
      if !$0.registered {
        $0.registered = true
        atexit { OutputSink.removeUnfinished() }
      }
    }
  }

  private static func untrack(_ path: String) { _ = registry.withLock { $0.unfinished.remove(path) } }

  private static func removeUnfinished() {
    registry.withLock {
      for path in $0.unfinished { unlink(path) }
      $0.unfinished.removeAll()
    }
  }

  public let target: OutputTarget
  private let fd: Int32
  private var tempPath: String?
  /// A device or FIFO written where it is.
  private var inPlace = false
  private var done = false
  public private(set) var bytesWritten: UInt64 = 0

  /// Opens the output; `what` names the format for the terminal refusal.
  public init(_ target: OutputTarget, what: String) throws {
    self.target = target
    switch target {
    case .standardOutput:
      try target.refuseTerminal(for: what)
      fd = 1
    case .file(let path):
      var existing = stat()
      if stat(path, &existing) == 0 && (existing.st_mode & S_IFMT) != S_IFREG
        && (existing.st_mode & S_IFMT) != S_IFDIR
      {
        switch Sys.open(path, flags: O_WRONLY) {
        case .success(let d): fd = d
        case .failure(let e): throw ToolkitError.path(path, "cannot open for writing: \(e)")
        }
        if isatty(fd) == 1 {
          Sys.close(fd)
          throw ToolkitError("refusing to write a binary \(what) to the terminal \(path)")
        }
        inPlace = true
        return
      }
      let (directory, base) = splitPath(path)
      var template = Array("\(directory)/.\(base).XXXXXX".utf8CString)
      let d = template.withUnsafeMutableBufferPointer { dr_mkostemp($0.baseAddress!, O_CLOEXEC) }
      guard d >= 0 else { throw ToolkitError.path(path, "cannot create a temporary file: \(Errno.current)") }
      fd = d
      let temporary = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
      tempPath = temporary
      OutputSink.track(temporary)
      // Keep the mode of a file being replaced. New files (maps, streams,
      // signatures: a disk's data and its layout) get 0600 less the umask:
      // other users are kept out; chmod opens them up on purpose.
      var st = stat()
      if stat(path, &st) == 0 {
        fchmod(fd, st.st_mode & 0o7777)
      } else {
        let mask = umask(0)
        umask(mask)
        fchmod(fd, 0o600 & ~mask)
      }
    }
  }

  deinit { abandon() }

  public func write(_ bytes: UnsafeRawBufferPointer) throws {
    guard let base = bytes.baseAddress, bytes.count > 0 else { return }
    if case .failure(let e) = writeFull(fd, base, bytes.count) {
      throw ToolkitError("\(target.name): \(e)")
    }
    bytesWritten += UInt64(bytes.count)
  }

  public func write(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try write($0) }
  }

  /// Writes the buffers in order with as few system calls as it can.
  public func write(vectors: UnsafeMutableBufferPointer<iovec>) throws {
    let result = writingAllVectors(vectors, written: &bytesWritten) { first, count in
      Sys.writev(fd, first, min(count, 1024))
    }
    if case .failure(let e) = result { throw ToolkitError("\(target.name): \(e)") }
  }

  /// Completes the output: a file is made durable and renamed into place.
  public func finish() throws {
    if inPlace, case .file(let path) = target {
      // A disk or tape is made durable; /dev/null and pipes cannot be.
      if case .failure(let e) = Sys.fsync(fd), e.rawValue != EINVAL, e.rawValue != EROFS {
        throw ToolkitError.path(path, "cannot make the output durable: \(e)")
      }
      Sys.close(fd)
      inPlace = false
    }
    if case .file(let path) = target, let tempPath {
      if case .failure(let e) = Sys.fsync(fd) { throw ToolkitError.path(path, "cannot make the file durable: \(e)") }
      Sys.close(fd)
      self.tempPath = nil
      defer { OutputSink.untrack(tempPath) }
      guard rename(tempPath, path) == 0 else {
        let error = Errno.current
        unlink(tempPath)
        throw ToolkitError.path(path, "cannot replace the file: \(error)")
      }
      let (directory, _) = splitPath(path)
      if case .success(let dfd) = Sys.open(directory, flags: O_RDONLY | O_DIRECTORY) {
        _ = Sys.fsync(dfd)
        Sys.close(dfd)
      }
    }
    done = true
  }

  /// Drops an unfinished file output.
  public func abandon() {
    if inPlace && !done {
      Sys.close(fd)
      inPlace = false
    }
    guard !done, let tempPath else { return }
    Sys.close(fd)
    unlink(tempPath)
    OutputSink.untrack(tempPath)
    self.tempPath = nil
  }
}
