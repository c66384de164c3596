"""SGD and Polyak momentum: the functional ``sgd`` and ``momentum``, the stateful ``SGD`` and
``Momentum``, and torch's key for the momentum buffer."""

from __future__ import annotations

__all__ = ["SGD", "Momentum", "momentum", "sgd"]

from typing import Any

from .. import _validation
from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, Rule, check, real
from ..stateful._declaration import (
    DIFFERENTIABLE,
    FOREACH,
    FUSED,
    KEYWORD_ONLY,
    MAXIMIZE,
    Hyperparameter,
    Requirement,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._momentum import TraceState, trace
from ._shared import DECAY_COUNT, optimizer_chain

# torch.optim.SGD's momentum buffer: created (from the grad) on a parameter's first step with
# momentum; trace's count tells that first step
MOMENTUM_BUFFER = torch_state(TraceState, trace="momentum_buffer", count="momentum_buffer")

NESTEROV = Requirement(
    "nesterov",
    "False unless momentum > 0 and dampening == 0",
    lambda nesterov, momentum, dampening, **_: not nesterov or (momentum > 0 and dampening == 0),
)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Stochastic gradient descent, torch's rule::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        b <- g (first step); b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b if nesterov else b        (if momentum)
        p <- p - lr * g

    ``chain(scale(-1), add_decayed_weights, trace, scale_by_learning_rate)``, omitting what
    is zero or off.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    NESTEROV.check(nesterov=nesterov, momentum=momentum, dampening=dampening)
    core = [trace(momentum, nesterov=nesterov, dampening=dampening)] if momentum else []
    return optimizer_chain(
        *core,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


def momentum(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Polyak (heavy-ball) momentum: :func:`sgd` with ``momentum`` and zero dampening.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return sgd(
        learning_rate,
        momentum,
        0.0,
        weight_decay,
        nesterov,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and coupled
    L2 weight decay (torch.optim.SGD; the maths is :func:`netcl_optim.sgd`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        b <- g (first step); b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b if nesterov else b        (if momentum)
        p <- p - lr * g

    Args:
      params: parameters (objects with ``.data``/``.grad`` device arrays) or param groups.
      lr: learning rate, > 0 (default 1e-2; torch's is 1e-3).
      momentum: momentum factor, >= 0 (default 0).
      dampening: dampening of the momentum, >= 0 (default 0; the first step is undamped).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
      maximize: maximize the objective (step along the gradient; default False).
      foreach, fused: torch's implementation choices, None or a bool: accepted and ignored,
        as every step is one fused kernel already.
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``momentum_buffer`` when momentum is used.

    Raises:
      ValueError: an invalid hyperparameter (the message names it and its param group).
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("momentum", 0.0, NON_NEGATIVE),
        Hyperparameter("dampening", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("nesterov", False, BOOL),
        KEYWORD_ONLY,
        MAXIMIZE,
        FOREACH,
        DIFFERENTIABLE,
        FUSED,
    )
    requirements = (NESTEROV,)
    torch_state = (MOMENTUM_BUFFER, DECAY_COUNT)
    torch_step = False

    @staticmethod
    def functional(
        lr: Any, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
        maximize: bool,
    ) -> GradientTransformation:  # fmt: skip
        return sgd(lr, momentum, dampening, weight_decay, nesterov, maximize=maximize)


_NO_DAMPENING = Rule(
    "0: Momentum has no dampening, use SGD", lambda v: 0.0 if real(v) == 0 else None
)


class Momentum(SGD):
    """Polyak (heavy-ball) momentum: :class:`SGD` with ``dampening=0`` and its own defaults
    (the maths is :func:`netcl_optim.momentum`)::

        g <- -g (if maximize);  g <- g + weight_decay * p
        b <- g (first step), then b <- momentum * b + g
        p <- p - lr * (g + momentum * b if nesterov else b)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2).
      momentum: momentum factor, >= 0 (default 0.9).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 1e-4).
      nesterov: Nesterov momentum (needs ``momentum > 0``).
      maximize, foreach, fused, differentiable: as in :class:`SGD`.

    Groups hold ``"dampening": 0.0`` too, so that its state dicts load into torch.optim.SGD
    and torch.optim.SGD's load into it; a nonzero dampening is a ``ValueError`` (use
    :class:`SGD`). Our own :class:`SGD`'s state dicts name their class and are refused.
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("momentum", 0.9, NON_NEGATIVE),
        Hyperparameter("dampening", 0.0, _NO_DAMPENING, argument=False),
        Hyperparameter("weight_decay", 1e-4, NON_NEGATIVE),
        Hyperparameter("nesterov", False, BOOL),
        KEYWORD_ONLY,
        MAXIMIZE,
        FOREACH,
        DIFFERENTIABLE,
        FUSED,
    )
