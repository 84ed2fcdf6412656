// Times the map operations in process on a 2^30-block map (128 MiB of bits):
// union, intersection, subtraction, inversion, population count, extent
// iteration, and the map file encoding. Run by bench/run in release mode.

import DualRestore
import Glibc

func seconds(_ body: () throws -> Void) rethrows -> Double {
  var a = timespec()
  var b = timespec()
  clock_gettime(CLOCK_MONOTONIC, &a)
  try body()
  clock_gettime(CLOCK_MONOTONIC, &b)
  return Double(b.tv_sec - a.tv_sec) + Double(b.tv_nsec - a.tv_nsec) / 1e9
}

func report(_ name: String, _ t: Double, target: Double? = nil) {
  let ms = formatFixed(t * 1000, digits: 1)
  if let target {
    let verdict = t <= target ? "ok" : "SLOWER THAN TARGET"
    print("map \(name): \(ms) ms (target < \(formatFixed(target * 1000, digits: 0)) ms: \(verdict))")
  } else {
    print("map \(name): \(ms) ms")
  }
}

let count: UInt64 = 1 << 30
var a = BlockBitmap(count: count)
var b = BlockBitmap(count: count)
// A realistic restore pattern: many runs of varying length in both maps.
struct LCG {
  var state: UInt64 = 12345
  mutating func next() -> UInt64 {
    state = state &* 6364136223846793005 &+ 1442695040888963407
    return state >> 11
  }
}
var rng = LCG()
var position: UInt64 = 0
while position < count {
  let run = rng.next() % 100_000 + 1
  let end = min(position + run, count)
  if rng.next() & 1 == 0 { a.set(position..<end) } else { b.set(position..<end) }
  position = end + rng.next() % 50_000
}

/// A private copy of `a`, copied and faulted in before the clock starts.
@MainActor func fresh() -> BlockBitmap {
  var copy = a
  copy[0] = !copy[0]
  copy[0] = a[0]
  return copy
}

var total: UInt64 = 0
var work = fresh()
report("union (2^30 blocks)", seconds { work.formUnion(b) }, target: 0.5)
report("count (2^30 blocks)", seconds { total = work.population }, target: 0.5)
work = fresh()
report("intersect (2^30 blocks)", seconds { work.formIntersection(b) })
work = fresh()
report("subtract (2^30 blocks)", seconds { work.subtract(b) })
work = fresh()
report("invert (2^30 blocks)", seconds { work.invert() })
var runs = 0
report("extents (2^30 blocks)", seconds { for _ in a.extents { runs += 1 } })
let geometry = try BlockGeometry(blockSize: 512, deviceSize: count * 512)
var encoded: [UInt8] = []
report(
  "encode (2^30 blocks, \(runs) runs)",
  seconds { encoded = MapFormat.encode(BlockMap(geometry: geometry, bits: a)) })
report("decode (\(encoded.count) bytes)", try seconds { _ = try MapFormat.decode(encoded, name: "bench") })
let empty = BlockMap(geometry: try BlockGeometry(blockSize: 65536, deviceSize: 16 << 40))
print("map file of an empty 16 TiB map at 64 KiB blocks: \(MapFormat.encode(empty).count) bytes")
var full = empty
full.bits.invert()
print("map file of a full 16 TiB map at 64 KiB blocks: \(MapFormat.encode(full).count) bytes")
if total == 0 { print("(no blocks set)") }
