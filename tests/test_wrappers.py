"""optax's wrappers: apply_if_finite, zero_nans, partition / multi_transform, masked,
weight_decay_mask and MultiSteps, against float64 references (reference_extra.py)."""

from __future__ import annotations

import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference as ref
import reference_extra as rx
from hypothesis import given, settings
from hypothesis import strategies as st

import netcl_optim as no
from netcl_optim.fusion import count_launches
from netcl_optim.transforms._masking import MaskedState
from netcl_optim.transforms._wrappers import (
    ApplyIfFiniteState,
    MultiSteps,
    MultiStepsState,
    PartitionState,
    all_finite_host,
    apply_if_finite,
    multi_transform,
    noop_updates,
    partition,
    weight_decay_mask,
    zero_nans,
)


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(got, want) -> None:
    """Bit for bit; any NaN equals any NaN."""
    for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        nan = np.isnan(w)
        np.testing.assert_array_equal(np.isnan(g), nan)
        np.testing.assert_array_equal(_bits(g)[~nan], _bits(w)[~nan])


def _close(got, want, rtol=1e-5, atol=1e-7) -> None:
    for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def _host_tree(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "w": np.array(rng.standard_normal((4, 3)), dtype),
            "b": np.array(rng.standard_normal(3), dtype),
        },
        "scale": np.array(rng.standard_normal(5), dtype),
        "conv": np.array(rng.standard_normal((2, 2, 3)), dtype),
    }


def _dev(q, host, packed=True):
    d = no.to_device(host, q)
    return no.pack(d, q) if packed else d


# ---------------------------------------------------------------------------- helpers


def test_noop_updates_are_negative_zero(q):
    host = _host_tree(0)
    host["h"] = np.ones(4, np.float16)
    z = noop_updates(_dev(q, host))
    assert optree.tree_structure(z) == optree.tree_structure(host)
    for leaf, h in zip(optree.tree_leaves(no.to_host(z)), optree.tree_leaves(host), strict=True):
        assert leaf.dtype == h.dtype and np.all(leaf == 0) and np.all(np.signbit(leaf))
    p = _host_tree(1)
    p["dense"]["b"][:] = [-0.0, np.inf, np.nan]
    new = no.apply_updates(_dev(q, p), noop_updates(_dev(q, p)))
    _assert_bitwise(no.to_host(new), p)


def test_all_finite_host(q):
    host = _host_tree(2)
    assert all_finite_host(_dev(q, host))
    assert all_finite_host({}) and all_finite_host([no.to_device(np.zeros(0, np.float32), q)])
    host["conv"][1, 1, 2] = -np.inf
    assert not all_finite_host(_dev(q, host, packed=False))


# ---------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize("max_errors", [0, 2])
def test_apply_if_finite_matches_optax_semantics(q, max_errors):
    params_h = _host_tree(3)
    params = _dev(q, params_h)
    tx = apply_if_finite(no.adam(1e-2), max_errors)
    r = rx.apply_if_finite(ref.adam_tx(1e-2), max_errors)
    state, rstate = tx.init(params), r.init(params_h)
    assert state == ApplyIfFiniteState(0, True, 0, state.inner_state)
    pattern = [False, True, True, True, False, True, False]
    for it, bad in enumerate(pattern):
        g = _host_tree(20 + it)
        if bad:
            g["scale"][2] = np.nan
        inner_before = no.to_host(state.inner_state)
        u, state = tx.update(_dev(q, g), state, params)
        want, rstate = r.update(g, rstate, params_h)
        assert (state.notfinite_count, state.last_finite, state.total_notfinite) == rstate[:3]
        got = no.to_host(u)
        if bad and state.notfinite_count <= max_errors:  # rejected: zeros, state kept
            assert all(np.all(x == 0) for x in optree.tree_leaves(got))
            _assert_bitwise(no.to_host(state.inner_state), inner_before)
        else:
            _close(got, want, rtol=1e-4, atol=1e-6)  # NaN where the reference is NaN
        assert state.inner_state[0].count == rstate[3][0]["count"]


def test_apply_if_finite_argument_errors():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_consecutive_errors"):
            apply_if_finite(no.sgd(0.1), bad)


# ---------------------------------------------------------------------------- zero_nans


def test_zero_nans_fused_in_chain(q):
    host = _host_tree(4)
    host["dense"]["w"][0, :] = [np.nan, np.inf, -np.inf]
    tx = no.chain(zero_nans(), no.scale(2.0))
    state = tx.init(_dev(q, host))
    with count_launches() as c:
        u, _ = tx.update(_dev(q, host), state)
    assert c.launches == 1, c.kernels  # one fused kernel for the packed tree
    want = optree.tree_map(lambda x: np.where(np.isnan(x), 0, x) * np.float32(2), host)
    _assert_bitwise(no.to_host(u), want)


# ---------------------------------------------------------------------------- masking


def test_weight_decay_mask():
    host = _host_tree(5)
    host["none"] = None
    mask = weight_decay_mask(host)
    assert mask == {
        "conv": True,
        "dense": {"b": False, "w": True},
        "none": None,
        "scale": False,
    }
    assert (
        weight_decay_mask(host, min_ndim=3)["conv"]
        and not weight_decay_mask(host, min_ndim=3)["dense"]["w"]
    )


def test_add_decayed_weights_with_weight_decay_mask(q):
    params_h = _host_tree(6)
    params = _dev(q, params_h)
    tx = no.add_decayed_weights(0.5, mask=weight_decay_mask)
    u, _ = tx.update(_dev(q, _host_tree(7)), tx.init(params), params)
    g = _host_tree(7)
    want = optree.tree_map(lambda x, p: x + np.float32(0.5) * p if p.ndim >= 2 else x, g, params_h)
    _assert_bitwise(no.to_host(u), want)


_val = st.floats(-1e3, 1e3, width=32)


@settings(max_examples=25)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 3, 7, 64, 67]), min_size=1, max_size=5),
    data=st.data(),
    packed=st.booleans(),
)
def test_property_masked_leaves_pass_through(q, sizes, data, packed):
    host = [np.array(data.draw(st.lists(_val, min_size=n, max_size=n)), np.float32) for n in sizes]
    mask = [data.draw(st.booleans()) for _ in sizes]
    params = _dev(q, host, packed)
    tx = no.masked(no.chain(no.scale_by_adam(), no.scale(-0.1)), mask)
    updates = _dev(q, host, packed)
    u, state = tx.update(updates, tx.init(params), params)
    assert isinstance(state, MaskedState)
    u2, _ = tx.update(u, state, params)  # a second step over the first's output
    got, got2 = no.to_host(u), no.to_host(u2)
    for g, g2, h, m in zip(got, got2, host, mask, strict=True):
        if not m:
            _assert_bitwise(g, h)
            _assert_bitwise(g2, h)
        else:
            assert g.shape == h.shape
    # masked-out leaves are passed through as they are (not copied)
    for leaf, m, dev in zip(u, mask, updates, strict=True):
        if not m:
            assert leaf is dev


# ---------------------------------------------------------------------------- partition


def _labels(tree):
    return optree.tree_map(lambda x: "decay" if np.ndim(x) >= 2 else "plain", tree)


@pytest.mark.parametrize("callable_labels", [True, False])
def test_partition_matches_reference(q, callable_labels):
    params_h = _host_tree(8)
    params = _dev(q, params_h)
    labels = _labels if callable_labels else _labels(params_h)
    tx = partition(
        {"decay": no.adamw(1e-2, weight_decay=0.1), "plain": no.sgd(0.1, momentum=0.9)}, labels
    )
    r = rx.partition(
        {"decay": ref.adamw_tx(1e-2, weight_decay=0.1), "plain": ref.sgd_tx(0.1, momentum=0.9)},
        labels,
    )
    state, rstate = tx.init(params), r.init(params_h)
    assert isinstance(state, PartitionState)
    assert set(state.inner_states) == {"decay", "plain"}
    assert all(isinstance(s, MaskedState) for s in state.inner_states.values())
    for it in range(3):
        g = _host_tree(30 + it)
        u, state = tx.update(_dev(q, g), state, params)
        want, rstate = r.update(g, rstate, params_h)
        _close(no.to_host(u), want)


def test_partition_missing_label_and_alias(q):
    params = _dev(q, _host_tree(9))
    tx = partition({"decay": no.sgd(0.1)}, _labels)
    with pytest.raises(ValueError, match=r"no corresponding transformation.*'plain'"):
        tx.init(params)
    assert multi_transform is partition


def test_partition_with_unused_transform(q):
    params_h = _host_tree(10)
    params = _dev(q, params_h)
    labels = optree.tree_map(lambda _: "a", params_h)
    tx = partition({"a": no.scale(2.0), "unused": no.adam(1e-3)}, labels)
    u, _ = tx.update(_dev(q, params_h), tx.init(params), params)
    _assert_bitwise(no.to_host(u), optree.tree_map(lambda x: x * np.float32(2), params_h))


# ---------------------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize("use_mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("inner", ["adam", "opaque"])
def test_multi_steps_matches_reference(q, inner, use_mean):
    params_h = _host_tree(11)
    params = _dev(q, params_h)
    if inner == "adam":
        tx_inner, r_inner = no.adam(1e-2), ref.adam_tx(1e-2)
    else:  # a user transform without a fragment: MultiSteps runs it after the accumulation
        sgd = no.sgd(0.1)
        tx_inner = no.GradientTransformation(sgd.init, sgd.update)
        r_inner = ref.sgd_tx(0.1)
    ms = MultiSteps(tx_inner, every_k_schedule=3, use_grad_mean=use_mean)
    assert ms.gradient_transformation().plan.fusible == (inner == "adam")
    r = rx.multi_steps(r_inner, 3, use_grad_mean=use_mean)
    state, rstate = ms.init(params), r.init(params_h)
    assert isinstance(state, MultiStepsState) and not ms.has_updated(state)
    for it in range(7):
        g = _host_tree(40 + it)
        inner_before = no.to_host(state.inner_opt_state)
        u, state = ms.update(_dev(q, g), state, params)
        want, rstate = r.update(g, rstate, params_h)
        assert (state.mini_step, state.gradient_step) == rstate[:2]
        assert ms.has_updated(state) == (it % 3 == 2)
        _close(no.to_host(state.acc_grads), rstate[3])
        if it % 3 != 2:
            _assert_bitwise(no.to_host(state.inner_opt_state), inner_before)
            assert all(np.all(x == 0) for x in optree.tree_leaves(no.to_host(u)))
        _close(no.to_host(u), want)


def test_multi_steps_one_launch_per_step_when_fusible(q):
    params = _dev(q, _host_tree(12))
    ms = MultiSteps(no.adam(1e-3), 2)
    tx = ms.gradient_transformation()
    state = tx.init(params)
    for _ in range(2):
        with count_launches() as c:
            params, state = no.step(tx, params, _dev(q, _host_tree(13)), state)
        assert c.launches == 1, c.kernels  # accumulate (+ adam + apply on the 2nd) fused


def test_multi_steps_schedule_and_chain(q):
    params_h = _host_tree(14)
    params = _dev(q, params_h)
    ks = []

    def every_k(step):
        ks.append(step)
        return 1 if step == 0 else 2

    tx = no.chain(
        no.clip_by_global_norm(1e6), MultiSteps(no.sgd(1.0), every_k).gradient_transformation()
    )
    state = tx.init(params)
    emitted = []
    for it in range(5):
        u, state = tx.update(_dev(q, _host_tree(50 + it)), state, params)
        emitted.append(not all(np.all(x == 0) for x in optree.tree_leaves(no.to_host(u))))
    assert emitted == [True, False, True, False, True]
    assert state[1].gradient_step == 3
    with pytest.raises(ValueError, match="every_k_schedule"):
        MultiSteps(no.sgd(0.1), 0)
    bad = MultiSteps(no.sgd(0.1), lambda step: 0)
    with pytest.raises(ValueError, match="every_k_schedule"):
        bad.update(_dev(q, params_h), bad.init(params), params)


def test_multi_steps_half_params_float32_accumulator(q):
    params_h = _host_tree(15, np.float16)
    params = _dev(q, params_h)
    ms = MultiSteps(no.sgd(1.0), 2)
    state = ms.init(params)
    assert all(x.dtype == np.float32 for x in optree.tree_leaves(state.acc_grads))
    g1, g2 = _host_tree(16, np.float16), _host_tree(17, np.float16)
    _, state = ms.update(_dev(q, g1), state, params)
    u, state = ms.update(_dev(q, g2), state, params)
    want = optree.tree_map(
        lambda a, b: -(a.astype(np.float32) + (b.astype(np.float32) - a.astype(np.float32)) / 2),
        g1,
        g2,
    )
    for got, w in zip(optree.tree_leaves(no.to_host(u)), optree.tree_leaves(want), strict=True):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, w.astype(np.float16))


@settings(max_examples=20)
@given(
    k=st.integers(1, 5),
    sizes=st.lists(st.sampled_from([1, 2, 7, 64, 67, 1031]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_multi_steps_equals_big_batch_mean(q, k, sizes, seed):
    rng = np.random.default_rng(seed)
    params_h = [np.array(rng.uniform(-1e3, 1e3, n), np.float32) for n in sizes]
    batches = [[np.array(rng.uniform(-1e3, 1e3, n), np.float32) for n in sizes] for _ in range(k)]
    lr = 0.01
    ms = MultiSteps(no.sgd(lr), k)
    tx = ms.gradient_transformation()
    params = no.to_device(params_h, q)
    state = tx.init(params)
    for i, g in enumerate(batches):
        params, state = no.step(tx, params, no.to_device(g, q), state)
        if i < k - 1:  # mini-steps: params bit-identical
            _assert_bitwise(no.to_host(params), params_h)
    mean = [np.mean([b[j].astype(np.float64) for b in batches], axis=0) for j in range(len(sizes))]
    want = [p.astype(np.float64) - lr * m for p, m in zip(params_h, mean, strict=True)]
    for got, w, m in zip(no.to_host(params), want, mean, strict=True):
        # the step moves params by lr * mean: compare to that scale (float32 rtol 1e-5)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5 * lr * (np.max(np.abs(m)) + 1))
    assert ms.has_updated(state)


def test_outputs_are_device_arrays(q):
    u = noop_updates({"a": no.to_device(np.ones(3, np.float32), q)})
    assert isinstance(u["a"], cla.Array)
