"""Our GEMM (``netcl_optim/fusion/_gemm.py``) against numpy's host matmul (OpenBLAS), float32.

GFLOPS (``2 M N K / time``) per shape, ours and numpy's interleaved in one run, median and
best of ``--rounds``; ours is timed from the enqueue to ``queue.finish()`` (packing included),
numpy's call alone, per call over blocks of back-to-back calls, blocks of the two libraries
interleaved with pauses between them (:func:`timed_block`). The
``gram`` rows time :func:`gram` (``X X^T``, the upper triangle computed and mirrored) in
GFLOPS-equivalent (the full product's ``2 M^2 K`` flops), against numpy's ``x @ x.T`` (which
OpenBLAS also runs as a symmetric product); the ``X X^T`` rows above them are our ``gemm`` of
the same product. Then one Newton-Schulz iteration ``X' = a X + (b A + c A^2) X`` with
``A = X X^T`` (Muon's quintic coefficients): ours as 3 ``gemm`` calls, and as 2 ``gram`` + 1
``gemm`` (``A = gram(X)``, ``B = gram(A, alpha=c, beta=b, c=A)``: ``A`` is symmetric, so
``A A = A A^T``; ``X' = gemm(B, X, beta=a, c=X)``), ``b A`` and ``a X`` fused into the
epilogues through ``beta``; numpy's is the same 3 products plus the element-wise sums.

Before each timing it waits (``--quiet`` seconds at most) for idle CPUs: on a shared machine
other processes take the cores in bursts.

    python benchmarks/bench_gemm.py [--rounds 7] [--tune] [--quiet 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import pyopencl.array as cla

from netcl_optim._device import default_queue
from netcl_optim.fusion._gemm import gemm, gram

# (label, M, K, N, kind): "nn" a @ b, "nt" a @ b.T, "gram" gram(a) = a @ a.T, "gemm_nt" the same
# product by gemm (a, a, trans_b=True)
SHAPES = [
    ("256", 256, 256, 256, "nn"),
    ("512", 512, 512, 512, "nn"),
    ("768", 768, 768, 768, "nn"),
    ("1024", 1024, 1024, 1024, "nn"),
    ("2048", 2048, 2048, 2048, "nn"),
    ("768x768 @ 768x3072", 768, 768, 3072, "nn"),
    ("3072x768 @ 768x768", 3072, 768, 768, "nn"),
    ("X X^T, X 768x3072", 768, 3072, 768, "gemm_nt"),
    ("gram X X^T, 768x3072", 768, 3072, 768, "gram"),
    ("X X^T, X 1024x1024", 1024, 1024, 1024, "gemm_nt"),
    ("gram X X^T, 1024^2", 1024, 1024, 1024, "gram"),
    ("X X^T, X 512x512", 512, 512, 512, "gemm_nt"),
    ("gram X X^T, 512^2", 512, 512, 512, "gram"),
]
NS = (3.4445, -4.775, 2.0315)
PAUSE = 0.3  # seconds between timed blocks (longer than OpenBLAS's and PoCL's spinning)


def _cpu_idle() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)


def wait_for_quiet(max_wait: float, idle: float = 0.9, probe: float = 0.25) -> None:
    """Wait (at most ``max_wait`` seconds) until the CPUs were ``idle`` over ``probe``
    seconds: on a shared machine other processes take the cores in bursts."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        first = _cpu_idle()
        time.sleep(probe)
        second = _cpu_idle()
        if first is None or second is None:
            return
        if (second[0] - first[0]) >= idle * max(second[1] - first[1], 1):
            return


def timed_block(fn, finish=None, target: float = 0.25) -> float:
    """Seconds per call over a block of back-to-back calls (at least 3, about ``target``
    seconds; ours enqueued back to back and finished once, as in a Newton-Schulz loop), after
    an untimed call of the same; then a pause. The pause matters: OpenBLAS's threads spin for
    ~0.1 s after a call and PoCL's after a launch, and either took a core from the other
    library's next measurement when they followed each other at once (our 1024 product ran at
    90-125 GFLOPS right after numpy calls, 178 alone); a block amortises PoCL's worker threads
    waking up (a first launch after an idle pause ran at half speed)."""
    fn()
    if finish is not None:
        finish()
    start = time.perf_counter()
    fn()
    if finish is not None:
        finish()
    one = time.perf_counter() - start
    calls = max(3, int(target / max(one, 1e-6)))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if finish is not None:
        finish()
    elapsed = (time.perf_counter() - start) / calls
    time.sleep(PAUSE)
    return elapsed


def bench_shapes(queue, rounds: int, tune: bool, quiet: float) -> None:
    rng = np.random.default_rng(0)
    cases = []
    for label, m, k, n, kind in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        da, db = cla.to_device(queue, a), cla.to_device(queue, b)
        out = cla.empty(queue, (m, n), np.float32)
        if kind == "gram":

            def ours(da=da, out=out):
                gram(queue, da, out, tune=tune)
        else:

            def ours(da=da, db=db, out=out, kind=kind):
                if kind == "nn":
                    gemm(queue, da, db, out, tune=tune)
                else:
                    gemm(queue, da, da, out, trans_b=True, tune=tune)

        def host(a=a, b=b, kind=kind):
            return a @ b if kind == "nn" else a @ a.T

        ours()  # build (and tune)
        queue.finish()
        err = np.abs(out.get() - host()).max() / max(np.abs(host()).max(), 1e-30)
        cases.append((label, 2.0 * m * n * k, ours, host, [], [], err))
    for _ in range(rounds):
        for _label, _flops, ours, host, t_ours, t_host, _err in cases:
            wait_for_quiet(quiet)
            t_ours.append(timed_block(ours, queue.finish))
            t_host.append(timed_block(host))
    print(
        f"{'shape':<22} {'ours GFLOPS':>12} {'numpy GFLOPS':>13} {'ratio':>7}"
        f" {'best ours':>10} {'best numpy':>11} {'ratio':>7} {'rel err':>9}"
    )
    for label, flops, _o, _h, t_ours, t_host, err in cases:
        g_ours = flops / statistics.median(t_ours) / 1e9
        g_host = flops / statistics.median(t_host) / 1e9
        b_ours, b_host = flops / min(t_ours) / 1e9, flops / min(t_host) / 1e9
        print(
            f"{label:<22} {g_ours:>12.1f} {g_host:>13.1f} {g_ours / g_host:>7.2f}"
            f" {b_ours:>10.1f} {b_host:>11.1f} {b_ours / b_host:>7.2f} {err:>9.1e}"
        )


def newton_schulz_gemm(queue, x, a_buf, b_buf, out, tune: bool):
    a, b, c = NS
    gemm(queue, x, x, a_buf, trans_b=True, tune=tune)  # A = X X^T
    gemm(queue, a_buf, a_buf, b_buf, alpha=c, beta=b, c=a_buf, tune=tune)  # B = b A + c A A
    gemm(queue, b_buf, x, out, alpha=1.0, beta=a, c=x, tune=tune)  # X' = a X + B X


def newton_schulz_gram(queue, x, a_buf, b_buf, out, tune: bool):
    a, b, c = NS
    gram(queue, x, a_buf, tune=tune)  # A = X X^T
    gram(queue, a_buf, b_buf, alpha=c, beta=b, c=a_buf, tune=tune)  # B = b A + c A A^T
    gemm(queue, b_buf, x, out, alpha=1.0, beta=a, c=x, tune=tune)  # X' = a X + B X


def newton_schulz_host(x):
    a, b, c = NS
    big_a = x @ x.T
    return a * x + (b * big_a + c * (big_a @ big_a)) @ x


def bench_newton_schulz(queue, rounds: int, tune: bool, quiet: float) -> None:
    rng = np.random.default_rng(1)
    print(
        f"\n{'Newton-Schulz iteration':<24} {'3 gemm ms':>10} {'gram ms':>9} {'numpy ms':>9}"
        f" {'rel err':>9}"
    )
    for m, n in [(512, 512), (1024, 1024), (768, 3072)]:
        x = rng.standard_normal((m, n)).astype(np.float32)
        x /= np.linalg.norm(x)
        dx = cla.to_device(queue, x)
        a_buf = cla.empty(queue, (m, m), np.float32)
        b_buf = cla.empty(queue, (m, m), np.float32)
        out = cla.empty(queue, (m, n), np.float32)
        ref = newton_schulz_host(x.astype(np.float64))
        errs = []
        for variant in (newton_schulz_gemm, newton_schulz_gram):
            variant(queue, dx, a_buf, b_buf, out, tune)
            errs.append(np.abs(out.get() - ref).max() / np.abs(ref).max())
        runs = [
            partial(newton_schulz_gemm, queue, dx, a_buf, b_buf, out, tune),
            partial(newton_schulz_gram, queue, dx, a_buf, b_buf, out, tune),
            partial(newton_schulz_host, x),
        ]
        times = [[], [], []]
        for _ in range(rounds):
            wait_for_quiet(quiet)
            for run, t in zip(runs, times, strict=True):
                t.append(timed_block(run, None if run.func is newton_schulz_host else queue.finish))
        ms = [1e3 * statistics.median(t) for t in times]
        err = max(errs)
        print(f"{f'{m}x{n}':<24} {ms[0]:>10.1f} {ms[1]:>9.1f} {ms[2]:>9.1f} {err:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tune", action="store_true", help="let gemm time its tiles once")
    parser.add_argument(
        "--quiet", type=float, default=20.0,
        help="seconds to wait at most, before each round, for idle CPUs (0: never wait)",
    )  # fmt: skip
    args = parser.parse_args()
    queue = default_queue()
    print(f"device: {queue.device.name}; median and best of {args.rounds} interleaved rounds\n")
    bench_shapes(queue, args.rounds, args.tune, args.quiet)
    bench_newton_schulz(queue, args.rounds, args.tune, args.quiet)


if __name__ == "__main__":
    main()
