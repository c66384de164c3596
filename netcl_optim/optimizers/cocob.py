"""COCOB-Backprop (Orabona and Tommasi, 2017, "Training Deep Networks without Learning Rates
Through Coin Betting"): the functional ``scale_by_cocob`` and ``cocob`` (optax.contrib's names,
signatures and defaults), the stateful ``COCOB`` and the torch-style keys of its state."""

from __future__ import annotations

__all__ = ["COCOB", "COCOBState", "cocob", "scale_by_cocob"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, check
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent

# optax.contrib, in its order, with c the (scaled) gradient and p0 the params at the first step:
#   L <- max(L, |c|);  G <- G + |c|;  R <- max(R - c (p - p0), 0);  C <- C - c
#   u = -p + (p0 + bet),  bet = C / (L max(G + L, alpha L)) (L + R)
# p0 is kept as its offset from the params, d = p0 - p: R <- max(R + c d, 0), u = d + bet, and
# after the step d <- -bet (p + u = p0 + bet). It starts at 0, so the state needs no copy of
# the params nor the kernel a read of them, and u carries no rounding of p's magnitude
# (optax's -p + (p0 + bet) does). max() keeps a NaN, as jnp.maximum.
_COCOB = """
const real c_abs = FABS(u);
scale = scale >= c_abs ? scale : c_abs;
subgradients = subgradients + c_abs;
const real r = reward + u * init_offset;
reward = r < (real)0 ? (real)0 : r;
cumulative_gradients = cumulative_gradients - u;
const real lead = subgradients + scale;
const real floor_ = alpha * scale;
const real bet = cumulative_gradients / (scale * (lead >= floor_ ? lead : floor_))
                 * (scale + reward);
u = init_offset + bet;
init_offset = -bet;
"""


class COCOBState(NamedTuple):
    """Shaped like the params: ``init_offset = p0 - p``, the initial params' offset from the
    current ones (optax keeps ``init_particles``, the params themselves; the offset starts at
    zero, so no copy of the params is taken), the negated sum of gradients
    (``cumulative_gradients``), the largest gradient seen (``scale``, starting at ``eps``),
    the sum of absolute gradients (``subgradients``) and the wealth (``reward``)."""

    init_offset: Any
    cumulative_gradients: Any
    scale: Any
    subgradients: Any
    reward: Any


# no torch.optim COCOB: its buffers under optax's names
COCOB_BUFFERS = torch_state(
    COCOBState,
    init_offset="init_offset",
    cumulative_gradients="cumulative_gradients",
    scale="scale",
    subgradients="subgradients",
    reward="reward",
)


def scale_by_cocob(alpha: float = 100.0, eps: float = 1e-8) -> GradientTransformation:
    """COCOB's scaling (optax.contrib's ``scale_by_cocob``, same signature and defaults)::

        L <- max(L, |g|);  G <- G + |g|;  R <- max(R - g (p - p0), 0);  C <- C - g
        u <- p0 + C / (L max(G + L, alpha L)) (L + R) - p

    ``p0`` is the params at the first step, kept as its offset ``p0 - p``; ``L`` starts at
    ``eps``, the others at zero. The update is the final step (no learning rate after it).

    Device: five slots, no read of the params; ``alpha`` from the host.
    """
    check(NON_NEGATIVE, alpha=alpha)
    check(POSITIVE, eps=eps)
    values = (float(alpha),)

    fragment = Fragment(
        "scale_by_cocob",
        _COCOB,
        slots=("init_offset", "cumulative_gradients", "scale", "subgradients", "reward"),
        scalars=("alpha",),
        host_step=lambda state, **_: (values, state),
        slot_init=(0.0, 0.0, float(eps), 0.0, 0.0),
    )
    return elementwise(fragment, init=COCOBState)


def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """COCOB-Backprop (optax.contrib's ``cocob``: its signature, defaults and order of
    operations), a learning-rate-free rule that bets on each coordinate::

        g <- -g                                         (if maximize)
        g <- lr * (g + weight_decay * p)                (coupled decay, with mask)
        L <- max(L, |g|);  G <- G + |g|;  R <- max(R - g (p - p0), 0);  C <- C - g
        p <- p0 + C / (L max(G + L, alpha L)) (L + R)

    ``chain(add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate,
    flip_sign=False), scale_by_cocob(alpha, eps))``: the learning rate scales the gradient
    (1.0, the paper's rule, by default). ``p0`` is the params at the first step. torch.optim
    has no COCOB.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check(NON_NEGATIVE, weight_decay=weight_decay)
    decay = [add_decayed_weights(weight_decay, mask)] if weight_decay else []
    tx = chain(
        *ascent(maximize),
        *decay,
        scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha, eps),
    )
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class COCOB(Optimizer):
    """COCOB-Backprop (the maths is :func:`netcl_optim.cocob`, optax.contrib's rule)::

        g <- -g                                         (if maximize)
        g <- lr * (g + weight_decay * p)
        L <- max(L, |g|);  G <- G + |g|;  R <- max(R - g (p - p0), 0);  C <- C - g
        p <- p0 + C / (L max(G + L, alpha L)) (L + R)

    torch.optim has no COCOB.

    Args:
      params: parameters or param groups.
      lr: scales the gradient, > 0 (default 1.0: the paper's rule has none).
      alpha: bounds the bet by ``1 / (alpha L)`` early on, >= 0 (default 100).
      eps: where the scale ``L`` starts, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``init_offset`` (``p0 - p``, where optax keeps
    ``init_particles``) and optax's ``cumulative_gradients``, ``scale``, ``subgradients``,
    ``reward``.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("alpha", 100.0, NON_NEGATIVE),
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (COCOB_BUFFERS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, alpha: float, eps: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return cocob(lr, alpha, eps, weight_decay, maximize=maximize)
