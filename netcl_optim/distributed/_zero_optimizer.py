"""ZeRO stage 1 around a stateful optimizer class: :class:`ZeroRedundancyOptimizer`
(torch's name), and :func:`state_nbytes` to measure what it saves.

Each dtype's parameters are packed into one flat buffer; this rank keeps the optimizer state
of its slice only (see :mod:`._flat_shards`), steps that slice in place, and one
``Allgatherv`` per dtype brings every rank the full parameters, bitwise what the unsharded
optimizer gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._device import queue_of
from .._packing import Block, contiguous_run, layout, pack
from ..fusion import Slice, combine_partials
from ..stateful import Parameter
from ..stateful._optimizer import Optimizer, building_shards
from ._comm import agree, check_device_leaves, committed, get_comm, packed_run, signature
from ._flat_shards import (
    DtypeShard,
    allgatherv,
    combine_ranks,
    flat_slice,
    plan_shards,
    shard_block,
)
from ._shard import check_per_leaf


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

    def __init__(self, sh: DtypeShard, base: Any, elem_off: int) -> None:
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

    Rules with a value per leaf (LAMB, LARS, NovoGrad, Fromage, Adafactor, SM3) compute it
    over the group's whole parameters, as unsharded: every rank holds the whole grads and
    params; an intermediate (LAMB's Adam output) is gathered (one Allgatherv per group and
    dtype); per-leaf state (NovoGrad's ``exp_avg_sq``, Adafactor's factors, SM3's
    accumulators) is whole on every rank, element-wise state sharded.

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
        # per group and dtype, the group's element index where this rank's slice starts
        origins: list[dict[np.dtype, int]] = [{} for _ in groups]
        # per group and dtype: its whole leaves' shapes and the maker of its step's Slice
        wholes: list[dict[np.dtype, Any]] = [{} for _ in groups]
        slices: list[dict[np.dtype, Any]] = [{} for _ in groups]
        for sh in plan_shards(arrays, self.comm, _class_block(opt_class)):
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
                origins[gi][sh.lay.dtype] = max(g_lo, sh.lo) - g_lo
                view = flat.view(queue, a, b, base, off + sh.lo)
                shard = Parameter(view)
                shapes = tuple(sh.lay.shapes[k] for k in ks)
                wholes[gi][sh.lay.dtype] = shapes
                members = [sh.idx[k] for k in ks]
                slices[gi][sh.lay.dtype] = self._slice_maker(sh, shard, members, shapes, g_lo)
                flat.parts.append((gi, shard, a, b))
                shard_params[gi].append(shard)
            flats.append(flat)
        inner_groups = []
        for gi, g in enumerate(groups):
            ig = {k: v for k, v in g.items() if k != "params"}
            ig["params"] = shard_params[gi]
            inner_groups.append(ig)
        check_params = getattr(opt_class, "check_params", None)
        if check_params is not None:  # (the inner optimizer sees 1-D slices only)
            check_params(groups, **kwargs)
        with building_shards():
            optimizer = opt_class(inner_groups, **kwargs)
        for gi in range(len(inner_groups)):  # before any parameter takes its new data
            check_per_leaf(optimizer._chain(gi).tx, "ZeroRedundancyOptimizer")
        for rec, group_origins, whole, made in zip(
            optimizer._groups, origins, wholes, slices, strict=True
        ):
            rec.element_origins = group_origins  # element-indexed noise as unsharded
            rec.whole_shapes = whole  # per-leaf values over the whole leaves
            rec.slices = made
        return data, flats, optimizer

    def _slice_maker(
        self,
        sh: DtypeShard,
        shard: Any,
        members: list[int],
        shapes: tuple[tuple[int, ...], ...],
        g_lo: int,
    ) -> Callable[[], Slice]:
        """The maker of a group's step's Slice of one dtype (``fusion/_slices.py``): the
        group's parameters ``members`` (of ``shapes``, from ``g_lo`` on in the flat buffer)
        and this rank's part of them (``shard``); an intermediate is gathered from every
        rank's part of the group (one Allgatherv)."""
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        lay = layout(shapes, sh.lay.dtype)
        g_hi = g_lo + lay.total
        parts = [(max(g_lo, a), min(g_hi, a + n)) for a, n in zip(sh.displs, sh.counts,
                                                                    strict=True)]  # fmt: skip
        counts = tuple(max(0, b - a) for a, b in parts)
        displs = tuple(a - g_lo if b > a else 0 for a, b in parts)
        lo, hi = displs[rank], displs[rank] + counts[rank]

        def gather(part: cla.Array) -> list[cla.Array]:
            host = np.empty(lay.total, lay.dtype)
            if hi > lo:
                cl.enqueue_copy(self._queue, host[lo:hi], part.base_data,  # pyright: ignore[reportCallIssue, reportArgumentType]
                                src_offset=part.offset, is_blocking=True)  # fmt: skip
            if size > 1 and lay.total:
                allgatherv(self.comm, host, counts, displs)
            block = lay.allocate(self._queue)
            block.upload(self._queue, host)
            return block.views

        def make() -> Slice:
            params = [self._params[i] for i in members]
            return Slice(shapes, lo, hi, shard.grad, [p.grad for p in params],
                         [p.data for p in params], gather)  # fmt: skip

        return make

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
            self.optim._check_step()
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
        gslice = flat_slice(self._queue, grads, sh, flat.grad_slice)
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
                with combine_partials(combine_ranks(self.comm, queue)):
                    self.optim.step()
            finally:
                for flat in self._flats:
                    for _, shard, _, _ in flat.parts:
                        shard.grad = None
                self._sync_back()
            if self.comm.Get_size() > 1:
                for flat in self._flats:
                    flat.gather(self.comm, queue)
        return loss

    def _sync_back(self) -> None:
        """The local optimizer's group entries back into ``param_groups`` (what its step
        keeps there, e.g. schedule-free's ``k`` and ``train_mode``)."""
        for pg, ig in zip(self.param_groups, self.optim.param_groups, strict=True):
            pg.update({k: v for k, v in ig.items() if k != "params"})

    def train(self) -> None:
        """The local optimizer's ``train()`` (schedule-free: the params to y), then the
        gather: every rank's parameters are swapped."""
        self._swap("train")

    def eval(self) -> None:
        """The local optimizer's ``eval()`` (schedule-free: the params to x), then the
        gather."""
        self._swap("eval")

    def _swap(self, mode: str) -> None:
        swap = getattr(self.optim, mode, None)
        if not callable(swap):
            raise AttributeError(f"{type(self.optim).__name__} has no {mode}() to run sharded")
        what = f"ZeroRedundancyOptimizer.{mode}"

        def local() -> tuple[Any, Any]:
            self._sync_hyperparameters()
            return signature(what, [p.data for p in self._params]), None

        agree(self.comm, what, local, lambda _: None)
        with committed(self.comm, what):
            swap()
            self._sync_back()
            if self.comm.Get_size() > 1:
                for flat in self._flats:
                    flat.gather(self.comm, self._queue)

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


def _class_block(opt_class: Any) -> int:
    """:func:`shard_block` of an optimizer class's rule (its defaults' chain); 8-bit
    state's blocks for a class that is not one of ours."""
    declaration = getattr(opt_class, "_declaration", None)
    if declaration is None:
        return shard_block(None)
    defaults = {h.name: h.default for h in declaration.hyperparameters}
    return shard_block(opt_class.functional(**defaults))
