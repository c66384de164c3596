"""Adagrad (Duchi et al., 2011): the functional ``scale_by_rss`` (optax's name and defaults)
and ``adagrad`` (torch's rule and defaults; optax's by keywords), the stateful ``Adagrad``
(torch.optim.Adagrad's signature, defaults and state keys)."""

from __future__ import annotations

__all__ = ["Adagrad", "ScaleByRssState", "adagrad", "scale_by_rss"]

from typing import Any, NamedTuple

from .. import _validation
from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, check, require
from ..stateful._declaration import (
    DIFFERENTIABLE,
    FOREACH,
    FUSED,
    KEYWORD_ONLY,
    MAXIMIZE,
    Hyperparameter,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import elementwise
from ..transforms._scaling import ScaleByScheduleState
from ._shared import DECAY_COUNT, optimizer_chain

# The accumulator's slot starts at the initial value (the fragment's slot_init).
# torch: state_sum.addcmul_(g, g, value=1); std = sqrt(s) + eps; p += (-clr * g) / std
_RSS = """
sum_of_squares = sum_of_squares + u * u;
u = u / (SQRT(sum_of_squares) + eps);
"""
# optax: g * rsqrt(s + eps) where s > 0, else 0 (g * 0 keeps a NaN or an inf a NaN, as optax)
_RSS_EPS_IN_SQRT = """
sum_of_squares = sum_of_squares + u * u;
u = sum_of_squares > 0 ? u / SQRT(sum_of_squares + eps) : u * 0;
"""


class ScaleByRssState(NamedTuple):
    """The number of updates and the sum of the squared updates (shaped like the params),
    which starts at the initial accumulator value: optax's (and torch's) sum."""

    count: int
    sum_of_squares: Any


# torch.optim.Adagrad's accumulator (its fresh buffer holds the initial value)
RSS_SUM = torch_state(ScaleByRssState, sum_of_squares="sum", count="sum")
# torch's lr_decay: clr = lr / (1 + (step - 1) lr_decay), a schedule of torch's step count
LR_DECAY_STEP = torch_state(ScaleByScheduleState, count=STEP)


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    """Scale by the root of the sum of all squared updates so far (optax's ``scale_by_rss``
    and its defaults)::

        s <- s + g^2                          (s starts at initial_accumulator_value)
        u <- g / sqrt(s + eps) where s > 0, else 0          (eps_in_sqrt, optax's)
        u <- g / (sqrt(s) + eps)                            (not eps_in_sqrt, torch's Adagrad)

    optax multiplies by ``rsqrt(s + eps)``; here the division is correctly rounded.

    Device: one slot (``sum_of_squares``), fused like every element-wise transform.
    """
    check(NON_NEGATIVE, initial_accumulator_value=initial_accumulator_value, eps=eps)
    in_sqrt = require("eps_in_sqrt", eps_in_sqrt, BOOL)
    s0, eps = float(initial_accumulator_value), float(eps)

    def host_step(state: ScaleByRssState, **_: Any):
        return (eps,), state._replace(count=state.count + 1)

    fragment = Fragment(
        "scale_by_rss",
        _RSS_EPS_IN_SQRT if in_sqrt else _RSS,
        slots=("sum_of_squares",),
        nonnegative=("sum_of_squares",),
        scalars=("eps",),
        host_step=host_step,
        slot_init=(s0,),
    )
    return elementwise(fragment, init=lambda s: ScaleByRssState(count=0, sum_of_squares=s))


def _decayed(learning_rate: ScalarOrSchedule, lr_decay: float) -> ScalarOrSchedule:
    """torch's ``clr = lr / (1 + (step - 1) * lr_decay)`` as a schedule of the count (which
    is ``step - 1``), in Python double as torch computes it; ``learning_rate`` as it is when
    ``lr_decay`` is 0."""
    if not lr_decay:
        return learning_rate

    def clr(count: int) -> float:
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return float(lr) / (1.0 + count * lr_decay)

    return clr


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    eps_in_sqrt: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Adagrad (torch.optim.Adagrad)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        s <- s + g^2                                    (s starts at initial_accumulator_value)
        clr <- lr / (1 + (t - 1) * lr_decay)            (t: the step, from 1)
        p <- p - clr * g / (sqrt(s) + eps)

    ``chain(scale(-1), add_decayed_weights, scale_by_rss, scale_by_learning_rate)``, omitting
    what is zero or off; ``lr_decay`` makes the learning rate a schedule of the count.

    torch's defaults (``initial_accumulator_value=0``, ``eps=1e-10`` outside the root). optax's
    ``adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)`` differs: its accumulator starts at
    0.1 and it scales by ``rsqrt(s + eps)`` where ``s > 0`` (0 elsewhere). Its exact numbers are
    ``adagrad(lr, initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True)``.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, lr_decay=lr_decay)
    return optimizer_chain(
        scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=eps_in_sqrt),
        learning_rate=_decayed(learning_rate, float(lr_decay)),
        weight_decay=weight_decay,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad; the maths is :func:`netcl_optim.adagrad`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        s <- s + g^2                                    (s starts at initial_accumulator_value)
        clr <- lr / (1 + (t - 1) * lr_decay)            (t: the parameter's step, from 1)
        p <- p - clr * g / (sqrt(s) + eps)

    optax's ``adagrad`` (accumulator from 0.1, ``rsqrt(s + 1e-7)``) is the functional
    ``adagrad(..., eps_in_sqrt=True)``; this class follows torch only.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2).
      lr_decay: learning-rate decay per step, >= 0 (default 0).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      initial_accumulator_value: the accumulator's start, >= 0 (default 0).
      eps: added to the root, >= 0 (default 1e-10).
      foreach, fused: torch's implementation choices, None or a bool: accepted and ignored,
        as every step is one fused kernel already.
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``sum``. torch creates them at construction;
    here they appear at a parameter's first step (a loaded torch state with step 0 resumes
    as torch does).
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("lr_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("initial_accumulator_value", 0.0, NON_NEGATIVE),
        Hyperparameter("eps", 1e-10, NON_NEGATIVE),
        FOREACH,
        KEYWORD_ONLY,
        MAXIMIZE,
        DIFFERENTIABLE,
        FUSED,
    )
    torch_state = (RSS_SUM, LR_DECAY_STEP, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, lr_decay: float, weight_decay: float, initial_accumulator_value: float,
        eps: float, maximize: bool,
    ) -> GradientTransformation:  # fmt: skip
        return adagrad(
            lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize
        )
