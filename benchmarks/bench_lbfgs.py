"""One L-BFGS iteration on a large model: ``no.LBFGS`` (the device's vectors and two-loop
recursion) against ``torch.optim.LBFGS`` on the CPU, in one interleaved run, and the host
round trips each of our iterations takes.

The problem: ``f(x) = 1/2 sum a_i (x_i - b_i)^2`` over ``n`` float32 parameters (one leaf, or
a model-like tree of leaves), ``a`` log-uniform in [1, 1e4], so that the history (10 pairs)
fills and stays full over the run without converging. Each optimizer's ``step(closure)`` runs
with ``max_iter=1``: one closure (the loss and the gradient, computed by the same element-wise
arithmetic on each side, no autograd) and one iteration (the two-loop recursion over the
history, the step), after ``--warmup`` steps that fill the history. ``closure`` rows time the
closure alone, so ``iteration`` = ``step`` - ``closure``.

    python benchmarks/bench_lbfgs.py [--size 10M] [--history 10] [--rounds 10] [--warmup 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
from pyopencl.elementwise import ElementwiseKernel
from pyopencl.reduction import ReductionKernel

sys.path.insert(0, str(Path(__file__).parent))
import bench_step as bs

import netcl_optim as no
from netcl_optim.fusion._vectors import Vectors

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100K": 100_000}


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(0.0, np.log(1e4), n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return np.zeros(n, np.float32), a, b


def _loss_kernel(context: cl.Context) -> ReductionKernel:
    return ReductionKernel(context, np.float32, neutral="0", reduce_expr="a+b",
                           map_expr="0.5f * a[i] * (x[i] - b[i]) * (x[i] - b[i])",
                           arguments="__global const float *x, __global const float *a, "
                                     "__global const float *b")  # fmt: skip


class Ours:
    """``no.LBFGS`` over one packed parameter; the closure runs on the device and returns
    the loss as a 0-d device array (LBFGS reads it with its own scalars)."""

    def __init__(self, queue: cl.CommandQueue, x0, a, b, history: int) -> None:
        self.queue = queue
        self.param = no.Parameter(cla.to_device(queue, x0))
        self.a, self.b = cla.to_device(queue, a), cla.to_device(queue, b)
        self.param.grad = cla.empty_like(self.param.data)
        self.loss = _loss_kernel(queue.context)
        self.grad = ElementwiseKernel(
            queue.context, "float *g, const float *x, const float *a, const float *b",
            "g[i] = a[i] * (x[i] - b[i])", "lbfgs_bench_grad")  # fmt: skip
        self.opt = no.LBFGS([self.param], lr=1, max_iter=1, history_size=history,
                            tolerance_grad=0, tolerance_change=0)  # fmt: skip

    def closure(self) -> Any:
        x = self.param.data
        self.grad(self.param.grad, x, self.a, self.b)
        return self.loss(x, self.a, self.b)

    def step(self) -> None:
        self.opt.step(self.closure)

    def sync(self) -> None:
        self.queue.finish()


class Torch:
    """``torch.optim.LBFGS`` on the CPU, the same closure in torch ops (no autograd)."""

    def __init__(self, torch: Any, x0, a, b, history: int) -> None:
        self.torch = torch
        self.x = torch.nn.Parameter(torch.from_numpy(x0.copy()))
        self.a, self.b = torch.from_numpy(a), torch.from_numpy(b)
        self.opt = torch.optim.LBFGS([self.x], lr=1, max_iter=1, history_size=history,
                                     tolerance_grad=0, tolerance_change=0)  # fmt: skip

    def closure(self) -> Any:
        with self.torch.no_grad():
            r = self.x - self.b
            self.x.grad = self.a * r
            return 0.5 * (self.a * r * r).sum()

    def step(self) -> None:
        self.opt.step(self.closure)

    def sync(self) -> None:
        return None


class _Timed(bs.Variant):
    """A runner's ``step`` or ``closure`` as a ``bench_step`` variant."""

    def __init__(self, label: str, run: Callable[[], Any], sync: Callable[[], None]) -> None:
        self.label = label
        self._run, self._sync = run, sync

    def run(self) -> None:
        self._run()

    def sync(self) -> None:
        self._sync()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="10M", choices=sorted(SIZES))
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=12)
    args = parser.parse_args(argv)
    queue = no.default_queue()
    n = SIZES[args.size]
    x0, a, b = problem(n)
    runners: dict[str, Any] = {"ours": Ours(queue, x0, a, b, args.history)}
    torch = bs.optional("torch")
    if torch is not None:
        runners["torch"] = Torch(torch, x0, a, b, args.history)
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
        r.sync()
    before = Vectors.reads
    runners["ours"].step()
    reads = Vectors.reads - before
    variants = []
    for name, r in runners.items():
        variants += [_Timed(f"{name} step", r.step, r.sync),
                     _Timed(f"{name} closure", r.closure, r.sync)]  # fmt: skip
    samples = bs.time_round_robin(variants, args.rounds, 0.05)
    medians = {v.label: statistics.median(s) for v, s in zip(variants, samples, strict=True)}
    lines = [f"device: {queue.device.name}; n = {n:,} float32, history {args.history}, "
             f"max_iter=1; median of {args.rounds} interleaved blocks after {args.warmup} "
             "warm-up steps",
             f"| {'variant':15} | {'median ms':>9} |",
             "|" + "-" * 17 + "|" + "-" * 11 + "|"]  # fmt: skip
    for name in runners:
        step, closure = medians[f"{name} step"], medians[f"{name} closure"]
        lines.append(f"| {name + ' step':15} | {step * 1e3:9.2f} |")
        lines.append(f"| {name + ' closure':15} | {closure * 1e3:9.2f} |")
        lines.append(f"| {name + ' iteration':15} | {(step - closure) * 1e3:9.2f} |")
    if "torch" in runners:
        ratio = (medians["torch step"] - medians["torch closure"]) / (
            medians["ours step"] - medians["ours closure"]
        )
        lines.append(f"one iteration (step - closure): ours is {ratio:.2f}x torch's speed")
    lines.append(f"host round trips per step (ours, the loss read with them): {reads}")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
