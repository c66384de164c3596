"""Adam and AdamW: the functional ``adam`` and ``adamw``, the stateful ``Adam`` and ``AdamW``,
and torch's keys for Adam's moments."""

from __future__ import annotations

__all__ = ["Adam", "AdamW", "adam", "adamw"]

from typing import Any, ClassVar

from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE
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
from ._shared import DECAY_COUNT, optimizer_chain

# torch.optim.Adam's moments; the bias corrections count the steps since they were created
ADAM_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam with coupled L2 weight decay (torch.optim.Adam)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``chain(scale(-1), add_decayed_weights, scale_by_adam, scale_by_learning_rate)``,
    omitting what is zero or off.
    """
    return optimizer_chain(
        scale_by_adam(b1, b2, eps),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Any = None,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam with decoupled weight decay (torch.optim.AdamW)::

        g <- -g                                         (if maximize)
        m, v, t as in :func:`adam`
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    ``chain(scale(-1), scale_by_adam, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate)``, omitting what is zero or off.
    """
    return optimizer_chain(
        scale_by_adam(b1, b2, eps),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
    )


class Adam(Optimizer):
    """Adam with coupled L2 weight decay (torch.optim.Adam; the maths is
    :func:`netcl_optim.adam`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).
      foreach, capturable, fused: torch's implementation choices, None or a bool: accepted
        and ignored, as every step is one fused kernel already (step counts live on the
        host).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step`` (a per-parameter count: a parameter without a
    grad does not advance), ``exp_avg``, ``exp_avg_sq``. torch's ``amsgrad`` is not
    implemented.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        FOREACH,
        MAXIMIZE,
        CAPTURABLE,
        DIFFERENTIABLE,
        FUSED,
    )
    torch_state = (ADAM_MOMENTS, DECAY_COUNT)
    torch_step = True
    torch_marks: ClassVar[dict[str, bool]] = {"decoupled_weight_decay": False}

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return adam(lr, betas[0], betas[1], eps, weight_decay, maximize=maximize)


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
      maximize, foreach, capturable, fused, differentiable: as in :class:`Adam`.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.01, NON_NEGATIVE),
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
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return adamw(lr, betas[0], betas[1], eps, weight_decay, maximize=maximize)
