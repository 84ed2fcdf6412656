// GNU ddrescue mapfiles: parsing (hex, decimal, comments), errors that name
// the line, the block bitmap under whole-block and any-byte rules, and
// render() → parse() round trips.

import TestSupport
import XCTest

@testable import DualRestore

private typealias Extent = DdrescueMapfile.Extent

final class DdrescueMapfileTests: XCTestCase {
  // MARK: Parsing

  func testParseHexDecimalAndComments() throws {
    let text = """
      # Mapfile. Created by GNU ddrescue version 1.27
      # Command line: ddrescue /dev/sdb disk.img disk.map
      # Start time:   2024-01-01 10:00:00

      # current_pos  current_status  current_pass
      0x1C00000     +               1
      #      pos        size  status
      0x00000000  0x00010000  +
      0x00010000  0x00000200  -
      66048       512         /
      0X00010400  0x0000FC00  *
        0x00020000\t0x00001000\t?   
      # a comment between data lines
      0x00021000  0x00000000  +
      0x00021000  4096        +

      """
    let extents = try DdrescueMapfile.parse(text, name: "disk.map")
    let expected: [Extent] = [
      Extent(position: 0, size: 0x10000, status: "+"),
      Extent(position: 0x10000, size: 0x200, status: "-"),
      Extent(position: 66048, size: 512, status: "/"),
      Extent(position: 0x10400, size: 0xFC00, status: "*"),
      Extent(position: 0x20000, size: 0x1000, status: "?"),
      // The zero-size line is dropped.
      Extent(position: 0x21000, size: 4096, status: "+"),
    ]
    XCTAssertEqual(extents, expected)
  }

  func testParseMinimalAndEmpty() throws {
    XCTAssertEqual(try DdrescueMapfile.parse("0 +\n", name: "m"), [])
    XCTAssertEqual(
      try DdrescueMapfile.parse("0x0 ? 1\n0 100 +", name: "m"), [Extent(position: 0, size: 100, status: "+")])
    assertThrows(try DdrescueMapfile.parse("", name: "empty.map"), containing: ["empty.map", "no status line"])
    assertThrows(
      try DdrescueMapfile.parse("# only comments\n\n# here\n", name: "c.map"), containing: ["c.map", "no status line"])
  }

  /// Line numbers count every line: comments and blank lines included.
  func testErrorsNameTheLine() {
    let head = "# header comment\n\n0x0 + 1\n# pos size status\n"  // 4 lines
    let cases: [(String, Int, String)] = [
      // Overlap with the line before.
      ("0x0 0x1000 +\n0x800 0x1000 -\n", 6, "overlaps"),
      // A position before the previous one.
      ("0x1000 0x1000 +\n0x0 0x100 -\n", 6, "overlaps"),
      // Overlap by a single byte.
      ("0x0 0x1000 +\n0xFFF 0x10 -\n", 6, "overlaps"),
      ("0x0 0x1000 +\n0x1000 0x10 -\n0x100F 0x1 +\n", 7, "overlaps"),
      // Bad status characters.
      ("0x0 0x1000 x\n", 5, "status"),
      ("0x0 0x1000 +\n\n0x1000 0x1000 ++\n", 7, "status"),
      ("0x0 0x1000 +\n0x1000 0x1000 F\n", 6, "status"),
      // Missing fields and bad numbers.
      ("0x0 0x1000\n", 5, "line 5"),
      ("0xZZ 0x1000 +\n", 5, "line 5"),
      ("0x0 -5 +\n", 5, "line 5"),
      ("0x0 1.5 +\n", 5, "line 5"),
      // An extent past 2^64.
      ("0xFFFFFFFFFFFFF000 0x2000 +\n", 5, "overflow"),
    ]
    for (body, line, word) in cases {
      assertThrows(
        try DdrescueMapfile.parse(head + body, name: "bad.map"), containing: ["bad.map", "line \(line)", word],
        "body \(body.debugDescription)")
    }
    // A bad status line is line 1 here.
    assertThrows(try DdrescueMapfile.parse("hello +\n", name: "s.map"), containing: ["s.map", "line 1", "status line"])
    assertThrows(try DdrescueMapfile.parse("\n\n0x0\n", name: "s.map"), containing: ["line 3"])
  }

  /// A mapfile with CRLF line ends (edited on Windows) must not silently
  /// lose its data lines.
  func testCRLFLineEnds() throws {
    let lf = "# Mapfile\n0x0 + 1\n#  pos size status\n0x0 0x1000 +\n0x1000 0x1000 -\n0x2000 0x1000 +\n"
    let crlf = lf.replacingOccurrences(of: "\n", with: "\r\n")
    let expected = try DdrescueMapfile.parse(lf, name: "lf.map")
    XCTAssertEqual(expected.count, 3)
    do {
      let parsed = try DdrescueMapfile.parse(crlf, name: "crlf.map")
      XCTAssertEqual(parsed, expected)
    } catch {
      XCTFail("CRLF mapfile refused: \(error)")
    }
    // Without a leading comment the damage is silent: no error, no extents.
    let crlfNoComment = "0x0 + 1\r\n0x0 0x1000 +\r\n0x1000 0x1000 -\r\n"
    XCTAssertEqual(
      try? DdrescueMapfile.parse(crlfNoComment, name: "crlf.map"),
      [Extent(position: 0, size: 0x1000, status: "+"), Extent(position: 0x1000, size: 0x1000, status: "-")])
  }

  // MARK: Bitmaps

  func testWholeBlockAndAnyByteOnUnalignedExtents() throws {
    let geometry = try BlockGeometry(blockSize: 4096, deviceSize: 10 * 4096 + 1000)  // 11 blocks
    let extents: [Extent] = [
      Extent(position: 100, size: 4096, status: "+"),  // blocks 0 and 1, neither whole
      Extent(position: 2 * 4096, size: 2 * 4096, status: "+"),  // blocks 2, 3 whole
      Extent(position: 4 * 4096, size: 2048, status: "+"),  // half of 4 ...
      Extent(position: 4 * 4096 + 2048, size: 2048, status: "-"),  // ... and the other half in another status
      Extent(position: 5 * 4096, size: 2048, status: "+"),  // 5 split between two selected lines
      Extent(position: 5 * 4096 + 2048, size: 4096, status: "?"),  //   ... and into 6
      Extent(position: 8 * 4096 - 1, size: 1, status: "+"),  // last byte of 7
      Extent(position: 10 * 4096, size: 1000, status: "+"),  // the partial last block, exactly
    ]
    let whole = DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["+", "?"], anyByte: false)
    let any = DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["+", "?"], anyByte: true)
    XCTAssertEqual(Array(whole.extents), [2..<4, 5..<6, 10..<11])
    XCTAssertEqual(Array(any.extents), [0..<8, 10..<11])
    let plusOnlyWhole = DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["+"], anyByte: false)
    XCTAssertEqual(Array(plusOnlyWhole.extents), [2..<4, 10..<11])
    let minusAny = DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["-"], anyByte: true)
    XCTAssertEqual(Array(minusAny.extents), [4..<5])
    // Extents past the device end are clipped; a block up to the end is whole.
    let past = [Extent(position: 10 * 4096 + 500, size: 1 << 20, status: "+")]
    XCTAssertEqual(Array(DdrescueMapfile.bitmap(past, geometry: geometry, statuses: ["+"], anyByte: false).extents), [])
    XCTAssertEqual(
      Array(DdrescueMapfile.bitmap(past, geometry: geometry, statuses: ["+"], anyByte: true).extents), [10..<11])
    let beyond = [Extent(position: 1 << 30, size: 4096, status: "+")]
    XCTAssertEqual(DdrescueMapfile.bitmap(beyond, geometry: geometry, statuses: ["+"], anyByte: true).population, 0)
  }

  /// Random unaligned extents, checked against byte coverage counted here.
  func testRandomExtentsAgainstByteCoverage() throws {
    let seed = testSeed(61)
    var g = SplitMix64(seed: seed)
    let statuses: [Character] = ["?", "*", "/", "-", "+"]
    for iteration in 0..<150 {
      let blockSize = UInt32(512) << UInt32(g.next() % 4)
      let bs = UInt64(blockSize)
      let device = g.next() % (30 * bs) + 1
      let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: device)
      // Sorted extents with gaps (sometimes none), sometimes running past the end.
      var extents: [Extent] = []
      var position = g.next() % 3 == 0 ? 0 : g.next() % bs
      while position < device + bs {
        let size = g.next() % 3 == 0 ? g.next() % (4 * bs) + 1 : g.next() % (bs / 2) + 1
        extents.append(Extent(position: position, size: size, status: statuses[Int(g.next() % 5)]))
        position += size + (g.next() % 2 == 0 ? 0 : g.next() % bs)
      }
      let selected: Set<Character> = Set(statuses.filter { _ in g.next() % 2 == 0 })
      // Render as text, mixing hex and decimal, and parse it back.
      var text = "# random mapfile\n0x0 + 1\n"
      for e in extents {
        let pos = g.next() % 2 == 0 ? "0x" + String(e.position, radix: 16) : String(e.position)
        let size = g.next() % 2 == 0 ? "0x" + String(e.size, radix: 16, uppercase: true) : String(e.size)
        text += "\(pos)  \(size)  \(e.status)\n"
      }
      let ctx = "seed \(seed), iteration \(iteration), bs \(blockSize), device \(device), statuses \(selected.sorted())"
      let parsed = try DdrescueMapfile.parse(text, name: "r.map")
      XCTAssertEqual(parsed, extents, ctx)

      let whole = DdrescueMapfile.bitmap(parsed, geometry: geometry, statuses: selected, anyByte: false)
      let any = DdrescueMapfile.bitmap(parsed, geometry: geometry, statuses: selected, anyByte: true)
      XCTAssertEqual(whole.count, geometry.blockCount, ctx)
      for block in 0..<geometry.blockCount {
        let start = block * bs
        let end = min(start + bs, device)
        var covered: UInt64 = 0
        for e in extents where selected.contains(e.status) {
          let lo = max(start, e.position)
          let hi = min(end, e.position + e.size)
          if hi > lo { covered += hi - lo }
        }
        XCTAssertEqual(whole[block], covered == end - start, "\(ctx), block \(block): whole-block rule")
        XCTAssertEqual(any[block], covered > 0, "\(ctx), block \(block): any-byte rule")
      }
      XCTAssertEqual(whole.subtracting(any).population, 0, "\(ctx): whole ⊆ any")
    }
  }

  // MARK: Rendering

  func testRenderParsesBackToTheSameBitmap() throws {
    let seed = testSeed(62)
    var g = SplitMix64(seed: seed)
    for iteration in 0..<80 {
      let blockSize = UInt32(512) << UInt32(g.next() % 8)
      let bs = UInt64(blockSize)
      let blocks = g.next() % 300
      let device = iteration == 0 ? 0 : blocks * bs + (g.next() % 2 == 0 ? 0 : g.next() % bs)
      let geometry = try BlockGeometry(blockSize: blockSize, deviceSize: device)
      var bits = BlockBitmap(count: geometry.blockCount)
      let density = g.next() % 101
      var i: UInt64 = 0
      while i < geometry.blockCount {
        let run = min(g.next() % 20 + 1, geometry.blockCount - i)
        if g.next() % 100 < density { bits.set(i..<(i + run)) }
        i += run
      }
      if iteration == 1 { bits = BlockBitmap(count: geometry.blockCount, filled: true) }
      let map = BlockMap(
        geometry: geometry, meaning: .current, deviceName: iteration % 2 == 0 ? "" : "/dev/sdc", bits: bits)
      let text = DdrescueMapfile.render(map, setStatus: "+", clearStatus: "?", tool: "overwrite-map")
      let ctx = "seed \(seed), iteration \(iteration), \(geometry)"
      let extents = try DdrescueMapfile.parse(text, name: "rendered")

      // The extents tile the device: sorted, contiguous, from 0 to the end,
      // alternating status (so ddrescue accepts it).
      var position: UInt64 = 0
      for (a, b) in zip(extents, extents.dropFirst()) { XCTAssertNotEqual(a.status, b.status, ctx) }
      for e in extents {
        XCTAssertEqual(e.position, position, ctx)
        position += e.size
      }
      XCTAssertEqual(position, device, ctx)

      for anyByte in [false, true] {
        XCTAssertEqual(
          DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["+"], anyByte: anyByte), bits,
          "\(ctx), anyByte \(anyByte)")
        XCTAssertEqual(
          DdrescueMapfile.bitmap(extents, geometry: geometry, statuses: ["?"], anyByte: anyByte), bits.inverted(),
          "\(ctx), clear status, anyByte \(anyByte)")
      }
      // The comments carry the identity.
      XCTAssertTrue(text.contains(map.mapID.description), ctx)
      XCTAssertTrue(text.contains(map.deviceName.isEmpty ? "(unnamed)" : map.deviceName), ctx)
      XCTAssertTrue(text.contains("overwrite-map"), ctx)
    }
  }
}
