#!/usr/bin/env python3
"""Checks s3_fault_proxy.py against a real S3 server with boto3 (needs boto3:
scripts/stack.sh venv). With the local stack running:

    eval "$(scripts/stack.sh env)"
    "$(scripts/stack.sh venv)" tests/helpers/s3_fault_proxy_check.py

Runs the proxy (slowdown 0.2, seed 7, one forbidden key) in front of
$S3_ENDPOINT and checks that boto3's own retries carry 50 uploads and 50
downloads through the injected 503s, that the forbidden key gets AccessDenied,
that a multipart upload (Expect: 100-continue parts) and a chunked,
UNSIGNED-PAYLOAD upload go through, that a held request times out, and that
the counters at /__proxy_stats and in the stats file agree.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore
from boto3.s3.transfer import TransferConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

HERE = Path(__file__).resolve().parent
BUCKET = os.environ.get("CHECK_BUCKET", "clipstream-images")


def start_proxy(upstream: str, *extra: str, stats_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "s3_fault_proxy.py"), "--upstream", upstream, "--stats-file", stats_file, *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("LISTENING "), line
    return proc, "http://" + line.split(" ", 1)[1]


def client(endpoint: str, **cfg) -> "botocore.client.S3":
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **cfg),
    )


def stats(endpoint: str) -> dict:
    u = urlsplit(endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/__proxy_stats")
    return json.loads(conn.getresponse().read())


def chunked_round_trip(stats_file: str) -> None:
    """Chunked bodies both ways, byte for byte, on one kept-alive connection.

    S3 servers refuse chunked PUTs without a length (411), so a stub upstream
    records the exact bytes it receives and answers with a chunked body, with
    a trailer, that holds them."""
    got: list[bytes] = []
    stub = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = stub.accept()
        buf = b""
        while len(got) < 2:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            end = b"0\r\n\r\n" if len(got) == 0 else None
            if end and buf.endswith(end) or not end and buf.count(b"\r\n\r\n") and buf.endswith(b"abc"):
                got.append(buf)
                half = len(buf) // 2
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n" % half
                    + buf[:half]
                    + b"\r\n"
                    + b"%x\r\n" % (len(buf) - half)
                    + buf[half:]
                    + b"\r\n"
                    + b"0\r\nx-trailer: 1\r\n\r\n"
                )
                buf = b""
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    proc, endpoint = start_proxy(f"127.0.0.1:{stub.getsockname()[1]}", "--slowdown-rate", "0", stats_file=stats_file)
    try:
        u = urlsplit(endpoint)
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        reader = sock.makefile("rb")
        sent = [
            b"PUT /b/chunked HTTP/1.1\r\nHost: Some.Host:1\r\nX-Odd-Case: v\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
            b"PUT /b/fixed HTTP/1.1\r\nHost: Some.Host:1\r\nContent-Length: 3\r\n\r\nabc",
        ]
        for raw in sent:
            sock.sendall(raw)
            assert reader.readline().startswith(b"HTTP/1.1 200"), "status"
            while reader.readline() != b"\r\n":
                pass
            body = b""
            while (size := int(reader.readline().split(b";")[0], 16)) > 0:
                body += reader.read(size)
                reader.readline()
            assert reader.readline() == b"x-trailer: 1\r\n" and reader.readline() == b"\r\n"
            assert body == raw, (body, raw)
        sock.close()
        print("chunked request and response bodies relayed byte for byte, kept alive")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        stub.close()


def read_response(reader) -> tuple[bytes, dict, bytes]:
    status = reader.readline()
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


def injected_reply_framing(upstream: str, stats_file: str) -> None:
    """Every object request faulted: a body is drained and the connection kept;
    a client waiting on Expect: 100-continue is answered at once, then closed."""
    proc, endpoint = start_proxy(upstream, "--slowdown-rate", "1", stats_file=stats_file)
    try:
        u = urlsplit(endpoint)
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        reader = sock.makefile("rb")
        sock.sendall(b"PUT /bkt/key HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = read_response(reader)
        assert status.startswith(b"HTTP/1.1 503") and b"<Code>SlowDown</Code>" in body, (status, body)
        assert headers["content-type"] == "application/xml" and headers["connection"] == "keep-alive", headers
        sock.sendall(b"HEAD /bkt/key HTTP/1.1\r\nHost: h\r\n\r\n")  # no body after a HEAD's head
        status = reader.readline()
        while reader.readline() != b"\r\n":
            pass
        assert status.startswith(b"HTTP/1.1 503"), status
        sock.sendall(b"GET /__proxy_stats HTTP/1.1\r\nHost: h\r\n\r\n")  # still in step
        status, headers, body = read_response(reader)
        assert json.loads(body)["injected_503"] == 2, body
        sock.sendall(b"GET /bkt HTTP/1.1\r\nHost: h\r\n\r\n")  # bucket-level: forwarded (unsigned, so refused upstream)
        status, headers, body = read_response(reader)
        assert headers.get("server") != "s3-fault-proxy" and b"<Code>SlowDown</Code>" not in body, (
            status,
            headers,
            body,
        )
        sock.close()

        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        reader = sock.makefile("rb")
        sock.sendall(b"PUT /bkt/key HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = read_response(reader)
        assert status.startswith(b"HTTP/1.1 503") and headers["connection"] == "close", (status, headers)
        assert reader.read() == b"", "connection left open"
        sock.close()
        print("injected replies: body drained and kept alive; HEAD without body; Expect answered at once and closed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    upstream = urlsplit(os.environ["S3_ENDPOINT"]).netloc
    tmp = Path(tempfile.mkdtemp(prefix="s3-fault-proxy-check-"))
    stats_file = str(tmp / "stats.json")
    proc, endpoint = start_proxy(
        upstream, "--slowdown-rate", "0.2", "--seed", "7", "--forbid", "forbidden/", stats_file=stats_file
    )
    try:
        s3 = client(endpoint, retries={"mode": "standard", "max_attempts": 10})
        s3.head_bucket(Bucket=BUCKET)  # bucket-level: never faulted

        t = time.monotonic()
        bodies = {f"proxy-check/obj-{i:03d}": os.urandom(1000 + i) for i in range(50)}
        for key, body in bodies.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        for key, body in bodies.items():
            assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
        st = stats(endpoint)
        print(f"50 puts + 50 gets ok in {time.monotonic() - t:.1f} s; stats {st}")
        assert st["injected_503"] > 0, st

        try:
            s3.put_object(Bucket=BUCKET, Key="proxy-check/forbidden/x", Body=b"x")
            raise AssertionError("forbidden key was accepted")
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "AccessDenied", e.response
            print("forbidden key -> AccessDenied", e.response["ResponseMetadata"]["HTTPStatusCode"])
        try:
            s3.head_object(Bucket=BUCKET, Key="proxy-check/forbidden/x")
            raise AssertionError("forbidden HEAD was accepted")
        except botocore.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
            print("forbidden HEAD -> 403")

        big = tmp / "big.bin"
        data = os.urandom(17 * 1024 * 1024)
        big.write_bytes(data)
        cfg = TransferConfig(
            multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024, max_concurrency=4
        )
        t = time.monotonic()
        s3.upload_file(str(big), BUCKET, "proxy-check/big.bin", Config=cfg)
        head = s3.head_object(Bucket=BUCKET, Key="proxy-check/big.bin")
        assert head["ContentLength"] == len(data) and head["ETag"].endswith('-4"'), head
        out = tmp / "big.out"
        s3.download_file(BUCKET, "proxy-check/big.bin", str(out), Config=cfg)
        assert out.read_bytes() == data
        print(f"multipart upload (4 parts) + ranged download ok in {time.monotonic() - t:.1f} s, ETag {head['ETag']}")

        # Expect: 100-continue, by hand: the upstream's 100 comes through, then the final answer.
        u = urlsplit(endpoint)
        creds = boto3.Session().get_credentials()
        payload = os.urandom(4096)
        for attempt in range(20):  # the 503s are random: retry by hand
            req = AWSRequest(
                method="PUT",
                url=f"{endpoint}/{BUCKET}/proxy-check/expect.bin",
                data=payload,
                headers={
                    "Expect": "100-continue",
                    "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
                    "Content-Length": str(len(payload)),
                },
            )
            SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
            sock = socket.create_connection((u.hostname, u.port), timeout=10)
            head = [f"PUT /{BUCKET}/proxy-check/expect.bin HTTP/1.1", f"Host: {u.netloc}"]
            head += [f"{k}: {v}" for k, v in req.headers.items()]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            first = sock.recv(65536)
            if first.startswith(b"HTTP/1.1 100"):
                sock.sendall(payload)
                final = b""
                while b"\r\n\r\n" not in final:
                    final += sock.recv(65536)
                sock.close()
                assert final.startswith(b"HTTP/1.1 200"), final
                break
            assert first.startswith(b"HTTP/1.1 503") and b"connection: close" in first.lower(), first
            sock.close()
        assert s3.get_object(Bucket=BUCKET, Key="proxy-check/expect.bin")["Body"].read() == payload
        print(
            f"Expect: 100-continue relayed (upstream 100, then 200) after {attempt} injected 503s"
        )

        for key in [*bodies, "proxy-check/big.bin", "proxy-check/expect.bin"]:
            s3.delete_object(Bucket=BUCKET, Key=key)
        final = stats(endpoint)
        assert json.loads(Path(stats_file).read_text()) == final
        print("stats", final)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)

    chunked_round_trip(stats_file)
    injected_reply_framing(upstream, stats_file)

    # Held requests: every object request hangs for 2 s, then the connection closes.
    proc, endpoint = start_proxy(
        upstream, "--slowdown-rate", "0", "--timeout-rate", "1", "--timeout-secs", "2", stats_file=stats_file
    )
    try:
        s3 = client(endpoint, retries={"mode": "standard", "max_attempts": 1}, read_timeout=5)
        s3.list_objects_v2(Bucket=BUCKET, MaxKeys=1)  # bucket-level: forwarded
        t = time.monotonic()
        try:
            s3.get_object(Bucket=BUCKET, Key="proxy-check/held")
            raise AssertionError("held request was answered")
        except (botocore.exceptions.ConnectionClosedError, botocore.exceptions.ReadTimeoutError) as e:
            print(f"held request -> {type(e).__name__} after {time.monotonic() - t:.1f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    st = json.loads(Path(stats_file).read_text())
    assert st["injected_timeouts"] >= 1 and st["forwarded"] == 1, st  # botocore may resend once on a fresh connection
    print("timeout stats", st)
    shutil.rmtree(tmp)
    print("OK")


if __name__ == "__main__":
    main()
