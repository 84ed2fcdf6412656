// What the asynchronous-mirroring tests (RestoreMirrorCLITests) add to
// RRTRig: a backup server frozen (SIGSTOP, every thread seen stopped, so
// its image file holds still) and thawed; the far copy's lag read from the
// progress lines (`; far copy URI holds interval N, lacks M (BYTES), oldest
// S s`), waited for after a point of the log; the mirror journal's records
// walked (dualrestore-journal(5)) to damage one on purpose; and the end
// state every test wants: the journal drained, the export equal to the far
// copy, a clean stop, the primary equal to the far copy byte for byte.

import Foundation
import Glibc
import TestSupport
import XCTest

extension RRTChild {
  /// SIGSTOP, then waits until every thread of the process is stopped, so
  /// that no write of it lands while the caller reads its files.
  func freeze(file: StaticString = #filePath, line: UInt = #line) {
    signal(SIGSTOP)
    let end = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < end {
      if Self.allStopped(pid) { return }
      usleep(2000)
    }
    let state =
      isRunning
      ? "running"
      : "ended with status \(process.terminationStatus) (\(process.terminationReason == .uncaughtSignal ? "signal" : "exit"))"
    XCTFail(
      "\(name) (pid \(pid), \(state)) did not stop within 10 s of SIGSTOP; its output: \(errors.suffix(2000))",
      file: file,
      line: line)
  }

  func thaw() { signal(SIGCONT) }

  /// Whether every thread of `pid` is in state T (stopped).
  static func allStopped(_ pid: Int32) -> Bool {
    guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), !tasks.isEmpty
    else { return false }
    for t in tasks {
      guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
      else { return false }
      let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first
      if state != "T" && state != "t" { return false }
    }
    return true
  }
}

/// One progress line's account of the far copy.
struct FarCopyLag: Equatable {
  var holds: Int
  var lacks: Int
  var line: String

  /// The far copy's part of a progress line, if it has one.
  init?(_ line: Substring) {
    guard line.contains("progress:"), let r = line.range(of: "; far copy ") else { return nil }
    let words = line[r.upperBound...].split(separator: " ")
    guard let h = words.firstIndex(of: "holds"), h + 2 < words.count, let holds = Int(words[h + 2].dropLast()),
      let l = words.firstIndex(of: "lacks"), l + 1 < words.count, let lacks = Int(words[l + 1])
    else { return nil }
    self.holds = holds
    self.lacks = lacks
    self.line = String(line)
  }
}

/// A record of a mirror journal as found in its bytes.
struct JournalRecord {
  var offset: Int
  var type: UInt8
  var payload: Int
  var interval: UInt64
  var size: Int
  static let write: UInt8 = 1
  static let intervalEnd: UInt8 = 4

  /// The records of a journal from offset 4096 on, up to the first bytes
  /// that are not a whole record.
  static func all(_ d: Data) -> [JournalRecord] {
    func le(_ at: Int, _ width: Int) -> UInt64 {
      var v: UInt64 = 0
      for i in 0..<width { v |= UInt64(d[d.startIndex + at + i]) << (8 * UInt64(i)) }
      return v
    }
    var out: [JournalRecord] = []
    var p = 4096
    while p + 48 <= d.count, le(p, 4) == 0x524A_5244 {
      let payload = Int(le(p + 8, 4))
      let size = (44 + payload + 4 + 7) & ~7
      guard p + size <= d.count else { break }
      out.append(
        JournalRecord(offset: p, type: d[d.startIndex + p + 4], payload: payload, interval: le(p + 12, 8), size: size))
      p += size
    }
    return out
  }
}

extension RRTRig {
  var journalPath: String { mapPath + ".mirror" }
  var positionsPath: String { journalPath + ".positions" }
  /// Bytes of the latest start's log so far: "after this point".
  var logMark: Int { log.utf8.count }

  /// The log of the latest start from byte `mark` on.
  func log(after mark: Int) -> Substring {
    let text = log
    let utf8 = text.utf8
    guard mark < utf8.count else { return "" }
    return Substring(text[utf8.index(utf8.startIndex, offsetBy: mark)...])
  }

  /// Waits until a progress line after `mark` satisfies `test`; returns it.
  func waitForLag(after mark: Int, seconds: Double = 30, _ test: (FarCopyLag) -> Bool) -> FarCopyLag? {
    let end = RRTEnv.monotonic() + seconds
    while true {
      if let l = log(after: mark).split(separator: "\n").compactMap({ FarCopyLag($0) }).first(where: test) {
        return l
      }
      if RRTEnv.monotonic() >= end { return nil }
      RRTEnv.sleep(0.05)
    }
  }

  /// Waits until a progress line after `mark` says the far copy lacks
  /// nothing (`lacks 0 (`): every interval journaled before it is on the
  /// copy and flushed there. The first progress line after `mark` does not
  /// count: it may have been worked out just before.
  func waitForDrain(after mark: Int, seconds: Double = 60) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while true {
      let lags = log(after: mark).split(separator: "\n").compactMap { FarCopyLag($0) }
      if lags.dropFirst().contains(where: { $0.lacks == 0 }) { return true }
      if RRTEnv.monotonic() >= end { return false }
      RRTEnv.sleep(0.1)
    }
  }

  /// Waits until the log after `mark` says `text`.
  func waitForLog(_ text: String, after mark: Int, seconds: Double = 60) -> Bool {
    let end = RRTEnv.monotonic() + seconds
    while true {
      if log(after: mark).contains(text) { return true }
      if RRTEnv.monotonic() >= end { return false }
      RRTEnv.sleep(0.1)
    }
  }

  /// nbdkit 1.32 aborts now and then when a client vanishes with requests
  /// in flight (`raw_send_socket: Assertion \`sock >= 0' failed`), which
  /// killing restore-read-through does. After such a kill, this waits for
  /// nbdkit to have seen the connections close and, if it aborted that
  /// way, starts it again on the same socket and image (its image holds
  /// what it had written, as after a kill -9 of it). Any other end of it
  /// fails the test. Returns whether it was started again.
  @discardableResult
  func reviveBackupIfItAborted(file: StaticString = #filePath, line: UInt = #line) throws -> Bool {
    RRTEnv.sleep(0.4)
    guard let b = backupServer, !b.isRunning else { return false }
    let text = b.errors
    guard text.contains("raw_send_socket: Assertion") else {
      XCTFail("the backup server ended on its own: \(text.suffix(2000))", file: file, line: line)
      throw RRTError("the backup server ended")
    }
    print("nbdkit aborted on a vanished client (raw_send_socket assertion); started again")
    let log = s.path("backup.log")
    rename(log, log + ".aborted-\(UUID().uuidString)")
    try startBackup()
    return true
  }

  /// The end state: the journal drains, the whole export (which makes every
  /// block current) reads as the far copy, the server stops cleanly without
  /// owing the copy anything, and the primary equals the far copy byte for
  /// byte.
  func assertDrainedAndEqual(_ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let mark = logMark
    XCTAssertTrue(
      waitForDrain(after: mark), "\(what): the far copy never caught up; log:\n\(log)", file: file, line: line)
    let export = try copyExport(to: "export-end.img", file: file, line: line)
    RRTBytes.assertEqual(export, try backupData(), "\(what): the export vs the far copy", file: file, line: line)
    stopServer(file: file, line: line)
    XCTAssertFalse(
      log.contains("they stay in the mirror journal"), "\(what): a clean stop after the drain owes:\n\(log)",
      file: file, line: line)
    RRTBytes.assertEqual(
      try primaryData(), try backupData(), "\(what): the primary vs the far copy", file: file, line: line)
  }
}
