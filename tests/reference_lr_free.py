"""Plain numpy float64 references of the learning-rate-free rules (optax.contrib 0.2.8's
``prodigy``, ``dadapt_adamw``, ``dog`` and ``dowg``, in optax's order of operations).

Each takes the start params (a dict of arrays), the gradients of every step (a list of such
dicts) and the rule's hyperparameters (the functional alias' names), and returns the final
params and the rule's scalars (``estim_lr``, ``max_dist`` ...), all float64. The sums over the
tree run over the leaves in sorted key order (the tree's order).

``bc_dtype``: the dtype of Adam's bias correction ``sqrt(1 - b2^t) / (1 - b1^t)`` (Prodigy,
D-Adaptation), by default the params' (optax computes it from an int32 count: float32 by
default, float64 under ``jax_enable_x64``; netcl_optim in the state's precision, the same).
"""

from __future__ import annotations

import math

import numpy as np


def _f64(tree):
    return {k: np.array(v, np.float64) for k, v in tree.items()}


def _sum(values):
    return float(sum(float(np.sum(v)) for v in values))


def _sched(learning_rate, count):
    return float(learning_rate(count)) if callable(learning_rate) else float(learning_rate)


def bias_correction(b1, b2, t, dtype=np.float32):
    d = np.dtype(dtype).type
    with np.errstate(all="ignore"):
        return float(np.sqrt(d(1) - d(b2) ** d(t)) / (d(1) - d(b1) ** d(t)))


def prodigy(
    p0,
    grads,
    learning_rate=1.0,
    betas=(0.9, 0.999),
    beta3=None,
    eps=1e-8,
    estim_lr0=1e-6,
    estim_lr_coef=1.0,
    weight_decay=0.0,
    safeguard_warmup=False,
    bc_dtype=None,
):
    b1, b2 = betas
    bc_dtype = bc_dtype or np.result_type(*p0.values())
    b3 = b2**0.5 if beta3 is None else beta3
    x = _f64(p0)
    keys = sorted(x)
    x0 = {k: x[k].copy() for k in keys}
    m = {k: np.zeros_like(x[k]) for k in keys}
    v = {k: np.zeros_like(x[k]) for k in keys}
    s = {k: np.zeros_like(x[k]) for k in keys}
    d, r = float(estim_lr0), 0.0
    for count, g in enumerate(grads):
        g = _f64(g)
        sched = _sched(learning_rate, count)
        dlr = d * sched * bias_correction(b1, b2, count + 1, bc_dtype)
        numerator = _sum(g[k] * (x0[k] - x[k]) for k in keys)
        for k in keys:
            dg = d * g[k]
            m[k] = b1 * m[k] + (1 - b1) * dg
            v[k] = b2 * v[k] + (1 - b2) * dg * dg
            s[k] = b3 * s[k] + (d if safeguard_warmup else dlr) * dg / estim_lr0
        r = b3 * r + (d / estim_lr0) * dlr * numerator
        denominator = _sum(np.abs(s[k]) for k in keys)
        d_new = max(d, estim_lr_coef * r / denominator)
        for k in keys:
            u = -weight_decay * dlr * x[k] - dlr * m[k] / (np.sqrt(v[k]) + d_new * eps)
            x[k] = x[k] + u
        d = d_new
    return x, {"estim_lr": d, "numerator_weighted": r}


def dadapt_adamw(
    p0,
    grads,
    learning_rate=1.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    estim_lr0=1e-6,
    weight_decay=0.0,
    bc_dtype=None,
):
    b1, b2 = betas
    bc_dtype = bc_dtype or np.result_type(*p0.values())
    sb2 = b2**0.5
    x = _f64(p0)
    keys = sorted(x)
    m = {k: np.zeros_like(x[k]) for k in keys}
    v = {k: np.zeros_like(x[k]) for k in keys}
    s = {k: np.zeros_like(x[k]) for k in keys}
    d, r = float(estim_lr0), 0.0
    for count, g in enumerate(grads):
        g = _f64(g)
        sched = _sched(learning_rate, count)
        dlr = d * sched * bias_correction(b1, b2, count + 1, bc_dtype)
        numerator = _sum(g[k] * (s[k] / (np.sqrt(v[k]) + eps)) for k in keys)  # old s, v
        for k in keys:
            m[k] = b1 * m[k] + (1 - b1) * dlr * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
            s[k] = sb2 * s[k] + (1 - sb2) * dlr * g[k]
        l1 = _sum(np.abs(s[k]) for k in keys)
        r = sb2 * r + (1 - sb2) * dlr * numerator
        d_new = max(d, r / ((1 - sb2) * l1))
        for k in keys:
            x[k] = x[k] + (-weight_decay * dlr * x[k] - m[k] / (np.sqrt(v[k]) + eps))
        d = d_new  # the update above used the step's d (through dlr)
    return x, {"estim_lr": d, "numerator_weighted": r}


def _norm_sq(tree, keys):
    return _sum(tree[k] * tree[k] for k in keys)


def dog(
    p0,
    grads,
    learning_rate=1.0,
    init_step=("heuristic", 1e-6),
    eps=1e-8,
    weight_decay=None,
):
    kind, value = init_step
    x = _f64(p0)
    keys = sorted(x)
    x0 = {k: x[k].copy() for k in keys}
    if kind == "distance":
        r = float(value)
    elif kind == "heuristic":
        r = value * (1 + math.sqrt(_norm_sq(x, keys)))
    else:
        r = 0.0
    G = 0.0
    for count, g in enumerate(grads):
        g = _f64(g)
        if weight_decay is not None:
            g = {k: g[k] + weight_decay * x[k] for k in keys}
        dist = math.sqrt(_sum((x0[k] - x[k]) ** 2 for k in keys))
        r = max(r, dist)
        G = G + _norm_sq(g, keys)
        eta = r / math.sqrt(G + eps)
        if kind == "learning_rate" and count == 0:
            eta = float(value)
        lr = _sched(learning_rate, count)
        for k in keys:
            x[k] = x[k] + (-lr) * (eta * g[k])
    return x, {"max_dist": r, "sum_sq_norm_grads": G}


def dowg(p0, grads, learning_rate=1.0, init_estim_sq_dist=None, eps=1e-4, weight_decay=None):
    x = _f64(p0)
    keys = sorted(x)
    x0 = {k: x[k].copy() for k in keys}
    r2 = float(eps if init_estim_sq_dist is None else init_estim_sq_dist)
    v = 0.0
    for count, g in enumerate(grads):
        g = _f64(g)
        if weight_decay is not None:
            g = {k: g[k] + weight_decay * x[k] for k in keys}
        r2 = max(r2, _sum((x0[k] - x[k]) ** 2 for k in keys))
        v = r2 * _norm_sq(g, keys) + v
        eta = r2 / (math.sqrt(v) + eps)
        lr = _sched(learning_rate, count)
        for k in keys:
            x[k] = x[k] + (-lr) * (eta * g[k])
    return x, {"weighted_sq_norm_grads": v, "estim_sq_dist": r2}


RULES = {"prodigy": prodigy, "dadapt": dadapt_adamw, "dog": dog, "dowg": dowg}
