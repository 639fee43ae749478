#!/usr/bin/env bash
# Quiver's main job on the embedded default, start to finish: build, serve the quickstart
# config on a fresh data directory, push the example events, read features back the three
# ways, predict with the bundled model, then keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-7070}"
URL="http://127.0.0.1:${PORT}"
DATA="$(mktemp -d -t quiver-quickstart.XXXXXX)"

cargo build --release -p quiver
BIN=target/release/quiver

"$BIN" serve --config examples/quickstart/quiver.toml --data-dir "$DATA" --listen "127.0.0.1:${PORT}" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT

for _ in $(seq 1 100); do
  curl -fs "$URL/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo; echo "== push the example events (JSONL, then CSV)"
"$BIN" push examples/quickstart/events.jsonl --url "$URL"
"$BIN" push examples/quickstart/events.csv --url "$URL"

echo; echo "== one entity: GET /v1/features/txn/u1"
curl -s "$URL/v1/features/txn/u1"; echo

echo; echo "== Feast shape, with a window aggregate: POST /get-online-features"
curl -s -X POST "$URL/get-online-features" \
  -d '{"features":["txn:amount","txn:amount_sum_1h","profile:age_days"],"entities":{"user_id":["u1","u2","nobody"]}}'; echo

echo; echo "== point in time: u1 as served one minute ago (nothing yet) and now"
NOW_MS=$(( $(date +%s) * 1000 ))
curl -s -X POST "$URL/v1/features/historical" \
  -d "{\"features\":[\"txn:amount\",\"txn:amount_sum_1h\"],\"entities\":{\"user_id\":[\"u1\",\"u1\"]},\"timestamps\":[$((NOW_MS - 60000)),$((NOW_MS + 1000))]}"; echo

echo; echo "== read your own write: ingest with ack=none, read with its token"
TOKEN=$(curl -s -X POST "$URL/v1/events?ack=none" \
  -d '{"view":"txn","key":"u1","values":{"amount":42.0,"merchant":"quickstart"}}' | sed -E 's/.*"token":"([^"]*)".*/\1/')
curl -s -H "Quiver-Read-After: $TOKEN" "$URL/v1/features/txn/u1"; echo

echo; echo "== predict: u1's features from memory + the request's amount, through an ONNX model"
curl -s -X POST "$URL/v1/models/fraud/predict" -d '{"entities":{"user_id":"u1"},"features":{"amount":250.0}}'; echo
curl -s -X POST "$URL/v1/models/fraud/predict" -d '{"entities":{"user_id":"u1"},"features":{"amount":250.0}}'; echo "   <- the same request again: a cache hit"
"$BIN" predict fraud --entity user_id=u2 --feature request:amount=12.5 --url "$URL"

echo; echo "== the same through the Open Inference Protocol (KServe V2), entity keys as BYTES"
curl -s -X POST "$URL/v2/models/fraud/infer" \
  -d '{"inputs":[{"name":"user_id","datatype":"BYTES","shape":[2],"data":["u1","u2"]},{"name":"amount","datatype":"FP32","shape":[2],"data":[250.0,12.5]}]}'; echo

echo; echo "== a bad event is refused whole, with the index and field"
curl -s -X POST "$URL/v1/events" -d '[{"view":"txn","key":"u1","values":{"amount":"lots"}}]'; echo

echo; echo "== metrics (excerpt)"
curl -s "$URL/metrics" | grep -E '^quiver_(events_ingested_total|events_rejected_total|store_rows|materializer_lag_records)' | head -12

echo; echo "Quiver is serving on $URL (data in $DATA). Ctrl-C to stop."
wait $SERVER
