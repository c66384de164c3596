"""The executor: runs a transform over pytrees, each run of fusible transforms as fused
segments (``_fused``), the others through their own ``update``. The only code that walks
plans (see ``Plan``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, cast

import optree

from .._base import Fragment, GradientTransformation, Part, StagePlan
from .._device import BFLOAT16
from .._state_check import checked_transform
from ._checks import check_donation
from ._fused import can_sum, run_parts


def walk(tx: GradientTransformation) -> Iterator[GradientTransformation]:
    """Every transform of ``tx``'s plan, each after its children (``tx`` last)."""
    if tx.plan is not None:
        for child in tx.plan.children:
            yield from walk(child)
    yield tx


Item = tuple[GradientTransformation, Any, Any]  # a transform, its plan if fusible, its state


def _flatten_plan(tx: GradientTransformation, state: Any) -> tuple[list[Item], Callable]:
    """A chain's transforms (nested chains flattened), each with its plan if fusible (else
    ``None``) and its state, and how to rebuild the chain's state from theirs; any other
    transform is its own single item."""
    plan = tx.plan
    if plan is None:
        return [(tx, None, state)], _only
    split = plan.split(state) if plan.children else None
    if split is None:
        return [(tx, plan if plan.fusible else None, state)], _only
    child_states, join = split
    items: list[Item] = []
    rebuilds = []
    for child, child_state in zip(plan.children, child_states, strict=True):
        sub_items, sub_rebuild = _flatten_plan(child, child_state)
        rebuilds.append((len(items), len(sub_items), sub_rebuild))
        items.extend(sub_items)

    def rebuild(news: list[Any]) -> Any:
        return join([rb(news[s : s + n]) for s, n, rb in rebuilds])

    return items, rebuild


def _only(news: list[Any]) -> Any:
    return news[0]


def execute(
    tx: GradientTransformation,
    updates: Any,
    state: Any,
    params: Any,
    *,
    apply: bool,
    inplace: bool,
    extra_args: dict[str, Any],
    donate: bool = False,
) -> tuple[Any, Any]:
    """Run ``tx`` over ``updates``: each run of fusible transforms is one kernel (per dtype,
    per reduction); opaque transforms run their own ``update``. With ``apply`` the result is
    the new params (``updates`` are then the grads). ``donate``: see :func:`run_parts`."""
    tx = checked_transform(tx, state)  # MultiSteps & co; another optimizer's state
    items, rebuild = _flatten_plan(tx, state)
    new_states: list[Any] = [None] * len(items)
    u = updates
    u_role = "grads" if apply else "updates"
    i, n = 0, len(items)
    applied = False
    unchecked = donate
    if donate and any(isinstance(item[0].plan, StagePlan) for item in items):
        check_donation(params, updates, state, u_role)  # a stage writes before the fused runs
        unchecked = False
    while i < n:
        child, plan, child_state = items[i]
        if plan is None:
            if isinstance(child.plan, StagePlan):  # its own kernels, in place when we are
                run = child.plan.run
                u, new_states[i] = run(u, child_state, params, inplace=inplace, **extra_args)
            else:
                u, new_states[i] = child.update(u, child_state, params, **extra_args)
            i += 1
            continue
        parts: list[Part] = []
        owners = []
        j = i
        while j < n and items[j][1] is not None:
            ps, rb = items[j][1].parts(items[j][2], extra_args)
            owners.append((j, rb, len(parts), len(ps)))
            parts.extend(ps)
            j += 1
        last = j == n
        segments = _segments(parts)
        rounding = _state_rounding(parts)
        if unchecked and not (i == 0 and last and len(segments) == 1):
            # several in-place runs: check them all before the first one writes
            check_donation(params, updates, state, u_role)
        unchecked = False
        new_slots: list[tuple[Any, ...]] = []
        summed = False
        for s, seg in enumerate(segments):
            final = last and s == len(segments) - 1
            nxt = segments[s + 1][0].fragment.segment_reduction if s + 1 < len(segments) else None
            sums = nxt if nxt is not None and can_sum(seg, nxt, u, params) else None
            extra = rounding is not None and _needs_rounding(seg)
            u, seg_slots = run_parts(
                [*seg, cast(Part, rounding)] if extra else seg,  # (extra: not None)
                u,
                params,
                apply=apply and final,
                inplace=inplace,
                donate=donate,
                u_role=u_role,
                sums=sums,
                summed=summed,
            )
            summed = sums is not None
            applied = applied or (apply and final)
            new_slots.extend(seg_slots[:-1] if extra else seg_slots)
        for k, rb, start, count in owners:
            new_states[k] = rb(new_slots[start : start + count])
        i = j
    if apply and not applied:
        u, _ = run_parts([], u, params, apply=True, inplace=inplace, donate=donate, u_role=u_role)
    return u, rebuild(new_states)


def _state_rounding(parts: list[Part]) -> Part | None:
    """Where a part ``rounds_state`` (``stochastic_rounding``, in the last segment): the
    part that lends its key and counter to the other segments' kernels, so that their
    bfloat16 state is rounded the same way (its fragment without source: the params'
    rounding stays in the last kernel)."""
    part = next((p for p in parts if p.fragment.rounds_state), None)
    if part is None:
        return None
    return Part(_lender(part.fragment), part.scalars, ())


@functools.cache
def _lender(fragment: Fragment) -> Fragment:
    return Fragment("state_rounding", "", scalars=fragment.scalars, element_index=True,
                    rounds_state=True)  # fmt: skip


def _needs_rounding(seg: list[Part]) -> bool:
    """Whether a segment without the rounding part stores a bfloat16 slot."""
    if any(p.fragment.rounds_state for p in seg):
        return False
    return any(getattr(x, "dtype", None) == BFLOAT16
               for p in seg for tree in p.slots for x in optree.tree_leaves(tree))  # fmt: skip


def _segments(parts: list[Part]) -> list[list[Part]]:
    """Split before every part with a reduction: its input must be materialised first; but
    a rule whose tree sums come first (``TreeSums(after=False)``) after element-wise parts
    only: its pre-pass runs them too (``_tree_sums.prepass_source``)."""
    segments: list[list[Part]] = [[]]
    for part in parts:
        if part.fragment.reduces and segments[-1] and not _joins(part, segments[-1]):
            segments.append([])
        segments[-1].append(part)
    return segments


def _joins(part: Part, before: list[Part]) -> bool:
    """Whether ``part``, a rule with tree sums first, can fuse with the parts ``before`` it:
    element-wise ones without element indices (its pre-pass recomputes their output)."""
    tree = part.fragment.tree_sums
    if tree is None or tree.after:
        return False
    return all(p.fragment.elementwise and not p.fragment.element_index for p in before)
