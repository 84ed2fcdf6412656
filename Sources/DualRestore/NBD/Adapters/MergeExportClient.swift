// merge-snapshot's side of the `merge` export of a running
// restore-read-through (dualrestore-merge(5)): it names the stream so the
// server checks it against its own map before any block is sent, then
// sends the blocks, then asks the server to record a whole stream and say
// what it did with the blocks (merged, or left alone as current).

/// A merge into the `merge` export at an NBD URI.
public final class MergeExportClient: MergeSession {
  /// The URI as the user gave it, for sentences.
  public let uri: String
  private let timeout: Double

  /// Whether `uri` names the merge export (and not a plain NBD target).
  public static func names(_ uri: String) throws -> Bool {
    try NBDURI(uri).exportName == MergeExportName.exportName
  }

  public init(uri: String, timeout: Double = 60) {
    self.uri = uri
    self.timeout = timeout
  }

  public func open(for header: StreamFormat.Header, options: Merger.Options) throws -> BlockDevice {
    let admission = MergeAdmission(
      stream: header.streamID, base: header.isIncremental ? header.baseStreamID : .none, started: header.started,
      skew: options.clockSkewAllowance, force: options.force)
    return try connect(.admit(admission))
  }

  public func finish(stream: ID128, complete: Bool) throws -> MergeReport? {
    let client = try connect(complete ? .complete(stream) : .report(stream))
    defer { client.close() }
    // A server from before reports serves the device under every name.
    guard client.size == UInt64(MergeReport.length) else { return nil }
    var bytes = [UInt8](repeating: 0, count: MergeReport.length)
    try bytes.withUnsafeMutableBytes { try client.read(into: $0, at: 0) }
    do {
      let report = try MergeReport(decoding: bytes[...])
      guard report.stream == stream else {
        throw ToolkitError("\(uri): the server reported on stream \(report.stream), not \(stream)")
      }
      return report
    } catch let error as MergeReportError {
      throw ToolkitError("\(uri): the server's merge report is unusable: \(error)")
    }
  }

  /// Connects to the merge export under `name`; a refusal is the server's
  /// sentence, naming the URI as given.
  private func connect(_ name: MergeExportName) throws -> NBDClient {
    let named = Self.uri(uri, naming: name)
    do {
      return try NBDClient(uri: named, timeout: timeout)
    } catch let error as ToolkitError {
      // The server's own sentence, when it refused the name with one.
      if case .refused(let code, let words?) = error.cause, code != NBD.repErrUnknown {
        throw ToolkitError("\(uri): \(words)")
      }
      throw ToolkitError("\(uri): \(error.message.replacing(named, with: uri))")
    }
  }

  /// `uri` (whose export is `merge`) with the export name `name` asks for.
  static func uri(_ uri: String, naming name: MergeExportName) -> String {
    let parameters = name.encoded.dropFirst(MergeExportName.exportName.count)
    guard let q = uri.firstIndex(of: "?") else { return uri + parameters }
    return String(uri[..<q]) + parameters + String(uri[q...])
  }
}
