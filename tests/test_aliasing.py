"""Shared memory and donation: tied or overlapping parameters, one buffer donated twice, use
of donated inputs, and the role named when an array is on another OpenCL context."""

from __future__ import annotations

import numpy as np
import optree
import pyopencl as cl
import pytest
from cases import CASES

import netcl_optim as no
from netcl_optim.fusion import _cache

F32 = np.float32
DONATED = r"was donated to no\.step\(\.\.\., donate=True\) and can no longer be used"


def _host(tree):
    return [np.array(x, copy=True) for x in optree.tree_leaves(no.to_host(tree))]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ stateful: shared memory


def test_two_parameters_over_one_array_are_refused_and_left_as_they_were(cl_queue):
    x = no.to_device(np.ones(4, F32), cl_queue)
    other = no.Parameter(no.to_device(np.zeros(3, F32), cl_queue))
    tied_a, tied_b = no.Parameter(x), no.Parameter(x)
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\]\['params'\]\[1\] and param_groups\[0\]\['params'\]\[2\] "
        r"are one array \(tied weights\)",
    ):
        no.SGD([other, tied_a, tied_b], lr=0.1)
    assert tied_a.data is x and tied_b.data is x  # not re-homed
    np.testing.assert_array_equal(x.get(), np.ones(4, F32))


def test_overlapping_views_are_refused_and_disjoint_views_are_stepped_in_place(cl_queue):
    x = no.to_device(np.arange(8, dtype=F32), cl_queue)
    with pytest.raises(ValueError, match=r"overlap in memory \(views of one buffer\)"):
        no.Adam([no.Parameter(x[:5]), no.Parameter(x[3:])], lr=0.1)
    low, high = no.Parameter(x[:4]), no.Parameter(x[4:])
    opt = no.SGD([low, high], lr=0.5)
    low.grad = no.to_device(np.ones(4, F32), cl_queue)
    high.grad = no.to_device(np.full(4, 2.0, F32), cl_queue)
    opt.step()  # back to back already: kept where they are, so the user's array is stepped
    expected = np.arange(8, dtype=F32) - np.repeat(F32([0.5, 1.0]), 4)
    np.testing.assert_array_equal(x.get(), expected)


def test_a_parameter_tied_to_another_group_is_refused_with_nothing_changed(cl_queue):
    first = no.Parameter(no.to_device(np.ones(6, F32), cl_queue))
    opt = no.Adam([first], lr=0.1)
    before = opt.state_dict()
    tied = no.Parameter(first.data[2:4])  # a view of the packed array
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\]\['params'\]\[0\] and param_groups\[1\]\['params'\]\[0\] "
        r"overlap in memory",
    ):
        opt.add_param_group({"params": [tied], "lr": 0.2})
    assert len(opt.param_groups) == 1 and opt.state_dict() == before


def test_a_data_rebound_onto_another_parameter_is_refused_at_the_step(cl_queue):
    a = no.Parameter(no.to_device(np.ones(3, F32), cl_queue))
    b = no.Parameter(no.to_device(np.ones(3, F32), cl_queue))
    opt = no.SGD([a, b], lr=0.1)
    b.data = a.data
    for p in (a, b):
        p.grad = no.to_device(np.ones(3, F32), cl_queue)
    with pytest.raises(ValueError, match=r"are one array \(tied weights\)"):
        opt.step()
    np.testing.assert_array_equal(a.data.get(), np.ones(3, F32))


def test_a_failed_packing_leaves_every_data_as_it_was(cl_queue):
    class Frozen:
        """A parameter whose .data cannot be rebound."""

        def __init__(self, data):
            self._data, self.grad = data, None

        @property
        def data(self):
            return self._data

    free = no.Parameter(no.to_device(np.ones(3, F32), cl_queue))
    original = free.data
    frozen = Frozen(no.to_device(np.ones(2, F32), cl_queue))
    with pytest.raises(TypeError, match=r"cannot rebind \.data of a Frozen"):
        no.SGD([free, frozen], lr=0.1)
    assert free.data is original


def test_a_tied_weight_given_once_with_summed_grads_is_one_update(cl_queue):
    """What the error message asks for: the torch result of a weight used twice."""
    w = no.Parameter(no.to_device(np.ones(3, F32), cl_queue))
    opt = no.SGD([w], lr=0.1)
    w.grad = no.to_device(np.full(3, 1.0 + 3.0, F32), cl_queue)
    opt.step()
    np.testing.assert_allclose(w.data.get(), np.full(3, 0.6, F32), rtol=1e-6)


# ------------------------------------------------------------------ functional: one buffer twice


def _tied_sgd(cl_queue):
    x = no.to_device(np.ones(3, F32), cl_queue)
    params = {"a": x, "b": x}
    grads = no.to_device({"a": np.ones(3, F32), "b": np.full(3, 3.0, F32)}, cl_queue)
    return params, grads


def test_a_tree_holding_one_array_twice_steps_pure_and_refuses_donation(cl_queue):
    params, grads = _tied_sgd(cl_queue)
    tx = no.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    pure, _ = no.step(tx, params, grads, state)
    np.testing.assert_allclose(pure["a"].get(), np.full(3, 0.9, F32), rtol=1e-6)
    np.testing.assert_allclose(pure["b"].get(), np.full(3, 0.7, F32), rtol=1e-6)
    before = _host((params, grads, state))
    with pytest.raises(
        ValueError,
        match=r"leaf root\['a'\] of params and leaf root\['b'\] of params are the same memory",
    ):
        no.step(tx, params, grads, state, donate=True)
    _assert_same(_host((params, grads, state)), before)
    no.step(tx, params, grads, state)  # nothing was donated: the inputs still work


@pytest.mark.parametrize("case", ["overlapping params", "grads are params", "slot is params"])
def test_donated_memory_shared_with_another_array_is_refused(cl_queue, case):
    tx = no.sgd(0.1, momentum=0.9)
    buf = no.to_device(np.arange(10, dtype=F32), cl_queue)
    params = [buf[:6], buf[6:]] if case != "overlapping params" else [buf[:6], buf[4:]]
    grads = no.to_device([np.ones(x.shape, F32) for x in params], cl_queue)
    state = tx.init(params)
    if case == "grads are params":
        grads = [grads[0], params[1]]
    if case == "slot is params":
        state = optree.tree_map(lambda x: x, state)
        state[0].trace[1] = params[1]
    before = _host((params, grads, state))
    with pytest.raises(ValueError, match=r"memory"):
        no.step(tx, params, grads, state, donate=True)
    _assert_same(_host((params, grads, state)), before)


def test_a_chain_of_several_in_place_runs_refuses_before_the_first_writes(cl_queue):
    """trace is fused and written in place before the opaque apply_if_finite: the shared
    params must be refused before that first write."""
    params, grads = _tied_sgd(cl_queue)
    tx = no.chain(no.trace(0.9), no.apply_if_finite(no.scale(-0.1), 3))
    state = tx.init(params)
    state = no.step(tx, params, grads, state)[1]  # a first step: the trace is not zero
    before = _host((params, grads, state))
    with pytest.raises(ValueError, match=r"root\['a'\] of params and leaf root\['b'\]"):
        no.step(tx, params, grads, state, donate=True)
    _assert_same(_host((params, grads, state)), before)


def test_grads_holding_one_array_twice_may_be_donated_with(cl_queue):
    """Only the donated arrays (params, state) must be unshared: grads are only read."""
    g = no.to_device(np.full(3, 2.0, F32), cl_queue)
    host_p = {"a": np.ones(3, F32), "b": np.zeros(3, F32)}
    tx = no.adam(0.1)
    params = no.to_device(host_p, cl_queue)
    expected, _ = no.step(tx, params, {"a": g, "b": g}, tx.init(params))
    donated = no.to_device(host_p, cl_queue)
    got, _ = no.step(tx, donated, {"a": g, "b": g}, tx.init(donated), donate=True)
    _assert_same(_host(got), _host(expected))


# ------------------------------------------------------------------ donated inputs are used up


def _adam_problem(cl_queue, packed, n=5):
    rng = np.random.default_rng(4)
    host_p = [rng.standard_normal((3, k + 1)).astype(F32) for k in range(n)]
    host_g = [rng.standard_normal((3, k + 1)).astype(F32) for k in range(n)]
    put = (lambda t: no.pack(no.to_device(t, cl_queue))) if packed else no.to_device
    return host_p, host_g, put


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-leaf"])
@pytest.mark.parametrize("fresh_grads", [True, False], ids=["fresh-grads", "same-grads"])
def test_donated_inputs_raise_on_any_later_use(cl_queue, packed, fresh_grads):
    host_p, host_g, put = _adam_problem(cl_queue, packed)
    tx = no.chain(no.clip_by_global_norm(1.0), no.adam(1e-2))
    pure_p = put(host_p)
    pure_s = tx.init(pure_p)
    params = put(host_p)
    state = tx.init(params)
    grads = put(host_g)
    for _ in range(3):  # cache miss, then the cached plan (same grads) or misses again
        g = put(host_g) if fresh_grads else grads
        pure_p, pure_s = no.step(tx, pure_p, g, pure_s)
        old_p, old_s = params, state
        spans = [(x.base_data, x.offset) for x in params]
        params, state = no.step(tx, params, g, state, donate=True)
        assert [(x.base_data, x.offset) for x in params] == spans  # the same memory
        assert all(a is not b for a, b in zip(params, old_p, strict=True))
    _assert_same(_host((params, state)), _host((pure_p, pure_s)))

    with pytest.raises(RuntimeError, match=DONATED):
        old_p[0].get()
    with pytest.raises(RuntimeError, match=DONATED):
        _ = old_s[1][0].mu[2].shape
    with pytest.raises(RuntimeError, match=r"leaf root\[0\] of params " + DONATED):
        no.step(tx, old_p, grads, state, donate=True)
    with pytest.raises(RuntimeError, match=r"leaf root\[0\] of state\.mu of scale_by_adam "):
        no.step(tx, params, grads, old_s)
    with pytest.raises(RuntimeError, match=DONATED):
        tx.update(grads, old_s, params)
    with pytest.raises(RuntimeError, match=r"leaf root\[0\] of params " + DONATED):
        no.apply_updates(old_p, grads)
    with pytest.raises(RuntimeError, match=r"Parameter data " + DONATED):
        no.Parameter(old_p[0])
    assert "donated" in repr(old_p[0])
    # the failures changed nothing: the returned trees go on as the pure ones
    params, state = no.step(tx, params, grads, state, donate=True)
    pure_p, pure_s = no.step(tx, pure_p, grads, pure_s)
    _assert_same(_host((params, state)), _host((pure_p, pure_s)))


def test_a_donated_state_is_refused_before_a_chain_of_several_runs_writes(cl_queue):
    tx = no.chain(no.trace(0.9), no.apply_if_finite(no.scale(-0.1), 3))
    params = no.to_device([np.ones(3, F32), np.ones(2, F32)], cl_queue)
    grads = no.to_device([np.ones(3, F32), np.ones(2, F32)], cl_queue)
    state = tx.init(params)
    new_p, new_s = no.step(tx, params, grads, state, donate=True)
    before = _host((new_p, new_s))
    with pytest.raises(RuntimeError, match=r"leaf root\[0\]\[1\]\[0\] of state " + DONATED):
        no.step(tx, new_p, grads, state, donate=True)
    _assert_same(_host((new_p, new_s)), before)


def test_the_stateful_step_keeps_its_arrays(cl_queue):
    """The stateful layer runs in place but donates nothing: .data and the state stay the
    same, usable objects."""
    p = no.Parameter(no.to_device(np.ones(4, F32), cl_queue))
    opt = no.Adam([p], lr=0.1)
    data = p.data
    for _ in range(2):
        p.grad = no.to_device(np.ones(4, F32), cl_queue)
        opt.step()
    assert p.data is data
    assert opt.state[p]["exp_avg"].get().shape == (4,)


_WRAPPED = {
    "multi_steps": lambda: no.MultiSteps(no.adam(0.1), 2),
    "multi_steps-opaque": lambda: no.MultiSteps(no.apply_if_finite(no.adam(0.1), 2), 2),
    "apply_if_finite": lambda: no.apply_if_finite(no.sgd(0.1, momentum=0.9), 2),
    "chain-opaque": lambda: no.chain(no.trace(0.9), no.apply_if_finite(no.scale(-0.1), 3)),
    "chain-segments": lambda: no.chain(no.trace(0.9), no.clip_by_global_norm(0.5), no.scale(-0.1)),
    "inject_hyperparams": lambda: no.inject_hyperparams(no.adam)(learning_rate=0.1),
    "masked": lambda: no.chain(
        no.masked(no.adam(0.1), {"a": True, "b": False, "e": True}), no.scale(-0.1)
    ),
    "partition": lambda: no.partition(
        {"x": no.adam(0.1), "y": no.sgd(0.1, momentum=0.9)}, {"a": "x", "b": "y", "e": "x"}
    ),
}
_EVERY_TX = {**{c.id: (lambda c=c: c.make(no)) for c in CASES}, **_WRAPPED}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-leaf"])
@pytest.mark.parametrize("name", list(_EVERY_TX))
def test_donated_steps_equal_pure_steps_for_every_transform(cl_queue, name, packed):
    """Bit for bit, and every array returned is usable (none of them is a donated one)."""
    rng = np.random.default_rng(5)
    shapes = {"a": (3, 4), "b": (5,), "e": (0,)}
    host_p = {k: rng.standard_normal(s).astype(F32) for k, s in shapes.items()}
    put = (lambda t: no.pack(no.to_device(t, cl_queue))) if packed else no.to_device
    tx = _EVERY_TX[name]()
    pure_p = put(host_p)
    pure_s = tx.init(pure_p)
    params = put(host_p)
    state = tx.init(params)
    for _ in range(4):
        grads = put({k: rng.standard_normal(s).astype(F32) for k, s in shapes.items()})
        pure_p, pure_s = no.step(tx, pure_p, grads, pure_s)
        params, state = no.step(tx, params, grads, state, donate=True)
    _assert_same(_host((params, state)), _host((pure_p, pure_s)))


# ------------------------------------------------------------------ another OpenCL context


@pytest.fixture
def other_queue(cl_queue):
    return cl.CommandQueue(cl.Context([cl_queue.device]))


@pytest.mark.parametrize("foreign", [("a", "b"), ("b",)], ids=["all-grads", "one-grad"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_grads_from_another_context_are_blamed_not_the_params(cl_queue, other_queue, name, foreign):
    tx = no.sgd(0.1) if name == "sgd" else no.adam(0.1)
    host = {"a": np.ones(2, F32), "b": np.ones(3, F32)}
    params = no.to_device(host, cl_queue)
    grads = {k: no.to_device(v, other_queue if k in foreign else cl_queue) for k, v in host.items()}
    state = tx.init(params)
    match = rf"leaf root\['{foreign[0]}'\] of grads belongs to another OpenCL context than params"
    with pytest.raises(ValueError, match=match):
        no.step(tx, params, grads, state)
    with pytest.raises(ValueError, match=match):
        no.step(tx, params, grads, state, donate=True)
    if name == "adam":
        match = rf"leaf root\['{foreign[0]}'\] of updates belongs to another OpenCL context"
        with pytest.raises(ValueError, match=match + r" than state\.mu of scale_by_adam"):
            tx.update(grads, state, params)


def test_params_and_state_from_another_context_are_named(cl_queue, other_queue):
    tx = no.adam(0.1)
    host = {"a": np.ones(2, F32), "b": np.ones(3, F32)}
    params = no.to_device(host, cl_queue)
    grads = no.to_device(host, cl_queue)
    foreign = {"a": params["a"], "b": no.to_device(host["b"], other_queue)}
    with pytest.raises(ValueError, match=r"leaf root\['b'\] of params belongs to another"):
        no.step(tx, foreign, grads, tx.init(params))
    with pytest.raises(ValueError, match=r"leaf root\['a'\] of state\.mu of scale_by_adam"):
        no.step(tx, params, grads, tx.init(no.to_device(host, other_queue)))


def test_the_plan_cache_drops_the_donated_arrays(cl_queue):
    """A donated step re-keys its cached plan to the new arrays: no entry keeps growing."""
    host_p, host_g, put = _adam_problem(cl_queue, True)
    tx = no.adam(1e-2)
    params, grads = put(host_p), put(host_g)
    state = tx.init(params)
    _cache._entries.clear()
    for _ in range(5):
        params, state = no.step(tx, params, grads, state, donate=True)
    assert len(_cache._entries) == 1
