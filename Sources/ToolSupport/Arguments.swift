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
}
