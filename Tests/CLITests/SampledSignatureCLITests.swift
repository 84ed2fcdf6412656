// bitmap-diff --signature --sample FRACTION --seed N as two sites run it:
// each copy served by nbdkit with its stats filter, so the bytes read are
// counted by the peer. The selection is checked against an implementation
// of the function as dualrestore-signature(5) gives it (TestSupport's
// SplitMix64, not the library's code), read out of the signature's own
// bytes: the same at both sites, drawn without reading, and only its blocks
// read.

import Foundation
import Glibc
import TestSupport
import XCTest

final class SampledSignatureCLITests: XCTestCase {
  static let blockSize = 4096
  static let blocks = 1 << 20
  static var size: Int { blocks * blockSize }
  private var servers: [RRTChild] = []

  override func tearDown() {
    for s in servers { _ = s.stop() }
    servers = []
    super.tearDown()
  }

  // MARK: The documented function, from the page

  /// Whether block `b` is in the sample of `p/q` with `seed`: output b of
  /// SplitMix64 seeded with the seed, below floor(p × 2^64 / q).
  static func selected(_ b: Int, p: UInt64, q: UInt64, seed: UInt64) -> Bool {
    if p == q { return true }
    let threshold = q.dividingFullWidth((high: p, low: 0)).quotient
    var g = SplitMix64(seed: seed &+ UInt64(b) &* 0x9E37_79B9_7F4A_7C15)
    return g.next() < threshold
  }

  static func sample(_ count: Int, p: UInt64, q: UInt64, seed: UInt64) -> [Int] {
    (0..<count).filter { selected($0, p: p, q: q, seed: seed) }
  }

  /// The `--extents` lines of these blocks (in order) of `blockSize` bytes:
  /// runs of neighbours joined.
  static func extents(_ blocks: [Int], _ blockSize: Int) -> [String] {
    var runs: [(Int, Int)] = []
    for b in blocks {
      if let last = runs.last, last.0 + last.1 == b {
        runs[runs.count - 1].1 += 1
      } else {
        runs.append((b, 1))
      }
    }
    return runs.map { "\($0.0 * blockSize) \($0.1 * blockSize)" }
  }

  /// A signature's bytes, read as dualrestore-signature(5) lays them out:
  /// the selected blocks (from the runs) and the SMPL field's p, q and seed.
  struct Parsed {
    var selection: [Int]
    var sample: (p: UInt64, q: UInt64, seed: UInt64)?
    var digestBytes: Int
  }

  static func parse(_ data: Data) throws -> Parsed {
    let b = [UInt8](data)
    func le(_ at: Int, _ width: Int) -> UInt64 {
      (0..<width).reduce(UInt64(0)) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) }
    }
    XCTAssertEqual(Array(b[0..<8]), [0x44, 0x52, 0x53, 0x49, 0x47, 0x0D, 0x0A, 0x1A])
    XCTAssertEqual(le(10, 2), 1, "a sparse signature")
    let h = Int(le(12, 4))
    let blockCount = Int(le(32, 8))
    var at = 82 + Int(le(80, 2))
    var sample: (UInt64, UInt64, UInt64)?
    while at < h {
      let tag = String(decoding: b[at..<at + 4], as: UTF8.self)
      let length = Int(le(at + 4, 2))
      if tag == "SMPL" {
        XCTAssertEqual(length, 24)
        sample = (le(at + 6, 8), le(at + 14, 8), le(at + 22, 8))
      }
      at += 6 + length
    }
    XCTAssertEqual(at, h, "the fields fill the header")
    let digestBytes = Int(le(h, 8))
    let s = Int(le(h + 8, 8))
    var runs: [Int] = []
    var i = h + 16
    while i < h + 16 + s {
      var v = 0
      var shift = 0
      while true {
        v |= Int(b[i] & 0x7F) << shift
        shift += 7
        i += 1
        if b[i - 1] & 0x80 == 0 { break }
      }
      runs.append(v)
    }
    var selection: [Int] = []
    var block = 0
    for (k, run) in runs.enumerated() {
      if k % 2 == 1 { selection += block..<block + run }
      block += run
    }
    XCTAssertEqual(block, blockCount, "the runs cover the device")
    XCTAssertEqual(digestBytes, selection.count * 32)
    XCTAssertEqual(b.count, h + 16 + s + digestBytes + 32)
    return Parsed(selection: selection, sample: sample, digestBytes: digestBytes)
  }

  // MARK: Images and the peer

  /// A: 64 pieces of 1 MiB of random data at seeded places in 4 GiB of
  /// holes. B: the same with 1% of the 2^20 blocks damaged at seeded places
  /// (one byte made its complement). Returns the damaged blocks.
  private func makeImages(_ s: Scratch) throws -> Set<Int> {
    var g = SplitMix64(seed: 77_001)
    let fa = open(s.path("a.img"), O_RDWR | O_CREAT | O_TRUNC, 0o644)
    let fb = open(s.path("b.img"), O_RDWR | O_CREAT | O_TRUNC, 0o644)
    defer {
      close(fa)
      close(fb)
    }
    XCTAssertEqual(ftruncate(fa, off_t(Self.size)), 0)
    XCTAssertEqual(ftruncate(fb, off_t(Self.size)), 0)
    func put(_ fd: Int32, _ bytes: [UInt8], _ offset: Int) {
      XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }, bytes.count)
    }
    for _ in 0..<64 {
      let piece = g.bytes(1 << 20)
      let at = Int(g.next() % UInt64(Self.size >> 20)) << 20
      put(fa, piece, at)
      put(fb, piece, at)
    }
    var damaged = Set<Int>()
    while damaged.count < (Self.blocks + 99) / 100 {
      let block = Int(g.next() % UInt64(Self.blocks))
      guard damaged.insert(block).inserted else { continue }
      let offset = block * Self.blockSize + Int(g.next() % UInt64(Self.blockSize))
      var byte: UInt8 = 0
      XCTAssertEqual(pread(fa, &byte, 1, off_t(offset)), 1)
      put(fb, [~byte], offset)
    }
    return damaged
  }

  /// Serves `image` read-only with nbdkit's stats filter on a private
  /// socket; returns the server, its URI and its stats file.
  private func serve(_ s: Scratch, _ image: String, _ name: String) throws -> (RRTChild, String, String) {
    let socket = s.path("\(name).sock")
    let stats = s.path("\(name).stats")
    unlink(socket)
    unlink(stats)
    let server = try RRTChild(
      name: "nbdkit \(name)", executable: "/usr/bin/nbdkit",
      arguments: ["-f", "-r", "-U", socket, "--filter=stats", "file", image, "statsfile=\(stats)"],
      stdout: s.path("\(name).out"), stderr: s.path("\(name).err"))
    servers.append(server)
    let uri = "nbd+unix:///?socket=\(socket)"
    for _ in 0..<200 {
      if try RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 5).status == 0 {
        return (server, uri, stats)
      }
      XCTAssertTrue(server.isRunning, "nbdkit ended: \(server.errors)")
      usleep(50_000)
    }
    throw XCTSkip("nbdkit did not answer on \(socket): \(server.errors)")
  }

  /// The bytes nbdkit's stats filter counted as read, once it has stopped
  /// (it writes the file as it exits), within the rounding of its units.
  private func bytesRead(_ server: RRTChild, _ stats: String) throws -> Double {
    XCTAssertEqual(server.stop(), 0, "nbdkit did not stop cleanly: \(server.errors)")
    let text = try String(contentsOfFile: stats, encoding: .utf8)
    let units: [String: Double] = ["bytes": 1, "KiB": 0x1p10, "MiB": 0x1p20, "GiB": 0x1p30]
    for line in text.split(separator: "\n") where line.hasPrefix("read:") {
      // read: 1056 ops, 0.014142 s, 4.12 MiB, 291.68 MiB/s op, 2.83 MiB/s total
      let fields = line.dropFirst(5).split(separator: ",").map { $0.split(separator: " ") }
      if fields.count >= 3, fields[2].count == 2, let amount = Double(fields[2][0]),
        let unit = units[String(fields[2][1])]
      {
        return amount * unit
      }
      XCTFail("a stats line of nbdkit not understood: \(line)")
    }
    XCTAssertTrue(text.contains("total:"), "no stats in \(stats): \(text)")
    return 0
  }

  // MARK: Tests

  /// Five seeds, each a check as two sites make it, through NBD: the sample
  /// of A signed at its site; B compared with it at the other; B sampled
  /// there with the same fraction and seed, the two signatures compared.
  /// Every check finds the damage (exit 1) and gives exactly the damaged
  /// blocks of the sample; both sites select the very blocks the documented
  /// function gives; each pass reads the sampled blocks and no more, at most
  /// 0.2% of the device, as nbdkit counts it.
  func testSamplesAtTwoSitesFindDamageReadingAThousandth() throws {
    try XCTSkipUnless(RRTEnv.have("nbdkit") && RRTEnv.have("nbdinfo"), "nbdkit and nbdinfo (libnbd-bin) are needed")
    let s = try Scratch()
    let damaged = try makeImages(s)
    let limit = Double(Self.size) * 0.002
    for seed: UInt64 in [11, 12, 13, 2_718_281_828, UInt64.max] {
      let (serverA, uriA, statsA) = try serve(s, s.path("a.img"), "a")
      let (serverB, uriB, statsB) = try serve(s, s.path("b.img"), "b")
      let common = ["--quiet", "--signature", "--sample", "1/1000", "--seed", String(seed), "--block-size", "4K"]
      let signA = try RRTCommand.run("bitmap-diff", common + ["-o", s.path("a.sig"), uriA])
      XCTAssertEqual(signA.status, 0, signA.stderr)
      let diff = try RRTCommand.run("bitmap-diff", ["--quiet", "--extents", s.path("a.sig"), uriB])
      XCTAssertEqual(diff.status, 1, "seed \(seed): the damage was not found: \(diff.stderr)")
      let signB = try RRTCommand.run("bitmap-diff", common + ["-o", s.path("b.sig"), uriB])
      XCTAssertEqual(signB.status, 0, signB.stderr)
      let both = try RRTCommand.run("bitmap-diff", ["--extents", s.path("a.sig"), s.path("b.sig")])
      XCTAssertEqual(both.status, 1, "seed \(seed): \(both.stderr)")

      let expected = Self.sample(Self.blocks, p: 1, q: 1000, seed: seed)
      let a = try Self.parse(s.read("a.sig"))
      let b = try Self.parse(s.read("b.sig"))
      XCTAssertEqual(a.selection, expected, "seed \(seed): the selection is the documented function's")
      XCTAssertEqual(b.selection, a.selection, "seed \(seed): both sites select the same blocks")
      XCTAssertTrue(a.sample.map { [$0.p, $0.q, $0.seed] == [1, 1000, seed] } ?? false)
      let caught = expected.filter { damaged.contains($0) }
      let lines = Self.extents(caught, Self.blockSize)
      XCTAssertEqual(diff.lines, lines, "seed \(seed): the damaged blocks of the sample")
      XCTAssertEqual(both.lines, lines, "seed \(seed): signature against signature")
      XCTAssertFalse(caught.isEmpty)

      let sampled = Double(expected.count * Self.blockSize)
      let readA = try bytesRead(serverA, statsA)
      let readB = try bytesRead(serverB, statsB)
      print(
        "seed \(seed): \(expected.count) blocks sampled, \(caught.count) damaged; A read \(readA) bytes, "
          + "B \(readB) in two passes, of \(Self.size)")
      XCTAssertLessThanOrEqual(readA, limit, "seed \(seed)")
      XCTAssertLessThanOrEqual(readB, 2 * limit, "seed \(seed): two passes over B")
      // The sampled blocks, within the 3 digits nbdkit prints.
      XCTAssertEqual(readA, sampled, accuracy: sampled * 0.01, "seed \(seed)")
      XCTAssertEqual(readB, 2 * sampled, accuracy: sampled * 0.02, "seed \(seed)")
    }
  }

  /// Without --seed a random seed is drawn and told on standard error; given
  /// back with --seed, it draws the same sample: the same signature but for
  /// its id and instant. --quiet says nothing, and the seed is in the file.
  func testARandomSeedIsToldAndDrawsTheSameSample() throws {
    let s = try Scratch()
    let image = try s.randomFile("a.img", size: (1 << 20) + 1000, seed: 5)
    let told = try RRTCommand.run(
      "bitmap-diff", ["--signature", "--sample", "0.05", "--block-size", "4K", "-o", s.path("r.sig"), image])
    XCTAssertEqual(told.status, 0, told.stderr)
    let words = told.stderr.split(whereSeparator: { $0 == " " || $0 == "\n" })
    let seedText = try XCTUnwrap(words.firstIndex(of: "seed").map { String(words[$0 + 1]) }, told.stderr)
    XCTAssertTrue(
      told.stderr.hasPrefix("bitmap-diff: sampling 1/20 of the blocks with seed \(seedText) (--seed \(seedText) "),
      told.stderr)
    XCTAssertEqual(told.stderr.split(separator: "\n").count, 1)
    let seed = try XCTUnwrap(UInt64(seedText))
    let again = try RRTCommand.run(
      "bitmap-diff",
      ["--signature", "--sample", "1/20", "--seed", seedText, "--block-size", "4K", "-o", s.path("s.sig"), image])
    XCTAssertEqual(again.status, 0, again.stderr)
    XCTAssertEqual(again.stderr, "", "a given seed is not told")
    let r = [UInt8](try s.read("r.sig"))
    let g = [UInt8](try s.read("s.sig"))
    XCTAssertEqual(r.count, g.count)
    XCTAssertEqual(Array(r[..<40]), Array(g[..<40]))
    XCTAssertEqual(Array(r[64..<(r.count - 32)]), Array(g[64..<(g.count - 32)]), "the same sample, the same digests")
    let parsed = try Self.parse(Data(r))
    XCTAssertEqual(parsed.selection, Self.sample(257, p: 1, q: 20, seed: seed))
    XCTAssertTrue(parsed.sample.map { [$0.p, $0.q, $0.seed] == [1, 20, seed] } ?? false)

    let quiet = try RRTCommand.run(
      "bitmap-diff", ["--quiet", "--signature", "--sample", "1/20", "--block-size", "4K", "-o", s.path("q.sig"), image])
    XCTAssertEqual(quiet.status, 0, quiet.stderr)
    XCTAssertEqual(quiet.stderr, "")
    let q = try Self.parse(s.read("q.sig"))
    let drawn = try XCTUnwrap(q.sample)
    XCTAssertEqual(q.selection, Self.sample(257, p: 1, q: 20, seed: drawn.seed), "the seed recorded drew the selection")
    // Two random seeds: two samples, which do not compare.
    XCTAssertNotEqual(drawn.seed, seed)
    assertFails(
      try RRTCommand.run("bitmap-diff", [s.path("r.sig"), s.path("q.sig")]), status: 2,
      mentioning:
        "\(s.path("r.sig")) samples 1/20 with seed \(seed) but \(s.path("q.sig")) samples 1/20 with seed \(drawn.seed); "
        + "sampled signatures compare only when drawn with the same fraction and seed")
  }

  /// With --map, the sample is drawn among the map's blocks; --sample 1 is
  /// every block (of the map); a sampled signature compares with a dense one
  /// over its blocks, and through pipes.
  func testSamplesWithinAMapAndThroughPipes() throws {
    let s = try Scratch()
    let a = try s.randomFile("a.img", size: 4 << 20, seed: 8)
    var data = try s.read("a.img")
    for block in [3, 20, 40, 41, 63] { data[block * 65536 + 7] ^= 0xFF }
    try s.file("b.img", data)
    try RRTCommand.run("overwrite-map", ["create", "--like", a, "--meaning", "selected", s.path("half.map")])
    try RRTCommand.run("overwrite-map", ["set", s.path("half.map"), "0", "2M"])
    let inMap = try RRTCommand.run(
      "bitmap-diff",
      ["--signature", "--map", s.path("half.map"), "--sample", "1/2", "--seed", "3", "-o", s.path("m.sig"), a])
    XCTAssertEqual(inMap.status, 0, inMap.stderr)
    let m = try Self.parse(s.read("m.sig"))
    XCTAssertEqual(m.selection, Self.sample(64, p: 1, q: 2, seed: 3).filter { $0 < 32 })
    let all = try RRTCommand.run(
      "bitmap-diff", ["--signature", "--map", s.path("half.map"), "--sample", "1", "-q", "-o", s.path("all.sig"), a])
    XCTAssertEqual(all.status, 0, all.stderr)
    XCTAssertEqual(try Self.parse(s.read("all.sig")).selection, Array(0..<32))
    let every = try RRTCommand.shell(
      "bitmap-diff --signature --sample 1 --seed 9 a.img | bitmap-diff --extents - b.img; test $? = 1",
      cwd: s.url.path)
    XCTAssertEqual(every.status, 0, every.stderr)
    XCTAssertEqual(every.lines, Self.extents([3, 20, 40, 41, 63], 65536), "a sample of 1 is every block")

    // Against a dense signature, either way round, and from a pipe.
    let expected = Self.sample(64, p: 1, q: 2, seed: 17).filter { [3, 20, 40, 41, 63].contains($0) }
    XCTAssertFalse(expected.isEmpty)
    let r = try RRTCommand.shell(
      """
      bitmap-diff --signature b.img > dense.sig
      bitmap-diff --signature --sample 0.5 --seed 17 a.img > half.sig
      bitmap-diff --extents half.sig dense.sig; test $? = 1 || exit 9
      bitmap-diff --extents dense.sig half.sig; test $? = 1 || exit 9
      bitmap-diff --signature --sample .5 --seed 17 a.img | bitmap-diff --extents - b.img; test $? = 1
      """, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertEqual(r.lines, Array(repeating: Self.extents(expected, 65536), count: 3).flatMap { $0 })
  }

  /// Bad values and misplaced options: exit 2, one sentence, no output.
  func testBadSamplesAreRefused() throws {
    let s = try Scratch()
    let a = try s.randomFile("a.img", size: 1 << 20, seed: 2)
    let b = try s.randomFile("b.img", size: 1 << 20, seed: 3)
    let out = s.path("out")
    let cases: [([String], String)] = [
      (["--signature", "--sample", "0", a], "sample fraction 0 is out of range (above 0, at most 1)"),
      (["--signature", "--sample", "0.0", a], "sample fraction 0.0 is out of range"),
      (["--signature", "--sample=-0.001", a], "sample fraction -0.001 is out of range"),
      (["--signature", "--sample", "-0.001", a], "Missing value for '--sample <fraction>'"),
      (["--signature", "--sample", "1.01", a], "sample fraction 1.01 is out of range"),
      (["--signature", "--sample", "1001/1000", a], "sample fraction 1001/1000 is out of range"),
      (["--signature", "--sample", "1/0", a], "sample fraction 1/0 is out of range"),
      (
        ["--signature", "--sample", "abc", a],
        "sample fraction abc is not a decimal like 0.001 or a fraction like 1/1000"
      ),
      (["--signature", "--sample", "1e-3", a], "sample fraction 1e-3 is not a decimal"),
      (["--signature", "--sample", "10%", a], "sample fraction 10% is not a decimal"),
      (["--signature", "--sample", "0.1", "--seed=-1", a], "seed -1 is not an unsigned 64-bit integer"),
      (["--signature", "--sample", "0.1", "--seed", "x", a], "seed x is not an unsigned 64-bit integer"),
      (
        ["--signature", "--sample", "0.1", "--seed", "18446744073709551616", a],
        "seed 18446744073709551616 is not an unsigned 64-bit integer (0 to 18446744073709551615)"
      ),
      (["--sample", "0.1", a, b], "--sample applies only to --signature"),
      (["--sample", "0.1", "--seed", "1", a, b], "--sample applies only to --signature"),
      (["--signature", "--seed", "1", a], "--seed applies only to --sample"),
      (["--seed", "1", a, b], "--seed applies only to --sample"),
      (["--signature", a, "--sample"], "Missing value for '--sample <fraction>'"),
      (["--signature", "--sample", "0.5", "--seed", "-1", a], "Missing value for '--seed <n>'"),
    ]
    for (arguments, fragment) in cases {
      let r = try RRTCommand.run("bitmap-diff", ["-o", out] + arguments)
      assertFails(r, status: 2, mentioning: fragment)
      XCTAssertEqual(r.stderr.split(separator: "\n").first.map { $0.contains(fragment) }, true, "\(arguments)")
      XCTAssertFalse(FileManager.default.fileExists(atPath: out), "\(arguments) wrote its output")
    }
    // Samples of other fractions or seeds do not compare; nothing is written.
    for (index, (fraction, seed)) in [("1/10", "1"), ("1/10", "2"), ("1/9", "1")].enumerated() {
      let r = try RRTCommand.run(
        "bitmap-diff",
        ["--signature", "--sample", fraction, "--seed", seed, "--block-size", "4K", "-o", s.path("\(index).sig"), a])
      XCTAssertEqual(r.status, 0, r.stderr)
    }
    assertFails(
      try RRTCommand.run("bitmap-diff", ["-o", out, s.path("0.sig"), s.path("1.sig")]), status: 2,
      mentioning: "samples 1/10 with seed 1 but \(s.path("1.sig")) samples 1/10 with seed 2")
    assertFails(
      try RRTCommand.run("bitmap-diff", ["-o", out, s.path("2.sig"), s.path("0.sig")]), status: 2,
      mentioning: "samples 1/9 with seed 1 but \(s.path("0.sig")) samples 1/10 with seed 1")
    XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    // The same sample of another image of the same size compares.
    let same = try RRTCommand.run(
      "bitmap-diff", ["--signature", "--sample", "0.1", "--seed", "1", "--block-size", "4K", "-o", s.path("b.sig"), b])
    XCTAssertEqual(same.status, 0, same.stderr)
    let compared = try RRTCommand.run("bitmap-diff", ["--extents", s.path("0.sig"), s.path("b.sig")])
    XCTAssertEqual(compared.status, 1, compared.stderr)
    XCTAssertEqual(
      compared.lines, Self.extents(Self.sample(256, p: 1, q: 10, seed: 1), 4096),
      "two random images differ in every sampled block")
  }
}
