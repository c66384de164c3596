"""LARS (You, Gitman and Ginsburg, 2017, "Large Batch Training of Convolutional Networks"):
the functional ``lars`` (optax's name, signature and defaults) and the stateful ``LARS``;
SGD with momentum whose update is scaled per leaf by ``trust_coefficient ||p|| / ||u||``."""

from __future__ import annotations

__all__ = ["LARS", "lars"]

from typing import Any

from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, UNIT
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..transforms._blocks import scale_by_trust_ratio
from ..transforms._combining import chain
from ..transforms._masking import masked
from ..transforms._momentum import trace
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent, check_learning_rate
from .sgd import MOMENTUM_BUFFER


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """LARS (optax's ``lars``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        u <- g + weight_decay * p                       (where weight_decay_mask)
        u <- u * trust_coefficient * ||p|| / (||u|| + eps)   (per leaf, where trust_ratio_mask;
                                                         1 where a norm is 0)
        u <- -lr * u;  t <- momentum t + u;  p <- p + t   (nesterov: p <- p + u + momentum t)

    ``chain(add_decayed_weights(weight_decay, weight_decay_mask), masked(scale_by_trust_ratio,
    trust_ratio_mask), scale_by_learning_rate, trace(momentum, nesterov))``: the momentum
    is taken after the learning rate, as optax does. A mask is a pytree of bools like the
    params, a callable of the params, or ``True`` (every leaf). A zero weight decay is left
    out of the chain (optax adds ``0 * p``, NaN where ``p`` is infinite), and so is a zero
    momentum (optax's ``trace(0)`` passes the updates through). torch.optim has no LARS.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check_learning_rate(learning_rate)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    if decay and weight_decay_mask is not True:
        decay = [masked(decay[0], weight_decay_mask)]
    trust = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    tx = chain(
        *ascent(maximize),
        *decay,
        trust if trust_ratio_mask is True else masked(trust, trust_ratio_mask),
        scale_by_learning_rate(learning_rate),
        *([trace(decay=momentum, nesterov=nesterov)] if momentum else []),
    )
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class LARS(Optimizer):
    """LARS (the maths is :func:`netcl_optim.lars`, optax's rule)::

        g <- -g                                         (if maximize)
        u <- g + weight_decay * p
        u <- u * trust_coefficient * ||p|| / (||u|| + eps)   (per parameter)
        t <- momentum t - lr u;  p <- p + t             (nesterov: p <- p - lr u + momentum t)

    torch.optim has no LARS. To leave some parameters (biases, norms) out of the decay, as
    optax's ``weight_decay_mask`` does, give them a param group with ``weight_decay=0``.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1.0: the trust coefficient sets the step's scale).
      momentum: in [0, 1) (default 0.9).
      weight_decay: coupled decay (``g + wd p``, inside the trust ratio), >= 0 (default 0).
      trust_coefficient: >= 0 (default 0.001).
      eps: added to ``||u||``, >= 0 (default 0).
      nesterov: Nesterov momentum (default False).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``momentum_buffer``, as torch's SGD.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("momentum", 0.9, UNIT),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("trust_coefficient", 0.001, NON_NEGATIVE),
        Hyperparameter("eps", 0.0, NON_NEGATIVE),
        Hyperparameter("nesterov", False, BOOL),
        MAXIMIZE,
    )
    torch_state = (MOMENTUM_BUFFER, DECAY_COUNT)
    torch_step = False

    @staticmethod
    def functional(
        lr: Any,
        momentum: float,
        weight_decay: float,
        trust_coefficient: float,
        eps: float,
        nesterov: bool,
        maximize: bool,
    ) -> GradientTransformation:
        return lars(
            lr,
            weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            momentum=momentum,
            nesterov=nesterov,
            maximize=maximize,
        )
