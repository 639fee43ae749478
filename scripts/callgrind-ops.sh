#!/usr/bin/env bash
# Server instructions per operation, counted by callgrind (repeatable where wall time on this
# noisy 2-core machine is not): the real `quiver serve` (release build) runs under
# `valgrind --tool=callgrind` with instrumentation off; after loading ENTITIES rows (32 f64) and a
# warm-up, collection is switched on (`callgrind_control -i on`) for exactly OPS operations
# sent by a Python keep-alive client (its own process, not counted), then off. Every thread of
# the server is counted while on (the materializers' work for ingest included). Per scenario:
# instructions per operation and the top functions (self cost).
#
#   scripts/callgrind-ops.sh [OPS=500] [ENTITIES=2000] [SCENARIOS="get feast10 predict ingest100"]
#
#   get        GET /v1/features/row/{key}                      (one entity, 32 features)
#   feast10    POST /get-online-features, 10 entities × 32 features
#   predict    POST /v1/models/gbdt32/predict (lookup + 100-tree GBDT, LightGBM)
#   ingest100  POST /v1/events?ack=durable, 100 events × 32 features (per event: ÷ 100)
#   update100  the same, each event overwriting every feature of an entity already loaded
#   floor      the GET's requests against a hyper server that answers each with a fixed body
#              of a GET reply's length (crates/bench/examples/floor.rs; build it with
#              cargo build --release -p quiver-bench --example floor): what the HTTP stack and
#              the runtime cost per request before any lookup
#
# Needs valgrind and target/release/quiver (cargo build --release -p quiver). Output files are
# kept in $OUT (default: a temporary directory, printed) for callgrind_annotate.
set -euo pipefail
OPS=${1:-500}
N=${2:-2000}
SCENARIOS=${3:-"get feast10 predict ingest100"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${QUIVER_BIN:-$ROOT/target/release/quiver}
command -v valgrind >/dev/null || { echo "valgrind not found (apt-get install valgrind)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "$BIN not found (cargo build --release -p quiver)" >&2; exit 2; }
WORK=$(mktemp -d)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

mkdir -p "$WORK/models"
cp -r "$ROOT/benchmarks/models/gbdt32" "$WORK/models/"
FEATURES=$(python3 -c 'print(", ".join("{ name = \"f%d\", type = \"f64\" }" % i for i in range(32)))')
python3 - "$N" > "$WORK/rows.jsonl" <<'PY'
import json, sys
n = int(sys.argv[1])
for i in range(n):
    print(json.dumps({"view": "row", "key": f"e{i}",
                      "values": {f"f{f}": ((i * 31 + f) % 97) / 48.0 - 1.0 for f in range(32)}}))
PY

# The client: OPS operations of one scenario over one keep-alive connection; every answer
# must be 200. Run twice per scenario: a warm-up (not counted), then the counted run.
cat > "$WORK/client.py" <<'PY'
import http.client, json, sys
port, scenario, ops, n, start = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
feats = json.dumps(["row:f%d" % f for f in range(32)])
for i in range(start, start + ops):
    k = (i * 7919) % n
    if scenario in ("get", "floor"):
        c.request("GET", f"/v1/features/row/e{k}")
    elif scenario == "feast10":
        keys = json.dumps([f"e{(k + j * 131) % n}" for j in range(10)])
        c.request("POST", "/get-online-features", body=f'{{"features":{feats},"entities":{{"user_id":{keys}}}}}')
    elif scenario == "predict":
        c.request("POST", "/v1/models/gbdt32/predict", body=f'{{"entities":{{"user_id":"e{k}"}}}}')
    elif scenario in ("ingest100", "update100"):
        key = (lambda j: f"n{i}-{j}") if scenario == "ingest100" else (lambda j: f"e{(k + j * 131) % n}")
        lines = "\n".join(json.dumps({"view": "row", "key": key(j), "values": {f"f{f}": (i + j + f) / 7.0 for f in range(32)}}) for j in range(100))
        c.request("POST", "/v1/events?ack=durable", body=lines)
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"{scenario}: {r.status} {body[:200]!r}")
PY

: > "$OUT/top.md"
printf '| scenario | operations | instructions / operation | per entity or event |\n|---|---:|---:|---:|\n' > "$OUT/summary.md"
for S in $SCENARIOS; do
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$WORK/data"
  cat > "$WORK/quiver.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
[log]
partitions = 8
fsync = "batch"
[store]
snapshot_interval = "1h"
[models]
repository = "$WORK/models"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "row"
entity = "user"
features = [$FEATURES]
TOML
  if [ "$S" = floor ]; then
    FLOOR_BIN=$(dirname "$BIN")/examples/floor
    [ -x "$FLOOR_BIN" ] || { echo "$FLOOR_BIN not found (cargo build --release -p quiver-bench --example floor)" >&2; exit 2; }
    # 3584 bytes: about a GET reply of this view (32 features; an age's digits vary).
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.$S" \
      "$FLOOR_BIN" hyper "127.0.0.1:$PORT" 3584 > "$WORK/serve.log" 2>&1 &
    PID=$!
    for _ in $(seq 1200); do curl -sf "127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done
    curl -sf "127.0.0.1:$PORT/" >/dev/null || { echo "the floor did not start under valgrind" >&2; cat "$WORK/serve.log" >&2; exit 1; }
  else
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.$S" \
      "$BIN" serve --config "$WORK/quiver.toml" > "$WORK/serve.log" 2>&1 &
    PID=$!
    for _ in $(seq 1200); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
    curl -sf "127.0.0.1:$PORT/readyz" >/dev/null || { echo "quiver did not get ready under valgrind" >&2; cat "$WORK/serve.log" >&2; exit 1; }
    "$BIN" push "$WORK/rows.jsonl" --url "http://127.0.0.1:$PORT" --batch-size 1000 >/dev/null
    for _ in $(seq 600); do curl -sf "127.0.0.1:$PORT/v1/features/row/e$((N - 1))" >/dev/null && break; sleep 0.1; done
  fi
  python3 "$WORK/client.py" "$PORT" "$S" 50 "$N" 1000000          # warm-up, not counted
  callgrind_control -i on "$PID" >/dev/null
  python3 "$WORK/client.py" "$PORT" "$S" "$OPS" "$N" 0
  callgrind_control -i off "$PID" >/dev/null
  kill -TERM "$PID"; wait "$PID" || true; PID=
  IR=$(awk '/^totals:/ {s += $2} END {print s + 0}' "$OUT/callgrind.$S")
  [ "$IR" -gt 0 ] || { echo "$S: callgrind counted nothing (callgrind_control failed?)" >&2; exit 1; }
  PER=$((IR / OPS))
  case $S in
    feast10) UNIT=$((PER / 10)) ;;
    ingest100|update100) UNIT=$((PER / 100)) ;;
    *) UNIT=$PER ;;
  esac
  printf '| %s | %d | %d | %d |\n' "$S" "$OPS" "$PER" "$UNIT" >> "$OUT/summary.md"
  { echo; echo "### $S: top functions (self instructions, $OPS operations)"; echo '```';
    callgrind_annotate --inclusive=no "$OUT/callgrind.$S" 2>/dev/null | sed -n '/^Ir  *file:function/,$p' | sed -n '3,22p'; echo '```'; } >> "$OUT/top.md"
done
cat "$OUT/summary.md"
echo
cat "$OUT/top.md"
echo
echo "callgrind files: $OUT (callgrind_annotate $OUT/callgrind.<scenario>)"
