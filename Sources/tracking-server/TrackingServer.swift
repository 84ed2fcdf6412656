import ArgumentParser
import DualRestore
import Glibc
import ToolSupport

@main
struct TrackingServer: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "tracking-server",
    abstract: "Serve a device over NBD with its writes tracked, and freeze point-in-time views of it.",
    discussion: """
      The backup site's half of the toolkit. `tracking-server serve` exports \
      a device (the backup that restore-read-through mirrors to, or a disk \
      being copied to a new mirror) and records every block written in a \
      change map since a named generation. While it runs, the other \
      subcommands talk to it through its control socket: `freeze` takes a \
      point-in-time view that stays exact while writes continue (exported \
      read-only as `view`, for snapshot), `drop` lets it go, \
      `new-generation` saves the change map and starts a new one, `status` \
      reports; `group` does `freeze` or `new-generation` on several servers \
      at one instant (a consistency group).

      Seeding a mirror, with writes going on all along:

        tracking-server serve --changes disk.changes --socket disk.sock disk.img &
        tracking-server freeze --socket disk.sock --changes-out g0.map
        snapshot --as-of g0.map -o media.stream 'nbd+unix:///view?socket=disk.sock'
        tracking-server drop --socket disk.sock
        merge-snapshot --mirror --map mirror.map -i media.stream mirror.img
        tracking-server freeze --socket disk.sock --changes-out g1.map
        snapshot --map g1.map --base STREAM-ID -o catchup.stream 'nbd+unix:///view?socket=disk.sock'
        tracking-server drop --socket disk.sock
        merge-snapshot --mirror --map mirror.map -i catchup.stream mirror.img

      Freezing with --changes-out ends the generation at the instant of the \
      view, so g1.map names exactly the blocks written between the two views; \
      each saved map records the instant its generation ended, and the \
      streams made with it say so, so that merge-snapshot refuses a catch-up \
      that leaves a generation out.
      """,
    subcommands: [Serve.self, Freeze.self, Drop.self, NewGeneration.self, Group.self, Status.self, Points.self])

  static func main() { ToolMain.run(Self.self) }
}

/// Where a control subcommand finds the server.
struct ControlOptions: ParsableArguments {
  @Option(help: ArgumentHelp("The server's NBD socket (its control socket is PATH.control).", valueName: "path"))
  var socket: String?

  @Option(help: ArgumentHelp("The server's control socket.", valueName: "path"))
  var control: String?

  func validate() throws {
    if (socket == nil) == (control == nil) {
      throw ValidationError("give exactly one of --socket PATH and --control PATH")
    }
  }

  var path: String { control ?? (socket ?? "") + ".control" }
}

/// Makes a path absolute for a server whose working directory may differ.
func absolute(_ path: String) -> String {
  if path.hasPrefix("/") { return path }
  guard let pointer = getcwd(nil, 0) else { return path }
  defer { free(pointer) }
  let cwd = String(cString: pointer)
  return (cwd == "/" ? "" : cwd) + "/" + path
}

extension ControlOptions {
  /// Sends `words` to the server and prints its answer: one JSON object with
  /// `json`, else the line `text` makes of the answer's fields.
  func request(_ words: [String], json: Bool, text: (([String: String]) -> String)) throws {
    let fields = try ControlSocket.request(path, words)
    if json {
      var o = JSONObject()
      for (k, v) in fields {
        if let n = UInt64(v) {
          o.add(k, n)
        } else if v == "true" || v == "false" {
          o.add(k, v == "true")
        } else {
          o.add(k, v)
        }
      }
      let out = TextOutput()
      try out.line(o.render())
      try out.flush()
    } else {
      let out = TextOutput()
      try out.line(text(Dictionary(fields, uniquingKeysWith: { $1 })))
      try out.flush()
    }
  }
}

extension TrackingServer {
  struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Export DEVICE over NBD, tracking its writes in a change map.",
      usage: "tracking-server serve --changes MAP (--socket PATH | --listen HOST:PORT) [options] DEVICE",
      discussion: """
        DEVICE (an image file or block device) is exported as `device` (the \
        default export) with reads, writes, FLUSH, FUA, TRIM and \
        WRITE_ZEROES; several clients and several requests each are served \
        at once. Every block written is set in MAP, a change map, on disk \
        before the write is issued: in its journal MAP.journal at once, and \
        in MAP itself every 5 seconds, at a generation change and at a stop. \
        After a crash, the next start replays the journal into MAP, which \
        then covers every block that may have changed since its generation \
        began; until then (and while the server runs, by up to 5 seconds) \
        overwrite-map show MAP may lag, and tracking-server status does not. \
        MAP is created when missing (a new generation starts) and continued \
        when present; its journal is locked, so one server at a time uses it.

        The control socket (PATH.control beside --socket, or --control) \
        takes the requests of the other subcommands, each connection served \
        on its own: `group` holds writes on one connection for an instant, \
        which the server ends by itself at the hold's limit or as soon as \
        that connection closes, saying so in the log. A frozen view keeps \
        the old contents of blocks written after the freeze in the \
        preservation store (--store, by default MAP.store; mode 0600). When \
        the store reaches --store-limit the view is lost: its reads fail \
        with EIO and the log says so, and the device goes on as before. A \
        view does not survive a stop of the server: the next start reports \
        it lost, and a snapshot that was reading it fails rather than end \
        with a mix of two instants.

        With --tls on or require the exports are offered over TLS \
        (NBD_OPT_STARTTLS) with the certificates of --tls-certificates DIR, \
        as restore-read-through does; the control socket is a local Unix \
        socket of mode 0600. The limits on clients (--max-connections and \
        the timeouts) are restore-read-through's too.

        With --backup URI (repeatable, up to 16) and --ack local, the \
        server keeps far copies of DEVICE asynchronously, as \
        restore-read-through --ack local does: every write, zero and trim is \
        appended to the mirror journal (MAP.mirror, or --journal PATH; \
        dualrestore-journal(5)) before it is made on DEVICE, and a FLUSH is \
        acknowledged once the journal and DEVICE are durable; each far copy \
        is brought up to date in the background, interval by interval, \
        coalesced, flushed after each interval, so it is always at a point a \
        client flushed (or between that point and the next). A far copy need \
        not answer when the server starts, nor all the time: what it lacks \
        stays in the journal (MAP.mirror.positions says how far each got) and \
        it resumes from its own position. With --ack quorum=K a FLUSH also \
        waits until K far copies hold it. --max-lag bounds what they may owe \
        (default 1G of journal; or seconds, 30s): beyond it writes wait, and \
        the log says so. MAP.al, the activity log, names the regions with \
        writes in flight; after a crash they are journaled again from DEVICE, \
        so the far copies come to equal it. Every 10 seconds while a copy \
        lacks something the log says what, and status reports it per copy \
        (copy_N, copy_N_interval, copy_N_owed_intervals, copy_N_owed_bytes, \
        copy_N_oldest_seconds). A chain of sites is made of such servers: a \
        relay is a tracking-server (or restore-read-through) with --ack local \
        whose far copy is the next hop, and which a primary mirrors to.

        With --history DIR the server keeps points in time of DEVICE: every \
        FLUSH that follows writes makes a point (the device as it is then, \
        taken with writes held), and before the first write to a 4 KiB block \
        after a point, the block's old contents are appended to DIR \
        (dualrestore-history(5)), durable before the write reaches DEVICE. \
        Without --backup, writes are answered once staged in memory (at most \
        64 MiB; a write waits while it is full) and reach DEVICE in order \
        after one sync of the history for all staged meanwhile; a FLUSH \
        holds writes only until the staged ones are on DEVICE and the point \
        is recorded. With --backup (a relay), each write waits for its \
        before-images, as the activity log needs it on DEVICE when answered. \
        Any point kept is exported read-only as `point;N` (`point` alone is \
        the newest, `point;at=2026-12-07T01:30:00Z` the newest at or before \
        that instant, UTC), for snapshot, bitmap-diff, nbdcopy, qemu-img or a \
        mount through nbdfuse; `tracking-server points` lists them. A far \
        copy kept by asynchronous mirroring is flushed after each interval \
        it receives, so with --history it keeps every consistency point it \
        reached. --keep-time and --keep-bytes bound what is kept: the oldest \
        points are trimmed (every few seconds, and at each point) while the \
        oldest is older than the time, or the history's records take more \
        than the bytes; the newest point is always kept, and so are the \
        before-images since it, whatever their size. A point trimmed is \
        refused by name, and a client reading it when it goes gets EIO. The \
        history survives stops and crashes: a clean stop makes the device as \
        it stops a point; after a crash, the log's torn tail is cut and the \
        points before it are kept, but for the newest when the crash came \
        before the history's next sync. Nothing else may write DEVICE while \
        it has a history, or the points would be wrong.

        SIGINT or SIGTERM stops the server: requests in flight are answered \
        and the device is synchronised; what the far copies lack stays in \
        the journal for the next start.
        """)

    @Option(help: ArgumentHelp("The change map (created when missing).", valueName: "map"))
    var changes: String

    @OptionGroup var serving: ListenOptions

    @Option(
      help: ArgumentHelp("The control socket (default: the --socket path with .control added).", valueName: "path"))
    var control: String?

    @Option(help: ArgumentHelp("The preservation store of a frozen view (default: MAP.store).", valueName: "file"))
    var store: String?

    @Option(
      help: ArgumentHelp(
        "Most bytes a view may preserve (default: the device size or half the free space of the store's file system, whichever is smaller).",
        valueName: "bytes"))
    var storeLimit: ByteCount?

    @OptionGroup var blockSize: BlockSizeOption

    @OptionGroup var tls: TLSOptions

    @OptionGroup var limits: ServerLimitOptions

    @Option(
      help: ArgumentHelp(
        "A far copy to keep of the device, asynchronously (with --ack local or quorum=K): "
          + "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds, nbds+unix: over TLS); repeatable.",
        valueName: "uri"))
    var backup: [String] = []

    @Option(help: ArgumentHelp("Connections to each far copy, used together (1 to 16).", valueName: "n"))
    var backupConnections: Int = 4

    @Option(
      help: ArgumentHelp("Seconds a request to a far copy may take before it is tried again.", valueName: "seconds"))
    var backupTimeout: Double = 30

    @OptionGroup var mirroring: MirrorOptions

    @Option(
      help: ArgumentHelp(
        "Keep points in time of the device in this directory (created when missing; an existing history is continued).",
        valueName: "dir"))
    var history: String?

    @Option(
      help: ArgumentHelp("Trim the points older than this (90s, 30m, 24h, 7d, 2w; with --history).", valueName: "time"))
    var keepTime: TimeSpan?

    @Option(
      help: ArgumentHelp(
        "Trim the oldest points while the history's records take more than this (K, M, G; with --history).",
        valueName: "bytes"))
    var keepBytes: ByteCount?

    @Argument(help: ArgumentHelp("The image file or block device to serve.", valueName: "device"))
    var device: String

    func validate() throws {
      if serving.socket == nil && control == nil {
        throw ValidationError("with --listen, give the control socket with --control PATH")
      }
      if let storeLimit, storeLimit.value < 1 << 20 {
        throw ValidationError("--store-limit \(storeLimit) is too small (at least 1M)")
      }
      if backup.isEmpty && mirroring.ack.value != .all {
        throw ValidationError("--ack \(mirroring.ack) needs a far copy to keep: give --backup URI")
      }
      if !backup.isEmpty && mirroring.ack.value == .all {
        throw ValidationError(
          "tracking-server keeps far copies asynchronously: give --ack local or --ack quorum=K with --backup")
      }
      if backup.count > 16 { throw ValidationError("--backup is given \(backup.count) times; at most 16 far copies") }
      if Set(backup).count != backup.count { throw ValidationError("--backup names the same far copy twice") }
      if case .quorum(let k) = mirroring.ack.value, k > backup.count {
        throw ValidationError("--ack quorum=\(k) needs \(k) far copies; --backup names \(backup.count)")
      }
      if backupConnections < 1 || backupConnections > 16 {
        throw ValidationError("--backup-connections \(backupConnections) is out of range (1 to 16)")
      }
      if backupTimeout <= 0 || backupTimeout > 86400 {
        throw ValidationError("--backup-timeout \(backupTimeout) is out of range")
      }
      if history == nil && (keepTime != nil || keepBytes != nil) {
        throw ValidationError("--keep-time and --keep-bytes bound a history: give --history DIR")
      }
      if history != nil && keepTime == nil && keepBytes == nil {
        throw ValidationError("--history needs a bound on what it keeps: give --keep-time, --keep-bytes or both")
      }
      if let keepBytes, keepBytes.value < 1 << 20 {
        throw ValidationError("--keep-bytes \(keepBytes) is too small (at least 1M)")
      }
    }

    func run() throws {
      let signals = StopSignals()
      let log: @Sendable (String) -> Void = { printError("tracking-server: \($0)") }
      let serverTLS = try tls.serverTLS()
      let d = try Device(path: device, options: .readWrite)
      let storePath = store ?? changes + ".store"
      // The history first: one refused leaves no new change map behind.
      let pointHistory = try history.map {
        try PointHistory(
          directory: absolute($0), deviceSize: d.size,
          retention: .init(seconds: keepTime?.seconds ?? 0, bytes: keepBytes?.value ?? 0), log: log)
      }
      let engine = try TrackingEngine(
        device: d, changesPath: changes, storePath: storePath, storeLimit: storeLimit?.value,
        blockSize: blockSize.blockSize.map { UInt32($0.value) },
        log: log)
      if let settings = mirroring.settings(mapPath: changes) {
        // A far copy that does not answer yet is connected to when it does.
        let links = try backup.map {
          try DeferredLink(uri: $0, timeout: backupTimeout, count: backupConnections, size: d.size)
        }
        try engine.mirror(to: links, settings: settings)
      }
      if let pointHistory {
        engine.keepHistory(pointHistory)
        pointHistory.trim()
      }
      let listener = try serving.listener()
      let controlPath = control ?? (serving.socket ?? "") + ".control"
      let controlListener = try Listener(unixPath: controlPath)
      chmod(controlPath, 0o600)
      let server = NBDServer(
        exports: [TrackedExport(engine: engine), ViewExport(engine: engine)]
          + (history == nil ? [] : [PointExport(engine: engine)]),
        options: limits.serverOptions(tls: serverTLS), log: log)
      let service = TrackingService(engine: engine)
      let control = ControlSocket.serve(controlListener) { channel in service.serve(channel) }
      signals.onSignal { received in
        log("stopping on signal \(received)")
        service.beginStop()
        control.beginStop()
        server.beginStop(listener)
      }
      service.start()
      let s = engine.status
      log(
        "serving \(device) (\(formatBytes(d.size))) on \(listener.name)\(tls.tls == .off ? "" : " (TLS \(tls.tls.rawValue))"), control \(controlPath); "
          + "generation \(s.generation), \(s.changedBlocks) block(s) changed"
          + (backup.isEmpty
            ? ""
            : "; writes acknowledged \(mirroring.ack), far copies \(backup.joined(separator: ", ")) kept from "
              + "the mirror journal"))
      server.serve(listener)
      server.stop()
      service.stop()
      do {
        try engine.close()
      } catch {
        log("stopped, but the final synchronisation failed: \(error)")
        throw ExitCode(1)
      }
      for lag in engine.mirror?.lag ?? [] where lag.intervals > 0 {
        log(
          "the far copy \(lag.name) lacks \(lag.intervals) interval(s) (\(formatBytes(lag.bytes))); "
            + "they stay in the mirror journal and are sent at the next start")
      }
      log("stopped cleanly")
    }
  }

  struct Freeze: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Freeze a point-in-time view of the running server's device.",
      discussion: """
        Writes are held for an instant while the view is taken; afterwards \
        they go on, and the old contents of the blocks they overwrite are \
        preserved for the view. The view is exported read-only as `view` \
        (nbd+unix:///view?socket=PATH) until `drop`. One view at a time. \
        With --changes-out, the current generation ends at the same \
        instant: its change map (the blocks written since it began) is \
        saved to FILE and a new generation starts, so the next freeze \
        --changes-out names exactly the blocks written between the two views.
        """)

    @OptionGroup var server: ControlOptions

    @Option(help: ArgumentHelp("End the generation at the freeze and save its change map here.", valueName: "file"))
    var changesOut: String?

    @Flag(help: "Print the result as one JSON object on standard output.")
    var json = false

    func run() throws {
      var words = ["freeze"]
      if let changesOut { words.append("changes-out=" + ControlSocket.encode(absolute(changesOut))) }
      try server.request(words, json: json) { d in
        var s = "froze view \(d["view"] ?? "?") at \(d["frozen"] ?? "?")"
        if let ended = d["ended_generation"] {
          s +=
            "; generation \(ended) ended with \(d["ended_changed_blocks"] ?? "?") changed block(s) in \(changesOut ?? "?"), generation \(d["generation"] ?? "?") began"
        }
        return s
      }
    }
  }

  struct Drop: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Drop the frozen view; its export and preservation store go.")

    @OptionGroup var server: ControlOptions

    @Option(
      help: ArgumentHelp(
        "Drop the view only if it is this one (its id, as freeze and status print it); another view held is kept, and the drop refused.",
        valueName: "id"))
    var view: String?

    @Flag(help: "Print the result as one JSON object on standard output.")
    var json = false

    func validate() throws {
      if let view, ID128(hex: view) == nil {
        throw ValidationError("--view \(view) is not a view id (32 hex digits)")
      }
    }

    func run() throws {
      try server.request(["drop"] + (view.map { ["view=" + $0] } ?? []), json: json) { d in
        "dropped view \(d["view"] ?? "?") (\(d["preserved_blocks"] ?? "?") block(s) preserved)"
      }
    }
  }

  struct NewGeneration: ParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "new-generation",
      abstract: "End the current generation, saving its change map, and start a new one.")

    @OptionGroup var server: ControlOptions

    @Option(help: ArgumentHelp("Save the ending generation's change map here.", valueName: "file"))
    var changesOut: String

    @Flag(help: "Print the result as one JSON object on standard output.")
    var json = false

    func run() throws {
      let words = ["new-generation", "changes-out=" + ControlSocket.encode(absolute(changesOut))]
      try server.request(words, json: json) { d in
        "generation \(d["ended_generation"] ?? "?") ended with \(d["ended_changed_blocks"] ?? "?") changed block(s) in \(changesOut); generation \(d["generation"] ?? "?") began"
      }
    }
  }

  struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Report the generation, the changed blocks and the frozen view of a running server.")

    @OptionGroup var server: ControlOptions

    @Flag(help: "Print the status as one JSON object on standard output.")
    var json = false

    func run() throws {
      try server.request(["status"], json: json) { d in
        var s =
          "generation \(d["generation"] ?? "?") since \(d["generation_started"] ?? "?"): \(d["changed_blocks"] ?? "?") block(s) changed"
        if let view = d["view"] {
          s +=
            "; view \(view) frozen at \(d["frozen"] ?? "?"): \(d["preserved_blocks"] ?? "?") block(s) preserved, store \(d["store_bytes"] ?? "?") of \(d["store_limit"] ?? "?") bytes"
          if d["view_lost"] == "true" { s += "; LOST: \(d["view_lost_reason"] ?? "")" }
        } else {
          s += "; no view frozen"
        }
        if let held = d["writes_held_seconds"] {
          s += "; WRITES HELD for \(held) s by a control connection (tracking-server group)"
        }
        for i in 0..<(Int(d["copies"] ?? "0") ?? 0) {
          s +=
            "; far copy \(d["copy_\(i)"] ?? "?") holds interval \(d["copy_\(i)_interval"] ?? "?"), lacks "
            + "\(d["copy_\(i)_owed_intervals"] ?? "?") (\(d["copy_\(i)_owed_bytes"] ?? "?") bytes), oldest "
            + "\(d["copy_\(i)_oldest_seconds"] ?? "?") s"
        }
        return s
      }
    }
  }

  struct Points: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "List the points in time a running server keeps (--history).",
      discussion: """
        One line per point, oldest first: its number, its instant (UTC), and \
        the bytes and 4 KiB blocks of before-images the history keeps for the \
        interval that ended at it (what keeping the point before it costs; \
        0 for the oldest, whose own interval is trimmed). Then the space the \
        history's files take and the retention. Point N is read as the export \
        `point;N` (nbd+unix:///point;N?socket=PATH). With --at INSTANT, only \
        the newest point at or before it (an error names the oldest point \
        when the instant is before it). JSON keys: history, space_used, \
        open_bytes, keep_seconds, keep_bytes, points (an array of objects \
        with number, instant, bytes, blocks, export), and lost when the \
        history is lost.
        """)

    @OptionGroup var server: ControlOptions

    @Option(
      help: ArgumentHelp("Only the newest point at or before this instant (RFC 3339, UTC).", valueName: "instant"))
    var at: String?

    @Flag(help: "Print the points as one JSON object on standard output.")
    var json = false

    func validate() throws {
      if let at, Instant(rfc3339: at) == nil {
        throw ValidationError("--at '\(at)' is not an instant such as 2026-12-07T01:30:00Z")
      }
    }

    func run() throws {
      var words = ["points"]
      if let at { words.append("at=" + ControlSocket.encode(at)) }
      let fields = try ControlSocket.request(server.path, words)
      let d = Dictionary(fields, uniquingKeysWith: { $1 })
      let count = Int(d["points"] ?? "0") ?? 0
      let out = TextOutput()
      if json {
        var o = JSONObject()
        o.add("history", d["history"])
        o.add("space_used", number: d["space_used"] ?? "0")
        o.add("open_bytes", number: d["open_bytes"] ?? "0")
        o.add("keep_seconds", number: d["keep_seconds"] ?? "0")
        o.add("keep_bytes", number: d["keep_bytes"] ?? "0")
        if let lost = d["lost"] { o.add("lost", lost) }
        var points: [String] = []
        for i in 0..<count {
          var p = JSONObject()
          p.add("number", number: d["point_\(i)"] ?? "0")
          p.add("instant", d["point_\(i)_instant"])
          p.add("bytes", number: d["point_\(i)_bytes"] ?? "0")
          p.add("blocks", number: d["point_\(i)_blocks"] ?? "0")
          p.add("export", "point;" + (d["point_\(i)"] ?? "0"))
          points.append(p.render())
        }
        o.add("points", array: points)
        try out.line(o.render())
      } else {
        for i in 0..<count {
          try out.line(
            "point \(d["point_\(i)"] ?? "?") at \(d["point_\(i)_instant"] ?? "?"): "
              + "\(d["point_\(i)_bytes"] ?? "?") bytes, \(d["point_\(i)_blocks"] ?? "?") block(s) kept for its interval"
          )
        }
        var keep: [String] = []
        if let s = d["keep_seconds"], (Double(s) ?? 0) > 0 { keep.append("\(s) s") }
        if let b = d["keep_bytes"], b != "0" { keep.append("\(b) bytes") }
        if at == nil {
          try out.line(
            "\(count) point(s); the history takes \(d["space_used"] ?? "?") bytes; \(d["open_bytes"] ?? "?") bytes "
              + "since the newest point; keeping "
              + (keep.isEmpty ? "every point (no --keep-time, no --keep-bytes)" : keep.joined(separator: " and "))
              + (d["lost"].map { "; LOST: \($0)" } ?? ""))
        }
      }
      try out.flush()
    }
  }
}

extension TrackingServer {
  struct Group: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Freeze, or end the generations of, several servers' devices at one instant: a consistency group.",
      usage: """
        tracking-server group (freeze | new-generation) (--control PATH | --socket PATH)... \
        [--changes-out FILE]... [--before COMMAND] [--after COMMAND] [--max-hold SECONDS] [--json]
        """,
      discussion: """
        An application whose data spans several devices (a database's data \
        and its log) writes to one only after a write to another has \
        completed; a copy of each taken at a different instant may hold the \
        later write without the one it depends on. `group` first asks every \
        server for its status (one that does not answer ends the command \
        there), runs --before (with /bin/sh -c; to quiesce the application, or nothing), \
        then asks every server to hold its writes and run ACTION (on each \
        device's control connection, all at once): each server closes its \
        gate, so new writes wait, waits for the writes in flight to finish, \
        runs ACTION at once and answers. ACTION: `freeze` takes a view (with \
        --changes-out, ending the generation at the same instant, as \
        tracking-server freeze does), `new-generation` ends the generation, \
        saving its change map to the device's --changes-out. When all have \
        answered, every server is released and --after runs. An ending generation is cut within the hold by one \
        small synchronous write to its change map's journal; its map is \
        saved to --changes-out after the release, writes going on, and the \
        command returns once every map is saved (a server that stops before \
        saves it from its journal when it starts again). A write issued after another completed is in the \
        group's point only if that other write is too, whichever devices \
        they went to: the point is what a power cut of all the devices at \
        once would leave, which a database recovers from as from a crash. \
        The --before command is for an application that must be quiesced beyond that \
        (a file system frozen with fsfreeze, a database told to checkpoint).

        The devices are the --control paths in the order given, then the \
        --socket paths (PATH.control) in the order given; --changes-out is \
        given once per device in that order (for freeze, or not at all). \
        Views are dropped one by one with tracking-server drop.

        A server holds writes at most --max-hold seconds (default 10, at \
        most 60) and ends the hold by itself then, logging it, as it does at \
        once when this command goes away (killed, or its connection lost): \
        a stuck coordinator never stops an application's writes for long. A \
        hold that ends without its release drops the view frozen within it \
        and undoes the generation's end made within it. \
        One hold at a time per server: a second coordinator's hold is \
        refused, with a sentence. Other requests (status) are answered \
        meanwhile (status reports writes_held_seconds while a hold is open); a freeze or new-generation from another client waits for \
        the release.

        All or nothing: when a device fails to hold or to act, the others \
        undo what they made within their holds (the view dropped, the \
        generation's end undone: it goes on, with the blocks written since) \
        and are released, so no partial point is left; a hold that ends \
        without its release undoes what it made by itself. When a device \
        fails to release or to save its ended generation's map, the views \
        frozen on the others are dropped; generations ended then stay \
        ended, and the sentence says so. \
        The --after command runs whenever --before succeeded, even when the hold failed, \
        so that the application is never left quiesced; a --before that \
        fails ends the command with nothing held, and --after does not run. \
        The commands' standard output goes to standard error. The exit \
        status is 0 only when the point was made on every device (and \
        --after, if given, exited 0).

        The report gives the hold time, from the first hold asked to the \
        last release answered, and per device what was made and how long \
        its server held writes. With --json, one object: `action`, \
        `hold_seconds`, `devices` (an array, in device order) of objects \
        with `control`, `changes_out` (or null), `drain_seconds` (the time \
        the server waited for the writes in flight), `held_seconds` (from \
        its hold asked to its release), `settle_seconds` (from its release \
        until the ended generation's map was saved; 0 without one), and the fields of the action's \
        answer: for freeze `view`, `frozen`, `preserved_blocks`, \
        `store_bytes`, `store_limit`, `view_lost`; with a generation ended \
        (new-generation, or freeze with --changes-out) `ended_generation`, \
        `ended_generation_started`, `ended_changed_blocks`, `generation`, \
        `generation_started`.

          tracking-server group freeze --socket /run/data.sock --socket /run/wal.sock \\
              --changes-out data-g1.map --changes-out wal-g1.map --json
        """)

    @Argument(help: ArgumentHelp("freeze or new-generation.", valueName: "action"))
    var action: String

    @Option(
      name: .customLong("control"),
      help: ArgumentHelp("A device's control socket; repeatable, one per device.", valueName: "path"))
    var controls: [String] = []

    @Option(
      name: .customLong("socket"),
      help: ArgumentHelp(
        "A device's NBD socket (its control socket is PATH.control); repeatable, after the --control devices.",
        valueName: "path"))
    var sockets: [String] = []

    @Option(
      name: .customLong("changes-out"),
      help: ArgumentHelp(
        "Save a device's ending generation's change map here; once per device, in device order (new-generation: required).",
        valueName: "file"))
    var changesOut: [String] = []

    @Option(
      help: ArgumentHelp(
        "Run this (with /bin/sh -c) before holding writes; a non-zero exit ends the command with nothing held.",
        valueName: "command"))
    var before: String?

    @Option(
      help: ArgumentHelp(
        "Run this (with /bin/sh -c) after the release, whenever --before succeeded.", valueName: "command"))
    var after: String?

    @Option(
      help: ArgumentHelp(
        "Seconds each server may hold writes before it releases them by itself (above 0, at most 60).",
        valueName: "seconds"))
    var maxHold: Double = TrackingService.defaultHoldLimit

    @Flag(help: "Print the result as one JSON object on standard output.")
    var json = false

    var devices: [String] { controls + sockets.map { $0 + ".control" } }

    func validate() throws {
      guard GroupAction(rawValue: action) != nil else {
        throw ValidationError("'\(action)' is not a group action: give freeze or new-generation")
      }
      let d = devices
      if d.isEmpty { throw ValidationError("give the devices of the group with --control PATH or --socket PATH") }
      if Set(d.map(absolute)).count != d.count { throw ValidationError("a device is named twice in the group") }
      if action == GroupAction.newGeneration.rawValue && changesOut.isEmpty {
        throw ValidationError("new-generation needs --changes-out FILE for each of the \(d.count) device(s)")
      }
      if !changesOut.isEmpty && changesOut.count != d.count {
        throw ValidationError(
          "--changes-out is given \(changesOut.count) time(s) for \(d.count) device(s); give it once per device, in device order"
        )
      }
      if Set(changesOut.map(absolute)).count != changesOut.count {
        throw ValidationError("--changes-out names the same file twice")
      }
      if !(maxHold > 0 && maxHold <= TrackingService.maximumHoldLimit) {
        throw ValidationError(
          "--max-hold \(maxHold) is out of range (above 0, at most \(Int(TrackingService.maximumHoldLimit)) seconds)")
      }
    }

    func run() throws {
      guard let groupAction = GroupAction(rawValue: action) else { throw ExitCode(2) }
      let d = devices
      let members = d.indices.map { i in
        GroupMember(control: d[i], changesOut: changesOut.isEmpty ? nil : absolute(changesOut[i]))
      }
      try ConsistencyGroup.probe(members)
      if let before {
        let status = try runShell(before)
        if status != 0 {
          throw ToolkitError("the --before command exited with status \(status); nothing was held, --after was not run")
        }
      }
      var point: GroupPoint?
      var failure: Error?
      do {
        point = try ConsistencyGroup.take(members, action: groupAction, maxHold: maxHold)
      } catch {
        failure = error
      }
      var afterStatus: Int32 = 0
      if let after { afterStatus = try runShell(after) }
      if let failure {
        guard afterStatus == 0 else {
          throw ToolkitError(
            "\((failure as? ToolkitError)?.message ?? "\(failure)"); and the --after command exited with status \(afterStatus)"
          )
        }
        throw failure
      }
      guard let point else { throw ExitCode(1) }
      try report(point)
      if afterStatus != 0 {
        throw ToolkitError(
          "the point was made on every device, but the --after command exited with status \(afterStatus)")
      }
    }

    func report(_ point: GroupPoint) throws {
      let out = TextOutput()
      if json {
        var o = JSONObject()
        o.add("action", point.action.rawValue)
        o.add("hold_seconds", number: formatFixed(point.holdSeconds, digits: 6))
        o.add(
          "devices",
          array: point.devices.map { dev in
            var e = JSONObject()
            e.add("control", dev.member.control)
            e.add("changes_out", dev.member.changesOut)
            e.add("drain_seconds", number: formatFixed(dev.drainSeconds, digits: 6))
            e.add("held_seconds", number: formatFixed(dev.heldSeconds, digits: 6))
            e.add("settle_seconds", number: formatFixed(dev.settleSeconds, digits: 6))
            for (k, v) in dev.fields {
              if let n = UInt64(v) {
                e.add(k, n)
              } else if v == "true" || v == "false" {
                e.add(k, v == "true")
              } else {
                e.add(k, v)
              }
            }
            return e.render()
          })
        try out.line(o.render())
      } else {
        try out.line(
          "\(point.action.rawValue) of \(point.devices.count) device(s) at one instant: writes held "
            + "\(milliseconds(point.holdSeconds)) (the first hold asked to the last release answered)")
        for dev in point.devices {
          let f = Dictionary(dev.fields, uniquingKeysWith: { $1 })
          var s = "\(dev.member.control): "
          if let view = f["view"] { s += "view \(view) frozen at \(f["frozen"] ?? "?")" }
          if let ended = f["ended_generation"] {
            s +=
              (f["view"] == nil ? "" : "; ")
              + "generation \(ended) ended with \(f["ended_changed_blocks"] ?? "?") changed block(s) in "
              + "\(dev.member.changesOut ?? "?"), generation \(f["generation"] ?? "?") began at \(f["generation_started"] ?? "?")"
          }
          s += "; held \(milliseconds(dev.heldSeconds))"
          if f["ended_generation"] != nil { s += ", map saved \(milliseconds(dev.settleSeconds)) after the release" }
          try out.line(s)
        }
      }
      try out.flush()
    }

    func milliseconds(_ seconds: Double) -> String { formatFixed(seconds * 1000, digits: 3) + " ms" }
  }
}

/// Runs `command` with /bin/sh -c, its standard output sent to standard
/// error (a --json output stays one object); returns its exit status.
func runShell(_ command: String) throws -> Int32 {
  var actions = posix_spawn_file_actions_t()
  posix_spawn_file_actions_init(&actions)
  defer { posix_spawn_file_actions_destroy(&actions) }
  posix_spawn_file_actions_adddup2(&actions, 2, 1)
  let words: [String] = ["/bin/sh", "-c", command]
  let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) }
  defer { for a in argv { free(a) } }
  var pid = pid_t()
  let rc = posix_spawn(&pid, "/bin/sh", &actions, nil, argv + [nil], environ)
  guard rc == 0 else { throw ToolkitError("cannot run /bin/sh for '\(command)': \(String(cString: strerror(rc)))") }
  var status: Int32 = 0
  while waitpid(pid, &status, 0) < 0 {
    guard errno == EINTR else {
      throw ToolkitError("waiting for '\(command)' failed: \(String(cString: strerror(errno)))")
    }
  }
  // WIFEXITED / WEXITSTATUS, and 128 + the signal for a command killed.
  if status & 0x7f == 0 { return (status >> 8) & 0xff }
  return 128 + (status & 0x7f)
}
