"""Our GEMM (``fusion/_gemm.py``) against numpy in float64 at every tile edge.

Tolerance: each output is a sequential sum of ``K`` products, then ``alpha * acc + beta * c``,
so ``|C - C_exact| <= (K + 3) u (|alpha| |A| |B| + |beta| |C|)`` elementwise (``u`` the unit
roundoff, the classic bound of a dot product plus three roundings in the epilogue). We check it
with ``eps = 2u``: float32 at its ``eps`` (1.2e-7), float64 at its own (2.2e-16) -- tight,
since the float64 reference has the same bound at ``u``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyopencl.array as cla
import pytest

from netcl_optim._device import has_fp64
from netcl_optim.fusion import _gemm
from netcl_optim.fusion._gemm import TILES, gemm, gram

RNG = np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    """Each test with its own disk cache directory and an empty in-memory one: nothing read
    from or written to the user's ``~/.cache``."""
    monkeypatch.setenv("NETCL_OPTIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_loaded_dirs", set())


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


def test_tuner_picks_a_candidate_once(cl_queue):
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


# -- gram: alpha X X^T + beta c, the upper triangle computed and mirrored ----------------------


def _gram_reference(x, trans, alpha=1.0, beta=0.0, c=None):
    """``(exact, bound)`` of :func:`_reference` for ``op(x) op(x)^T``, with ``c``'s upper
    triangle mirrored (``gram`` reads no more of it)."""
    if c is not None:
        upper = np.triu(c)
        c = upper + np.swapaxes(np.triu(c, 1), -1, -2)
    return _reference(x, x, trans, not trans, alpha, beta, c)


def _assert_gram_is_gemms_upper_mirrored(got, gemm_result):
    m = got.shape[-1]
    rows, cols = np.triu_indices(m)
    np.testing.assert_array_equal(got[..., rows, cols], gemm_result[..., rows, cols])
    np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))  # exactly symmetric


@pytest.mark.parametrize("trans", [False, True])
def test_gram_sizes_around_tile_edges(cl_queue, trans):
    # M around the row tiles (4, 6, 8, 12) and the column tiles (8, 16), K from 1 to 70
    for dtype in _dtypes(cl_queue):
        for m, k in [(1, 1), (1, 9), (2, 1), (5, 3), (7, 70), (8, 8), (13, 17), (16, 5),
                     (17, 33), (31, 2), (33, 64), (48, 11), (65, 40), (70, 69)]:  # fmt: skip
            x = RNG.standard_normal((k, m) if trans else (m, k)).astype(dtype)
            dx = cla.to_device(cl_queue, x)
            got = gram(cl_queue, dx, trans=trans).get()
            assert got.shape == (m, m) and got.dtype == dtype
            _check_close(got, *_gram_reference(x, trans))
            like = gemm(cl_queue, dx, dx, trans_a=trans, trans_b=not trans).get()
            _assert_gram_is_gemms_upper_mirrored(got, like)


@pytest.mark.parametrize("trans", [False, True])
def test_gram_every_tile_matches_gemm_with_alpha_beta(cl_queue, trans):
    for dtype in _dtypes(cl_queue):
        x = RNG.standard_normal((2, 3, 23, 37) if trans else (2, 3, 37, 23)).astype(dtype)
        c = RNG.standard_normal((2, 3, 37, 37)).astype(dtype)  # not symmetric: upper read
        dx, dc = cla.to_device(cl_queue, x), cla.to_device(cl_queue, c)
        like = gemm(cl_queue, dx, dx, trans_a=trans, trans_b=not trans, alpha=-0.5, beta=1.5, c=dc)
        # every tile once (float32, X X^T); else the default (each kernel builds in ~3 s on
        # PoCL with a cold cache, as on CI; the tiles share all code but the sizes)
        every = dtype == np.float32 and not trans
        for tile in TILES[np.dtype(dtype)] if every else TILES[np.dtype(dtype)][:1]:
            got = gram(cl_queue, dx, alpha=-0.5, beta=1.5, c=dc, trans=trans, tile=tile).get()
            _check_close(got, *_gram_reference(x, trans, -0.5, 1.5, c))
            _assert_gram_is_gemms_upper_mirrored(got, like.get())
        for i in range(2):  # a batch position alone gives the same bits
            one = gram(cl_queue, cla.to_device(cl_queue, x[i, 1]), alpha=-0.5, beta=1.5,
                       c=cla.to_device(cl_queue, c[i, 1]), trans=trans).get()  # fmt: skip
            np.testing.assert_array_equal(one, got[i, 1])


@pytest.mark.parametrize("m", [1, 7, 40, 70])
def test_a_symmetric_product_is_the_full_ones_upper_triangle_mirrored(cl_queue, m):
    """``symmetric=True`` for two polynomials of one symmetric matrix (they commute): every
    tile, the product's upper triangle bit for bit, mirrored; with ``beta * c`` in place."""
    for dtype in _dtypes(cl_queue):
        x = RNG.standard_normal((2, m, m + 3)).astype(dtype)
        r = x @ np.swapaxes(x, -1, -2) / m
        p = 0.5 * r + r @ r  # symmetric up to rounding: make it exactly so
        p = np.triu(p) + np.swapaxes(np.triu(p, 1), -1, -2)
        dr, dp = cla.to_device(cl_queue, r.astype(dtype)), cla.to_device(cl_queue, p)
        full = gemm(cl_queue, dp, dr, alpha=2.0, beta=-1.0, c=dr).get()
        for tile in TILES[np.dtype(dtype)]:
            got = gemm(cl_queue, dp, dr, alpha=2.0, beta=-1.0, c=dr, tile=tile, symmetric=True)
            _assert_gram_is_gemms_upper_mirrored(got.get(), full)
        inplace = cla.to_device(cl_queue, r.astype(dtype))  # Q <- P Q + a Q, out = b = c
        gemm(cl_queue, dp, inplace, inplace, beta=3.0, c=inplace, symmetric=True)
        like = gemm(cl_queue, dp, dr, beta=3.0, c=dr).get()
        _assert_gram_is_gemms_upper_mirrored(inplace.get(), like)
    with pytest.raises(ValueError, match="symmetric=True needs a square product"):
        gemm(cl_queue, cla.zeros(cl_queue, (3, 4), np.float32),
             cla.zeros(cl_queue, (4, 5), np.float32), symmetric=True)  # fmt: skip


class _Device:
    def __init__(self, floats: int, doubles: int) -> None:
        self.native_vector_width_float = floats
        self.native_vector_width_double = doubles


def test_tiles_use_512_bit_vectors_where_the_device_has_them():
    f4, f8 = np.dtype(np.float32), np.dtype(np.float64)
    avx512, avx2, gpu = _Device(16, 8), _Device(8, 4), _Device(1, 1)
    assert _gemm.default_tile(avx512, f4) == (6, 64) and _gemm.default_tile(avx512, f8) == (6, 32)
    assert _gemm.default_tile(avx2, f4) == (6, 16) and _gemm.default_tile(gpu, f8) == (4, 8)
    assert [_gemm.vector_width(avx512, f4, tn) for tn in (8, 16, 32, 64)] == [8, 16, 16, 16]
    assert [_gemm.vector_width(d, f4, 64) for d in (avx2, gpu)] == [8, 8]
    assert [_gemm.vector_width(avx512, f8, tn) for tn in (4, 8, 16)] == [4, 8, 8]
    for dtype, tn, w in ((f4, 64, 16), (f4, 64, 8), (f8, 32, 8), (f8, 32, 4)):
        src, name = _gemm.gemm_source(dtype, 6, tn, width=w)
        real = "double" if dtype == f8 else "float"
        assert f"typedef {real}{w} realw;" in src and name.endswith(f"w{w}")


def test_gram_views_at_offsets_and_in_place(cl_queue):
    """Newton-Schulz's ``B = c A A + b A`` with ``A`` symmetric: ``out`` and ``c`` the same
    view at an offset, ``x`` another view of the same buffer."""
    for dtype in _dtypes(cl_queue):
        m, k = 21, 21
        x = RNG.standard_normal((2, m, k)).astype(dtype)
        sym = x @ np.swapaxes(x, -1, -2) / k
        big = cla.to_device(cl_queue, np.full(5 + x.size + 3 + sym.size + 2, 7.5, dtype))
        dx = _view(cl_queue, big, 5, x)
        ds = _view(cl_queue, big, 5 + x.size + 3, sym)
        gram(cl_queue, dx, ds, alpha=2.0315, beta=-4.775, c=ds)
        host = big.get()
        got = host[5 + x.size + 3 : 5 + x.size + 3 + sym.size].reshape(sym.shape)
        _check_close(got, *_gram_reference(x, False, 2.0315, -4.775, sym))
        np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))
        np.testing.assert_array_equal(host[5 : 5 + x.size], x.ravel())  # input untouched
        assert np.all(host[:5] == 7.5) and np.all(host[5 + x.size : 5 + x.size + 3] == 7.5)
        assert np.all(host[-2:] == 7.5)
        gram(cl_queue, dx, dx, alpha=0.5)  # out aliasing x (square): reads its packed copy
        _check_close(dx.get(), *_gram_reference(x, False, 0.5))


def test_gram_beta_zero_does_not_read_the_output(cl_queue):
    x = RNG.standard_normal((19, 6)).astype(np.float32)
    out = cla.to_device(cl_queue, np.full((19, 19), np.nan, np.float32))
    gram(cl_queue, cla.to_device(cl_queue, x), out, alpha=3.0)
    _check_close(out.get(), *_gram_reference(x, False, 3.0))


def test_gram_bad_input_raises_and_writes_nothing(cl_queue):
    x = cla.to_device(cl_queue, np.ones((4, 5), np.float32))
    out = cla.to_device(cl_queue, np.full((4, 4), 3.0, np.float32))
    bad = [
        (dict(out=cla.to_device(cl_queue, np.ones((5, 5), np.float32))), "out has shape"),
        (dict(trans=True), "out has shape"),
        (dict(c=cla.to_device(cl_queue, np.ones((4, 5), np.float32)), beta=1.0), "c has shape"),
        (dict(c=cla.to_device(cl_queue, np.ones((4, 4), np.float64)), beta=1.0), "dtype"),
        (dict(x=cla.to_device(cl_queue, np.ones(4, np.float32))), "at least 2 dims"),
        (dict(x=cla.to_device(cl_queue, np.ones((4, 5), np.int32))), "dtype"),
        (dict(x=x.transpose()), "C-contiguous|out has shape"),
        (dict(tile=(3, 16)), "tile"),
    ]
    for change, message in bad:
        args = dict(x=x, out=out) | change
        with pytest.raises((ValueError, TypeError), match=message):
            gram(cl_queue, args.pop("x"), args.pop("out"), **args)
        np.testing.assert_array_equal(out.get(), 3.0)
    with pytest.raises(ValueError, match="K is 0"):
        gram(cl_queue, cla.to_device(cl_queue, np.ones((4, 0), np.float32)), out)
    with pytest.raises(ValueError, match="needs c"):
        gram(cl_queue, x, beta=1.0)
    np.testing.assert_array_equal(out.get(), 3.0)


# -- the tuner's disk cache --------------------------------------------------------------------


def _forget_in_memory(monkeypatch):
    """A new process, as far as the tuner knows: nothing tuned or loaded yet."""
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_loaded_dirs", set())


def test_tuned_tiles_round_trip_through_the_disk_cache(cl_queue, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    x = cla.to_device(cl_queue, RNG.standard_normal((24, 20)).astype(np.float32))
    first = gram(cl_queue, x, tune=True).get()
    gemm(cl_queue, x, x, trans_b=True, tune=True)
    data = json.loads((cache / _gemm.CACHE_FILE).read_text())
    assert data["format"] == 1 and len(data["tiles"]) == 2
    keys = sorted(data["tiles"])
    assert keys[0].endswith("|float32|gemm|NT|4,4,4") and keys[1].endswith("|float32|gram|NT|4,4,4")
    assert cl_queue.device.name in keys[0]
    # a new process: the tile comes from disk, no timing, the same bits
    _forget_in_memory(monkeypatch)
    forced = {key: (12, 8) if tuple(t) != (12, 8) else (8, 16) for key, t in data["tiles"].items()}
    (cache / _gemm.CACHE_FILE).write_text(json.dumps({"format": 1, "tiles": forced}))
    monkeypatch.setattr(_gemm, "_time_best", lambda *_: pytest.fail("timed again"))
    np.testing.assert_array_equal(gram(cl_queue, x, tune=True).get(), first)
    assert set(_gemm.tuned.items()) == set(forced.items())
    # loaded once per process: a later change on disk is not seen
    (cache / _gemm.CACHE_FILE).write_text("{}")
    gram(cl_queue, x, tune=True)
    assert set(_gemm.tuned.items()) == set(forced.items())


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b'{"format": 99, "tiles": {}}', b"[1, 2]",
     b'{"format": 1, "tiles": {"a|b|c|float32|gemm|NN|1,1,1": [5, 5], "x": "y"}}'],
)  # fmt: skip
def test_a_corrupt_cache_file_is_ignored_with_a_warning(cl_queue, tmp_path, content):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / _gemm.CACHE_FILE).write_bytes(content)
    x = cla.to_device(cl_queue, RNG.standard_normal((9, 7)).astype(np.float32))
    with pytest.warns(UserWarning, match="tile cache"):
        got = gram(cl_queue, x).get()  # the default tile
    _check_close(got, *_gram_reference(x.get(), False))
    assert _gemm.tuned == {}
    gram(cl_queue, x, tune=True)  # tuning rewrites the file, now valid
    data = json.loads((cache / _gemm.CACHE_FILE).read_text())
    assert data["format"] == 1 and list(data["tiles"].values()) == [list(_gemm.tuned.popitem()[1])]


def test_an_unwritable_cache_directory_only_warns(cl_queue, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("NETCL_OPTIM_CACHE_DIR", str(blocker / "cache"))  # under a file
    x = cla.to_device(cl_queue, RNG.standard_normal((9, 7)).astype(np.float32))
    with pytest.warns(UserWarning, match="tile cache"):  # (unreadable, then unwritable)
        gram(cl_queue, x, tune=True)
    assert len(_gemm.tuned) == 1  # kept in memory


def test_cache_dir_defaults_to_the_user_cache(monkeypatch):
    monkeypatch.delenv("NETCL_OPTIM_CACHE_DIR")
    monkeypatch.setenv("HOME", "/somewhere")
    assert _gemm.cache_dir() == os.path.join("/somewhere", ".cache", "netcl_optim")


# -- op(a) read in place (no pack launch) against the packed path -----------------------------


@pytest.mark.parametrize("tile", [(4, 16), (6, 16)])
def test_reading_a_in_place_gives_the_packed_paths_bits(cl_queue, monkeypatch, tile):
    """Row-major ``a`` (at an offset, batched, ``M`` not a multiple of ``TM``: the last rows
    re-read) is read in place unless ``out`` overlaps it; the bits are the packed path's."""
    calls = []
    real_pack = _gemm.pack_operand
    monkeypatch.setattr(
        _gemm, "pack_operand", lambda *args: calls.append(args[5]) or real_pack(*args)
    )
    m, n, k = 23, 35, 19
    a, b = _operands((2,), m, n, k, False, False, np.float32)
    c = RNG.standard_normal((2, m, n)).astype(np.float32)
    big = cla.to_device(cl_queue, np.full(7 + a.size, 7.5, np.float32))
    da, db, dc = _view(cl_queue, big, 7, a), cla.to_device(cl_queue, b), cla.to_device(cl_queue, c)
    xs = RNG.standard_normal((2, m, k)).astype(np.float32)
    results, grams = {}, {}
    for direct in (True, False):
        monkeypatch.setattr(_gemm, "DIRECT", direct)
        calls.clear()
        results[direct] = gemm(cl_queue, da, db, alpha=0.5, beta=2.0, c=dc, tile=tile).get()
        assert calls == ([tile[1]] if direct else [tile[1], tile[0]])  # b (and a) packed
        grams[direct] = gram(cl_queue, cla.to_device(cl_queue, xs), alpha=-1.0, tile=tile).get()
    _check_close(results[True], *_reference(a, b, False, False, 0.5, 2.0, c))
    np.testing.assert_array_equal(results[True], results[False])
    _check_close(grams[True], *_gram_reference(xs, False, -1.0))
    np.testing.assert_array_equal(grams[True], grams[False])
    # out overlapping a (square, in place): a is packed first
    monkeypatch.setattr(_gemm, "DIRECT", True)
    sq = RNG.standard_normal((2, k, k)).astype(np.float32)
    dsq = cla.to_device(cl_queue, sq)
    calls.clear()
    gemm(cl_queue, dsq, dsq, dsq, tile=tile)
    assert calls == [tile[1], tile[0]]
    _check_close(dsq.get(), *_reference(sq, sq, False, False))


def test_the_environment_turns_tuning_on(tmp_path, monkeypatch, cl_queue):
    monkeypatch.setenv("NETCL_OPTIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_gemm, "tuned", {})
    monkeypatch.setattr(_gemm, "_loaded_dirs", set())
    a = cla.to_device(cl_queue, np.ones((9, 5), np.float32))
    b = cla.to_device(cl_queue, np.ones((5, 7), np.float32))
    gemm(cl_queue, a, b)
    assert _gemm.tuned == {}
    monkeypatch.setenv(_gemm.TUNE_ENV, "1")
    out = gemm(cl_queue, a, b)
    assert len(_gemm.tuned) == 1 and (tmp_path / "cache" / _gemm.CACHE_FILE).is_file()
    np.testing.assert_array_equal(out.get(), np.full((9, 7), 5.0, np.float32))
