"""Core types: GradientTransformation, states, kernel fragments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

PyTree = Any
Params = PyTree
Updates = PyTree
OptState = PyTree
Schedule = Callable[[int], float]
ScalarOrSchedule = float | Schedule


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions, as in optax.

    ``init(params) -> state``; ``update(updates, state, params=None, **extra_args) ->
    (updates, state)``. ``fragment`` describes the element-wise work for kernel fusion
    (a :class:`Fragment`, a chain's :class:`ChainPlan`, or any object with ``plan``);
    ``None`` marks an opaque transform, which still composes in :func:`chain`.
    """

    init: TransformInitFn
    update: TransformUpdateFn
    fragment: Any = None


def as_transform(tx: Any, what: str = "tx") -> GradientTransformation:
    """``tx`` as a :class:`GradientTransformation`: itself; what its
    ``gradient_transformation()`` returns (``MultiSteps``, fusible when its inner optimizer
    is); or, for any other object with ``init`` and ``update``, an opaque transform of them.
    ``what`` names ``tx`` in the TypeError raised for anything else."""
    if isinstance(tx, GradientTransformation):
        return tx
    convert = getattr(tx, "gradient_transformation", None)
    if callable(convert):
        converted = convert()
        if isinstance(converted, GradientTransformation):
            return converted
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return GradientTransformation(tx.init, tx.update)
    raise TypeError(
        f"{what} is a {type(tx).__name__}, not a transform (a GradientTransformation, or an "
        "object with init and update)"
    )


class EmptyState(NamedTuple):
    """State of a stateless transform."""


@dataclass(frozen=True)
class Reduction:
    """A whole-tree reduction over the incoming updates, run before a fragment.

    ``op`` accumulates per element (``"sumsq"``, ``"maxabs"``, ``"sumpow"``, ``"nonfinite"``);
    ``finish`` turns the total into values in a small device buffer (``"clip"``: total norm
    and clip coefficient; ``"flag"``: 1.0 if any element was non-finite). The fragment's
    source reads them by the names in ``outputs``.
    """

    op: str
    finish: str
    outputs: tuple[str, ...]
    scalars: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Fragment:
    """OpenCL C for one element-wise transform, to be fused with its neighbours.

    The source updates ``u`` (the update, compute type ``real``) and may read ``p`` (the
    parameter) when ``needs_params``, read and write the slots (state arrays shaped like the
    params, named fields of the state) and read the scalars, whose per-step values come from
    ``host_step(state, **extra_args) -> (values, state with its host fields advanced)``.
    """

    name: str
    source: str
    slots: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    host_step: Callable[..., tuple[tuple[float, ...], Any]] | None = None
    needs_params: bool = False
    reduction: Reduction | None = None
    key: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "key",
            (self.name, self.source, self.slots, self.scalars, self.needs_params, self.reduction),
        )

    def plan(self, state: OptState, extra_args: dict[str, Any]) -> tuple[list[Part], Callable]:
        if self.host_step is None:
            values, advanced = (), state
        else:
            values, advanced = self.host_step(state, **extra_args)
        slots = tuple(getattr(state, s) for s in self.slots)
        part = Part(self, tuple(values), slots)

        def rebuild(new_slots: list[tuple[Any, ...]]) -> OptState:
            if not self.slots:
                return advanced
            return advanced._replace(**dict(zip(self.slots, new_slots[0], strict=True)))

        return [part], rebuild


class Part(NamedTuple):
    """One fragment's work in one step: its scalars' values and its input slot trees."""

    fragment: Fragment
    scalars: tuple[float, ...]
    slots: tuple[Any, ...]
