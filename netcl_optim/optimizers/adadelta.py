"""Adadelta (Zeiler, 2012): the functional ``scale_by_adadelta`` (optax's name and defaults)
and ``adadelta`` (torch's rule and defaults, which is optax's with a learning rate), the
stateful ``Adadelta`` (torch.optim.Adadelta's signature, defaults and state keys)."""

from __future__ import annotations

__all__ = ["Adadelta", "ScaleByAdaDeltaState", "adadelta", "scale_by_adadelta"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import CLOSED_UNIT, NON_NEGATIVE, check
from ..stateful._declaration import (
    CAPTURABLE,
    DIFFERENTIABLE,
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

# torch: square_avg.mul_(rho).addcmul_(g, g, value=1 - rho);
# delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g (the old acc_delta);
# acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho). optax's order is the same.
_ADADELTA = """
e_g = e_g * rho + one_minus_rho * u * u;
u = SQRT(e_x + eps) / SQRT(e_g + eps) * u;
e_x = e_x * rho + one_minus_rho * u * u;
"""


class ScaleByAdaDeltaState(NamedTuple):
    """The running averages of the squared updates in (``e_g``) and out (``e_x``)."""

    e_g: Any
    e_x: Any


# torch.optim.Adadelta's averages
ADADELTA_AVGS = torch_state(ScaleByAdaDeltaState, e_g="square_avg", e_x="acc_delta")


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta's scaling (optax's ``scale_by_adadelta`` and its defaults)::

        e_g <- rho e_g + (1 - rho) g^2
        u <- sqrt(e_x + eps) / sqrt(e_g + eps) * g          (e_x: the old average)
        e_x <- rho e_x + (1 - rho) u^2

    Both averages start at zero. Device: two slots (``e_g``, ``e_x``), fused like every
    element-wise transform.
    """
    check(CLOSED_UNIT, rho=rho)
    check(NON_NEGATIVE, eps=eps)
    values = (float(rho), 1.0 - float(rho), float(eps))
    fragment = Fragment(
        "scale_by_adadelta",
        _ADADELTA,
        slots=("e_g", "e_x"),
        scalars=("rho", "one_minus_rho", "eps"),
        host_step=lambda state, **_: (values, state),
    )
    return elementwise(fragment, init=lambda e_g, e_x: ScaleByAdaDeltaState(e_g=e_g, e_x=e_x))


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adadelta (torch.optim.Adadelta; optax's ``adadelta`` with the same learning rate)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay; where the mask is)
        e_g <- rho e_g + (1 - rho) g^2
        d <- sqrt(e_x + eps) / sqrt(e_g + eps) * g;  e_x <- rho e_x + (1 - rho) d^2
        p <- p - lr * d

    ``chain(scale(-1), add_decayed_weights, scale_by_adadelta, scale_by_learning_rate)``,
    omitting what is zero or off; optax's argument order (``weight_decay_mask`` too) with
    torch's defaults. optax's default ``learning_rate=None`` scales by nothing, so its updates
    ascend: always give it a learning rate (torch's default is 1.0).

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_adadelta(rho, eps),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta; the maths is :func:`netcl_optim.adadelta`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        e_g <- rho e_g + (1 - rho) g^2
        d <- sqrt(e_x + eps) / sqrt(e_g + eps) * g;  e_x <- rho e_x + (1 - rho) d^2
        p <- p - lr * d

    optax's ``adadelta`` is the same rule (its default ``learning_rate=None`` aside).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1.0).
      rho: the averages' decay, in [0, 1] (default 0.9).
      eps: added inside both roots, >= 0 (default 1e-6).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      foreach, capturable: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already.
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``square_avg``, ``acc_delta``.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("rho", 0.9, CLOSED_UNIT),
        Hyperparameter("eps", 1e-6, NON_NEGATIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        FOREACH,
        KEYWORD_ONLY,
        CAPTURABLE,
        MAXIMIZE,
        DIFFERENTIABLE,
    )
    torch_state = (ADADELTA_AVGS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, rho: float, eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return adadelta(lr, rho, eps, weight_decay, maximize=maximize)
