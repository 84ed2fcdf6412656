import ArgumentParser
import DualRestore
import Glibc
import ToolSupport

@main
struct RestoreReadThrough: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "restore-read-through",
    abstract: "Serve a primary disk over NBD while it is restored from its backup.",
    usage: """
      restore-read-through --backup URI --map MAP (--socket PATH | --listen HOST:PORT) PRIMARY
      restore-read-through --backup URI --read-only-backup CHANGES --map MAP (--socket PATH | --listen HOST:PORT) PRIMARY
      restore-read-through --backup URI --backup-signature SIG --reuse OLD --map MAP (--socket PATH | --listen HOST:PORT) PRIMARY
      """,
    discussion: """
      Channel 1 of the dual-channel restore. PRIMARY (an image file or block \
      device, usually empty) is exported over NBD with the size of the \
      backup. A read of a block that MAP marks current is served from \
      PRIMARY; any other block is fetched from the backup, written to \
      PRIMARY and marked current. A write goes to PRIMARY and to the backup \
      and is marked current; a write covering part of a block that is not \
      current first brings that block from the backup. TRIM and WRITE_ZEROES \
      leave zeros on both sides. An acknowledged FLUSH (or FUA write) means \
      the data is durable on PRIMARY and on the backup, and MAP records it.

      The backup is any NBD server: nbd://HOST[:PORT]/EXPORT or \
      nbd+unix:///EXPORT?socket=PATH, or over TLS nbds://HOST[:PORT]/EXPORT \
      or nbds+unix:///EXPORT?socket=PATH, whose certificate is checked \
      against the system's CAs or, with ?tls-certificates=DIR, against \
      DIR/ca-cert.pem (DIR/client-cert.pem and client-key.pem, when present, \
      are shown to the backup). MAP is created when missing; a fresh \
      map from overwrite-map create is bound to PRIMARY on first use; a map \
      of another device is refused. Beside MAP, MAP.al is the activity log: \
      after an unclean shutdown (kill -9, power loss) the current blocks of \
      the regions it names are copied from PRIMARY to the backup before \
      serving, so the two agree again.

      The server also exports `merge`: merge-snapshot -i STREAM \
      nbd+unix:///merge?socket=PATH lands a shipped snapshot of the backup \
      where MAP says not current, under the same per-block locks as client \
      I/O, and marks those blocks current; they are not sent back to the \
      backup. With --hydrate the remaining blocks are copied in the \
      background, 16 runs of up to 1 MiB at a time, yielding to client I/O \
      (and, with --hydrate-rate, paced); where the backup reports \
      base:allocation (block status), runs it says read as zeros are zeroed \
      on PRIMARY (a hole in an image file) instead of copied. With \
      --hydrate-rate RATE, hydration reads at most T times RATE bytes from the \
      backup in any T seconds, plus a burst of one second's worth (or of one \
      run, 1 MiB, when that is more): the time it spends yielding to \
      clients is not made up later at the link's speed. When every block is \
      current the map is committed, and then the log says the restore is \
      complete.

      Up to 32 requests of each client connection are served at once, so \
      that reads waiting for the backup overlap; the backup is read over \
      --backup-connections connections.

      When the backup cannot be reached, blocks already current are still \
      served; a read of a block that is not fails with EIO after \
      --backup-timeout, never with zeros; writes are kept on PRIMARY and the \
      blocks are owed to the backup (their regions stay in the durable \
      activity log) and sent, in order with later writes, when it answers \
      again. Meanwhile a FLUSH makes data durable on PRIMARY only: the \
      backup's recovery point lags by the owed blocks, which the log says.

      With --ack local the far link is out of every write's path: a \
      WRITE, WRITE_ZEROES or TRIM is appended to the mirror journal \
      (MAP.mirror, or --journal PATH; dualrestore-journal(5)), made on \
      PRIMARY and acknowledged; a FLUSH or FUA write is acknowledged once \
      the journal and PRIMARY are durable. The backup is brought up to date \
      in the background, interval by interval (an interval ends at each \
      client FLUSH): an interval's writes are coalesced (each byte sent once), \
      sent over the backup's connections at once, the backup is flushed, and \
      only then does the next interval start, so the backup always holds \
      what a disk may hold after a power cut. A write into part of a block \
      that is not current lands on PRIMARY at once; the rest of the block is \
      fetched in the background, and a read of it in between waits for that. \
      --backup may be repeated (up to 16 far copies): the first is the \
      backup reads come from; every copy gets every write. With --ack all \
      each write and flush goes to all of them at once and waits for the \
      slowest; with --ack local each copy has its own position in the \
      journal, which keeps an interval until every copy holds it, and a copy \
      that cannot be reached does not hold the others back (it resumes from \
      its position when it answers again); only the first must answer when \
      the server starts (with --ack all, every copy must). With --ack quorum=K a FLUSH also waits until K far \
      copies hold it (at most 30 s; then the FLUSH fails). When \
      the backup owes more than --max-lag (bytes of journal, default 1G, or \
      seconds since the oldest change it lacks, 30s), writes wait until it \
      catches up, and the log says so. The progress line gives, per far \
      copy, the interval it holds, the intervals and bytes it lacks, and the \
      age of the oldest change it lacks (its recovery point). A stop leaves \
      what the backup lacks in the journal; the next start sends it first. \
      After an unclean shutdown the journal's complete intervals are kept, \
      its torn tail is cut, and the regions of the activity log are \
      journaled again from PRIMARY; a damaged journal is refused.

      With --read-only-backup CHANGES the backup takes no writes: a chain \
      of stored snapshots served read-only, or any export opened read-only \
      (nbdkit -r, qemu-nbd -r). Blocks not current are still read from it, \
      but a WRITE, WRITE_ZEROES or TRIM stays on PRIMARY, and every block it \
      touches is first set in CHANGES, a change map (dualrestore-map(5), the \
      kind tracking-server --changes keeps) created when missing and \
      continued when present: the mark is durable before the write is \
      made, let alone acknowledged (CHANGES.journal holds the marks between \
      saves of CHANGES, which come every few seconds and at the stop; a \
      start after a crash replays it). A write into part of \
      a block not current still brings the rest of the block from the \
      backup first, and a written block is current in MAP, as with a \
      writable backup. The backup is never written nor flushed, even when it \
      would take writes (the log says so); a FLUSH or FUA write makes \
      PRIMARY and MAP durable. Then snapshot --map CHANGES --base ID of the \
      export (ID: the last stream of the backup's chain; or of PRIMARY \
      itself once every block is current) makes the incremental stream \
      that brings the backup up to date. The option \
      takes one --backup and --ack all: with the backup out of the write \
      path there is no far copy to mirror to. The current blocks of the \
      regions a run with a writable backup left in the activity log (an \
      unclean stop, blocks owed) are recorded in CHANGES; a mirror journal \
      still holding changes the backup lacks is refused. Without the \
      option, a backup exported read-only is refused at the start.

      With --reuse OLD and --backup-signature SIG, what an older copy at \
      this site already holds (last month's image, a clone of the same \
      template) is copied from it instead of fetched over the link. SIG is \
      the backup's signature (bitmap-diff --signature), a file or - for \
      standard input, as in ssh backup bitmap-diff --signature \
      /dev/vg/backup | restore-read-through --backup-signature - --reuse \
      /dev/vg/old ...; its block size and device size must be those of MAP \
      and the backup. OLD (repeatable: image files, block devices or NBD \
      exports, opened read-only, of any size) is hashed in the background, \
      and SIG is read in the background: serving waits for neither. Once \
      SIG is read whole and its checksum has matched, a block not current \
      (a client's read, read-ahead, a partial write's rest, hydration) is \
      taken from OLD when the digest of the bytes read there begins with \
      the 128 bits SIG gives for it: first OLD's block at the same offset; \
      once OLD is hashed, wherever OLD holds that content (blocks moved or \
      copied, a region shifted), and its block at the same offset only if \
      it holds it there. The bytes checked are the bytes written to \
      PRIMARY, which is then marked current as for a fetched block (the \
      data durable before the map says so); any other block is fetched. A \
      block whose digest in SIG is the digest of zeros is zeroed on \
      PRIMARY, neither read nor fetched. A damaged OLD costs a fetch, never \
      a wrong block; the log counts such reads. Until SIG is read whole, \
      every block is fetched; a SIG found damaged or cut off is left \
      unused, and so is an OLD that fails a read. With --hydrate, \
      hydration starts once SIG is read and every OLD hashed (or given \
      up): that takes local reads only, and spares the link the blocks OLD \
      holds elsewhere.

      SIG must describe the backup as restore-read-through reads it: for \
      as long as the restore runs, every block MAP does not mark current \
      must hold, on the backup, the content SIG gives it. So sign a backup \
      nothing else writes meanwhile (a frozen view of tracking-server, a \
      snapshot-server chain, a backup restored with --read-only-backup), \
      and sign it after any earlier run of restore-read-through on MAP has \
      stopped. The writes restore-read-through itself sends to the backup \
      are accounted for (their blocks are current, or, where PRIMARY \
      failed to take one, no longer reused), but a block whose content \
      changed after signing by any other way would be taken from OLD with \
      the old content, and nothing would tell.

      Memory: 16 bytes and two bits per block of the backup (256 MiB a \
      TiB in blocks of 64 KiB), whatever OLD holds; the check is the first \
      128 bits of each block's digest (of SHA-256 by default), which \
      different contents share by chance with a probability of 2^-128 a \
      comparison, and on purpose only after some 2^64 digests by someone \
      who writes both the backup and OLD. Once an OLD is hashed, its index \
      takes 16 bytes per block of it that is not zeros; its signature is \
      written to MAP.reuse-N.sig while it is made and removed once read. \
      The progress and stop lines count the blocks taken from older copies \
      at the same place, elsewhere and as zeros, with the bytes not \
      fetched.

      With --tls on or --tls require the server offers NBD over TLS \
      (NBD_OPT_STARTTLS), TLS 1.2 or 1.3, with DIR/server-cert.pem and \
      DIR/server-key.pem from --tls-certificates DIR, laid out as for nbdkit \
      and qemu. require refuses every client that does not start TLS first; \
      --tls-verify-peer accepts only clients whose certificate DIR/ca-cert.pem \
      signed. A private key readable by every user is refused.

      The socket of --socket is created with mode 0600 (chmod it to let a \
      group in). An existing socket is replaced only when nobody listens on \
      it: a running server's socket is refused, as is a path that is not a \
      socket. Clients beyond --max-connections are disconnected as they \
      arrive; a client that does not finish the handshake within \
      --handshake-timeout, pauses inside a request for --stall-timeout, or \
      (when given) stays silent for --idle-timeout is disconnected. Requests \
      larger than 64 MiB are refused, and the buffers of all clients stay \
      under 512 MiB.

      Every --progress-interval seconds the log gives the blocks current, \
      the bytes fetched from the backup in all, and those fetched since the \
      line before, with the seconds that covers and their rate.

      SIGINT or SIGTERM stops the server cleanly: requests in flight are \
      answered, hydration's reads in flight too, everything is flushed, the \
      activity log emptied, and each connection to the backup ended with \
      NBD_CMD_DISC.
      """)

  @Option(
    help: ArgumentHelp(
      "The backup: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds, nbds+unix: over TLS); "
        + "repeat it for more far copies, which get every write too (the first is read from).",
      valueName: "uri"))
  var backup: [String]

  @Option(help: ArgumentHelp("The overwrite map of PRIMARY (created when missing).", valueName: "map"))
  var map: String

  @Option(
    help: ArgumentHelp(
      "The backup takes no writes: keep them on PRIMARY and record the blocks they touch in this change map "
        + "(created when missing, continued when present), for snapshot --map CHANGES --base ID.",
      valueName: "changes"))
  var readOnlyBackup: String?

  @Option(
    help: ArgumentHelp(
      "An older copy of the disk at this site (image file, block device or NBD export, read only): a block it "
        + "holds, checked against the digest --backup-signature gives, is copied from it instead of fetched "
        + "(repeatable).",
      valueName: "old"))
  var reuse: [String] = []

  @Option(
    help: ArgumentHelp(
      "The backup's signature (bitmap-diff --signature), a file or - for standard input: the digests a block "
        + "from --reuse must have. It must describe the backup as it is read during the restore.",
      valueName: "sig"))
  var backupSignature: String?

  @OptionGroup var serving: ListenOptions

  @OptionGroup var blockSize: BlockSizeOption

  @OptionGroup var tls: TLSOptions

  @OptionGroup var limits: ServerLimitOptions

  @OptionGroup var mirroring: MirrorOptions

  @Flag(help: "Copy the blocks not yet current from the backup in the background.")
  var hydrate = false

  @Option(
    help: ArgumentHelp(
      "Limit the background copy to this many bytes a second, in any few seconds but for a burst of one second's "
        + "worth, or of one 1 MiB run if more (K, M, G: powers of 1024).", valueName: "bytes"))
  var hydrateRate: ByteCount?

  @Option(
    help: ArgumentHelp("Seconds a request to the backup may take before it fails with EIO.", valueName: "seconds"))
  var backupTimeout: Double = 30

  @Option(help: ArgumentHelp("Connections to the backup, used together (1 to 16).", valueName: "n"))
  var backupConnections: Int = 4

  @Option(help: ArgumentHelp("Seconds between progress lines in the log (0: none).", valueName: "seconds"))
  var progressInterval: Double = 10

  @Argument(help: ArgumentHelp("The image file or block device to restore into.", valueName: "primary"))
  var primary: String

  func validate() throws {
    if hydrateRate != nil && !hydrate { throw ValidationError("--hydrate-rate needs --hydrate") }
    if backupTimeout <= 0 || backupTimeout > 86400 {
      throw ValidationError("--backup-timeout \(backupTimeout) is out of range")
    }
    if backupConnections < 1 || backupConnections > 16 {
      throw ValidationError("--backup-connections \(backupConnections) is out of range (1 to 16)")
    }
    if progressInterval < 0 { throw ValidationError("--progress-interval must not be negative") }
    if backup.count > 16 { throw ValidationError("--backup is given \(backup.count) times; at most 16 far copies") }
    if Set(backup).count != backup.count { throw ValidationError("--backup names the same far copy twice") }
    if readOnlyBackup != nil && mirroring.ack.value != .all {
      throw ValidationError(
        "--read-only-backup keeps the writes on PRIMARY, so --ack \(mirroring.ack) has no copy to send them to")
    }
    if readOnlyBackup != nil && backup.count > 1 {
      throw ValidationError(
        "--read-only-backup reads from one backup and writes to none; --backup is given \(backup.count) times")
    }
    if !reuse.isEmpty && backupSignature == nil {
      throw ValidationError(
        "--reuse needs --backup-signature: a block is taken from an older copy only when its digest there matches the backup's"
      )
    }
    if backupSignature != nil && reuse.isEmpty {
      throw ValidationError("--backup-signature needs --reuse: it says which blocks an older copy may give")
    }
    if reuse.contains("-") { throw ValidationError("--reuse reads images at random; give a file, device or NBD URI") }
    if Set(reuse).count != reuse.count { throw ValidationError("--reuse names the same older copy twice") }
    if reuse.count > SignatureIndex.maximumImages {
      throw ValidationError(
        "--reuse is given \(reuse.count) times; at most \(SignatureIndex.maximumImages) older copies")
    }
    if let same = reuse.first(where: { samePath($0, primary) }) {
      throw ValidationError("--reuse \(same) is PRIMARY, the disk being restored; give an older copy")
    }
    if case .quorum(let k) = mirroring.ack.value, k > backup.count {
      throw ValidationError("--ack quorum=\(k) needs \(k) far copies; --backup names \(backup.count)")
    }
  }

  func run() throws {
    let signals = StopSignals()
    let log: @Sendable (String) -> Void = { printError("restore-read-through: \($0)") }
    let serverTLS = try tls.serverTLS()
    // The socket first: a second server on the same path is refused before
    // it opens the map or touches the backup.
    let listener = try serving.listener()
    // The signature's header now, so that one of another geometry is
    // refused before the map is made; its digests in the background.
    var localCopies: LocalReuse?
    if let backupSignature {
      if backupSignature == "-" && isatty(0) == 1 {
        throw ToolkitError("refusing to read a binary signature from a terminal; pipe it in or give a file")
      }
      let reader = try SignatureReader(path: backupSignature)
      let images = try reuse.map { try openSource($0, timeout: backupTimeout) }
      localCopies = try LocalReuse(signature: reader, images: images, scratchPrefix: map, log: log)
    }
    let device = try Device(path: primary, options: .readWrite)
    let settings = mirroring.settings(mapPath: map)
    // The backup must answer now (blocks not current are read from it);
    // with asynchronous mirroring the other far copies may come later.
    let first = try MultiConnectionLink(uri: backup[0], timeout: backupTimeout, count: backupConnections)
    var links: [BlockDevice] = [first]
    for uri in backup.dropFirst() {
      links.append(
        settings == nil
          ? try MultiConnectionLink(uri: uri, timeout: backupTimeout, count: backupConnections)
          : try DeferredLink(uri: uri, timeout: backupTimeout, count: backupConnections, size: first.size))
    }
    for l in links.dropFirst() where l.size != first.size {
      throw ToolkitError("the far copy \(l.name) has \(l.size) bytes but the backup \(first.name) has \(first.size)")
    }
    // Synchronous mirroring sends each write to every copy at once; the
    // asynchronous kind ships to each from the journal.
    let engine = try RestoreEngine(
      primary: device, backup: settings == nil && links.count > 1 ? FanOutDevice(links) : links[0], mapPath: map,
      blockSize: blockSize.value, mirroring: settings, farCopies: links, readOnlyBackup: readOnlyBackup,
      reuse: localCopies, log: log)
    if readOnlyBackup != nil && first.capabilities.contains(.writable) {
      log("the backup \(first.name) takes writes, but with --read-only-backup none is sent to it")
    }

    // Each client request that misses waits a round trip to the backup:
    // serving more of a client's requests at once hides that latency
    // (nbdcopy keeps 64 in flight per connection; nbdkit and qemu-nbd
    // serve 16, which suits a local disk).
    let server = NBDServer(
      exports: [RestoreExport(engine: engine), MergeExport(engine: engine)],
      workersPerConnection: 32,
      options: limits.serverOptions(tls: serverTLS), log: log)

    let (now, total) = engine.progress
    log(
      "serving \(primary) (\(formatBytes(device.size))) on \(listener.name)\(tls.tls == .off ? "" : " (TLS \(tls.tls.rawValue))"), backup \(backup.joined(separator: ", "))"
        + (readOnlyBackup.map { " (read-only: writes stay on the primary, their blocks recorded in \($0))" } ?? "")
        + (localCopies.map {
          "; reusing \(reuse.joined(separator: ", ")) where its blocks match the backup's signature \($0.signatureName) "
            + "(both read in the background)"
        } ?? "")
        + "; "
        + "\(now) of \(total) blocks current"
        + (mirroring.ack.value == .all
          ? "" : "; writes acknowledged \(mirroring.ack), the backup kept up to date from the mirror journal"))

    // Hydration, progress lines, the completion line and the checkpoints:
    // the engine's, until it closes.
    engine.start(
      RestoreSchedule(hydrate: hydrate, hydrateRate: hydrateRate?.value ?? 0, progressInterval: progressInterval))
    signals.onSignal { received in
      log("stopping on signal \(received)")
      engine.beginStop()
      server.beginStop(listener)
    }

    server.serve(listener)
    server.stop()
    do {
      let owed = try engine.close()
      let lagging = engine.mirrorLag.filter { $0.intervals > 0 }
      for lag in lagging {
        log(
          "the far copy \(lag.name) lacks \(lag.intervals) interval(s) (\(formatBytes(lag.bytes))); "
            + "they stay in the mirror journal and are sent at the next start")
      }
      if owed > 0 {
        log(
          "stopped; the map and the primary are durable, but the backup is unreachable and lacks \(owed) block(s): "
            + "they are in the activity log and will be sent at the next start")
        throw ExitCode(1)
      }
      let (now, total) = engine.progress
      let counted = engine.counters
      let state =
        if let (path, blocks) = engine.readOnlyBackupChanges {
          "the map and \(path) are durable and the backup unchanged: the \(blocks) block(s) written are in \(path); "
        } else {
          "the map and the \(lagging.isEmpty ? "backup are up to date" : "mirror journal are durable"): "
        }
      log(
        "stopped cleanly; \(state)"
          + "\(now) of \(total) blocks current, "
          + "\(counted.fetchedBlocks) fetched from the backup, \(counted.zeroedBlocks) zeroed as the backup's zeros, "
          + "\(counted.mergedBlocks) merged, "
          + "\(counted.mergeSkippedBlocks) skipped by merges as current"
          + (engine.reuseSummary.map { "; \($0)" } ?? ""))
    } catch let exit as ExitCode {
      throw exit
    } catch {
      log("stopped, but the final flush failed: \(error)")
      throw ExitCode(1)
    }
  }

  static func main() { ToolMain.run(Self.self) }
}
