// Argument types shared by the executables.

import ArgumentParser
import DualRestore

/// A byte count as people write it: `4096`, `64K`, `1GiB`, `500MB`.
public struct ByteCount: ExpressibleByArgument, Sendable, CustomStringConvertible {
  public var value: UInt64

  public init(_ value: UInt64) { self.value = value }

  public init?(argument: String) {
    guard let v = parseByteCount(argument) else { return nil }
    value = v
  }

  public var description: String {
    if value >= 1024, value % (1 << 20) == 0 { return "\(value >> 20)M" }
    if value >= 1024, value % 1024 == 0 { return "\(value >> 10)K" }
    return String(value)
  }

  public var defaultValueDescription: String { description }
}

/// The `--block-size` option with its checks.
public struct BlockSizeOption: ParsableArguments {
  @Option(
    name: .customLong("block-size"),
    help: ArgumentHelp(
      "Block size: a power of two from 512 to 64M (K, M: powers of 1024).",
      valueName: "bytes"))
  public var blockSize: ByteCount?

  public init() {}

  public func validate() throws {
    if let blockSize {
      do { try BlockGeometry.validate(blockSize: blockSize.value) } catch {
        throw ValidationError("\(error)")
      }
    }
  }

  /// The block size given, or the default (64 KiB).
  public var value: UInt32 { blockSize.map { UInt32($0.value) } ?? BlockGeometry.defaultBlockSize }
}

extension MapMeaning: ExpressibleByArgument {
  public init?(argument: String) { self.init(name: argument) }
  public static var allValueStrings: [String] { allCases.map(\.description) }
  public var defaultValueDescription: String { description }
  public static var allValueDescriptions: [String: String] {
    [
      "current": "the block holds current data (an overwrite map; the default)",
      "differs": "the block differs between two sources",
      "changed": "the block was written since tracking started (a change map)",
      "selected": "the block is selected",
    ]
  }
}

/// `--progress` and `--quiet`, shared by the tools that read whole devices.
public struct ProgressOptions: ParsableArguments {
  @Flag(help: "Show progress on standard error (default when it is a terminal).")
  public var progress = false

  @Flag(name: .shortAndLong, help: "Print nothing on standard error but errors and warnings.")
  public var quiet = false

  public init() {}

  /// Whether to show progress: asked for, or stderr is a terminal, and not quiet.
  public var show: Bool { !quiet && (progress || ProgressMeter.stderrIsTerminal) }
}

/// `--threads N`: how many cores the tool may keep busy.
public struct ThreadsOption: ParsableArguments {
  @Option(help: ArgumentHelp("Worker threads (default: one per core).", valueName: "n"))
  public var threads: Int?

  public init() {}

  public func validate() throws {
    if let threads, threads < 1 || threads > 256 {
      throw ValidationError("--threads \(threads) is out of range (1 to 256)")
    }
  }

  public var value: Int { threads ?? BlockHasher.defaultWorkers }
}

/// A span of time as people write it: `90s`, `30m`, `24h`, `7d`, `2w`.
public struct TimeSpan: ExpressibleByArgument, Sendable, CustomStringConvertible {
  public var seconds: Double

  public init?(argument: String) {
    let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800]
    guard let unit = argument.last, let scale = units[unit], let v = Double(argument.dropLast()), v > 0,
      v * scale <= 86400 * 366 * 100
    else { return nil }
    seconds = v * scale
  }

  public var description: String { "\(seconds)s" }
}
