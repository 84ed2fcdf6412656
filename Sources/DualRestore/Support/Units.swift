// Byte counts as people write them (`64K`, `1GiB`, `4096`) and as the tools
// print them.

/// Parses a byte count: a decimal number with an optional unit.
/// `K`, `M`, `G`, `T`, `P` and `KiB`…`PiB` are powers of 1024;
/// `KB`…`PB` are powers of 1000; `B` or nothing means bytes.
public func parseByteCount(_ text: String) -> UInt64? {
  let trimmed = text.trimmingWhitespace()
  guard let firstNonDigit = trimmed.firstIndex(where: { !$0.isASCII || !$0.isNumber }) else {
    return UInt64(trimmed)
  }
  guard let number = UInt64(trimmed[..<firstNonDigit]) else { return nil }
  let unit = trimmed[firstNonDigit...].uppercased()
  let binary: [String: Int] = ["K": 1, "M": 2, "G": 3, "T": 4, "P": 5]
  var multiplier: UInt64
  switch unit {
  case "B": multiplier = 1
  case _ where unit.count == 1 && binary[unit] != nil:
    multiplier = 1 << (10 * UInt64(binary[unit]!))
  case _ where unit.count == 3 && unit.hasSuffix("IB") && binary[String(unit.prefix(1))] != nil:
    multiplier = 1 << (10 * UInt64(binary[String(unit.prefix(1))]!))
  case _ where unit.count == 2 && unit.hasSuffix("B") && binary[String(unit.prefix(1))] != nil:
    multiplier = 1
    for _ in 0..<binary[String(unit.prefix(1))]! { multiplier *= 1000 }
  default:
    return nil
  }
  let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
  return overflow ? nil : product
}

/// `65536` → `64 KiB`, `1000` → `1000 B`, `1536` → `1.5 KiB`.
public func formatBytes(_ value: UInt64) -> String {
  let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
  var index = 0
  var scaled = Double(value)
  while scaled >= 1024 && index < units.count - 1 {
    scaled /= 1024
    index += 1
  }
  if index == 0 { return "\(value) B" }
  var text = formatFixed(scaled, digits: scaled < 10 ? 2 : 1)
  // 1.50 → 1.5, 2.00 → 2: no trailing zeros after the point.
  while text.hasSuffix("0") { text.removeLast() }
  if text.hasSuffix(".") { text.removeLast() }
  return "\(text) \(units[index])"
}

/// A fixed-point decimal rendering, without Foundation's formatters.
public func formatFixed(_ value: Double, digits: Int) -> String {
  var scale = 1.0
  for _ in 0..<digits { scale *= 10 }
  let scaled = (value * scale).rounded()
  guard scaled.isFinite, abs(scaled) < 9e18 else { return "\(value)" }
  let whole = Int64(scaled)
  let sign = whole < 0 ? "-" : ""
  let magnitude = whole.magnitude
  let integer = magnitude / UInt64(scale)
  if digits == 0 { return "\(sign)\(integer)" }
  var fraction = String(magnitude % UInt64(scale))
  while fraction.count < digits { fraction = "0" + fraction }
  return "\(sign)\(integer).\(fraction)"
}

extension StringProtocol {
  func trimmingWhitespace() -> Substring {
    let s = self[...]
    guard let start = s.firstIndex(where: { !$0.isWhitespace }) else { return "" }
    guard let end = s.lastIndex(where: { !$0.isWhitespace }) else { return "" }
    return Substring(s[start...end])
  }
}
