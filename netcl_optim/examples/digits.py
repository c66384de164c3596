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
    --state-dtype {float32,bfloat16,float16}   optimizer state storage (default float32;
                   the math stays float32)
    --state-bits {32,8}   8: block-quantized 8-bit state in bitsandbytes' layout (default 32)
    --min-8bit-size N     with --state-bits 8: parameters of fewer elements keep float32
                   state (default 4096: only w1, 64x128, is quantized; 0: all of them)
                   The storage options go to the stateful optimizer; with --functional the
                   transform is wrapped in low_precision_state. Not with --data-parallel.

``main(argv)`` returns the final metrics as a dict (tests call it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyopencl.array as cla

import netcl_optim as no
from netcl_optim import (
    AMPGradScaler,
    CosineAnnealingLR,
    clip_grad_norm_device,
)
from netcl_optim._device import allocator

from ._digits_setup import (
    MAX_NORM,
    OPTIMIZERS,
    _parser,
    epoch_schedule,
    load_digits_split,
    make_optimizer,
    make_transform,
    state_storage,
)
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``test_accuracy``, per-epoch ``losses``, ``train_accuracies``
    and ``test_accuracies``, ``lrs``, ``step_ms``, ``skipped_steps``, ``device``...

    Raises:
      SystemExit: bad arguments (argparse).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    storage = state_storage(args.state_dtype, args.state_bits, args.min_8bit_size)
    if args.state_bits == 8 and args.state_dtype != "float32":
        parser.error("--state-bits 8 stores its own codes: drop --state-dtype")
    if args.min_8bit_size < 0:
        parser.error("--min-8bit-size must be >= 0")
    if args.data_parallel:
        if storage:
            parser.error("--state-dtype / --state-bits are not wired into --data-parallel")
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
        tx = make_transform(args.optimizer, lr, args.epochs, steps_per_epoch, **storage)
        params = no.pack(no.to_device(init_params(model.sizes, args.seed), queue))
        state = tx.init(params)
        grads = model.zero_grads_tree()
        schedule = epoch_schedule(lr, args.epochs, steps_per_epoch)
    else:
        opt = make_optimizer(args.optimizer, model.parameters(), lr, **storage)
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
        "state_dtype": args.state_dtype,
        "state_bits": args.state_bits,
        "min_8bit_size": args.min_8bit_size,
        "params": {k: v.get() for k, v in (params if args.functional else model.params()).items()},
    }
    api = "functional (chain + step)" if args.functional else "stateful"
    bits = f", 8-bit state (min size {args.min_8bit_size})" if args.state_bits == 8 else ""
    dtype = f", {args.state_dtype} state" if args.state_dtype != "float32" else ""
    print(
        f"{args.optimizer}, {api}{', AMP' if args.amp else ''}{dtype}{bits}: "
        f"{args.epochs} epochs, "
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
