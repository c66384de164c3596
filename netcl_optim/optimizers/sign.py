"""Sign methods (Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex
Problems"): the functional ``scale_by_sign``, ``sign_sgd`` and ``signum`` (optax's names,
signatures and defaults), the stateful ``SignSGD`` and ``Signum``, and optax's ``ema`` (the
building block of ``signum``) with its state."""

from __future__ import annotations

__all__ = [
    "EmaState",
    "SignSGD",
    "Signum",
    "ema",
    "scale_by_sign",
    "sign_sgd",
    "signum",
]

from typing import Any

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, UNIT, check
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import elementwise
from ..transforms._ema import EmaState, ema
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# jnp.sign: -1, +-0 (its sign kept), +1, and NaN for NaN (OpenCL's sign() would make it 0)
_SIGN = "u = ISNAN(u) ? u : SIGN(u);\n"

# Signum's momentum: "momentum_buffer" (torch's name for SGD's), counting the steps
SIGNUM_MOMENTUM = torch_state(EmaState, ema="momentum_buffer", count="momentum_buffer")


def scale_by_sign() -> GradientTransformation:
    """The sign of each element (optax's ``scale_by_sign``): ``u <- sign(u)`` (``-1``, ``0``
    with its sign, ``+1``; NaN stays NaN, as ``jnp.sign``). Stateless.

    Device: no slot, fused like every element-wise transform.
    """
    return elementwise(Fragment("scale_by_sign", _SIGN))


def _sign_sgd(learning_rate: ScalarOrSchedule, weight_decay: float, maximize: bool):
    return optimizer_chain(
        scale_by_sign(),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
    )


def sign_sgd(
    learning_rate: ScalarOrSchedule,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """signSGD (optax's ``sign_sgd``: its signature and order of operations)::

        g <- -g                                         (if maximize)
        p <- p - lr * sign(g)

    ``chain(scale_by_sign, scale_by_learning_rate)``; ``lr`` has no default, as in optax.
    torch.optim has no signSGD.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _sign_sgd(learning_rate, 0.0, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def _signum(
    learning_rate: ScalarOrSchedule,
    beta: float,
    accumulator_dtype: Any,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    check(UNIT, beta=beta)
    return optimizer_chain(
        ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
        scale_by_sign(),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
    )


def signum(
    learning_rate: ScalarOrSchedule,
    beta: float = 0.9,
    accumulator_dtype: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Signum, signSGD with momentum (optax's ``signum``: its signature, defaults and order of
    operations)::

        g <- -g                                         (if maximize)
        m <- (1 - beta) g + beta m                      (m starts at zero; no bias correction)
        p <- p - lr * sign(m)

    ``chain(ema(beta, debias=False), scale_by_sign, scale_by_learning_rate)``;
    ``accumulator_dtype`` must be None (see :func:`ema`). torch.optim has no Signum; the
    paper's momentum ``m <- beta m + (1 - beta) g`` is the same average.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _signum(learning_rate, beta, accumulator_dtype, 0.0, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class SignSGD(Optimizer):
    """signSGD (the maths is :func:`netcl_optim.sign_sgd`, optax's rule)::

        g <- -g                                         (if maximize)
        p <- p - lr * (sign(g) + weight_decay * p)

    torch.optim has no signSGD. The weight decay is decoupled (added after the sign, as
    optax's ``lion`` does), so it is not lost in the sign.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3; optax's ``sign_sgd`` has none).
      weight_decay: decoupled decay, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: none (``step`` when ``weight_decay`` is used).
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (DECAY_COUNT,)
    torch_step = False

    @staticmethod
    def functional(lr: Any, weight_decay: float, maximize: bool) -> GradientTransformation:
        return _sign_sgd(lr, weight_decay, maximize)


class Signum(Optimizer):
    """Signum (the maths is :func:`netcl_optim.signum`, optax's rule)::

        g <- -g                                         (if maximize)
        m <- (1 - beta) g + beta m
        p <- p - lr * (sign(m) + weight_decay * p)

    torch.optim has no Signum. The weight decay is decoupled (added after the sign).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3; optax's ``signum`` has none).
      beta: the momentum's decay, in [0, 1) (default 0.9, optax's and the paper's).
      weight_decay: decoupled decay, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``momentum_buffer`` (m).
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("beta", 0.9, UNIT),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (SIGNUM_MOMENTUM, DECAY_COUNT)
    torch_step = False

    @staticmethod
    def functional(
        lr: Any, beta: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return _signum(lr, beta, None, weight_decay, maximize)
