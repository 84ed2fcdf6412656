// The NBD wire codec without a socket: every message survives encoding and
// decoding; streams of messages fed one byte at a time decode to the same
// messages, with nil (more bytes needed) until each is whole; a stream cut
// anywhere leaves bytes the end-of-input step refuses; bad magic numbers,
// lengths past the limits and option data or payloads that do not parse
// are typed errors with the sentences the connections use.

import XCTest

@testable import DualRestore

final class NBDWireTests: XCTestCase {
  /// Decodes `bytes` given one at a time: after each byte, every message
  /// that is whole. A message must not decode before its last byte.
  private func byteAtATime<M>(
    _ bytes: [UInt8], _ what: String, _ decode: (UnsafeRawBufferPointer) throws -> (M, Int)?
  ) throws -> [M] {
    var pending: [UInt8] = []
    var out: [M] = []
    for b in bytes {
      pending.append(b)
      while let (m, n) = try pending.withUnsafeBytes(decode) {
        XCTAssertGreaterThan(n, 0)
        XCTAssertLessThanOrEqual(n, pending.count)
        out.append(m)
        pending.removeFirst(n)
      }
    }
    try NBDWire.finish(leftover: pending.count, inside: what)
    return out
  }

  private func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

  private func assertWireError(
    _ expected: NBDWireError, _ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line
  ) {
    XCTAssertThrowsError(try body(), file: file, line: line) { error in
      XCTAssertEqual(error as? NBDWireError, expected, file: file, line: line)
    }
  }

  // MARK: Transmission

  func testRequestsRoundTripOneByteAtATime() throws {
    let requests = [
      NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1 << 32, offset: 0, length: 4096),
      NBDRequest(flags: NBD.cmdFlagFUA, type: NBD.cmdWrite, cookie: .max, offset: .max - 7, length: .max),
      NBDRequest(
        flags: NBD.cmdFlagReqOne, type: NBD.cmdBlockStatus, cookie: 0x0102_0304_0506_0708, offset: 1, length: 1),
      NBDRequest(flags: 0, type: NBD.cmdDisconnect, cookie: 0, offset: 0, length: 0),
    ]
    var stream: [UInt8] = []
    for r in requests {
      var one = [UInt8](repeating: 0xEE, count: NBDRequest.length)
      one.withUnsafeMutableBytes { r.encode(into: $0) }
      stream += one
    }
    // The layout of the first, field by field.
    XCTAssertEqual(
      Array(stream[0..<NBDRequest.length]),
      be(NBD.requestMagic) + be(UInt16(0)) + be(NBD.cmdRead) + be(UInt64(1 << 32)) + be(UInt64(0)) + be(UInt32(4096)))
    XCTAssertEqual(try byteAtATime(stream, "a request") { try NBDRequest.decode($0) }, requests)
    for cut in 1..<NBDRequest.length {
      assertWireError(.truncated("a request", have: cut)) {
        _ = try byteAtATime(Array(stream[0..<NBDRequest.length + cut]), "a request") { try NBDRequest.decode($0) }
      }
    }
    var bad = stream
    bad[3] ^= 1
    assertWireError(.badRequestMagic) { _ = try bad.withUnsafeBytes { try NBDRequest.decode($0) } }
  }

  func testRepliesAsServersSendThemDecodeAsClientsReadThem() throws {
    let heads: [(NBDReplyHead, UInt64)] = [
      (.simple(error: 0), 1),
      (.simple(error: NBD.errIO), 2),
      (.offsetData(offset: 1 << 40, dataLength: 4096), 3),
      (.error(NBD.errInvalid), 4),
      (.blockStatus(payloadLength: 12), 5),
      (.empty, 6),
    ]
    var stream: [UInt8] = []
    for (head, cookie) in heads {
      var buffer = [UInt8](repeating: 0, count: NBDReplyHead.maximumLength)
      let n = buffer.withUnsafeMutableBytes { head.encode(cookie: cookie, into: $0) }
      // What follows each head, as the server sends it after.
      var tail: [UInt8] = []
      if case .offsetData = head { tail = [UInt8](repeating: 7, count: 4096) }
      if case .blockStatus = head { tail = NBDBlockStatus.encode(context: 1, [Extent(length: 4096, flags: 3)]) }
      stream += buffer[0..<n] + tail
    }
    // A client's reader: a header, then the payload it announces.
    var pending: [UInt8] = []
    var expectPayload = 0
    var seen: [(NBDReplyHeader, [UInt8])] = []
    var current: NBDReplyHeader?
    var payload: [UInt8] = []
    for b in stream {
      if let c = current {
        payload.append(b)
        if payload.count == expectPayload {
          seen.append((c, payload))
          current = nil
          payload = []
        }
        continue
      }
      pending.append(b)
      guard let (header, n) = try pending.withUnsafeBytes({ try NBDReplyHeader.decode($0, structured: true) }) else {
        continue
      }
      XCTAssertEqual(n, pending.count, "a header decoded before its last byte")
      pending = []
      switch header {
      // A simple reply's data is as long as its READ, which only the
      // reader knows: none follows here.
      case .simple: expectPayload = 0
      case .chunk(let c): expectPayload = c.payloadLength
      }
      if expectPayload == 0 {
        seen.append((header, []))
      } else {
        current = header
      }
    }
    try NBDWire.finish(leftover: pending.count + payload.count, inside: "a reply")
    XCTAssertEqual(seen.count, heads.count)
    XCTAssertEqual(seen[0].0, .simple(error: 0, cookie: 1))
    XCTAssertEqual(seen[1].0, .simple(error: NBD.errIO, cookie: 2))
    XCTAssertEqual(
      seen[2].0,
      .chunk(
        NBDChunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeOffsetData, cookie: 3, payloadLength: 8 + 4096)))
    XCTAssertEqual(Array(seen[2].1[0..<8]), be(UInt64(1 << 40)))
    XCTAssertEqual(seen[3].0, .chunk(NBDChunkHeader(flags: 1, type: NBD.replyTypeError, cookie: 4, payloadLength: 6)))
    let error = try seen[3].1.withUnsafeBytes { try NBDErrorChunk.decode($0) }
    XCTAssertEqual(error, NBDErrorChunk(error: NBD.errInvalid, message: ""))
    var runs: [Extent] = []
    let context = try seen[4].1.withUnsafeBytes { try NBDBlockStatus.decode($0, into: &runs) }
    XCTAssertEqual(context, 1)
    XCTAssertEqual(runs, [Extent(length: 4096, flags: 3)])
    XCTAssertEqual(seen[5].0, .chunk(NBDChunkHeader(flags: 1, type: NBD.replyTypeNone, cookie: 6, payloadLength: 0)))
  }

  func testReplyHeadersRefuseBadMagicAndUnagreedChunks() {
    let chunk = be(NBD.structuredReplyMagic) + be(UInt16(1)) + be(NBD.replyTypeNone) + be(UInt64(9)) + be(UInt32(0))
    // Without structured replies agreed, a chunk's magic is a bad one.
    assertWireError(.badReplyMagic(NBD.structuredReplyMagic)) {
      _ = try chunk.withUnsafeBytes { try NBDReplyHeader.decode($0, structured: false) }
    }
    // With them, 16 bytes are not yet a chunk's header.
    XCTAssertNil(try Array(chunk[0..<16]).withUnsafeBytes { try NBDReplyHeader.decode($0, structured: true) })
    let garbage = be(UInt32(0x1234_5678)) + [UInt8](repeating: 0, count: 12)
    assertWireError(.badReplyMagic(0x1234_5678)) {
      _ = try garbage.withUnsafeBytes { try NBDReplyHeader.decode($0, structured: true) }
    }
    XCTAssertEqual(
      NBDWireError.badReplyMagic(0x1234_5678).description, "the server sent a reply with a bad magic number 0x12345678")
  }

  func testChunkPayloadsThatDoNotParse() {
    var runs: [Extent] = []
    for length in [0, 4, 8, 13, 19] {
      let payload = [UInt8](repeating: 0, count: length)
      assertWireError(.malformed("block status chunk (\(length) bytes)")) {
        _ = try payload.withUnsafeBytes { try NBDBlockStatus.decode($0, into: &runs) }
      }
    }
    XCTAssertEqual(runs, [], "nothing is taken from a malformed chunk")
    for bytes in [[UInt8](), be(UInt32(5)), be(UInt32(5)) + be(UInt16(4)) + [1, 2, 3]] {
      assertWireError(.malformed("error chunk")) { _ = try bytes.withUnsafeBytes { try NBDErrorChunk.decode($0) } }
    }
    XCTAssertEqual(NBDWireError.malformed("error chunk").description, "the server sent a malformed error chunk")
  }

  // MARK: Handshake

  func testTheServersSideOfAHandshakeOneByteAtATime() throws {
    let replies: [(NBDOptionReplyHeader, [UInt8])] = [
      (NBDOptionReplyHeader(option: NBD.optStructuredReply, type: NBD.repAck, dataLength: 0), []),
      (
        NBDOptionReplyHeader(option: NBD.optSetMetaContext, type: NBD.repMetaContext, dataLength: 19),
        NBDMetaContext(id: 1, name: Array("base:allocation".utf8)).encode()
      ),
      (
        NBDOptionReplyHeader(option: NBD.optGo, type: NBD.repInfo, dataLength: 12),
        NBDInfo.export(size: 1 << 30, flags: NBD.flagHasFlags | NBD.flagSendFlush).encode()
      ),
      (
        NBDOptionReplyHeader(option: NBD.optGo, type: NBD.repInfo, dataLength: 14),
        NBDInfo.blockSize(minimum: 1, preferred: 4096, maximum: UInt32(NBD.maximumPayload)).encode()
      ),
      (
        NBDOptionReplyHeader(option: NBD.optGo, type: NBD.repErrPolicy, dataLength: 5), Array("no, no".utf8.prefix(5))
      ),
    ]
    var stream = NBDGreeting(flags: NBD.flagFixedNewstyle | NBD.flagNoZeroes).encode()
    for (h, data) in replies { stream += NBDOptionReplyHeader.encode(h.option, h.type, data) }
    // The greeting, then replies and their data, as the client reads them.
    XCTAssertEqual(
      try byteAtATime(Array(stream[0..<NBDGreeting.length]), "the greeting") { try NBDGreeting.decode($0) },
      [NBDGreeting(flags: 3)])
    var rest = Array(stream[NBDGreeting.length...])
    for (h, data) in replies {
      let decoded = try byteAtATime(Array(rest[0..<NBDOptionReplyHeader.length]), "an option reply") {
        try NBDOptionReplyHeader.decode($0)
      }
      XCTAssertEqual(decoded, [h])
      rest.removeFirst(NBDOptionReplyHeader.length)
      XCTAssertEqual(Array(rest[0..<h.dataLength]), data)
      rest.removeFirst(h.dataLength)
    }
    XCTAssertEqual(rest, [])
    XCTAssertEqual(
      try NBDMetaContext.decode(replies[1].1), NBDMetaContext(id: 1, name: Array("base:allocation".utf8)))
    XCTAssertEqual(try NBDInfo.decode(replies[2].1), .export(size: 1 << 30, flags: 5))
    XCTAssertEqual(
      try NBDInfo.decode(replies[3].1), .blockSize(minimum: 1, preferred: 4096, maximum: 64 << 20))
    XCTAssertTrue(replies[4].0.isError)
    XCTAssertEqual(try NBDInfo.decode(NBDInfo.description("a disk").encode()), .description("a disk"))
    XCTAssertEqual(try NBDInfo.decode(be(NBD.infoName) + Array("x".utf8)), .other(NBD.infoName))
  }

  func testTheClientsSideOfAHandshakeOneByteAtATime() throws {
    let go = NBDExportRequest(name: Array("disk".utf8), infos: [NBD.infoBlockSize, NBD.infoDescription])
    let meta = NBDMetaContextRequest(name: Array("disk".utf8), queries: [Array("base:allocation".utf8), []])
    let options: [(UInt32, [UInt8])] = [
      (NBD.optStructuredReply, []), (NBD.optSetMetaContext, meta.encode()), (NBD.optGo, go.encode()),
    ]
    var stream = NBDClientFlags(flags: 3).encode()
    for (o, data) in options { stream += NBDOptionHeader.encode(o, data) }
    XCTAssertEqual(
      try byteAtATime(Array(stream[0..<4]), "the client's flags") { NBDClientFlags.decode($0) },
      [NBDClientFlags(flags: 3)])
    var rest = Array(stream[4...])
    for (o, data) in options {
      let header = try byteAtATime(Array(rest[0..<NBDOptionHeader.length]), "an option") {
        try NBDOptionHeader.decode($0)
      }
      XCTAssertEqual(header, [NBDOptionHeader(option: o, dataLength: data.count)])
      rest.removeFirst(NBDOptionHeader.length + data.count)
    }
    XCTAssertEqual(try NBDExportRequest.decode(go.encode()), go)
    XCTAssertEqual(try NBDMetaContextRequest.decode(meta.encode()), meta)
    // An option cut inside its header.
    assertWireError(.truncated("an option", have: 7)) {
      _ = try byteAtATime(Array(stream[4..<11]), "an option") { try NBDOptionHeader.decode($0) }
    }
  }

  func testHandshakeErrorsAreTypedWithTheirSentences() {
    assertWireError(.badGreeting) { _ = try Array("NBDMAGICIHAVEOPX\0\u{3}".utf8).withUnsafeBytes(NBDGreeting.decode) }
    assertWireError(.oldstyleServer) {
      _ = try (Array("NBDMAGIC".utf8) + be(NBD.oldstyleMagic) + be(UInt16(0))).withUnsafeBytes(NBDGreeting.decode)
    }
    let long = be(NBD.optionMagic) + be(NBD.optGo) + be(UInt32(0xFFFF_FFFF))
    assertWireError(.optionTooLong(option: 7, length: 0xFFFF_FFFF)) {
      _ = try long.withUnsafeBytes(NBDOptionHeader.decode)
    }
    XCTAssertEqual(
      NBDWireError.optionTooLong(option: 7, length: 4_294_967_295).description,
      "option 7 of 4294967295 bytes is too long")
    let badOption = be(UInt64(0x1234)) + be(NBD.optGo) + be(UInt32(0))
    assertWireError(.badOptionMagic) { _ = try badOption.withUnsafeBytes(NBDOptionHeader.decode) }
    let longReply = be(NBD.optionReplyMagic) + be(NBD.optGo) + be(UInt32(3)) + be(UInt32(65537))
    assertWireError(.optionReplyTooLong(65537)) { _ = try longReply.withUnsafeBytes(NBDOptionReplyHeader.decode) }
    XCTAssertEqual(
      NBDWireError.optionReplyTooLong(65537).description,
      "the server sent an option reply of 65537 bytes (at most 65536 accepted)")
    let badReply = be(UInt64(1)) + be(NBD.optGo) + be(UInt32(3)) + be(UInt32(0))
    assertWireError(.badOptionReplyMagic) { _ = try badReply.withUnsafeBytes(NBDOptionReplyHeader.decode) }
  }

  func testOptionDataThatDoesNotParseIsAnsweredNotFatal() throws {
    assertWireError(.invalidOption("short INFO/GO request")) { _ = try NBDExportRequest.decode([0, 0, 0, 0, 0]) }
    assertWireError(.invalidOption("bad export name length")) {
      _ = try NBDExportRequest.decode(self.be(UInt32(0xFFFF_FFFF)) + self.be(UInt16(0)))
    }
    assertWireError(.invalidOption("bad information request count")) {
      _ = try NBDExportRequest.decode(self.be(UInt32(1)) + [65] + self.be(UInt16(2)) + self.be(UInt16(3)))
    }
    // Cut anywhere, or with a byte too many, a context request is malformed.
    let meta = NBDMetaContextRequest(name: Array("disk".utf8), queries: [Array("base:".utf8)]).encode()
    for cut in 0..<meta.count {
      assertWireError(.invalidOption("malformed metadata context request")) {
        _ = try NBDMetaContextRequest.decode(Array(meta[0..<cut]))
      }
    }
    assertWireError(.invalidOption("malformed metadata context request")) {
      _ = try NBDMetaContextRequest.decode(meta + [0])
    }
    // A count of four billion queries in a few bytes stops at the bytes.
    assertWireError(.invalidOption("malformed metadata context request")) {
      _ = try NBDMetaContextRequest.decode(self.be(UInt32(0)) + self.be(UInt32(0xFFFF_FFFF)) + self.be(UInt32(0)))
    }
  }

  func testInformationRepliesOfTheWrongLengthAreMalformed() {
    let export = NBDInfo.export(size: 1, flags: 1).encode()
    let sizes = NBDInfo.blockSize(minimum: 1, preferred: 2, maximum: 3).encode()
    for cut in 2..<export.count {
      assertWireError(.malformed("export description")) { _ = try NBDInfo.decode(Array(export[0..<cut])) }
    }
    for cut in 2..<sizes.count {
      assertWireError(.malformed("block size description")) { _ = try NBDInfo.decode(Array(sizes[0..<cut])) }
    }
    assertWireError(.malformed("information reply")) { _ = try NBDInfo.decode([0]) }
    assertWireError(.malformed("metadata context reply")) { _ = try NBDMetaContext.decode([0, 0, 1]) }
    XCTAssertEqual(
      NBDWireError.malformed("information reply").description, "the server sent a malformed information reply")
  }

  func testExportNameReplyWithAndWithoutZeroes() throws {
    let reply = NBDExportNameReply(size: 1 << 20, flags: 3)
    for noZeroes in [true, false] {
      let bytes = reply.encode(noZeroes: noZeroes)
      XCTAssertEqual(bytes.count, NBDExportNameReply.length(noZeroes: noZeroes))
      let decoded = try byteAtATime(bytes, "the export") { NBDExportNameReply.decode($0, noZeroes: noZeroes) }
      XCTAssertEqual(decoded, [reply])
    }
    XCTAssertEqual(NBDExportEntry(name: Array("disk".utf8)).encode(), be(UInt32(4)) + Array("disk".utf8))
  }
}
