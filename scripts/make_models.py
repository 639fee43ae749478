#!/usr/bin/env python3
"""Trains the test models on synthetic data and writes them with reference predictions.

Outputs (small, committed, so tests need no Python):
  crates/model/tests/fixtures/xgb_binary.json      XGBoost JSON (binary:logistic)
  crates/model/tests/fixtures/lgbm_binary.txt      LightGBM text (binary)
  crates/model/tests/fixtures/reference.json       inputs (with NaNs) and each library's P(class 1)
  benchmarks/models/gbdt32/1/model.txt             the benchmark GBDT (100 trees, depth 6, 32 features)

Usage: pip install numpy scikit-learn xgboost lightgbm; python3 scripts/make_models.py
"""
import json
import os

import lightgbm as lgb
import numpy as np
import xgboost as xgb

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
    print("wrote", bench)


if __name__ == "__main__":
    main()
