"""Train a small MLP on scikit-learn's 8x8 digits: ``python -m netcl_optim.examples.digits``.

The model (64 -> 128 -> 10, ReLU; :mod:`netcl_optim.examples._mlp`) runs its forward and
backward passes as OpenCL kernels on the default device; the loop is the reference "Full
Training Loop": ``AdamW`` + ``clip_grad_norm_device`` + ``CosineAnnealingLR`` stepped per
epoch. Options::

    --optimizer {sgd,momentum,adam,adamw,rmsprop}   (default adamw; per-optimizer default lr)
    --epochs N --lr LR --batch-size B --seed S
    --functional   the same run through the functional API:
                   chain(clip_by_global_norm(1.0), <optimizer>(cosine schedule)) + step
    --amp          float16 activations and activation gradients, the loss gradient scaled by
                   an AMPGradScaler (scale / unscale_ / step / update); reports skipped steps

``main(argv)`` returns the final metrics as a dict (tests call it).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyopencl.array as cla

import netcl_optim as no
from netcl_optim import (
    SGD,
    Adam,
    AdamW,
    AMPGradScaler,
    CosineAnnealingLR,
    Momentum,
    RMSProp,
    clip_grad_norm_device,
    cosine_decay_schedule,
)
from netcl_optim._device import allocator

from ._mlp import MLP, init_params

__all__ = [
    "MLP",
    "OPTIMIZERS",
    "epoch_schedule",
    "init_params",
    "load_digits_split",
    "main",
    "make_optimizer",
    "make_transform",
]

MAX_NORM = 1.0
WEIGHT_DECAY = 1e-2

# name -> (default lr, stateful optimizer factory, functional alias factory)
OPTIMIZERS: dict[str, tuple[float, Callable[..., Any], Callable[..., Any]]] = {
    "sgd": (0.1, lambda ps, lr: SGD(ps, lr=lr), lambda lr: no.sgd(lr)),
    "momentum": (
        0.02,
        lambda ps, lr: Momentum(ps, lr=lr, momentum=0.9),
        lambda lr: no.momentum(lr, momentum=0.9),
    ),
    "adam": (2e-3, lambda ps, lr: Adam(ps, lr=lr), lambda lr: no.adam(lr)),
    "adamw": (
        2e-3,
        lambda ps, lr: AdamW(ps, lr=lr, weight_decay=WEIGHT_DECAY),
        lambda lr: no.adamw(lr, weight_decay=WEIGHT_DECAY),
    ),
    "rmsprop": (1e-3, lambda ps, lr: RMSProp(ps, lr=lr), lambda lr: no.rmsprop(lr)),
}


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, bundled: no download) as ``(x_train,
    y_train, x_test, y_test)``: a fixed stratified split, float32 inputs standardised with
    the training set's mean and standard deviation, int32 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    x_tr, x_te = ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)
    return x_tr, y_tr, x_te, y_te


def make_optimizer(name: str, parameters: list[Any], lr: float | None = None) -> Any:
    """The stateful optimizer ``name`` over ``parameters`` (``lr``: the default if None)."""
    default, factory, _ = OPTIMIZERS[name]
    return factory(parameters, default if lr is None else lr)


def epoch_schedule(lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The functional twin of ``CosineAnnealingLR(opt, T_max=epochs)`` stepped once per
    epoch: a schedule of the step count that is constant within an epoch."""
    cosine = cosine_decay_schedule(lr, epochs)
    return lambda count: cosine(count // steps_per_epoch)


def make_transform(
    name: str, lr: float | None, epochs: int, steps_per_epoch: int
) -> no.GradientTransformation:
    """``chain(clip_by_global_norm(1.0), <name>(cosine schedule))``: the functional twin of
    the stateful loop (clip, step, per-epoch cosine annealing)."""
    default, _, alias = OPTIMIZERS[name]
    schedule = epoch_schedule(default if lr is None else lr, epochs, steps_per_epoch)
    return no.chain(no.clip_by_global_norm(MAX_NORM), alias(schedule))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m netcl_optim.examples.digits",
        description="Train a 64-128-10 MLP on scikit-learn's digits with OpenCL kernels.",
    )
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="default: per optimizer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="weights and shuffling")
    p.add_argument("--functional", action="store_true", help="use the functional API")
    p.add_argument("--amp", action="store_true", help="float16 activations + AMPGradScaler")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--data-parallel",
        action="store_true",
        help="split every batch across MPI ranks (run under mpiexec -n N python -m mpi4py)",
    )
    p.add_argument(
        "--zero",
        action="store_true",
        help="with --data-parallel: shard the optimizer state (ZeRO-1)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``test_accuracy``, per-epoch ``losses``, ``train_accuracies``
    and ``test_accuracies``, ``lrs``, ``step_ms``, ``skipped_steps``, ``device``...

    Raises:
      SystemExit: bad arguments (argparse).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.data_parallel:
        from .digits_dp import run

        return run(args)
    if args.zero:
        parser.error("--zero needs --data-parallel")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    if args.amp and args.functional:
        parser.error("--amp drives the stateful optimizers (AMPGradScaler); drop --functional")
    from tqdm.auto import tqdm

    queue = no.default_queue()
    x_tr, y_tr, x_te, y_te = load_digits_split()
    n = len(x_tr)
    bs = min(args.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    lr = OPTIMIZERS[args.optimizer][0] if args.lr is None else args.lr

    model = MLP(seed=args.seed, queue=queue, half_activations=args.amp)
    act = model.act_dtype
    pool = allocator(queue)
    # the shuffled epoch on the device: batch b is rows [b * bs, (b + 1) * bs)
    x_epoch = cla.empty(queue, x_tr.shape, act, allocator=pool)
    y_epoch = cla.empty(queue, y_tr.shape, np.int32, allocator=pool)
    losses = cla.empty(queue, (n,), np.float32, allocator=pool)
    correct = cla.empty(queue, (n,), np.int32, allocator=pool)
    x_test = no.to_device(x_te.astype(act), queue)

    scaler = None
    if args.functional:
        tx = make_transform(args.optimizer, lr, args.epochs, steps_per_epoch)
        params = no.pack(no.to_device(init_params(model.sizes, args.seed), queue))
        state = tx.init(params)
        grads = model.zero_grads_tree()
        schedule = epoch_schedule(lr, args.epochs, steps_per_epoch)
    else:
        opt = make_optimizer(args.optimizer, model.parameters(), lr)
        sched = CosineAnnealingLR(opt, T_max=args.epochs)
        if args.amp:  # growth every 50 finite steps (torch: 2000) to show the dynamics
            scaler = AMPGradScaler(init_scale=2.0**16, growth_interval=50)

    rng = np.random.default_rng(args.seed)
    history: dict[str, list[float]] = {
        "losses": [],
        "train_accuracies": [],
        "test_accuracies": [],
        "lrs": [],
        "scales": [],
    }
    step_times: list[float] = []
    skipped = 0
    t_start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{args.optimizer}", unit="epoch", disable=args.no_progress)
    for epoch in bar:
        perm = rng.permutation(n)
        x_epoch.set(x_tr[perm].astype(act))
        y_epoch.set(y_tr[perm])
        history["lrs"].append(schedule(epoch * steps_per_epoch) if args.functional else opt.lr)
        for start in range(0, n, bs):
            rows = min(bs, n - start)
            if args.functional:
                model.forward(x_epoch, start, rows, params=params)
                model.backward(y_epoch, grads=grads, losses=losses, correct=correct)
                queue.finish()
                t0 = time.perf_counter()
                params, state = no.step(tx, params, grads, state)
            elif scaler is not None:
                model.forward(x_epoch, start, rows)
                # the gradient of scaler.scale(loss) seeds the backward pass
                model.backward(
                    y_epoch, loss_scale=scaler.scale(1.0), losses=losses, correct=correct
                )
                queue.finish()
                t0 = time.perf_counter()
                scaler.unscale_(opt)  # true gradients (and a found-inf flag) for clipping
                clip_grad_norm_device(model.parameters(), MAX_NORM)
                before = scaler.get_scale()
                scaler.step(opt)  # skipped if a gradient is inf or NaN
                scaler.update()
                skipped += scaler.get_scale() < before
            else:
                model.forward(x_epoch, start, rows)
                model.backward(y_epoch, losses=losses, correct=correct)
                queue.finish()
                t0 = time.perf_counter()
                clip_grad_norm_device(model.parameters(), MAX_NORM)
                opt.step()
            queue.finish()
            step_times.append(time.perf_counter() - t0)
            if not args.functional:
                opt.zero_grad()
        if not args.functional:
            sched.step()
        history["losses"].append(float(losses.get().mean()))
        history["train_accuracies"].append(float(correct.get().mean()))
        pred = model.predict(x_test, params=params if args.functional else None)
        history["test_accuracies"].append(float((pred == y_te).mean()))
        if scaler is not None:
            history["scales"].append(scaler.get_scale())
        bar.set_postfix(
            loss=f"{history['losses'][-1]:.4f}",
            acc=f"{history['train_accuracies'][-1]:.3f}",
            test=f"{history['test_accuracies'][-1]:.3f}",
        )
    bar.close()
    seconds = time.perf_counter() - t_start

    device = queue.device.name.strip()
    result: dict[str, Any] = {
        "test_accuracy": history["test_accuracies"][-1],
        **history,
        # the first step builds the optimizer's kernels: left out of the mean
        "step_ms": 1e3 * float(np.mean(step_times[1:] or step_times)),
        "steps": len(step_times),
        "step_times": step_times,
        "skipped_steps": int(skipped),
        "seconds": seconds,
        "device": device,
        "optimizer": args.optimizer,
        "functional": bool(args.functional),
        "amp": bool(args.amp),
        "params": {k: v.get() for k, v in (params if args.functional else model.params()).items()},
    }
    api = "functional (chain + step)" if args.functional else "stateful"
    print(
        f"{args.optimizer}, {api}{', AMP' if args.amp else ''}: {args.epochs} epochs, "
        f"{len(step_times)} steps of batch {bs} in {seconds:.1f} s"
    )
    if scaler is not None:
        print(
            f"AMP: {skipped} of {len(step_times)} steps skipped (inf/NaN gradients), "
            f"final loss scale {scaler.get_scale():g}"
        )
    print(f"device: {device}")
    print(f"mean time per optimizer step (clip + update): {result['step_ms']:.3f} ms")
    print(f"test accuracy: {100 * result['test_accuracy']:.2f}% ({len(y_te)} images)")
    return result


if __name__ == "__main__":
    main()
