"""A state is checked against the structure its transform's ``init`` makes (issue 14, item 8);
every transform-like object the library returns works in ``step`` (item 9)."""

from __future__ import annotations

import gc
import weakref
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest

import netcl_optim as no
from netcl_optim.transforms._masking import masked
from netcl_optim.transforms._wrappers import MultiSteps, apply_if_finite, partition


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _host(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }


def _bits(tree) -> list:
    """Every leaf on the host: arrays as (dtype, shape, raw bytes), other leaves as they are."""
    return [
        (x.dtype.str, x.shape, x.tobytes()) if isinstance(x, np.ndarray) else x
        for x in optree.tree_leaves(no.to_host(tree), none_is_leaf=True)
    ]


def _assert_same(a, b) -> None:
    assert _bits(a) == _bits(b)


def _labels(params):
    return {"w": "decay", "b": "plain"}


def _inject_adam():
    return no.inject_hyperparams(no.adam)(learning_rate=0.1, b1=0.9)


# (transform, foreign transform whose state is passed to it, what the error names)
FOREIGN = {
    "adam->rmsprop": (
        lambda: no.rmsprop(0.1),
        lambda: no.adam(0.1),
        r"expected ScaleByRmsState at state\[0\], got ScaleByAdamState",
    ),
    "sgd->adam": (
        lambda: no.adam(0.1),
        lambda: no.sgd(0.1),
        r"expected a tuple of 2 states .* at state, got a tuple of 1",
    ),
    "momentum->adam": (
        lambda: no.adam(0.1),
        lambda: no.sgd(0.1, momentum=0.9),
        r"expected ScaleByAdamState at state\[0\], got TraceState",
    ),
    "adam->momentum": (
        lambda: no.sgd(0.1, momentum=0.9),
        lambda: no.adam(0.1),
        r"expected TraceState at state\[0\], got ScaleByAdamState",
    ),
    "chain3->chain2": (
        lambda: no.chain(no.clip(1.0), no.scale_by_adam(), no.scale(-0.1)),
        lambda: no.adam(0.1),
        r"expected a tuple of 3 states .* at state, got a tuple of 2",
    ),
    "bare->chain": (
        lambda: no.adam(0.1),
        lambda: no.scale_by_adam(),
        r"expected a tuple of 2 states .* at state, got ScaleByAdamState",
    ),
    "named_chain keys": (
        lambda: no.named_chain(("adam", no.scale_by_adam()), ("lr", no.scale(-0.1))),
        lambda: no.named_chain(("rms", no.scale_by_rms()), ("lr", no.scale(-0.1))),
        r"expected a dict with keys 'adam', 'lr' at state, got a dict with keys 'lr', 'rms'",
    ),
    "inject adam->inject sgd": (
        lambda: no.inject_hyperparams(no.sgd)(learning_rate=0.1, momentum=0.9),
        _inject_adam,
        r"at state\.hyperparams, got a dict with keys 'b1', 'learning_rate'",
    ),
    "inject inner state": (
        lambda: no.inject_hyperparams(no.rmsprop)(learning_rate=0.1),
        lambda: no.inject_hyperparams(no.adam)(learning_rate=0.1),
        r"expected ScaleByRmsState at state\.inner_state\[0\], got ScaleByAdamState",
    ),
    "bare->inject": (
        _inject_adam,
        lambda: no.adam(0.1),
        r"expected InjectHyperparamsState at state, got a tuple of 2",
    ),
    "masked inner": (
        lambda: masked(no.adam(0.1), {"w": True, "b": False}),
        lambda: masked(no.rmsprop(0.1), {"w": True, "b": False}),
        r"expected ScaleByAdamState at state\.inner_state\[0\], got ScaleByRmsState",
    ),
    "partition labels": (
        lambda: partition({"decay": no.adamw(0.1), "plain": no.adam(0.1)}, _labels),
        lambda: partition(
            {"decay": no.adamw(0.1), "other": no.adam(0.1)}, lambda p: {"w": "decay", "b": "other"}
        ),
        r"expected a dict with keys 'decay', 'plain' at state\.inner_states",
    ),
    "partition inner": (
        lambda: partition({"decay": no.adamw(0.1), "plain": no.adam(0.1)}, _labels),
        lambda: partition({"decay": no.adamw(0.1), "plain": no.sgd(0.1)}, _labels),
        r"at state\.inner_states\['plain'\]\.inner_state, got a tuple of 1",
    ),
    "multisteps inner": (
        lambda: MultiSteps(no.adam(0.1), 2),
        lambda: MultiSteps(no.rmsprop(0.1), 2),
        r"expected ScaleByAdamState at state\.inner_opt_state\[0\], got ScaleByRmsState",
    ),
    "bare->multisteps": (
        lambda: MultiSteps(no.adam(0.1), 2),
        lambda: no.adam(0.1),
        r"expected MultiStepsState at state, got a tuple of 2",
    ),
    "apply_if_finite inner": (
        lambda: apply_if_finite(no.adam(0.1), 2),
        lambda: apply_if_finite(no.sgd(0.1, momentum=0.9), 2),
        r"expected ScaleByAdamState at state\.inner_state\[0\], got TraceState",
    ),
    "bare->apply_if_finite": (
        lambda: apply_if_finite(no.adam(0.1), 2),
        lambda: no.adam(0.1),
        r"expected ApplyIfFiniteState at state, got a tuple of 2",
    ),
    "dynamic_loss_scale inner": (
        lambda: no.dynamic_loss_scale(inner=no.adam(0.1)),
        lambda: no.dynamic_loss_scale(inner=no.sgd(0.1, momentum=0.9)),
        r"expected ScaleByAdamState at state\.inner_state\[0\], got TraceState",
    ),
    "bare->dynamic_loss_scale": (
        lambda: no.dynamic_loss_scale(inner=no.adam(0.1)),
        lambda: no.adam(0.1),
        r"expected DynamicLossScaleState at state, got a tuple of 2",
    ),
    "chain of wrappers": (
        lambda: no.chain(apply_if_finite(no.adam(0.1), 2), no.scale(1.0)),
        lambda: no.chain(apply_if_finite(no.rmsprop(0.1), 2), no.scale(1.0)),
        r"expected ScaleByAdamState at state\[0\]\.inner_state\[0\], got ScaleByRmsState",
    ),
}

_PREFIX = "state does not match this transform: "
_SUFFIX = "pass the state that this optimizer's init returned"


@pytest.mark.parametrize("how", ["update", "step", "donate"])
@pytest.mark.parametrize("case", list(FOREIGN), ids=list(FOREIGN))
def test_foreign_state_is_refused_and_nothing_changes(q, case, how):
    make, make_other, where = FOREIGN[case]
    tx, other = make(), make_other()
    params = no.to_device(_host(0), q)
    grads = no.to_device(_host(1), q)
    state = other.init(params)
    before = (_bits(params), _bits(grads), _bits(state))
    with pytest.raises(ValueError, match=_PREFIX) as err:
        if how == "update":
            tx.update(grads, state, params)
        else:
            no.step(tx, params, grads, state, donate=how == "donate")
    assert err.match(where) and _SUFFIX in str(err.value)
    assert (_bits(params), _bits(grads), _bits(state)) == before
    # the state still works with its own transform
    other.update(grads, state, params)


@pytest.mark.parametrize("case", list(FOREIGN), ids=list(FOREIGN))
def test_own_state_still_works(q, case, tmp_path):
    tx = FOREIGN[case][0]()
    params = no.to_device(_host(0), q)
    state = tx.init(params)
    for i in range(3):
        _, state = tx.update(no.to_device(_host(10 + i), q), state, params)
    no.save(tmp_path / "s.npz", state)  # a reloaded state has the same structure
    tx.update(no.to_device(_host(20), q), no.load(tmp_path / "s.npz", queue=q), params)


def test_stateless_chain_accepts_its_empty_states(q):
    params = no.to_device(_host(0), q)
    tx = no.chain(no.identity(), no.scale(2.0), no.zero_nans())
    state = tx.init(params)
    assert state == (no.EmptyState(),) * 3
    with pytest.raises(ValueError, match=r"a tuple of 3 states .* got a tuple of 2"):
        tx.update(params, state[:2], params)


class _MyState(NamedTuple):
    count: int
    acc: Any


def test_user_transforms_are_checked_as_far_as_known(q):
    """An elementwise transform's state type is what its init returns; a user-written opaque
    transform's state is not checked, but the chain around it still is."""
    mine = no.elementwise(
        no.Fragment("mine", "acc = acc + u; u = acc;", slots=("acc",)),
        init=lambda acc: _MyState(0, acc),
    )
    params = no.to_device(_host(0), q)
    state = mine.init(params)
    mine.update(params, state, params)
    with pytest.raises(ValueError, match=r"expected _MyState at state, got TraceState"):
        mine.update(params, no.trace(0.9).init(params), params)

    def keep(updates, state, params=None):
        return updates, state

    tx = no.chain(no.GradientTransformation(lambda p: "anything", keep), no.scale(2.0))
    tx.update(params, ("something else", no.EmptyState()), params)
    with pytest.raises(ValueError, match=r"expected EmptyState at state\[1\], got a str"):
        tx.update(params, ("something else", "x"), params)


def test_the_registry_keeps_no_transform_alive(q):
    params = no.to_device(_host(0), q)
    updates = []
    for _ in range(20):
        tx = apply_if_finite(MultiSteps(_inject_adam(), 2), 1)
        tx.update(params, tx.init(params), params)
        updates.append(weakref.ref(tx.update))
    del tx
    gc.collect()
    assert [ref() for ref in updates] == [None] * 20  # registered and checked, not kept alive


# ---------------------------------------------------------------------------- item 9


def _run(tx, how, params, grads_seq, state, **extra):
    for g in grads_seq:
        if how == "update":
            u, state = tx.update(g, state, params, **extra)
            params = no.apply_updates(params, u)
        else:
            params, state = no.step(tx, params, g, state, donate=how == "donate", **extra)
    return params, state


def _opaque_sgd():
    sgd = no.sgd(0.1, momentum=0.9)
    return no.GradientTransformation(sgd.init, sgd.update)


@pytest.mark.parametrize("inner", ["adam", "opaque"])
def test_multisteps_in_step_pure_and_donated(q, inner):
    make = (lambda: no.adam(1e-2)) if inner == "adam" else _opaque_sgd
    grads = [no.to_device(_host(30 + i), q) for i in range(5)]
    results = {}
    for how in ["update", "step", "donate", "chain", "gradient_transformation"]:
        ms = MultiSteps(make(), 2)
        tx = {"chain": no.chain(ms), "gradient_transformation": ms.gradient_transformation()}
        tx = tx.get(how, ms)
        params = no.to_device(_host(0), q)
        mode = "step" if how in ("chain", "gradient_transformation") else how
        params, state = _run(tx, mode, params, grads, tx.init(params))
        results[how] = (params, state if how != "chain" else state[0])
    want = results.pop("update")
    assert want[1].gradient_step == 2 and want[1].mini_step == 1
    for how, got in results.items():
        _assert_same(got, want)
        assert type(got[1]) is type(want[1]), how


LIBRARY = {
    "sgd": lambda: no.sgd(0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda: no.adamw(0.1, weight_decay=0.1),
    "adamw_mask": lambda: no.adamw(0.1, weight_decay=0.1, mask=no.weight_decay_mask),
    "rmsprop": lambda: no.rmsprop(0.1, centered=True),
    "named_chain": lambda: no.named_chain(
        ("clip", no.clip_by_global_norm(1.0)), ("sgd", no.sgd(0.1))
    ),
    "identity": no.identity,
    "zero_nans": no.zero_nans,
    "inject": _inject_adam,
    "masked": lambda: masked(no.adam(0.1), {"w": True, "b": False}),
    "partition": lambda: partition({"decay": no.adamw(0.1), "plain": no.adam(0.1)}, _labels),
    "apply_if_finite": lambda: apply_if_finite(no.adam(0.1), 2),
    "multisteps": lambda: MultiSteps(no.adam(0.1), 2),
    "multisteps_opaque": lambda: MultiSteps(_opaque_sgd(), 2),
    "plateau": lambda: no.chain(no.sgd(0.1), no.reduce_on_plateau()),
    "loss_scale": lambda: no.dynamic_loss_scale(1.0, inner=no.adam(0.1)),
    "chain_of_all": lambda: no.chain(
        apply_if_finite(MultiSteps(no.adam(0.1), 2), 1), MultiSteps(no.scale(1.0), 1)
    ),
}


@pytest.mark.parametrize("name", list(LIBRARY))
def test_every_library_transform_works_in_step(q, name):
    grads = [no.to_device(_host(40 + i), q) for i in range(3)]
    results = {}
    for how in ["update", "step", "donate"]:
        tx = LIBRARY[name]()
        params = no.to_device(_host(0), q)
        extra = {"value": 1.0} if name == "plateau" else {}
        results[how] = _run(tx, how, params, grads, tx.init(params), **extra)
    for how in ["step", "donate"]:
        _assert_same(results[how], results["update"])


def test_step_refuses_a_non_transform(q):
    params = no.to_device(_host(0), q)
    with pytest.raises(TypeError, match=r"tx is a int, not a transform"):
        no.step(5, params, params, ())
    with pytest.raises(TypeError, match=r"chain: argument 1 is a str, not a transform"):
        no.chain(no.scale(1.0), "adam")


def test_distributed_transforms_check_their_state(q):
    pytest.importorskip("mpi4py")
    from netcl_optim.distributed import allreduce_gradients, shard_optimizer

    params = no.pack(no.to_device(_host(0)))
    grads = no.pack(no.to_device(_host(1)))
    reduce_tx = allreduce_gradients()
    with pytest.raises(ValueError, match=r"expected EmptyState at state, got TraceState"):
        reduce_tx.update(grads, no.trace(0.9).init(params), params)
    sharded = shard_optimizer(no.adam(0.1))
    with pytest.raises(ValueError, match=r"expected ShardState at state\[0\], got a tuple of 2"):
        no.step(no.chain(sharded), params, grads, (no.adam(0.1).init(params),))
