// restore-read-through --reuse OLD --backup-signature SIG: rebuilding a disk
// from an older local copy, measured at the real backup. B (the backup) is A
// (the older copy) with blocks changed, copied, swapped, a region shifted by
// whole blocks and one by part of a block, a run of zeros, and a partial
// last block; what the link must carry is worked out from the two images
// themselves (RestoreReuseCLITests.expected), and counted at the backup by
// nbdkit's stats filter. The same on real ext4 images (Ext4Images), in
// 4 KiB blocks, with the file system checked after. Also: a damaged OLD
// caught by the digest check, the phase before OLD is hashed, a signature
// not yet whole or damaged, and the refusals.
//
// The rigs are RRTRig (RestoreReadThroughHarness.swift); every child is
// stopped in tearDown (CLITestCase).

import Foundation
import Glibc
import TestSupport
import XCTest

final class RestoreReuseCLITests: RestoreCLITestCase {
  static let blockSize = 65536
  /// 256 blocks, the last one 45536 bytes.
  static let size = 256 * 65536 - 20000

  /// A (the older copy) and B (the backup): B is A with blocks 3, 50, 51
  /// and 200 changed; A's 10 and 20 copied to 100 and 120; 130 and 131
  /// swapped; 148..<168 shifted to 150..<170; 180..<184 shifted by 4 KiB;
  /// 230..<234 zeros.
  static func images(seed: UInt64) -> (a: Data, b: Data) {
    let bs = blockSize
    let a = RRTBytes.random(size, seed: seed)
    var b = a
    func block(_ k: Int) -> Range<Int> { (k * bs)..<((k + 1) * bs) }
    for (i, k) in [3, 50, 51, 200].enumerated() {
      b.replaceSubrange(block(k), with: RRTBytes.random(bs, seed: seed * 100 + UInt64(i)))
    }
    b.replaceSubrange(block(100), with: a[block(10)])
    b.replaceSubrange(block(120), with: a[block(20)])
    b.replaceSubrange(block(130), with: a[block(131)])
    b.replaceSubrange(block(131), with: a[block(130)])
    b.replaceSubrange((150 * bs)..<(170 * bs), with: a[(148 * bs)..<(168 * bs)])
    b.replaceSubrange((180 * bs)..<(184 * bs), with: a[(180 * bs + 4096)..<(184 * bs + 4096)])
    b.replaceSubrange((230 * bs)..<(234 * bs), with: Data(count: 4 * bs))
    return (a, b)
  }

  /// What each block of `new` needs, from the images alone: zeros; the
  /// same bytes in `old` at its offset; the same bytes at another block of
  /// `old` (over the same length: a partial last block matches only a
  /// block of that length); or the link.
  struct Expected {
    var samePlace = 0
    var elsewhere = 0
    var zeros = 0
    var lacks: [Int] = []
    var lacksBytes = 0
  }

  static func expected(old: Data, new: Data, blockSize bs: Int) -> Expected {
    var e = Expected()
    var oldBlocks: [Data: Int] = [:]
    for j in 0..<(old.count / bs) where oldBlocks[old[(j * bs)..<((j + 1) * bs)]] == nil {
      oldBlocks[Data(old[(j * bs)..<((j + 1) * bs)])] = j
    }
    let count = (new.count + bs - 1) / bs
    for k in 0..<count {
      let range = (k * bs)..<min((k + 1) * bs, new.count)
      let chunk = new[range]
      if RRTBytes.isZero(chunk) {
        e.zeros += 1
      } else if range.upperBound <= old.count && old[range] == chunk {
        e.samePlace += 1
      } else if chunk.count == bs
        ? oldBlocks[Data(chunk)] != nil
        : (old.count % bs == chunk.count && old.suffix(chunk.count) == chunk)
      {
        e.elsewhere += 1
      } else {
        e.lacks.append(k)
        e.lacksBytes += chunk.count
      }
    }
    return e
  }

  /// The counts of a restore-read-through log's stop lines, summed.
  struct Counted: Equatable {
    var fetched = 0
    var zeroedByBlockStatus = 0
    var samePlace = 0
    var elsewhere = 0
    var zeros = 0
    var mismatches = 0
  }

  static func counted(_ log: String, file: StaticString = #filePath, line: UInt = #line) -> Counted {
    var c = Counted()
    func number(_ pattern: String, in text: String) -> Int? {
      guard let re = try? NSRegularExpression(pattern: pattern),
        let m = re.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)),
        let r = Range(m.range(at: 1), in: text)
      else { return nil }
      return Int(text[r])
    }
    let stops = log.split(separator: "\n").map(String.init).filter { $0.contains("stopped cleanly") }
    XCTAssertFalse(stops.isEmpty, "no stop line in:\n\(log)", file: file, line: line)
    for s in stops {
      c.fetched += number(#"(\d+) fetched from the backup"#, in: s) ?? -1_000_000
      c.zeroedByBlockStatus += number(#"(\d+) zeroed as the backup's zeros"#, in: s) ?? -1_000_000
      c.samePlace += number(#"reused (\d+) block\(s\) from older copies at the same place"#, in: s) ?? -1_000_000
      c.elsewhere += number(#"same place, (\d+) elsewhere"#, in: s) ?? -1_000_000
      c.zeros += number(#"elsewhere, (\d+) as zeros"#, in: s) ?? -1_000_000
      c.mismatches += number(#"(\d+) read from them did not match"#, in: s) ?? 0
    }
    return c
  }

  /// A rig whose backup is B, with A written as the older copy; nothing
  /// started.
  func rig(seed: UInt64) throws -> (RRTRig, old: String, a: Data) {
    let (a, b) = Self.images(seed: seed)
    let r = try RRTRig(size: Self.size, seed: seed, backup: b)
    rigs.append(r)
    XCTAssertEqual(r.blockSize, Self.blockSize)
    let old = try r.s.file("old.img", a)
    return (r, old, a)
  }

  /// The backup's signature as a file, made at "the backup site".
  func signature(_ r: RRTRig, name: String = "backup.sig") throws -> String {
    let path = r.s.path(name)
    let res = try RRTCommand.run("bitmap-diff", ["--signature", "-o", path, r.backupPath], timeout: 60)
    XCTAssertEqual(res.status, 0, res.summary)
    return path
  }

  func startCountingBackup(_ r: RRTRig) throws -> String {
    let stats = r.s.path("stats.txt")
    try r.startBackup(.nbdkit(filters: ["stats"], parameters: ["statsfile=\(stats)"]))
    return stats
  }

  /// The bytes nbdkit's stats filter says were read (nbdkit stopped first:
  /// it writes the file as it exits), within the rounding of its units.
  func backupBytesRead(_ r: RRTRig, _ stats: String, file: StaticString = #filePath, line: UInt = #line) throws
    -> Double
  {
    XCTAssertEqual(r.backupServer?.stop(grace: 10), 0, "nbdkit did not stop cleanly", file: file, line: line)
    r.backupServer = nil
    let text = try String(contentsOfFile: stats, encoding: .utf8)
    let units: [String: Double] = ["bytes": 1, "KiB": 0x1p10, "MiB": 0x1p20, "GiB": 0x1p30]
    for l in text.split(separator: "\n") where l.hasPrefix("read:") {
      // read: 32 ops, 0.020959 s, 8.00 MiB, 381.70 MiB/s op, 13.24 MiB/s total
      let fields = l.dropFirst(5).split(separator: ",").map { $0.split(separator: " ") }
      if fields.count >= 3, fields[2].count == 2, let amount = Double(fields[2][0]),
        let unit = units[String(fields[2][1])]
      {
        return amount * unit
      }
      XCTFail("a stats line of nbdkit not understood: \(l)", file: file, line: line)
    }
    // No read line: nothing was read.
    XCTAssertTrue(text.contains("total:"), "no stats in \(stats): \(text)", file: file, line: line)
    return 0
  }

  func flip(_ path: String, at offset: Int) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: UInt64(offset))
    let byte = try XCTUnwrap(h.read(upToCount: 1)).first ?? 0
    try h.seek(toOffset: UInt64(offset))
    try h.write(contentsOf: Data([byte ^ 0x5A]))
    try h.synchronize()
  }

  // MARK: Rebuilding from an older copy

  /// The recipe: the backup's signature through a pipe, the older copy
  /// hashed at the start; half the disk read by a client (cold reads, with
  /// read-ahead), then a restart that hydrates the rest. The restored disk
  /// is B, and the link carried only the blocks A lacks: counted at the
  /// backup by nbdkit's stats filter, and in the log by kind.
  func testRestoresFromAnOlderCopyFetchingOnlyWhatItLacks() throws {
    try require("nbdkit", "nbdinfo", "nbdsh", "nbdcopy")
    let (r, old, a) = try rig(seed: 41)
    let expect = Self.expected(old: a, new: r.original, blockSize: r.blockSize)
    // The images are what the test means them to be.
    XCTAssertEqual(expect.lacks, [3, 50, 51, 180, 181, 182, 183, 200])
    XCTAssertEqual(expect.elsewhere, 24)
    XCTAssertEqual(expect.zeros, 4)
    XCTAssertEqual(expect.samePlace, 220)
    let stats = try startCountingBackup(r)

    // As `ssh backup bitmap-diff --signature /dev/vg/backup | restore-read-through --backup-signature - ...`.
    let fifo = r.s.path("signature.fifo")
    XCTAssertEqual(mkfifo(fifo, 0o600), 0)
    let signer = try RRTChild(
      name: "signer", executable: "/bin/sh",
      arguments: ["-c", #"exec "$0" --signature "$1" > "$2""#, Tools.path("bitmap-diff"), r.backupPath, fifo],
      stdout: r.s.path("signer.out"), stderr: r.s.path("signer.err"))
    r.others.append(signer)
    try r.startServer(["--backup-signature", "-", "--reuse", old, "--progress-interval", "0"], stdin: fifo)
    XCTAssertTrue(r.waitForLog("hashed the older copy"), r.log)
    XCTAssertTrue(r.waitForLog("the backup's signature standard input is read"), r.log)
    XCTAssertEqual(signer.wait(timeout: 30), 0, "the signer: \(signer.errors)")
    let half = 128 * r.blockSize
    let first = try r.readThroughExport([(0, half)])
    RRTBytes.assertEqual(first.prefix(half), r.original.prefix(half), "the first half read through the export")
    r.stopServer()

    // The rest in the background, from the signature as a file.
    let sig = try signature(r)
    try r.startServer(["--backup-signature", sig, "--reuse", old, "--hydrate", "--progress-interval", "0"])
    XCTAssertTrue(r.waitForLog("the restore is complete", seconds: 120), r.log)
    let whole = try r.copyExport(to: "export.img")
    RRTBytes.assertEqual(whole, r.original, "the restored disk read through the export")
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), r.original, "the primary after the stop")
    XCTAssertEqual(try r.bitmapDiff().status, 0, "bitmap-diff PRIMARY BACKUP")
    XCTAssertEqual(try r.currentBlocks().count, r.blockCount)

    let c = Self.counted(r.allLogs)
    XCTAssertEqual(c.fetched, expect.lacks.count, "blocks fetched; logs:\n\(r.allLogs)")
    XCTAssertEqual(c.samePlace, expect.samePlace, "\(c)")
    XCTAssertEqual(c.elsewhere, expect.elsewhere, "\(c)")
    XCTAssertEqual(c.zeros + c.zeroedByBlockStatus, expect.zeros, "\(c)")
    XCTAssertEqual(c.mismatches, 0, "\(c)")
    let read = try backupBytesRead(r, stats)
    XCTAssertGreaterThanOrEqual(read, Double(expect.lacksBytes) * 0.99, "the backup's stats")
    XCTAssertLessThanOrEqual(
      read, Double(expect.lacksBytes) * 1.05 + 4096,
      "the link carried more than the \(expect.lacks.count) blocks A lacks (\(expect.lacksBytes) bytes)")
    XCTAssertFalse(
      FileManager.default.fileExists(atPath: r.mapPath + ".reuse-0.sig"), "the older copy's signature is left")
  }

  /// A byte flipped in the older copy after it was hashed, in blocks that
  /// would be taken at the same place and elsewhere: each read is caught by
  /// its digest and the block fetched instead. A byte flipped before the
  /// hashing: the index does not offer that block at all.
  func testADamagedOlderCopyIsCaughtByTheDigestAndFetched() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let (r, old, a) = try rig(seed: 43)
    let expect = Self.expected(old: a, new: r.original, blockSize: r.blockSize)
    let stats = try startCountingBackup(r)
    let sig = try signature(r)
    try flip(old, at: 5 * r.blockSize + 777)
    try r.startServer(["--backup-signature", sig, "--reuse", old, "--progress-interval", "0"])
    XCTAssertTrue(r.waitForLog("hashed the older copy"), r.log)
    XCTAssertTrue(r.waitForLog("signature \(sig) is read"), r.log)
    // Block 10 is B's 10 and 100, block 20 is B's 20 and 120.
    try flip(old, at: 10 * r.blockSize + 12345)
    try flip(old, at: 20 * r.blockSize)
    let whole = try r.copyExport(to: "export.img")
    RRTBytes.assertEqual(whole, r.original, "the restored disk read through the export")
    r.stopServer()
    RRTBytes.assertEqual(try r.primaryData(), r.original, "the primary after the stop")
    let c = Self.counted(r.log)
    XCTAssertEqual(c.mismatches, 4, "reads caught by the digest check; log:\n\(r.log)")
    XCTAssertEqual(c.fetched, expect.lacks.count + 5, "\(c)")
    XCTAssertEqual(c.samePlace, expect.samePlace - 3, "\(c)")
    XCTAssertEqual(c.elsewhere, expect.elsewhere - 2, "\(c)")
    let read = try backupBytesRead(r, stats)
    XCTAssertEqual(read, Double(expect.lacksBytes + 5 * r.blockSize), accuracy: 4096, "the backup's stats")
  }

  /// Until the older copy is hashed, a block is sought at its own offset
  /// only, and serving does not wait for the hashing: the older copy is an
  /// NBD export (any size) whose reads take 300 ms, of 4 GiB, so hashing
  /// it outlasts the test. The stop does not wait for it either.
  func testBeforeTheOlderCopyIsHashedOnlyItsSamePlaceIsTried() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let (r, old, a) = try rig(seed: 47)
    let expect = Self.expected(old: a, new: r.original, blockSize: r.blockSize)
    let stats = try startCountingBackup(r)
    let sig = try signature(r)
    let oldSocket = r.s.path("old.sock")
    let oldServer = try RRTChild(
      name: "older copy", executable: "/usr/bin/nbdkit",
      arguments: [
        "-f", "-r", "-U", oldSocket, "--filter=truncate", "--filter=delay", "file", old, "truncate=4G",
        "delay-read=300ms",
      ], stdout: r.s.path("old.out"), stderr: r.s.path("old.log"))
    r.others.append(oldServer)
    let oldURI = "nbd+unix:///?socket=\(oldSocket)"
    try r.waitForNBD(oldURI, process: oldServer, what: "the older copy's server")
    try r.startServer(["--backup-signature", sig, "--reuse", oldURI, "--progress-interval", "0"])
    XCTAssertTrue(r.waitForLog("signature \(sig) is read"), r.log)
    let whole = try r.copyExport(to: "export.img")
    RRTBytes.assertEqual(whole, r.original, "the restored disk read through the export")
    let started = RRTEnv.monotonic()
    r.stopServer()
    XCTAssertLessThan(RRTEnv.monotonic() - started, 10, "the stop waited for the hashing")
    XCTAssertFalse(r.log.contains("hashed the older copy"), "hashing ended within the test:\n\(r.log)")
    let c = Self.counted(r.log)
    XCTAssertEqual(c.samePlace, expect.samePlace, "\(c)")
    XCTAssertEqual(c.elsewhere, 0, "\(c)")
    XCTAssertEqual(c.zeros + c.zeroedByBlockStatus, expect.zeros, "\(c)")
    XCTAssertEqual(c.fetched, expect.lacks.count + expect.elsewhere, "\(c)")
    let read = try backupBytesRead(r, stats)
    XCTAssertEqual(
      read, Double(expect.lacksBytes + expect.elsewhere * r.blockSize), accuracy: 4096, "the backup's stats")
    let leftovers = try FileManager.default.contentsOfDirectory(atPath: r.dir).filter { $0.contains("reuse-") }
    XCTAssertEqual(leftovers, [], "the unfinished signature of the older copy is left")
  }

  // MARK: A real file system

  /// What B's 4 KiB blocks need from the link, worked out by python3 from
  /// the images alone (not by the code under test): the blocks of B that
  /// are all zeros, equal to A's at the same offset, equal to some other
  /// block of A (by SHA-256 of every block of A), or none of these (what
  /// the link must carry); and B's blocks that are not zeros.
  struct Ext4Expected: Decodable {
    var blocks: Int
    var zeros: Int
    var samePlace: Int
    var elsewhere: Int
    var lacks: Int
    var nonZero: Int
  }

  func ext4Expected(old: String, new: String) throws -> Ext4Expected {
    let script = """
      import hashlib, json, sys
      bs = 4096
      a = open(sys.argv[1], 'rb').read()
      b = open(sys.argv[2], 'rb').read()
      assert len(a) % bs == 0 and len(b) % bs == 0
      held = {hashlib.sha256(a[i:i + bs]).digest() for i in range(0, len(a), bs)}
      zero = bytes(bs)
      e = dict(blocks=len(b) // bs, zeros=0, samePlace=0, elsewhere=0, lacks=0, nonZero=0)
      for i in range(0, len(b), bs):
          blk = b[i:i + bs]
          if blk == zero:
              e['zeros'] += 1
              continue
          e['nonZero'] += 1
          if a[i:i + bs] == blk:
              e['samePlace'] += 1
          elif hashlib.sha256(blk).digest() in held:
              e['elsewhere'] += 1
          else:
              e['lacks'] += 1
      print(json.dumps(e))
      """
    let res = try RRTCommand.run("/usr/bin/python3", ["-c", script, old, new], timeout: 120)
    XCTAssertEqual(res.status, 0, res.summary)
    return try JSONDecoder().decode(Ext4Expected.self, from: res.data)
  }

  /// The backup is B, an ext4 image; the older copy is A, the same file
  /// system a month before (Ext4Images: files deleted, moved and added, so
  /// much of A's content sits at other blocks in B). Restored onto an empty
  /// primary with --hydrate, in 4 KiB blocks (the file system's): the disk
  /// is B and its file system is sound, and the link carried about what A
  /// lacks: at most 5% more than B's blocks found nowhere in A (and not
  /// zeros), and far less than B's data, so a restore that took only the
  /// same place, or nothing, from A fails here.
  func testRestoresAnExt4ImageFromAnOlderOneFetchingOnlyWhatItLacks() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy", "mkfs.ext4", "e2fsck", "python3", "cmp")
    let size = 64 << 20
    let bs = 4096
    let m = try Scratch()
    try Ext4Images.make(in: m.url.path, size: size)
    let r = try RRTRig(size: size, backup: try m.read("B.img"))
    rigs.append(r)
    let old = m.path("A.img")
    let expect = try ext4Expected(old: old, new: r.backupPath)
    // The images are what the test means them to be: B holds much of A
    // elsewhere, and data A lacks.
    XCTAssertEqual(expect.blocks, size / bs)
    XCTAssertGreaterThan(expect.elsewhere, 500, "\(expect)")
    XCTAssertGreaterThan(expect.lacks, 100, "\(expect)")
    XCTAssertLessThan(Double(expect.lacks), 0.2 * Double(expect.nonZero), "\(expect)")

    let stats = try startCountingBackup(r)
    let sig = r.s.path("backup.sig")
    let signed = try RRTCommand.run(
      "bitmap-diff", ["--signature", "--block-size", "4096", "-o", sig, r.backupPath], timeout: 60)
    XCTAssertEqual(signed.status, 0, signed.summary)
    try r.startServer([
      "--backup-signature", sig, "--reuse", old, "--block-size", "4096", "--hydrate", "--progress-interval", "0",
    ])
    XCTAssertTrue(r.waitForLog("the restore is complete", seconds: 300), r.log)
    _ = try r.copyExport(to: "export.img")
    func cmp(_ a: String, _ b: String) throws -> RRTCommand.Result {
      try RRTCommand.run("/usr/bin/cmp", [a, b], timeout: 60)
    }
    let exported = try cmp(r.s.path("export.img"), r.backupPath)
    XCTAssertEqual(exported.status, 0, "the export is not B: \(exported.summary)")
    r.stopServer()
    let restored = try cmp(r.primaryPath, r.backupPath)
    XCTAssertEqual(restored.status, 0, "the primary after the stop is not B: \(restored.summary)")
    let diff = try RRTCommand.run("bitmap-diff", ["--block-size", "4096", r.primaryPath, r.backupPath], timeout: 60)
    XCTAssertEqual(diff.status, 0, "bitmap-diff PRIMARY BACKUP: \(diff.summary)")
    let fsck = try RRTCommand.run("/usr/sbin/e2fsck", ["-fn", r.primaryPath], timeout: 120)
    XCTAssertEqual(fsck.status, 0, "e2fsck -fn on the restored primary: \(fsck.summary)")

    let c = Self.counted(r.allLogs)
    XCTAssertEqual(c.mismatches, 0, "\(c)")
    XCTAssertEqual(c.samePlace, expect.samePlace, "\(c)")
    XCTAssertEqual(c.zeros + c.zeroedByBlockStatus, expect.zeros, "\(c)")
    XCTAssertEqual(
      c.fetched + c.samePlace + c.elsewhere + c.zeros + c.zeroedByBlockStatus, expect.blocks,
      "every block once: \(c)")
    let read = try backupBytesRead(r, stats)
    let lacking = Double(expect.lacks * bs)
    // The allowance: nbdkit's stats print two decimals of their unit (off
    // by up to 0.005 MiB), and one block for any read that is not a block
    // of B's (a probe).
    let allowance = 0.005 * 0x1p20 + Double(bs)
    let figures =
      "expected \(expect); counted \(c); read from the backup \(Int(read)) bytes, "
      + "bound \(Int(lacking * 1.05 + allowance))"
    print("ext4 reuse: " + figures)
    XCTAssertGreaterThanOrEqual(read, lacking * 0.99, "the link carried less than A lacks: \(figures)")
    XCTAssertLessThanOrEqual(read, lacking * 1.05 + allowance, "the link carried more than A lacks: \(figures)")
    XCTAssertLessThan(read, 0.4 * Double(expect.nonZero * bs), "the link carried most of B's data: \(figures)")
  }

  // MARK: The signature

  /// A signature still arriving is not trusted (its digests are used only
  /// once its closing checksum has matched): every block is fetched, the
  /// export is B, and the server stops cleanly with the pipe still open.
  /// Blocks of 1 KiB, so that the part that arrives is several thousand
  /// digests (more than one read of them).
  func testASignatureNotYetWholeIsNotUsedAndServingDoesNotWaitForIt() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let (r, old, _) = try rig(seed: 53)
    try r.startBackup(.nbdkit())
    let sig = r.s.path("backup.sig")
    let made = try RRTCommand.run("bitmap-diff", ["--signature", "--block-size", "1K", "-o", sig, r.backupPath])
    XCTAssertEqual(made.status, 0, made.summary)
    let blocks = (Self.size + 1023) / 1024
    let fifo = r.s.path("signature.fifo")
    XCTAssertEqual(mkfifo(fifo, 0o600), 0)
    // The header and the first three quarters of the digests, then silence.
    let part = try Data(contentsOf: URL(fileURLWithPath: sig)).count - 32 - blocks / 4 * 32
    let writer = try RRTChild(
      name: "stalled signer", executable: "/bin/sh",
      arguments: ["-c", #"exec > "$2"; head -c "$1" "$0"; exec sleep 600"#, sig, String(part), fifo],
      stdout: r.s.path("writer.out"), stderr: r.s.path("writer.err"))
    r.others.append(writer)
    try r.startServer(
      ["--backup-signature", "-", "--reuse", old, "--block-size", "1K", "--progress-interval", "0"], stdin: fifo)
    let whole = try r.copyExport(to: "export.img")
    RRTBytes.assertEqual(whole, r.original, "the export while the signature is not whole")
    let started = RRTEnv.monotonic()
    r.stopServer()
    XCTAssertLessThan(RRTEnv.monotonic() - started, 10, "the stop waited for the signature")
    XCTAssertTrue(writer.isRunning, "the signature's pipe closed early")
    XCTAssertFalse(r.log.contains("is read"), r.log)
    let c = Self.counted(r.log)
    XCTAssertEqual(c.fetched, blocks, "\(c)")
    XCTAssertEqual(c.samePlace + c.elsewhere + c.zeros, 0, "\(c)")
  }

  /// A damaged signature (one digest byte flipped: its checksum fails) is
  /// found out once read whole, said in the log, and left unused.
  func testADamagedSignatureIsLeftUnused() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    let (r, old, _) = try rig(seed: 59)
    try r.startBackup(.nbdkit())
    let sig = try signature(r)
    var bytes = try Data(contentsOf: URL(fileURLWithPath: sig))
    bytes[bytes.count - 32 - 100 * 32] ^= 1
    try bytes.write(to: URL(fileURLWithPath: sig))
    try r.startServer(["--backup-signature", sig, "--reuse", old, "--progress-interval", "0"])
    XCTAssertTrue(r.waitForLog("cannot be used"), r.log)
    XCTAssertTrue(r.log.contains("checksum mismatch"), r.log)
    let whole = try r.copyExport(to: "export.img")
    RRTBytes.assertEqual(whole, r.original, "the export with a damaged signature")
    r.stopServer()
    let c = Self.counted(r.log)
    XCTAssertEqual(c.fetched, r.blockCount, "\(c)")
    XCTAssertEqual(c.samePlace + c.elsewhere + c.zeros, 0, "\(c)")
  }

  // MARK: Refusals

  /// Each refused in one sentence before anything is made: no map.
  func testReuseOptionsAreRefusedInOneSentence() throws {
    try require("nbdkit", "nbdinfo")
    let (r, old, _) = try rig(seed: 61)
    try r.startBackup(.nbdkit())
    let sig = try signature(r)
    func start(_ extra: [String]) throws -> RRTCommand.Result {
      try RRTCommand.run(
        "restore-read-through",
        extra + ["--backup", r.backupURI, "--map", r.mapPath, "--socket", r.s.path("x.sock"), r.primaryPath],
        timeout: 20)
    }
    func assertRefused(
      _ extra: [String], _ fragment: String, usage: Bool, file: StaticString = #filePath, line: UInt = #line
    ) throws {
      let res = try start(extra)
      XCTAssertFalse(res.timedOut, "started serving instead of refusing: \(res.summary)", file: file, line: line)
      if usage {
        XCTAssertEqual(res.status, 64, res.summary, file: file, line: line)
      } else {
        XCTAssertEqual(res.status, 1, res.summary, file: file, line: line)
      }
      XCTAssertTrue(res.stderr.contains(fragment), "stderr lacks '\(fragment)': \(res.summary)", file: file, line: line)
      // A usage error is followed by the usage; the sentence is one line.
      let lines = res.stderr.split(separator: "\n")
      XCTAssertEqual(
        usage ? lines.filter { $0.hasPrefix("Error:") }.count : lines.count, 1, "one sentence: \(res.stderr)",
        file: file, line: line)
      XCTAssertFalse(
        FileManager.default.fileExists(atPath: r.mapPath), "a refused start made the map", file: file, line: line)
    }
    try assertRefused(["--reuse", old], "--reuse needs --backup-signature", usage: true)
    try assertRefused(["--backup-signature", sig], "--backup-signature needs --reuse", usage: true)
    try assertRefused(["--backup-signature", sig, "--reuse", "-"], "--reuse reads images at random", usage: true)
    try assertRefused(["--backup-signature", sig, "--reuse", r.primaryPath], "is PRIMARY", usage: true)
    try assertRefused(
      ["--backup-signature", sig, "--reuse", old, "--reuse", old], "names the same older copy twice", usage: true)
    // A signature of another block size, of another size, and not a signature.
    let small = r.s.path("4k.sig")
    XCTAssertEqual(
      try RRTCommand.run("bitmap-diff", ["--signature", "--block-size", "4096", "-o", small, r.backupPath]).status, 0)
    try assertRefused(["--backup-signature", small, "--reuse", old], "was made with block size 4096", usage: false)
    let bigger = try r.s.file("bigger.img", RRTBytes.random(Self.size + 65536, seed: 7))
    let other = r.s.path("other.sig")
    XCTAssertEqual(try RRTCommand.run("bitmap-diff", ["--signature", "-o", other, bigger]).status, 0)
    try assertRefused(
      ["--backup-signature", other, "--reuse", old], "describes \(Self.size + 65536) bytes", usage: false)
    try assertRefused(["--backup-signature", old, "--reuse", old], "not a dualrestore signature", usage: false)
    // An existing map of another block size: the signature must match it.
    XCTAssertEqual(
      try RRTCommand.run(
        "overwrite-map", ["create", "--size", String(Self.size), "--block-size", "4096", r.mapPath]
      ).status, 0)
    let before = try Data(contentsOf: URL(fileURLWithPath: r.mapPath))
    let res = try start(["--backup-signature", sig, "--reuse", old])
    XCTAssertEqual(res.status, 1, res.summary)
    XCTAssertTrue(res.stderr.contains("has block size 4096"), res.summary)
    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: r.mapPath)), before, "a refused start changed the map")
  }
}
