"""The executor: runs a transform over pytrees, each run of fusible transforms as fused
segments (``_fused``), the others through their own ``update``. The only code that walks
plans (see ``Plan``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .._base import GradientTransformation, Part, StagePlan
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
            u, seg_slots = run_parts(
                seg,
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
            new_slots.extend(seg_slots)
        for k, rb, start, count in owners:
            new_states[k] = rb(new_slots[start : start + count])
        i = j
    if apply and not applied:
        u, _ = run_parts([], u, params, apply=True, inplace=inplace, donate=donate, u_role=u_role)
    return u, rebuild(new_states)


def _segments(parts: list[Part]) -> list[list[Part]]:
    """Split before every part with a reduction: its input must be materialised first."""
    segments: list[list[Part]] = [[]]
    for part in parts:
        if part.fragment.reduces and segments[-1]:
            segments.append([])
        segments[-1].append(part)
    return segments
