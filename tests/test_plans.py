"""The Plan protocol (``netcl_optim._base``): what every transform and wrapper tells the
executor, and the executor's walk over it."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim._base import OpaquePlan, Plan, is_elementwise, is_fusible, signature_of
from netcl_optim.fusion import walk
from netcl_optim.transforms._masking import masked
from netcl_optim.transforms._wrappers import MultiSteps, apply_if_finite, partition


def _opaque(tx: no.GradientTransformation) -> no.GradientTransformation:
    return no.GradientTransformation(tx.init, tx.update)


def _wrappers() -> dict[str, tuple[no.GradientTransformation, bool, bool]]:
    """name: (transform, fusible, elementwise)"""
    adam = no.adam(1e-2)
    return {
        "fragment": (no.scale(2.0), True, True),
        "reduction": (no.clip_by_global_norm(1.0), True, False),
        "chain": (no.chain(no.trace(0.9), no.scale(-0.1)), True, True),
        "chain-opaque": (no.chain(no.trace(0.9), _opaque(no.scale(-0.1))), False, False),
        "named_chain": (no.named_chain(("a", no.scale(2.0)), ("b", adam)), True, True),
        "inject": (no.inject_hyperparams(no.adam)(learning_rate=1e-2), True, True),
        "multi_steps": (MultiSteps(adam, 2).gradient_transformation(), True, True),
        "multi_steps-opaque": (
            MultiSteps(_opaque(adam), 2).gradient_transformation(),
            False,
            False,
        ),
        "masked": (masked(adam, lambda p: True), False, False),
        "partition": (partition({"a": adam}, lambda p: "a"), False, False),
        "apply_if_finite": (apply_if_finite(adam, 1), False, False),
    }


@pytest.mark.parametrize("name", list(_wrappers()))
def test_every_wrapper_implements_the_plan(name):
    tx, fusible, elementwise = _wrappers()[name]
    plan = tx.plan
    assert isinstance(plan.children, tuple)
    assert all(isinstance(c, no.GradientTransformation) for c in plan.children)
    assert isinstance(plan.signature, Hashable) and hash(plan.signature) is not None
    assert (plan.fusible, plan.elementwise) == (fusible, elementwise)
    assert (is_fusible(tx), is_elementwise(tx)) == (fusible, elementwise)
    for attr in Plan.__dict__:
        if not attr.startswith("_"):
            assert hasattr(plan, attr), attr


def test_a_user_transform_is_opaque():
    tx = _opaque(no.adam(1e-2))
    assert tx.plan is None and not is_fusible(tx) and signature_of(tx) == ("opaque",)
    assert list(walk(tx)) == [tx]


def test_opaque_plans_have_no_parts():
    with pytest.raises(TypeError, match="masked runs its own update"):
        OpaquePlan("masked", ()).parts(None, {})


def test_signatures_tell_state_structures_apart():
    assert signature_of(no.adam(1e-2)) == signature_of(no.adam(0.5, b1=0.5))
    assert signature_of(no.adam(1e-2)) != signature_of(no.adam(1e-2, weight_decay=0.1))
    assert signature_of(masked(no.sgd(0.1), {})) != signature_of(masked(no.adam(0.1), {}))


def test_walk_visits_children_before_their_parent():
    inner = no.chain(no.clip_by_global_norm(1.0), no.sgd(0.1))
    tx = apply_if_finite(inner, 1)
    order = list(walk(tx))
    assert order[-1] is tx and order[-2] is inner
    assert order[0] is inner.plan.children[0]


def test_a_fragment_is_a_leaf_plan(cl_queue):
    frag = no.scale(3.0).plan
    assert frag.children == () and frag.split(None) is None
    params = no.to_device({"w": np.ones(4, np.float32)}, cl_queue)
    tx = no.scale(3.0)
    parts, rebuild = frag.parts(tx.init(params), {})
    assert [p.fragment for p in parts] == [frag] and parts[0].scalars == (3.0,)
    assert rebuild([()]) == tx.init(params)


def test_the_sharded_optimizer_is_an_opaque_wrapper():
    MPI = pytest.importorskip("mpi4py.MPI")
    import netcl_optim.distributed as dist

    inner = no.adam(1e-2)
    tx = dist.shard_optimizer(inner, MPI.COMM_SELF)
    assert tx.plan.children == (inner,) and not is_fusible(tx)
    assert signature_of(tx) == ("shard_optimizer", signature_of(inner))
