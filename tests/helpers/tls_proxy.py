#!/usr/bin/env python3
"""TLS-terminating TCP proxy (stdlib only), for testing Kafka clients over TLS
against a broker that speaks plaintext only.

    tls_proxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT \
                 --cert server.crt --key server.key [--stats-file PATH]

Accepts TLS connections (TLS 1.2 or later, the given certificate), and relays
the decrypted bytes both ways to a plaintext upstream, one upstream
connection per client connection. The broker must advertise the proxy's
address (tansu: --advertised-listener-url), so that clients come back
through the proxy after their metadata request. On start it prints one line,
`LISTENING 127.0.0.1:<port>`, to stdout. A thread per connection (a test
has a few dozen). Counters (handshakes, failed_handshakes, bytes_up,
bytes_down) go to --stats-file as JSON, rewritten after every handshake and
every closed connection.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import threading

CHUNK = 64 * 1024


class Proxy:
    def __init__(self, args, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.upstream = args.upstream.rsplit(":", 1)
        self.stats_file = args.stats_file
        self.stats = {"handshakes": 0, "failed_handshakes": 0, "bytes_up": 0, "bytes_down": 0}
        self.lock = threading.Lock()

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.stats[name] += n
            if name.endswith("handshakes"):
                self.write_stats()

    def write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump(self.stats, f)
        os.replace(tmp, self.stats_file)

    def pipe(self, src, dst, counter: str) -> None:
        try:
            while data := src.recv(CHUNK):
                self.bump(counter, len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            client = self.ctx.wrap_socket(raw, server_side=True)
        except OSError:
            # Say, the client does not trust the certificate.
            self.bump("failed_handshakes")
            raw.close()
            return
        client.settimeout(None)
        self.bump("handshakes")
        try:
            upstream = socket.create_connection((self.upstream[0], int(self.upstream[1])))
        except OSError:
            client.close()
            return
        t = threading.Thread(target=self.pipe, args=(upstream, client, "bytes_down"), daemon=True)
        t.start()
        self.pipe(client, upstream, "bytes_up")
        t.join()
        client.close()
        upstream.close()
        with self.lock:
            self.write_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: any free port)")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the plaintext server")
    ap.add_argument("--cert", required=True, help="server certificate (PEM)")
    ap.add_argument("--key", required=True, help="its private key (PEM)")
    ap.add_argument("--stats-file", default=None, help="JSON counters, rewritten on every change")
    args = ap.parse_args()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    proxy = Proxy(args, ctx)
    proxy.write_stats()

    host, port = args.listen.rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    signal.signal(signal.SIGTERM, lambda *_: (proxy.write_stats(), os._exit(0)))
    print(f"LISTENING {server.getsockname()[0]}:{server.getsockname()[1]}", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=proxy.handle, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        proxy.write_stats()
    sys.exit(0)


if __name__ == "__main__":
    main()
