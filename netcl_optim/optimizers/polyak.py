"""SGD with Polyak's step size (Loizou et al., 2021, "Stochastic Polyak step-size for SGD";
"sps+": Garrigos et al., 2023): the functional ``scale_by_polyak`` and ``polyak_sgd`` (optax
0.2.8's names, signatures, defaults and order of operations) and the stateful
``PolyakSGD``. The step size is a function of the whole tree's ``||u||^2`` (summed on the
device, in the same step) and of the loss, a host value passed to each step."""

from __future__ import annotations

__all__ = ["PolyakSGD", "ScaleByPolyakState", "polyak_sgd", "scale_by_polyak"]

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
import pyopencl.array as cla

from .._base import Fragment, GradientTransformation, ScalarOrSchedule, TreeSums
from .._validation import FINITE, NON_NEGATIVE, invalid, number, one_of, real, require
from ..stateful._declaration import Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ._shared import check_learning_rate

POLYAK_VARIANTS = ("sps", "sps+")
VARIANT = one_of(*POLYAK_VARIANTS)
# optax accepts any value (jnp.inf too: no cap); a negative one would step uphill
MAX_LEARNING_RATE = number("a number >= 0 (inf: no cap)", lambda f: f >= 0)
# optax's threshold: jnp.finfo(float).eps, float64's epsilon (2^-52) in any precision
_TINY = "(real)2.220446049250313e-16"
_MISSING = "{who} needs value: update(updates, state, params, value=loss)"


class ScaleByPolyakState(NamedTuple):
    """The step size of the last update (a tree of 0-d arrays, every leaf holding the tree's
    value; 0 before the first step): optax keeps an ``EmptyState``, the value is kept here
    because the finish writes it and for logging."""

    step_size: Any


POLYAK_STATE = torch_state(ScaleByPolyakState, step_size="step_size")

_POLYAK = TreeSums(
    state=("step_size",),
    terms=("u * u",),
    statements=(
        ("denom", "s0 + eps"),
        ("ratio", "gap / denom"),
        # jnp.minimum: nan stays nan
        ("capped", "ratio <= max_learning_rate || ISNAN(ratio) ? ratio : max_learning_rate"),
        ("polyak_step", f"denom <= {_TINY} ? (real)0 : capped"),
        ("step_size", "polyak_step"),
    ),
    outputs=("polyak_step",),
    after=False,
)


def host_loss(value: Any, who: str = "scale_by_polyak") -> np.floating:
    """The loss ``value`` as a numpy float scalar of its own precision (a Python number or
    int: float64): a number, a 0-d or one-element array (numpy, jax, torch) or a
    pyopencl ``Array`` (read back to the host: one sync). TypeError when it is missing or
    not a real number, ValueError when it has more than one element."""
    if value is None:
        raise TypeError(_MISSING.format(who=who))
    if isinstance(value, cla.Array):
        value = value.get()
    if callable(getattr(value, "detach", None)):  # a torch loss (may require grad)
        value = value.detach()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):  # (a tensor on another device)
        number_ = real(value)
        array = None if number_ is None else np.asarray(number_)
    must = "a real number or a one-element array"
    if array is None or array.dtype.kind not in "fiu":
        raise invalid("value", value, must, who, TypeError)
    if array.size != 1:
        raise invalid("value", value, must, who)
    array = array.reshape(())
    return cast(np.floating, (array if array.dtype.kind == "f" else array.astype(np.float64))[()])


def polyak_gap(value: Any, f_min: float, variant: str, who: str = "scale_by_polyak") -> float:
    """``value - f_min`` in the value's precision (as optax: ``f_min`` takes the value's
    dtype), ``max(., 0)`` for ``"sps+"`` (nan stays nan, as ``jax.nn.relu``)."""
    v = host_loss(value, who)
    gap = float(v - v.dtype.type(f_min))
    if variant == "sps+" and gap <= 0:
        gap = 0.0
    return gap


def _check(f_min: Any, max_learning_rate: Any, eps: Any, variant: Any) -> tuple[float, ...]:
    variant = require("variant", variant, VARIANT)
    return (
        require("f_min", f_min, FINITE),
        require("max_learning_rate", max_learning_rate, MAX_LEARNING_RATE),
        require("eps", eps, NON_NEGATIVE),
        variant,
    )


def scale_by_polyak(
    f_min: float = 0.0, max_learning_rate: float = 1.0, eps: float = 0.0, variant: str = "sps"
) -> GradientTransformation:
    """Scale by Polyak's step size (optax's ``scale_by_polyak``)::

        gap  = value - f_min                 ("sps+": max(gap, 0))
        step = 0                                  if ||u||^2 + eps <= 2^-52
               min(gap / (||u||^2 + eps), max_learning_rate)   otherwise
        u <- step * u

    over the whole tree (``||u||^2`` summed on the device; a nan propagates, as in jnp).
    ``update(updates, state, params, value=loss)``: ``value`` is a number or a one-element
    array (a device array is read back: one sync); without it, TypeError. Defaults:
    ``f_min=0``, ``max_learning_rate=1`` (inf: no cap), ``eps=0``, ``variant="sps"``.
    Differences from optax: bad hyperparameters raise here (optax checks ``variant`` at the
    first update, the others never); ``update`` needs ``params``; the state keeps the last
    step size (``step_size``). 3 launches per packed tree: a pre-pass sums, a one-work-item
    finish computes the step, the fused kernel scales.
    """
    return _scale_by_polyak(f_min, max_learning_rate, eps, variant, "scale_by_polyak")


def _scale_by_polyak(
    f_min: Any, max_learning_rate: Any, eps: Any, variant: Any, who: str
) -> GradientTransformation:
    """:func:`scale_by_polyak`, naming ``who`` when a step's ``value`` is missing or bad."""
    f_min, max_learning_rate, eps, variant = _check(f_min, max_learning_rate, eps, variant)

    def host_step(state: ScaleByPolyakState, value: Any = None, **_: Any):
        return (polyak_gap(value, f_min, variant, who), eps, max_learning_rate), state

    fragment = Fragment("scale_by_polyak", "u = polyak_step * u;",
                        scalars=("gap", "eps", "max_learning_rate"), host_step=host_step,
                        tree_sums=_POLYAK)  # fmt: skip
    return elementwise(fragment, init=ScaleByPolyakState)


def polyak_sgd(
    max_learning_rate: float = 1.0,
    scaling: ScalarOrSchedule = 1.0,
    f_min: float = 0.0,
    eps: float = 0.0,
    variant: str = "sps",
) -> GradientTransformation:
    """SGD with Polyak's step size (optax's ``polyak_sgd``): ``chain(sgd(scaling),
    scale_by_polyak(f_min, max_learning_rate, eps, variant))``::

        u = -scaling g
        step = min((value - f_min) / (||u||^2 + eps), max_learning_rate)
               (0 where ||u||^2 + eps <= 2^-52; "sps+": the gap's positive part)
        x <- x + step u

    (``||u||^2`` of the scaled update, as optax: ``scaling^2 ||g||^2``.)
    ``update(updates, state, params, value=loss)``, ``step(tx, params, grads, state,
    value=loss)``: ``value`` is the loss at ``params`` (see :func:`scale_by_polyak`).
    ``scaling``: > 0 or a schedule (default 1). ``f_min``: a lower bound of the loss
    (default 0); ``max_learning_rate`` >= 0 (default 1); ``eps`` >= 0 (default 0).
    """
    check_learning_rate(scaling)
    polyak = _scale_by_polyak(f_min, max_learning_rate, eps, variant, "polyak_sgd")
    return chain(scale_by_learning_rate(scaling), polyak)


class PolyakSGD(Optimizer):
    """SGD with Polyak's step size (the maths is :func:`netcl_optim.polyak_sgd`, optax's
    rule)::

        step = min((loss - f_min) / (lr^2 ||g||^2 + eps), max_learning_rate)
               (0 where lr^2 ||g||^2 + eps <= 2^-52; "sps+": the gap's positive part)
        x <- x - step lr g

    with ``||g||^2`` over the group's parameters.

    Args:
      params: parameters or param groups (each group has its own sum and step size).
      lr: optax's ``scaling``, > 0 (default 1.0).
      max_learning_rate: the largest step size, >= 0 (default 1.0; inf: no cap).
      f_min: a lower bound of the loss (default 0.0).
      eps: added to the squared norm, >= 0 (default 0.0).
      variant: ``"sps"`` (default) or ``"sps+"``.

    The step needs the loss: ``step(closure)`` (the closure computes the grads and returns
    the loss) or ``step(value=loss)`` after the backward pass. A device array loss is read
    back (one sync per step). ``ZeroRedundancyOptimizer`` cannot pass the loss: it refuses
    this class before anything changes.

    State per parameter: ``step_size`` (0-d: the group's last step size). No ``step``.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("max_learning_rate", 1.0, MAX_LEARNING_RATE),
        Hyperparameter("f_min", 0.0, FINITE),
        Hyperparameter("eps", 0.0, NON_NEGATIVE),
        Hyperparameter("variant", "sps", VARIANT),
    )
    torch_state = (POLYAK_STATE,)
    torch_step = False
    _loss: np.floating | None = None

    @staticmethod
    def functional(
        lr: Any, max_learning_rate: float, f_min: float, eps: float, variant: str
    ) -> GradientTransformation:
        return polyak_sgd(max_learning_rate, lr, f_min, eps, variant)

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, value: Any = None
    ) -> Any:
        """One Polyak step of every parameter with a grad, at the loss ``closure()`` (called
        first; returned) or ``value`` (one of the two; TypeError otherwise, nothing
        changed). Device: 3 launches per packed group (sums, finish, fused step)."""
        who = f"{type(self).__name__}.step"
        if (closure is None) == (value is None):
            raise TypeError(f"{who} needs the loss: step(closure) with a closure that sets the "
                            "grads and returns the loss, or step(value=loss)")  # fmt: skip
        loss = closure() if closure is not None else None
        self._loss = host_loss(loss if closure is not None else value, who)
        try:
            super().step()
        finally:
            self._loss = None
        return loss

    def _check_step(self) -> None:
        """Only :meth:`step` passes the loss: a step from elsewhere (ZeRO's) is refused."""
        if self._loss is None:
            raise TypeError(f"{type(self).__name__} needs the loss at every step: call its "
                            "own step(closure) or step(value=loss); a wrapper that calls "
                            "step() without it (ZeroRedundancyOptimizer) cannot run "
                            "it")  # fmt: skip

    def _step_args(self, rec: Any) -> dict[str, Any]:
        return {"value": self._loss}
