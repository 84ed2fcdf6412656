#!/usr/bin/python3
"""Stamped writes and a consistency checker for a far copy.

A client writes numbered, self-describing writes over NBD and closes each
interval of F writes with a FLUSH; a checker reads an image (the far copy,
frozen by the caller) and says whether it is at a *consistency point*: it
holds every write acknowledged before FLUSH k, any subset of the writes
between FLUSH k and FLUSH k+1, and nothing later. Interval k is the writes
k*F ..< (k+1)*F; FLUSH k closes it.

Run with /usr/bin/python3 (Debian's, which has libnbd's `nbd` module).

  write  --uri URI --seed S --write-size W --slots N --flush-every F --log PATH
         [--queue-depth Q] [--count C] [--start I]
  check  --image PATH --baseline PATH --seed S --write-size W --slots N
         --flush-every F --mode consistent|acked [--acked N] [--max-index M]
  apply  --image PATH --seed S --write-size W --slots N --flush-every F
         --upto N [--skip I,...] [--extra I,...]

The device is cut into N slots of W bytes (W a multiple of 512, possibly
smaller than the server's block size, so that writes are partial blocks).

Slots: write i goes to slot(S, i), drawn from SplitMix64 seeded with
mix64(S ^ mix64(i)) (mix64 being SplitMix64's output function): the first
draw mod N not already used by an earlier write of the same interval. So no
slot repeats inside an interval (F <= N), and the sequence is a function of
S and i alone: the checker recomputes it.

Stamp (the W bytes of write i), little-endian:
  0   8  magic b"DRSTAMP1"
  8   8  seed S
  16  8  index i
  24  8  interval i // F
  32  8  slot
  40  4  write size W
  44  4  flush-every F
  48  W-48  filler: the 64-byte BLAKE2b digest of bytes 0..<48, repeated
A slot's bytes are valid only if they are exactly the stamp their header
describes and the header matches the sequence, so a torn, misplaced or
flipped write shows: a sector of another write carries another digest, and
a slot that does not start with a header is no stamp.

Write log (--log, appended, fsynced after every line):
  flushed <n>           FLUSH acknowledged; writes 0 ..< n are durable
  stopped <n> <reason>  an NBD error, a disconnect or a refused connection;
                        writes 0 ..< n were issued
Successive runs (after a kill, a restart of the server) keep one history:
the same seed, and --start set to the last `flushed` count, so indices go
on where the acknowledged ones stopped. Writes issued but not acknowledged
by the earlier run are issued again with the same bytes, which is harmless.

Check: every slot must hold the baseline's bytes or a valid stamp of this
seed in its own slot (else: foreign bytes). Then, with K the highest
interval among the stamps present, `consistent` requires for every slot
the last write of intervals < K, or a later write; `acked --acked N`
requires the last write below N. A slot may hold the baseline only if no
write is required of it. `--max-index M` (the writer's issued count) makes
any stamp of write M or later a violation. One line per violation, then a
summary line.

Apply prints one line per write applied: `<index> <interval> <slot>`.

Exit status: 0 done (check: no violation), 1 violations, 2 bad usage or an
unreadable file, 3 the writer stopped on an NBD error or disconnect.
"""

import argparse
import hashlib
import os
import struct
import sys

MAGIC = b"DRSTAMP1"
HEADER = struct.Struct("<8sQQQQII")  # 48 bytes
M64 = (1 << 64) - 1


def mix64(z):
    """SplitMix64's output function."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def interval_slots(seed, slots, flush_every, k):
    """The slots of interval k's writes, k*F ..< (k+1)*F, in order."""
    used, out = set(), []
    for i in range(k * flush_every, (k + 1) * flush_every):
        state = mix64(seed ^ mix64(i))
        while True:
            state = (state + 0x9E3779B97F4A7C15) & M64
            s = mix64(state) % slots
            if s not in used:
                break
        used.add(s)
        out.append(s)
    return out


def sequence(seed, slots, flush_every, count):
    """slot(S, i) for i in 0 ..< count."""
    out = []
    for k in range((count + flush_every - 1) // flush_every):
        out += interval_slots(seed, slots, flush_every, k)
    return out[:count]


def stamp(seed, i, slot, w, f, interval=None):
    """The W bytes of write i (with another interval only to decode)."""
    header = HEADER.pack(MAGIC, seed, i, i // f if interval is None else interval, slot, w, f)
    digest = hashlib.blake2b(header).digest()
    return header + (digest * (w // len(digest)))[: w - HEADER.size]


def decode(view, seed, w, f):
    """(index, slot) of a valid stamp of this seed and geometry, or a reason."""
    if view[:8] != MAGIC:
        return "no stamp"
    _, s, i, k, slot, sw, sf = HEADER.unpack_from(view)
    if sw != w or sf < 1 or stamp(s, i, slot, sw, sf, k) != bytes(view):
        return "a torn or damaged stamp"
    if (s, sw, sf) != (seed, w, f):
        return "a stamp of seed %d, write size %d, flush-every %d" % (s, sw, sf)
    if k != i // f:
        return "a stamp of write %d claiming interval %d" % (i, k)
    return (i, slot)


def fail(message):
    print("stamped: " + message, file=sys.stderr)
    sys.exit(2)


def geometry(a):
    if a.write_size < 512 or a.write_size % 512:
        fail("write size %d is not a positive multiple of 512" % a.write_size)
    if a.slots < 1:
        fail("slot count %d is not positive" % a.slots)
    if not 1 <= a.flush_every <= a.slots:
        fail("flush-every %d is not between 1 and the slot count %d" % (a.flush_every, a.slots))
    if a.seed < 0 or a.seed > M64:
        fail("seed %d is not a 64-bit unsigned number" % a.seed)


# MARK: write


def cmd_write(a):
    import nbd

    geometry(a)
    w, f = a.write_size, a.flush_every
    log = open(a.log, "a")

    def note(line):
        log.write(line + "\n")
        log.flush()
        os.fsync(log.fileno())

    h = nbd.NBD()
    try:
        h.connect_uri(a.uri)
        size = h.get_size()
    except nbd.Error as e:
        note("stopped %d %s" % (a.start, " ".join(str(e).split())))
        return 3
    if size < a.slots * w:
        fail("the export's %d bytes hold fewer than %d slots of %d bytes" % (size, a.slots, w))

    end = a.start + a.count if a.count is not None else None
    nxt = a.start
    try:
        while end is None or nxt < end:
            k = nxt // f
            slots = interval_slots(a.seed, a.slots, f, k)
            stop = (k + 1) * f if end is None else min((k + 1) * f, end)
            # The interval's writes, at most Q in flight; all done before FLUSH.
            flight = {}  # cookie -> buffer, kept alive until the reply
            while nxt < stop or flight:
                while nxt < stop and len(flight) < a.queue_depth:
                    s = slots[nxt - k * f]
                    buf = nbd.Buffer.from_bytearray(stamp(a.seed, nxt, s, w, f))
                    flight[h.aio_pwrite(buf, s * w)] = buf
                    nxt += 1
                if h.aio_in_flight() > 0:
                    h.poll(-1)
                for cookie in [c for c in flight if h.aio_command_completed(c)]:
                    del flight[cookie]
            h.flush()
            note("flushed %d" % nxt)
    except (nbd.Error, OSError) as e:
        note("stopped %d %s" % (nxt, " ".join(str(e).split()) or type(e).__name__))
        return 3
    try:
        h.shutdown()
    except nbd.Error:
        pass
    return 0


# MARK: check


def cmd_check(a):
    geometry(a)
    if a.mode == "acked" and a.acked is None:
        fail("--mode acked needs --acked N")
    w, f, n = a.write_size, a.flush_every, a.slots
    try:
        with open(a.image, "rb") as fh:
            image = memoryview(fh.read())
        with open(a.baseline, "rb") as fh:
            base = memoryview(fh.read())
    except OSError as e:
        fail("cannot read %s: %s" % (e.filename, e.strerror))
    for name, data in ((a.image, image), (a.baseline, base)):
        if len(data) < n * w:
            fail("%s has %d bytes, fewer than %d slots of %d bytes" % (name, len(data), n, w))

    # Decode every slot: None (baseline bytes), an index, or a reason.
    found = [None] * n
    for s in range(n):
        o = s * w
        v = image[o : o + w]
        if v != base[o : o + w]:
            found[s] = decode(v, a.seed, w, f)
    if a.max_index is None:
        top = max((x[0] for x in found if type(x) is tuple), default=-1)
        if top >= 1 << 28:
            fail("a stamp claims write %d: give --max-index to check that far" % top)
        limit = top + 1
    else:
        limit = a.max_index
        top = max((x[0] for x in found if type(x) is tuple and x[0] < limit), default=-1)
    # Consistent: every interval below the highest one present is complete.
    need = a.acked if a.mode == "acked" else (top // f) * f if top >= 0 else 0
    seq = sequence(a.seed, n, f, max(limit, need))

    violations = []
    for s in range(n):
        x = found[s]
        if type(x) is str:
            violations.append("slot %d: found foreign bytes (%s), expected baseline or a stamp" % (s, x))
        elif type(x) is tuple:
            i, slot = x
            if i >= limit:
                violations.append("slot %d: found write %d, beyond the %d writes issued" % (s, i, limit))
            elif slot != s or seq[i] != s:
                violations.append("slot %d: found write %d of slot %d, which belongs in slot %d" % (s, i, slot, seq[i]))
            else:
                found[s] = i
    # The last write below `need` of every slot must be there, or a later one.
    last = {}
    for i in range(need):
        last[seq[i]] = i
    for s, i in sorted(last.items()):
        x = found[s]
        if x is None:
            violations.append("slot %d: found baseline bytes, expected at least write %d (interval %d)" % (s, i, i // f))
        elif type(x) is int and x < i:
            violations.append(
                "slot %d: found write %d (interval %d), expected at least write %d (interval %d)" % (s, x, x // f, i, i // f)
            )

    for v in violations:
        print(v)
    stamped = sum(1 for x in found if x is not None)
    what = "interval %d is the highest present" % (top // f) if top >= 0 else "no stamp present"
    print(
        "%s: %d slots, %d stamped, %s, %d writes required, %d violations"
        % (a.mode, n, stamped, what, need, len(violations))
    )
    return 1 if violations else 0


# MARK: apply


def cmd_apply(a):
    geometry(a)
    w, f = a.write_size, a.flush_every
    skip, extra = set(a.skip), a.extra
    order = [i for i in range(a.upto) if i not in skip] + extra
    seq = sequence(a.seed, a.slots, f, max(order, default=-1) + 1)
    try:
        fd = os.open(a.image, os.O_WRONLY)
        if os.fstat(fd).st_size < a.slots * w:
            fail("%s is smaller than %d slots of %d bytes" % (a.image, a.slots, w))
        for i in order:
            os.pwrite(fd, stamp(a.seed, i, seq[i], w, f), seq[i] * w)
            print("%d %d %d" % (i, i // f, seq[i]))
        os.close(fd)
    except OSError as e:
        fail("cannot write %s: %s" % (a.image, e.strerror))
    return 0


def indices(text):
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a list of write indices like 3,17" % text)


def main():
    p = argparse.ArgumentParser(description="Stamped writes and a far-copy consistency checker.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("write", "check", "apply"):
        c = sub.add_parser(name)
        c.add_argument("--seed", type=int, required=True)
        c.add_argument("--write-size", type=int, required=True)
        c.add_argument("--slots", type=int, required=True)
        c.add_argument("--flush-every", type=int, required=True)
        if name == "write":
            c.add_argument("--uri", required=True)
            c.add_argument("--log", required=True)
            c.add_argument("--queue-depth", type=int, default=1)
            c.add_argument("--count", type=int)
            c.add_argument("--start", type=int, default=0)
        elif name == "check":
            c.add_argument("--image", required=True)
            c.add_argument("--baseline", required=True)
            c.add_argument("--mode", choices=("consistent", "acked"), required=True)
            c.add_argument("--acked", type=int)
            c.add_argument("--max-index", type=int)
        else:
            c.add_argument("--image", required=True)
            c.add_argument("--upto", type=int, required=True)
            c.add_argument("--skip", type=indices, default=[])
            c.add_argument("--extra", type=indices, default=[])
    a = p.parse_args()
    for opt, least in (("queue_depth", 1), ("count", 1), ("start", 0), ("acked", 0), ("max_index", 0), ("upto", 0)):
        value = getattr(a, opt, None)
        if value is not None and value < least:
            fail("--%s %d is below %d" % (opt.replace("_", "-"), value, least))
    for i in getattr(a, "skip", []) + getattr(a, "extra", []):
        if i < 0:
            fail("write index %d is negative" % i)
    return {"write": cmd_write, "check": cmd_check, "apply": cmd_apply}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
