#!/usr/bin/env python3
"""Writes pipelines/samples/shapes.jsonl, the demo's events: every image of
tests/fixtures/shapes-eval/ (a third of them with a caption), some text-only
events, and a few broken events so that the demo shows dead letters. Image
paths are relative to this folder. Standard library only; deterministic.

    python3 pipelines/samples/make_samples.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent.parent / "tests" / "fixtures" / "shapes-eval"

labels = json.loads((EVAL / "labels.json").read_text())
rng = random.Random(11)
lines = []
for i, (name, cls) in enumerate(sorted(labels.items())):
    ev = {"id": f"shape-{Path(name).stem}", "image": f"../../tests/fixtures/shapes-eval/{name}",
          "attributes": {"true_label": cls}}
    if i % 3 == 0:
        ev["text"] = rng.choice(["a photo of a {}", "a {} on a light background", "product shot: {}"]).format(cls)
    lines.append(json.dumps(ev))
for i, cls in enumerate(sorted(set(labels.values()))[:12]):
    lines.append(json.dumps({"id": f"caption-{i:02d}", "text": f"a drawing of a {cls}"}))
# Broken on purpose: each becomes a dead letter with its reason.
lines += [
    '{"id": "broken-json", "text": ',
    json.dumps({"id": "no-content"}),
    json.dumps({"id": 17, "text": "the id must be a string"}),
    json.dumps({"id": "missing-file", "image": "../../tests/fixtures/shapes-eval/does-not-exist.png"}),
    json.dumps({"id": "not-an-image", "image": "../../tests/fixtures/shapes-eval/labels.json"}),
    json.dumps({"id": "remote-url", "image": "https://example.com/cat.jpg"}),
]
(HERE / "shapes.jsonl").write_text("\n".join(lines) + "\n")
print(f"wrote {len(lines)} events to {HERE / 'shapes.jsonl'}")
