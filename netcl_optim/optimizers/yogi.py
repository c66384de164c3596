"""Yogi (Zaheer et al., 2018, "Adaptive Methods for Nonconvex Optimization"): the functional
``scale_by_yogi`` and ``yogi`` (optax's names, signatures and defaults), the stateful ``Yogi``
and the torch-style keys of its state."""

from __future__ import annotations

__all__ = ["Yogi", "scale_by_yogi", "yogi"]

from typing import Any

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# optax, in its order: m <- (1 - b1) g + b1 m;  v <- v - (1 - b2) sign(v - g^2) g^2;
# u <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) [+ eps_root]) + eps). Both moments start at
# initial_accumulator_value (the fragment's slot_init). A NaN in v - g^2 comes with a NaN in
# v or g^2, which reaches v either way (OpenCL's sign(NaN) is 0, jnp.sign's NaN).
_MOMENTS = """
const real g2 = u * u;
mu = one_minus_b1 * u + b1 * mu;
nu = nu - one_minus_b2 * SIGN(nu - g2) * g2;
"""
_YOGI = _MOMENTS + "u = (mu * inv_bc1) / (SQRT(nu * inv_bc2) + eps);\n"
_YOGI_EPS_ROOT = _MOMENTS + "u = (mu * inv_bc1) / (SQRT(nu * inv_bc2 + eps_root) + eps);\n"


# torch-optimizer's Yogi keeps "exp_avg" and "exp_avg_sq" (and a per-parameter "step")
YOGI_MOMENTS = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
    """Yogi's scaling (optax's ``scale_by_yogi``, same signature and defaults)::

        m <- (1 - b1) g + b1 m
        v <- v - (1 - b2) sign(v - g^2) g^2
        u <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps)

    ``m`` and ``v`` start at ``initial_accumulator_value`` (> 0). The state is optax's
    ``ScaleByAdamState``.

    Device: two slots (``mu``, ``nu``); the bias corrections' reciprocals come from the host.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps, initial_accumulator_value=initial_accumulator_value)
    check(NON_NEGATIVE, eps_root=eps_root)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)
    initial = float(initial_accumulator_value)

    def host_step(state: ScaleByAdamState, **_: Any):
        t = state.count + 1
        values = (
            1.0 - b1,
            b1,
            1.0 - b2,
            1.0 / (1.0 - b1**t),
            1.0 / (1.0 - b2**t),
            eps,
            eps_root,
        )
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_yogi",
        _YOGI_EPS_ROOT if eps_root else _YOGI,
        slots=("mu", "nu"),
        scalars=(
            "one_minus_b1",
            "b1",
            "one_minus_b2",
            "inv_bc1",
            "inv_bc2",
            "eps",
            "eps_root",
        ),
        host_step=host_step,
        slot_init=(initial, initial),
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByAdamState(count=0, mu=mu, nu=nu))


def _yogi(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    initial_accumulator_value: float,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    return optimizer_chain(
        scale_by_yogi(b1, b2, eps, eps_root, initial_accumulator_value),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
    )


def yogi(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Yogi (optax's ``yogi``: its signature, defaults and order of operations)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m;  v <- v - (1 - b2) sign(v - g^2) g^2   (m, v start at 1e-6)
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    ``chain(scale_by_yogi, scale_by_learning_rate)``. Unlike Adam's, ``v`` moves towards
    ``g^2`` by at most ``(1 - b2) g^2`` a step, and ``eps`` is large (1e-3, the paper's).
    torch.optim has no Yogi.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _yogi(learning_rate, b1, b2, eps, 0.0, 1e-6, 0.0, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class Yogi(Optimizer):
    """Yogi (the maths is :func:`netcl_optim.yogi`, optax's rule)::

        g <- -g                                         (if maximize)
        m <- (1 - b1) g + b1 m;  v <- v - (1 - b2) sign(v - g^2) g^2
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps) + wd * p)

    torch.optim has no Yogi. torch-optimizer's ``Yogi`` (same defaults) decays coupled
    (``g + wd p``) and adds eps to the raw root; this class follows optax's numbers, and its
    decoupled decay is AdamW's order (as ``adamw``).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2, the paper's).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-3).
      weight_decay: decoupled decay, >= 0 (default 0).
      eps_root: added under the root, >= 0 (default 0).
      initial_accumulator_value: where ``m`` and ``v`` start, > 0 (default 1e-6).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), as torch-optimizer.
    """

    hyperparameters = (
        torch_lr(1e-2),
        BETAS,
        Hyperparameter("eps", 1e-3, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("eps_root", 0.0, NON_NEGATIVE),
        Hyperparameter("initial_accumulator_value", 1e-6, POSITIVE),
        MAXIMIZE,
    )
    torch_state = (YOGI_MOMENTS, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        eps_root: float,
        initial_accumulator_value: float,
        maximize: bool,
    ) -> GradientTransformation:
        b1, b2 = betas
        return _yogi(lr, b1, b2, eps, eps_root, initial_accumulator_value, weight_decay, maximize)
