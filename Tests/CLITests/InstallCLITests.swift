// The toolkit's pages as a reader meets them: every page in man/ renders
// without a warning from groff or mandoc, and as the command is typed.

import Foundation
import XCTest

final class InstallCLITests: XCTestCase {
  /// The repository: this file is Tests/CLITests/InstallCLITests.swift.
  static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent()

  /// The executable products of Package.swift.
  static func commands() throws -> [String] {
    let manifest = try String(
      contentsOf: repository.appendingPathComponent("Package.swift"), encoding: .utf8)
    let regex = try NSRegularExpression(pattern: #"\.executable\(name: "([^"]+)""#)
    return regex.matches(in: manifest, range: NSRange(manifest.startIndex..., in: manifest)).compactMap {
      Range($0.range(at: 1), in: manifest).map { String(manifest[$0]) }
    }
  }

  /// The pages in man/, e.g. "snapshot.1" and "dualrestore-map.5".
  static func pages() throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: repository.appendingPathComponent("man").path)
      .filter { $0.range(of: #"\.[1-9]$"#, options: .regularExpression) != nil }.sorted()
  }

  func testEveryManPageLintsCleanAndShowsTheCommandAsTyped() throws {
    let lint = try Tools.runProcess(
      Self.repository.appendingPathComponent("scripts/generate-docs").path, ["--lint"], stdin: nil, cwd: nil)
    XCTAssertEqual(lint.status, 0, "scripts/generate-docs --lint:\n\(lint.stderr)")
    XCTAssertTrue(lint.text.contains("man lint: \(try Self.pages().count) passed, 0 failed"), lint.text + lint.stderr)

    let withSubcommands: Set<String> = ["overwrite-map", "tracking-server"]
    for command in try Self.commands() {
      let page = Self.repository.appendingPathComponent("man/\(command).1").path
      let shown = try Tools.shell("MANWIDTH=200 man -l '\(page)'")
      XCTAssertEqual(shown.status, 0, shown.stderr)
      XCTAssertFalse(shown.text.contains("`"), "\(command).1 shows a backtick")
      guard let heading = shown.lines.firstIndex(of: "SYNOPSIS"), heading + 1 < shown.lines.count else {
        XCTFail("\(command).1 has no SYNOPSIS")
        continue
      }
      let synopsis = shown.lines[heading + 1].trimmingCharacters(in: .whitespaces)
      XCTAssertTrue(synopsis.hasPrefix(command + " "), "\(command).1: \(synopsis)")
      XCTAssertEqual(
        synopsis.hasPrefix(command + " subcommand"), withSubcommands.contains(command), "\(command).1: \(synopsis)")
    }
  }
}
