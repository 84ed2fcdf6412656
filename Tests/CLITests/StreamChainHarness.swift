// The harness of SnapshotServerCLITests: chains of stored streams made as
// users make them — a full snapshot of a device, then, after random partial
// writes and zeroed ranges, a bitmap-diff map and an incremental snapshot
// --map --base — with a copy of the device after every stream;
// snapshot-server started on a private socket and stopped by its pid; the
// stream index files read field by field (dualrestore-index(5)); and a
// checker run by Debian's /usr/bin/python3 with libnbd's `nbd` module for
// exact reads against those copies.
//
// A chain is built once per test run and shared read-only: a test copies
// the streams it serves into its own scratch directory (or gives
// --index-dir there), so the indexes it makes, and the damage it does, are
// its own.

import CShim
import Foundation
import Glibc
import TestSupport
import XCTest

/// The device a chain is made of.
struct ChainKind: Hashable {
  var size: Int
  var blockSize: Int
  var encrypted: Bool
  var seed: UInt64

  /// 64 MiB less 40000 bytes (a partial last block), blocks of 64 KiB.
  static let plain = ChainKind(size: (64 << 20) - 40_000, blockSize: 65536, encrypted: false, seed: 11)
  static let encrypted = ChainKind(size: (64 << 20) - 40_000, blockSize: 65536, encrypted: true, seed: 12)
  /// 8 MiB and 1234 bytes in blocks of 4 KiB.
  static let small = ChainKind(size: (8 << 20) + 1234, blockSize: 4096, encrypted: false, seed: 13)
}

/// A full stream and seven incrementals of one device, and the device after
/// each: stream k brings the device to version k (v<k>.img).
final class ChainFixture {
  static let incrementals = 7
  static let hexKey = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
  // XCTest runs the tests of a class one after another.
  nonisolated(unsafe) private static var built: [ChainKind: ChainFixture] = [:]

  static func get(_ kind: ChainKind) throws -> ChainFixture {
    if let f = built[kind] { return f }
    let f = try ChainFixture(kind)
    built[kind] = f
    return f
  }

  static func removeAll() { built = [:] }

  let kind: ChainKind
  let s: Scratch
  /// The stream ids, oldest first.
  private(set) var ids: [String] = []
  /// Per stream: the blocks it carries (all of them for the full stream).
  private(set) var carried: [Set<Int>] = []
  /// Per block: the newest stream carrying it.
  private(set) var newest: [Int]
  /// Per stream: the blocks that read as zeros in its version.
  private(set) var zeroBlocks: [Set<Int>] = []

  var size: Int { kind.size }
  var blockSize: Int { kind.blockSize }
  var blockCount: Int { (size + blockSize - 1) / blockSize }
  var streamCount: Int { Self.incrementals + 1 }
  func stream(_ k: Int) -> String { s.path("s\(k).stream") }
  func version(_ k: Int) -> String { s.path("v\(k).img") }
  /// The device at the chain's end.
  var device: String { version(Self.incrementals) }
  var keyPath: String { s.path("chain.key") }
  var keyOptions: [String] { kind.encrypted ? ["--key-file", keyPath] : [] }
  var checker: String { s.path("chaincheck.py") }

  private init(_ kind: ChainKind) throws {
    self.kind = kind
    s = try Scratch()
    newest = Array(repeating: 0, count: (kind.size + kind.blockSize - 1) / kind.blockSize)
    try s.file("chain.key", Data((Self.hexKey + "\n").utf8))
    try s.file("chaincheck.py", Data(chainCheckPython.utf8))
    try build()
  }

  // MARK: Building

  private var rng = SplitMix64(seed: 0)
  private var current = Data()
  private var handle: FileHandle?

  /// `count` seeded random bytes.
  private func random(_ count: Int) -> Data {
    var d = Data(count: (count + 7) / 8 * 8)
    var local = rng
    d.withUnsafeMutableBytes { raw in
      let words = raw.bindMemory(to: UInt64.self)
      for i in 0..<words.count { words[i] = local.next() }
    }
    rng = local
    return d.prefix(count)
  }

  /// `count` bytes of text, repeated.
  private func text(_ count: Int) -> Data {
    var d = Data("stored streams are served as one device. ".utf8)
    while d.count < count { d.append(d) }
    return d.prefix(count)
  }

  private func put(_ bytes: Data, at offset: Int) throws {
    let bytes = bytes.prefix(size - offset)
    guard !bytes.isEmpty else { return }
    current.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
    try handle?.seek(toOffset: UInt64(offset))
    try handle?.write(contentsOf: bytes)
  }

  /// Zeros written densely, or a hole punched in the file.
  private func zero(_ range: Range<Int>, punch: Bool) throws {
    let range = range.clamped(to: 0..<size)
    guard !range.isEmpty, let fd = handle?.fileDescriptor else { return }
    if punch {
      guard dr_punch_hole(fd, UInt64(range.lowerBound), UInt64(range.count)) == 0 else {
        throw RRTError("cannot punch a hole: errno \(errno)")
      }
      current.replaceSubrange(range, with: Data(count: range.count))
    } else {
      try put(Data(count: range.count), at: range.lowerBound)
    }
  }

  private func isZero(_ data: Data, block b: Int) -> Bool {
    let r = (b * blockSize)..<min((b + 1) * blockSize, size)
    return data.withUnsafeBytes { raw in
      let p = raw.baseAddress! + r.lowerBound
      return p.load(as: UInt8.self) == 0 && memcmp(p, p + 1, r.count - 1) == 0
    }
  }

  private func blockZeros(_ data: Data) -> Set<Int> { Set((0..<blockCount).filter { isZero(data, block: $0) }) }

  private func pick(_ n: Int) -> Int { Int(rng.next() % UInt64(max(n, 1))) }

  /// The first version: random data, text, zeros written densely, holes
  /// never written, and data in the partial last block.
  private func writeFirstVersion() throws {
    let b = blockSize
    var at = 0
    while at < size {
      let length = (1 + pick(6)) * b + pick(b) - b / 2
      let end = min(size, at + max(length, 1))
      switch pick(20) {
      case 0...8: try put(random(end - at), at: at)
      case 9...10: try put(text(end - at), at: at)
      case 11...13: try put(Data(count: end - at), at: at)
      default: break
      }
      at = end
    }
    try put(random(size % b + 100), at: size - size % b - 100)
  }

  /// Version k: partial writes of 1 byte to 3 blocks anywhere, writes into
  /// blocks that read as zeros (DATA over an older ZERO), whole blocks
  /// zeroed over data (ZERO over an older DATA), and the partial last block
  /// written, zeroed, written again.
  private func writeVersion(_ k: Int) throws {
    let b = blockSize
    for _ in 0..<10 {
      let length: Int
      switch pick(3) {
      case 0: length = 1 + pick(16)
      case 1: length = 17 + pick(4096)
      default: length = 1 + pick(3 * b)
      }
      try put(random(length), at: pick(size))
    }
    var written = 0
    for _ in 0..<400 where written < 3 {
      let block = pick(blockCount - 1)
      guard isZero(current, block: block) else { continue }
      try put(random(1 + pick(b - 1)), at: block * b + pick(b / 2))
      written += 1
    }
    var zeroed = 0
    for _ in 0..<400 where zeroed < 2 {
      let block = pick(blockCount - 4)
      guard !isZero(current, block: block) else { continue }
      let start = max(0, block * b - pick(b / 2))
      try zero(start..<(start + (2 + pick(4)) * b), punch: zeroed == 0)
      zeroed += 1
    }
    switch k {
    case 2: try put(random(size % b / 2), at: size - size % b / 3)
    case 4: try zero(((blockCount - 2) * b)..<size, punch: k % 2 == 0)
    case 6: try put(Data([0x5A]), at: size - 1)
    default: break
    }
  }

  private func build() throws {
    rng = SplitMix64(seed: kind.seed)
    let dev = s.path("dev.img")
    XCTAssertTrue(FileManager.default.createFile(atPath: dev, contents: nil))
    handle = try FileHandle(forWritingTo: URL(fileURLWithPath: dev))
    defer {
      try? handle?.close()
      handle = nil
      current = Data()
    }
    try handle?.truncate(atOffset: UInt64(size))
    current = Data(count: size)
    try writeFirstVersion()
    try snapshot(0, "--block-size \(blockSize)")
    carried.append(Set(0..<blockCount))
    for k in 1...Self.incrementals {
      let before = current
      try writeVersion(k)
      let changed = Set(
        (0..<blockCount).filter { b in
          let r = (b * blockSize)..<min((b + 1) * blockSize, size)
          return before[r] != current[r]
        })
      try snapshot(k, "--map m\(k).map --base \(ids[k - 1])", diff: k)
      // bitmap-diff's map is the set of changed blocks.
      var mapped = Set<Int>()
      for l in try String(contentsOfFile: s.path("m\(k).extents"), encoding: .utf8).split(separator: "\n") {
        let p = l.split(separator: " ").compactMap { Int($0) }
        if p.count == 2, p[1] > 0 { mapped.formUnion((p[0] / blockSize)...((p[0] + p[1] - 1) / blockSize)) }
      }
      XCTAssertEqual(mapped, changed, "bitmap-diff's map of version \(k)")
      carried.append(changed)
      for b in changed { newest[b] = k }
    }
  }

  /// Snapshots the device as stream `k` (after bitmap-diff makes map k from
  /// version `diff` - 1) and keeps its version: one script, as a user would.
  private func snapshot(_ k: Int, _ options: String, diff: Int? = nil) throws {
    zeroBlocks.append(blockZeros(current))
    var script = ""
    if let diff {
      // bitmap-diff exits 1: the versions differ.
      script +=
        "bitmap-diff --quiet --block-size \(blockSize) -o m\(diff).map v\(diff - 1).img dev.img; "
        + "test $? = 1 && overwrite-map extents m\(diff).map > m\(diff).extents && "
    }
    let encrypt = kind.encrypted ? "--encrypt --key-file chain.key" : ""
    script +=
      "snapshot --json \(options) \(encrypt) -o s\(k).stream dev.img > s\(k).json && "
      + "cp --sparse=always dev.img v\(k).img"
    let r = try RRTCommand.shell(script, timeout: 120, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, "\(script): \(r.summary)")
    let o = try TrackRig.json(try String(contentsOfFile: s.path("s\(k).json"), encoding: .utf8))
    let id = try XCTUnwrap(o["stream_id"] as? String, "\(o)")
    XCTAssertEqual(o["base_stream_id"] as? String, k == 0 ? nil : ids[k - 1], "\(o)")
    XCTAssertEqual(o["encrypted"] as? Bool, kind.encrypted, "\(o)")
    ids.append(id)
  }

  // MARK: Using

  /// Copies streams into `dir` (s<k>.stream), returning their paths.
  @discardableResult
  func copyStreams(to dir: Scratch, _ which: [Int]? = nil) throws -> [String] {
    let which = which ?? Array(0..<streamCount)
    let r = try RRTCommand.run("/bin/cp", which.map { stream($0) } + [dir.url.path])
    XCTAssertEqual(r.status, 0, r.summary)
    return which.map { dir.path("s\($0).stream") }
  }

  /// Runs the checker: `command` against `uri`, the device as `expected`.
  func check(
    _ command: String, _ uri: String, expected: String? = nil, _ arguments: [String] = [], timeout: Double = 120,
    file: StaticString = #filePath, line: UInt = #line
  ) throws -> [String: Any] {
    let r = try RRTCommand.run(
      "/usr/bin/python3", [checker, command, uri, expected ?? device, "\(blockSize)"] + arguments, timeout: timeout)
    XCTAssertEqual(r.status, 0, "chaincheck \(command): \(r.summary)", file: file, line: line)
    return try TrackRig.json(r.stdout, file: file, line: line)
  }

  /// Starts the checker in the background (its JSON in NAME.out).
  func checkChild(_ command: String, _ uri: String, _ arguments: [String], name: String, in dir: Scratch) throws
    -> RRTChild
  {
    try RRTChild(
      name: name, executable: "/usr/bin/python3",
      arguments: [checker, command, uri, device, "\(blockSize)"] + arguments, stdout: dir.path("\(name).out"),
      stderr: dir.path("\(name).err"))
  }
}

/// snapshot-server serving from a test's scratch directory, and the nbdkit
/// servers that serve stream files over NBD.
final class ChainServer {
  let s: Scratch
  let size: Int
  let blockSize: Int
  var server: RRTChild?
  var others: [RRTChild] = []
  private(set) var starts = 0

  init(_ s: Scratch, _ fixture: ChainFixture) {
    self.s = s
    size = fixture.size
    blockSize = fixture.blockSize
  }

  var socket: String { s.path("chain.sock") }
  var uri: String { "nbd+unix:///chain?socket=\(socket)" }
  var logPath: String { s.path("ss-\(starts).log") }
  var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
  var allLogs: String {
    (1...max(1, starts)).map { (try? String(contentsOfFile: s.path("ss-\($0).log"), encoding: .utf8)) ?? "" }
      .joined(separator: "--- restart ---\n")
  }

  /// Starts `snapshot-server serve --socket SOCK ARGUMENTS` and waits until
  /// the export answers.
  @discardableResult
  func start(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> RRTChild {
    starts += 1
    unlink(socket)
    let child = try RRTChild(
      name: "snapshot-server", executable: Tools.path("snapshot-server"),
      arguments: ["serve", "--socket", socket] + arguments, stdout: s.path("ss-\(starts).out"), stderr: logPath,
      cwd: s.url.path)
    server = child
    let end = RRTEnv.monotonic() + 60
    while RRTEnv.monotonic() < end {
      if !child.isRunning {
        let status = child.wait(timeout: 1) ?? -1
        XCTFail("snapshot-server ended with status \(status) before serving: \(child.errors)", file: file, line: line)
        throw RRTError("snapshot-server did not start")
      }
      if log.contains("serving "), let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 10),
        r.status == 0
      {
        return child
      }
      RRTEnv.sleep(0.05)
    }
    XCTFail("snapshot-server did not answer within 60 s: \(child.errors)", file: file, line: line)
    throw RRTError("snapshot-server did not answer")
  }

  /// SIGTERM: the server exits 0 saying so.
  func stop(file: StaticString = #filePath, line: UInt = #line) {
    guard let server else { return }
    let status = server.stop(grace: 20)
    self.server = nil
    XCTAssertEqual(status, 0, "snapshot-server did not stop cleanly; log:\n\(log)", file: file, line: line)
    XCTAssertTrue(log.contains("stopped cleanly"), "log:\n\(log)", file: file, line: line)
    assertNoCrash(file: file, line: line)
  }

  /// `nbdkit -r file STREAM` on a socket of its own: the stream's NBD URI.
  func nbdkit(_ path: String, name: String) throws -> String {
    let sock = s.path("\(name).sock")
    let child = try RRTChild(
      name: "nbdkit", executable: "/usr/bin/nbdkit", arguments: ["-f", "-r", "-U", sock, "file", path],
      stdout: s.path("\(name).nbdkit.log"), stderr: s.path("\(name).nbdkit.log"))
    others.append(child)
    let uri = "nbd+unix:///?socket=\(sock)"
    let end = RRTEnv.monotonic() + 20
    while RRTEnv.monotonic() < end {
      if let r = try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5), r.status == 0 { return uri }
      RRTEnv.sleep(0.05)
    }
    throw RRTError("nbdkit did not answer: \(child.errors)")
  }

  func stopAll() {
    server?.stop(grace: 10)
    server = nil
    for c in others.reversed() { c.stop(grace: 5) }
    others = []
  }
}

extension ChainServer: ServerRig {}

/// A stream index file (dualrestore-index(5)), read field by field: a
/// 128-byte header, 40-byte entries, a CRC trailer.
struct IndexFile {
  struct Entry: Equatable {
    var first: Int
    var count: Int
    var offset: Int
    var sequence: Int
    var length: Int
    /// 2 DATA, 3 ZERO.
    var type: UInt8
    var blocks: Range<Int> { first..<(first + count) }
  }

  let bytes: [UInt8]
  let streamID: String
  let baseStreamID: String
  let entries: [Entry]
  let dataBlocks: Int
  let zeroBlocks: Int

  init(_ path: String) throws {
    bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    guard bytes.count >= 132, bytes.prefix(8) == [0x44, 0x52, 0x49, 0x44, 0x58, 0x0D, 0x0A, 0x1A] else {
      throw RRTError("\(path) is not a stream index")
    }
    let b = bytes
    func u(_ at: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 | Int(b[at + $1]) << (8 * $1) } }
    func hex(_ at: Int) -> String { b[at..<(at + 16)].map { String(format: "%02x", $0) }.joined() }
    streamID = hex(16)
    baseStreamID = hex(32)
    dataBlocks = u(88, 8)
    zeroBlocks = u(96, 8)
    entries = (0..<u(80, 8)).map { i in
      let at = 128 + 40 * i
      return Entry(
        first: u(at, 8), count: u(at + 8, 8), offset: u(at + 16, 8), sequence: u(at + 24, 8), length: u(at + 32, 4),
        type: b[at + 36])
    }
  }
}

/// Stream bytes edited in place.
enum StreamEdit {
  /// Flips the bits of one byte.
  static func flip(_ path: String, at offset: Int) throws {
    var d = try Data(contentsOf: URL(fileURLWithPath: path))
    d[offset] ^= 0xFF
    try d.write(to: URL(fileURLWithPath: path))
  }

  /// Makes a record's CRC-32C (its last 4 bytes, of everything before them)
  /// right again, as a forger would.
  static func fixCRC(_ path: String, record: IndexFile.Entry) throws {
    var d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    let r = record.offset..<(record.offset + record.length)
    EncryptedStreamCLITests.fixCRC(&d, r)
    try Data(d).write(to: URL(fileURLWithPath: path))
  }
}

/// The checker: exact reads through libnbd, compared with a device image.
/// python3 chaincheck.py COMMAND URI DEVICE BLOCKSIZE [ARGS], one JSON
/// object on standard output.
let chainCheckPython = #"""
  import errno, json, math, os, random, subprocess, sys
  import nbd

  cmd, uri, dev, B = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
  args = sys.argv[5:]
  fd = os.open(dev, os.O_RDONLY)
  size = os.fstat(fd).st_size
  h = nbd.NBD()
  h.connect_uri(uri)
  out = {"size": h.get_size(), "multi_conn": h.can_multi_conn(), "read_only": h.is_read_only()}
  assert h.get_size() == size, (h.get_size(), size)

  def first_difference(a, b):
      for i in range(min(len(a), len(b))):
          if a[i] != b[i]:
              return i
      return min(len(a), len(b))

  if cmd == "reads":
      # reads SEED COUNT MAXLEN [PLAN]: the reads of PLAN (a JSON list of
      # [offset, length]), then COUNT reads of 1 byte to MAXLEN at random offsets.
      seed, count, most = int(args[0]), int(args[1]), int(args[2])
      reads = [tuple(r) for r in json.load(open(args[3]))] if len(args) > 3 else []
      rng = random.Random(seed)
      for _ in range(count):
          n = max(1, min(size, int(2 ** rng.uniform(0, math.log2(most)))))
          reads.append((rng.randrange(0, size - n + 1), n))
      bad, total, unaligned = [], 0, 0
      for off, n in reads:
          got = h.pread(n, off)
          want = os.pread(fd, n, off)
          total += n
          unaligned += (off % B != 0 or n % B != 0)
          if got != want:
              bad.append([off, n, off + first_difference(got, want)])
      out.update(reads=len(reads), bytes=total, unaligned=unaligned, mismatches=bad[:10], mismatch_count=len(bad))
  elif cmd == "blocks":
      # Every block alone; the blocks that fail are read a second time.
      failed, mismatched = {}, []
      blocks = (size + B - 1) // B
      for b in range(blocks):
          n = min(B, size - b * B)
          try:
              got = h.pread(n, b * B)
          except nbd.Error as e:
              failed[str(b)] = e.errnum
              continue
          if got != os.pread(fd, n, b * B):
              mismatched.append(b)
      again = {}
      for b in failed:
          try:
              h.pread(min(B, size - int(b) * B), int(b) * B)
              again[b] = 0
          except nbd.Error as e:
              again[b] = e.errnum
      out.update(blocks=blocks, failed=failed, again=again, mismatched=mismatched[:20], eio=errno.EIO)
  elif cmd == "status":
      # nbdinfo --map: extents whole blocks (or to the end), hole,zero exactly
      # where the device's block reads as zeros, and zeros when read.
      m = json.loads(subprocess.run(["/usr/bin/nbdinfo", "--map", "--json", uri], check=True,
                                    capture_output=True).stdout)
      problems, at, zero_bytes, data_bytes = [], 0, 0, 0
      for e in m:
          off, n, t = e["offset"], e["length"], e["type"]
          if off != at:
              problems.append("extent at %d, expected %d" % (off, at))
          if off % B or (n % B and off + n != size):
              problems.append("extent %d+%d is not whole blocks" % (off, n))
          if t not in (0, 3):
              problems.append("extent %d+%d has type %d" % (off, n, t))
          for b in range(off // B, (off + n + B - 1) // B):
              blk = os.pread(fd, min(B, size - b * B), b * B)
              zero = blk.count(0) == len(blk)
              if zero != (t == 3):
                  problems.append("block %d reads %s but is reported %s" % (b, "zeros" if zero else "data", e["description"]))
          if t == 3:
              zero_bytes += n
              pos = off
              while pos < off + n:
                  k = min(off + n - pos, 4 << 20)
                  if h.pread(k, pos).count(0) != k:
                      problems.append("hole %d+%d does not read as zeros" % (pos, k))
                  pos += k
          else:
              data_bytes += n
          at = off + n
      if at != size:
          problems.append("extents end at %d, not %d" % (at, size))
      out.update(extents=len(m), zero_bytes=zero_bytes, data_bytes=data_bytes, problems=problems[:20])
  else:
      sys.exit("unknown command " + cmd)
  print(json.dumps(out))
  """#
