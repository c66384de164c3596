"""Schedule-free AdamW's step against the bytes it must move and against facebookresearch's
``schedulefree`` (torch, CPU), in one interleaved run (``bench_step.py``'s problems, limit
kernel and round-robin timing).

A step reads g and reads and writes p (y), z and the second moment v: 28 bytes per float32
parameter, the limit kernel's bytes with two slots. Variants:

* ``limit``: the plain kernel moving those 28 bytes (one work-item per element);
* ``stateful``: ``no.AdamWScheduleFree(...).step()`` over packed params and grads (one fused
  kernel per step);
* ``step donate``: ``no.step(no.schedule_free_adamw(...), ..., donate=True)`` (optax's rule);
* ``schedulefree foreach`` / ``schedulefree``: the package's ``AdamWScheduleFree`` with
  ``foreach=True`` (its multi-tensor path) and ``foreach=False``.

    python benchmarks/bench_schedule_free.py [--sizes 10M,tree160] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_step as bs

import netcl_optim as no

LR, WARMUP = 1e-3, 10
BYTES = 28  # read g; read and write p, z, v (float32)


@dataclass
class OursStateful(bs.Variant):
    queue: Any = None

    def setup(self, problem: bs.Problem) -> None:
        params = no.pack(no.to_device(list(problem.params), self.queue))
        grads = no.pack(no.to_device(list(problem.grads), self.queue))
        self.parameters = [no.Parameter(p) for p in params]
        for p, g in zip(self.parameters, grads, strict=True):
            p.grad = g
        self.optimizer = no.AdamWScheduleFree(self.parameters, lr=LR, warmup_steps=WARMUP)
        self.optimizer.train()

    def run(self) -> None:
        self.optimizer.step()

    def sync(self) -> None:
        self.queue.finish()


@dataclass
class OursDonated(bs.Variant):
    queue: Any = None

    def setup(self, problem: bs.Problem) -> None:
        self.params = no.pack(no.to_device(list(problem.params), self.queue))
        self.grads = no.pack(no.to_device(list(problem.grads), self.queue))
        self.tx = no.schedule_free_adamw(LR, warmup_steps=WARMUP)
        self.state = self.tx.init(self.params)

    def run(self) -> None:
        self.params, self.state = no.step(self.tx, self.params, self.grads, self.state,
                                          donate=True)  # fmt: skip

    def sync(self) -> None:
        self.queue.finish()


@dataclass
class Theirs(bs.Variant):
    foreach: bool = True

    def setup(self, problem: bs.Problem) -> None:
        import schedulefree
        import torch

        self.params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in problem.params]
        for p, g in zip(self.params, problem.grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.optimizer = schedulefree.AdamWScheduleFree(
            self.params, lr=LR, warmup_steps=WARMUP, foreach=self.foreach
        )
        self.optimizer.train()

    def run(self) -> None:
        self.optimizer.step()

    def sync(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10M,tree160")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    queue = no.default_queue()
    have_theirs = bs.optional("schedulefree") is not None and bs.optional("torch") is not None
    print(f"device: {queue.device.name}; {BYTES} B/param (read g; read+write p, z, v)")
    print(
        f"{'size':>8} {'variant':22} {'median ms':>10} {'GB/s':>7} {'% limit':>8} {'vs theirs':>9}"
    )
    for size in args.sizes.split(","):
        problem = bs.make_problem(size)
        variants: list[bs.Variant] = [
            bs.LimitVariant(label="limit", queue=queue, slots=2),
            OursStateful(label="stateful", queue=queue),
            OursDonated(label="step donate", queue=queue),
        ]
        if have_theirs:
            variants += [Theirs(label="schedulefree foreach", foreach=True),
                         Theirs(label="schedulefree", foreach=False)]  # fmt: skip
        for v in variants:
            v.setup(problem)
        bs.warm_up(variants, 3)
        samples = bs.time_round_robin(variants, args.rounds, 0.05)
        medians = {v.label: statistics.median(s) for v, s in zip(variants, samples, strict=True)}
        limit = medians["limit"]
        theirs = min((m for k, m in medians.items() if k.startswith("schedulefree")), default=None)
        for label, m in medians.items():
            gbs = BYTES * problem.n / m / 1e9
            vs = "" if theirs is None else f"{theirs / m:8.2f}x"
            print(f"{size:>8} {label:22} {m * 1e3:10.3f} {gbs:7.1f} {limit / m:8.0%} {vs:>9}")


if __name__ == "__main__":
    main()
