"""D-Adaptation AdamW (Defazio and Mishchenko, 2023, "Learning-Rate-Free Learning by
D-Adaptation"): the functional ``dadapt_adamw`` (optax.contrib's name, signature, defaults and
order of operations) and the stateful ``DAdaptAdamW``. Its step size ``d`` lives on the
device, fed by sums over the whole tree that the update kernel itself computes: one pass."""

from __future__ import annotations

__all__ = ["DAdaptAdamW", "DAdaptAdamWState", "dadapt_adamw"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule, TreeSums
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ..stateful._declaration import BETAS, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import adam_step_scale, check_learning_rate


class DAdaptAdamWState(NamedTuple):
    """optax.contrib's ``DAdaptAdamWState``: the moments and the weighted gradient sum ``s``
    (shaped like the params), the step size ``estim_lr`` (``d``) and ``numerator_weighted``
    (trees of 0-d arrays, every leaf holding the tree's value), and the count."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    estim_lr: Any
    numerator_weighted: Any
    count: int


# facebookresearch/dadaptation's keys (its group's d and numerator per parameter here)
DADAPT_STATE = torch_state(
    DAdaptAdamWState, exp_avg="exp_avg", exp_avg_sq="exp_avg_sq", grad_sum="s",
    estim_lr="d", numerator_weighted="numerator_weighted", count=STEP,
)  # fmt: skip

# The update reads d as it was at the step's start; the sums (<g, s / (sqrt(v) + eps)> with
# the old s and v, and ||s||_1 with the new s) give the next step's d.
_SUMS = TreeSums(
    state=("estim_lr", "numerator_weighted"),
    terms=("num_t", "abs_t"),
    statements=(
        ("dlr", "(estim_lr * sched) * bc"),
        ("numerator_weighted", "sb2 * numerator_weighted + (one_minus_sb2 * dlr) * s0"),
        ("d_estimate", "numerator_weighted / (one_minus_sb2 * s1)"),
        ("estim_lr", "s1 == 0 ? estim_lr : estim_lr >= d_estimate ? estim_lr : d_estimate"),
    ),
    after=True,
)
_SOURCE = """
const real dlr = (estim_lr * sched) * bc;
num_t = u * (grad_sum / (SQRT(exp_avg_sq) + eps));
exp_avg = b1 * exp_avg + (one_minus_b1 * dlr) * u;
exp_avg_sq = b2 * exp_avg_sq + (one_minus_b2 * u) * u;
grad_sum = sb2 * grad_sum + (one_minus_sb2 * dlr) * u;
abs_t = FABS(grad_sum);
u = (neg_wd * dlr) * p - exp_avg / (SQRT(exp_avg_sq) + eps);
"""
_SCALARS = ("sched", "bc", "b1", "one_minus_b1", "b2", "one_minus_b2", "sb2", "one_minus_sb2",
            "eps", "neg_wd")  # fmt: skip


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """D-Adaptation AdamW (optax.contrib's ``dadapt_adamw``: its signature, defaults and
    order of operations), with ``d`` the step size estimate (``estim_lr``, from
    ``estim_lr0``), ``sb2 = sqrt(b2)`` and ``t`` from 1::

        dlr = d lr(t) sqrt(1 - b2^t) / (1 - b1^t)
        r <- sb2 r + (1 - sb2) dlr <g, s / (sqrt(v) + eps)>     (old s, v; over the tree)
        m <- b1 m + (1 - b1) dlr g;   v <- b2 v + (1 - b2) g^2;   s <- sb2 s + (1 - sb2) dlr g
        d <- max(d, r / ((1 - sb2) ||s||_1))   (used from the next step; kept while ||s||_1 = 0)
        u = -wd dlr x - m / (sqrt(v) + eps)

    One pass over the tree: the update kernel also sums both terms (a partial per chunk),
    and a one-work-item finish updates ``d`` and ``r`` on the device (2 launches per
    tree). Where ``||s||_1`` is 0 (the gradients so far all zero, or too small for the
    dtype) ``d`` stays; optax's becomes NaN (0 / 0) for good.

    ``state_dtype``: the slots stored as bfloat16 or float16 (see
    :func:`low_precision_state`); 8-bit state is refused (its step sums over the tree).
    """
    check_learning_rate(learning_rate)
    check(UNIT, b1=betas[0], b2=betas[1])
    check(POSITIVE, eps=eps, estim_lr0=estim_lr0)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    b1, b2 = float(betas[0]), float(betas[1])
    sb2 = b2**0.5

    def host_step(state: DAdaptAdamWState, **_: Any):
        t = state.count + 1
        sched = learning_rate(state.count) if callable(learning_rate) else learning_rate
        bc = adam_step_scale(b1, b2, t, state.estim_lr)
        values = (float(sched), bc, b1, 1.0 - b1, b2, 1.0 - b2, sb2, 1.0 - sb2,
                  float(eps), -float(weight_decay))  # fmt: skip
        return values, state._replace(count=t)

    fragment = Fragment(
        "dadapt_adamw", _SOURCE, slots=("exp_avg", "exp_avg_sq", "grad_sum"), scalars=_SCALARS,
        host_step=host_step, needs_params=True,
        tree_sums=TreeSums(_SUMS.state, _SUMS.terms, _SUMS.statements, after=True,
                           start=(float(estim_lr0), 0.0)),
    )  # fmt: skip
    tx = elementwise(fragment, init=lambda m, v, s, d, r: DAdaptAdamWState(m, v, s, d, r, 0))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class DAdaptAdamW(Optimizer):
    """D-Adaptation AdamW (the maths is :func:`netcl_optim.dadapt_adamw`, optax.contrib's
    rule, one pass over the tree per step).

    Args:
      params: parameters or param groups (the sums run over each group).
      lr: the schedule's multiplier of ``d``, > 0 (default 1.0).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: > 0 (default 1e-8).
      estim_lr0: the first ``d``, > 0 (default 1e-6).
      weight_decay: decoupled, scaled by ``dlr``, >= 0 (default 0).

    facebookresearch/dadaptation's ``DAdaptAdam`` differs (``d0``, ``growth_rate``, bias
    correction off by default, ``log_every``); this is optax's rule. State per parameter:
    ``step``, ``exp_avg``, ``exp_avg_sq``, ``s`` and ``d``, ``numerator_weighted`` (0-d: the
    group's values; ``optimizer.state[p]["d"]`` for logging).
    """

    hyperparameters = (
        torch_lr(1.0),
        BETAS,
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("estim_lr0", 1e-6, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
    )
    torch_state = (DADAPT_STATE,)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, estim_lr0: float, weight_decay: float
    ) -> GradientTransformation:
        return dadapt_adamw(lr, betas, eps, estim_lr0, weight_decay)
