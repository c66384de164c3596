"""Where a NoisySGD step's time goes: the generator's arithmetic against the bytes it moves.

Times, at one size (float32, one work-item per element, the library's own helper source),
kernels that all move NoisySGD's 12 bytes per parameter (read p, g; write p):

- ``limit``: p -= lr g, the memory floor;
- ``philox``: the same plus one Philox-4x32-10 draw per element (its first word as a uniform);
- ``normal``: the same plus the float inverse-CDF normal of a cheap 32-bit hash (no Philox);
- ``philox + normal``: what ``add_noise`` runs per element.

If ``philox`` or ``normal`` alone is far above ``limit``, the step is bound by arithmetic,
not bytes, on this device.

    python benchmarks/bench_noise.py              # 10M parameters, ~10 s
    python benchmarks/bench_noise.py --size 1M --rounds 15
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl_optim.fusion._codegen import preamble
from netcl_optim.fusion._random import random_helpers

_PHILOX = (
    "const uint4 r = philox4x32_10((uint4)((uint)i, (uint)(i >> 32), 7u, 0u), (uint2)(1u, 2u));"
)
_HASH = (
    "uint h = (uint)i * 0x9E3779B9u; h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13;"
    " const uint4 r = (uint4)(h, 0u, 0u, 0u);"
)
KERNELS = {
    "limit": "const float u = g[i];",
    "philox": _PHILOX + " const float u = g[i] + 0.01f * ((float)r.x * 0x1p-32f);",
    "normal": _HASH + " const float u = g[i] + 0.01f * philox_normal(r);",
    "philox + normal": _PHILOX + " const float u = g[i] + 0.01f * philox_normal(r);",
}


def _source() -> str:
    kernels = [
        f"__kernel void k{n}(__global float *restrict p, __global const float *restrict g)"
        f" {{ const long i = get_global_id(0); {body} p[i] = p[i] - 0.1f * u; }}"
        for n, body in enumerate(KERNELS.values())
    ]
    return "\n".join([preamble("float", False), random_helpers("float"), *kernels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="10M", help="parameters: 1M, 10M, ... (10M)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per kernel (9)")
    args = parser.parse_args()
    n = int(float(args.size.upper().replace("M", "e6").replace("K", "e3")))
    ctx = cl.create_some_context(interactive=False)
    queue = cl.CommandQueue(ctx)
    program = cl.Program(ctx, _source()).build()
    kernels = [cl.Kernel(program, f"k{k}") for k in range(len(KERNELS))]
    rng = np.random.default_rng(0)
    p = cla.to_device(queue, rng.random(n, dtype=np.float32))
    g = cla.to_device(queue, rng.random(n, dtype=np.float32))
    times: list[list[float]] = [[] for _ in KERNELS]
    for kernel in kernels:  # warm-up
        kernel(queue, (n,), None, p.data, g.data)
    queue.finish()
    for _ in range(args.rounds):  # round-robin, so drift hits every kernel alike
        for kernel, ts in zip(kernels, times, strict=True):
            start = time.perf_counter()
            kernel(queue, (n,), None, p.data, g.data)
            queue.finish()
            ts.append(time.perf_counter() - start)
    print(f"device: {queue.device.name.strip()}  size: {n:,} float32, 12 B/param")
    base = float(np.median(times[0]))
    for name, ts in zip(KERNELS, times, strict=True):
        med = float(np.median(ts))
        print(
            f"{name:16s} {med * 1e3:8.3f} ms  {med / n * 1e9:6.3f} ns/param"
            f"  {base / med:6.0%} of limit"
        )


if __name__ == "__main__":
    main()
