"""Our GEMM (``fusion/_gemm.py``) against numpy in float64 at every tile edge.

Tolerance: each output is a sequential sum of ``K`` products, then ``alpha * acc + beta * c``,
so ``|C - C_exact| <= (K + 3) u (|alpha| |A| |B| + |beta| |C|)`` elementwise (``u`` the unit
roundoff, the classic bound of a dot product plus three roundings in the epilogue). We check it
with ``eps = 2u``: float32 at its ``eps`` (1.2e-7), float64 at its own (2.2e-16) -- tight,
since the float64 reference has the same bound at ``u``.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

from netcl_optim._device import has_fp64
from netcl_optim.fusion import _gemm
from netcl_optim.fusion._gemm import TILES, gemm

RNG = np.random.default_rng(1234)


def _dtypes(queue):
    return [np.float32, np.float64] if has_fp64(queue.device) else [np.float32]


def _op(x, trans):
    return np.swapaxes(x, -1, -2) if trans else x


def _reference(a, b, trans_a, trans_b, alpha=1.0, beta=0.0, c=None):
    """``(exact product in float64, its elementwise error bound)``."""
    a64, b64 = _op(a, trans_a).astype(np.float64), _op(b, trans_b).astype(np.float64)
    k = a64.shape[-1]
    exact = alpha * (a64 @ b64)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    if beta != 0:
        exact = exact + beta * c.astype(np.float64)
        scale = scale + abs(beta) * np.abs(c.astype(np.float64))
    eps = np.finfo(a.dtype).eps
    return exact, (k + 3) * eps * scale + np.finfo(a.dtype).tiny


def _operands(batch, m, n, k, trans_a, trans_b, dtype):
    a = RNG.standard_normal((*batch, *((k, m) if trans_a else (m, k)))).astype(dtype)
    b = RNG.standard_normal((*batch, *((n, k) if trans_b else (k, n)))).astype(dtype)
    return a, b


def _check_close(got, exact, bound):
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), f"max err {err.max()}, at bound ratio {(err / bound).max()}"


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_sizes_around_tile_edges(cl_queue, trans_a, trans_b):
    # rows/cols at 1, around the 4/6/8/12 row tiles and 4/8/16 column tiles, and beyond
    for dtype in _dtypes(cl_queue):
        for m, n, k in [
            (1, 1, 1), (1, 37, 5), (37, 1, 5), (1, 16, 1), (8, 16, 3), (7, 15, 16),
            (9, 17, 17), (16, 33, 1), (24, 48, 70), (70, 65, 9), (13, 70, 33), (65, 8, 64),
            (150, 40, 3),  # more row blocks than a work-group: groups padded in both dims
        ]:  # fmt: skip
            a, b = _operands((), m, n, k, trans_a, trans_b, dtype)
            got = gemm(
                cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, b),
                trans_a=trans_a, trans_b=trans_b,
            ).get()  # fmt: skip
            assert got.shape == (m, n) and got.dtype == dtype
            _check_close(got, *_reference(a, b, trans_a, trans_b))


def test_every_tile_gives_the_same_bits(cl_queue):
    for dtype in _dtypes(cl_queue):
        a, b = _operands((), 29, 41, 23, False, False, dtype)
        da, db = cla.to_device(cl_queue, a), cla.to_device(cl_queue, b)
        results = [gemm(cl_queue, da, db, tile=t).get() for t in TILES[np.dtype(dtype)]]
        _check_close(results[0], *_reference(a, b, False, False))
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True)])
def test_batch_in_one_launch_matches_each_matrix(cl_queue, trans_a, trans_b):
    for dtype in _dtypes(cl_queue):
        a, b = _operands((2, 3), 19, 21, 11, trans_a, trans_b, dtype)
        got = gemm(
            cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, b),
            trans_a=trans_a, trans_b=trans_b,
        ).get()  # fmt: skip
        assert got.shape == (2, 3, 19, 21)
        _check_close(got, *_reference(a, b, trans_a, trans_b))
        for i in range(2):
            for j in range(3):
                one = gemm(
                    cl_queue, cla.to_device(cl_queue, a[i, j]), cla.to_device(cl_queue, b[i, j]),
                    trans_a=trans_a, trans_b=trans_b,
                ).get()  # fmt: skip
                np.testing.assert_array_equal(got[i, j], one)


def _view(queue, big, start, host):
    """``host`` written into the device buffer ``big`` at element ``start``; the view."""
    view = big[start : start + host.size].reshape(host.shape)
    view.set(np.ascontiguousarray(host))
    return view


def test_views_at_offsets_in_a_packed_buffer(cl_queue):
    for dtype in _dtypes(cl_queue):
        m, n, k = 13, 18, 7
        a, b = _operands((2,), m, n, k, True, False, dtype)
        c = RNG.standard_normal((2, m, n)).astype(dtype)
        sentinel = np.full(3 + a.size + 5 + b.size + 1 + 2 * c.size + 4, 7.5, dtype)
        big = cla.to_device(cl_queue, sentinel)
        da = _view(cl_queue, big, 3, a)
        db = _view(cl_queue, big, 3 + a.size + 5, b)
        c_at = 3 + a.size + 5 + b.size + 1
        dc = _view(cl_queue, big, c_at, c)
        out = big[c_at + c.size : c_at + 2 * c.size].reshape(c.shape)
        gemm(cl_queue, da, db, out, trans_a=True, alpha=0.5, beta=-2.0, c=dc)
        host = big.get()
        got = host[c_at + c.size : c_at + 2 * c.size].reshape(c.shape)
        _check_close(got, *_reference(a, b, True, False, 0.5, -2.0, c))
        assert np.all(host[:3] == 7.5) and np.all(host[3 + a.size : 3 + a.size + 5] == 7.5)
        np.testing.assert_array_equal(host[3 : 3 + a.size], a.ravel())  # inputs untouched
        np.testing.assert_array_equal(host[c_at : c_at + c.size], c.ravel())
        assert np.all(host[c_at + 2 * c.size :] == 7.5)  # nothing written past the output


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (-0.75, 2.5), (3.0, -1.0)])
def test_alpha_beta_in_place(cl_queue, alpha, beta):
    for dtype in _dtypes(cl_queue):
        a, b = _operands((), 33, 35, 17, False, True, dtype)
        c = RNG.standard_normal((33, 35)).astype(dtype)
        out = cla.to_device(cl_queue, c)
        gemm(cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, b), out,
             trans_b=True, alpha=alpha, beta=beta)  # fmt: skip
        _check_close(out.get(), *_reference(a, b, False, True, alpha, beta, c))


def test_out_may_alias_an_operand(cl_queue):
    x = RNG.standard_normal((2, 21, 21)).astype(np.float32)
    c = RNG.standard_normal((2, 21, 21)).astype(np.float32)
    dx = cla.to_device(cl_queue, x)
    gemm(cl_queue, dx, dx, dx, trans_b=True, alpha=1.5, beta=0.5, c=cla.to_device(cl_queue, c))
    _check_close(dx.get(), *_reference(x, x, False, True, 1.5, 0.5, c))


def test_beta_zero_does_not_read_the_output(cl_queue):
    a, b = _operands((), 20, 17, 5, False, False, np.float32)
    out = cla.to_device(cl_queue, np.full((20, 17), np.nan, np.float32))
    gemm(cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, b), out, alpha=2.0)
    _check_close(out.get(), *_reference(a, b, False, False, 2.0))


def test_float64_is_tight(cl_queue):
    if not has_fp64(cl_queue.device):
        pytest.skip("no fp64 on this device")
    a, b = _operands((), 50, 60, 300, False, False, np.float64)
    got = gemm(cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, b)).get()
    exact = a @ b
    assert np.abs(got - exact).max() <= 300 * np.finfo(np.float64).eps * np.abs(exact).max()


def test_tuner_picks_a_candidate_once(cl_queue, monkeypatch):
    monkeypatch.setattr(_gemm, "tuned", {})
    a, b = _operands((), 40, 48, 24, False, False, np.float32)
    da, db = cla.to_device(cl_queue, a), cla.to_device(cl_queue, b)
    got = gemm(cl_queue, da, db, tune=True).get()
    assert len(_gemm.tuned) == 1 and next(iter(_gemm.tuned.values())) in TILES[np.dtype("f4")]
    np.testing.assert_array_equal(got, gemm(cl_queue, da, db).get())
    assert len(_gemm.tuned) == 1


def test_bad_input_raises_and_writes_nothing(cl_queue):
    a = cla.to_device(cl_queue, np.ones((4, 5), np.float32))
    b = cla.to_device(cl_queue, np.ones((5, 6), np.float32))
    out = cla.to_device(cl_queue, np.full((4, 6), 3.0, np.float32))
    bad = [
        (dict(b=cla.to_device(cl_queue, np.ones((4, 6), np.float32))), "inner dims"),
        (dict(b=cla.to_device(cl_queue, np.ones((5, 6), np.float64))), "dtype"),
        (dict(a=cla.to_device(cl_queue, np.ones((2, 4, 5), np.float32))), "at least 2|batch"),
        (dict(a=cla.to_device(cl_queue, np.ones(5, np.float32))), "at least 2 dims"),
        (dict(out=cla.to_device(cl_queue, np.ones((4, 7), np.float32))), "out has shape"),
        (dict(c=cla.to_device(cl_queue, np.ones((6, 4), np.float32)), beta=1.0), "c has shape"),
        (dict(tile=(5, 16)), "tile"),
        (dict(a=cla.to_device(cl_queue, np.ones((4, 5), np.int32))), "dtype"),
        (dict(a=a.transpose()), "C-contiguous|inner dims"),
    ]
    for change, message in bad:
        args = dict(a=a, b=b, out=out) | change
        with pytest.raises((ValueError, TypeError), match=message):
            gemm(cl_queue, args.pop("a"), args.pop("b"), args.pop("out"), **args)
        np.testing.assert_array_equal(out.get(), 3.0)
    empty = cla.to_device(cl_queue, np.ones((4, 0), np.float32))
    with pytest.raises(ValueError, match="K is 0"):
        gemm(cl_queue, empty, cla.to_device(cl_queue, np.ones((0, 6), np.float32)), out)
    np.testing.assert_array_equal(out.get(), 3.0)
