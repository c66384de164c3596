"""Adafactor (Shazeer and Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost"): the functional ``adafactor`` (optax's rule and signature) and the stateful
``Adafactor`` (torch 2.13's rule and signature). The two peers' rules differ (which axes are
factored, the epsilons, the relative step, the update clipping, the weight decay), so each
API follows its own; both are built on :func:`netcl_optim.scale_by_factored_rms`."""

from __future__ import annotations

__all__ = ["Adafactor", "ScaleByAdafactorStepState", "adafactor", "scale_by_adafactor_step"]

import math
from typing import Any, NamedTuple

import numpy as np

from .._base import Fragment, GradientTransformation, ScalarOrSchedule, SegmentReduction
from .._validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Rule,
    check,
    invalid,
    number,
    require,
)
from ..stateful._declaration import FOREACH, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._blocks import clip_by_block_rms, scale_by_param_block_rms
from ..transforms._combining import chain, elementwise
from ..transforms._ema import ema
from ..transforms._factored import FactoredState, scale_by_factored_rms
from ..transforms._scaling import scale, scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import ascent, check_learning_rate


class ScaleByAdafactorStepState(NamedTuple):
    """The number of steps (torch's ``step``)."""

    count: int


# torch keeps row_var and col_var for a parameter of ndim >= 2, variance for the others
FACTORED_MOMENTS = torch_state(
    FactoredState, v_row="row_var", v_col="col_var", v="variance", count=STEP
)
STEP_COUNT = torch_state(ScaleByAdafactorStepState, count=STEP)

# per leaf: torch's relative step over the clipped update, from ||u|| and ||p|| (before decay)
_STEP_SIZE = SegmentReduction(
    terms=("u * u", "p * p"),
    outputs=("step_size",),
    finish=("fmax(eps2, sqrt(s1) / sqrt(n)) * rho / fmax(1.0, sqrt(s0) / (sqrt(n) * d))",),
    needs_params=True,
)


def scale_by_adafactor_step(
    lr: float, eps2: float = 1e-3, d: float = 1.0, weight_decay: float = 0.0
) -> GradientTransformation:
    """torch's Adafactor step from the factored updates ``u`` (per leaf, at step t)::

        rho   = min(lr, t^-1/2)
        alpha = max(eps2, ||p|| / sqrt(numel)) * rho          (p before the decay)
        u     <- -alpha / max(1, ||u|| / (sqrt(numel) d)) * u - lr * weight_decay * p

    The two norms are one reduction over ``u`` and ``p`` on the device (torch reads each
    back to the host with ``.item()``)."""
    check(NON_NEGATIVE, lr=lr, eps2=eps2, weight_decay=weight_decay)
    check(POSITIVE, d=d)
    lr, eps2, d, wd = float(lr), float(eps2), float(d), float(weight_decay)

    def host_step(state: ScaleByAdafactorStepState, **_: Any):
        t = state.count + 1
        rho = min(lr, 1 / t**0.5)
        return (rho, eps2, d, lr * wd), ScaleByAdafactorStepState(t)

    source = "u = -step_size * u - lr_wd * p;\n" if wd else "u = -step_size * u;\n"
    fragment = Fragment(
        "scale_by_adafactor_step",
        source,
        scalars=("rho", "eps2", "d", "lr_wd"),
        host_step=host_step,
        needs_params=True,
        segment_reduction=_STEP_SIZE,
    )
    return elementwise(fragment, init=lambda: ScaleByAdafactorStepState(0))


def _adafactor_torch(
    lr: Any,
    beta2_decay: float,
    eps: tuple[float | None, float],
    d: float,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    eps1, eps2 = eps
    factored = scale_by_factored_rms(
        decay_rate=-beta2_decay,
        epsilon=0.0,
        factor_last_two=True,
        eps1="finfo" if eps1 is None else eps1,
        lerp=True,
    )
    return chain(
        *ascent(maximize),
        factored,
        scale_by_adafactor_step(float(lr), eps2, d, weight_decay),
    )


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = np.float32,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adafactor (optax's ``adafactor``: its signature, defaults and chain)::

        u <- scale_by_factored_rms(factored, decay_rate, decay_offset,
                                   min_dim_size_to_factor, eps)
        u <- u / max(1, rms(u) / clipping_threshold)        (per leaf, unless None)
        u <- learning_rate * u                              (unless None; no sign flip)
        u <- u * max(rms(p), 1e-3)                          (multiply_by_parameter_scale)
        u <- ema(u, momentum)                               (unless None; not debiased)
        u <- u + weight_decay_rate * p                      (unless None; after the lr)
        p <- p - u

    torch's ``Adafactor`` (the class) differs: it factors the last two axes of every
    parameter of ndim >= 2, has a relative step ``min(lr, t^-1/2)`` and floors instead of
    ``eps``, and decays by ``p (1 - lr wd)``. ``dtype_momentum``: float32 (or None); the
    momentum is kept in the state dtype (float64 for float64 params).

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    if learning_rate is not None:
        check_learning_rate(learning_rate)
    if clipping_threshold is not None:
        check(POSITIVE, clipping_threshold=clipping_threshold)
    if momentum is not None:
        check(UNIT, momentum=momentum)
    if isinstance(decay_offset, bool) or not isinstance(decay_offset, int):
        raise invalid("decay_offset", decay_offset, "an int")
    if dtype_momentum is not None and np.dtype(dtype_momentum) != np.float32:
        raise invalid("dtype_momentum", dtype_momentum, "float32 or None: the state dtype")
    multiply_by_parameter_scale = require(
        "multiply_by_parameter_scale", multiply_by_parameter_scale, BOOL
    )
    parts = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        parts.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_block_rms())
    if momentum is not None:
        parts.append(ema(momentum, debias=False))
    if weight_decay_rate is not None:
        parts.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    parts.append(scale(-1.0))
    tx = chain(*parts)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def _eps_pair(value: Any) -> tuple[float | None, float] | None:
    """torch's ``eps=(eps1, eps2)``: eps1 None (the dtype's epsilon) or >= 0, eps2 >= 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return None
    first = None if value[0] is None else NON_NEGATIVE.convert(value[0])
    second = NON_NEGATIVE.convert(value[1])
    if (first is None and value[0] is not None) or second is None:
        return None
    return first, second


_NON_POSITIVE = number("a finite number <= 0", lambda f: -math.inf < f <= 0)
_EPS = Rule("a pair (eps1, eps2): eps1 None or >= 0, eps2 >= 0", _eps_pair)


class Adafactor(Optimizer):
    """Adafactor (torch 2.13's ``torch.optim.Adafactor``: its rule, defaults and state)::

        g   <- -g                                          (if maximize)
        t   <- t + 1;  w = t^beta2_decay;  rho = min(lr, t^-1/2)
        alpha = max(eps2, rms(p)) * rho                    (p before the decay)
        ndim >= 2 (the last two axes; leading axes are a batch):
            row_var <- lerp(row_var, mean_{-1}(g^2), w)
            col_var <- lerp(col_var, mean_{-2}(g^2), w)
            var = row_var col_var / max(mean_{-2}(row_var), eps1)
        else:  variance <- lerp(variance, g^2, w);  var = variance
        u = g / sqrt(max(var, eps1^2))
        p <- p (1 - lr weight_decay) - alpha / max(1, rms(u) / d) * u

    The chain: ``scale_by_factored_rms(factor_last_two=True, eps1=eps1, lerp=True, ...)``
    then :func:`scale_by_adafactor_step`. torch reads ``rms(p)`` and ``rms(u)`` back to the
    host for every parameter; here they stay on the device. optax's ``adafactor`` differs
    (see :func:`netcl_optim.adafactor`).

    Args:
      params: parameters or param groups.
      lr: learning rate (the relative step's cap), > 0 (default 1e-2).
      beta2_decay: the EMA weight's exponent, <= 0 (default -0.8).
      eps: ``(eps1, eps2)``: eps1 floors the variance (None: the dtype's machine epsilon),
        eps2 the parameter scale (default ``(None, 1e-3)``).
      d: the update clipping threshold, >= 1 (default 1.0).
      weight_decay: decoupled, ``p (1 - lr wd)``, >= 0 (default 0).
      foreach: accepted (torch's), changes nothing.
      maximize: maximize the objective (default False).

    State per parameter: ``step``; ``row_var`` (shape ``[..., R, 1]``) and ``col_var``
    (``[..., 1, C]``) for a parameter of ndim >= 2, else ``variance`` (its shape).
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("beta2_decay", -0.8, _NON_POSITIVE),
        Hyperparameter("eps", (None, 1e-3), _EPS.value_errors()),
        Hyperparameter("d", 1.0, number("a finite number >= 1", lambda f: 1 <= f < math.inf)),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        FOREACH,
        MAXIMIZE,
    )
    torch_state = (FACTORED_MOMENTS, STEP_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        beta2_decay: float,
        eps: tuple[float | None, float],
        d: float,
        weight_decay: float,
        maximize: bool,
    ) -> GradientTransformation:
        return _adafactor_torch(lr, beta2_decay, eps, d, weight_decay, maximize)
