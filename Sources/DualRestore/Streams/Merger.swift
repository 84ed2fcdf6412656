// Merges a block stream into a target through an overwrite map.
//
// Invariants:
// - Never older over newer: a block the map marks current is not written.
// - Current means durable: blocks written by the merge are recorded in the
//   map only after an fdatasync of the target, at checkpoints and at the end.
// - Nothing before verification: each record's CRC (and, for LZ4, a decode
//   to exactly the block's length) is checked before its block is written;
//   the identity checks (sizes, time, base) happen before the first write.
// - A damaged or truncated stream stops the merge; what was applied before is
//   made durable and recorded, so a re-run with a good copy skips it.
// - The map's last merged stream is set only when the END record and the
//   stream digest have been verified. A full stream with a LINEAGE record
//   (a compaction) is recorded as the stream it stands for, whose end it
//   equals, so that the incremental that followed that stream merges next;
//   its time check takes the earlier of its own instant and that stream's.
// - Continuity: the map records the instant the last merged stream's
//   contents were cut at (its GENERATION record's "as of"), with the last
//   merged stream. An incremental stream whose changes start later left a
//   generation out: it is refused before anything is written (--force
//   merges it with a warning). A stream without the record is not checked,
//   and its merge leaves the instant unknown.
// - A reference (a version 2 stream) is written only from content whose
//   digest was checked (ReferenceResolver): taken from the target itself,
//   from what the merge kept of the target's blocks before overwriting
//   them, or from a --reuse image. A block the target already holds at its
//   own place is checked and not written.

import CLZ4
import CShim
import Glibc

public enum Merger {
  public enum Mode: Sendable {
    /// Write the target and update the map.
    case merge
    /// Read and verify everything, count what would happen, write nothing.
    case dryRun
    /// Verify the stream alone; there is no target.
    case check
  }

  public struct Options: Sendable {
    public var mode: Mode = .merge
    /// Override the time and base checks (with a warning), never the sizes.
    public var force = false
    /// Nanoseconds a stream must have started after the map's tracking
    /// start: the bound on clock skew between the two sites' clocks.
    public var clockSkewAllowance: Int64 = 0
    /// Make the merge durable and record it in the map at least this often.
    public var checkpointBytes: UInt64 = 1 << 30
    public var checkpointSeconds: Double = 5
    public var progress = false
    /// The target is a mirror that only merges write: the map records the
    /// streams merged (for the base check of incremental streams) but holds
    /// no block back, so a catch-up stream replaces what earlier ones wrote.
    public var mirror = false
    /// With no map given: a mirror's first merge, which creates the map at
    /// `mapPath` from the stream's geometry, for the device named here.
    public var newMapDevice: String?
    /// Images the content of references may be taken from, besides the target.
    public var reuse: [any BlockDevice] = []
    /// Take referenced content from the target itself (not for a target
    /// that keeps its own map: it is written, not read).
    public var referencesFromTarget = true
    /// How much of the target's overwritten contents a merge in place keeps
    /// for later references (0: none).
    public var keepBytes = 64 << 20
    public init() {}
  }

  public struct Summary: Sendable {
    public var header: StreamFormat.Header?
    /// The stream's LINEAGE record: it was recorded as `lineage.standsFor`.
    public var lineage: StreamFormat.Lineage?
    /// The stream's GENERATION record: the writes it carries, as of when.
    public var generation: StreamFormat.Generation?
    public var written: UInt64 = 0
    public var skippedCurrent: UInt64 = 0
    /// The stream's SOURCES record (version 2).
    public var sources: StreamFormat.Sources?
    /// Referenced blocks written, their content found and checked.
    public var referencedWritten: UInt64 = 0
    /// Referenced blocks the target already held at their place: checked, not written.
    public var referencedInPlace: UInt64 = 0
    /// Referenced blocks whose content came from what the merge kept.
    public var referencedFromKept: UInt64 = 0
    /// Referenced blocks found in the target; nil when the target is not
    /// one of the places looked in.
    public var referencedFromTarget: UInt64?
    /// Referenced blocks found in each --reuse image, in the order given.
    public var referencedFrom: [(name: String, blocks: UInt64)] = []
    /// With `.check`: referenced blocks, not looked for.
    public var referencedUnchecked: UInt64 = 0
    public var zero: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    public var streamBytes: UInt64 = 0
    public var complete = false
    public var warnings: [String] = []
    public var seconds: Double = 0
    /// What a target that keeps its own map did with the blocks sent
    /// (`session`); nil when there is none, or it cannot say.
    public var report: MergeReport?
  }

  /// Merges the stream from `reader` into `target` (nil with `.check`),
  /// through `map` saved at `mapPath` (both nil without a map).
  /// With `session` instead of a target, the target keeps its own map: it
  /// is opened once the header is known (and may refuse the stream then),
  /// and says at the end what it did with the blocks.
  public static func merge(
    _ reader: StreamReader, into target: BlockDevice?, map: inout BlockMap?, mapPath: String?, options: Options,
    session: MergeSession? = nil, warn: (String) -> Void
  ) throws -> Summary {
    var target = target
    let started = Instant.now()
    var summary = Summary()
    // The preamble and the header come first; check them before anything.
    var header: StreamFormat.Header?
    while header == nil {
      guard let record = try reader.next() else {
        throw ToolkitError("\(reader.name): the stream ended before its header")
      }
      if case .header(let h) = record { header = h }
    }
    guard let header else { throw ToolkitError("\(reader.name): no header") }
    summary.header = header
    // The LINEAGE, SOURCES and GENERATION records come before any block;
    // they change the checks and what is recorded, so look before anything
    // is decided. The records read past them are the first the loop below
    // takes: a SOURCES record (a value), then at most one other, the last
    // read (nothing reads between, so its payload stays where it is).
    var held: [StreamParser.Record] = []
    peeking: while let record = try reader.next() {
      switch record {
      case .lineage(let l): summary.lineage = l
      case .generation(let g): summary.generation = g
      case .skipped: continue
      case .sources: held.append(record)
      default:
        held.append(record)
        break peeking
      }
    }
    // What the checks and the map see: a compaction is the stream it stands
    // for, and its blocks may be as old as that stream's start.
    var admitted = header
    if let l = summary.lineage {
      admitted.streamID = l.standsFor
      admitted.started = min(header.started, l.standsForStarted)
    }
    // A map made now, from the stream's geometry (a mirror's first merge).
    if map == nil, let device = options.newMapDevice, let mapPath {
      try header.geometry.checkMappable()
      warn("creating the mirror's map \(mapPath)")
      map = BlockMap(geometry: header.geometry, meaning: .current, deviceName: device)
    }
    var serverChecks = false
    if let session, target == nil {
      target = try session.open(for: admitted, options: options)
      serverChecks = true
    }
    try checkFits(
      admitted, reader: reader, target: target, map: map, options: options, serverChecks: serverChecks,
      summary: &summary, warn: warn)

    let geometry = header.geometry
    let blockSize = Int(geometry.blockSize)
    let block = AlignedBuffer(count: blockSize)
    // Made at the first zero run written: a check never needs it.
    var zerosBuffer: AlignedBuffer?
    func zeros() -> AlignedBuffer {
      if let zerosBuffer { return zerosBuffer }
      let made = AlignedBuffer(count: min(blockSize * 16, 16 << 20))
      made.buffer.initializeMemory(as: UInt8.self, repeating: 0)
      zerosBuffer = made
      return made
    }
    var pending: [Range<UInt64>] = []
    var pendingBytes: UInt64 = 0
    var lastCheckpoint = Instant.now()
    let writing = options.mode == .merge
    let meter = ProgressMeter(label: "merge", total: geometry.deviceSize, enabled: options.progress)

    // Zeros by the target itself (punched holes, BLKZEROOUT, WRITE_ZEROES)
    // where it can, else written from `zeros()`.
    func zero(_ target: BlockDevice, offset: UInt64, length: UInt64) throws {
      if target.capabilities.contains(.writeZeroes) {
        try target.writeZeroes(offset: offset, length: length, fua: false)
        return
      }
      let scratch = zeros()
      var done: UInt64 = 0
      while done < length {
        let n = Int(min(UInt64(scratch.count), length - done))
        try target.write(UnsafeRawBufferPointer(scratch.slice(0, n)), at: offset + done, fua: false)
        done += UInt64(n)
      }
    }

    func note(_ range: Range<UInt64>) {
      if let last = pending.last, last.upperBound == range.lowerBound {
        pending[pending.count - 1] = last.lowerBound..<range.upperBound
      } else {
        pending.append(range)
      }
    }

    // Durable first, then recorded.
    func checkpoint(final: Bool) throws {
      guard writing, let target else { return }
      try target.flush()
      if var m = map, let mapPath {
        if !options.mirror {
          for range in pending { m.bits.set(range) }
        }
        if final && summary.complete {
          m.lastMergedStream = admitted.streamID
          m.mergedAsOf = summary.generation?.asOf ?? .unset
          m.mergedAsOfGeneration = summary.generation?.generation ?? .none
        }
        try MapFile.save(m, to: mapPath)
        map = m
      }
      pending.removeAll(keepingCapacity: true)
      pendingBytes = 0
      lastCheckpoint = Instant.now()
    }

    func takeHeld() -> StreamParser.Record? {
      held.isEmpty ? nil : held.removeFirst()
    }

    let holdsBack = !options.mirror
    func isCurrent(_ b: UInt64) -> Bool { holdsBack && (map?.bits[b] ?? false) }

    // References: made when the SOURCES record arrives.
    var resolver: ReferenceResolver?
    var runBuffer: AlignedBuffer?
    var inPlace = UnsafeMutableBufferPointer<Bool>.allocate(capacity: 0)
    defer { inPlace.deallocate() }
    func recordFound() {
      guard let resolver else { return }
      summary.referencedFromKept = resolver.foundKept
      // The target by its place (first, when it is one), never by a name an image may share.
      let found = zip(resolver.places, resolver.foundIn)
      summary.referencedFromTarget = found.first { $0.0.isTarget }?.1
      summary.referencedFrom = found.filter { !$0.0.isTarget }.map { ($0.0.device.name, $0.1) }
    }

    do {
      while let record = try takeHeld() ?? reader.next() {
        switch record {
        case .preamble, .header, .lineage, .generation, .skipped:
          continue
        case .sources(let sources):
          summary.sources = sources
          guard options.mode != .check else { continue }
          resolver = try ReferenceResolver(
            sources: sources, geometry: geometry,
            target: options.referencesFromTarget && !serverChecks ? target : nil, reuse: options.reuse,
            keepBytes: writing ? options.keepBytes : 0)
          runBuffer = AlignedBuffer(count: max(StreamFormat.maximumReferenceRunBytes, blockSize))
          inPlace.deallocate()
          inPlace = .allocate(capacity: StreamFormat.maximumReferenceRun(blockSize: geometry.blockSize))
        case .reference(let r):
          guard let resolver, let runBuffer else {
            summary.referencedUnchecked += UInt64(r.count)
            continue
          }
          do {
            try resolver.resolve(r, into: runBuffer.pointer, inPlace: inPlace) { !isCurrent(r.first + UInt64($0)) }
          } catch let error as ToolkitError {
            throw ToolkitError("\(reader.name): \(reader.recordPosition): \(error.message)")
          }
          var i = 0
          while i < r.count {
            let b = r.first + UInt64(i)
            if isCurrent(b) {
              summary.skippedCurrent += 1
              i += 1
              continue
            }
            if inPlace[i] {
              summary.referencedInPlace += 1
              if writing { note(b..<b + 1) }
              i += 1
              continue
            }
            var j = i + 1
            while j < r.count && !isCurrent(r.first + UInt64(j)) && !inPlace[j] { j += 1 }
            let n = UInt64(j - i)
            let (offset, length) = geometry.byteRange(blocks: b, count: n)
            if writing, let target {
              try resolver.willOverwrite(first: b, count: n)
              try target.write(
                UnsafeRawBufferPointer(start: runBuffer.pointer + i * blockSize, count: Int(length)), at: offset,
                fua: false)
              note(b..<b + n)
            }
            summary.referencedWritten += n
            summary.bytesWritten += length
            pendingBytes += length
            i = j
          }
        case .data(let index, let length, let encoding, let payload):
          // Verify the block before deciding anything about it.
          var data = UnsafeRawPointer(payload.baseAddress!)
          if encoding == .lz4 {
            let n = LZ4_decompress_safe(
              payload.baseAddress!.assumingMemoryBound(to: CChar.self),
              block.pointer.assumingMemoryBound(to: CChar.self),
              Int32(payload.count), Int32(length))
            guard n == Int32(length) else {
              throw ToolkitError(
                "\(reader.name): \(reader.recordPosition): block \(index) does not decompress to \(length) bytes; the record is damaged"
              )
            }
            data = UnsafeRawPointer(block.pointer)
          }
          if isCurrent(index) {
            summary.skippedCurrent += 1
            continue
          }
          if writing, let target {
            try resolver?.willOverwrite(first: index, count: 1)
            try target.write(
              UnsafeRawBufferPointer(start: data, count: length), at: geometry.offset(ofBlock: index), fua: false)
            note(index..<index + 1)
          }
          summary.written += 1
          summary.bytesWritten += UInt64(length)
          pendingBytes += UInt64(length)
        case .zero(let first, let count):
          var b = first
          let end = first + count
          while b < end {
            if isCurrent(b) {
              summary.skippedCurrent += 1
              b += 1
              continue
            }
            var runEnd = b + 1
            while runEnd < end && !isCurrent(runEnd) { runEnd += 1 }
            let (offset, length) = geometry.byteRange(blocks: b, count: runEnd - b)
            if writing, let target {
              try resolver?.willOverwrite(first: b, count: runEnd - b)
              try zero(target, offset: offset, length: length)
              note(b..<runEnd)
            }
            summary.zero += runEnd - b
            summary.bytesWritten += length
            pendingBytes += length
            b = runEnd
          }
        case .end:
          summary.complete = true
        }
        if pendingBytes >= options.checkpointBytes
          || lastCheckpoint.secondsAgo
            >= options.checkpointSeconds
        {
          try checkpoint(final: false)
        }
        meter.update(reader.bytesRead)
      }
    } catch {
      // Keep what was applied: durable and recorded, so a re-run skips it.
      do { try checkpoint(final: false) } catch let saveError {
        throw ToolkitError("\(error); also, recording the blocks merged so far failed: \(saveError)")
      }
      throw error
    }
    try checkpoint(final: true)
    if let session, writing {
      summary.report = try session.finish(stream: admitted.streamID, complete: summary.complete)
    }
    meter.finish(reader.bytesRead)
    summary.streamBytes = reader.bytesRead
    summary.seconds = started.secondsAgo
    recordFound()
    return summary
  }

  /// Size, time and base checks, before anything is written.
  static func checkFits(
    _ header: StreamFormat.Header, reader: StreamReader, target: BlockDevice?, map: BlockMap?, options: Options,
    serverChecks: Bool = false, summary: inout Summary, warn: (String) -> Void
  ) throws {
    if let target, target.size != header.geometry.deviceSize {
      throw ToolkitError(
        "\(reader.name) is a stream of a \(header.geometry.deviceSize)-byte device but \(target.name) has \(target.size) bytes"
      )
    }
    guard let map else {
      if header.isIncremental && options.mode != .check && !serverChecks {
        let message =
          "\(reader.name) is an incremental stream on top of stream \(header.baseStreamID); without --map its base cannot be checked"
        if !options.force { throw ToolkitError(message + " (--force merges it anyway)") }
        warn("warning: " + message)
      }
      return
    }
    try map.geometry.check(matches: header.geometry, "the map", "the stream \(reader.name)")
    guard map.meaning == .current else {
      throw ToolkitError(
        "the map marks \(map.meaning) blocks, not current ones; a merge needs the target's overwrite map (overwrite-map create)"
      )
    }
    if options.mirror {
      // A mirror has no writes of its own; a block the map marks current
      // was written by something else, and a mirror merge would replace it.
      let held = map.bits.population
      if held > 0 {
        throw ToolkitError(
          "the map marks \(held) block(s) current, written on the target itself; a mirror merge would overwrite them, so merge without --mirror"
        )
      }
    }
    let problems = map.problems(
      admittingStreamStarted: header.started, base: header.isIncremental ? header.baseStreamID : .none,
      clockSkew: options.clockSkewAllowance, checkTime: !options.mirror)
    for message in problems + continuityProblems(header, summary.generation, map: map, name: reader.name) {
      if !options.force { throw ToolkitError(message + " (--force merges it anyway)") }
      warn("warning: " + message)
    }
  }

  /// An incremental stream whose changes start after the instant the map's
  /// device is as of left out the writes between: a generation whose
  /// stream was never made or merged.
  static func continuityProblems(
    _ header: StreamFormat.Header, _ generation: StreamFormat.Generation?, map: BlockMap, name: String
  ) -> [String] {
    guard header.isIncremental, let g = generation, g.changesSince != .unset, map.mergedAsOf != .unset,
      g.changesSince > map.mergedAsOf
    else { return [] }
    let ended = map.mergedAsOfGeneration.isNone ? "" : " (the end of generation \(map.mergedAsOfGeneration))"
    let starts = g.generation.isNone ? "" : " (the start of generation \(g.generation))"
    return [
      "\(name) carries the writes since \(g.changesSince)\(starts), but the map's device is as of "
        + "\(map.mergedAsOf)\(ended): the writes from \(map.mergedAsOf) to \(g.changesSince), at least one "
        + "generation, are in neither; merge the stream of the generation left out first"
    ]
  }
}

/// A merge target that keeps its own overwrite map and decides itself which
/// blocks are current: the `merge` export of a running restore-read-through.
public protocol MergeSession: AnyObject {
  /// The target for the stream `header` describes; throws the sentence the
  /// far end refused the stream with (its identity does not fit its map).
  func open(for header: StreamFormat.Header, options: Merger.Options) throws -> BlockDevice
  /// After every block was sent and made durable: what the far end did with
  /// them (nil when it cannot say); with `complete`, the whole stream was
  /// sent and is recorded there as the last merged stream first.
  func finish(stream: ID128, complete: Bool) throws -> MergeReport?
}
