"""Our GEMM (``netcl_optim/fusion/_gemm.py``) against numpy's host matmul (OpenBLAS), float32.

GFLOPS (``2 M N K / time``) per shape, ours and numpy's interleaved in one run, median of
``--rounds``; ours is timed from the enqueue to ``queue.finish()`` (packing included), numpy's
call alone. Then one Newton-Schulz iteration ``X' = a X + (b A + c A^2) X`` with ``A = X X^T``
(Muon's quintic coefficients): ours is 3 GEMM launches (plus 3 packs) with ``b A`` and ``a X``
fused into the epilogues through ``beta``; numpy's is the same 3 products plus the element-wise
sums.

    python benchmarks/bench_gemm.py [--rounds 5] [--tune]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import pyopencl.array as cla

from netcl_optim._device import default_queue
from netcl_optim.fusion._gemm import gemm

# (label, M, K, N, trans_b)
SHAPES = [
    ("256", 256, 256, 256, False),
    ("512", 512, 512, 512, False),
    ("1024", 1024, 1024, 1024, False),
    ("2048", 2048, 2048, 2048, False),
    ("768x768 @ 768x3072", 768, 768, 3072, False),
    ("3072x768 @ 768x768", 3072, 768, 768, False),
    ("X X^T, X 768x3072", 768, 3072, 768, True),
]
NS = (3.4445, -4.775, 2.0315)
PAUSE = 0.1  # seconds between timed calls


def _timed(fn, finish=None) -> float:
    """Seconds of one call, then a pause (untimed): OpenBLAS's threads spin for a while after
    a call, which took the cores from the next measurement when calls were back to back."""
    start = time.perf_counter()
    fn()
    if finish is not None:
        finish()
    elapsed = time.perf_counter() - start
    time.sleep(PAUSE)
    return elapsed


def bench_shapes(queue, rounds: int, tune: bool) -> None:
    rng = np.random.default_rng(0)
    cases = []
    for label, m, k, n, trans_b in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
        da, db = cla.to_device(queue, a), cla.to_device(queue, b)
        out = cla.empty(queue, (m, n), np.float32)

        def ours(da=da, db=db, out=out, trans_b=trans_b):
            gemm(queue, da, db, out, trans_b=trans_b, tune=tune)

        def host(a=a, b=b, trans_b=trans_b):
            return a @ (b.T if trans_b else b)

        ours()  # build (and tune)
        queue.finish()
        err = np.abs(out.get() - host()).max() / max(np.abs(host()).max(), 1e-30)
        cases.append((label, 2.0 * m * n * k, ours, host, [], [], err))
    for _ in range(rounds):
        for _label, _flops, ours, host, t_ours, t_host, _err in cases:
            t_ours.append(_timed(ours, queue.finish))
            t_host.append(_timed(host))
    print(f"{'shape':<22} {'ours GFLOPS':>12} {'numpy GFLOPS':>13} {'ratio':>7} {'rel err':>9}")
    for label, flops, _o, _h, t_ours, t_host, err in cases:
        g_ours = flops / statistics.median(t_ours) / 1e9
        g_host = flops / statistics.median(t_host) / 1e9
        print(f"{label:<22} {g_ours:>12.1f} {g_host:>13.1f} {g_ours / g_host:>7.2f} {err:>9.1e}")


def newton_schulz_ours(queue, x, a_buf, b_buf, out, tune: bool):
    a, b, c = NS
    gemm(queue, x, x, a_buf, trans_b=True, tune=tune)  # A = X X^T
    gemm(queue, a_buf, a_buf, b_buf, alpha=c, beta=b, c=a_buf, tune=tune)  # B = b A + c A A
    gemm(queue, b_buf, x, out, alpha=1.0, beta=a, c=x, tune=tune)  # X' = a X + B X


def newton_schulz_host(x):
    a, b, c = NS
    big_a = x @ x.T
    return a * x + (b * big_a + c * (big_a @ big_a)) @ x


def bench_newton_schulz(queue, rounds: int, tune: bool) -> None:
    rng = np.random.default_rng(1)
    print(f"\n{'Newton-Schulz iteration':<24} {'ours ms':>9} {'numpy ms':>9} {'rel err':>9}")
    for m, n in [(1024, 1024), (768, 3072)]:
        x = rng.standard_normal((m, n)).astype(np.float32)
        x /= np.linalg.norm(x)
        dx = cla.to_device(queue, x)
        a_buf = cla.empty(queue, (m, m), np.float32)
        b_buf = cla.empty(queue, (m, m), np.float32)
        out = cla.empty(queue, (m, n), np.float32)
        newton_schulz_ours(queue, dx, a_buf, b_buf, out, tune)
        ref = newton_schulz_host(x.astype(np.float64))
        err = np.abs(out.get() - ref).max() / np.abs(ref).max()
        t_ours, t_host = [], []
        ours = partial(newton_schulz_ours, queue, dx, a_buf, b_buf, out, tune)
        host = partial(newton_schulz_host, x)
        for _ in range(rounds):
            t_ours.append(_timed(ours, queue.finish))
            t_host.append(_timed(host))
        ms_ours, ms_host = 1e3 * statistics.median(t_ours), 1e3 * statistics.median(t_host)
        print(f"{f'{m}x{n}':<24} {ms_ours:>9.1f} {ms_host:>9.1f} {err:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tune", action="store_true", help="let gemm time its tiles once")
    args = parser.parse_args()
    queue = default_queue()
    print(f"device: {queue.device.name}; median of {args.rounds} interleaved rounds\n")
    bench_shapes(queue, args.rounds, args.tune)
    bench_newton_schulz(queue, args.rounds, args.tune)


if __name__ == "__main__":
    main()
