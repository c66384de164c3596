"""ASGD (Polyak & Juditsky, 1992, averaged SGD, in torch's form): the functional
``scale_by_asgd`` and ``asgd`` (torch.optim.ASGD's rule, signature and defaults), the stateful
``ASGD`` (torch.optim.ASGD) and torch's keys of its state (``step``, ``eta``, ``mu``, ``ax``)."""

from __future__ import annotations

__all__ = ["ASGD", "ScaleByAsgdState", "asgd", "scale_by_asgd"]

from typing import Any, ClassVar, NamedTuple

import numpy as np

from .. import _validation
from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, check
from ..stateful._declaration import (
    CAPTURABLE,
    DIFFERENTIABLE,
    FOREACH,
    MAXIMIZE,
    Hyperparameter,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ._shared import DECAY_COUNT, ascent

# torch: p.mul_(1 - lambd * eta); p.add_(g, alpha=-eta); ax = p if mu == 1 else
# ax + (p - ax) * mu (the new p). The update is formed directly (-lambd eta p - eta g, as
# accurate as the step itself), and the new p as the apply forms it (p + u), so ax is the
# stepped params bit for bit while mu == 1.
_ASGD = """
u = -(lambd_eta * p) - eta * u;
const real p_new = p + u;
ax = mu == (real)1 ? p_new : ax + (p_new - ax) * mu;
"""


class ScaleByAsgdState(NamedTuple):
    """The step count and the averaged params ``ax`` (shaped like the params). torch's
    ``eta`` and ``mu`` are not stored: they are functions of the count (:func:`asgd_eta`,
    :func:`asgd_mu`)."""

    count: int
    ax: Any


# torch.optim.ASGD's average; eta and mu are torch_scalars of the class
ASGD_AVERAGE = torch_state(ScaleByAsgdState, ax="ax", count="ax")


def asgd_eta(lr: float, lambd: float, alpha: float, count: int) -> float:
    """torch's ``eta`` after ``count`` steps: ``lr / (1 + lambd * lr * count) ** alpha`` in
    Python double, stored as a float32 0-d tensor (``lr`` itself before the first step)."""
    return float(np.float32(float(lr) / ((1 + lambd * float(lr) * count) ** alpha)))


def asgd_mu(t0: float, count: int) -> float:
    """torch's ``mu`` after ``count`` steps: ``1 / max(1, count - t0)``, as float32."""
    return float(np.float32(1 / max(1, count - t0)))


def scale_by_asgd(
    learning_rate: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
) -> GradientTransformation:
    """torch's ASGD step (without weight decay), as an update of the params::

        u  <- -lambd eta p - eta g
        ax <- p + u  if mu == 1,  else  ax + (p + u - ax) mu
        eta <- lr / (1 + lambd lr t)^alpha;  mu <- 1 / max(1, t - t0)   (t: the new count)

    ``eta`` starts at ``lr`` and ``mu`` at 1; both are float32 values computed in double from
    the count, as torch computes and stores them. A schedule ``learning_rate`` gives ``eta``
    the previous step's value, as torch's ``eta`` comes from the ``lr`` of the step before.
    The learning rate is part of the update: chain no ``scale_by_learning_rate`` after it.

    Device: one slot (``ax``); reads the params.
    """
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, lambd=lambd, alpha=alpha, t0=t0)
    lambd, alpha, t0 = float(lambd), float(alpha), float(t0)

    def host_step(state: ScaleByAsgdState, **_: Any):
        c = state.count
        if callable(learning_rate):
            lr = float(learning_rate(max(c - 1, 0)))
        else:
            lr = float(learning_rate)
        eta = asgd_eta(lr, lambd, alpha, c)
        values = (lambd * eta, eta, asgd_mu(t0, c))
        return values, state._replace(count=c + 1)

    fragment = Fragment(
        "scale_by_asgd",
        _ASGD,
        slots=("ax",),
        scalars=("lambd_eta", "eta", "mu"),
        host_step=host_step,
        needs_params=True,
    )
    return elementwise(fragment, init=lambda ax: ScaleByAsgdState(count=0, ax=ax))


def asgd(
    learning_rate: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Averaged SGD (torch.optim.ASGD: its rule, order of operations and defaults)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        p <- p (1 - lambd eta) - eta g
        ax <- p  if mu == 1,  else  ax + (p - ax) mu    (the averaged params)
        eta <- lr / (1 + lambd lr t)^alpha;  mu <- 1 / max(1, t - t0)

    ``chain(scale(-1), add_decayed_weights, scale_by_asgd)``, omitting what is zero or off.
    The averaged params are the state's ``ax`` slot (``ASGD``: ``opt.state[p]["ax"]``, as
    torch). optax has no ASGD.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    check(NON_NEGATIVE, weight_decay=weight_decay)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    tx = chain(*ascent(maximize), *decay, scale_by_asgd(learning_rate, lambd, alpha, t0))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def _torch_eta(group: dict[str, Any], step: int) -> float:
    return asgd_eta(group["lr"], group["lambd"], group["alpha"], step)


def _torch_mu(group: dict[str, Any], step: int) -> float:
    return asgd_mu(group["t0"], step)


class ASGD(Optimizer):
    """Averaged SGD (torch.optim.ASGD; the maths is :func:`netcl_optim.asgd`)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay)
        p <- p (1 - lambd eta) - eta g
        ax <- p  if mu == 1,  else  ax + (p - ax) mu
        eta <- lr / (1 + lambd lr t)^alpha;  mu <- 1 / max(1, t - t0)   (t: the param's step)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2).
      lambd: decay term, >= 0 (default 1e-4).
      alpha: power for the eta update, >= 0 (default 0.75).
      t0: the step at which averaging starts, >= 0 (default 1e6).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      foreach, capturable: torch's implementation choices: accepted and ignored, as every
        step is one fused kernel already.
      maximize: maximize the objective (step along the gradient; default False; positional
        as in torch).
      differentiable: must be False (netcl_optim records no autograd graph).

    State per parameter (torch keys): ``step``, ``eta``, ``mu`` (float32 scalars computed on
    the host from the step and the group's current hyperparameters, rounded as torch rounds
    them; on load they are recomputed, not read) and ``ax``, the averaged params:
    ``opt.state[p]["ax"]`` as in torch (a live device view), or :meth:`averaged_params`.
    """

    hyperparameters = (
        torch_lr(1e-2),
        Hyperparameter("lambd", 1e-4, NON_NEGATIVE),
        Hyperparameter("alpha", 0.75, NON_NEGATIVE),
        Hyperparameter("t0", 1e6, NON_NEGATIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        FOREACH,
        MAXIMIZE,
        DIFFERENTIABLE,
        CAPTURABLE,
    )
    torch_state = (ASGD_AVERAGE, DECAY_COUNT)
    torch_step = True
    torch_scalars: ClassVar[dict[str, Any]] = {"eta": _torch_eta, "mu": _torch_mu}

    def averaged_params(self) -> list[Any]:
        """The averaged params, one device array per parameter of every group in order
        (``opt.state[p]["ax"]``; ``None`` for a parameter that has not stepped yet)."""
        state = self.state
        return [state[p].get("ax") if p in state else None for g in self.param_groups
                for p in g["params"]]  # fmt: skip

    @staticmethod
    def functional(
        lr: Any, lambd: float, alpha: float, t0: float, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return asgd(lr, lambd, alpha, t0, weight_decay, maximize=maximize)
