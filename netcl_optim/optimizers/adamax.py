"""Adamax and AdamaxW (Kingma & Ba, 2015, section 7.1: Adam with the infinity norm): the
functional ``scale_by_adamax``, ``adamax`` and ``adamaxw``, the stateful ``Adamax``
(torch.optim.Adamax) and ``AdamaxW``, and torch's keys for Adamax's moments."""

from __future__ import annotations

__all__ = ["Adamax", "AdamaxW", "ScaleByAdamaxState", "adamax", "adamaxw", "scale_by_adamax"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
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

# torch: exp_avg.lerp_(g, 1 - b1); torch.maximum(exp_inf * b2, |g| + eps) (a NaN on either
# side propagates, as torch.maximum and jnp.maximum; OpenCL's fmax would drop it);
# update = (m / (1 - b1^t)) / u, the reciprocal of the bias correction from the host
_ADAMAX = """
mu = LERP(mu, u, one_minus_b1);
const real nu_decayed = nu * b2;
const real abs_u_eps = FABS(u) + eps;
nu = (nu_decayed > abs_u_eps || ISNAN(nu_decayed)) ? nu_decayed : abs_u_eps;
u = (mu * inv_bc1) / nu;
"""


class ScaleByAdamaxState(NamedTuple):
    """Step count, the first moment ``mu`` and the exponentially weighted infinity norm
    ``nu`` (both shaped like the params). optax keeps Adamax's in a ``ScaleByAdamState``,
    with the same fields."""

    count: int
    mu: Any
    nu: Any


# torch.optim.Adamax's moments; the bias correction counts the steps since they were created
ADAMAX_MOMENTS = torch_state(ScaleByAdamaxState, mu="exp_avg", nu="exp_inf", count="exp_avg")


def scale_by_adamax(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adamax's scaling (optax's ``scale_by_adamax``, in torch's order of operations)::

        m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g| + eps);  t <- t + 1
        update <- (m / (1 - b1^t)) / u

    torch and optax 0.2.8 place eps alike (inside the max: ``|g| + eps``); they differ only
    in rounding (torch's lerp for ``m``, its ``lr / (1 - b1^t)`` in double; optax divides
    ``m`` by a float32 ``1 - b1^t``). Here ``m`` is torch's lerp and ``1 / (1 - b1^t)`` is
    computed on the host in double. A NaN in ``b2 u`` or ``|g| + eps`` propagates. The
    infinity norm has no bias correction.

    Device: two slots (``mu``, ``nu``), fused like every element-wise transform.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    b1, b2, eps = float(b1), float(b2), float(eps)

    def host_step(state: ScaleByAdamaxState, **_: Any):
        t = state.count + 1
        return (1.0 - b1, b2, eps, 1.0 / (1.0 - b1**t)), state._replace(count=t)

    fragment = Fragment(
        "scale_by_adamax",
        _ADAMAX,
        slots=("mu", "nu"),
        scalars=("one_minus_b1", "b2", "eps", "inv_bc1"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByAdamaxState(count=0, mu=mu, nu=nu))


def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adamax with coupled L2 weight decay (torch.optim.Adamax)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g| + eps);  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / u

    ``chain(scale(-1), add_decayed_weights, scale_by_adamax, scale_by_learning_rate)``,
    omitting what is zero or off; torch's defaults (lr 2e-3). optax's ``adamax(lr, b1, b2,
    eps)`` is the same rule without weight decay (and has no default lr); see
    :func:`scale_by_adamax` for the rounding differences.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_adamax(b1, b2, eps),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adamax with decoupled weight decay (optax's ``adamaxw``, its signature and defaults)::

        g <- -g                                         (if maximize)
        m, u, t as in :func:`adamax` (no decay in the gradient)
        p <- p - lr * ((m / (1 - b1^t)) / u + weight_decay * p)

    ``chain(scale(-1), scale_by_adamax, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``, omitting what is zero or off. torch.optim has no AdamaxW.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_adamax(b1, b2, eps),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Adamax(Optimizer):
    """Adamax with coupled L2 weight decay (torch.optim.Adamax; the maths is
    :func:`netcl_optim.adamax`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g| + eps);  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / u

    optax's ``adamax`` is the same rule (eps inside the max as here), without weight decay.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 2e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to ``|g|`` inside the max, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      foreach, capturable: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already (step counts live on the host).
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step`` (a per-parameter count), ``exp_avg``,
    ``exp_inf``.
    """

    hyperparameters = (
        torch_lr(2e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        FOREACH,
        KEYWORD_ONLY,
        MAXIMIZE,
        DIFFERENTIABLE,
        CAPTURABLE,
    )
    torch_state = (ADAMAX_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return adamax(lr, betas[0], betas[1], eps, weight_decay, maximize=maximize)


class AdamaxW(Adamax):
    """Adamax with decoupled weight decay (optax's ``adamaxw``; the maths is
    :func:`netcl_optim.adamaxw`)::

        g <- -g                                         (if maximize)
        m, u, t as in Adamax (no decay in the gradient)
        p <- p - lr * ((m / (1 - b1^t)) / u + weight_decay * p)

    torch.optim has no AdamaxW; the defaults are Adamax's and optax's ``adamaxw``'s.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 2e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to ``|g|`` inside the max, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 1e-4, as optax's ``adamaxw``).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_inf`` (as torch's Adamax).
    """

    hyperparameters = (
        torch_lr(2e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 1e-4, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return adamaxw(lr, betas[0], betas[1], eps, weight_decay, maximize=maximize)
