"""Gradient all-reduce (functional and in place) and parameter broadcast over MPI.

The whole tree travels as one packed host buffer per dtype: one collective per dtype per
step, whatever the number of leaves. Everything that can fail on one rank (checks, the
device-to-host copies, the output buffers' allocation) happens before the agreement
(:func:`~._comm.agree`); only the data collectives and the copies back follow it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np
import optree
import pyopencl.array as cla

from .._base import EmptyState, GradientTransformation, OpaquePlan, OptState
from .._device import queue_of
from .._packing import layout
from .._state_check import NamedTupleSpec, check_state, register
from .._validation import BOOL, int_in, require
from ._comm import (
    agree,
    by_dtype,
    check_device_leaves,
    committed,
    download,
    get_comm,
    in_place,
    path_names,
    raw,
    signature,
    upload,
)


def _reduce_host(comm: Any, host: np.ndarray, average: bool) -> np.ndarray:
    """Sum ``host`` over all ranks in place (float16 travels as float32), then divide by the
    number of ranks if ``average``. Returns the result in ``host``'s dtype."""
    size = comm.Get_size()
    work = host.astype(np.float32) if host.dtype == np.float16 else host
    if work.size:
        comm.Allreduce(in_place(), work)
        if average:
            np.divide(work, work.dtype.type(size), out=work)
    if work is not host:
        host[...] = work  # round to half once, the same way on every rank
    return host


def _stage(queue: Any, leaves: list[Any]) -> list[tuple[list[int], Any, np.ndarray]]:
    """Copy the leaves to one packed host buffer per dtype: ``(indices, layout, host)``."""
    staged = []
    for dtype, idx in by_dtype(leaves).items():
        xs = [leaves[i] for i in idx]
        lay = layout(tuple(x.shape for x in xs), dtype)
        staged.append((idx, lay, download(queue, xs, lay)))
    return staged


_AVERAGE = BOOL.type_errors()


def allreduce(tree: Any, comm: Any = None, average: bool = True) -> Any:
    """The sum (``average=False``) or mean over all ranks of a pytree of device arrays.

    Pure: the result is a fresh packed tree (one buffer per dtype, views per leaf) with
    ``tree``'s structure; ``tree`` is not modified. The mean is the float sum divided by the
    number of ranks (float16 is summed and divided in float32, then rounded once). Every
    rank gets the same bits. With one rank, ``tree`` itself is returned.

    Raises:
      ValueError: on every rank, when the ranks' trees differ in structure, shapes or
        dtypes (checked before the data moves: a mismatch cannot hang).
      Exception: when the checks, the copy to the host or the output's allocation fail on
        some ranks: those raise their error, the others a ValueError naming them (nothing
        is changed). A failure after the data started moving aborts the job (MPI_Abort).

    Device:
      One device-to-host copy per dtype if the leaves are packed (else one per leaf), one
      host-to-device copy per dtype. MPI: one Allgather of a 16-byte tree digest, then one
      in-place Allreduce per dtype.
    """
    comm = get_comm(comm)

    def local() -> tuple[Any, Any]:
        mean = require("average", average, _AVERAGE)
        leaves, treedef = optree.tree_flatten(tree)
        queue = queue_of(leaves)
        check_device_leaves(leaves, queue, "allreduce")
        staged = []
        if comm.Get_size() > 1:
            staged = [(i, lay, h, lay.allocate(queue)) for i, lay, h in _stage(queue, leaves)]
        return signature(treedef, leaves), (mean, leaves, treedef, queue, staged)

    mean, leaves, treedef, queue, staged = agree(
        comm, "allreduce", local, names=lambda: path_names(tree)
    )
    if comm.Get_size() == 1 or not leaves:
        return tree
    out = list(leaves)
    with committed(comm, "allreduce"):
        for idx, _, host, block in staged:
            block.upload(queue, _reduce_host(comm, host, mean))
            for i, v in zip(idx, block.views, strict=True):
                out[i] = v
    return optree.tree_unflatten(treedef, out)


def allreduce_gradients(comm: Any = None, average: bool = True) -> GradientTransformation:
    """A transform that replaces the updates by their mean (or sum) over all ranks.

    Put it first in a chain, so that every rank applies the same update::

        tx = chain(allreduce_gradients(), adam(1e-3))

    Opaque (no fragment): the rest of the chain still fuses into one kernel. Pure: ``update``
    returns fresh packed arrays. See :func:`allreduce` for the errors.

    Device:
      Per step: one device-to-host copy per dtype (per leaf if the updates are not packed),
      one host-to-device copy per dtype. MPI: a 16-byte Allgather (tree check) and one
      in-place Allreduce per dtype.
    """
    comm = get_comm(comm)
    average = require("average", average, _AVERAGE)

    def init(params: Any) -> EmptyState:
        return EmptyState()

    def update(
        updates: Any, state: OptState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, OptState]:
        check_state(tx, state)
        return allreduce(updates, comm, average), state

    plan = OpaquePlan("allreduce_gradients", ())
    tx = register(GradientTransformation(init, update, plan), partial(NamedTupleSpec, EmptyState))
    return tx


def _param_list(parameters: Any, attr: str, what: str) -> list[Any]:
    if hasattr(parameters, attr) and not isinstance(parameters, cla.Array):
        return [parameters]
    if isinstance(parameters, cla.Array) or not isinstance(parameters, Iterable):
        raise TypeError(
            f"{what}: parameters must be an iterable of objects with .{attr}, "
            f"got {type(parameters).__name__}"
        )
    params = list(parameters)
    for i, p in enumerate(params):
        if isinstance(p, cla.Array) or not hasattr(p, attr):
            raise TypeError(f"{what}: parameters[{i}] ({type(p).__name__}) has no .{attr}")
    return params


def allreduce_grads_(parameters: Iterable[Any], comm: Any = None, average: bool = True) -> None:
    """In place: replace every parameter's ``.grad`` by its mean (or sum) over all ranks.

    For the stateful API: call it between the backward pass and ``optimizer.step()``.
    Parameters whose ``.grad`` is ``None`` are skipped (they must be ``None`` on every rank).
    Grads that are views of one packed buffer (``zero_grad(set_to_none=False)``) move in
    one copy each way.

    Errors are raised on every rank, before any grad changes (see :func:`allreduce`); a
    failure after the data started moving aborts the job (MPI_Abort).

    Device:
      One device-to-host and one host-to-device copy per dtype if the grads are packed (one
      per grad otherwise). MPI: a 16-byte Allgather (tree check) and one in-place Allreduce
      per dtype.
    """
    comm = get_comm(comm)
    count = [0]

    def local() -> tuple[Any, Any]:
        mean = require("average", average, _AVERAGE)
        params = _param_list(parameters, "grad", "allreduce_grads_")
        grads = [p.grad for p in params]
        count[0] = len(grads)
        present = [g for g in grads if g is not None]
        queue = queue_of(present)
        check_device_leaves(present, queue, "allreduce_grads_")
        staged = _stage(queue, grads) if comm.Get_size() > 1 else []
        return signature(f"{len(grads)} parameters", grads), (mean, queue, grads, staged)

    def names() -> list[str]:
        return [f"parameters[{i}].grad" for i in range(count[0])]

    mean, queue, grads, staged = agree(comm, "allreduce_grads_", local, names=names)
    with committed(comm, "allreduce_grads_"):
        for idx, lay, host in staged:
            upload(queue, [grads[i] for i in idx], lay, _reduce_host(comm, host, mean))


def broadcast_parameters(params: Any, comm: Any = None, root: int = 0) -> Any:
    """Make every rank's parameters equal to rank ``root``'s.

    ``params`` is either a pytree of device arrays, for which a fresh packed tree holding
    root's values is returned on every rank (pure), or a list of objects with ``.data``
    (e.g. :class:`~netcl_optim.stateful.Parameter`), whose ``.data`` is overwritten in place
    on the other ranks (the list is returned).

    Raises on every rank, before anything changes, when the ranks pass different trees or
    roots, or the checks, root's copy to the host or the allocation fail on some ranks (see
    :func:`allreduce`); a failure after the data started moving aborts the job (MPI_Abort).

    Device:
      On root one device-to-host copy per dtype (per leaf if not packed); on every rank one
      host-to-device copy per dtype. MPI: a 16-byte Allgather (tree check) and one Bcast
      per dtype.
    """
    comm = get_comm(comm)
    size = comm.Get_size()
    rank = comm.Get_rank()
    what = f"broadcast_parameters(root={root!r})"
    objects = (
        isinstance(params, (list, tuple))
        and len(params) > 0
        and all(hasattr(p, "data") and not isinstance(p, cla.Array) for p in params)
    )

    def local() -> tuple[Any, Any]:
        require("root", root, int_in(0, size))
        if objects:
            leaves = [p.data for p in params]
            text = f"{len(leaves)} parameters"
        else:
            leaves, treedef = optree.tree_flatten(params)  # pyright: ignore[reportArgumentType]
            text = str(treedef)
        queue = queue_of(leaves)
        check_device_leaves(leaves, queue, "broadcast_parameters")
        staged = []
        for dtype, idx in by_dtype(leaves).items():
            xs = [leaves[i] for i in idx]
            lay = layout(tuple(x.shape for x in xs), dtype)
            host = download(queue, xs, lay) if rank == root else np.empty(lay.total, dtype)
            staged.append((idx, xs, lay, host, None if objects else lay.allocate(queue)))
        return signature(text, leaves), (leaves, None if objects else treedef, queue, staged)

    def names() -> list[str]:
        if objects:
            return [f"parameters[{i}].data" for i in range(len(params))]
        return path_names(params)

    leaves, treedef, queue, staged = agree(comm, what, local, names=names)
    out = list(leaves)
    with committed(comm, what):
        for idx, xs, lay, host, block in staged:
            if size > 1 and lay.total:
                comm.Bcast(raw(host), root=root)
            if block is not None:
                block.upload(queue, host)
                for i, v in zip(idx, block.views, strict=True):
                    out[i] = v
            elif rank != root:
                upload(queue, xs, lay, host)
    if objects:
        return params
    return optree.tree_unflatten(treedef, out)
