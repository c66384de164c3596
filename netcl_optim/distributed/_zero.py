"""ZeRO stage 1: optimizer state sharded across ranks, parameters gathered after each step.

Every dtype's parameters form one flat buffer (leaves back to back, in tree order). Rank
``r`` of ``N`` owns the elements ``[total * r // N, total * (r + 1) // N)`` of it (balanced
by element count; a slice may cut through leaves) and keeps optimizer state for those
elements only. A step runs the (element-wise) optimizer on the slice, a 1-D device view of
the packed params and grads, then one ``Allgatherv`` per dtype rebuilds the full tree on
every rank. Element-wise maths makes the result bit-identical to the unsharded optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import GradientTransformation, OpaquePlan, is_elementwise, is_fusible
from .._device import queue_of
from .._packing import Block, Layout, contiguous_run, layout, pack
from .._state_check import register, wrapper
from ..fusion import flatten_like, walk
from ..stateful import Parameter
from ..stateful._optimizer import Optimizer
from ..transforms._update import step as _step
from ._comm import (
    agree,
    by_dtype,
    check_device_leaves,
    committed,
    get_comm,
    in_place,
    packed_run,
    path_names,
    raw,
    signature,
)


def shard_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each rank's slice of ``total`` elements: contiguous, sizes differing
    by at most one. Device: none."""
    return [(total * r // size, total * (r + 1) // size) for r in range(size)]


# ---------------------------------------------------------------------------- shardability


def check_shardable(tx: GradientTransformation, what: str = "shard_optimizer") -> None:
    """Raise unless ``tx`` is element-wise all through, so that running it on a slice of the
    flat parameters gives the same bits as running it on the whole tree.

    Accepted: fragments without a reduction, chains of them, :func:`inject_hyperparams` and
    ``MultiSteps`` over them. Rejected (ValueError): whole-tree reductions
    (``clip_by_global_norm``, finiteness checks): a shard sees only its slice, so the norm
    would be a partial one. Rejected (TypeError): opaque transforms (not fused, e.g.
    ``masked``, a ``mask=`` argument, ``partition``), which may depend on the tree.
    """
    culprit = next((t for t in walk(tx) if not is_elementwise(t)), None)  # innermost first
    if culprit is None:
        return
    reduction = getattr(culprit.plan, "reduction", None)  # a fragment's
    if is_fusible(culprit) and reduction is not None:
        name = culprit.plan.name
        raise ValueError(
            f"{what}: {name} reduces over the whole tree ({reduction.op}), but a "
            "shard sees only its slice of the parameters. Apply it before the sharded "
            "optimizer, on the full all-reduced gradients every rank holds, e.g. "
            f"chain(allreduce_gradients(), {name}(...), shard_optimizer(adam(...)))"
        )
    raise TypeError(
        f"{what}: an opaque transform (not fused: masked, a mask= argument, partition, "
        "a user-written transform) cannot be sharded: it may depend on the tree structure "
        "or reduce over it. Shard only element-wise optimizers (sgd, momentum, adam, "
        "adamw without a mask, rmsprop and chains of element-wise transforms)"
    )


# ---------------------------------------------------------------------------- flat slices


@dataclass(frozen=True)
class _DtypeShard:
    """One dtype's flat buffer: its leaves, layout and this rank's slice."""

    name: str
    idx: tuple[int, ...]
    lay: Layout
    lo: int
    hi: int
    counts: tuple[int, ...]
    displs: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def slice_layout(self) -> Layout:
        return layout(((self.n,),), self.lay.dtype)


def _plan_shards(leaves: list[Any], comm: Any) -> tuple[_DtypeShard, ...]:
    size, rank = comm.Get_size(), comm.Get_rank()
    shards = []
    for dtype, idx in by_dtype(leaves).items():
        lay = layout(tuple(leaves[i].shape for i in idx), dtype)
        bounds = shard_bounds(lay.total, size)
        lo, hi = bounds[rank]
        shards.append(
            _DtypeShard(
                dtype.name,
                tuple(idx),
                lay,
                lo,
                hi,
                tuple(b - a for a, b in bounds),
                tuple(a for a, _ in bounds),
            )
        )
    return tuple(shards)


def _slice_view(queue: cl.CommandQueue, sh: _DtypeShard, base: Any, elem_off: int) -> cla.Array:
    """The 1-D view of elements ``[lo, hi)`` of a flat buffer starting at ``elem_off``."""
    item = sh.lay.dtype.itemsize
    return sh.slice_layout().views_of(queue, base, (elem_off + sh.lo) * item)[0]


def _flat_slice(
    queue: cl.CommandQueue, xs: list[cla.Array], sh: _DtypeShard, into: Block | None = None
) -> cla.Array:
    """This rank's slice of the leaves ``xs`` as a 1-D array: a view if they are packed,
    else a copy of the overlapping parts (into the buffer ``into``, or a fresh one; ``None``
    leaves are skipped)."""
    run = packed_run(xs) if all(x is not None for x in xs) else None
    if run is not None:
        return _slice_view(queue, sh, run[0], run[1])
    item = sh.lay.dtype.itemsize
    (view,) = (into if into is not None else sh.slice_layout().allocate(queue)).views
    for x, o, n in zip(xs, sh.lay.offsets, sh.lay.sizes, strict=True):
        a, b = max(o, sh.lo), min(o + n, sh.hi)
        if x is not None and a < b:
            cl.enqueue_copy(
                queue,
                view.base_data,
                x.base_data,
                byte_count=(b - a) * item,
                src_offset=x.offset + (a - o) * item,
                dst_offset=view.offset + (a - sh.lo) * item,
            )
    return view


def _gather_host(comm: Any, queue: cl.CommandQueue, sh: _DtypeShard, part: cla.Array) -> np.ndarray:
    """Every rank's slice in one host buffer of the full flat size (``part``: this rank's)."""
    host = np.empty(sh.lay.total, sh.lay.dtype)
    if sh.n:
        cl.enqueue_copy(
            queue, host[sh.lo : sh.hi], part.base_data, src_offset=part.offset, is_blocking=True
        )
    if comm.Get_size() > 1 and sh.lay.total:
        allgatherv(comm, host, sh.counts, sh.displs)
    return host


def allgatherv(
    comm: Any, host: np.ndarray, counts: tuple[int, ...], displs: tuple[int, ...]
) -> None:
    """In-place ``Allgatherv`` of a host buffer: rank ``r`` contributes
    ``host[displs[r] : displs[r] + counts[r]]``."""
    from mpi4py.util.dtlib import from_numpy_dtype

    data = raw(host)
    comm.Allgatherv(in_place(), [data, list(counts), list(displs), from_numpy_dtype(data.dtype)])


# ---------------------------------------------------------------------------- functional


class ShardState(NamedTuple):
    """The inner optimizer's state over this rank's slice only: a tree ``{dtype name: 1-D
    array}`` per slot (e.g. ``inner_state[0].mu["float32"]`` for a chain starting with
    ``scale_by_adam``)."""

    inner_state: Any


class _Sharded:
    """The implementation behind :func:`shard_optimizer` (``tx.update.__self__``)."""

    def __init__(self, tx: GradientTransformation, comm: Any) -> None:
        self.tx = tx
        self.comm = comm
        self._plans: dict[Any, tuple[_DtypeShard, ...]] = {}

    def _local(self, tree: Any, what: str) -> tuple[Any, list[Any], Any, Any, Any]:
        """Checks (no collective): signature, leaves, treedef, queue and the shard plan."""
        leaves, treedef = optree.tree_flatten(tree)
        queue = queue_of(leaves)
        check_device_leaves(leaves, queue, what)
        sig = signature(treedef, leaves)
        plan = self._plans.get(sig)
        if plan is None:
            plan = _plan_shards(leaves, self.comm)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[sig] = plan
        return sig, leaves, treedef, queue, plan

    @staticmethod
    def _slices(
        leaves: list[Any], plan: tuple[_DtypeShard, ...], queue: cl.CommandQueue
    ) -> dict[str, cla.Array]:
        return {sh.name: _flat_slice(queue, [leaves[i] for i in sh.idx], sh) for sh in plan}

    def _params_slices(
        self, params: Any, u_leaves: list[Any], treedef: Any, plan: Any, queue: Any
    ) -> dict[str, cla.Array] | None:
        if params is None:
            return None
        p_leaves = flatten_like(params, treedef, "params", "updates")
        check_device_leaves(p_leaves, queue, "params")
        for i, (p, u) in enumerate(zip(p_leaves, u_leaves, strict=True)):
            if p.shape != u.shape or p.dtype != u.dtype:
                raise ValueError(
                    f"params leaf {i} is {p.dtype}{list(p.shape)}, updates {u.dtype}{list(u.shape)}"
                )
        return self._slices(p_leaves, plan, queue)

    def _outputs(self, out: dict[str, cla.Array], plan: Any, queue: Any) -> dict[str, Any]:
        """Per dtype, the fresh buffer the gathered tree will fill (allocated before the
        agreement), or ``None`` where this rank's slice is the whole tree (one rank)."""
        single = self.comm.Get_size() == 1
        blocks: dict[str, Any] = {}
        for sh in plan:
            whole = single and out[sh.name].size == sh.lay.total
            blocks[sh.name] = None if whole else sh.lay.allocate(queue)
        return blocks

    def _gather(
        self, queue: Any, leaves: list[Any], treedef: Any, plan: Any, out: Any, blocks: Any
    ) -> Any:
        """The full tree from every rank's slice ``out``, into ``blocks``: past the point of
        no return (run it under :func:`committed`)."""
        new = list(leaves)
        for sh in plan:
            part, block = out[sh.name], blocks[sh.name]
            if block is None:
                views = sh.lay.views_of(queue, part.base_data, part.offset)
            else:
                block.upload(queue, _gather_host(self.comm, queue, sh, part))
                views = block.views
            for i, v in zip(sh.idx, views, strict=True):
                new[i] = v
        return optree.tree_unflatten(treedef, new)

    def init(self, params: Any) -> ShardState:
        what = "shard_optimizer.init"

        def check() -> tuple[Any, Any]:
            sig, leaves, _, queue, plan = self._local(params, what)
            return sig, (leaves, queue, plan)

        def work(ctx: Any) -> Any:
            leaves, queue, plan = ctx
            return self.tx.init(self._slices(leaves, plan, queue))

        return ShardState(agree(self.comm, what, check, work, lambda: path_names(params)))

    def update(
        self, updates: Any, state: ShardState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ShardState]:
        what = "shard_optimizer.update"

        def check() -> tuple[Any, Any]:
            sig, leaves, treedef, queue, plan = self._local(updates, what)
            p = self._params_slices(params, leaves, treedef, plan, queue)
            return sig, (leaves, treedef, queue, plan, p)

        def work(ctx: Any) -> Any:
            leaves, treedef, queue, plan, p = ctx
            u = self._slices(leaves, plan, queue)
            out, inner = self.tx.update(u, _inner(state), p, **extra_args)
            return (queue, leaves, treedef, plan, out, self._outputs(out, plan, queue)), inner

        gather, inner = agree(self.comm, what, check, work, lambda: path_names(updates))
        with committed(self.comm, what):
            return self._gather(*gather), ShardState(inner)

    def step(
        self, params: Any, grads: Any, state: ShardState, **extra_args: Any
    ) -> tuple[Any, ShardState]:
        what = "sharded_step"

        def check() -> tuple[Any, Any]:
            sig, leaves, treedef, queue, plan = self._local(grads, what)
            p = self._params_slices(params, leaves, treedef, plan, queue)
            if p is None:
                raise ValueError("sharded_step needs params")
            return sig, (leaves, treedef, queue, plan, p)

        def work(ctx: Any) -> Any:
            leaves, treedef, queue, plan, p = ctx
            g = self._slices(leaves, plan, queue)
            new_p, inner = _step(self.tx, p, g, _inner(state), **extra_args)
            p_leaves = optree.tree_leaves(params)
            q = queue_of(p_leaves)
            return (q, p_leaves, treedef, plan, new_p, self._outputs(new_p, plan, q)), inner

        gather, inner = agree(self.comm, what, check, work, lambda: path_names(grads))
        with committed(self.comm, what):
            return self._gather(*gather), ShardState(inner)


def _inner(state: Any) -> Any:
    if not isinstance(state, ShardState):
        raise TypeError(
            f"expected a ShardState (from the sharded optimizer's init), got {type(state).__name__}"
        )
    return state.inner_state


def shard_optimizer(tx: GradientTransformation, comm: Any = None) -> GradientTransformation:
    """ZeRO stage 1 for a functional optimizer: each rank keeps ``tx``'s state for its
    1/N slice of the flattened parameters only, and the full updates are gathered.

    ``init(params)`` and ``update(updates, state, params)`` take and return full trees,
    identical on every rank; the state (:class:`ShardState`) holds the slice's state only.
    The updates must already be the same on every rank (all-reduced)::

        tx = chain(allreduce_gradients(), shard_optimizer(adam(1e-3)))
        params, state = netcl_optim.step(tx, params, grads, state)

    or, gathering the parameters rather than the updates (one kernel less, and bit-identical
    to ``step(adam(1e-3), ...)`` for every dtype; with ``step`` as above, float16 parameters
    see their update rounded to float16 first): :func:`sharded_step`.

    ``tx`` must be element-wise (see :func:`check_shardable`): the result is then bitwise
    that of ``tx`` on the whole tree. Global-norm clipping belongs before it, on the full
    gradients: ``chain(allreduce_gradients(), clip_by_global_norm(1.0), shard_optimizer(tx))``.

    A failure on some ranks (mismatched trees, bad input, ``tx`` itself, the allocation of
    the result) raises on every rank before anything moves; a failure during the gather
    aborts the job (see :mod:`netcl_optim.distributed`).

    Device:
      Per step, per dtype: the slices are views when the tree is packed (one device copy
      per leaf in the slice otherwise), ``tx``'s fused kernel over the slice, one
      device-to-host copy of the slice's result and one host-to-device copy of the gathered
      tree. MPI: a 16-byte Allgather (tree check) and one Allgatherv per dtype.
    """
    comm = get_comm(comm)
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"shard_optimizer: tx must be a GradientTransformation, got {type(tx).__name__}"
        )
    check_shardable(tx)
    impl = _Sharded(tx, comm)
    plan = OpaquePlan("shard_optimizer", (tx,))
    return register(
        GradientTransformation(impl.init, impl.update, plan),
        wrapper(ShardState, "inner_state", tx),
    )


def sharded_step(
    tx: GradientTransformation, params: Any, grads: Any, state: ShardState, **extra_args: Any
) -> tuple[Any, ShardState]:
    """:func:`netcl_optim.step` for a :func:`shard_optimizer` transform: update and apply on
    this rank's slice in one kernel, then gather the new parameters (not the updates).

    Pure: returns ``(new_params, new_state)``; ``new_params`` is a fresh packed tree,
    bitwise what ``step`` of the unsharded optimizer gives, on every rank. ``grads`` must
    be the same on every rank (all-reduced first). Errors as for :func:`shard_optimizer`.

    Device:
      Per dtype: one fused kernel over the slice, one device-to-host copy (the slice), one
      host-to-device copy (the full tree). MPI: a 16-byte Allgather and one Allgatherv per
      dtype.
    """
    impl = getattr(tx.update, "__self__", None)
    if not isinstance(impl, _Sharded):
        raise TypeError("sharded_step: tx must come from shard_optimizer(...)")
    return impl.step(params, grads, state, **extra_args)


# ---------------------------------------------------------------------------- memory


def state_nbytes(state: Any) -> int:
    """Bytes of device (and host) arrays in an optimizer state: a functional state pytree,
    a stateful optimizer (its ``state``) or a :class:`ZeroRedundancyOptimizer`. Views count
    their own size, so a packed state counts once.

    Device: none (array sizes only; no read-back, no collective)."""
    if isinstance(state, ZeroRedundancyOptimizer):
        state = state.optim
    if hasattr(state, "param_groups") and hasattr(state, "state"):
        state = [dict(v) for v in state.state.values()]
    total = 0
    for leaf in optree.tree_leaves(state):
        if isinstance(leaf, (cla.Array, np.ndarray)):
            total += int(leaf.nbytes)
    return total


# ---------------------------------------------------------------------------- stateful


def _is_param(p: Any) -> bool:
    return hasattr(p, "data") and hasattr(p, "grad") and not isinstance(p, (cla.Array, Mapping))


def _groups_of(params: Any) -> list[dict[str, Any]]:
    what = "ZeroRedundancyOptimizer: params must be a list of parameters or of param group dicts"
    if isinstance(params, (cla.Array, Mapping, set, frozenset)) or _is_param(params):
        raise TypeError(f"{what}, got a {type(params).__name__}")
    if not isinstance(params, Iterable):
        raise TypeError(f"{what}, got a {type(params).__name__}")
    items = list(params)
    if not items:
        raise ValueError("ZeroRedundancyOptimizer got an empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], Mapping) else [{"params": items}]
    seen: set[int] = set()
    for gi, g in enumerate(groups):
        if "params" not in g:
            raise ValueError(f"param_groups[{gi}] has no 'params'")
        g["params"] = list(g["params"])
        for j, p in enumerate(g["params"]):
            if not _is_param(p) or not isinstance(p.data, cla.Array):
                raise TypeError(
                    f"param_groups[{gi}]['params'][{j}] is a {type(p).__name__}: expected an "
                    "object with .data (a pyopencl array) and .grad, e.g. Parameter"
                )
            if id(p) in seen:
                raise ValueError(f"param_groups[{gi}]['params'][{j}] appears twice")
            seen.add(id(p))
    return groups


class _FlatDtype:
    """All parameters of one dtype (across groups), packed in one buffer, and this rank's
    slice of it, cut into one shard parameter per group."""

    def __init__(self, sh: _DtypeShard, base: Any, elem_off: int) -> None:
        self.sh = sh
        self.base = base
        self.elem_off = elem_off
        self.host = np.empty(sh.lay.total, sh.lay.dtype)  # staging for the Allgatherv
        self.grad_slice: Block | None = None  # copied grad slices (unpacked grads)
        self.grad_block: Block | None = None  # packed full grads (zero_grad(set_to_none=False))
        # per group: (group index, shard Parameter, [a, b) in slice coordinates)
        self.parts: list[tuple[int, Any, int, int]] = []

    def view(self, queue: cl.CommandQueue, a: int, b: int, base: Any, start: int) -> cla.Array:
        """The 1-D view of elements ``[start + a, start + b)`` of the buffer ``base``."""
        item = self.sh.lay.dtype.itemsize
        return layout(((b - a,),), self.sh.lay.dtype).views_of(queue, base, (start + a) * item)[0]

    def gather(self, comm: Any, queue: cl.CommandQueue) -> None:
        """Every rank's slice of the flat parameters, into every rank's buffer (in place)."""
        sh = self.sh
        if not sh.lay.total:
            return
        item = sh.lay.dtype.itemsize
        if sh.n:
            cl.enqueue_copy(
                queue,
                self.host[sh.lo : sh.hi],
                self.base,
                src_offset=(self.elem_off + sh.lo) * item,
                is_blocking=True,
            )
        allgatherv(comm, self.host, sh.counts, sh.displs)
        cl.enqueue_copy(
            queue, self.base, self.host, dst_offset=self.elem_off * item, is_blocking=True
        )


class ZeroRedundancyOptimizer:
    """ZeRO stage 1 around a stateful optimizer class (torch's ``ZeroRedundancyOptimizer``).

    Each dtype's parameters (all groups) are packed into one buffer (``.data`` rebound to
    views, values unchanged); this rank's contiguous 1/N slice of it is cut into one shard
    :class:`~netcl_optim.stateful.Parameter` per group, and ``opt_class`` (e.g. ``Adam``)
    is built over those shards with ``**kwargs``: it keeps state for the slice only. A step
    updates the slice in place and one Allgatherv per dtype brings every rank the full
    parameters: bitwise what ``opt_class`` on all parameters gives.

    Gradients must already be equal on every rank (:func:`allreduce_grads_` first). A group
    steps only if its parameters have grads; a group with some grads ``None`` is an error
    (slices cut through parameters). ``param_groups`` holds the user's parameters and the
    hyperparameters (edit ``lr`` there, or through an LR scheduler); they are copied to
    ``optim`` (the local optimizer) at each step. ``state_dict()`` is this rank's shard.
    The constructor builds everything (``opt_class`` too) before the ranks agree: a failure
    on one rank raises on every rank, with no parameter changed.

    Device:
      Per step and dtype: the grad slice is a view when grads are packed
      (``zero_grad(set_to_none=False)``), else one device copy per parameter in the slice;
      one fused kernel per group over the slice; one device-to-host copy of the slice and one
      host-to-device copy of the full buffer. MPI: a 16-byte Allgather (tree and grad check)
      and one Allgatherv per dtype.
    """

    def __init__(
        self, opt_class: Callable[..., Any], params: Any, comm: Any = None, **kwargs: Any
    ) -> None:
        self.comm = get_comm(comm)

        def local() -> tuple[Any, Any]:
            groups = _groups_of(params)
            arrays = [p.data for g in groups for p in g["params"]]
            queue = queue_of(arrays)
            check_device_leaves(arrays, queue, "ZeroRedundancyOptimizer")
            sizes = tuple(len(g["params"]) for g in groups)
            return signature(f"param groups of sizes {sizes}", arrays), (groups, arrays, queue)

        def build(ctx: Any) -> Any:
            groups, arrays, queue = ctx
            return groups, queue, *self._build(opt_class, kwargs, groups, arrays, queue)

        # everything is built (the inner optimizer too) before the ranks agree, so that a
        # failure on one rank raises on every rank; the parameters change only after it
        groups, queue, data, flats, optim = agree(
            self.comm, "ZeroRedundancyOptimizer", local, build
        )
        self._queue = queue
        self._flats: list[_FlatDtype] = flats
        self._params: list[Any] = [p for g in groups for p in g["params"]]
        for p, d in zip(self._params, data, strict=True):
            if p.data is not d:
                p.data = d  # the packed buffer's view (values unchanged)
        self._data = data
        self._owner = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        self._members = [
            [i for i, o in enumerate(self._owner) if o == gi] for gi in range(len(groups))
        ]
        self.optim = optim
        self.defaults = self.optim.defaults
        self.param_groups: list[dict[str, Any]] = []
        for g, ig in zip(groups, self.optim.param_groups, strict=True):
            pg = {k: v for k, v in ig.items() if k != "params"}
            pg["params"] = g["params"]
            self.param_groups.append(pg)

    def _build(
        self,
        opt_class: Callable[..., Any],
        kwargs: dict[str, Any],
        groups: list[dict[str, Any]],
        arrays: list[cla.Array],
        queue: cl.CommandQueue,
    ) -> tuple[list[cla.Array], list[_FlatDtype], Any]:
        """Pack each dtype's ``arrays`` into one buffer (unless they already are), cut this
        rank's slice into one shard parameter per group, and build ``opt_class`` over them.
        Returns each parameter's new ``.data``, the flat buffers and the optimizer; the
        parameters themselves are left unchanged."""
        owner = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        data = list(arrays)
        flats: list[_FlatDtype] = []
        shard_params: list[list[Any]] = [[] for _ in groups]
        for sh in _plan_shards(arrays, self.comm):
            xs = [arrays[i] for i in sh.idx]
            if sh.lay.total == 0 or contiguous_run(xs) is None:
                xs = pack(xs, queue)  # one buffer per dtype (values unchanged)
                for i, x in zip(sh.idx, xs, strict=True):
                    data[i] = x
            base, off = xs[0].base_data, xs[0].offset // sh.lay.dtype.itemsize
            flat = _FlatDtype(sh, base, off)
            for gi in range(len(groups)):
                ks = [k for k, i in enumerate(sh.idx) if owner[i] == gi]
                if not ks:
                    continue
                g_lo = sh.lay.offsets[ks[0]]
                g_hi = sh.lay.offsets[ks[-1]] + sh.lay.sizes[ks[-1]]
                a, b = max(g_lo, sh.lo) - sh.lo, min(g_hi, sh.hi) - sh.lo
                a, b = (a, b) if a < b else (0, 0)
                view = flat.view(queue, a, b, base, off + sh.lo)
                shard = Parameter(view)
                flat.parts.append((gi, shard, a, b))
                shard_params[gi].append(shard)
            flats.append(flat)
        inner_groups = []
        for gi, g in enumerate(groups):
            ig = {k: v for k, v in g.items() if k != "params"}
            ig["params"] = shard_params[gi]
            inner_groups.append(ig)
        return data, flats, opt_class(inner_groups, **kwargs)

    # ------------------------------------------------------------------ torch-like API

    @property
    def lr(self) -> float:
        """The learning rate of group 0; setting it sets every group's ``"lr"``."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = value

    @property
    def state(self) -> Any:
        """The local optimizer's state: shard parameter -> {torch key: slice array}."""
        return self.optim.state

    def _sync_hyperparameters(self) -> None:
        if len(self.param_groups) != len(self.optim.param_groups):
            raise ValueError("ZeroRedundancyOptimizer: param_groups cannot be added or removed")
        for gi, (pg, ig) in enumerate(zip(self.param_groups, self.optim.param_groups, strict=True)):
            users = pg["params"]
            mine = [self._params[i] for i in self._members[gi]]
            if len(users) != len(mine) or any(a is not b for a, b in zip(users, mine, strict=True)):
                raise ValueError(f"param_groups[{gi}]['params'] was changed")
            for k, v in pg.items():
                if k != "params":
                    ig[k] = v

    def _check_grads(self) -> tuple[Any, tuple[bool, ...]]:
        """Local checks of the grads: the step's signature and which groups step."""
        grads = [p.grad for p in self._params]
        present = [g for g in grads if g is not None]
        if present:
            check_device_leaves(present, self._queue, "ZeroRedundancyOptimizer.step: grads")
        for i, (p, d, g) in enumerate(zip(self._params, self._data, grads, strict=True)):
            if p.data is not d:
                raise ValueError(
                    f"parameter {i}: .data was rebound; ZeroRedundancyOptimizer owns the packed "
                    "buffer its .data was a view of: write into p.data in place instead"
                )
            if g is not None and (g.shape != d.shape or g.dtype != d.dtype):
                raise ValueError(
                    f"parameter {i}: .grad is {g.dtype}{list(g.shape)}, .data is "
                    f"{d.dtype}{list(d.shape)}"
                )
        active = []
        for gi, members in enumerate(self._members):
            missing = [i for i in members if grads[i] is None]
            if missing and len(missing) < len(members):
                raise ValueError(
                    f"ZeroRedundancyOptimizer steps whole param groups, but parameters "
                    f"{missing[:8]} of param group {gi} have no .grad while others have one: "
                    "give them a zero grad (zero_grad(set_to_none=False)) or move them to "
                    "another group"
                )
            active.append(not missing)
        sig = signature(f"{len(grads)} parameters", grads)
        return sig, tuple(active)

    def _check_hyperparameters(self, active: tuple[bool, ...]) -> None:
        """Validate the hyperparameters of every group that steps, as the local optimizer's
        step would before launching anything (a netcl_optim optimizer; others are trusted)."""
        if isinstance(self.optim, Optimizer):
            for gi, on in enumerate(active):
                if on:
                    self.optim._chain(gi)  # checks, builds and caches the group's chain

    def _grad_source(self, flat: _FlatDtype) -> tuple[Any, int]:
        """``(buffer, element offset of the flat grads)`` for ``flat``'s dtype: the packed
        grads themselves, else this rank's slice copied into a scratch buffer."""
        sh = flat.sh
        grads = [self._params[i].grad for i in sh.idx]
        run = packed_run(grads) if all(g is not None for g in grads) else None
        if run is not None:
            return run
        if flat.grad_slice is None:
            flat.grad_slice = sh.slice_layout().allocate(self._queue)
        gslice = _flat_slice(self._queue, grads, sh, flat.grad_slice)
        return gslice.base_data, gslice.offset // sh.lay.dtype.itemsize - sh.lo

    def step(self, closure: Any = None) -> Any:
        """One update of every group whose parameters have grads, sharded; returns
        ``closure()`` (called first) or ``None``. See the class docstring for the costs.

        Raises on every rank, before anything changes, when a rank's grads differ in
        presence, shape or dtype from rank 0's, fail the local checks, or a group that steps
        has an invalid hyperparameter (e.g. a negative ``lr`` on one rank only): the failing
        ranks raise their error, the others a ValueError naming them. A failure in the
        update or the gather (the point of no return) aborts the job (MPI_Abort).
        ``closure`` is the caller's code: if it raises on some ranks only, the others wait
        here (run under ``python -m mpi4py``, see :mod:`netcl_optim.distributed`)."""
        loss = closure() if closure is not None else None
        what = "ZeroRedundancyOptimizer.step"

        def local() -> tuple[Any, Any]:
            self._sync_hyperparameters()
            sig, active = self._check_grads()
            self._check_hyperparameters(active)
            return sig, active

        def work(active: tuple[bool, ...]) -> Any:
            sources = [self._grad_source(flat) for flat in self._flats] if any(active) else []
            return active, sources

        active, sources = agree(self.comm, what, local, work)
        if not any(active):
            return loss
        queue = self._queue
        with committed(self.comm, what):
            for flat, (base, off) in zip(self._flats, sources, strict=True):
                for gi, shard, a, b in flat.parts:
                    on = active[gi]
                    shard.grad = flat.view(queue, a, b, base, off + flat.sh.lo) if on else None
            try:
                self.optim.step()
            finally:
                for flat in self._flats:
                    for _, shard, _, _ in flat.parts:
                        shard.grad = None
            if self.comm.Get_size() > 1:
                for flat in self._flats:
                    flat.gather(self.comm, queue)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set every grad to ``None`` (default), or to a zeroed view of one packed gradient
        buffer per dtype (``set_to_none=False``: grads written in place there stay packed,
        so the next step slices them without copying)."""
        if set_to_none:
            for p in self._params:
                p.grad = None
            return
        for flat in self._flats:
            sh = flat.sh
            if flat.grad_block is None:
                flat.grad_block = sh.lay.allocate(self._queue)
            flat.grad_block.fill(self._queue, 0)
            for i, v in zip(sh.idx, flat.grad_block.views, strict=True):
                if self._params[i].grad is not v:
                    self._params[i].grad = v

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held by this rank (its shard)."""
        return state_nbytes(self.optim)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state (the local optimizer's ``state_dict``), tagged with
        the rank and world size. Device: one read-back per state array."""
        sd = self.optim.state_dict()
        sd["zero"] = {"rank": self.comm.Get_rank(), "world_size": self.comm.Get_size()}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` saved by the same rank with the same world size."""
        sd = dict(state_dict)
        tag = sd.pop("zero", None)
        want = {"rank": self.comm.Get_rank(), "world_size": self.comm.Get_size()}
        if tag != want:
            raise ValueError(f"this shard state dict is from {tag}, but this rank is {want}")
        self.optim.load_state_dict(sd)

    def __repr__(self) -> str:
        inner = repr(self.optim).replace("\n", "\n  ")
        return (
            f"ZeroRedundancyOptimizer(rank {self.comm.Get_rank()} of {self.comm.Get_size()},\n"
            f"  {inner})"
        )
