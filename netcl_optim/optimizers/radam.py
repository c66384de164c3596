"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond"): the
functional ``scale_by_radam`` and ``radam``, the stateful ``RAdam`` (torch.optim.RAdam) and
torch's keys for its moments."""

from __future__ import annotations

__all__ = ["RAdam", "radam", "scale_by_radam"]

import math
from typing import Any

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, FINITE, NON_NEGATIVE, POSITIVE, UNIT, check, invalid, require
from ..stateful._declaration import (
    BETAS,
    CAPTURABLE,
    DIFFERENTIABLE,
    EPS,
    FOREACH,
    KEYWORD_ONLY,
    MAXIMIZE,
    Hyperparameter,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState
from ..transforms._combining import elementwise
from ._shared import DECAY_COUNT, optimizer_chain

# torch.optim.RAdam's moments (optax keeps RAdam's in a ScaleByAdamState, as here); the bias
# corrections count the steps since they were created
RADAM_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")

# The moments, as torch: exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
_MOMENTS = """
mu = LERP(mu, u, one_minus_b1);
nu = nu * b2 + one_minus_b2 * u * u;
"""
# m_hat = m / (1 - b1^t) (a reciprocal from the host); optax's nesterov:
# b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t), with the gradient g still in u
_M_HAT = "const real m_hat = mu * inv_bc1;\n"
_M_HAT_NESTEROV = "const real m_hat = b1 * (mu * inv_bc1_next) + one_minus_b1 * (u * inv_bc1);\n"
# torch: rectified (rho_t > 5): ((m_hat lr) (sqrt(1 - b2^t) / (sqrt(v) + eps))) rect, eps on the
# raw root; else m_hat. `rectified` is a host scalar (1 or 0) of the step: the same choice
# for every element, never a branch on device data.
_TORCH = "u = rectified != 0 ? (m_hat * (sqrt_bc2 / (SQRT(nu) + eps))) * rect : m_hat;\n"
# optax: rectified (rho_t >= threshold): (r m_hat) / (sqrt(v / (1 - b2^t) + eps_root) + eps)
_OPTAX = "u = rectified != 0 ? (rect * m_hat) / (SQRT(nu * inv_bc2 + eps_root) + eps) : m_hat;\n"


def _rectification(rho_t: float, rho_inf: float) -> float:
    """sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)), in double as
    torch (``** 0.5``); NaN where it is not real (optax's jnp.sqrt)."""
    try:
        x = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    except ZeroDivisionError:  # rho_inf = 4 (b2 = 0.6), reached only with a threshold <= 4
        return math.nan
    return x**0.5 if x >= 0 else math.nan


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """RAdam's scaling. With ``threshold=None`` (the default), torch.optim.RAdam's rule::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        m_hat <- m / (1 - b1^t)
        rho_inf <- 2 / (1 - b2) - 1;  rho_t <- rho_inf - 2 t b2^t / (1 - b2^t)
        update <- m_hat sqrt(1 - b2^t) / (sqrt(v) + eps) * rect(rho_t)   if rho_t > 5
                  m_hat                                                 otherwise

    with ``rect(rho) = sqrt((rho-4)(rho-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho))``; eps is
    added to the raw root (as ``eps / sqrt(1 - b2^t)`` on the corrected one).

    A number ``threshold`` gives optax 0.2.8's ``scale_by_radam`` (its default is 5.0)::

        update <- rect(rho_t) m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)
                                                        if rho_t >= threshold
                  m_hat                                 otherwise

    ``eps_root`` needs a ``threshold`` (torch has none). ``nesterov`` (optax's, either rule)
    takes ``m_hat <- b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``.

    rho_t, the branch and rect are computed on the host in double, per step (as torch does
    from ``step.item()``); the kernel gets them as scalars. Device: two slots (``mu``,
    ``nu``), fused like every element-wise transform.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    nesterov = require("nesterov", nesterov, BOOL)
    if threshold is None:
        if eps_root:
            raise invalid("eps_root", eps_root, "0 with threshold=None (torch's rule)")
    else:
        require("threshold", threshold, FINITE)
        threshold = float(threshold)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)
    rho_inf = 2 / (1 - b2) - 1

    def host_step(state: ScaleByAdamState, **_: Any):
        t = state.count + 1
        bc2 = 1 - b2**t
        rho_t = rho_inf - 2 * t * (b2**t) / bc2
        on = rho_t > 5.0 if threshold is None else rho_t >= threshold
        rect = _rectification(rho_t, rho_inf) if on else 0.0
        values = (
            1.0 - b1,
            b1,
            b2,
            1.0 - b2,
            1.0 / (1.0 - b1**t),
            1.0 / (1.0 - b1 ** (t + 1)),
            1.0 / bc2,
            bc2**0.5,
            eps,
            eps_root,
            1.0 if on else 0.0,
            rect,
        )
        return values, state._replace(count=t)

    source = (
        _MOMENTS
        + (_M_HAT_NESTEROV if nesterov else _M_HAT)
        + (_TORCH if threshold is None else _OPTAX)
    )
    fragment = Fragment(
        "scale_by_radam",
        source,
        slots=("mu", "nu"),
        scalars=(
            "one_minus_b1",
            "b1",
            "b2",
            "one_minus_b2",
            "inv_bc1",
            "inv_bc1_next",
            "inv_bc2",
            "sqrt_bc2",
            "eps",
            "eps_root",
            "rectified",
            "rect",
        ),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByAdamState(count=0, mu=mu, nu=nu))


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    eps_root: float = 0.0,
    threshold: float | None = None,
    nesterov: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """RAdam (torch.optim.RAdam by default)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay, coupled)
        m, v, t, m_hat, rho_t as in :func:`scale_by_radam`
        p <- p - lr * m_hat sqrt(1 - b2^t) / (sqrt(v) + eps) * rect(rho_t)   if rho_t > 5
        p <- p - lr * m_hat                                                 otherwise
        p <- p - lr * weight_decay * p                  (if decoupled_weight_decay, same step)

    ``chain(scale(-1), add_decayed_weights, scale_by_radam, [add_decayed_weights],
    scale_by_learning_rate)``, omitting what is zero or off; torch's defaults. Decoupled decay
    is ``p - lr (u + wd p)``, torch's ``p (1 - lr wd) - lr u`` in another rounding.

    optax's ``radam(learning_rate, b1, b2, eps, eps_root, threshold=5.0, nesterov=False)`` is
    ``radam(learning_rate, b1, b2, eps, eps_root=..., threshold=5.0, nesterov=...)`` here:
    it rectifies from ``rho_t >= threshold`` and adds eps to the bias-corrected root
    (``sqrt(v / (1 - b2^t) + eps_root) + eps``); it has no weight decay.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=require("decoupled_weight_decay", decoupled_weight_decay, BOOL),
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class RAdam(Optimizer):
    """RAdam (torch.optim.RAdam; the maths is :func:`netcl_optim.radam`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay, not decoupled)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        rho_inf <- 2 / (1 - b2) - 1;  rho_t <- rho_inf - 2 t b2^t / (1 - b2^t)
        p <- p - lr * (m / (1 - b1^t)) sqrt(1 - b2^t) / (sqrt(v) + eps) * rect(rho_t)
                                                        (if rho_t > 5, else p - lr m / (1 - b1^t))
        p <- p - lr * weight_decay * p                  (if decoupled_weight_decay)

    optax's ``radam`` rectifies from ``rho_t >= 5`` with eps on the bias-corrected root and
    has no weight decay: the functional ``radam(..., threshold=5.0)``.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to ``sqrt(v)``, > 0 (default 1e-8).
      weight_decay: weight decay, >= 0 (default 0).
      decoupled_weight_decay: decay the params (AdamW-style) instead of adding
        ``weight_decay * p`` to the gradient (default False).
      foreach, capturable: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already (step counts live on the host).
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step`` (a per-parameter count), ``exp_avg``,
    ``exp_avg_sq``.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("decoupled_weight_decay", False, BOOL),
        KEYWORD_ONLY,
        FOREACH,
        MAXIMIZE,
        CAPTURABLE,
        DIFFERENTIABLE,
    )
    torch_state = (RADAM_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool,
        maximize: bool,
    ) -> GradientTransformation:
        return radam(
            lr, betas[0], betas[1], eps, weight_decay, decoupled_weight_decay, maximize=maximize
        )
