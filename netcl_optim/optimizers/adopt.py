"""ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate"): the functional ``scale_by_adopt`` and ``adopt`` (optax.contrib's names,
signatures and defaults), the stateful ``ADOPT`` and the torch-style keys of its state."""

from __future__ import annotations

__all__ = ["ADOPT", "adopt", "scale_by_adopt"]

from collections.abc import Callable
from typing import Any

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, POSITIVE, UNIT, check, invalid, require
from ..fusion import storage_dtype
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# optax.contrib, in its order: x <- g / max(sqrt(nu_old), eps), clipped to [-c, c];
# nu <- (1 - b2_) g^2 + b2_ nu; m <- (1 - b1_) x + b1_ m; u <- m (nesterov:
# (1 - b1_) x + b1_ m). At the first step the host gives b1_ = 1, b2_ = 0 (nu = g^2, m kept)
# and c = clip_value_fn(0). NaN propagates as jnp.maximum and jnp.clip propagate it.
_NORMALIZED = """
const real r = SQRT(nu);
real x = u / ((r > eps || ISNAN(r)) ? r : eps);
"""
_CLIP = "x = x < -clip ? -clip : (x > clip ? clip : x);\n"
_MOMENTS = """
nu = one_minus_b2 * (u * u) + b2 * nu;
mu = one_minus_b1 * x + b1 * mu;
"""
_PLAIN = "u = mu;\n"
_NESTEROV = "u = one_minus_b1 * x + b1 * mu;\n"

# the ADOPT authors' PyTorch class keeps torch's Adam keys
ADOPT_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")


def _quarter_root(count: Any) -> Any:
    return count**0.25


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Any], Any] = _quarter_root,
) -> GradientTransformation:
    """ADOPT's scaling (optax.contrib's ``scale_by_adopt``, same signature and defaults)::

        x <- g / max(sqrt(nu), eps)                     (the nu of the previous step)
        x <- clip(x, -c, c),  c = clip_value_fn(t)      (if use_clipping; t from 0)
        nu <- b2 nu + (1 - b2) g^2;  m <- b1 m + (1 - b1) x
        u <- m                                          (nesterov: b1 m + (1 - b1) x)

    At the first step (``t = 0``) ``nu <- g^2`` and ``m`` stays 0 (so the update is 0).
    ``clip_value_fn`` is called on the host with the step count (a Python int) and must
    return a number. ``mu_dtype``: the first moment stored as ``mu_dtype`` (float32,
    bfloat16, float16). The state is optax's ``ScaleByAdamState``.

    Device: two slots (``mu``, ``nu``); the step-0 branch and the clip value come from the
    host as scalars.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    nesterov = require("nesterov", nesterov, BOOL)
    use_clipping = require("use_clipping", use_clipping, BOOL)
    if use_clipping and not callable(clip_value_fn):
        raise invalid("clip_value_fn", clip_value_fn, "a callable of the step count")
    b1, b2, eps = float(b1), float(b2), float(eps)

    def host_step(state: ScaleByAdamState, **_: Any):
        count = state.count
        b1_, b2_ = (b1, b2) if count > 0 else (1.0, 0.0)
        values = (1.0 - b1_, b1_, 1.0 - b2_, b2_, eps)
        if use_clipping:
            values += (float(clip_value_fn(count)),)
        return values, state._replace(count=count + 1)

    source = _NORMALIZED + (_CLIP if use_clipping else "") + _MOMENTS
    source += _NESTEROV if nesterov else _PLAIN
    scalars = ("one_minus_b1", "b1", "one_minus_b2", "b2", "eps")
    fragment = Fragment(
        "scale_by_adopt",
        source,
        slots=("mu", "nu"),
        scalars=scalars + (("clip",) if use_clipping else ()),
        host_step=host_step,
    )
    tx = elementwise(fragment, init=lambda mu, nu: ScaleByAdamState(count=0, mu=mu, nu=nu))
    return low_precision_state(tx, mu_dtype, slots=("mu",))


def _adopt(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    nesterov: bool,
    use_clipping: bool,
    clip_value_fn: Callable[[Any], Any],
    maximize: bool,
    mu_dtype: Any = None,
) -> GradientTransformation:
    core = scale_by_adopt(
        b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
        clip_value_fn=clip_value_fn,
    )  # fmt: skip
    return optimizer_chain(
        core,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=decoupled,
        maximize=maximize,
    )


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Any], Any] = _quarter_root,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """ADOPT (optax.contrib's ``adopt``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        x <- clip(g / max(sqrt(nu), eps), -t^0.25, t^0.25)   (old nu; if use_clipping)
        nu <- b2 nu + (1 - b2) g^2;  m <- b1 m + (1 - b1) x
        p <- p - lr * m                                 (nesterov: b1 m + (1 - b1) x)

    ``chain(scale_by_adopt, scale_by_learning_rate)``; at the first step ``nu <- g^2`` and
    the parameters do not move. Unlike Adam, the gradient is normalised by the previous
    ``nu`` before it enters the momentum, and there is no bias correction. torch.optim has no
    ADOPT; the authors' PyTorch ``ADOPT`` (``clip_lambda``, ``decouple``) counts its clip
    steps its own way; :class:`ADOPT` adds weight decay.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _adopt(learning_rate, b1, b2, eps, 0.0, False, nesterov, use_clipping,
                clip_value_fn, maximize, mu_dtype)  # fmt: skip
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class ADOPT(Optimizer):
    """ADOPT (the maths is :func:`netcl_optim.adopt`, optax.contrib's rule)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p                       (if weight_decay, coupled)
        x <- clip(g / max(sqrt(nu), eps), -t^0.25, t^0.25)   (old nu; if use_clipping)
        nu <- b2 nu + (1 - b2) g^2;  m <- b1 m + (1 - b1) x  (first step: nu <- g^2 only)
        p <- p - lr * m                                 (nesterov: b1 m + (1 - b1) x)
        p <- p - lr * weight_decay * p                  (if decoupled_weight_decay)

    torch.optim has no ADOPT. The authors' PyTorch ``ADOPT`` has the same defaults and both
    decays (its ``decouple=True`` is ``decoupled_weight_decay=True`` here, named as torch's
    Adam names it, applied in AdamW's order: ``p - lr (m + wd p)``). The clip schedule is
    optax's ``t^0.25`` (``use_clipping=False`` turns it off); a custom ``clip_value_fn``
    is the functional ``adopt``'s (a callable is not kept in a checkpoint).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.9999)).
      eps: floor of the root, > 0 (default 1e-6).
      weight_decay: weight decay, >= 0 (default 0).
      decoupled_weight_decay: decay the weights directly instead of adding an L2 term to
        the gradient (default False).
      nesterov: Nesterov momentum, as optax.contrib (default False).
      use_clipping: clip the normalised gradient to ``[-t^0.25, t^0.25]`` (default True).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (nu), as the authors'.
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("betas", (0.9, 0.9999), BETAS.rule),
        Hyperparameter("eps", 1e-6, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("decoupled_weight_decay", False, BOOL),
        KEYWORD_ONLY,
        Hyperparameter("nesterov", False, BOOL),
        Hyperparameter("use_clipping", True, BOOL),
        MAXIMIZE,
    )
    torch_state = (ADOPT_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float,
        decoupled_weight_decay: bool, nesterov: bool, use_clipping: bool, maximize: bool,
    ) -> GradientTransformation:  # fmt: skip
        return _adopt(lr, betas[0], betas[1], eps, weight_decay, decoupled_weight_decay,
                      nesterov, use_clipping, _quarter_root, maximize)  # fmt: skip
