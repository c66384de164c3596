"""The fusion runner: launch counts, packed vs per-leaf, the in-place plan cache, reductions."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim.fusion import reduce_leaves
from netcl_optim.fusion._codegen import KernelSpec, fused_source
from netcl_optim.transforms._update import step_

RNG = np.random.default_rng(7)


def _tree(shapes, dtype=np.float32, scale=1.0):
    return [(RNG.standard_normal(s) * scale).astype(dtype) for s in shapes]


SHAPES = [(17, 5), (3,), (), (0,), (1031,), (4, 4, 4)]


def test_packed_tree_steps_in_one_launch_and_unpacked_in_one_per_nonempty_leaf():
    params = no.to_device(_tree(SHAPES))
    grads = no.to_device(_tree(SHAPES))
    tx = no.adamw(1e-2)
    nonempty = sum(1 for s in SHAPES if np.prod(s) > 0)
    state = tx.init(params)
    with no.count_launches() as unpacked:
        p_a, _ = no.step(tx, params, grads, state)
    with no.count_launches() as packed:
        p_b, _ = no.step(tx, no.pack(params), no.pack(grads), state)
    assert packed.launches == 1
    # the 1031-element leaf runs as 1024 work-items plus a tail of 7 at a global offset
    assert unpacked.launches == nonempty + 1
    for a, b in zip(no.to_host(p_a), no.to_host(p_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_launch_covers_every_element():
    n = 4 * 256 + 7  # > 4 * 256 and not a multiple: main part + tail launch
    p = no.to_device(np.zeros(n, np.float32))
    g = no.to_device(np.ones(n, np.float32))
    tx = no.sgd(0.5)
    with no.count_launches() as c:
        new, _ = no.step(tx, p, g, tx.init(p))
    assert c.launches == 2
    np.testing.assert_array_equal(new.get(), np.full(n, -0.5, np.float32))


def test_inplace_plan_cache_with_fresh_grads_every_step_matches_functional():
    """The stateful path caches launch plans by array identity: new gradient arrays each step
    (ids may be recycled) must still give exactly the functional result."""
    shapes = [(33,), (8, 9)]
    p0 = _tree(shapes)
    grads = [_tree(shapes) for _ in range(6)]
    tx = no.adam(1e-2)
    params = no.pack(no.to_device(p0))
    state = tx.init(params)
    ref_p = no.to_device(p0)
    ref_s = tx.init(ref_p)
    for g in grads:
        dg = no.pack(no.to_device(g))
        state = step_(tx, params, dg, state)
        ref_p, ref_s = no.step(tx, ref_p, no.to_device(g), ref_s)
        del dg
        gc.collect()
    for a, b in zip(no.to_host(params), no.to_host(ref_p), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inplace_plan_cache_keeps_no_array_alive():
    params = no.pack(no.to_device(_tree([(64,)])))
    grads = no.pack(no.to_device(_tree([(64,)])))
    tx = no.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    state = step_(tx, params, grads, state)
    state = step_(tx, params, grads, state)  # served from the plan cache
    pool = no._device.allocator(no.default_queue())
    active = pool.active_blocks
    del grads
    gc.collect()
    assert pool.active_blocks == active - 1


def test_mixed_dtypes_run_one_kernel_per_dtype():
    params = no.to_device(
        {"a": np.ones(5, np.float32), "b": np.ones(5, np.float64), "c": np.ones(5, np.float16)}
    )
    grads = no.to_device(
        {"a": np.ones(5, np.float32), "b": np.ones(5, np.float64), "c": np.ones(5, np.float16)}
    )
    tx = no.sgd(0.25, momentum=0.5)
    state = tx.init(params)
    assert state[0].trace["c"].dtype == np.float32  # half parameters keep float32 state
    with no.count_launches() as c:
        new, state = no.step(tx, no.pack(params), no.pack(grads), state)
    assert c.launches == 3
    for k in "abc":
        np.testing.assert_allclose(no.to_host(new)[k].astype(np.float64), 0.75, rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "op, finish, ref",
    [
        ("sumsq", "norm", lambda x: np.sqrt((x**2).sum())),
        ("maxabs", "norm", lambda x: np.abs(x).max()),
        ("sumpow", "norm", lambda x: (np.abs(x) ** 3).sum() ** (1 / 3)),
        ("nonfinite", "flag", lambda x: float(not np.isfinite(x).all())),
    ],
)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 65, 4099, 100_003])
def test_reductions_match_numpy(op, finish, ref, dtype, n):
    x = RNG.standard_normal(n).astype(dtype)
    if op == "nonfinite" and n > 8:
        x[n // 2] = np.inf
    got = reduce_leaves(no.default_queue(), [no.to_device(x)], op, finish, 1.0, 3.0).get()
    want = ref(x.astype(np.float64))
    np.testing.assert_allclose(got[0], want, rtol=2e-6 if dtype != np.float16 else 1e-3)


def test_reduction_over_many_leaves_packed_and_not():
    xs = _tree([(300,), (7,), (1000, 3), (0,)])
    want = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in xs))
    q = no.default_queue()
    for tree in (no.to_device(xs), no.pack(no.to_device(xs))):
        got = reduce_leaves(q, tree, "sumsq", "clip", 1.0).get()
        np.testing.assert_allclose(got[0], want, rtol=1e-6)
        np.testing.assert_allclose(got[1], min(1.0, 1.0 / (want + 1e-6)), rtol=1e-6)


def test_codegen_is_readable_and_hyperparameters_are_arguments():
    frags = [c.plan for c in no.adamw(1e-3).plan.children]
    spec = KernelSpec(
        tuple(f.key for f in frags), np.dtype(np.float32), "pure", True, True, "double"
    )
    src, name, args = fused_source(frags, spec)
    assert src.startswith(f"//CL// {name}: scale_by_adam | add_decayed_weights | scale | apply")
    assert "#pragma OPENCL FP_CONTRACT OFF" in src
    assert "if (i <" not in src and "__builtin_sqrtf" in src
    # no hyperparameter value is baked into the source
    assert "0.001" not in src and "0.999" not in src
    assert {"learning_rate_2", "step_size_2"} & {a.name for a in args}


def test_learning_rate_changes_never_rebuild_a_kernel():
    from netcl_optim.fusion import _programs

    params = no.pack(no.to_device(_tree([(50,)])))
    grads = no.pack(no.to_device(_tree([(50,)])))
    tx = no.adam(lambda count: 1e-3 / (1 + count))
    state = tx.init(params)
    params, state = no.step(tx, params, grads, state)
    before = _programs.build_count
    for _ in range(5):
        params, state = no.step(tx, params, grads, state)
    assert _programs.build_count == before


def test_donated_step_equals_pure_step_and_reuses_the_buffers():
    shapes = [(40, 3), (7,)]
    p0 = _tree(shapes)
    tx = no.chain(no.clip_by_global_norm(1.0), no.adamw(1e-2))
    pure_p = no.to_device(p0)
    pure_s = tx.init(pure_p)
    don_p = no.pack(no.to_device(p0))
    don_s = tx.init(don_p)
    for _ in range(4):
        g = _tree(shapes)
        pure_p, pure_s = no.step(tx, pure_p, no.to_device(g), pure_s)
        spans = [(x.base_data, x.offset) for x in [*don_p, *don_s[1][0].mu]]
        new_p, new_s = no.step(tx, don_p, no.pack(no.to_device(g)), don_s, donate=True)
        # new array objects over the donated memory
        assert [(x.base_data, x.offset) for x in [*new_p, *new_s[1][0].mu]] == spans
        don_p, don_s = new_p, new_s
    for a, b in zip(no.to_host(pure_p), no.to_host(don_p), strict=True):
        np.testing.assert_array_equal(a, b)
