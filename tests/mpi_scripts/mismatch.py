"""Ranks whose trees differ from rank 0's fail fast, with a clear error on EVERY rank (no
hang), and the ranks stay in step: a correct collective works afterwards."""

from __future__ import annotations

import numpy as np
from _util import COMM, RANK, check, expect, log, run

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim.stateful import Adam, Parameter


def tree(rank_variant: bool) -> dict:
    t = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
    if rank_variant and RANK == 1:
        t["extra"] = np.ones(2, np.float32)
    return no.to_device(t)


def main() -> None:
    expect("extra leaf", lambda: dist.allreduce(tree(True), COMM), r"rank 1: 3 leaves against")

    def shapes() -> object:
        t = {"w": np.ones((4, 3 + RANK), np.float32), "b": np.ones(3, np.float32)}
        return dist.allreduce(no.to_device(t), COMM)

    expect("shape", shapes, r"root\['w'\] is float32\[4, 4\] against rank 0's float32\[4, 3\]")

    def grads_none() -> None:
        ps = [Parameter(no.to_device(np.ones(5, np.float32))) for _ in range(2)]
        for i, p in enumerate(ps):
            p.grad = None if (RANK == 1 and i == 1) else no.to_device(np.ones(5, np.float32))
        dist.allreduce_grads_(ps, COMM)

    expect("grad None", grads_none, r"parameters\[1\]\.grad is missing \(None\)")

    def local_error() -> object:
        t = {"w": np.ones(3, np.float32)}
        return dist.allreduce(t if RANK == 1 else no.to_device(t), COMM)

    expect(
        "local error",
        local_error,
        r"not a pyopencl array" if RANK == 1 else r"rank 1: failed: TypeError",
        TypeError if RANK == 1 else ValueError,
    )

    def dtype() -> object:
        x = np.ones(4, np.float32 if RANK == 0 else np.float64)
        return dist.broadcast_parameters(no.to_device({"x": x}), COMM)

    expect("broadcast dtype", dtype, r"float64\[4\] against rank 0's float32\[4\]")

    stx = dist.shard_optimizer(no.adam(1e-3), COMM)
    params = no.pack(tree(False))
    state = stx.init(params)
    expect("shard update", lambda: stx.update(tree(True), state, tree(True)), r"3 leaves")
    expect("shard init", lambda: stx.init(tree(True)), r"shard_optimizer.init: the ranks disagree")

    def zero_ctor() -> object:
        ps = [Parameter(no.to_device(np.ones(5 + RANK, np.float32)))]
        return dist.ZeroRedundancyOptimizer(Adam, ps, comm=COMM, lr=1e-3)

    expect("ZeRO constructor", zero_ctor, r"float32\[6\] against rank 0's float32\[5\]")

    ps = [Parameter(no.to_device(np.ones(5, np.float32))) for _ in range(2)]
    zero = dist.ZeroRedundancyOptimizer(Adam, ps, comm=COMM, lr=1e-3)

    def zero_step() -> None:
        for p in ps:
            p.grad = no.to_device(np.ones(5 if RANK == 0 else 4, np.float32))
        zero.step()

    expect(
        "ZeRO step local error",
        zero_step,
        r"\.grad is float32\[4\]" if RANK == 1 else r"rank 1: failed: ValueError",
    )
    before = [p.data.get() for p in ps]
    check(all((b == 1).all() for b in before), f"a failed ZeRO step changed params {before}")
    expect(
        "sharding a reduction",
        lambda: dist.shard_optimizer(no.chain(no.clip_by_global_norm(1.0), no.sgd(0.1)), COMM),
        r"reduces over the whole tree",
    )
    log("every mismatch failed on every rank")


run(main)
