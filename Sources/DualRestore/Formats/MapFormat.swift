// The binary map format, version 1 (documented in man/dualrestore-map.5).
// All integers are little-endian.
//
//   offset  size  field
//   0       8     magic: 44 52 4D 41 50 0D 0A 1A ("DRMAP\r\n\x1a")
//   8       2     format version: 1
//   10      2     flags: 0 (a reader refuses flags it does not know)
//   12      4     header length H: bytes from offset 0 to the payload length
//   16      4     block size in bytes (a power of two, 512 B to 64 MiB)
//   20      1     meaning of a set bit: 1 current, 2 differs, 3 changed, 4 selected
//   21      1     payload encoding: 0 raw words, 1 runs
//   22      2     reserved, 0
//   24      8     device size in bytes
//   32      8     block count: ceil(device size / block size)
//   40      8     set blocks (checked against the payload)
//   48      16    map id
//   64      16    id of the last stream merged into the device (zeros: none);
//                 for a compacted stream, the stream it stands for
//   80      8     tracking started: ns since 1970-01-01T00:00:00Z (0: unset)
//   88      2     device name length N (at most 4096)
//   90      N     device name, UTF-8 (for people: a path or URI)
//   90+N    32    the generation fields, when H reaches 122+N (older maps
//                 end their header at 90+N: the fields then read as 0):
//   90+N    8       tracking ended: ns, the instant a change map's generation
//                   ended, the next one's start (0: still running, unknown)
//   98+N    8       merged as of: ns, the instant the device's contents were
//                   cut at, as the last merged stream's GENERATION record
//                   says (0: unknown)
//   106+N   16      the generation that ended then: the id of the change
//                   map that selected that stream (zeros: unknown)
//   122+N   ...   zero or more bytes up to H that this version ignores
//   H       8     payload length P
//   H+8     P     payload
//   H+8+P   32    SHA-256 of every byte before it
//
// Payload encoding 0 (raw): ceil(block count / 64) 64-bit words; block i is
// bit i%64 of word i/64. Encoding 1 (runs): LEB128 run lengths in blocks,
// alternating clear, set, clear, …, starting with clear (the first run may
// be 0); the runs add up to the block count exactly. The writer picks the
// shorter encoding, so an all-clear or all-set map is a few bytes, and no map
// is ever larger than its raw bitmap plus the header.

public enum MapFormat {
  public static let magic: [UInt8] = [0x44, 0x52, 0x4D, 0x41, 0x50, 0x0D, 0x0A, 0x1A]
  public static let version: UInt16 = 1
  public static let maximumNameLength = 4096
  static let fixedHeaderLength = 90
  static let checksumLength = 32
  /// The generation fields after the device name.
  static let generationFieldsLength = 32

  enum Encoding: UInt8 {
    case raw = 0
    case runs = 1
  }

  /// Whether `prefix` starts like a map file.
  public static func looksLikeMap(_ prefix: some Collection<UInt8>) -> Bool {
    prefix.count >= magic.count && Array(prefix.prefix(magic.count)) == magic
  }

  // MARK: Encoding

  /// The serialized map: header, payload, checksum.
  public static func encode(_ map: BlockMap) -> [UInt8] {
    let (encoding, payload) = encodePayload(map.bits)
    var header = ByteWriter()
    header.raw(magic)
    header.u16(version)
    header.u16(0)
    let nameLength = min(map.deviceName.utf8.count, maximumNameLength)
    header.u32(UInt32(fixedHeaderLength + nameLength))
    header.u32(map.geometry.blockSize)
    header.u8(map.meaning.rawValue)
    header.u8(encoding.rawValue)
    header.u16(0)
    header.u64(map.geometry.deviceSize)
    header.u64(map.geometry.blockCount)
    header.u64(map.bits.population)
    header.id(map.mapID)
    header.id(map.lastMergedStream)
    header.i64(map.trackingStarted.nanosecondsSinceEpoch)
    header.string16(map.deviceName, limit: maximumNameLength)
    header.i64(map.trackingEnded.nanosecondsSinceEpoch)
    header.i64(map.mergedAsOf.nanosecondsSinceEpoch)
    header.id(map.mergedAsOfGeneration)
    // The name may have been cut at a character boundary: fix H.
    let h = UInt32(header.bytes.count)
    for i in 0..<4 { header.bytes[12 + i] = UInt8(truncatingIfNeeded: h >> (8 * UInt32(i))) }
    header.u64(UInt64(payload.count))

    var out = header.bytes
    out.reserveCapacity(out.count + payload.count + checksumLength)
    out.append(contentsOf: payload)
    out.append(contentsOf: sha256(out))
    return out
  }

  static func encodePayload(_ bits: BlockBitmap) -> (Encoding, [UInt8]) {
    let rawLength = bits.wordCount * 8
    if let runs = encodeRuns(bits, below: rawLength) { return (.runs, runs) }
    var raw = [UInt8](repeating: 0, count: rawLength)
    bits.withWords { words in
      raw.withUnsafeMutableBytes { out in
        for (i, w) in words.enumerated() { out.storeBytes(of: w.littleEndian, toByteOffset: i * 8, as: UInt64.self) }
      }
    }
    return (.raw, raw)
  }

  /// The runs encoding (payload encoding 1) of `bits`, or nil when it would
  /// take `limit` bytes or more. Each run takes the fewest LEB128 bytes, so
  /// the whole is at most block count + 1 bytes (each run but a first empty
  /// one covers at least one block, and takes no more bytes than blocks).
  static func encodeRuns(_ bits: BlockBitmap, below limit: Int = .max) -> [UInt8]? {
    var runs = ByteWriter()
    var position: UInt64 = 0
    var wantSet = false
    while position < bits.count {
      let end =
        (wantSet ? bits.nextClear(from: position) : bits.nextSet(from: position)) ?? bits.count
      runs.varint(end - position)
      position = end
      wantSet.toggle()
      if runs.bytes.count >= limit { return nil }
    }
    return runs.bytes
  }

  /// The longest a runs encoding of `count` blocks is, as `encodeRuns` writes it.
  static func longestRuns(count: UInt64) -> UInt64 { count + 1 }

  // MARK: Decoding

  /// Parses and verifies a serialized map. `name` is how errors refer to it.
  public static func decode(_ bytes: [UInt8], name: String) throws -> BlockMap {
    func fail(_ why: String) -> ToolkitError { ToolkitError.path(name, why) }
    if bytes.count < magic.count || Array(bytes.prefix(magic.count)) != magic {
      if bytes.isEmpty { throw fail("empty input, not a map") }
      throw fail("not a dualrestore map (bad magic)")
    }
    var r = ByteReader(bytes[...])
    _ = r.take(magic.count)
    guard let version = r.u16(), let flags = r.u16(), let headerLength = r.u32() else {
      throw fail("truncated map header")
    }
    guard version == MapFormat.version else {
      throw fail("map format version \(version) is not supported (this build reads version \(MapFormat.version))")
    }
    guard bytes.count >= fixedHeaderLength + 8 + checksumLength else {
      throw fail("truncated map (\(bytes.count) bytes)")
    }
    let body = bytes[..<(bytes.count - checksumLength)]
    if sha256(body) != Array(bytes.suffix(checksumLength)) {
      throw fail("checksum mismatch: the map is damaged or truncated")
    }
    guard flags == 0 else { throw fail("map uses flags 0x\(String(flags, radix: 16)) this build does not know") }
    guard headerLength >= fixedHeaderLength, Int(headerLength) + 8 <= body.count else {
      throw fail("header length \(headerLength) is out of range")
    }
    guard let blockSize = r.u32(), let meaningRaw = r.u8(), let encodingRaw = r.u8(),
      let _ = r.u16(), let deviceSize = r.u64(), let blockCount = r.u64(), let setCount = r.u64(),
      let mapID = r.id(), let lastMerged = r.id(), let started = r.i64(), let nameLength = r.u16()
    else { throw fail("truncated map header") }
    guard let meaning = MapMeaning(rawValue: meaningRaw) else { throw fail("unknown meaning \(meaningRaw)") }
    guard let encoding = Encoding(rawValue: encodingRaw) else { throw fail("unknown payload encoding \(encodingRaw)") }
    let geometry: BlockGeometry
    do {
      geometry = try BlockGeometry(blockSize: blockSize, deviceSize: deviceSize)
    } catch {
      throw fail("\(error)")
    }
    guard geometry.blockCount == blockCount else {
      throw fail("block count \(blockCount) does not fit \(deviceSize) bytes in blocks of \(blockSize)")
    }
    do { try geometry.checkMappable() } catch { throw fail("\(error)") }
    guard Int(nameLength) <= maximumNameLength, fixedHeaderLength + Int(nameLength) <= Int(headerLength),
      let nameBytes = r.take(Int(nameLength))
    else { throw fail("device name length \(nameLength) is out of range") }
    let deviceName = String(decoding: nameBytes, as: UTF8.self)
    // The generation fields, when the header reaches past them.
    var ended: Int64 = 0
    var mergedAsOf: Int64 = 0
    var mergedAsOfGeneration = ID128.none
    if fixedHeaderLength + Int(nameLength) + generationFieldsLength <= Int(headerLength) {
      guard let e = r.i64(), let m = r.i64(), let g = r.id() else { throw fail("truncated map header") }
      guard e >= 0, m >= 0 else { throw fail("an instant of the generation fields is before 1970") }
      (ended, mergedAsOf, mergedAsOfGeneration) = (e, m, g)
    }

    var p = ByteReader(body[Int(headerLength)...])
    guard let payloadLength = p.u64(), payloadLength == UInt64(p.remaining) else {
      throw fail("payload length does not match the file size")
    }
    guard let payload = p.take(Int(payloadLength)) else { throw fail("truncated payload") }
    let bits = try decodePayload(payload, encoding: encoding, count: blockCount, fail: fail)
    guard bits.population == setCount else {
      throw fail("payload has \(bits.population) set blocks but the header says \(setCount)")
    }
    return BlockMap(
      geometry: geometry, meaning: meaning, deviceName: deviceName, mapID: mapID,
      trackingStarted: Instant(nanosecondsSinceEpoch: started), lastMergedStream: lastMerged,
      trackingEnded: Instant(nanosecondsSinceEpoch: ended), mergedAsOf: Instant(nanosecondsSinceEpoch: mergedAsOf),
      mergedAsOfGeneration: mergedAsOfGeneration, bits: bits)
  }

  static func decodePayload(
    _ payload: ArraySlice<UInt8>, encoding: Encoding, count: UInt64, fail: (String) -> ToolkitError
  ) throws -> BlockBitmap {
    switch encoding {
    case .raw:
      let wordCount = Int((count + 63) / 64)
      guard payload.count == wordCount * 8 else {
        throw fail("raw payload of \(payload.count) bytes does not hold \(count) blocks")
      }
      var words = [UInt64](repeating: 0, count: wordCount)
      payload.withUnsafeBytes { src in
        for i in 0..<wordCount {
          words[i] = UInt64(littleEndian: src.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
        }
      }
      let lastBits = count & 63
      if lastBits != 0, let last = words.last, last >> lastBits != 0 {
        throw fail("raw payload has bits set past the last block")
      }
      return BlockBitmap(count: count, words: words)
    case .runs:
      // The bitmap grows word by word as the runs are decoded: a few bytes
      // of payload never claim the memory of a huge device they do not
      // describe.
      var decoder = RunsDecoder(count: count)
      _ = try decoder.decode(payload, final: true, fail: fail)
      return try decoder.finish(fail: fail)
    }
  }
}

/// Payload encoding 1 decoded piece by piece, as it arrives from a file or
/// a pipe (a map's payload, a sparse signature's selection): LEB128 run
/// lengths alternating clear, set, clear, …, starting with clear; only the
/// first run may be empty; the runs add up to `count` exactly. The bitmap
/// is built a word at a time in block order, so memory grows with the
/// blocks the runs have covered, never past one bit per block of `count`,
/// and nothing but the bitmap is kept.
struct RunsDecoder {
  let count: UInt64
  /// Blocks the runs decoded so far cover.
  private(set) var position: UInt64 = 0
  /// Payload bytes decoded so far.
  private(set) var bytesDecoded = 0
  private var isSet = false
  private var first = true
  private var words: [UInt64] = []
  /// The bits of the word that `position` is in, below `position`.
  private var partial: UInt64 = 0

  init(count: UInt64) { self.count = count }

  /// Decodes the runs at the start of `bytes` and returns how many bytes
  /// they took. A run cut off at the end of `bytes` is left for the next
  /// call, unless `final` says nothing follows.
  mutating func decode(_ bytes: ArraySlice<UInt8>, final: Bool, fail: (String) -> ToolkitError) throws -> Int {
    var r = ByteReader(bytes)
    while r.remaining > 0 {
      let start = r.offset
      guard let run = r.varint() else {
        let rest = bytes.dropFirst(start)
        if !final, rest.count < 10, rest.allSatisfy({ $0 & 0x80 != 0 }) {
          bytesDecoded += start
          return start
        }
        throw fail("damaged run in payload at byte \(bytesDecoded + r.offset)")
      }
      guard run > 0 || first else { throw fail("empty run in payload at byte \(bytesDecoded + r.offset)") }
      guard run <= count - position else { throw fail("runs cover more than \(count) blocks") }
      append(run, set: isSet)
      isSet.toggle()
      first = false
    }
    bytesDecoded += r.offset
    return r.offset
  }

  /// The bitmap of the runs; throws unless they cover exactly `count` blocks.
  mutating func finish(fail: (String) -> ToolkitError) throws -> BlockBitmap {
    guard position == count else { throw fail("runs cover \(position) of \(count) blocks") }
    if position & 63 != 0 { words.append(partial) }
    partial = 0
    defer { words = [] }
    return BlockBitmap(count: count, words: words)
  }

  private mutating func append(_ run: UInt64, set: Bool) {
    var n = run
    let bit = position & 63
    if bit != 0, n > 0 {
      let take = min(n, 64 - bit)
      if set { partial |= ((1 << take) - 1) << bit }
      n -= take
      position += take
      if position & 63 == 0 {
        words.append(partial)
        partial = 0
      }
    }
    if n >= 64 {
      words.append(contentsOf: repeatElement(set ? ~0 : 0, count: Int(n >> 6)))
      position += n & ~63
      n &= 63
    }
    if n > 0 {
      if set { partial |= (1 << n) - 1 }
      position += n
    }
  }
}

/// Loading and saving maps by path, with `-` for stdin and stdout.
public enum MapFile {
  /// Loads and verifies a map; `-` reads standard input.
  public static func load(_ path: String) throws -> BlockMap {
    let bytes = try readWholeFile(path)
    return try MapFormat.decode(bytes, name: path == "-" ? "standard input" : path)
  }

  /// Saves a map atomically to a file, or to standard output for `-`
  /// (never to a terminal).
  public static func save(_ map: BlockMap, to path: String) throws {
    let target = OutputTarget(path)
    try target.refuseTerminal(for: "map")
    try target.write(MapFormat.encode(map))
  }
}
