// PostgreSQL on a consistency group of two tracking-server devices. Each
// device is a sparse image served by tracking-server, its export made a
// kernel block device (nbdfuse, then a loop device over nbdfuse's file) and
// formatted ext4: the cluster's data directory on one, its pg_wal on the
// other (initdb --waldir). Under pgbench, `tracking-server group freeze`
// takes points of both devices at one instant; each pair of views is copied
// out (nbdcopy) and dropped. After the load every pair is attached as
// loop devices (ext4 replays its journal: a copy, mounted read-write) and
// PostgreSQL must recover from it as from a power cut of both disks and
// start; pg_amcheck (every database, heap and indexes) must pass, and the
// pgbench tables must balance (TPC-B keeps the sums of account, teller and
// branch balances equal to the sum of the history's deltas, transaction by
// transaction). The pgbench history grows from point to point: the points
// were taken under load.
//
// The control shows the check can fail: points frozen one device after the
// other. The WAL device frozen, a CHECKPOINT, then the data device: the
// data's pg_control names a checkpoint record the WAL copy lacks, so the
// server cannot start (asserted). Two freezes 1 s apart under load, in
// either order, are reported, not asserted: they fail or pass by chance.
//
// Everything the test starts (servers, nbdfuse, mounts, loop devices,
// PostgreSQL, pgbench) is undone in tearDown however the test ends: children
// killed by pid, file systems unmounted lazily, loop devices detached, FUSE
// mounts unmounted. PostgreSQL runs as the `postgres` user (it refuses root)
// through setpriv, which execs, so the child's pid is the postmaster's;
// pg_ctl is never used, as a copy's postmaster.pid names the live server's
// pid. Its socket is in a private directory: it never meets another cluster.

import Foundation
import Glibc
import TestSupport
import XCTest

final class PostgresGroupCLITests: CLITestCase {
  static let groupPoints = 20
  static let scale = 2

  func testPostgresRecoversFromEveryGroupPointTakenUnderPgbench() throws {
    let pg = try PostgresBinaries.find()
    try require("nbdfuse", "nbdcopy", "nbdinfo", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "setpriv")
    guard getuid() == 0 else { throw XCTSkip("mounting ext4 on loop devices needs root") }
    guard FileManager.default.fileExists(atPath: "/dev/loop-control") else { throw XCTSkip("no /dev/loop-control") }
    guard FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("no /dev/fuse (nbdfuse needs it)") }
    guard getpwnam("postgres") != nil else { throw XCTSkip("no postgres user (Debian's postgresql package makes it)") }
    let started = RRTEnv.monotonic()

    let r = try PostgresGroupRig(pg: pg)
    rigs.append(r)
    let data = try r.device("data", size: 128 << 20)
    let wal = try r.device("wal", size: 128 << 20)
    try r.initdb(data: data, wal: wal)
    let live = try r.startPostgres()
    XCTAssertTrue(try r.waitReady(live), "the cluster on the toolkit's devices did not start:\n\(live.errors)")
    let createdb = try r.client("createdb", ["bench"])
    XCTAssertEqual(createdb.status, 0, createdb.summary)
    let initBench = try r.client("pgbench", ["-i", "-q", "-s", "\(Self.scale)", "bench"], timeout: 120)
    XCTAssertEqual(initBench.status, 0, initBench.summary)
    guard createdb.status == 0, initBench.status == 0 else { return }
    let load = try r.child(
      "pgbench", r.bins.bin + "/pgbench", r.bins.connection + ["-c", "4", "-j", "2", "-T", "600", "-P", "5", "bench"])
    RRTEnv.sleep(2)
    let setUpSeconds = RRTEnv.monotonic() - started

    // The group points, each copied out and dropped before the next.
    var points: [PostgresGroupRig.Point] = []
    for i in 1...Self.groupPoints {
      XCTAssertTrue(load.isRunning, "pgbench ended before point \(i):\n\(load.output)\(load.errors)")
      let g = try r.run(
        "tracking-server", ["group", "freeze", "--control", data.control, "--control", wal.control, "--json"])
      XCTAssertEqual(g.status, 0, "group point \(i): \(g.summary)")
      guard g.status == 0 else { break }
      let o = try TrackRig.json(g.stdout)
      let devices = o["devices"] as? [[String: Any]] ?? []
      XCTAssertEqual(devices.count, 2, g.stdout)
      XCTAssertEqual(devices.compactMap { $0["view_lost"] as? Bool }, [false, false], g.stdout)
      var p = PostgresGroupRig.Point(name: "group \(i)", kind: .group)
      p.hold = o["hold_seconds"] as? Double
      p.held = devices.compactMap { $0["held_seconds"] as? Double }
      try r.copyViews(&p, data: data, wal: wal)
      points.append(p)
      RRTEnv.sleep(0.3)
    }

    // The control: the two devices frozen one after the other.
    let orders: [(PostgresGroupRig.Kind, String)] = [
      (.walCheckpointData, "WAL, CHECKPOINT, data"), (.walCheckpointData, "WAL, CHECKPOINT, data"),
      (.walGapData, "WAL, 1 s, data"), (.walGapData, "WAL, 1 s, data"),
      (.dataGapWal, "data, 1 s, WAL"), (.dataGapWal, "data, 1 s, WAL"),
    ]
    for (k, (kind, name)) in orders.enumerated() {
      XCTAssertTrue(load.isRunning, "pgbench ended before control point \(k + 1):\n\(load.output)\(load.errors)")
      let (first, second) = kind == .dataGapWal ? (data, wal) : (wal, data)
      let f1 = try r.run("tracking-server", ["freeze", "--control", first.control])
      XCTAssertEqual(f1.status, 0, f1.summary)
      let t0 = RRTEnv.monotonic()
      if kind == .walCheckpointData {
        let c = try r.client("psql", ["-qc", "CHECKPOINT", "postgres"])
        XCTAssertEqual(c.status, 0, c.summary)
      } else {
        RRTEnv.sleep(1)
      }
      let f2 = try r.run("tracking-server", ["freeze", "--control", second.control])
      XCTAssertEqual(f2.status, 0, f2.summary)
      var p = PostgresGroupRig.Point(name: "control \(k + 1) (\(name))", kind: kind)
      p.gap = RRTEnv.monotonic() - t0
      try r.copyViews(&p, data: data, wal: wal)
      points.append(p)
    }

    // The load ends; what pgbench committed on the live cluster.
    let liveHistory = try r.scalar("SELECT count(*) FROM pgbench_history")
    load.signal(SIGINT)
    _ = load.wait(timeout: 10)
    let stop = r.stopPostgres(live)
    XCTAssertEqual(stop, 0, "the live cluster's fast shutdown:\n\(live.errors)")
    r.detachAll()
    let pointsSeconds = RRTEnv.monotonic() - started - setUpSeconds

    // Every pair, started after the load.
    for i in points.indices { try r.check(&points[i]) }
    let checkSeconds = RRTEnv.monotonic() - started - setUpSeconds - pointsSeconds

    // What every point showed, before the verdicts.
    print(
      "PostgresGroup: PostgreSQL \(pg.version), \(Self.groupPoints) group points, pgbench scale \(Self.scale), "
        + "\(liveHistory ?? -1) pgbench transactions committed")
    for p in points { print("PostgresGroup: " + p.summary) }
    let holds = points.compactMap(\.hold).sorted()
    if let lo = holds.first, let hi = holds.last {
      print(
        String(
          format: "PostgresGroup: hold %.1f ms min, %.1f ms median, %.1f ms max", lo * 1e3,
          holds[holds.count / 2] * 1e3, hi * 1e3))
    }
    print(
      String(
        format: "PostgresGroup: set up %.1f s, points under load %.1f s, recoveries %.1f s, total %.1f s",
        setUpSeconds, pointsSeconds, checkSeconds, RRTEnv.monotonic() - started))
    XCTAssertEqual(points.filter { $0.kind == .group }.count, Self.groupPoints, "group points taken")
    var previous = -1
    for p in points where p.kind == .group {
      XCTAssertTrue(p.started, "\(p.name): PostgreSQL did not recover and start:\n\(p.log)")
      XCTAssertEqual(p.fsck, 0, "\(p.name): e2fsck after the recovery")
      XCTAssertEqual(p.amcheck, 0, "\(p.name): pg_amcheck:\n\(p.amcheckOutput)")
      XCTAssertEqual(p.accounts, Self.scale * 100_000, "\(p.name): pgbench_accounts")
      XCTAssertTrue(p.balanced, "\(p.name): the pgbench balances do not add up: \(p.sums)")
      XCTAssertGreaterThan(p.history ?? -1, previous, "\(p.name): no pgbench transaction since the point before")
      previous = p.history ?? previous
    }
    XCTAssertLessThanOrEqual(previous, liveHistory ?? 0, "a point holds more history than the live cluster")
    for p in points where p.kind == .walCheckpointData {
      XCTAssertFalse(p.started, "\(p.name): started on a WAL copy older than its pg_control's checkpoint:\n\(p.log)")
    }

    r.assertNoCrash()
  }
}

/// PostgreSQL's programs: the newest major version installed under
/// /usr/lib/postgresql (Debian's layout), found by globbing.
struct PostgresBinaries {
  let bin: String
  let version: String
  /// libpq's options to reach the cluster the test started.
  var connection: [String] = []

  static let programs = ["initdb", "postgres", "pg_isready", "pg_amcheck", "psql", "createdb", "pgbench"]

  static func find() throws -> PostgresBinaries {
    let root = "/usr/lib/postgresql"
    let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
      .filter { v in programs.allSatisfy { FileManager.default.isExecutableFile(atPath: "\(root)/\(v)/bin/\($0)") } }
      .sorted { (Int($0.split(separator: ".")[0]) ?? 0) < (Int($1.split(separator: ".")[0]) ?? 0) }
    guard let v = versions.last else {
      throw XCTSkip("no PostgreSQL under \(root)/*/bin with \(programs.joined(separator: ", ")) (package postgresql)")
    }
    return PostgresBinaries(bin: "\(root)/\(v)/bin", version: v)
  }
}

/// The test's servers, devices and clusters, and everything to undo.
final class PostgresGroupRig: ServerRig {
  enum Kind { case group, walCheckpointData, walGapData, dataGapWal }

  /// A pair of copies and what its recovery showed.
  struct Point {
    var name: String
    var kind: Kind
    var hold: Double?
    var held: [Double] = []
    var gap: Double?
    var copySeconds = 0.0
    var started = false
    var startSeconds = 0.0
    var log = ""
    var redo = ""
    var amcheck: Int32?
    var amcheckOutput = ""
    var accounts: Int?
    var history: Int?
    var sums: [Int] = []
    var fsck: Int32?
    var balanced: Bool { sums.count == 4 && Set(sums).count == 1 }

    var summary: String {
      var s = name + ":"
      if let hold {
        s += String(
          format: " hold %.1f ms (devices %@)", hold * 1e3,
          held.map { String(format: "%.1f", $0 * 1e3) }.joined(separator: ", "))
      }
      if let gap { s += String(format: " gap %.2f s", gap) }
      s += String(format: ", copied in %.1f s", copySeconds)
      if started {
        s += String(format: "; recovered and started in %.1f s", startSeconds)
        s += " (\(redo.isEmpty ? "no redo" : redo)), pg_amcheck \(amcheck.map(String.init) ?? "-")"
        s += ", accounts \(accounts.map(String.init) ?? "-"), history \(history.map(String.init) ?? "-")"
        s += ", balances \(balanced ? "agree" : "DISAGREE \(sums)"), e2fsck \(fsck.map(String.init) ?? "-")"
        if amcheck != 0 {
          s += "; pg_amcheck said: " + amcheckOutput.split(separator: "\n").prefix(2).joined(separator: " ")
        }
      } else {
        // The lines that say why, less the answers to pg_isready's probes.
        let why = log.split(separator: "\n").filter {
          ($0.contains("PANIC") || $0.contains("FATAL") || $0.contains("invalid")) && !$0.contains("is starting up")
        }
        s +=
          "; did not start: "
          + (why.map { String($0.split(separator: "]", maxSplits: 1).last ?? $0) }.joined(separator: " |"))
      }
      return s
    }
  }

  /// A tracking-server device attached as ext4.
  final class Device {
    let name: String
    let socket: String
    let control: String
    let mountPoint: String
    init(name: String, socket: String, control: String, mountPoint: String) {
      self.name = name
      self.socket = socket
      self.control = control
      self.mountPoint = mountPoint
    }
    var viewURI: String { "nbd+unix:///view?socket=\(socket)" }
  }

  let s: Scratch
  var bins: PostgresBinaries
  let size = 128 << 20
  let blockSize = 65536
  var dir: String { s.url.path }
  /// The postgres-owned directory of the socket.
  let socketDir: String
  let setpriv: String
  var servers: [RRTChild] = []
  var devices: [Device] = []
  /// What to undo, in order of creation (undone in reverse).
  private var undo: [(String, () -> Void)] = []
  private var postgresStarts = 0

  var allLogs: String {
    servers.map { $0.errors }.joined(separator: "--- next server ---\n")
  }

  init(pg: PostgresBinaries) throws {
    s = try Scratch()
    bins = pg
    socketDir = s.path("pg")
    setpriv = (try? RRTCommand.shell("command -v setpriv").lines.first) ?? "/usr/bin/setpriv"
    try FileManager.default.createDirectory(atPath: socketDir, withIntermediateDirectories: true)
    try chownToPostgres(socketDir, mode: 0o700)
    bins.connection = ["-h", socketDir, "-p", "5432", "-U", "postgres"]
  }

  func chownToPostgres(_ path: String, mode: mode_t) throws {
    guard let pw = getpwnam("postgres") else { throw RRTError("no postgres user") }
    guard chown(path, pw.pointee.pw_uid, pw.pointee.pw_gid) == 0, chmod(path, mode) == 0 else {
      throw RRTError("cannot give \(path) to postgres: \(String(cString: strerror(errno)))")
    }
  }

  // MARK: Commands and children

  func run(_ tool: String, _ arguments: [String], timeout: Double = 120) throws -> RRTCommand.Result {
    try RRTCommand.run(tool, arguments, timeout: timeout, cwd: dir)
  }

  func sys(_ program: String, _ arguments: [String], timeout: Double = 60) throws -> RRTCommand.Result {
    try RRTCommand.shell("exec \(program) " + arguments.map(quote).joined(separator: " "), timeout: timeout, cwd: dir)
  }

  func quote(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }

  /// A client program of PostgreSQL (as root: the cluster trusts local connections).
  func client(_ program: String, _ arguments: [String], timeout: Double = 60) throws -> RRTCommand.Result {
    try RRTCommand.run(bins.bin + "/" + program, bins.connection + arguments, timeout: timeout, cwd: dir)
  }

  /// One integer from a query in the bench database.
  func scalar(_ sql: String) throws -> Int? {
    let r = try client("psql", ["-Atc", sql, "bench"])
    return r.status == 0 ? Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) : nil
  }

  /// A child stopped by pid at the end: SIGTERM, or `signal` (SIGQUIT, a
  /// postmaster's immediate shutdown), then SIGKILL.
  func child(_ name: String, _ executable: String, _ arguments: [String], signal: Int32 = SIGTERM) throws -> RRTChild {
    let out = s.path("\(name).log")
    let c = try RRTChild(name: name, executable: executable, arguments: arguments, stdout: out, stderr: out, cwd: dir)
    undo.append(
      (
        "stop \(name) (pid \(c.pid))",
        {
          c.signal(signal)
          if c.wait(timeout: 10) == nil { c.kill9() }
        }
      ))
    return c
  }

  // MARK: Devices

  /// A sparse image served by tracking-server, attached through nbdfuse and
  /// a loop device, formatted ext4 and mounted.
  func device(_ name: String, size: Int) throws -> Device {
    let image = s.path("\(name).img")
    guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, off_t(size)) == 0 else {
      throw RRTError("cannot make the image \(image)")
    }
    let d = Device(
      name: name, socket: s.path("\(name).sock"), control: s.path("\(name).control"), mountPoint: s.path("mnt/\(name)"))
    let server = try child(
      "tracking-server-\(name)", Tools.path("tracking-server"),
      ["serve", "--changes", s.path("\(name).map"), "--socket", d.socket, "--control", d.control, image])
    servers.append(server)
    let end = RRTEnv.monotonic() + 15
    var answered = false
    while RRTEnv.monotonic() < end && server.isRunning && !answered {
      answered =
        (try? RRTCommand.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///?socket=\(d.socket)"], timeout: 5))?.status
        == 0
      if !answered { RRTEnv.sleep(0.05) }
    }
    guard answered else { throw RRTError("tracking-server for \(name) did not answer: \(server.errors)") }

    let fuseDir = s.path("fuse-\(name)")
    try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: true)
    try FileManager.default.createDirectory(atPath: d.mountPoint, withIntermediateDirectories: true)
    let fuse = try RRTChild(
      name: "nbdfuse-\(name)", executable: "/usr/bin/nbdfuse", arguments: [fuseDir + "/disk", "--unix", d.socket],
      stdout: s.path("nbdfuse-\(name).log"), stderr: s.path("nbdfuse-\(name).log"), cwd: dir)
    undo.append(
      (
        "nbdfuse \(fuseDir)",
        {
          _ = try? RRTCommand.shell(
            "fusermount3 -u \(self.quote(fuseDir)) || umount -l \(self.quote(fuseDir))", timeout: 30)
          fuse.stop(grace: 5)
        }
      ))
    let appear = RRTEnv.monotonic() + 10
    while RRTEnv.monotonic() < appear && fuse.isRunning && !FileManager.default.fileExists(atPath: fuseDir + "/disk") {
      RRTEnv.sleep(0.05)
    }
    guard FileManager.default.fileExists(atPath: fuseDir + "/disk") else {
      throw RRTError("nbdfuse did not show the \(name) export: \(fuse.errors)")
    }
    let loop = try attach(fuseDir + "/disk")
    let mkfs = try sys("mkfs.ext4", ["-q", "-F", "-b", "4096", loop], timeout: 120)
    guard mkfs.status == 0 else { throw RRTError("mkfs.ext4 on \(loop) (\(name)): \(mkfs.summary)") }
    try mount(loop, d.mountPoint)
    devices.append(d)
    return d
  }

  /// A loop device over a file, detached at the end.
  func attach(_ file: String) throws -> String {
    let r = try sys("losetup", ["-f", "--show", file], timeout: 30)
    guard r.status == 0, let loop = r.lines.first else { throw RRTError("losetup \(file): \(r.summary)") }
    undo.append(("loop \(loop)", { _ = try? self.sys("losetup", ["-d", loop], timeout: 30) }))
    return loop
  }

  /// Mounts ext4 read-write (replaying its journal), unmounted lazily at the end.
  func mount(_ device: String, _ mountPoint: String) throws {
    let r = try sys("mount", ["-t", "ext4", device, mountPoint], timeout: 60)
    guard r.status == 0 else { throw RRTError("mount \(device) on \(mountPoint): \(r.summary)") }
    undo.append(("mount \(mountPoint)", { _ = try? self.sys("umount", ["-l", mountPoint], timeout: 30) }))
  }

  /// Undoes the steps from the latest back to the first `count`.
  func undoAll(downTo count: Int = 0) {
    while undo.count > count {
      let (_, step) = undo.removeLast()
      step()
    }
  }

  func stopAll() { undoAll() }

  /// Undoes everything the live cluster used, checking each unmount and
  /// that the servers stop cleanly.
  func detachAll() {
    while let (what, step) = undo.popLast() {
      if what.hasPrefix("mount ") {
        let mp = String(what.dropFirst("mount ".count))
        let u = try? sys("umount", [mp], timeout: 60)
        XCTAssertEqual(u?.status, 0, "umount \(mp): \(u?.summary ?? "")")
      }
      step()
    }
    for server in servers {
      XCTAssertEqual(server.stop(grace: 30), 0, "tracking-server did not stop cleanly: \(server.errors)")
    }
  }

  // MARK: PostgreSQL

  func initdb(data: Device, wal: Device) throws {
    let pgdata = data.mountPoint + "/pgdata"
    let waldirParent = wal.mountPoint + "/wal"
    for p in [pgdata, waldirParent] {
      try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
      try chownToPostgres(p, mode: 0o700)
    }
    let r = try RRTCommand.run(
      setpriv,
      asPostgres + [
        bins.bin + "/initdb", "-D", pgdata, "--waldir", waldirParent + "/pg_wal", "-A", "trust", "-U", "postgres",
        "--data-checksums", "--wal-segsize=1", "--locale=C", "--encoding=UTF8",
      ], timeout: 120, cwd: socketDir)
    guard r.status == 0 else { throw RRTError("initdb: \(r.summary)") }
    pgdataPath = pgdata
  }

  var pgdataPath = ""
  var asPostgres: [String] { ["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"] }

  /// The postmaster on the mounted data directory, as the postgres user.
  /// Small buffers and WAL limits make it write both devices all the time
  /// and checkpoint every few seconds under pgbench.
  /// A copy's cluster (`copy`) skips fsync: it is checked and thrown away,
  /// and nothing of it must survive a crash.
  func startPostgres(copy: Bool = false) throws -> RRTChild {
    postgresStarts += 1
    return try child(
      "postgres-\(postgresStarts)", setpriv,
      asPostgres + [
        bins.bin + "/postgres", "-D", pgdataPath, "-k", socketDir, "-p", "5432", "-c", "listen_addresses=",
        "-c", "shared_buffers=16MB", "-c", "min_wal_size=4MB", "-c", "max_wal_size=16MB",
        "-c", "checkpoint_timeout=30s", "-c", "max_connections=20", "-c", "log_checkpoints=on",
      ] + (copy ? ["-c", "fsync=off"] : []), signal: SIGQUIT)
  }

  /// Waits until the postmaster accepts connections; false when it ended first.
  func waitReady(_ postgres: RRTChild, timeout: Double = 60) throws -> Bool {
    let end = RRTEnv.monotonic() + timeout
    while RRTEnv.monotonic() < end && postgres.isRunning {
      if try client("pg_isready", ["-q", "-d", "postgres"], timeout: 10).status == 0 { return true }
      RRTEnv.sleep(0.1)
    }
    return false
  }

  /// Fast shutdown (SIGINT) of a postmaster, SIGQUIT then SIGKILL if it lingers.
  @discardableResult
  func stopPostgres(_ postgres: RRTChild, immediate: Bool = false) -> Int32? {
    postgres.signal(immediate ? SIGQUIT : SIGINT)
    if let status = postgres.wait(timeout: 60) { return status }
    postgres.signal(SIGQUIT)
    if postgres.wait(timeout: 10) == nil { postgres.kill9() }
    return nil
  }

  // MARK: Points

  /// Copies both views to files, then drops them.
  func copyViews(_ p: inout Point, data: Device, wal: Device) throws {
    let t0 = RRTEnv.monotonic()
    let n = p.name.replacingOccurrences(of: " ", with: "-").filter { $0.isLetter || $0.isNumber || $0 == "-" }
    for d in [data, wal] {
      let copy = s.path("points/\(n)-\(d.name).img")
      try FileManager.default.createDirectory(atPath: s.path("points"), withIntermediateDirectories: true)
      let c = try sys("nbdcopy", [d.viewURI, copy], timeout: 120)
      XCTAssertEqual(c.status, 0, "copying \(p.name)'s \(d.name) view: \(c.summary)")
      copies[p.name, default: [:]][d.name] = copy
    }
    p.copySeconds = RRTEnv.monotonic() - t0
    for d in [data, wal] {
      let drop = try run("tracking-server", ["drop", "--control", d.control])
      XCTAssertEqual(drop.status, 0, "dropping \(p.name)'s \(d.name) view: \(drop.summary)")
    }
  }

  var copies: [String: [String: String]] = [:]

  /// Attaches a pair of copies where the live devices were (the data
  /// directory's pg_wal link names the WAL mount point), starts PostgreSQL
  /// on it, and checks what it recovered.
  func check(_ p: inout Point) throws {
    guard let files = copies[p.name], let dataCopy = files["data"], let walCopy = files["wal"] else {
      XCTFail("\(p.name): no copies")
      return
    }
    let mark = undo.count
    defer { undoAll(downTo: mark) }
    let dataLoop = try attach(dataCopy)
    let walLoop = try attach(walCopy)
    try mount(dataLoop, devices[0].mountPoint)
    try mount(walLoop, devices[1].mountPoint)
    // The live postmaster's lock file: its pid is now another process's or none.
    try? FileManager.default.removeItem(atPath: pgdataPath + "/postmaster.pid")
    let t0 = RRTEnv.monotonic()
    let postgres = try startPostgres(copy: true)
    p.started = try waitReady(postgres)
    p.startSeconds = RRTEnv.monotonic() - t0
    if p.started {
      let a = try client("pg_amcheck", ["--all", "--install-missing", "--heapallindexed"], timeout: 300)
      p.amcheck = a.status
      p.amcheckOutput = a.stdout + a.stderr
      p.accounts = try scalar("SELECT count(*) FROM pgbench_accounts")
      p.history = try scalar("SELECT count(*) FROM pgbench_history")
      p.sums = try [
        "SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts",
        "SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers",
        "SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches",
        "SELECT coalesce(sum(delta), 0) FROM pgbench_history",
      ].compactMap { try scalar($0) }
    }
    stopPostgres(postgres, immediate: true)
    p.log = postgres.output
    p.redo =
      p.log.split(separator: "\n").first { $0.contains("redo done at") }
      .map {
        "redo done at " + String($0.components(separatedBy: "redo done at ").last?.prefix(while: { $0 != " " }) ?? "")
      } ?? ""
    // Unmount (checked), then e2fsck both file systems as recovered.
    for d in devices.reversed() {
      let u = try sys("umount", [d.mountPoint], timeout: 60)
      XCTAssertEqual(u.status, 0, "umount \(d.mountPoint): \(u.summary)")
    }
    p.fsck = try [dataLoop, walLoop].map { try sys("e2fsck", ["-f", "-n", $0], timeout: 120).status }.max()
  }
}
