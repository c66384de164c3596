"""ZeRO stage 1 for functional optimizers: :func:`shard_optimizer` and :func:`sharded_step`.

Every dtype's parameters form one flat buffer (leaves back to back, in tree order). Rank
``r`` of ``N`` owns about the elements ``[total * r // N, total * (r + 1) // N)`` of it
(each cut at the nearest 256-element block of a leaf: a slice may cut through leaves, not
through 8-bit state's blocks; see ``shard_bounds``) and keeps optimizer state for those
elements only. A step runs the (element-wise) optimizer on the slice, a 1-D device view of
the packed params and grads, then one ``Allgatherv`` per dtype rebuilds the full tree on
every rank. Element-wise maths makes the result bit-identical to the unsharded optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import (
    Fragment,
    GradientTransformation,
    OpaquePlan,
    StagePlan,
    is_elementwise,
    is_fusible,
)
from .._device import queue_of
from .._state_check import register, wrapper
from ..fusion import Slice, combine_partials, element_origin, flatten_like, sliced, walk
from ..transforms._update import step as _step
from ._comm import agree, check_device_leaves, committed, get_comm, path_names, signature
from ._flat_shards import (
    DtypeShard,
    allgatherv,
    combine_ranks,
    flat_slice,
    plan_shards,
    shard_block,
)


def check_per_leaf(tx: GradientTransformation, what: str) -> None:
    """Raise ValueError if ``tx`` has a stage (kernels of its own, a ``StagePlan``) that does
    not run on ZeRO's slices: a shard holds pieces of leaves, and such a stage would compute
    its values per leaf from them. (Fragments with values per leaf, and the stages that say
    ``shards``, Adafactor's and SM3's, compute them over the whole leaves: see
    ``fusion/_slices.py``.)"""
    for t in walk(tx):
        if isinstance(t.plan, StagePlan) and not t.plan.shards:
            raise ValueError(
                f"{what}: {t.plan.kind} needs values per leaf and runs kernels of its own "
                "that do not run on a shard (which holds pieces of leaves). Run the "
                "optimizer unsharded on the all-reduced gradients (every rank steps the "
                "whole model)"
            )


def check_shardable(tx: GradientTransformation, what: str = "shard_optimizer") -> None:
    """Raise unless ``tx`` is element-wise all through, so that running it on a slice of the
    flat parameters gives the same bits as running it on the whole tree.

    Accepted: fragments without a reduction, chains of them, :func:`inject_hyperparams` and
    ``MultiSteps`` over them; fragments with a value per leaf, row or unit (LAMB, LARS,
    NovoGrad, Fromage, adaptive_grad_clip, ...: their sums run over the whole leaves, see
    ``fusion/_slices.py``); rules whose step size sums over the whole tree (Prodigy,
    D-Adaptation, DoG, DoWG: each rank sums its chunks, one Allreduce adds them, see
    ``fusion/_tree_sums.py``); rules with kernels of their own that step slices (Adafactor,
    SM3: the whole leaves are stepped, the slice handed on, see ``fusion/_slices.py``).
    Rejected (ValueError): whole-tree reductions (``clip_by_global_norm``, finiteness
    checks): a shard sees only its slice, so the norm would be a partial one. Rejected
    (TypeError): opaque transforms (not fused, e.g.
    ``masked``, a ``mask=`` argument, ``partition``), which may depend on the tree.
    """
    check_per_leaf(tx, what)
    culprit = next((t for t in walk(tx) if not is_elementwise(t) and not _per_leaf(t)), None)
    if culprit is None:
        return
    reduction = getattr(culprit.plan, "reduction", None)  # a fragment's
    if is_fusible(culprit) and reduction is not None:
        name = cast(Fragment, culprit.plan).name  # (only a fragment has a reduction)
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


def _per_leaf(tx: GradientTransformation) -> bool:
    """A fused transform whose only reductions are per leaf, a stage that runs on slices
    (see ``fusion/_slices.py``), or a chain or wrapper of such and element-wise ones."""
    if isinstance(tx.plan, StagePlan):
        return tx.plan.shards
    chain = tx.plan is not None and not isinstance(tx.plan, OpaquePlan) and tx.plan.children
    if chain and not is_fusible(tx):  # a chain with a stage
        assert tx.plan is not None  # (chain is truthy)
        return all(is_elementwise(c) or _per_leaf(c) for c in tx.plan.children)
    if not is_fusible(tx):
        return False
    if getattr(tx.plan, "segment_reduction", None) is not None:
        return True
    if getattr(tx.plan, "tree_sums", None) is not None:  # (every rank's partials added)
        return True
    children = getattr(tx.plan, "children", ())
    return bool(children) and all(is_elementwise(c) or _per_leaf(c) for c in children)


def _gather_host(comm: Any, queue: cl.CommandQueue, sh: DtypeShard, part: cla.Array) -> np.ndarray:
    """Every rank's slice in one host buffer of the full flat size (``part``: this rank's)."""
    host = np.empty(sh.lay.total, sh.lay.dtype)
    if sh.n:
        cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
            queue,
            host[sh.lo : sh.hi],
            part.base_data,  # pyright: ignore[reportArgumentType]
            src_offset=part.offset,
            is_blocking=True,
        )
    if comm.Get_size() > 1 and sh.lay.total:
        allgatherv(comm, host, sh.counts, sh.displs)
    return host


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
        self.block = shard_block(tx)
        self._plans: dict[Any, tuple[DtypeShard, ...]] = {}

    def _local(self, tree: Any, what: str) -> tuple[Any, list[Any], Any, Any, Any]:
        """Checks (no collective): signature, leaves, treedef, queue and the shard plan."""
        leaves, treedef = optree.tree_flatten(tree)
        queue = queue_of(leaves)
        check_device_leaves(leaves, queue, what)
        sig = signature(treedef, leaves)
        plan = self._plans.get(sig)
        if plan is None:
            plan = plan_shards(leaves, self.comm, self.block)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[sig] = plan
        return sig, leaves, treedef, queue, plan

    @staticmethod
    def _slices(
        leaves: list[Any], plan: tuple[DtypeShard, ...], queue: cl.CommandQueue
    ) -> dict[str, cla.Array]:
        return {sh.name: flat_slice(queue, [leaves[i] for i in sh.idx], sh) for sh in plan}

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

    def _sliced(
        self, plan: Any, queue: Any, u: dict[str, cla.Array], leaves: list[Any], params: Any
    ) -> Any:
        """The slices' context (``fusion/_slices.py``): per-leaf values over whole leaves,
        an intermediate gathered from every rank (one Allgatherv per dtype)."""
        p_leaves = None if params is None else optree.tree_leaves(params)
        stack = contextlib.ExitStack()
        stack.enter_context(combine_partials(combine_ranks(self.comm, queue)))

        def gather_of(sh: DtypeShard) -> Any:
            def gather(part: cla.Array) -> list[cla.Array]:
                block = sh.lay.allocate(queue)
                block.upload(queue, _gather_host(self.comm, queue, sh, part))
                return block.views

            return gather

        stack.enter_context(sliced({
            sh.lay.dtype: Slice(
                sh.lay.shapes, sh.lo, sh.hi, u[sh.name], [leaves[i] for i in sh.idx],
                None if p_leaves is None else [p_leaves[i] for i in sh.idx], gather_of(sh),
            )
            for sh in plan
        }))  # fmt: skip
        return stack

    def init(self, params: Any) -> ShardState:
        what = "shard_optimizer.init"

        def check() -> tuple[Any, Any]:
            sig, leaves, _, queue, plan = self._local(params, what)
            return sig, (leaves, queue, plan)

        def work(ctx: Any) -> Any:
            leaves, queue, plan = ctx
            with sliced({sh.lay.dtype: Slice(sh.lay.shapes, sh.lo, sh.hi, None, None, None,
                                             None) for sh in plan}):  # fmt: skip
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
            with _origins(plan), self._sliced(plan, queue, u, leaves, params):
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
            with _origins(plan), self._sliced(plan, queue, g, leaves, params):
                new_p, inner = _step(self.tx, p, g, _inner(state), **extra_args)
            p_leaves = optree.tree_leaves(params)
            q = queue_of(p_leaves)
            return (q, p_leaves, treedef, plan, new_p, self._outputs(new_p, plan, q)), inner

        gather, inner = agree(self.comm, what, check, work, lambda: path_names(grads))
        with committed(self.comm, what):
            return self._gather(*gather), ShardState(inner)


def _origins(plan: tuple[DtypeShard, ...]) -> Any:
    """Steps on the slices number their elements from the slices' starts in the flat
    buffers, as the whole tree's step does (``Fragment.element_index``)."""
    return element_origin({sh.lay.dtype: sh.lo for sh in plan})


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

    ``tx`` must be element-wise, or need values per leaf (LAMB, LARS, NovoGrad, ...; see
    :func:`check_shardable`): the result is then bitwise that of ``tx`` on the whole tree.
    Per-leaf sums run over the whole leaves: the incoming updates and the params are whole on
    every rank; an intermediate (LAMB's Adam output) is gathered first (one more
    Allgatherv per dtype and such part), and a per-leaf state (NovoGrad's) is kept whole on
    every rank. Global-norm clipping belongs before it, on the full gradients:
    ``chain(allreduce_gradients(), clip_by_global_norm(1.0), shard_optimizer(tx))``.

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
