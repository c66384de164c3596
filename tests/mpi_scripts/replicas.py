"""Replicas stay bit-identical over 20 steps: every rank gets different gradients, all-reduced
before the step (functional chain and stateful API), after a broadcast of rank 0's start."""

from __future__ import annotations

import numpy as np
from _util import COMM, RANK, SIZE, bits_equal, check, log, run, same_on_all_ranks

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim.stateful import AdamW, Parameter

SHAPES = {"w1": (17, 9), "b1": (9,), "w2": (9, 3), "b2": (3,)}


def main() -> None:
    rng = np.random.default_rng(100 + RANK)  # different on every rank
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    params = dist.broadcast_parameters(no.to_device(host), COMM)
    check(
        all(same_on_all_ranks(v) for v in no.to_host(params).values()),
        "broadcast_parameters: trees differ",
    )
    check(
        all(bits_equal(no.to_host(params)[k], host[k]) for k in host) == (RANK == 0),
        "broadcast_parameters: root's values changed, or another rank kept its own",
    )

    # functional: allreduce_gradients first in the chain
    tx = no.chain(dist.allreduce_gradients(comm=COMM), no.adamw(1e-2, weight_decay=1e-2))
    ref_tx = no.adamw(1e-2, weight_decay=1e-2)
    state = tx.init(params)
    ref_params, ref_state = params, ref_tx.init(params)
    grng = np.random.default_rng(7)
    for step in range(20):
        all_grads = [  # every rank draws every rank's grads, so it can check the mean
            {k: grng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(SIZE)
        ]
        grads = no.to_device(all_grads[RANK])
        params, state = no.step(tx, params, grads, state)
        mean = {k: np.sum([g[k] for g in all_grads], axis=0) / np.float32(SIZE) for k in SHAPES}
        if SIZE == 2:  # a + b is the same in any order: the mean is exactly this
            ref_params, ref_state = no.step(ref_tx, ref_params, no.to_device(mean), ref_state)
        for k, v in no.to_host(params).items():
            check(same_on_all_ranks(v), f"functional step {step}: {k} differs across ranks")
    if SIZE == 2:
        out, ref = no.to_host(params), no.to_host(ref_params)
        check(all(bits_equal(out[k], ref[k]) for k in SHAPES), "functional != mean-grad ref")

    # stateful: allreduce_grads_ between backward and step, packed and unpacked grads
    ps = [Parameter(no.to_device(host[k])) for k in SHAPES]
    dist.broadcast_parameters(ps, COMM)
    opt = AdamW(ps, lr=1e-2)
    for step in range(20):
        if step % 2:
            opt.zero_grad(set_to_none=False)  # packed grads: one copy each way
            for p, k in zip(ps, SHAPES, strict=True):
                p.grad.set(grng.standard_normal(SHAPES[k]).astype(np.float32) + RANK)
        else:
            for p, k in zip(ps, SHAPES, strict=True):
                p.grad = no.to_device(grng.standard_normal(SHAPES[k]).astype(np.float32) + RANK)
        dist.allreduce_grads_(ps, COMM)
        for p in ps:
            check(same_on_all_ranks(p.grad.get()), f"stateful step {step}: grads differ")
        opt.step()
        for i, p in enumerate(ps):
            check(same_on_all_ranks(p.data.get()), f"stateful step {step}: param {i} differs")
    log("replicas identical after 20 functional and 20 stateful steps")


run(main)
