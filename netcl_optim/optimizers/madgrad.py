"""MADGRAD (Defazio and Jelassi, 2021, "Adaptivity without Compromise: A Momentumized, Adaptive,
Dual Averaged Gradient Method for Stochastic Optimization"): the functional
``scale_by_madgrad`` and ``madgrad`` (optax.contrib's names, signatures and defaults), the
stateful ``MADGRAD`` (facebookresearch/madgrad's name and defaults) and the torch-style keys
of its state."""

from __future__ import annotations

__all__ = ["MADGRAD", "MadgradState", "madgrad", "scale_by_madgrad"]

from typing import Any, NamedTuple

import numpy as np

from .. import _validation
from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent

# optax.contrib, in its order, with lamb = (lr + eps) sqrt(k + 1) from the host (in float32,
# as optax computes it):
#   G <- G + lamb g^2;  s <- s + lamb g;  z = x0 - s / (cbrt(G) + eps)
#   u = ((1 - momentum) z + momentum p) - p,  i.e. (1 - momentum) (z - p)
# x0 is kept as its offset from the params, d = x0 - p, advanced by the updates (d <- d - u):
# it starts at 0, so the state needs no copy of the params nor the kernel a read of them, and
# z - p = d - s / (cbrt(G) + eps) carries no rounding of p's magnitude (optax's x_new - p does).
_MADGRAD = """
grad_sum_sq = grad_sum_sq + lamb * (u * u);
s = s + lamb * u;
u = one_minus_momentum * (x0_offset - s / (CBRT(grad_sum_sq) + eps));
x0_offset = x0_offset - u;
"""


class MadgradState(NamedTuple):
    """The number of updates, the weighted sums of squared gradients (``grad_sum_sq``) and
    of gradients (``s``), and ``x0_offset = x0 - p``: the initial params' offset from the
    current ones, the sum of the updates so far negated (optax keeps ``x0`` itself; the
    offset starts at zero, so no copy of the params is taken)."""

    count: int
    grad_sum_sq: Any
    s: Any
    x0_offset: Any


# facebookresearch/madgrad keeps "grad_sum_sq" and "s" (and "x0", the params' copy, here its
# offset from the params)
MADGRAD_SUMS = torch_state(
    MadgradState, grad_sum_sq="grad_sum_sq", s="s", x0_offset="x0_offset", count="s"
)


def scale_by_madgrad(
    learning_rate: ScalarOrSchedule, momentum: float = 0.9, eps: float = 1e-6
) -> GradientTransformation:
    """MADGRAD's scaling (optax.contrib's ``scale_by_madgrad``, same signature and defaults;
    the learning rate is inside the rule, so the update is the final step)::

        lamb = (lr + eps) sqrt(k + 1)                   (k: steps so far; lr may be a schedule)
        G <- G + lamb g^2;  s <- s + lamb g;  z = x0 - s / (cbrt(G) + eps)
        u <- (1 - momentum) z + momentum p - p

    ``x0`` is the params at the first step, kept as its offset ``x0 - p`` (advanced by the
    updates, so ``z - p`` is computed without rounding ``p``'s magnitude).

    Device: three slots (``grad_sum_sq``, ``s``, ``x0_offset``), no read of the params;
    ``lamb`` comes from the host.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(UNIT, momentum=momentum)
    check(POSITIVE, eps=eps)
    momentum, eps = float(momentum), float(eps)

    def host_step(state: MadgradState, **_: Any):
        k = state.count
        lr = learning_rate(k) if callable(learning_rate) else learning_rate
        # optax computes lamb in float32 (the root of its int32 count is a float32 array, and
        # lr + eps a weakly typed scalar): so does this, for its numbers
        f32 = np.float32
        lamb = float(f32(float(lr) + eps) * np.sqrt(f32(k + 1)))
        return (lamb, 1.0 - momentum, eps), state._replace(count=k + 1)

    fragment = Fragment(
        "scale_by_madgrad",
        _MADGRAD,
        slots=("grad_sum_sq", "s", "x0_offset"),
        scalars=("lamb", "one_minus_momentum", "eps"),
        host_step=host_step,
    )
    return elementwise(
        fragment,
        init=lambda gsq, s, off: MadgradState(count=0, grad_sum_sq=gsq, s=s, x0_offset=off),
    )


def madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """MADGRAD (optax.contrib's ``madgrad``: its signature, defaults and order of
    operations): dual averaging with a cube-root adaptive denominator and momentum::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay: coupled, L2)
        lamb = (lr + eps) sqrt(k + 1)
        G <- G + lamb g^2;  s <- s + lamb g;  z = x0 - s / (cbrt(G) + eps)
        p <- (1 - momentum) z + momentum p

    ``chain(add_decayed_weights(weight_decay), scale_by_madgrad(learning_rate, momentum,
    eps))``; ``x0`` is the params at the first step. torch.optim has no MADGRAD;
    facebookresearch/madgrad's class has the same rule and defaults (its step count ``k``
    is the optimizer's, here each parameter's).

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check(NON_NEGATIVE, weight_decay=weight_decay)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    tx = chain(*ascent(maximize), *decay, scale_by_madgrad(learning_rate, momentum, eps))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class MADGRAD(Optimizer):
    """MADGRAD (the maths is :func:`netcl_optim.madgrad`, optax.contrib's rule)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        lamb = (lr + eps) sqrt(k + 1)
        G <- G + lamb g^2;  s <- s + lamb g;  z = x0 - s / (cbrt(G) + eps)
        p <- (1 - momentum) z + momentum p

    torch.optim has no MADGRAD. This class has facebookresearch/madgrad's name, signature,
    defaults and rule (computed in optax's order; its ``decouple_decay`` is not offered).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2).
      momentum: in [0, 1) (default 0.9).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      eps: added to the cube root, > 0 (default 1e-6).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``grad_sum_sq``, ``s`` (as facebookresearch/madgrad) and
    ``x0_offset`` (``x0 - p``, where facebookresearch keeps ``x0``).
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("momentum", 0.9, UNIT),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("eps", 1e-6, POSITIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (MADGRAD_SUMS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, momentum: float, weight_decay: float, eps: float, maximize: bool
    ) -> GradientTransformation:
        return madgrad(lr, momentum, weight_decay, eps, maximize=maximize)
