"""SM3 (Anil et al., 2019, "Memory-Efficient Adaptive Optimization"): optax's
``scale_by_sm3`` and ``sm3`` (its names, signatures and defaults). The accumulators are one
vector per axis of each leaf (a leaf of rank <= 1: one array of its shape), so the state is
not shaped like the params: the transform runs kernels of its own (``fusion/_sm3.py``)."""

from __future__ import annotations

__all__ = ["SM3", "ScaleBySM3State", "scale_by_sm3", "sm3"]

import math
from functools import lru_cache
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import GradientTransformation, StagePlan
from .._device import check_float_dtype, state_dtype
from .._packing import DonatedArray, c_strides, layout
from .._state_check import NamedTupleSpec, register
from .._validation import CLOSED_UNIT, NON_NEGATIVE, check
from ..fusion import EightBit, Slice, slice_for, slot_dtype_of, whole_updates, whole_view
from ..fusion._checks import flatten, group_by_dtype, path_names, queue_of_leaves, slot_storages
from ..fusion._fused import init_slots
from ..fusion._sm3 import sm3_group, sm3_mu_shapes
from ..fusion._storage import slot_rule
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain
from ..transforms._scaling import scale, scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ._shared import ascent


class ScaleBySM3State(NamedTuple):
    """``mu``: per leaf, a list of accumulators (one ``(shape[i],)`` vector per axis for
    rank >= 2, else one array of the leaf's shape); ``nu``: the momentum, like the params.
    Both in the state dtype (float32 for float16, bfloat16 and float32 params), or as
    ``low_precision_state`` stores them (slots ``mu``, ``nu``: float16 or bfloat16)."""

    mu: Any
    nu: Any


def _whole_totals(s: Any) -> tuple[int, int]:
    """A ZeRO slice's state sizes: the whole leaves' accumulators, and its momentum (a
    slice, as the params')."""
    mu = sum(math.prod(m) for shape in s.shapes for m in sm3_mu_shapes(shape))
    return mu, s.hi - s.lo


_scratch: dict[tuple, cla.Array] = {}


def _whole_momentum(queue: Any, s: Any, dtype: Any) -> cla.Array:
    """A buffer for the whole leaves' momentum of a slice's step (kept across steps): the
    slice's own part is copied in before the step and out after it; the rest is never read
    into anything the slice keeps (the momentum is element-wise)."""
    key = (queue, s.shapes, np.dtype(dtype))
    buf = _scratch.get(key)
    if buf is None:
        buf = _scratch[key] = cla.zeros(queue, (max(sum(map(math.prod, s.shapes)), 1),), dtype)
    return buf


def _storage_rule() -> tuple[Any, Any]:
    """The dtypes (for a params dtype) of new accumulators (slot ``mu``) and momentum
    (``nu``) under the active storage rule (see ``low_precision_state``); 8 bits: ValueError."""
    for name in ("mu", "nu"):
        if isinstance(slot_rule(name), EightBit):
            raise ValueError(
                f"scale_by_sm3: {name} cannot be stored in 8 bits (the accumulators are a max "
                "per axis, not element-wise): use state_dtype"
            )
    return slot_dtype_of("mu"), slot_dtype_of("nu")


def _init(params: Any) -> ScaleBySM3State:
    leaves, treedef = optree.tree_flatten(params)
    mu_dtype, nu_dtype = _storage_rule()
    if leaves and all(slice_for(leaves, [i]) is not None for i in range(len(leaves))):
        return _init_sliced(leaves, treedef, mu_dtype, nu_dtype)
    nu = init_slots(params, 1, ("nu",))[0]  # checks the leaves
    mu: list[Any] = [None] * len(leaves)
    if leaves:
        queue = queue_of_leaves(leaves)
        for dtype, idx in group_by_dtype(leaves).items():
            per_leaf = [sm3_mu_shapes(leaves[i].shape) for i in idx]
            block = layout(tuple(s for m in per_leaf for s in m), mu_dtype(dtype)).allocate(queue)
            block.fill(queue, 0)
            views = iter(block.views)
            for i, shapes in zip(idx, per_leaf, strict=True):
                mu[i] = [next(views) for _ in shapes]
    return ScaleBySM3State(mu=optree.tree_unflatten(treedef, mu), nu=nu)


def _init_sliced(leaves: list[Any], treedef: Any, mu_dtype: Any, nu_dtype: Any) -> ScaleBySM3State:
    """On ZeRO slices: per dtype, the whole leaves' accumulators (every rank keeps them
    whole: O(sum of dims)) and the slice's momentum, each one 1-D array."""
    queue = queue_of_leaves(leaves)
    mu, nu = [], []
    for x in leaves:
        n_mu, n_nu = _whole_totals(slice_for([x], [0]))
        arrays = []
        for n, dtype_of in ((n_mu, mu_dtype), (n_nu, nu_dtype)):
            block = layout(((n,),), dtype_of(x.dtype)).allocate(queue)
            block.fill(queue, 0)
            arrays.append(block.views[0])
        mu.append([arrays[0]])
        nu.append(arrays[1])
    return ScaleBySM3State(optree.tree_unflatten(treedef, mu), optree.tree_unflatten(treedef, nu))


def _run_sliced(
    leaves: list[Any], treedef: Any, state: Any, b1: float, b2: float, eps: float, inplace: bool
) -> tuple[Any, ScaleBySM3State]:
    """A ZeRO step: per dtype, SM3 over the whole leaves (the momentum's other ranks' parts
    in a scratch buffer, never kept), the slice of its updates and momentum."""
    if not isinstance(state, ScaleBySM3State):
        raise ValueError(f"scale_by_sm3: expected a ScaleBySM3State, got {type(state).__name__}")
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    queue = queue_of_leaves(leaves)
    out, new_mu, new_nu = [], [], []
    for x, mu, nu in zip(leaves, mus, nus, strict=True):
        s = cast(Slice, slice_for([x], [0]))  # (the caller's check: not None)
        n_mu, n_nu = _whole_totals(s)
        if isinstance(mu, cla.Array):  # the stateful layer's accumulator buffer
            mu = [mu]
        ok = isinstance(mu, (list, tuple)) and len(mu) == 1 and isinstance(mu[0], cla.Array)
        ok = ok and isinstance(nu, cla.Array)
        mu_st = _storage(x.dtype, mu[0] if ok else None)
        nu_st = _storage(x.dtype, nu if ok else None)
        if not (ok and mu[0].shape == (n_mu,) and nu.shape == (n_nu,)
                and mu[0].dtype == mu_st and nu.dtype == nu_st):  # fmt: skip
            raise ValueError(
                f"scale_by_sm3: the state of a ZeRO slice of {x.dtype} holds one accumulator "
                f"array of {n_mu} and a momentum of {n_nu} elements ({mu_st}, {nu_st}); got "
                f"{_what(mu)} and {_what(nu)}"
            )
        whole = whole_updates(s, x)
        mu_shapes = tuple(m for shape in s.shapes for m in sm3_mu_shapes(shape))
        m_views = layout(mu_shapes, mu_st).views_of(queue, mu[0].base_data, mu[0].offset)
        scratch = _whole_momentum(queue, s, nu_st)
        _copy(queue, whole_view(scratch, s.lo, n_nu), nu)
        n_views = layout(s.shapes, nu_st).views_of(queue, scratch.base_data, scratch.offset)
        o, m, n = sm3_group(queue, whole, m_views, n_views, b1, b2, eps, inplace)
        out.append(whole_view(o[0], s.lo, n_nu))
        new_mu.append(list(mu) if inplace else [whole_view(m[0], 0, n_mu)])
        fresh = nu if inplace else layout(((n_nu,),), nu_st).allocate(queue).views[0]
        _copy(queue, fresh, whole_view(n[0], s.lo, n_nu))
        new_nu.append(fresh)
    unflat = lambda ls: optree.tree_unflatten(treedef, ls)  # noqa: E731
    return unflat(out), ScaleBySM3State(unflat(new_mu), unflat(new_nu))


def _storage(dtype: np.dtype, stored: Any) -> np.dtype:
    """The dtype a state array of updates of ``dtype`` must have, where it is stored as
    ``stored`` (an array, or None): its own where that is a storage for ``dtype`` (the state
    dtype, or float16 or bfloat16 for float32 and half updates), else the state dtype."""
    got = getattr(stored, "dtype", None)
    return cast(np.dtype, got) if got in slot_storages(np.dtype(dtype)) else state_dtype(dtype)


def _group_storages(u: list[Any], mu: list[Any], nu: list[Any]) -> tuple[list, list]:
    """Per leaf, the dtypes its accumulators and its momentum must have: as the first leaf
    of its dtype group stores them (see :func:`_storage`)."""
    first: dict[np.dtype, tuple[np.dtype, np.dtype]] = {}
    mus, nus = [], []
    for x, m, n in zip(u, mu, nu, strict=True):
        d = getattr(x, "dtype", None)
        if d is None:  # (not an array: the caller names it)
            mus.append(None)
            nus.append(None)
            continue
        if d not in first:
            m0 = m[0] if isinstance(m, (list, tuple)) and len(m) else None
            first[d] = (_storage(d, m0), _storage(d, n))
        mus.append(first[d][0])
        nus.append(first[d][1])
    return mus, nus


def _copy(queue: Any, dst: cla.Array, src: cla.Array) -> None:
    """Device-to-device copy between 1-D arrays of one size."""
    if src.nbytes:
        cl.enqueue_copy(queue, dst.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                        dst_offset=dst.offset, src_offset=src.offset)  # fmt: skip


@lru_cache(maxsize=64)
def _expected(
    shapes: tuple, dtypes: tuple, mu_st: tuple, nu_st: tuple
) -> tuple[list, list, list, list, list]:
    """Per leaf, its accumulator count, its updates' C strides, its momentum's, then every
    accumulator's ``(shape, dtype, strides)`` in order, and the momentum's dtypes (``mu_st``,
    ``nu_st``: per leaf, how its state is stored)."""
    mu_shapes = [sm3_mu_shapes(s) for s in shapes]
    mu = [(m, t) for ms, t in zip(mu_shapes, mu_st, strict=True) for m in ms]
    return (
        [len(ms) for ms in mu_shapes],
        [c_strides(s, np.dtype(d).itemsize) for s, d in zip(shapes, dtypes, strict=True)],
        [c_strides(s, t.itemsize) for s, t in zip(shapes, nu_st, strict=True)],
        [(m, t, c_strides(m, t.itemsize)) for m, t in mu],
        list(nu_st),
    )


def _leaves_ok(u: list[Any], mu: list[Any], nu: list[Any], queue: Any) -> bool:
    """The common case of :func:`_check` as list comparisons (a 160-leaf step: ~4 ms of
    host time leaf by leaf); ``False``: look closer."""
    try:
        flat_mu = [a for m in mu for a in m]
        if set(map(type, [*u, *nu, *flat_mu])) != {cla.Array}:
            return False
        shapes = tuple(x.shape for x in u)
        dtypes = tuple(x.dtype for x in u)
        mu_st, nu_st = _group_storages(u, mu, nu)
        counts, u_strides, nu_strides, mu_want, st = _expected(
            shapes, dtypes, tuple(mu_st), tuple(nu_st)
        )
        if [len(m) for m in mu] != counts or [x.strides for x in u] != u_strides:
            return False
        if [x.shape for x in nu] != list(shapes) or [x.dtype for x in nu] != st:
            return False
        if [x.strides for x in nu] != nu_strides:
            return False
        if [(a.shape, a.dtype, a.strides) for a in flat_mu] != mu_want:
            return False
        contexts = [a.context for a in (*u, *nu, *flat_mu)]
        if contexts.count(queue.context) != len(contexts):
            return False
        for d in set(dtypes):
            check_float_dtype(d, queue, "scale_by_sm3: updates")
    except AttributeError:
        return False
    return True


def _check(
    updates: Any, state: Any
) -> tuple[list[cla.Array], Any, list[list[cla.Array]], list[cla.Array]]:
    """The leaves of ``updates``, its treedef, and per leaf its accumulators and momentum;
    raise naming the leaf if any is unusable or does not match."""
    if not isinstance(state, ScaleBySM3State):
        raise ValueError(
            f"scale_by_sm3: expected a ScaleBySM3State, got {type(state).__name__}; pass the "
            "state that this optimizer's init returned"
        )
    u, treedef = flatten(updates)
    names: list[str] | None = None

    def name(i: int) -> str:
        nonlocal names
        names = names or path_names(updates)
        return names[i]

    nu, nu_def = flatten(state.nu)
    if nu_def != treedef:
        raise ValueError(
            f"scale_by_sm3: state.nu has a different tree structure from the updates:\n"
            f"  state.nu: {nu_def}\n  updates: {treedef}"
        )
    try:
        mu: list[Any] = treedef.flatten_up_to(state.mu)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"scale_by_sm3: state.mu does not have the updates' tree structure ({e})"
        ) from None
    if not u:
        return u, treedef, [], []
    # the stateful layer keeps each leaf's accumulators as one flat array (see flat_shape)
    mu = [_split(m, x.shape) if _is_flat(m, x) else m for m, x in zip(mu, u, strict=True)]
    queue = queue_of_leaves(u)
    if _leaves_ok(u, mu, nu, queue):
        return u, treedef, [list(m) for m in mu], nu
    ctx = None
    mu_st, nu_st = _group_storages(u, mu, nu)
    for i, x in enumerate(u):
        if not isinstance(x, cla.Array) or type(x) is DonatedArray:
            raise TypeError(
                f"scale_by_sm3: leaf {name(i)} of updates is a {type(x).__name__}, not a "
                "pyopencl.array.Array"
            )
        ctx = ctx or x.context
        check_float_dtype(x.dtype, queue, f"scale_by_sm3: leaf {name(i)} of updates")
        mu_shapes = sm3_mu_shapes(x.shape)
        m = mu[i]
        if not isinstance(m, (list, tuple)) or len(m) != len(mu_shapes):
            raise ValueError(
                f"scale_by_sm3: leaf {name(i)}: state.mu holds {_what(m)}, expected a list of "
                f"{len(mu_shapes)} arrays (shapes {mu_shapes})"
            )
        roles = [("updates", x, x.shape, x.dtype), ("state.nu", nu[i], x.shape, nu_st[i])]
        roles += [
            (f"state.mu[{k}]", a, s, mu_st[i])
            for k, (a, s) in enumerate(zip(m, mu_shapes, strict=True))
        ]
        for role, a, shape, dtype in roles:
            if not isinstance(a, cla.Array) or type(a) is DonatedArray:
                raise TypeError(
                    f"scale_by_sm3: leaf {name(i)}: {role} is a {type(a).__name__}, not a "
                    "pyopencl.array.Array"
                )
            if a.context != ctx:
                raise ValueError(
                    f"scale_by_sm3: leaf {name(i)}: {role} belongs to another OpenCL context "
                    "than the updates"
                )
            if a.shape != shape:
                raise ValueError(
                    f"scale_by_sm3: leaf {name(i)}: {role} has shape {a.shape}, expected {shape}"
                )
            if a.dtype != dtype:
                raise TypeError(
                    f"scale_by_sm3: leaf {name(i)}: {role} has dtype {a.dtype}, expected {dtype}"
                )
            if not a.flags.c_contiguous:
                raise ValueError(f"scale_by_sm3: leaf {name(i)}: {role} is not C-contiguous")
    return u, treedef, [list(m) for m in mu], nu


def flat_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A leaf's accumulators as one array (the stateful class's ``accumulator``): the
    vectors of its axes end to end for rank >= 2, else its own shape."""
    return (sum(shape),) if len(shape) >= 2 else tuple(shape)


def _is_flat(m: Any, x: Any) -> bool:
    return isinstance(m, cla.Array) and isinstance(x, cla.Array)


def _split(m: cla.Array, shape: tuple[int, ...]) -> Any:
    """A flat accumulator as views of its axes' vectors (left as it is if it is not one)."""
    if m.shape != flat_shape(shape) or not m.flags.c_contiguous:
        return m
    if len(shape) < 2:
        return [m]
    return layout(tuple(sm3_mu_shapes(shape)), m.dtype).views_of(m.queue, m.base_data, m.offset)  # pyright: ignore[reportArgumentType]


def _what(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> GradientTransformation:
    """SM3-II's scaling (optax's ``scale_by_sm3``, same signature and defaults). Per leaf,
    with ``c = 1 - b2`` (1 when ``b2 == 1``)::

        rank >= 2:  a = c g^2 + b2 min_i mu_i[index_i];  mu_i <- max of a over all axes but i
        rank <= 1:  a = c g^2 + b2 mu;                    mu <- a
        nu <- (1 - b1) g / sqrt(a + eps) (0 where a == 0) + b1 nu
        u  <- nu

    ``mu``: one vector per axis of a leaf of rank >= 2, else one array of the leaf's shape
    (a 0-d leaf is one element; optax raises on it). Device: three launches per dtype group
    of a packed tree, whatever the number of leaves; no host read.
    """
    check(CLOSED_UNIT, b1=b1, b2=b2)
    check(NON_NEGATIVE, eps=eps)
    b1, b2, eps = float(b1), float(b2), float(eps)

    def run(
        updates: Any, state: Any, params: Any = None, *, inplace: bool, **extra_args: Any
    ) -> tuple[Any, ScaleBySM3State]:
        leaves, treedef = flatten(updates)
        if leaves and all(slice_for(leaves, [i]) is not None for i in range(len(leaves))):
            return _run_sliced(leaves, treedef, state, b1, b2, eps, inplace)
        u, treedef, mu, nu = _check(updates, state)
        if not u:
            return updates, state
        queue = queue_of_leaves(u)
        out: list[Any] = [None] * len(u)
        new_mu: list[Any] = [None] * len(u)
        new_nu: list[Any] = [None] * len(u)
        for _, idx in group_by_dtype(u).items():
            counts = [len(mu[i]) for i in idx]
            o, m, n = sm3_group(
                queue,
                [u[i] for i in idx],
                [a for i in idx for a in mu[i]],
                [nu[i] for i in idx],
                b1,
                b2,
                eps,
                inplace,
            )
            ms = iter(m)
            for i, k, oi, ni in zip(idx, counts, o, n, strict=True):
                out[i], new_nu[i] = oi, ni
                new_mu[i] = [next(ms) for _ in range(k)]
        updates_out = optree.tree_unflatten(treedef, out)
        if inplace:
            return updates_out, state
        return updates_out, ScaleBySM3State(
            mu=optree.tree_unflatten(treedef, new_mu), nu=optree.tree_unflatten(treedef, new_nu)
        )

    def update(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ScaleBySM3State]:
        return run(updates, state, params, inplace=False, **extra_args)

    plan = StagePlan(
        "scale_by_sm3", run, config=(b1, b2, eps), state_shapes=(("mu", flat_shape),), shards=True
    )
    tx = GradientTransformation(_init, update, plan)
    return register(tx, lambda: NamedTupleSpec(ScaleBySM3State))


def sm3(
    learning_rate: float, momentum: float = 0.9, *, state_dtype: Any = None, state_bits: int = 32
) -> GradientTransformation:
    """SM3 (optax's ``sm3``: ``chain(scale_by_sm3(b1=momentum), scale(-learning_rate))``)::

    u <- scale_by_sm3(b1=momentum)(g);  p <- p - learning_rate u

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check(CLOSED_UNIT, momentum=momentum)
    tx = chain(scale_by_sm3(b1=momentum), scale(-learning_rate))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


# torch.optim has none; the keys follow torch-optimizer's ("momentum_buffer"), with a
# param's accumulators end to end under one key (see flat_shape)
SM3_STATE = torch_state(ScaleBySM3State, mu="accumulator", nu="momentum_buffer")


class SM3(Optimizer):
    """SM3 (the maths is :func:`netcl_optim.sm3`, optax's rule)::

        g   <- -g                                               (if maximize)
        a    = g^2 + min_i accumulator_i[index_i]  (rank >= 2; else g^2 + accumulator)
        accumulator_i <- max of a over all axes but i
        m   <- momentum m + (1 - momentum) g / sqrt(a + 1e-8)   (0 where a == 0)
        p   <- p - lr m

    torch.optim has no SM3; torch-optimizer's (``SM3``) differs (no ``1 - momentum``, its
    own epsilon).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 0.1, torch-optimizer's).
      momentum: in [0, 1] (default 0.9, optax's).
      maximize: maximize the objective (default False).

    State per parameter: ``momentum_buffer`` (shaped like it) and ``accumulator`` (its
    axes' vectors end to end, shape ``(sum(shape),)``, for rank >= 2; else its shape).
    """

    hyperparameters = (
        torch_lr(0.1),
        Hyperparameter("momentum", 0.9, CLOSED_UNIT),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (SM3_STATE,)
    torch_step = True

    @staticmethod
    def functional(lr: Any, momentum: float, maximize: bool) -> GradientTransformation:
        return chain(*ascent(maximize), scale_by_sm3(b1=momentum), scale_by_learning_rate(lr))
