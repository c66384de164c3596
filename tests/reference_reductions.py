"""Float64 NumPy references for the per-tensor / per-axis rules of issue #16.

Written from optax 0.2.8 (``optax/_src/transform.py``, ``alias.py``, ``factorized.py``,
``optax/transforms/_clipping.py``, ``optax/_src/numerics.py``) and torch 2.13's
``torch/optim/_adafactor.py`` (``_single_tensor_adafactor``), following
``shared/reference/optimizers.md`` section 2. Nothing here is derived from a netcl kernel.

Transforms follow ``reference.Transform`` (``init``, ``update(u, state, params=None)``) on a
single array or any pytree (``None`` is an empty subtree); states are plain dicts of float64
arrays and Python int counts. ``adafactor`` is a torch-style rule
``adafactor(p, g, state, **hp) -> (new_p, state)`` with torch's state keys.

Each rule reduces within one leaf (a "block"), except ``normalize_by_update_norm`` (one norm
over the whole tree). The state layouts:

* trust ratio, block norm/rms, clip_by_block_rms, centralize, normalize, AGC: stateless.
* novograd: ``mu`` per element, ``nu`` one 0-d scalar per leaf (EMA of ||g||^2).
* sm3: ``mu`` a list per leaf, one vector per axis (``(shape[i],)``) for rank >= 2, a single
  full-shape accumulator for rank 1 (and rank 0 here; optax raises on rank 0); ``nu`` per
  element (the momentum).
* factored rms (optax adafactor): ``v_row`` = the leaf without its largest axis, ``v_col`` =
  the leaf without its second-largest axis, ``v`` a ``(1,)`` placeholder when factored;
  ``v_row``/``v_col`` ``(1,)`` placeholders and ``v`` per element otherwise.
* torch Adafactor: ``row_var`` = shape with the last axis 1, ``col_var`` = shape with the
  second-to-last axis 1 (a (3,5,7) param: (3,5,1) and (3,1,7)), for ndim >= 2;
  ``variance`` per element for ndim <= 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optree
import reference as ref
import reference_extra as rx

F64 = np.float64
Transform = ref.Transform
_f64 = ref._f64
tree_map = ref.tree_map


def _norm(x: Any) -> float:
    """The L2 norm of every element of one leaf (a 0-d leaf: its absolute value)."""
    return math.sqrt(float(np.sum(_f64(x) ** 2)))


def _rms(x: Any) -> float:
    """The root mean square of one leaf (NaN for an empty one, as optax's mean)."""
    x = _f64(x)
    return math.sqrt(float(np.mean(x**2))) if x.size else math.nan


def _floor(value: float, minimum: float) -> float:
    """numerics.safe_norm / safe_root_mean_squares: ``minimum`` where value <= minimum."""
    return minimum if value <= minimum else value


def _stateless(leaf_fn: Callable[..., np.ndarray], needs_params: bool) -> Transform:
    def update(u, state, params=None):
        if not needs_params:
            return tree_map(lambda g: leaf_fn(_f64(g)), u), state
        if params is None:
            raise ValueError("this transform needs params")
        return tree_map(lambda g, p: leaf_fn(_f64(g), _f64(p)), u, params), state

    return Transform(lambda params: (), update)


# ---------------------------------------------------------------------------- block scalings


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> Transform:
    """Per leaf: u * tc * max(|p|, min_norm) / (max(|u|, min_norm) + eps); the ratio is 1
    where either (floored) norm is exactly 0 (optax's safe_trust_ratio: never NaN/inf)."""

    def leaf(g, p):
        p_norm, u_norm = _floor(_norm(p), min_norm), _floor(_norm(g), min_norm)
        if p_norm == 0.0 or u_norm == 0.0:
            return g * 1.0
        return g * (trust_coefficient * p_norm / (u_norm + eps))

    return _stateless(leaf, needs_params=True)


def scale_by_param_block_norm(min_scale: float = 1e-3) -> Transform:
    """Per leaf: u * max(||p||, min_scale) (min_scale where ||p|| <= min_scale)."""
    return _stateless(lambda g, p: g * _floor(_norm(p), min_scale), needs_params=True)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> Transform:
    """Per leaf: u * max(rms(p), min_scale); rms = sqrt(mean(p^2))."""
    return _stateless(lambda g, p: g * _floor(_rms(p), min_scale), needs_params=True)


def clip_by_block_rms(threshold: float) -> Transform:
    """Per leaf: u / max(1, rms(u) / threshold)."""
    return _stateless(lambda g: g / max(1.0, _rms(g) / threshold), needs_params=False)


def centralize() -> Transform:
    """Per leaf of rank > 1: u - mean(u over axes 1..); rank 0 and 1 pass through."""

    def leaf(g):
        if g.ndim <= 1 or g.size == 0:  # an empty leaf: nothing to centre
            return g
        return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)

    return _stateless(leaf, needs_params=False)


def normalize_by_update_norm(scale_factor: float = 1.0, eps: float = 1e-6) -> Transform:
    """The whole tree: u / ((||u||_global + eps) / scale_factor)."""

    def update(u, state, params=None):
        denom = (ref.global_norm(u) + eps) / scale_factor
        return tree_map(lambda g: _f64(g) / denom, u), state

    return Transform(lambda params: (), update)


# ---------------------------------------------------------------------------- adaptive clipping


def unitwise_axes(shape: Sequence[int], layout: str = "in_out") -> tuple[int, ...] | None:
    """The axes a unit's norm sums over (None: the whole leaf is one unit).

    ``in_out`` (optax / JAX: Dense [in, out], Conv HWIO, DHWIO): a leaf whose squeezed rank is
    <= 1 is one unit; rank 2 and 3 sum over axis 0 (units: the (out) columns, or (heads, out)
    pairs for a rank-3 multi-head kernel); rank 4 over (0, 1, 2) (units: O); rank 5 over
    (0, 1, 2, 3); other ranks raise. A (1, n) or (n, 1) matrix is one unit (optax squeezes).
    ``out_in`` (torch / timm: Linear [out, in], Conv OIHW): rank <= 1 is one unit, otherwise
    axis 0 holds the units and the norm sums over axes 1.. (no squeeze: an (n, 1) weight has n
    one-element units).
    """
    ndim = len(shape)
    if layout == "out_in":
        return None if ndim <= 1 else tuple(range(1, ndim))
    if layout != "in_out":
        raise ValueError(f"Invalid layout: {layout!r} (must be 'in_out' or 'out_in')")
    if sum(1 for n in shape if n != 1) <= 1:
        return None
    by_rank = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}
    if ndim not in by_rank:
        raise ValueError(f"Invalid shape: {tuple(shape)} (rank must be 1 to 5, or pass axis)")
    return by_rank[ndim]


def unitwise_norm(x: Any, axis: Any = None, layout: str = "in_out") -> np.ndarray:
    """Each element replaced by the L2 norm of its unit (``axis`` overrides ``layout``)."""
    x = _f64(x)
    axes = axis if axis is not None else unitwise_axes(x.shape, layout)
    sq = np.sum(x * x, axis=axes, keepdims=True)
    return np.broadcast_to(np.sqrt(sq), x.shape).copy()


def adaptive_grad_clip(
    clipping: float, eps: float = 1e-3, axis: Any = None, layout: str = "in_out"
) -> Transform:
    """AGC per unit: max = clipping * max(||p_unit||, eps); u where ||u_unit|| < max, else
    u * max / max(||u_unit||, 1e-6). Units: see ``unitwise_axes``."""

    def leaf(g, p):
        g_norm = unitwise_norm(g, axis, layout)
        max_norm = clipping * np.maximum(unitwise_norm(p, axis, layout), eps)
        clipped = g * (max_norm / np.maximum(g_norm, 1e-6))
        return np.where(g_norm < max_norm, g, clipped)

    return _stateless(leaf, needs_params=True)


# ---------------------------------------------------------------------------- trust-ratio family


def _add_decayed_weights(weight_decay: float | Callable[[int], float], mask: Any = None):
    """optax's add_decayed_weights: a schedule reads its own count (0 first); a mask goes
    through reference_extra.masked."""
    if callable(weight_decay):

        def update(u, state, params=None):
            wd = float(weight_decay(state["count"]))
            out = tree_map(lambda g, p: _f64(g) + wd * _f64(p), u, params)
            return out, {"count": state["count"] + 1}

        tx = Transform(lambda params: {"count": 0}, update)
    else:
        tx = ref.add_decayed_weights(weight_decay)
    if mask is None or mask is True:
        return tx
    return rx.masked(tx, mask)


def lamb_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> Transform:
    """optax.lamb without a mask (the table's rows: the stateful class has none)."""
    return lamb_masked_tx(learning_rate, b1, b2, eps, eps_root, weight_decay)


def lars_tx(
    learning_rate: float | Callable[[int], float],
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> Transform:
    """optax.lars with both masks True (the table's rows: the stateful class has none)."""
    return lars_masked_tx(learning_rate, weight_decay, True, trust_coefficient, eps, True,
                          momentum, nesterov)  # fmt: skip


def lamb_masked_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> Transform:
    """optax.lamb: scale_by_adam -> add_decayed_weights -> scale_by_trust_ratio() -> lr
    (bias-corrected, no clamp on the ratio; torch-optimizer's Lamb differs)."""
    return ref.chain(
        ref.scale_by_adam(b1, b2, eps, eps_root),
        _add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        ref.scale_by_learning_rate(learning_rate),
    )


def lars_masked_tx(
    learning_rate: float | Callable[[int], float],
    weight_decay: float = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> Transform:
    """optax.lars: add_decayed_weights -> trust ratio (tc, eps) -> lr -> trace(momentum):
    the momentum runs on the lr-scaled step (unlike torch-style LARS)."""
    ratio = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    if trust_ratio_mask is not True:
        ratio = rx.masked(ratio, trust_ratio_mask)
    return ref.chain(
        _add_decayed_weights(weight_decay, weight_decay_mask),
        ratio,
        ref.scale_by_learning_rate(learning_rate),
        ref.trace(momentum, nesterov=nesterov),
    )


def fromage_tx(learning_rate: float | Callable[[int], float], min_norm: float = 1e-6) -> Transform:
    """optax.fromage: trust_ratio(min_norm) -> lr * m -> add_decayed_weights(m - 1), with
    m = 1 / sqrt(1 + lr^2); so p <- m * (p - lr * ratio * g)."""
    if not callable(learning_rate):
        mult = 1 / (1 + learning_rate**2) ** 0.5
        return ref.chain(
            scale_by_trust_ratio(min_norm),
            ref.scale_by_learning_rate(learning_rate * mult),
            _add_decayed_weights(mult - 1),
        )
    mult_lr = lambda count: 1 / (1 + learning_rate(count) ** 2) ** 0.5  # noqa: E731
    return ref.chain(
        scale_by_trust_ratio(min_norm),
        ref.scale_by_learning_rate(lambda c: mult_lr(c) * learning_rate(c)),
        _add_decayed_weights(lambda c: mult_lr(c) - 1),
    )


# ---------------------------------------------------------------------------- novograd


def scale_by_novograd(
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mu_dtype: Any = None,
) -> Transform:
    """Per leaf: n = ||g||^2 at t = 1, then n = b2 n + (1 - b2) ||g||^2 (one scalar per leaf);
    a = g / (sqrt(n + eps_root) + eps) + wd * p; m = a at t = 1, then m = b1 m + a (no 1 - b1);
    u = m. Needs params. ``mu_dtype`` is accepted for the signature (the reference is float64)."""
    del mu_dtype

    def init(params):
        nu = tree_map(lambda p: np.zeros((), F64), params)
        return {"count": 0, "mu": ref._zeros(params), "nu": nu}

    def update(u, state, params=None):
        if params is None:
            raise ValueError("scale_by_novograd needs params")
        first = state["count"] == 0
        sq = tree_map(lambda g: _f64(_norm(g) ** 2), u)
        nu = sq if first else tree_map(lambda s, n: _f64((1 - b2) * s + b2 * n), sq, state["nu"])

        def moment(g, p, n, m):
            add = _f64(g) / (np.sqrt(n + eps_root) + eps) + weight_decay * _f64(p)
            return add if first else b1 * m + add

        mu = tree_map(moment, u, params, nu, state["mu"])
        return tree_map(np.copy, mu), {"count": state["count"] + 1, "mu": mu, "nu": nu}

    return Transform(init, update)


def novograd_tx(
    learning_rate: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> Transform:
    """optax.novograd: scale_by_novograd -> lr (the alias's eps is 1e-6, the transform's 1e-8)."""
    return ref.chain(
        scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
        ref.scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------- sm3


def _expanded(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> Transform:
    """SM3-II per leaf. Rank >= 2: one accumulator vector per axis; the element's bound is
    a = c g^2 + b2 * min_i mu_i (broadcast), c = 1 - b2 (1 when b2 == 1), then
    mu_i = max of a over the other axes. Rank <= 1: a = c g^2 + b2 mu (full shape), mu = a.
    up = g / sqrt(a + eps) where a > 0, else 0; nu = (1 - b1) up + b1 nu; u = nu.
    A 0-d leaf is treated as one element (optax 0.2.8 raises IndexError on it)."""
    c = (1.0 - b2) if b2 != 1.0 else 1.0

    def init(params):
        def per_axis(p):
            p = np.asarray(p)
            if p.ndim < 2:
                return [np.zeros(p.shape, F64)]
            return [np.zeros((n,), F64) for n in p.shape]

        return {"mu": tree_map(per_axis, params), "nu": ref._zeros(params)}

    def accum(g, mu):
        if g.ndim < 2:
            return c * g * g + b2 * mu[0]
        bound = functools.reduce(np.minimum, [_expanded(m, g.ndim, i) for i, m in enumerate(mu)])
        return c * g * g + b2 * bound

    def new_mu(a):
        if a.ndim < 2:
            return [a]
        # a >= 0: an empty axis (a zero-size leaf) leaves its accumulators at 0
        others = lambda i: tuple(j for j in range(a.ndim) if j != i)  # noqa: E731
        return [a.max(axis=others(i), initial=0.0) for i in range(a.ndim)]

    def update(u, state, params=None):
        a = tree_map(lambda g, mu: accum(_f64(g), mu), u, state["mu"])
        with np.errstate(divide="ignore"):
            up = tree_map(lambda g, s: _f64(g) * np.where(s > 0, 1 / np.sqrt(s + eps), 0.0), u, a)
        nu = tree_map(lambda x, n: (1 - b1) * x + b1 * n, up, state["nu"])
        return tree_map(np.copy, nu), {"mu": tree_map(new_mu, a), "nu": nu}

    return Transform(init, update)


def sm3_tx(learning_rate: float, momentum: float = 0.9) -> Transform:
    """optax.sm3: scale_by_sm3(b1=momentum) -> scale(-lr) (a constant lr only)."""
    return ref.chain(scale_by_sm3(momentum), ref.scale(-learning_rate))


# ---------------------------------------------------------------------------- factored rms


def decay_rate_pow(i: int, exponent: float = 0.8) -> float:
    """optax's _decay_rate_pow, 1 - (i + 1)^-exponent, computed in float32 as optax does
    (even with jax_enable_x64): the EMA weight carries float32 rounding."""
    t = np.float32(i + 1)
    return float(np.float32(1.0) - t ** np.float32(-exponent))


def factored_dims(
    shape: Sequence[int], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """(second-largest axis, largest axis) when the second largest is >= the minimum, else
    None (rank < 2 or not factored). Any rank: leading axes of a 3-D leaf are not special."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def _factored_leaf(g, v_row, v_col, v, decay, dims, epsilon):
    """One leaf of scale_by_factored_rms: (update, v_row, v_col, v)."""
    sq = g * g + epsilon
    if dims is None:
        v = decay * v + (1.0 - decay) * sq
        return g * v**-0.5, np.zeros((1,), F64), np.zeros((1,), F64), v
    d1, d0 = dims
    v_row = decay * v_row + (1.0 - decay) * sq.mean(axis=d0)
    v_col = decay * v_col + (1.0 - decay) * sq.mean(axis=d1)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_factor = (v_row / v_row.mean(axis=reduced_d1, keepdims=True)) ** -0.5
    col_factor = v_col**-0.5
    update = g * np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
    return update, v_row, v_col, np.zeros((1,), F64)


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[int, float], float] = decay_rate_pow,
) -> Transform:
    """optax's Adafactor scaling. beta = decay_rate_fn(count - step_offset, decay_rate)
    (count 0 first: beta = 0, so the first step takes g^2 + eps whole); s = g^2 + epsilon.
    Factored (d1, d0 = factored_dims): v_row = EMA of mean_{d0} s, v_col = EMA of mean_{d1} s,
    u = g * (v_row / mean_{d1}(v_row))^-1/2 [at d0] * v_col^-1/2 [at d1].
    Else v = EMA of s, u = g * v^-1/2. Needs params (only for their shapes)."""

    def init(params):
        def leaf(p):
            shape = np.shape(p)
            dims = factored_dims(shape, factored, min_dim_size_to_factor)
            if dims is None:
                one = np.zeros((1,), F64)
                return {"v_row": one, "v_col": one.copy(), "v": np.zeros(shape, F64)}
            d1, d0 = dims
            drop = lambda ax: tuple(n for i, n in enumerate(shape) if i != ax)  # noqa: E731
            return {"v_row": np.zeros(drop(d0), F64), "v_col": np.zeros(drop(d1), F64),
                    "v": np.zeros((1,), F64)}  # fmt: skip

        per = tree_map(leaf, params)
        pick = lambda k: tree_map(lambda p, s: s[k], params, per)  # noqa: E731
        return {"count": 0, "v_row": pick("v_row"), "v_col": pick("v_col"), "v": pick("v")}

    def update(u, state, params=None):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params")
        decay = float(decay_rate_fn(state["count"] - step_offset, decay_rate))

        def leaf(g, vr, vc, v, p):
            dims = factored_dims(np.shape(p), factored, min_dim_size_to_factor)
            return _factored_leaf(_f64(g), vr, vc, v, decay, dims, epsilon)

        out = tree_map(leaf, u, state["v_row"], state["v_col"], state["v"], params)
        part = lambda k: tree_map(lambda g, o: o[k], u, out)  # noqa: E731
        new = {"count": state["count"] + 1, "v_row": part(1), "v_col": part(2), "v": part(3)}
        return part(0), new

    return Transform(init, update)


def _ema_stored_as(decay: float, accumulator_dtype: Any) -> Transform:
    """optax.ema(decay, debias=False, accumulator_dtype): u = (1 - decay) g + decay * e, the
    state e rounded to ``accumulator_dtype`` (None: float64), and decay * e computed in that
    dtype too (a weak-typed Python float times a float32 array stays float32 in JAX)."""
    dtype = np.dtype(F64 if accumulator_dtype is None else accumulator_dtype)

    def moment(g, e):
        return (1 - decay) * _f64(g) + _f64(dtype.type(decay) * np.asarray(e).astype(dtype))

    def update(u, state, params=None):
        out = tree_map(moment, u, state["ema"])
        stored = tree_map(lambda e: _f64(np.asarray(e).astype(dtype)), out)
        return out, {"count": state["count"] + 1, "ema": stored}

    return Transform(lambda params: {"count": 0, "ema": ref._zeros(params)}, update)


def adafactor_optax_tx(
    learning_rate: float | Callable[[int], float] | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = np.float32,
    weight_decay_rate: float | Callable[[int], float] | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
) -> Transform:
    """optax.adafactor: factored_rms -> [clip_by_block_rms] -> [lr, no sign flip] ->
    [param_block_rms] -> [ema(momentum, debias=False)] -> [+ wd * p, after the lr] -> scale(-1).
    The momentum buffer is stored in ``dtype_momentum`` (float32 by default, also under x64):
    each step's update uses the float64 EMA, the state keeps it rounded."""
    parts = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor,
                                   eps)]  # fmt: skip
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(ref.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(_ema_stored_as(momentum, dtype_momentum))
    if weight_decay_rate is not None:
        parts.append(_add_decayed_weights(weight_decay_rate, weight_decay_mask))
    parts.append(ref.scale(-1.0))
    return ref.chain(*parts)


# ---------------------------------------------------------------------------- torch Adafactor


def _lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp's two-sided formula."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def adafactor(
    p: Any,
    g: Any,
    state: dict,
    *,
    learning_rate: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> tuple[np.ndarray, dict]:
    """torch.optim.Adafactor (no beta1): w = t^beta2_decay; rho = min(lr, t^-1/2);
    alpha = max(eps2, ||p|| / sqrt(numel)) * rho (p before decay); p *= 1 - lr * wd.
    ndim >= 2 (factors the LAST two axes, leading axes are batch): row_var = lerp(row_var,
    mean_{-1} g^2, w), col_var = lerp(col_var, mean_{-2} g^2, w),
    var = row_var @ col_var / max(mean_{-2} row_var, eps1); else variance = lerp(v, g^2, w).
    u = g / sqrt(max(var, eps1^2)); p -= alpha / max(1, rms(u) / d) * u.
    eps1 None means finfo(p.dtype).eps of the ``p`` passed in (float64 unless p is float32)."""
    dtype = np.asarray(p).dtype
    eps1, eps2 = eps
    if eps1 is None:
        eps1 = float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else F64).eps)
    p, g = _f64(p), _f64(g)
    if maximize:
        g = -g
    if "step" not in state:
        state["step"] = 0
        if g.ndim > 1:
            state["row_var"] = np.zeros((*g.shape[:-1], 1), F64)
            state["col_var"] = np.zeros((*g.shape[:-2], 1, g.shape[-1]), F64)
        else:
            state["variance"] = np.zeros(g.shape, F64)
    state["step"] += 1
    t = float(state["step"])
    w = t**beta2_decay
    rho = min(learning_rate, 1 / t**0.5)
    alpha = max(eps2, _norm(p) / p.size**0.5) * rho
    if weight_decay != 0:
        p = p * (1 - learning_rate * weight_decay)
    if g.ndim > 1:
        row_mean = np.sqrt(np.sum(g * g, axis=-1, keepdims=True)) ** 2 / g.shape[-1]
        col_mean = np.sqrt(np.sum(g * g, axis=-2, keepdims=True)) ** 2 / g.shape[-2]
        state["row_var"] = _lerp(state["row_var"], row_mean, w)
        state["col_var"] = _lerp(state["col_var"], col_mean, w)
        row_scale = np.maximum(state["row_var"].mean(axis=-2, keepdims=True), eps1)
        var = (state["row_var"] @ state["col_var"]) / row_scale
    else:
        state["variance"] = _lerp(state["variance"], g * g, w)
        var = state["variance"].copy()
    u = g / np.sqrt(np.maximum(var, eps1 * eps1))
    denom = max(1.0, _norm(u) / (u.size**0.5 * d))
    return p - (alpha / denom) * u, state


def adafactor_torch_tx(
    learning_rate: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> Transform:
    """torch's Adafactor (``adafactor`` above) as a transform over trees: the update is the
    rule's new param minus the param (eps1 None: the machine epsilon of the params' dtype, as
    torch; an empty leaf's update is empty: torch raises ZeroDivisionError there)."""
    hp = dict(learning_rate=learning_rate, beta2_decay=beta2_decay, eps=eps, d=d,
              weight_decay=weight_decay, maximize=maximize)  # fmt: skip

    def init(params):
        return {"leaves": [{} for _ in ref.tree_leaves(params)]}

    def update(u, state, params=None):
        if params is None:
            raise ValueError("adafactor needs params")
        states = [dict(st) for st in state["leaves"]]
        gs, ps = ref.tree_leaves(u), ref.tree_leaves(params)
        out = []
        for g, p, st, dtype in zip(gs, ps, states, _stored_dtypes(ps), strict=True):
            if not np.size(p):
                out.append(_f64(g))
                continue
            leaf_hp = hp
            if hp["eps"][0] is None:  # torch: the param dtype's machine epsilon
                leaf_hp = {**hp, "eps": (float(np.finfo(dtype).eps), hp["eps"][1])}
            out.append(adafactor(p, g, st, **leaf_hp)[0] - _f64(p))
        return optree.tree_unflatten(optree.tree_structure(u, none_is_leaf=False), out), {
            "leaves": states
        }

    return Transform(init, update)


def _stored_dtypes(leaves: list[Any]) -> list[np.dtype]:
    """Each leaf's storage dtype during ``ref.run_transform`` (the params are float64 copies
    there), else its own dtype."""
    storage = ref._STORAGE.get()
    if storage is None:
        return [np.asarray(x).dtype for x in leaves]
    if isinstance(storage, (np.dtype, type)):
        return [np.dtype(storage)] * len(leaves)
    return [np.dtype(d) for d in ref.tree_leaves(storage)]
