"""Run fused fragments over pytrees: one launch per dtype for packed trees, else one per leaf."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .. import _device
from .._base import GradientTransformation, Part
from .._device import (
    allocator,
    check_float_dtype,
    default_queue,
    has_fp64,
    side_queue,
    state_dtype,
)
from .._packing import (
    DONATED,
    DonatedArray,
    DonatedArrayError,
    Layout,
    allocate_like,
    contiguous_run,
    element_offset,
    first_shared,
    hand_over,
    layout,
    same_memory,
)
from .._packing import c_strides as _c_strides
from .._state_check import checked_transform
from ._codegen import KernelSpec
from ._programs import finish_kernel, fused_kernel, reduce_kernel

_SPLIT = 256  # big launches are split so the main part's size has a good local size
SIDE_QUEUE_FROM = 16  # independent launches in one step that go to the side queue (CPU)


def _path_names(tree: Any) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return ["root" + "".join(f"[{k!r}]" for k in path) for path in paths]


@lru_cache(maxsize=1024)
def _list_spec(n: int) -> optree.PyTreeSpec:
    return optree.tree_structure(list(range(n)))


def _flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """``optree.tree_flatten``, with a shortcut for a plain list of device arrays (what the
    stateful layer passes every step)."""
    if type(tree) is list and set(map(type, tree)) == _ARRAY_ONLY:
        return tree, _list_spec(len(tree))
    return optree.tree_flatten(tree)


_ARRAY_ONLY = {cla.Array}


def flatten_like(tree: Any, treedef: optree.PyTreeSpec, what: str, ref: str) -> list[Any]:
    """Leaves of ``tree``, which must have the structure ``treedef``."""
    leaves, other = _flatten(tree)
    if other != treedef:
        raise ValueError(
            f"{what} has a different tree structure from {ref}:\n  {what}: {other}\n"
            f"  {ref}: {treedef}"
        )
    return leaves


def _check_leaves(
    u: list[Any],
    others: Sequence[tuple[str, list[Any], Callable[[np.dtype], np.dtype]]],
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
            elif y.dtype != dtype_of(x.dtype):
                bad = f"has dtype {y.dtype} in {what}, expected {dtype_of(x.dtype)}"
            elif not y.flags.c_contiguous:
                bad = f"is not C-contiguous in {what}"
        if bad is not None:
            names = names or _path_names(tree)
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
                count[x.context] = count.get(x.context, 0) + 1
                if role not in by_ctx.setdefault(x.context, []):
                    by_ctx[x.context].append(role)
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


def _all_valid(
    u: list[Any], others: Sequence[tuple[str, list[Any], Callable]], queue: cl.CommandQueue
) -> bool:
    """The common case of :func:`_check_leaves`, as list comparisons (no per-leaf branches).
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
            strides = [_c_strides(s, d.itemsize) for s, d in zip(shapes, dtypes, strict=True)]
        if [x.strides for x in u] != strides:
            return False
        ctx = queue.context
        if not _same_context([u, *(leaves for _, leaves, _ in others)], ctx):
            return False
        for _, leaves, dtype_of in others:
            if [y.shape for y in leaves] != shapes:
                return False
            want = dtypes if dtype_of is _same else [dtype_of(d) for d in dtypes]
            if [y.dtype for y in leaves] != want:
                return False
            if want is not dtypes and len(kinds) == 1:
                want_strides = layout(tuple(shapes), want[0]).strides
            elif want is dtypes:
                want_strides = strides
            else:
                want_strides = [
                    _c_strides(s, d.itemsize) for s, d in zip(shapes, want, strict=True)
                ]
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


def _same(dtype: np.dtype) -> np.dtype:
    return dtype


_state_dtype = lru_cache(maxsize=None)(state_dtype)


_OK_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_F64 = np.dtype(np.float64)


_acc: dict[cl.CommandQueue, str] = {}


def acc_ctype(queue: cl.CommandQueue) -> str:
    """C type of reduction results on ``queue``'s device."""
    acc = _acc.get(queue)
    if acc is None:
        acc = _acc[queue] = "double" if has_fp64(queue.device) else "float"
    return acc


class LaunchCounter:
    """Counts kernel launches while active (see :func:`count_launches`)."""

    def __init__(self) -> None:
        self.launches = 0
        self.kernels: list[str] = []


_counters: list[LaunchCounter] = []


def _count(name: str, launches: int = 1) -> None:
    for c in _counters:
        c.launches += launches
        c.kernels.extend([name] * launches)


class count_launches:
    """``with count_launches() as c: ...`` counts this library's kernel launches in the block."""

    def __enter__(self) -> LaunchCounter:
        self.counter = LaunchCounter()
        _counters.append(self.counter)
        return self.counter

    def __exit__(self, *exc: object) -> None:
        _counters.remove(self.counter)


def _launch(kernel: cl.Kernel, queue: cl.CommandQueue, n: int, args: list[Any]) -> None:
    """Enqueue ``n`` work-items with no bounds check in the kernel. A large size that is not a
    multiple of 32 runs as a multiple of 256 plus a tail at a global offset: the runtime picks
    the local size from the divisors of the global size, and a prime 1M ran 90x slower (PoCL)."""
    if n >= 4 * _SPLIT and n % 32:
        main = n - n % _SPLIT
        kernel(queue, (main,), None, *args)
        kernel(queue, (n - main,), None, *args, global_offset=(main,))
        launched = 2
    else:
        kernel(queue, (n,), None, *args)
        launched = 1
    if _counters:
        _count(kernel.function_name, launched)


def _launch_all(
    queue: cl.CommandQueue, launches: list[tuple[cl.Kernel, int, list[Any]]], independent: bool
) -> None:
    """Enqueue ``launches`` after ``queue``'s earlier work and before its later work.

    Many ``independent`` launches (no two touch the same memory) go to the device's side
    queue: PoCL runs ready commands of an out-of-order queue back to back, where its in-order
    queue spends ~8 us between them. They must be ready when enqueued (waiting on an event
    costs as much again), so the host first waits for ``queue``; ``queue`` then waits for them
    with a barrier, and the step stays asynchronous from there.
    """
    side = side_queue(queue) if independent and len(launches) >= SIDE_QUEUE_FROM else None
    if side is None:
        for kernel, n, args in launches:
            _launch(kernel, queue, n, args)
        return
    queue.finish()
    for kernel, n, args in launches:
        _launch(kernel, side, n, args)
    cl.enqueue_barrier(queue, wait_for=[cl.enqueue_marker(side)])
    side.flush()


def _leaves_disjoint(columns: Sequence[Sequence[cla.Array]]) -> bool:
    """Whether the leaves at different indices of ``columns`` (one list of leaves per kernel
    argument) touch disjoint memory, so that their launches may run in any order. A tree
    holding one array twice (tied weights) is the case that matters."""
    spans = sorted(
        (id(x.base_data), x.offset, x.offset + x.nbytes, j)
        for column in columns
        for j, x in enumerate(column)
        if x.nbytes
    )
    base = None
    open_ends: dict[int, int] = {}  # leaf index -> end of its spans still open
    for b, start, end, j in spans:
        if b != base:
            base, open_ends = b, {}
        open_ends = {k: e for k, e in open_ends.items() if e > start}
        if any(k != j for k in open_ends):
            return False
        open_ends[j] = max(open_ends.get(j, 0), end)
    return True


# ---------------------------------------------------------------------------- reductions


def reduce_leaves(
    queue: cl.CommandQueue,
    leaves: Sequence[cla.Array],
    op: str,
    finish: str,
    s0: float = 0.0,
    pw: float = 2.0,
) -> cla.Array:
    """Reduce all ``leaves`` to a small device array (see ``Reduction``): no host sync."""
    acc = acc_ctype(queue)
    acc_dtype = np.float64 if acc == "double" else np.float32
    ctx = queue.context
    by_dtype: dict[np.dtype, list[cla.Array]] = {}
    for x in leaves:
        if x.size:
            by_dtype.setdefault(x.dtype, []).append(x)
    runs: list[tuple[np.dtype, Any, int, int]] = []  # dtype, buffer, offset, n
    for dtype, xs in by_dtype.items():
        packed = contiguous_run(xs)
        if packed is not None:
            runs.append((dtype, packed[0], packed[1], sum(x.size for x in xs)))
        else:
            runs.extend((dtype, x.base_data, element_offset(x), x.size) for x in xs)
    total = sum(r[3] for r in runs)
    chunk = max(4096, -(-total // 512))
    counts = [-(-r[3] // chunk) for r in runs]
    pool = allocator(queue)
    partials = cla.empty(queue, (2 * max(sum(counts), 1),), acc_dtype, allocator=pool)
    out = cla.empty(queue, (2,), acc_dtype, allocator=pool)
    p_off = 0
    for (dtype, base, off, n), count in zip(runs, counts, strict=True):
        kernel = reduce_kernel(ctx, op, dtype, acc)
        if _counters:
            _count(kernel.function_name)
        kernel(queue, (count,), (1,), base, off, n, chunk, partials.base_data, p_off, pw)
        p_off += count
    finisher = finish_kernel(ctx, op, finish, acc)
    if _counters:
        _count(finisher.function_name)
    finisher(queue, (1,), (1,), partials.base_data, p_off, out.base_data, s0, pw)
    return out


# ---------------------------------------------------------------------------- fused parts


def run_parts(
    parts: Sequence[Part],
    updates: Any,
    params: Any,
    *,
    apply: bool,
    inplace: bool,
    donate: bool = False,
    u_role: str = "updates",
) -> tuple[Any, list[tuple[Any, ...]]]:
    """Run ``parts`` (fused) over ``updates``; return the output tree and new slot trees.

    The output is the new updates, or, with ``apply``, the new params (``p + u``). Pure mode
    writes every output to fresh packed buffers; in place, slots and params are updated
    where they are (the stateful layer's ``step_``). ``donate`` (in place, for
    ``no.step(..., donate=True)``): the arrays written must share no memory with any other
    (checked before the launch); afterwards they are :class:`DonatedArray` and the returned
    trees hold new array objects over the same memory. ``u_role`` names ``updates`` in errors.
    """
    if not parts and not apply:
        return updates, []
    u_leaves, treedef = _flatten(updates)
    queue = _queue_of_leaves(u_leaves)
    needs_params = apply or any(p.fragment.needs_params for p in parts)
    others: list[tuple[str, list[Any], Callable]] = []
    p_leaves: list[Any] = []
    if needs_params:
        if params is None:
            names = [p.fragment.name for p in parts if p.fragment.needs_params] or ["apply"]
            raise ValueError(f"{names[0]} needs params: call update(updates, state, params)")
        p_leaves = flatten_like(params, treedef, "params", u_role)
        others.append(("params", p_leaves, _same))
    slot_leaves: list[list[list[Any]]] = []
    for part in parts:
        per_part = []
        for name, tree in zip(part.fragment.slots, part.slots, strict=True):
            leaves = flatten_like(tree, treedef, f"state.{name}", u_role)
            others.append((f"state.{name} of {part.fragment.name}", leaves, _state_dtype))
            per_part.append(leaves)
        slot_leaves.append(per_part)
    fragments = [p.fragment for p in parts]
    keys = tuple(f.key for f in fragments)
    # In place (the stateful layer), the same arrays come back every step: their validation
    # and launch plan are cached, keyed by identity. The entry holds weak references: an id
    # is only trusted while its array is alive, and a stale entry keeps no memory alive.
    cache_key = None
    if inplace and apply:
        cache_key = _plan_key(queue, keys, u_leaves, p_leaves, slot_leaves)
        hit = _plans.get(cache_key)
        if hit is not None and (hit[3] or not donate):  # (a donated step checked it)
            refs = hit[0]
            objs = [r() for r in refs]
            types = set(map(type, objs))
            if _NONE_TYPE not in types and DonatedArray not in types:  # (`None in` calls __eq__)
                tail_hit: list[Any] = _reduce_parts(parts, u_leaves, queue)
                for part in parts:
                    tail_hit.extend(part.scalars)
                planned = [
                    (kernel, n, [objs[a].base_data if type(a) is _Leaf else a for a in template])
                    for kernel, n, template in hit[1]
                ]
                for _, _, args in planned:
                    args += tail_hit
                _launch_all(queue, planned, hit[2])
                if not donate:
                    return params, [part.slots for part in parts]
                del _plans[cache_key]
                p_leaves, slot_leaves = _hand_over(p_leaves, slot_leaves, True)
                rest = list(p_leaves)
                for per in slot_leaves:
                    for ls in per:
                        rest += ls
                key = _plan_key(queue, keys, u_leaves, p_leaves, slot_leaves)
                _plans[key] = ([*refs[: len(u_leaves)], *map(weakref.ref, rest)], *hit[1:])
                return optree.tree_unflatten(treedef, p_leaves), _slot_trees(treedef, slot_leaves)
    if not _all_valid(u_leaves, others, queue):
        _check_leaves(u_leaves, others, updates, queue, u_role)

    acc = acc_ctype(queue)
    ctx = queue.context

    by_dtype = _group_by_dtype(u_leaves)
    single = len(by_dtype) == 1

    n_leaves = len(u_leaves)
    out_leaves: list[Any] = [None] * n_leaves
    new_slot_leaves = [[[None] * n_leaves for _ in per] for per in slot_leaves]
    inplace_params = inplace and apply
    mode = "inplace" if inplace else "pure"
    tail_scalars: list[Any] = []
    for part in parts:
        tail_scalars.extend(part.scalars)

    def pick(leaves: list[Any], idx: list[int]) -> list[Any]:
        return leaves if single else [leaves[i] for i in idx]

    def place(dst: list[Any], idx: list[int], src: list[Any]) -> None:
        if single:
            dst[:] = src
        else:
            for i, o in zip(idx, src, strict=True):
                dst[i] = o

    launches: list[tuple[cl.Kernel, int, list[Any]]] = []
    roles: list[list[cla.Array]] = []  # per dtype group: the arrays of each kernel argument
    runs: list[tuple[Any, int] | None] = []  # their (buffer, element offset) where packed
    packed_bases: list[int] | None = []  # every role's buffer, while each role is packed

    def add_input(leaves: list[cla.Array], lay_: Layout) -> None:
        roles.append(leaves)
        runs.append(contiguous_run(leaves, lay_))

    def add_fresh(lay_: Layout) -> list[cla.Array]:
        block = lay_.allocate(queue)
        roles.append(block.views)
        runs.append((block.buffer, block.offset // lay_.dtype.itemsize))
        return block.views

    for dtype, idx in by_dtype.items():
        spec = KernelSpec(keys, dtype, mode, apply, needs_params, acc)
        kernel, _ = fused_kernel(ctx, fragments, spec)
        group_u = pick(u_leaves, idx)
        lay = layout(tuple([x.shape for x in group_u]), dtype)
        slot_lay = layout(lay.shapes, state_dtype(dtype))
        roles.clear()
        runs.clear()
        add_input(group_u, lay)
        if needs_params:
            add_input(pick(p_leaves, idx), lay)
        outs = roles[-1] if inplace_params else add_fresh(lay)
        place(out_leaves, idx, outs)
        for k, per in enumerate(slot_leaves):
            for s, leaves in enumerate(per):
                ins = pick(leaves, idx)
                add_input(ins, slot_lay)
                news = add_fresh(slot_lay) if mode == "pure" else ins
                place(new_slot_leaves[k][s], idx, news)
        if None not in runs:
            if packed_bases is not None:
                packed_bases.extend(id(base) for base, _ in runs)
            if lay.total:
                args = []
                for base, off in runs:
                    args += [base, off]
                launches.append((kernel, lay.total, args))
        else:
            packed_bases = None
            for j, size in enumerate(lay.sizes):
                if not size:
                    continue
                args = []
                for r in roles:
                    a = r[j]
                    args += [a.base_data, element_offset(a)]
                launches.append((kernel, size, args))
    # donated: no array written may share memory with another (at once if every role is
    # packed in a buffer of its own)
    if donate and (packed_bases is None or len(set(packed_bases)) != len(packed_bases)):
        roles_w = [(u_role, u_leaves, False)]
        if needs_params:
            roles_w.append(("params", p_leaves, inplace_params))
        roles_w.extend(
            (what, leaves, True) for what, leaves, dtype_of in others if dtype_of is _state_dtype
        )
        _check_unshared([(role, updates, leaves, w) for role, leaves, w in roles_w])
    tail = _reduce_parts(parts, u_leaves, queue) + tail_scalars
    # Pure, every output is fresh; in place, the tree's leaves must not share memory.
    independent = len(launches) > 1 and (
        not inplace
        or (
            cache_key is not None
            and _leaves_disjoint([u_leaves, p_leaves, *(ls for per in slot_leaves for ls in per)])
        )
    )
    _launch_all(queue, [(kernel, n, args + tail) for kernel, n, args in launches], independent)
    if donate:
        p_leaves, slot_leaves = _hand_over(p_leaves, slot_leaves, inplace_params)
        if inplace_params:
            out_leaves = p_leaves
        new_slot_leaves = slot_leaves
    if cache_key is not None:
        if len(_plans) >= 64:
            _plans.clear()
        # the plan keeps no buffer alive: a buffer argument is the index of a leaf using it
        leaves = [*u_leaves, *p_leaves, *(x for per in slot_leaves for ls in per for x in ls)]
        index = {}
        for i, x in enumerate(leaves):
            index.setdefault(id(x.base_data), i)
        templates = [
            (kernel, n, [_Leaf(index[id(a)]) if i % 2 == 0 else a for i, a in enumerate(args)])
            for kernel, n, args in launches
        ]
        if donate:  # keyed by the new arrays
            _plans.pop(cache_key, None)
            cache_key = _plan_key(queue, keys, u_leaves, p_leaves, slot_leaves)
        _plans[cache_key] = ([weakref.ref(x) for x in leaves], templates, independent, donate)

    return optree.tree_unflatten(treedef, out_leaves), _slot_trees(treedef, new_slot_leaves)


def _plan_key(
    queue: cl.CommandQueue,
    keys: tuple,
    u_leaves: list[Any],
    p_leaves: list[Any],
    slot_leaves: list[list[list[Any]]],
) -> tuple:
    """The in-place plan cache's key: the arrays' identities (see :func:`run_parts`)."""
    roles_ids = [tuple(map(id, u_leaves)), tuple(map(id, p_leaves))]
    for per in slot_leaves:
        for leaves in per:
            roles_ids.append(tuple(map(id, leaves)))
    return (queue, keys, tuple(roles_ids))


def _slot_trees(treedef: optree.PyTreeSpec, slot_leaves: list[list[list[Any]]]) -> list[tuple]:
    return [tuple(optree.tree_unflatten(treedef, ls) for ls in per) for per in slot_leaves]


def _hand_over(
    p_leaves: list[Any], slot_leaves: list[list[list[Any]]], with_params: bool
) -> tuple[list[Any], list[list[list[Any]]]]:
    """After a donated launch: the arrays it wrote (the params' if ``with_params``, and the
    slots') become :class:`DonatedArray`; returns the params' and slots' leaves with the new
    array objects in their place."""
    written = list(p_leaves) if with_params else []
    for per in slot_leaves:
        for ls in per:
            written += ls
    fresh = hand_over(written)
    k = len(p_leaves) if with_params else 0
    new_p = fresh[:k] if with_params else p_leaves
    new_slots = []
    for per in slot_leaves:
        new_per = []
        for ls in per:
            new_per.append(fresh[k : k + len(ls)])
            k += len(ls)
        new_slots.append(new_per)
    return new_p, new_slots


def _check_unshared(roles: list[tuple[str, Any, list[Any], bool]]) -> None:
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
    name_a = f"leaf {_path_names(roles[ra][1])[ia]} of {roles[ra][0]}"
    name_b = f"leaf {_path_names(roles[rb][1])[ib]} of {roles[rb][0]}"
    how = "are the same memory (one array twice)" if same_memory(a, b) else "overlap in memory"
    raise ValueError(
        f"no.step(..., donate=True): {name_a} and {name_b} {how}; the step writes donated "
        "params and state in place, so a donated array must share no memory with any other "
        "array of the step (pass separate arrays, or donate=False)"
    )


_NONE_TYPE = type(None)


class _Leaf(int):
    """In a cached launch plan: the buffer of the i-th leaf."""


_plans: dict[tuple, tuple[list[weakref.ref], list[tuple[cl.Kernel, int, list[Any]]], bool]] = {}


def _reduce_parts(parts: Sequence[Part], u_leaves: list[Any], queue: cl.CommandQueue) -> list:
    """Run the reduction that starts a segment, if any; its result buffer leads the tail of
    the fused kernel's arguments."""
    tail: list[Any] = []
    for k, part in enumerate(parts):
        red = part.fragment.reduction
        if red is not None:
            if k != 0:
                raise AssertionError("a reduction must start a segment")
            values = dict(zip(part.fragment.scalars, part.scalars, strict=True))
            s0 = float(values.get(red.scalars[0], 0.0)) if red.scalars else 0.0
            pw = float(values.get("norm_type", 2.0))
            tail.append(reduce_leaves(queue, u_leaves, red.op, red.finish, s0, pw).base_data)
    return tail


def _group_by_dtype(leaves: Sequence[cla.Array]) -> dict[np.dtype, list[int]]:
    dtypes = [x.dtype for x in leaves]
    if dtypes and dtypes.count(dtypes[0]) == len(dtypes):
        return {dtypes[0]: list(range(len(dtypes)))}
    groups: dict[np.dtype, list[int]] = {}
    for i, d in enumerate(dtypes):
        groups.setdefault(d, []).append(i)
    return groups


def _queue_of_leaves(leaves: Sequence[Any]) -> cl.CommandQueue:
    for x in leaves:
        if isinstance(x, cla.Array) and type(x) is not DonatedArray and x.queue is not None:
            return x.queue
    return default_queue()


# ---------------------------------------------------------------------------- chains


_chain_plan_type: type | None = None


def _flatten_chain(
    tx: GradientTransformation, state: Any
) -> tuple[list[tuple[Any, Any]], Callable]:
    """A chain's leaf transforms with their states, and how to rebuild the chain's state."""
    global _chain_plan_type
    if _chain_plan_type is None:
        from ..transforms._combining import ChainPlan  # (it imports this module)

        _chain_plan_type = ChainPlan
    plan = tx.fragment
    if isinstance(plan, _chain_plan_type):
        items: list[tuple[Any, Any]] = []
        rebuilds = []
        child_states = plan.child_states(state)
        for child, child_state in zip(plan.children, child_states, strict=True):
            sub_items, sub_rebuild = _flatten_chain(child, child_state)
            rebuilds.append((len(items), len(sub_items), sub_rebuild))
            items.extend(sub_items)

        def rebuild(news: list[Any]) -> Any:
            return plan.make_state([rb(news[s : s + n]) for s, n, rb in rebuilds])

        return items, rebuild
    return [(tx, state)], lambda news: news[0]


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
    items, rebuild = _flatten_chain(tx, state)
    new_states: list[Any] = [None] * len(items)
    u = updates
    u_role = "grads" if apply else "updates"
    i, n = 0, len(items)
    applied = False
    unchecked = donate
    while i < n:
        child, child_state = items[i]
        if child.fragment is None:
            u, new_states[i] = child.update(u, child_state, params, **extra_args)
            i += 1
            continue
        parts: list[Part] = []
        owners = []
        j = i
        while j < n and items[j][0].fragment is not None:
            ps, rb = items[j][0].fragment.plan(items[j][1], extra_args)
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
        for s, seg in enumerate(segments):
            final = last and s == len(segments) - 1
            u, seg_slots = run_parts(
                seg,
                u,
                params,
                apply=apply and final,
                inplace=inplace,
                donate=donate,
                u_role=u_role,
            )
            applied = applied or (apply and final)
            new_slots.extend(seg_slots)
        for k, rb, start, count in owners:
            new_states[k] = rb(new_slots[start : start + count])
        i = j
    if apply and not applied:
        u, _ = run_parts([], u, params, apply=True, inplace=inplace, donate=donate, u_role=u_role)
    return u, rebuild(new_states)


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
                raise DonatedArrayError(f"leaf {_path_names(tree)[i]} of {role} {DONATED}")
        roles.append((role, tree, leaves, written))
    _check_unshared(roles)


def _segments(parts: list[Part]) -> list[list[Part]]:
    """Split before every part with a reduction: its input must be materialised first."""
    segments: list[list[Part]] = [[]]
    for part in parts:
        if part.fragment.reduction is not None and segments[-1]:
            segments.append([])
        segments[-1].append(part)
    return segments


def init_slots(params: Any, count: int) -> list[Any]:
    """``count`` zeroed state trees shaped like ``params``, each packed in one buffer per dtype."""
    leaves, treedef = optree.tree_flatten(params)
    if not leaves:
        return [optree.tree_unflatten(treedef, []) for _ in range(count)]
    queue = _queue_of_leaves(leaves)
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(
                f"init: leaf {_path_names(params)[i]} is a {type(x).__name__}, "
                "not a pyopencl.array.Array (use netcl_optim.to_device)"
            )
        check_float_dtype(x.dtype, queue, f"init: leaf {_path_names(params)[i]}")
    return [
        optree.tree_unflatten(treedef, allocate_like(leaves, queue, state_dtype, fill=0.0))
        for _ in range(count)
    ]
