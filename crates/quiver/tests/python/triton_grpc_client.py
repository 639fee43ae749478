"""Drives tritonclient.grpc against a running Quiver (crates/quiver/tests/e2e_clients.rs).

Usage: triton_grpc_client.py HOST:PORT CASES_JSON   (the cases of triton_client.py)

ModelInfer with raw_input_contents (tritonclient's only encoding), ModelStreamInfer, metadata,
readiness and the repository index. Every check raises on failure; the exit status is the verdict.
"""

import json
import queue
import sys

import numpy as np
from tensors import close, rows as case_rows
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, cases_path = sys.argv[1], sys.argv[2]
cases = json.load(open(cases_path))
client = grpcclient.InferenceServerClient(url=url)
assert client.is_server_live() and client.is_server_ready()
assert client.get_server_metadata().name == "quiver"


index = {m.name for m in client.get_model_repository_index().models}
for case in cases:
    model, output = case["model"], case["output"]
    assert model in index, (model, index)
    assert client.is_model_ready(model)
    rows = case_rows(case)
    want = np.array(case["expected"], dtype=np.float64)

    # A generic client: the metadata's one signature, filled, all outputs returned.
    meta = client.get_model_metadata(model)
    assert [i.name for i in meta.inputs] == ["input"] and list(meta.inputs[0].shape) == [-1, rows.shape[1]], meta
    inp = grpcclient.InferInput("input", list(rows.shape), "FP64")
    inp.set_data_from_numpy(rows)
    close(client.infer(model, [inp]).as_numpy(output), want, f"{model} infer")
    out = grpcclient.InferRequestedOutput(output)
    close(client.infer(model, [inp], outputs=[out]).as_numpy(output), want, f"{model} infer, output named")

    # FP32 inputs: the same model, other datatype (finite rows compared to themselves via FP64).
    f32 = rows.astype(np.float32)
    inp32 = grpcclient.InferInput("input", list(f32.shape), "FP32")
    inp32.set_data_from_numpy(f32)
    inp64 = grpcclient.InferInput("input", list(f32.shape), "FP64")
    inp64.set_data_from_numpy(f32.astype(np.float64))
    close(client.infer(model, [inp32]).as_numpy(output), client.infer(model, [inp64]).as_numpy(output), f"{model} FP32")

# ModelStreamInfer: every request answered on the stream, in order; an error does not end it.
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
case = cases[0]
rows = case_rows(case)
for n in (1, 5, 17):
    inp = grpcclient.InferInput("input", [n, rows.shape[1]], "FP64")
    inp.set_data_from_numpy(rows[:n])
    client.async_stream_infer(case["model"], [inp], request_id=str(n))
bad = grpcclient.InferInput("input", [1, 3], "FP64")
bad.set_data_from_numpy(np.zeros((1, 3)))
client.async_stream_infer(case["model"], [bad], request_id="bad")
inp = grpcclient.InferInput("input", [2, rows.shape[1]], "FP64")
inp.set_data_from_numpy(rows[:2])
client.async_stream_infer(case["model"], [inp], request_id="2")
got = [answers.get(timeout=30) for _ in range(5)]
client.stop_stream()
for (result, error), n in zip(got[:3], (1, 5, 17)):
    assert error is None, error
    close(result.as_numpy(case["output"]), np.array(case["expected"][:n]), f"stream {n}")
assert got[3][0] is None and got[3][1] is not None and "shape" in str(got[3][1]), got[3]
assert got[4][1] is None, got[4][1]
close(got[4][0].as_numpy(case["output"]), np.array(case["expected"][:2]), "stream after an error")

try:
    client.infer("no_such_model", [inp])
    raise AssertionError("an unknown model must fail")
except InferenceServerException as e:
    assert "NOT_FOUND" in str(e.status()) or "no_such_model" in str(e), e

# RPCs Quiver does not serve answer UNIMPLEMENTED, not a hang or a broken stream.
try:
    client.get_inference_statistics(cases[0]["model"])
    raise AssertionError("ModelStatistics is not served")
except InferenceServerException as e:
    assert "UNIMPLEMENTED" in str(e.status()), e

print("triton grpc client: all checks passed")
