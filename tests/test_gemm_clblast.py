"""The optional CLBlast path of our GEMM (``fusion/_gemm.py``): ``tile="clblast"`` runs
pyclblast's GEMM (any device; the tuner times it only on GPUs). Skipped without pyclblast.

Tolerance: CLBlast's kernels sum in their own order (and may fuse multiply-adds), so its
results are not our kernel's bits; the bound of ``test_gemm.py`` (``(K + 3) eps (|alpha| |A|
|B| + |beta| |C|)``) holds for any summation order, so it is checked here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyopencl.array as cla
import pytest

from netcl_optim.fusion import _gemm
from netcl_optim.fusion._gemm import CLBLAST, TILES, gemm

pytest.importorskip("pyclblast")

RNG = np.random.default_rng(4321)


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NETCL_OPTIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_loaded_dirs", set())


def _op(x, trans):
    return np.swapaxes(x, -1, -2) if trans else x


def _check(got, a, b, trans_a, trans_b, alpha=1.0, beta=0.0, c=None):
    a64, b64 = _op(a, trans_a).astype(np.float64), _op(b, trans_b).astype(np.float64)
    exact = alpha * (a64 @ b64)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if beta != 0:
        exact = exact + beta * c
        scale = scale + abs(beta) * np.abs(c)
    bound = (a64.shape[-1] + 3) * np.finfo(np.float32).eps * scale + np.finfo(np.float32).tiny
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), f"max err {err.max()}, bound ratio {(err / bound).max()}"


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_clblast_views_at_offsets_batched_with_alpha_beta(cl_queue, trans_a, trans_b):
    m, n, k = 13, 18, 7
    a = RNG.standard_normal((2, *((k, m) if trans_a else (m, k)))).astype(np.float32)
    b = RNG.standard_normal((2, *((n, k) if trans_b else (k, n)))).astype(np.float32)
    c = RNG.standard_normal((2, m, n)).astype(np.float32)
    big = cla.to_device(
        cl_queue, np.full(3 + a.size + 5 + b.size + 1 + 2 * c.size, 7.5, np.float32)
    )
    starts = [3, 3 + a.size + 5, 3 + a.size + 5 + b.size + 1]
    views = []
    for start, host in zip(starts, (a, b, c), strict=True):
        views.append(big[start : start + host.size].reshape(host.shape))
        views[-1].set(host)
    out = big[starts[2] + c.size :].reshape(c.shape)
    gemm(cl_queue, views[0], views[1], out, trans_a=trans_a, trans_b=trans_b, alpha=0.5,
         beta=-2.0, c=views[2], tile=CLBLAST)  # fmt: skip
    host = big.get()
    _check(host[starts[2] + c.size :].reshape(c.shape), a, b, trans_a, trans_b, 0.5, -2.0, c)
    np.testing.assert_array_equal(host[starts[2] : starts[2] + c.size], c.ravel())  # c kept
    assert np.all(host[:3] == 7.5)


def test_clblast_in_place_aliasing_and_beta_zero(cl_queue):
    x = RNG.standard_normal((21, 21)).astype(np.float32)
    c = RNG.standard_normal((21, 21)).astype(np.float32)
    dx = cla.to_device(cl_queue, x)
    gemm(
        cl_queue,
        dx,
        dx,
        dx,
        trans_b=True,
        alpha=1.5,
        beta=0.5,
        c=cla.to_device(cl_queue, c),
        tile=CLBLAST,
    )  # fmt: skip  (out aliases both operands)
    _check(dx.get(), x, x, False, True, 1.5, 0.5, c)
    out = cla.to_device(cl_queue, np.full((21, 21), np.nan, np.float32))
    gemm(cl_queue, cla.to_device(cl_queue, x), cla.to_device(cl_queue, c), out, tile=CLBLAST)
    _check(out.get(), x, c, False, False)


def test_the_tuner_times_clblast_only_on_gpus_and_caches_the_choice(cl_queue, monkeypatch):
    a = cla.to_device(cl_queue, RNG.standard_normal((24, 20)).astype(np.float32))
    b = cla.to_device(cl_queue, RNG.standard_normal((20, 30)).astype(np.float32))
    seen = []

    def pick_clblast(run, candidates):
        seen.append(tuple(candidates))
        return CLBLAST if CLBLAST in candidates else candidates[0]

    monkeypatch.setattr(_gemm, "_time_best", pick_clblast)
    gemm(cl_queue, a, b, tune=True)
    gpu = bool(cl_queue.device.type & 4)  # CL_DEVICE_TYPE_GPU
    assert (CLBLAST in seen[0]) == gpu
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_clblast_for", lambda device: True)  # as a GPU would
    got = gemm(cl_queue, a, b, tune=True).get()
    _check(got, a.get(), b.get(), False, False)
    cache = Path(_gemm.cache_dir()) / _gemm.CACHE_FILE
    assert list(json.loads(cache.read_text())["tiles"].values()) == [CLBLAST]
    # a new process reads the choice back and runs CLBlast without timing
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_loaded_dirs", set())
    calls = []
    real = _gemm._clblast_gemm
    monkeypatch.setattr(_gemm, "_clblast_gemm", lambda *args: calls.append(1) or real(*args))
    np.testing.assert_array_equal(gemm(cl_queue, a, b).get(), got)
    assert calls == [1]
    assert (
        _gemm.tile_for(cl_queue, np.float32, False, (), 24, 30, 20, kind="gram")
        in TILES[np.dtype(np.float32)]
    )  # gram never uses CLBlast
