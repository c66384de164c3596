"""optax's wrappers: apply_if_finite, zero_nans, partition (multi_transform), MultiSteps."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree
import pyopencl.array as cla

from .._base import (
    Fragment,
    GradientTransformation,
    OpaquePlan,
    OptState,
    Part,
    Rebuild,
    as_transform,
    is_elementwise,
    is_fusible,
    signature_of,
)
from .._device import check_float_dtype, queue_of
from .._packing import allocate_like
from .._state_check import DictSpec, NamedTupleSpec, check_state, register, wrapper, wrapper_spec
from .._validation import at_least, require
from ..fusion import execute, init_slots, reduce_leaves, run_parts
from ._combining import elementwise
from ._masking import MaskedState, masked

# ---------------------------------------------------------------------------- helpers


def noop_updates(updates: Any) -> Any:
    """Updates of ``-0.0`` shaped like ``updates``, packed in one fresh buffer per dtype.

    ``-0.0`` rather than ``+0.0``: ``p + (-0.0) == p`` bit for bit for every ``p`` (also
    ``-0.0``, inf and NaN), so applying a skipped step leaves the params bit-identical.

    Device: one fill command per dtype (no kernel); no host sync.
    """
    leaves, treedef = optree.tree_flatten(updates)
    if not leaves:
        return updates
    queue = queue_of(leaves)
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(f"leaf {i} is a {type(x).__name__}, not a pyopencl.array.Array")
        check_float_dtype(x.dtype, queue, "updates")
    return optree.tree_unflatten(treedef, allocate_like(leaves, queue, fill=-0.0))


def all_finite_host(updates: Any) -> bool:
    """Whether every element of every leaf of ``updates`` is finite (no inf, no NaN).

    Device: one "nonfinite" reduction (a partials launch per packed run or leaf, one
    finishing launch), then **one host read** of its result. An empty tree is finite.
    """
    leaves = optree.tree_leaves(updates)
    if not any(x.size for x in leaves):
        return True
    flag = reduce_leaves(queue_of(leaves), leaves, "nonfinite", "flag")
    return float(flag.get()[0]) == 0.0


# ---------------------------------------------------------------------------- apply_if_finite


class ApplyIfFiniteState(NamedTuple):
    """Consecutive non-finite updates (``notfinite_count``), whether the last one was
    finite, all non-finite updates so far, and the inner state. Counts are host ints."""

    notfinite_count: int
    last_finite: bool
    total_notfinite: int
    inner_state: Any


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int
) -> GradientTransformation:
    """Run ``inner`` only on finite updates (optax semantics).

    An update with any inf or NaN gives zero updates (``-0.0``, see :func:`noop_updates`)
    and keeps ``inner``'s state; after more than ``max_consecutive_errors`` non-finite
    updates in a row, the update is passed to ``inner`` anyway.

    Device:
      One non-finite reduction over the incoming updates and **one host read** (4 bytes,
      ~80 us on PoCL) per update: optax decides with ``lax.cond`` on the device, but the
      inner transform's host counters (Adam's step, schedules) need the answer on the
      host. Then ``inner``'s own launches, or one fill when the step is skipped.
    """
    limit = require("max_consecutive_errors", max_consecutive_errors, at_least(0))
    inner = as_transform(inner, "apply_if_finite: inner")

    def init(params: Any) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(0, True, 0, inner.init(params))

    def update(
        updates: Any, state: ApplyIfFiniteState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, OptState]:
        check_state(tx, state)
        finite = all_finite_host(updates)
        count = 0 if finite else state.notfinite_count + 1
        if finite or count > limit:
            new, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        else:
            new, inner_state = noop_updates(updates), state.inner_state
        total = state.total_notfinite + (0 if finite else 1)
        return new, ApplyIfFiniteState(count, finite, total, inner_state)

    tx = GradientTransformation(init, update, OpaquePlan("apply_if_finite", (inner,)))
    return register(tx, wrapper(ApplyIfFiniteState, "inner_state", inner))


# ---------------------------------------------------------------------------- zero_nans


def zero_nans() -> GradientTransformation:
    """Replace NaN updates by 0 (infinities are kept). Stateless.

    Unlike optax's ``zero_nans`` the state records no ``found_nan`` flags (that would
    need a reduction and a host read): use :func:`apply_if_finite` to detect.

    Device: a fragment, fused into the neighbouring kernel.
    """
    return elementwise(Fragment("zero_nans", "u = ISNAN(u) ? (real)0 : u;"))


# ---------------------------------------------------------------------------- partition


class PartitionState(NamedTuple):
    """One :class:`MaskedState` per label."""

    inner_states: dict[Hashable, MaskedState]


def _labels(param_labels: Any, tree: Any) -> Any:
    return param_labels(tree) if callable(param_labels) else param_labels


def _label_mask(labels: Any, label: Hashable) -> Any:
    return optree.tree_map(lambda x: x == label, labels)


def partition(
    transforms: Mapping[Hashable, GradientTransformation],
    param_labels: Any | Callable[[Any], Any],
) -> GradientTransformation:
    """Apply ``transforms[label]`` to the leaves labelled ``label`` (optax semantics).

    ``param_labels`` is a pytree of labels with the params' structure, or a callable of the
    params (``update`` calls it on the updates, as optax) returning one. Every label used
    must have a transform: ``init`` raises ValueError otherwise. Each transform runs as
    :func:`masked` over its leaves; the state is ``PartitionState({label: MaskedState})``.

    Example: no weight decay on biases and norm scales::

        labels = lambda p: optree.tree_map(lambda x: "decay" if x.ndim >= 2 else "plain", p)
        tx = partition({"decay": adamw(1e-3, weight_decay=0.1), "plain": adam(1e-3)}, labels)

    Device: each label's transform runs its own launches over its leaves (one per packed
    run of them, else per leaf); no host sync beyond the inner transforms'.
    """
    transforms = {
        label: as_transform(tx, f"partition: transforms[{label!r}]")
        for label, tx in transforms.items()
    }

    def init(params: Any) -> PartitionState:
        labels = _labels(param_labels, params)
        used = set(optree.tree_leaves(labels))
        if not used.issubset(transforms.keys()):
            missing = sorted(map(repr, used - transforms.keys()))
            raise ValueError(
                "partition: some parameters have no corresponding transformation: labels "
                f"{', '.join(missing)} are not among the transforms' keys "
                f"{sorted(map(repr, transforms))}"
            )
        return PartitionState(
            {
                label: masked(tx, _label_mask(labels, label)).init(params)
                for label, tx in transforms.items()
            }
        )

    def update(
        updates: Any, state: PartitionState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, OptState]:
        check_state(partition_tx, state)
        labels = _labels(param_labels, updates)
        new_states = {}
        for label, tx in transforms.items():
            updates, new_states[label] = masked(tx, _label_mask(labels, label)).update(
                updates, state.inner_states[label], params, **extra_args
            )
        return updates, PartitionState(new_states)

    plan = OpaquePlan("partition", tuple(transforms.values()))
    partition_tx = GradientTransformation(init, update, plan)
    return register(partition_tx, lambda: _partition_spec(transforms))


def _partition_spec(transforms: dict[Hashable, GradientTransformation]) -> NamedTupleSpec:
    """What partition's ``init`` makes: a MaskedState of each transform's state per label."""
    inner = {
        label: wrapper_spec(MaskedState, "inner_state", tx) for label, tx in transforms.items()
    }
    return NamedTupleSpec(PartitionState, {"inner_states": DictSpec(inner)})


multi_transform = partition


def weight_decay_mask(params: Any, *, min_ndim: int = 2) -> Any:
    """``True`` for the leaves of ``params`` with at least ``min_ndim`` dimensions (weight
    matrices, kernels), ``False`` for vectors and scalars (biases, norm scales): the usual
    "no weight decay on 1-D parameters" rule, as a mask for :func:`masked`,
    ``add_decayed_weights(wd, mask=weight_decay_mask)`` or ``adamw(..., mask=...)``.
    Host only."""
    return optree.tree_map(lambda x: len(x.shape) >= min_ndim, params)


# ---------------------------------------------------------------------------- MultiSteps

# acc <- running mean (Welford, optax) or sum; on the emitting step the mean goes on to the
# inner transform and acc restarts at 0; on the other steps the output is -0.0 (no-op)
_ACC_MEAN = """
const real mean = acc + (u - acc) / count;
acc = emit != 0 ? (real)0 : mean;
u = emit != 0 ? mean : -(real)0;
"""
_ACC_SUM = """
const real mean = acc + u;
acc = emit != 0 ? (real)0 : mean;
u = emit != 0 ? mean : -(real)0;
"""


class MultiStepsState(NamedTuple):
    """Mini-steps since the last emitted update, updates emitted so far (host ints), the
    inner state, and the gradient accumulator (float32 for half and float32 params)."""

    mini_step: int
    gradient_step: int
    inner_opt_state: Any
    acc_grads: Any


class _MultiStepsPlan:
    """MultiSteps' :class:`~netcl_optim._base.Plan`: the accumulation, plus the inner
    transform's parts on the emitting step, form one kernel (when the inner one is fusible)."""

    def __init__(self, owner: MultiSteps) -> None:
        self.owner = owner
        inner = owner.inner_opt
        self.children = (inner,)
        self.fusible = is_fusible(inner)
        self.elementwise = is_elementwise(inner)  # accumulating is element-wise
        self.signature = ("MultiSteps", signature_of(inner))

    def split(self, state: MultiStepsState) -> None:
        return None

    def parts(
        self, state: MultiStepsState, extra_args: dict[str, Any]
    ) -> tuple[list[Part], Rebuild]:
        owner = self.owner
        emit, part = owner._acc_part(state)
        if not emit:

            def rebuild_mini(new_slots: list[tuple[Any, ...]]) -> MultiStepsState:
                return state._replace(mini_step=state.mini_step + 1, acc_grads=new_slots[0][0])

            return [part], rebuild_mini
        assert owner.inner_opt.plan is not None  # (parts: only when fusible)
        inner_parts, inner_rebuild = owner.inner_opt.plan.parts(state.inner_opt_state, extra_args)

        def rebuild_emit(new_slots: list[tuple[Any, ...]]) -> MultiStepsState:
            return MultiStepsState(
                0, state.gradient_step + 1, inner_rebuild(new_slots[1:]), new_slots[0][0]
            )

        return [part, *inner_parts], rebuild_emit


class MultiSteps:
    """Gradient accumulation (optax's ``MultiSteps``): call ``update`` on every mini-batch;
    the inner optimizer ``opt`` sees the mean (``use_grad_mean``, running mean
    ``acc += (g - acc) / (n + 1)``) or the sum of the last ``k`` gradients, with ``k =
    every_k_schedule(gradient_step)`` (an int or a schedule).

    Mini-steps return zero updates (``-0.0``: applying them leaves the params bit-identical)
    and leave the inner state untouched; the ``k``-th returns the inner update and resets
    the accumulator to zero. The accumulator is float32 for half and float32 params.
    ``has_updated(state)`` tells whether the last call emitted an update. It goes wherever
    a transform goes (``step``, ``chain``, ``apply_if_finite``, ...), as
    :meth:`gradient_transformation`.

    Device:
      One kernel per step (per dtype, packed): the accumulation, fused with the inner
      optimizer's kernel on the emitting step when the inner optimizer is fusible (else
      the inner ``update`` runs after it). Counters are host ints: no host sync.
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k_schedule: int | Callable[[int], int],
        use_grad_mean: bool = True,
    ) -> None:
        opt = as_transform(opt, "MultiSteps: opt")
        if not callable(every_k_schedule):
            require("every_k_schedule", every_k_schedule, at_least(1))
        self._opt = opt
        self._every_k = every_k_schedule
        self._use_grad_mean = bool(use_grad_mean)
        self._fragment = Fragment(
            "accumulate_mean" if use_grad_mean else "accumulate_sum",
            _ACC_MEAN if use_grad_mean else _ACC_SUM,
            slots=("acc",),
            scalars=("count", "emit"),
        )
        self._plan = _MultiStepsPlan(self)
        self._tx = register(
            GradientTransformation(self.init, self.update, self._plan),
            wrapper(MultiStepsState, "inner_opt_state", opt),
        )

    @property
    def inner_opt(self) -> GradientTransformation:
        return self._opt

    def _k(self, gradient_step: int) -> int:
        k = self._every_k(gradient_step) if callable(self._every_k) else self._every_k
        return require("every_k_schedule", k, at_least(1))

    def _acc_part(self, state: MultiStepsState) -> tuple[bool, Part]:
        emit = state.mini_step >= self._k(state.gradient_step) - 1
        scalars = (float(state.mini_step + 1), 1.0 if emit else 0.0)
        return emit, Part(self._fragment, scalars, (state.acc_grads,))

    def init(self, params: Any) -> MultiStepsState:
        (acc,) = init_slots(params, 1)
        return MultiStepsState(0, 0, self._opt.init(params), acc)

    def update(
        self, updates: Any, state: MultiStepsState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, MultiStepsState]:
        if self._plan.fusible:
            return execute(
                self._tx,
                updates,
                state,
                params,
                apply=False,
                inplace=False,
                extra_args=extra_args,
            )
        check_state(self._tx, state)
        emit, part = self._acc_part(state)
        out, (new_slots,) = run_parts([part], updates, params, apply=False, inplace=False)
        if not emit:
            return out, state._replace(mini_step=state.mini_step + 1, acc_grads=new_slots[0])
        new, inner_state = self._opt.update(out, state.inner_opt_state, params, **extra_args)
        return new, MultiStepsState(0, state.gradient_step + 1, inner_state, new_slots[0])

    def has_updated(self, state: MultiStepsState) -> bool:
        """Whether the last ``update`` emitted the inner optimizer's update."""
        return state.mini_step == 0 and state.gradient_step > 0

    def gradient_transformation(self) -> GradientTransformation:
        """This as a :class:`GradientTransformation` (fusible when the inner one is)."""
        return self._tx
