// Coalescing a batch of journaled changes (Coalescing.pieces) against a
// naive model: a small device whose every byte records where it came from
// (the journal offset of the payload byte written there, 0 for zeros and
// trims, its own untouched value otherwise). The changes are applied in
// order to the model; the pieces, shuffled, to a copy of the device. Seeded
// batches are dense with overlaps, adjacent, nested and repeated ranges,
// and a tiny largest piece.

import TestSupport
import XCTest

@testable import DualRestore

final class CoalescingTests: XCTestCase {
  /// Each cell of a modelled device: what last wrote the byte. A payload
  /// byte is its journal offset plus 1; a zeroed byte is 0; an untouched
  /// byte is `untouched(i)`.
  static func untouched(_ i: Int) -> UInt64 { UInt64.max - UInt64(i) }

  /// The device after `changes` in order, byte by byte.
  static func model(_ changes: [JournaledChange], size: Int) -> [UInt64] {
    var cells = (0..<size).map(untouched)
    for c in changes {
      for k in 0..<Int(c.length) {
        cells[Int(c.offset) + k] = c.type == .write ? c.payloadAt + UInt64(k) + 1 : 0
      }
    }
    return cells
  }

  /// The device after `pieces` in the order given.
  static func apply(_ pieces: [ShipPiece], size: Int) -> [UInt64] {
    var cells = (0..<size).map(untouched)
    for p in pieces {
      for k in 0..<Int(p.length) { cells[Int(p.offset) + k] = p.zero ? 0 : p.payloadAt + UInt64(k) + 1 }
    }
    return cells
  }

  /// A batch as the journal would hold it: each write's payload sits after
  /// its record's header, so no two writes share a payload byte.
  struct Batch {
    var changes: [JournaledChange] = []
    var journalEnd: UInt64 = 4096

    mutating func add(_ type: MirrorJournalRecordType, _ offset: UInt64, _ length: UInt64) {
      let payloadAt = type == .write ? journalEnd + UInt64(MirrorJournalFormat.recordHeaderLength) : 0
      changes.append(JournaledChange(type: type, offset: offset, length: length, payloadAt: payloadAt))
      journalEnd += UInt64(MirrorJournalFormat.recordSize(payload: type == .write ? Int(length) : 0))
    }
  }

  /// Every property the pieces must have; returns whether all held.
  @discardableResult
  func check(
    _ changes: [JournaledChange], size: Int, maximumPiece: UInt64, shuffleWith rng: inout SplitMix64,
    _ context: @autoclosure () -> String, file: StaticString = #filePath, line: UInt = #line
  ) -> [ShipPiece] {
    let pieces = Coalescing.pieces(of: changes, maximumPiece: maximumPiece)
    var covered = [Bool](repeating: false, count: size)
    for c in changes { for k in 0..<Int(c.length) { covered[Int(c.offset) + k] = true } }
    let union = covered.filter { $0 }.count
    var previousEnd: UInt64 = 0
    var total: UInt64 = 0
    for (n, p) in pieces.enumerated() {
      guard p.length > 0, p.length <= maximumPiece, p.offset >= previousEnd, p.offset + p.length <= UInt64(size)
      else {
        XCTFail("piece \(n) \(p) is empty, too long, out of order or overlapping. \(context())", file: file, line: line)
        return pieces
      }
      XCTAssertTrue(
        p.zero ? p.payloadAt == 0 : p.payloadAt > 0, "piece \(n) \(p). \(context())", file: file, line: line)
      // Adjacent pieces that could have been one are one, unless the first
      // is already as long as a piece may be.
      if n > 0 {
        let q = pieces[n - 1]
        if q.offset + q.length == p.offset && q.zero == p.zero && (p.zero || q.payloadAt + q.length == p.payloadAt) {
          XCTAssertEqual(
            q.length, maximumPiece, "pieces \(n - 1) and \(n) were not joined. \(context())", file: file, line: line)
        }
      }
      previousEnd = p.offset + p.length
      total += p.length
    }
    XCTAssertEqual(total, UInt64(union), "every changed byte is sent once. \(context())", file: file, line: line)
    let expected = Self.model(changes, size: size)
    var shuffled = pieces
    shuffled.shuffle(using: &rng)
    let got = Self.apply(shuffled, size: size)
    if got != expected {
      let first = (0..<size).first { got[$0] != expected[$0] } ?? -1
      XCTFail(
        "the pieces give \(got[first]) at byte \(first), the changes \(expected[first]). \(context())", file: file,
        line: line)
    }
    return pieces
  }

  func testSeededBatchesGiveTheModelsDevice() {
    let seed = testSeed(0x636f_616c)
    var rng = SplitMix64(seed: seed)
    let size = 3000
    var cases = 0
    var pieceCount = 0
    for round in 0..<4000 {
      var batch = Batch()
      let count = 1 + Int(rng.next() % 24)
      for _ in 0..<count {
        let type: MirrorJournalRecordType = [.write, .write, .write, .zero, .trim][Int(rng.next() % 5)]
        var offset: UInt64
        var length: UInt64
        let previous = batch.changes.last
        switch rng.next() % 6 {
        case 0 where previous != nil:  // right after the previous change
          offset = min(previous!.offset + previous!.length, UInt64(size - 1))
          length = 1 + rng.next() % 300
        case 1 where previous != nil:  // inside the previous change
          offset = previous!.offset + rng.next() % previous!.length
          length = 1 + rng.next() % (previous!.offset + previous!.length - offset)
        case 2 where previous != nil:  // the very same range
          offset = previous!.offset
          length = previous!.length
        case 3 where previous != nil:  // around the previous change
          offset = previous!.offset - min(previous!.offset, rng.next() % 64)
          length = previous!.offset + previous!.length - offset + rng.next() % 64
        case 4:  // a block, the same few over and over
          offset = 512 * (rng.next() % 4)
          length = 512
        default:
          offset = rng.next() % UInt64(size)
          length = 1 + rng.next() % (rng.next() % 2 == 0 ? 16 : 900)
        }
        length = min(length, UInt64(size) - offset)
        batch.add(type, offset, length)
      }
      let maximumPiece: UInt64 = [1, 2, 3, 7, 64, 512, 4096, 4 << 20][Int(rng.next() % 8)]
      let pieces = check(
        batch.changes, size: size, maximumPiece: maximumPiece, shuffleWith: &rng,
        "seed \(seed), round \(round), largest piece \(maximumPiece), changes \(batch.changes)")
      cases += 1
      pieceCount += pieces.count
      if testRun?.failureCount ?? 0 > 0 { break }
    }
    XCTAssertEqual(cases, 4000)
    XCTAssertGreaterThan(pieceCount, cases)
  }

  func testBlockOverwrittenManyTimesIsSentOnce() {
    var rng = SplitMix64(seed: testSeed(0x6f6e_6365))
    for times in [2, 10, 100] {
      var batch = Batch()
      batch.add(.write, 0, 4096)
      for n in 0..<times {
        // The block at 4096, whole or in parts, interleaved with others.
        batch.add(.write, 4096, 4096)
        batch.add(n % 2 == 0 ? .zero : .trim, 4096 + 512 * UInt64(n % 8), 512)
        batch.add(.write, 4096 + 100, 1000)
        batch.add(.write, 8192 + 4096 * UInt64(n % 3), 4096)
      }
      let last = batch.changes.count
      batch.add(.write, 4096, 4096)
      let pieces = check(batch.changes, size: 5 * 4096, maximumPiece: 4 << 20, shuffleWith: &rng, "\(times) times")
      let block = pieces.filter { $0.offset < 8192 && $0.offset + $0.length > 4096 }
      XCTAssertEqual(block.count, 1, "overwritten \(times) times: \(block)")
      XCTAssertEqual(block.first?.offset, 4096)
      XCTAssertEqual(block.first?.length, 4096)
      XCTAssertEqual(block.first?.payloadAt, batch.changes[last].payloadAt)
    }
  }

  func testSmallCases() {
    XCTAssertEqual(Coalescing.pieces(of: []), [])
    var batch = Batch()
    batch.add(.write, 10, 5)
    let at = batch.changes[0].payloadAt
    XCTAssertEqual(
      Coalescing.pieces(of: batch.changes, maximumPiece: 2),
      [
        ShipPiece(zero: false, offset: 10, length: 2, payloadAt: at),
        ShipPiece(zero: false, offset: 12, length: 2, payloadAt: at + 2),
        ShipPiece(zero: false, offset: 14, length: 1, payloadAt: at + 4),
      ])
    // A zero then a trim right after it go as one piece of zeros; a write
    // ending where another starts leaves both whole.
    batch = Batch()
    batch.add(.zero, 0, 100)
    batch.add(.trim, 100, 50)
    batch.add(.write, 200, 10)
    batch.add(.write, 210, 10)
    let p = Coalescing.pieces(of: batch.changes)
    XCTAssertEqual(
      p,
      [
        ShipPiece(zero: true, offset: 0, length: 150, payloadAt: 0),
        ShipPiece(zero: false, offset: 200, length: 10, payloadAt: batch.changes[2].payloadAt),
        ShipPiece(zero: false, offset: 210, length: 10, payloadAt: batch.changes[3].payloadAt),
      ])
    // A later write inside an earlier one splits it in three.
    batch = Batch()
    batch.add(.write, 0, 100)
    batch.add(.write, 40, 20)
    let outer = batch.changes[0].payloadAt
    XCTAssertEqual(
      Coalescing.pieces(of: batch.changes),
      [
        ShipPiece(zero: false, offset: 0, length: 40, payloadAt: outer),
        ShipPiece(zero: false, offset: 40, length: 20, payloadAt: batch.changes[1].payloadAt),
        ShipPiece(zero: false, offset: 60, length: 40, payloadAt: outer + 60),
      ])
    // An earlier write inside a later zero is gone.
    batch = Batch()
    batch.add(.write, 40, 20)
    batch.add(.zero, 0, 100)
    XCTAssertEqual(Coalescing.pieces(of: batch.changes), [ShipPiece(zero: true, offset: 0, length: 100, payloadAt: 0)])
  }
}
