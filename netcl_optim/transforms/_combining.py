"""chain, named_chain, identity and the glue that makes a transform from a fragment."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._base import (
    EmptyState,
    Fragment,
    GradientTransformation,
    OptState,
    Part,
    Rebuild,
    TransformInitFn,
    as_transform,
    is_elementwise,
    is_fusible,
    signature_of,
)
from .._state_check import (
    DictSpec,
    NamedTupleSpec,
    Spec,
    TupleSpec,
    fragment_spec,
    register,
    spec_of,
)
from ..fusion import execute, init_leaf_values, init_slots


@dataclass(frozen=True, eq=False)
class ChainPlan:
    """A chain's :class:`~netcl_optim._base.Plan`: its children, one state each (a tuple,
    or a dict keyed by ``names``); the executor fuses each run of fusible children."""

    children: tuple[GradientTransformation, ...]
    names: tuple[str, ...] | None = None
    fusible: bool = field(init=False)
    elementwise: bool = field(init=False)
    signature: Hashable = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusible", all(is_fusible(c) for c in self.children))
        object.__setattr__(self, "elementwise", all(is_elementwise(c) for c in self.children))
        object.__setattr__(self, "signature", tuple(signature_of(c) for c in self.children))

    def split(self, state: Any) -> tuple[Sequence[Any], Callable[[list[Any]], Any]]:
        child_states = state if self.names is None else [state[name] for name in self.names]
        return child_states, self._join

    def _join(self, states: list[Any]) -> Any:
        if self.names is None:
            return tuple(states)
        return dict(zip(self.names, states, strict=True))

    def parts(self, state: Any, extra_args: dict[str, Any]) -> tuple[list[Part], Rebuild]:
        """All children's parts, for a wrapper that fuses a whole (fusible) chain."""
        if not self.fusible:
            raise TypeError("this chain has an opaque transform: it cannot be planned as one")
        child_states, join = self.split(state)
        parts: list[Part] = []
        spans = []
        for child, child_state in zip(self.children, child_states, strict=True):
            assert child.plan is not None  # (fusible)
            ps, rb = child.plan.parts(child_state, extra_args)
            spans.append((len(parts), len(ps), rb))
            parts.extend(ps)

        def rebuild(new_slots: list[tuple[Any, ...]]) -> Any:
            return join([rb(new_slots[s : s + n]) for s, n, rb in spans])

        return parts, rebuild


def _chain_spec(
    children: tuple[GradientTransformation, ...], names: tuple[str, ...] | None
) -> Spec:
    """A chain's state: a tuple (a dict for :func:`named_chain`) of its children's."""
    specs = [spec_of(c) for c in children]
    if names is None:
        return TupleSpec(specs)
    return DictSpec(dict(zip(names, specs, strict=True)))


def _make(plan: ChainPlan, init: TransformInitFn) -> GradientTransformation:
    tx: GradientTransformation

    def update(updates: Any, state: OptState, params: Any = None, **extra_args: Any):
        return execute(
            tx, updates, state, params, apply=False, inplace=False, extra_args=extra_args
        )

    tx = GradientTransformation(init, update, plan)
    return register(tx, lambda: _chain_spec(plan.children, plan.names))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` left to right; the state is the tuple of their states.

    Device:
      Each run of element-wise transforms is one fused kernel (one launch per dtype for a
      packed tree); a reduction (global norm) starts a new run; opaque transforms in between
      run their own ``update``.
    """
    children = tuple(as_transform(t, f"chain: argument {i}") for i, t in enumerate(transforms))
    plan = ChainPlan(children)
    return _make(plan, lambda params: tuple(c.init(params) for c in children))


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names."""
    names = tuple(name for name, _ in transforms)
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: duplicate names in {names}")
    children = tuple(as_transform(t, f"named_chain: {name!r}") for name, t in transforms)
    plan = ChainPlan(children, names)
    return _make(
        plan, lambda params: {n: c.init(params) for n, c in zip(names, children, strict=True)}
    )


def identity() -> GradientTransformation:
    """Leave updates unchanged (no state, no launch)."""

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(updates: Any, state: OptState, params: Any = None, **extra_args: Any):
        return updates, state

    tx = GradientTransformation(init, update, Fragment("identity", ""))
    return register(tx, lambda: NamedTupleSpec(EmptyState))


def elementwise(
    fragment: Fragment, init: Callable[..., OptState] | None = None
) -> GradientTransformation:
    """A transform from a fragment: ``init`` receives the fragment's slot trees (packed,
    shaped like the params, each filled with its ``slot_init`` value, zero by default), then
    its per-leaf state trees (``SegmentReduction.state``: one zero per leaf), as positional
    arguments; ``update`` is a chain of one."""

    def init_fn(params: Any) -> OptState:
        slots = (
            init_slots(params, fragment.slot_starts, fragment.slots, fragment.nonnegative)
            if fragment.slots
            else []
        )
        tree = fragment.tree_sums
        per_leaf = init_leaf_values(
            params, tree.start if tree is not None and tree.start else len(fragment.segment_state)
        )
        return init(*slots, *per_leaf) if init is not None else EmptyState()

    tx: GradientTransformation

    def update(updates: Any, state: OptState, params: Any = None, **extra_args: Any):
        return execute(
            tx, updates, state, params, apply=False, inplace=False, extra_args=extra_args
        )

    tx = GradientTransformation(init_fn, update, fragment)
    return register(tx, lambda: fragment_spec(fragment, init))
