"""RMSProp: the functional ``rmsprop``, the stateful ``RMSProp`` (also ``RMSprop``, torch's
spelling) and torch's keys for its averages."""

from __future__ import annotations

__all__ = ["RMSProp", "RMSprop", "rmsprop"]

from typing import Any

from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, UNIT, check
from ..stateful._declaration import (
    CAPTURABLE,
    DIFFERENTIABLE,
    EPS,
    FOREACH,
    MAXIMIZE,
    Hyperparameter,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByRmsState, ScaleByRStdDevState, scale_by_rms
from ..transforms._momentum import trace
from ._shared import DECAY_COUNT, optimizer_chain
from .sgd import MOMENTUM_BUFFER

# torch.optim.RMSprop's running averages of g^2 and (centered) of g
SQUARE_AVG = torch_state(ScaleByRmsState, nu="square_avg")
CENTERED_AVGS = torch_state(ScaleByRStdDevState, nu="square_avg", mu="grad_avg")


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-3,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """RMSProp (torch.optim.RMSprop)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        v <- alpha v + (1 - alpha) g^2
        d <- sqrt(v - m^2) + eps with m <- alpha m + (1 - alpha) g if centered, else sqrt(v) + eps
        b <- momentum b + g / d; p <- p - lr * b        (if momentum; b starts at 0)
        p <- p - lr * g / d                             (otherwise)

    ``chain(scale(-1), add_decayed_weights, scale_by_rms, trace, scale_by_learning_rate)``,
    omitting what is zero or off.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check(NON_NEGATIVE, momentum=momentum)
    return optimizer_chain(
        scale_by_rms(alpha, eps, centered),
        *([trace(momentum)] if momentum else []),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class RMSProp(Optimizer):
    """RMSProp (torch.optim.RMSprop; the maths is :func:`netcl_optim.rmsprop`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        v <- alpha v + (1 - alpha) g^2
        d <- sqrt(v - m^2) + eps with m <- alpha m + (1 - alpha) g if centered, else sqrt(v) + eps
        b <- momentum b + g / d; p <- p - lr * b        (if momentum; b starts at 0)
        p <- p - lr * g / d                             (otherwise)

    ``RMSprop`` (torch's spelling) is the same class.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3; torch's is 1e-2).
      alpha: smoothing constant in [0, 1) (default 0.99).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      momentum: momentum factor, >= 0 (default 0).
      centered: normalise by the estimated variance (default False).
      capturable, foreach: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already.
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``square_avg``, ``momentum_buffer`` (with
    momentum), ``grad_avg`` (centered).
    """

    hyperparameters = (  # torch's order, none keyword-only
        torch_lr(1e-3),
        Hyperparameter("alpha", 0.99, UNIT),
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("momentum", 0.0, NON_NEGATIVE),
        Hyperparameter("centered", False, BOOL),
        CAPTURABLE,
        FOREACH,
        MAXIMIZE,
        DIFFERENTIABLE,
    )
    torch_state = (SQUARE_AVG, MOMENTUM_BUFFER, CENTERED_AVGS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
        maximize: bool,
    ) -> GradientTransformation:  # fmt: skip
        return rmsprop(lr, alpha, eps, weight_decay, momentum, centered, maximize=maximize)


RMSprop = RMSProp
