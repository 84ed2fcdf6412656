// Progress on stderr: one line rewritten in place, at most twice a second,
// and a final line when done. Quiet unless enabled.

import Glibc

// @unchecked Sendable: one thread at a time updates it (a stage, joined before finish()).
public final class ProgressMeter: @unchecked Sendable {
  private let label: String
  private let total: UInt64
  private let enabled: Bool
  private let started = Instant.now()
  private var lastPrint = Instant.unset
  private var shown = false

  public init(label: String, total: UInt64, enabled: Bool) {
    self.label = label
    self.total = total
    self.enabled = enabled
  }

  /// Whether progress should show by default: stderr is a terminal.
  public static var stderrIsTerminal: Bool { Sys.isTerminal(2) }

  public func update(_ done: UInt64) {
    guard enabled else { return }
    let now = Instant.now()
    if now.nanosecondsSinceEpoch - lastPrint.nanosecondsSinceEpoch < 500_000_000 { return }
    lastPrint = now
    printLine(done, final: false)
  }

  public func finish(_ done: UInt64) {
    guard enabled else { return }
    printLine(done, final: true)
  }

  private func printLine(_ done: UInt64, final: Bool) {
    let seconds = started.secondsAgo
    let rate = seconds > 0 ? Double(done) / seconds : 0
    let percent = total == 0 ? 100 : Double(done) * 100 / Double(total)
    let line =
      "\r\(label): \(formatBytes(done)) of \(formatBytes(total)) (\(formatFixed(percent, digits: 1))%), "
      + "\(formatBytes(UInt64(rate)))/s" + (final ? "\n" : "\u{1B}[K")
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { writeFull(2, $0.baseAddress!, $0.count) }
    shown = true
  }
}
