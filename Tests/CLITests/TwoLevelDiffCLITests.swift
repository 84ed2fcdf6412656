// The comparison across a link in two steps, as dualrestore(7) gives it:
// a coarse signature from the far side, the coarse map of differing regions
// back, a sparse fine signature of those regions only, and the fine map of
// differing blocks. On two sparse images of 2 GiB: the map must be the one
// comparing the data gives, and far fewer bytes must cross than a full fine
// signature.

import Foundation
import TestSupport
import XCTest

final class TwoLevelDiffCLITests: XCTestCase {
  /// A (far) with 1 MiB pieces of data scattered over holes; B (near) a
  /// sparse copy with 1 MiB runs changed (on data, in holes, across an
  /// 8 MiB boundary, at the very end) and one 4 KiB write. Returns the
  /// scratch directory and the 64 KiB extents that differ.
  private func makeImages() throws -> (Scratch, [String]) {
    let s = try Scratch()
    let script = """
      truncate -s 2G a.img
      for mib in 5 100 101 777 1024 1500 2047; do
        dd if=/dev/urandom of=a.img bs=1M count=1 seek=$mib conv=notrunc status=none
      done
      cp --sparse=always a.img b.img
      for mib in 100 300 1023 1024 2047; do
        dd if=/dev/urandom of=b.img bs=1M count=1 seek=$mib conv=notrunc status=none
      done
      dd if=/dev/urandom of=b.img bs=4K count=1 seek=$(((1200 << 8) + 17)) conv=notrunc status=none
      """
    let made = try RRTCommand.shell(script, cwd: s.url.path)
    XCTAssertEqual(made.status, 0, made.stderr)
    let expected = [
      "\(100 << 20) \(1 << 20)", "\(300 << 20) \(1 << 20)", "\(1023 << 20) \(2 << 20)",
      "\((1200 << 20) + 65536) 65536", "\(2047 << 20) \(1 << 20)",
    ]
    return (s, expected)
  }

  private func size(_ s: Scratch, _ name: String) throws -> Int { try s.read(name).count }

  func testTwoStepsGiveTheDirectMapAndMoveLittle() throws {
    let (s, expected) = try makeImages()
    let direct = try RRTCommand.shell(
      "bitmap-diff --extents a.img b.img; test $? = 1 && bitmap-diff a.img b.img > direct.map; test $? = 1",
      cwd: s.url.path)
    XCTAssertEqual(direct.status, 0, direct.stderr)
    XCTAssertEqual(direct.lines, expected, "the images differ where they were written")

    // Step by step, each piece that crosses the link kept as a file.
    let steps = try RRTCommand.shell(
      """
      bitmap-diff --signature --block-size 8M a.img > coarse.sig                # far
      bitmap-diff coarse.sig b.img > coarse.map; test $? = 1                    # near
      overwrite-map rescale --block-size 64K coarse.map -o fine-selection.map   # far
      bitmap-diff --signature --map fine-selection.map a.img > fine.sig         # far
      bitmap-diff fine.sig b.img > fine.map; test $? = 1                        # near
      overwrite-map extents coarse.map
      echo --
      overwrite-map extents fine.map
      """, cwd: s.url.path)
    XCTAssertEqual(steps.status, 0, steps.stderr)
    let parts = steps.lines.split(separator: "--", omittingEmptySubsequences: false).map(Array.init)
    XCTAssertEqual(
      parts.first,
      [
        "\(96 << 20) \(8 << 20)", "\(296 << 20) \(8 << 20)", "\(1016 << 20) \(16 << 20)",
        "\(1200 << 20) \(8 << 20)", "\(2040 << 20) \(8 << 20)",
      ],
      "the 8 MiB regions that hold a change")
    XCTAssertEqual(parts.last, expected)
    // The very map of the direct comparison: same blocks, same geometry.
    let same = try RRTCommand.run("overwrite-map", ["subtract", s.path("fine.map"), s.path("direct.map")])
    XCTAssertEqual(try extentsOf(same.data, s), [])
    let back = try RRTCommand.run("overwrite-map", ["subtract", s.path("direct.map"), s.path("fine.map")])
    XCTAssertEqual(try extentsOf(back.data, s), [])

    // What crossed: the coarse signature, the coarse map, the sparse fine
    // signature; against the full fine signature of A.
    let full = try RRTCommand.shell("bitmap-diff --signature a.img > full.sig", cwd: s.url.path)
    XCTAssertEqual(full.status, 0, full.stderr)
    let across = try size(s, "coarse.sig") + size(s, "coarse.map") + size(s, "fine.sig")
    let fullSize = try size(s, "full.sig")
    XCTAssertGreaterThan(fullSize, 32768 * 32, "one digest per 64 KiB block of 2 GiB")
    XCTAssertLessThan(across * 10, fullSize, "\(across) bytes crossed, against \(fullSize) for the full signature")
    // The sparse signature holds the 48 MiB of differing regions: 768 digests.
    XCTAssertLessThan(try size(s, "fine.sig"), 768 * 32 + 400)
    XCTAssertGreaterThanOrEqual(try size(s, "fine.sig"), 768 * 32)

    // The same as one pipeline, as across ssh.
    let piped = try RRTCommand.shell(
      "bitmap-diff --signature --block-size 8M a.img | bitmap-diff - b.img "
        + "| overwrite-map rescale --block-size 64K - | bitmap-diff --signature --map - a.img "
        + "| bitmap-diff --extents - b.img; test $? = 1", cwd: s.url.path)
    XCTAssertEqual(piped.status, 0, piped.stderr)
    XCTAssertEqual(piped.lines, expected)
  }

  /// A sparse signature says nothing outside its selection: a change there
  /// is not reported, and the two-step map then falls short of the direct one.
  func testAChangeOutsideTheSelectionIsNotReported() throws {
    let (s, expected) = try makeImages()
    let r = try RRTCommand.shell(
      """
      bitmap-diff --signature --block-size 8M a.img | bitmap-diff - b.img > coarse.map; test $? = 1
      overwrite-map rescale --block-size 64K coarse.map -o selection.map
      overwrite-map clear selection.map 296M 8M
      bitmap-diff --signature --map selection.map a.img | bitmap-diff --extents - b.img; test $? = 1
      """, cwd: s.url.path)
    XCTAssertEqual(r.status, 0, r.stderr)
    XCTAssertEqual(r.lines, expected.filter { !$0.hasPrefix("\(300 << 20) ") })
    XCTAssertNotEqual(r.lines, expected)
    // That region alone finds that change alone; regions where nothing
    // changed (one with data in both) find nothing.
    let only = try RRTCommand.shell(
      """
      overwrite-map create --like a.img --meaning selected only.map
      overwrite-map set only.map 296M 8M
      bitmap-diff --signature --map only.map a.img | bitmap-diff --extents - b.img; test $? = 1
      overwrite-map create --like a.img --meaning selected same.map
      overwrite-map set same.map 0 8M
      overwrite-map set same.map 512M 8M
      bitmap-diff --signature --map same.map --block-size 64K a.img | bitmap-diff --extents - b.img
      """, cwd: s.url.path)
    XCTAssertEqual(only.status, 0, only.stderr)
    XCTAssertEqual(only.lines, ["\(300 << 20) \(1 << 20)"])
  }

  private func extentsOf(_ map: Data, _ s: Scratch) throws -> [String] {
    try s.file("tmp.map", map)
    let r = try RRTCommand.run("overwrite-map", ["extents", s.path("tmp.map")])
    XCTAssertEqual(r.status, 0, r.stderr)
    return r.lines
  }
}
