// The toolkit as a packager installs it and a reader meets its pages:
// scripts/install puts every command, man page and completion under
// DESTDIR+PREFIX where PATH, man, bash, zsh and fish look, and its uninstall
// takes back exactly those files; every page in man/ renders without a
// warning from groff or mandoc, and as the command is typed.

import Foundation
import TestSupport
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

  /// Every regular file and symbolic link under `root`, as paths relative to it.
  static func files(under root: URL) throws -> Set<String> {
    let found = try RRTCommand.shell("cd '\(root.path)' && find . -type f -o -type l")
    XCTAssertEqual(found.status, 0, found.stderr)
    return Set(found.lines.map { String($0.dropFirst(2)) })
  }

  func install(_ arguments: [String], destdir: String, prefix: String = "/usr") throws -> RRTCommand.Result {
    let script = Self.repository.appendingPathComponent("scripts/install").path
    return try RRTCommand.run(
      "/usr/bin/env", ["DESTDIR=\(destdir)", "PREFIX=\(prefix)", script] + arguments)
  }

  func testInstallPutsEveryCommandPageAndCompletionInPlaceAndUninstallRemovesExactlyThem() throws {
    let s = try Scratch()
    let destdir = s.path("stage")
    let commands = try Self.commands()
    let pages = try Self.pages()
    XCTAssertEqual(commands.count, 7, "executable products: \(commands)")
    XCTAssertFalse(commands.contains("map-bench"))
    XCTAssertTrue(pages.contains("dualrestore.7") && pages.contains("dualrestore-stream.5"), "\(pages)")

    let installed = try install(["--from", Tools.binDirectory.path], destdir: destdir)
    XCTAssertEqual(installed.status, 0, installed.stderr)

    let prefix = URL(fileURLWithPath: destdir + "/usr")
    var expected: [String: (source: URL, mode: Int)] = [:]
    for command in commands {
      expected["bin/\(command)"] = (Tools.binDirectory.appendingPathComponent(command), 0o755)
      let completions = Self.repository.appendingPathComponent("completions")
      expected["share/bash-completion/completions/\(command)"] = (
        completions.appendingPathComponent("bash/\(command)"), 0o644
      )
      expected["share/zsh/site-functions/_\(command)"] = (completions.appendingPathComponent("zsh/_\(command)"), 0o644)
      expected["share/fish/vendor_completions.d/\(command).fish"] = (
        completions.appendingPathComponent("fish/\(command).fish"), 0o644
      )
    }
    for page in pages {
      let section = page.split(separator: ".").last.map(String.init) ?? ""
      expected["share/man/man\(section)/\(page)"] = (
        Self.repository.appendingPathComponent("man/\(page)"), 0o644
      )
    }
    XCTAssertEqual(try Self.files(under: URL(fileURLWithPath: destdir)), Set(expected.keys.map { "usr/" + $0 }))
    for (path, want) in expected {
      let file = prefix.appendingPathComponent(path)
      let attributes = try FileManager.default.attributesOfItem(atPath: file.path)
      XCTAssertEqual((attributes[.posixPermissions] as? NSNumber)?.intValue, want.mode, path)
      XCTAssertEqual(try Data(contentsOf: file), try Data(contentsOf: want.source), path)
    }

    // Each command runs from the installed bin directory.
    for command in commands {
      let help = try RRTCommand.run(
        prefix.appendingPathComponent("bin/\(command)").path, ["--help"])
      XCTAssertEqual(help.status, 0, "\(command) --help: \(help.stderr)")
      XCTAssertTrue(help.stdout.contains("USAGE: \(command)"), "\(command) --help: \(help.stdout)")
    }
    // man finds each page in the installed tree, by section and name.
    let manpath = prefix.appendingPathComponent("share/man").path
    for page in pages {
      let name = String(page[..<(page.lastIndex(of: ".") ?? page.endIndex)])
      let section = String(page[page.index(after: page.lastIndex(of: ".") ?? page.startIndex)...])
      let found = try RRTCommand.shell("man -M '\(manpath)' -w \(section) \(name)")
      XCTAssertEqual(found.status, 0, "man -w \(section) \(name): \(found.stderr)")
      XCTAssertEqual(
        found.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "\(manpath)/man\(section)/\(page)")
      let shown = try RRTCommand.shell("MANWIDTH=80 man -M '\(manpath)' \(section) \(name)")
      XCTAssertEqual(shown.status, 0, "man \(section) \(name): \(shown.stderr)")
      XCTAssertTrue(
        shown.stdout.contains("NAME") && shown.stdout.contains(name), "man \(section) \(name): \(shown.stdout)")
    }

    // Uninstall takes back what install put there, and nothing else: the
    // directories it made go when empty, the prefix's skeleton stays.
    let foreign = prefix.appendingPathComponent("bin/someone-else")
    try Data("#!/bin/sh\n".utf8).write(to: foreign)
    let removed = try install(["--uninstall"], destdir: destdir)
    XCTAssertEqual(removed.status, 0, removed.stderr)
    XCTAssertEqual(try Self.files(under: URL(fileURLWithPath: destdir)), ["usr/bin/someone-else"])
    let directories = try RRTCommand.shell("cd '\(destdir)' && find . -mindepth 1 -type d")
    XCTAssertEqual(
      Set(directories.lines.map { String($0.dropFirst(2)) }), ["usr", "usr/bin", "usr/share", "usr/share/man"])
  }

  func testInstallRefusesADirectoryWithoutTheBuiltCommands() throws {
    let s = try Scratch()
    try FileManager.default.createDirectory(atPath: s.path("empty"), withIntermediateDirectories: true)
    let refused = try install(["--from", s.path("empty")], destdir: s.path("stage"))
    assertFails(refused, status: 1, mentioning: "is not a built executable")
    XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("stage")))

    let relative = try install(["PREFIX=usr"], destdir: s.path("stage"))
    assertFails(relative, status: 2, mentioning: "PREFIX usr is not an absolute path")
    XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("stage")))
  }

  func testEveryManPageLintsCleanAndShowsTheCommandAsTyped() throws {
    let lint = try RRTCommand.run(
      Self.repository.appendingPathComponent("scripts/generate-docs").path, ["--lint"])
    XCTAssertEqual(lint.status, 0, "scripts/generate-docs --lint:\n\(lint.stderr)")
    XCTAssertTrue(
      lint.stdout.contains("man lint: \(try Self.pages().count) passed, 0 failed"), lint.stdout + lint.stderr)

    let withSubcommands: Set<String> = ["overwrite-map", "tracking-server", "snapshot-server"]
    for command in try Self.commands() {
      let page = Self.repository.appendingPathComponent("man/\(command).1").path
      let shown = try RRTCommand.shell("MANWIDTH=200 man -l '\(page)'")
      XCTAssertEqual(shown.status, 0, shown.stderr)
      XCTAssertFalse(shown.stdout.contains("`"), "\(command).1 shows a backtick")
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
