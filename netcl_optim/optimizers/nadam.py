"""NAdam (Dozat, 2016, with torch's momentum-decay schedule): the functional
``scale_by_nadam``, ``nadam`` (torch.optim.NAdam's rule, signature and defaults) and
``nadamw`` (the decoupled form, optax's name), the stateful ``NAdam`` (torch.optim.NAdam) and
torch's keys for NAdam's moments and its ``mu_product``."""

from __future__ import annotations

__all__ = ["NAdam", "ScaleByNadamState", "nadam", "nadamw", "scale_by_nadam"]

from typing import Any, ClassVar, NamedTuple

import numpy as np

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, POSITIVE, UNIT, check, require
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
from ..transforms._combining import elementwise
from ._shared import DECAY_COUNT, optimizer_chain

# torch: exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2);
# den = sqrt(v / bc2) + eps (divide, then the root); the two addcdiv terms' coefficients
# (without lr, which scale_by_learning_rate applies) come from the host
_NADAM = """
mu = LERP(mu, u, one_minus_b1);
nu = nu * b2 + one_minus_b2 * u * u;
const real den = SQRT(nu / bc2) + eps;
u = (coef_g * u) / den + (coef_mu * mu) / den;
"""


class ScaleByNadamState(NamedTuple):
    """Step count and the two moments ``mu``, ``nu`` (shaped like the params). torch's
    ``mu_product`` is not stored: it is a function of the count (:func:`mu_product`)."""

    count: int
    mu: Any
    nu: Any


# torch.optim.NAdam's moments; the schedule counts the steps since they were created
NADAM_MOMENTS = torch_state(ScaleByNadamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")

# (b1, momentum_decay) -> {t: mu_product after t steps}, every _EVERY-th t and the latest
_PRODUCTS: dict[tuple[float, float], dict[int, np.float32]] = {}
_EVERY = 4096


def _momentum(b1: float, momentum_decay: float, t: int) -> float:
    """torch's momentum cache ``mu_t = b1 (1 - 0.5 * 0.96^(t psi))``, in Python double."""
    return b1 * (1.0 - 0.5 * (0.96 ** (float(t) * momentum_decay)))


def mu_product(b1: float, momentum_decay: float, t: int) -> float:
    """torch's ``mu_product`` after ``t`` steps: a float32 scalar that starts at 1 and is
    multiplied by ``float32(mu_s)`` at each step ``s`` (rounding to float32 every step, as
    torch's 0-d float32 tensor does). Computed on the host, cached per (b1, momentum_decay)."""
    known = _PRODUCTS.setdefault((float(b1), float(momentum_decay)), {0: np.float32(1.0)})
    start = max(s for s in known if s <= t)
    prod = known[start]
    for s in range(start + 1, t + 1):
        prod = np.float32(prod * np.float32(_momentum(b1, momentum_decay, s)))
        if s % _EVERY == 0:
            known[s] = prod
    latest = max(known)
    if t > latest:
        if latest % _EVERY:
            del known[latest]
        known[t] = prod
    return float(prod)


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> GradientTransformation:
    """NAdam's scaling in torch's order of operations (torch.optim.NAdam without lr and
    weight decay)::

        mu_t <- b1 (1 - 0.5 * 0.96^(t psi));  mu_{t+1} <- b1 (1 - 0.5 * 0.96^((t+1) psi))
        P <- P * mu_t                              (P: mu_product, from 1, float32)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        den <- sqrt(v / (1 - b2^t)) + eps
        update <- ((1 - mu_t) / (1 - P)) g / den + (mu_{t+1} / (1 - P mu_{t+1})) m / den

    (``psi``: ``momentum_decay``). The step-dependent scalars are computed on the host as
    torch computes them: the momentum cache in double, ``P`` as a float32 product rounded
    every step, the coefficients in double from it. ``m`` is torch's lerp. optax has no
    such building block: its NAdam is ``scale_by_adam(nesterov=True)`` (Dozat's form
    without the momentum schedule, a different rule).

    Device: two slots (``mu``, ``nu``), fused like every element-wise transform.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, momentum_decay=momentum_decay)
    b1, b2, eps, psi = float(b1), float(b2), float(eps), float(momentum_decay)

    def host_step(state: ScaleByNadamState, **_: Any):
        t = state.count + 1
        mu_t, mu_next = _momentum(b1, psi, t), _momentum(b1, psi, t + 1)
        prod = mu_product(b1, psi, t)
        coef_g = (1.0 - mu_t) / (1.0 - prod)
        coef_mu = mu_next / (1.0 - prod * mu_next)
        values = (1.0 - b1, b2, 1.0 - b2, 1.0 - b2**t, eps, coef_g, coef_mu)
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_nadam",
        _NADAM,
        slots=("mu", "nu"),
        scalars=("one_minus_b1", "b2", "one_minus_b2", "bc2", "eps", "coef_g", "coef_mu"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByNadamState(count=0, mu=mu, nu=nu))


def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """NAdam (torch.optim.NAdam; its defaults)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay, coupled)
        update <- scale_by_nadam(b1, b2, eps, momentum_decay)(g)
        p <- p - lr * update                            (coupled)
        p <- p - lr * (update + weight_decay * p)       (decoupled_weight_decay)

    ``chain(scale(-1), add_decayed_weights, scale_by_nadam, scale_by_learning_rate)`` (the
    decay after ``scale_by_nadam`` when decoupled), omitting what is zero or off; torch
    multiplies ``p`` by ``1 - lr * weight_decay`` first, the same maths. optax's ``nadam`` is
    ``adam(..., nesterov=True)``: Dozat's form without the momentum-decay schedule, a
    different rule (here ``adam`` has no ``nesterov``).

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_nadam(b1, b2, eps, momentum_decay),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=require("decoupled_weight_decay", decoupled_weight_decay, BOOL),
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def nadamw(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    momentum_decay: float = 4e-3,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """NAdam with decoupled weight decay (torch.optim.NAdam(decoupled_weight_decay=True))::

        g <- -g                                         (if maximize)
        update <- scale_by_nadam(b1, b2, eps, momentum_decay)(g)
        p <- p - lr * (update + weight_decay * p)

    ``chain(scale(-1), scale_by_nadam, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``, omitting what is zero or off. The name and the default
    ``weight_decay=1e-4`` are optax's ``nadamw``, whose rule is ``adamw(..., nesterov=True)``
    (Dozat's form, no momentum-decay schedule); the rule here is torch's.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_nadam(b1, b2, eps, momentum_decay),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def _torch_mu_product(group: dict[str, Any], step: int) -> float:
    """torch's ``mu_product`` of a parameter of ``group`` after ``step`` steps."""
    return mu_product(group["betas"][0], group["momentum_decay"], step)


class NAdam(Optimizer):
    """NAdam (torch.optim.NAdam; the maths is :func:`netcl_optim.nadam`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay, coupled)
        mu_t <- b1 (1 - 0.5 * 0.96^(t psi));  P <- P * mu_t   (t: the parameter's step)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        den <- sqrt(v / (1 - b2^t)) + eps
        p <- p - lr (1 - mu_t) / (1 - P) g / den - lr mu_{t+1} / (1 - P mu_{t+1}) m / den
        p <- p - lr * weight_decay * p                  (if decoupled_weight_decay)

    optax's ``nadam``/``nadamw`` are Adam with Nesterov momentum (no momentum-decay
    schedule), a different rule.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 2e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: weight decay, >= 0 (default 0).
      momentum_decay: ``psi`` of the momentum schedule, >= 0 (default 4e-3).
      decoupled_weight_decay: decay the weights directly (AdamW-style) instead of adding an
        L2 term to the gradient (default False).
      foreach, capturable: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already (step counts live on the host).
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``mu_product`` (a float32 scalar, computed
    on the host from the step count, betas and momentum_decay, rounded as torch rounds it;
    on load it is recomputed from the step: a torch run whose betas or momentum_decay
    changed midway resumes with the product of the current ones), ``exp_avg``,
    ``exp_avg_sq``.
    """

    hyperparameters = (
        torch_lr(2e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("momentum_decay", 4e-3, NON_NEGATIVE),
        Hyperparameter("decoupled_weight_decay", False, BOOL),
        KEYWORD_ONLY,
        FOREACH,
        MAXIMIZE,
        CAPTURABLE,
        DIFFERENTIABLE,
    )
    torch_state = (NADAM_MOMENTS, DECAY_COUNT)
    torch_step = True
    torch_scalars: ClassVar[dict[str, Any]] = {"mu_product": _torch_mu_product}

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float,
        momentum_decay: float, decoupled_weight_decay: bool, maximize: bool,
    ) -> GradientTransformation:  # fmt: skip
        return nadam(
            lr, betas[0], betas[1], eps, weight_decay, momentum_decay, decoupled_weight_decay,
            maximize=maximize,
        )  # fmt: skip
