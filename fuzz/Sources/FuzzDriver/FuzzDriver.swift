// What every fuzz target shares: libFuzzer's driver, started from the
// target's own main (SwiftPM renames an executable's entry point, so
// libFuzzer cannot provide main itself), and one function per target that
// runs an input through the library's fuzz entry points.

import DualRestoreFuzz
import Glibc

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
  _ argc: UnsafeMutablePointer<CInt>,
  _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
  _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// The readers of hostile input, one fuzz target each.
public enum FuzzTarget: String, Sendable {
  case stream
  case streamEncrypted = "stream-encrypted"
  case map
  case ddrescue
  case signature
  case nbdServer = "nbd-server"
  case nbdClient = "nbd-client"
  case nbdClientStatus = "nbd-client-status"
  case mergeExport = "merge-export"
  case mirrorJournal = "mirror-journal"
  case mirrorPositions = "mirror-positions"
  case streamIndex = "stream-index"
  case history
  case markJournal = "mark-journal"
}

/// The key the encrypted stream seeds are made with (scripts/fuzz writes it).
public let fuzzStreamKey: [UInt8] = (1...32).map { UInt8($0) }

nonisolated(unsafe) private var selected = FuzzTarget.stream

/// Runs libFuzzer on `target` with the command line's options; does not return.
public func runFuzzer(_ target: FuzzTarget) -> Never {
  // A peer gone away is an error on its socket, as in the tools.
  signal(SIGPIPE, SIG_IGN)
  selected = target
  var argc = CommandLine.argc
  var argv = CommandLine.unsafeArgv
  exit(
    LLVMFuzzerRunDriver(&argc, &argv) { data, size in
      let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
      runOnce(selected, bytes)
      return 0
    })
}

/// One input through one target. The entry points return the error an input
/// was refused with; only traps and sanitizer reports are findings, plus
/// the few properties checked here.
public func runOnce(_ target: FuzzTarget, _ bytes: [UInt8]) {
  switch target {
  case .stream:
    _ = FuzzEntryPoints.parseStream(bytes)
    _ = FuzzEntryPoints.checkStream(bytes)
    // With the checksums right, mutations reach the checks behind them.
    let repaired = FuzzEntryPoints.repairStreamChecksums(bytes)
    let parsed = FuzzEntryPoints.parseStream(repaired)
    let checked = FuzzEntryPoints.checkStream(repaired)
    if checked == nil, let parsed {
      fatalError("the merge check accepted a stream the parser refuses: \(parsed)")
    }
  case .streamEncrypted:
    _ = FuzzEntryPoints.parseStream(bytes, key: fuzzStreamKey)
    _ = FuzzEntryPoints.checkStream(bytes, key: fuzzStreamKey)
    // The input as a plaintext stream, sealed with the key: mutations reach
    // what is checked after a record's tag.
    let plain = FuzzEntryPoints.repairStreamChecksums(bytes)
    if let sealed = try? FuzzEntryPoints.encryptStream(plain, key: fuzzStreamKey) {
      _ = FuzzEntryPoints.parseStream(sealed, key: fuzzStreamKey)
      _ = FuzzEntryPoints.checkStream(sealed, key: fuzzStreamKey)
    }
  case .map:
    _ = FuzzEntryPoints.decodeMap(bytes)
    _ = FuzzEntryPoints.decodeMap(FuzzEntryPoints.repairClosingChecksum(bytes))
  case .ddrescue:
    _ = FuzzEntryPoints.importDdrescueMapfile(bytes)
  case .signature:
    _ = FuzzEntryPoints.readSignature(bytes)
    _ = FuzzEntryPoints.readSignature(FuzzEntryPoints.repairClosingChecksum(bytes))
  case .nbdServer:
    _ = FuzzEntryPoints.serveNBD(bytes)
  case .nbdClient:
    _ = FuzzEntryPoints.negotiateNBD(bytes)
  case .nbdClientStatus:
    _ = FuzzEntryPoints.negotiateNBD(bytes, allocation: true)
  case .mergeExport:
    _ = FuzzEntryPoints.parseMergeExportName(bytes)
    _ = FuzzEntryPoints.decodeMergeReport(bytes)
    _ = FuzzEntryPoints.decodeMergeReport(FuzzEntryPoints.repairMergeReportChecksum(bytes))
  case .mirrorJournal:
    _ = FuzzEntryPoints.scanMirrorJournal(bytes)
    _ = FuzzEntryPoints.scanMirrorJournal(FuzzEntryPoints.repairMirrorJournalChecksums(bytes))
  case .mirrorPositions:
    _ = FuzzEntryPoints.decodeMirrorPositions(bytes)
    _ = FuzzEntryPoints.decodeMirrorPositions(FuzzEntryPoints.repairMirrorPositionsChecksum(bytes))
  case .streamIndex:
    _ = FuzzEntryPoints.decodeStreamIndex(bytes)
    _ = FuzzEntryPoints.decodeStreamIndex(FuzzEntryPoints.repairStreamIndexChecksums(bytes))
  case .history:
    _ = FuzzEntryPoints.scanHistoryFile(bytes)
    _ = FuzzEntryPoints.scanHistoryFile(FuzzEntryPoints.repairHistoryChecksums(bytes))
  case .markJournal:
    _ = FuzzEntryPoints.scanMarkJournal(bytes)
    _ = FuzzEntryPoints.scanMarkJournal(FuzzEntryPoints.repairMarkJournalChecksums(bytes))
  }
}
