"""Why LAMB takes 3 passes over the params on PoCL's CPU device: the ways to sum a kernel's
output per block inside the kernel that writes it, against writing it and summing it in a
separate launch.

LAMB's trust ratio needs ``||u||`` per leaf of the Adam output ``u`` before it can apply
``u``. In 2 passes, the Adam kernel would also sum ``u^2`` per block; in 3 (what
``netcl_optim`` does), it writes ``u`` and a reduce launch reads it back. Each variant here
reads ``g`` and writes ``u = 1.5 g`` (8 B per element) over a 10M-element float32 array;
the ones that sum also write one partial per block (a few KB). The limit is the plain kernel.

    python benchmarks/bench_fused_sums.py [--n 10485760] [--rounds 30]

Measured on this machine class (2 cores, PoCL 7, median of 30): plain 2.5-3.3 ms; plain then
a separate reduce launch over ``u`` (the 3-pass design, 12 B) 4.2-4.6 ms; a work-group
barrier with one work-item adding the group's local array, 8-9 ms; a tree of barriers,
20+ ms; a loop of 16-256 strided elements per work-item (no barrier), 8-28 ms; a loop over
1024 consecutive elements per work-item in float8 vectors (local size 1), ~5 ms. The
separate launch is the fastest way to the sums on this device, so a 2-pass LAMB cannot reach
85% of its 2-pass limit here; on a GPU the barrier forms are cheap.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

L = 256  # work-items per work-group
K = 1024  # elements per work-item of the vector-loop variant


SOURCE = f"""
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
__kernel void plain(__global const float *restrict g, __global float *restrict u) {{
    const long i = get_global_id(0);
    u[i] = g[i] * 1.5f;
}}
__kernel void reduce(__global const float *restrict u, __global double *restrict part) {{
    /* the separate launch: one work-item per block of {L * 16} elements, float8 lanes */
    const long b = get_global_id(0) * {L * 16};
    float8 acc = (float8)(0);
    for (int k = 0; k < {L * 16}; k += 8) {{
        const float8 x = vload8(0, u + b + k);
        acc += x * x;
    }}
    part[get_global_id(0)] = (double)acc.s0 + acc.s1 + acc.s2 + acc.s3 + acc.s4 + acc.s5
                             + acc.s6 + acc.s7;
}}
__kernel void barrier_one(__global const float *restrict g, __global float *restrict u,
                          __global double *restrict part) {{
    __local float sq[{L}];
    const long i = get_global_id(0);
    const int l = get_local_id(0);
    const float x = g[i] * 1.5f;
    u[i] = x;
    sq[l] = x * x;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (l == 0) {{
        double s = 0;
        for (int k = 0; k < {L}; k++) s += sq[k];
        part[get_group_id(0)] = s;
    }}
}}
__kernel void barrier_tree(__global const float *restrict g, __global float *restrict u,
                           __global double *restrict part) {{
    __local float sq[{L}];
    const long i = get_global_id(0);
    const int l = get_local_id(0);
    const float x = g[i] * 1.5f;
    u[i] = x;
    sq[l] = x * x;
    for (int w = {L // 2}; w > 0; w >>= 1) {{
        barrier(CLK_LOCAL_MEM_FENCE);
        if (l < w) sq[l] += sq[l + w];
    }}
    if (l == 0) part[get_group_id(0)] = sq[0];
}}
__kernel void strided(__global const float *restrict g, __global float *restrict u,
                      __global double *restrict part, const int k_per) {{
    const long base = get_group_id(0) * {L} * (long)k_per;
    const int l = get_local_id(0);
    float acc = 0.0f;
    for (int k = 0; k < k_per; k++) {{
        const long i = base + (long)k * {L} + l;
        const float x = g[i] * 1.5f;
        u[i] = x;
        acc += x * x;
    }}
    part[get_global_id(0)] = acc;
}}
__kernel void vector_loop(__global const float *restrict g, __global float *restrict u,
                          __global double *restrict part) {{
    const long b = get_global_id(0) * {K};
    float8 acc = (float8)(0);
    for (int k = 0; k < {K}; k += 8) {{
        const float8 x = vload8(0, g + b + k) * 1.5f;
        vstore8(x, 0, u + b + k);
        acc += x * x;
    }}
    part[get_global_id(0)] = (double)acc.s0 + acc.s1 + acc.s2 + acc.s3 + acc.s4 + acc.s5
                             + acc.s6 + acc.s7;
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10 * 2**20)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    n = args.n - args.n % (L * 16 * K)  # every variant's blocks tile it exactly
    import netcl_optim as no

    queue = no.default_queue()
    prg = cl.Program(queue.context, SOURCE).build()
    k = {name: cl.Kernel(prg, name) for name in prg.kernel_names.split(";")}
    g = cla.to_device(queue, np.random.default_rng(0).random(n, np.float32))
    u = cla.empty_like(g)
    part = cla.empty(queue, (n // 16 + 1,), np.float64)
    a = (g.data, u.data)
    variants = {
        "plain (the limit, 8 B)": lambda: k["plain"](queue, (n,), (L,), *a),
        "plain + reduce launch (3-pass design, 12 B)": lambda: (
            k["plain"](queue, (n,), (L,), *a),
            k["reduce"](queue, (n // (L * 16),), (1,), u.data, part.data),
        ),
        "barrier, one work-item sums": lambda: k["barrier_one"](queue, (n,), (L,), *a, part.data),
        "barrier tree": lambda: k["barrier_tree"](queue, (n,), (L,), *a, part.data),
        **{
            f"strided loop, {kp} per work-item": (
                lambda kp=kp: k["strided"](queue, (n // kp,), (L,), *a, part.data, np.int32(kp))
            )
            for kp in (16, 64, 256)
        },
        f"vector loop, {K} per work-item": lambda: k["vector_loop"](
            queue, (n // K,), (1,), *a, part.data
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for f in variants.values():  # builds and warm-up
        f()
    queue.finish()
    for _ in range(args.rounds):  # interleaved
        for name, f in variants.items():
            t = time.perf_counter()
            f()
            queue.finish()
            times[name].append(time.perf_counter() - t)
    limit = statistics.median(times["plain (the limit, 8 B)"])
    print(f"n = {n:,} float32 elements, median of {args.rounds}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"  {name:<46} {ms:7.2f} ms  {100 * limit / (ms / 1e3):5.0f}% of the limit")


if __name__ == "__main__":
    main()
