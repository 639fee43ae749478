#!/usr/bin/env python3
"""onnxruntime's per-row time on the same models and rows Quiver's runtimes are measured on
(`quiver bench runtimes` runs this in the same run and prints both side by side).

Usage: python3 scripts/ort_bench.py MODEL.onnx ROWS.json [--seconds S]
Prints one JSON object: {"batch_1_us_per_row": ..., "batch_256_us_per_row": ..., "onnxruntime": version}.
Timing: medians of repeated timed blocks, single-threaded session (intra_op_num_threads=1),
as Quiver evaluates a request on one core.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def per_row_us(sess, name, output, x, batch, seconds):
    # Step through the rows (batch 1 takes a different row each call), as the Rust side does.
    feeds = [{name: x[s:s + batch]} for s in range(0, len(x) - batch + 1, batch)]
    for k in range(50):  # warm-up
        sess.run([output], feeds[k % len(feeds)])
    blocks = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(blocks) < 5:
        n = max(1, 2000 // batch)
        t = time.perf_counter()
        for k in range(n):
            sess.run([output], feeds[k % len(feeds)])
        blocks.append((time.perf_counter() - t) * 1e6 / (n * batch))
    return statistics.median(blocks)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("rows")
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    with open(a.rows) as f:
        raw = json.load(f)
    width = inp.shape[1] if isinstance(inp.shape[1], int) else len(raw[0])
    x = np.array([[np.nan if v is None else v for v in r[:width]] for r in raw], dtype=dtype)
    while len(x) < 256:
        x = np.concatenate([x, x])
    x = x[:256]
    floats = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)")]
    out = {
        "onnxruntime": ort.__version__,
        "batch_1_us_per_row": per_row_us(sess, inp.name, floats[0], x, 1, a.seconds),
        "batch_256_us_per_row": per_row_us(sess, inp.name, floats[0], x, 256, a.seconds),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
