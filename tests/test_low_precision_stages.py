"""Low-precision params and state for the rules with kernels of their own (Adafactor, SM3).

As for the element-wise rules (``test_low_precision.py``): a step with bfloat16 (float16)
state is, bit for bit, the float32 step with its state rounded to nearest even after every
step, and a step over bfloat16 params and grads is the float32 step on their exact values,
its results rounded once. Rows whose stage hands its updates to a later kernel store them in
the params' dtype between the two (as float16 params do, and the fused rules that
materialize): there the params are within that rounding, and the stage alone is bit for bit.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import optree
import pyopencl.array as cla
import pytest
import test_low_precision as lp
from cases import CASES
from optimizer_table import BY_ID
from test_functional import F16, F32, assert_bitwise_equal, snapshot

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim._base import StagePlan
from netcl_optim.fusion import walk
from netcl_optim.optimizers.sm3 import ScaleBySM3State

BF16 = np.dtype(ml_dtypes.bfloat16)
STAGE_CASES = [c for c in CASES if c.id in lp.STAGES]
# factored (both launches' layouts: the larger axis last, and first) and unfactored leaves
SHAPES = {"w": (33, 17), "b": (5,), "big": (130, 140), "tall": (3, 140, 130), "s": ()}
STAGE_STATES = (no.FactoredState, ScaleBySM3State)


def _stage(case: Any) -> no.GradientTransformation:
    """The row's transform with kernels of its own."""
    return next(t for t in walk(case.make(no)) if isinstance(t.plan, StagePlan))


def _as_stored(queue: Any, host_state: Any, like: Any) -> Any:
    """Host values (``host_state``) on the device, stored as ``like``'s arrays are."""
    return optree.tree_map(
        lambda d, r: no.to_device(r.astype(d.dtype), queue) if isinstance(d, cla.Array) else d,
        like, host_state, none_is_leaf=True)  # fmt: skip


def _stage_states(state: Any) -> list[Any]:
    """The stage's states inside a chain's state."""
    leaves = optree.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, STAGE_STATES), none_is_leaf=True
    )
    return [x for x in leaves if isinstance(x, STAGE_STATES)]


def _draw(rng: np.random.Generator, dtype: Any, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(dtype) for k, s in SHAPES.items()}


def _f32(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in tree.items()}


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c.id for c in STAGE_CASES])
def test_bfloat16_stage_is_float32_math_rounded_once(cl_queue, case):
    """The stage alone over bfloat16 grads with bfloat16 state: its updates and state are
    the float32 stage's on the same values, rounded once."""
    rng = np.random.default_rng(21)
    tx = _stage(case)
    low = no.low_precision_state(tx, "bfloat16")
    host = _draw(rng, BF16)
    p16 = no.pack(no.to_device(host, cl_queue))
    p32 = no.pack(no.to_device(_f32(host), cl_queue))
    s16, s32 = low.init(p16), tx.init(p32)
    assert {x.dtype for x in optree.tree_leaves(snapshot(s16)) if isinstance(x, np.ndarray)} == {
        BF16
    }
    s32 = _as_stored(cl_queue, lp._round_like(snapshot(s32), snapshot(s16), BF16), s32)
    for k in range(3):
        g = _draw(rng, BF16)
        u16, s16 = low.update(no.to_device(g, cl_queue), s16, p16)
        u32, s32 = tx.update(no.to_device(_f32(g), cl_queue), s32, p32)
        rounded = {n: v.astype(BF16) for n, v in no.to_host(u32).items()}
        assert_bitwise_equal(lp._nan(no.to_host(u16)), lp._nan(rounded), f"updates at step {k}")
        rounded_state = lp._round_like(snapshot(s32), snapshot(s16), BF16)
        assert_bitwise_equal(lp._nan(lp._widen(snapshot(s16))), lp._nan(rounded_state),
                             f"state after step {k}")  # fmt: skip
        s32 = _as_stored(cl_queue, rounded_state, s32)


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c.id for c in STAGE_CASES])
def test_bfloat16_params_with_bfloat16_state(cl_queue, case):
    """The whole row over bfloat16 params with bfloat16 state: the stage's state is the
    float32 run's rounded once, bit for bit; the params are the float32 run's rounded, within
    the rounding of the updates the stage hands on in bfloat16 (as in
    ``test_bfloat16_params_are_float32_math_rounded_once`` for rules that materialize: two
    bfloat16 ulps plus 1/64 of the step)."""
    rng = np.random.default_rng(22)
    tx = case.make(no)
    low = no.low_precision_state(tx, "bfloat16")
    host = _draw(rng, BF16, case.param_scale)
    p16 = no.pack(no.to_device(host, cl_queue))
    p32 = no.pack(no.to_device(_f32(host), cl_queue))
    s16, s32 = low.init(p16), tx.init(p32)
    s32 = _as_stored(cl_queue, lp._round_like(snapshot(s32), snapshot(s16), BF16), s32)
    for k in range(3):
        g = _draw(rng, BF16, case.param_scale)
        before = no.to_host(p16)
        p16, s16 = no.step(low, p16, no.to_device(g, cl_queue), s16)
        p32, s32 = no.step(tx, p32, no.to_device(_f32(g), cl_queue), s32)
        rounded = {n: v.astype(BF16) for n, v in no.to_host(p32).items()}
        for n, v in no.to_host(p16).items():
            want = rounded[n].astype(np.float32)
            ulp = np.abs(np.spacing(rounded[n])).astype(np.float32)
            moved = np.abs(want - before[n].astype(np.float32))
            assert np.all(np.abs(v.astype(np.float32) - want) <= 2 * ulp + moved / 64), (n, k)
        rounded_state = lp._round_like(snapshot(s32), snapshot(s16), BF16)
        stage16, stage32 = _stage_states(snapshot(s16)), _stage_states(rounded_state)
        assert len(stage16) == 1
        assert_bitwise_equal(lp._nan(lp._widen(stage16)), lp._nan(stage32),
                             f"stage state after step {k}")  # fmt: skip
        # (each step from the same values)
        s16 = _as_stored(cl_queue, rounded_state, s16)
        p16 = no.pack(no.to_device(rounded, cl_queue))
        p32 = no.pack(no.to_device(_f32(rounded), cl_queue))
        s32 = _as_stored(cl_queue, rounded_state, s32)


# float32 params with bfloat16 state, float32 and float16 params with float16 state
ROUNDED = [
    pytest.param(c, name, dtypes, id=f"{c.id}-{name}-{'mixed' if len(dtypes) > 1 else 'f32'}")
    for c in STAGE_CASES
    for name, dtypes in (("bfloat16", (F32,)), ("float16", (F32, F16)))
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "dtypes"), ROUNDED)
def test_low_precision_state_is_float32_state_rounded(cl_queue, case, name, dtypes):
    """``test_low_precision.py``'s property, over these rows."""
    lp.test_low_precision_state_is_float32_state_rounded(
        cl_queue=cl_queue, case=case, name=name, dtypes=dtypes
    )


def _step(opt: Any, params: list[Any], grads: list[list[np.ndarray]], queue: Any) -> None:
    lp._run(opt, params, grads, queue)


def _params(queue: Any, dtype: Any, shapes: list[tuple[int, ...]]) -> list[Any]:
    rng = np.random.default_rng(0)
    return [S.Parameter(no.to_device(rng.standard_normal(s).astype(dtype), queue))
            for s in shapes]  # fmt: skip


STATEFUL = [
    pytest.param(row, name, dtype, id=f"{row}-{name}-{np.dtype(dtype).name}")
    for row in ("adafactor-torch", "sm3")
    for name, dtype in (("bfloat16", F32), ("float16", F32), ("bfloat16", BF16))
]


def _stateful_resumes(queue: Any, row_id: str, name: Any, dtype: Any, tmp_path: Any) -> None:
    """The class with ``state_dtype=name`` over ``dtype`` params: the functional chain with
    ``low_precision_state``, bit for bit, its state stored as asked; a state dict saved after
    three steps and loaded into a float32-declared optimizer continues bit for bit."""
    row = BY_ID[row_id]
    shapes = [(40, 30), (3, 20, 10), (30,), ()]
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(6)]
    params = _params(queue, dtype, shapes)
    opt = row.make_stateful(no, params, {**row.class_kwargs(), "state_dtype": name})
    tx = no.low_precision_state(row.make(no), name)
    fp = no.pack([p.data.copy() for p in params])
    fs = tx.init(fp)
    _step(opt, params, grads[:3], queue)
    for g in grads[:3]:
        fp, fs = no.step(tx, fp, no.to_device(g, queue), fs)
    for p, q in zip(params, fp, strict=True):
        assert np.array_equal(lp._bits16(p.data.get()), lp._bits16(q.get()))
    sd = opt.state_dict()
    assert sd["param_groups"][0].get("state_dtype") == name
    stored = lp.STORAGE.get(name, np.dtype(np.float32))
    for entry in sd["state"].values():
        for k, v in entry.items():
            if k != "step":
                assert v.dtype == stored, (k, v.dtype)
    no.save(tmp_path / "opt.npz", sd)
    params2 = _params(queue, dtype, shapes)
    for p, q in zip(params2, params, strict=True):
        p.data.set(q.data.get())
    opt2 = row.make_stateful(no, params2)
    opt2.load_state_dict(no.load(tmp_path / "opt.npz"))
    _step(opt, params, grads[3:], queue)
    _step(opt2, params2, grads[3:], queue)
    for g in grads[3:]:
        fp, fs = no.step(tx, fp, no.to_device(g, queue), fs)
    for p, q, f in zip(params, params2, fp, strict=True):
        assert np.array_equal(lp._bits16(p.data.get()), lp._bits16(q.data.get()))
        assert np.array_equal(lp._bits16(p.data.get()), lp._bits16(f.get()))


# the stateful layer stores a stage's state keys (row_var, col_var, variance, accumulator) in
# the group's state_dtype too (the per-leaf keys, NovoGrad's, keep float32)
@pytest.mark.parametrize(("row_id", "name", "dtype"), STATEFUL)
def test_stateful_state_dtype_equals_functional_and_resumes(cl_queue, row_id, name, dtype,
                                                             tmp_path):  # fmt: skip
    _stateful_resumes(cl_queue, row_id, name, dtype, tmp_path)


@pytest.mark.parametrize("row_id", ["adafactor-torch", "sm3"])
def test_stateful_bfloat16_params_equal_functional_and_resume(cl_queue, row_id, tmp_path):
    """bfloat16 params with float32 state (in-place steps)."""
    _stateful_resumes(cl_queue, row_id, None, BF16, tmp_path)


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c.id for c in STAGE_CASES])
def test_eight_bit_state_refused(cl_queue, case):
    """Their state is not element-wise: no 8-bit state (ValueError, at construction)."""
    with pytest.raises(ValueError, match="state_bits=8: scale_by_"):
        no.low_precision_state(case.make(no), state_bits=8)


def test_eight_bit_state_refused_by_the_factories_and_classes(cl_queue):
    with pytest.raises(ValueError, match="state_bits=8: scale_by_factored_rms"):
        no.adafactor(1e-2, state_bits=8)
    with pytest.raises(ValueError, match="state_bits=8: scale_by_sm3"):
        no.sm3(0.1, state_bits=8)
    params = [S.Parameter(no.to_device(np.ones(3, np.float32), cl_queue))]
    for cls in (no.Adafactor, no.SM3):
        with pytest.raises(ValueError, match="state_bits=8"):
            cls(params, state_bits=8)
    # an 8-bit rule set around their init some other way: refused at init, naming the slot
    from netcl_optim.fusion import EightBit, slot_storage

    p = no.to_device({"w": np.ones((4, 3), np.float32)}, cl_queue)
    for tx, slot in ((no.scale_by_factored_rms(), "v_row"), (no.scale_by_sm3(), "mu")):
        with slot_storage(lambda name: EightBit()), pytest.raises(ValueError, match=slot):
            tx.init(p)


def test_mixed_storage_of_one_field_refused(cl_queue):
    """A dtype group's state field stored two ways: ValueError naming the leaf."""
    p = no.to_device({"a": np.ones((4, 3), np.float32), "b": np.ones(5, np.float32)}, cl_queue)
    g = no.to_device({"a": np.ones((4, 3), np.float32), "b": np.ones(5, np.float32)}, cl_queue)
    tx = no.scale_by_factored_rms(min_dim_size_to_factor=1)
    state = no.low_precision_state(tx, "bfloat16").init(p)
    state = state._replace(v={**state.v, "b": no.to_device(np.ones(5, np.float32), cl_queue)})
    with pytest.raises(ValueError, match=r"state\.v: leaf .*'b'.*bfloat16"):
        tx.update(g, state, p)
    sm3 = no.scale_by_sm3()
    state = no.low_precision_state(sm3, "bfloat16").init(p)
    state = state._replace(nu={**state.nu, "b": no.to_device(np.ones(5, np.float32), cl_queue)})
    with pytest.raises(TypeError, match=r"state\.nu has dtype float32, expected bfloat16"):
        sm3.update(g, state, p)
