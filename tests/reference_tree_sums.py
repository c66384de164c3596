"""Float64 references of the learning-rate-free rules (optax.contrib 0.2.8's ``prodigy``,
``dadapt_adamw``, ``dog``, ``dowg``), written from optax's source and the papers, as
optax-style transforms over trees (``reference.Transform``). Their step sizes are sums over
the whole tree; here they are plain float64 sums. Nothing here is derived from a kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import reference as ref
from reference import F64, Transform, tree_leaves, tree_map

Schedule = float | Callable[[int], float]


def _f64(x: Any) -> np.ndarray:
    return np.array(x, dtype=F64, copy=True)


def _vdot(a: Any, b: Any) -> float:
    return float(sum(np.sum(_f64(x) * _f64(y)) for x, y in zip(tree_leaves(a), tree_leaves(b),
                                                                  strict=True)))  # fmt: skip


def _sum_abs(a: Any) -> float:
    return float(sum(np.sum(np.abs(_f64(x))) for x in tree_leaves(a)))


def _div(a: float, b: float) -> float:
    """a / b as IEEE (0/0: NaN, x/0: inf), as jnp divides."""
    with np.errstate(all="ignore"):
        return float(np.float64(a) / np.float64(b))


def _max(a: float, b: float) -> float:
    """jnp.maximum: NaN where either is NaN."""
    return a if a >= b else b


def adam_step_scale(b1: float, b2: float, t: int, dtype: Any = None) -> float:
    """``sqrt(1 - b2^t) / (1 - b1^t)``: in float64, or computed in ``dtype`` (optax computes
    it from an int32 count in the params' precision; so does netcl_optim)."""
    if dtype is None:
        return (1 - b2**t) ** 0.5 / (1 - b1**t)
    d = np.dtype(dtype).type
    with np.errstate(all="ignore"):
        return float(np.sqrt(d(1) - d(b2) ** d(t)) / (d(1) - d(b1) ** d(t)))


def _lr(learning_rate: Schedule, count: int) -> float:
    return float(learning_rate(count) if callable(learning_rate) else learning_rate)


def prodigy_with(
    bc_dtype: Any = None,
    learning_rate: Schedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    one_pass: bool = False,
) -> Transform:
    """optax.contrib.prodigy: the update uses the step's d in the moments and the new d in
    eps; the sums <g, x0 - x> (before the step) and ||s||_1 (after) update d. ``bc_dtype``:
    the bias correction's precision (see ``adam_step_scale``)."""
    b1, b2 = betas
    b3 = b2**0.5 if beta3 is None else beta3

    def init(params):
        zeros = {k: ref._zeros(params) for k in ("m", "v", "s")}
        return {**zeros, "x0": ref.tree_f64(params), "d": float(estim_lr0), "r": 0.0, "count": 0}

    def update(u, state, params=None):
        if params is None:
            raise ValueError("prodigy needs params")
        t = state["count"] + 1
        d = state["d"]
        dlr = d * _lr(learning_rate, state["count"]) * adam_step_scale(b1, b2, t, bc_dtype)
        num = _vdot(u, tree_map(lambda x0, p: x0 - _f64(p), state["x0"], params))
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * d * _f64(g), state["m"], u)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * (d * _f64(g)) ** 2, state["v"], u)
        scale = d if safeguard_warmup else dlr
        s = tree_map(lambda s, g: b3 * s + scale * d * _f64(g) / estim_lr0, state["s"], u)
        r = b3 * state["r"] + (d / estim_lr0) * dlr * num
        l1 = _sum_abs(s)  # (0: d stays, where optax's becomes NaN)
        new_d = d if l1 == 0 else _max(d, _div(estim_lr_coef * r, l1))
        out = tree_map(lambda m, v, p: -weight_decay * dlr * _f64(p)
                       - dlr * m / (np.sqrt(v) + (d if one_pass else new_d) * eps),
                       m, v, params)  # fmt: skip
        return out, {"m": m, "v": v, "s": s, "x0": state["x0"], "d": new_d, "r": r, "count": t}

    return Transform(init, update)


def dadapt_adamw_with(
    bc_dtype: Any = None,
    learning_rate: Schedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
) -> Transform:
    """optax.contrib.dadapt_adamw: the step's d throughout; the sums <g, s / (sqrt(v) + eps)>
    (old s and v) and ||s||_1 (new s) give the next step's d."""
    b1, b2 = betas
    sb2 = b2**0.5

    def init(params):
        return {"m": ref._zeros(params), "v": ref._zeros(params), "s": ref._zeros(params),
                "d": float(estim_lr0), "r": 0.0, "count": 0}  # fmt: skip

    def update(u, state, params=None):
        if params is None:
            raise ValueError("dadapt_adamw needs params")
        t = state["count"] + 1
        scale = adam_step_scale(b1, b2, t, bc_dtype)
        dlr = state["d"] * _lr(learning_rate, state["count"]) * scale
        weighted = tree_map(lambda s, v: s / (np.sqrt(v) + eps), state["s"], state["v"])
        num = _vdot(u, weighted)
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * dlr * _f64(g), state["m"], u)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * _f64(g) ** 2, state["v"], u)
        s = tree_map(lambda s, g: sb2 * s + (1 - sb2) * dlr * _f64(g), state["s"], u)
        r = sb2 * state["r"] + (1 - sb2) * dlr * num
        l1 = _sum_abs(s)  # (0: d stays, where optax's becomes NaN)
        new_d = state["d"] if l1 == 0 else _max(state["d"], _div(r, (1 - sb2) * l1))
        out = tree_map(lambda m, v, p: -weight_decay * dlr * _f64(p) - m / (np.sqrt(v) + eps),
                       m, v, params)  # fmt: skip
        return out, {"m": m, "v": v, "s": s, "d": new_d, "r": r, "count": t}

    return Transform(init, update)


def prodigy_tx(
    learning_rate: Schedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    one_pass: bool = False,
) -> Transform:
    """``prodigy_with`` the bias correction in float64 (the table's reference); ``one_pass``:
    the eps term reads the step's d (netcl_optim's option)."""
    return prodigy_with(None, learning_rate, betas, beta3, eps, estim_lr0, estim_lr_coef,
                        weight_decay, safeguard_warmup, one_pass)  # fmt: skip


def dadapt_adamw_tx(
    learning_rate: Schedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
) -> Transform:
    """``dadapt_adamw_with`` the bias correction in float64 (the table's reference)."""
    return dadapt_adamw_with(None, learning_rate, betas, eps, estim_lr0, weight_decay)


def _norm_sq(tree: Any) -> float:
    return _vdot(tree, tree)


def scale_by_dog(init_step: tuple[str, float] = ("heuristic", 1e-6), eps: float = 1e-8):
    """optax.contrib.scale_by_dog: r = max(r, ||x - x0||), G += ||g||^2, u = r / sqrt(G + eps) g
    (("learning_rate", a): a at the first step)."""
    kind, value = init_step

    def init(params):
        r0 = {"distance": value, "learning_rate": 0.0}.get(kind)
        if r0 is None:
            r0 = value * (1 + _norm_sq(params) ** 0.5)
        return {"x0": ref.tree_f64(params), "r": float(r0), "G": 0.0, "first": True}

    def update(u, state, params=None):
        dist = _norm_sq(tree_map(lambda x0, p: x0 - _f64(p), state["x0"], params)) ** 0.5
        r = _max(state["r"], dist)
        big_g = state["G"] + _norm_sq(u)
        lr = _div(r, (big_g + eps) ** 0.5)
        if kind == "learning_rate" and state["first"]:
            lr = value
        out = tree_map(lambda g: lr * _f64(g), u)
        return out, {"x0": state["x0"], "r": r, "G": big_g, "first": False}

    return Transform(init, update)


def scale_by_dowg(init_estim_sq_dist: float | None = None, eps: float = 1e-4):
    """optax.contrib.scale_by_dowg: r2 = max(r2, ||x - x0||^2), v += r2 ||g||^2,
    u = r2 / (sqrt(v) + eps) g."""

    def init(params):
        start = eps if init_estim_sq_dist is None else init_estim_sq_dist
        return {"x0": ref.tree_f64(params), "r2": float(start), "v": 0.0}

    def update(u, state, params=None):
        r2 = _max(state["r2"], _norm_sq(tree_map(lambda x0, p: x0 - _f64(p), state["x0"], params)))
        v = state["v"] + r2 * _norm_sq(u)
        lr = _div(r2, v**0.5 + eps)
        return tree_map(lambda g: lr * _f64(g), u), {"x0": state["x0"], "r2": r2, "v": v}

    return Transform(init, update)


def _decayed(weight_decay: float | None, core: Transform, learning_rate: Schedule) -> Transform:
    decay = [ref.add_decayed_weights(weight_decay)] if weight_decay is not None else []
    return ref.chain(*decay, core, ref.scale_by_learning_rate(learning_rate))


def dog_tx(
    learning_rate: Schedule = 1.0,
    init_step: tuple[str, float] = ("heuristic", 1e-6),
    eps: float = 1e-8,
    weight_decay: float | None = None,
) -> Transform:
    """optax.contrib.dog: [add_decayed_weights] -> scale_by_dog -> lr."""
    return _decayed(weight_decay, scale_by_dog(init_step, eps), learning_rate)


def dowg_tx(
    learning_rate: Schedule = 1.0,
    init_estim_sq_dist: float | None = None,
    eps: float = 1e-4,
    weight_decay: float | None = None,
) -> Transform:
    """optax.contrib.dowg: [add_decayed_weights] -> scale_by_dowg -> lr."""
    return _decayed(weight_decay, scale_by_dowg(init_estim_sq_dist, eps), learning_rate)
