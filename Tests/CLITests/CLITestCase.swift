// The base of the CLI test classes that run servers: every rig a test makes
// is stopped when it ends, however it ends, and a test whose peer is not
// installed is skipped with the reason. ServerRig is what those rigs
// (RRTRig, TrackRig) share: stopping their children, their logs checked for
// a crash, and the blocks a byte range touches.

import Foundation
import TestSupport
import XCTest

class CLITestCase: XCTestCase {
  /// The rigs to stop at the end of the test.
  var rigs: [any ServerRig] = []

  override func tearDown() {
    for r in rigs { r.stopAll() }
    rigs = []
    super.tearDown()
  }

  /// Skips the test when a program it needs is missing.
  func require(_ programs: String...) throws {
    for p in programs where !RRTEnv.have(p) {
      throw XCTSkip("\(p) is not installed (needed by this test)")
    }
  }
}

/// A server under test with its files: an image of `size` bytes in blocks
/// of `blockSize`, children to stop, and the logs of all its starts.
protocol ServerRig: AnyObject {
  var size: Int { get }
  var blockSize: Int { get }
  /// The logs of every start, in order.
  var allLogs: String { get }
  /// Stops every child: clients first, then the servers.
  func stopAll()
}

extension ServerRig {
  func assertNoCrash(file: StaticString = #filePath, line: UInt = #line) {
    let text = allLogs
    for bad in ["Fatal error", "fatal error", "Illegal instruction", "Segmentation fault", "crashed"] {
      XCTAssertFalse(text.contains(bad), "the server log mentions '\(bad)':\n\(text)", file: file, line: line)
    }
  }

  /// The blocks a byte range touches.
  func blocks(_ offset: Int, _ length: Int) -> [Int] {
    guard length > 0 else { return [] }
    return Array((offset / blockSize)...((offset + length - 1) / blockSize))
  }

  func blockRange(_ b: Int) -> Range<Int> { (b * blockSize)..<min((b + 1) * blockSize, size) }
}

extension RRTRig: ServerRig {}
extension TrackRig: ServerRig {}
