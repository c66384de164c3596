"""A rank that raises inside a library collective makes every rank fail fast: no rank is
left waiting in a collective. Run as

    mpiexec -n 2 python [-m mpi4py] tests/mpi_scripts/failures.py SCENARIO

``caught`` (under ``-m mpi4py``): failures on one rank only (an invalid learning rate in a
ZeRO step, device memory exhausted in an all-reduce, a failed read on the broadcast's root)
raise on EVERY rank: the failing rank its own error, the others a ValueError naming it;
nothing changes and the ranks stay in step. ``uncaught`` (plain ``python``, so that only the
library can prevent the hang): the ZeRO failure, not caught: every rank exits with it.
``abort`` (plain ``python``): a failure on rank 1 after the data started moving (writing
the all-reduced grads back), caught by the script: the library aborts the job, naming the
rank, the call and the error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from _util import COMM, RANK, check, expect, log, run

import netcl_optim as no
import netcl_optim._packing as packing
import netcl_optim.distributed as dist
import netcl_optim.distributed._allreduce as allreduce_module
from netcl_optim.stateful import Adam, Parameter


@contextmanager
def fail_on(rank: int, owner: Any, name: str, exc: Exception) -> Iterator[None]:
    """Inside the block, ``owner.name`` raises ``exc`` on ``rank`` (a simulated fault)."""
    original = getattr(owner, name)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    if RANK == rank:
        setattr(owner, name, fail)
    try:
        yield
    finally:
        setattr(owner, name, original)


def zero_with_bad_lr_on_rank_1() -> tuple[list[Any], Callable[[], object]]:
    ps = [Parameter(no.to_device(np.ones(5, np.float32))) for _ in range(2)]
    zero = dist.ZeroRedundancyOptimizer(Adam, ps, comm=COMM, lr=1e-3)
    for p in ps:
        p.grad = no.to_device(np.ones(5, np.float32))
    if RANK == 1:
        zero.param_groups[0]["lr"] = -1.0  # e.g. a scheduler gone wrong on one rank
    return ps, zero.step


def caught() -> None:
    ps, step = zero_with_bad_lr_on_rank_1()
    expect(
        "ZeRO step, invalid lr on rank 1",
        step,
        r"Invalid lr: -1\.0 .* param_groups\[0\]" if RANK == 1 else r"rank 1: failed: ValueError",
    )
    check(all((p.data.get() == 1).all() for p in ps), "a failed ZeRO step changed params")

    grads = no.to_device({"w": np.ones(6, np.float32), "h": np.ones(4, np.float16)})

    def allreduce() -> None:
        oom = MemoryError("simulated: out of device memory")
        with fail_on(1, packing.Layout, "allocate", oom):
            dist.allreduce(grads, COMM)

    expect(
        "allreduce, no device memory on rank 1",
        allreduce,
        r"simulated: out of device memory" if RANK == 1 else r"rank 1: failed: MemoryError",
        MemoryError if RANK == 1 else ValueError,
    )
    check(all((g.get() == 1).all() for g in grads.values()), "a failed allreduce changed grads")

    params = [Parameter(no.to_device(np.full(3, RANK, np.float32)))]

    def broadcast() -> None:
        broken = RuntimeError("simulated: device read failed")
        with fail_on(0, allreduce_module, "download", broken):
            dist.broadcast_parameters(params, COMM)

    expect(
        "broadcast, failed read on the root",
        broadcast,
        r"simulated: device read failed" if RANK == 0 else r"rank 0: failed: RuntimeError",
        RuntimeError if RANK == 0 else ValueError,
    )
    check((params[0].data.get() == RANK).all(), "a failed broadcast changed params")
    log("every failure raised on every rank")


def abort() -> None:
    ps = [Parameter(no.to_device(np.ones(n, dtype))) for n, dtype in ((5, "f4"), (3, "f2"))]
    for p in ps:
        p.grad = no.to_device(np.ones(p.data.shape, p.data.dtype))
    broken = RuntimeError("simulated: device write failed")
    try:
        with fail_on(1, allreduce_module, "upload", broken):
            dist.allreduce_grads_(ps, COMM)
    except RuntimeError as err:
        log(f"caught {err}: continuing, out of step")
    total = COMM.allreduce(RANK + 1)  # the next collective: hangs unless the job was aborted
    log(f"the job was not aborted (total {total})")


if sys.argv[1] == "uncaught":  # not under run(), which would abort the job itself
    zero_with_bad_lr_on_rank_1()[1]()
else:
    run({"caught": caught, "abort": abort}[sys.argv[1]])
