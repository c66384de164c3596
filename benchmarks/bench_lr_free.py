"""Learning-rate-free steps (Prodigy, D-Adaptation AdamW) against the bytes they must move and
against konstmish's ``prodigyopt`` (torch, CPU), in one interleaved run (``bench_step.py``'s
problems, limit kernels and round-robin timing).

Prodigy's step takes three launches per packed tree: a pass that sums ``<g, p0 - p>`` and
``||s||_1`` (it reads g, p, p0 and s: 16 bytes per float32 parameter), a one-work-item finish
that updates ``d`` on the device, and the fused kernel (reads g and reads and writes p, m, v,
s: 36 bytes): 52 bytes per parameter. D-Adaptation AdamW sums during its fused kernel (the
next step reads them): one pass, 36 bytes. Variants:

* ``limit prodigy``: two plain kernels back to back, the 16-byte read pass and the 36-byte
  update pass (``bench_step.PassesLimitVariant``), reported as one step;
* ``prodigy stateful``, ``prodigy donate``, ``one-pass stateful``, ``dadapt stateful``:
  ``bench_step``'s stateful and donated variants of the optimizer table's rows (``prodigy``,
  ``prodigy-one-pass``, ``dadapt_adamw``) over packed params and grads, at its learning rate
  (the schedule's multiplier of ``d``: the bytes and the arithmetic do not depend on it);
* ``prodigyopt``: ``prodigyopt.Prodigy`` (torch, CPU, the same params and grads; skipped when
  the package or torch is absent: ``pip install --no-deps prodigyopt==1.1.2``);
* ``limit dadapt``: the plain kernel moving 36 bytes (g; p and three slots);

``% limit`` compares each row with its own optimizer's limit; ``vs torch`` is prodigyopt's
time over the row's (both optimizers against the one torch implementation).

    python benchmarks/bench_lr_free.py [--sizes 10M,tree160] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_step as bs

import netcl_optim as no

LR = 1.0  # prodigyopt's multiplier of d: its recommended value
# Prodigy: the sums' pass (read g, p, p0, s), then the fused step (read g; update p, m, v, s)
PRODIGY_PASSES = (
    bs.Pass(reads=("g", "p", "p0", "s")),
    bs.Pass(reads=("g",), updates=("p", "m", "v", "s")),
)
PRODIGY_BYTES = bs.passes_bytes(PRODIGY_PASSES)  # 52
# one_pass=True: one kernel (read g, p0; update p, m, v, s), the sums for the next step in it
ONE_PASS = (bs.Pass(reads=("g", "p0"), updates=("p", "m", "v", "s")),)
ONE_PASS_BYTES = bs.passes_bytes(ONE_PASS)  # 40
DADAPT_SLOTS = 3  # m, v, s
DADAPT_BYTES = bs.FLOAT32 * (1 + 2 * (1 + DADAPT_SLOTS))  # 36


def _spec(row_id: str) -> bs.OptimizerSpec:
    """The optimizer table's row, as bench_step runs it (our variants: bench_step's)."""
    return bs.OptimizerSpec(bs.optimizer_table.BY_ID[row_id])


@dataclass
class Theirs(bs.Variant):
    """prodigyopt's ``Prodigy`` with optax's rule: bias correction on, decoupled decay (0)."""

    def setup(self, problem: bs.Problem) -> None:
        import prodigyopt
        import torch

        self.params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in problem.params]
        for p, g in zip(self.params, problem.grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.optimizer = prodigyopt.Prodigy(self.params, lr=LR, use_bias_correction=True)

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
    have_theirs = bs.optional("prodigyopt") is not None and bs.optional("torch") is not None
    print(f"device: {queue.device.name}; prodigy {PRODIGY_BYTES} B/param "
          f"({bs.passes_roles(PRODIGY_PASSES)}), one_pass {ONE_PASS_BYTES} B/param "
          f"({bs.passes_roles(ONE_PASS)}), dadapt {DADAPT_BYTES} B/param "
          "(read g; read+write p, m, v, s)")  # fmt: skip
    if not have_theirs:
        print("prodigyopt or torch not installed: its variant skipped")
    header = f"{'size':>8} {'variant':18} {'median ms':>10} {'GB/s':>7} {'% limit':>8}"
    print(f"{header} {'vs torch':>9}")
    for size in args.sizes.split(","):
        problem = bs.make_problem(size)
        variants: list[bs.Variant] = [
            bs.PassesLimitVariant(label="limit prodigy", queue=queue, passes=PRODIGY_PASSES),
            bs.StatefulVariant(label="prodigy stateful", queue=queue, spec=_spec("prodigy"),
                               module=no),
            bs.DonatedStepVariant(label="prodigy donate", queue=queue, spec=_spec("prodigy")),
        ]  # fmt: skip
        if have_theirs:
            variants.append(Theirs(label="prodigyopt"))
        variants += [
            bs.PassesLimitVariant(label="limit one-pass", queue=queue, passes=ONE_PASS),
            bs.StatefulVariant(label="one-pass stateful", queue=queue,
                               spec=_spec("prodigy-one-pass"), module=no),
        ]  # fmt: skip
        variants += [
            bs.LimitVariant(label="limit dadapt", queue=queue, slots=DADAPT_SLOTS),
            bs.StatefulVariant(
                label="dadapt stateful", queue=queue, spec=_spec("dadapt_adamw"), module=no
            ),
        ]
        for v in variants:
            v.setup(problem)
        bs.warm_up(variants, 3)
        samples = bs.time_round_robin(variants, args.rounds, 0.05)
        medians = {v.label: statistics.median(s) for v, s in zip(variants, samples, strict=True)}
        theirs = medians.get("prodigyopt")
        for label, m in medians.items():
            family = next((f for f in ("dadapt", "one-pass") if f in label), "prodigy")
            nbytes = {"dadapt": DADAPT_BYTES, "one-pass": ONE_PASS_BYTES}.get(family, PRODIGY_BYTES)
            gbs = nbytes * problem.n / m / 1e9
            vs = "" if theirs is None else f"{theirs / m:8.2f}x"
            limit = medians[f"limit {family}"]
            print(f"{size:>8} {label:18} {m * 1e3:10.3f} {gbs:7.1f} {limit / m:8.0%} {vs:>9}")


if __name__ == "__main__":
    main()
