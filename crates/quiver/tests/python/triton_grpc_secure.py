"""tritonclient.grpc against Quiver over TLS (crates/quiver/tests/e2e_security.rs).

Usage: triton_grpc_secure.py HOST:PORT CA_PEM MODEL COLUMNS CASE [CERT_PEM KEY_PEM] [BEARER]

CASE is what the credentials should get from ModelInfer on MODEL:
  ok         the call is answered (COLUMNS zero-filled FP64 inputs, one row)
  denied     PERMISSION_DENIED (a known identity without the grant)
  unauth     UNAUTHENTICATED (no or unknown credentials)
  handshake  no call gets through at all (the TLS handshake is refused)
Every check raises on failure; the exit status is the verdict.
"""

import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, ca, model, columns, case = sys.argv[1:6]
rest = sys.argv[6:]
cert = key = bearer = None
if len(rest) >= 2:
    cert, key = rest[0], rest[1]
    rest = rest[2:]
if rest:
    bearer = rest[0]

client = grpcclient.InferenceServerClient(
    url=url,
    ssl=True,
    root_certificates=ca,
    private_key=key,
    certificate_chain=cert,
)
headers = {"authorization": f"Bearer {bearer}"} if bearer else None
inp = grpcclient.InferInput("input", [1, int(columns)], "FP64")
inp.set_data_from_numpy(np.zeros((1, int(columns)), dtype=np.float64))

try:
    result = client.infer(model, [inp], headers=headers, client_timeout=10)
    outcome, status = "ok", None
except InferenceServerException as e:
    outcome, status = "error", e.status()
    print("error:", e.status(), e.message())

if case == "ok":
    assert outcome == "ok", status
    assert result.get_response().model_name == model
elif case == "denied":
    assert status == "StatusCode.PERMISSION_DENIED", status
elif case == "unauth":
    assert status == "StatusCode.UNAUTHENTICATED", status
elif case == "handshake":
    # A refused handshake surfaces as UNAVAILABLE: the call never reached Quiver.
    assert status == "StatusCode.UNAVAILABLE", status
else:
    raise SystemExit(f"unknown case {case}")
print("verdict", case, "held")
