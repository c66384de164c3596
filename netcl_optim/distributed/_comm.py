"""MPI plumbing: the lazy mpi4py import, tree signatures and errors agreed across ranks,
the abort after the point of no return, host staging.

mpi4py is imported inside functions only, so ``import netcl_optim`` (and even
``import netcl_optim.distributed``) never needs it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._device import check_float_dtype
from .._packing import Layout, contiguous_run

INSTALL_HINT = "netcl_optim.distributed needs mpi4py and MPI: pip install netcl_optim[mpi]"


def mpi() -> Any:
    """The ``mpi4py.MPI`` module; ImportError with the install command if it is missing."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return MPI


def get_comm(comm: Any = None) -> Any:
    """``comm``, or ``MPI.COMM_WORLD`` for ``None`` (imports mpi4py either way)."""
    MPI = mpi()
    if comm is None:
        return MPI.COMM_WORLD
    for name in ("Get_rank", "Get_size", "Allgather", "Allgatherv", "Allreduce", "Bcast", "Abort"):
        if not hasattr(comm, name):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
    return comm


def in_place() -> Any:
    return mpi().IN_PLACE


def raw(host: np.ndarray) -> np.ndarray:
    """``host`` viewed as unsigned integers of its item size: for collectives that only move
    data (Bcast, Allgatherv), whatever the float type (MPI has no standard float16)."""
    return host.view(np.dtype(f"u{host.dtype.itemsize}"))


# ---------------------------------------------------------------------------- signatures

Signature = tuple[str, tuple[Any, ...]]


def signature(treedef: Any, leaves: Sequence[Any]) -> Signature:
    """What every rank must agree on: the tree structure, and each leaf's shape and dtype
    (``None`` for a missing gradient)."""
    desc = tuple(None if x is None else (tuple(x.shape), str(x.dtype)) for x in leaves)
    return (str(treedef), desc)


def _describe(sig0: Signature, sig: Signature, names: Sequence[str] | None) -> str:
    s0, l0 = sig0
    s1, l1 = sig
    if len(l0) != len(l1):
        return f"{len(l1)} leaves against rank 0's {len(l0)} ({_short(s1)} against {_short(s0)})"
    for i, (a, b) in enumerate(zip(l0, l1, strict=True)):
        if a != b:
            name = names[i] if names is not None and i < len(names) else f"leaf {i}"
            return f"{name} is {_leaf(b)} against rank 0's {_leaf(a)}"
    return f"tree structure {_short(s1)} against rank 0's {_short(s0)}"


def _leaf(d: Any) -> str:
    if d is None:
        return "missing (None)"
    if isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], tuple):
        return f"{d[1]}{list(d[0])}"
    return repr(d)


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


_digests: dict[Any, np.ndarray] = {}


def _digest(key: Any) -> np.ndarray:
    d = _digests.get(key)
    if d is None:
        raw = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
        d = np.frombuffer(raw, np.uint8).copy()
        if len(_digests) > 256:
            _digests.clear()
        _digests[key] = d
    return d


T = TypeVar("T")
Names = Sequence[str] | Callable[[], Sequence[str]] | None


def agree(
    comm: Any,
    what: str,
    check: Callable[[], tuple[Signature, Any]],
    work: Callable[[Any], T] | None = None,
    names: Names = None,
) -> T:
    """Run ``check()`` (validation, returning the signature every rank must share and a
    context) then ``work(context)`` (local work: no collective, no change to the caller's
    objects), and return the work's result once every rank has made the same call (``what``)
    with the same signature and none has raised.

    Any error on any rank becomes an error on every rank, so that no rank is left waiting in
    a later collective: when the calls or signatures differ, every rank raises a ValueError
    naming the ranks and the first leaf that differs; when only some ranks failed, they
    raise their own exception and the others a ValueError naming the failing ranks and
    quoting their errors. Everything that can fail before the data moves belongs in
    ``check`` or ``work``; what follows the agreement runs under :func:`committed`.

    MPI: one Allgather of a 16-byte digest (a second, of the calls, signatures and errors,
    only when they differ). Every rank must call it: it is a collective.
    """
    sig: Signature | None = None
    err: Exception | None = None
    result: Any = None
    try:
        sig, ctx = check()
        result = work(ctx) if work is not None else ctx
    except Exception as exc:
        err = exc
    size = comm.Get_size()
    if size == 1:
        if err is not None:
            raise err
        return result
    note = None if err is None else f"{type(err).__name__}: {err}"
    mine = _digest((what, sig, note))
    every = np.empty((size, mine.size), np.uint8)
    comm.Allgather(mine, every)
    if (every == every[0]).all():
        if err is not None:
            raise err  # the same failure on every rank
        return result
    whats, sigs, notes = zip(*comm.allgather((what, sig, note)), strict=True)
    if callable(names):
        names = names()
    lines = []
    for r in range(size):
        if whats[r] != whats[0]:
            lines.append(f"rank {r}: called {whats[r]} while rank 0 called {whats[0]}")
        elif r and sigs[r] is not None and sigs[0] is not None and sigs[r] != sigs[0]:
            lines.append(f"rank {r}: {_describe(sigs[0], sigs[r], names)}")
        elif notes[r] is not None and (r == 0 or notes[r] != notes[0]):
            lines.append(f"rank {r}: failed: {notes[r]}")
    calls_differ = any(w != whats[0] for w in whats)
    trees_differ = any(s != sigs[0] for s in sigs if s is not None) and sigs[0] is not None
    if calls_differ or trees_differ:
        head = (
            "the ranks disagree (every rank must make the same call, with the same tree "
            "structure, shapes and dtypes)"
        )
    else:
        head = "another rank failed, so every rank raises"
    mismatch = ValueError(
        f"{what}: {head}: {'; '.join(lines[:4])} (raised on rank {comm.Get_rank()} of {size})"
    )
    if err is not None and not calls_differ and (sig is None or not trees_differ):
        raise err from mismatch
    raise mismatch from err


ABORT_GRACE_S = 1.0  # seconds between the failure message and MPI_Abort


@contextmanager
def committed(comm: Any, what: str) -> Iterator[None]:
    """The part of a collective call past the point of no return: after the agreement, once
    the data moves or this rank's objects change. An error there on some ranks cannot be
    agreed on (the others may already wait in the next collective, and the replicas
    differ), so it aborts the whole job (``comm.Abort(1)``) after printing the traceback and
    which rank failed in which call; this rank then exits. With one rank the error is
    raised as usual."""
    try:
        yield
    except Exception as exc:
        if comm.Get_size() == 1:
            raise
        sys.stdout.flush()
        traceback.print_exception(exc)
        print(
            f"netcl_optim.distributed: rank {comm.Get_rank()} of {comm.Get_size()} failed in "
            f"{what} after the data started moving ({type(exc).__name__}: {exc}); the other "
            "ranks cannot be told, so the job is aborted (MPI_Abort)",
            file=sys.stderr,
            flush=True,
        )
        real = isinstance(comm, mpi().Comm)
        if real:  # the process manager relays output asynchronously and drops what is in
            time.sleep(ABORT_GRACE_S)  # flight at the abort: give it time to pass the message
        comm.Abort(1)
        if real:
            # MPICH's Abort returns while its process manager ends the job: this rank must
            # not go on (its caller could catch the error and save out-of-step state)
            os._exit(1)
        raise  # a stand-in communicator


def path_names(tree: Any) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return ["root" + "".join(f"[{k!r}]" for k in path) for path in paths]


def check_device_leaves(leaves: Sequence[Any], queue: cl.CommandQueue, what: str) -> None:
    """Every leaf a C-contiguous float device array on ``queue``'s context."""
    checked: set[np.dtype] = set()
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(f"{what}: leaf {i} is a {type(x).__name__}, not a pyopencl array")
        if x.context != queue.context:
            raise ValueError(f"{what}: leaf {i} belongs to another OpenCL context")
        if x.dtype not in checked:
            check_float_dtype(x.dtype, queue, what)
            checked.add(x.dtype)
        if not x.flags.c_contiguous:
            raise ValueError(f"{what}: leaf {i} is not C-contiguous")


def by_dtype(leaves: Sequence[Any]) -> dict[np.dtype, list[int]]:
    """Indices of the non-None leaves, grouped by dtype in order of first appearance."""
    out: dict[np.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        if x is not None:
            out.setdefault(x.dtype, []).append(i)
    return out


# ---------------------------------------------------------------------------- host staging


def packed_run(xs: Sequence[cla.Array]) -> tuple[Any, int] | None:
    """``(buffer, element offset)`` if the non-empty ``xs`` lie back to back in one buffer."""
    nonempty = [x for x in xs if x.size]
    if not nonempty:
        return None
    return contiguous_run(nonempty)


def download(queue: cl.CommandQueue, xs: Sequence[cla.Array], lay: Layout) -> np.ndarray:
    """The leaves ``xs`` (laid out as ``lay``) in one host buffer: one copy if they are
    packed, else one per leaf; returns after the copies are done."""
    host = np.empty(lay.total, lay.dtype)
    if not lay.total:
        return host
    run = packed_run(xs)
    if run is not None:
        base, off = run
        cl.enqueue_copy(queue, host, base, src_offset=off * lay.dtype.itemsize, is_blocking=True)
        return host
    last = None
    for x, o, n in zip(xs, lay.offsets, lay.sizes, strict=True):
        if n:
            last = cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue,
                host[o : o + n],
                x.base_data,  # pyright: ignore[reportArgumentType]
                src_offset=x.offset,
                is_blocking=False,
            )
    if last is not None:
        last.wait()
    return host


def upload(queue: cl.CommandQueue, xs: Sequence[cla.Array], lay: Layout, host: np.ndarray) -> None:
    """Write ``host`` back into the leaves ``xs`` (in place): one copy if they are packed."""
    if not lay.total:
        return
    run = packed_run(xs)
    if run is not None:
        base, off = run
        cl.enqueue_copy(queue, base, host, dst_offset=off * lay.dtype.itemsize, is_blocking=True)
        return
    last = None
    for x, o, n in zip(xs, lay.offsets, lay.sizes, strict=True):
        if n:
            last = cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue,
                x.base_data,  # pyright: ignore[reportArgumentType]
                host[o : o + n],
                dst_offset=x.offset,
                is_blocking=False,
            )
    if last is not None:
        last.wait()
