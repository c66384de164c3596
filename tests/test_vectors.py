"""The level-1 BLAS of ``fusion/_vectors.py`` and the two-loop recursion over it, against
numpy in float64: sizes around the chunk and lane edges, views at an offset, nan, the fused
axpy, determinism and the host round trips counted."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netcl_optim._device import default_queue
from netcl_optim.fusion._vectors import Vectors, coef
from netcl_optim.optimizers._two_loop import two_loop

SIZES = [0, 1, 7, 8, 9, 4095, 4096, 4097, 70_001]
DTYPES = [np.float32, np.float64]


def _vectors(dtype, registers=8):
    return Vectors(default_queue(), dtype, registers)


def _device(x):
    return cla.to_device(default_queue(), x)


def _random(n, dtype, seed):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def _tolerance(dtype, n):
    """A float32 dot product rounds once from a double sum: within 1 ulp of the result
    plus the terms' rounding; float64 sums of n terms within ~n eps relative to sum |a b|."""
    return 2e-7 if dtype == np.float32 else 1e-15 * max(n, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_reductions_match_numpy(dtype, n):
    a, b = _random(n, dtype, 1), _random(n, dtype, 2)
    v = _vectors(dtype)
    v.dot(_device(a), _device(b), 0)
    v.asum(_device(a), 1)
    v.amax(_device(a), 2)
    got = v.read()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = max(np.abs(a64 * b64).sum(), 1e-300)
    assert abs(got[0] - a64 @ b64) <= _tolerance(dtype, n) * scale
    assert abs(got[1] - np.abs(a64).sum()) <= _tolerance(dtype, n) * max(np.abs(a64).sum(), 1)
    assert got[2] == (np.abs(a).max() if n else 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_times_a_register_or_a_host_number_rounds_like_the_dtype(dtype):
    a, b = _random(1000, dtype, 3), _random(1000, dtype, 4)
    v = _vectors(dtype)
    v.set(5, 0.3)
    v.dot(_device(a), _device(b), 0)
    v.dot(_device(a), _device(b), 1, times=coef(plus=5))
    v.dot(_device(a), _device(b), 2, times=coef(0.3))
    v.dot(_device(a), _device(b), 3, times=coef(plus=5, minus=5))
    got = v.read()
    assert got[1] == got[2] == dtype(got[0]) * dtype(0.3)
    assert got[3] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 9, 4097, 70_001])
def test_fused_axpy_writes_then_dots(dtype, n):
    y, x, w = (_random(n, dtype, s) for s in (5, 6, 7))
    v = _vectors(dtype)
    v.set(2, 0.75)
    dy = _device(y)
    v.dot(dy, _device(w), 0, axpy=(_device(x), coef(minus=2)))
    expected = y + dtype(-0.75) * x
    assert np.array_equal(dy.get(), expected)
    scale = np.abs(expected.astype(np.float64) * w).sum()
    assert abs(v.read()[0] - expected.astype(np.float64) @ w) <= _tolerance(dtype, n) * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_element_wise_launches(dtype):
    a, b = _random(9000, dtype, 8), _random(9000, dtype, 9)
    v = _vectors(dtype)
    v.set(0, 2.5)
    v.set(1, 0.5)
    out = _device(np.zeros_like(a))
    v.lincomb(out, _device(a), coef(plus=0), _device(b), coef(plus=0, minus=1))
    assert np.array_equal(out.get(), dtype(2.5) * a + dtype(2.0) * b)
    v.scale(out, _device(a), coef(-3.0))
    assert np.array_equal(out.get(), dtype(-3.0) * a)
    v.sub(out, _device(a), _device(b))
    assert np.array_equal(out.get(), a - b)
    da = _device(a)
    v.axpy(da, _device(b), coef(minus=1))
    assert np.array_equal(da.get(), a + dtype(-0.5) * b)
    v.copy(out, _device(b))
    assert np.array_equal(out.get(), b)


def test_views_at_an_offset():
    base = _random(20_000, np.float32, 10)
    whole = _device(base)
    a, b = whole[1000:9000], whole[11_000:19_000]
    v = _vectors(np.float32)
    v.dot(a, b, 0)
    v.axpy(a, b, coef(2.0))
    assert np.isclose(v.read()[0], base[1000:9000].astype(np.float64) @ base[11_000:19_000])
    expected = base.copy()
    expected[1000:9000] += np.float32(2.0) * base[11_000:19_000]
    assert np.array_equal(whole.get(), expected)


@pytest.mark.parametrize("where", [0, 4095, 4096, 69_999])
def test_amax_of_a_nan_is_nan_and_of_an_inf_is_inf(where):
    x = _random(70_000, np.float32, 11)
    v = _vectors(np.float32)
    x[where] = np.nan
    v.amax(_device(x), 0)
    x[where] = -np.inf
    v.amax(_device(x), 1)
    got = v.read()
    assert np.isnan(got[0]) and got[1] == np.inf


def test_deterministic_and_one_read_per_read():
    a, b = _random(123_457, np.float32, 12), _random(123_457, np.float32, 13)
    v = _vectors(np.float32)
    results = []
    before = Vectors.reads
    for _ in range(3):
        v.dot(_device(a), _device(b), 0)
        results.append(v.read()[0])
    assert Vectors.reads - before == 3
    assert results[0] == results[1] == results[2]


def test_refuses_other_dtypes_and_shapes():
    with pytest.raises(TypeError, match="float32 or float64"):
        _vectors(np.float16)
    v = _vectors(np.float32)
    with pytest.raises(ValueError, match="1-D, contiguous"):
        v.dot(_device(np.zeros(4, np.float32)), _device(np.zeros(5, np.float32)), 0)
    with pytest.raises(ValueError, match="1-D, contiguous"):
        v.dot(_device(np.zeros(4, np.float64)), _device(np.zeros(4, np.float64)), 0)


def _two_loop_reference(g, pairs, rho, gamma):
    v = g.astype(np.float64)
    alphas = [0.0] * len(pairs)
    for i in range(len(pairs) - 1, -1, -1):
        alphas[i] = rho[i] * (pairs[i][0] @ v)
        v = v - alphas[i] * pairs[i][1]
    v = gamma * v
    for i, (s, y) in enumerate(pairs):
        v = v + (alphas[i] - rho[i] * (y @ v)) * s
    return v, alphas


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 9000),
    k=st.integers(0, 6),
    gamma=st.floats(0.1, 10),
    seed=st.integers(0, 2**31),
)
def test_two_loop_matches_the_recursion(n, k, gamma, seed):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(k):
        s = rng.standard_normal(n)
        pairs.append((s, s * rng.uniform(0.5, 2.0, n)))  # y . s > 0, as L-BFGS keeps
    rho = [1.0 / (y @ s) for s, y in pairs]
    g = rng.standard_normal(n)
    expected, alphas = _two_loop_reference(g, pairs, rho, gamma)
    v = _vectors(np.float64, 2 * k + 2)
    dv = _device(g)
    device_pairs = [(_device(s), _device(y)) for s, y in pairs]
    two_loop(v, dv, device_pairs, [coef(r) for r in rho], coef(gamma), 0, k)
    scale = np.abs(expected).max() + np.abs(g).max()
    assert np.abs(dv.get() - expected).max() <= 1e-9 * scale
    assert np.allclose(v.read()[:k], alphas, rtol=1e-9, atol=1e-12)
