import ArgumentParser
import DualRestore
import Glibc
import ToolSupport

@main
struct MergeSnapshot: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "merge-snapshot",
    abstract: "Merge a block stream into a target through an overwrite map.",
    usage: """
      merge-snapshot [--map MAP] [-i STREAM] [--key-file FILE | --passphrase-file FILE] [options] TARGET
      merge-snapshot --check [-i STREAM] [--key-file FILE | --passphrase-file FILE]
      """,
    discussion: """
      Reads a stream made by snapshot (dualrestore-stream(5)) from standard \
      input, or from -i STREAM, and writes its blocks to TARGET, an image \
      file or a block device of the stream's size, or the `merge` export of a \
      running restore-read-through (nbd+unix:///merge?socket=PATH or \
      nbd://HOST:PORT/merge), which keeps the map itself. With --map, a block the \
      map marks current is never overwritten: it holds data newer than the \
      stream's. Every block written is then marked current; the target is \
      made durable (fdatasync) before the map records it, at checkpoints and \
      at the end, and a complete stream is recorded as the map's last merged \
      stream. A full stream compacted from a chain of streams (its LINEAGE \
      record) is recorded as the stream whose end it stands for, so the \
      incremental stream that followed that one merges next; the summary \
      names it (stands_for in --json). Into the merge export, the server \
      admits the stream, counts what it does with its blocks, records a \
      complete stream and reports its counts at the end \
      (dualrestore-merge(5)); the summary gives them, beside what was sent.

      With --mirror, TARGET is a mirror being seeded from shipped media: \
      nothing writes it but merges. Every block of the stream is written and \
      the map only records the last merged stream, so the incremental \
      catch-up streams that follow (snapshot --base) apply on top of it and \
      replace what earlier streams wrote. A map that marks blocks current is \
      refused in this mode; a map that does not exist yet is created, with \
      the stream's block size.

      Every record is verified before its block is written. A damaged or \
      truncated stream stops the merge with one sentence naming the record \
      and its byte offset; what came before it stays applied and recorded, so \
      merging a good copy of the stream afterwards finishes the job without \
      writing again what is already current.

      Refused before anything is written: a stream whose block size or device \
      size does not fit TARGET or the map; a stream that started reading \
      before the map started tracking (it could bring back data older than \
      writes the map never saw); an incremental stream whose base is not the \
      map's last merged stream; an incremental stream whose writes start \
      after the instant the map records its device is as of (the last merged \
      stream's GENERATION record, dualrestore-stream(5)): it leaves out a \
      generation whose stream was never made or merged. --force overrides \
      the time, base and generation checks, with a warning; never the size \
      checks.

      An encrypted stream (snapshot --encrypt) needs the key it was made \
      with: --key-file FILE or --passphrase-file FILE, read from files only, \
      never from the command line or the environment. Each record's \
      AES-256-GCM tag is verified before its block is written, so a wrong \
      key, or a record altered, removed, reordered, taken from another \
      stream or cut off, stops the merge with one sentence before any block \
      of the damaged part is written. A key given for a stream that is not \
      encrypted is refused: nothing in such a stream is authenticated.

      A stream made with snapshot --have (format version 2) names some \
      blocks by reference: their content is already held by the receiver, in \
      the target or in another image, at a block the record names. The \
      content is taken from the target itself or from the --reuse images \
      (image files, block devices or NBD exports, read only), and each \
      block's digest is checked before it is written; a block the target \
      already holds at its own place is checked and not written. Merging in \
      place, a block the stream overwrites may hold content a later \
      reference needs (a copy shifted forward): the merge keeps the old \
      contents of the blocks it overwrites, the latest --keep MiB of them, \
      and looks there too. A reference whose content is found nowhere stops \
      the merge with a sentence naming the block; nothing unchecked is \
      written, and the target's blocks not yet replaced are intact. Give the \
      receiver's older copy with --reuse to merge such a stream whatever it \
      moves. --check cannot look for referenced content (there is no \
      target) and counts it only; --dry-run looks for it and checks it, \
      without the hazard of overwriting (it writes nothing).

      The two instants come from different clocks: the stream's from the \
      machine that read the source, the map's from the machine that tracks \
      the target. Keep both synchronised (NTP), and give --clock-skew the \
      bound of their difference: a stream must then have started at least \
      that long after tracking started.

      Exit status: 0 merged (or verified), 1 refused or stopped.
      """)

  @Option(help: ArgumentHelp("The overwrite map of TARGET: its current blocks are not overwritten.", valueName: "map"))
  var map: String?

  @Option(
    name: .shortAndLong,
    help: ArgumentHelp("Read the stream from this file instead of standard input.", valueName: "stream"))
  var input: String?

  @Flag(
    help:
      "Verify the stream alone (CRCs, the tags of an encrypted stream, decompression, END record, digest); no target.")
  var check = false

  @Flag(help: "Read and verify everything and report what would be written and skipped; write nothing.")
  var dryRun = false

  @Flag(
    help: ArgumentHelp(
      "TARGET is a mirror that only merges write: write every block of the stream; the map records the streams for the base check."
    ))
  var mirror = false

  @OptionGroup var keys: KeyOptions

  @Flag(help: "Merge even when the time, base or generation check fails (with a warning).")
  var force = false

  @Option(help: ArgumentHelp("Bound on the clock difference between the two sites, in seconds.", valueName: "seconds"))
  var clockSkew: Double = 0

  @Option(
    help: ArgumentHelp(
      "An image holding content the stream refers to, read only (repeatable).", valueName: "image"))
  var reuse: [String] = []

  @Option(
    help: ArgumentHelp(
      "MiB of overwritten target contents kept for later references when merging in place (0: none).",
      valueName: "mib"))
  var keep: Int = 64

  @OptionGroup var reporting: ProgressOptions

  @Flag(
    help: ArgumentHelp(
      "Print the summary as one JSON object on standard output.",
      discussion:
        "Into the merge export, written_blocks, zero_blocks, skipped_current_blocks and bytes_written are the server's counts, and sent_blocks, sent_zero_blocks and bytes_sent what was sent; a server that does not report leaves the first four out."
    ))
  var json = false

  @Argument(help: ArgumentHelp("The image file or block device to write.", valueName: "target"))
  var target: String?

  func validate() throws {
    if check {
      if target != nil { throw ValidationError("--check verifies a stream alone; drop TARGET") }
      if map != nil { throw ValidationError("--check verifies a stream alone; drop --map") }
      if dryRun { throw ValidationError("give one of --check and --dry-run") }
    } else if target == nil {
      throw ValidationError("give the TARGET to merge into, or --check to verify a stream alone")
    }
    if clockSkew < 0 || clockSkew > 86400 * 365 { throw ValidationError("--clock-skew \(clockSkew) is out of range") }
    if map == "-" && input == nil {
      throw ValidationError("the map and the stream cannot both come from standard input")
    }
    if map == "-" { throw ValidationError("the map is updated in place; give it as a file") }
    if mirror && map == nil {
      throw ValidationError("--mirror needs --map: the map records the streams merged, for the base check")
    }
    if mirror && check { throw ValidationError("--mirror merges into a target; --check has none") }
    if check && !reuse.isEmpty { throw ValidationError("--check verifies a stream alone; drop --reuse") }
    if keep < 0 || keep > 1 << 20 { throw ValidationError("--keep \(keep) is out of range (0 to 1048576 MiB)") }
    if reuse.contains("-") { throw ValidationError("--reuse reads images at random; give a file, device or NBD URI") }
  }

  func run() throws {
    // Read (and refused) before the stream, the map or the target is opened.
    let secret = try keys.load()
    let fd: Int32
    let name: String
    if let input, input != "-" {
      let d = Glibc.open(input, O_RDONLY | O_CLOEXEC)
      guard d >= 0 else { throw ToolkitError.path(input, String(cString: strerror(errno))) }
      fd = d
      name = input
    } else {
      if isatty(0) == 1 {
        throw ToolkitError("refusing to read a binary stream from a terminal; pipe it in or use -i FILE")
      }
      fd = 0
      name = "standard input"
    }
    defer { if fd != 0 { close(fd) } }

    var options = Merger.Options()
    options.mode = check ? .check : (dryRun ? .dryRun : .merge)
    options.force = force
    options.mirror = mirror
    options.clockSkewAllowance = Int64(clockSkew * 1e9)
    options.progress = reporting.show
    options.keepBytes = keep << 20
    options.reuse = try reuse.map { try openSource($0, direct: false) }

    var loaded: BlockMap? = nil
    if let map, mirror, !pathExists(map), let target {
      // A mirror's first merge creates its map, with the stream's blocks.
      options.newMapDevice = canonicalPath(target)
    } else if let map {
      loaded = try MapFile.load(map)
    }
    var device: BlockDevice? = nil
    var session: MergeSession? = nil
    if let target, NBDURI.isURI(target) {
      // The `merge` export of a running restore-read-through: the server
      // keeps the overwrite map and decides, under its block locks, which
      // blocks are current.
      if map != nil || mirror {
        throw ToolkitError(
          "\(target) is an NBD export; the server there keeps the overwrite map, so drop --map and --mirror")
      }
      if try MergeExportClient.names(target) {
        session = MergeExportClient(uri: target)
      } else {
        device = try NBDClient(uri: target, timeout: 60)
      }
    } else if let target {
      let d = try Device(path: target, options: DeviceOpenOptions(writable: !dryRun))
      if let m = loaded, m.geometry.deviceSize != d.size {
        throw ToolkitError("\(map ?? "") describes \(m.geometry.deviceSize) bytes but \(target) has \(d.size) bytes")
      }
      device = d
    }

    let reader = StreamReader(fd: fd, name: name, secret: secret)
    let s = try Merger.merge(
      reader, into: device, map: &loaded, mapPath: map, options: options, session: session,
      warn: { printError("merge-snapshot: \($0)") })
    try report(s, server: session != nil)
  }

  /// `server`: the target was the merge export, which keeps its own map and
  /// alone knows which blocks it wrote; its report says (nil: it cannot).
  func report(_ s: Merger.Summary, server: Bool) throws {
    let verb = check ? "verified" : (dryRun ? "would write" : "wrote")
    if json {
      var o = JSONObject()
      o.add("mode", check ? "check" : (dryRun ? "dry-run" : "merge"))
      o.add("stream_id", s.header?.streamID.description)
      o.add("base_stream_id", (s.header?.isIncremental ?? false) ? s.header?.baseStreamID.description : nil)
      // A compaction: recorded as the stream whose end it equals.
      o.add("stands_for", s.lineage?.standsFor.description)
      o.add("started", s.header?.started.description)
      o.add("source", s.header?.sourceName)
      o.add("block_size", UInt64(s.header?.geometry.blockSize ?? 0))
      o.add("device_size", s.header?.geometry.deviceSize ?? 0)
      if let sources = s.sources {
        o.add("format_version", UInt64(StreamFormat.referencesVersion))
        o.add("reference_images", UInt64(sources.images.count))
        if check {
          o.add("referenced_blocks", s.referencedUnchecked)
        } else {
          o.add("referenced_written_blocks", s.referencedWritten)
          o.add("referenced_in_place_blocks", s.referencedInPlace)
          o.add("referenced_from_kept_blocks", s.referencedFromKept)
          if let target = s.referencedFromTarget { o.add("referenced_from_target_blocks", target) }
          for (i, place) in s.referencedFrom.enumerated() {
            o.add("referenced_from_reuse\(i + 1)_blocks", place.blocks)
          }
        }
      }
      if !server {
        o.add("written_blocks", s.written)
        o.add("zero_blocks", s.zero)
        o.add("skipped_current_blocks", s.skippedCurrent)
        o.add("bytes_written", s.bytesWritten)
      } else if !dryRun {
        // What was sent, and what the server did with it; counts the
        // server did not give are left out, never guessed.
        o.add("sent_blocks", s.written)
        o.add("sent_zero_blocks", s.zero)
        o.add("bytes_sent", s.bytesWritten)
        if let r = s.report {
          o.add("written_blocks", r.dataBlocks)
          o.add("zero_blocks", r.zeroBlocks)
          o.add("skipped_current_blocks", r.skippedCurrent)
          o.add("bytes_written", r.bytesWritten)
          o.add("recorded", r.recorded)
        }
      }
      o.add("stream_bytes", s.streamBytes)
      o.add("complete", s.complete)
      // A key is refused for a plaintext stream, so a stream read with one was encrypted.
      o.add("encrypted", keys.given)
      o.add("seconds", number: formatFixed(s.seconds, digits: 3))
      let out = TextOutput()
      try out.line(o.render())
      try out.flush()
      return
    }
    if reporting.quiet { return }
    let id = (s.header.map { "\($0.streamID)" } ?? "?") + (s.lineage.map { " (standing for \($0.standsFor))" } ?? "")
    if check {
      printError(
        "merge-snapshot: stream \(id) verified: \(s.written) data and \(s.zero) zero blocks, "
          + (s.sources == nil
            ? "" : "\(s.referencedUnchecked) referenced blocks (their content is checked when merged), ")
          + "\(formatBytes(s.bytesWritten)) of blocks in \(formatBytes(s.streamBytes)) of stream, complete")
      return
    }
    if server, let target {
      let outcome =
        s.report.map {
          "the server wrote \($0.dataBlocks) blocks and \($0.zeroBlocks) zero blocks "
            + "(\(formatBytes($0.bytesWritten))) and skipped \($0.skippedCurrent) current blocks"
        } ?? "the server writes those its map does not mark current"
      printError(
        "merge-snapshot: stream \(id): sent \(s.written) blocks and \(s.zero) zero blocks "
          + "(\(formatBytes(s.bytesWritten))) to \(target); \(outcome), \(formatFixed(s.seconds, digits: 2)) s")
      return
    }
    let references =
      s.sources == nil
      ? ""
      : ", \(s.referencedWritten) referenced blocks "
        + (dryRun ? "found" : "written") + " and \(s.referencedInPlace) found in place ("
        + ((s.referencedFromTarget.map { ["\($0) from the target"] } ?? [])
        + s.referencedFrom.map { "\($0.blocks) from \($0.name)" } + ["\(s.referencedFromKept) from kept blocks"])
        .joined(separator: ", ") + ")"
    printError(
      "merge-snapshot: stream \(id): \(verb) \(s.written) blocks and \(s.zero) zero blocks"
        + references + " (\(formatBytes(s.bytesWritten))), skipped \(s.skippedCurrent) current blocks, "
        + "\(formatFixed(s.seconds, digits: 2)) s")
  }

  static func main() { ToolMain.run(Self.self) }
}
