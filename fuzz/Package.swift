// swift-tools-version:6.0
// Fuzz targets for the readers of hostile input: block streams (plain and
// encrypted), maps, ddrescue mapfiles, signatures, and both sides of NBD.
// Built with libFuzzer and AddressSanitizer by scripts/fuzz; not part of the
// normal build, which never sees this package.
import PackageDescription

let targets = [
  "stream", "stream-encrypted", "map", "ddrescue", "signature", "nbd-server", "nbd-client",
  "nbd-client-status",
]

let package = Package(
  name: "dualrestore-fuzz",
  platforms: [.macOS(.v13)],
  dependencies: [.package(name: "dualrestore", path: "..")],
  targets: [
    .target(name: "FuzzDriver", dependencies: [.product(name: "DualRestore", package: "dualrestore")])
  ]
    + targets.map { name in
      .executableTarget(
        name: "fuzz-\(name)", dependencies: ["FuzzDriver"], path: "Targets/\(name)")
    },
  swiftLanguageModes: [.v6]
)
