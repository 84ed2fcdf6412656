#!/usr/bin/python3
"""A raw client of a tracking-server control socket, and a server that stalls.

The control protocol (Sources/DualRestore/Tracking/ControlSocket.swift): a
request is one line; its answer is "ok" or "error SENTENCE", then KEY VALUE
lines, then an empty line. A connection whose first request is `hold`
carries further requests until `release`.

  session --control PATH STEP...
      Connects once and runs the steps in order; a step is a request line
      (e.g. "hold limit=1", "freeze", "release") or "sleep=SECONDS". Each
      answer is printed on standard output as one JSON line, flushed:
      {"request": ..., "ok": true|false, "error": ..., "fields": {...},
       "seconds": time from sending to the end of the answer, "at": seconds
       since the session began}.
      A connection the server closes ends the session: {"closed": true}.

  stall --control PATH
      Listens on PATH as a tracking-server that answers status, holds at
      once ("ok", drain_seconds 0, limit_seconds 1000) and never answers
      anything else (a hold that carries its action, then=, included):
      a device whose action never ends, to keep a coordinator holding the
      others. Prints "listening" once bound; runs until killed.

Exit status: 0, or 2 on bad usage.
"""

import json
import os
import socket
import sys
import time


def answer(conn, pending):
    """Reads one answer up to its empty line: (lines, rest) or (None, rest) when closed."""
    while b"\n\n" not in pending:
        chunk = conn.recv(4096)
        if not chunk:
            return None, pending
        pending += chunk
    text, _, rest = pending.partition(b"\n\n")
    return text.decode(errors="replace").split("\n"), rest


def cmd_session(path, steps):
    begin = time.monotonic()
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    pending = b""
    for step in steps:
        if step.startswith("sleep="):
            time.sleep(float(step[6:]))
            continue
        start = time.monotonic()
        try:
            conn.sendall((step + "\n").encode())
            lines, pending = answer(conn, pending)
        except OSError:
            lines = None
        if lines is None:
            print(json.dumps({"request": step, "closed": True}), flush=True)
            return 0
        first = lines[0]
        fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines[1:])
        print(
            json.dumps(
                {
                    "request": step,
                    "ok": first == "ok",
                    "error": first[6:] if first.startswith("error ") else None,
                    "fields": fields,
                    "seconds": round(time.monotonic() - start, 6),
                    "at": round(time.monotonic() - begin, 6),
                }
            ),
            flush=True,
        )
    conn.close()
    return 0


def cmd_stall(path):
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    print("listening", flush=True)
    held = []
    while True:
        conn, _ = server.accept()
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                break
            line += chunk
        if line.startswith(b"status"):
            conn.sendall(b"ok\nchanged_blocks 0\n\n")
            conn.close()
            continue
        # A hold that carries its action (then=) is that action: never answered.
        if line.startswith(b"hold") and b" then=" not in line:
            conn.sendall(b"ok\ndrain_seconds 0.000001\nlimit_seconds 1000\n\n")
        held.append(conn)  # kept open, never answered again


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("session", "stall") or sys.argv[2] != "--control":
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "session":
        return cmd_session(sys.argv[3], sys.argv[4:])
    return cmd_stall(sys.argv[3])


if __name__ == "__main__":
    sys.exit(main())
