"""chain, named_chain, identity and the glue that makes a transform from a fragment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._base import EmptyState, Fragment, GradientTransformation, OptState, Part, as_transform
from .._state_check import (
    DictSpec,
    NamedTupleSpec,
    Spec,
    TupleSpec,
    fragment_spec,
    register,
    spec_of,
)
from ..fusion._runner import execute, init_slots


@dataclass(frozen=True, eq=False)
class ChainPlan:
    """A chain's fusion plan: its children, flattened into runs by the executor."""

    children: tuple[GradientTransformation, ...]
    names: tuple[str, ...] | None = None

    def child_states(self, state: Any) -> Sequence[Any]:
        if self.names is None:
            return state
        return [state[name] for name in self.names]

    def make_state(self, states: list[Any]) -> Any:
        if self.names is None:
            return tuple(states)
        return dict(zip(self.names, states, strict=True))

    @property
    def fusible(self) -> bool:
        return all(
            c.fragment is not None and (not isinstance(c.fragment, ChainPlan) or c.fragment.fusible)
            for c in self.children
        )

    def plan(self, state: Any, extra_args: dict[str, Any]) -> tuple[list[Part], Callable]:
        """All children's parts, for a wrapper that fuses a whole (fusible) chain."""
        if not self.fusible:
            raise TypeError("this chain has an opaque transform: it cannot be planned as one")
        parts: list[Part] = []
        spans = []
        for child, child_state in zip(self.children, self.child_states(state), strict=True):
            ps, rb = child.fragment.plan(child_state, extra_args)
            spans.append((len(parts), len(ps), rb))
            parts.extend(ps)

        def rebuild(new_slots: list[tuple[Any, ...]]) -> Any:
            return self.make_state([rb(new_slots[s : s + n]) for s, n, rb in spans])

        return parts, rebuild

    def state_spec(self) -> Spec:
        """The chain's state: a tuple (a dict for :func:`named_chain`) of its children's."""
        specs = [spec_of(c) for c in self.children]
        if self.names is None:
            return TupleSpec(specs)
        return DictSpec(dict(zip(self.names, specs, strict=True)))


def _make(plan: ChainPlan, init: Callable[[Any], OptState]) -> GradientTransformation:
    tx: GradientTransformation

    def update(updates: Any, state: OptState, params: Any = None, **extra_args: Any):
        return execute(
            tx, updates, state, params, apply=False, inplace=False, extra_args=extra_args
        )

    tx = GradientTransformation(init, update, plan)
    return register(tx, plan.state_spec)


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
    """A transform from a fragment: ``init`` receives the fragment's zeroed slot trees
    (packed, shaped like the params) as positional arguments; ``update`` is a chain of one."""

    def init_fn(params: Any) -> OptState:
        slots = init_slots(params, len(fragment.slots)) if fragment.slots else []
        return init(*slots) if init is not None else EmptyState()

    tx: GradientTransformation

    def update(updates: Any, state: OptState, params: Any = None, **extra_args: Any):
        return execute(
            tx, updates, state, params, apply=False, inplace=False, extra_args=extra_args
        )

    tx = GradientTransformation(init_fn, update, fragment)
    return register(tx, lambda: fragment_spec(fragment, init))
