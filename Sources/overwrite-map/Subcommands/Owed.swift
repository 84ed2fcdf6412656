// overwrite-map owed: the blocks a stopped server's mirror journal owes a
// far copy, as a map, for the failback that brings the original site back
// to the far copy that took over (dualrestore(7), "Failback"). It reads and
// never writes the journal; the work is MirrorJournalOwed's.

import ArgumentParser
import DualRestore
import ToolSupport

struct Owed: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Map the blocks a stopped server's mirror journal owes a far copy.",
    usage: "overwrite-map owed --journal JOURNAL [--activity-log LOG] [--copy NAME-or-N] [-o MAP]",
    discussion: """
      For a failback: the primary of asynchronous mirroring \
      (restore-read-through or tracking-server with --ack local) stopped \
      while its far copy still lacked some of its writes, the far copy took \
      over, and the original is to be made equal to it again. The map names \
      every block the original may hold differently from what it shipped: \
      each change of the intervals the far copy has not flushed (the \
      positions file, JOURNAL.positions, says which), the changes after the \
      journal's last interval end (taken, never closed by a flush), and \
      every block of the regions the activity log names (what a crash may \
      have left on the primary but not in the journal, 4 MiB a region). \
      Union it with the far copy's change map since it took over, and those \
      are the blocks to bring back from the far copy; a sparse signature \
      (bitmap-diff --signature --map) then leaves out those that do not \
      differ.

      JOURNAL is the server's mirror journal: MAP.mirror beside \
      restore-read-through's --map, CHANGES.mirror beside tracking-server's \
      --changes, or the path --journal gave the server. The activity log is \
      MAP.al (CHANGES.al) beside the same map; it is found from a JOURNAL \
      named that way, else give --activity-log. When the positions file \
      names several far copies, --copy says which, by its URI as the \
      server was given it or by its place (0 first, as copy_N in \
      tracking-server status).

      The server must be stopped: a running one holds the journal's lock, \
      and the journal is refused. Nothing is written but the map: the \
      journal, its positions and the activity log are left as they are \
      (after a failback they describe writes the far copy's blocks \
      replaced: set them aside before the original serves again, \
      dualrestore(7)). A journal that is damaged, the positions file of \
      another journal or none, an activity log of another device: one \
      sentence, exit 1, no map. The map has the journal's block size and \
      device size, meaning changed, no tracking start (no record says \
      when), and the device name of the activity log. A summary goes to \
      standard error.
      """)

  @Option(help: ArgumentHelp("The stopped server's mirror journal (MAP.mirror).", valueName: "journal"))
  var journal: String

  @Option(
    help: ArgumentHelp(
      "The server's activity log (default: MAP.al for a journal named MAP.mirror).", valueName: "log"))
  var activityLog: String?

  @Option(
    help: ArgumentHelp(
      "The far copy, by its URI as given to the server or its place in the positions file (0 first); "
        + "needed when there are several.", valueName: "copy"))
  var copy: String?

  @OptionGroup var out: OutputOption

  func validate() throws {
    if journal == "-" { throw ValidationError("the journal is read at random; give it as a file") }
    if activityLog == nil && !journal.hasSuffix(".mirror") {
      throw ValidationError(
        "\(journal) is not named MAP.mirror, so the activity log beside the server's map is not found: "
          + "give --activity-log PATH")
    }
  }

  func run() throws {
    let log = activityLog ?? String(journal.dropLast(".mirror".count)) + ".al"
    let owed = try MirrorJournalOwed.read(journal: journal, activityLog: log, copy: copy)
    try MapFile.save(owed.map, to: out.output ?? "-")
    let g = owed.map.geometry
    let blocks = owed.map.bits.population
    printError(
      "overwrite-map: \(journal) owes the far copy \(owed.copy) (which holds interval \(owed.copyInterval), "
        + "flushed \(owed.copyFlushed)) \(owed.intervals) interval(s) of \(owed.intervalChanges) change(s) and "
        + "\(owed.openChanges) change(s) no flush closed"
        + (owed.tornAt.map { " (a torn tail at offset \($0) is not read)" } ?? "")
        + ": \(owed.journalBlocks) block(s); the activity log's \(owed.regions) region(s) add \(owed.regionBlocks); "
        + "\(blocks) block(s) of \(formatBytes(UInt64(g.blockSize))) in all (\(formatBytes(owed.map.setBytes)))")
  }
}
