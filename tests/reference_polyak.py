"""optax's ``polyak_sgd`` (SGD with Polyak's step size) as a float64 numpy run: the start
params (a dict of arrays), each step's gradients and loss values and the alias'
hyperparameters give the final params and each step's step size, all float64. The sums
over the tree run over the leaves in sorted key order (the tree's order)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# optax: jnp.finfo(float).eps, float64's epsilon, whatever the precision
TINY = float(np.finfo(np.float64).eps)


def polyak_step(
    sq_norm: float, value: float, f_min: float, max_learning_rate: float, eps: float,
    variant: str,
) -> float:  # fmt: skip
    """optax's ``scale_by_polyak`` step size for ``||u||^2 = sq_norm`` at the loss ``value``."""
    gap = value - f_min
    if variant == "sps+":
        gap = gap if np.isnan(gap) or gap > 0 else 0.0
    elif variant != "sps":
        raise ValueError(variant)
    denom = sq_norm + eps
    if denom <= TINY:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.float64(gap) / np.float64(denom)
    return float(np.minimum(ratio, max_learning_rate))  # nan stays nan


def polyak_sgd(
    p0: dict,
    grads: Sequence[dict],
    values: Sequence[float],
    max_learning_rate: float = 1.0,
    scaling: float | Callable[[int], float] = 1.0,
    f_min: float = 0.0,
    eps: float = 0.0,
    variant: str = "sps",
) -> tuple[dict, list[float]]:
    """``len(grads)`` steps of ``chain(sgd(scaling), scale_by_polyak(...))`` from ``p0``:
    ``u = -scaling(t) g``, ``x <- x + step(||u||^2, value) u``. Returns (params, the step
    sizes)."""
    x = {k: np.array(v, np.float64) for k, v in p0.items()}
    steps: list[float] = []
    for t, (g, value) in enumerate(zip(grads, values, strict=True)):
        s = float(scaling(t)) if callable(scaling) else float(scaling)
        u = {k: -s * np.asarray(g[k], np.float64) for k in sorted(x)}
        sq_norm = float(sum(np.sum(u[k] * u[k]) for k in sorted(x)))
        step = polyak_step(sq_norm, float(value), f_min, max_learning_rate, eps, variant)
        with np.errstate(invalid="ignore"):
            x = {k: x[k] + step * u[k] for k in x}
        steps.append(step)
    return x, steps


def least_squares(
    shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int = 0, floor: float = 0.0
) -> tuple[dict, Callable[[dict], dict], Callable[[dict], float]]:
    """A least squares problem over a tree: ``f(x) = 1/2 sum c (x - t)^2 + floor`` (a
    per-element curvature ``c`` in [0.5, 2]). Returns (start params in ``dtype``, the
    gradient ``c (x - t)`` in ``dtype``, the loss in float64 on the host)."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    target = {k: rng.standard_normal(s) + 1.0 for k, s in shapes.items()}
    curv = {k: rng.uniform(0.5, 2.0, s) for k, s in shapes.items()}

    def grad(x: dict) -> dict:
        return {k: np.asarray(curv[k] * (np.asarray(x[k], np.float64) - target[k]), dtype)
                for k in shapes}  # fmt: skip

    def loss(x: dict) -> float:
        total = sum(float(np.sum(curv[k] * (np.asarray(x[k], np.float64) - target[k]) ** 2))
                    for k in sorted(shapes))  # fmt: skip
        return 0.5 * total + floor

    return p0, grad, loss
