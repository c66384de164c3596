"""Measurements of the updates kept in the state, read on demand: optax's ``snapshot``,
``monitor`` and ``measure_with_ema``, and per-leaf measures computed on the device
(``leaf_norms``, ``update_param_ratio``).

A measurement stays on the device (0-d arrays): nothing is read back unless the user reads
it (``state.measurements["name"]``, or ``optax``-style ``tree_get``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._base import EmptyState, GradientTransformation, OpaquePlan, SegmentReduction
from .._state_check import NamedTupleSpec, check_state, register
from ..fusion import leaf_values
from ._combining import chain
from ._ema import ema


class SnapshotState(NamedTuple):
    """The last measurement, by name."""

    measurements: dict[str, Any]


class MonitorState(NamedTuple):
    """The last measurement of each measure, by name, and each measure's own state."""

    measurements: dict[str, Any]
    measure_states: tuple[Any, ...]


_NORMS = SegmentReduction(terms=("u * u",), outputs=("norm",), finish=("sqrt(s0)",))
_RATIO = SegmentReduction(
    terms=("u * u", "p * p"),
    outputs=("ratio",),
    finish=("sqrt(s1) > 0 ? sqrt(s0) / sqrt(s1) : 0",),
    needs_params=True,
)


def leaf_norms(tree: Any) -> Any:
    """Each leaf's L2 norm, as a tree of 0-d device arrays (the reduction type: float64
    where the device has fp64), unread. One reduction launch and one finishing launch per
    dtype (packed), no host sync; an empty leaf has norm 0."""
    return leaf_values(_NORMS, tree)


def update_param_ratio() -> GradientTransformation:
    """A measure for :func:`monitor`: each leaf's ``||u|| / ||p||`` (0 where ``||p|| = 0``),
    a tree of 0-d device arrays; needs ``params``. The updates pass through."""

    def update(updates: Any, state: EmptyState, params: Any = None, **_: Any):
        if params is None:
            raise ValueError("update_param_ratio needs params: call update(updates, state, params)")
        return leaf_values(_RATIO, updates, params), state

    tx = GradientTransformation(lambda params: EmptyState(), update, OpaquePlan("measure", ()))
    return tx


def _measure_transform(measure: Any, what: str) -> GradientTransformation:
    """A callable of the updates as a stateless transform whose output is its measurement."""
    if isinstance(measure, GradientTransformation):
        return measure
    if not callable(measure):
        raise TypeError(f"{what} is a {type(measure).__name__}, not a callable or a transform")

    def update(updates: Any, state: EmptyState, params: Any = None, **_: Any):
        return measure(updates), state

    return GradientTransformation(lambda params: EmptyState(), update, OpaquePlan("measure", ()))


def snapshot(measure_name: str, measure: Callable[[Any], Any]) -> GradientTransformation:
    """optax's ``snapshot``: keep ``measure(updates)`` in the state under ``measure_name``
    (at ``init``, ``measure(params)``); the updates pass through unchanged.

    A measure such as :func:`leaf_norms` or :func:`~netcl_optim.global_norm` returns device
    arrays: nothing is read back. In a chain, a snapshot splits the fused kernels around it
    (the updates are written once there), and the measure's own launches run.
    """
    if not isinstance(measure_name, str):
        raise TypeError(f"Invalid measure_name: {measure_name!r} (must be a str)")
    if not callable(measure):
        raise TypeError(f"Invalid measure: {measure!r} (must be a callable of the updates)")

    def init(params: Any) -> SnapshotState:
        return SnapshotState({measure_name: measure(params)})

    tx: GradientTransformation

    def update(updates: Any, state: SnapshotState, params: Any = None, **_: Any):
        check_state(tx, state)
        return updates, SnapshotState({measure_name: measure(updates)})

    tx = GradientTransformation(init, update, OpaquePlan("snapshot", ()))
    return register(tx, lambda: NamedTupleSpec(SnapshotState))


def monitor(measures: Mapping[str, Any]) -> GradientTransformation:
    """optax's ``monitor``: each measure (a callable of the updates, or a transform whose
    output is its measurement, such as :func:`measure_with_ema` or
    :func:`update_param_ratio`) is evaluated on the updates; the measurements are kept in
    the state (``state.measurements[name]``) with each measure's own state. The updates pass
    through unchanged. At ``init`` the measurements are empty, as in optax.
    """
    if not isinstance(measures, Mapping):
        raise TypeError(f"Invalid measures: {measures!r} (must be a dict of name: measure)")
    names = tuple(measures)
    txs = tuple(_measure_transform(measures[n], f"measures[{n!r}]") for n in names)

    def init(params: Any) -> MonitorState:
        return MonitorState({}, tuple(t.init(params) for t in txs))

    tx: GradientTransformation

    def update(updates: Any, state: MonitorState, params: Any = None, **extra_args: Any):
        check_state(tx, state)
        if len(state.measure_states) != len(txs):
            raise ValueError(
                f"state does not match this monitor: {len(state.measure_states)} measure "
                f"states for {len(txs)} measures; pass the state its init returned"
            )
        measurements, states = {}, []
        for name, t, s in zip(names, txs, state.measure_states, strict=True):
            measurements[name], new = t.update(updates, s, params, **extra_args)
            states.append(new)
        return updates, MonitorState(measurements, tuple(states))

    tx = GradientTransformation(init, update, OpaquePlan("monitor", txs))
    return register(tx, lambda: NamedTupleSpec(MonitorState))


def measure_with_ema(
    measure: Callable[[Any], Any], decay: float, debias: bool = True, accumulator_dtype: Any = None
) -> GradientTransformation:
    """optax's ``measure_with_ema``: a measure for :func:`monitor` that keeps an EMA of
    ``measure(updates)`` (:func:`~netcl_optim.ema` over the measurement's tree, which must be
    device arrays)."""
    inner = ema(decay, debias, accumulator_dtype)

    def init(params: Any) -> Any:
        return inner.init(measure(params))

    measured = _measure_transform(measure, "measure")
    return chain(measured, GradientTransformation(init, inner.update, inner.plan))


__all__ = [
    "MonitorState",
    "SnapshotState",
    "leaf_norms",
    "measure_with_ema",
    "monitor",
    "snapshot",
    "update_param_ratio",
]
