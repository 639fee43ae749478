#!/usr/bin/env bash
# The thread-model measurement: `quiver bench decoupling --url` against `quiver serve`
# processes whose embedded log has P partitions (one log writer and one materializer thread
# each), one P after the other, everything else as `quiver bench config` prints it. For each
# P and load: events/s, predicts/s, predict p99, server CPU µs per event or predict and cores,
# ack → readable p99, sustained.
#
#   scripts/decoupling-partitions.sh [PARTITIONS="8 4 2"] [LEVELS=0.75,1] [FSYNC=batch]
#
# OUT=PREFIX keeps each run's JSON as PREFIX-pP.json; QUIVER_BIN picks the binary; SNAP sets
# [store] snapshot_interval (the bench config's 1s by default; 600s leaves snapshots out).
# Needs target/release/quiver (cargo build --release -p quiver) and the PostgreSQL on
# 127.0.0.1:5432 (the peer runs at every level too; its figures are in the JSON files).
set -euo pipefail
PARTS=${1:-8 4 2}
LEVELS=${2:-0.75,1}
FSYNC=${3:-batch}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${QUIVER_BIN:-$ROOT/target/release/quiver}
[ -x "$BIN" ] || { echo "$BIN not found (cargo build --release -p quiver)" >&2; exit 2; }
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

printf '| partitions | fsync | load | events/s | predicts/s | predict p99 ms | server CPU µs/op (cores) | ack → readable p99 ms | sustained |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for P in $PARTS; do
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$WORK/$P"
  "$BIN" bench config \
    | sed "s/^partitions = 8$/partitions = $P/; s/^fsync = \"batch\"$/fsync = \"$FSYNC\"/; s/^snapshot_interval = .*/snapshot_interval = \"${SNAP:-1s}\"/" \
    > "$WORK/$P/quiver.toml"
  grep -q "^partitions = $P$" "$WORK/$P/quiver.toml" || { echo "no [log] partitions line" >&2; exit 1; }
  "$BIN" serve --config "$WORK/$P/quiver.toml" --data-dir "$WORK/$P/data" \
    --listen "127.0.0.1:$PORT" > "$WORK/$P/serve.log" 2>&1 &
  PID=$!
  for _ in $(seq 200); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.05; done
  "$BIN" bench decoupling --url "http://127.0.0.1:$PORT" --connections 32 --levels "$LEVELS" \
    --json "$WORK/$P/r.json" > "$WORK/$P/bench.log" 2>&1
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  [ -n "${OUT:-}" ] && cp "$WORK/$P/r.json" "$OUT-p$P.json"
  python3 - "$P" "$FSYNC" "$WORK/$P/r.json" <<'PY'
import json, sys
p, fsync, path = sys.argv[1], sys.argv[2], sys.argv[3]
for level in json.load(open(path))["results"]["decoupling"]["levels"]:
    q = level["quiver"]
    if q:
        print(f"| {p} | {fsync} | {level['factor']}× | {q['events_per_s']:.0f} | {q['predicts_per_s']:.0f} "
              f"| {q['p99_us'] / 1e3:.2f} | {q['server_cpu_us_per_op']:.1f} ({q['server_cores']:.2f}) "
              f"| {q['ack_to_visible_p99_us'] / 1e3:.2f} | {'yes' if q['sustained'] else 'no'} |")
PY
done
