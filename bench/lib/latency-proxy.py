#!/usr/bin/env python3
"""A link of a given round trip between two Unix sockets: every chunk that
crosses it is held for half the round trip in its direction, in order.
Usage: latency-proxy.py LISTEN_SOCKET TARGET_SOCKET ROUND_TRIP_MS"""
import asyncio
import sys
import time

listen, target, rtt_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
half = rtt_ms / 2000.0


async def pump(reader, writer):
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                writer.close()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(deliver())
    while True:
        data = await reader.read(1 << 20)
        await queue.put((time.monotonic() + half, data or None))
        if not data:
            break
    await task


async def serve(client_reader, client_writer):
    server_reader, server_writer = await asyncio.open_unix_connection(target)
    await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer),
                         return_exceptions=True)


async def main():
    server = await asyncio.start_unix_server(serve, path=listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
