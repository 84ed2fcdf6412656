// The HTTP harness (HTTPHarness.swift) proves itself against the real
// peers: a file served by nginx, and the same file stored in moto_server's
// S3, read back through nbdkit's curl plugin whole (nbdcopy) and by one
// 64 KiB range (nbdsh), byte for byte; the HTTP bytes each read moved,
// counted in nginx's access log, are about what was asked, not the whole
// object; and a URL that does not exist stops nbdkit's start with the
// server's answer.

import Foundation
import Glibc
import TestSupport
import XCTest

final class HTTPHarnessCLITests: CLITestCase {
  var http: HTTPRig?
  let size = 8 << 20
  let chunk = 65536
  /// Where the range read starts: inside the object, 4 KiB aligned as NBD
  /// clients ask, not on a 64 KiB boundary.
  let rangeOffset = (5 << 20) + 4096

  override func tearDown() {
    http?.stopAll()
    http = nil
    super.tearDown()
  }

  /// A rig with the served directory www/ holding stream.bin, 8 MiB of
  /// seeded random data.
  func rig() throws -> (HTTPRig, www: String, file: String, data: Data) {
    let rig = try HTTPRig()
    http = rig
    let www = rig.s.path("www")
    try FileManager.default.createDirectory(atPath: www, withIntermediateDirectories: true)
    let file = try rig.s.randomFile("www/stream.bin", size: size, seed: 0x5EED_4854)
    return (rig, www, file, try rig.s.read("www/stream.bin"))
  }

  /// nbdcopy of a whole export to a file of the scratch directory.
  func copy(
    _ uri: String, to name: String, in rig: HTTPRig, file: StaticString = #filePath, line: UInt = #line
  ) throws -> Data {
    let out = rig.s.path(name)
    let r = try RRTCommand.run("/usr/bin/nbdcopy", [uri, out], timeout: 120)
    XCTAssertEqual(r.status, 0, "nbdcopy \(uri): \(r.summary)", file: file, line: line)
    return try Data(contentsOf: URL(fileURLWithPath: out))
  }

  /// One NBD read of `length` bytes at `offset` (nbdsh), on a connection of
  /// its own.
  func pread(
    _ uri: String, _ offset: Int, _ length: Int, in rig: HTTPRig, file: StaticString = #filePath, line: UInt = #line
  ) throws -> Data {
    let out = rig.s.path("pread-\(offset)-\(length).bin")
    let r = try RRTCommand.run(
      "/usr/bin/nbdsh",
      [
        "-c",
        """
        h.connect_uri(\(rrtPython(uri)))
        with open(\(rrtPython(out)), 'wb') as f:
            f.write(h.pread(\(length), \(offset)))
        h.shutdown()
        """,
      ], timeout: 60)
    XCTAssertEqual(r.status, 0, "nbdsh pread \(length) at \(offset): \(r.summary)", file: file, line: line)
    return try Data(contentsOf: URL(fileURLWithPath: out))
  }

  /// Checks the GETs a range read made: each asked a single range inside the
  /// one read (the curl plugin's extra last byte allowed) and got 206; their
  /// bodies add up to at least the range and at most twice it. Returns the
  /// bytes of body sent.
  @discardableResult
  func assertRangeRead(
    _ requests: [NginxServer.Request], _ what: String, file: StaticString = #filePath, line: UInt = #line
  ) -> Int {
    let gets = requests.filter { $0.method == "GET" }
    XCTAssertFalse(gets.isEmpty, "\(what): no GET reached the server: \(requests)", file: file, line: line)
    for g in gets {
      XCTAssertEqual(g.status, 206, "\(what): \(g)", file: file, line: line)
      guard let r = g.byteRange else {
        XCTFail("\(what): a GET without a single byte range (the whole object): \(g)", file: file, line: line)
        continue
      }
      XCTAssertTrue(
        r.lowerBound >= rangeOffset && r.upperBound <= rangeOffset + chunk,
        "\(what): a GET of \(g.range) outside the read of \(chunk) bytes at \(rangeOffset)", file: file, line: line)
    }
    let body = requests.reduce(0) { $0 + $1.bodyBytes }
    XCTAssertGreaterThanOrEqual(body, chunk, "\(what): \(requests)", file: file, line: line)
    XCTAssertLessThanOrEqual(body, 2 * chunk, "\(what): \(requests)", file: file, line: line)
    return body
  }

  // MARK: nginx

  func testNbdkitCurlReadsAWholeFileServedByNginx() throws {
    try HTTPRig.require(nginx: true, nbdkitCurl: true)
    let (http, www, _, data) = try rig()
    let nginx = try http.startNginx(serving: www)
    let nbdkit = try http.startNbdkitCurl(url: nginx.url("stream.bin"))
    print("nginx answered in \(nginx.startSeconds) s, nbdkit curl in \(nbdkit.startSeconds) s")

    let info = try RRTCommand.run("/usr/bin/nbdinfo", ["--size", nbdkit.uri], timeout: 20)
    XCTAssertEqual(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines), String(size), info.summary)
    RRTBytes.assertEqual(try copy(nbdkit.uri, to: "copy.bin", in: http), data, "the file through nbdkit curl")

    // Every GET asked a range and got it; together they moved the file once
    // (the curl plugin asks one byte more than each read, past the end of
    // none but the last).
    let requests = nginx.requests()
    let gets = requests.filter { $0.method == "GET" }
    XCTAssertTrue(gets.allSatisfy { $0.status == 206 && $0.byteRange != nil }, "\(gets)")
    XCTAssertTrue(requests.allSatisfy { $0.method == "GET" || ($0.method == "HEAD" && $0.bodyBytes == 0) })
    let body = gets.reduce(0) { $0 + $1.bodyBytes }
    XCTAssertGreaterThanOrEqual(body, size, "\(gets.count) GETs")
    XCTAssertLessThanOrEqual(body, size + gets.count, "\(gets.count) GETs")
    print(
      "nbdcopy of \(size) bytes: \(gets.count) GETs moving \(body) bytes of body, \(requests.count - gets.count) HEADs")

    // The NBD side: the log filter's reads, and the stats filter's once
    // nbdkit has exited.
    XCTAssertEqual(nbdkit.bytesRead(), size)
    let reads = nbdkit.reads()
    XCTAssertEqual(nbdkit.stop(), 0, nbdkit.errors)
    let stats = try nbdkit.stats()
    XCTAssertEqual(stats.readOps, reads.count, stats.text)
    XCTAssertEqual(stats.readBytes, Double(size), accuracy: Double(size) / 100, stats.text)
  }

  func testA64KiBReadMovesAbout64KiBOverHTTP() throws {
    try HTTPRig.require(nginx: true, nbdkitCurl: true)
    let (http, www, _, data) = try rig()
    let nginx = try http.startNginx(serving: www)
    let nbdkit = try http.startNbdkitCurl(url: nginx.url("stream.bin"))
    let before = nginx.requests().count

    let got = try pread(nbdkit.uri, rangeOffset, chunk, in: http)
    RRTBytes.assertEqual(got, data.subdata(in: rangeOffset..<rangeOffset + chunk), "64 KiB through nbdkit curl")
    let requests = Array(nginx.requests().dropFirst(before))
    let body = assertRangeRead(requests, "nginx")
    XCTAssertEqual(nbdkit.reads(), [NbdkitCurl.Read(offset: rangeOffset, count: chunk)])
    print(
      "a read of \(chunk) bytes moved \(body) bytes of body over HTTP: \(requests.map { "\($0.method) \($0.range)" })")

    XCTAssertEqual(nbdkit.stop(), 0, nbdkit.errors)
    let stats = try nbdkit.stats()
    XCTAssertEqual(stats.readOps, 1, stats.text)
    XCTAssertEqual(stats.readBytes, Double(chunk), accuracy: 16, stats.text)
  }

  func testNbdkitCurlOnAMissingFileDoesNotStart() throws {
    try HTTPRig.require(nginx: true, nbdkitCurl: true)
    let (http, www, _, _) = try rig()
    let nginx = try http.startNginx(serving: www)
    XCTAssertThrowsError(try http.startNbdkitCurl(url: nginx.url("missing.bin"))) { error in
      XCTAssertTrue("\(error)".contains("404"), "\(error)")
    }
    XCTAssertEqual(nginx.requests().last?.status, 404, "\(nginx.requests())")
  }

  // MARK: S3 (moto_server)

  func testAnObjectStoredInS3ReadsWholeAndByRange() throws {
    try HTTPRig.require(nginx: true, s3: true, nbdkitCurl: true)
    let (http, _, file, data) = try rig()
    let moto = try http.startMoto()
    var t = RRTEnv.monotonic()
    try moto.makeBucket("streams")
    let url = try moto.upload(file, bucket: "streams", key: "host-a/stream.bin")
    print(
      "moto_server answered in \(moto.startSeconds) s; bucket and upload of \(size) bytes in \(RRTEnv.monotonic() - t) s;"
        + " resident \(moto.residentKiB ?? -1) KiB")

    // Whole, straight from moto by an unsigned path-style URL.
    let direct = try http.startNbdkitCurl(url: url, name: "nbdkit-s3")
    RRTBytes.assertEqual(try copy(direct.uri, to: "copy.bin", in: http), data, "the object through nbdkit curl")
    XCTAssertEqual(direct.bytesRead(), size)

    // By range, through nginx in front of moto, which counts the bytes.
    let proxy = try http.startNginxProxy(to: moto.endpoint)
    let counted = try http.startNbdkitCurl(
      url: moto.objectURL(bucket: "streams", key: "host-a/stream.bin", base: proxy.baseURL), name: "nbdkit-proxied")
    let before = proxy.requests().count
    let got = try pread(counted.uri, rangeOffset, chunk, in: http)
    RRTBytes.assertEqual(got, data.subdata(in: rangeOffset..<rangeOffset + chunk), "64 KiB of the object")
    let requests = Array(proxy.requests().dropFirst(before))
    let body = assertRangeRead(requests, "moto through nginx")
    // moto itself answered with the range, not the whole object.
    for r in requests where r.method == "GET" {
      XCTAssertLessThanOrEqual(r.upstreamBytes ?? Int.max, r.bodyBytes + 4096, "\(r)")
    }
    print("a read of \(chunk) bytes of the S3 object moved \(body) bytes of body")

    // A presigned URL (query string and all) serves the same bytes.
    t = RRTEnv.monotonic()
    let signed = try moto.presignedURL(bucket: "streams", key: "host-a/stream.bin")
    XCTAssertTrue(signed.contains("Signature="), signed)
    let presigned = try http.startNbdkitCurl(url: signed, name: "nbdkit-presigned")
    RRTBytes.assertEqual(
      try pread(presigned.uri, rangeOffset, chunk, in: http), data.subdata(in: rangeOffset..<rangeOffset + chunk),
      "64 KiB by a presigned URL")
    print("presigned and read in \(RRTEnv.monotonic() - t) s; moto resident \(moto.residentKiB ?? -1) KiB")
  }
}
