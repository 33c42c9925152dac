#!/usr/bin/env python3
"""Fault-injecting HTTP/1.1 reverse proxy in front of an S3 server (stdlib only).

    s3_fault_proxy.py --upstream 127.0.0.1:PORT [--listen 127.0.0.1:0]
                      [--slowdown-rate 0.2] [--timeout-rate 0.0] [--timeout-secs 30]
                      [--forbid KEY_SUBSTRING ...] [--delay-secs 0]
                      [--hold-complete-secs 0] [--stall-body-secs 0]
                      [--no-content-length] [--armed-file PATH]
                      [--seed N] [--stats-file PATH]

Defaults: --slowdown-rate 0.2 (pass 0 for none), --timeout-rate 0,
--timeout-secs 30, a random seed. On start it prints one line,
`LISTENING 127.0.0.1:<port>`, to stdout; SIGTERM or SIGINT stops it.

Requests are forwarded byte for byte: request line and headers exactly as the
client sent them (Host included, since SigV4 signs it), bodies framed by
Content-Length or chunked transfer coding (aws-chunked payloads ride inside
either). `Expect: 100-continue` is honoured by relaying the upstream's own
100 Continue. Each client connection gets its own upstream connection, so
keep-alive works end to end.

Faults apply to object requests only: with path-style addressing, a path
that names a key after the bucket (`/bucket/key...`). Bucket-level requests
(`/`, `/bucket`, `/bucket/?list-type=2`, CreateBucket, ...) are always
forwarded, so test set-up stays clean. Virtual-hosted-style requests look
bucket-level to the proxy and are never faulted. For an object request:
  - if its path (raw or percent-decoded, without the query) contains a
    --forbid substring: 403 AccessDenied, every time;
  - else one draw of the seeded RNG: below --slowdown-rate, 503 SlowDown
    (not forwarded); below slowdown-rate + timeout-rate, the request is held
    unanswered for --timeout-secs and the connection is then closed;
    otherwise it is forwarded, an object GET after --delay-secs (a slow
    S3; default 0).
The draws follow arrival order, so a seed fixes which requests fail only when
the client sends one request at a time.

Three more faults, off by default:
  - --hold-complete-secs N: a CompleteMultipartUpload (POST ...?uploadId=)
    is read whole, held N seconds, then forwarded all the same (whether or
    not the client still waits): an upload that completes late, after its
    writer gave up on it;
  - --stall-body-secs N: an object GET's response head and half its body
    are relayed, then nothing for N seconds, then the connection closes;
  - --no-content-length: an object GET's response is relayed chunked,
    without its Content-Length.
With --armed-file PATH, every fault but --no-content-length (a change of
form, not an outage) applies only while PATH exists, so a test can switch
them on and off.
Injected replies do not reach the upstream. A faulted request's body is read
and dropped first (so the connection stays usable); when the client waits on
`Expect: 100-continue` the reply goes out at once with `Connection: close`.

Counters (requests, forwarded, injected_503, injected_timeouts, injected_403,
delayed, held_completes, stalled_bodies, unsized_bodies, upstream_errors;
requests counts everything but the stats path) are served as JSON at GET /__proxy_stats (never forwarded)
and written to --stats-file (atomically) on every change and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
from urllib.parse import unquote

STATS_PATH = "/__proxy_stats"
HEAD_LIMIT = 1 << 20  # largest request/response head accepted
CHUNK = 64 * 1024
CONTINUE_WAIT = 2.0  # seconds to wait for the upstream's 100 Continue before sending the body anyway

SLOWDOWN_XML = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
DENIED_XML = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"


class Closed(Exception):
    """The peer closed the connection (or sent something unusable)."""


class Head:
    """A parsed request or response head, with its raw bytes kept for relaying."""

    def __init__(self, raw: bytes):
        self.raw = raw
        lines = raw[:-4].split(b"\r\n")
        self.start = lines[0].decode("latin-1")
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise Closed(f"bad header line {line[:80]!r}")
            self.headers.append((name.strip().decode("latin-1").lower(), value.strip().decode("latin-1")))

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def tokens(self, name: str) -> list[str]:
        out = []
        for k, v in self.headers:
            if k == name:
                out += [t.strip().lower() for t in v.split(",") if t.strip()]
        return out

    def body_framing(self) -> tuple[str, int]:
        """('chunked', 0), ('length', n) or ('none', 0) for a request."""
        te = self.tokens("transfer-encoding")
        if te:
            if te[-1] != "chunked":
                raise Closed(f"unsupported transfer-encoding {te}")
            return "chunked", 0
        cl = self.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise Closed(f"bad content-length {cl!r}") from None
            return ("length", n) if n > 0 else ("none", 0)
        return "none", 0


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The next head, or None on a clean EOF before its first byte."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise Closed("connection closed inside a head") from None
    except asyncio.LimitOverrunError:
        raise Closed("head too large") from None
    # Tolerate stray CRLFs between messages (RFC 9112 2.2).
    raw = raw.lstrip(b"\r\n")
    if not raw:
        return await read_head(reader)
    return Head(raw)


async def copy_exact(reader, writer, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise Closed("connection closed inside a body")
        n -= len(data)
        if writer is not None:
            writer.write(data)
            await writer.drain()


async def copy_chunked(reader, writer) -> None:
    """Relays (or, with writer None, drops) a chunked body verbatim, trailers included."""

    async def line() -> bytes:
        try:
            data = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise Closed("bad chunked body") from None
        if writer is not None:
            writer.write(data)
        return data

    while True:
        size_line = await line()
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Closed(f"bad chunk size {size_line[:40]!r}") from None
        if size == 0:
            while (await line()) != b"\r\n":  # trailer fields, then the empty line
                pass
            if writer is not None:
                await writer.drain()
            return
        await copy_exact(reader, writer, size + 2)  # data and its CRLF


async def copy_body(reader, writer, framing: tuple[str, int]) -> None:
    kind, n = framing
    if kind == "length":
        await copy_exact(reader, writer, n)
    elif kind == "chunked":
        await copy_chunked(reader, writer)


class Proxy:
    def __init__(self, args):
        self.upstream_host, port = args.upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.slowdown_rate = args.slowdown_rate
        self.timeout_rate = args.timeout_rate
        self.timeout_secs = args.timeout_secs
        self.delay_secs = args.delay_secs
        self.hold_complete_secs = args.hold_complete_secs
        self.stall_body_secs = args.stall_body_secs
        self.no_content_length = args.no_content_length
        self.armed_file = args.armed_file
        self.forbid = list(args.forbid or [])
        self.rng = random.Random(args.seed)
        self.stats_file = args.stats_file
        self.stats = {
            "requests": 0,
            "forwarded": 0,
            "injected_503": 0,
            "injected_timeouts": 0,
            "injected_403": 0,
            "delayed": 0,
            "held_completes": 0,
            "stalled_bodies": 0,
            "unsized_bodies": 0,
            "upstream_errors": 0,
        }
        self.request_ids = 0
        self.write_stats()

    # ------------------------------------------------------------ stats

    def bump(self, name: str) -> None:
        self.stats[name] += 1
        self.write_stats()

    def write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.stats, f)
        os.replace(tmp, self.stats_file)

    # ------------------------------------------------------------ decisions

    @staticmethod
    def is_object(target: str) -> bool:
        bucket, _, key = target.split("?", 1)[0].lstrip("/").partition("/")
        return bool(bucket and key)

    def armed(self) -> bool:
        return self.armed_file is None or os.path.exists(self.armed_file)

    def decide(self, target: str) -> str:
        """'forward', 'forward_object', 'forbid', 'slowdown' or 'timeout' for a request target."""
        if not self.armed():
            return "forward"
        path = target.split("?", 1)[0]
        if path.startswith("http://") or path.startswith("https://"):  # absolute-form
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        bucket, _, key = path.lstrip("/").partition("/")
        if not bucket or not key:
            return "forward"  # bucket-level or service-level: never faulted
        decoded = unquote(path)
        if any(s in path or s in decoded for s in self.forbid):
            return "forbid"
        r = self.rng.random()
        if r < self.slowdown_rate:
            return "slowdown"
        if r < self.slowdown_rate + self.timeout_rate:
            return "timeout"
        return "forward_object"

    # ------------------------------------------------------------ replies

    async def reply(self, writer, status: str, body: bytes, content_type: str, *, head_only: bool, close: bool) -> None:
        self.request_ids += 1
        lines = [
            f"HTTP/1.1 {status}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            f"x-amz-request-id: proxy{self.request_ids:08d}",
            "Server: s3-fault-proxy",
            f"Connection: {'close' if close else 'keep-alive'}",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()

    # ------------------------------------------------------------ connections

    async def handle_client(self, creader, cwriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                req = await read_head(creader)
                if req is None:
                    return
                keep, upstream = await self.handle_request(req, creader, cwriter, upstream)
                if not keep:
                    return
        except (Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # a cancelled handler (shutdown) ends quietly too
        finally:
            for w in (cwriter, upstream[1] if upstream else None):
                if w is not None:
                    w.close()

    async def handle_request(self, req: Head, creader, cwriter, upstream):
        """Serves one request; returns (keep the client connection open?, upstream connection)."""
        parts = req.start.split(" ")
        if len(parts) != 3:
            raise Closed(f"bad request line {req.start[:80]!r}")
        method, target, version = parts
        framing = req.body_framing()
        expect_continue = "100-continue" in req.tokens("expect")
        client_close = "close" in req.tokens("connection") or (
            version == "HTTP/1.0" and "keep-alive" not in req.tokens("connection")
        )
        head_only = method == "HEAD"

        if target.split("?", 1)[0] == STATS_PATH:
            await copy_body(creader, None, framing)
            body = json.dumps(self.stats).encode()
            await self.reply(cwriter, "200 OK", body, "application/json", head_only=head_only, close=client_close)
            return not client_close, upstream

        self.bump("requests")
        action = self.decide(target)

        if action in ("slowdown", "forbid"):
            self.bump("injected_503" if action == "slowdown" else "injected_403")
            # Read and drop the body so the connection stays in step; a client
            # waiting for 100 Continue has not sent it: answer now and close.
            close = client_close or (expect_continue and framing[0] != "none")
            if not close:
                await copy_body(creader, None, framing)
            if action == "slowdown":
                await self.reply(
                    cwriter, "503 Slow Down", SLOWDOWN_XML, "application/xml", head_only=head_only, close=close
                )
            else:
                await self.reply(
                    cwriter, "403 Forbidden", DENIED_XML, "application/xml", head_only=head_only, close=close
                )
            return not close, upstream

        if action == "timeout":
            self.bump("injected_timeouts")
            drain = asyncio.ensure_future(copy_body(creader, None, framing))
            try:
                await asyncio.sleep(self.timeout_secs)
            finally:
                if drain.done() and not drain.cancelled():
                    drain.exception()  # retrieved, so asyncio does not log it
                drain.cancel()
            return False, upstream

        if action == "forward_object" and self.delay_secs > 0 and method == "GET":
            self.bump("delayed")
            await asyncio.sleep(self.delay_secs)
        if action == "forward_object" and self.hold_complete_secs > 0 and method == "POST" and "uploadId=" in target:
            return await self.hold_complete(req, framing, creader, cwriter)
        body_fault = None
        if method == "GET" and self.is_object(target):
            if action == "forward_object" and self.stall_body_secs > 0:
                body_fault = "stall"
            elif self.no_content_length:
                body_fault = "unsized"
        return await self.forward(
            req, method, framing, expect_continue, client_close, creader, cwriter, upstream, body_fault
        )

    async def hold_complete(self, req, framing, creader, cwriter):
        """A late CompleteMultipartUpload: read it, hold it, forward it on its own connection."""
        self.bump("held_completes")
        if "100-continue" in req.tokens("expect"):
            cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await cwriter.drain()
        body = Buffer()
        await copy_body(creader, body, framing)
        await asyncio.sleep(self.hold_complete_secs)
        try:
            ureader, uwriter = await self.connect_upstream()
            uwriter.write(req.raw + bytes(body.data))
            await uwriter.drain()
            resp = await read_head(ureader)
            if resp is None:
                raise Closed("upstream closed before answering")
            payload = Buffer()
            if resp.tokens("transfer-encoding") or resp.get("content-length") is not None:
                await copy_body(ureader, payload, resp.body_framing())
            uwriter.close()
            self.bump("forwarded")
            cwriter.write(resp.raw + bytes(payload.data))
            await cwriter.drain()
        except (OSError, Closed, asyncio.IncompleteReadError):
            pass
        return False, None

    async def connect_upstream(self):
        return await asyncio.open_connection(self.upstream_host, self.upstream_port, limit=HEAD_LIMIT)

    async def forward(
        self, req, method, framing, expect_continue, client_close, creader, cwriter, upstream, body_fault=None
    ):
        # Reuse the upstream connection unless it has gone away.
        if upstream is not None and (upstream[0].at_eof() or upstream[1].is_closing()):
            upstream[1].close()
            upstream = None
        try:
            if upstream is None:
                upstream = await self.connect_upstream()
            ureader, uwriter = upstream
            uwriter.write(req.raw)
            await uwriter.drain()
        except OSError as e:
            self.bump("upstream_errors")
            msg = f"<Error><Code>BadGateway</Code><Message>upstream: {e}</Message></Error>".encode()
            if not expect_continue:
                await copy_body(creader, None, framing)
            await self.reply(cwriter, "502 Bad Gateway", msg, "application/xml", head_only=method == "HEAD", close=True)
            return False, upstream
        self.bump("forwarded")

        # The request body goes up concurrently with reading the response, so
        # an early upstream answer (say, a signature error) cannot deadlock us.
        may_send = asyncio.Event()
        if not expect_continue:
            may_send.set()

        async def send_body():
            if framing[0] == "none":
                return
            try:
                await asyncio.wait_for(may_send.wait(), CONTINUE_WAIT)
            except asyncio.TimeoutError:
                pass  # as clients do: send the body without the 100 after a while
            await copy_body(creader, uwriter, framing)

        body_task = asyncio.ensure_future(send_body())
        # Its failure (say, the upstream closed early) is handled below; keep asyncio quiet about it.
        body_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        keep = not client_close
        try:
            while True:
                resp = await read_head(ureader)
                if resp is None:
                    raise Closed("upstream closed before answering")
                status = int(resp.start.split(" ", 2)[1])
                if body_fault is not None and status == 200 and resp.get("content-length") is not None:
                    await self.body_fault(body_fault, resp, ureader, cwriter)
                    uwriter.close()
                    return False, None
                cwriter.write(resp.raw)
                await cwriter.drain()
                if 100 <= status < 200 and status != 101:
                    may_send.set()
                    continue
                break
            # The final response's body.
            if method == "HEAD" or status in (204, 304) or status < 200:
                pass
            else:
                framing_resp = resp.body_framing()
                if resp.tokens("transfer-encoding") or resp.get("content-length") is not None:
                    await copy_body(ureader, cwriter, framing_resp)
                else:  # delimited by the upstream closing
                    while data := await ureader.read(CHUNK):
                        cwriter.write(data)
                        await cwriter.drain()
                    keep = False
            if "close" in resp.tokens("connection"):
                keep = False
            if not body_task.done():
                # Answered before the whole body went up: the client's stream
                # is no longer in step with ours.
                keep = False
            elif body_task.cancelled() or body_task.exception() is not None:
                keep = False
        except (Closed, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.bump("upstream_errors")
            keep = False
        finally:
            body_task.cancel()
        if not keep:
            uwriter.close()
            upstream = None
        return keep, upstream


class Buffer:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.data = bytearray()

    def write(self, d: bytes) -> None:
        self.data.extend(d)

    async def drain(self) -> None:
        pass


async def _body_fault(self, kind: str, resp: Head, ureader, cwriter) -> None:
    """Relays an object's response with a broken body: half of it then a
    stall, or chunked without its length."""
    n = int(resp.get("content-length"))
    body = Buffer()
    await copy_exact(ureader, body, n)
    data = bytes(body.data)
    if kind == "stall":
        self.bump("stalled_bodies")
        cwriter.write(resp.raw + data[: n // 2])
        await cwriter.drain()
        await asyncio.sleep(self.stall_body_secs)
        return
    self.bump("unsized_bodies")
    lines = [l for l in resp.raw[:-4].split(b"\r\n") if not l.lower().startswith((b"content-length:", b"connection:"))]
    head = b"\r\n".join(lines) + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    cwriter.write(head)
    for i in range(0, len(data), 8192):
        chunk = data[i : i + 8192]
        cwriter.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    cwriter.write(b"0\r\n\r\n")
    await cwriter.drain()


Proxy.body_fault = _body_fault


async def main_async(args) -> None:
    proxy = Proxy(args)
    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(proxy.handle_client, host, int(port), limit=HEAD_LIMIT)
    sock = server.sockets[0].getsockname()
    print(f"LISTENING {sock[0]}:{sock[1]}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()  # open connections are cancelled when asyncio.run returns
    proxy.write_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    ap.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0, any free port)"
    )
    ap.add_argument(
        "--slowdown-rate", type=float, default=0.2, help="share of object requests answered 503 SlowDown (default 0.2)"
    )
    ap.add_argument(
        "--timeout-rate", type=float, default=0.0, help="share of object requests held unanswered (default 0)"
    )
    ap.add_argument(
        "--timeout-secs", type=float, default=30.0, help="how long a held request is held before closing (default 30)"
    )
    ap.add_argument(
        "--forbid",
        nargs="+",
        action="extend",
        metavar="KEY_SUBSTRING",
        help="object paths with this substring get 403 AccessDenied",
    )
    ap.add_argument(
        "--delay-secs", type=float, default=0.0, help="forwarded object GETs wait this long first (default 0)"
    )
    ap.add_argument(
        "--hold-complete-secs",
        type=float,
        default=0.0,
        help="hold each CompleteMultipartUpload this long, then forward it anyway (default 0: off)",
    )
    ap.add_argument(
        "--stall-body-secs",
        type=float,
        default=0.0,
        help="object GETs: relay half the body, then stall this long (default 0: off)",
    )
    ap.add_argument(
        "--no-content-length", action="store_true", help="object GETs: relay the body chunked, without its length"
    )
    ap.add_argument("--armed-file", default=None, help="faults apply only while this file exists")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault RNG")
    ap.add_argument("--stats-file", default=None, help="JSON counters, rewritten on every change")
    args = ap.parse_args()
    for name in ("slowdown_rate", "timeout_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be within 0..1")
    if args.slowdown_rate + args.timeout_rate > 1.0:
        ap.error("--slowdown-rate + --timeout-rate must not exceed 1")
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
