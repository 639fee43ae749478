"""Drives tritonclient.http against a running Quiver (crates/quiver/tests/e2e_clients.rs).

Usage: triton_client.py HOST:PORT CASES_JSON

CASES_JSON: [{"model", "output", "inputs": [[...]], "expected": [...]}] — inputs and the
reference library's outputs (xgboost, lightgbm, onnxruntime) from the model fixtures; null in
inputs is a missing value (NaN). Every check raises on failure; the exit status is the verdict.
"""

import json
import sys

import numpy as np
from tensors import close, rows as case_rows
import tritonclient.http as httpclient

url, cases_path = sys.argv[1], sys.argv[2]
cases = json.load(open(cases_path))
client = httpclient.InferenceServerClient(url=url)
assert client.is_server_live() and client.is_server_ready()


for case in cases:
    model, output = case["model"], case["output"]
    rows = case_rows(case)
    want = np.array(case["expected"], dtype=np.float64)
    assert client.is_model_ready(model), model

    # 1. Defaults everywhere: binary tensors in and out (no outputs named: binary_data_output).
    inp = httpclient.InferInput("input", list(rows.shape), "FP64")
    inp.set_data_from_numpy(rows)
    result = client.infer(model, [inp])
    assert "binary_data_size" in result.get_output(output).get("parameters", {}), "binary reply"
    close(result.as_numpy(output), want, f"{model} defaults")

    # 2. A requested output with its default (binary_data=True), and one as JSON.
    for binary in (True, False):
        out = httpclient.InferRequestedOutput(output, binary_data=binary)
        result = client.infer(model, [inp], outputs=[out])
        assert ("data" in result.get_output(output)) != binary, f"binary_data={binary} honoured"
        close(result.as_numpy(output), want, f"{model} output binary_data={binary}")

    # 3. JSON inputs (binary_data=False); JSON has no NaN, so rows without missing values.
    finite = ~np.isnan(rows).any(axis=1)
    if finite.any():
        inp_json = httpclient.InferInput("input", [int(finite.sum()), rows.shape[1]], "FP64")
        inp_json.set_data_from_numpy(rows[finite], binary_data=False)
        out = httpclient.InferRequestedOutput(output, binary_data=False)
        got = client.infer(model, [inp_json], outputs=[out]).as_numpy(output)
        close(got, want[finite], f"{model} json in/out")

    # 4. A generic client: read the metadata, fill every declared input, infer.
    meta = client.get_model_metadata(model)
    inputs = []
    for spec in meta["inputs"]:
        shape = [rows.shape[0] if d == -1 else d for d in spec["shape"]]
        assert spec["datatype"] == "FP64" and shape == list(rows.shape), spec
        i = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        i.set_data_from_numpy(rows.reshape(shape))
        inputs.append(i)
    outputs = [httpclient.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
    result = client.infer(model, inputs, outputs=outputs)
    close(result.as_numpy(meta["outputs"][0]["name"]), want, f"{model} generic client")

# 5. Errors come back as tritonclient exceptions, not broken parses.
try:
    client.infer("no_such_model", [inp])
    raise AssertionError("an unknown model must fail")
except httpclient.InferenceServerException as e:
    assert "no_such_model" in str(e) or e.status() == "404", e

print("triton client: all checks passed")
