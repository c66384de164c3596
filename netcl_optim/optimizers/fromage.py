"""Fromage (Bernstein, Vahdat, Yue and Liu, 2020, "On the distance between two neural
networks and the stability of learning"): the functional ``fromage`` (optax's name,
signature and defaults) and the stateful ``Fromage``."""

from __future__ import annotations

__all__ = ["Fromage", "fromage"]

import math
from typing import Any

from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..transforms._blocks import scale_by_trust_ratio
from ..transforms._combining import chain
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent, check_learning_rate


def fromage(
    learning_rate: ScalarOrSchedule,
    min_norm: float = 1e-6,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Fromage (optax's ``fromage``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        u <- g * ||p|| / ||g||                          (per leaf; norms at least min_norm)
        p <- p - lr / sqrt(1 + lr^2) * u + (1 / sqrt(1 + lr^2) - 1) * p

    i.e. ``p <- (p - lr u) / sqrt(1 + lr^2)``. ``chain(scale_by_trust_ratio(min_norm),
    scale_by_learning_rate(lr / sqrt(1 + lr^2)), add_decayed_weights(1 / sqrt(1 + lr^2) -
    1))``; a schedule gives each step's ``lr``. torch.optim has no Fromage.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check_learning_rate(learning_rate)
    if callable(learning_rate):
        lr_fn = learning_rate

        def shrink(count: int) -> float:
            return 1.0 / math.sqrt(1.0 + float(lr_fn(count)) ** 2)

        scaled: ScalarOrSchedule = lambda count: shrink(count) * float(lr_fn(count))  # noqa: E731
    else:
        mult = 1.0 / math.sqrt(1.0 + float(learning_rate) ** 2)
        scaled = float(learning_rate) * mult

        def shrink(count: int) -> float:
            return mult

    # the decay is negative (a shrink): add_decayed_weights takes that only as a schedule
    tx = chain(
        *ascent(maximize),
        scale_by_trust_ratio(min_norm),
        scale_by_learning_rate(scaled),
        add_decayed_weights(lambda count: shrink(count) - 1.0),
    )
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class Fromage(Optimizer):
    """Fromage (the maths is :func:`netcl_optim.fromage`, optax's rule)::

        g <- -g                                         (if maximize)
        p <- (p - lr g ||p|| / ||g||) / sqrt(1 + lr^2)  (norms per parameter, >= min_norm)

    torch.optim has no Fromage.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 0.01, the paper's).
      min_norm: the least value of either norm, >= 0 (default 1e-6).
      maximize: maximize the objective (step along the gradient; default False).

    No state per parameter but ``step``.
    """

    hyperparameters = (
        torch_lr(1e-2),
        KEYWORD_ONLY,
        Hyperparameter("min_norm", 1e-6, NON_NEGATIVE),
        MAXIMIZE,
    )
    torch_state = (DECAY_COUNT,)
    torch_step = True

    @staticmethod
    def functional(lr: Any, min_norm: float, maximize: bool) -> GradientTransformation:
        return fromage(lr, min_norm, maximize=maximize)
