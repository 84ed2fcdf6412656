// The base of restore-read-through's end-to-end tests, against real NBD
// peers: nbdkit and qemu-nbd as the backup; nbdinfo, nbdcopy, nbdsh,
// qemu-img, qemu-io, fio and nbdfuse (+ a loop device and ext4) as clients.
// Each test builds a backup image, an empty primary and a map in a scratch
// directory, starts the backup server and restore-read-through (RRTRig, in
// RestoreReadThroughHarness.swift) and always stops both in tearDown.
//
// The tests are split by concern: RestoreReadsCLITests, RestoreWritesCLITests,
// RestoreMergeCLITests, RestoreHydrationCLITests, RestoreCrashCLITests,
// RestoreBackupFaultsCLITests and RestoreUsageCLITests. What they check is
// what the tool promises (its --help and the invariants of
// RestoreEngine.swift). Here: rigs made and started (CLITestCase stops
// them), and the writer whose log tells which writes were acknowledged, with
// the checks that find each write's bytes where no later write covers them.

import Foundation
import Glibc
import TestSupport
import XCTest

class RestoreCLITestCase: CLITestCase {
  /// A rig with the backup served and restore-read-through answering.
  func running(
    size: Int = 16 << 20, seed: UInt64 = 1, backup: BackupChoice = .nbdkit, serverArguments: [String] = []
  ) throws -> RRTRig {
    let r = try RRTRig(size: size, seed: seed)
    rigs.append(r)
    switch backup {
    case .nbdkit: try r.startBackup(.nbdkit())
    case .nbdkitFilters(let f, let p): try r.startBackup(.nbdkit(filters: f, parameters: p))
    case .qemuNBD: try r.startBackup(.qemuNBD)
    }
    try r.startServer(serverArguments)
    return r
  }

  enum BackupChoice {
    case nbdkit
    case nbdkitFilters([String], [String])
    case qemuNBD
  }

  func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    try XCTUnwrap(
      JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not JSON: \(text)", file: file, line: line
    )
  }

  /// A rig whose backup image is sparse: zeros but for `pieces` (offset,
  /// length) of seeded random bytes, which are holes in the file. Returns
  /// the rig and the backup's content.
  func sparseBackupRig(size: Int, seed: UInt64, pieces: [(Int, Int)]) throws -> (RRTRig, Data) {
    var image = Data(count: size)
    for (i, (offset, count)) in pieces.enumerated() {
      image.replaceSubrange(offset..<offset + count, with: RRTBytes.random(count, seed: seed * 10 + UInt64(i)))
    }
    let r = try RRTRig(size: size, seed: seed, backup: image)
    rigs.append(r)
    unlink(r.backupPath)
    try r.makeSparse(r.backupPath, size: size)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: r.backupPath))
    for (offset, count) in pieces {
      try h.seek(toOffset: UInt64(offset))
      try h.write(contentsOf: image[offset..<offset + count])
    }
    try h.synchronize()
    try h.close()
    return (r, image)
  }

  /// The expected image: `base` with writes applied.
  func applying(_ writes: [(Int, Data)], to base: Data) -> Data {
    var d = base
    for (off, data) in writes { d.replaceSubrange(off..<off + data.count, with: data) }
    return d
  }

  // MARK: The writer of the kill -9 and backup fault tests

  /// The byte at `q` of write `w`'s data (the writer's pattern: 16-byte
  /// records of LE32 w, i, 0x5EED0000 ^ w, i ^ 0xA5A5A5A5).
  @inline(__always)
  func patternByte(_ w: UInt32, _ q: Int) -> UInt8 {
    let i = UInt32(truncatingIfNeeded: q >> 4)
    let word: UInt32
    switch (q >> 2) & 3 {
    case 0: word = w
    case 1: word = i
    case 2: word = 0x5EED_0000 ^ w
    default: word = i ^ 0xA5A5_A5A5
    }
    return UInt8(truncatingIfNeeded: word >> (8 * UInt32(q & 3)))
  }

  /// The writer of the kill -9 and clean-stop tests (nbdsh; SEED and WBASE
  /// set before it; LO and HI keep its writes in [LO, HI), MAXN bounds
  /// their length). Batches of 8 non-overlapping writes in flight at once
  /// (random offsets and lengths, a quarter whole blocks), a FLUSH every
  /// third batch. Its output: `W id offset length` before a write is sent,
  /// `D id` once its whole batch completed, `S` before a FLUSH is sent,
  /// `F id` once it is acknowledged (every write up to id is then safe),
  /// `E message` when the connection fails.
  static let crashWriter = """
    import random
    rnd = random.Random(SEED)
    LO = globals().get('LO', 0)
    HI = globals().get('HI', SIZE)
    MAXN = globals().get('MAXN', 3 * B // 2)
    def pattern(w, n):
        k = (n + 15) // 16
        return b''.join(struct.pack('<IIII', w, i, 0x5EED0000 ^ w, i ^ 0xA5A5A5A5) for i in range(k))[:n]
    h.connect_uri(URI)
    print('READY', flush=True)
    w = WBASE
    batchno = 0
    try:
        while True:
            batch = []
            ranges = []
            for _ in range(8):
                # Writes in flight together never overlap: NBD does not order them.
                while True:
                    if MAXN >= B and rnd.random() < 0.25:
                        off = LO + rnd.randrange((HI - LO) // B) * B
                        n = min(B * rnd.choice([1, 1, 2]), HI - off)
                    else:
                        off = rnd.randrange(LO, HI - 1)
                        n = rnd.randrange(1, min(MAXN, HI - off) + 1)
                    if all(off + n <= a or b <= off for a, b in ranges):
                        break
                ranges.append((off, off + n))
                print('W', w, off, n, flush=True)
                buf = nbd.Buffer.from_bytearray(pattern(w, n))
                batch.append((h.aio_pwrite(buf, off), buf, w))
                w += 1
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c, buf, x in batch:
                h.aio_command_completed(c)
                print('D', x, flush=True)
            batchno += 1
            if batchno % 3 == 0:
                print('S', flush=True)
                h.flush()
                print('F', w - 1, flush=True)
    except nbd.Error as e:
        print('E', str(e.string).replace('\\n', ' '), flush=True)
    """

  struct WriterLog {
    var writes: [(id: UInt32, offset: Int, length: Int)] = []
    var acknowledgedThrough: Int64 = -1
    /// A write completed after the last flush was sent.
    var completedAfterLastFlushStarted = false
    var flushes = 0
    /// Writes whose completion the writer saw.
    var completed = Set<UInt32>()

    init(_ text: String) {
      var doneSinceFlushStart = false
      for line in text.split(separator: "\n") {
        let p = line.split(separator: " ")
        switch p.first {
        case "W":
          if p.count == 4, let id = UInt32(p[1]), let off = Int(p[2]), let n = Int(p[3]) {
            writes.append((id, off, n))
          }
        case "D":
          doneSinceFlushStart = true
          if p.count == 2, let id = UInt32(p[1]) { completed.insert(id) }
        case "S":
          doneSinceFlushStart = false
        case "F":
          if p.count == 2, let id = Int64(p[1]) { acknowledgedThrough = id }
          flushes += 1
        default: break
        }
      }
      completedAfterLastFlushStarted = doneSinceFlushStart
    }
  }

  /// The parts of each write no later write covers: [(write index, start, end)].
  func visibleParts(_ writes: [(id: UInt32, offset: Int, length: Int)]) -> [(Int, Int, Int)] {
    var covered: [(Int, Int)] = []  // sorted, disjoint
    var parts: [(Int, Int, Int)] = []
    for k in stride(from: writes.count - 1, through: 0, by: -1) {
      let s = writes[k].offset
      let e = s + writes[k].length
      var cursor = s
      for (cs, ce) in covered where ce > s && cs < e {
        if cs > cursor { parts.append((k, cursor, cs)) }
        cursor = max(cursor, ce)
      }
      if cursor < e { parts.append((k, cursor, e)) }
      // Insert [s, e) into covered, merging.
      var merged: [(Int, Int)] = []
      var ns = s
      var ne = e
      var placed = false
      for (cs, ce) in covered {
        if ce < ns {
          merged.append((cs, ce))
        } else if cs > ne {
          if !placed {
            merged.append((ns, ne))
            placed = true
          }
          merged.append((cs, ce))
        } else {
          ns = min(ns, cs)
          ne = max(ne, ce)
        }
      }
      if !placed { merged.append((ns, ne)) }
      covered = merged
    }
    return parts
  }

  /// Checks that the bytes of `parts` hold their writes' patterns in
  /// `images` (name, content); returns a failure description or nil.
  func checkParts(
    _ parts: [(Int, Int, Int)], of writes: [(id: UInt32, offset: Int, length: Int)], in images: [(String, Data)],
    original: Data? = nil
  ) -> String? {
    var report: [String] = []
    for (name, image) in images {
      var bad = 0
      var first = ""
      var badRanges: [(Int, Int)] = []
      image.withUnsafeBytes { (t: UnsafeRawBufferPointer) in
        for (k, s, e) in parts {
          let w = writes[k]
          for p in s..<e where t[p] != patternByte(w.id, p - w.offset) {
            bad += 1
            if let l = badRanges.last, l.1 == p {
              badRanges[badRanges.count - 1].1 = p + 1
            } else {
              badRanges.append((p, p + 1))
            }
            if first.isEmpty {
              first =
                "write \(w.id) (\(w.offset)+\(w.length)) at byte \(p): \(whoseData(t, at: p, writeOffset: w.offset, original: original))"
            }
          }
        }
      }
      if bad > 0 {
        let ranges = badRanges.prefix(8).map { "\($0.0)..<\($0.1)" }.joined(separator: " ")
        report.append("\(bad) bytes wrong \(name) (\(ranges)), first: \(first)")
      }
    }
    return report.isEmpty ? nil : report.joined(separator: "; ")
  }

  /// What the image holds at `p`: the record of some write, or the
  /// original backup bytes.
  func whoseData(_ t: UnsafeRawBufferPointer, at p: Int, writeOffset: Int, original: Data?) -> String {
    if let original, t[p] == original[p], p + 16 <= t.count,
      (0..<16).allSatisfy({ t[p + $0] == original[p + $0] })
    {
      return "holds the original backup bytes"
    }
    // Writes start anywhere: try every alignment of a 16-byte record.
    for shift in 0..<16 where p - shift >= 0 && p - shift + 16 <= t.count {
      let r = p - shift
      func le32(_ o: Int) -> UInt32 {
        UInt32(t[r + o]) | UInt32(t[r + o + 1]) << 8 | UInt32(t[r + o + 2]) << 16 | UInt32(t[r + o + 3]) << 24
      }
      let w = le32(0)
      let i = le32(4)
      if le32(8) == 0x5EED_0000 ^ w && le32(12) == i ^ 0xA5A5_A5A5 {
        return "holds record \(i) of write \(w) (which began at \(r - Int(i) * 16))"
      }
    }
    return "holds bytes of no write"
  }
}
