// swift-tools-version:6.0
// dualrestore builds for Linux only: it rests on splice, sendfile, cachestat,
// O_DIRECT and the NBD ioctls, which no other system has. No `platforms:` is
// declared, since SwiftPM's list names only Apple systems; a build anywhere
// else stops at the #error in Sources/DualRestore/Support/Platform.swift.
import PackageDescription

let package = Package(
  name: "dualrestore",
  products: [
    .executable(name: "overwrite-map", targets: ["overwrite-map"]),
    .executable(name: "bitmap-diff", targets: ["bitmap-diff"]),
    .executable(name: "snapshot", targets: ["snapshot"]),
    .executable(name: "merge-snapshot", targets: ["merge-snapshot"]),
    .executable(name: "restore-read-through", targets: ["restore-read-through"]),
    .executable(name: "tracking-server", targets: ["tracking-server"]),
    .executable(name: "snapshot-server", targets: ["snapshot-server"]),
    .library(name: "DualRestore", targets: ["DualRestore"]),
    // For the fuzz package in fuzz/ only; no tool links it.
    .library(name: "DualRestoreFuzz", targets: ["DualRestoreFuzz"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
  ],
  targets: [
    // System C libraries, found through pkg-config.
    .systemLibrary(
      name: "CLZ4", pkgConfig: "liblz4",
      providers: [.apt(["liblz4-dev"])]),
    .systemLibrary(
      name: "COpenSSL", pkgConfig: "libcrypto",
      providers: [.apt(["libssl-dev"])]),
    // ioctl numbers and other macros Swift cannot import.
    .target(name: "CShim"),

    // The core library: devices, maps, formats, comparison.
    .target(
      name: "DualRestore",
      dependencies: ["CShim", "COpenSSL", "CLZ4"]),
    // The fuzz targets' entry points (fuzz/, scripts/fuzz) and their
    // regression tests: kept out of the library the tools link. They reach
    // the library's internals through `package` access, which the fuzz
    // package (a package of its own) cannot, so it goes through this one.
    .target(
      name: "DualRestoreFuzz",
      dependencies: ["DualRestore", "CShim"]),
    // What the executables share: option types, error reporting.
    .target(
      name: "ToolSupport",
      dependencies: [
        "DualRestore",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),

    .executableTarget(
      name: "overwrite-map",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .executableTarget(
      name: "bitmap-diff",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),

    .executableTarget(
      name: "snapshot",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .executableTarget(
      name: "merge-snapshot",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .executableTarget(
      name: "restore-read-through",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .executableTarget(
      name: "tracking-server",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),
    .executableTarget(
      name: "snapshot-server",
      dependencies: [
        "DualRestore", "ToolSupport",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]),

    // Times map operations for bench/run; not installed.
    .executableTarget(name: "map-bench", dependencies: ["DualRestore"], path: "bench/map-bench"),

    // What both test targets share: the seeded generator, running programs
    // with a time limit. No product or executable links it.
    .target(name: "TestSupport", path: "Tests/TestSupport"),
    .testTarget(name: "DualRestoreTests", dependencies: ["DualRestore", "DualRestoreFuzz", "TestSupport"]),
    .testTarget(name: "CLITests", dependencies: ["DualRestore", "TestSupport"]),
  ],
  swiftLanguageModes: [.v6]
)
