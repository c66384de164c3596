"""The digits example, data parallel over MPI: each rank computes the gradient of its share of
every batch, the gradients are averaged across ranks, and every rank takes the same step::

    mpiexec -n 2 python -m mpi4py -m netcl_optim.examples.digits_dp [digits options] [--zero]

(``-m mpi4py`` aborts the whole job when a rank raises an uncaught exception; without it
the other ranks would wait for the failed one forever.)

It reuses :mod:`netcl_optim.examples.digits` (data, model, optimizers, schedule, options):
the same run as ``python -m netcl_optim.examples.digits``, with the batch split across ranks.
Options beyond digits': ``--zero`` shards the optimizer state across ranks (ZeRO stage 1:
``ZeroRedundancyOptimizer``, or ``shard_optimizer`` with ``--functional``). ``--amp`` is not
supported here.

Per step, stateful: ``forward``/``backward`` on the rank's rows, ``allreduce_grads_`` (one
Allreduce of the packed gradients), ``clip_grad_norm_device``, ``opt.step()``. Functional:
``step(chain(allreduce_gradients(), clip_by_global_norm(1.0), <optimizer>), ...)``. Each rank
scales its loss gradient by ``ranks * its rows / batch rows``, so that the mean over ranks
is the full batch's mean gradient even when the batch does not split evenly.

``main(argv, comm)`` returns the final metrics (the same on every rank); rank 0 prints.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyopencl.array as cla

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim._device import allocator
from netcl_optim.distributed._comm import get_comm, in_place
from netcl_optim.stateful._clip import clip_grad_norm_device
from netcl_optim.stateful._schedulers import CosineAnnealingLR

from . import _digits_setup as setup
from ._mlp import MLP, init_params

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = setup._parser()
    p.prog = "mpiexec -n N python -m mpi4py -m netcl_optim.examples.digits_dp"
    p.description = "Data-parallel digits: each rank trains on its share of every batch."
    options = {o for a in p._actions for o in a.option_strings}
    if "--data-parallel" not in options:  # accepted, so digits' own flag can forward argv
        p.add_argument("--data-parallel", action="store_true", help=argparse.SUPPRESS)
    if "--zero" not in options:
        p.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeRO-1)")
    return p


def main(argv: Sequence[str] | None = None, comm: Any = None) -> dict[str, Any]:
    """Parse ``argv`` (digits' options plus ``--zero``) and :func:`run`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    if args.amp:
        parser.error("--amp is not supported with data parallelism here")
    return run(args, comm)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def _zero_grads(model: MLP, grads: dict[str, cla.Array] | None) -> None:
    if grads is not None:
        for g in grads.values():
            g.fill(0)
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = cla.zeros(model.queue, p.shape, np.float32, allocator=allocator(model.queue))
        else:
            p.grad.fill(0)


def run(args: argparse.Namespace, comm: Any = None) -> dict[str, Any]:
    """Train with ``args`` (digits' options, ``zero``) on every rank of ``comm`` (default
    ``MPI.COMM_WORLD``); returns the metrics of :func:`netcl_optim.examples.digits.main`
    plus ``ranks``, ``state_bytes`` (per rank) and ``replicas_identical``."""
    if getattr(args, "amp", False):
        raise ValueError("--amp is not supported with data parallelism here")
    comm = get_comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    zero = bool(getattr(args, "zero", False))
    queue = no.default_queue()
    x_tr, y_tr, x_te, y_te = setup.load_digits_split()
    n = len(x_tr)
    bs = min(args.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    default_lr, _, alias = setup.OPTIMIZERS[args.optimizer]
    lr = default_lr if args.lr is None else args.lr

    model = MLP(seed=args.seed, queue=queue)
    pool = allocator(queue)
    x_epoch = cla.empty(queue, x_tr.shape, np.float32, allocator=pool)
    y_epoch = cla.empty(queue, y_tr.shape, np.int32, allocator=pool)
    losses = cla.empty(queue, (n,), np.float32, allocator=pool)
    correct = cla.empty(queue, (n,), np.int32, allocator=pool)
    x_test = no.to_device(x_te, queue)

    if args.functional:
        schedule = setup.epoch_schedule(lr, args.epochs, steps_per_epoch)
        inner = alias(schedule)
        tx = no.chain(
            dist.allreduce_gradients(comm),
            no.clip_by_global_norm(setup.MAX_NORM),
            dist.shard_optimizer(inner, comm) if zero else inner,
        )
        params = no.to_device(init_params(model.sizes, args.seed), queue)
        params = dist.broadcast_parameters(params, comm)  # packed, rank 0's values
        state = tx.init(params)
        grads = model.zero_grads_tree()
    else:
        parameters = model.parameters()
        if zero:
            opt: Any = dist.ZeroRedundancyOptimizer(
                lambda groups: setup.make_optimizer(args.optimizer, groups, lr),
                parameters,
                comm,
            )
        else:
            opt = setup.make_optimizer(args.optimizer, parameters, lr)
        dist.broadcast_parameters(parameters, comm)
        sched = CosineAnnealingLR(opt, T_max=args.epochs)

    rng = np.random.default_rng(args.seed)  # the same permutation on every rank
    history: dict[str, list[float]] = {
        "losses": [],
        "train_accuracies": [],
        "test_accuracies": [],
        "lrs": [],
    }
    step_times: list[float] = []
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = rng.permutation(n)
        x_epoch.set(x_tr[perm])
        y_epoch.set(y_tr[perm])
        mine = np.zeros(n, bool)  # the rows this rank computed this epoch
        history["lrs"].append(schedule(epoch * steps_per_epoch) if args.functional else opt.lr)
        for start in range(0, n, bs):
            rows = min(bs, n - start)
            lo, hi = start + rows * rank // size, start + rows * (rank + 1) // size
            scale = size * (hi - lo) / rows  # mean over ranks = the full batch's mean
            target = grads if args.functional else None
            if hi > lo:
                p = params if args.functional else None
                model.forward(x_epoch, lo, hi - lo, params=p)
                target = model.backward(
                    y_epoch, grads=target, loss_scale=scale, losses=losses, correct=correct
                )
                mine[lo:hi] = True
            else:  # fewer rows than ranks: this rank contributes zeros
                _zero_grads(model, target)
            queue.finish()
            t0 = time.perf_counter()
            if args.functional:
                params, state = no.step(tx, params, grads, state)
            else:
                dist.allreduce_grads_(model.parameters(), comm)
                clip_grad_norm_device(model.parameters(), setup.MAX_NORM)
                opt.step()
                opt.zero_grad()
            queue.finish()
            step_times.append(time.perf_counter() - t0)
        if not args.functional:
            sched.step()
        sums = np.array([losses.get()[mine].sum(), correct.get()[mine].sum()], np.float64)
        comm.Allreduce(in_place(), sums)
        history["losses"].append(float(sums[0] / n))
        history["train_accuracies"].append(float(sums[1] / n))
        pred = model.predict(x_test, params=params if args.functional else None)
        history["test_accuracies"].append(float((pred == y_te).mean()))
        if rank == 0 and not args.no_progress:
            print(
                f"epoch {epoch + 1:3d}: loss {history['losses'][-1]:.4f}, train acc "
                f"{history['train_accuracies'][-1]:.3f}, test acc "
                f"{history['test_accuracies'][-1]:.3f}",
                flush=True,
            )
    seconds = time.perf_counter() - t_start

    final = {k: v.get() for k, v in (params if args.functional else model.params()).items()}
    identical = len(set(comm.allgather(_digest(final)))) == 1
    state_bytes = comm.allgather(dist.state_nbytes(state if args.functional else opt))
    device = queue.device.name.strip()
    result: dict[str, Any] = {
        "test_accuracy": history["test_accuracies"][-1],
        **history,
        "step_ms": 1e3 * float(np.mean(step_times[1:] or step_times)),
        "steps": len(step_times),
        "seconds": seconds,
        "device": device,
        "optimizer": args.optimizer,
        "functional": bool(args.functional),
        "zero": zero,
        "ranks": size,
        "state_bytes": state_bytes,
        "replicas_identical": identical,
        "params": final,
    }
    if rank == 0:
        api = "functional (chain + step)" if args.functional else "stateful"
        print(
            f"{args.optimizer}, {api}, data parallel on {size} ranks"
            f"{' with ZeRO-1 sharded state' if zero else ''}: {args.epochs} epochs, "
            f"{len(step_times)} steps of batch {bs} ({math.ceil(bs / size)} rows per rank) "
            f"in {seconds:.1f} s"
        )
        print(f"device: {device}")
        print(f"mean time per step (all-reduce + clip + update): {result['step_ms']:.3f} ms")
        print(f"optimizer state per rank: {state_bytes} bytes")
        print(f"replicas bit-identical: {identical}")
        print(f"test accuracy: {100 * result['test_accuracy']:.2f}% ({len(y_te)} images)")
    return result


if __name__ == "__main__":
    main()
