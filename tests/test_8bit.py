"""8-bit block-quantized optimizer state (``low_precision_state(tx, state_bits=8)``).

The quantizer (``netcl_optim.fusion.quantize``) equals an independent numpy statement of the
rule (``reference_8bit.quantize_nearest``) bit for bit, and every element-wise row of the
functional table with 8-bit state is, bit for bit, the same rule with float32 state replaced
by ``dequantize(quantize(state))`` after ``init`` and after every step: the updates are
identical and the stored codes and absmax are those of the float32 run's new state. Rules
with values per leaf, row or element index refuse 8-bit state; packed and unpacked trees give
the same bits (one launch when packed); invalid arguments raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optree
import pyopencl.array as cla
import pytest
from cases import CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_8bit import dequantize_nearest, dynamic_map, quantize_nearest

import netcl_optim as no
from netcl_optim.fusion import QuantizedState, dequantize, quantize

F32 = np.float32
BLOCK = 256
MIN_SIZE = 4096
SHAPES = {"w": (70, 100), "b": (100,), "v": (5003,)}  # two quantized leaves, one float32

STAGES = {"adafactor", "adafactor-factored-momentum", "adafactor-torch",
          "adafactor-torch-custom", "sm3", "sm3-momentum", "muon"}  # fmt: skip
# rows that must run >= 50 steps; the others run fewer to keep the file's runtime modest
LONG = {"adam", "adamw", "lion", "rmsprop", "adagrad", "sgd-momentum"}
STEPS_LONG, STEPS_SHORT = 50, 10


def _fragments(tx: Any) -> list[Any]:
    """The fragments of ``tx``'s plan (a chain's children, recursively)."""
    plan = tx.plan
    if plan is None:
        return []
    out = [plan] if isinstance(plan, no.Fragment) else []
    for child in getattr(plan, "children", ()):
        out += _fragments(child)
    return out


def _per_leaf(case: Any) -> bool:
    """Whether ``case``'s transform has values per leaf / row / tree or reads the element
    index."""
    return any(
        f.segment_reduction is not None or f.tree_sums is not None or f.element_index
        for f in _fragments(case.make(no))
    )


def _has_slots(case: Any) -> bool:
    return any(f.slots for f in _fragments(case.make(no)))


ELEMENTWISE = [c for c in CASES if c.id not in STAGES and not _per_leaf(c)]
PER_LEAF = [c for c in CASES if c.id not in STAGES and _per_leaf(c)]
PER_LEAF_STATEFUL = [c for c in PER_LEAF if _has_slots(c)]
PER_LEAF_STATELESS = [c for c in PER_LEAF if not _has_slots(c)]


def _row_params(case: Any) -> list[Any]:
    return [pytest.param(case, id=case.id)]


# ---------------------------------------------------------------------------- helpers


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedState)


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, every NaN made the same (a NaN's payload may differ between paths)."""
    a = np.array(a, copy=True)
    if a.dtype.kind == "f":
        a[np.isnan(a)] = np.nan
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _assert_same(a: Any, b: Any, what: str) -> None:
    la, da = optree.tree_flatten(a, none_is_leaf=True)
    lb, db = optree.tree_flatten(b, none_is_leaf=True)
    assert da == db, f"{what}: structure {da} != {db}"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if isinstance(x, cla.Array):
            x, y = x.get(), y.get()
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: leaf {i}"
            bad = np.flatnonzero(_bits(x).ravel() != _bits(y).ravel())
            assert bad.size == 0, (
                f"{what}: leaf {i} differs at {bad.size} of {x.size} elements, first at "
                f"{bad[0]}: {x.ravel()[bad[0]]!r} != {y.ravel()[bad[0]]!r}"
            )
        else:
            assert type(x) is type(y) and x == y, f"{what}: leaf {i}: {x!r} != {y!r}"


def _sync(state8: Any, state32: Any, queue: Any, what: str) -> tuple[Any, int]:
    """Check the 8-bit state against the float32 run's state and return the float32 state
    with each leaf the 8-bit run quantizes replaced by ``dequantize(quantize(leaf))`` (same
    map), and the number of quantized leaves. Other leaves must be identical."""
    l8, d8 = optree.tree_flatten(state8, is_leaf=_is_q, none_is_leaf=True)
    l32, d32 = optree.tree_flatten(state32, none_is_leaf=True)
    assert len(l8) == len(l32), f"{what}: {d8} vs {d32}"
    out, n_q = [], 0
    for i, (q, x) in enumerate(zip(l8, l32, strict=True)):
        if _is_q(q):
            n_q += 1
            host = x.get()
            assert host.dtype == F32 and q.codes.shape == host.shape, f"{what}: leaf {i}"
            # (a slot on the unsigned map must be declared non-negative truthfully)
            assert q.signed or not np.any(host < 0), f"{what}: leaf {i} negative, unsigned map"
            codes, absmax = quantize_nearest(host, q.signed)
            got_codes, got_absmax = q.codes.get().reshape(-1), q.absmax.get()
            bad = np.flatnonzero(got_codes != codes)
            assert bad.size == 0, (
                f"{what}: leaf {i} (signed={q.signed}) codes differ at {bad.size} elements, "
                f"first {bad[0]}: {got_codes[bad[0]]} != {codes[bad[0]]} "
                f"(float32 state {host.ravel()[bad[0]]!r})"
            )
            assert np.array_equal(_bits(got_absmax), _bits(absmax)), f"{what}: leaf {i} absmax"
            back = dequantize_nearest(codes, absmax, q.signed).reshape(host.shape)
            out.append(cla.to_device(queue, back))
        elif isinstance(q, cla.Array):
            assert isinstance(x, cla.Array), f"{what}: leaf {i}"
            _assert_same(q, x, f"{what}: float32 leaf {i}")
            out.append(x)
        else:
            assert type(q) is type(x) and np.all(q == x), f"{what}: leaf {i}: {q!r} != {x!r}"
            out.append(x)
    return d32.unflatten(out), n_q


def _problem(case: Any, steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {k: (rng.standard_normal(s) * case.param_scale).astype(F32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(F32) for k, s in SHAPES.items()}
             for _ in range(steps)]  # fmt: skip
    return params, grads


# ---------------------------------------------------------------------------- the quantizer


def _special_values(signed: bool) -> list[float]:
    m = dynamic_map(signed)
    mid32 = ((m[:-1] + m[1:]) * F32(0.5)).astype(F32)
    exact = ((m[:-1].astype(np.float64) + m[1:]) / 2).astype(F32)  # nearest float32
    near = np.concatenate([mid32, exact, np.nextafter(mid32, F32(np.inf)),
                           np.nextafter(mid32, F32(-np.inf))])  # fmt: skip
    return [float(x) for x in np.concatenate([m, -m, near, -near])]


EXTREMES = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -1.0]


def _arrays(signed: bool) -> st.SearchStrategy:
    specials = _special_values(signed)
    scaled = st.builds(lambda v, e: float(F32(v) * F32(2.0) ** e),
                       st.sampled_from(specials), st.integers(-140, 120))  # fmt: skip
    value = st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.floats(-1.0, 1.0, width=32),
        st.sampled_from(specials),
        scaled,
        st.sampled_from(EXTREMES),
    )
    return st.lists(value, min_size=1, max_size=2000).map(
        lambda xs: np.array(xs, dtype=np.float64).astype(F32)
    )


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_quantize_nearest_equals_library_quantize(signed, data):
    x = data.draw(_arrays(signed))
    if data.draw(st.booleans()):  # map values and midpoints under a power-of-two absmax
        unit = [v for v in _special_values(signed) if abs(v) <= 1.0]
        k = data.draw(st.integers(-30, 30))
        xs = data.draw(st.lists(st.sampled_from(unit), min_size=1, max_size=600))
        x = (np.array([1.0, *xs], F32) * F32(2.0) ** k).astype(F32)
    if data.draw(st.booleans()):  # a block of zeros / a block of exact map values x 2**k
        k = data.draw(st.integers(-20, 20))
        x[: min(x.size, BLOCK)] = 0.0 if data.draw(st.booleans()) else (
            np.resize(dynamic_map(signed), min(x.size, BLOCK)) * F32(2.0) ** k)  # fmt: skip
    codes, absmax = quantize_nearest(x, signed)
    want_codes, want_absmax = quantize(x, signed)
    assert codes.dtype == np.uint8 and codes.shape == (x.size,)
    assert absmax.dtype == F32 and absmax.shape == (-(-x.size // BLOCK),)
    assert np.array_equal(_bits(absmax), _bits(want_absmax))
    bad = np.flatnonzero(codes != want_codes)
    assert bad.size == 0, (bad[:5], x[bad[:5]], codes[bad[:5]], want_codes[bad[:5]])
    with np.errstate(invalid="ignore", over="ignore"):
        back, want = dequantize_nearest(codes, absmax, signed), dequantize(codes, absmax, signed)
    assert np.array_equal(_bits(back), _bits(want))


def test_quantize_nearest_edge_cases():
    m = dynamic_map(True)
    # exact map values (absmax 1) and the float32 midpoints (a tie takes the lower code)
    codes, absmax = quantize_nearest(np.concatenate([m, [F32(1.0)]]), True)
    assert absmax[0] == 1.0 and np.array_equal(codes[:256], np.arange(256))
    mids = ((m[:-1] + m[1:]) * F32(0.5)).astype(F32)
    x = np.concatenate([[F32(1.0)], mids]).astype(F32)
    codes, _ = quantize_nearest(x, True)
    low = np.arange(255)
    # (the sign fix moves a positive value off a negative code and vice versa)
    low = np.where((mids > 0) & np.signbit(m[low]), low + 1, low)
    low = np.where((mids < 0) & ~np.signbit(m[low]), low - 1, low)
    assert np.array_equal(codes[1:], low)
    # zeros, NaN-only and zero blocks take the zero code; NaN is ignored by absmax
    for signed, zero in ((True, 127), (False, 0)):
        c, a = quantize_nearest(np.array([0.0, -0.0, np.nan], F32), signed)
        assert a[0] == 0 and np.all(c == zero)
        c, a = quantize_nearest(np.array([2.0, np.nan, -0.0], F32), signed)
        assert a[0] == 2.0 and c[1] == 0
    # sign fix: a tiny value in a block with a large one keeps its sign (0.0 counts as
    # positive: +tiny -> code 127; -tiny rounds to 0.0 and moves down to code 126); -0.0 and
    # 0.0 stay on 127
    c, _ = quantize_nearest(np.array([1.0, 1e-30, -1e-30, 0.0, -0.0], F32), True)
    assert list(c[1:]) == [127, 126, 127, 127]
    c, _ = quantize_nearest(np.array([1.0, -1e-6, 1e-6], F32), True)
    assert m[c[1]] < 0 < m[c[2]]


# ---------------------------------------------------------------------------- the rows


@pytest.mark.parametrize("case", [p for c in ELEMENTWISE for p in _row_params(c)])
def test_8bit_state_is_float32_state_requantized(cl_queue, case):
    steps = STEPS_LONG if case.id in LONG else STEPS_SHORT
    host_params, grads = _problem(case, steps)
    tx = case.make(no)
    tx8 = no.low_precision_state(tx, state_bits=8, min_8bit_size=MIN_SIZE)
    params = no.to_device(host_params, cl_queue)
    state8 = tx8.init(params)
    state32 = tx.init(params)
    state32, n_q = _sync(state8, state32, cl_queue, "init")
    if _has_slots(case):
        assert n_q > 0 and n_q % 2 == 0  # two leaves of >= MIN_SIZE per slot
        leaves = optree.tree_leaves(state8, is_leaf=_is_q, none_is_leaf=True)
        for q in filter(_is_q, leaves):
            assert q.codes.dtype == np.uint8 and q.absmax.dtype == F32
    for k, g in enumerate(grads):
        g = no.to_device(g, cl_queue)
        u8, state8 = tx8.update(g, state8, params)
        u32, state32 = tx.update(g, state32, params)
        _assert_same(u8, u32, f"{case.id}: updates at step {k}")
        state32, _ = _sync(state8, state32, cl_queue, f"{case.id}: state after step {k}")
        params = no.apply_updates(params, u32)


@pytest.mark.parametrize("case", PER_LEAF_STATEFUL, ids=[c.id for c in PER_LEAF_STATEFUL])
def test_per_leaf_rules_refuse_8bit_state(cl_queue, case):
    host_params, grads = _problem(case, 1)
    tx8 = no.low_precision_state(case.make(no), state_bits=8, min_8bit_size=MIN_SIZE)
    params = no.to_device(host_params, cl_queue)
    with pytest.raises(ValueError, match="8-bit state"):
        state = tx8.init(params)
        no.step(tx8, params, no.to_device(grads[0], cl_queue), state)
    for k, x in params.items():
        assert np.array_equal(x.get(), host_params[k])


@pytest.mark.parametrize("case", PER_LEAF_STATELESS, ids=[c.id for c in PER_LEAF_STATELESS])
def test_stateless_per_leaf_rules_run_as_they_are(cl_queue, case):
    """A rule without state has nothing to quantize: it runs as it is, bit for bit."""
    host_params, grads = _problem(case, 1)
    tx = case.make(no)
    tx8 = no.low_precision_state(tx, state_bits=8, min_8bit_size=MIN_SIZE)
    params = no.to_device(host_params, cl_queue)
    g = no.to_device(grads[0], cl_queue)
    a, _ = no.step(tx8, params, g, tx8.init(params))
    b, _ = no.step(tx, params, g, tx.init(params))
    for x, y in zip(optree.tree_leaves(no.to_host(a)), optree.tree_leaves(no.to_host(b)),
                    strict=True):  # fmt: skip
        assert np.array_equal(_bits(x), _bits(y))


# ---------------------------------------------------------------------------- packed trees


@pytest.mark.parametrize("name", ["adamw", "lion", "rmsprop"])
def test_packed_equals_unpacked_one_launch(cl_queue, name):
    case = next(c for c in CASES if c.id == name)
    host_params, grads = _problem(case, 5, seed=3)
    tx8 = no.low_precision_state(case.make(no), state_bits=8, min_8bit_size=MIN_SIZE)
    packed = no.pack(no.to_device(host_params, cl_queue))
    loose = no.to_device(host_params, cl_queue)
    s_packed, s_loose = tx8.init(packed), tx8.init(loose)
    for g in grads:
        with no.count_launches() as c:
            packed, s_packed = no.step(tx8, packed, no.pack(no.to_device(g, cl_queue)), s_packed)
        assert c.launches == 1
        loose, s_loose = no.step(tx8, loose, no.to_device(g, cl_queue), s_loose)
        _assert_same(packed, loose, f"{name}: params")
        la = optree.tree_leaves(s_packed, is_leaf=_is_q, none_is_leaf=True)
        lb = optree.tree_leaves(s_loose, is_leaf=_is_q, none_is_leaf=True)
        assert sum(map(_is_q, la)) == (4 if name == "adamw" else 2)
        for x, y in zip(la, lb, strict=True):
            if _is_q(x):
                assert _is_q(y) and x.signed == y.signed
                assert np.array_equal(x.codes.get(), y.codes.get())
                assert np.array_equal(_bits(x.absmax.get()), _bits(y.absmax.get()))
            else:
                _assert_same(x, y, f"{name}: state")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [4, "8", True, 16, None])
def test_state_bits_invalid(bad):
    with pytest.raises((ValueError, TypeError), match="state_bits"):
        no.low_precision_state(no.adam(1e-3), state_bits=bad)


def test_state_bits_with_state_dtype():
    with pytest.raises(ValueError, match="state_bits"):
        no.low_precision_state(no.adam(1e-3), "bfloat16", state_bits=8)


def test_float64_params_refused(cl_queue):
    tx8 = no.low_precision_state(no.adam(1e-3), state_bits=8, min_8bit_size=16)
    p64 = no.to_device({"w": np.ones(300)}, cl_queue)
    with pytest.raises((ValueError, TypeError), match="float64"):
        state = tx8.init(p64)
        tx8.update(no.to_device({"w": np.ones(300)}, cl_queue), state, p64)


def test_wrong_absmax_names_the_leaf(cl_queue):
    host_params, grads = _problem(next(c for c in CASES if c.id == "adam"), 1)
    tx8 = no.low_precision_state(no.adam(1e-2), state_bits=8, min_8bit_size=MIN_SIZE)
    params = no.to_device(host_params, cl_queue)
    state = tx8.init(params)
    adam = next(s for s in state if hasattr(s, "mu"))
    good = adam.mu["v"]
    bad = QuantizedState(good.codes, cla.zeros(cl_queue, (3,), F32), good.signed)
    state = type(state)([s._replace(mu={**s.mu, "v": bad}) if s is adam else s for s in state])
    leaf = sorted(host_params).index("v")  # (optree orders dict keys)
    with pytest.raises(ValueError, match=rf"leaf {leaf} of .*mu.*absmax"):
        no.step(tx8, params, no.to_device(grads[0], cl_queue), state)
    for k, x in params.items():
        assert np.array_equal(x.get(), host_params[k])


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_bucket_lookup_is_the_nearest_code(signed):
    """The kernels' one-lookup rule (a bucket word per |v| exponent and 8 mantissa bits,
    a midpoint's low bits inside it) equals the binary search everywhere: at every map value,
    midpoint and bucket edge (checked when the words are built) and at random values of
    every magnitude."""
    from netcl_optim.fusion._qmaps import bucket_words, bucketed_codes, nearest_codes

    words = bucket_words(signed)
    rng = np.random.default_rng(7)
    v = (rng.uniform(-1, 1, 400_000) * 10.0 ** rng.uniform(-9, 0.3, 400_000)).astype(np.float32)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    v = np.concatenate([v, bits, np.float32([0, -0.0, 1, -1, 2, -2, np.inf, -np.inf, np.nan])])
    np.testing.assert_array_equal(bucketed_codes(v, words), nearest_codes(v, signed))
