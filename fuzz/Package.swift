// swift-tools-version:6.0
// Fuzz targets for the readers of hostile input: block streams (plain and
// encrypted), maps, ddrescue mapfiles, signatures, both sides of NBD, the
// merge export's names and report, the mirror journal and its positions file,
// the stream index, the point-in-time history's files, the change map's
// journal.
// Built with libFuzzer and AddressSanitizer by scripts/fuzz; not part of the
// normal build, which never sees this package. The entry points themselves
// are the DualRestoreFuzz library of the main package (it reaches the
// library's `package` internals, which another package cannot).
import PackageDescription

let targets = [
  "stream", "stream-encrypted", "map", "ddrescue", "signature", "nbd-server", "nbd-client",
  "nbd-client-status", "merge-export", "mirror-journal", "mirror-positions", "stream-index",
  "history", "mark-journal",
]

let package = Package(
  name: "dualrestore-fuzz",
  dependencies: [.package(name: "dualrestore", path: "..")],
  targets: [
    .target(name: "FuzzDriver", dependencies: [.product(name: "DualRestoreFuzz", package: "dualrestore")])
  ]
    + targets.map { name in
      .executableTarget(
        name: "fuzz-\(name)", dependencies: ["FuzzDriver"], path: "Targets/\(name)")
    },
  swiftLanguageModes: [.v6]
)
