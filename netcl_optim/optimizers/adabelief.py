"""AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients"): the functional ``scale_by_belief`` and ``adabelief`` (optax's names,
signatures and defaults), the stateful ``AdaBelief`` and the torch-style keys of its state."""

from __future__ import annotations

__all__ = ["AdaBelief", "ScaleByBeliefState", "adabelief", "scale_by_belief"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, POSITIVE, UNIT, check, require
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, MOMENT_SCALARS, moment_host_step, optimizer_chain

# optax, in its order: m <- (1 - b1) g + b1 m;  s <- (1 - b2) (g - m)^2 + b2 s;  s <- s + eps_root;
# u <- (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps) (reciprocals of the bias corrections
# from the host)
_MOMENTS = """
mu = one_minus_b1 * u + b1 * mu;
const real e = u - mu;
nu = one_minus_b2 * (e * e) + b2 * nu + eps_root;
"""
_BELIEF = _MOMENTS + "u = (mu * inv_bc1) / (SQRT(nu * inv_bc2) + eps);\n"
# nesterov (optax): b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t) in place of m / (1 - b1^t)
_BELIEF_NESTEROV = (
    _MOMENTS
    + """
const real m_hat = b1 * (mu * inv_bc1_next) + one_minus_b1 * (u * inv_bc1);
u = m_hat / (SQRT(nu * inv_bc2) + eps);
"""
)


class ScaleByBeliefState(NamedTuple):
    """The number of updates, the first moment ``mu`` and the second central moment ``nu``
    (the EMA of ``(g - mu)^2``), shaped like the params."""

    count: int
    mu: Any
    nu: Any


# adabelief-pytorch's keys: "exp_avg" and "exp_avg_var" (and a per-parameter "step")
BELIEF_MOMENTS = torch_state(ScaleByBeliefState, mu="exp_avg", nu="exp_avg_var", count="exp_avg")


def scale_by_belief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdaBelief's scaling (optax's ``scale_by_belief``, same signature and defaults)::

        m <- (1 - b1) g + b1 m
        s <- (1 - b2) (g - m)^2 + b2 s + eps_root
        u <- (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)

    ``nesterov`` replaces ``m / (1 - b1^t)`` by ``b1 m / (1 - b1^(t+1)) + (1 - b1) g /
    (1 - b1^t)``. Both moments start at zero.

    Device: two slots (``mu``, ``nu``); the bias corrections' reciprocals come from the host.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    nesterov = require("nesterov", nesterov, BOOL)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)

    fragment = Fragment(
        "scale_by_belief",
        _BELIEF_NESTEROV if nesterov else _BELIEF,
        slots=("mu", "nu"),
        scalars=MOMENT_SCALARS,
        host_step=moment_host_step(b1, b2, eps, eps_root),
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByBeliefState(count=0, mu=mu, nu=nu))


def _adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    return optimizer_chain(
        scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
    )


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """AdaBelief (optax's ``adabelief``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m
        s <- (1 - b2) (g - m)^2 + b2 s + eps_root
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)

    ``chain(scale_by_belief, scale_by_learning_rate)``; ``nesterov``: see
    :func:`scale_by_belief`. The paper's defaults are ``eps=1e-8, eps_root=0``; optax's
    (used here) are ``1e-16`` for both. torch.optim has no AdaBelief.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _adabelief(learning_rate, b1, b2, eps, eps_root, nesterov, 0.0, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class AdaBelief(Optimizer):
    """AdaBelief (the maths is :func:`netcl_optim.adabelief`, optax's rule)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m
        s <- (1 - b2) (g - m)^2 + b2 s + eps_root
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps) + weight_decay * p)

    torch.optim has no AdaBelief. adabelief-pytorch adds eps to ``s`` (not a separate
    ``eps_root``), decays first (``p <- p * (1 - lr wd)``) and rectifies by default; this
    class follows optax's numbers, and its decoupled decay is AdamW's order (as ``adamw``).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-16, optax's).
      weight_decay: decoupled decay, >= 0 (default 0).
      eps_root: added to ``s`` every step, >= 0 (default 1e-16, optax's).
      nesterov: optax's Nesterov form of the first moment (default False).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_var`` (s), as adabelief-pytorch.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        Hyperparameter("eps", 1e-16, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("eps_root", 1e-16, NON_NEGATIVE),
        Hyperparameter("nesterov", False, BOOL),
        MAXIMIZE,
    )
    torch_state = (BELIEF_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        eps_root: float,
        nesterov: bool,
        maximize: bool,
    ) -> GradientTransformation:
        return _adabelief(lr, betas[0], betas[1], eps, eps_root, nesterov, weight_decay, maximize)
