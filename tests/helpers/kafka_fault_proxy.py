#!/usr/bin/env python3
"""A TCP proxy in front of a Kafka-protocol broker that holds some requests
(stdlib only): a coordinator that is slow to answer, for tests.

    kafka_fault_proxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
                         [--hold-api 9 ...] [--hold-secs 15] [--hold-count 2]
                         [--armed-file PATH] [--stats-file PATH]

Kafka requests are frames: an int32 size, then the request header (int16
api key, int16 version, int32 correlation id, client id). Every frame from
a client is forwarded to the upstream as it arrives, except, while armed
(always, or while --armed-file exists), the first --hold-count frames whose
api key is one of --hold-api (default 9, OffsetFetch): each of those is
held --hold-secs and then forwarded. Later frames of the same connection
are not held behind it, so the answers come back out of order, which Kafka
clients allow (they match answers by correlation id); heartbeats keep
flowing while a lookup hangs. Broker answers are relayed byte for byte.
The broker must advertise this proxy's address, so that clients come back
through it.

On start it prints `LISTENING HOST:PORT`. Counters (connections, frames,
held) are written as JSON to --stats-file on every change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys


class Proxy:
    def __init__(self, args):
        self.upstream = args.upstream.rsplit(":", 1)
        self.hold_apis = set(args.hold_api or [9])
        self.hold_secs = args.hold_secs
        self.hold_left = args.hold_count
        self.armed_file = args.armed_file
        self.stats_file = args.stats_file
        self.stats = {"connections": 0, "frames": 0, "held": 0, "held_by_client": {}}
        self.write_stats()

    def write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.stats, f)
        os.replace(tmp, self.stats_file)

    def armed(self) -> bool:
        return self.armed_file is None or os.path.exists(self.armed_file)

    async def handle(self, creader, cwriter) -> None:
        self.stats["connections"] += 1
        self.write_stats()
        try:
            ureader, uwriter = await asyncio.open_connection(self.upstream[0], int(self.upstream[1]))
        except OSError:
            cwriter.close()
            return
        lock = asyncio.Lock()
        pending: set[asyncio.Task] = set()

        async def send(frame: bytes, delay: float) -> None:
            if delay:
                await asyncio.sleep(delay)
            async with lock:
                uwriter.write(frame)
                await uwriter.drain()

        async def answers() -> None:
            while data := await ureader.read(65536):
                cwriter.write(data)
                await cwriter.drain()

        relay = asyncio.ensure_future(answers())
        try:
            while True:
                size_bytes = await creader.readexactly(4)
                (size,) = struct.unpack(">i", size_bytes)
                body = await creader.readexactly(size)
                api_key = struct.unpack(">h", body[:2])[0]
                self.stats["frames"] += 1
                delay = 0.0
                if api_key in self.hold_apis and self.hold_left > 0 and self.armed():
                    self.hold_left -= 1
                    delay = self.hold_secs
                    self.stats["held"] += 1
                    (n,) = struct.unpack(">h", body[8:10])
                    client = body[10 : 10 + n].decode("utf-8", "replace") if n > 0 else ""
                    by = self.stats["held_by_client"]
                    by[client] = by.get(client, 0) + 1
                    self.write_stats()
                t = asyncio.ensure_future(send(size_bytes + body, delay))
                pending.add(t)
                t.add_done_callback(pending.discard)
                if not delay:
                    await t
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, struct.error):
            pass
        finally:
            # Held frames still go up, late: a broker that answers late.
            for t in list(pending):
                try:
                    await t
                except (ConnectionError, asyncio.CancelledError):
                    pass
            relay.cancel()
            uwriter.close()
            cwriter.close()


async def main_async(args) -> None:
    proxy = Proxy(args)
    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(proxy.handle, host, int(port))
    sock = server.sockets[0].getsockname()
    print(f"LISTENING {sock[0]}:{sock[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    proxy.write_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the broker")
    ap.add_argument("--hold-api", type=int, action="append", help="api key to hold (repeatable; default 9)")
    ap.add_argument("--hold-secs", type=float, default=15.0, help="how long a held request waits (default 15)")
    ap.add_argument("--hold-count", type=int, default=2, help="how many requests to hold in all (default 2)")
    ap.add_argument("--armed-file", default=None, help="hold only while this file exists")
    ap.add_argument("--stats-file", default=None, help="JSON counters")
    args = ap.parse_args()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
