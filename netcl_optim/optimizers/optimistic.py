"""Optimistic gradient methods (Daskalakis et al., 2018, "Training GANs with Optimism";
Mokhtari et al., 2019): the functional ``scale_by_optimistic_gradient``,
``optimistic_gradient_descent`` and ``optimistic_adam_v2`` (optax's names, signatures and
defaults), the stateful ``OptimisticAdam`` and the torch-style keys of its state.

optax's older ``optimistic_adam`` (v1, with ``optimism``) is deprecated in optax 0.2.8 and not
offered: ``optimistic_adam_v2`` is its replacement."""

from __future__ import annotations

__all__ = [
    "OptimisticAdam",
    "ScaleByOptimisticGradientState",
    "optimistic_adam_v2",
    "optimistic_gradient_descent",
    "scale_by_optimistic_gradient",
]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, FINITE, NON_NEGATIVE, POSITIVE, UNIT, check, require
from ..fusion import storage_dtype
from ..stateful._declaration import BETAS, EPS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, MOMENT_SCALARS, moment_host_step, optimizer_chain

# optax: prev <- g on the first step (is_initial_step), u <- (alpha + beta) g - beta prev,
# then prev <- g (the incoming update)
_OPTIMISTIC = """
const real prev = first != 0 ? u : previous_gradient;
previous_gradient = u;
u = alpha_plus_beta * u - beta * prev;
"""

# optax's scale_by_adam, in its order: m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v;
# u <- m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps) with m_hat = m / (1 - b1^t), or with
# nesterov b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t) (reciprocals from the host)
_MOMENTS = """
mu = one_minus_b1 * u + b1 * mu;
nu = one_minus_b2 * (u * u) + b2 * nu;
"""
_ADAM = _MOMENTS + "u = (mu * inv_bc1) / (SQRT(nu * inv_bc2 + eps_root) + eps);\n"
_ADAM_NESTEROV = (
    _MOMENTS
    + """
const real m_hat = b1 * (mu * inv_bc1_next) + one_minus_b1 * (u * inv_bc1);
u = m_hat / (SQRT(nu * inv_bc2 + eps_root) + eps);
"""
)


class ScaleByOptimisticGradientState(NamedTuple):
    """The number of updates and the previous gradient (shaped like the params, starting at
    zero). optax keeps ``is_initial_step`` in place of the count: here it is
    ``count == 0`` (the property of the same name)."""

    count: int
    previous_gradient: Any

    @property
    def is_initial_step(self) -> bool:
        return self.count == 0


# no torch.optim class: the previous gradient as "prev_grad", Adam's moments as torch's
OPTIMISTIC_GRADIENT = torch_state(
    ScaleByOptimisticGradientState, previous_gradient="prev_grad", count="prev_grad"
)
OPTIMISTIC_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    """Generalized optimistic gradients (optax's ``scale_by_optimistic_gradient``, same
    signature and defaults)::

        u <- (alpha + beta) g - beta g_prev;  g_prev <- g

    ``g_prev`` is ``g`` itself at the first step (optax#1082), so the first update is
    ``alpha g``. ``alpha`` and ``beta`` are finite numbers (not schedules).

    Device: one slot (``previous_gradient``); ``alpha + beta`` and the first-step flag come
    from the host.
    """
    check(FINITE, alpha=alpha, beta=beta)
    alpha, beta = float(alpha), float(beta)

    def host_step(state: ScaleByOptimisticGradientState, **_: Any):
        first = 1.0 if state.count == 0 else 0.0
        return (alpha + beta, beta, first), state._replace(count=state.count + 1)

    fragment = Fragment(
        "scale_by_optimistic_gradient",
        _OPTIMISTIC,
        slots=("previous_gradient",),
        scalars=("alpha_plus_beta", "beta", "first"),
        host_step=host_step,
    )
    return elementwise(
        fragment,
        init=lambda prev: ScaleByOptimisticGradientState(count=0, previous_gradient=prev),
    )


def _scale_by_optax_adam(
    b1: float, b2: float, eps: float, eps_root: float, mu_dtype: Any, nesterov: bool
) -> GradientTransformation:
    """optax's ``scale_by_adam`` (its eps placement and ``nesterov``), state
    ``ScaleByAdamState``; the first moment stored as ``mu_dtype`` (float32, bfloat16, float16)."""
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    nesterov = require("nesterov", nesterov, BOOL)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)

    fragment = Fragment(
        "scale_by_adam_optax_nesterov" if nesterov else "scale_by_adam_optax",
        _ADAM_NESTEROV if nesterov else _ADAM,
        slots=("mu", "nu"),
        scalars=MOMENT_SCALARS,
        host_step=moment_host_step(b1, b2, eps, eps_root),
    )
    tx = elementwise(fragment, init=lambda mu, nu: ScaleByAdamState(count=0, mu=mu, nu=nu))
    return low_precision_state(tx, mu_dtype, slots=("mu",))


def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule,
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Optimistic gradient descent (optax's ``optimistic_gradient_descent``: its signature,
    defaults and order of operations)::

        g <- -g                                         (if maximize)
        p <- p - lr * ((alpha + beta) g - beta g_prev)  (g_prev = g at the first step)

    ``chain(scale_by_optimistic_gradient, scale_by_learning_rate)``. ``alpha`` and ``beta``
    are numbers (optax's type allows a schedule, which its transform cannot use). torch.optim
    has no optimistic method.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_optimistic_gradient(alpha, beta),
        learning_rate=learning_rate,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def _optimistic_adam(
    learning_rate: ScalarOrSchedule,
    alpha: float,
    beta: float,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    mu_dtype: Any,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    return optimizer_chain(
        _scale_by_optax_adam(b1, b2, eps, eps_root, mu_dtype, nesterov),
        scale_by_optimistic_gradient(alpha, beta),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
    )


def optimistic_adam_v2(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nesterov: bool = True,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Optimistic Adam (optax's ``optimistic_adam_v2``: its signature, defaults and order of
    operations)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v
        a <- m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)
             m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)   (nesterov, the default)
             m_hat = m / (1 - b1^t)                                     (nesterov=False)
        p <- p - lr * ((alpha + beta) a - beta a_prev)  (a_prev = a at the first step)

    ``chain(scale_by_adam(nesterov=...), scale_by_optimistic_gradient,
    scale_by_learning_rate)``, with optax's Adam (eps added to the root of the corrected
    ``v``, not torch's placement). ``mu_dtype``: the
    first moment stored as ``mu_dtype`` (float32, bfloat16, float16). optax's deprecated v1
    ``optimistic_adam`` (``optimism``) is not offered. torch.optim has no optimistic method.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _optimistic_adam(
        learning_rate, alpha, beta, b1, b2, eps, eps_root, mu_dtype, nesterov, 0.0, maximize
    )
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class OptimisticAdam(Optimizer):
    """Optimistic Adam (the maths is :func:`netcl_optim.optimistic_adam_v2`, optax's rule)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v
        a <- m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)   (m_hat: Nesterov's by default)
        p <- p - lr * ((alpha + beta) a - beta a_prev + weight_decay * p)

    torch.optim has no optimistic optimizer; the signature is torch-style (``lr``, ``betas``,
    ``eps``, ``weight_decay``) with optax's other arguments. The weight decay is decoupled
    (AdamW's order: added after the optimistic step). ``beta`` (optimism) is not one of
    ``betas`` (Adam's moment decays).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 0).
      alpha, beta: the optimistic step ``(alpha + beta) a - beta a_prev``, finite numbers
        (default 1.0, 1.0).
      eps_root: added under the root, >= 0 (default 0).
      nesterov: optax's Nesterov form of the first moment (default True, as optax).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``prev_grad``
    (the previous Adam direction ``a``).
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("alpha", 1.0, FINITE),
        Hyperparameter("beta", 1.0, FINITE),
        Hyperparameter("eps_root", 0.0, NON_NEGATIVE),
        Hyperparameter("nesterov", True, BOOL),
        MAXIMIZE,
    )
    torch_state = (OPTIMISTIC_MOMENTS, OPTIMISTIC_GRADIENT, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        alpha: float,
        beta: float,
        eps_root: float,
        nesterov: bool,
        maximize: bool,
    ) -> GradientTransformation:
        b1, b2 = betas
        return _optimistic_adam(
            lr, alpha, beta, b1, b2, eps, eps_root, None, nesterov, weight_decay, maximize
        )
