"""One Muon step on GPT-2-small's matrices: ``no.Muon`` (our GEMM and batched Newton–Schulz
on the OpenCL device) against ``torch.optim.Muon`` on the CPU (its iteration in bfloat16)
and the same step in numpy float32 (OpenBLAS, each shape's matrices as one stacked
``matmul``), in one interleaved run; then the Newton–Schulz iteration alone per shape, as
GFLOPS (``4 m^2 n + 2 m^3`` per iteration and matrix, ``m <= n``; the symmetric products
count as full ones).

The model: ``--layers`` layers of ``768x768``, ``768x3072`` and ``3072x768`` float32 weights
(``[out, in]``), fixed gradients, torch's defaults (``lr=1e-3``, ``weight_decay=0.1``,
``momentum=0.95``, Nesterov, 5 iterations).

    python benchmarks/bench_muon.py [--layers 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl

sys.path.insert(0, str(Path(__file__).parent))
import bench_gemm
import bench_step as bs

import netcl_optim as no
from netcl_optim.optimizers._orthogonalize import orthogonalize_by_newton_schulz

SHAPES = ((768, 768), (768, 3072), (3072, 768))
COEFFS = (3.4445, -4.775, 2.0315)
STEPS = 5


def model(layers: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = [s for _ in range(layers) for s in SHAPES]
    params = [(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return params, grads


def ns_flops(shape: tuple[int, int], steps: int = STEPS) -> float:
    m, n = sorted(shape)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


class Ours(bs.Variant):
    label = "netcl_optim Muon"

    def __init__(
        self, queue: cl.CommandQueue, params: list, grads: list, ns_dtype: str | None = None
    ) -> None:
        self.queue = queue
        packed = no.pack([no.to_device(p) for p in params])
        self.params = [no.Parameter(p) for p in packed]
        for p, g in zip(self.params, no.pack([no.to_device(g) for g in grads]), strict=True):
            p.grad = g
        self.opt = no.Muon(self.params, ns_dtype=ns_dtype)
        if ns_dtype is not None:
            self.label = f"netcl_optim Muon, ns_dtype={ns_dtype!r}"

    def run(self) -> None:
        self.opt.step()

    def sync(self) -> None:
        self.queue.finish()


class Torch(bs.Variant):
    label = "torch.optim.Muon (CPU)"

    def __init__(self, torch: Any, params: list, grads: list) -> None:
        self.params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.opt = torch.optim.Muon(self.params)

    def run(self) -> None:
        self.opt.step()

    def sync(self) -> None:
        return None


def numpy_newton_schulz(x: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """torch's iteration on a ``[B, R, C]`` float32 stack (transposed where ``R > C``)."""
    a, b, c = COEFFS
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = np.swapaxes(x, -1, -2)
    norm = np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / np.maximum(norm, np.float32(eps))
    for _ in range(STEPS):
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return np.swapaxes(x, -1, -2) if transposed else x


class Numpy(bs.Variant):
    label = "numpy float32 (stacked per shape)"

    def __init__(self, params: list, grads: list) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.shape, []).append(i)
        self.groups = [
            (np.stack([params[i] for i in idx]), np.stack([grads[i] for i in idx]))
            for idx in groups.values()
        ]
        self.bufs = [np.zeros_like(p) for p, _ in self.groups]

    def run(self, lr: float = 1e-3, wd: float = 0.1, mu: float = 0.95) -> None:
        for (p, g), buf in zip(self.groups, self.bufs, strict=True):
            buf += (1 - mu) * (g - buf)
            update = g + mu * (buf - g)
            ortho = numpy_newton_schulz(update)
            rows, cols = p.shape[-2:]
            p *= 1 - lr * wd
            p -= (lr * max(1.0, rows / cols) ** 0.5) * ortho

    def sync(self) -> None:
        return None


class OursNS(bs.Variant):
    def __init__(self, queue: cl.CommandQueue, stack: np.ndarray) -> None:
        self.queue = queue
        self.x = [no.to_device(m) for m in stack]
        self.tx = orthogonalize_by_newton_schulz(variant="torch", eps=1e-7, shape_scale=False)

    def run(self) -> None:
        self.tx.update(self.x, None)

    def sync(self) -> None:
        self.queue.finish()


class NumpyNS(bs.Variant):
    def __init__(self, stack: np.ndarray) -> None:
        self.x = stack

    def run(self) -> None:
        numpy_newton_schulz(self.x)

    def sync(self) -> None:
        return None


def _interleaved(variants: list[Any], rounds: int) -> list[list[float]]:
    """Seconds per call of each variant, ``rounds`` blocks each, the variants interleaved
    (:func:`bench_gemm.timed_block`: a warm call, a timed block, a pause that outlasts the
    other libraries' spinning threads)."""
    samples: list[list[float]] = [[] for _ in variants]
    for r in range(rounds):
        shift = r % len(variants)
        for k in [*range(shift, len(variants)), *range(shift)]:
            v = variants[k]
            samples[k].append(bench_gemm.timed_block(v.run, v.sync, target=0.0))
    return samples


def _row(label: str, samples: list[float], ours: float) -> str:
    """A table row: median and best ms, and the other's median over ours."""
    med = statistics.median(samples)
    return f"| {label} | {med * 1e3:.0f} | {min(samples) * 1e3:.0f} | {med / ours:.2f}x |"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    queue = no.default_queue()
    params, grads = model(args.layers)
    variants: list[Any] = [
        Ours(queue, params, grads),
        Ours(queue, params, grads, ns_dtype="bfloat16"),
        Numpy(params, grads),
    ]
    torch = bs.optional("torch")
    if torch is not None and hasattr(torch.optim, "Muon"):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        variants.append(Torch(torch, params, grads))
    for v in variants:  # warm up: build the kernels, fill torch's and numpy's caches
        v.run()
        v.sync()
    samples = _interleaved(variants, args.rounds)
    flops = sum(ns_flops(s) for s in SHAPES) * args.layers
    lines = [
        f"One Muon step, GPT-2-small matrices x {args.layers} layers "
        f"({flops / 1e9:.0f} GFLOP of Newton-Schulz), {args.rounds} interleaved rounds",
        "",
        "| implementation | median ms | best ms | median / ours |",
        "|---|---|---|---|",
    ]
    ours = statistics.median(samples[0])
    lines += [_row(v.label, s, ours) for v, s in zip(variants, samples, strict=True)]
    lines += [
        "",
        f"Newton-Schulz alone ({STEPS} iterations) on {args.layers} matrices of each shape, "
        "GFLOPS (best of the rounds)",
        "",
        "| shape | ours | numpy float32 | ours / numpy |",
        "|---|---|---|---|",
    ]
    for shape in SHAPES:
        stack = np.stack([g for g in grads if g.shape == shape])
        pair = [OursNS(queue, stack), NumpyNS(stack)]
        for v in pair:
            v.run()
            v.sync()
        best = [min(s) for s in _interleaved(pair, args.rounds)]
        rate = [ns_flops(shape) * len(stack) / t / 1e9 for t in best]
        lines.append(
            f"| {shape[0]}x{shape[1]} | {rate[0]:.0f} | {rate[1]:.0f} | {rate[0] / rate[1]:.2f}x |"
        )
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
