"""Drives the real Feast SDK against a running Quiver (crates/quiver/tests/e2e_clients.rs).

Usage: feast_client.py QUIVER_URL REPO_DIR

Quiver holds (ingested by the Rust test before this runs): driver 1001 with conv_rate 0.5,
trips 10 (now) and driver 1002 with conv_rate 0.25, trips 3 (two hours ago: past the view's 1 h
TTL). Every check raises on failure; the exit status is the verdict.
"""

import sys
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import requests
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import PushMode
from feast.types import Float64, Int64

url, repo = sys.argv[1], sys.argv[2]

with open(f"{repo}/feature_store.yaml", "w") as f:
    f.write(
        f"""project: quiver_test
registry: {repo}/registry.db
provider: local
online_store:
  type: remote
  path: {url}
offline_store:
  type: file
entity_key_serialization_version: 3
auth:
  type: no_auth
"""
    )

driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
source = FileSource(name="driver_src", path=f"{repo}/driver.parquet", timestamp_field="event_timestamp")
push_source = PushSource(name="driver_push", batch_source=source)
view = FeatureView(
    name="driver_stats",
    entities=[driver],
    ttl=timedelta(hours=1),
    schema=[
        Field(name="driver_id", dtype=Int64),
        Field(name="conv_rate", dtype=Float64),
        Field(name="trips", dtype=Int64),
    ],
    online=True,
    source=push_source,
)
service = FeatureService(name="driver_svc", features=[view])
store = FeatureStore(repo_path=repo)
store.apply([driver, source, push_source, view, service])

FEATURES = ["driver_stats:conv_rate", "driver_stats:trips"]


def read(ids, features=FEATURES, **kw):
    rows = [{"driver_id": i} for i in ids]
    return store.get_online_features(features=features, entity_rows=rows, **kw).to_dict()


def eventually(ids, want, what):
    """Acknowledged writes are durable before they are applied: poll, bounded."""
    deadline = time.time() + 10
    while True:
        got = read(ids)
        if got == want:
            return
        if time.time() > deadline:
            raise AssertionError(f"{what}: got {got}, want {want}")
        time.sleep(0.05)


# 1. Reads equal what was ingested; a TTL-expired value and an unknown key come back missing.
got = read([1001, 1002, 9999])
want = {"driver_id": [1001, 1002, 9999], "conv_rate": [0.5, None, None], "trips": [10, None, None]}
assert got == want, f"read: {got}"
full = read([1001], full_feature_names=True)
assert full == {"driver_id": [1001], "driver_stats__conv_rate": [0.5], "driver_stats__trips": [10]}, full

# 2. A feature service resolves (the SDK sends only its name; Quiver's [[feature_service]]).
by_service = store.get_online_features(features=store.get_feature_service("driver_svc"), entity_rows=[{"driver_id": 1001}]).to_dict()
assert by_service == {"driver_id": [1001], "conv_rate": [0.5], "trips": [10]}, by_service

now = datetime.now(timezone.utc)

# 3. write_to_online_store lands and reads back.
store.write_to_online_store(
    "driver_stats",
    pd.DataFrame({"driver_id": [2001], "conv_rate": [0.75], "trips": [7], "event_timestamp": [now]}),
)
eventually([2001], {"driver_id": [2001], "conv_rate": [0.75], "trips": [7]}, "write_to_online_store")

# 4. push (the SDK writes through /write-to-online-store for each view of the push source).
store.push(
    "driver_push",
    pd.DataFrame({"driver_id": [3001], "conv_rate": [0.125], "trips": [1], "event_timestamp": [now]}),
    to=PushMode.ONLINE,
)
eventually([3001], {"driver_id": [3001], "conv_rate": [0.125], "trips": [1]}, "push")

# 5. Feast's push HTTP API, as a push client calls it.
r = requests.post(
    f"{url}/push",
    json={
        "push_source_name": "driver_push",
        "df": {"driver_id": [4001], "conv_rate": [2.5], "trips": [4], "event_timestamp": [now.isoformat()]},
        "to": "online",
    },
    timeout=10,
)
assert r.status_code == 200, r.text
eventually([4001], {"driver_id": [4001], "conv_rate": [2.5], "trips": [4]}, "/push")
# `to` may also name the offline store: one write path, the log, feeds both.
r = requests.post(
    f"{url}/push",
    json={"push_source_name": "driver_push", "df": {"driver_id": [4002], "conv_rate": [1.5], "trips": [2]}, "to": "online_and_offline"},
    timeout=10,
)
assert r.status_code == 200, r.text
eventually([4002], {"driver_id": [4002], "conv_rate": [1.5], "trips": [2]}, "/push online_and_offline")
r = requests.post(f"{url}/push", json={"push_source_name": "driver_push", "df": {"driver_id": [1]}, "to": "nowhere"}, timeout=10)
assert r.status_code == 400, r.text
r = requests.post(f"{url}/push", json={"push_source_name": "nope", "df": {"driver_id": [1]}}, timeout=10)
assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_PUSH_SOURCE", r.text
assert requests.get(f"{url}/health", timeout=10).status_code == 200

print("feast client: all checks passed")
