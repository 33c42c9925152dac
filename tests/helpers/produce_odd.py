#!/usr/bin/env python3
"""Sends Kafka messages that well-behaved clients refuse to send, for tests
of a worker's hostile-input handling (kafka-python, which writes header
names as given).

    produce_odd.py --brokers HOST:PORT --topic T MESSAGES.json

MESSAGES.json is a list of {"key": str, "value": str, "headers": [[name,
value], ...]} where a header name is text, or {"hex": "..."} for raw bytes
(say, bytes that are not UTF-8). Prints one line per message:
`PARTITION OFFSET`.
"""

import argparse
import json
import sys

from kafka import KafkaProducer


class RawName(str):
    """A header name whose encoding is given bytes (kafka-python calls
    `name.encode("utf-8")`)."""

    def __new__(cls, raw: bytes):
        s = super().__new__(cls, raw.decode("latin-1"))
        s.raw = raw
        return s

    def encode(self, *args, **kwargs):  # noqa: ARG002 - the signature of str.encode
        return self.raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("messages")
    args = ap.parse_args()
    with open(args.messages) as f:
        messages = json.load(f)
    producer = KafkaProducer(bootstrap_servers=args.brokers, acks="all", max_request_size=16 << 20)
    futures = []
    for m in messages:
        headers = []
        for name, value in m.get("headers", []):
            if isinstance(name, dict):
                name = RawName(bytes.fromhex(name["hex"]))
            headers.append((name, b"" if value is None else value.encode()))
        futures.append(
            producer.send(args.topic, key=m["key"].encode(), value=m["value"].encode(), headers=headers)
        )
    for fut in futures:
        md = fut.get(timeout=30)
        print(md.partition, md.offset)
    producer.flush()
    producer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
