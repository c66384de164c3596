"""Checks before a step writes anything: every leaf usable in its role (type, context, dtype,
shape, layout), tree structures alike, and donated memory unshared. Errors name the leaf."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from typing import Any, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .. import _device
from .._device import (
    FLOAT_DTYPES,
    STATE_STORAGE,
    check_float_dtype,
    default_queue,
    state_dtype,
)
from .._packing import (
    DONATED,
    DonatedArray,
    DonatedArrayError,
    c_strides,
    first_shared,
    layout,
    same_memory,
)
from ._reductions import acc_ctype

# a role's leaves and the dtype each must have, given the updates' leaf dtype
Role = tuple[str, list[Any], Callable[[np.dtype], np.dtype]]


def path_names(tree: Any) -> list[str]:
    """Each leaf's path in ``tree``, as errors print it: ``root['w'][0]``."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return ["root" + "".join(f"[{k!r}]" for k in path) for path in paths]


@lru_cache(maxsize=1024)
def _list_spec(n: int) -> optree.PyTreeSpec:
    return optree.tree_structure(list(range(n)))  # pyright: ignore[reportArgumentType]


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """``optree.tree_flatten``, with a shortcut for a plain list of device arrays (what the
    stateful layer passes every step)."""
    if type(tree) is list and set(map(type, tree)) == _ARRAY_ONLY:
        return tree, _list_spec(len(tree))
    return optree.tree_flatten(tree)  # pyright: ignore[reportArgumentType]


_ARRAY_ONLY = {cla.Array}


def flatten_like(
    tree: Any,
    treedef: optree.PyTreeSpec,
    what: str,
    ref: str,
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """Leaves of ``tree``, which must have the structure ``treedef`` (nodes that ``is_leaf``
    says are leaves: 8-bit state)."""
    if is_leaf is None:
        leaves, other = flatten(tree)
    else:
        leaves, other = optree.tree_flatten(tree, is_leaf=is_leaf)
    if other != treedef:
        raise ValueError(
            f"{what} has a different tree structure from {ref}:\n  {what}: {other}\n"
            f"  {ref}: {treedef}"
        )
    return leaves


def check_leaves(
    u: list[Any],
    others: Sequence[Role],
    tree: Any,
    queue: cl.CommandQueue,
    u_role: str,
) -> None:
    """Every leaf is a C-contiguous float array on one OpenCL context, shaped like ``u``'s
    (the ``u_role``: grads or updates). Errors name the leaf and the role it is wrong in."""
    roles = [(u_role, u), *((what, leaves) for what, leaves, _ in others)]
    ctx, home = _home_context(roles, queue)
    names: list[str] | None = None
    checked: set[np.dtype] = set()
    for i, x in enumerate(u):
        bad = _unusable(x, u_role, ctx, home)
        if bad is None and x.dtype not in checked:
            check_float_dtype(x.dtype, queue, u_role)
            checked.add(x.dtype)
        if bad is None and not x.flags.c_contiguous:
            bad = f"is not C-contiguous in {u_role}"
        for what, leaves, dtype_of in others:
            if bad is not None:
                break
            y = leaves[i]
            bad = _unusable(y, what, ctx, home)
            if bad is not None:
                break
            if y.shape != x.shape:
                bad = f"has shape {y.shape} in {what} but {x.shape} in {u_role}"
            elif dtype_of is slot_dtype and y.dtype not in slot_storages(x.dtype):
                allowed = ", ".join(map(str, slot_storages(x.dtype)))
                bad = f"has dtype {y.dtype} in {what}, expected one of {allowed}"
            elif dtype_of is not slot_dtype and y.dtype != dtype_of(x.dtype):
                bad = f"has dtype {y.dtype} in {what}, expected {dtype_of(x.dtype)}"
            elif not y.flags.c_contiguous:
                bad = f"is not C-contiguous in {what}"
        if bad is not None:
            names = names or path_names(tree)
            if DONATED in bad:
                raise DonatedArrayError(f"leaf {names[i]} {bad}")
            raise (TypeError if "dtype" in bad or "not a" in bad else ValueError)(
                f"leaf {names[i]} {bad}"
            )


def _unusable(x: Any, role: str, ctx: cl.Context, home: list[str]) -> str | None:
    """Why the leaf ``x`` of ``role`` cannot take part in a step on ``ctx`` (the context of
    the roles ``home``), or ``None``."""
    if type(x) is DonatedArray:
        return f"of {role} {DONATED}"
    if not isinstance(x, cla.Array):
        return f"of {role} is a {type(x).__name__}, not a pyopencl.array.Array"
    if x.context != ctx:
        others = [r for r in home if r != role] or home
        return f"of {role} belongs to another OpenCL context than {others[0]}"
    return None


def _home_context(
    roles: Sequence[tuple[str, list[Any]]], queue: cl.CommandQueue
) -> tuple[cl.Context, list[str]]:
    """The context of most of the step's arrays and the roles with arrays on it (params
    first), for an error that blames the leaves elsewhere; a tie goes to the default
    queue's context, then to the params'. Roles: ``(name, leaves)``."""
    by_ctx: dict[cl.Context, list[str]] = {}
    count: dict[cl.Context, int] = {}
    for role, leaves in roles:
        for x in leaves:
            if isinstance(x, cla.Array) and type(x) is not DonatedArray:
                ctx = cast(cl.Context, x.context)  # (pyopencl types it optional)
                count[ctx] = count.get(ctx, 0) + 1
                if role not in by_ctx.setdefault(ctx, []):
                    by_ctx[ctx].append(role)
    if not count:
        return queue.context, ["the queue"]
    default = getattr(_device, "_default_queue", None)  # (none is created here)
    ranked = sorted(
        count,
        key=lambda c: (
            -count[c],
            default is None or c != default.context,
            "params" not in by_ctx[c],
        ),
    )
    home = ranked[0]
    return home, sorted(by_ctx[home], key=lambda role: role != "params")


def all_valid(u: list[Any], others: Sequence[Role], queue: cl.CommandQueue) -> bool:
    """The common case of :func:`check_leaves`, as list comparisons (no per-leaf branches).
    ``False`` means "look closer", not necessarily an error."""
    try:
        shapes = [x.shape for x in u]
        dtypes = [x.dtype for x in u]
        kinds = set(dtypes)
        if not kinds <= _OK_DTYPES or (_F64 in kinds and acc_ctype(queue) != "double"):
            return False
        if len(kinds) == 1:
            strides = layout(tuple(shapes), dtypes[0]).strides
        else:
            strides = [c_strides(s, d.itemsize) for s, d in zip(shapes, dtypes, strict=True)]
        if [x.strides for x in u] != strides:
            return False
        ctx = queue.context
        if not _same_context([u, *(leaves for _, leaves, _ in others)], ctx):
            return False
        for _, leaves, dtype_of in others:
            if [y.shape for y in leaves] != shapes:
                return False
            want = dtypes if dtype_of is same_dtype else [dtype_of(d) for d in dtypes]
            got = [y.dtype for y in leaves]
            if got != want:
                if dtype_of is not slot_dtype or not all(
                    y in slot_storages(x) for x, y in zip(dtypes, got, strict=True)
                ):
                    return False
                want = got
            if want is not dtypes and len(set(want)) == 1:
                want_strides = layout(tuple(shapes), want[0]).strides
            elif want is dtypes:
                want_strides = strides
            else:
                want_strides = [c_strides(s, d.itemsize) for s, d in zip(shapes, want, strict=True)]
            if [y.strides for y in leaves] != want_strides:
                return False
        return True
    except (AttributeError, TypeError, DonatedArrayError):
        return False


def _same_context(roles: Sequence[list[Any]], ctx: cl.Context) -> bool:
    for leaves in roles:
        contexts = [x.context for x in leaves]
        if contexts.count(ctx) != len(contexts):  # identity first, then ==
            return False
    return True


def same_dtype(dtype: np.dtype) -> np.dtype:
    """A role whose leaves have the updates' dtypes (params)."""
    return dtype


slot_dtype = lru_cache(maxsize=None)(state_dtype)  # a slot role's dtype (state_dtype, cached)


@cache
def slot_storages(dtype: np.dtype) -> tuple[np.dtype, ...]:
    """The dtypes a slot's leaves may be stored as for updates of ``dtype``: the state dtype
    (float32; float64 for float64), or float16 or bfloat16 (math in float32)."""
    if dtype == np.float64:
        return (np.dtype(np.float64),)
    return STATE_STORAGE


_OK_DTYPES = set(FLOAT_DTYPES)
_F64 = np.dtype(np.float64)


def check_donation(params: Any, grads: Any, state: Any, grads_role: str = "grads") -> None:
    """Raise before a donated step writes anything: an array of ``params``, ``grads`` or
    ``state`` already donated (:class:`DonatedArrayError`), or an array of ``params`` or
    ``state`` that shares memory with another array of the three (``ValueError``)."""
    roles = []
    for role, tree, written in (
        ("params", params, True),
        (grads_role, grads, False),
        ("state", state, True),
    ):
        leaves = optree.tree_leaves(tree)
        for i, x in enumerate(leaves):
            if type(x) is DonatedArray:
                raise DonatedArrayError(f"leaf {path_names(tree)[i]} of {role} {DONATED}")
        roles.append((role, tree, leaves, written))
    check_unshared(roles)


def check_unshared(roles: list[tuple[str, Any, list[Any], bool]]) -> None:
    """Raise if an array written in place (a donated one) shares memory with another array of
    the step. ``roles``: ``(name, tree, leaves, written)``; leaves that are not device arrays
    are skipped; a leaf's path is its index in ``tree``."""
    arrays = [
        [(i, x) for i, x in enumerate(leaves) if isinstance(x, cla.Array)]
        for _, _, leaves, _ in roles
    ]
    pair = first_shared(
        [([x for _, x in found], w) for found, (_, _, _, w) in zip(arrays, roles, strict=True)]
    )
    if pair is None:
        return
    (ra, ja), (rb, jb) = pair
    (ia, a), (ib, b) = arrays[ra][ja], arrays[rb][jb]
    name_a = f"leaf {path_names(roles[ra][1])[ia]} of {roles[ra][0]}"
    name_b = f"leaf {path_names(roles[rb][1])[ib]} of {roles[rb][0]}"
    how = "are the same memory (one array twice)" if same_memory(a, b) else "overlap in memory"
    raise ValueError(
        f"no.step(..., donate=True): {name_a} and {name_b} {how}; the step writes donated "
        "params and state in place, so a donated array must share no memory with any other "
        "array of the step (pass separate arrays, or donate=False)"
    )


def group_by_dtype(leaves: Sequence[cla.Array]) -> dict[np.dtype, list[int]]:
    dtypes = [x.dtype for x in leaves]
    if dtypes and dtypes.count(dtypes[0]) == len(dtypes):
        return {dtypes[0]: list(range(len(dtypes)))}
    groups: dict[np.dtype, list[int]] = {}
    for i, d in enumerate(dtypes):
        groups.setdefault(d, []).append(i)
    return groups


def queue_of_leaves(leaves: Sequence[Any]) -> cl.CommandQueue:
    """The queue of the first usable device array among ``leaves``, else the default one."""
    for x in leaves:
        if isinstance(x, cla.Array) and type(x) is not DonatedArray and x.queue is not None:
            return x.queue
    return default_queue()


def check_init_leaves(leaves: list[Any], tree: Any, queue: cl.CommandQueue) -> None:
    """``init``'s params: every leaf a device array of a float dtype the device supports
    (raises naming the first that is not)."""
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(
                f"init: leaf {path_names(tree)[i]} is a {type(x).__name__}, "
                "not a pyopencl.array.Array (use netcl_optim.to_device)"
            )
        check_float_dtype(x.dtype, queue, f"init: leaf {path_names(tree)[i]}")
