"""Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models"): the functional ``scale_by_adan`` and ``adan`` (optax's names, signatures and
defaults), the stateful ``Adan`` (the reference PyTorch Adan's ``betas`` triple) and the
torch-style keys of its state."""

from __future__ import annotations

__all__ = ["Adan", "ScaleByAdanState", "adan", "scale_by_adan"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ..stateful._declaration import BETAS3, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import elementwise
from ._shared import DECAY_COUNT, optimizer_chain

# optax, in its order: d <- g - g_prev (0 at the first step); m <- (1 - b1) g + b1 m;
# v <- (1 - b2) d + b2 v; n <- (1 - b3) (g + (1 - b2) d)^2 + b3 n; g_prev <- g;
# u <- (m / bc1 + (1 - b2) (v / bc2)) / (sqrt(n / bc3 + eps_root) + eps). ``first`` (1 at
# the first step, else 0) comes from the host, so d is exactly 0 there (as optax's where).
_ADAN = """
const real d = first != 0 ? (real)0 : u - g;
m = one_minus_b1 * u + b1 * m;
v = one_minus_b2 * d + b2 * v;
const real sq = u + one_minus_b2 * d;
n = one_minus_b3 * (sq * sq) + b3 * n;
g = u;
u = (m / bc1 + one_minus_b2 * (v / bc2)) / (SQRT(n / bc3 + eps_root) + eps);
"""


class ScaleByAdanState(NamedTuple):
    """The number of updates and Adan's slots (shaped like the params): ``m`` (the
    gradients' average), ``v`` (the average of the gradients' differences), ``n`` (the
    average of the squared term) and ``g`` (the previous gradient). optax's state has the
    same slots and calls the count ``t``."""

    count: int
    m: Any
    v: Any
    n: Any
    g: Any


# the reference PyTorch Adan (sail-sg) keeps "exp_avg", "exp_avg_diff", "exp_avg_sq" and the
# previous gradient (its newer versions keep it negated as "neg_pre_grad": here, as it is)
ADAN_MOMENTS = torch_state(
    ScaleByAdanState,
    m="exp_avg",
    v="exp_avg_diff",
    n="exp_avg_sq",
    g="pre_grad",
    count="exp_avg",
)


def scale_by_adan(
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """Adan's scaling (optax's ``scale_by_adan``, same signature and defaults)::

        d <- g - g_prev                                 (0 at the first step)
        m <- (1 - b1) g + b1 m;  v <- (1 - b2) d + b2 v
        n <- (1 - b3) (g + (1 - b2) d)^2 + b3 n;  g_prev <- g
        u <- (m / (1 - b1^t) + (1 - b2) v / (1 - b2^t)) / (sqrt(n / (1 - b3^t) + eps_root) + eps)

    Device: four slots (``m``, ``v``, ``n``, ``g``); the bias corrections and the
    first-step flag come from the host.
    """
    check(UNIT, b1=b1, b2=b2, b3=b3)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    b1, b2, b3 = float(b1), float(b2), float(b3)
    eps, eps_root = float(eps), float(eps_root)

    def host_step(state: ScaleByAdanState, **_: Any):
        t = state.count + 1
        values = (
            1.0 if state.count == 0 else 0.0,
            1.0 - b1,
            b1,
            1.0 - b2,
            b2,
            1.0 - b3,
            b3,
            1.0 - b1**t,
            1.0 - b2**t,
            1.0 - b3**t,
            eps,
            eps_root,
        )
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_adan",
        _ADAN,
        slots=("m", "v", "n", "g"),
        scalars=(
            "first",
            "one_minus_b1",
            "b1",
            "one_minus_b2",
            "b2",
            "one_minus_b3",
            "b3",
            "bc1",
            "bc2",
            "bc3",
            "eps",
            "eps_root",
        ),
        host_step=host_step,
    )
    return elementwise(
        fragment, init=lambda m, v, n, g: ScaleByAdanState(count=0, m=m, v=v, n=n, g=g)
    )


def adan(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adan with decoupled weight decay (optax's ``adan``: its signature and defaults)::

        g <- -g                                         (if maximize)
        u <- scale_by_adan(b1, b2, b3, eps, eps_root)(g)
        p <- p - lr * (u + weight_decay * p)

    ``chain(scale_by_adan, add_decayed_weights(weight_decay, mask), scale_by_learning_rate)``.
    torch.optim has no Adan. The reference PyTorch Adan (sail-sg) has the same betas but
    applies the decay as a proximal step by default (``p <- (p - lr u) / (1 + lr wd)``) and
    has no ``eps_root``.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_adan(b1, b2, b3, eps, eps_root),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Adan(Optimizer):
    """Adan (the maths is :func:`netcl_optim.adan`, optax's rule)::

        g <- -g                                         (if maximize)
        d <- g - g_prev (0 at the first step)
        m <- (1 - b1) g + b1 m;  v <- (1 - b2) d + b2 v
        n <- (1 - b3) (g + (1 - b2) d)^2 + b3 n
        u <- (m / (1 - b1^t) + (1 - b2) v / (1 - b2^t)) / (sqrt(n / (1 - b3^t) + eps_root) + eps)
        p <- p - lr * (u + weight_decay * p)

    torch.optim has no Adan. The signature follows the reference PyTorch Adan (sail-sg):
    ``betas`` is the triple ``(b1, b2, b3)`` with the same defaults; its default proximal
    weight decay (``p <- (p - lr u) / (1 + lr wd)``) differs from optax's decoupled decay
    used here, and its ``max_grad_norm``, ``no_prox``, ``foreach`` and ``fused`` are not
    offered.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2, b3)``, each in [0, 1) (default (0.98, 0.92, 0.99)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 0).
      eps_root: added under the root, >= 0 (default 1e-8, optax's ``adan``).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_diff`` (v), ``exp_avg_sq``
    (n), ``pre_grad`` (the previous gradient).
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("betas", (0.98, 0.92, 0.99), BETAS3),
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("eps_root", 1e-8, NON_NEGATIVE),
        MAXIMIZE,
    )
    torch_state = (ADAN_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float, float],
        eps: float,
        weight_decay: float,
        eps_root: float,
        maximize: bool,
    ) -> GradientTransformation:
        b1, b2, b3 = betas
        return adan(lr, b1, b2, b3, eps, eps_root, weight_decay, maximize=maximize)
