#!/usr/bin/env python3
"""Trains the test models on synthetic data and writes them with reference predictions.

Outputs (small, committed, so tests need no Python):
  crates/model/tests/fixtures/xgb_binary.json      XGBoost JSON (binary:logistic)
  crates/model/tests/fixtures/lgbm_binary.txt      LightGBM text (binary)
  crates/model/tests/fixtures/reference.json       inputs (with NaNs) and each library's P(class 1)
  crates/model/tests/fixtures/onnx_*.onnx          ONNX models (skl2onnx, onnxmltools), zipmap=False
  crates/model/tests/fixtures/onnx_reference.json  their inputs and onnxruntime's outputs
  benchmarks/models/gbdt32/1/model.txt             the benchmark GBDT (100 trees, depth 6, 32 features)
  benchmarks/models/gbdt32_onnx/1/model.onnx       the same GBDT converted by onnxmltools
  benchmarks/models/gbdt32/rows.json               rows the per-row runtime benchmark evaluates

Usage: pip install numpy scikit-learn xgboost lightgbm skl2onnx onnxmltools onnxruntime
       python3 scripts/make_models.py
"""
import json
import os

import lightgbm as lgb
import numpy as np
import onnxmltools
import onnxruntime as ort
import sklearn
import skl2onnx
import xgboost as xgb
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "crates", "model", "tests", "fixtures")
FEATURES = 32
TREES = 30
DEPTH = 5


def data(n, rng):
    x = rng.normal(size=(n, FEATURES))
    logit = x[:, 0] * 1.5 - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + np.sin(x[:, 4] * 2)
    y = (logit + rng.normal(scale=0.5, size=n) > 0).astype(int)
    # Missing values, so each library's default-direction rule is exercised.
    x[rng.random(size=x.shape) < 0.05] = np.nan
    return x, y


def main():
    rng = np.random.default_rng(7)
    x, y = data(4000, rng)
    xr, _ = data(300, rng)
    xr[0, :] = np.nan  # a row of nothing but missing values
    xr[1, :] = 0.0     # and one of exact zeros (LightGBM's zero-as-missing rule)

    xm = xgb.XGBClassifier(n_estimators=TREES, max_depth=DEPTH, learning_rate=0.3, random_state=7)
    xm.fit(x, y)
    xm.save_model(os.path.join(OUT, "xgb_binary.json"))
    xgb_p = xm.predict_proba(xr)[:, 1]

    lm = lgb.LGBMClassifier(n_estimators=TREES, num_leaves=31, max_depth=DEPTH, learning_rate=0.3, random_state=7, verbose=-1)
    lm.fit(x, y)
    lm.booster_.save_model(os.path.join(OUT, "lgbm_binary.txt"))
    lgb_p = lm.predict_proba(xr)[:, 1]

    rows = [[None if np.isnan(v) else float(v) for v in row] for row in xr]
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump({"inputs": rows, "xgboost": [float(p) for p in xgb_p], "lightgbm": [float(p) for p in lgb_p],
                   "versions": {"xgboost": xgb.__version__, "lightgbm": lgb.__version__}}, f)
    print("wrote", OUT)

    # The benchmark model: 100 trees of depth 6 on 32 features (BENCHMARKS.md, `quiver bench predict`).
    bench = os.path.join(HERE, "..", "benchmarks", "models", "gbdt32", "1")
    os.makedirs(bench, exist_ok=True)
    bm = lgb.LGBMClassifier(n_estimators=100, num_leaves=64, max_depth=6, learning_rate=0.1, random_state=7, verbose=-1)
    bm.fit(x, y)
    bm.booster_.save_model(os.path.join(bench, "model.txt"))
    bench_onnx = os.path.join(HERE, "..", "benchmarks", "models", "gbdt32_onnx", "1")
    os.makedirs(bench_onnx, exist_ok=True)
    save_onnx(onnxmltools.convert_lightgbm(bm.booster_, initial_types=[("input", FloatTensorType([None, FEATURES]))],
                                           zipmap=False, target_opset=15),
              os.path.join(bench_onnx, "model.onnx"))
    xb, _ = data(256, np.random.default_rng(11))
    with open(os.path.join(bench, "..", "rows.json"), "w") as f:
        json.dump([[None if np.isnan(v) else round(float(v), 6) for v in row] for row in xb], f)
    print("wrote", bench, bench_onnx)

    onnx_models(rng)
    failing_shadow_models()
    quickstart_model()
    fraud_example_model()


def failing_shadow_models():
    """Two hand-built ONNX graphs on one input, for the end-to-end test of a shadow version
    that errors (crates/quiver/tests/e2e_models.rs):
      onnx_half.onnx        y = 0.5 * x                       (the primary)
      onnx_lookup4.onnx     y = table[int(x)], table of 4     (fails at run time for x >= 4,
                            yet passes warm-up, which feeds defaults, 0 and NaN)"""
    from onnx import TensorProto, helper
    out = os.path.join(HERE, "..", "crates", "model", "tests", "fixtures")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    half = helper.make_graph(
        [helper.make_node("Mul", ["input", "half"], ["y"])], "half", [x], [y],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])])
    save_onnx(helper.make_model(half, opset_imports=[helper.make_opsetid("", 15)]),
              os.path.join(out, "onnx_half.onnx"))
    lookup = helper.make_graph([
        helper.make_node("Cast", ["input"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["idx", "flat"], ["idx1"]),
        helper.make_node("Gather", ["table", "idx1"], ["g"], axis=0),
        helper.make_node("Reshape", ["g", "col"], ["y"]),
    ], "lookup4", [x], [y], initializer=[
        helper.make_tensor("table", TensorProto.FLOAT, [4], [0.1, 0.2, 0.3, 0.4]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("col", TensorProto.INT64, [2], [-1, 1]),
    ])
    save_onnx(helper.make_model(lookup, opset_imports=[helper.make_opsetid("", 15)]),
              os.path.join(out, "onnx_lookup4.onnx"))
    print("wrote onnx_half.onnx, onnx_lookup4.onnx")


def fraud_example_model():
    """`quiver demo`'s model (examples/fraud): a LightGBM GBDT, 100 trees of depth 6, on the
    features three upstream services produce, in examples/fraud/models/fraud_gbdt/config.toml's
    order. The label is synthetic: large and unusual payments, failed logins and risky devices."""
    rng = np.random.default_rng(5)
    n = 20000
    amount = rng.gamma(2.0, 40.0, n)
    merchant_risk = rng.beta(2, 8, n)
    foreign = (rng.random(n) < 0.1).astype(float)
    sum_5m = amount * rng.uniform(1, 4, n)
    count_1h = rng.poisson(3, n).astype(float)
    max_24h = amount * rng.uniform(1, 3, n)
    session_s = rng.gamma(2.0, 120.0, n)
    pages = rng.poisson(8, n).astype(float)
    failures_1h = rng.poisson(0.3, n).astype(float)
    device_score = rng.beta(2, 6, n)
    emulator = (rng.random(n) < 0.03).astype(float)
    new_device = (rng.random(n) < 0.15).astype(float)
    req_amount = rng.gamma(2.0, 40.0, n)
    logit = (0.012 * req_amount + 3 * merchant_risk + 1.2 * foreign + 0.004 * sum_5m + 0.15 * count_1h
             - 0.002 * session_s + 0.9 * failures_1h + 3 * device_score + 2 * emulator + 0.8 * new_device - 6.5)
    y = (logit + rng.logistic(size=n) > 0).astype(int)
    x = np.stack([amount, merchant_risk, foreign, sum_5m, count_1h, max_24h, session_s, pages, failures_1h,
                  device_score, emulator, new_device, req_amount], axis=1)
    m = lgb.LGBMClassifier(n_estimators=100, num_leaves=48, max_depth=6, learning_rate=0.1, random_state=7, verbose=-1)
    m.fit(x, y)
    out = os.path.join(HERE, "..", "examples", "fraud", "models", "fraud_gbdt", "1")
    os.makedirs(out, exist_ok=True)
    m.booster_.save_model(os.path.join(out, "model.txt"))
    print("wrote", out, "fraud rate", y.mean())


def quickstart_model():
    """The quickstart's fraud model: logistic regression (ONNX) on
    [txn:amount, txn:amount_sum_1h, txn:txn_count_5m, profile:age_days, request:amount]."""
    rng = np.random.default_rng(3)
    n = 5000
    amount = rng.gamma(2.0, 30.0, n)
    sum_1h = amount * rng.uniform(1, 6, n)
    count_5m = rng.poisson(2, n).astype(float)
    age = rng.uniform(0, 2000, n)
    req = rng.gamma(2.0, 30.0, n)
    logit = 0.02 * req + 0.004 * sum_1h + 0.5 * count_5m - 0.002 * age - 3
    y = (logit + rng.normal(size=n) > 0).astype(int)
    x = np.stack([amount, sum_1h, count_5m, age, req], axis=1).astype(np.float32)
    lr = LogisticRegression(max_iter=1000).fit(x, y)
    out = os.path.join(HERE, "..", "examples", "quickstart", "models", "fraud", "1")
    os.makedirs(out, exist_ok=True)
    save_onnx(skl2onnx.to_onnx(lr, x[:1], options={id(lr): {"zipmap": False}},
                               target_opset={"": 15, "ai.onnx.ml": 3}),
              os.path.join(out, "model.onnx"))
    print("wrote", out)


def save_onnx(model, path):
    # Fixed producer fields so that regenerating gives the same bytes.
    model.producer_version = ""
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def onnx_models(rng):
    """ONNX models of each kind Quiver runs, with onnxruntime's outputs as the reference."""
    width = 8
    x = rng.normal(size=(2000, width)).astype(np.float32)
    logit = x[:, 0] * 1.5 - x[:, 1] + 0.5 * x[:, 2] * x[:, 3]
    y = (logit + rng.normal(scale=0.5, size=len(x)) > 0).astype(int)
    dense = rng.normal(size=(200, width)).astype(np.float32)
    missing = dense.copy()
    missing[rng.random(size=missing.shape) < 0.1] = np.nan  # trees route NaN by their rules
    opset = {"": 15, "ai.onnx.ml": 3}
    no_zipmap = lambda m: {id(m): {"zipmap": False}}
    models = {}
    lr = LogisticRegression().fit(x, y)
    models["onnx_logreg"] = (skl2onnx.to_onnx(lr, x[:1], options=no_zipmap(lr), target_opset=opset), dense)
    lin = LinearRegression().fit(x, logit)
    models["onnx_linreg"] = (skl2onnx.to_onnx(lin, x[:1], target_opset=opset), dense)
    mlp = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=500, random_state=7).fit(x, y)
    models["onnx_mlp"] = (skl2onnx.to_onnx(mlp, x[:1], options=no_zipmap(mlp), target_opset=opset), dense)
    gb = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=7).fit(x, y)
    models["onnx_skgb"] = (skl2onnx.to_onnx(gb, x[:1], options=no_zipmap(gb), target_opset=opset), missing)
    rf = RandomForestRegressor(n_estimators=10, max_depth=4, random_state=7).fit(x, logit)
    models["onnx_rf"] = (skl2onnx.to_onnx(rf, x[:1], target_opset=opset), missing)
    xm = x.copy()
    xm[rng.random(size=xm.shape) < 0.1] = np.nan
    lm = lgb.LGBMClassifier(n_estimators=20, num_leaves=15, random_state=7, verbose=-1).fit(xm, y)
    models["onnx_lgbm"] = (onnxmltools.convert_lightgbm(lm.booster_, initial_types=[("input", FloatTensorType([None, width]))],
                                                       zipmap=False, target_opset=15), missing)
    reference = {"versions": {"onnxruntime": ort.__version__, "skl2onnx": skl2onnx.__version__,
                              "onnxmltools": onnxmltools.__version__, "scikit-learn": sklearn.__version__}}
    for name, (model, rows) in models.items():
        path = os.path.join(OUT, name + ".onnx")
        save_onnx(model, path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        floats = [o for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)")]
        out = sess.run([floats[0].name], {sess.get_inputs()[0].name: rows})[0]
        out = np.asarray(out, dtype=np.float64).reshape(len(rows), -1)
        reference[name] = {"output": floats[0].name,
                           "inputs": [[None if np.isnan(v) else float(v) for v in row] for row in rows],
                           "outputs": out.tolist()}
    with open(os.path.join(OUT, "onnx_reference.json"), "w") as f:
        json.dump(reference, f)
    print("wrote", len(models), "ONNX models")


if __name__ == "__main__":
    main()
