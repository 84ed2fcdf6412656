// The block-device code paths: size and sector size from the kernel, O_EXCL
// when writing, and a device that is in use refused without damage.

import Foundation
import TestSupport
import XCTest

final class BlockDeviceCLITests: XCTestCase {
  func testMergeRefusesAMountedDevice() throws {
    guard RRTEnv.have("mkfs.ext4"), RRTEnv.have("mount") else { throw XCTSkip("mkfs.ext4 and mount are needed") }
    let s = try Scratch()
    let source = try s.randomFile("source.img", size: 16 << 20, seed: 5)
    XCTAssertEqual(
      try RRTCommand.shell("truncate -s 16M target.img && mkfs.ext4 -q -F target.img", cwd: s.url.path).status, 0)
    XCTAssertEqual(try RRTCommand.shell("snapshot --quiet source.img > source.stream", cwd: s.url.path).status, 0)
    try LoopDevice.with(image: s.path("target.img")) { device in
      let mountPoint = s.path("mnt")
      try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
      let mount = try RRTCommand.shell("mount \(device) '\(mountPoint)'")
      guard mount.status == 0 else { throw XCTSkip("cannot mount a loop device here: \(mount.stderr)") }
      defer { _ = try? RRTCommand.shell("umount '\(mountPoint)'") }
      let before = try RRTCommand.shell("sha256sum < \(device)")
      let r = try RRTCommand.run("merge-snapshot", ["-i", s.path("source.stream"), device])
      assertFails(r, status: 1, mentioning: "device is busy")
      XCTAssertEqual(
        try RRTCommand.shell("sha256sum < \(device)").stdout, before.stdout, "a mounted device was written")
      _ = source
    }
  }

  func testMergeIntoAndSnapshotFromALoopDevice() throws {
    let s = try Scratch()
    try s.randomFile("source.img", size: 12 << 20, seed: 6)
    // Zero blocks in the middle, so ZERO runs reach the device (BLKZEROOUT).
    try s.patch("source.img", at: 4 << 20, Array(repeating: 0, count: 2 << 20))
    XCTAssertEqual(try RRTCommand.shell("head -c 12M /dev/urandom > target.img", cwd: s.url.path).status, 0)
    try LoopDevice.with(image: s.path("target.img")) { device in
      let m = try RRTCommand.shell("snapshot --quiet source.img | merge-snapshot --quiet \(device)", cwd: s.url.path)
      XCTAssertEqual(m.status, 0, m.stderr)
      XCTAssertEqual(
        try RRTCommand.run("bitmap-diff", ["--quiet", s.path("source.img"), device, "-o", s.path("d.map")]).status, 0)
      // And back: a stream of the device restores a third image.
      let back = try RRTCommand.shell(
        "truncate -s 12M third.img && snapshot --quiet \(device) | merge-snapshot --quiet third.img && cmp source.img third.img",
        cwd: s.url.path)
      XCTAssertEqual(back.status, 0, back.stderr + back.stdout)
    }
  }
}
