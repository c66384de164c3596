"""torch's names for the functional states, and a group's chain state from its buffers.

Each optimizer family declares, next to the state types it uses, how torch keeps them: which
fields are slots (buffers shaped like the params, one per parameter under a torch state key)
and which count fills the ``count`` field::

    ADAM_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")

A stateful optimizer keeps each key's buffers packed per group, and per parameter the number
of steps each key has been updated (its count) and torch's ``"step"``. At a step the group's
chain state is assembled from them (:func:`assemble`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from .._base import Fragment, GradientTransformation, ShapeOf, StagePlan
from .._state_check import NamedTupleSpec, spec_of

STEP = "step"
"""torch's per-parameter step count, as a ``count=`` source: the steps the parameter took."""


@dataclass(frozen=True)
class TorchState:
    """How torch keeps one functional state type: ``slots`` pairs each slot field with its
    torch key; ``count`` is the key whose count fills the ``count`` field (the steps since
    that buffer was created), :data:`STEP`, or ``None`` for a type without one."""

    type: type
    slots: tuple[tuple[str, str], ...]
    count: str | None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.slots)


def torch_state(state_type: type, *, count: str | None = None, **slots: str) -> TorchState:
    """Declare torch's keys for ``state_type`` (a NamedTuple): ``field="torch_key"`` per slot,
    and ``count=`` (a slot's key or :data:`STEP`) when it has a ``count`` field. Every field
    must be one or the other (raises TypeError)."""
    name = getattr(state_type, "__name__", repr(state_type))
    fields = getattr(state_type, "_fields", None)
    if fields is None:
        raise TypeError(f"torch_state: {name} is not a NamedTuple state type")
    unknown = sorted(set(slots) - set(fields))
    if unknown:
        raise TypeError(f"torch_state: {name} has no fields {unknown}")
    rest = set(fields) - set(slots)
    if rest - {"count"}:
        raise TypeError(f"torch_state: {name}'s fields {sorted(rest - {'count'})} are not slots")
    if ("count" in rest) != (count is not None):
        need = "needs count=" if "count" in rest else "has no count field: drop count="
        raise TypeError(f"torch_state: {name} {need}")
    if count is not None and count != STEP and count not in slots.values():
        raise TypeError(f"torch_state: count={count!r} is none of {name}'s keys, nor STEP")
    return TorchState(state_type, tuple(slots.items()), count)


def _states(node: Any) -> Iterator[Any]:
    """The NamedTuple states with fields in a state tree, in order."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        if cast(Any, node)._fields:
            yield node
    elif isinstance(node, tuple):
        for child in node:
            yield from _states(child)
    elif isinstance(node, dict):
        for child in node.values():
            yield from _states(child)


def keys_of(template: Any, declared: Mapping[type, TorchState], owner: str) -> list[str]:
    """The torch keys a chain keeps, in order, from its state ``template`` (``tx.init([])``);
    raises TypeError for a state type that ``owner``'s ``torch_state`` does not declare."""
    keys: list[str] = []
    for state in _states(template):
        spec = declared.get(type(state))
        if spec is None:
            raise TypeError(
                f"{owner}'s chain keeps a {type(state).__name__}, which {owner}.torch_state "
                "does not declare (see netcl_optim.stateful._torch_state.torch_state)"
            )
        keys += [k for k in spec.keys if k not in keys]
    return keys


def assemble(
    node: Any,
    declared: Mapping[type, TorchState],
    buffers: Mapping[str, list],
    counts: Mapping[str, int],
) -> Any:
    """The chain's state: ``template`` with each declared state's slots replaced by the
    group's ``buffers`` and its count by ``counts`` (per torch key, and :data:`STEP`)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        if not cast(Any, node)._fields:
            return node
        spec = declared[type(node)]
        values: dict[str, Any] = {field: buffers[key] for field, key in spec.slots}
        if spec.count is not None:
            values["count"] = counts[spec.count]
        return type(node)(**values)
    if isinstance(node, tuple):
        return tuple(assemble(c, declared, buffers, counts) for c in node)
    if isinstance(node, dict):
        return {k: assemble(v, declared, buffers, counts) for k, v in node.items()}
    return node


def _transforms(tx: GradientTransformation) -> Iterator[GradientTransformation]:
    """``tx`` and every transform its plan is made of, depth first."""
    yield tx
    for child in getattr(tx.plan, "children", ()):
        yield from _transforms(child)


def slot_starts(tx: GradientTransformation, declared: Mapping[type, TorchState]) -> dict[str, Any]:
    """The start value of each torch key whose slot a fragment of ``tx`` declares a non-zero
    ``slot_init`` for (the others start at zero): its fresh buffers are filled with it
    (``PARAMS``: a copy of the params)."""
    starts: dict[str, Any] = {}
    for t in _transforms(tx):
        fragment = t.plan
        if not isinstance(fragment, Fragment):
            continue
        fields = list(zip(fragment.slots, fragment.slot_starts, strict=True))
        if fragment.tree_sums is not None:  # (its per-leaf values' start)
            tree = fragment.tree_sums
            fields += zip(tree.state, tree.start or (0.0,) * len(tree.state), strict=True)
        if not any(start for _, start in fields):
            continue
        spec = spec_of(t)
        state = declared.get(spec.cls) if isinstance(spec, NamedTupleSpec) else None
        if state is None:
            continue  # keys_of raises for an undeclared state type
        keys = dict(state.slots)
        for field, start in fields:
            if start and field in keys:
                starts.setdefault(keys[field], start)
    return starts


def nonnegative_keys(tx: GradientTransformation, declared: Mapping[type, TorchState]) -> set[str]:
    """The torch keys whose slot a fragment of ``tx`` declares non-negative (stored in 8
    bits with the unsigned map)."""
    keys: set[str] = set()
    for t in _transforms(tx):
        fragment = t.plan
        if not isinstance(fragment, Fragment) or not fragment.nonnegative:
            continue
        spec = spec_of(t)
        state = declared.get(spec.cls) if isinstance(spec, NamedTupleSpec) else None
        if state is not None:
            names = dict(state.slots)
            keys.update(names[f] for f in fragment.nonnegative if f in names)
    return keys


def per_leaf_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return ()


def key_shapes(
    tx: GradientTransformation, declared: Mapping[type, TorchState]
) -> dict[str, ShapeOf]:
    """The torch keys whose buffers are not shaped like their parameter, each with its
    buffer's shape for a parameter's shape (``None``: the parameter has no such entry in
    torch's dicts; the buffer is a ``(1,)`` placeholder): a fragment's per-leaf state
    (``SegmentReduction.state``, NovoGrad's ``exp_avg_sq``: shape ``()``) and a stage's
    (``StagePlan.state_shapes``: Adafactor's ``row_var``, ``col_var``, ``variance``)."""
    shapes: dict[str, ShapeOf] = {}
    for t in _transforms(tx):
        plan = t.plan
        if isinstance(plan, Fragment):
            fields: dict[str, ShapeOf] = {f: per_leaf_shape for f in plan.segment_state}
        elif isinstance(plan, StagePlan):
            fields = dict(plan.state_shapes)
        else:
            continue
        spec = spec_of(t) if fields else None
        state = declared.get(spec.cls) if isinstance(spec, NamedTupleSpec) else None
        if state is not None:
            names = dict(state.slots)
            shapes.update((names[f], fn) for f, fn in fields.items() if f in names)
    return shapes
