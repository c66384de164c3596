"""Training quality with low-precision optimizer state: AdamW with float32, bfloat16,
float16 and 8-bit (block-quantized, bitsandbytes layout) state, side by side.

Two tasks, both the digits example's loop (``netcl_optim.examples.digits``: the OpenCL MLP,
``AdamW(lr, weight_decay=1e-2)``, ``clip_grad_norm_device(1.0)``, ``CosineAnnealingLR``
stepped per epoch, the same seed for weights and shuffling in every run):

* ``digits``: the example itself (64 -> 128 -> 10, 20 epochs of batch 32, lr 2e-3), seeds
  0 (the example's default; its numbers equal ``python -m netcl_optim.examples.digits
  --state-... ``) and 1, 2 for a mean. Only w1 (64x128 = 8192 elements) has at least
  ``min_8bit_size`` = 4096 elements; the "8-bit, min size 0" row quantizes every parameter.
* ``clusters``: 64 -> 512 -> 10 on 50,000 synthetic samples (10,000 more for the test): a
  fixed Gaussian mixture of 40 centers in 64 dimensions, 4 per class, noise 2.5 times the
  centers' spread (:func:`cluster_data`; float32 reaches ~78% test accuracy in 4 epochs,
  still improving); 4 epochs of batch 128, lr 2e-3. Here w1 (32768 elements) and w2
  (5120) are both 8-bit.

"state B/param": the optimizer's device state bytes (after training) over the parameter
count; 8-bit counts codes, per-block absmax and the float32 state of small parameters (the
two 256-entry float32 quantization maps are host constants, left out).

Usage: ``python benchmarks/train_quality.py [--quick]``; writes
``benchmarks/results/train_quality.txt`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import numpy as np
import pyopencl.array as cla

import netcl_optim as no
from netcl_optim import AdamW, CosineAnnealingLR, clip_grad_norm_device
from netcl_optim._device import allocator
from netcl_optim.examples._digits_setup import MAX_NORM, WEIGHT_DECAY, load_digits_split
from netcl_optim.examples._mlp import MLP

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# label -> AdamW storage keywords
VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16": {"state_dtype": "bfloat16"},
    "float16": {"state_dtype": "float16"},
    "8-bit": {"state_bits": 8},
    "8-bit, min size 0": {"state_bits": 8, "min_8bit_size": 0},
}


def cluster_data(
    n_train: int = 50_000, n_test: int = 10_000, sigma: float = 2.5, seed: int = 1234
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A Gaussian mixture: 40 fixed standard-normal centers in 64 dimensions, 4 per class
    (class = center index mod 10, so no class is linearly separable), each sample a center
    plus ``sigma`` times standard-normal noise, scaled to unit variance per feature."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, 64))
    k = rng.integers(0, 40, n_train + n_test)
    x = (centers[k] + sigma * rng.standard_normal((len(k), 64))) / np.sqrt(1 + sigma**2)
    x, y = x.astype(np.float32), (k % 10).astype(np.int32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def state_bytes(opt: Any) -> int:
    """Device bytes of ``opt``'s state (views count their own size)."""
    return sum(
        int(v.nbytes) for s in opt.state.values() for v in s.values() if isinstance(v, cla.Array)
    )


def train(
    data: tuple[np.ndarray, ...],
    sizes: tuple[int, int, int],
    storage: dict[str, Any],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """The digits example's stateful loop (see the module docstring) on ``data``."""
    x_tr, y_tr, x_te, y_te = data
    queue = no.default_queue()
    n = len(x_tr)
    bs = min(batch_size, n)
    model = MLP(sizes, seed=seed, queue=queue)
    pool = allocator(queue)
    x_epoch = cla.empty(queue, x_tr.shape, np.float32, allocator=pool)
    y_epoch = cla.empty(queue, y_tr.shape, np.int32, allocator=pool)
    losses = cla.empty(queue, (n,), np.float32, allocator=pool)
    correct = cla.empty(queue, (n,), np.int32, allocator=pool)
    x_test = no.to_device(x_te, queue)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, **storage)
    sched = CosineAnnealingLR(opt, T_max=epochs)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(n)
        x_epoch.set(x_tr[perm])
        y_epoch.set(y_tr[perm])
        for start in range(0, n, bs):
            model.forward(x_epoch, start, min(bs, n - start))
            model.backward(y_epoch, losses=losses, correct=correct)
            clip_grad_norm_device(model.parameters(), MAX_NORM)
            opt.step()
            opt.zero_grad()
        sched.step()
        history.append(float(losses.get().mean()))
    acc = float((model.predict(x_test) == y_te).mean())
    seconds = time.perf_counter() - t0
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    return {
        "final_train_loss": history[-1],
        "train_losses": history,
        "train_accuracy": float(correct.get().mean()),
        "test_accuracy": acc,
        "state_bytes": state_bytes(opt),
        "params": n_params,
        "state_bytes_per_param": state_bytes(opt) / n_params,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 digits seed, 5,000 clusters samples")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    seeds = (0,) if args.quick else (0, 1, 2)
    digits = load_digits_split()
    n_clusters = 5_000 if args.quick else 50_000
    clusters = cluster_data(n_clusters)
    tasks = {
        "digits": dict(
            data=digits, sizes=(64, 128, 10), epochs=20, batch_size=32, lr=2e-3, seeds=seeds
        ),
        "clusters": dict(
            data=clusters, sizes=(64, 512, 10), epochs=4, batch_size=128, lr=2e-3, seeds=(0,)
        ),
    }
    results: dict[str, Any] = {"device": no.default_queue().device.name.strip(), "tasks": {}}
    rows: list[str] = []
    header = (
        f"{'task':<8} {'state':<18} {'train loss':>10} {'test acc %':>10} "
        f"{'vs fp32':>8} {'mean acc %':>10} {'state B/param':>13} {'s/run':>6}"
    )
    for task, cfg in tasks.items():
        seeds_t = cfg.pop("seeds")
        variants = (
            VARIANTS
            if task == "digits"
            else {k: VARIANTS[k] for k in ("float32", "bfloat16", "8-bit")}
        )
        out: dict[str, Any] = {}
        for label, storage in variants.items():
            runs = [train(**cfg, storage=storage, seed=s) for s in seeds_t]
            out[label] = {"storage": storage, "seeds": list(seeds_t), "runs": runs}
            print(f"{task} {label}: {[round(100 * r['test_accuracy'], 2) for r in runs]}")
        base = out["float32"]["runs"][0]["test_accuracy"]
        for label, o in out.items():
            r0 = o["runs"][0]
            mean = float(np.mean([r["test_accuracy"] for r in o["runs"]]))
            o["mean_test_accuracy"] = mean
            rows.append(
                f"{task:<8} {label:<18} {r0['final_train_loss']:>10.4f} "
                f"{100 * r0['test_accuracy']:>10.2f} "
                f"{100 * (r0['test_accuracy'] - base):>+8.2f} {100 * mean:>10.2f} "
                f"{r0['state_bytes_per_param']:>13.3f} {r0['seconds']:>6.1f}"
            )
        results["tasks"][task] = {
            "sizes": cfg["sizes"],
            "epochs": cfg["epochs"],
            "batch_size": cfg["batch_size"],
            "lr": cfg["lr"],
            "train_samples": len(cfg["data"][0]),
            "test_samples": len(cfg["data"][2]),
            "variants": out,
        }
    n_d, n_t = len(digits[2]), len(clusters[2])
    table = "\n".join(
        [
            f"AdamW optimizer-state precision vs training quality ({results['device']})",
            f"digits: 64-128-10 MLP, 20 epochs, batch 32, seed 0 ({n_d} test images; "
            f"'mean acc' over seeds {', '.join(map(str, seeds))})",
            f"clusters: 64-512-10 MLP, {len(clusters[0])} synthetic samples (Gaussian mixture), "
            f"4 epochs, batch 128, seed 0 ({n_t} test samples)",
            "",
            header,
            "-" * len(header),
            *rows,
        ]
    )
    results["table"] = table
    results["seconds"] = time.perf_counter() - t_all
    print(table)
    print(f"total {results['seconds']:.0f} s")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "train_quality.txt").write_text(table + "\n")
        (RESULTS / "train_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
