// restore-read-through's background work, measured at the real backup:
// hydration's pacing (bytes read per window, from nbdkit's log filter), a
// stop while hydration has reads in flight (nbdkit's log and its -v debug
// lines say how each connection ended), the completion line against the map
// on disk, and the progress line against what crossed the link.
//
// The rigs are RRTRig (RestoreReadThroughHarness.swift); every child is
// stopped in tearDown.

import Foundation
import Glibc
import XCTest

final class RestoreBackgroundCLITests: XCTestCase {
  private var rigs: [RRTRig] = []

  override func tearDown() {
    for r in rigs { r.stopAll() }
    rigs = []
    super.tearDown()
  }

  func require(_ programs: String...) throws {
    for p in programs where !RRTEnv.have(p) {
      throw XCTSkip("\(p) is not installed (needed by this test)")
    }
  }

  func rig(size: Int, seed: UInt64) throws -> RRTRig {
    let r = try RRTRig(size: size, seed: seed)
    rigs.append(r)
    return r
  }

  // MARK: Hydration's pace

  /// --hydrate-rate holds over every window of a few seconds, during and
  /// after a busy client: the time hydration yielded to it is not credit
  /// to be spent at the link's speed later. Counted at the backup (nbdkit's
  /// log filter) with the burst the manual allows: one second at the rate,
  /// or one run of 1 MiB, whichever is more.
  func testHydrateRateHoldsInEveryWindowAroundABusyClient() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let rate = 4 << 20
    let burst = max(rate, 1 << 20)
    let r = try rig(size: 96 << 20, seed: 171)
    // The client's writes take 10 ms at the backup, so its requests are in
    // flight all the time and hydration yields; the log is outside the
    // delay, so it sees requests as they arrive. The writes are of whole
    // blocks, so every READ at the backup is hydration's.
    try r.startBackup(.nbdkit(filters: ["log", "delay"], parameters: ["delay-write=10ms"]))
    try r.startServer(["--hydrate", "--hydrate-rate", "4M", "--progress-interval", "0"])
    let busySeconds = 10.0
    let client = try r.nbdshChild(
      """
      h.connect_uri(URI)
      end = time.monotonic() + \(busySeconds)
      data = nbd.Buffer.from_bytearray(bytearray(b'w' * B))
      n = 0
      cookies = []
      while time.monotonic() < end:
          while h.aio_in_flight() < 16:
              cookies.append(h.aio_pwrite(data, (n % 16) * B))
              n += 1
          h.poll(-1)
          cookies = [c for c in cookies if not h.aio_command_completed(c)]
      while h.aio_in_flight() > 0:
          h.poll(-1)
      print('WROTE', n, flush=True)
      """, name: "busy-client")
    XCTAssertEqual(client.wait(timeout: busySeconds + 30), 0, "the busy client: \(client.output) \(client.errors)")
    let busyEnd = Date().timeIntervalSince1970
    let measured = 8.0
    RRTEnv.sleep(measured)
    let reads = BackupRequestLog(try String(contentsOfFile: try XCTUnwrap(r.backupRequestLog), encoding: .utf8))
      .requests.filter { $0.kind == "Read" }
    r.stopServer()
    XCTAssertFalse(r.log.contains("hydration done"), "hydration ended within the test:\n\(r.log)")
    // The most bytes in any 5 s window, from the start to the end of the
    // measured period.
    let window = 5.0
    var most = 0
    var mostAt = 0.0
    var after = 0
    for (i, start) in reads.enumerated() {
      let bytes = reads[i...].prefix(while: { $0.time < start.time + window }).reduce(0) { $0 + $1.count }
      if bytes > most {
        most = bytes
        mostAt = start.time - busyEnd
      }
      if start.time >= busyEnd { after = max(after, bytes) }
    }
    var perSecond: [Int: Int] = [:]
    for q in reads { perSecond[Int((q.time - busyEnd).rounded(.down)), default: 0] += q.count }
    let profile = perSecond.sorted { $0.key < $1.key }.map { "\($0.key) s: \($0.value >> 10) KiB" }
    let cap = Double(rate) * window * 1.1 + Double(burst)
    let summary =
      "most read from the backup in any \(window) s: \(most) bytes, "
      + "\(String(format: "%.2f", Double(most) / window / Double(1 << 20))) MiB/s, from \(String(format: "%.1f", mostAt)) s "
      + "after the busy client (\(client.output.trimmingCharacters(in: .whitespacesAndNewlines))); after it, \(after) "
      + "bytes; the cap \(rate) B/s allows \(Int(cap)); bytes per second from the client's end: "
      + profile.joined(separator: ", ")
    print(summary)
    XCTAssertLessThanOrEqual(Double(most), cap, summary + "\nlog:\n\(r.log)")
    // Hydration did go on after the client (the test measured something).
    XCTAssertGreaterThanOrEqual(Double(after), Double(rate) * window * 0.5, summary)
  }

  // MARK: A stop during hydration

  /// SIGTERM while hydration has reads in flight at a slow backup: the
  /// reads are waited for, the backup flushed, and every connection to it
  /// ended with NBD_CMD_DISC; nbdkit logs no error and no request after
  /// the final FLUSH.
  func testStopDuringHydrationLeavesTheBackupCleanly() throws {
    try require("nbdkit", "nbdinfo")
    let r = try rig(size: 64 << 20, seed: 172)
    try startVerboseBackup(r, filters: ["log", "delay"], parameters: ["delay-read=1"])
    try r.startServer(["--hydrate", "--progress-interval", "0"])
    let log = try XCTUnwrap(r.backupRequestLog)
    // Reads in flight at the backup when the signal comes.
    let deadline = RRTEnv.monotonic() + 20
    var inFlight = 0
    while RRTEnv.monotonic() < deadline {
      let requests = BackupRequestLog((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").requests
      inFlight = requests.filter { $0.kind == "Read" }.count - requests.filter { $0.kind == "...Read" }.count
      if inFlight >= 8 { break }
      RRTEnv.sleep(0.05)
    }
    XCTAssertGreaterThanOrEqual(inFlight, 8, "hydration did not get reads in flight:\n\(r.log)")
    r.stopServer()
    XCTAssertFalse(r.log.contains("hydration done"), "hydration ended before the stop:\n\(r.log)")
    let backup = try XCTUnwrap(r.backupServer)
    backup.stop(grace: 10)
    r.backupServer = nil

    let errors = backup.errors.split(separator: "\n").filter {
      $0.contains("error") || $0.contains("Broken pipe") || $0.contains("reset by peer") || $0.contains("Assertion")
    }
    XCTAssertEqual(errors, [], "nbdkit's errors after the stop:\n\(errors.joined(separator: "\n"))")

    let requests = BackupRequestLog(try String(contentsOfFile: log, encoding: .utf8)).requests
    let connections = Set(requests.filter { $0.kind == "Connect" }.map(\.connection))
    XCTAssertGreaterThanOrEqual(connections.count, 4, "connections to the backup: \(connections)")
    let disconnected = Set(requests.filter { $0.kind == "Disconnect" }.map(\.connection))
    XCTAssertEqual(disconnected, connections, "connections the log filter saw end")
    let said = backup.errors.components(separatedBy: "client sent NBD_CMD_DISC").count - 1
    let dropped = backup.errors.components(separatedBy: "client closed input socket").count - 1
    XCTAssertEqual(said, connections.count, "connections ended with NBD_CMD_DISC (\(dropped) closed without)")
    XCTAssertEqual(dropped, 0, "connections closed without NBD_CMD_DISC")

    // The final FLUSH round (one per data connection) comes after every
    // other request has been answered, and nothing follows it but its
    // replies and the disconnects.
    let lastFlush = Dictionary(
      requests.enumerated().filter { $0.element.kind == "Flush" }.map { ($0.element.connection, $0.offset) },
      uniquingKeysWith: { max($0, $1) })
    let finalRound = try XCTUnwrap(lastFlush.values.min(), "no FLUSH reached the backup")
    let after = requests[finalRound...].filter { !["Flush", "...Flush", "Disconnect"].contains($0.kind) }
    XCTAssertEqual(
      after.map(\.line), [], "requests at the backup after the final FLUSH began (\(inFlight) reads were in flight)")
  }

  // MARK: Completion

  /// The line saying every block is current comes after the map on disk
  /// says so: by hydration, and by a client's reads.
  func testTheMapCountsEveryBlockCurrentWhenTheRestoreIsSaidComplete() throws {
    try require("nbdkit", "nbdinfo", "nbdcopy")
    for hydrate in [true, false] {
      let r = try rig(size: 16 << 20, seed: hydrate ? 173 : 174)
      try r.startBackup()
      try r.startServer(hydrate ? ["--hydrate", "--progress-interval", "0"] : ["--progress-interval", "0"])
      if !hydrate {
        let copy = try RRTCommand.run("/usr/bin/nbdcopy", [r.uri, "null:"], timeout: 60)
        XCTAssertEqual(copy.status, 0, copy.summary)
      }
      let deadline = RRTEnv.monotonic() + 60
      while !r.log.contains("the restore is complete") && RRTEnv.monotonic() < deadline { usleep(2000) }
      XCTAssertTrue(r.log.contains("the restore is complete"), "no completion line:\n\(r.log)")
      let stats = try r.mapStats()
      XCTAssertEqual(
        stats["set_blocks"] as? Int, r.blockCount,
        "\(hydrate ? "hydration" : "reads"): the map right after the completion line: \(stats)\nlog:\n\(r.log)")
      r.stopServer()
    }
  }

  // MARK: Progress

  /// A progress line says what its rate covers, and the amounts add up to
  /// what the backup served: a burst of fetches shows in the interval it
  /// happened in, and the intervals after it say nothing was fetched then.
  func testProgressLinesSayTheIntervalAndMatchTheBackup() throws {
    try require("nbdkit", "nbdinfo", "nbdsh")
    let r = try rig(size: 32 << 20, seed: 175)
    try r.startBackup(.nbdkit(filters: ["log"], parameters: []))
    try r.startServer(["--progress-interval", "0.5"])
    RRTEnv.sleep(0.8)
    let read = try r.nbdsh("h.connect_uri(URI)\nh.pread(8 << 20, 0)\nprint('OK')")
    XCTAssertEqual(read.status, 0, read.summary)
    RRTEnv.sleep(2.2)
    let lines = r.log.split(separator: "\n").filter { $0.contains("progress:") }.map(String.init)
    r.stopServer()
    XCTAssertGreaterThanOrEqual(lines.count, 4, r.log)
    let pattern = try NSRegularExpression(
      pattern: #"fetched ([0-9.]+ [KMGT]?i?B) \(([0-9.]+ [KMGT]?i?B) in the last ([0-9.]+) s, ([0-9.]+ [KMGT]?i?B)/s\)"#
    )
    var previous = 0.0
    var sum = 0.0
    var total = 0.0
    for line in lines {
      let range = NSRange(line.startIndex..., in: line)
      guard let m = pattern.firstMatch(in: line, range: range) else {
        XCTFail("a progress line that does not say what its rate covers: \(line)")
        continue
      }
      func group(_ i: Int) -> String { String(line[Range(m.range(at: i), in: line)!]) }
      total = try bytes(group(1))
      let recent = try bytes(group(2))
      let seconds = try XCTUnwrap(Double(group(3)))
      let rate = try bytes(group(4))
      XCTAssertEqual(recent, total - previous, accuracy: 0.01 * total + 1, "the amount since the last line: \(line)")
      XCTAssertEqual(seconds, 0.5, accuracy: 0.45, "the interval of: \(line)")
      XCTAssertEqual(rate, recent / seconds, accuracy: 0.02 * (recent / seconds) + 1, "the rate of: \(line)")
      sum += recent
      previous = total
    }
    let servedAtBackup = BackupRequestLog(
      try String(contentsOfFile: try XCTUnwrap(r.backupRequestLog), encoding: .utf8)
    ).requests.filter { $0.kind == "Read" }.reduce(0) { $0 + $1.count }
    XCTAssertGreaterThanOrEqual(servedAtBackup, 8 << 20)
    XCTAssertEqual(
      total, Double(servedAtBackup), accuracy: 0.01 * Double(servedAtBackup), lines.joined(separator: "\n"))
    XCTAssertEqual(sum, total, accuracy: 0.02 * total, lines.joined(separator: "\n"))
    // The lines after the burst (2 s of nothing) say so.
    XCTAssertTrue(lines.last?.contains("(0 B in the last") == true, lines.joined(separator: "\n"))
    XCTAssertTrue(lines.contains { !$0.contains("(0 B in the last") }, lines.joined(separator: "\n"))
  }

  /// "1.5 MiB" and the like, as formatBytes writes them.
  func bytes(_ text: String) throws -> Double {
    let parts = text.split(separator: " ")
    let value = try XCTUnwrap(Double(parts[0]), text)
    let units = ["B": 1.0, "KiB": 1024.0, "MiB": 1048576.0, "GiB": 1073741824.0]
    return value * (try XCTUnwrap(units[String(parts[1])], text))
  }

  // MARK: Helpers

  /// nbdkit's file plugin as the backup, with -v so that its standard
  /// error says how each connection ended, and the log filter's file.
  func startVerboseBackup(_ r: RRTRig, filters: [String], parameters: [String]) throws {
    unlink(r.backupSocket)
    let requests = r.s.path("backup-requests.log")
    r.backupRequestLog = requests
    let args =
      ["-v", "-f", "-U", r.backupSocket] + filters.map { "--filter=\($0)" } + ["file", r.backupPath]
      + parameters + ["logfile=\(requests)"]
    let child = try RRTChild(
      name: "backup server", executable: "/usr/bin/nbdkit", arguments: args, stdout: r.s.path("backup.out"),
      stderr: r.s.path("backup.log"))
    r.backupServer = child
    try r.waitForNBD(r.backupURI, process: child, what: "the backup server")
  }
}

/// The lines of nbdkit's log filter: `DATE TIME connection=N KIND …`, with
/// count=0x… for data requests.
struct BackupRequestLog {
  struct Request {
    var time: Double
    var connection: Int
    /// Read, Write, Flush, …; `...Read` for a reply; Connect, Disconnect.
    var kind: String
    var count: Int
    var line: String
  }

  var requests: [Request] = []

  init(_ text: String) {
    let formatter = DateFormatter()
    formatter.locale = Locale(identifier: "en_US_POSIX")
    formatter.timeZone = TimeZone.current
    formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
    for line in text.split(separator: "\n") {
      let fields = line.split(separator: " ")
      guard fields.count >= 4, fields[2].hasPrefix("connection="),
        let connection = Int(fields[2].dropFirst("connection=".count))
      else { continue }
      let clock = fields[1].split(separator: ".")
      guard clock.count == 2, let seconds = formatter.date(from: "\(fields[0]) \(clock[0])"),
        let fraction = Double("0." + clock[1])
      else { continue }
      let count = fields.first { $0.hasPrefix("count=0x") }.flatMap { Int($0.dropFirst(8), radix: 16) } ?? 0
      requests.append(
        Request(
          time: seconds.timeIntervalSince1970 + fraction, connection: connection, kind: String(fields[3]),
          count: count, line: String(line)))
    }
  }
}
