// Two real ext4 images of one tree of files, as a site holds them a month
// apart: A made by mkfs.ext4 -d from a seeded tree (random and text files
// from empty to 600 KiB in nested directories, and a few directories of
// /usr/share/doc), B from the same tree with files deleted, moved into
// another directory and added. mkfs lays the files out in the order it
// walks the tree, so B holds most of A's content, much of it at other
// blocks than in A. The same seeds give the same trees (but for the
// directories of /usr/share/doc, which are this machine's).

import Foundation
import TestSupport
import XCTest

enum Ext4Images {
  /// A tree of a few hundred files from a seeded generator: random and
  /// text content, sizes from empty to 600 KiB, in nested directories, and
  /// a few directories of /usr/share/doc.
  static func makeTree(_ root: String, seed: UInt64) throws {
    var g = SplitMix64(seed: seed)
    let fm = FileManager.default
    let dirs = ["", "etc", "srv/data", "srv/data/old", "home/user", "home/user/docs", "var/log"]
    for d in dirs { try fm.createDirectory(atPath: root + "/" + d, withIntermediateDirectories: true) }
    let words = Array("alpha beta gamma delta block stream merge signature reference image ".utf8)
    for i in 0..<320 {
      let dir = dirs[Int(g.next() % UInt64(dirs.count))]
      let size: Int
      switch g.next() % 10 {
      case 0..<5: size = Int(g.next() % 4096)
      case 5..<8: size = 4096 + Int(g.next() % 61440)
      default: size = 65536 + Int(g.next() % 550_000)
      }
      let content: [UInt8]
      if g.next() % 4 == 0 {
        let start = Int(g.next() % UInt64(words.count))
        content = (0..<size).map { words[(start + $0) % words.count] }
      } else {
        content = g.bytes(size)
      }
      let path = root + "/" + (dir.isEmpty ? "" : dir + "/") + String(format: "f%03d.bin", i)
      XCTAssertTrue(fm.createFile(atPath: path, contents: Data(content)))
    }
    // Real documents: the first few directories of /usr/share/doc that hold files.
    let docs = (try? fm.contentsOfDirectory(atPath: "/usr/share/doc").sorted()) ?? []
    var copied = 0
    for d in docs where copied < 12 {
      let r = try RRTCommand.run("/bin/cp", ["-rL", "/usr/share/doc/" + d, root + "/home/user/docs/" + d])
      if r.status == 0 { copied += 1 }
    }
  }

  /// The tree changed as a file system changes: files deleted, moved
  /// (renamed into another directory) and added.
  static func changeTree(_ root: String, seed: UInt64) throws {
    var g = SplitMix64(seed: seed)
    let fm = FileManager.default
    var files = (fm.enumerator(atPath: root)?.compactMap { $0 as? String } ?? [])
      .filter { $0.hasSuffix(".bin") }.sorted()
    XCTAssertGreaterThan(files.count, 300)
    files.shuffle(using: &g)
    for f in files[0..<20] { try fm.removeItem(atPath: root + "/" + f) }
    try fm.createDirectory(atPath: root + "/moved", withIntermediateDirectories: true)
    for f in files[20..<45] {
      try fm.moveItem(atPath: root + "/" + f, toPath: root + "/moved/" + f.replacingOccurrences(of: "/", with: "-"))
    }
    try fm.createDirectory(atPath: root + "/new", withIntermediateDirectories: true)
    for i in 0..<30 {
      let size = 1000 + Int(g.next() % 300_000)
      XCTAssertTrue(fm.createFile(atPath: root + "/new/n\(i).bin", contents: Data(g.bytes(size))))
    }
  }

  /// A.img and B.img in `dir`: ext4 of `size` bytes (whole MiB) in 4 KiB blocks, from
  /// the tree (seed 2026) and the changed tree (seed 17); the trees are
  /// left in T and TB.
  static func make(in dir: String, size: Int, file: StaticString = #filePath, line: UInt = #line) throws {
    func sh(_ script: String) throws {
      let r = try RRTCommand.shell(script, timeout: 300, cwd: dir)
      XCTAssertEqual(r.status, 0, "\(script): \(r.stderr)", file: file, line: line)
      if r.status != 0 { throw RRTError("\(script) failed") }
    }
    try makeTree(dir + "/T", seed: 2026)
    try sh("cp -a T TB")
    try changeTree(dir + "/TB", seed: 17)
    for (image, tree) in [("A.img", "T"), ("B.img", "TB")] {
      try sh("mkfs.ext4 -q -F -b 4096 -E root_owner=0:0 -d \(tree) \(image) \(size >> 20)M")
    }
  }
}
