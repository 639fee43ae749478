#!/usr/bin/env bash
# Server CPU per read, measured from outside: the real `quiver serve` (release build) holding
# N entities × 32 f64 features, driven by wrk (its own process, so its CPU is not the
# server's), for the plain GET, Feast's /get-online-features with 1 and 10 entities, and
# (with --grpc) nothing else. For each path: requests/s, p50/p99 from wrk, and the server's
# CPU µs per request and per entity from /proc/PID/stat (utime + stime) over the run.
#
#   scripts/wrk-reads.sh [--floor] [ENTITIES=100000] [SECONDS=10] [CONNECTIONS=10] [THREADS=2]
#
# --floor adds, measured the same way right after, two servers that only answer every request
# with a fixed body as long as the GET's reply (crates/bench/examples/floor.rs): tokio alone,
# and hyper — what any server spends per request on this machine before it looks anything up.
#
# Needs wrk (apt-get install wrk) and target/release/quiver (cargo build --release -p quiver;
# with --floor also cargo build --release -p quiver-bench --example floor).
set -euo pipefail
FLOOR=
if [ "${1:-}" = --floor ]; then FLOOR=1; shift; fi
N=${1:-100000}
SECS=${2:-10}
CONNS=${3:-10}
THREADS=${4:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${QUIVER_BIN:-$ROOT/target/release/quiver}
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "$BIN not found (cargo build --release -p quiver)" >&2; exit 2; }
WORK=$(mktemp -d)
PID=
FLOOR_PID=
cleanup() {
  for p in $PID $FLOOR_PID; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FEATURES=$(python3 -c 'print(", ".join("{ name = \"f%d\", type = \"f64\" }" % i for i in range(32)))')
cat > "$WORK/quiver.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
[log]
partitions = 8
fsync = "batch"
[store]
snapshot_interval = "1h"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "row"
entity = "user"
features = [$FEATURES]
TOML
python3 - "$N" > "$WORK/rows.jsonl" <<'PY'
import json, sys
n = int(sys.argv[1])
for i in range(n):
    print(json.dumps({"view": "row", "key": f"e{i}",
                      "values": {f"f{f}": ((i * 31 + f) % 97) / 48.0 - 1.0 for f in range(32)}}))
PY
"$BIN" serve --config "$WORK/quiver.toml" > "$WORK/serve.log" 2>&1 &
PID=$!
for _ in $(seq 200); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.05; done
"$BIN" push "$WORK/rows.jsonl" --url "http://127.0.0.1:$PORT" --batch-size 1000 >/dev/null
# Applied (not just durable): the last key reads back.
for _ in $(seq 400); do curl -sf "127.0.0.1:$PORT/v1/features/row/e$((N - 1))" >/dev/null && break; sleep 0.05; done

FLIST=$(python3 -c 'import json; print(json.dumps(["row:f%d" % f for f in range(32)]))')
lua() { # $1 = entities per request (0: GET)
  cat <<LUA
local n, k = $N, $1
local features = '$FLIST'
math.randomseed(os.time())
request = function()
  local i = math.random(0, n - 1)
  if k == 0 then return wrk.format("GET", "/v1/features/row/e" .. i) end
  local keys = {}
  for j = 0, k - 1 do keys[#keys + 1] = '"e' .. ((i + j * 7919) % n) .. '"' end
  local body = '{"features":' .. features .. ',"entities":{"user_id":[' .. table.concat(keys, ",") .. ']},"full_feature_names":false}'
  return wrk.format("POST", "/get-online-features", {["Content-Type"] = "application/json"}, body)
end
LUA
}
cpu_ticks() { awk '{print $14 " " $15}' "/proc/$1/stat"; } # utime stime of pid $1
HZ=$(getconf CLK_TCK)
# measure NAME PID PORT K: wrk on the request req.lua makes, one row of the table.
measure() {
  local name=$1 pid=$2 port=$3 k=$4
  wrk -t1 -c"$CONNS" -d1s -s "$WORK/req.lua" "http://127.0.0.1:$port" >/dev/null # warm-up
  local before after out reqs rps p50 p99 non2xx u0 s0 u1 s1 us per
  before=$(cpu_ticks "$pid")
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency -s "$WORK/req.lua" "http://127.0.0.1:$port")
  after=$(cpu_ticks "$pid")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  [ -z "$non2xx" ] || { echo "$non2xx non-2xx replies for $name" >&2; exit 1; }
  read -r u0 s0 <<< "$before"
  read -r u1 s1 <<< "$after"
  us=$(python3 -c "u, s = ($u1 - $u0) / $HZ * 1e6 / $reqs, ($s1 - $s0) / $HZ * 1e6 / $reqs; print(f'{u + s:.1f} ({u:.1f} + {s:.1f})')")
  per=$(python3 -c "print(f'{($u1 - $u0 + $s1 - $s0) / $HZ * 1e6 / $reqs / max($k, 1):.1f}')")
  echo "| $name | $rps | $p50 | $p99 | $us | $per |"
}
printf '| path | req/s | p50 | p99 | server CPU µs/req (user + sys) | µs/entity |\n|---|---|---|---|---|---|\n'
for k in 0 1 10; do
  lua "$k" > "$WORK/req.lua"
  name=$([ "$k" = 0 ] && echo "GET /v1/features/row/{key}" || echo "POST /get-online-features, $k entit$([ "$k" = 1 ] && echo y || echo ies)")
  measure "$name" "$PID" "$PORT" "$k"
done
[ -n "$FLOOR" ] || exit 0
FLOOR_BIN=$(dirname "$BIN")/examples/floor
[ -x "$FLOOR_BIN" ] || { echo "$FLOOR_BIN not found (cargo build --release -p quiver-bench --example floor)" >&2; exit 2; }
BYTES=$(curl -sf "127.0.0.1:$PORT/v1/features/row/e0" | wc -c)
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
lua 0 > "$WORK/req.lua"
for mode in raw hyper; do
  "$FLOOR_BIN" "$mode" "127.0.0.1:$PORT" "$BYTES" > "$WORK/floor.log" 2>&1 &
  FLOOR_PID=$!
  for _ in $(seq 200); do curl -sf "127.0.0.1:$PORT/" >/dev/null && break; sleep 0.05; done
  curl -sf "127.0.0.1:$PORT/" >/dev/null || { echo "the $mode floor did not start" >&2; cat "$WORK/floor.log" >&2; exit 1; }
  measure "floor: $mode, a fixed $BYTES-byte reply" "$FLOOR_PID" "$PORT" 0
  kill "$FLOOR_PID"; wait "$FLOOR_PID" 2>/dev/null || true; FLOOR_PID=
done
