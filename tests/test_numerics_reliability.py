"""Issue 14, items 5 and 7 and the build flag: gradient norms without overflow (host, device,
fused, float accumulator), loss scales validated on every path, and every program built with
``-cl-fp32-correctly-rounded-divide-sqrt`` where the device supports it."""

from __future__ import annotations

import math

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl_optim as no
from netcl_optim.amp._loss_scale import dynamic_loss_scale, unscale_grads
from netcl_optim.fusion import _programs, _reductions
from netcl_optim.stateful._clip import clip_grad_norm, clip_grad_norm_device
from netcl_optim.stateful._grad_scaler import AMPGradScaler

F32_MAX = float(np.finfo(np.float32).max)


class P:
    def __init__(self, grad: cla.Array | None) -> None:
        self.grad = grad


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _fp64(q) -> bool:
    return _reductions.acc_ctype(q) == "double"


def _params(q, grads: list[np.ndarray], packed: bool) -> list[P]:
    dev = no.to_device(grads, q)
    if packed:
        dev = no.pack(dev, q)
    return [P(g) for g in dev]


def _clip(fn: str, params: list[P], max_norm: float, norm_type: float, **kw) -> float:
    if fn == "host":
        return clip_grad_norm(params, max_norm, norm_type, **kw)
    return float(clip_grad_norm_device(params, max_norm, norm_type, **kw).get()[0])


def _exact_norm(grads: list[np.ndarray], p: float) -> float:
    """``m * ||x / m||_p`` in float64, ``m`` the largest magnitude."""
    flat = np.abs(np.concatenate([g.astype(np.float64).ravel() for g in grads]))
    m = float(np.max(flat))
    return m * float(np.sum((flat / m) ** p)) ** (1.0 / p)


@pytest.fixture
def float_acc(q, monkeypatch):
    """Reductions as on a device without fp64: a float32 accumulator."""
    monkeypatch.setitem(_reductions._acc, q, "float")
    return q


# ---------------------------------------------------------------------------- item 5: norms


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("fn", ["host", "device"])
def test_large_float32_grads_are_clipped_not_zeroed(q, fn, packed):
    """The issue's case: host and device both return 1.414e30 and clip to 0.707."""
    params = _params(q, [np.array([1e30, 1e30, 0, 0], np.float32)], packed)
    total = _clip(fn, params, 1.0, 2.0)
    assert total == pytest.approx(math.sqrt(2) * 1e30, rel=1e-6)
    np.testing.assert_allclose(params[0].grad.get(), [2**-0.5, 2**-0.5, 0, 0], rtol=1e-6)


# (grads, norm_type): sums of squares (or of |x|**p, or float lanes of |x|) that overflow
# although every element and the norm itself are finite in the accumulator's type.
OVERFLOWING = {
    "f32-l2": ([np.full(37, 3e30, np.float32), np.array([1e-3, -2e30], np.float32)], 2.0),
    "f32-l1-one-lane": ([np.full(16, 3e38, np.float32)], 1.0),
    "f32-p10": ([np.array([1e35, -1e35, 2e35], np.float32)], 10.0),
    "f64-l2": ([np.array([1e200, -1e200, 3e199]), np.array([1.0, 0.0])], 2.0),
    "f64-p3": ([np.full(4, 1e110), np.array([-2e110])], 3.0),
    "f64-p2000": ([np.array([2.0, -2.0, 1.0])], 2000.0),  # 2**2000: no power-of-two scaling fits
    # each chunk's partial is finite, their sum is not (finishing launch)
    "f64-l2-partials": ([np.full(8192, 1.5e152)], 2.0),
}


@pytest.mark.parametrize("case", sorted(OVERFLOWING))
@pytest.mark.parametrize("fn", ["host", "device"])
def test_norm_without_overflow_host_and_device_agree(q, fn, case):
    grads, p = OVERFLOWING[case]
    if any(g.dtype == np.float64 for g in grads) and not _fp64(q):
        pytest.skip("no fp64")
    want = _exact_norm(grads, p)
    params = _params(q, grads, packed=True)
    total = _clip(fn, params, 1.0, p)
    assert total == pytest.approx(want, rel=1e-6 if grads[0].dtype == np.float32 else 1e-12)
    coef = 1.0 / (want + 1e-6)
    for g, h in zip(params, grads, strict=True):
        np.testing.assert_allclose(g.grad.get(), h * coef, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("fn", ["host", "device"])
def test_norm_that_overflows_is_inf_and_zeroes_grads(q, fn):
    """Documented: a norm beyond float64 is inf; torch's coefficient is then 0."""
    if not _fp64(q):
        pytest.skip("no fp64")
    grads = [np.array([1.5e308, 1.5e308, 1.0])]
    params = _params(q, grads, packed=False)
    with pytest.raises(RuntimeError, match="non-finite"):
        _clip(fn, params, 1.0, 2.0, error_if_nonfinite=True)
    np.testing.assert_array_equal(params[0].grad.get(), grads[0])  # untouched on error
    assert _clip(fn, params, 1.0, 2.0) == math.inf
    np.testing.assert_array_equal(params[0].grad.get(), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_clip_by_global_norm_large_updates(q, dtype):
    if dtype == np.float64 and not _fp64(q):
        pytest.skip("no fp64")
    big = 1e30 if dtype == np.float32 else 1e200
    grads = no.to_device({"a": np.array([big, big], dtype), "b": np.zeros(3, dtype)}, q)
    tx = no.clip_by_global_norm(1.0)
    u, _ = tx.update(grads, tx.init(grads))
    out = no.to_host(u)
    np.testing.assert_allclose(out["a"], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_array_equal(out["b"], np.zeros(3, dtype))


def test_float_accumulator_scales(float_acc):
    """No fp64: float32 lanes and partials; overflowing sums are rescaled, in the partials
    (one chunk) and in the finishing launch (each chunk finite, their sum not)."""
    q = float_acc
    for grads in ([np.array([1e30, 1e30, 0, 0], np.float32)], [np.full(8192, 2.5e17, np.float32)]):
        params = _params(q, grads, packed=True)
        norm = clip_grad_norm_device(params, 1.0)
        assert norm.dtype == np.float32
        want = _exact_norm(grads, 2.0)
        assert float(norm.get()[0]) == pytest.approx(want, rel=1e-5)  # float32 lanes
        np.testing.assert_allclose(params[0].grad.get(), grads[0] / want, rtol=1e-5)
    grads = no.to_device({"a": np.array([1e30, 1e30, 0, 0], np.float32)}, q)
    tx = no.clip_by_global_norm(1.0)
    u, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(no.to_host(u)["a"], [2**-0.5, 2**-0.5, 0, 0], rtol=1e-6)
    params = _params(q, [np.array([2.0, -2.0, 1.0], np.float32)], packed=True)
    norm = float(clip_grad_norm_device(params, 1.0, 200.0).get()[0])
    assert norm == pytest.approx(2 * 2 ** (1 / 200), rel=1e-6)
    # beyond float32 the norm itself overflows: inf, as documented
    params = _params(q, [np.full(3, 2e38, np.float32)], packed=True)
    assert float(clip_grad_norm_device(params, 1.0).get()[0]) == math.inf


# ---------------------------------------------------------------------------- item 7: scales


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(init_scale=1e40), "init_scale"),
        (dict(init_scale=1e-40), "init_scale"),
        (dict(init_scale=-2.0), "init_scale"),
        (dict(init_scale="2.0"), "init_scale"),
        (dict(growth_factor=math.inf), "growth_factor"),
        (dict(growth_factor="3"), "growth_factor"),
        (dict(backoff_factor=math.nan), "backoff_factor"),
    ],
)
def test_constructors_refuse_scales_float32_cannot_hold(kwargs, name):
    with pytest.raises(ValueError, match=rf"^Invalid {name}: .* \(must be "):
        AMPGradScaler(**kwargs)
    with pytest.raises(ValueError, match=rf"^Invalid {name}: .* \(must be "):
        dynamic_loss_scale(**kwargs)


def test_float32_range_limits_are_accepted():
    assert AMPGradScaler(init_scale=F32_MAX).get_scale() == F32_MAX
    assert AMPGradScaler(init_scale=2.0**-126).get_scale() == 2.0**-126


BAD_STATE = [
    ("scale", -2.0),
    ("scale", 1e40),
    ("scale", math.nan),
    ("growth_factor", -1.0),
    ("backoff_factor", 1.0),
    ("growth_interval", 0),
    ("growth_interval", 2.5),
    ("_growth_tracker", -1),
    ("_growth_tracker", 1.5),
]


@pytest.mark.parametrize("key, value", BAD_STATE)
def test_load_state_dict_validates_and_leaves_the_scaler_unchanged(key, value):
    scaler = AMPGradScaler(init_scale=8.0, growth_interval=5)
    before = scaler.state_dict()
    sd = {**AMPGradScaler(init_scale=4.0, growth_factor=3.0).state_dict(), key: value}
    with pytest.raises(ValueError, match=rf"^Invalid {key}: .* \(must be "):
        scaler.load_state_dict(sd)
    assert scaler.state_dict() == before


def test_load_state_dict_missing_key_leaves_the_scaler_unchanged():
    scaler = AMPGradScaler(init_scale=8.0)
    before = scaler.state_dict()
    sd = AMPGradScaler(init_scale=4.0).state_dict()
    del sd["growth_interval"]
    with pytest.raises(ValueError, match="growth_interval"):
        scaler.load_state_dict(sd)
    assert scaler.state_dict() == before


@pytest.mark.parametrize(
    "setter, value, name",
    [
        ("set_growth_factor", -1.0, "growth_factor"),
        ("set_growth_factor", 1.0, "growth_factor"),
        ("set_backoff_factor", 0.0, "backoff_factor"),
        ("set_backoff_factor", 2.0, "backoff_factor"),
        ("set_growth_interval", 0, "growth_interval"),
        ("set_growth_interval", 2.5, "growth_interval"),
    ],
)
def test_setters_validate_like_the_constructor(setter, value, name):
    scaler = AMPGradScaler()
    before = scaler.state_dict()
    with pytest.raises(ValueError, match=rf"^Invalid {name}: .* \(must be "):
        getattr(scaler, setter)(value)
    assert scaler.state_dict() == before


@pytest.mark.parametrize("value", [1e40, -2.0, 0.0, math.inf])
def test_update_new_scale_validated(value):
    scaler = AMPGradScaler(init_scale=8.0)
    with pytest.raises(ValueError, match=r"^Invalid new_scale: .* \(must be "):
        scaler.update(value)
    assert scaler.get_scale() == 8.0


def test_a_valid_scale_never_becomes_inf(q):
    """The old failure mode: an inf scale skipped every step for good."""
    tx = dynamic_loss_scale(init_scale=F32_MAX, growth_interval=1)
    g = no.to_device([np.ones(3, np.float32)], q)
    state = tx.init(g)
    for _ in range(3):
        _, state = tx.update(g, state)
        assert state.scale == F32_MAX and state.last_finite
    out, found = unscale_grads(g, state.scale)
    assert not found.get()[0] and np.all(np.isfinite(out[0].get()))


# ---------------------------------------------------------------------------- build flag


CR = "-cl-fp32-correctly-rounded-divide-sqrt"


def _options_of(kernel: cl.Kernel, device: cl.Device) -> str:
    program = kernel.get_info(cl.kernel_info.PROGRAM)
    return program.get_build_info(device, cl.program_build_info.OPTIONS)


@pytest.mark.parametrize("supported", [True, False])
def test_build_passes_correctly_rounded_flag_only_when_supported(q, monkeypatch, supported):
    calls = []

    def query(device: cl.Device) -> bool:
        calls.append(device)
        return supported

    monkeypatch.setattr(_programs, "_correctly_rounded_divide_sqrt", query)
    ctx = cl.Context([q.device])  # fresh: nothing built or cached for it yet
    src = f"__kernel void k(__global float *x) {{ x[0] = sqrt(x[0]) / 3.0f; }} // {supported}"
    kernel = _programs.build(ctx, src, "k", [None])
    assert (CR in _programs.program_options(ctx)) is supported
    assert (CR in _options_of(kernel, q.device)) is supported
    again = _programs.build(ctx, src.replace("3.0f", "7.0f"), "k", [None])
    assert (CR in _options_of(again, q.device)) is supported
    assert len(calls) == 1  # the device query is cached per context


def test_real_device_query():
    device = no.default_queue().device
    flag = bool(device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT)
    assert _programs._correctly_rounded_divide_sqrt(device) is flag


def test_every_library_program_goes_through_the_builder(q, monkeypatch):
    """Fused, reduction, clipping and loss-scaling kernels on a fresh context: every
    program build gets the builder's options."""
    built: list[str] = []
    original = cl.Program.build

    def spy(self, options=None, devices=None, cache_dir=None):
        built.append(" ".join(options) if isinstance(options, (list, tuple)) else str(options))
        return original(self, options, devices, cache_dir)

    monkeypatch.setattr(cl.Program, "build", spy)
    monkeypatch.setattr(_programs, "_correctly_rounded_divide_sqrt", lambda d: True)
    ctx = cl.Context([q.device])
    queue = cl.CommandQueue(ctx)
    grads = no.pack(no.to_device([np.ones(5, np.float32), np.ones(3, np.float32)], queue), queue)
    clip_grad_norm_device([P(g) for g in grads], 1.0)
    unscale_grads(grads, 2.0)
    tx = no.chain(no.clip_by_global_norm(1.0), no.adam(1e-3))
    tx.update(grads, tx.init(grads), grads)
    AMPGradScaler().scale(grads[0])
    queue.finish()
    assert len(built) >= 6
    assert all(CR in opts for opts in built), built
