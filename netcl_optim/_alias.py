"""The optimizers as chains of transforms, numerically equal to torch.optim's rules."""

from __future__ import annotations

from typing import Any

from . import _validation
from ._base import GradientTransformation, ScalarOrSchedule
from ._validation import NON_NEGATIVE, check
from .transforms._adaptive import scale_by_adam, scale_by_rms
from .transforms._combining import chain
from .transforms._momentum import trace
from .transforms._scaling import scale_by_learning_rate
from .transforms._weight_decay import add_decayed_weights


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, torch's rule::

        g <- g + weight_decay * p                       (if weight_decay)
        b <- g (first step); b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b if nesterov else b        (if momentum)
        p <- p - lr * g

    ``chain(add_decayed_weights, trace, scale_by_learning_rate)``, omitting what is zero.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    parts: list[GradientTransformation] = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def momentum(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """Polyak (heavy-ball) momentum: :func:`sgd` with ``momentum`` and zero dampening."""
    return sgd(learning_rate, momentum, 0.0, weight_decay, nesterov)


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam with coupled L2 weight decay (torch.optim.Adam)::

        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``chain(add_decayed_weights, scale_by_adam, scale_by_learning_rate)``.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    parts: list[GradientTransformation] = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts += [scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate)]
    return chain(*parts)


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    mask: Any = None,
) -> GradientTransformation:
    """Adam with decoupled weight decay (torch.optim.AdamW)::

        m, v, t as in :func:`adam`
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    ``chain(scale_by_adam, add_decayed_weights(weight_decay, mask), scale_by_learning_rate)``.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    parts = [scale_by_adam(b1, b2, eps)]
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-3,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSProp (torch.optim.RMSprop)::

        g <- g + weight_decay * p                       (if weight_decay)
        v <- alpha v + (1 - alpha) g^2
        d <- sqrt(v - m^2) + eps with m <- alpha m + (1 - alpha) g if centered, else sqrt(v) + eps
        b <- momentum b + g / d; p <- p - lr * b        (if momentum; b starts at 0)
        p <- p - lr * g / d                             (otherwise)

    ``chain(add_decayed_weights, scale_by_rms, trace, scale_by_learning_rate)``.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, weight_decay=weight_decay, momentum=momentum)
    parts: list[GradientTransformation] = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_rms(alpha, eps, centered))
    if momentum:
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
