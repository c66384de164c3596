"""Adafactor's factored second moment: ``scale_by_factored_rms`` (optax's name, signature
and rule, with keywords for torch's rule), run by its own kernels (``fusion/_factored.py``)
on packed trees, in place in the stateful layer's steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl.array as cla

from .._base import GradientTransformation, StagePlan
from .._device import state_dtype
from .._packing import layout
from .._state_check import NamedTupleSpec, register
from .._validation import BOOL, FINITE, NON_NEGATIVE, check, invalid, require
from ..fusion import (
    EightBit,
    FactoredRule,
    check_updates,
    factored_step,
    flatten_like,
    group_by_dtype,
    init_packed,
    path_names,
    plan_of,
    queue_of_leaves,
    slice_for,
    slices_active,
    slot_dtype_of,
    slot_rule,
    slot_storages,
    state_shapes,
    whole_updates,
    whole_view,
)


class FactoredState(NamedTuple):
    """optax's ``FactoredState``: the number of updates, and per leaf the row EMA ``v_row``
    and the column EMA ``v_col`` (a factored leaf) or the EMA ``v`` shaped like the leaf
    (one that is not), the other fields a ``(1,)`` placeholder."""

    count: int
    v_row: Any
    v_col: Any
    v: Any


def decay_rate_pow(i: int, exponent: float = 0.8) -> float:
    """optax's default ``decay_rate_fn``: ``1 - (i + 1)^-exponent``, in float32 as optax."""
    t = np.float32(i + 1)
    return float(np.float32(1) - t ** np.float32(-exponent))


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[int, float], float] = decay_rate_pow,
    *,
    factor_last_two: bool = False,
    eps1: float | str | None = None,
    lerp: bool = False,
) -> GradientTransformation:
    """Adafactor's scaling by a factored second moment (optax's ``scale_by_factored_rms``,
    same signature and defaults)::

        b  = decay_rate_fn(count - step_offset, decay_rate);  s = g^2 + epsilon
        factored leaf (axes d1, d0: the second largest and the largest, when the second
        largest is >= min_dim_size_to_factor):
            v_row <- b v_row + (1 - b) mean_{d0}(s);  v_col <- b v_col + (1 - b) mean_{d1}(s)
            u = g * (v_row / mean_{d1}(v_row))^-1/2 * v_col^-1/2
        other leaves:  v <- b v + (1 - b) s;  u = g * v^-1/2

    torch's rule (``torch.optim.Adafactor``), by keyword: ``factor_last_two`` factors the
    last two axes of every leaf of ndim >= 2 (leading axes are a batch; the state keeps
    torch's shapes ``[..., R, 1]`` and ``[..., 1, C]``); ``eps1`` floors the row mean at
    ``eps1`` and the variance ``v_row v_col / mean`` (or ``v``) at ``eps1^2`` (``"finfo"``:
    the leaf dtype's machine epsilon, torch's default); ``lerp`` makes the EMA torch's
    ``v.lerp_(s, 1 - b)`` (with the default ``decay_rate_fn``, torch's weight ``t^-decay_rate``
    in double precision). ``updates`` need no params. torch's ``Adafactor`` is::

        chain(scale_by_factored_rms(decay_rate=-beta2_decay, epsilon=0.0,
                                    factor_last_two=True, eps1="finfo" or eps1, lerp=True),
              scale_by_adafactor_step(lr, eps2, d, weight_decay))

    Device: 7 to 10 launches per dtype group of a packed tree (see ``fusion/_factored.py``);
    the updates are materialised (the next transform reads them).
    """
    factored = require("factored", factored, BOOL)
    factor_last_two = require("factor_last_two", factor_last_two, BOOL)
    lerp = require("lerp", lerp, BOOL)
    check(NON_NEGATIVE, epsilon=epsilon)
    check(FINITE, decay_rate=decay_rate)
    if isinstance(min_dim_size_to_factor, bool) or not isinstance(min_dim_size_to_factor, int):
        raise invalid("min_dim_size_to_factor", min_dim_size_to_factor, "an int")
    if isinstance(step_offset, bool) or not isinstance(step_offset, int):
        raise invalid("step_offset", step_offset, "an int")
    if not callable(decay_rate_fn):
        raise invalid("decay_rate_fn", decay_rate_fn, "a callable (step, decay_rate) -> float")
    if eps1 is not None and eps1 != "finfo":
        check(NON_NEGATIVE, eps1=eps1)
    rule = FactoredRule(
        factored, min_dim_size_to_factor, factor_last_two, float(epsilon),
        None if eps1 is None else 0.0, lerp,
    )  # fmt: skip

    def rule_for(dtype: np.dtype) -> tuple[FactoredRule, float]:
        if eps1 is None:
            return rule, 0.0
        value = float(np.finfo(dtype).eps) if eps1 == "finfo" else float(eps1)
        return rule._replace(eps1=value), value

    def init(params: Any) -> FactoredState:
        leaves, treedef = optree.tree_flatten(params)
        trees = []
        for k, name in enumerate(FIELDS):
            if isinstance(slot_rule(name), EightBit):
                raise ValueError(
                    f"scale_by_factored_rms: {name} cannot be stored in 8 bits (a row or "
                    "column mean is not element-wise): use state_dtype"
                )
            concrete = [_field_shape(leaves, i, rule, k) for i in range(len(leaves))]
            out = init_packed(leaves, concrete, slot_dtype_of(name), params)
            trees.append(optree.tree_unflatten(treedef, out))
        return FactoredState(0, *trees)

    def run(updates: Any, state: Any, params: Any = None, *, inplace: bool, **_: Any):
        if not isinstance(state, FactoredState):
            raise TypeError(
                f"scale_by_factored_rms: state is a {type(state).__name__}, not a FactoredState"
            )
        leaves, treedef = optree.tree_flatten(updates)
        if not leaves:
            return updates, state._replace(count=state.count + 1)
        queue = queue_of_leaves(leaves)
        check_updates(leaves, updates, queue)
        fields = FIELDS
        stated = [flatten_like(tree, treedef, f"state.{f}", "updates")
                  for f, tree in zip(fields, state[1:], strict=True)]  # fmt: skip
        _check_state(leaves, stated, fields, rule, queue, state)
        i = state.count - step_offset
        if lerp and decay_rate_fn is decay_rate_pow:  # torch's weight t^-decay_rate, in double
            keep, add = 0.0, (i + 1.0) ** -float(decay_rate)
        elif lerp:
            keep, add = 0.0, 1.0 - float(decay_rate_fn(i, decay_rate))
        else:  # optax's, in float32
            decay = float(decay_rate_fn(i, decay_rate))
            keep, add = decay, float(np.float32(1) - np.float32(decay))
        out: list[Any] = [None] * len(leaves)
        new: list[list[Any]] = [[None] * len(leaves) for _ in fields]
        for dtype, idx in group_by_dtype(leaves).items():
            group_rule, floor = rule_for(dtype)
            s = slice_for(leaves, idx)
            if s is not None:  # a ZeRO slice: the whole leaves' step, then the slice of it
                whole = whole_updates(s, leaves[idx[0]])
                views = _whole_state(s, rule, [ls[idx[0]] for ls in stated])
                us, fresh = factored_step(queue, group_rule, whole, views, keep, add, floor,
                                          inplace)  # fmt: skip
                out[idx[0]] = whole_view(us[0], s.lo, s.hi - s.lo)
                for f in range(3):
                    column = stated[f][idx[0]]
                    new[f][idx[0]] = column if inplace else whole_view(fresh[f][0], 0, column.size)
                continue
            us, fresh = factored_step(
                queue, group_rule, [leaves[i] for i in idx],
                tuple([ls[i] for i in idx] for ls in stated), keep, add, floor, inplace,
            )  # fmt: skip
            for k, i in enumerate(idx):
                out[i] = us[k]
                for f in range(3):
                    new[f][i] = fresh[f][k]
        trees = [optree.tree_unflatten(treedef, ls) for ls in new]
        return optree.tree_unflatten(treedef, out), FactoredState(state.count + 1, *trees)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any):
        return run(updates, state, params, inplace=False, **extra)

    def shape_of(k: int) -> Callable[[tuple[int, ...]], Any]:
        return lambda shape: state_shapes(tuple(shape), rule)[k]

    plan = StagePlan(
        "scale_by_factored_rms", run,
        config=(rule, eps1, step_offset, decay_rate, decay_rate_fn),
        state_shapes=(("v_row", shape_of(0)), ("v_col", shape_of(1)), ("v", shape_of(2))),
        shards=True,
    )  # fmt: skip
    tx = GradientTransformation(init, update, plan)
    return register(tx, lambda: NamedTupleSpec(FactoredState))


FIELDS = ("v_row", "v_col", "v")


def _field_shape(leaves: list[Any], i: int, rule: FactoredRule, k: int) -> tuple[int, ...]:
    """Leaf ``i``'s state field ``k`` (``v_row``, ``v_col``, ``v``): its shape, a ``(1,)``
    placeholder, or for a ZeRO slice one 1-D array: the whole leaves' state end to end."""
    s = slice_for(leaves, [i])
    if s is None:
        shape = state_shapes(tuple(leaves[i].shape), rule)[k]
        return (1,) if shape is None else shape
    plan = plan_of(s.shapes, rule)
    shapes = (plan.row_shapes, plan.col_shapes, plan.v_shapes)[k]
    return (sum(math.prod(shape) for shape in shapes),)


def _whole_state(s: Any, rule: FactoredRule, columns: list[Any]) -> tuple[list[Any], ...]:
    """A slice's state (one 1-D array per field) as views of the whole leaves' state."""
    plan = plan_of(s.shapes, rule)
    out = []
    for column, shapes in zip(columns, (plan.row_shapes, plan.col_shapes, plan.v_shapes),
                              strict=True):  # fmt: skip
        out.append(layout(shapes, column.dtype).views_of(column.queue, column.base_data,
                                                         column.offset))  # fmt: skip
    return tuple(out)


@lru_cache(maxsize=64)
def _expected(
    shapes: tuple[tuple[int, ...], ...], rule: FactoredRule
) -> tuple[list[tuple[int, ...]], ...]:
    """Per state field, every leaf's expected shape (not on a ZeRO slice)."""
    per = [state_shapes(s, rule) for s in shapes]
    return tuple([(1,) if p[k] is None else p[k] for p in per] for k in range(3))


def _storages(leaves: list[Any], column: list[Any]) -> list[np.dtype]:
    """Per leaf, the dtype its state field must have: the one its dtype group's first leaf
    stores it as, where that is a storage for the group (the state dtype, or float16 or
    bfloat16 for float32 and half updates), else the state dtype."""
    first: dict[np.dtype, np.dtype] = {}
    out = []
    for x, y in zip(leaves, column, strict=True):
        d = x.dtype
        if d not in first:
            stored = getattr(y, "dtype", None)
            first[d] = cast(np.dtype, stored) if stored in slot_storages(d) else state_dtype(d)
        out.append(first[d])
    return out


def _state_ok(leaves: list[Any], stated: list[list[Any]], rule: FactoredRule, queue: Any) -> bool:
    """The common case of :func:`_check_state` as list comparisons (a step of a 160-leaf
    tree: 2.3 ms of host time per leaf-by-leaf check); ``False``: look closer."""
    if slices_active():
        return False
    try:
        want = _expected(tuple(x.shape for x in leaves), rule)
        for column, shapes in zip(stated, want, strict=True):
            if set(map(type, column)) != {cla.Array}:
                return False
            dtypes = _storages(leaves, column)
            if [y.shape for y in column] != shapes or [y.dtype for y in column] != dtypes:
                return False
            contexts = [y.context for y in column]
            if contexts.count(queue.context) != len(contexts):
                return False
    except AttributeError:
        return False
    return True


def _check_state(
    leaves: list[Any],
    stated: list[list[Any]],
    fields: tuple[str, ...],
    rule: FactoredRule,
    queue: Any,
    state: FactoredState,
) -> None:
    """Each state leaf: a device array of its expected shape, on ``queue``'s context, each
    field stored alike over a dtype group (see :func:`_storages`; raises naming the first
    that is not)."""
    if _state_ok(leaves, stated, rule, queue):
        return
    storages = [_storages(leaves, column) for column in stated]
    for i, x in enumerate(leaves):
        for f, (name, column) in enumerate(zip(fields, stated, strict=True)):
            y = column[i]
            shape = _field_shape(leaves, i, rule, f)
            if not isinstance(y, cla.Array):
                where = path_names(state[f + 1])[i]
                raise TypeError(f"state.{name}: leaf {where} is a {type(y).__name__}, "
                                "not a device array")  # fmt: skip
            if y.shape != shape or y.dtype != storages[f][i]:
                where = path_names(state[f + 1])[i]
                raise ValueError(
                    f"state.{name}: leaf {where} has shape {y.shape} and dtype {y.dtype}; "
                    f"expected {shape} and {storages[f][i]} for updates of shape "
                    f"{x.shape}"
                )
            if y.context != queue.context:
                where = path_names(state[f + 1])[i]
                raise ValueError(f"state.{name}: leaf {where} lives in another OpenCL context")


__all__ = ["FactoredState", "decay_rate_pow", "scale_by_factored_rms"]
