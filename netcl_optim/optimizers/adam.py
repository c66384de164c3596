"""Adam and AdamW: the functional ``adam`` and ``adamw``, the stateful ``Adam`` and ``AdamW``,
and torch's keys for Adam's moments."""

from __future__ import annotations

__all__ = [
    "Adam",
    "AdamW",
    "ScaleByAmsgradState",
    "adam",
    "adamw",
    "amsgrad",
    "scale_by_amsgrad",
]

import math
from typing import Any, ClassVar, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, POSITIVE, UNIT, check, require
from ..fusion import storage_dtype
from ..stateful._declaration import (
    BETAS,
    CAPTURABLE,
    DIFFERENTIABLE,
    EPS,
    FOREACH,
    FUSED,
    KEYWORD_ONLY,
    MAXIMIZE,
    Hyperparameter,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState, scale_by_adam
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# torch's amsgrad branch: the moments as scale_by_adam; torch.maximum(max_exp_avg_sq, v) over
# the RAW v (a NaN on either side propagates, as torch.maximum; OpenCL's fmax would drop it);
# denom = sqrt(vmax) / sqrt(bc2) + eps (reciprocals from the host, as scale_by_adam)
_AMSGRAD_TORCH = """
mu = LERP(mu, u, one_minus_b1);
nu = nu * b2 + one_minus_b2 * u * u;
nu_max = (nu_max > nu || ISNAN(nu_max)) ? nu_max : nu;
u = (mu * inv_bc1) / (SQRT(nu_max) * inv_sqrt_bc2 + eps);
"""
# optax's scale_by_amsgrad: m <- (1 - b1) g + b1 m; v <- (1 - b2) g^2 + b2 v; the max over
# v / bc2 (inv_bc2 = 1 without bias_correction_nu, inv_bc1 = 1 without bias_correction_mu,
# a multiplication by 1 being exact); u = m_hat / (sqrt(vmax + eps_root) + eps)
_AMSGRAD_OPTAX = """
mu = one_minus_b1 * u + b1 * mu;
nu = one_minus_b2 * (u * u) + b2 * nu;
const real nu_hat = nu * inv_bc2;
nu_max = (nu_max > nu_hat || ISNAN(nu_max)) ? nu_max : nu_hat;
u = (mu * inv_bc1) / (SQRT(nu_max + eps_root) + eps);
"""


class ScaleByAmsgradState(NamedTuple):
    """Step count, the moments ``mu``, ``nu`` and the running maximum ``nu_max`` (shaped like
    the params): optax's ``ScaleByAmsgradState``."""

    count: int
    mu: Any
    nu: Any
    nu_max: Any


# torch.optim.Adam's moments; the bias corrections count the steps since they were created
ADAM_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")
# with amsgrad=True torch adds "max_exp_avg_sq" (the maximum of the raw exp_avg_sq)
AMSGRAD_MOMENTS = torch_state(
    ScaleByAmsgradState,
    mu="exp_avg",
    nu="exp_avg_sq",
    nu_max="max_exp_avg_sq",
    count="exp_avg",
)


_AMSGRAD_SCALARS = (
    "one_minus_b1", "b1", "b2", "one_minus_b2", "inv_bc1", "inv_bc2", "inv_sqrt_bc2", "eps",
    "eps_root",
)  # fmt: skip


def _amsgrad_fragment(
    source: str, b1: float, b2: float, eps: float, eps_root: float, bc_mu: bool, bc_nu: bool
) -> GradientTransformation:
    def host_step(state: ScaleByAmsgradState, **_: Any):
        t = state.count + 1
        bc2 = 1.0 - b2**t
        inv_bc1 = 1.0 / (1.0 - b1**t) if bc_mu else 1.0
        inv_bc2 = 1.0 / bc2 if bc_nu else 1.0
        values = (1.0 - b1, b1, b2, 1.0 - b2, inv_bc1, inv_bc2, 1.0 / math.sqrt(bc2), eps,
                  eps_root)  # fmt: skip
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_amsgrad",
        source,
        slots=("mu", "nu", "nu_max"),
        nonnegative=("nu", "nu_max"),
        scalars=_AMSGRAD_SCALARS,
        host_step=host_step,
    )
    return elementwise(
        fragment,
        init=lambda mu, nu, nu_max: ScaleByAmsgradState(count=0, mu=mu, nu=nu, nu_max=nu_max),
    )


def _torch_amsgrad(b1: float, b2: float, eps: float) -> GradientTransformation:
    """torch's Adam(amsgrad=True) scaling: ``vmax <- max(vmax, v)`` over the raw ``v``,
    ``u <- (m / (1 - b1^t)) / (sqrt(vmax) / sqrt(1 - b2^t) + eps)``."""
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    return _amsgrad_fragment(_AMSGRAD_TORCH, float(b1), float(b2), float(eps), 0.0, True, True)


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """AMSGrad's scaling (optax's ``scale_by_amsgrad``: its signature, defaults and rule)::

        m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v
        m_hat <- m / (1 - b1^t)                   (m if not bias_correction_mu)
        vmax <- max(vmax, v / (1 - b2^t))         (max(vmax, v) if not bias_correction_nu)
        u <- m_hat / (sqrt(vmax + eps_root) + eps)

    The maximum is over the bias-corrected ``v`` (or over the raw ``v`` with no correction at
    all); torch's ``Adam(amsgrad=True)`` takes it over the raw ``v`` and then divides by
    ``sqrt(1 - b2^t)``, another rule (``adam(..., amsgrad=True)`` here). ``mu_dtype``:
    the first moment stored as ``mu_dtype`` (float32, bfloat16, float16). The state is
    optax's ``ScaleByAmsgradState``.

    Device: three slots (``mu``, ``nu``, ``nu_max``); the bias corrections' reciprocals come
    from the host.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    bc_mu = require("bias_correction_mu", bias_correction_mu, BOOL)
    bc_nu = require("bias_correction_nu", bias_correction_nu, BOOL)
    tx = _amsgrad_fragment(
        _AMSGRAD_OPTAX, float(b1), float(b2), float(eps), float(eps_root), bc_mu, bc_nu
    )
    return low_precision_state(tx, mu_dtype, slots=("mu",))


def _adam_core(b1: float, b2: float, eps: float, amsgrad: bool) -> GradientTransformation:
    if require("amsgrad", amsgrad, BOOL):
        return _torch_amsgrad(b1, b2, eps)
    return scale_by_adam(b1, b2, eps)


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """AMSGrad (optax's ``amsgrad``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v
        vmax <- max(vmax, v / (1 - b2^t))               (raw v if not bias_correction_nu)
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(vmax + eps_root) + eps)
                                                        (m if not bias_correction_mu)

    ``chain(scale(-1), scale_by_amsgrad, scale_by_learning_rate)``. torch's AMSGrad
    (``Adam(amsgrad=True)``, here ``adam(..., amsgrad=True)``) takes the maximum over the
    raw ``v`` and then divides by ``sqrt(1 - b2^t)``: none of optax's options gives it.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu),
        learning_rate=learning_rate,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adam with coupled L2 weight decay (torch.optim.Adam)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        vmax <- max(vmax, v);  v <- vmax                (if amsgrad, torch's: the raw v)
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``chain(scale(-1), add_decayed_weights, scale_by_adam, scale_by_learning_rate)``,
    omitting what is zero or off. ``amsgrad`` is torch's AMSGrad (the maximum over the raw
    ``v``, then the bias correction); optax's (the maximum over the corrected ``v``) is
    :func:`amsgrad`.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        _adam_core(b1, b2, eps, amsgrad),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Any = None,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adam with decoupled weight decay (torch.optim.AdamW)::

        g <- -g                                         (if maximize)
        m, v, t (and vmax if amsgrad) as in :func:`adam`
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    ``chain(scale(-1), scale_by_adam, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``, omitting what is zero or off. ``amsgrad``: torch's, as in
    :func:`adam`.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        _adam_core(b1, b2, eps, amsgrad),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Adam(Optimizer):
    """Adam with coupled L2 weight decay (torch.optim.Adam; the maths is
    :func:`netcl_optim.adam`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        vmax <- max(vmax, v);  v <- vmax                (if amsgrad: the raw v, as torch)
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      amsgrad: torch's AMSGrad: divide by the running maximum of the raw ``v`` (default
        False; optax's AMSGrad, a different rule, is :func:`netcl_optim.amsgrad`).
      maximize: maximize the objective (step along the gradient; default False).
      foreach, capturable, fused: torch's implementation choices, None or a bool: accepted
        and ignored, as every step is one fused kernel already (step counts live on the
        host).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step`` (a per-parameter count: a parameter without a
    grad does not advance), ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``,
    ``max_exp_avg_sq``.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("amsgrad", False, BOOL),
        KEYWORD_ONLY,
        FOREACH,
        MAXIMIZE,
        CAPTURABLE,
        DIFFERENTIABLE,
        FUSED,
    )
    torch_state = (ADAM_MOMENTS, AMSGRAD_MOMENTS, DECAY_COUNT)
    torch_step = True
    torch_marks: ClassVar[dict[str, bool]] = {"decoupled_weight_decay": False}

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        maximize: bool,
    ) -> GradientTransformation:
        return adam(lr, betas[0], betas[1], eps, weight_decay, amsgrad=amsgrad, maximize=maximize)


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW; the maths is
    :func:`netcl_optim.adamw`)::

        g <- -g                                         (if maximize)
        m, v, t as in Adam (no decay in the gradient)
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 0.01).
      amsgrad: torch's AMSGrad, as in :class:`Adam` (default False).
      maximize, foreach, capturable, fused, differentiable: as in :class:`Adam`.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.01, NON_NEGATIVE),
        Hyperparameter("amsgrad", False, BOOL),
        KEYWORD_ONLY,
        MAXIMIZE,
        FOREACH,
        CAPTURABLE,
        DIFFERENTIABLE,
        FUSED,
    )
    torch_marks: ClassVar[dict[str, bool]] = {"decoupled_weight_decay": True}

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        maximize: bool,
    ) -> GradientTransformation:
        return adamw(lr, betas[0], betas[1], eps, weight_decay, amsgrad=amsgrad, maximize=maximize)
