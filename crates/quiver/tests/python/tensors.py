"""Helpers shared by the tritonclient scripts: the cases' rows and the 1e-5 comparison."""

import numpy as np

TOL = 1e-5


def rows(case):
    """A case's inputs as float64, null (a missing value) as NaN."""
    return np.array([[np.nan if x is None else x for x in r] for r in case["inputs"]], dtype=np.float64)


def close(got, want, what):
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err = np.max(np.abs(got - want)) if len(want) else 0.0
    assert err <= TOL, f"{what}: max |error| {err}"
