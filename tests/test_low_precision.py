"""Low-precision optimizer state: every element-wise rule with bfloat16 or float16 state.

A rule's step with its state stored as bfloat16 (float16) is, bit for bit, the same rule with
float32 state rounded to bfloat16 (float16, round to nearest even) after every step: the
kernel loads the stored value exactly, does the float32 math and rounds once on store. That
holds for every row of the functional table (the float32 path being checked against its
float64 reference elsewhere), and the stateful classes (``state_dtype=``) equal the
functional chains, resume from their state dicts and checkpoints bit for bit.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import optree
import pyopencl.array as cla
import pytest
from cases import CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_table import BY_ID
from test_functional import F16, F32, assert_bitwise_equal, problems, snapshot

import netcl_optim as no
from netcl_optim import stateful as S

BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGE = {"bfloat16": BF16, "float16": np.dtype(np.float16)}
STAGES = {"adafactor", "adafactor-factored-momentum", "adafactor-torch",
          "adafactor-torch-custom", "sm3", "sm3-momentum"}  # fmt: skip
# Newton-Schulz between two kernels: its updates are rounded to the params' dtype there
NS_STAGES = {"muon"}
ELEMENTWISE = [c for c in CASES if c.id not in STAGES | NS_STAGES]
FEW = settings(max_examples=max(4, settings.default.max_examples // 4), deadline=None)


def _round_like(state: Any, low: Any, dtype: np.dtype) -> Any:
    """``state`` (host, float32 slots) with each leaf that ``low`` stores as ``dtype``
    rounded to ``dtype`` (nearest even) and widened back: what the low-precision run keeps."""

    def rnd(x: Any, y: Any) -> Any:
        if isinstance(y, np.ndarray) and y.dtype == dtype:
            with np.errstate(over="ignore"):  # (float16 state overflows to inf: so does ours)
                return x.astype(dtype).astype(x.dtype)
        return x

    return optree.tree_map(rnd, state, low, none_is_leaf=True)


def _widen(state: Any) -> Any:
    return optree.tree_map(
        lambda x: x.astype(np.float32) if isinstance(x, np.ndarray) and x.dtype in
        (BF16, np.dtype(np.float16)) else x, state, none_is_leaf=True)  # fmt: skip


def _nan(tree: Any) -> Any:
    def canonical(x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            return np.where(np.isnan(x), x.dtype.type(np.nan), x)
        return x

    return optree.tree_map(canonical, tree, none_is_leaf=True)


# every row in bfloat16 over float32 params; float16 state and float16 params (other loads
# and stores of the same kernels) over a few rows: each new kernel is a compile in a cold CI
FEW_ROWS = {"adam", "adamw", "sgd-momentum", "rmsprop-centered-momentum", "lion", "adagrad",
            "scale_by_adam-custom", "cocob", "trace-nesterov"}  # fmt: skip
# (every row runs bfloat16 state with bfloat16 params below, one kernel per row)
ROUNDED = [
    pytest.param(c, name, dtypes, id=f"{c.id}-{name}-{'mixed' if len(dtypes) > 1 else 'f32'}")
    for c in ELEMENTWISE if c.id in FEW_ROWS
    for name, dtypes in (("bfloat16", (F32,)), ("bfloat16", (F32, F16)), ("float16", (F32, F16)))
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "dtypes"), ROUNDED)
@FEW
@given(data=st.data())
def test_low_precision_state_is_float32_state_rounded(cl_queue, case, name, dtypes, data):
    prob = data.draw(problems(dtypes=dtypes, steps=(2, 4)), label="problem")
    dtype = STORAGE[name]
    tx = case.make(no)
    low_tx = no.low_precision_state(tx, name)
    params = no.to_device(prob.params, cl_queue)
    low_state = low_tx.init(params)
    state = tx.init(params)
    host_low = snapshot(low_state)
    slots = [x for x in optree.tree_leaves(host_low) if isinstance(x, np.ndarray)]
    if case.make(no).plan is not None and any(x.dtype == dtype for x in slots):
        assert all(x.dtype in (dtype, np.float32, np.int32, np.int64) for x in slots)

    def rounded_state(state: Any, host_low: Any) -> Any:
        rounded = _round_like(snapshot(state), host_low, dtype)
        # (a NaN's payload may differ between the two conversions: any NaN matches any)
        assert_bitwise_equal(_nan(_widen(host_low)), _nan(rounded), f"state after step {k}")
        return optree.tree_map(  # the float32 run goes on from the rounded state
            lambda d, r: no.to_device(r, cl_queue) if isinstance(d, cla.Array) else d,
            state, rounded, none_is_leaf=True)  # fmt: skip

    k = -1
    state = rounded_state(state, host_low)  # (slot_init values, as stored)
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, cl_queue)
        u_low, low_state = low_tx.update(grads, low_state, params)
        u, state = tx.update(grads, state, params)
        assert_bitwise_equal(_nan(snapshot(u_low)), _nan(snapshot(u)), f"updates at step {k}")
        state = rounded_state(state, snapshot(low_state))
        params = no.apply_updates(params, u)


def _run(opt, params, steps, queue):
    """Stateful steps: each of ``steps`` (a grad per param) set as the grads, then a step."""
    for g in steps:
        for p, x in zip(params, g, strict=True):
            p.grad = no.to_device(x, queue)
        opt.step()


def _bits16(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _stateful_resumes(queue, tmp_path, fresh, make, make_plain, tx, grads, split):
    """``make(fresh())``, stepped through ``grads[:split]``, equals the functional ``tx``
    stepped alike (bit for bit); its state dict, saved and loaded by ``make_plain`` (storage
    left to the loaded groups), continues bit for bit through the rest. Returns the state
    dict after ``split`` steps."""
    params = fresh()
    opt = make(params)
    fp = no.pack([p.data.copy() for p in params])
    fs = tx.init(fp)
    _run(opt, params, grads[:split], queue)
    for g in grads[:split]:
        fp, fs = no.step(tx, fp, no.to_device(g, queue), fs)
    for p, q in zip(params, fp, strict=True):
        assert np.array_equal(_bits16(p.data.get()), _bits16(q.get()))
    sd = opt.state_dict()
    no.save(tmp_path / "opt.npz", sd)
    params2 = fresh()
    for p, q in zip(params2, params, strict=True):
        p.data.set(q.data.get())
    opt2 = make_plain(params2)
    opt2.load_state_dict(no.load(tmp_path / "opt.npz"))
    _run(opt, params, grads[split:], queue)
    _run(opt2, params2, grads[split:], queue)
    for p, q in zip(params, params2, strict=True):
        assert np.array_equal(_bits16(p.data.get()), _bits16(q.data.get()))
    opt.zero_grad(set_to_none=False)
    with no.count_launches() as c:  # packed params and grads: one kernel per group
        opt.step()
    assert len(set(c.kernels)) == 1 and c.launches <= 2  # (a size off 32 splits in two)
    return sd


def test_state_dtype_errors(cl_queue):
    tx = no.adam(1e-3)
    for bad in ("int8", "float64", np.int32, "bf16", 3):
        with pytest.raises(ValueError, match="Invalid state_dtype"):
            no.low_precision_state(tx, bad)
    p64 = no.to_device({"w": np.ones(4), "v": np.ones(3, np.float32)}, cl_queue)
    adam = next(s for s in no.low_precision_state(tx, "bfloat16").init(p64) if hasattr(s, "mu"))
    assert adam.mu["w"].dtype == np.float64 and adam.mu["v"].dtype == BF16  # (float64 math)
    assert no.low_precision_state(tx, None) is tx
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        S.Adam([S.Parameter(no.to_device(np.ones(3, np.float32), cl_queue))], state_dtype="x")
    with pytest.raises(ValueError, match="state_bits=8: scale_by_factored_rms"):
        no.Adafactor([S.Parameter(no.to_device(np.ones(3, np.float32), cl_queue))],
                     state_bits=8)  # fmt: skip


def test_mu_only(cl_queue):
    tx = no.low_precision_state(no.adam(1e-2), "bfloat16", slots=("mu",))
    state = tx.init(no.to_device({"w": np.ones((3, 5), np.float32)}, cl_queue))
    adam = next(s for s in state if hasattr(s, "mu"))
    assert adam.mu["w"].dtype == BF16 and adam.nu["w"].dtype == np.float32


SHAPES = [(40, 30), (30,), (7,), ()]
ROWS = ["adam", "adamw", "sgd-momentum", "rmsprop", "lion", "adagrad"]


def _params(queue, seed=0):
    rng = np.random.default_rng(seed)
    return [S.Parameter(no.to_device(rng.standard_normal(s).astype(np.float32), queue))
            for s in SHAPES]  # fmt: skip


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("row_id", [r for r in ROWS if r in BY_ID])
def test_stateful_state_dtype_equals_functional_and_resumes(cl_queue, row_id, name, tmp_path):
    row = BY_ID[row_id]
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    made = []

    def make(params):
        made.append(row.make_stateful(no, params, {**row.class_kwargs(), "state_dtype": name}))
        return made[-1]

    # resume: state_dict into a fresh float32-declared optimizer, and a checkpoint file
    sd = _stateful_resumes(cl_queue, tmp_path, lambda: _params(cl_queue), make,
                           lambda ps: row.make_stateful(no, ps),
                           no.low_precision_state(row.make(no), name), grads, 3)  # fmt: skip
    assert made[0].param_groups[0]["state_dtype"] == sd["param_groups"][0]["state_dtype"] == name
    for entry in sd["state"].values():
        for k, v in entry.items():
            if k != "step":
                assert v.dtype == STORAGE[name], (k, v.dtype)
    # a float32 state dict loads into a bfloat16 optimizer: rounded once
    opt32 = row.make_stateful(no, _params(cl_queue))
    _run(opt32, opt32.param_groups[0]["params"], grads[:2], cl_queue)
    opt3 = row.make_stateful(no, _params(cl_queue), {**row.class_kwargs(), "state_dtype": name})
    # a dict without storage keys (torch's, or ours at the default): the optimizer keeps its
    # own storage, the loaded state cast into it
    opt3.load_state_dict(opt32.state_dict())
    assert opt3.param_groups[0]["state_dtype"] == name
    for k, v in opt3.state_dict()["state"][0].items():
        if k != "step":
            assert v.dtype == STORAGE[name]
            want = opt32.state_dict()["state"][0][k]
            with np.errstate(over="ignore"):
                assert np.array_equal(v, want.astype(STORAGE[name]))


@pytest.mark.parametrize("storage", [{"state_bits": 8}, {"state_dtype": "bfloat16"}])
def test_skipped_steps_leave_low_precision_state_unchanged(cl_queue, storage):
    rng = np.random.default_rng(2)
    host = {"w": rng.standard_normal(5000).astype(np.float32), "b": np.ones(10, np.float32)}
    tx = no.apply_if_finite(no.low_precision_state(no.adamw(1e-2), **storage), 3)
    params = no.pack(no.to_device(host, cl_queue))
    state = tx.init(params)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
    params, state = no.step(tx, params, no.to_device(grads, cl_queue), state)
    before = snapshot((params, state))
    grads["w"][3] = np.nan
    params2, state2 = no.step(tx, params, no.to_device(grads, cl_queue), state)
    after = snapshot((params2, state2))
    for x, y in zip(optree.tree_leaves(before), optree.tree_leaves(after), strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
    # AMPGradScaler: an inf grad skips the stateful step, codes and absmax included
    ps = [S.Parameter(no.to_device(v.copy(), cl_queue)) for v in host.values()]
    opt, scaler = no.AdamW(ps, lr=1e-2, **storage), no.AMPGradScaler(init_scale=4.0)
    for p, g in zip(ps, grads.values(), strict=True):
        p.grad = no.to_device(np.nan_to_num(g), cl_queue)
    scaler.step(opt)
    scaler.update()

    def host(v):
        return v.get() if isinstance(v, cla.Array) else np.asarray(v)

    kept = [(p.data.get(), {k: host(v) for k, v in opt.state[p].items()}) for p in ps]
    ps[0].grad = no.to_device(np.full(5000, np.inf, np.float32), cl_queue)
    scaler.step(opt)
    scaler.update()
    for p, (data, entry) in zip(ps, kept, strict=True):
        assert np.array_equal(p.data.get(), data)
        for k, v in entry.items():
            assert np.array_equal(host(opt.state[p][k]), v), k


def test_eight_bit_stateful_resumes_bit_for_bit(cl_queue, tmp_path):
    rng = np.random.default_rng(3)
    shapes = [(70, 100), (5003,), (100,)]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]

    def fresh():
        r = np.random.default_rng(0)
        return [S.Parameter(no.to_device(r.standard_normal(s).astype(np.float32), cl_queue))
                for s in shapes]  # fmt: skip

    sd = _stateful_resumes(
        cl_queue, tmp_path, fresh, lambda ps: no.Adam(ps, lr=1e-2, state_bits=8),
        lambda ps: no.Adam(ps, lr=1e-2),  # float32-declared: the saved groups say 8 bits
        no.low_precision_state(no.adam(1e-2), state_bits=8), grads, 3,
    )  # fmt: skip
    entry = sd["state"][0]
    assert entry["exp_avg"].dtype == np.uint8 and entry["exp_avg_absmax"].shape == (28,)
    assert entry["exp_avg_qmap"][127] == 0 and entry["exp_avg_sq_qmap"][0] == 0


@pytest.mark.parametrize("storage", [{"state_bits": 8}, {"state_dtype": "bfloat16"}])
def test_wrappers_keep_low_precision_state(cl_queue, storage):
    """inject_hyperparams (state_bits static), masked and a clipping chain: the same bits as
    the plain rule with the same storage."""
    rng = np.random.default_rng(5)
    host = {"w": rng.standard_normal(5000).astype(np.float32), "b": np.ones(10, np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
             for _ in range(3)]  # fmt: skip

    def run(tx):
        params = no.pack(no.to_device(host, cl_queue))
        state = tx.init(params)
        for g in grads:
            params, state = no.step(tx, params, no.to_device(g, cl_queue), state)
        return no.to_host(params), state

    want, _ = run(no.low_precision_state(no.adam(0.01), **storage))
    injected, state = run(no.inject_hyperparams(no.adam)(learning_rate=0.01, **storage))
    assert set(state.hyperparams) == {"learning_rate"}  # (state_bits stays static)
    outside, _ = run(no.low_precision_state(no.inject_hyperparams(no.adam)(learning_rate=0.01),
                                            **storage))  # fmt: skip
    for got in (injected, outside):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    masked, state = run(no.masked(no.low_precision_state(no.adam(0.01), **storage),
                                  {"w": True, "b": False}))  # fmt: skip
    assert np.array_equal(masked["w"], want["w"])  # ("b": optax's masked passes its grads on)
    clipped, _ = run(no.low_precision_state(no.chain(no.clip_by_global_norm(1e9), no.adam(0.01)),
                                            **storage))  # fmt: skip
    assert all(np.array_equal(clipped[k], want[k]) for k in want)


def _per_segment(case: Any) -> bool:
    from netcl_optim.fusion import walk

    return any(getattr(t.plan, "segment_reduction", None) is not None for t in walk(case.make(no)))


def _materializes(case: Any) -> bool:
    """Whether the step runs as two kernels or more (a reduction after the first part): the
    updates between them are stored in the params' dtype, as for float16."""
    from netcl_optim.fusion import walk

    frags = [t.plan for t in walk(case.make(no)) if isinstance(t.plan, no.Fragment)]
    return any(f.reduces for f in frags[1:])


BF16_PARAMS = ELEMENTWISE  # (whole-tree norms and values per leaf or row included)


@pytest.mark.parametrize("case", BF16_PARAMS, ids=[c.id for c in BF16_PARAMS])
def test_bfloat16_params_are_float32_math_rounded_once(cl_queue, case):
    """bfloat16 params and grads, and bfloat16 state: a step is the float32 step on their
    exact float32 values, the new params and state rounded to nearest even once (one
    kernel per row: the float32 rows' kernels are the other tests' too)."""
    rng = np.random.default_rng(11)
    shapes = {"w": (33, 17), "b": (5,)}
    scale = case.param_scale

    def draw():
        return {k: (rng.standard_normal(s) * scale).astype(BF16) for k, s in shapes.items()}

    def as_stored(host_state: Any, like: Any) -> Any:  # host values into ``like``'s storage
        return optree.tree_map(
            lambda d, r: no.to_device(r.astype(d.dtype), cl_queue)
            if isinstance(d, cla.Array) else d, like, host_state, none_is_leaf=True)  # fmt: skip

    tx = case.make(no)
    low = no.low_precision_state(tx, "bfloat16")
    host = draw()
    p16 = no.pack(no.to_device(host, cl_queue))
    p32 = no.pack(no.to_device({k: v.astype(np.float32) for k, v in host.items()}, cl_queue))
    s16, s32 = low.init(p16), tx.init(p32)
    rounded_state = _round_like(snapshot(s32), snapshot(s16), BF16)  # (the start values)
    s32 = as_stored(rounded_state, s32)
    for k in range(3):
        g = draw()
        before = no.to_host(p16)
        p16, s16 = no.step(low, p16, no.to_device(g, cl_queue), s16)
        g32 = {n: v.astype(np.float32) for n, v in g.items()}
        p32, s32 = no.step(tx, p32, no.to_device(g32, cl_queue), s32)
        rounded = {n: v.astype(BF16) for n, v in no.to_host(p32).items()}
        rounded_state = _round_like(snapshot(s32), snapshot(s16), BF16)
        if _materializes(case):  # the updates between its kernels stored in bfloat16
            for n, v in no.to_host(p16).items():
                want = rounded[n].astype(np.float32)
                ulp = np.abs(np.spacing(rounded[n])).astype(np.float32)  # (bfloat16's)
                moved = np.abs(want - before[n].astype(np.float32))
                assert np.all(np.abs(v.astype(np.float32) - want) <= 2 * ulp + moved / 64), n
            s16 = as_stored(rounded_state, s16)  # (compare each step from the same state)
            p16 = no.pack(no.to_device(rounded, cl_queue))
        else:
            assert_bitwise_equal(_nan(no.to_host(p16)), _nan(rounded), f"params after step {k}")
            assert_bitwise_equal(_nan(_widen(snapshot(s16))), _nan(rounded_state),
                                 f"state after step {k}")  # fmt: skip
        p32 = no.pack(no.to_device({n: v.astype(np.float32) for n, v in rounded.items()},
                                   cl_queue))  # fmt: skip
        s32 = as_stored(rounded_state, s32)


@pytest.mark.parametrize("storage", [{}, {"state_bits": 8}, {"state_dtype": "bfloat16"}])
def test_bfloat16_params_stateful_equals_functional_and_resumes(cl_queue, storage, tmp_path):
    rng = np.random.default_rng(12)
    shapes = [(70, 100), (100,)]
    grads = [[rng.standard_normal(s).astype(BF16) for s in shapes] for _ in range(4)]

    def fresh():
        r = np.random.default_rng(0)
        return [S.Parameter(no.to_device(r.standard_normal(s).astype(BF16), cl_queue))
                for s in shapes]  # fmt: skip

    tx = no.low_precision_state(no.adamw(1e-2), storage.get("state_dtype"),
                                state_bits=storage.get("state_bits", 32))  # fmt: skip
    _stateful_resumes(cl_queue, tmp_path, fresh, lambda ps: no.AdamW(ps, lr=1e-2, **storage),
                      lambda ps: no.AdamW(ps, lr=1e-2), tx, grads, 2)  # fmt: skip


def _stochastic_reference(p, u, seed, t, first_index):
    """The params' stochastic rounding, from the tests' Philox: (p + u) in float32, its low
    16 bits plus the element's 16 random bits (word 0 of Philox-4x32-10 at counter (index,
    t, 0x53520000) under the seed's two halves), truncated to bfloat16."""
    import reference as ref

    x = (p.astype(np.float32) + u.astype(np.float32)).astype(np.float32)
    idx = np.arange(x.size, dtype=np.uint64) + np.uint64(first_index)
    words = ref.philox4x32_10(
        [idx & 0xFFFFFFFF, idx >> np.uint64(32), np.uint64(t), np.uint64(0x53520000)],
        [seed & 0xFFFFFFFF, seed >> 32],
    )
    bits = x.reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = ((bits + (words[0] & 0xFFFF)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    rounded = np.where(np.isnan(x.reshape(-1)), x.reshape(-1), rounded)
    return rounded.astype(BF16).reshape(x.shape)


def test_stochastic_rounding_matches_its_reference_and_is_unbiased(cl_queue, tmp_path):
    rng = np.random.default_rng(13)
    host = {"w": rng.standard_normal((70, 100)).astype(BF16), "b": np.ones(100, BF16)}
    seed = 2**40 + 7
    tx = no.chain(no.sgd(1e-3), no.stochastic_rounding(seed))
    params = no.pack(no.to_device(host, cl_queue))
    state = tx.init(params)
    want = {k: v.copy() for k, v in host.items()}
    for t in range(1, 4):
        g = {k: rng.standard_normal(v.shape).astype(BF16) for k, v in host.items()}
        params, state = no.step(tx, params, no.to_device(g, cl_queue), state)
        # sgd: u = -lr * g; the leaves' element indices run through the tree in order ("b"
        # before "w": optree sorts dict keys)
        first = {"b": 0, "w": 100}
        for k in want:
            u = (np.float32(-1e-3) * g[k].astype(np.float32)).astype(np.float32)
            want[k] = _stochastic_reference(want[k], u, seed, t, first[k])
        got = no.to_host(params)
        for k in want:
            assert np.array_equal(got[k].view(np.uint16), want[k].view(np.uint16)), (k, t)
    # unbiased: a step of a quarter of the gap below 1 (2^-8) lands a quarter of the elements
    # on the value below
    ones = no.pack(no.to_device({"w": np.ones(100_000, BF16)}, cl_queue))
    tiny = no.to_device({"w": np.full(100_000, 2.0**-10, BF16)}, cl_queue)
    tx1 = no.chain(no.sgd(1.0), no.stochastic_rounding(5))
    out, _ = no.step(tx1, ones, tiny, tx1.init(ones))
    down = float((no.to_host(out)["w"].astype(np.float32) < 1).mean())
    assert abs(down - 0.25) < 0.01, down
    # round to nearest even drops it
    plain, _ = no.step(no.sgd(1.0), ones, tiny, no.sgd(1.0).init(ones))
    assert np.all(no.to_host(plain)["w"] == 1)
    # a resumed run (its count in the state) continues bit for bit; float32 params: no-op
    no.save(tmp_path / "sr.npz", {"params": params, "state": state})
    back = no.load(tmp_path / "sr.npz")
    g = no.to_device({k: np.ones(v.shape, BF16) for k, v in host.items()}, cl_queue)
    a, _ = no.step(tx, params, g, state)
    b, _ = no.step(tx, back["params"], g, back["state"])
    for k in host:
        assert np.array_equal(a[k].get().view(np.uint16), b[k].get().view(np.uint16))
    p32 = no.to_device({"w": np.ones(5, np.float32)}, cl_queue)
    g32 = no.to_device({"w": np.full(5, 0.5, np.float32)}, cl_queue)
    r1, _ = no.step(tx1, p32, g32, tx1.init(p32))
    r2, _ = no.step(no.sgd(1.0), p32, g32, no.sgd(1.0).init(p32))
    assert np.array_equal(r1["w"].get(), r2["w"].get())


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_stochastic_rounding_stateful_equals_functional_and_resumes(cl_queue, cls, tmp_path):
    rng = np.random.default_rng(14)
    shapes = [(70, 100), (100,)]
    grads = [[rng.standard_normal(s).astype(BF16) for s in shapes] for _ in range(6)]

    def fresh():
        return [S.Parameter(no.to_device(np.ones(s, BF16), cl_queue)) for s in shapes]

    sd = _stateful_resumes(
        cl_queue, tmp_path, fresh,
        lambda ps: getattr(no, cls)(ps, lr=1e-3, stochastic_rounding=True),
        lambda ps: getattr(no, cls)(ps, lr=1e-3),
        no.chain(getattr(no, cls.lower())(1e-3), no.stochastic_rounding()), grads, 3,
    )  # fmt: skip
    assert sd["state"][0]["step"] == 3.0  # (the generator's counter, also for SGD)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_norm_device", "clip_grad_value_"])
def test_clipping_functions_on_bfloat16_grads(cl_queue, fn):
    """The clipping functions scale or clamp bfloat16 grads in float32, rounding once: the
    float32 result on their exact values, rounded to nearest even."""
    rng = np.random.default_rng(15)
    grads = [(3 * rng.standard_normal(s)).astype(BF16) for s in [(70, 100), (100,), ()]]
    results = []
    for dtype in (BF16, np.float32):
        params = [S.Parameter(no.to_device(np.zeros(g.shape, dtype), cl_queue)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = no.to_device(g.astype(dtype), cl_queue)
        getattr(no, fn)(params, 0.5)
        results.append([p.grad.get() for p in params])
    for a, b in zip(*results, strict=True):
        assert a.dtype == BF16 and np.array_equal(a.view(np.uint16), b.astype(BF16).view(np.uint16))
