#!/usr/bin/python3
"""Dependent writes on two devices, and a checker of the points taken of both.

A client writes to device A, waits until the write is acknowledged, then
writes to device B a stamp naming the A write it depends on: the pattern of
a database writing its log, then its data. A point of both devices (views
frozen on each) is consistent when no B stamp in B's view names an A write
absent from A's view.

Run with /usr/bin/python3 (Debian's, which has libnbd's `nbd` module).

  write   --a URI --b URI --slots N --seed S --log PATH [--threads T]
  points  --tool PATH --a SOCKET --b SOCKET --slots N --seed S --count C
          --mode group|sequential

The first N slots of 4096 bytes of each device are written in turn: write i
goes to slot i % N of A, then to slot i % N of B. T threads write at once,
thread t the indices t, t + T, t + 2T, ..., each on its own connections,
so up to T pairs are in flight.

Stamp (4096 bytes), little-endian:
  0   8  magic b"DRDEPA01" (A) or b"DRDEPB01" (B)
  8   8  seed S
  16  8  index i
  24  8  the A write this one depends on (B: i; A: i)
  32  4064  filler: the 64-byte BLAKE2b digest of bytes 0..<32, repeated
A slot that does not start with a magic holds the device's first contents;
one that starts with it but is not exactly a stamp is a torn write, and a
violation.

Write log (--log, appended): "wrote N" when the writer stops (SIGTERM),
with N the pairs completed; "stopped REASON" on an NBD error.

Points: C times, a point of both devices is taken — `group` runs `TOOL group
freeze --socket A --socket B --json`; `sequential` runs `TOOL freeze
--socket A --json` then `TOOL freeze --socket B --json`, one after the
other — both views are read whole over NBD (nbd+unix:///view?socket=...),
checked, and dropped (`drop` on each control socket, SOCKET.control). A violation: a B stamp of write i in B's
view while A's view holds no stamp of write i or later in slot i % N (so
one of write i's successors there also counts, as it was acknowledged after
write i). The summary is one JSON object on standard output: points,
violations, points_with_violations, torn, b_stamps (over all points),
b_progress (points whose newest B stamp is newer than the previous
point's), seconds.

Exit status: 0 done (whatever the violations), 2 bad usage, 3 a tool or an
NBD connection failed.
"""

import argparse
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

SLOT = 4096
HEADER = struct.Struct("<8sQQQ")  # 32 bytes
MAGIC_A = b"DRDEPA01"
MAGIC_B = b"DRDEPB01"


def stamp(magic, seed, i):
    header = HEADER.pack(magic, seed, i, i)
    digest = hashlib.blake2b(header).digest()
    return header + (digest * (SLOT // len(digest)))[: SLOT - HEADER.size]


def decode(view, magic, seed):
    """The index of the stamp in `view`, None for no stamp, "torn" for a damaged one."""
    if view[:8] != magic:
        return None
    _, s, i, _ = HEADER.unpack_from(view)
    if s != seed or stamp(magic, seed, i) != bytes(view):
        return "torn"
    return i


def fail(message, status=2):
    print("dependent: " + message, file=sys.stderr)
    sys.exit(status)


# MARK: write


def cmd_write(a):
    import nbd

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    done = [0] * a.threads
    errors = []

    def writer(t):
        try:
            ha, hb = nbd.NBD(), nbd.NBD()
            ha.connect_uri(a.a)
            hb.connect_uri(a.b)
            for h in (ha, hb):
                if h.get_size() < a.slots * SLOT:
                    errors.append("an export holds fewer than %d slots" % a.slots)
                    return
            i = t
            while not stop.is_set():
                s = (i % a.slots) * SLOT
                ha.pwrite(stamp(MAGIC_A, a.seed, i), s)  # returns once acknowledged
                hb.pwrite(stamp(MAGIC_B, a.seed, i), s)
                done[t] += 1
                i += a.threads
            ha.shutdown()
            hb.shutdown()
        except nbd.Error as e:
            errors.append(" ".join(str(e).split()))
            stop.set()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(a.threads)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        for th in threads:
            th.join(0.2)
    with open(a.log, "a") as log:
        if errors:
            log.write("stopped %s\n" % errors[0])
        log.write("wrote %d\n" % sum(done))
    return 3 if errors else 0


# MARK: points


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail("%s exited with %d: %s" % (" ".join(cmd), r.returncode, r.stderr.strip()), 3)
    return r.stdout


def drop(sock):
    """`drop` on the server's control socket (SOCKET.control), answered ok."""
    import socket

    with socket.socket(socket.AF_UNIX) as c:
        c.connect(sock + ".control")
        c.sendall(b"drop\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"ok\n"):
        fail("drop on %s.control answered %r" % (sock, answer.decode(errors="replace")), 3)


def read_view(socket, size):
    import nbd

    h = nbd.NBD()
    h.connect_uri("nbd+unix:///view?socket=" + socket)
    data = bytearray()
    step = 1 << 20
    for o in range(0, size, step):
        data += h.pread(min(step, size - o), o)
    h.shutdown()
    return memoryview(bytes(data))


def cmd_points(a):
    size = a.slots * SLOT
    totals = dict(points=0, violations=0, points_with_violations=0, torn=0, b_stamps=0, b_progress=0)
    newest = -1
    start = time.monotonic()
    for _ in range(a.count):
        if a.mode == "group":
            run([a.tool, "group", "freeze", "--socket", a.a, "--socket", a.b, "--json"])
        else:
            run([a.tool, "freeze", "--socket", a.a, "--json"])
            run([a.tool, "freeze", "--socket", a.b, "--json"])
        va, vb = read_view(a.a, size), read_view(a.b, size)
        drop(a.a)
        drop(a.b)
        bad, top = 0, -1
        for s in range(a.slots):
            o = s * SLOT
            i = decode(vb[o : o + SLOT], MAGIC_B, a.seed)
            if i is None:
                continue
            if i == "torn":
                totals["torn"] += 1
                bad += 1
                continue
            totals["b_stamps"] += 1
            top = max(top, i)
            j = decode(va[o : o + SLOT], MAGIC_A, a.seed)
            if j == "torn":
                totals["torn"] += 1
                bad += 1
            elif i % a.slots != s or j is None or j < i:
                bad += 1
        totals["points"] += 1
        totals["violations"] += bad
        totals["points_with_violations"] += 1 if bad else 0
        if top > newest:
            totals["b_progress"] += 1
            newest = top
    totals["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(totals))
    return 0


def main():
    p = argparse.ArgumentParser(description="Dependent writes on two devices and a checker of their points.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("write", "points"):
        c = sub.add_parser(name)
        c.add_argument("--a", required=True)
        c.add_argument("--b", required=True)
        c.add_argument("--slots", type=int, required=True)
        c.add_argument("--seed", type=int, required=True)
        if name == "write":
            c.add_argument("--log", required=True)
            c.add_argument("--threads", type=int, default=4)
        else:
            c.add_argument("--tool", required=True)
            c.add_argument("--count", type=int, required=True)
            c.add_argument("--mode", choices=("group", "sequential"), required=True)
    a = p.parse_args()
    if a.slots < 1:
        fail("slot count %d is not positive" % a.slots)
    if a.seed < 0 or a.seed >= 1 << 64:
        fail("seed %d is not a 64-bit unsigned number" % a.seed)
    if getattr(a, "threads", 1) < 1 or getattr(a, "count", 1) < 1:
        fail("--threads and --count must be positive")
    return {"write": cmd_write, "points": cmd_points}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
