"""Float64 NumPy references for clipping, loss scaling and optax's wrappers.

Written from torch's ``clip_grad_norm_`` and ``GradScaler`` (``torch/nn/utils/clip_grad.py``,
``torch/amp/grad_scaler.py``, ``_amp_update_scale_``) and optax's ``apply_if_finite``,
``partition`` and ``MultiSteps`` (``optax/_src/wrappers.py``, ``optax/transforms/``), following
``shared/reference/semantics.md`` b.7, b.9 and b.10. Nothing here is derived from a netcl kernel.
Transforms follow ``reference.Transform`` (``init``, ``update(u, state, params=None)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optree
import reference as ref

F64 = np.float64


# ---------------------------------------------------------------------------- clipping


def total_norm(grads: Sequence[np.ndarray], norm_type: float) -> float:
    """torch: the p-norm of the per-grad p-norms (= the p-norm of the concatenation)."""
    grads = [np.asarray(g, F64).ravel() for g in grads]
    if not grads:
        return 0.0
    with np.errstate(all="ignore"):
        if norm_type == math.inf:
            per = [np.max(np.abs(g)) if g.size else 0.0 for g in grads]
            return float(np.max(per))
        per = [np.sum(np.abs(g) ** norm_type) ** (1 / norm_type) for g in grads]
        return float(np.sum(np.asarray(per) ** norm_type) ** (1 / norm_type))


def clip_coef(total: float, max_norm: float) -> float:
    """``clamp(max_norm / (total + 1e-6), max=1)``; NaN stays NaN (torch.clamp)."""
    c = max_norm / (total + 1e-6)
    return c if math.isnan(c) else min(c, 1.0)


def clip_grads(
    grads: Sequence[np.ndarray], max_norm: float, norm_type: float = 2.0
) -> tuple[float, list[np.ndarray]]:
    """``(total norm before clipping, grads * coef)`` in float64."""
    total = total_norm(grads, norm_type)
    c = clip_coef(total, max_norm)
    with np.errstate(all="ignore"):
        return total, [np.asarray(g, F64) * c for g in grads]


# ---------------------------------------------------------------------------- loss scaling


class GradScalerRef:
    """torch.amp.GradScaler's scale bookkeeping (b.9), for one optimizer.

    ``iteration(found_inf)`` is one ``step`` + ``update``; returns whether the step ran.
    The scale is kept as torch keeps it, a float32 value.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = float(np.float32(init_scale))
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0

    def inv_scale(self) -> float:
        return float(np.float32(1.0 / np.float64(self.scale)))

    def iteration(self, found_inf: bool) -> bool:
        if found_inf:
            self.scale = float(np.float32(self.scale * self.backoff_factor))
            self.growth_tracker = 0
            return False
        successful = self.growth_tracker + 1
        if successful == self.growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(self.scale * self.growth_factor)
            if math.isfinite(grown):
                self.scale = float(grown)
            self.growth_tracker = 0
        else:
            self.growth_tracker = successful
        return True


def has_nonfinite(tree: Any) -> bool:
    return any(not np.all(np.isfinite(np.asarray(x))) for x in ref.tree_leaves(tree))


# ---------------------------------------------------------------------------- optax wrappers


def apply_if_finite(inner: ref.Transform, max_consecutive_errors: int) -> ref.Transform:
    """optax.apply_if_finite: state (notfinite_count, last_finite, total_notfinite, inner)."""

    def init(params):
        return (0, True, 0, inner.init(params))

    def update(u, state, params=None):
        count, _, total, inner_state = state
        finite = not has_nonfinite(u)
        count = 0 if finite else count + 1
        total = total if finite else total + 1
        if finite or count > max_consecutive_errors:
            out, inner_state = inner.update(u, inner_state, params)
        else:
            out = ref.tree_map(lambda x: np.zeros(np.shape(x), F64), u)
        return out, (count, finite, total, inner_state)

    return ref.Transform(init, update)


def masked(inner: ref.Transform, mask: Any) -> ref.Transform:
    """optax.masked: ``inner`` sees only the leaves where ``mask`` is True (a flat list of
    the selected leaves here); the others pass through unchanged."""

    def pick(tree):
        leaves, treedef = optree.tree_flatten(tree)
        keep = treedef.flatten_up_to(mask(tree) if callable(mask) else mask)
        return leaves, treedef, [bool(k) for k in keep]

    def init(params):
        leaves, _, keep = pick(params)
        return inner.init([x for x, k in zip(leaves, keep, strict=True) if k])

    def update(u, state, params=None):
        leaves, treedef, keep = pick(u)
        sub = [x for x, k in zip(leaves, keep, strict=True) if k]
        sub_p = None
        if params is not None:
            p_leaves = treedef.flatten_up_to(params)
            sub_p = [x for x, k in zip(p_leaves, keep, strict=True) if k]
        new_sub, state = inner.update(sub, state, sub_p)
        it = iter(new_sub)
        out = [next(it) if k else ref._f64(x) for x, k in zip(leaves, keep, strict=True)]
        return optree.tree_unflatten(treedef, out), state

    return ref.Transform(init, update)


def partition(transforms: dict[Any, ref.Transform], labels: Any) -> ref.Transform:
    """optax.partition over a labels tree (or a callable of the params)."""

    def mask_for(label):
        def mask(tree):
            ls = labels(tree) if callable(labels) else labels
            return optree.tree_map(lambda x: x == label, ls)

        return mask

    subs = {k: masked(tx, mask_for(k)) for k, tx in transforms.items()}

    def init(params):
        return {k: tx.init(params) for k, tx in subs.items()}

    def update(u, state, params=None):
        new = {}
        for k, tx in subs.items():
            u, new[k] = tx.update(u, state[k], params)
        return u, new

    return ref.Transform(init, update)


def multi_steps(
    inner: ref.Transform, every_k: int | Callable[[int], int], use_grad_mean: bool = True
) -> ref.Transform:
    """optax.MultiSteps: state (mini_step, gradient_step, inner_state, acc)."""

    def k_of(step):
        return every_k(step) if callable(every_k) else every_k

    def init(params):
        return (
            0,
            0,
            inner.init(params),
            ref.tree_map(lambda x: np.zeros(np.shape(x), F64), params),
        )

    def update(u, state, params=None):
        mini, grad_step, inner_state, acc = state
        if use_grad_mean:
            acc = ref.tree_map(lambda a, g: a + (ref._f64(g) - a) / (mini + 1), acc, u)
        else:
            acc = ref.tree_map(lambda a, g: a + ref._f64(g), acc, u)
        if mini < k_of(grad_step) - 1:
            zeros = ref.tree_map(lambda x: np.zeros(np.shape(x), F64), u)
            return zeros, (mini + 1, grad_step, inner_state, acc)
        out, inner_state = inner.update(acc, inner_state, params)
        zeros = ref.tree_map(lambda x: np.zeros(np.shape(x), F64), acc)
        return out, (0, grad_step + 1, inner_state, zeros)

    return ref.Transform(init, update)
