"""AdEMAMix (Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older") and its simplified form (Morwani et al., 2025): the functional ``scale_by_ademamix``,
``ademamix``, ``scale_by_simplified_ademamix`` and ``simplified_ademamix`` (optax.contrib's
names, signatures and defaults), the stateful ``AdEMAMix`` and the torch-style keys of its
state."""

from __future__ import annotations

__all__ = [
    "AdEMAMix",
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdEMAMixState",
    "ademamix",
    "scale_by_ademamix",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, Rule, check, require
from ..fusion import storage_dtype
from ..stateful._declaration import BETAS3, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# optax.contrib, in its order: m1 <- (1 - b1) g + b1 m1;  m2 <- (1 - b3) g + b3 m2;
# nu <- (1 - b2) g^2 + b2 nu;  u <- (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t)
# + eps_root) + eps). b3 and alpha are the host's values for this step (schedules of the count).
_ADEMAMIX = """
m1 = one_minus_b1 * u + b1 * m1;
m2 = one_minus_b3 * u + b3 * m2;
nu = one_minus_b2 * (u * u) + b2 * nu;
u = (m1 * inv_bc1 + alpha * m2) / (SQRT(nu * inv_bc2 + eps_root) + eps);
"""

# optax.contrib: m <- g + b1 m;  n <- g^2 + b2 (n - g^2) (its lerp);
# u <- (m + alpha g) / (sqrt(n / (1 - b2^t) + eps_root) + eps). n is computed as
# (1 - b2) g^2 + b2 n, the same value: the lerp carries float32's rounding of b2, relative to
# 1 - b2 (6e-4 for b2 = 0.9999), which the host's bias correction (exact b2) would not cancel.
_SIMPLIFIED = """
mu = u + b1 * mu;
nu = one_minus_b2 * (u * u) + b2 * nu;
u = (mu + alpha * u) / (SQRT(nu * inv_bc2 + eps_root) + eps);
"""


class ScaleByAdemamixState(NamedTuple):
    """The number of updates, the fast and slow EMAs ``m1``, ``m2`` and the second moment
    ``nu`` (shaped like the params). optax's state also keeps ``count_m2``, always equal to
    ``count`` (both advance every step): here ``count`` serves both."""

    count: int
    m1: Any
    m2: Any
    nu: Any


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """The number of updates (optax's ``t``), the EMA ``mu`` (optax's ``m``) and the second
    moment ``nu`` (optax's ``n``), shaped like the params."""

    count: int
    mu: Any
    nu: Any


# the paper's PyTorch AdEMAMix keeps "exp_avg_fast", "exp_avg_slow", "exp_avg_sq" and "step"
ADEMAMIX_MOMENTS = torch_state(
    ScaleByAdemamixState,
    m1="exp_avg_fast",
    m2="exp_avg_slow",
    nu="exp_avg_sq",
    count="exp_avg_fast",
)


def _at(name: str, value: Any, count: int, rule: Rule) -> float:
    """A hyperparameter's value at ``count``: a float, or a schedule evaluated on the host."""
    return float(require(name, value(count), rule)) if callable(value) else value


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> GradientTransformation:
    """AdEMAMix's scaling (optax.contrib's ``scale_by_ademamix``, same signature and defaults:
    note ``alpha=6.0`` here and 5.0 in :func:`ademamix`, as optax)::

        m1 <- (1 - b1) g + b1 m1;  m2 <- (1 - b3) g + b3 m2;  nu <- (1 - b2) g^2 + b2 nu
        u <- (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t) + eps_root) + eps)

    ``b3`` and ``alpha`` may be schedules (``count -> value``, evaluated on the host at the
    count before the step, as optax's ``count_m2``). The slow EMA is not bias-corrected. The
    moments start at zero; ``mu_dtype``: the first moments (``m1``, ``m2``) stored as ``mu_dtype``
    (float32, bfloat16, float16).

    Device: three slots (``m1``, ``m2``, ``nu``); b3, alpha and the bias corrections'
    reciprocals come from the host.
    """
    check(UNIT, b1=b1, b2=b2, b3=b3)
    check(NON_NEGATIVE, alpha=alpha, eps_root=eps_root)
    check(POSITIVE, eps=eps)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)
    b3 = b3 if callable(b3) else float(b3)
    alpha = alpha if callable(alpha) else float(alpha)

    def host_step(state: ScaleByAdemamixState, **_: Any):
        c_b3 = _at("b3", b3, state.count, UNIT)
        c_alpha = _at("alpha", alpha, state.count, NON_NEGATIVE)
        t = state.count + 1
        values = (
            1.0 - b1,
            b1,
            1.0 - b2,
            b2,
            1.0 - c_b3,
            c_b3,
            c_alpha,
            1.0 / (1.0 - b1**t),
            1.0 / (1.0 - b2**t),
            eps,
            eps_root,
        )
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_ademamix",
        _ADEMAMIX,
        slots=("m1", "m2", "nu"),
        scalars=(
            "one_minus_b1",
            "b1",
            "one_minus_b2",
            "b2",
            "one_minus_b3",
            "b3",
            "alpha",
            "inv_bc1",
            "inv_bc2",
            "eps",
            "eps_root",
        ),
        host_step=host_step,
    )
    tx = elementwise(
        fragment, init=lambda m1, m2, nu: ScaleByAdemamixState(count=0, m1=m1, m2=m2, nu=nu)
    )
    return low_precision_state(tx, mu_dtype, slots=("m1", "m2"))


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """AdEMAMix (optax.contrib's ``ademamix``: its signature, defaults and order of
    operations): AdamW with a mixture of a fast and a slow EMA of the gradients::

        g <- -g                                         (if maximize)
        m1 <- (1 - b1) g + b1 m1;  m2 <- (1 - b3) g + b3 m2;  nu <- (1 - b2) g^2 + b2 nu
        p <- p - lr * ((m1 / (1 - b1^t) + alpha m2)
                       / (sqrt(nu / (1 - b2^t) + eps_root) + eps) + weight_decay * p)

    ``chain(scale_by_ademamix, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``. ``b3`` and ``alpha`` may be schedules of the step count (the
    paper's warmups). torch.optim has no AdEMAMix; the paper's PyTorch class (alpha 2.0,
    built-in warmups) has the same update.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def scale_by_simplified_ademamix(
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Simplified AdEMAMix's scaling (optax.contrib's ``scale_by_simplified_ademamix``, same
    signature and defaults)::

        m <- g + b1 m;  n <- g^2 + b2 (n - g^2)
        u <- (m + alpha g) / (sqrt(n / (1 - b2^t) + eps_root) + eps)

    One momentum (not an EMA: no ``1 - b1`` factor, no bias correction); ``alpha`` may be a
    schedule of the count (evaluated on the host before the step).

    Device: two slots (``mu``, ``nu``); alpha and the bias correction come from the host.
    """
    check(UNIT, b1=b1, b2=b2)
    check(NON_NEGATIVE, alpha=alpha, eps_root=eps_root)
    check(POSITIVE, eps=eps)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)
    alpha = alpha if callable(alpha) else float(alpha)

    def host_step(state: ScaleBySimplifiedAdEMAMixState, **_: Any):
        c_alpha = _at("alpha", alpha, state.count, NON_NEGATIVE)
        t = state.count + 1
        values = (b1, 1.0 - b2, b2, c_alpha, 1.0 / (1.0 - b2**t), eps, eps_root)
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_simplified_ademamix",
        _SIMPLIFIED,
        slots=("mu", "nu"),
        scalars=("b1", "one_minus_b2", "b2", "alpha", "inv_bc2", "eps", "eps_root"),
        host_step=host_step,
    )
    return elementwise(
        fragment, init=lambda mu, nu: ScaleBySimplifiedAdEMAMixState(count=0, mu=mu, nu=nu)
    )


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Simplified AdEMAMix (optax.contrib's ``simplified_ademamix``: its signature, defaults
    and order of operations)::

        g <- -g                                         (if maximize)
        m <- g + b1 m;  n <- g^2 + b2 (n - g^2)
        p <- p - lr * ((m + alpha g) / (sqrt(n / (1 - b2^t) + eps_root) + eps)
                       + weight_decay * p)

    ``chain(scale_by_simplified_ademamix, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``; ``alpha`` may be a schedule. torch.optim has none.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class AdEMAMix(Optimizer):
    """AdEMAMix (the maths is :func:`netcl_optim.ademamix`, optax.contrib's rule)::

        g <- -g                                         (if maximize)
        m1 <- (1 - b1) g + b1 m1;  m2 <- (1 - b3) g + b3 m2;  nu <- (1 - b2) g^2 + b2 nu
        p <- p - lr * ((m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t)) + eps) + wd * p)

    torch.optim has no AdEMAMix. The paper's PyTorch class takes the same ``betas`` triple
    and decays the same way, with ``alpha=2.0`` and optional warmups of ``alpha`` and
    ``beta3``; this class takes optax's default ``alpha=5.0`` and constant values (the
    functional :func:`netcl_optim.ademamix` takes schedules).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2, b3)``, each in [0, 1) (default (0.9, 0.999, 0.9999)).
      alpha: weight of the slow EMA, >= 0 (default 5.0).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg_fast`` (m1), ``exp_avg_slow`` (m2),
    ``exp_avg_sq`` (nu), as the paper's class.
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("betas", (0.9, 0.999, 0.9999), BETAS3),
        Hyperparameter("alpha", 5.0, NON_NEGATIVE),
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (ADEMAMIX_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float, float],
        alpha: float,
        eps: float,
        weight_decay: float,
        maximize: bool,
    ) -> GradientTransformation:
        b1, b2, b3 = betas
        return ademamix(lr, b1, b2, b3, alpha, eps, weight_decay=weight_decay, maximize=maximize)
