"""Comparing floats in tests: with a tolerance, or bit for bit only where both sides ran the same calls.

numpy's OpenBLAS picks its matmul kernel at run time, by CPU, and two kernels may round the same
product differently in the last bit. The model computes x @ w as (w.T @ x.T).T; written by hand as
x @ w it agrees to about 1e-8, not bit for bit, on Haswell's kernel (OPENBLAS_CORETYPE=Haswell, Zen
and SkylakeX make one machine run another CPU's kernel). So:

    assert_close(got, want, "what")     anything computed two ways: prints the largest difference
    assert_same(got, want, "why")       the very same calls in the same order on the same shapes
                                        (a stage is a slice of the model; the cluster is one process;
                                        a copy or a round trip through bytes): bit for bit

    assert_close(np.float32([0.11067387]), np.float32([0.11067386]), "k")     # passes: 7e-9 <= 1e-5
"""
from __future__ import annotations

import numpy as np


def max_diff(got, want) -> float:
    """The largest absolute difference, in float64; inf if the shapes differ."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max()) if got.size else 0.0


def assert_close(got, want, what: str, tol: float = 1e-5):
    """got and want agree to within tol (absolute), or fail saying by how much."""
    assert np.shape(got) == np.shape(want), f"{what}: shape {np.shape(got)} != {np.shape(want)}"
    diff = max_diff(got, want)
    assert diff <= tol, f"{what}: largest difference {diff:.2e} > {tol:.0e}"


def assert_same(got, want, why: str):
    """Bit-for-bit equality, for values both sides computed with the very same calls in the same
    order (say which, in `why`): anything else compares with assert_close."""
    assert np.shape(got) == np.shape(want), f"{why}: shape {np.shape(got)} != {np.shape(want)}"
    assert np.array_equal(got, want), (f"{why}: expected bit-for-bit equality (the same calls in the same "
                                       f"order), largest difference {max_diff(got, want):.2e}")
