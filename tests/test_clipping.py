"""clip_grad_norm (host) and clip_grad_norm_device against float64 references and torch."""

from __future__ import annotations

import math

import numpy as np
import pyopencl.array as cla
import pytest
import reference_extra as rx
from hypothesis import given, settings
from hypothesis import strategies as st

import netcl_optim as no
from netcl_optim.fusion import count_launches
from netcl_optim.stateful._clip import clip_grad_norm, clip_grad_norm_device

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]
SHAPES = [(3, 5), (7,), (), (0,), (4, 2, 3)]


class P:
    """A duck-typed parameter: only ``.grad`` matters to the clipping helpers."""

    def __init__(self, grad: cla.Array | None) -> None:
        self.grad = grad


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _host_grads(seed: int = 0, dtype=np.float32, scale: float = 3.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.array(rng.standard_normal(s) * scale, dtype) for s in SHAPES]


def _params(q, grads: list[np.ndarray | None], packed: bool) -> list[P]:
    present = [g for g in grads if g is not None]
    dev = no.to_device(present, q)
    if packed and dev:
        dev = no.pack(dev, q)
    it = iter(dev)
    return [P(None if g is None else next(it)) for g in grads]


def _got(params: list[P]) -> list[np.ndarray | None]:
    return [None if p.grad is None else p.grad.get() for p in params]


def _run(fn: str, params, max_norm, norm_type, **kw) -> float:
    if fn == "host":
        out = clip_grad_norm(params, max_norm, norm_type, **kw)
        assert isinstance(out, float)
        return out
    out = clip_grad_norm_device(params, max_norm, norm_type, **kw)
    assert isinstance(out, cla.Array) and out.shape == (1,)
    return float(out.get()[0])


# ---------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("fn", ["host", "device"])
def test_matches_reference(q, fn, norm_type, packed):
    grads = _host_grads(1)
    grads.insert(2, None)  # skipped
    present = [g for g in grads if g is not None]
    total_ref = rx.total_norm(present, norm_type)
    max_norm = 0.37 * total_ref
    params = _params(q, grads, packed)
    total = _run(fn, params, max_norm, norm_type)
    np.testing.assert_allclose(total, total_ref, rtol=1e-6)
    _, want = rx.clip_grads(present, max_norm, norm_type)
    got = [g for g in _got(params) if g is not None]
    assert params[2].grad is None
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-30)
    assert rx.total_norm(got, norm_type) <= max_norm * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("fn", ["host", "device"])
def test_half_and_double_grads(q, fn, dtype):
    grads = _host_grads(2, dtype)
    params = _params(q, grads, packed=True)
    total_ref = rx.total_norm(grads, 2.0)
    total = _run(fn, params, 1.0, 2.0)
    np.testing.assert_allclose(total, total_ref, rtol=1e-6 if dtype == np.float16 else 1e-12)
    coef = rx.clip_coef(total_ref, 1.0)
    for g, h in zip(_got(params), grads, strict=True):
        assert g.dtype == dtype
        if dtype == np.float16:  # float32 product, rounded to half
            want = (h.astype(np.float32) * np.float32(coef)).astype(np.float16)
            np.testing.assert_array_max_ulp(g, want, maxulp=1)
        else:
            np.testing.assert_allclose(g, h * coef, rtol=1e-12)


@pytest.mark.parametrize("fn", ["host", "device"])
def test_coefficient_one_leaves_grads_bitwise(q, fn):
    grads = _host_grads(3)
    params = _params(q, grads, packed=True)
    total = _run(fn, params, 1e6, 2.0)
    assert total < 1e6
    for g, h in zip(_got(params), grads, strict=True):
        np.testing.assert_array_equal(g.view(np.uint32), h.view(np.uint32))


@pytest.mark.parametrize("fn", ["host", "device"])
def test_zero_norm_and_zero_max_norm(q, fn):
    params = _params(q, [np.zeros(5, np.float32), np.zeros((2, 2), np.float32)], packed=True)
    assert _run(fn, params, 1.0, 2.0) == 0.0
    assert all(np.all(g == 0) for g in _got(params))
    params = _params(q, _host_grads(4), packed=True)
    assert _run(fn, params, 0.0, 2.0) > 0
    assert all(np.all(g == 0) for g in _got(params))


@pytest.mark.parametrize("fn", ["host", "device"])
def test_no_grads(q, fn):
    assert _run(fn, [], 1.0, 2.0) == 0.0
    assert _run(fn, [P(None), P(None)], 1.0, math.inf) == 0.0
    assert _run(fn, (p for p in [P(None)]), 1.0, 2.0) == 0.0


@pytest.mark.parametrize("fn", ["host", "device"])
def test_single_parameter_object(q, fn):
    (p,) = _params(q, [np.array([3.0, 4.0], np.float32)], packed=False)
    assert _run(fn, p, 1.0, 2.0) == pytest.approx(5.0, rel=1e-7)
    np.testing.assert_allclose(p.grad.get(), [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("fn", ["host", "device"])
def test_nonfinite_without_error_flag(q, fn, bad):
    grads = _host_grads(5)
    grads[0][1, 2] = bad
    params = _params(q, grads, packed=True)
    total = _run(fn, params, 1.0, 2.0)
    got = _got(params)
    if bad == np.inf:  # coef 0: finite grads zeroed, the inf becomes NaN (torch)
        assert total == math.inf
        assert np.isnan(got[0][1, 2])
        mask = np.ones_like(got[0], bool)
        mask[1, 2] = False
        assert np.all(got[0][mask] == 0) and all(np.all(g == 0) for g in got[1:])
    else:  # NaN coefficient: everything NaN
        assert math.isnan(total)
        assert all(np.all(np.isnan(g)) for g in got if g.size)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("fn", ["host", "device"])
def test_error_if_nonfinite_raises_and_leaves_grads(q, fn, norm_type):
    grads = _host_grads(6)
    grads[1][3] = np.nan if norm_type == 2.0 else -np.inf
    params = _params(q, grads, packed=True)
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        _run(fn, params, 1.0, norm_type, error_if_nonfinite=True)
    for g, h in zip(_got(params), grads, strict=True):
        np.testing.assert_array_equal(g.view(np.uint32), h.view(np.uint32))
    # finite grads with the flag: clipped as usual
    params = _params(q, _host_grads(7), packed=True)
    _run(fn, params, 1.0, norm_type, error_if_nonfinite=True)
    assert rx.total_norm(_got(params), norm_type) <= 1.0 * (1 + 1e-6)


@pytest.mark.parametrize("fn", [clip_grad_norm, clip_grad_norm_device])
def test_argument_errors(q, fn):
    params = _params(q, _host_grads(8), packed=False)
    with pytest.raises(ValueError, match="max_norm"):
        fn(params, -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        fn(params, math.nan)
    for p in (0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match="norm_type"):
            fn(params, 1.0, p)
    with pytest.raises(TypeError, match=r"\.grad"):
        fn([object()], 1.0)
    with pytest.raises(TypeError, match="pyopencl"):
        fn([P(np.ones(3, np.float32))], 1.0)
    with pytest.raises(TypeError):
        fn(params[0].grad, 1.0)  # a bare array has no .grad


# ---------------------------------------------------------------------------- device behaviour


def test_device_launches_and_no_host_read(q, monkeypatch):
    grads = [np.ones((16, 16), np.float32), np.ones(256, np.float32), np.ones(512, np.float32)]
    params = _params(q, grads, packed=True)

    def no_get(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_get)
    with count_launches() as c:
        out = clip_grad_norm_device(params, 1.0)
    monkeypatch.undo()
    # one reduction (partials + finish) and one scaling launch for the packed set
    assert c.launches == 3, c.kernels
    assert c.kernels[-1].startswith("netcl_clip_scale_float")
    np.testing.assert_allclose(out.get()[0], 32.0, rtol=1e-7)
    params = _params(q, grads, packed=False)
    with count_launches() as c:
        clip_grad_norm_device(params, 1.0)
    assert c.launches == 2 * 3 + 1  # per leaf: partials and scaling; one finish


def test_device_grads_are_scaled_in_place(q):
    params = _params(q, _host_grads(9), packed=True)
    before = [p.grad for p in params]
    clip_grad_norm_device(params, 0.5)
    assert all(p.grad is b for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("value", [999.0, 0.1, 1e-3])
@pytest.mark.parametrize("n", [4096, 20000])
def test_device_norm_is_accurate_for_long_sums(q, n, value):
    """Constant data is the worst case for summing in float lanes (the rounding errors all
    go one way): the device norm must still match float64 to float32 rounding, and the
    clipped norm must stay under max_norm (1 + 1e-6)."""
    for norm_type in (2.0, 1.0, 3.0):
        grads = [np.full(n, value, np.float32), np.full(7, value, np.float32)]
        total_ref = rx.total_norm(grads, norm_type)
        params = _params(q, grads, packed=True)
        total = float(clip_grad_norm_device(params, 0.5 * total_ref, norm_type).get()[0])
        np.testing.assert_allclose(total, total_ref, rtol=2e-7)
        assert rx.total_norm(_got(params), norm_type) <= 0.5 * total_ref * (1 + 1e-6)


# ---------------------------------------------------------------------------- properties

_sizes = st.sampled_from([0, 1, 2, 7, 13, 64, 67, 1031, 5003])
_value = st.floats(-1e3, 1e3, width=32)
_norm = st.sampled_from([2.0, 1.0, math.inf, 3.0])


@st.composite
def _grad_lists(draw):
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        size = draw(_sizes)
        if draw(st.booleans()):
            out.append(np.full(size, draw(_value), np.float32))  # constant: worst for sums
        else:
            out.append(np.array(draw(st.lists(_value, min_size=size, max_size=size)), np.float32))
    return out


@settings(max_examples=40)
@given(grads=_grad_lists(), norm_type=_norm, frac=st.floats(0.0, 2.0), packed=st.booleans())
def test_property_host_equals_device_and_bound(q, grads, norm_type, frac, packed):
    total_ref = rx.total_norm(grads, norm_type)
    max_norm = frac * total_ref
    ph, pd = _params(q, grads, packed), _params(q, grads, packed)
    th = clip_grad_norm(ph, max_norm, norm_type)
    td = float(clip_grad_norm_device(pd, max_norm, norm_type).get()[0])
    np.testing.assert_allclose(th, total_ref, rtol=1e-12)
    # the device squares float data in float: below ~1e-19 squares underflow
    np.testing.assert_allclose(td, total_ref, rtol=1e-6, atol=1e-18 if norm_type == 2 else 0)
    gh, gd = _got(ph), _got(pd)
    for a, b in zip(gh, gd, strict=True):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-40)
    for got in (gh, gd):  # (+ float32's smallest normal: subnormal results lose precision)
        assert rx.total_norm(got, norm_type) <= max_norm * (1 + 1e-6) + 1.2e-38
        if total_ref + 1e-6 <= max_norm:  # coefficient 1: untouched
            for a, g in zip(got, grads, strict=True):
                np.testing.assert_array_equal(a, g)


# ---------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("fn", ["host", "device"])
def test_matches_torch(q, fn, norm_type):
    torch = pytest.importorskip("torch")
    grads = [g for g in _host_grads(10) if g.size]  # torch: no inf norm of an empty tensor
    grads[1][0] = 40.0
    tparams = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for t, g in zip(tparams, grads, strict=True):
        t.grad = torch.from_numpy(g.copy())
    tparams.append(torch.nn.Parameter(torch.zeros(3)))  # grad None: skipped
    want_total = float(torch.nn.utils.clip_grad_norm_(tparams, 2.5, norm_type))
    params = _params(q, [*grads, None], packed=True)
    total = _run(fn, params, 2.5, norm_type)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    for p, t in zip(params[:-1], tparams[:-1], strict=True):
        np.testing.assert_allclose(p.grad.get(), t.grad.numpy(), rtol=2e-6, atol=1e-30)
