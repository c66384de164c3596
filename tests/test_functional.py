"""The functional API on the device, against the float64 references of tests/reference.py.

Every row of tests/cases.py (the transforms, and the optimizers of tests/optimizer_table.py)
runs on generated trees (dicts, lists, tuples, NamedTuples, ``None`` subtrees; sizes 0, 1, primes
and one ~10k leaf; float32, float64, float16 and mixed) over several steps, and must match its
reference; each optimizer also at hyperparameters drawn by its row's strategies. Other
properties: inputs are never written, ``step`` is ``update`` + ``apply_updates`` bit for bit, a
fused chain equals the same transforms run one at a time, packed trees give the numbers of
unpacked ones, states keep their structure and dtypes, global-norm clipping respects its bound,
and invalid arguments or mismatched trees raise errors that name the problem without touching
any input. torch.optim and optax cross-checks run when those packages import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
import reference as ref
from cases import CASE_IDS, CASES, ERRORS, TRANSFORMS
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from optimizer_table import HYPER, OPTAX, OPTIMIZERS, TORCH, Case, Optimizer, ids

no = pytest.importorskip("netcl_optim")
cla = pytest.importorskip("pyopencl.array")

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F32, F64, F16)
# Relative tolerance per storage dtype for one step (float64 reference, same storage rounding).
RTOL = {F16: 2e-3, F32: 1e-5, F64: 1e-12}
# Absolute floor: results below the smallest normal number may be flushed to zero on a device.
FLOOR = {F16: 1e-7, F32: 1e-37, F64: 1e-300}

FEW = settings(max_examples=max(5, settings.default.max_examples // 3))


def opaque(tx: Any) -> Any:
    """The same transform without its fragment: chain() cannot fuse it with its neighbours."""
    return no.GradientTransformation(tx.init, tx.update)


# ---------------------------------------------------------------------------------------------
# strategies: trees of arrays
# ---------------------------------------------------------------------------------------------


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclass(frozen=True)
class Slot:
    """A leaf placeholder in a drawn tree skeleton (a dataclass, so optree keeps it a leaf)."""

    shape: tuple[int, ...]


SHAPES = [(), (0,), (1,), (2,), (3,), (5,), (7,), (3, 5), (2, 0, 3), (13,), (4, 1, 3), (31,),
          (97,), (10007,)]  # fmt: skip
LEAF_SHAPES = st.builds(Slot, st.sampled_from(SHAPES))
KEYS = st.sampled_from(["w", "b", "emb", "ln", "z"])


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(KEYS, children, max_size=3),
        st.builds(Pair, children, children),
    )


SKELETONS = st.recursive(st.one_of(LEAF_SHAPES, LEAF_SHAPES, st.none()), _extend, max_leaves=6)


def _width(dtype: np.dtype) -> int:
    return 8 * dtype.itemsize


@st.composite
def arrays_of(draw, shape: tuple[int, ...], dtype: np.dtype, low: float = -1e3, high: float = 1e3):
    """Small arrays element by element from hypothesis; large ones from a drawn numpy seed."""
    size = math.prod(shape)
    if size <= 24:
        elements = st.floats(low, high, width=_width(dtype), allow_subnormal=False)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, high]))
    a = rng.uniform(-1.0, 1.0, shape) * magnitude
    a[rng.random(shape) < 0.05] = 0.0
    return np.clip(a, low, high).astype(dtype)


@dataclass
class Problem:
    params: Any  # host tree of numpy arrays
    grads: list[Any]  # one host tree per step
    dtypes: Any  # tree of the leaves' dtypes


def _has_leaves(tree: Any) -> bool:
    return len(optree.tree_leaves(tree)) > 0


@st.composite
def problems(draw, dtypes=DTYPES, steps=(1, 3), mixed: bool = True, skeletons=SKELETONS):
    skeleton = draw(skeletons.filter(_has_leaves))
    slots, treedef = optree.tree_flatten(skeleton)
    if mixed and len(dtypes) > 1 and draw(st.booleans()):
        leaf_dtypes = [np.dtype(draw(st.sampled_from(dtypes))) for _ in slots]
    else:
        leaf_dtypes = [np.dtype(draw(st.sampled_from(dtypes)))] * len(slots)
    n_steps = draw(st.integers(*steps))
    params = [draw(arrays_of(s.shape, d)) for s, d in zip(slots, leaf_dtypes, strict=True)]
    grads = [
        treedef.unflatten(
            [draw(arrays_of(s.shape, d)) for s, d in zip(slots, leaf_dtypes, strict=True)]
        )
        for _ in range(n_steps)
    ]
    return Problem(treedef.unflatten(params), grads, treedef.unflatten(leaf_dtypes))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a) if a.ndim else np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def snapshot(tree: Any) -> Any:
    """A host copy of a tree of device arrays (other leaves as they are)."""
    return optree.tree_map(
        lambda x: x.get().copy() if isinstance(x, cla.Array) else x, tree, none_is_leaf=True
    )


def assert_bitwise_equal(a: Any, b: Any, what: str) -> None:
    """Same structure, and every leaf identical: shape, dtype and bits (or == for numbers)."""
    la, da = optree.tree_flatten(a, none_is_leaf=True)
    lb, db = optree.tree_flatten(b, none_is_leaf=True)
    assert da == db, f"{what}: structure {da} != {db}"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), f"{what}: leaf {i}"
            assert x.shape == y.shape, f"{what}: leaf {i} shape {x.shape} != {y.shape}"
            assert x.dtype == y.dtype, f"{what}: leaf {i} dtype {x.dtype} != {y.dtype}"
            if not np.array_equal(_bits(x), _bits(y)):
                bad = np.flatnonzero(_bits(x).ravel() != _bits(y).ravel())
                j = bad[0]
                raise AssertionError(
                    f"{what}: leaf {i} differs at {bad.size} of {x.size} elements, "
                    f"first at flat index {j}: {x.ravel()[j]!r} != {y.ravel()[j]!r}"
                )
        else:
            assert type(x) is type(y) and x == y, f"{what}: leaf {i}: {x!r} != {y!r}"


def signature(state: Any) -> tuple:
    """Structure of a state plus, per leaf, (shape, dtype) for arrays or the type otherwise."""
    leaves, treedef = optree.tree_flatten(state, none_is_leaf=True)
    sig = []
    for x in leaves:
        if isinstance(x, cla.Array):
            sig.append(("array", tuple(x.shape), np.dtype(x.dtype)))
        else:
            sig.append((type(x).__name__,))
    return treedef, tuple(sig)


def _max_abs(tree: Any) -> float:
    """The largest finite magnitude in ``tree`` (a rule may give NaN where its reference
    does: optax's Prodigy on an all-zero first gradient)."""
    finite = [np.abs(x[np.isfinite(x)]) for x in ref.tree_leaves(tree) if x.size]
    return max((float(np.max(a)) for a in finite if a.size), default=0.0)


def assert_close(
    got: Any,
    want: Any,
    dtypes: Any,
    *,
    scale: float,
    steps: int,
    what: str,
    uniform_rtol: float | None = None,
) -> None:
    """``got`` (host tree) equals the float64 ``want`` within the storage dtype's tolerance.

    Per element: |got - want| <= steps * rtol * (|want| + scale) + floor, with ``scale`` the
    magnitude of the quantities of the step (cancellation leaves absolute, not relative, errors).
    """
    lg, dg = optree.tree_flatten(got)
    lw, dw = optree.tree_flatten(want)
    assert dg == dw, f"{what}: structure {dg} != {dw}"
    ld = optree.tree_leaves(dtypes)
    for i, (g, w, d) in enumerate(zip(lg, lw, ld, strict=True)):
        assert isinstance(g, np.ndarray), f"{what}: leaf {i} is a {type(g).__name__}"
        assert g.shape == w.shape, f"{what}: leaf {i} shape {g.shape} != {w.shape}"
        assert g.dtype == d, f"{what}: leaf {i} dtype {g.dtype} != {d}"
        rtol = uniform_rtol if uniform_rtol is not None else RTOL[d]
        err = np.abs(g.astype(np.float64) - w)
        tol = steps * rtol * (np.abs(w) + scale) + FLOOR[d]
        ok = (err <= tol) | (np.isnan(g) & np.isnan(w))  # (NaN where the reference is NaN)
        if not np.all(ok):
            j = int(np.argmax(np.where(ok, -np.inf, np.nan_to_num(err - tol, nan=np.inf))))
            raise AssertionError(
                f"{what}: leaf {i} ({d}, shape {g.shape}): {int(np.sum(~ok))} elements out "
                f"of tolerance; worst at flat index {j}: got {g.ravel()[j]!r}, want "
                f"{w.ravel()[j]!r} (tol {tol.ravel()[j]:.3g})"
            )


def _state_dtypes_ok(state: Any, param_dtypes: Any) -> None:
    """State arrays are float32 for float16/float32 params and float64 for float64 ones."""
    allowed = {no_compute(d) for d in optree.tree_leaves(param_dtypes)}
    for x in optree.tree_leaves(state):
        if isinstance(x, cla.Array):
            assert np.dtype(x.dtype) in allowed, f"state array dtype {x.dtype} not in {allowed}"


def no_compute(d: np.dtype) -> np.dtype:
    return F64 if d == F64 else F32


def _check_against_reference(
    tx: Any,
    rtx: Any,
    prob: Problem,
    queue: Any,
    *,
    coupled: bool = False,
    conditioning: float = 1.0,
    updates_scale_with_params: bool = False,
) -> None:
    """Run tx over prob's steps with update + apply_updates; compare every step with rtx
    (updates to the params' scale where they are a difference of params).

    Also: no call writes to its inputs, and the state keeps its structure, shapes and dtypes.
    """
    want_p, want_u, _ = ref.run_transform(rtx, prob.params, prob.grads, storage_dtype=prob.dtypes)
    uniform = max(RTOL[d] for d in optree.tree_leaves(prob.dtypes)) if coupled else None
    if conditioning != 1.0:
        base = uniform or max(RTOL[d] for d in optree.tree_leaves(prob.dtypes))
        uniform = base * conditioning
    params = no.to_device(prob.params, queue)
    before = snapshot(params)
    state = tx.init(params)
    assert_bitwise_equal(snapshot(params), before, "init wrote to params")
    sig0 = signature(state)
    _state_dtypes_ok(state, prob.dtypes)
    u_scale, p_scale = 0.0, _max_abs(ref.tree_f64(prob.params))
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, queue)
        before = snapshot((params, grads, state))
        updates, new_state = tx.update(grads, state, params)
        assert_bitwise_equal(
            snapshot((params, grads, state)), before, f"update {k} wrote to inputs"
        )
        assert signature(new_state) == sig0, f"state signature changed at step {k}"
        u_scale = max(u_scale, _max_abs(want_u[k]))
        assert_close(
            no.to_host(updates),
            want_u[k],
            prob.dtypes,
            scale=u_scale + (p_scale if updates_scale_with_params else 0.0),
            steps=1,
            what=f"updates at step {k}",
            uniform_rtol=uniform,
        )
        old_params, before = params, snapshot((params, updates))
        params = no.apply_updates(old_params, updates)
        assert_bitwise_equal(
            snapshot((old_params, updates)), before, "apply_updates wrote to inputs"
        )
        p_scale = max(p_scale, _max_abs(want_p[k]))
        assert_close(
            no.to_host(params),
            want_p[k],
            prob.dtypes,
            scale=p_scale + u_scale,
            steps=k + 1,
            what=f"params at step {k}",
            uniform_rtol=uniform,
        )
        state = new_state


# ---------------------------------------------------------------------------------------------
# the table against its references
# ---------------------------------------------------------------------------------------------


def _scaled(prob: Problem, case: Case) -> Problem:
    """``prob`` with its params and grads times ``case.param_scale`` (in their dtypes)."""
    if case.param_scale == 1.0:
        return prob

    def scaled(tree: Any) -> Any:
        return optree.tree_map(lambda x: (x * case.param_scale).astype(x.dtype), tree)

    return Problem(scaled(prob.params), [scaled(g) for g in prob.grads], prob.dtypes)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@given(prob=problems())
def test_case_matches_reference(cl_queue, case: Case, prob: Problem):
    # Coupled weight decay feeds g + wd * p into an adaptive scaling: where the two nearly
    # cancel, float32's rounding of the sum (and of the moments built from it) is divided by an
    # eps-sized denominator, an error no float32 implementation avoids (torch's neither). Such
    # rows have a ``conditioning`` (10x the tolerance); everything else keeps the tight one.
    _check_against_reference(
        case.make(no),
        case.make_reference(),
        _scaled(prob, case),
        cl_queue,
        coupled=case.reduction,
        conditioning=case.conditioning,
        updates_scale_with_params=case.updates_scale_with_params,
    )


@pytest.mark.parametrize("row", HYPER, ids=ids(HYPER))
@given(data=st.data())
def test_optimizer_hyperparameters_match_reference(cl_queue, row: Optimizer, data):
    hp = data.draw(row.hyper(st), label="hyperparameters")
    prob = data.draw(problems(dtypes=(F32, F64), steps=(1, 4)), label="problem")
    _check_against_reference(row.make(no, hp), row.make_reference(hp), prob, cl_queue)


@st.composite
def transform_chains(draw) -> list[Case]:
    return draw(st.lists(st.sampled_from(TRANSFORMS), min_size=1, max_size=4))


@given(chain_cases=transform_chains(), prob=problems(dtypes=(F32, F64)))
def test_arbitrary_chain_matches_reference(cl_queue, chain_cases: list[Case], prob: Problem):
    tx = no.chain(*(c.make(no) for c in chain_cases))
    rtx = ref.chain(*(c.make_reference() for c in chain_cases))
    coupled = any(c.reduction for c in chain_cases)
    _check_against_reference(tx, rtx, prob, cl_queue, coupled=coupled)


# ---------------------------------------------------------------------------------------------
# bit-for-bit properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FEW
@given(prob=problems(dtypes=(F32, F64)))
def test_step_is_update_then_apply_bitwise(cl_queue, case: Case, prob: Problem):
    _check_step_is_update_then_apply(case, prob, cl_queue)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FEW
@given(prob=problems(dtypes=(F16,), mixed=False))
def test_step_is_update_then_apply_bitwise_float16(cl_queue, case: Case, prob: Problem):
    """float16 storage: ``step`` keeps the update in float32 and rounds once (``p + u``), while
    ``update`` returns float16 updates that ``apply_updates`` adds: the two may differ by one
    float16 rounding of the update, never more, and the float32 state is bit-identical."""
    tx = case.make(no)
    prob = _scaled(prob, case)
    params = no.to_device(prob.params, cl_queue)
    state = tx.init(params)
    p_a, s_a, p_b, s_b = params, state, params, state
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, cl_queue)
        inputs = (p_a, grads, s_a)
        before = snapshot(inputs)
        p_a, s_a = no.step(tx, p_a, grads, s_a)
        assert_bitwise_equal(snapshot(inputs), before, f"step {k} wrote to its inputs")
        u, s_b = tx.update(grads, s_b, p_b)
        p_b = no.apply_updates(p_b, u)
        assert_bitwise_equal(snapshot(s_a), snapshot(s_b), f"state after step {k}")
        for a, b, uu in zip(
            optree.tree_leaves(no.to_host(p_a)),
            optree.tree_leaves(no.to_host(p_b)),
            optree.tree_leaves(no.to_host(u)),
            strict=True,
        ):
            # the update's float16 rounding (<= one ulp of u) can move the rounded sum by one
            # ulp of the result (either side of a binade boundary)
            def ulp(x):
                with np.errstate(invalid="ignore"):  # (NaN where the rule gives NaN)
                    return np.abs(np.spacing(x.astype(np.float16))).astype(np.float64)

            tol = ulp(uu) + np.maximum(ulp(a), ulp(b))
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            same_nan = np.isnan(a) & np.isnan(b)
            assert np.all((diff <= tol) | same_nan), f"params after step {k}: {diff} > {tol}"
        p_b, s_b = p_a, s_a  # compare one step at a time


def _check_step_is_update_then_apply(case: Case, prob: Problem, cl_queue: Any) -> None:
    tx = case.make(no)
    params = no.to_device(prob.params, cl_queue)
    state = tx.init(params)
    p_a, s_a, p_b, s_b = params, state, params, state
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, cl_queue)
        before = snapshot((p_a, grads, s_a))
        new_p, new_s = no.step(tx, p_a, grads, s_a)
        # step is pure: params, grads and state untouched
        assert_bitwise_equal(snapshot((p_a, grads, s_a)), before, f"step {k} wrote to its inputs")
        p_a, s_a = new_p, new_s
        u, s_b = tx.update(grads, s_b, p_b)
        p_b = no.apply_updates(p_b, u)
        assert_bitwise_equal(snapshot(p_a), snapshot(p_b), f"params after step {k}")
        assert_bitwise_equal(snapshot(s_a), snapshot(s_b), f"state after step {k}")


def _parts_chain(case: Optimizer) -> tuple[Any, Any]:
    parts = case.make_parts(no)
    return no.chain(*parts), no.chain(*(opaque(t) for t in parts))


OPT_WITH_PARTS = [c for c in OPTIMIZERS if c.parts is not None]


@pytest.mark.parametrize("case", OPT_WITH_PARTS, ids=ids(OPT_WITH_PARTS))
@FEW
@given(prob=problems(dtypes=(F32,)))
def test_fused_chain_equals_one_transform_at_a_time(cl_queue, case: Optimizer, prob: Problem):
    """float32: the optimizer's chain fused into one kernel, and its transforms run one by one
    (opaque, so chain() cannot fuse them), give the same bits; the alias is that chain."""
    fused, split = _parts_chain(case)
    alias = case.make(no)
    params = no.to_device(prob.params, cl_queue)
    s_f, s_s, s_a = fused.init(params), split.init(params), alias.init(params)
    assert_bitwise_equal(snapshot(s_f), snapshot(s_s), "init states")
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, cl_queue)
        u_f, s_f = fused.update(grads, s_f, params)
        u_s, s_s = split.update(grads, s_s, params)
        u_a, s_a = alias.update(grads, s_a, params)
        assert_bitwise_equal(no.to_host(u_f), no.to_host(u_s), f"updates at step {k}")
        assert_bitwise_equal(snapshot(s_f), snapshot(s_s), f"states at step {k}")
        for x, y in zip(
            optree.tree_leaves(no.to_host(u_a)), optree.tree_leaves(no.to_host(u_f)), strict=True
        ):
            np.testing.assert_allclose(
                x,
                y,
                rtol=1e-6,
                atol=1e-6 * (np.max(np.abs(y), initial=0)),
                err_msg=f"alias {case.factory} vs its chain, step {k}",
            )
        params = no.apply_updates(params, u_f)


@given(chain_cases=transform_chains(), prob=problems(dtypes=(F32,)))
def test_random_chain_fused_equals_opaque(cl_queue, chain_cases: list[Case], prob: Problem):
    txs = [c.make(no) for c in chain_cases]
    fused, split = no.chain(*txs), no.chain(*(opaque(t) for t in txs))
    params = no.to_device(prob.params, cl_queue)
    s_f, s_s = fused.init(params), split.init(params)
    for k, g in enumerate(prob.grads):
        grads = no.to_device(g, cl_queue)
        u_f, s_f = fused.update(grads, s_f, params)
        u_s, s_s = split.update(grads, s_s, params)
        assert_bitwise_equal(no.to_host(u_f), no.to_host(u_s), f"updates at step {k}")
        assert_bitwise_equal(snapshot(s_f), snapshot(s_s), f"states at step {k}")
        params = no.apply_updates(params, u_f)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FEW
@given(prob=problems())
def test_packed_equals_unpacked(cl_queue, case: Case, prob: Problem):
    tx = case.make(no)
    # A reduction may sum in another order over one buffer; over a mixed tree the coefficient
    # is as precise as the least precise dtype.
    loose = case.reduction
    p_u = no.to_device(prob.params, cl_queue)
    p_p = no.pack(no.to_device(prob.params, cl_queue))
    assert_bitwise_equal(no.to_host(p_p), no.to_host(p_u), "pack changed values")
    s_u, s_p = tx.init(p_u), tx.init(p_p)
    for k, g in enumerate(prob.grads):
        g_u = no.to_device(g, cl_queue)
        g_p = no.pack(g_u)
        p_u, s_u = no.step(tx, p_u, g_u, s_u)
        p_p, s_p = no.step(tx, p_p, g_p, s_p)
        if loose:
            rtol = 4 * (k + 1) * max(RTOL[d] for d in optree.tree_leaves(prob.dtypes))
            for x, y in zip(
                optree.tree_leaves(no.to_host(p_p)),
                optree.tree_leaves(no.to_host(p_u)),
                strict=True,
            ):
                np.testing.assert_allclose(
                    x.astype(np.float64),
                    y.astype(np.float64),
                    rtol=rtol,
                    atol=rtol * np.max(np.abs(y), initial=0.0),
                    err_msg=f"step {k}",
                )
        else:
            assert_bitwise_equal(no.to_host(p_p), no.to_host(p_u), f"params after step {k}")
            assert_bitwise_equal(snapshot(s_p), snapshot(s_u), f"state after step {k}")


@given(prob=problems())
def test_pack_layout(cl_queue, prob: Problem):
    tree = no.to_device(prob.params, cl_queue)
    packed = no.pack(tree)
    assert optree.tree_structure(packed) == optree.tree_structure(tree)
    assert_bitwise_equal(no.to_host(packed), no.to_host(tree), "packed values")
    bases: dict[np.dtype, Any] = {}
    for leaf in optree.tree_leaves(packed):
        assert isinstance(leaf, cla.Array)
        if leaf.size:
            base = bases.setdefault(np.dtype(leaf.dtype), leaf.base_data)
            assert leaf.base_data == base, "leaves of one dtype must share one buffer"


# ---------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------


@FEW
@given(
    prob=problems(dtypes=(F32, F64), steps=(1, 1)),
    max_norm=st.sampled_from([0.0, 1e-6, 1.0, 1e6]) | st.floats(1e-3, 1e3),
    factor=st.sampled_from([1e-4, 1.0, 1e3]),
)
def test_clip_by_global_norm_bound(cl_queue, prob: Problem, max_norm: float, factor: float):
    grads_host = ref.tree_map(
        lambda x: np.asarray(x.astype(np.float64) * factor, dtype=x.dtype), prob.grads[0]
    )
    grads = no.to_device(grads_host, cl_queue)
    tx = no.clip_by_global_norm(max_norm)
    u, _ = tx.update(grads, tx.init(grads))
    got = no.to_host(u)
    norm_in = ref.global_norm(grads_host)
    norm_out = ref.global_norm(got)
    assert norm_out <= max_norm * (1 + 1e-6), (norm_in, norm_out, max_norm)
    if norm_in * (1 + 1e-5) + 1e-6 < max_norm:  # coefficient exactly 1: updates untouched
        assert_bitwise_equal(got, grads_host, "unclipped updates")
    else:
        want = ref.clip_tree_by_global_norm(grads_host, max_norm)
        assert_close(
            got,
            want,
            prob.dtypes,
            scale=_max_abs(want),
            steps=1,
            what="clipped",
            uniform_rtol=max(RTOL[d] for d in optree.tree_leaves(prob.dtypes)),
        )


def test_clip_by_global_norm_zero_grads_is_no_error(cl_queue):
    grads = no.to_device({"a": np.zeros(5, np.float32), "b": None}, cl_queue)
    for max_norm in (0.0, 1.0):
        tx = no.clip_by_global_norm(max_norm)
        u, _ = tx.update(grads, tx.init(grads))
        out = no.to_host(u)
        assert out["b"] is None
        assert_bitwise_equal(out["a"], np.zeros(5, np.float32), "zero grads")


def test_clip_by_global_norm_torch_coefficient(cl_queue):
    """Norm 5 (3-4-5), max_norm 1: every leaf times 1 / (5 + 1e-6), as torch's clip_grad_norm_."""
    grads = no.to_device({"a": np.array([3.0], np.float64), "b": [np.array([0.0, 4.0])]}, cl_queue)
    tx = no.clip_by_global_norm(1.0)
    u, _ = tx.update(grads, tx.init(grads))
    out = no.to_host(u)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(out["a"], [3.0 * coef], rtol=1e-14)
    np.testing.assert_allclose(out["b"][0], [0.0, 4.0 * coef], rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------


def doubling() -> Any:
    """A user transform without a fragment: doubles the updates, counts its calls."""

    def init(params):
        return {"calls": 0}

    def update(updates, state, params=None, **extra):
        return ref.tree_map(lambda u: u * 2, updates), {"calls": state["calls"] + 1}

    return no.GradientTransformation(init, update)


def add_half_params() -> Any:
    """A user transform without a fragment that needs params: u + 0.5 p."""

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("add_half_params needs params")
        return ref.tree_map(lambda u, p: u + 0.5 * p, updates, params), state

    return no.GradientTransformation(lambda params: (), update)


@FEW
@given(prob=problems(dtypes=(F32, F64)))
def test_user_transform_without_fragment_composes(cl_queue, prob: Problem):
    tx = no.chain(no.scale_by_adam(), doubling(), add_half_params(), no.scale_by_learning_rate(0.1))
    rtx = ref.chain(
        ref.scale_by_adam(),
        ref.scale(2.0),
        ref.add_decayed_weights(0.5),
        ref.scale_by_learning_rate(0.1),
    )
    _check_against_reference(tx, rtx, prob, cl_queue)
    params = no.to_device(prob.params, cl_queue)
    state = tx.init(params)
    assert isinstance(state, tuple) and len(state) == 4
    for g in prob.grads:
        _, state = tx.update(no.to_device(g, cl_queue), state, params)
    assert state[1] == {"calls": len(prob.grads)}


def test_chain_state_is_tuple_of_inner_states(cl_queue):
    params = no.to_device({"w": np.ones((2, 3), np.float32)}, cl_queue)
    a, b = no.scale_by_adam(), no.trace(0.9)
    state = no.chain(a, b).init(params)
    assert isinstance(state, tuple) and len(state) == 2
    assert signature(state[0]) == signature(a.init(params))
    assert signature(state[1]) == signature(b.init(params))
    nested = no.chain(no.chain(a, b), no.scale(2.0)).init(params)
    assert isinstance(nested, tuple) and len(nested) == 2 and len(nested[0]) == 2


def test_named_chain_equals_chain(cl_queue):
    rng = np.random.default_rng(0)
    host_p = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": None}
    host_g = [
        ref.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), host_p)
        for _ in range(3)
    ]
    txs = [
        ("decay", no.add_decayed_weights(0.1)),
        ("adam", no.scale_by_adam()),
        ("lr", no.scale_by_learning_rate(0.01)),
    ]
    named, plain = no.named_chain(*txs), no.chain(*(t for _, t in txs))
    params = no.to_device(host_p, cl_queue)
    s_n, s_p = named.init(params), plain.init(params)
    assert isinstance(s_n, dict) and set(s_n) == {"decay", "adam", "lr"}
    for k, g in enumerate(host_g):
        grads = no.to_device(g, cl_queue)
        u_n, s_n = named.update(grads, s_n, params)
        u_p, s_p = plain.update(grads, s_p, params)
        assert_bitwise_equal(no.to_host(u_n), no.to_host(u_p), f"named_chain step {k}")
        assert_bitwise_equal(snapshot(s_n["adam"]), snapshot(s_p[1]), f"adam state step {k}")


@given(prob=problems())
def test_identity_passes_updates_through(cl_queue, prob: Problem):
    tx = no.identity()
    grads = no.to_device(prob.grads[0], cl_queue)
    u, _ = tx.update(grads, tx.init(grads))
    assert_bitwise_equal(no.to_host(u), prob.grads[0], "identity")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "tree",
    [
        {},
        [],
        (),
        {"a": None},
        [None, (None,)],
        {"a": np.zeros(0, np.float32), "b": [None]},
        Pair(np.zeros((2, 0), np.float32), None),
    ],
    ids=[
        "empty_dict",
        "empty_list",
        "empty_tuple",
        "none_leaf",
        "nested_none",
        "size0",
        "namedtuple_size0",
    ],
)
def test_trees_without_elements(cl_queue, case: Case, tree):
    tx = case.make(no)
    params = no.to_device(tree, cl_queue)
    grads = no.to_device(ref.tree_map(np.copy, tree), cl_queue)
    state = tx.init(params)
    u, state = tx.update(grads, state, params)
    assert optree.tree_structure(u) == optree.tree_structure(grads)
    new_params, state = no.step(tx, params, grads, state)
    assert_bitwise_equal(no.to_host(new_params), snapshot(params), "params")


def test_schedule_first_update_uses_count_zero(cl_queue):
    seen: list[int] = []

    def schedule(count):
        seen.append(int(count))
        return 0.5 ** int(count)

    tx = no.scale_by_learning_rate(schedule)
    grads = no.to_device({"a": np.ones(3, np.float32)}, cl_queue)
    state = tx.init(grads)
    outs = []
    for _ in range(3):
        u, state = tx.update(grads, state)
        outs.append(float(no.to_host(u)["a"][0]))
    assert outs == [-1.0, -0.5, -0.25]
    assert sorted(set(seen)) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------


@given(prob=problems())
def test_to_device_to_host_round_trip(cl_queue, prob: Problem):
    dev = no.to_device(prob.params, cl_queue)
    assert optree.tree_structure(dev) == optree.tree_structure(prob.params)
    for leaf in optree.tree_leaves(dev):
        assert isinstance(leaf, cla.Array)
    assert_bitwise_equal(no.to_host(dev), prob.params, "round trip")


def test_to_device_keeps_0d_shape(cl_queue):
    host = {"s": np.array(1.5, np.float32), "t": np.array(2.0, np.float64)}
    dev = no.to_device(host, cl_queue)
    assert dev["s"].shape == () and dev["t"].shape == ()
    back = no.to_host(dev)
    assert back["s"].shape == () and back["s"].dtype == np.float32
    assert back["t"].dtype == np.float64


def test_default_queue_is_a_queue():
    import pyopencl as cl

    q = no.default_queue()
    assert isinstance(q, cl.CommandQueue)
    assert no.default_queue() is q


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "kwargs", "exc", "match"),
    ERRORS,
    ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for f, kw, _, _ in ERRORS],
)
def test_invalid_hyperparameters(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(no, factory)(**kwargs)


def _error_setup(queue):
    rng = np.random.default_rng(1)
    host_p = {
        "a": rng.standard_normal(3).astype(np.float32),
        "b": rng.standard_normal((2, 2)).astype(np.float32),
    }
    host_g = ref.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), host_p)
    return host_p, host_g, no.to_device(host_p, queue), no.to_device(host_g, queue)


_F32 = np.float32
BAD_GRADS = [
    ("extra_leaf", lambda g: {**g, "c": np.ones(2, _F32)}, "(?i)structure"),
    ("missing_leaf", lambda g: {"a": g["a"]}, "(?i)structure"),
    ("list_not_dict", lambda g: [g["a"], g["b"]], "(?i)structure"),
    ("None_for_a_leaf", lambda g: {"a": g["a"], "b": None}, "(?i)structure"),
    ("wrong_shape", lambda g: {"a": np.ones(4, _F32), "b": g["b"]}, "(?i)shape"),
    ("transposed", lambda g: {"a": g["a"], "b": np.ones((4, 1), _F32)}, "(?i)shape"),
    ("wrong_dtype", lambda g: {"a": g["a"].astype(np.float64), "b": g["b"]}, "(?i)dtype"),
]
CASE_BY_ID = {c.id: c for c in CASES}


def _has_device_arrays(tree: Any) -> bool:
    return any(isinstance(x, cla.Array) for x in optree.tree_leaves(tree))


@pytest.mark.parametrize(
    "name",
    ["adam", "adamw", "sgd-momentum", "rmsprop", "clip_by_global_norm", "scale"],
)
@pytest.mark.parametrize(("what", "make_bad", "match"), BAD_GRADS, ids=[b[0] for b in BAD_GRADS])
def test_mismatched_grads_raise_and_change_nothing(cl_queue, name, what, make_bad, match):
    """Grads that do not fit the params and state: update (where there is a state array or a
    param to check against) and step raise an error naming the problem; inputs untouched."""
    case = CASE_BY_ID[name]
    tx = case.make(no)
    _, host_g, params, _ = _error_setup(cl_queue)
    state = tx.init(params)
    state = tx.update(no.to_device(host_g, cl_queue), state, params)[1]  # one good step first
    grads = no.to_device(make_bad(host_g), cl_queue)
    before = snapshot((params, grads, state))
    if _has_device_arrays(state) or case.needs_params:
        with pytest.raises((ValueError, TypeError), match=match):
            tx.update(grads, state, params)
        assert_bitwise_equal(snapshot((params, grads, state)), before, f"update with {what}")
    with pytest.raises((ValueError, TypeError), match=match):
        no.step(tx, params, grads, state)
    assert_bitwise_equal(snapshot((params, grads, state)), before, f"step with {what}")
    # the state still works after the failures
    tx.update(no.to_device(host_g, cl_queue), state, params)


@pytest.mark.parametrize("name", ["adam", "sgd-momentum", "rmsprop-centered-momentum-wd_coupled"])
def test_mismatched_state_raises(cl_queue, name):
    case = CASE_BY_ID[name]
    tx = case.make(no)
    _, _, params, grads = _error_setup(cl_queue)
    other = no.to_device({"a": np.ones(5, np.float32), "b": np.ones((2, 2), np.float32)}, cl_queue)
    wrong_shape_state = tx.init(other)
    before = snapshot((params, grads, wrong_shape_state))
    with pytest.raises((ValueError, TypeError), match=r"(?i)shape"):
        tx.update(grads, wrong_shape_state, params)
    assert_bitwise_equal(snapshot((params, grads, wrong_shape_state)), before, "shape")
    other = no.to_device({"a": np.ones(3, np.float32)}, cl_queue)
    wrong_tree_state = tx.init(other)
    with pytest.raises((ValueError, TypeError), match=r"(?i)structure"):
        tx.update(grads, wrong_tree_state, params)


@pytest.mark.parametrize("name", ["add_decayed_weights", "adamw", "sgd-nesterov-wd_coupled"])
def test_params_required_and_checked(cl_queue, name):
    case = CASE_BY_ID[name]
    tx = case.make(no)
    host_p, _, params, grads = _error_setup(cl_queue)
    state = tx.init(params)
    before = snapshot((grads, state))
    with pytest.raises(ValueError, match=r"(?i)params"):
        tx.update(grads, state)
    assert_bitwise_equal(snapshot((grads, state)), before, "update without params")
    bad_params = no.to_device({"a": host_p["a"]}, cl_queue)
    with pytest.raises((ValueError, TypeError), match=r"(?i)structure"):
        tx.update(grads, state, bad_params)
    bad_params = no.to_device({"a": np.ones(4, np.float32), "b": host_p["b"]}, cl_queue)
    with pytest.raises((ValueError, TypeError), match=r"(?i)shape"):
        tx.update(grads, state, bad_params)
    bad_params = no.to_device({"a": host_p["a"].astype(np.float16), "b": host_p["b"]}, cl_queue)
    with pytest.raises((ValueError, TypeError), match=r"(?i)dtype"):
        tx.update(grads, state, bad_params)
    assert_bitwise_equal(snapshot((grads, state)), before, "after failed calls")


def test_apply_updates_mismatch(cl_queue):
    _, host_g, params, _ = _error_setup(cl_queue)
    before = snapshot(params)
    with pytest.raises((ValueError, TypeError), match=r"(?i)structure"):
        no.apply_updates(params, no.to_device({"a": host_g["a"]}, cl_queue))
    with pytest.raises((ValueError, TypeError), match=r"(?i)shape"):
        no.apply_updates(
            params, no.to_device({"a": np.ones(4, np.float32), "b": host_g["b"]}, cl_queue)
        )
    assert_bitwise_equal(snapshot(params), before, "apply_updates with bad updates")


# ---------------------------------------------------------------------------------------------
# torch.optim and optax cross-checks
# ---------------------------------------------------------------------------------------------


def _trajectory_problem(steps: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    p0 = {
        "w": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    gs = [
        ref.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), p0)
        for _ in range(steps)
    ]
    return p0, gs


def _netcl_trajectory(tx, p0, gs, queue) -> list[dict]:
    params = no.to_device(p0, queue)
    state = tx.init(params)
    out = []
    for g in gs:
        params, state = no.step(tx, params, no.to_device(g, queue), state)
        out.append(no.to_host(params))
    return out


def _assert_trajectories_close(got: list[dict], want: list[dict], p0: dict, what: str) -> None:
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        for key in p0:
            # float32 vs float32 in another operation order: rounding of p (ulps) accumulates
            atol = (k + 1) * 2 * np.finfo(np.float32).eps * np.max(np.abs(p0[key]))
            np.testing.assert_allclose(
                a[key], b[key], rtol=1e-5, atol=atol, err_msg=f"{what}: {key} at step {k}"
            )
    for key in p0:  # the displacement itself, relative to its size
        moved_got, moved_want = got[-1][key] - p0[key], want[-1][key] - p0[key]
        atol = len(got) * 4 * np.finfo(np.float32).eps * np.max(np.abs(p0[key]))
        np.testing.assert_allclose(
            moved_got,
            moved_want,
            rtol=2e-3,
            atol=atol + 1e-3 * np.max(np.abs(moved_want)),
            err_msg=f"{what}: displacement of {key}",
        )


@pytest.mark.parametrize("case", TORCH, ids=ids(TORCH))
def test_trajectory_matches_torch(cl_queue, case: Optimizer):
    torch = pytest.importorskip("torch")
    p0, gs = _trajectory_problem()
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = case.make_torch(torch, list(tparams.values()), foreach=False)
    want = []
    for g in gs:
        for k, t in tparams.items():
            t.grad = torch.tensor(g[k])
        opt.step()
        want.append({k: t.detach().numpy().copy() for k, t in tparams.items()})
    got = _netcl_trajectory(case.make(no), p0, gs, cl_queue)
    _assert_trajectories_close(got, want, p0, f"{case.id} vs torch.optim.{case.torch}")


@pytest.mark.parametrize("case", OPTAX, ids=ids(OPTAX))
def test_trajectory_matches_optax(cl_queue, case: Optimizer):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    p0, gs = _trajectory_problem(seed=1)
    otx = case.make_optax(optax)
    p = {k: jnp.asarray(v) for k, v in p0.items()}
    state = otx.init(p)
    want = []
    for g in gs:
        u, state = otx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
        want.append({k: np.asarray(v) for k, v in p.items()})
    assert all(w["w"].dtype == np.float32 for w in want)
    got = _netcl_trajectory(case.make(no), p0, gs, cl_queue)
    _assert_trajectories_close(got, want, p0, f"{case.id} vs optax")
