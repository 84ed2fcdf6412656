// Whole-file reads and atomic writes for the small artefacts the tools pass
// around (maps, mapfiles), and the `-` convention. An atomic save goes
// through OutputSink: a reader sees the old file or the new one, never a
// mix, and after a crash the directory entry is durable too.

import Glibc

/// Where a tool's output goes: a file saved atomically, or standard output.
public enum OutputTarget: Sendable {
  case standardOutput
  case file(String)

  /// `-` or nil means standard output.
  public init(_ path: String?) {
    if let path, path != "-" { self = .file(path) } else { self = .standardOutput }
  }

  public var name: String {
    switch self {
    case .standardOutput: return "standard output"
    case .file(let path): return path
    }
  }

  /// Throws when binary output would go to a terminal.
  public func refuseTerminal(for what: String) throws {
    if case .standardOutput = self, Sys.isTerminal(1) {
      throw ToolkitError("refusing to write a binary \(what) to a terminal; redirect it or use -o FILE")
    }
  }

  /// Writes the parts in order: atomically to a file, or to stdout.
  public func write(_ parts: [UnsafeRawBufferPointer]) throws {
    switch self {
    case .standardOutput:
      for part in parts {
        guard let base = part.baseAddress, part.count > 0 else { continue }
        if case .failure(let e) = writeFull(1, base, part.count) {
          throw ToolkitError("standard output: \(e)")
        }
      }
    case .file(let path):
      try writeFileAtomically(path, parts)
    }
  }

  public func write(_ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try write([$0]) }
  }

  public func write(text: String) throws {
    try write(Array(text.utf8))
  }
}

/// Reads a whole file, or standard input for `-`.
public func readWholeFile(_ path: String, limit: Int = 1 << 40) throws -> [UInt8] {
  let fd: Int32
  if path == "-" {
    fd = 0
  } else {
    switch Sys.open(path, flags: O_RDONLY) {
    case .success(let d): fd = d
    case .failure(let e): throw ToolkitError.path(path, e.description)
    }
  }
  defer { if fd != 0 { Sys.close(fd) } }
  let name = path == "-" ? "standard input" : path
  var result: [UInt8] = []
  var chunk = 1 << 16
  if fd != 0, case .success(let st) = Sys.fstat(fd), (st.st_mode & S_IFMT) == S_IFREG {
    result.reserveCapacity(Int(st.st_size) + 1)
    chunk = max(chunk, Int(st.st_size) + 1)
  }
  while true {
    let before = result.count
    result.append(contentsOf: repeatElement(0, count: chunk))
    let got = result.withUnsafeMutableBytes { raw in
      readFull(fd, raw.baseAddress! + before, chunk)
    }
    switch got {
    case .failure(let e):
      throw ToolkitError("\(name): \(e)")
    case .success(let n):
      result.removeLast(chunk - n)
      if n < chunk { return result }
      if result.count > limit { throw ToolkitError("\(name): larger than \(limit) bytes") }
      chunk = min(chunk * 2, 1 << 26)
    }
  }
}

/// Saves `parts` to `path` atomically (temp file, fsync, rename, fsync dir).
public func writeFileAtomically(_ path: String, _ parts: [UnsafeRawBufferPointer]) throws {
  let sink = try OutputSink(.file(path), what: "file")
  for part in parts { try sink.write(part) }
  try sink.finish()
}

func splitPath(_ path: String) -> (directory: String, base: String) {
  guard let slash = path.lastIndex(of: "/") else { return (".", path) }
  let dir = String(path[..<slash])
  return (dir.isEmpty ? "/" : dir, String(path[path.index(after: slash)...]))
}

/// Whether a path names an existing file system object.
public func pathExists(_ path: String) -> Bool {
  var st = stat()
  return stat(path, &st) == 0
}

/// Reads the first `count` bytes of a file without consuming standard input.
public func peekFile(_ path: String, count: Int) -> [UInt8]? {
  guard path != "-", case .success(let fd) = Sys.open(path, flags: O_RDONLY) else { return nil }
  defer { Sys.close(fd) }
  var bytes = [UInt8](repeating: 0, count: count)
  let got = bytes.withUnsafeMutableBytes { preadFull(fd, $0.baseAddress!, count, 0) }
  guard case .success(let n) = got else { return nil }
  return Array(bytes.prefix(n))
}

/// Whether two names lead to the same file or device (`disk.img` and
/// `./disk.img`, or a symbolic link and its target).
public func samePath(_ a: String, _ b: String) -> Bool {
  a == b || (pathExists(a) && pathExists(b) && canonicalPath(a) == canonicalPath(b))
}

/// The absolute path with symbolic links resolved, for names that must
/// still lead to the same file from another working directory; the path as
/// given when it cannot be resolved.
public func canonicalPath(_ path: String) -> String {
  guard let resolved = realpath(path, nil) else { return path }
  defer { free(resolved) }
  return String(cString: resolved)
}
