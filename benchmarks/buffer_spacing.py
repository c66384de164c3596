"""Why large packed buffers are staggered (``netcl_optim._packing.stagger_bytes``).

Times the in-place limit kernel of an Adam step (read g, p, m, v; write p, m, v) over four
buffers allocated three ways, interleaved in round-robin blocks:

- ``plain``: ``cl.Buffer`` of exactly ``4 n`` bytes (where they land depends on n);
- ``pool bins``: ``4 n`` rounded up to the memory pool's bin size, as pooled buffers are: the
  buffers then lie a round distance apart;
- ``pool bins, staggered``: the same buffers, each read from the offset ``stagger_bytes`` gives.

    python benchmarks/buffer_spacing.py            # 50M params
    python benchmarks/buffer_spacing.py --n 10000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyopencl as cl

import netcl_optim as no
from netcl_optim import _packing
from netcl_optim.fusion._programs import build

SOURCE = """
__kernel void adam_limit(__global const float *restrict g, const long g_off,
                         __global float *restrict p, const long p_off,
                         __global float *restrict m, const long m_off,
                         __global float *restrict v, const long v_off, const float a)
{
    const size_t i = get_global_id(0);
    const float x = a * g[g_off + i];
    p[p_off + i] += x;
    m[m_off + i] += x;
    v[v_off + i] += x;
}
"""


def pool_bin_bytes(nbytes: int) -> int:
    """The size pyopencl's MemoryPool hands out for ``nbytes`` (its bin's size)."""
    pool = cl.tools.MemoryPool(cl.tools.ImmediateAllocator(no.default_queue()))
    return pool.alloc_size(pool.bin_number(nbytes))


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Print the table; return the seconds per call of each layout, per round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000_000, help="float32 params")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    n, queue = args.n, no.default_queue()
    arg_dtypes = [None, np.int64] * 4 + [np.float32]
    kernel = build(queue.context, SOURCE, "adam_limit", arg_dtypes)

    def buffers(nbytes: int) -> list[cl.Buffer]:
        out = [cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, nbytes) for _ in range(4)]
        for b in out:
            cl.enqueue_fill_buffer(queue, b, np.float32(0), 0, nbytes // 4 * 4)
        return out

    shift = 4096  # room for any stagger offset
    layouts = {
        "plain": (buffers(4 * n), [0] * 4),
        "pool bins": (buffers(pool_bin_bytes(4 * n)), [0] * 4),
        "pool bins, staggered": (
            buffers(pool_bin_bytes(4 * n + shift)),
            [_packing.stagger_bytes(max(4 * n, _packing.STAGGER_FROM_BYTES)) for _ in range(4)],
        ),
    }

    def run(name: str) -> None:
        bufs, offsets = layouts[name]
        pairs = [x for b, off in zip(bufs, offsets, strict=True) for x in (b, off // 4)]
        kernel(queue, (n,), None, *pairs, np.float32(1e-3))

    times: dict[str, list[float]] = {name: [] for name in layouts}
    for name in layouts:
        run(name)
    queue.finish()
    calls = max(1, int(2e8 // n))
    for _ in range(args.rounds):
        for name in layouts:
            t = time.perf_counter()
            for _ in range(calls):
                run(name)
            queue.finish()
            times[name].append((time.perf_counter() - t) / calls)
    base = statistics.median(times["plain"])
    print(f"Adam-step limit kernel, {n:,} float32 params, 28 B/param, {args.rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        gbs = 28 * n / med / 1e9
        print(
            f"  {name:22s} median {med * 1e3:7.2f} ms  min {min(ts) * 1e3:7.2f} ms  "
            f"{gbs:6.1f} GB/s  {100 * base / med:5.1f}% of plain"
        )
    return times


if __name__ == "__main__":
    main()
