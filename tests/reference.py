"""Plain NumPy float64 reference implementations: the spec the device kernels are tested against.

Written from torch's single-tensor for-loops (``torch/optim/{sgd,adam,adamw,rmsprop}.py``), the
Adam paper and optax's transform definitions, following ``shared/reference/semantics.md``
(sections b.1-b.4, b.7, b.10). Nothing here is derived from a netcl kernel.

Two families:

* **torch-style rules** ``sgd``, ``adam``, ``adamw``, ``rmsprop``: one parameter array at a time,
  ``rule(p, g, state, **hp) -> (new_p, state)`` with the functional aliases' hyperparameter names
  (``learning_rate``, ``b1``, ``b2``); ``state`` is a dict with torch's key names (``step``,
  ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``), mutated in
  place and also returned. ``transform_rule`` makes one from a transform below (its own state
  keys). ``run_trajectory`` runs a rule over a gradient sequence.
* **optax-semantics transforms** ``scale``, ``trace``, ``scale_by_adam``, ... returning a
  ``Transform(init, update)`` pair. They work on a single array or on any optree pytree of
  arrays (``None`` is an empty subtree), since a bare ``numpy.ndarray`` is a one-leaf tree.
  States are plain dicts (counts as Python ints) and tuples (for ``chain``).
  ``sgd_tx``, ``momentum_tx``, ``adam_tx``, ``adamw_tx`` and ``rmsprop_tx`` are the functional
  optimizers as chains (also reachable as ``functional.sgd`` etc.); they equal the torch-style
  rules for a constant learning rate.

All maths is float64. ``run_transform(..., storage_dtype=...)`` emulates low-precision storage by
rounding the updates and the params to the storage dtype at step boundaries.
"""

from __future__ import annotations

import contextvars
import math
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import optree

F64 = np.float64


def _f64(x: Any) -> np.ndarray:
    return np.array(x, dtype=F64, copy=True)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """optree.tree_map with ``None`` as an empty subtree (the library's tree semantics)."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False)


def tree_leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=False)


def tree_f64(tree: Any) -> Any:
    return tree_map(_f64, tree)


# ---------------------------------------------------------------------------------------------
# torch-style rules (one parameter, torch state keys)
# ---------------------------------------------------------------------------------------------


def sgd(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[np.ndarray, dict]:
    """torch.optim.SGD, single-tensor path. The first momentum step is undamped (buf = g)."""
    p, g = _f64(p), _f64(g)
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = g.copy()
        else:
            buf = momentum * buf + (1 - dampening) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if nesterov else buf
    return p - learning_rate * g, state


def _adam_core(p, g, state, *, learning_rate, b1, b2, eps):
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(p)
        state["exp_avg_sq"] = np.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    m = state["exp_avg"] + (1 - b1) * (g - state["exp_avg"])  # torch: lerp_(g, 1 - b1)
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    denom = np.sqrt(v) / math.sqrt(bc2) + eps  # eps added after bias correction
    return p - (learning_rate / bc1) * m / denom, state


def adam(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adam: coupled L2 weight decay (g += wd * p)."""
    p, g = _f64(p), _f64(g)
    if weight_decay != 0:
        g = g + weight_decay * p
    return _adam_core(p, g, state, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def adamw(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> tuple[np.ndarray, dict]:
    """torch.optim.AdamW: decoupled weight decay, p *= 1 - lr * wd before the moments."""
    p, g = _f64(p), _f64(g)
    p = p * (1 - learning_rate * weight_decay)
    return _adam_core(p, g, state, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def rmsprop(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> tuple[np.ndarray, dict]:
    """torch.optim.RMSprop: eps outside the sqrt, no bias correction, buffers start at zero."""
    p, g = _f64(p), _f64(g)
    if "step" not in state:
        state["step"] = 0
        state["square_avg"] = np.zeros_like(p)
        if momentum > 0:
            state["momentum_buffer"] = np.zeros_like(p)
        if centered:
            state["grad_avg"] = np.zeros_like(p)
    state["step"] += 1
    if weight_decay != 0:
        g = g + weight_decay * p
    v = alpha * state["square_avg"] + (1 - alpha) * g * g
    state["square_avg"] = v
    if centered:
        gavg = state["grad_avg"] + (1 - alpha) * (g - state["grad_avg"])  # lerp
        state["grad_avg"] = gavg
        denom = np.sqrt(v - gavg * gavg) + eps
    else:
        denom = np.sqrt(v) + eps
    if momentum > 0:
        buf = momentum * state["momentum_buffer"] + g / denom
        state["momentum_buffer"] = buf
        return p - learning_rate * buf, state
    return p - learning_rate * g / denom, state


def run_trajectory(
    rule: Callable[..., tuple[np.ndarray, dict]], p0: Any, grads_seq: Sequence[Any], **hp: Any
) -> list[np.ndarray]:
    """Run a torch-style rule from ``p0`` over ``grads_seq``; the params after each step."""
    p, state, out = _f64(p0), {}, []
    for g in grads_seq:
        p, state = rule(p, g, state, **hp)
        out.append(p.copy())
    return out


# ---------------------------------------------------------------------------------------------
# optax-semantics transforms (single array or pytree; float64)
# ---------------------------------------------------------------------------------------------


class Transform(NamedTuple):
    """A reference transform: ``init(params) -> state``, ``update(u, state, params=None)``."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


def _zeros(params: Any) -> Any:
    return tree_map(lambda x: np.zeros(np.shape(x), F64), params)


def identity() -> Transform:
    return Transform(lambda params: (), lambda u, state, params=None: (tree_f64(u), state))


def scale(step_size: float) -> Transform:
    """u -> step_size * u (stateless)."""

    def update(u, state, params=None):
        return tree_map(lambda x: step_size * _f64(x), u), state

    return Transform(lambda params: (), update)


def scale_by_schedule(step_size_fn: Callable[[int], float]) -> Transform:
    """u -> step_size_fn(count) * u; count starts at 0, so the first update uses fn(0)."""

    def update(u, state, params=None):
        s = float(step_size_fn(state["count"]))
        return tree_map(lambda x: s * _f64(x), u), {"count": state["count"] + 1}

    return Transform(lambda params: {"count": 0}, update)


def scale_by_learning_rate(
    learning_rate: float | Callable[[int], float], flip_sign: bool = True
) -> Transform:
    """u -> -lr * u (or +lr * u without flip_sign); lr may be a schedule of the count."""
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


def trace(decay: float, nesterov: bool = False, dampening: float = 0.0) -> Transform:
    """Heavy-ball momentum; the trace starts at 0 so the first trace is g (undamped, as torch).

    t_1 = g;  t_k = decay * t_{k-1} + (1 - dampening) * g;  update = g + decay * t (nesterov) or t.
    """

    def init(params):
        return {"count": 0, "trace": _zeros(params)}

    def update(u, state, params=None):
        first = state["count"] == 0
        damp = 1.0 if first else 1.0 - dampening

        def leaf(g, t):
            g = _f64(g)
            return decay * t + damp * g

        new_t = tree_map(leaf, u, state["trace"])
        if nesterov:
            out = tree_map(lambda g, t: _f64(g) + decay * t, u, new_t)
        else:
            out = tree_map(np.copy, new_t)
        return out, {"count": state["count"] + 1, "trace": new_t}

    return Transform(init, update)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> Transform:
    """u = mhat / (sqrt(vhat + eps_root) + eps): torch's eps, added after bias correction."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * _f64(g), u, state["mu"])
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * _f64(g) ** 2, u, state["nu"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = tree_map(lambda m, v: (m / bc1) / (np.sqrt(v / bc2 + eps_root) + eps), mu, nu)
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, centered: bool = False) -> Transform:
    """torch RMSprop's scaling: u = g / (sqrt(v [- gavg^2]) + eps); no bias correction."""

    def init(params):
        state = {"nu": _zeros(params)}
        if centered:
            state["mu"] = _zeros(params)
        return state

    def update(u, state, params=None):
        nu = tree_map(lambda g, v: alpha * v + (1 - alpha) * _f64(g) ** 2, u, state["nu"])
        new = {"nu": nu}
        if centered:
            mu = tree_map(lambda g, m: alpha * m + (1 - alpha) * _f64(g), u, state["mu"])
            new["mu"] = mu
            out = tree_map(lambda g, v, m: _f64(g) / (np.sqrt(v - m * m) + eps), u, nu, mu)
        else:
            out = tree_map(lambda g, v: _f64(g) / (np.sqrt(v) + eps), u, nu)
        return out, new

    return Transform(init, update)


# The dtype (tree) in which a run computes (float32 for float16/float32 storage), set by
# run_transform. Coupled weight decay rounds g + wd * p to it: every float32 implementation
# (ours, torch's grad.add(param, alpha=wd)) forms that sum in float32, and when g and wd * p
# nearly cancel, an adaptive step's eps-sized denominator amplifies that one rounding ~1/eps
# times, far beyond any tolerance relative to the step's size. Modelling the rounding keeps
# the comparison tight everywhere else.
_COMPUTE: contextvars.ContextVar[Any] = contextvars.ContextVar("compute_dtype", default=None)


def _decay_in(dtype: Any, g: Any, p: Any, weight_decay: float) -> np.ndarray:
    """g + wd * p computed in ``dtype`` (each operation rounded, as a float32 kernel does)."""
    d = np.dtype(dtype)
    wd = d.type(weight_decay)
    return _f64(np.asarray(g).astype(d) + wd * np.asarray(p).astype(d))


def add_decayed_weights(weight_decay: float) -> Transform:
    """u -> u + wd * p; needs params (rounded to the run's compute dtype, see _COMPUTE)."""

    def update(u, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        compute = _COMPUTE.get()
        if compute is None:
            return tree_map(lambda g, p: _f64(g) + weight_decay * _f64(p), u, params), state
        if isinstance(compute, (np.dtype, type)):
            return tree_map(lambda g, p: _decay_in(compute, g, p, weight_decay), u, params), state
        out = tree_map(lambda g, p, d: _decay_in(d, g, p, weight_decay), u, params, compute)
        return out, state

    return Transform(lambda params: (), update)


def clip(max_delta: float) -> Transform:
    """Element-wise clamp to [-max_delta, max_delta]."""

    def update(u, state, params=None):
        return tree_map(lambda g: np.clip(_f64(g), -max_delta, max_delta), u), state

    return Transform(lambda params: (), update)


def global_norm(tree: Any) -> float:
    """sqrt of the sum of squares over every leaf (0.0 for an empty tree)."""
    return math.sqrt(sum(float(np.sum(_f64(x) ** 2)) for x in tree_leaves(tree)))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's clip_grad_norm_ coefficient: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


def clip_tree_by_global_norm(tree: Any, max_norm: float) -> Any:
    """Every leaf times the torch coefficient (always multiplied, no branch)."""
    coef = clip_coefficient(global_norm(tree), max_norm)
    return tree_map(lambda x: _f64(x) * coef, tree)


def clip_by_global_norm(max_norm: float) -> Transform:
    """The transform form of ``clip_tree_by_global_norm`` (torch coefficient, see b.7)."""

    def update(u, state, params=None):
        return clip_tree_by_global_norm(u, max_norm), state

    return Transform(lambda params: (), update)


def apply_updates(params: Any, updates: Any) -> Any:
    """(p + u).astype(p.dtype), leaf by leaf."""
    return tree_map(
        lambda p, u: np.asarray(np.asarray(p) + np.asarray(u), dtype=np.asarray(p).dtype),
        params,
        updates,
    )


def chain(*txs: Transform) -> Transform:
    """Left-to-right composition; the state is the tuple of the inner states."""

    def init(params):
        return tuple(t.init(params) for t in txs)

    def update(u, state, params=None):
        new_states = []
        for t, s in zip(txs, state, strict=True):
            u, s = t.update(u, s, params)
            new_states.append(s)
        return u, tuple(new_states)

    return Transform(init, update)


# ---------------------------------------------------------------------------------------------
# functional optimizers: optax chains, numerically torch
# ---------------------------------------------------------------------------------------------


def sgd_tx(
    learning_rate: float | Callable[[int], float],
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Transform:
    """[add_decayed_weights(wd)] + [trace(momentum, nesterov, dampening)] + lr.

    No trace when momentum == 0: torch then ignores dampening entirely.
    """
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def momentum_tx(
    learning_rate: float | Callable[[int], float],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Transform:
    return sgd_tx(learning_rate, momentum, 0.0, weight_decay, nesterov)


def adam_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """[add_decayed_weights(wd)] (coupled L2) + scale_by_adam + lr."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamw_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Transform:
    """scale_by_adam + add_decayed_weights + lr: u = -lr (adam + wd p), torch's AdamW."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_adam(b1, b2, eps), *parts, scale_by_learning_rate(learning_rate))


def rmsprop_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> Transform:
    """[add_decayed_weights] + scale_by_rms + [trace(momentum)] + lr (torch for constant lr)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    parts.append(scale_by_rms(alpha, eps, centered))
    if momentum:
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def _in(dtype: Any, x: Any) -> Any:
    """``x`` as an array of ``dtype`` (None: float64), so that each operation on it rounds."""
    return np.asarray(x).astype(F64 if dtype is None else dtype)


def _lion_sign(g: Any, m: Any, b1: float, dtype: Any) -> np.ndarray:
    """sign((1 - b1) g + b1 m) in ``dtype``: a sign is where a last-bit difference flips the
    update, so the reference rounds as the run's compute precision does (see _COMPUTE)."""
    d = np.dtype(F64 if dtype is None else dtype).type
    return _f64(np.sign(d(1 - b1) * _in(dtype, g) + d(b1) * _in(dtype, m)))


def _lion_moment(g: Any, m: Any, b2: float, dtype: Any) -> np.ndarray:
    d = np.dtype(F64 if dtype is None else dtype).type
    return _f64(d(1 - b2) * _in(dtype, g) + d(b2) * _in(dtype, m))


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> Transform:
    """optax's Lion scaling: u = sign((1 - b1) g + b1 m), then m = (1 - b2) g + b2 m."""

    def update(u, state, params=None):
        compute, mu = _COMPUTE.get(), state["mu"]
        if compute is None or isinstance(compute, (np.dtype, type)):
            out = tree_map(lambda g, m: _lion_sign(g, m, b1, compute), u, mu)
            new_mu = tree_map(lambda g, m: _lion_moment(g, m, b2, compute), u, mu)
        else:
            out = tree_map(lambda g, m, d: _lion_sign(g, m, b1, d), u, mu, compute)
            new_mu = tree_map(lambda g, m, d: _lion_moment(g, m, b2, d), u, mu, compute)
        return out, {"count": state["count"] + 1, "mu": new_mu}

    return Transform(lambda params: {"count": 0, "mu": _zeros(params)}, update)


def lion_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
) -> Transform:
    """scale_by_lion + [add_decayed_weights] + lr: optax's lion (decoupled decay)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_lion(b1, b2), *parts, scale_by_learning_rate(learning_rate))


# references: adagrad, adadelta


def adagrad(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adagrad: L2; clr = lr / (1 + (t - 1) lr_decay); s += g^2;
    p -= clr g / (sqrt(s) + eps) (eps outside the root; s starts at the initial value)."""
    p, g = _f64(p), _f64(g)
    if "step" not in state:
        state["step"] = 0
        state["sum"] = np.full(p.shape, initial_accumulator_value, F64)
    state["step"] += 1
    if weight_decay != 0:
        g = g + weight_decay * p
    clr = learning_rate / (1 + (state["step"] - 1) * lr_decay)
    state["sum"] = state["sum"] + g * g
    return p - clr * g / (np.sqrt(state["sum"]) + eps), state


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7, eps_in_sqrt: bool = True
) -> Transform:
    """optax's scale_by_rss: s = s0 + sum g^2; u = g / sqrt(s + eps) where s > 0, else 0
    (eps_in_sqrt), or torch Adagrad's u = g / (sqrt(s) + eps)."""

    def init(params):
        return {"sum": tree_map(lambda x: np.full(np.shape(x), initial_accumulator_value, F64),
                                params)}  # fmt: skip

    def leaf(g, s):
        g = _f64(g)
        if not eps_in_sqrt:
            return g / (np.sqrt(s) + eps)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s > 0, g / np.sqrt(s + eps), g * 0.0)

    def update(u, state, params=None):
        s = tree_map(lambda g, t: t + _f64(g) ** 2, u, state["sum"])
        return tree_map(leaf, u, s), {"sum": s}

    return Transform(init, update)


def adagrad_tx(
    learning_rate: float | Callable[[int], float] = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> Transform:
    """[add_decayed_weights] + scale_by_rss (torch's eps) + lr / (1 + count lr_decay)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    parts.append(scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=False))
    lr = learning_rate
    if lr_decay:

        def lr(count: int) -> float:
            base = learning_rate(count) if callable(learning_rate) else learning_rate
            return base / (1 + count * lr_decay)

    return chain(*parts, scale_by_learning_rate(lr))


def adagrad_optax_tx(
    learning_rate: float | Callable[[int], float],
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    eps_in_sqrt: bool = True,
) -> Transform:
    """optax's adagrad: scale_by_rss (eps inside the root, 0 where s = 0) + lr."""
    return chain(scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt),
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def adadelta(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adadelta: L2; v = rho v + (1 - rho) g^2;
    d = sqrt(u + eps) / sqrt(v + eps) g (old u); u = rho u + (1 - rho) d^2; p -= lr d."""
    p, g = _f64(p), _f64(g)
    if "step" not in state:
        state["step"] = 0
        state["square_avg"] = np.zeros_like(p)
        state["acc_delta"] = np.zeros_like(p)
    state["step"] += 1
    if weight_decay != 0:
        g = g + weight_decay * p
    v = rho * state["square_avg"] + (1 - rho) * g * g
    d = np.sqrt(state["acc_delta"] + eps) / np.sqrt(v + eps) * g
    state["square_avg"] = v
    state["acc_delta"] = rho * state["acc_delta"] + (1 - rho) * d * d
    return p - learning_rate * d, state


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> Transform:
    """optax's scale_by_adadelta: e_g, then u = sqrt(old e_x + eps) / sqrt(e_g + eps) g, e_x."""

    def init(params):
        return {"e_g": _zeros(params), "e_x": _zeros(params)}

    def update(u, state, params=None):
        e_g = tree_map(lambda g, v: rho * v + (1 - rho) * _f64(g) ** 2, u, state["e_g"])
        out = tree_map(lambda g, v, x: np.sqrt(x + eps) / np.sqrt(v + eps) * _f64(g),
                       u, e_g, state["e_x"])  # fmt: skip
        e_x = tree_map(lambda d, x: rho * x + (1 - rho) * d**2, out, state["e_x"])
        return out, {"e_g": e_g, "e_x": e_x}

    return Transform(init, update)


def adadelta_tx(
    learning_rate: float | Callable[[int], float] = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> Transform:
    """[add_decayed_weights] (coupled) + scale_by_adadelta + lr: torch's and optax's."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_adadelta(rho, eps), scale_by_learning_rate(learning_rate))


# references: adamax, adamaxw


def adamax(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adamax: L2; m = lerp(m, g, 1 - b1); u = max(u b2, |g| + eps);
    p = p - (lr / (1 - b1^t)) m / u."""
    p, g = _f64(p), _f64(g)
    if weight_decay != 0:
        g = g + weight_decay * p
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(p)
        state["exp_inf"] = np.zeros_like(p)
    state["step"] += 1
    m = state["exp_avg"] + (1 - b1) * (g - state["exp_avg"])
    u = np.maximum(b2 * state["exp_inf"], np.abs(g) + eps)
    state["exp_avg"], state["exp_inf"] = m, u
    return p - (learning_rate / (1 - b1 ** state["step"])) * m / u, state


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """optax's scale_by_adamax (= torch's): nu = max(b2 nu, |g| + eps); u = (m / bc1) / nu."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * _f64(g), u, state["mu"])
        nu = tree_map(lambda g, v: np.maximum(b2 * v, np.abs(_f64(g)) + eps), u, state["nu"])
        bc1 = 1 - b1**t
        out = tree_map(lambda m, v: (m / bc1) / v, mu, nu)
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def adamax_tx(
    learning_rate: float | Callable[[int], float] = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """[add_decayed_weights(wd)] (coupled L2) + scale_by_adamax + lr: torch's Adamax."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamaxw_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> Transform:
    """scale_by_adamax + add_decayed_weights + lr: optax's adamaxw (decoupled decay)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_adamax(b1, b2, eps), *parts, scale_by_learning_rate(learning_rate))


# references: nadam, nadamw


def nadam_mu_product(b1: float, momentum_decay: float, t: int) -> float:
    """torch's NAdam mu_product after t steps: a float32 0-d tensor multiplied by each
    float32(mu_s), rounded to float32 every step."""
    prod = np.float32(1.0)
    for s in range(1, t + 1):
        prod = np.float32(prod * np.float32(b1 * (1.0 - 0.5 * 0.96 ** (s * momentum_decay))))
    return float(prod)


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> Transform:
    """torch's NAdam without lr and decay: mu_t = b1 (1 - 0.5 0.96^(t psi)), P = prod mu_s
    (float32, as torch keeps it); den = sqrt(v / bc2) + eps;
    u = (1 - mu_t) / (1 - P) g / den + mu_{t+1} / (1 - P mu_{t+1}) m / den."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        prod = nadam_mu_product(b1, momentum_decay, t)
        c_g, c_m = (1 - mu_t) / (1 - prod), mu_next / (1 - prod * mu_next)
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * _f64(g), u, state["mu"])
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * _f64(g) ** 2, u, state["nu"])
        bc2 = 1 - b2**t
        out = tree_map(
            lambda g, m, v: (c_g * _f64(g) + c_m * m) / (np.sqrt(v / bc2) + eps), u, mu, nu
        )
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def nadam_tx(
    learning_rate: float | Callable[[int], float] = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
) -> Transform:
    """torch's NAdam: [coupled L2] + scale_by_nadam + [decoupled decay] + lr."""
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    before, after = ([], decay) if decoupled_weight_decay else (decay, [])
    return chain(
        *before, scale_by_nadam(b1, b2, eps, momentum_decay), *after,
        scale_by_learning_rate(learning_rate),
    )  # fmt: skip


def nadamw_tx(
    learning_rate: float | Callable[[int], float] = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    momentum_decay: float = 4e-3,
) -> Transform:
    """nadamw: torch's NAdam(decoupled_weight_decay=True), optax's name and default decay."""
    return nadam_tx(learning_rate, b1, b2, eps, weight_decay, momentum_decay, True)


# references: radam


def _radam_rect(rho_t: float, rho_inf: float) -> float:
    x = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    return math.sqrt(x)


def radam(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> tuple[np.ndarray, dict]:
    """torch.optim.RAdam: p *= 1 - lr wd | L2; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
    rectified (rho_t > 5): p -= lr m_hat sqrt(bc2) / (sqrt(v) + eps) rect, else p -= lr m_hat."""
    p, g = _f64(p), _f64(g)
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - learning_rate * weight_decay)
        else:
            g = g + weight_decay * p
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(p)
        state["exp_avg_sq"] = np.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    m = state["exp_avg"] + (1 - b1) * (g - state["exp_avg"])
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    bc2 = 1 - b2**t
    m_hat = m / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / bc2
    if rho_t > 5:
        return p - learning_rate * m_hat * math.sqrt(bc2) / (np.sqrt(v) + eps) * _radam_rect(
            rho_t, rho_inf
        ), state
    return p - learning_rate * m_hat, state


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float | None = None,
    nesterov: bool = False,
) -> Transform:
    """threshold None: torch's rule (rho_t > 5, m_hat sqrt(bc2) / (sqrt(v) + eps) rect);
    a number: optax's (rho_t >= threshold, rect m_hat / (sqrt(v / bc2 + eps_root) + eps));
    nesterov (optax's): m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)."""
    rho_inf = 2 / (1 - b2) - 1

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * _f64(g), u, state["mu"])
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * _f64(g) ** 2, u, state["nu"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if nesterov:
            m_hat = tree_map(
                lambda m, g: b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * _f64(g) / bc1, mu, u
            )
        else:
            m_hat = tree_map(lambda m: m / bc1, mu)
        rho_t = rho_inf - 2 * t * b2**t / bc2
        if threshold is None and rho_t > 5:
            r = _radam_rect(rho_t, rho_inf)
            out = tree_map(lambda m, v: m * math.sqrt(bc2) / (np.sqrt(v) + eps) * r, m_hat, nu)
        elif threshold is not None and rho_t >= threshold:
            r = _radam_rect(rho_t, rho_inf)
            out = tree_map(lambda m, v: r * m / (np.sqrt(v / bc2 + eps_root) + eps), m_hat, nu)
        else:
            out = m_hat
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def radam_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> Transform:
    """[L2] + scale_by_radam + [decoupled decay] + lr: torch's RAdam."""
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    coupled, decoupled = ([], decay) if decoupled_weight_decay else (decay, [])
    return chain(*coupled, scale_by_radam(b1, b2, eps), *decoupled,
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def radam_optax_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    nesterov: bool = False,
) -> Transform:
    """scale_by_radam (optax's rule) + lr: optax's radam."""
    return chain(scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov),
                 scale_by_learning_rate(learning_rate))  # fmt: skip


# references: rprop
def _rprop_sign(g: Any, prev: Any, dtype: Any) -> np.ndarray:
    """sign(g * prev) in ``dtype``: the product underflows to 0 as the run's compute
    precision makes it (see _COMPUTE)."""
    with np.errstate(under="ignore"):
        return _f64(np.sign(_in(dtype, g) * _in(dtype, prev)))


def _rprop_leaf(g, step, prev, dtype, eta_minus, eta_plus, lo, hi, optax_rule):
    """One leaf of Rprop: (update, step, prev); torch's rule or optax's."""
    g = _f64(g)
    s = _rprop_sign(g, prev, dtype)
    if optax_rule:
        new = np.clip(step * np.where(s > 0, eta_plus, eta_minus), lo, hi)
        new_step = np.where(s == 0, step, new)
        new_prev = np.where(s < 0, 0.0, new_step * np.sign(g))
        return np.where(s < 0, 0.0, prev), new_step, new_prev
    f = np.where(s > 0, eta_plus, np.where(s < 0, eta_minus, 1.0))
    new_step = np.clip(step * f, lo, hi)
    g = np.where(s < 0, 0.0, g)
    return np.nan_to_num(np.sign(g), nan=0.0) * new_step, new_step, g  # torch: sign(nan) = 0


def scale_by_rprop(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
    optax_rule: bool = False,
) -> Transform:
    """Rprop's scaling. torch's rule: f = eta+ / eta- / 1 as sign(g prev) is > 0 / < 0 / 0;
    step = clip(step f, lo, hi); g = 0 where sign < 0; u = sign(g) step; prev = g. optax's
    (optax_rule): step kept where g prev = 0, else clip(step eta+-, lo, hi); prev = step
    sign(g) (0 where < 0); u = the old prev (0 where < 0). The step starts at lr."""
    hp = (eta_minus, eta_plus, min_step_size, max_step_size, optax_rule)

    def init(params):
        return {"step_size": tree_map(lambda x: np.full(np.shape(x), learning_rate, F64), params),
                "prev": _zeros(params)}  # fmt: skip

    def update(u, state, params=None):
        compute, step, prev = _COMPUTE.get(), state["step_size"], state["prev"]
        if compute is None or isinstance(compute, (np.dtype, type)):
            out = [tree_map(lambda g, s, p, k=k: _rprop_leaf(g, s, p, compute, *hp)[k],
                            u, step, prev) for k in range(3)]  # fmt: skip
        else:
            out = [tree_map(lambda g, s, p, d, k=k: _rprop_leaf(g, s, p, d, *hp)[k],
                            u, step, prev, compute) for k in range(3)]  # fmt: skip
        return out[0], {"step_size": out[1], "prev": out[2]}

    return Transform(init, update)


def rprop(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Rprop (_single_tensor_rprop): step_size starts at lr, prev at 0;
    f = sign(g prev) -> etaplus / etaminus / 1; step_size = clamp(step_size f, lo, hi);
    g = 0 where f = etaminus; p -= sign(g) step_size; prev = g."""
    p, g = _f64(p), _f64(g)
    if "step" not in state:
        state["step"] = 0
        state["prev"] = np.zeros_like(p)
        state["step_size"] = np.full(p.shape, learning_rate, F64)
    state["step"] += 1
    u, state["step_size"], state["prev"] = _rprop_leaf(
        g, state["step_size"], state["prev"], None, eta_minus, eta_plus, min_step_size,
        max_step_size, False,
    )  # fmt: skip
    return p - u, state


def rprop_tx(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
) -> Transform:
    """scale_by_rprop (torch's rule) + scale(-1): torch's Rprop."""
    return chain(scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size,
                                max_step_size), scale(-1.0))  # fmt: skip


def rprop_optax_tx(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
    optax_rule: bool = True,
) -> Transform:
    """scale_by_rprop (optax's rule) + scale(-1): optax's rprop."""
    return chain(scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size,
                                max_step_size, optax_rule), scale(-1.0))  # fmt: skip


# references: adabelief, yogi


def scale_by_belief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    nesterov: bool = False,
) -> Transform:
    """optax's AdaBelief scaling: m = (1-b1) g + b1 m; s = (1-b2) (g-m)^2 + b2 s + eps_root;
    u = mhat / (sqrt(shat) + eps), mhat = m / (1-b1^t) or, with nesterov,
    b1 m / (1-b1^(t+1)) + (1-b1) g / (1-b1^t)."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: (1 - b1) * _f64(g) + b1 * m, u, state["mu"])
        nu = tree_map(
            lambda g, m, s: (1 - b2) * (_f64(g) - m) ** 2 + b2 * s + eps_root, u, mu, state["nu"]
        )
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if nesterov:
            bc1_next = 1 - b1 ** (t + 1)
            mhat = tree_map(lambda g, m: b1 * (m / bc1_next) + (1 - b1) * (_f64(g) / bc1), u, mu)
        else:
            mhat = tree_map(lambda m: m / bc1, mu)
        out = tree_map(lambda m, s: m / (np.sqrt(s / bc2) + eps), mhat, nu)
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def adabelief_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    nesterov: bool = False,
) -> Transform:
    """scale_by_belief + lr: optax's adabelief."""
    return chain(
        scale_by_belief(b1, b2, eps, eps_root, nesterov), scale_by_learning_rate(learning_rate)
    )


def _yogi_nu(g: Any, v: Any, b2: float, dtype: Any) -> np.ndarray:
    """v - (1-b2) sign(v - g^2) g^2 in ``dtype`` (None: float64), each operation rounded as
    the run's compute precision does (see _COMPUTE): the sign is discontinuous, and with a
    small 1 - b2, v - g^2 cancels, so a last-bit difference in v or g^2 would be amplified."""
    d = np.dtype(F64 if dtype is None else dtype).type
    gd, vd = _in(dtype, g), _in(dtype, v)
    g2 = gd * gd
    return _f64(vd - d(1 - b2) * np.sign(vd - g2) * g2)


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> Transform:
    """optax's Yogi scaling: m, v start at initial_accumulator_value; m = (1-b1) g + b1 m;
    v = v - (1-b2) sign(v - g^2) g^2; u = mhat / (sqrt(vhat + eps_root) + eps)."""

    def init(params):
        # the start value as the state holds it (float32 state for float32/float16 params)
        compute = _COMPUTE.get()

        def start(x: Any, d: Any = compute) -> np.ndarray:
            return np.full(np.shape(x), _f64(_in(d, initial_accumulator_value)))

        if compute is None or isinstance(compute, (np.dtype, type)):
            full = tree_map(start, params)
        else:
            full = tree_map(start, params, compute)
        return {"count": 0, "mu": full, "nu": tree_map(np.copy, full)}

    def update(u, state, params=None):
        t = state["count"] + 1
        compute = _COMPUTE.get()
        mu = tree_map(lambda g, m: (1 - b1) * _f64(g) + b1 * m, u, state["mu"])
        if compute is None or isinstance(compute, (np.dtype, type)):
            nu = tree_map(lambda g, v: _yogi_nu(g, v, b2, compute), u, state["nu"])
        else:
            nu = tree_map(lambda g, v, d: _yogi_nu(g, v, b2, d), u, state["nu"], compute)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = tree_map(lambda m, v: (m / bc1) / (np.sqrt(v / bc2 + eps_root) + eps), mu, nu)
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def yogi_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
) -> Transform:
    """scale_by_yogi + lr: optax's yogi."""
    return chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))


functional = types.SimpleNamespace(
    sgd=sgd_tx, momentum=momentum_tx, adam=adam_tx, adamw=adamw_tx, rmsprop=rmsprop_tx
)


# references: amsgrad, asgd


def adam_amsgrad(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = True,
    decoupled: bool = False,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adam/AdamW(amsgrad=True): vmax = max(vmax, v) over the raw v;
    denom = sqrt(vmax) / sqrt(bc2) + eps (coupled L2, or p *= 1 - lr wd when decoupled)."""
    assert amsgrad
    p, g = _f64(p), _f64(g)
    if decoupled:
        p = p * (1 - learning_rate * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    if "step" not in state:
        state.update(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p),
                     max_exp_avg_sq=np.zeros_like(p))  # fmt: skip
    state["step"] += 1
    t = state["step"]
    m = state["exp_avg"] + (1 - b1) * (g - state["exp_avg"])
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    vmax = np.maximum(state["max_exp_avg_sq"], v)
    state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] = m, v, vmax
    denom = np.sqrt(vmax) / math.sqrt(1 - b2**t) + eps
    return p - (learning_rate / (1 - b1**t)) * m / denom, state


def adamw_amsgrad(p: Any, g: Any, state: dict, **hp: Any) -> tuple[np.ndarray, dict]:
    return adam_amsgrad(p, g, state, **{"weight_decay": 0.01, **hp}, decoupled=True)


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    torch_rule: bool = False,
) -> Transform:
    """optax's scale_by_amsgrad: vmax = max(vmax, v / bc2) (raw v without bias_correction_nu),
    u = mhat / (sqrt(vmax + eps_root) + eps); torch_rule: vmax over the raw v, then
    u = mhat / (sqrt(vmax) / sqrt(bc2) + eps)."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params),
                "nu_max": _zeros(params)}  # fmt: skip

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * _f64(g), u, state["mu"])
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * _f64(g) ** 2, u, state["nu"])
        bc1 = 1 - b1**t if bias_correction_mu or torch_rule else 1.0
        bc2 = 1 - b2**t
        if torch_rule:
            vmax = tree_map(np.maximum, state["nu_max"], nu)
            out = tree_map(lambda m, w: (m / bc1) / (np.sqrt(w) / math.sqrt(bc2) + eps), mu, vmax)
        else:
            c2 = bc2 if bias_correction_nu else 1.0
            vmax = tree_map(lambda w, v: np.maximum(w, v / c2), state["nu_max"], nu)
            out = tree_map(lambda m, w: (m / bc1) / (np.sqrt(w + eps_root) + eps), mu, vmax)
        return out, {"count": t, "mu": mu, "nu": nu, "nu_max": vmax}

    return Transform(init, update)


def adam_amsgrad_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = True,
) -> Transform:
    """torch's Adam(amsgrad=True): [coupled L2] + the torch AMSGrad scaling + lr."""
    assert amsgrad
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_amsgrad(b1, b2, eps, torch_rule=True),
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def adamw_amsgrad_tx(
    learning_rate: float | Callable[[int], float] = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = True,
) -> Transform:
    """torch's AdamW(amsgrad=True): the torch AMSGrad scaling + decoupled decay + lr."""
    assert amsgrad
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_amsgrad(b1, b2, eps, torch_rule=True), *parts,
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def amsgrad_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> Transform:
    """optax's amsgrad: scale_by_amsgrad + lr."""
    return chain(
        scale_by_amsgrad(b1, b2, eps, eps_root, bias_correction_mu, bias_correction_nu),
        scale_by_learning_rate(learning_rate),
    )


def asgd_eta(lr: float, lambd: float, alpha: float, count: int) -> float:
    """torch's eta after count steps: computed in double, stored as float32."""
    return float(np.float32(lr / ((1 + lambd * lr * count) ** alpha)))


def scale_by_asgd(
    learning_rate: float | Callable[[int], float] = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
) -> Transform:
    """torch's ASGD step as an update: u = -lambd eta p - eta g (= p (1 - lambd eta) - eta g
    - p); ax = p + u if mu == 1 else ax + (p + u - ax) mu; eta, mu (float32) from the count,
    eta from the previous step's lr."""

    def init(params):
        return {"count": 0, "ax": _zeros(params)}

    def update(u, state, params=None):
        c = state["count"]
        lr = learning_rate(max(c - 1, 0)) if callable(learning_rate) else learning_rate
        eta = asgd_eta(lr, lambd, alpha, c)
        mu = float(np.float32(1 / max(1, c - t0)))
        out = tree_map(lambda p, g: -(lambd * eta) * _f64(p) - eta * _f64(g), params, u)
        new_p = tree_map(lambda p, d: _f64(p) + d, params, out)
        if mu == 1:
            ax = new_p
        else:
            ax = tree_map(lambda a, q: a + (q - a) * mu, state["ax"], new_p)
        return out, {"count": c + 1, "ax": ax}

    return Transform(init, update)


def asgd_tx(
    learning_rate: float | Callable[[int], float] = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
) -> Transform:
    """torch's ASGD: [coupled L2] + scale_by_asgd (the learning rate is inside)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_asgd(learning_rate, lambd, alpha, t0))


def asgd(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """torch.optim.ASGD with its state keys: step, eta, mu (float32 values), ax."""
    p, g = _f64(p), _f64(g)
    if "step" not in state:
        state.update(step=0, eta=float(np.float32(learning_rate)), mu=1.0, ax=np.zeros_like(p))
    state["step"] += 1
    if weight_decay != 0:
        g = g + weight_decay * p
    eta = state["eta"]
    p = p * (1 - lambd * eta) - eta * g
    state["ax"] = p.copy() if state["mu"] == 1 else state["ax"] + (p - state["ax"]) * state["mu"]
    t = state["step"]
    state["eta"] = asgd_eta(learning_rate, lambd, alpha, t)
    state["mu"] = float(np.float32(1 / max(1, t - t0)))
    return p, state


# references: noisy_sgd

# The storage dtype (tree) of run_transform's run: add_noise numbers each element within the
# leaves of its storage dtype (float16 and float32 leaves are separate groups).
_STORAGE: contextvars.ContextVar[Any] = contextvars.ContextVar("storage_dtype", default=None)

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: Sequence[Any], key: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Philox-4x32-10 (Salmon et al. 2011, Random123's philox4x32_10) in uint64 arithmetic:
    ``counter`` four arrays (or ints) of 32-bit words, ``key`` two 32-bit words; returns the
    four output words (uint64 arrays holding 32-bit values)."""
    c = [np.asarray(x, dtype=np.uint64) & _U32 for x in counter]
    k = [np.uint64(key[0]) & _U32, np.uint64(key[1]) & _U32]
    for r in range(10):
        if r:
            k = [(k[0] + _PHILOX_W[0]) & _U32, (k[1] + _PHILOX_W[1]) & _U32]
        p0 = _PHILOX_M[0] * c[0]  # < 2**64: exact
        p1 = _PHILOX_M[1] * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k[0],
            p1 & _U32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k[1],
            p0 & _U32,
        ]
    return tuple(c)


def _ndtri(p: np.ndarray) -> np.ndarray:
    """Phi^-1(p) for p in (0, 1) in float64 (Wichura 1988, AS 241 PPND16: rel. error ~1e-16)."""
    q = p - 0.5
    r = np.where(q < 0, p, 1.0 - p)  # the nearer tail's mass
    z = np.empty_like(p)
    c = np.abs(q) <= 0.425
    s = 0.180625 - q[c] ** 2
    a = [
        3.387132872796366608,
        133.14166789178437745,
        1971.5909503065514427,
        13731.693765509461125,
        45921.953931549871457,
        67265.770927008700853,
        33430.575583588128105,
        2509.080928730122673,
    ]
    b = [
        1.0,
        42.31333070160091,
        687.1870074920579,
        5394.196021424751,
        21213.79430158660,
        39307.89580009271,
        28729.08573572194,
        5226.495278852545,
    ]
    num = (((((a[7] * s + a[6]) * s + a[5]) * s + a[4]) * s + a[3]) * s + a[2]) * s + a[1]
    den = (((((b[7] * s + b[6]) * s + b[5]) * s + b[4]) * s + b[3]) * s + b[2]) * s + b[1]
    z[c] = q[c] * (num * s + a[0]) / (den * s + b[0])
    t = np.sqrt(-np.log(r[~c]))
    near = t <= 5.0
    u = np.where(near, t - 1.6, t - 5.0)
    cn = [
        1.42343711074968357734,
        4.63033784615654529590,
        5.76949722146069140550,
        3.64784832476320460504,
        1.27045825245236838258,
        0.241780725177450611770,
        0.0227238449892691845833,
        7.74545014278341407640e-4,
    ]
    dn = [
        1.0,
        2.05319162663775882187,
        1.67638483018380384940,
        0.689767334985100004550,
        0.148103976427480074590,
        0.0151986665636164571966,
        5.47593808499534494600e-4,
        1.05075007164441684324e-9,
    ]
    ef = [
        6.65790464350110377720,
        5.46378491116411436990,
        1.78482653991729133580,
        0.296560571828504891230,
        0.0265321895265761230930,
        0.00124266094738807843860,
        2.71155556874348757815e-5,
        2.01033439929228813265e-7,
    ]
    ff = [
        1.0,
        0.599832206555887937690,
        0.136929880922735805310,
        0.0148753612908506148525,
        7.86869131145613259100e-4,
        1.84631831751005468180e-5,
        1.42151175831644588870e-7,
        2.04426310338993978564e-15,
    ]
    n = np.where(near, cn[7], ef[7])
    d = np.where(near, dn[7], ff[7])
    for k in range(6, -1, -1):
        n = n * u + np.where(near, cn[k], ef[k])
        d = d * u + np.where(near, dn[k], ff[k])
    z[~c] = np.where(q[~c] < 0, -1.0, 1.0) * n / d
    return z


def philox_normal(bits: Sequence[np.ndarray], double: bool) -> np.ndarray:
    """The normal from Philox words as the kernels draw it, in float64. Float compute:
    inversion, Phi^-1(u) at u = (word 0 + 1/2) / 2^32 (the kernel evaluates it by Giles's
    erfinv, rel. error < 1e-6). Double compute: Box-Muller from 53-bit uniforms from all
    four words."""
    if double:
        a = ((bits[0] << np.uint64(32)) | bits[1]) >> np.uint64(11)
        b = ((bits[2] << np.uint64(32)) | bits[3]) >> np.uint64(11)
        u1, u2 = (a + np.uint64(1)).astype(F64) * 2.0**-53, b.astype(F64) * 2.0**-53
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    u = (np.asarray(bits[0]).astype(F64) + 0.5) * 2.0**-32
    return _ndtri(np.atleast_1d(u)).reshape(np.shape(u))


def noise_of(tree: Any, t: int, seed: int, storage: Any = None) -> Any:
    """The standard normals of step ``t`` for every element of ``tree`` (float64): element
    index = position among the leaves of the same storage dtype (``storage``: one dtype, a
    tree of them, or None for float64), back to back in tree order."""
    leaves, treedef = optree.tree_flatten(tree, none_is_leaf=False)
    if storage is None or isinstance(storage, (np.dtype, type)):
        dtypes = [np.dtype(F64 if storage is None else storage)] * len(leaves)
    else:
        dtypes = [np.dtype(d) for d in optree.tree_leaves(storage)]
    origin: dict[np.dtype, int] = {}
    out = []
    for x, d in zip(leaves, dtypes, strict=True):
        size = int(np.size(x))
        idx = np.arange(origin.get(d, 0), origin.get(d, 0) + size, dtype=np.uint64)
        origin[d] = origin.get(d, 0) + size
        bits = philox4x32_10((idx, idx >> np.uint64(32), t, 0), (seed, seed >> 32))
        out.append(philox_normal(bits, d == np.float64).reshape(np.shape(x)))
    return optree.tree_unflatten(treedef, out)


def add_noise(eta: float, gamma: float, seed: int = 0) -> Transform:
    """optax's add_noise with the library's generator: t = count + 1;
    u = g + sqrt(eta / t^gamma) z, z = noise_of(u, t, seed) (see noise_of)."""

    def init(params):
        return {"count": 0}

    def update(u, state, params=None):
        t = state["count"] + 1
        std = math.sqrt(eta / float(t) ** gamma)
        z = noise_of(u, t, seed, _STORAGE.get())
        return tree_map(lambda g, n: _f64(g) + std * n, u, z), {"count": t}

    return Transform(init, update)


def noisy_sgd_tx(
    learning_rate: float | Callable[[int], float],
    eta: float = 0.01,
    gamma: float = 0.55,
    seed: int = 0,
    maximize: bool = False,
) -> Transform:
    """[scale(-1)] + add_noise + lr: optax's noisy_sgd (and NoisySGD without weight decay)."""
    head = [scale(-1.0)] if maximize else []
    return chain(*head, add_noise(eta, gamma, seed), scale_by_learning_rate(learning_rate))


def noisy_sgd_wd_tx(
    learning_rate: float | Callable[[int], float],
    eta: float = 0.01,
    gamma: float = 0.55,
    seed: int = 0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> Transform:
    """NoisySGD: [scale(-1)] + coupled decay (g + wd p) + add_noise + lr."""
    head = [scale(-1.0)] if maximize else []
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*head, *decay, add_noise(eta, gamma, seed), scale_by_learning_rate(learning_rate))


# references: sign_sgd, signum, ema, optimistic


def _per_leaf(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn(*leaves, dtype)`` over the trees, ``dtype`` the leaf's compute dtype of the run
    (None: float64; see _COMPUTE)."""
    compute = _COMPUTE.get()
    if compute is None or isinstance(compute, (np.dtype, type)):
        return tree_map(lambda *xs: fn(*xs, compute), *trees)
    return tree_map(fn, *trees, compute)


def _sign(x: Any) -> np.ndarray:
    """jnp.sign: -1, 0, +1, NaN for NaN."""
    return _f64(np.sign(_f64(x)))


def scale_by_sign() -> Transform:
    """optax's scale_by_sign: u = sign(u) (stateless)."""
    return Transform(lambda params: (), lambda u, state, params=None: (tree_map(_sign, u), state))


def ema(decay: float, debias: bool = True) -> Transform:
    """optax's ema: e = (1 - decay) u + decay e, rounded as the run's compute precision rounds
    it (the sign of e is signum's update, see _COMPUTE); u = e / (1 - decay^t) with debias,
    else e."""

    def update(u, state, params=None):
        t = state["count"] + 1
        e = _per_leaf(lambda g, m, d: _lion_moment(g, m, decay, d), u, state["ema"])
        out = tree_map(lambda m: m / (1 - decay**t), e) if debias else tree_map(np.copy, e)
        return out, {"count": t, "ema": e}

    return Transform(lambda params: {"count": 0, "ema": _zeros(params)}, update)


def sign_sgd_tx(learning_rate: float | Callable[[int], float]) -> Transform:
    """scale_by_sign + lr: optax's sign_sgd."""
    return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))


def signum_tx(learning_rate: float | Callable[[int], float], beta: float = 0.9) -> Transform:
    """ema(beta, debias=False) + scale_by_sign + lr: optax's signum."""
    return chain(ema(beta, debias=False), scale_by_sign(), scale_by_learning_rate(learning_rate))


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> Transform:
    """optax's optimistic gradient: u = (alpha + beta) g - beta g_prev (g_prev = g at the first
    step), then g_prev = g."""

    def update(u, state, params=None):
        first = state["count"] == 0
        prev = tree_f64(u) if first else state["previous_gradient"]
        out = tree_map(lambda g, q: (alpha + beta) * _f64(g) - beta * q, u, prev)
        return out, {"count": state["count"] + 1, "previous_gradient": tree_f64(u)}

    return Transform(lambda params: {"count": 0, "previous_gradient": _zeros(params)}, update)


def optimistic_gradient_descent_tx(
    learning_rate: float | Callable[[int], float], alpha: float = 1.0, beta: float = 1.0
) -> Transform:
    """scale_by_optimistic_gradient + lr: optax's optimistic_gradient_descent."""
    return chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))


def scale_by_adam_optax(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    nesterov: bool = False,
) -> Transform:
    """optax's scale_by_adam: u = mhat / (sqrt(v / (1-b2^t) + eps_root) + eps), mhat = m /
    (1-b1^t) or, with nesterov, b1 m / (1-b1^(t+1)) + (1-b1) g / (1-b1^t)."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        t = state["count"] + 1
        mu = tree_map(lambda g, m: (1 - b1) * _f64(g) + b1 * m, u, state["mu"])
        nu = tree_map(lambda g, v: (1 - b2) * _f64(g) ** 2 + b2 * v, u, state["nu"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if nesterov:
            bc1_next = 1 - b1 ** (t + 1)
            mhat = tree_map(lambda g, m: b1 * (m / bc1_next) + (1 - b1) * (_f64(g) / bc1), u, mu)
        else:
            mhat = tree_map(lambda m: m / bc1, mu)
        out = tree_map(lambda m, v: m / (np.sqrt(v / bc2 + eps_root) + eps), mhat, nu)
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def optimistic_adam_v2_tx(
    learning_rate: float | Callable[[int], float],
    alpha: float = 1.0,
    beta: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    nesterov: bool = True,
) -> Transform:
    """optax's scale_by_adam (nesterov by default) + scale_by_optimistic_gradient + lr:
    optax's optimistic_adam_v2."""
    return chain(
        scale_by_adam_optax(b1, b2, eps, eps_root, nesterov),
        scale_by_optimistic_gradient(alpha, beta),
        scale_by_learning_rate(learning_rate),
    )


# references: adan, adopt


def scale_by_adan(
    b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8, eps_root: float = 0.0
) -> Transform:
    """optax's Adan scaling: d = g - g_prev (0 at the first step); m = (1-b1) g + b1 m;
    v = (1-b2) d + b2 v; n = (1-b3) (g + (1-b2) d)^2 + b3 n;
    u = (mhat + (1-b2) vhat) / (sqrt(nhat + eps_root) + eps)."""

    def init(params):
        zeros = _zeros(params)
        return {"count": 0, "m": zeros, "v": _zeros(params), "n": _zeros(params),
                "g": _zeros(params)}  # fmt: skip

    def update(u, state, params=None):
        c = state["count"]
        t = c + 1
        d = tree_map(lambda g, q: 0.0 * _f64(g) if c == 0 else _f64(g) - q, u, state["g"])
        m = tree_map(lambda g, x: (1 - b1) * _f64(g) + b1 * x, u, state["m"])
        v = tree_map(lambda x, y: (1 - b2) * x + b2 * y, d, state["v"])
        n = tree_map(lambda g, x, y: (1 - b3) * (_f64(g) + (1 - b2) * x) ** 2 + b3 * y,
                     u, d, state["n"])  # fmt: skip
        bc1, bc2, bc3 = 1 - b1**t, 1 - b2**t, 1 - b3**t
        out = tree_map(
            lambda x, y, z: (x / bc1 + (1 - b2) * (y / bc2)) / (np.sqrt(z / bc3 + eps_root) + eps),
            m, v, n,
        )  # fmt: skip
        return out, {"count": t, "m": m, "v": v, "n": n, "g": tree_map(_f64, u)}

    return Transform(init, update)


def adan_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """scale_by_adan + [add_decayed_weights] + lr: optax's adan (decoupled decay)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_adan(b1, b2, b3, eps, eps_root), *parts,
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    nesterov: bool = False,
    use_clipping: bool = True,
) -> Transform:
    """optax.contrib's ADOPT scaling: x = clip(g / max(sqrt(nu_old), eps), -t^0.25, t^0.25)
    (t from 0); nu = (1-b2) g^2 + b2 nu; m = (1-b1) x + b1 m; u = m (nesterov:
    (1-b1) x + b1 m); at t = 0, nu = g^2 and m is kept."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        c = state["count"]
        b1_, b2_ = (b1, b2) if c > 0 else (1.0, 0.0)
        x = tree_map(lambda g, v: _f64(g) / np.maximum(np.sqrt(v), eps), u, state["nu"])
        if use_clipping:
            x = tree_map(lambda y: np.clip(y, -(c**0.25), c**0.25), x)
        nu = tree_map(lambda g, v: (1 - b2_) * _f64(g) ** 2 + b2_ * v, u, state["nu"])
        mu = tree_map(lambda y, m: (1 - b1_) * y + b1_ * m, x, state["mu"])
        out = tree_map(lambda y, m: (1 - b1_) * y + b1_ * m, x, mu) if nesterov else mu
        return out, {"count": c + 1, "mu": mu, "nu": nu}

    return Transform(init, update)


def adopt_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    nesterov: bool = False,
    use_clipping: bool = True,
) -> Transform:
    """scale_by_adopt + lr: optax.contrib's adopt."""
    return chain(scale_by_adopt(b1, b2, eps, nesterov, use_clipping),
                 scale_by_learning_rate(learning_rate))  # fmt: skip


# references: ademamix, madgrad, cocob


def _at(value: Any, count: int) -> float:
    """A hyperparameter's value at ``count``: a float, or a schedule of the count."""
    return float(value(count)) if callable(value) else value


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float | Callable[[int], float] = 0.9999,
    alpha: float | Callable[[int], float] = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> Transform:
    """optax.contrib's AdEMAMix scaling: m1 = (1-b1) g + b1 m1; m2 = (1-b3) g + b3 m2;
    nu = (1-b2) g^2 + b2 nu; u = (m1 / (1-b1^t) + alpha m2) / (sqrt(nu / (1-b2^t) + eps_root)
    + eps); b3 and alpha may be schedules of the count before the step."""

    def init(params):
        return {"count": 0, "m1": _zeros(params), "m2": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        c = state["count"]
        t, c_b3, c_alpha = c + 1, _at(b3, c), _at(alpha, c)
        m1 = tree_map(lambda g, m: (1 - b1) * _f64(g) + b1 * m, u, state["m1"])
        m2 = tree_map(lambda g, m: (1 - c_b3) * _f64(g) + c_b3 * m, u, state["m2"])
        nu = tree_map(lambda g, v: (1 - b2) * _f64(g) ** 2 + b2 * v, u, state["nu"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = tree_map(
            lambda a, b, v: (a / bc1 + c_alpha * b) / (np.sqrt(v / bc2 + eps_root) + eps),
            m1, m2, nu,
        )  # fmt: skip
        return out, {"count": t, "m1": m1, "m2": m2, "nu": nu}

    return Transform(init, update)


def ademamix_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float | Callable[[int], float] = 0.9999,
    alpha: float | Callable[[int], float] = 5.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """scale_by_ademamix + [add_decayed_weights] + lr: optax.contrib's ademamix."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_ademamix(b1, b2, b3, alpha, eps), *parts,
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def scale_by_simplified_ademamix(
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: float | Callable[[int], float] = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> Transform:
    """optax.contrib's simplified AdEMAMix scaling: m = g + b1 m; n = g^2 + b2 (n - g^2)
    (computed as (1-b2) g^2 + b2 n); u = (m + alpha g) / (sqrt(n / (1-b2^t) + eps_root) + eps)."""

    def init(params):
        return {"count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def update(u, state, params=None):
        c = state["count"]
        t, c_alpha = c + 1, _at(alpha, c)
        mu = tree_map(lambda g, m: _f64(g) + b1 * m, u, state["mu"])
        nu = tree_map(lambda g, n: (1 - b2) * _f64(g) ** 2 + b2 * n, u, state["nu"])
        bc2 = 1 - b2**t
        out = tree_map(
            lambda g, m, n: (m + c_alpha * _f64(g)) / (np.sqrt(n / bc2 + eps_root) + eps),
            u, mu, nu,
        )  # fmt: skip
        return out, {"count": t, "mu": mu, "nu": nu}

    return Transform(init, update)


def simplified_ademamix_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: float | Callable[[int], float] = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> Transform:
    """scale_by_simplified_ademamix + [add_decayed_weights] + lr: optax.contrib's
    simplified_ademamix."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root), *parts,
                 scale_by_learning_rate(learning_rate))  # fmt: skip


def madgrad_lamb(learning_rate: float, eps: float, count: int) -> float:
    """(lr + eps) sqrt(k + 1), in float32 as optax.contrib computes it (the root of its int32
    count is a float32 array, lr + eps a weakly typed scalar)."""
    f32 = np.float32
    return float(f32(learning_rate + eps) * np.sqrt(f32(count + 1)))


def scale_by_madgrad(
    learning_rate: float | Callable[[int], float], momentum: float = 0.9, eps: float = 1e-6
) -> Transform:
    """optax.contrib's MADGRAD scaling: G = G + lamb g^2; s = s + lamb g;
    z = x0 - s / (cbrt(G) + eps); u = (1 - momentum) z + momentum p - p (x0: the first
    params). x0 is kept as d = x0 - p (d = -sum of the updates), so u = (1 - momentum)
    (d - s / (cbrt(G) + eps)): optax's value without the rounding of p's magnitude, and no
    dependence on how the params were rounded (as the device computes it)."""

    def init(params):
        return {"count": 0, "gsq": _zeros(params), "s": _zeros(params), "d": _zeros(params)}

    def update(u, state, params=None):
        c = state["count"]
        lamb = madgrad_lamb(_at(learning_rate, c), eps, c)
        gsq = tree_map(lambda g, a: a + lamb * _f64(g) ** 2, u, state["gsq"])
        s = tree_map(lambda g, a: a + lamb * _f64(g), u, state["s"])
        out = tree_map(lambda d, a, b: (1 - momentum) * (d - a / (np.cbrt(b) + eps)),
                       state["d"], s, gsq)  # fmt: skip
        d = tree_map(lambda d, x: d - x, state["d"], out)
        return out, {"count": c + 1, "gsq": gsq, "s": s, "d": d}

    return Transform(init, update)


def madgrad_tx(
    learning_rate: float | Callable[[int], float],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
) -> Transform:
    """[add_decayed_weights] + scale_by_madgrad: optax.contrib's madgrad (coupled decay)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_madgrad(learning_rate, momentum, eps))


def scale_by_cocob(alpha: float = 100.0, eps: float = 1e-8) -> Transform:
    """optax.contrib's COCOB scaling: L = max(L, |g|) (L starts at eps); G = G + |g|;
    R = max(R - g (p - p0), 0); C = C - g; u = -p + (p0 + bet) (p0: the first params),
    bet = C / (L max(G + L, alpha L)) (L + R). p0 is kept as d = p0 - p (-bet after a step),
    so u = d + bet: optax's value without the rounding of p's magnitude, and no dependence on
    how the params were rounded (as the device computes it)."""

    def init(params):
        return {"d": _zeros(params), "C": _zeros(params),
                "L": tree_map(lambda x: np.full(np.shape(x), eps), params),
                "G": _zeros(params), "R": _zeros(params)}  # fmt: skip

    def update(u, state, params=None):
        d = state["d"]
        L = tree_map(lambda a, g: np.maximum(a, np.abs(_f64(g))), state["L"], u)
        G = tree_map(lambda a, g: a + np.abs(_f64(g)), state["G"], u)
        R = tree_map(lambda r, g, x: np.maximum(r + _f64(g) * x, 0.0), state["R"], u, d)
        C = tree_map(lambda a, g: a - _f64(g), state["C"], u)
        bet = tree_map(lambda c, l, gg, r: c / (l * np.maximum(gg + l, alpha * l)) * (l + r),
                       C, L, G, R)  # fmt: skip
        out = tree_map(lambda x, b: x + b, d, bet)
        new_d = tree_map(lambda b: -b, bet)
        return out, {"d": new_d, "C": C, "L": L, "G": G, "R": R}

    return Transform(init, update)


def cocob_tx(
    learning_rate: float | Callable[[int], float] = 1.0,
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """[add_decayed_weights] + lr (not negated) + scale_by_cocob: optax.contrib's cocob."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_learning_rate(learning_rate, flip_sign=False),
                 scale_by_cocob(alpha, eps))  # fmt: skip


def transform_rule(make: Callable[..., Transform]) -> Callable[..., tuple[np.ndarray, dict]]:
    """A torch-style rule from a transform factory: ``rule(p, g, state, **hp)`` runs
    ``make(**hp)`` on one array, its state kept under ``state["tx"]`` (constant hyperparameters)."""

    def rule(p: Any, g: Any, state: dict, **hp: Any) -> tuple[np.ndarray, dict]:
        p, tx = _f64(p), make(**hp)
        if "tx" not in state:
            state["tx"] = tx.init(p)
        u, state["tx"] = tx.update(_f64(g), state["tx"], p)
        return p + u, state

    return rule


def _round(tree: Any, dtype: Any) -> Any:
    """Round every leaf to ``dtype`` (one dtype, or a tree of dtypes shaped like ``tree``)."""
    if dtype is None:
        return tree_f64(tree)  # also turns numpy scalars (0-d arithmetic) back into arrays
    if isinstance(dtype, (np.dtype, type)):
        return tree_map(lambda x: _f64(np.asarray(x).astype(dtype)), tree)
    return tree_map(lambda x, d: _f64(np.asarray(x).astype(d)), tree, dtype)


def run_transform(
    tx: Transform,
    params0: Any,
    grads_seq: Sequence[Any],
    *,
    storage_dtype: Any = None,
) -> tuple[list[Any], list[Any], Any]:
    """Run ``tx`` + ``apply_updates`` from ``params0`` over ``grads_seq``.

    Returns (params after each step, updates of each step, final state), all float64. With
    ``storage_dtype`` (one dtype, or a tree of dtypes shaped like the params) the updates and the
    params are rounded to it after every step, as a device that stores them so would.
    """
    params = _round(tree_f64(params0), storage_dtype)
    token = _COMPUTE.set(_compute_dtype(storage_dtype))
    stored = _STORAGE.set(storage_dtype)
    try:
        return _run(tx, params, grads_seq, storage_dtype)
    finally:
        _STORAGE.reset(stored)
        _COMPUTE.reset(token)


def _compute_dtype(storage: Any) -> Any:
    """float32 arithmetic for float16 and float32 storage; None (exact) for float64."""
    if storage is None:
        return None
    one = lambda d: np.float64 if np.dtype(d) == np.float64 else np.float32  # noqa: E731
    if isinstance(storage, (np.dtype, type)):
        return one(storage) if np.dtype(storage) != np.float64 else None
    return tree_map(one, storage)


def _run(tx: Transform, params: Any, grads_seq: Sequence[Any], storage_dtype: Any) -> tuple:
    state = tx.init(params)
    ps, us = [], []
    for g in grads_seq:
        u, state = tx.update(tree_f64(g), state, params)
        u = _round(u, storage_dtype)
        params = _round(apply_updates(params, u), storage_dtype)
        ps.append(params)
        us.append(u)
    return ps, us, state


# ---------------------------------------------------------------------------------------------
# schedule-free (optax.contrib's)
# ---------------------------------------------------------------------------------------------


def scale_by_rms_bias_corrected(b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """optax's scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True):
    nu = (1 - b2) g^2 + b2 nu; u = g / (sqrt(nu / (1 - b2^t)) + eps)."""

    def update(u, state, params=None):
        t = state["count"] + 1
        nu = tree_map(lambda g, v: (1 - b2) * _f64(g) ** 2 + b2 * v, u, state["nu"])
        out = tree_map(lambda g, v: _f64(g) / (np.sqrt(v / (1 - b2**t)) + eps), u, nu)
        return out, {"count": t, "nu": nu}

    return Transform(lambda params: {"count": 0, "nu": _zeros(params)}, update)


def schedule_free(
    base: Transform,
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
) -> Transform:
    """optax.contrib's schedule_free around ``base`` (called with params = y):
    lr = lr(t) (t from 1); max_lr = max(max_lr, lr); w = max_lr^P; W += w; ck = w / W (0 for
    0/0); z' = z + base(g); x = (1 - ck) (y - (1 - b1) z) / b1 + ck z';
    u = b1 x + (1 - b1) z' - y."""

    def init(params):
        return {"base": base.init(params), "z": tree_f64(params), "weight_sum": 0.0,
                "max_lr": 0.0, "step_count": 1}  # fmt: skip

    def update(u, state, params=None):
        if params is None:
            raise ValueError("schedule_free needs params")
        t = state["step_count"]
        lr = learning_rate(t) if callable(learning_rate) else learning_rate
        max_lr = max(state["max_lr"], lr)
        weight = max_lr**weight_lr_power
        total = state["weight_sum"] + weight
        ck = weight / total if total else 0.0
        base_u, base_state = base.update(u, state["base"], params)
        z = tree_map(lambda a, b: a + b, state["z"], base_u)

        def new_update(y, z_old, z_new):
            x = (1 - ck) * (_f64(y) - (1 - b1) * z_old) / b1 + ck * z_new
            return b1 * x + (1 - b1) * z_new - _f64(y)

        out = tree_map(new_update, params, state["z"], z)
        return out, {"base": base_state, "z": z, "weight_sum": total, "max_lr": max_lr,
                     "step_count": t + 1}  # fmt: skip

    return Transform(init, update)


def _sf_warmup(learning_rate: float, warmup_steps: int | None) -> Any:
    """optax's warmup_constant_schedule(0, lr, warmup_steps), whose values are float32."""
    if warmup_steps is None:
        return learning_rate
    f32 = np.float32

    def schedule(c):
        if c >= warmup_steps:
            return float(f32(learning_rate))
        frac = f32(1) - f32(c) / f32(warmup_steps)
        return float(f32(-learning_rate) * frac + f32(learning_rate))

    return schedule


def schedule_free_adamw_tx(
    learning_rate: float = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
) -> Transform:
    """optax.contrib's schedule_free_adamw."""
    lr = _sf_warmup(learning_rate, warmup_steps)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    base = chain(scale_by_rms_bias_corrected(b2, eps), *decay, scale_by_learning_rate(lr))
    return schedule_free(base, lr, b1, weight_lr_power)


def schedule_free_sgd_tx(
    learning_rate: float = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
) -> Transform:
    """optax.contrib's schedule_free_sgd."""
    lr = _sf_warmup(learning_rate, warmup_steps)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return schedule_free(chain(*decay, scale_by_learning_rate(lr)), lr, b1, weight_lr_power)
