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
    subcommands: [Serve.self, Index.self])

  static func main() { ToolMain.run(Self.self) }
}

/// The streams of a chain and where their indexes are kept.
struct StreamOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "Keep the indexes in this directory, as STREAM-ID.dridx (default: beside each stream file, as STREAM.dridx; "
        + "a stream read through NBD then has its index built at each start).",
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

  /// Where the index of the stream at `location` with `header` is kept.
  func indexPath(_ location: String, _ header: StreamFormat.Header) -> String? {
    if let indexDir { return indexDir + "/" + header.streamID.description + ".dridx" }
    return NBDURI.isURI(location) ? nil : location + ".dridx"
  }

  /// Opens every stream with its index, saying in the log what was done.
  func open(log: @escaping @Sendable (String) -> Void) throws -> [StoredStream] {
    if let indexDir {
      var st = stat()
      guard stat(indexDir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
        throw ToolkitError("--index-dir \(indexDir) is not a directory")
      }
    }
    let secret = try key.load()
    return try streams.map { location in
      let source = try openSource(location)
      let started = monotonicSeconds()
      let stream = try StoredStream(
        source: source, name: location, secret: secret, indexPath: { indexPath(location, $0) }, log: log)
      switch stream.indexOrigin {
      case .loaded: break
      case .built(let kept, let why):
        let seconds = formatFixed(monotonicSeconds() - started, digits: 2)
        // --index-dir is the cure only when it was not given.
        let held = indexDir == nil ? ", held in memory (give --index-dir to keep it)" : ", held in memory"
        let whereKept = kept.map { ", kept in \($0)" } ?? held
        let records = stream.index.entries.count
        log("\(location): \(why); indexed \(records) record(s) of \(formatBytes(source.size)) in \(seconds) s\(whereKept)")
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
        names the stream and the record once; the rest of the device reads \
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
      let chain = try StreamChain(try streams.open(log: log), log: log)
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
      let opened = try streams.open(log: log)
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
    }
  }
}
