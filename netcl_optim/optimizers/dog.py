"""DoG and DoWG (Ivgi, Hinder and Carmon, 2023, "DoG is SGD's Best Friend"; Khaled, Mishchenko
and Jin, 2023, "DoWG Unleashed"): SGD whose step size is a distance over gradient norms. The
functional ``scale_by_dog``, ``dog``, ``scale_by_dowg``, ``dowg`` (optax.contrib's names,
signatures, defaults and order of operations) and the stateful ``DoG`` and ``DoWG``. The
step size lives on the device, fed by sums over the whole tree in the same step."""

from __future__ import annotations

__all__ = ["DoG", "DoGState", "DoWG", "DoWGState", "dog", "dowg", "scale_by_dog", "scale_by_dowg"]

from typing import Any, NamedTuple

from .._base import PARAMS, Fragment, GradientTransformation, ScalarOrSchedule, TreeSums
from .._validation import NON_NEGATIVE, POSITIVE, Rule, check, optional, require
from ..stateful._declaration import Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, check_learning_rate


class DoGState(NamedTuple):
    """The start point ``init_params`` (shaped like the params), ``max_dist`` (the largest
    ``||x - x0||`` so far) and ``sum_sq_norm_grads`` (trees of 0-d arrays, every leaf
    holding the tree's value), and the count (optax keeps ``is_init_step`` instead)."""

    init_params: Any
    max_dist: Any
    sum_sq_norm_grads: Any
    count: int


class DoWGState(NamedTuple):
    """optax.contrib's ``DoWGState``: the start point ``init_params``, then
    ``weighted_sq_norm_grads`` and ``estim_sq_dist`` (trees of 0-d arrays, every leaf
    holding the tree's value)."""

    init_params: Any
    weighted_sq_norm_grads: Any
    estim_sq_dist: Any


DOG_STATE = torch_state(DoGState, init_params="x0", max_dist="rbar", sum_sq_norm_grads="G",
                        count=STEP)  # fmt: skip
DOWG_STATE = torch_state(DoWGState, init_params="x0", weighted_sq_norm_grads="v",
                         estim_sq_dist="rbar_sq")  # fmt: skip

_DIST_TERMS = ("(init_params - p) * (init_params - p)", "u * u")
# heuristic: r0 = value (1 + ||x0||), from the params at the first step (they are x0 then)
_DOG = TreeSums(
    state=("max_dist", "sum_sq_norm_grads"),
    terms=(*_DIST_TERMS, "p * p"),
    statements=(
        ("r_start", "heuristic > 0 ? init_value * ((real)1 + SQRT(s2)) : r_fixed"),
        ("r_prev", "first > 0 ? r_start : max_dist"),
        ("dist", "SQRT(s0)"),
        ("max_dist", "r_prev >= dist ? r_prev : dist"),
        ("sum_sq_norm_grads", "sum_sq_norm_grads + s1"),
        ("lr", "max_dist / SQRT(sum_sq_norm_grads + eps)"),
        ("lr", "first > 0 && given_lr > 0 ? init_value : lr"),
    ),
    outputs=("lr",),
    after=False,
)
_DOWG = TreeSums(
    state=("weighted_sq_norm_grads", "estim_sq_dist"),
    terms=_DIST_TERMS,
    statements=(
        ("estim_sq_dist", "estim_sq_dist >= s0 ? estim_sq_dist : s0"),
        ("weighted_sq_norm_grads", "estim_sq_dist * s1 + weighted_sq_norm_grads"),
        ("lr", "estim_sq_dist / (SQRT(weighted_sq_norm_grads) + eps)"),
    ),
    outputs=("lr",),
    after=False,
)
_KINDS = ("distance", "learning_rate", "heuristic")


def _init_step(value: Any) -> Any:
    try:
        kind, number = value
    except (TypeError, ValueError):
        return None
    if kind not in _KINDS or POSITIVE.convert(number) is None:
        return None
    return (kind, float(number))


INIT_STEP = Rule(f"a pair (kind, value > 0), kind one of {', '.join(map(repr, _KINDS))}",
                 _init_step, lambda v: True)  # fmt: skip


def scale_by_dog(
    init_step: tuple[str, float] = ("heuristic", 1e-6), eps: float = 1e-8
) -> GradientTransformation:
    """Scale by distance over gradients (optax.contrib's ``scale_by_dog``)::

        r = max(r, ||x - x0||)     (r starts at init_step's distance)
        G <- G + ||g||^2
        u = r / sqrt(G + eps) * g   (init_step ("learning_rate", a): a at the first step)

    over the whole tree. ``init_step``: ``("distance", r0)``, ``("learning_rate", a)`` or
    ``("heuristic", a)`` (``r0 = a (1 + ||x0||)``, from the params at the first step, where
    optax takes the params given to ``init``: the same when they are). A pass over the
    updates and params sums before the fused step, a one-work-item finish updates the state
    on the device: 3 launches per tree.
    """
    kind, value = require("init_step", init_step, INIT_STEP)
    check(POSITIVE, eps=eps)
    scalars = ("eps", "first", "heuristic", "init_value", "r_fixed", "given_lr")
    r_fixed = value if kind == "distance" else 0.0

    def host_step(state: DoGState, **_: Any):
        values = (float(eps), float(state.count == 0), float(kind == "heuristic"), value,
                  r_fixed, float(kind == "learning_rate"))  # fmt: skip
        return values, state._replace(count=state.count + 1)

    fragment = Fragment("scale_by_dog", "u = lr * u;", slots=("init_params",),
                        scalars=scalars, host_step=host_step, slot_init=(PARAMS,),
                        tree_sums=_DOG)  # fmt: skip
    return elementwise(fragment, init=lambda x0, r, g: DoGState(x0, r, g, 0))


def scale_by_dowg(init_estim_sq_dist: float | None = None, eps: float = 1e-4):
    """Scale by distance over weighted gradients (optax.contrib's ``scale_by_dowg``)::

        r2 = max(r2, ||x - x0||^2)          (r2 starts at init_estim_sq_dist, or eps)
        v <- v + r2 ||g||^2
        u = r2 / (sqrt(v) + eps) * g

    over the whole tree (3 launches per tree, as :func:`scale_by_dog`).
    """
    init = require("init_estim_sq_dist", init_estim_sq_dist, optional(NON_NEGATIVE))
    check(POSITIVE, eps=eps)
    start = float(eps) if init is None else float(init)

    def host_step(state: DoWGState, **_: Any):
        return (float(eps),), state

    sums = TreeSums(_DOWG.state, _DOWG.terms, _DOWG.statements, _DOWG.outputs, after=False,
                    start=(0.0, start))  # fmt: skip
    fragment = Fragment("scale_by_dowg", "u = lr * u;", slots=("init_params",),
                        scalars=("eps",), host_step=host_step, slot_init=(PARAMS,),
                        tree_sums=sums)  # fmt: skip
    return elementwise(fragment, init=lambda x0, v, r2: DoWGState(x0, v, r2))


def _chain(core: GradientTransformation, learning_rate: Any, weight_decay: Any, mask: Any):
    check_learning_rate(learning_rate)
    decay = []
    if weight_decay is not None:
        check(NON_NEGATIVE, weight_decay=weight_decay)
        decay = [add_decayed_weights(weight_decay, mask)]
    return chain(*decay, core, scale_by_learning_rate(learning_rate))


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, float] = ("heuristic", 1e-6),
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Any = None,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """DoG (optax.contrib's ``dog``): ``chain([add_decayed_weights(weight_decay, mask)],
    scale_by_dog(init_step, eps), scale_by_learning_rate(learning_rate))``::

        g <- g + wd x;   r = max(r, ||x - x0||);   G <- G + ||g||^2
        x <- x - lr r / sqrt(G + eps) g

    See :func:`scale_by_dog` for ``init_step``. The authors recommend averaging the
    iterates (:func:`netcl_optim.ema`, ``AveragedParams``). ``state_dtype``: ``x0``
    stored as bfloat16 or float16; 8-bit state is refused (its step sums over the tree).
    """
    tx = _chain(scale_by_dog(init_step, eps), learning_rate, weight_decay, mask)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: float | None = None,
    eps: float = 1e-4,
    weight_decay: float | None = None,
    mask: Any = None,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """DoWG (optax.contrib's ``dowg``): ``chain([add_decayed_weights(weight_decay, mask)],
    scale_by_dowg(init_estim_sq_dist, eps), scale_by_learning_rate(learning_rate))``::

        g <- g + wd x;   r2 = max(r2, ||x - x0||^2);   v <- v + r2 ||g||^2
        x <- x - lr r2 / (sqrt(v) + eps) g
    """
    tx = _chain(scale_by_dowg(init_estim_sq_dist, eps), learning_rate, weight_decay, mask)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class DoG(Optimizer):
    """DoG (the maths is :func:`netcl_optim.dog`, optax.contrib's rule)::

        g <- g + wd x;   r = max(r, ||x - x0||);   G <- G + ||g||^2   (over the group)
        x <- x - lr r / sqrt(G + eps) g

    Args:
      params: parameters or param groups (the sums run over each group).
      lr: multiplies DoG's step size, > 0 (default 1.0).
      init_step: ``("heuristic", a)`` (default, a = 1e-6: ``r0 = a (1 + ||x0||)``),
        ``("distance", r0)`` or ``("learning_rate", a)`` (the first step's size).
      eps: added to ``G``, > 0 (default 1e-8).
      weight_decay: coupled (added to the gradient), >= 0, or None (default: none).

    State per parameter: ``step``, ``x0`` (shaped like the parameter) and ``rbar``, ``G``
    (0-d: the group's values).
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("init_step", ("heuristic", 1e-6), INIT_STEP.value_errors()),
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("weight_decay", None, optional(NON_NEGATIVE)),
    )
    torch_state = (DOG_STATE, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, init_step: tuple[str, float], eps: float, weight_decay: float | None
    ) -> GradientTransformation:
        return dog(lr, init_step, eps, weight_decay)


class DoWG(Optimizer):
    """DoWG (the maths is :func:`netcl_optim.dowg`, optax.contrib's rule)::

        g <- g + wd x;   r2 = max(r2, ||x - x0||^2);   v <- v + r2 ||g||^2   (over the group)
        x <- x - lr r2 / (sqrt(v) + eps) g

    Args:
      params: parameters or param groups (the sums run over each group).
      lr: multiplies DoWG's step size, > 0 (default 1.0).
      init_estim_sq_dist: the first ``r2``, >= 0, or None (default) for ``eps``.
      eps: > 0 (default 1e-4).
      weight_decay: coupled (added to the gradient), >= 0, or None (default: none).

    State per parameter: ``step``, ``x0`` and ``v``, ``rbar_sq`` (0-d: the group's values).
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("init_estim_sq_dist", None, optional(NON_NEGATIVE)),
        Hyperparameter("eps", 1e-4, POSITIVE),
        Hyperparameter("weight_decay", None, optional(NON_NEGATIVE)),
    )
    torch_state = (DOWG_STATE, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, init_estim_sq_dist: float | None, eps: float, weight_decay: float | None
    ) -> GradientTransformation:
        return dowg(lr, init_estim_sq_dist, eps, weight_decay)
