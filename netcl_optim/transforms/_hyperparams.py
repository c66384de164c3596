"""inject_hyperparams: hyperparameters in the state, schedules evaluated per step, still fused."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from .._base import (
    GradientTransformation,
    OptState,
    Part,
    Rebuild,
    as_transform,
    is_elementwise,
    is_fusible,
    signature_of,
)
from .._state_check import DictSpec, NamedTupleSpec, Spec, check_state, register, spec_of
from .._validation import ScheduledValue
from ..fusion import execute


class InjectHyperparamsState(NamedTuple):
    """``hyperparams``: the value of each numeric hyperparameter used by the last update (after
    ``init``, the value the first update will use); write a number there between steps to
    change it. ``count``: updates so far, the argument of the schedules."""

    count: int
    hyperparams: dict[str, float]
    inner_state: Any


def _is_numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, eq=False)
class _InjectPlan:
    """inject_hyperparams' :class:`~netcl_optim._base.Plan`: the inner optimizer, rebuilt
    each step from the hyperparameters' values (``probe``: built from the initial ones)."""

    factory: Callable[..., GradientTransformation]
    static: dict[str, Any]
    schedules: dict[str, Callable[[int], float]]
    initial: dict[str, float]
    probe: GradientTransformation
    probe_signature: Hashable = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "probe_signature", signature_of(self.probe))

    @property
    def signature(self) -> Hashable:
        return ("inject_hyperparams", self.probe_signature)

    @property
    def children(self) -> tuple[GradientTransformation, ...]:
        return (self.probe,)

    @property
    def fusible(self) -> bool:
        return is_fusible(self.probe)

    @property
    def elementwise(self) -> bool:
        return is_elementwise(self.probe)

    def split(self, state: InjectHyperparamsState) -> None:
        return None

    def make(self, hps: dict[str, float]) -> GradientTransformation:
        inner = as_transform(
            self.factory(**self.static, **{k: ScheduledValue(v) for k, v in hps.items()}),
            "inject_hyperparams: the factory's result",
        )
        if signature_of(inner) != self.probe_signature:
            moved = [k for k, v in hps.items() if (v == 0) != (self.initial.get(k, 0) == 0)]
            raise ValueError(
                f"inject_hyperparams: setting {', '.join(moved) or 'a hyperparameter'} to or "
                "from 0 changes the optimizer's structure (and its state); construct it with "
                "a nonzero value instead"
            )
        return inner

    def values(self, state: InjectHyperparamsState) -> dict[str, float]:
        hps = dict(state.hyperparams)
        for name, fn in self.schedules.items():
            hps[name] = float(fn(state.count))
        return hps

    def parts(
        self, state: InjectHyperparamsState, extra_args: dict[str, Any]
    ) -> tuple[list[Part], Rebuild]:
        hps = self.values(state)
        inner = self.make(hps)
        assert inner.plan is not None  # (parts: only when fusible)
        parts, rebuild_inner = inner.plan.parts(state.inner_state, extra_args)

        def rebuild(new_slots: list[tuple[Any, ...]]) -> InjectHyperparamsState:
            return InjectHyperparamsState(state.count + 1, hps, rebuild_inner(new_slots))

        return list(parts), rebuild


def _state_spec(initial: dict[str, float], probe: GradientTransformation) -> Spec:
    """What ``init`` makes: every injected hyperparameter (more may be written in) and the
    inner optimizer's state."""
    hyperparams = DictSpec(dict.fromkeys(initial), exact=False)
    return NamedTupleSpec(
        InjectHyperparamsState, {"hyperparams": hyperparams, "inner_state": spec_of(probe)}
    )


# numbers that shape the state, not the step: always static
STRUCTURAL = frozenset({"state_bits", "min_8bit_size"})


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state.

    ``inject_hyperparams(adam)(learning_rate=schedule, b1=0.9)``: numbers and schedules
    (callables of the step count) become ``state.hyperparams`` entries, evaluated on the host
    each step (a schedule at the update count, from 0); other arguments (bools, masks, and the
    numbers that shape the state: ``state_bits``, ``min_8bit_size``) are static.
    Hyperparameters are kernel arguments, so changing them never rebuilds a kernel, and the
    wrapped chain still fuses into one kernel.
    """

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        if args:
            raise TypeError("inject_hyperparams: pass hyperparameters by keyword")
        static = {
            k: v for k, v in kwargs.items()
            if k in STRUCTURAL or not (_is_numeric(v) or callable(v))
        }  # fmt: skip
        numeric = {k: float(v) for k, v in kwargs.items() if _is_numeric(v) and k not in static}
        schedules = cast(
            "dict[str, Callable[[int], float]]", {k: v for k, v in kwargs.items() if callable(v)}
        )
        initial = {**numeric, **{k: float(fn(0)) for k, fn in schedules.items()}}
        # validates the arguments once, up front; scheduled values may be 0 (a warmup's start)
        probe = as_transform(
            factory(
                **static, **numeric, **{k: ScheduledValue(fn(0)) for k, fn in schedules.items()}
            ),
            "inject_hyperparams: the factory's result",
        )
        plan = _InjectPlan(factory, static, schedules, initial, probe)

        def init(params: Any) -> OptState:
            return InjectHyperparamsState(0, dict(initial), probe.init(params))

        def update(updates: Any, state: InjectHyperparamsState, params: Any = None, **extra: Any):
            if plan.fusible:
                return execute(
                    tx, updates, state, params, apply=False, inplace=False, extra_args=extra
                )
            check_state(tx, state)
            hps = plan.values(state)
            inner = plan.make(hps)
            new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return new_updates, InjectHyperparamsState(state.count + 1, hps, inner_state)

        tx = GradientTransformation(init, update, plan)
        return register(tx, lambda: _state_spec(initial, probe))

    return wrapped
