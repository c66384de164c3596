"""What one launch per leaf costs on PoCL, and what takes some of that cost away.

Times a limit kernel (read g and the roles, add ``a * g``, write them back in place) over the
160-leaf tree of ``bench_step.py``, the tree packed in one buffer per role, launched six ways,
interleaved in round-robin blocks:

- ``one launch``: the whole tree at once (the packed step);
- ``per leaf, kernel call``: one ``Kernel.__call__`` per leaf, every argument set each time,
  on the in-order queue (how the library launched separate arrays before the side queue);
- ``per leaf, args preset``: one kernel object per leaf, arguments set once, then only
  ``enqueue_nd_range_kernel``: the least Python a launch can cost;
- ``per leaf, out-of-order, events``: the launches on an out-of-order queue, ordered after the
  main queue's earlier work and before its later work by a marker and barriers, so that the
  host never waits: the commands then wait on an event when enqueued;
- ``per leaf, out-of-order, host waits``: the host waits for the main queue first, so every
  command is ready when enqueued, and for the out-of-order queue after;
- ``..., call``: the same with ``Kernel.__call__`` (what ``netcl_optim`` does on a CPU
  device, with a barrier on the main queue instead of the final wait:
  ``netcl_optim.fusion._launch.launch_all``).

Every per-leaf variant moves the same bytes from the same packed buffers as ``one launch``:
the difference is the commands' own cost.

    python benchmarks/per_leaf_launches.py              # Adam's bytes (3 roles besides g)
    python benchmarks/per_leaf_launches.py --roles 1    # plain SGD's bytes
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyopencl as cl

import netcl_optim as no
from netcl_optim._packing import layout


def _gpt_shapes() -> list:
    path = Path(__file__).with_name("bench_step.py")
    spec = importlib.util.spec_from_file_location("_bench_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module.gpt_shapes()


def limit_source(roles: int) -> str:
    """Read g and ``roles`` arrays, write the roles back: (1 + 2 roles) * 4 bytes a param."""
    args = ",\n    ".join(
        ["__global const float *restrict g, const long g_off"]
        + [f"__global float *restrict r{k}, const long r{k}_off" for k in range(roles)]
        + ["const float a"]
    )
    body = "\n".join(f"    r{k}[r{k}_off + i] += x;" for k in range(roles))
    return (
        f"__kernel void leaf_limit(\n    {args})\n{{\n"
        "    const size_t i = get_global_id(0);\n"
        "    const float x = a * g[g_off + i];\n"
        f"{body}\n}}\n"
    )


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Print the table; return the seconds per step of each variant, per round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roles", type=int, default=3, help="arrays besides g (Adam: p, m, v)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--leaves", type=int, default=160, help="use the tree's first N leaves")
    args = parser.parse_args(argv)
    queue = no.default_queue()
    ctx = queue.context
    shapes = _gpt_shapes()[: args.leaves]
    lay = layout(tuple(shapes), np.dtype(np.float32))
    blocks = [lay.allocate(queue) for _ in range(1 + args.roles)]
    for block in blocks:
        block.fill(queue, 0.5)
    starts = np.concatenate([[0], np.cumsum(lay.sizes)[:-1]]).astype(int)

    program = cl.Program(ctx, limit_source(args.roles)).build()
    arg_dtypes = [None, np.int64] * (1 + args.roles) + [np.float32]
    a = np.float32(1e-3)

    def arguments(start: int) -> list:
        out: list = []
        for block in blocks:
            out += [block.buffer, block.offset // 4 + start]
        return out

    def kernel() -> cl.Kernel:
        k = cl.Kernel(program, "leaf_limit")
        k.set_scalar_arg_dtypes(arg_dtypes)
        return k

    leaves = [(int(s), int(n)) for s, n in zip(starts, lay.sizes, strict=True) if n]
    shared = kernel()
    preset = []
    for start, n in leaves:
        k = kernel()
        k.set_args(*arguments(start), a)
        preset.append((k, n))
    whole = kernel()
    whole.set_args(*arguments(0), a)
    ooo = cl.CommandQueue(
        ctx, queue.device, properties=cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    )

    def enqueue_preset(q: cl.CommandQueue) -> None:
        for k, n in preset:
            cl.enqueue_nd_range_kernel(q, k, (n,), None)

    def one_launch() -> None:
        cl.enqueue_nd_range_kernel(queue, whole, (lay.total,), None)

    def kernel_call() -> None:
        for start, n in leaves:
            shared(queue, (n,), None, *arguments(start), a)

    def args_preset() -> None:
        enqueue_preset(queue)

    def ooo_events() -> None:
        cl.enqueue_barrier(ooo, wait_for=[cl.enqueue_marker(queue)])
        enqueue_preset(ooo)
        cl.enqueue_barrier(queue, wait_for=[cl.enqueue_marker(ooo)])
        ooo.flush()

    def ooo_host_waits() -> None:
        queue.finish()
        enqueue_preset(ooo)
        ooo.finish()

    def ooo_host_waits_call() -> None:
        queue.finish()
        for start, n in leaves:
            shared(ooo, (n,), None, *arguments(start), a)
        ooo.finish()

    variants: dict[str, Callable[[], None]] = {
        "one launch": one_launch,
        "per leaf, kernel call": kernel_call,
        "per leaf, args preset": args_preset,
        "per leaf, out-of-order, events": ooo_events,
        "per leaf, out-of-order, host waits": ooo_host_waits,
        "per leaf, out-of-order, host waits, call": ooo_host_waits_call,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()
    queue.finish()
    calls = 5
    for _ in range(args.rounds):
        for name, run in variants.items():
            queue.finish()
            t = time.perf_counter()
            for _ in range(calls):
                run()
            queue.finish()
            ooo.finish()
            times[name].append((time.perf_counter() - t) / calls)
    base = statistics.median(times["one launch"])
    bpp = 4 * (1 + 2 * args.roles)
    print(
        f"limit kernel over {len(leaves)} leaves ({lay.total:,} float32 params, {bpp} B/param), "
        f"{args.rounds} rounds"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        extra = (med - base) / len(leaves) * 1e6 if name != "one launch" else 0.0
        print(
            f"  {name:42s} median {med * 1e3:7.3f} ms  {bpp * lay.total / med / 1e9:6.1f} GB/s"
            f"  {100 * base / med:5.1f}% of one launch  {extra:+6.1f} us a leaf"
        )
    return times


if __name__ == "__main__":
    main()
