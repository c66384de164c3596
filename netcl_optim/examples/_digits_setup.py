"""What the digits example's single-process and data-parallel runs share: the data split,
the optimizers by name, the learning-rate schedule and the command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, cast

import numpy as np

import netcl_optim as no
from netcl_optim import SGD, Adam, AdamW, Momentum, RMSProp, cosine_decay_schedule

MAX_NORM = 1.0
WEIGHT_DECAY = 1e-2

# name -> (default lr, stateful optimizer factory (params, lr, **storage keywords),
# functional alias factory (lr))
OPTIMIZERS: dict[str, tuple[float, Callable[..., Any], Callable[..., Any]]] = {
    "sgd": (0.1, lambda ps, lr, **kw: SGD(ps, lr=lr, **kw), lambda lr: no.sgd(lr)),
    "momentum": (
        0.02,
        lambda ps, lr, **kw: Momentum(ps, lr=lr, momentum=0.9, **kw),
        lambda lr: no.momentum(lr, momentum=0.9),
    ),
    "adam": (2e-3, lambda ps, lr, **kw: Adam(ps, lr=lr, **kw), lambda lr: no.adam(lr)),
    "adamw": (
        2e-3,
        lambda ps, lr, **kw: AdamW(ps, lr=lr, weight_decay=WEIGHT_DECAY, **kw),
        lambda lr: no.adamw(lr, weight_decay=WEIGHT_DECAY),
    ),
    "rmsprop": (
        1e-3,
        lambda ps, lr, **kw: RMSProp(ps, lr=lr, **kw),
        lambda lr: no.rmsprop(lr),
    ),
}


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, bundled: no download) as ``(x_train,
    y_train, x_test, y_test)``: a fixed stratified split, float32 inputs standardised with
    the training set's mean and standard deviation, int32 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits: Any = load_digits()  # (a Bunch)
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = cast(
        list[np.ndarray],
        train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y),
    )
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    x_tr, x_te = ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)
    return x_tr, y_tr, x_te, y_te


STATE_DTYPES = ("float32", "bfloat16", "float16")
STATE_BITS = (32, 8)
MIN_8BIT_SIZE = 4096


def state_storage(
    state_dtype: str | None = None, state_bits: int = 32, min_8bit_size: int = MIN_8BIT_SIZE
) -> dict[str, Any]:
    """The optimizer-state storage keywords (``state_dtype``, ``state_bits``,
    ``min_8bit_size``) that differ from the float32 default, for a stateful optimizer or
    :func:`netcl_optim.low_precision_state`; ``{}`` for float32 state."""
    storage: dict[str, Any] = {}
    if state_dtype not in (None, "float32"):
        storage["state_dtype"] = state_dtype
    if state_bits != 32:
        storage["state_bits"] = state_bits
        if min_8bit_size != MIN_8BIT_SIZE:
            storage["min_8bit_size"] = min_8bit_size
    return storage


def make_optimizer(
    name: str, parameters: list[Any], lr: float | None = None, **storage: Any
) -> Any:
    """The stateful optimizer ``name`` over ``parameters`` (``lr``: the default if None).
    ``storage``: ``state_dtype`` / ``state_bits`` / ``min_8bit_size`` (see
    :func:`state_storage`), passed to the optimizer."""
    default, factory, _ = OPTIMIZERS[name]
    return factory(parameters, default if lr is None else lr, **storage)


def epoch_schedule(lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The functional twin of ``CosineAnnealingLR(opt, T_max=epochs)`` stepped once per
    epoch: a schedule of the step count that is constant within an epoch."""
    cosine = cosine_decay_schedule(lr, epochs)
    return lambda count: cosine(count // steps_per_epoch)


def make_transform(
    name: str, lr: float | None, epochs: int, steps_per_epoch: int, **storage: Any
) -> no.GradientTransformation:
    """``chain(clip_by_global_norm(1.0), <name>(cosine schedule))``: the functional twin of
    the stateful loop (clip, step, per-epoch cosine annealing). ``storage`` (see
    :func:`state_storage`): the transform wrapped in :func:`netcl_optim.low_precision_state`."""
    default, _, alias = OPTIMIZERS[name]
    schedule = epoch_schedule(default if lr is None else lr, epochs, steps_per_epoch)
    tx = no.chain(no.clip_by_global_norm(MAX_NORM), alias(schedule))
    return no.low_precision_state(tx, **storage) if storage else tx


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
        "--state-dtype",
        choices=STATE_DTYPES,
        default="float32",
        help="storage of the optimizer state (math stays float32)",
    )
    p.add_argument(
        "--state-bits",
        type=int,
        choices=STATE_BITS,
        default=32,
        help="8: block-quantized 8-bit state (bitsandbytes layout)",
    )
    p.add_argument(
        "--min-8bit-size",
        type=int,
        default=MIN_8BIT_SIZE,
        help="with --state-bits 8: smaller parameters keep float32 state",
    )
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
