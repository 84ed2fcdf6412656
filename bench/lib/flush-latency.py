#!/usr/bin/python3
"""p50 of FLUSH after a 4 KiB random write, over NBD (libnbd), for SECONDS.
Usage: flush-latency.py URI SECONDS -> prints "P50_MS COUNT" """
import random
import sys
import time

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
block = bytearray(random.randbytes(4096))
latencies = []
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    h.pwrite(block, random.randrange(size // 4096) * 4096)
    t = time.monotonic()
    h.flush()
    latencies.append(time.monotonic() - t)
h.shutdown()
latencies.sort()
print("%.3f %d" % (latencies[len(latencies) // 2] * 1000, len(latencies)))
