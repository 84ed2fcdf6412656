// A consistency group's point: several tracking servers' devices frozen, or
// their generations cut, at one instant. Each server is asked to hold its
// writes (`hold` on its control socket, sent to all before any answer is
// read, so the time writes are held is the slowest device's, not the
// sum), each running the
// action within its hold as soon as its writes are held; once every one
// has answered, all are released.
// Why that is one instant: a write that finds a gate closed is acknowledged
// only after the release, when every device has held. So if a write issued
// after another was acknowledged is in its device's point, it passed its
// gate before that gate closed, before all held, and the write it followed,
// acknowledged earlier still, had passed its own gate: it is in its point
// too. No write is in the point without the writes it depended on.
//
// Invariants:
// - All or nothing: when a device fails to hold or to act, the others undo
//   what they made within their holds (views dropped, generations' ends
//   undone) and are released, so no partial point is left. When a release
//   or a save after it fails, the views frozen on the others are dropped
//   by id; generations ended then stay ended, and the sentence says so.
// - A point is reported only once it is in its files on every device: a
//   generation is cut within the hold by one journal write, and its map is
//   saved after the release, writes going on (`settle` waits for it).
// - Writes are never held for long: every server ends its hold by itself at
//   the limit asked (`maxHold`), or at once when this process goes away.

import Dispatch
import Glibc

public enum GroupAction: String, Sendable, CaseIterable {
  case freeze
  case newGeneration = "new-generation"
}

/// One device of a group: its server's control socket, and the file its
/// ending generation's change map is saved to (nil: none, freeze only).
public struct GroupMember: Sendable {
  public var control: String
  public var changesOut: String?

  public init(control: String, changesOut: String?) {
    self.control = control
    self.changesOut = changesOut
  }
}

/// A point made on every device of a group.
public struct GroupPoint: Sendable {
  public struct Device: Sendable {
    public var member: GroupMember
    /// Seconds the server took to close its gate (the writes inside to end).
    public var drainSeconds: Double
    /// Seconds the server held writes, from the hold asked to the release.
    public var heldSeconds: Double
    /// Seconds after the release until what the action did was in its
    /// files (the ended generation's change map saved), writes going on.
    public var settleSeconds: Double
    /// The action's answer (view and/or generation fields, as
    /// `tracking-server freeze` and `new-generation` print them).
    public var fields: [(String, String)]
  }

  public var action: GroupAction
  /// From the first hold asked to the last release answered.
  public var holdSeconds: Double
  public var devices: [Device]
}

public enum ConsistencyGroup {
  /// Asks every member's server for its status, at once: one that does not
  /// answer is named before anything is done (before an application is
  /// quiesced for a group that cannot be made).
  public static func probe(_ members: [GroupMember]) throws {
    let failed = inParallel(members.count) { i in
      _ = try ControlSocket.request(members[i].control, ["status"], timeout: 10)
    }
    if let (i, e) = failed.first { throw ToolkitError("\(sentence(e, members[i])); nothing was held") }
  }

  /// Makes one point on every member, or none (see the invariants above).
  public static func take(_ members: [GroupMember], action: GroupAction, maxHold: Double) throws -> GroupPoint {
    let n = members.count
    // 1. A connection to every server: an unknown socket holds nothing.
    let connections = Slots<ControlConnection>(n)
    var failed = inParallel(n) { i in
      // Past the hold's limit every server has released by itself: an
      // answer later than that is not waited for much longer.
      connections[i] = try ControlConnection(path: members[i].control, timeout: maxHold + 5)
    }
    defer { for i in 0..<n { connections[i]?.close() } }
    if let (i, e) = failed.first {
      throw ToolkitError("\(sentence(e, members[i])); nothing was held")
    }

    // 2. Hold everywhere, each server running the action as soon as its
    // writes are held (one round trip within the hold, not two). The
    // release waits for every answer, so it comes after all held.
    let start = monotonicSeconds()
    let drains = Slots<Double>(n)
    let answers = Slots<[(String, String)]>(n)
    failed = exchange(connections) { i in
      var words = ["hold", "limit=" + formatFixed(maxHold, digits: 3), "then=" + action.rawValue]
      // Checked by the server before it holds: a bad output holds nothing.
      if let out = members[i].changesOut { words.append("changes-out=" + ControlSocket.encode(out)) }
      return words
    } answered: { i, f in
      drains[i] = Double(value(f, "drain_seconds") ?? "") ?? 0
      answers[i] = f.filter { $0.0 != "drain_seconds" && $0.0 != "limit_seconds" }
    }
    if let (i, e) = failed.first {
      // A server whose hold or action failed holds nothing; the others undo
      // what they made (the view dropped, the generation's end undone)
      // within their holds, then are released.
      let undone = Slots<String>(n)
      _ = inParallel(n) { j in
        guard answers[j] != nil, let c = connections[j], !c.isBroken else { return }
        do {
          let f = try c.request(["undo"])
          var what: [String] = []
          if value(f, "dropped_view") != nil { what.append("the view frozen on \(members[j].control) was dropped") }
          if let id = value(f, "undone_generation_end") {
            what.append("the end of generation \(id) on \(members[j].control) was undone")
          }
          undone[j] = what.joined(separator: "; ")
        } catch {
          // Closed: a hold that ends without release undoes by itself.
          c.close()
          undone[j] =
            "\(members[j].control) could not undo its part (\(error)); its connection was closed, "
            + "which ends the hold without release and undoes it"
        }
      }
      let released = release(connections, where: { answers[$0] != nil })
      let undo = (0..<n).compactMap { undone[$0] }.filter { !$0.isEmpty }
      throw ToolkitError(
        "\(sentence(e, members[i])); \((undo + [released]).joined(separator: "; ")) — no point was made")
    }

    // 4. Release everywhere.
    let held = Slots<Double>(n)
    failed = exchange(connections) { _ in
      ["release"]
    } answered: { i, f in
      held[i] = Double(value(f, "held_seconds") ?? "") ?? 0
    }
    let end = monotonicSeconds()
    if let (i, e) = failed.first {
      throw ToolkitError(
        "\(sentence(e, members[i])) at the release; \(undoAfterRelease(members, answers)) — no point is kept")
    }

    // 5. What each did within its hold reaches its files (the ended
    // generation's map), writes going on.
    let settled = Slots<Double>(n)
    failed = exchange(connections) { _ in
      ["settle"]
    } answered: { i, f in
      settled[i] = Double(value(f, "settle_seconds") ?? "") ?? 0
    }
    if let (i, e) = failed.first {
      throw ToolkitError(
        "\(sentence(e, members[i])) after the release; \(undoAfterRelease(members, answers)) — no point is kept")
    }

    return GroupPoint(
      action: action, holdSeconds: end - start,
      devices: (0..<n).map { i in
        GroupPoint.Device(
          member: members[i], drainSeconds: drains[i] ?? 0, heldSeconds: held[i] ?? 0,
          settleSeconds: settled[i] ?? 0, fields: answers[i] ?? [])
      })
  }

  /// What is undone once the holds are over and one device failed: the
  /// views frozen are dropped by id (a server whose hold ended without
  /// release dropped its own); generations ended stay ended where the
  /// hold was released (one that ended without release undid its own).
  private static func undoAfterRelease(_ members: [GroupMember], _ answers: Slots<[(String, String)]>) -> String {
    var undo: [String] = []
    for j in 0..<members.count {
      guard let id = answers[j].flatMap({ value($0, "view") }) else { continue }
      undo.append(dropLater(members[j], id))
    }
    if (0..<members.count).contains(where: { answers[$0].flatMap { value($0, "ended_generation") } != nil }) {
      undo.append(
        "the generations ended where the hold was released stay ended (a generation's end is undone only within its hold)"
      )
    }
    return undo.joined(separator: "; ")
  }

  /// Drops the view `id` on `member` after its hold, on a connection of its
  /// own; says what became of it (a server drops a view frozen within a
  /// hold that ended without release by itself).
  private static func dropLater(_ member: GroupMember, _ id: String) -> String {
    do {
      _ = try ControlSocket.request(member.control, ["drop", "view=" + id], timeout: 30)
      return "the view frozen on \(member.control) was dropped"
    } catch {
      if let status = try? ControlSocket.request(member.control, ["status"], timeout: 30), value(status, "view") != id {
        return "the view frozen on \(member.control) was dropped by its server"
      }
      return
        "the view \(id) frozen on \(member.control) could not be dropped (\(error)): drop it with tracking-server drop"
    }
  }

  /// Releases the held connections (those `held` selects); says how it went.
  private static func release(_ connections: Slots<ControlConnection>, where held: (Int) -> Bool) -> String {
    let n = connections.count
    let chosen = (0..<n).filter(held)
    guard !chosen.isEmpty else { return "no other device held" }
    let failed = inParallel(n) { i in
      guard chosen.contains(i), let c = connections[i] else { return }
      // A connection that failed (a request unanswered in time) is closed,
      // not asked: its server releases on the close.
      guard !c.isBroken else { throw ToolkitError("\(c.path): the connection failed") }
      _ = try c.request(["release"])
    }
    if failed.isEmpty { return "the \(chosen.count) device(s) that held were released" }
    // A connection that failed is closed: its server releases on the close.
    for (i, _) in failed { connections[i]?.close() }
    return "the devices that held were released (\(failed.count) by closing the connection)"
  }

  private static func sentence(_ e: Error, _ member: GroupMember) -> String {
    let text = (e as? ToolkitError)?.message ?? "\(e)"
    return text.hasPrefix(member.control) ? text : "\(member.control): \(text)"
  }

  static func value(_ fields: [(String, String)], _ key: String) -> String? {
    fields.first(where: { $0.0 == key })?.1
  }

  /// Sends every server its request at once, then reads the answers in
  /// device order: all are in flight together, as with a thread each, with
  /// no thread to start and schedule while writes are held (the machine
  /// is as busy as its devices then). Returns the failures, in device
  /// order; `answered` gets each answer.
  static func exchange(
    _ connections: Slots<ControlConnection>, _ words: (Int) -> [String],
    answered: (Int, [(String, String)]) -> Void
  ) -> [(Int, Error)] {
    var failures: [(Int, Error)] = []
    var sent: [Int] = []
    for i in 0..<connections.count {
      do {
        try connections[i]!.send(words(i))
        sent.append(i)
      } catch {
        failures.append((i, error))
      }
    }
    for i in sent {
      do {
        answered(i, try connections[i]!.receive(words(i)))
      } catch {
        failures.append((i, error))
      }
    }
    return failures.sorted { $0.0 < $1.0 }
  }

  /// Runs `body(i)` for i in 0..<n on a thread each, and waits for all;
  /// returns the failures, in device order.
  static func inParallel(_ n: Int, _ body: @escaping @Sendable (Int) throws -> Void) -> [(Int, Error)] {
    let errors = Locked<[Int: Error]>([:])
    let done = DispatchSemaphore(value: 0)
    for i in 0..<n {
      startThread {
        do { try body(i) } catch { errors.withLock { $0[i] = error } }
        done.signal()
      }
    }
    for _ in 0..<n { done.wait() }
    return errors.withLock { $0.sorted { $0.key < $1.key }.map { ($0.key, $0.value) } }
  }
}

/// One value per device, set by the device's thread, read after the join.
// @unchecked Sendable: the values are behind `values`' lock.
final class Slots<T>: @unchecked Sendable {
  private let values: Locked<[T?]>
  let count: Int

  init(_ n: Int) {
    count = n
    values = Locked([T?](repeating: nil, count: n))
  }

  subscript(i: Int) -> T? {
    get { values.withLock { $0[i] } }
    set { values.withLock { $0[i] = newValue } }
  }
}
