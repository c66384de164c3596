"""schedule_free (optax.contrib's wrapper): any base optimizer made schedule-free, fused with
it into one kernel, and ``schedule_free_eval_params``. The aliases (``schedule_free_adamw``,
``schedule_free_sgd``) and the stateful classes are in ``optimizers/schedule_free.py``."""

from __future__ import annotations

__all__ = ["ScheduleFreeState", "schedule_free", "schedule_free_eval_params"]

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np
import optree

from .. import _validation
from .._base import (
    PARAMS,
    Fragment,
    GradientTransformation,
    Part,
    Rebuild,
    ScalarOrSchedule,
    as_transform,
    is_elementwise,
    is_fusible,
    signature_of,
)
from .._state_check import NamedTupleSpec, check_state, register, spec_of
from .._validation import NON_NEGATIVE, interval, require
from ..fusion import execute, init_slots, run_parts
from ._combining import elementwise
from ._storage import low_precision_state

# optax.contrib's update, in its order, per element (scalars from the host):
#   z' = z + u;  x = (1 - ck) ((y - (1 - b1) z) / b1) + ck z';  y' = b1 x + (1 - b1) z'
# and the update is y' - y (applied as y + (y' - y), as optax.apply_updates does). XLA
# divides by a scalar as a product with its reciprocal (rounded in the leaf's precision):
# so does this, for optax's bits
_SCHEDULE_FREE = """
const real z_old = z;
z = z + u;
const real x = one_minus_ck * ((p - one_minus_b1 * z_old) * inv_b1) + ck * z;
u = (b1 * x + one_minus_b1 * z) - p;
"""
# schedule_free_eval_params: x = (y - (1 - b1) z) / b1, y read as the updates and z as the
# params (z stored otherwise than the params: as a slot)
_EVAL_PARAMS = "u = (u - one_minus_b1 * p) * inv_b1;"
_EVAL_PARAMS_SLOT = "u = (u - one_minus_b1 * z) * inv_b1;"

B1 = interval(0, 1, "(]")  # optax: b1 > 0


class ScheduleFreeState(NamedTuple):
    """optax.contrib's state: ``b1``, the sum of the averaging weights ``weight_sum``, the
    step count ``step_count`` (from 1, the argument of a learning-rate schedule), the largest
    learning rate so far ``max_lr`` (host numbers: Python floats holding the values optax
    computes in the params' precision, and an int), the base optimizer's state and ``z``
    (shaped like the params; a copy of them at ``init``)."""

    b1: float
    weight_sum: float
    step_count: int
    max_lr: float
    base_optimizer_state: Any
    z: Any


class _ZState(NamedTuple):
    """The schedule-free fragment's own state (only its slot)."""

    z: Any


_SF_FRAGMENT = Fragment(
    "schedule_free",
    _SCHEDULE_FREE,
    slots=("z",),
    scalars=("b1", "one_minus_b1", "inv_b1", "ck", "one_minus_ck"),
    needs_params=True,
    slot_init=(PARAMS,),
)
_EVAL_FRAGMENT = Fragment(
    "schedule_free_eval_params", _EVAL_PARAMS, scalars=("one_minus_b1", "inv_b1"),
    needs_params=True,
)  # fmt: skip
_EVAL_SLOT_FRAGMENT = Fragment(
    "schedule_free_eval_params_slot", _EVAL_PARAMS_SLOT, slots=("z",),
    scalars=("one_minus_b1", "inv_b1"),
)  # fmt: skip


def _compute_dtype(z: Any) -> type:
    """The precision of the host numbers: optax's, the params' (float64 for a float64 tree,
    float32 for a float32 one); a tree that mixes float64 with other leaves gets float64
    (optax: the lowest), so that its float64 leaves keep float64's accuracy."""
    wide = any(getattr(x, "dtype", None) == np.float64 for x in optree.tree_leaves(z))
    return np.float64 if wide else np.float32


def _ck(weight: Any, total: Any, dt: type) -> Any:
    """optax's ``nan_to_num(weight / total, nan=0, posinf=inf)``, NaN where either is NaN."""
    if math.isnan(weight) or math.isnan(total):
        return dt(math.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = weight / total
    if math.isnan(q):
        return dt(0.0)
    if q == -math.inf:
        return np.finfo(dt).min
    return q


class _ScheduleFreePlan:
    """schedule_free's :class:`~netcl_optim._base.Plan`: the base optimizer's parts, then the
    schedule-free fragment (slot ``z``, scalars from the state's host numbers), one kernel."""

    def __init__(
        self,
        base: GradientTransformation,
        learning_rate: ScalarOrSchedule,
        b1: float,
        weight_lr_power: float,
    ) -> None:
        self.base = base
        self.learning_rate = learning_rate
        self.b1 = b1
        self.weight_lr_power = weight_lr_power
        z_tx = elementwise(_SF_FRAGMENT, init=lambda z: _ZState(z))
        self.children = (base, z_tx)
        self.fusible = is_fusible(base)
        self.elementwise = is_elementwise(base)
        self.signature: Hashable = ("schedule_free", signature_of(base))

    def split(self, state: ScheduleFreeState) -> None:
        return None

    def part(self, state: ScheduleFreeState) -> tuple[Part, dict[str, Any]]:
        """The schedule-free fragment's part and the state's new host numbers (optax's
        float order, in the params' precision)."""
        dt = _compute_dtype(state.z)
        lr = self.learning_rate
        lr = lr(state.step_count) if callable(lr) else lr
        max_lr = np.maximum(dt(state.max_lr), dt(lr))
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            weight = max_lr ** dt(self.weight_lr_power)
            total = dt(state.weight_sum) + weight
        ck = dt(_ck(weight, total, dt))
        b1 = self.b1  # (a Python number in optax: rounded to each leaf's dtype)
        inv_b1 = float(dt(1.0) / dt(b1))
        scalars = (b1, 1.0 - b1, inv_b1, float(ck), float(dt(1.0) - ck))
        host = {"weight_sum": float(total), "max_lr": float(max_lr),
                "step_count": state.step_count + 1}  # fmt: skip
        return Part(_SF_FRAGMENT, scalars, (state.z,)), host

    def parts(
        self, state: ScheduleFreeState, extra_args: dict[str, Any]
    ) -> tuple[list[Part], Rebuild]:
        assert self.base.plan is not None  # (parts: only when fusible)
        base_parts, base_rebuild = self.base.plan.parts(state.base_optimizer_state, extra_args)
        part, host = self.part(state)
        n = len(base_parts)

        def rebuild(new_slots: list[tuple[Any, ...]]) -> ScheduleFreeState:
            return state._replace(
                base_optimizer_state=base_rebuild(new_slots[:n]), z=new_slots[n][0], **host
            )

        return [*base_parts, part], rebuild


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
    state_dtype: Any = None,
) -> GradientTransformation:
    """Make ``base_optimizer`` schedule-free (optax.contrib's ``schedule_free``: its
    signature, defaults, state and order of operations)::

        u = base(g, params=y)                    (the base optimizer, without momentum)
        lr = learning_rate(t) (t from 1);  max_lr = max(max_lr, lr)
        w = max_lr ** weight_lr_power;  W <- W + w;  ck = w / W   (0 where 0/0)
        z' = z + u;  x = (1 - ck) (y - (1 - b1) z) / b1 + ck z';  y' = b1 x + (1 - b1) z'
        update = y' - y

    The params are ``y``; evaluate at ``x`` with :func:`schedule_free_eval_params`. ``b1`` in
    (0, 1] (optax: > 0), ``weight_lr_power >= 0``; ``state_dtype``: how ``z`` is stored
    (float32, bfloat16, float16; only ``z``, as optax; within a step the kernel goes on with
    the unrounded ``z'``, optax with the rounded one). The host numbers of the state are
    Python floats, computed (numpy) in the params' precision as optax computes its device
    scalars; a tree mixing float64 with float32 leaves computes them in float64 (optax: in
    the lowest precision).

    Device: one fused kernel per packed tree: the base optimizer's element-wise fragments,
    then ``z``, ``x`` and ``y'`` (a base optimizer that is not fusible runs its own update
    first). No host sync.
    """
    base = as_transform(base_optimizer, "schedule_free: base_optimizer")
    _validation.learning_rate("learning_rate", learning_rate)
    b1 = require("b1", b1, B1)
    weight_lr_power = require("weight_lr_power", weight_lr_power, NON_NEGATIVE)
    plan = _ScheduleFreePlan(base, learning_rate, b1, weight_lr_power)

    def init(params: Any) -> ScheduleFreeState:
        (z,) = init_slots(params, (PARAMS,), ("z",))
        return ScheduleFreeState(b1, 0.0, 1, 0.0, base.init(params), z)

    def update(
        updates: Any, state: ScheduleFreeState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ScheduleFreeState]:
        if params is None:
            raise ValueError("schedule_free needs params: call update(updates, state, params)")
        if plan.fusible:
            return execute(
                tx, updates, state, params, apply=False, inplace=False, extra_args=extra_args
            )
        check_state(tx, state)
        base_updates, base_state = base.update(
            updates, state.base_optimizer_state, params, **extra_args
        )
        part, host = plan.part(state)
        out, (new_slots,) = run_parts([part], base_updates, params, apply=False, inplace=False)
        return out, state._replace(base_optimizer_state=base_state, z=new_slots[0], **host)

    tx = GradientTransformation(init, update, plan)
    tx = register(
        tx,
        lambda: NamedTupleSpec(ScheduleFreeState, {"base_optimizer_state": spec_of(base)}),
    )
    return low_precision_state(tx, state_dtype, slots=("z",))


def schedule_free_eval_params(state: ScheduleFreeState, params: Any) -> Any:
    """The params to evaluate at, ``x = (y - (1 - b1) z) / b1`` (optax.contrib's
    ``schedule_free_eval_params``; ``1 - b1`` in the params' precision from ``state.b1``, as
    optax's float32 ``state.b1``). Pure: a fresh tree; ``params`` and ``state`` unchanged.

    Device: one launch per packed tree, reading ``y`` and ``z`` and writing ``x`` (a ``z``
    stored in another dtype than the params is read as a slot: the pure kernel then also
    writes a copy of it, dropped)."""
    b1 = getattr(state, "b1", None)
    z = getattr(state, "z", None)
    if not isinstance(state, ScheduleFreeState) or b1 is None or z is None:
        raise ValueError(
            "schedule_free_eval_params requires a ScheduleFreeState (the state of "
            f"schedule_free), got {type(state).__name__}"
        )
    dt = _compute_dtype(z)
    scalars = (float(dt(1.0) - dt(b1)), float(dt(1.0) / dt(b1)))
    y_leaves, z_leaves = optree.tree_leaves(params), optree.tree_leaves(z)
    same = len(y_leaves) == len(z_leaves) and all(
        getattr(a, "dtype", None) == getattr(b, "dtype", None)
        for a, b in zip(y_leaves, z_leaves, strict=True)
    )
    if same:
        out, _ = run_parts([Part(_EVAL_FRAGMENT, scalars, ())], params, z, apply=False,
                           inplace=False)  # fmt: skip
        return out
    part = Part(_EVAL_SLOT_FRAGMENT, scalars, (z,))
    out, _ = run_parts([part], params, None, apply=False, inplace=False)
    return out
