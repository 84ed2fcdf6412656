// The options of asynchronous mirroring, shared by the servers that keep far
// copies: --ack, --journal, --max-lag.

import ArgumentParser
import DualRestore

/// `--ack all|local|quorum=K`.
public struct AckPolicy: ExpressibleByArgument, Sendable, Equatable, CustomStringConvertible {
  public var value: MirrorSettings.Ack

  public init(_ value: MirrorSettings.Ack) { self.value = value }

  public init?(argument: String) {
    switch argument {
    case "all": value = .all
    case "local": value = .local
    default:
      guard argument.hasPrefix("quorum="), let k = Int(argument.dropFirst("quorum=".count)), k >= 1, k <= 64 else {
        return nil
      }
      value = .quorum(k)
    }
  }

  public var description: String {
    switch value {
    case .all: return "all"
    case .local: return "local"
    case .quorum(let k): return "quorum=\(k)"
    }
  }

  public var defaultValueDescription: String { description }
  public static var allValueStrings: [String] { ["all", "local", "quorum=K"] }
}

/// One `--max-lag` value: bytes (`512M`) or seconds (`30s`).
public struct LagLimit: ExpressibleByArgument, Sendable, Equatable {
  public var bytes: UInt64?
  public var seconds: Double?

  public init?(argument: String) {
    if argument.hasSuffix("s"), let s = Double(argument.dropLast()), s > 0, s <= 86400 * 365 {
      seconds = s
    } else if let b = parseByteCount(argument), b > 0 {
      bytes = b
    } else {
      return nil
    }
  }
}

public struct MirrorOptions: ParsableArguments {
  @Option(
    help: ArgumentHelp(
      "When a write is acknowledged: all (once the far copies hold it), local (once the primary and the journal do; "
        + "the far copies are brought up to date in the background), or quorum=K (as local, and a flush waits until "
        + "K far copies hold it).", valueName: "policy"))
  public var ack = AckPolicy(.all)

  @Option(
    help: ArgumentHelp(
      "The mirror journal of --ack local or quorum (default: MAP.mirror beside the map).", valueName: "path"))
  public var journal: String?

  @Option(
    help: ArgumentHelp(
      "Writes wait while the far copies owe this much: bytes of journal (K, M, G; default 1G) or seconds since "
        + "the oldest change they lack (30s); repeat for both.", valueName: "limit"))
  public var maxLag: [LagLimit] = []

  public init() {}

  public func validate() throws {
    if ack.value == .all {
      if journal != nil { throw ValidationError("--journal needs --ack local or --ack quorum=K") }
      if !maxLag.isEmpty { throw ValidationError("--max-lag needs --ack local or --ack quorum=K") }
    }
    if maxLag.filter({ $0.bytes != nil }).count > 1 || maxLag.filter({ $0.seconds != nil }).count > 1 {
      throw ValidationError("--max-lag takes at most one size and one duration")
    }
  }

  /// The settings for a map at `mapPath` (nil: synchronous mirroring).
  public func settings(mapPath: String) -> MirrorSettings? {
    guard ack.value != .all else { return nil }
    let bytes = maxLag.compactMap(\.bytes).first ?? (1 << 30)
    let seconds = maxLag.compactMap(\.seconds).first ?? 0
    return MirrorSettings(
      ack: ack.value, journalPath: journal ?? mapPath + ".mirror", bound: MirrorLagBound(bytes: bytes, seconds: seconds)
    )
  }
}
