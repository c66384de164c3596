"""Loss scaling with bfloat16 params and grads: the unscale-and-check and scale kernels, the
functional dynamic_loss_scale and AMPGradScaler, bit for bit against numpy float32 math on
the bfloat16 values rounded once to nearest even (ml_dtypes' astype), and against the
float32 path of the same optimizer."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference_extra as rx

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim.amp import AMPGradScaler, dynamic_loss_scale, loss_scale_of, unscale_grads
from netcl_optim.amp._loss_scale import inverse_scale, new_flag, scale_outputs, unscale_grads_
from netcl_optim.fusion import count_launches

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
SHAPES = [(3, 5), (7,), (), (0,), (4000,), (9000,)]  # > one chunk, a 0-d and an empty leaf
STORAGES = [{}, {"state_dtype": "bfloat16"}, {"state_bits": 8}]
STORAGE_IDS = ["float32-state", "bfloat16-state", "8bit-state"]
BIG = 5000  # >= 4096 elements: 8-bit state (codes and absmax) for this param


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _draw(seed: int, shapes: list[tuple[int, ...]], scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s) * scale).astype(BF16) for s in shapes]


def _unscaled_ref(x: np.ndarray, scale: float) -> np.ndarray:
    """``bf16(float32(x) * float32(1 / float64(scale)))``, rounded to nearest even once."""
    with np.errstate(all="ignore"):
        return (x.astype(F32) * np.float32(inverse_scale(scale))).astype(BF16)


def _scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """``bf16(float32(x) * float32(scale))``: a scaled bfloat16 grad, as a backward gives."""
    with np.errstate(all="ignore"):
        return (x.astype(F32) * np.float32(scale)).astype(BF16)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(got: Any, want: Any) -> None:
    """Leaf by leaf: dtype, shape and bits, except that any NaN equals any NaN."""
    for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        nan = np.isnan(w.astype(np.float64))
        np.testing.assert_array_equal(np.isnan(g.astype(np.float64)), nan)
        np.testing.assert_array_equal(_bits(g)[~nan], _bits(w)[~nan])


def _host(v: Any) -> Any:
    return v.get() if isinstance(v, cla.Array) else np.asarray(v)


# ---------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("bad_at", [None, (0, 0), (5, 4095), (5, 8999), (4, 3999), (2, ())])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
def test_unscale_grads_values_and_flag(q, packed, bad_at):
    host = _draw(0, SHAPES, 1000.0)
    if bad_at is not None:
        leaf, idx = bad_at
        host[leaf][idx] = np.nan if leaf % 2 else -np.inf
    dev = no.to_device(host, q)
    if packed:
        dev = no.pack(dev, q)
    scale = 3.0  # 1/3 rounds: most products are rounded to bfloat16
    out, found = unscale_grads(dev, scale)
    assert found.dtype == np.float32 and found.get()[0] == (0.0 if bad_at is None else 1.0)
    _assert_bitwise(no.to_host(out), [_unscaled_ref(h, scale) for h in host])
    _assert_bitwise(no.to_host(dev), host)  # pure: inputs untouched


@pytest.mark.parametrize("scale", [2.0 / 3.0, 3.0, 2.0**-20])
def test_unscale_every_bfloat16_value(q, scale):
    """All 65536 bfloat16 words, vector and scalar loops: bit for bit numpy's float32 math
    rounded by ml_dtypes (a multiplier of 1.5 makes many exact ties: both ways); a NaN
    stays a NaN of its sign; inputs that overflow after unscaling raise no flag."""
    x = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(BF16)
    finite = np.isfinite(x.astype(F32))
    out, found = unscale_grads([no.to_device(x[finite], q)], scale)
    assert found.get()[0] == 0.0
    _assert_bitwise(out[0].get(), _unscaled_ref(x[finite], scale))
    out, found = unscale_grads([no.to_device(x, q)], scale)
    assert found.get()[0] == 1.0
    got = out[0].get()
    _assert_bitwise(got, _unscaled_ref(x, scale))
    nan = np.isnan(x.astype(F32))
    np.testing.assert_array_equal(_bits(got)[nan] >> 15, _bits(x)[nan] >> 15)
    if inverse_scale(scale) == 1.5:
        with np.errstate(over="ignore"):
            products = x[finite].astype(F32) * np.float32(1.5)
        ties = (products.view(np.uint32) & 0x1FFFF) == 0x8000  # even: rounded down
        odd_ties = (products.view(np.uint32) & 0x1FFFF) == 0x18000  # odd: rounded up
        assert ties.sum() > 1000 and odd_ties.sum() > 1000


def test_unscale_in_place_one_launch_no_sync(q, monkeypatch):
    host = _draw(2, SHAPES, 100.0)
    host[4][17] = np.inf
    dev = no.pack(no.to_device(host, q), q)
    found = new_flag(q)

    def no_get(*a: Any, **k: Any) -> None:
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_get)
    with count_launches() as c:
        unscale_grads_(dev, inverse_scale(5.0), found)
    monkeypatch.undo()
    assert c.launches == 1, c.kernels
    assert found.get()[0] == 1.0
    _assert_bitwise(no.to_host(dev), [_unscaled_ref(h, 5.0) for h in host])


def test_mixed_dtypes_one_flag(q):
    """bfloat16 and float32 grads in one tree: one flag, each dtype unscaled as its own."""
    g32 = np.random.default_rng(3).standard_normal(50).astype(F32)
    g16 = _draw(4, [(40,)])[0]
    g16[39] = np.nan
    out, found = unscale_grads({"a": no.to_device(g32, q), "b": no.to_device(g16, q)}, 3.0)
    assert found.get()[0] == 1.0
    inv = np.float32(inverse_scale(3.0))
    _assert_bitwise(no.to_host(out), {"a": g32 * inv, "b": _unscaled_ref(g16, 3.0)})


def test_scale_outputs_device_host_and_scalar(q):
    x = _draw(5, [(300,)], 1e3)[0]
    x[:3] = np.array([3.0e38, -np.inf, np.nan], F32).astype(BF16)  # overflow, inf, NaN
    s = 3.0
    want = _scaled(x, s)
    out = scale_outputs({"d": no.to_device(x, q), "h": x, "s": x[5]}, s)
    assert out["d"].dtype == BF16 and out["h"].dtype == BF16
    _assert_bitwise(out["d"].get(), want)
    _assert_bitwise(out["h"], want)
    assert isinstance(out["s"], ml_dtypes.bfloat16) and _bits(np.asarray(out["s"])) == _bits(
        want[5:6]
    )
    assert np.isposinf(want[0].astype(F32))  # (3e38 * 3 overflows to inf, as in numpy)


# ---------------------------------------------------------------------------- functional


def _tree(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    w, b = _draw(seed, [(BIG,), (7,)], scale)
    return {"w": w, "b": b}


FLAGS = [False, True, False, False, True, True, False, False]


def _functional_inner(storage: dict[str, Any]) -> no.GradientTransformation:
    return no.low_precision_state(no.adam(1e-2), **storage) if storage else no.adam(1e-2)


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
def test_dynamic_loss_scale_equals_inner_on_reference_grads(q, storage):
    """Each finite update is the inner optimizer's on the numpy reference of the unscaled
    grads (updates and state bit for bit); a skipped one gives -0.0 updates, and leaves the
    inner state (8-bit codes and absmax included) and the applied params unchanged; the
    scale follows torch's rule."""
    params = no.pack(no.to_device(_tree(0), q), q)
    tx = dynamic_loss_scale(3.0, growth_interval=2, inner=_functional_inner(storage))
    plain = _functional_inner(storage)
    state, pstate = tx.init(params), plain.init(params)
    r = rx.GradScalerRef(3.0, 2.0, 0.5, 2)
    for it, bad in enumerate(FLAGS):
        assert loss_scale_of(state) == r.scale
        scaled = {k: _scaled(v, r.scale) for k, v in _tree(10 + it).items()}
        if bad:
            scaled["w"][BIG - 1 - it] = np.nan if it % 2 else np.inf
        before = no.to_host((params, state.inner_state))
        u, new_state = tx.update(no.to_device(scaled, q), state, params)
        new_params = no.apply_updates(params, u)
        ran = r.iteration(bad)
        assert new_state.last_finite == ran
        assert (new_state.scale, new_state.growth_tracker) == (r.scale, r.growth_tracker)
        if not ran:
            for leaf in no.to_host(u).values():
                assert leaf.dtype == BF16 and np.all(_bits(leaf) == 0x8000)  # -0.0
            _assert_bitwise(no.to_host((new_params, new_state.inner_state)), before)
        else:
            unscaled = {k: _unscaled_ref(v, state.scale) for k, v in scaled.items()}
            want, pstate = plain.update(no.to_device(unscaled, q), pstate, params)
            _assert_bitwise(no.to_host(u), no.to_host(want))
            _assert_bitwise(no.to_host(new_state.inner_state), no.to_host(pstate))
        params, state = new_params, new_state


def test_scale_sequence_matches_float32_path(q):
    """The same found-inf sequence from bfloat16 and from float32 grads: the same scales."""
    runs = []
    for dtype in (BF16, F32):
        params = no.pack(no.to_device({k: v.astype(dtype) for k, v in _tree(0).items()}, q), q)
        tx = dynamic_loss_scale(2.0**5, growth_interval=2, inner=no.sgd(1e-3))
        state, seen = tx.init(params), []
        for it, bad in enumerate(FLAGS + [False] * 4):
            g = {k: v.astype(dtype) for k, v in _tree(20 + it).items()}
            if bad:
                g["b"][it % 7] = -np.inf
            params, state = no.step(tx, params, no.to_device(g, q), state)
            seen.append((state.scale, state.growth_tracker, state.last_finite))
        runs.append(seen)
    assert runs[0] == runs[1]
    assert [s[2] for s in runs[0]] == [not b for b in FLAGS + [False] * 4]


def test_functional_step_is_float32_update_rounded_then_applied(q):
    """A power-of-two scale unscales exactly: an Adam step under dynamic_loss_scale with
    bfloat16 params and grads (float32 state) computes the float32 updates of the same
    values and the same float32 state; the wrapper is not fused, so its updates are stored
    in the params' dtype before they are applied, as for float16: the new params are
    ``bf16(p + bf16(u))``, rounded twice (the stateful scaler below rounds once)."""
    host = _tree(1)
    scale = 2.0**12
    p16 = no.pack(no.to_device(host, q), q)
    tx = dynamic_loss_scale(scale, growth_interval=1000, inner=no.adam(1e-2))
    s16 = tx.init(p16)
    s32 = tx.init(no.pack(no.to_device({k: v.astype(F32) for k, v in host.items()}, q), q))
    for it in range(3):
        g = {k: _scaled(v, scale) for k, v in _tree(30 + it).items()}
        p32 = no.pack(no.to_device({k: v.astype(F32) for k, v in no.to_host(p16).items()}, q), q)
        u32, s32 = tx.update(no.to_device({k: v.astype(F32) for k, v in g.items()}, q), s32, p32)
        p16, s16 = no.step(tx, p16, no.to_device(g, q), s16)
        u16 = {k: v.astype(BF16) for k, v in no.to_host(u32).items()}
        want = {k: (v + u16[k].astype(F32)).astype(BF16) for k, v in no.to_host(p32).items()}
        _assert_bitwise(no.to_host(p16), want)
        _assert_bitwise(no.to_host(s16.inner_state), no.to_host(s32.inner_state))
        assert s16.scale == s32.scale == scale


def test_apply_if_finite_skips_bfloat16_nan(q):
    params = no.pack(no.to_device(_tree(2), q), q)
    tx = no.apply_if_finite(no.adam(1e-2), 3)
    state = tx.init(params)
    g = _tree(3)
    params, state = no.step(tx, params, no.to_device(g, q), state)
    assert state.last_finite
    g["w"][100] = np.nan
    before = no.to_host((params, state.inner_state))
    params, state = no.step(tx, params, no.to_device(g, q), state)
    assert not state.last_finite and state.notfinite_count == 1
    _assert_bitwise(no.to_host((params, state.inner_state)), before)


# ---------------------------------------------------------------------------- AMPGradScaler


def _stateful_params(q: Any, seed: int) -> list[S.Parameter]:
    return [S.Parameter(no.to_device(h, q)) for h in _draw(seed, [(BIG,), (7,)])]


def _opt_state(opt: Any, params: list[S.Parameter]) -> list[dict[str, np.ndarray]]:
    return [{k: _host(v) for k, v in opt.state[p].items()} for p in params if p in opt.state]


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
def test_scaler_equals_plain_optimizer_on_reference_grads(q, storage):
    """AMPGradScaler over AdamW with bfloat16 params: the unscaled grads equal the numpy
    reference bit for bit, a finite step equals the plain optimizer fed those grads, a
    non-finite grad skips the step with params and state (8-bit codes and absmax
    included) unchanged; the scale follows torch's rule."""
    amp_params, ref_params = _stateful_params(q, 0), _stateful_params(q, 0)
    amp_opt = S.AdamW(amp_params, lr=1e-2, **storage)
    ref_opt = S.AdamW(ref_params, lr=1e-2, **storage)
    scaler = AMPGradScaler(init_scale=3.0, growth_interval=2)
    r = rx.GradScalerRef(3.0, 2.0, 0.5, 2)
    for it, bad in enumerate(FLAGS):
        assert scaler.get_scale() == r.scale
        scaled = [_scaled(g, r.scale) for g in _draw(40 + it, [(BIG,), (7,)])]
        if bad:
            scaled[it % 2][it] = np.inf if it % 2 else np.nan
        for p, g in zip(amp_params, scaled, strict=True):
            p.grad = no.to_device(g, q)
        before = ([p.data.get() for p in amp_params], _opt_state(amp_opt, amp_params))
        scaler.unscale_(amp_opt)
        unscaled = [_unscaled_ref(g, r.scale) for g in scaled]
        _assert_bitwise([p.grad.get() for p in amp_params], unscaled)
        scaler.step(amp_opt)
        scaler.update()
        ran = r.iteration(bad)
        assert (scaler.get_scale(), scaler._get_growth_tracker()) == (r.scale, r.growth_tracker)
        if not ran:
            _assert_bitwise([p.data.get() for p in amp_params], before[0])
            _assert_bitwise(_opt_state(amp_opt, amp_params), before[1])
            continue
        for p, g in zip(ref_params, unscaled, strict=True):
            p.grad = no.to_device(g, q)
        ref_opt.step()
        assert not np.array_equal(_bits(amp_params[0].data.get()), _bits(before[0][0]))
        _assert_bitwise([p.data.get() for p in amp_params], [p.data.get() for p in ref_params])
        _assert_bitwise(_opt_state(amp_opt, amp_params), _opt_state(ref_opt, ref_params))
    if storage.get("state_bits") == 8:
        entry = amp_opt.state[amp_params[0]]
        assert _host(entry["exp_avg"]).dtype == np.uint8 and "exp_avg_absmax" in entry


def test_scaler_skip_before_the_first_step_leaves_no_state(q):
    """The very first step non-finite: params unchanged, no optimizer state created."""
    params = _stateful_params(q, 1)
    opt = S.AdamW(params, lr=1e-2, state_bits=8)
    scaler = AMPGradScaler(init_scale=8.0)
    host = [p.data.get() for p in params]
    grads = _draw(2, [(BIG,), (7,)])
    grads[0][4095] = -np.inf
    for p, g in zip(params, grads, strict=True):
        p.grad = no.to_device(g, q)
    assert scaler.step(opt) is None
    scaler.update()
    _assert_bitwise([p.data.get() for p in params], host)
    assert _opt_state(opt, params) == [] or all(not e for e in _opt_state(opt, params))
    assert scaler.get_scale() == 4.0


def test_scaler_scale_update_matches_float32_path(q):
    """bfloat16 and float32 grads with the same found-inf sequence: the same scales."""
    seqs = []
    for dtype in (BF16, F32):
        params = [S.Parameter(no.to_device(h.astype(dtype), q)) for h in _draw(0, [(9,)])]
        opt = S.SGD(params, lr=1e-3)
        scaler, seen = AMPGradScaler(init_scale=2.0**7, growth_interval=2), []
        for it, bad in enumerate(FLAGS + [False] * 3):
            g = _draw(50 + it, [(9,)])[0].astype(dtype)
            if bad:
                g[it % 9] = np.nan
            params[0].grad = no.to_device(g, q)
            scaler.step(opt)
            scaler.update()
            seen.append((scaler.get_scale(), scaler._get_growth_tracker()))
        seqs.append(seen)
    assert seqs[0] == seqs[1]


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_scaler_full_step_equals_float32_path_rounded_once(q, name):
    """A power-of-two scale unscales bfloat16 grads exactly, and the optimizer's step is one
    fused kernel: each step with bfloat16 params and grads (float32 state) is the float32
    step on the same values, the new params rounded to bfloat16 once, the same state."""
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    cls = getattr(S, name)
    host = _draw(6, [(BIG,), (7,)])
    p16 = [S.Parameter(no.to_device(h, q)) for h in host]
    p32 = [S.Parameter(no.to_device(h.astype(F32), q)) for h in host]
    o16, o32 = cls(p16, **kw), cls(p32, **kw)
    s16, s32 = AMPGradScaler(init_scale=2.0**10), AMPGradScaler(init_scale=2.0**10)
    for it in range(3):
        scaled = [_scaled(g, 2.0**10) for g in _draw(60 + it, [(BIG,), (7,)])]
        for a, b, g in zip(p16, p32, scaled, strict=True):
            a.grad, b.grad = no.to_device(g, q), no.to_device(g.astype(F32), q)
            b.data = no.to_device(a.data.get().astype(F32), q)  # the same values each step
        for scaler, opt in ((s16, o16), (s32, o32)):
            scaler.step(opt)
            scaler.update()
        _assert_bitwise([p.grad.get() for p in p16], [p.grad.get().astype(BF16) for p in p32])
        _assert_bitwise([p.data.get() for p in p16], [p.data.get().astype(BF16) for p in p32])
        _assert_bitwise(_opt_state(o16, p16), _opt_state(o32, p32))
    assert s16.get_scale() == s32.get_scale() == 2.0**10


def test_update_with_bfloat16_new_scale(q):
    """``update(new_scale)`` takes a one-element bfloat16 array, on the device or the host,
    as it takes float16 and float32 ones (its value is exact in float32)."""
    scaler = AMPGradScaler(init_scale=8.0)
    scaler.update(no.to_device(np.array([3.0], BF16), q))
    assert scaler.get_scale() == 3.0
    scaler.update(np.array([0.5], BF16))
    assert scaler.get_scale() == 0.5
    with pytest.raises(ValueError, match="Invalid new_scale"):
        scaler.update(np.array([np.inf], BF16))
    assert scaler.get_scale() == 0.5
