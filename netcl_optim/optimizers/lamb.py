"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"): the functional ``lamb`` (optax's name, signature and defaults) and the stateful
``Lamb``; Adam's moments scaled per leaf by the trust ratio ``||p|| / ||u||``."""

from __future__ import annotations

__all__ = ["Lamb", "lamb"]

from typing import Any

from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..transforms._adaptive import scale_by_adam
from ..transforms._blocks import scale_by_trust_ratio
from ..transforms._combining import chain
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent, check_learning_rate
from .adam import ADAM_MOMENTS


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """LAMB (optax's ``lamb``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        u <- m / (1 - b1^t) / (sqrt(v / (1 - b2^t) + eps_root) + eps) + weight_decay * p
        u <- u * ||p|| / ||u||                          (per leaf; 1 where a norm is 0)
        p <- p - lr * u

    ``chain(scale_by_adam, add_decayed_weights(weight_decay, mask), scale_by_trust_ratio,
    scale_by_learning_rate)``. The norms are each leaf's (a layer's), computed on the
    device in one reduction for the whole tree. torch.optim has no LAMB; torch-optimizer's
    ``Lamb`` skips the bias corrections by default and clamps ``||p||`` at 10.

    Device: the Adam kernel writes the updates; one reduction launch and one finishing launch
    give every leaf's two norms; the trust ratio and the learning rate are fused into the
    step's last kernel (two launches: full and partial work-groups). No host sync.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check_learning_rate(learning_rate)
    decay = [add_decayed_weights(weight_decay, mask)] if weight_decay else []
    tx = chain(
        *ascent(maximize),
        scale_by_adam(b1, b2, eps, eps_root),
        *decay,
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class Lamb(Optimizer):
    """LAMB (the maths is :func:`netcl_optim.lamb`, optax's rule)::

        g <- -g                                         (if maximize)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        u <- m / (1 - b1^t) / (sqrt(v / (1 - b2^t) + eps_root) + eps) + weight_decay * p
        p <- p - lr * u * ||p|| / ||u||                 (norms per parameter)

    torch.optim has no LAMB. torch-optimizer's ``Lamb`` (``debias=False``, ``||p||`` clamped
    at 10) and pytorch-optimizer's differ; this class follows optax's numbers.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-6, optax's).
      weight_decay: decoupled decay inside the trust ratio, >= 0 (default 0).
      eps_root: added to ``v / (1 - b2^t)`` under the root, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), as torch's Adam.
    """

    hyperparameters = (
        torch_lr(1e-3),
        BETAS,
        Hyperparameter("eps", 1e-6, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("eps_root", 0.0, NON_NEGATIVE),
        MAXIMIZE,
    )
    torch_state = (ADAM_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        eps_root: float,
        maximize: bool,
    ) -> GradientTransformation:
        return lamb(lr, betas[0], betas[1], eps, eps_root, weight_decay, maximize=maximize)
