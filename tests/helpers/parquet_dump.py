#!/usr/bin/env python3
"""Independent reader for clipstream's Parquet output (pyarrow, not the
writer's own library): prints one JSON object per row, and checks the
schema on the way.

    parquet_dump.py DIR_OR_FILE...
"""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

EXPECTED = {
    "id": "string",
    "source": "string",
    "partition": "int32",
    "offset": "int64",
    "image_uri": "string",
    "image_etag": "string",
    "text": "string",
    "attributes": "string",
    "clip_score": "float",
    "model_id": "string",
    "event_time": "timestamp[ms, tz=UTC]",
    "processed_at": "timestamp[ms, tz=UTC]",
}


def files(args):
    for a in args:
        p = Path(a)
        if p.is_dir():
            # Recursive: Hive-style date folders (dt=YYYY-MM-DD/) hold files too.
            yield from sorted(x for x in p.rglob("*.parquet") if not x.name.startswith((".", "_")))
        else:
            yield p


def main():
    for path in files(sys.argv[1:]):
        table = pq.read_table(path)
        schema = {f.name: str(f.type) for f in table.schema}
        for name, ty in EXPECTED.items():
            if schema.get(name) != ty:
                sys.exit(f"{path}: column {name} is {schema.get(name)}, expected {ty}")
        for name in ("image_embedding", "text_embedding"):
            if not schema.get(name, "").startswith("fixed_size_list<item: float>"):
                sys.exit(f"{path}: column {name} is {schema.get(name)}")
        # Added after the first release: absent in older files.
        for name, ty in (("needs_review", "bool"), ("review_reason", "string")):
            if name in schema and schema[name] != ty:
                sys.exit(f"{path}: column {name} is {schema[name]}, expected {ty}")
        for row in table.to_pylist():
            out = {k: row[k] for k in ("id", "source", "partition", "offset", "image_uri", "text", "attributes",
                                       "image_embedding", "text_embedding", "labels", "clip_score", "model_id")}
            out["needs_review"] = row.get("needs_review")
            out["review_reason"] = row.get("review_reason")
            out["processed_at_ms"] = round(row["processed_at"].timestamp() * 1000)
            out["file"] = path.name
            print(json.dumps(out))


if __name__ == "__main__":
    main()
