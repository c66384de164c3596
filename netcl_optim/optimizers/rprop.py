"""Rprop (Riedmiller & Braun, 1993, "A direct adaptive method for faster backpropagation
learning: the RPROP algorithm"): the functional ``scale_by_rprop`` and ``rprop`` (optax's
names and signatures; torch's rule, optax's by keyword), the stateful ``Rprop``
(torch.optim.Rprop's signature, defaults and state keys)."""

from __future__ import annotations

__all__ = ["Rprop", "ScaleByRpropState", "rprop", "scale_by_rprop"]

from typing import Any, NamedTuple

from .. import _validation
from .._base import Fragment, GradientTransformation
from .._validation import (
    BOOL,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    Rule,
    greater_than,
    invalid,
    pair,
    real,
    require,
)
from ..stateful._declaration import (
    CAPTURABLE,
    DIFFERENTIABLE,
    FOREACH,
    KEYWORD_ONLY,
    MAXIMIZE,
    Hyperparameter,
    Requirement,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale
from ..transforms._storage import low_precision_state
from ._shared import ascent

# torch (_single_tensor_rprop): f = sign(g * prev) -> eta_plus (> 0), eta_minus (< 0), 1 (0);
# torch's CPU sign() is 0 for NaN, so a NaN there counts as 0 too; step = clamp(step * f, lo,
# hi) as min(max(., lo), hi); g' = 0 where f is eta_minus, else g (a NaN kept); u = sign(g')
# * step, with torch's sign (+0 for +-0 and for NaN: a NaN gradient leaves p as it is);
# prev = g'
_RPROP = """
const real s = u * prev_updates;
const real f = s > 0 ? eta_plus : (s < 0 ? eta_minus : (real)1);
real step = step_sizes * f;
step = step < min_step ? min_step : step;
step_sizes = step > max_step ? max_step : step;
const real g = s < 0 ? (real)0 : u;
prev_updates = g;
u = (g > 0 ? (real)1 : (g < 0 ? (real)-1 : (real)0)) * step_sizes;
"""
# optax (scale_by_rprop): s = g * prev with prev the previous update step * sign(g); the step
# is kept where s == 0, else clip(step * (s > 0 ? eta_plus : eta_minus), lo, hi) (a NaN s
# takes eta_minus); the update is the previous one (0 where s < 0), and prev <- 0 where
# s < 0, else step * sign(g) (jnp.sign: -0 for -0, NaN for NaN)
_RPROP_OPTAX = """
const real s = u * prev_updates;
real step = step_sizes * (s > 0 ? eta_plus : eta_minus);
step = step < min_step ? min_step : step;
step = step > max_step ? max_step : step;
step_sizes = s == 0 ? step_sizes : step;
const real previous = prev_updates;
prev_updates = s < 0 ? (real)0 : step_sizes * (ISNAN(u) ? u : SIGN(u));
u = s < 0 ? (real)0 : previous;
"""


class ScaleByRpropState(NamedTuple):
    """optax's Rprop state: each element's step size (it starts at the learning rate) and
    ``prev_updates`` (starting at zero): torch's rule keeps the previous gradient there (0
    where its sign flipped), optax's the previous update ``step * sign(g)``. Both are shaped
    like the params."""

    step_sizes: Any
    prev_updates: Any


# torch.optim.Rprop's buffers (its fresh "step_size" holds lr, its "prev" zeros)
RPROP_STATE = torch_state(ScaleByRpropState, step_sizes="step_size", prev_updates="prev")

_ETA_MINUS = OPEN_UNIT
_ETA_PLUS = greater_than(1.0)


def _initial_step(value: Any) -> float:
    """Rprop's learning rate: the initial step size, a number (not a schedule)."""
    if callable(value):
        raise invalid(
            "learning_rate", value, "a number: Rprop's initial step size, not a schedule",
            error=TypeError,
        )  # fmt: skip
    return float(_validation.learning_rate("learning_rate", value))


def _check_step_bounds(min_step_size: Any, max_step_size: Any) -> tuple[float, float]:
    lo = require("min_step_size", min_step_size, NON_NEGATIVE)
    hi = require("max_step_size", max_step_size, POSITIVE)
    if lo > hi:
        raise invalid("max_step_size", max_step_size, f">= min_step_size ({lo!r})")
    return float(lo), float(hi)


def scale_by_rprop(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
    *,
    optax_rule: bool = False,
) -> GradientTransformation:
    """Rprop's scaling (optax's ``scale_by_rprop`` and its signature; torch's rule)::

        f <- eta_plus if g * prev > 0, eta_minus if < 0, 1 if = 0
        step <- clamp(step * f, min_step_size, max_step_size)        (every step)
        g <- 0 where g * prev < 0;  u <- sign(g) * step;  prev <- g

    ``step`` starts at ``learning_rate`` (the initial step size), ``prev`` at zero. The
    update is the step itself, not yet negated: chain a ``scale(-1.0)`` (as :func:`rprop`).
    Bit for bit torch's, NaN included: torch's CPU ``sign`` is 0 for NaN, so a NaN gradient
    gives a zero update (and a NaN ``prev``, which then counts as a zero sign).

    ``optax_rule=True`` gives optax 0.2.8's numbers instead, which differ in three ways:
    where ``g * prev = 0`` the step is kept (not clamped); ``prev`` holds the previous update
    ``step * sign(g)`` (0 where the sign flipped), not the gradient; and the update returned
    is that *previous* update (0 where the sign flipped), so optax's first update is zero
    and each later one lags a step behind the gradient's sign.

    Device: two slots (``step_sizes``, ``prev_updates``), fused like every element-wise
    transform; the step-size slot starts at ``learning_rate`` (``slot_init``).
    """
    lr = _initial_step(learning_rate)
    etas = (require("eta_minus", eta_minus, _ETA_MINUS), require("eta_plus", eta_plus, _ETA_PLUS))
    lo, hi = _check_step_bounds(min_step_size, max_step_size)
    use_optax = require("optax_rule", optax_rule, BOOL)
    values = (float(etas[0]), float(etas[1]), lo, hi)

    fragment = Fragment(
        "scale_by_rprop",
        _RPROP_OPTAX if use_optax else _RPROP,
        slots=("step_sizes", "prev_updates"),
        scalars=("eta_minus", "eta_plus", "min_step", "max_step"),
        host_step=lambda state, **_: (values, state),
        slot_init=(lr, 0.0),
    )
    return elementwise(
        fragment, init=lambda s, prev: ScaleByRpropState(step_sizes=s, prev_updates=prev)
    )


def rprop(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
    *,
    optax_rule: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Rprop (torch.optim.Rprop's rule, optax's signature)::

        g <- -g                                                      (if maximize)
        f <- eta_plus if g * prev > 0, eta_minus if < 0, 1 if = 0
        step <- clamp(step * f, min_step_size, max_step_size)        (every step)
        g <- 0 where g * prev < 0;  p <- p - sign(g) * step;  prev <- g

    ``step`` starts at ``learning_rate`` (the initial step size: a number, not a schedule;
    the update is not scaled by it), ``prev`` at zero. ``chain(scale(-1), scale_by_rprop,
    scale(-1))``, as optax chains it. torch's ``etas`` are ``(eta_minus, eta_plus)`` and its
    ``step_sizes`` ``(min_step_size, max_step_size)``; the defaults are both libraries'
    (torch's lr 1e-2; optax has no default).

    optax's ``rprop`` differs (see :func:`scale_by_rprop`): it keeps the step where
    ``g * prev = 0``, and applies each step's update one step late (its first update is zero).
    ``optax_rule=True`` gives its exact numbers.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = scale_by_rprop(
        learning_rate, eta_minus, eta_plus, min_step_size, max_step_size, optax_rule=optax_rule
    )
    tx = chain(*ascent(maximize), tx, scale(-1.0))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def _etas(value: Any) -> tuple[float, float] | None:
    etas = pair(NON_NEGATIVE, "").convert(value)
    return etas if etas is not None and 0 < etas[0] < 1 < etas[1] else None


_ETAS = Rule(
    "a pair (etaminus, etaplus) with 0 < etaminus < 1 < etaplus",
    _etas,
    lambda v: isinstance(v, (tuple, list)) or real(v) is not None,
)
_STEP_SIZES = Hyperparameter(
    "step_sizes",
    (1e-6, 50),
    pair(NON_NEGATIVE, "a pair (min_step_size, max_step_size), each a finite number >= 0"),
)
_STEP_ORDER = Requirement(
    "step_sizes",
    "a pair (min_step_size, max_step_size) with 0 <= min_step_size <= max_step_size, "
    "max_step_size > 0",
    lambda step_sizes, **_: step_sizes[0] <= step_sizes[1] and step_sizes[1] > 0,
)


class Rprop(Optimizer):
    """Rprop (torch.optim.Rprop; the maths is :func:`netcl_optim.rprop`)::

        g <- -g                                                      (if maximize)
        f <- etaplus if g * prev > 0, etaminus if < 0, 1 if = 0
        step <- clamp(step * f, *step_sizes)                         (every step)
        g <- 0 where g * prev < 0;  p <- p - sign(g) * step;  prev <- g

    ``step`` starts at ``lr`` (read at a parameter's first step; later changes of ``lr`` do
    not change it, as in torch). optax's ``rprop`` (step kept where ``g * prev = 0``, each
    update applied one step late) is the functional ``rprop(..., optax_rule=True)``; this
    class follows torch only.

    Args:
      params: parameters or param groups.
      lr: the initial step size, > 0 (default 1e-2).
      etas: ``(etaminus, etaplus)``, ``0 < etaminus < 1 < etaplus`` (default (0.5, 1.2)).
      step_sizes: ``(min, max)`` step sizes, ``0 <= min <= max`` (default (1e-6, 50)).
      capturable, foreach: torch's implementation choices, None or a bool: accepted and
        ignored, as every step is one fused kernel already.
      maximize: maximize the objective (step along the gradient; default False).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``prev``, ``step_size``.
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("etas", (0.5, 1.2), _ETAS),
        _STEP_SIZES,
        KEYWORD_ONLY,
        CAPTURABLE,
        FOREACH,
        MAXIMIZE,
        DIFFERENTIABLE,
    )
    requirements = (_STEP_ORDER,)
    torch_state = (RPROP_STATE,)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, etas: tuple[float, float], step_sizes: tuple[float, float], maximize: bool
    ) -> GradientTransformation:
        return rprop(lr, etas[0], etas[1], step_sizes[0], step_sizes[1], maximize=maximize)
