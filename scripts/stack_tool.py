#!/usr/bin/env python3
"""Small clients for the local stack (scripts/stack.sh runs them in .cache/stack-venv).

    stack_tool.py upload SRC_DIR BUCKET PREFIX      # every file under SRC_DIR -> s3://BUCKET/PREFIX/<relative path>
    stack_tool.py list BUCKET [PREFIX]              # one line per object: size and key
    stack_tool.py make-bucket NAME                  # CreateBucket (no error if it exists)
    stack_tool.py produce TOPIC FILE.jsonl          # one message per non-blank line
    stack_tool.py consume TOPIC [--count N] [--timeout S] [--group G]

S3 settings come from S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_REGION (default us-east-1); the client signs with SigV4 and uses path-style
addressing. Kafka settings come from KAFKA_BROKERS.

produce keys each message with the event's "id" when the line is a JSON object
that has one; other lines go without a key. consume prints one JSON object a
line: {"partition", "offset", "key", "value", "headers"} (key and value decoded
as UTF-8, headers a list of [name, value]); it exits 1 when --count is given and
fewer messages came within --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path


def s3_client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("S3_ENDPOINT")
    if not endpoint:
        sys.exit('stack_tool: S3_ENDPOINT is not set (eval "$(scripts/stack.sh env)")')
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )


def brokers() -> str:
    b = os.environ.get("KAFKA_BROKERS")
    if not b:
        sys.exit('stack_tool: KAFKA_BROKERS is not set (eval "$(scripts/stack.sh env)")')
    return b


def cmd_upload(args) -> None:
    src = Path(args.src_dir)
    if not src.is_dir():
        sys.exit(f"stack_tool: {src} is not a directory")
    prefix = args.prefix.strip("/")
    s3 = s3_client()
    n = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        s3.upload_file(str(path), args.bucket, key)
        print(f"s3://{args.bucket}/{key}")
        n += 1
    print(f"uploaded {n} files", file=sys.stderr)


def cmd_list(args) -> None:
    s3 = s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            print(f"{obj['Size']}\t{obj['Key']}")


def cmd_make_bucket(args) -> None:
    s3 = s3_client()
    try:
        s3.create_bucket(Bucket=args.name)
        print(f"created bucket {args.name}", file=sys.stderr)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        print(f"bucket {args.name} exists", file=sys.stderr)
    except s3.exceptions.BucketAlreadyExists:
        print(f"bucket {args.name} exists", file=sys.stderr)


def cmd_produce(args) -> None:
    from confluent_kafka import Producer

    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    producer = Producer({"bootstrap.servers": brokers(), "enable.idempotence": True})
    n = 0
    with open(args.file, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            key = None
            try:
                event = json.loads(line)
                if isinstance(event, dict) and event.get("id") is not None:
                    key = str(event["id"]).encode()
            except ValueError:
                pass
            while True:
                try:
                    producer.produce(args.topic, value=line, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            n += 1
    left = producer.flush(30)
    if left or errors:
        sys.exit(f"stack_tool: {left} messages undelivered, {len(errors)} failed: {errors[:3]}")
    print(f"produced {n} messages to {args.topic}", file=sys.stderr)


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", errors="replace")


def cmd_consume(args) -> None:
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": brokers(),
            "group.id": args.group or f"stack-tool-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            # tansu: a group join takes about half the session timeout.
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    got = 0
    deadline = time.monotonic() + args.timeout
    try:
        while (args.count is None or got < args.count) and time.monotonic() < deadline:
            msg = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                sys.exit(f"stack_tool: consume error: {msg.error()}")
            record = {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": _text(msg.key()),
                "value": _text(msg.value()),
                "headers": [[k, _text(v)] for k, v in (msg.headers() or [])],
            }
            print(json.dumps(record), flush=True)
            consumer.commit(message=msg, asynchronous=False)
            got += 1
    finally:
        consumer.close()
    if args.count is not None and got < args.count:
        sys.exit(f"stack_tool: got {got} of {args.count} messages from {args.topic} in {args.timeout:g} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("upload", help="upload a directory's files")
    p.add_argument("src_dir")
    p.add_argument("bucket")
    p.add_argument("prefix", help='key prefix ("" for none)')
    p.set_defaults(fn=cmd_upload)

    p = sub.add_parser("list", help="list objects")
    p.add_argument("bucket")
    p.add_argument("prefix", nargs="?", default="")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("make-bucket", help="create a bucket")
    p.add_argument("name")
    p.set_defaults(fn=cmd_make_bucket)

    p = sub.add_parser("produce", help="produce a JSON-lines file")
    p.add_argument("topic")
    p.add_argument("file")
    p.set_defaults(fn=cmd_produce)

    p = sub.add_parser("consume", help="consume messages as JSON lines")
    p.add_argument("topic")
    p.add_argument("--count", type=int, default=None, help="stop after N messages")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after S seconds (default 30)")
    p.add_argument("--group", default=None, help="consumer group (default: a fresh one)")
    p.set_defaults(fn=cmd_consume)

    args = ap.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    args.fn(args)


if __name__ == "__main__":
    main()
