import ArgumentParser
import DualRestore
import Glibc
import ToolSupport

@main
struct SnapshotServer: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "snapshot-server",
    abstract: "Serve a chain of stored block streams as a read-only device over NBD.",
    discussion: """
      Backups at rest, restored on line. A full stream made by snapshot and \
      the incremental streams that follow it (snapshot --map MAP --base ID), \
      kept as files or as objects, are served as one read-only NBD export: \
      the device as it was at the end of the chain. A block reads from the \
      newest stream that holds it; only the records a request needs are \
      read, through each stream's index (dualrestore-index(5)), which is \
      built in one pass over the stream the first time and kept. \
      restore-read-through --read-only-backup MAP restores from such an \
      export while the restored disk is in use.

        snapshot-server index full.stream inc1.stream inc2.stream
        snapshot-server serve --socket chain.sock full.stream inc1.stream inc2.stream &
        restore-read-through --backup 'nbd+unix:///chain?socket=chain.sock' \\
            --read-only-backup lacks.map --map restore.map --socket disk.sock new-disk.img

      A stream may be a file, or an NBD URI of an export that serves the \
      stream's bytes: an object in an HTTP server or S3 bucket is read with \
      range requests through nbdkit's curl plugin \
      (nbdkit -U SOCK curl url=URL), one such export per stream.
      """,
    subcommands: [Serve.self, Index.self, Compact.self, Retain.self])

  static func main() { ToolMain.run(Self.self) }
}

/// The streams of a chain and where their indexes are kept.
struct StreamOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Keep the indexes in this directory: any *.dridx file there is used for the stream it names; new ones are "
        + "written as STREAM-ID.dridx (default: beside each stream file, as STREAM.dridx; a stream read through NBD "
        + "then has its index built at each start).",
      valueName: "dir"), completion: .directory)
  var indexDir: String?

  @OptionGroup var key: KeyOptions

  @Argument(
    help: ArgumentHelp(
      "The streams, oldest first: a full stream and the incrementals that follow it; files or NBD URIs.",
      valueName: "stream"), completion: .file())
  var streams: [String] = []

  func validate() throws {
    if streams.isEmpty { throw ValidationError("give the streams to serve, oldest first") }
  }

  /// Where the index of the stream at `location` with `header` is kept:
  /// in --index-dir, the file that names the stream (`found`), else
  /// STREAM-ID.dridx there; without it, beside a stream file.
  func indexPath(_ location: String, _ header: StreamFormat.Header, _ found: [ID128: String]) -> String? {
    if let indexDir { return found[header.streamID] ?? indexDir + "/" + header.streamID.description + ".dridx" }
    return NBDURI.isURI(location) ? nil : location + ".dridx"
  }

  /// The *.dridx files of --index-dir, by the stream id their header names
  /// (an index fetched from beside its stream keeps the stream's name).
  func indexesInDirectory() throws -> [ID128: String] {
    guard let indexDir else { return [:] }
    guard let dir = opendir(indexDir) else {
      throw ToolkitError("--index-dir \(indexDir): \(Errno.current)")
    }
    defer { closedir(dir) }
    var found: [ID128: String] = [:]
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      guard name.hasSuffix(".dridx") else { continue }
      let path = indexDir + "/" + name
      guard let head = peekFile(path, count: StreamIndexFormat.headerLength),
        head.count == StreamIndexFormat.headerLength, Array(head[0..<8]) == StreamIndexFormat.magic
      else { continue }
      let id = ID128(bytes: head[16..<32])
      // Two files for one stream: the one named after its id wins.
      if found[id] == nil || name == id.description + ".dridx" { found[id] = path }
    }
    return found
  }

  /// The streams' heads (HEADER, LINEAGE), read first: a chain is checked
  /// before any index is built.
  func heads() throws -> [(source: BlockDevice, head: StoredStream.Head)] {
    let secret = try key.load()
    return try streams.map { location in
      let source = try openSource(location)
      return (source, try StoredStream.readHead(source, name: location, secret: secret))
    }
  }

  /// Opens every stream with its index, saying in the log what was done;
  /// with `chain`, the streams must form one, which is checked first.
  func open(chain: Bool, log: @escaping @Sendable (String) -> Void) throws -> [StoredStream] {
    if let indexDir {
      var st = stat()
      guard stat(indexDir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
        throw ToolkitError("--index-dir \(indexDir) is not a directory")
      }
    }
    let found = try indexesInDirectory()
    let secret = try key.load()
    let heads = try heads()
    if chain {
      try StreamChain.checkOrder(
        zip(streams, heads).map { location, h in (location, h.head.header, h.head.standsFor) })
    }
    return try zip(streams, heads).map { location, h in
      let started = monotonicSeconds()
      let stream = try StoredStream(
        source: h.source, name: location, head: h.head, secret: secret,
        indexPath: indexPath(location, h.head.header, found), log: log)
      switch stream.indexOrigin {
      case .loaded: break
      case .built(let kept, let why):
        let seconds = formatFixed(monotonicSeconds() - started, digits: 2)
        // --index-dir is the cure only when it was not given.
        let held = indexDir == nil ? ", held in memory (give --index-dir to keep it)" : ", held in memory"
        let whereKept = kept.map { ", kept in \($0)" } ?? held
        let records = stream.index.entries.count
        let size = formatBytes(h.source.size)
        log("\(location): \(why); indexed \(records) record(s) of \(size) in \(seconds) s\(whereKept)")
      }
      return stream
    }
  }

}

extension SnapshotServer {
  struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Export a chain of stored streams over NBD, read-only.",
      usage: "snapshot-server serve (--socket PATH | --listen HOST:PORT) [options] STREAM...",
      discussion: """
        The streams (oldest first: a full stream, then incrementals, each on \
        top of the one before it; base ids are checked, and a stream missing \
        from the chain or out of order is refused) are exported as `chain`, \
        the default export, read-only, with multi-conn: the device as it was \
        when the newest stream was read. Encrypted streams are opened with \
        --key-file or --passphrase-file, record by record. BLOCK_STATUS \
        reports zero runs (and blocks no stream holds) as holes that read as \
        zeros.

        Every record read is checked (its CRC, the tag of an encrypted \
        stream, its block number) before anything in it is used. A damaged \
        record makes the reads of its own blocks fail with EIO, and the log \
        says why once, naming the stream and the record; the rest of the device reads \
        on.

        With --tls on or require the export is offered over TLS with the \
        certificates of --tls-certificates DIR, as tracking-server's are; \
        the limits on clients are the same too. SIGINT or SIGTERM stops the \
        server once the requests in flight are answered.
        """)

    @OptionGroup var serving: ListenOptions
    @OptionGroup var tls: TLSOptions
    @OptionGroup var limits: ServerLimitOptions
    @OptionGroup var streams: StreamOptions

    func run() throws {
      let signals = StopSignals()
      let log: @Sendable (String) -> Void = { printError("snapshot-server: \($0)") }
      let serverTLS = try tls.serverTLS()
      let chain = try StreamChain(try streams.open(chain: true, log: log), log: log)
      let listener = try serving.listener()
      let server = NBDServer(
        exports: [ChainExport(device: chain.device())], options: limits.serverOptions(tls: serverTLS), log: log)
      signals.onSignal { received in
        log("stopping on signal \(received)")
        server.beginStop(listener)
      }
      let newest = chain.streams[chain.streams.count - 1].header
      log(
        "serving \(chain.streams.count) stream(s) ending with \(chain.name) (stream \(newest.streamID), read at "
          + "\(newest.started)) as a read-only device of \(formatBytes(chain.geometry.deviceSize)) on \(listener.name)"
          + (tls.tls == .off ? "" : " (TLS \(tls.tls.rawValue))"))
      server.serve(listener)
      server.stop()
      log("stopped cleanly")
    }
  }

  struct Index: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Build or check the indexes of stored streams.",
      discussion: """
        Each stream's index (dualrestore-index(5)) is loaded when it is \
        there and matches the stream (its id, length and END record), and \
        built otherwise, in one pass over the stream in which every record \
        is verified, then kept. Make the indexes where the streams are made \
        and keep them beside them (as objects, too), so that a server far \
        away reads a few bytes per record instead of the whole chain.
        """)

    @OptionGroup var streams: StreamOptions
    @Flag(help: "Print one JSON object per stream on standard output.")
    var json = false

    func run() throws {
      let log: @Sendable (String) -> Void = { printError("snapshot-server: \($0)") }
      let opened = try streams.open(chain: false, log: log)
      let out = TextOutput()
      for s in opened {
        let id = s.identity
        let kept: String?
        let built: Bool
        switch s.indexOrigin {
        case .loaded(let path): (kept, built) = (path, false)
        case .built(let path, _): (kept, built) = (path, true)
        }
        if json {
          var o = JSONObject()
          o.add("stream", s.name)
          o.add("stream_id", id.streamID.description)
          o.add("base_stream_id", id.baseStreamID.isNone ? nil : id.baseStreamID.description)
          o.add("started", s.header.started.description)
          o.add("encrypted", s.isEncrypted)
          o.add("bytes", s.source.size)
          o.add("records", UInt64(s.index.entries.count))
          o.add("data_blocks", s.index.dataBlocks)
          o.add("zero_blocks", s.index.zeroBlocks)
          o.add("index", kept)
          o.add("built", built)
          try out.line(o.render())
        } else {
          try out.line(
            "\(s.name): stream \(id.streamID)"
              + (id.baseStreamID.isNone ? " (full)" : " on \(id.baseStreamID)")
              + ", \(s.index.dataBlocks) data and \(s.index.zeroBlocks) zero block(s); index "
              + (kept.map { "\(built ? "built in" : "checked in") \($0)" } ?? "built, not kept"))
        }
      }
      try out.flush()
      // An index that should have been kept and was not: the command failed at its job.
      let unkept = opened.filter { s in
        if case .built(nil, _) = s.indexOrigin { return streams.indexDir != nil || !NBDURI.isURI(s.name) }
        return false
      }
      if !unkept.isEmpty {
        throw ToolkitError("\(unkept.count) index(es) could not be kept (the log says why): \(unkept[0].name)")
      }
    }
  }

  struct Compact: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Write a chain of stored streams out as one full stream.",
      usage: "snapshot-server compact -o FILE [options] STREAM...",
      discussion: """
        The streams (a chain, checked as serve checks it: oldest first, a \
        full stream and the incrementals that follow it, or the oldest part \
        of a longer chain) are written out as one new full stream equal to \
        the device at the last stream's end, with that stream's instant. \
        Each block's newest record is copied as stored (LZ4 or raw), not \
        decoded and compressed again; every record copied is checked first \
        (CRC, tag, block number), and a record that fails stops the \
        compaction with a sentence naming it: the output is written to a \
        temporary file and renamed into place only when complete and \
        durable. A chain read with --key-file or --passphrase-file is \
        written encrypted with the same key, under a fresh salt.

        Deleting the streams a compacted stream makes unnecessary is the \
        operator's: rm, or aws s3 rm for objects.
        """)

    @Option(name: .shortAndLong, help: ArgumentHelp("Write the new full stream to this file.", valueName: "file"))
    var output: String
    @OptionGroup var reporting: ProgressOptions
    @Flag(help: "Print the summary as one JSON object on standard output.")
    var json = false
    @OptionGroup var streams: StreamOptions

    func run() throws {
      let log: @Sendable (String) -> Void = { printError("snapshot-server: \($0)") }
      let chain = try StreamChain(try streams.open(chain: true, log: log), log: log)
      for s in chain.streams where samePath(s.name, output) {
        throw ToolkitError("the output \(output) is one of the streams of the chain")
      }
      let secret = try streams.key.load()
      let sink = try OutputSink(.file(output), what: "stream")
      let names = chain.streams.map { $0.name }
      let s = try chain.compact(
        to: sink, encryption: secret, sourceName: "compacted from " + names.joined(separator: " "),
        progress: reporting.show)
      try sink.finish()
      let speed = s.seconds > 0 ? UInt64(Double(s.bytesRead) / s.seconds) : 0
      if json {
        var o = JSONObject()
        o.add("stream_id", s.header.streamID.description)
        o.add("output", output)
        o.add("streams", UInt64(chain.streams.count))
        o.add("data_blocks", s.dataBlocks)
        o.add("zero_blocks", s.zeroBlocks)
        o.add("bytes_read", s.bytesRead)
        o.add("bytes_out", s.bytesOut)
        o.add("seconds", number: formatFixed(s.seconds, digits: 3))
        o.add("encrypted", secret != nil)
        let out = TextOutput()
        try out.line(o.render())
        try out.flush()
      }
      printError(
        "snapshot-server: compacted \(chain.streams.count) stream(s) into \(output) (stream \(s.header.streamID), "
          + "\(s.dataBlocks) data and \(s.zeroBlocks) zero block(s), \(formatBytes(s.bytesOut)); "
          + "\(formatBytes(s.bytesRead)) of records read at \(formatBytes(speed))/s)")
    }
  }

  struct Retain: ParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "List the stored streams a retention rule no longer needs.",
      usage: "snapshot-server retain (--keep-last N | --keep-daily D) [options] STREAM...",
      discussion: """
        STREAM... are all the streams of a store, in any order: full \
        streams, incrementals and compacted streams. A point is the state \
        of the device after a stream; it is kept when it is one of the last \
        --keep-last N points, or the newest point of one of the last \
        --keep-daily D days (UTC, counted back from today); the newest point \
        is always kept. Each kept point needs the shortest chain of streams \
        that rebuilds it (a compacted stream, made by compact, stands for the \
        chain it replaced). The streams no kept point needs are listed as \
        deletable, each with the reason; deleting them is the operator's \
        (rm, or aws s3 rm for objects). Only the streams' first bytes are \
        read (the HEADER and LINEAGE records); encrypted streams need the key.

        A stream whose base is not in the store, or whose description does \
        not hold together, is reported and is in neither list, and the \
        command exits 1.
        """)

    @Option(help: ArgumentHelp("Keep the last N points.", valueName: "n"))
    var keepLast: Int?
    @Option(help: ArgumentHelp("Keep the newest point of each of the last D days (UTC).", valueName: "days"))
    var keepDaily: Int?
    @Flag(help: "Print the plan as one JSON object on standard output.")
    var json = false
    @OptionGroup var key: KeyOptions
    @Argument(help: ArgumentHelp("Every stream of the store, in any order: files or NBD URIs.", valueName: "stream"))
    var streams: [String] = []

    func validate() throws {
      if keepLast == nil && keepDaily == nil { throw ValidationError("give --keep-last N or --keep-daily D") }
      if let keepLast, keepLast < 1 || keepLast > 1_000_000 {
        throw ValidationError("--keep-last \(keepLast) is out of range (1 to 1000000)")
      }
      if let keepDaily, keepDaily < 1 || keepDaily > 100_000 {
        throw ValidationError("--keep-daily \(keepDaily) is out of range (1 to 100000)")
      }
      if streams.isEmpty { throw ValidationError("give the streams of the store") }
    }

    func run() throws {
      let secret = try key.load()
      let described = try streams.map { location -> ChainRetention.Stream in
        let head = try StoredStream.readHead(try openSource(location), name: location, secret: secret)
        return ChainRetention.Stream(
          name: location, id: head.header.streamID, base: head.header.baseStreamID, lineage: head.lineage,
          started: head.header.started)
      }
      let plan = ChainRetention.plan(
        described, rule: ChainRetention.Rule(keepLast: keepLast ?? 0, keepDaily: keepDaily ?? 0))
      let out = TextOutput()
      if json {
        var o = JSONObject()
        o.add(
          "kept_points",
          array: plan.kept.map { p in
            var k = JSONObject()
            k.add("stream_id", p.id.description)
            k.add("started", p.started.description)
            k.add("chain", array: p.chain.map { JSONObject.quote($0.name) })
            return k.render()
          })
        o.add("needed", array: plan.needed.map { JSONObject.quote($0.name) })
        o.add(
          "deletable",
          array: plan.deletable.map { d in
            var k = JSONObject()
            k.add("stream", d.stream.name)
            k.add("stream_id", d.stream.id.description)
            k.add("reason", d.reason.description)
            return k.render()
          })
        o.add("errors", array: plan.errors.map { JSONObject.quote($0) })
        try out.line(o.render())
      } else {
        for p in plan.kept {
          try out.line("keep point \(p.id) of \(p.started): \(p.chain.map { $0.name }.joined(separator: " "))")
        }
        for d in plan.deletable { try out.line("deletable \(d.stream.name): \(d.reason)") }
      }
      try out.flush()
      for e in plan.errors { printError("snapshot-server: \(e)") }
      if !plan.errors.isEmpty { throw ExitCode(1) }
    }
  }
}
