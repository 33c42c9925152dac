#!/usr/bin/env bash
# One night of catalog re-embedding, ready for cron: plan what changed since
# the last snapshot, embed only that, write tonight's complete snapshot.
#
#   scripts/nightly.sh CATALOG STATE_DIR [plan options...]
#   e.g. scripts/nightly.sh /data/catalog.jsonl /data/clip --text-column title
#
# STATE_DIR/nights/DAY/ holds the night's plan and run output,
# STATE_DIR/snapshots/DAY/ its snapshot (one row per product). DAY is today
# in UTC (CLIPSTREAM_NIGHT_DATE overrides it). A night that was killed part
# way is finished by running the same command again: the plan is kept, the
# run resumes, a finished snapshot is kept.
#
# CLIPSTREAM_PIPELINE (default pipelines/nightly-local.toml) is the
# pipeline that embeds the plan; it reads CLIPSTREAM_NIGHT.
# CLIPSTREAM_BIN (default: target/release/clipstream, else clipstream on
# PATH) is the binary.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
catalog=$1
mkdir -p "$2"
state="$(cd "$2" && pwd)"   # absolute: the pipeline resolves paths against its own folder
shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
bin=${CLIPSTREAM_BIN:-}
if [[ -z "$bin" ]]; then
  if [[ -x "$here/target/release/clipstream" ]]; then bin="$here/target/release/clipstream"; else bin=clipstream; fi
fi
pipeline=${CLIPSTREAM_PIPELINE:-$here/pipelines/nightly-local.toml}
day=${CLIPSTREAM_NIGHT_DATE:-$(date -u +%F)}
export CLIPSTREAM_NIGHT="$state/nights/$day"
mkdir -p "$CLIPSTREAM_NIGHT" "$state/snapshots"

# The newest snapshot of an earlier night.
previous=""
for s in "$state"/snapshots/*/; do
  [[ -d "$s" ]] || continue
  name=$(basename "$s")
  [[ "$name" < "$day" ]] && previous="${s%/}"
done

echo "== night $day: plan (previous snapshot: ${previous:-none})"
"$bin" plan --catalog "$catalog" --pipeline "$pipeline" --night "$CLIPSTREAM_NIGHT" \
  ${previous:+--previous "$previous"} "$@"
echo "== night $day: run"
"$bin" run --no-progress "$pipeline"
echo "== night $day: snapshot"
"$bin" snapshot --night "$CLIPSTREAM_NIGHT" --output "$CLIPSTREAM_NIGHT/out" \
  ${previous:+--previous "$previous"} --out "$state/snapshots/$day" --pipeline "$pipeline"
