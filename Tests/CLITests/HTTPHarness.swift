// The harness of the tests that read stored streams over HTTP: HTTPRig, one
// test's HTTP peers — nginx serving a directory (or proxying to another
// server) on a free loopback port, moto_server standing for an S3 object
// store, and nbdkit's curl plugin turning an HTTP object into a read-only
// NBD export on a private socket. Every peer has its configuration, logs
// and sockets in the rig's scratch directory, is started as a child of the
// test (RRTChild, TestSupport/Processes.swift), is waited for until it
// answers, and is stopped by its own pid in stopAll(), however the test
// ends. What crossed each link is counted at the far end: nginx's access
// log (bytes of body sent per request, with the Range asked) for HTTP,
// nbdkit's log and stats filters for NBD.

import Foundation
import Glibc
import TestSupport
import XCTest

/// One test's HTTP peers, all stopped by `stopAll()` (and when the rig goes).
final class HTTPRig {
  let s: Scratch
  /// Every peer started, in order; stopped in reverse order.
  private(set) var children: [RRTChild] = []
  private var names = Set<String>()

  /// A rig with its files in `scratch` (another rig's, so that one test's
  /// files are in one place) or in a scratch directory of its own.
  init(scratch: Scratch? = nil) throws {
    s = try scratch ?? Scratch()
  }

  deinit { stopAll() }

  /// Stops every peer by its pid, in the reverse order of their starts (an
  /// NBD server before the HTTP server it reads).
  func stopAll() {
    for c in children.reversed() where c.isRunning { c.stop(grace: 10) }
    children = []
  }

  /// Skips the test when nginx, moto_server and aws, curl, or nbdkit's curl
  /// plugin are missing (scripts/setup installs them).
  static func require(nginx: Bool = false, s3: Bool = false, nbdkitCurl: Bool = false) throws {
    var programs = ["curl"]
    if nginx { programs.append("nginx") }
    if s3 { programs += ["moto_server", "aws"] }
    if nbdkitCurl { programs.append("nbdkit") }
    for p in programs where !RRTEnv.have(p) {
      throw XCTSkip("\(p) is not installed (needed by this test; scripts/setup installs it)")
    }
    if nbdkitCurl, (try? RRTCommand.run("/usr/bin/nbdkit", ["curl", "--version"], timeout: 20))?.status != 0 {
      throw XCTSkip("nbdkit's curl plugin is not installed (needed by this test; scripts/setup installs it)")
    }
  }

  /// A directory of the scratch directory for one peer, named `name`
  /// (unique within the rig).
  fileprivate func peerDirectory(_ name: String) throws -> String {
    guard !names.contains(name) else { throw RRTError("the rig already has a peer named \(name)") }
    names.insert(name)
    let dir = s.path(name)
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
  }

  fileprivate func adopt(_ child: RRTChild) { children.append(child) }

  // MARK: Starting peers

  /// nginx serving the files of `root` (read-only, byte ranges honoured) on
  /// a free port of 127.0.0.1.
  @discardableResult
  func startNginx(serving root: String, name: String = "nginx") throws -> NginxServer {
    try NginxServer(rig: self, name: name, site: "root \(NginxServer.quoted(root));")
  }

  /// nginx passing every request (Range included) to `upstream` (e.g. a
  /// MotoS3's endpoint), so that what a server without a byte log sends is
  /// counted in nginx's access log.
  @discardableResult
  func startNginxProxy(to upstream: String, name: String = "nginx-proxy") throws -> NginxServer {
    try NginxServer(rig: self, name: name, site: "location / { proxy_pass \(upstream); }")
  }

  /// moto_server, an S3 API server, on a free port of 127.0.0.1.
  @discardableResult
  func startMoto(name: String = "moto") throws -> MotoS3 {
    try MotoS3(rig: self, name: name)
  }

  /// nbdkit's curl plugin serving `url` read-only on a Unix socket of the
  /// scratch directory, with the log and stats filters counting what NBD
  /// clients read; `filters` go between those and the plugin, `parameters`
  /// (key=value, for those filters or the plugin) after the URL.
  @discardableResult
  func startNbdkitCurl(url: String, name: String = "nbdkit-curl", filters: [String] = [], parameters: [String] = [])
    throws -> NbdkitCurl
  {
    try NbdkitCurl(rig: self, name: name, url: url, filters: filters, parameters: parameters)
  }

  // MARK: Shared

  /// A file's content as text (invalid UTF-8 replaced), "" when missing.
  static func text(_ path: String) -> String {
    String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: path))) ?? Data(), as: UTF8.self)
  }

  /// A port of 127.0.0.1 free when asked (the kernel's choice for port 0).
  static func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw RRTError("no socket for a free port: errno \(errno)") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
      }
    }
    guard ok else { throw RRTError("no free port on 127.0.0.1: errno \(errno)") }
    return Int(UInt16(bigEndian: addr.sin_port))
  }

  /// The environment of the HTTP clients: loopback never through a proxy.
  static let noProxy = ["no_proxy=127.0.0.1,localhost", "NO_PROXY=127.0.0.1,localhost"]

  /// The HTTP status of a GET (or a HEAD) with curl, 0 when nothing
  /// answered.
  static func httpStatus(_ url: String, head: Bool = false, agent: String = NginxServer.probeAgent) -> Int {
    let r = try? RRTCommand.run(
      "/usr/bin/env",
      noProxy + ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-A", agent, "--max-time", "5"]
        + (head ? ["-I"] : []) + [url], timeout: 10)
    return Int(r?.stdout.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 0
  }

  /// Starts a peer on a free port, trying another port when the one chosen
  /// was taken in between (by another test's server).
  fileprivate static func onFreePort(
    _ what: String, tries: Int = 3, start: (Int) throws -> RRTChild, portTaken: (RRTChild) -> Bool
  ) throws -> (Int, RRTChild) {
    var last = ""
    for _ in 0..<tries {
      let port = try freePort()
      let child = try start(port)
      if portTaken(child) {
        last = child.errors
        child.stop(grace: 5)
        continue
      }
      return (port, child)
    }
    throw RRTError("\(what) found no free port in \(tries) tries: \(last)")
  }
}

/// nginx serving a directory or proxying to a server, with its own
/// configuration, pid file, access log and error log in its directory of the
/// scratch directory. One process (no workers), so its pid is all there is
/// to stop.
final class NginxServer {
  let name: String
  let port: Int
  let child: RRTChild
  /// Its directory: nginx.conf, nginx.pid, access.log, error.log, temp/.
  let dir: String
  /// Seconds from the start until it answered.
  let startSeconds: Double

  /// http://127.0.0.1:PORT (no slash at the end).
  var baseURL: String { "http://127.0.0.1:\(port)" }
  /// The URL of `path` (a file of the served directory, or a path of the
  /// upstream), slashes at the start ignored.
  func url(_ path: String) -> String {
    baseURL + "/" + String(path.drop(while: { $0 == "/" }))
  }
  var configPath: String { dir + "/nginx.conf" }
  var accessLogPath: String { dir + "/access.log" }
  var errorLogPath: String { dir + "/error.log" }
  var errorLog: String { HTTPRig.text(errorLogPath) }

  /// The user agent of the harness's own requests (the readiness probe),
  /// left out of `requests()`.
  static let probeAgent = "dualrestore-harness-probe"

  fileprivate init(rig: HTTPRig, name: String, site: String) throws {
    let dir = try rig.peerDirectory(name)
    try FileManager.default.createDirectory(atPath: dir + "/temp", withIntermediateDirectories: true)
    self.name = name
    self.dir = dir
    let started = RRTEnv.monotonic()
    (port, child) = try HTTPRig.onFreePort(
      "nginx",
      start: { port in
        try NginxServer.config(dir: dir, port: port, site: site).write(
          toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
        let child = try RRTChild(
          name: name, executable: "/usr/sbin/nginx",
          arguments: ["-p", dir + "/", "-c", dir + "/nginx.conf", "-e", dir + "/error.log"],
          stdout: dir + "/nginx.out", stderr: dir + "/nginx.out")
        rig.adopt(child)
        try NginxServer.waitUntilAnswering(child, "http://127.0.0.1:\(port)/", dir: dir)
        return child
      },
      portTaken: { !$0.isRunning && HTTPRig.text(dir + "/error.log").contains("Address already in use") })
    guard child.isRunning else {
      throw RRTError(
        "nginx ended with status \(child.wait(timeout: 1) ?? -1) before serving: \(HTTPRig.text(dir + "/error.log"))"
          + child.output)
    }
    startSeconds = RRTEnv.monotonic() - started
  }

  static func quoted(_ s: String) -> String {
    "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
  }

  /// The whole configuration: one process in the foreground, every path in
  /// `dir`, a JSON line per request in access.log.
  static func config(dir: String, port: Int, site: String) -> String {
    let d = { quoted(dir + "/" + $0) }
    return """
      daemon off;
      master_process off;
      pid \(d("nginx.pid"));
      error_log \(d("error.log")) notice;
      events { worker_connections 256; }
      http {
        log_format harness escape=json '{"method":"$request_method","uri":"$request_uri","status":$status,'
          '"body":$body_bytes_sent,"sent":$bytes_sent,"range":"$http_range","agent":"$http_user_agent",'
          '"upstream":"$upstream_bytes_received"}';
        access_log \(d("access.log")) harness;
        client_body_temp_path \(d("temp/body"));
        proxy_temp_path \(d("temp/proxy"));
        fastcgi_temp_path \(d("temp/fastcgi"));
        uwsgi_temp_path \(d("temp/uwsgi"));
        scgi_temp_path \(d("temp/scgi"));
        types { }
        default_type application/octet-stream;
        sendfile on;
        keepalive_requests 100000;
        server {
          listen 127.0.0.1:\(port);
          server_name localhost;
          \(site)
        }
      }

      """
  }

  /// Waits until this nginx answers an HTTP request (any status): its pid
  /// file names it (written once it holds the port, so the answer is not
  /// another server's that took the port first), and the request is answered.
  fileprivate static func waitUntilAnswering(_ child: RRTChild, _ url: String, dir: String) throws {
    let end = RRTEnv.monotonic() + 20
    while RRTEnv.monotonic() < end {
      if !child.isRunning { return }  // the caller tells a taken port from another failure
      let pid = HTTPRig.text(dir + "/nginx.pid").trimmingCharacters(in: .whitespacesAndNewlines)
      if pid == String(child.pid), HTTPRig.httpStatus(url, head: true) != 0 { return }
      RRTEnv.sleep(0.02)
    }
    throw RRTError("nginx did not answer \(url) within 20 s: \(HTTPRig.text(dir + "/error.log"))")
  }

  /// One request as the access log has it.
  struct Request: Equatable {
    var method: String
    /// The request's path and query.
    var uri: String
    var status: Int
    /// Bytes of body sent (headers not counted).
    var bodyBytes: Int
    /// Bytes sent in all, headers included.
    var bytesSent: Int
    /// The Range header asked, or "" when none.
    var range: String
    var agent: String
    /// Bytes received from the upstream when proxying (headers included), else nil.
    var upstreamBytes: Int?

    /// The first and last byte of a single `bytes=A-B` range, or nil.
    var byteRange: ClosedRange<Int>? {
      guard range.hasPrefix("bytes="), !range.contains(",") else { return nil }
      let parts = range.dropFirst(6).split(separator: "-", omittingEmptySubsequences: false)
      guard parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]), a <= b else { return nil }
      return a...b
    }
  }

  /// Every request served since the start but the harness's own probes,
  /// in order, once the log has stopped growing (nginx writes a request's
  /// line just after its last byte is sent).
  func requests(file: StaticString = #filePath, line: UInt = #line) -> [Request] {
    var text = HTTPRig.text(accessLogPath)
    for _ in 0..<40 {
      RRTEnv.sleep(0.05)
      let again = HTTPRig.text(accessLogPath)
      if again == text { break }
      text = again
    }
    var out: [Request] = []
    for l in text.split(separator: "\n") {
      guard let o = try? JSONSerialization.jsonObject(with: Data(l.utf8)) as? [String: Any],
        let method = o["method"] as? String, let uri = o["uri"] as? String, let status = o["status"] as? Int,
        let body = o["body"] as? Int, let sent = o["sent"] as? Int
      else {
        XCTFail("\(name): an access log line that is not the harness's JSON: \(l)", file: file, line: line)
        continue
      }
      let agent = o["agent"] as? String ?? ""
      if agent == NginxServer.probeAgent { continue }
      out.append(
        Request(
          method: method, uri: uri, status: status, bodyBytes: body, bytesSent: sent,
          range: o["range"] as? String ?? "", agent: agent, upstreamBytes: Int(o["upstream"] as? String ?? "")))
    }
    return out
  }

  /// The bytes of body sent for every request since the start (or for the
  /// requests after the first `after`), probes left out.
  func bodyBytesSent(after: Int = 0, file: StaticString = #filePath, line: UInt = #line) -> Int {
    requests(file: file, line: line).dropFirst(after).reduce(0) { $0 + $1.bodyBytes }
  }

  /// SIGTERM (nginx's fast shutdown); the exit status.
  @discardableResult
  func stop() -> Int32? { child.stop(grace: 10) }
}

/// moto_server on a free port of 127.0.0.1, an S3 API server keeping its
/// buckets in its own memory (objects past a few MiB spill to temporary
/// files), gone when it stops. `aws` talks to it with fixed test
/// credentials. moto checks no signature's value, but an object uploaded
/// in one piece (under aws's 8 MiB multipart threshold) is private: an
/// unsigned path-style GET of it gets 403 unless it was uploaded public-read.
/// Presigned URLs read any object; Range is honoured.
final class MotoS3 {
  let name: String
  let port: Int
  let child: RRTChild
  let dir: String
  /// Seconds from the start until it answered.
  let startSeconds: Double

  /// http://127.0.0.1:PORT, the --endpoint-url of aws.
  var endpoint: String { "http://127.0.0.1:\(port)" }
  var logPath: String { dir + "/moto.log" }
  var log: String { HTTPRig.text(logPath) }
  /// The region and the credentials aws uses (moto accepts any).
  static let region = "us-east-1"
  static let credentials = ["AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing"]

  fileprivate init(rig: HTTPRig, name: String) throws {
    let dir = try rig.peerDirectory(name)
    self.name = name
    self.dir = dir
    let started = RRTEnv.monotonic()
    (port, child) = try HTTPRig.onFreePort(
      "moto_server",
      start: { port in
        let child = try RRTChild(
          name: name, executable: "/usr/bin/env",
          arguments: HTTPRig.noProxy + ["moto_server", "-H", "127.0.0.1", "-p", String(port)],
          stdout: dir + "/moto.log", stderr: dir + "/moto.log", cwd: dir)
        rig.adopt(child)
        // Its log says it listens once it holds the port; then it answers.
        let end = RRTEnv.monotonic() + 60
        while child.isRunning {
          if child.output.contains("Running on http://127.0.0.1:\(port)"),
            HTTPRig.httpStatus("http://127.0.0.1:\(port)/moto-api/") == 200
          {
            return child
          }
          if RRTEnv.monotonic() >= end {
            throw RRTError("moto_server did not answer within 60 s: \(child.output)")
          }
          RRTEnv.sleep(0.1)
        }
        return child
      },
      portTaken: { !$0.isRunning && $0.output.contains("in use") })
    guard child.isRunning else {
      throw RRTError("moto_server ended with status \(child.wait(timeout: 1) ?? -1): \(child.output)")
    }
    startSeconds = RRTEnv.monotonic() - started
  }

  /// Runs `aws --endpoint-url ENDPOINT ARGUMENTS` with the test credentials
  /// and no configuration but the environment's.
  func aws(_ arguments: [String], timeout: Double = 120) throws -> RRTCommand.Result {
    try RRTCommand.run(
      "/usr/bin/env",
      HTTPRig.noProxy + MotoS3.credentials + [
        "AWS_DEFAULT_REGION=\(MotoS3.region)", "AWS_CONFIG_FILE=\(dir)/no-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE=\(dir)/no-aws-credentials", "AWS_EC2_METADATA_DISABLED=true", "aws",
        "--endpoint-url", endpoint,
      ] + arguments, timeout: timeout, cwd: dir)
  }

  /// Creates a bucket (a valid S3 bucket name: 3 to 63 lower-case letters,
  /// digits, dots and hyphens).
  func makeBucket(_ bucket: String) throws {
    let r = try aws(["s3", "mb", "s3://\(bucket)"])
    guard r.status == 0 else { throw RRTError("aws s3 mb s3://\(bucket) failed: \(r.summary)") }
  }

  /// Uploads a file as `key` of `bucket` (aws s3 cp; multipart past 8 MiB)
  /// and returns the object's URL.
  @discardableResult
  func upload(_ file: String, bucket: String, key: String) throws -> String {
    let r = try aws(["s3", "cp", "--only-show-errors", file, "s3://\(bucket)/\(key)"])
    guard r.status == 0 else { throw RRTError("aws s3 cp \(file) s3://\(bucket)/\(key) failed: \(r.summary)") }
    return objectURL(bucket: bucket, key: key)
  }

  /// The path-style URL of an object, for unsigned GETs and HEADs (of an
  /// object uploaded public-read or in parts).
  func objectURL(bucket: String, key: String, base: String? = nil) -> String {
    (base ?? endpoint) + "/" + bucket + "/" + key
  }

  /// A presigned GET URL (aws s3 presign), as a real store would need.
  func presignedURL(bucket: String, key: String, expiresIn seconds: Int = 3600) throws -> String {
    let r = try aws(["s3", "presign", "s3://\(bucket)/\(key)", "--expires-in", String(seconds)])
    guard r.status == 0 else { throw RRTError("aws s3 presign s3://\(bucket)/\(key) failed: \(r.summary)") }
    return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
  }

  /// Its resident memory in KiB (VmRSS), or nil when it is gone.
  var residentKiB: Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(child.pid)/status", encoding: .utf8) else { return nil }
    for l in status.split(separator: "\n") where l.hasPrefix("VmRSS:") {
      return Int(l.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
    return nil
  }

  @discardableResult
  func stop() -> Int32? { child.stop(grace: 10) }
}

/// nbdkit -r --filter=log --filter=stats curl url=URL on a Unix socket: an
/// HTTP object as a read-only NBD export. nbdkit 1.32's curl plugin asks
/// the size with a HEAD when each NBD connection opens, and each NBD read
/// of N bytes at offset O with one GET of `Range: bytes=O-(O+N)` — one byte
/// more than asked, which it drops (none past the object's end); it reads
/// nothing ahead.
final class NbdkitCurl {
  let name: String
  let url: String
  let child: RRTChild
  let dir: String
  /// Seconds from the start until the export answered.
  let startSeconds: Double

  var socket: String { dir + "/nbd.sock" }
  /// nbd+unix:///?socket=SOCK
  var uri: String { "nbd+unix:///?socket=\(socket)" }
  /// The stats filter's file, written when nbdkit exits (appended to).
  var statsPath: String { dir + "/stats.txt" }
  /// The log filter's file: a line per NBD request and reply.
  var requestLogPath: String { dir + "/requests.log" }
  var errorsPath: String { dir + "/nbdkit.log" }
  var errors: String { HTTPRig.text(errorsPath) }

  fileprivate init(rig: HTTPRig, name: String, url: String, filters: [String], parameters: [String]) throws {
    self.name = name
    self.url = url
    dir = try rig.peerDirectory(name)
    let started = RRTEnv.monotonic()
    let arguments =
      HTTPRig.noProxy + ["/usr/bin/nbdkit", "-f", "-r", "-U", dir + "/nbd.sock", "--filter=log", "--filter=stats"]
      + filters.map { "--filter=\($0)" } + [
        "curl", "url=\(url)", "statsfile=\(dir)/stats.txt", "statsappend=true", "logfile=\(dir)/requests.log",
      ] + parameters
    child = try RRTChild(
      name: name, executable: "/usr/bin/env", arguments: arguments, stdout: dir + "/nbdkit.out",
      stderr: dir + "/nbdkit.log")
    rig.adopt(child)
    let uri = "nbd+unix:///?socket=\(dir)/nbd.sock"
    let end = RRTEnv.monotonic() + 20
    while true {
      if !child.isRunning {
        let status = child.wait(timeout: 1) ?? -1
        throw RRTError("nbdkit curl \(url) ended with status \(status) before serving: \(child.errors)")
      }
      if FileManager.default.fileExists(atPath: dir + "/nbd.sock") {
        let r = try RRTCommand.run("/usr/bin/nbdinfo", ["--size", uri], timeout: 10)
        if r.status == 0 { break }
        // Listening, but the plugin could not open the URL (a HEAD that failed).
        if child.errors.contains("error") {
          throw RRTError("nbdkit curl \(url) cannot serve it: \(child.errors)")
        }
      }
      if RRTEnv.monotonic() >= end { throw RRTError("nbdkit curl \(url) did not answer within 20 s: \(child.errors)") }
      RRTEnv.sleep(0.05)
    }
    startSeconds = RRTEnv.monotonic() - started
  }

  /// One NBD read as the log filter has it.
  struct Read: Equatable {
    var offset: Int
    var count: Int
  }

  /// Every NBD read clients asked so far (exact; readable while it runs).
  func reads() -> [Read] {
    var out: [Read] = []
    for l in HTTPRig.text(requestLogPath).split(separator: "\n") where l.contains(" Read id=") {
      var offset: Int?
      var count: Int?
      for field in l.split(separator: " ") {
        if field.hasPrefix("offset=0x") { offset = Int(field.dropFirst(9), radix: 16) }
        if field.hasPrefix("count=0x") { count = Int(field.dropFirst(8), radix: 16) }
      }
      if let offset, let count { out.append(Read(offset: offset, count: count)) }
    }
    return out
  }

  /// The bytes NBD clients read so far (exact, from the log filter).
  func bytesRead() -> Int { reads().reduce(0) { $0 + $1.count } }

  /// The stats filter's totals: reads and their bytes as nbdkit prints them
  /// (two decimals of the unit it picks: 65536 is "64.00 KiB"; exact under
  /// 1 KiB), summed over every run that appended to the file.
  struct Stats: Equatable {
    var readOps: Int
    var readBytes: Double
    /// The file as written.
    var text: String
  }

  /// The stats file, once nbdkit has exited (call `stop()` first).
  func stats() throws -> Stats {
    guard !child.isRunning else { throw RRTError("nbdkit writes its stats file only when it exits; stop it first") }
    let text = HTTPRig.text(statsPath)
    guard text.contains("total:") else { throw RRTError("no stats in \(statsPath): \(text.debugDescription)") }
    var stats = Stats(readOps: 0, readBytes: 0, text: text)
    let units: [String: Double] = [
      "bytes": 1, "KiB": 0x1p10, "MiB": 0x1p20, "GiB": 0x1p30, "TiB": 0x1p40, "PiB": 0x1p50, "EiB": 0x1p60,
    ]
    for l in text.split(separator: "\n") where l.hasPrefix("read:") {
      // read: 32 ops, 0.020959 s, 8.00 MiB, 381.70 MiB/s op, 13.24 MiB/s total
      let fields = l.dropFirst(5).split(separator: ",").map { $0.split(separator: " ") }
      guard fields.count >= 3, fields[0].count == 2, let ops = Int(fields[0][0]), fields[2].count == 2,
        let amount = Double(fields[2][0]), let unit = units[String(fields[2][1])]
      else { throw RRTError("a stats line of nbdkit not understood: \(l)") }
      stats.readOps += ops
      stats.readBytes += amount * unit
    }
    return stats
  }

  /// SIGTERM: nbdkit closes its connections, writes its stats file and
  /// exits 0; the exit status.
  @discardableResult
  func stop() -> Int32? { child.stop(grace: 10) }
}
