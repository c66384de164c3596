"""Prodigy (Mishchenko and Defazio, 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
Learner"): the functional ``prodigy`` (optax.contrib's name, signature, defaults and order of
operations) and the stateful ``Prodigy``. Its step size ``d`` (optax's ``estim_lr``) lives on
the device, updated from sums over the whole tree (``TreeSums``): no host round trip."""

from __future__ import annotations

__all__ = ["Prodigy", "ProdigyState", "prodigy"]

from typing import Any, NamedTuple

from .._base import PARAMS, Fragment, GradientTransformation, ScalarOrSchedule, TreeSums
from .._validation import BOOL, NON_NEGATIVE, POSITIVE, UNIT, check, optional, require
from ..stateful._declaration import BETAS, KEYWORD_ONLY, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import adam_step_scale, check_learning_rate


class ProdigyState(NamedTuple):
    """optax.contrib's ``ProdigyState``: the moments, the weighted gradient sum ``s``, the
    start point ``params0`` (shaped like the params), the step size ``estim_lr`` (``d``) and
    ``numerator_weighted`` (trees of 0-d arrays, every leaf holding the tree's value: read
    any, e.g. ``float(optree.tree_leaves(state.estim_lr)[0].get())``), and the count."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    params0: Any
    estim_lr: Any
    numerator_weighted: Any
    count: int


# konstmish/prodigy's keys (its d and d_numerator per parameter here, see the class)
PRODIGY_STATE = torch_state(
    ProdigyState, exp_avg="exp_avg", exp_avg_sq="exp_avg_sq", grad_sum="s", params0="p0",
    estim_lr="d", numerator_weighted="d_numerator", count=STEP,
)  # fmt: skip

_SCALARS = ("sched", "bc", "b1", "one_minus_b1", "b2", "one_minus_b2", "beta3", "eps",
            "estim_lr0", "coef", "neg_wd")  # fmt: skip


_D_UPDATE = (
    ("numerator_weighted", "beta3 * numerator_weighted + ((estim_lr / estim_lr0) * dlr) * s0"),
    ("d_hat", "(coef * numerator_weighted) / s1"),
    ("estim_lr", "s1 == 0 ? estim_lr : estim_lr >= d_hat ? estim_lr : d_hat"),
)
_STEP = """
exp_avg = b1 * exp_avg + one_minus_b1 * dg;
exp_avg_sq = b2 * exp_avg_sq + (one_minus_b2 * dg) * dg;
grad_sum = beta3 * grad_sum + ({s_scale} * dg) / estim_lr0;
"""


def _fragment(safeguard_warmup: bool, one_pass: bool) -> Fragment:
    if one_pass:  # the kernel sums for the next step; its eps term reads the step's d
        sums = TreeSums(
            state=("estim_lr", "numerator_weighted"),
            terms=("num_t", "abs_t"),
            statements=(("dlr", "(estim_lr * sched) * bc"), *_D_UPDATE),
            after=True,
        )
        s_scale = "estim_lr" if safeguard_warmup else "dlr"
        source = (
            "const real dlr = (estim_lr * sched) * bc;\nconst real dg = estim_lr * u;\n"
            "num_t = u * (params0 - p);\n" + _STEP.format(s_scale=s_scale)
            + "abs_t = FABS(grad_sum);\n"
            "u = (neg_wd * dlr) * p - (dlr * exp_avg) / (SQRT(exp_avg_sq) + estim_lr * eps);\n"
        )  # fmt: skip
    else:  # a pass of sums first: the update's eps term reads the new d (optax's rule)
        s_term = "estim_lr" if safeguard_warmup else "((estim_lr * sched) * bc)"
        sums = TreeSums(
            state=("estim_lr", "numerator_weighted"),
            terms=(
                "u * (params0 - p)",
                f"FABS(beta3 * grad_sum + ({s_term} * (estim_lr * u)) / estim_lr0)",
            ),
            statements=(("dlr", "(estim_lr * sched) * bc"), ("d_old", "estim_lr"), *_D_UPDATE),
            outputs=("dlr", "d_old", "estim_lr"),
            after=False,
        )
        # d_old: the step's d (the moments' scale), estim_lr: the new d
        s_scale = "d_old" if safeguard_warmup else "dlr"
        source = (
            "const real dg = d_old * u;\n" + _STEP.format(s_scale=s_scale)
            + "u = (neg_wd * dlr) * p - (dlr * exp_avg) / (SQRT(exp_avg_sq) + estim_lr * eps);\n"
        )  # fmt: skip
    return Fragment(
        "prodigy_one_pass" if one_pass else "prodigy",
        source,
        slots=("exp_avg", "exp_avg_sq", "grad_sum", "params0"),
        scalars=_SCALARS,
        needs_params=True,
        slot_init=(0.0, 0.0, 0.0, PARAMS),
        tree_sums=sums,
    )


_FRAGMENTS = {(a, b): _fragment(a, b) for a in (False, True) for b in (False, True)}


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
    *,
    one_pass: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Prodigy (optax.contrib's ``prodigy``: its signature, defaults and order of operations),
    with ``d`` the step size estimate (``estim_lr``, from ``estim_lr0``) and ``t`` from 1::

        dlr = d lr(t) sqrt(1 - b2^t) / (1 - b1^t)
        m <- b1 m + (1 - b1) d g;   v <- b2 v + (1 - b2) (d g)^2
        s <- b3 s + dlr d g / d0                 (safeguard_warmup: d d g / d0)
        r <- b3 r + (d / d0) dlr <g, x0 - x>     (over the whole tree)
        d' = max(d, coef r / ||s||_1)             (d' = d while ||s||_1 = 0)
        u = -wd dlr x - dlr m / (sqrt(v) + d' eps)

    ``b3`` defaults to ``sqrt(b2)``. The sums over the tree (``<g, x0 - x>`` before the step
    and ``||s||_1``) run in a pass over the updates, params and slots before the fused step
    (3 launches per tree: sums, a one-work-item finish that updates ``d`` and ``r`` on the
    device, the fused kernel). The update reads the new ``d`` in its ``eps`` term, as optax
    and the reference implementation do, so the sums cannot wait for the next step.

    ``one_pass=True`` (not in optax): the ``eps`` term reads the step's ``d`` instead, so the
    update kernel sums for the next step itself, one pass over the tree (2 launches, 40
    bytes per float32 parameter instead of 52). Early on, while ``d`` grows by orders of
    magnitude, this moves the params measurably (6.5e-4 relative after 100 steps of a
    quadratic in float64); later ``d`` settles and the two agree.

    konstmish/prodigy (torch) also has ``growth_rate``, ``d_coef`` and optional bias
    correction; optax's rule is this one, except where ``||s||_1`` is 0 (the gradients so
    far all zero, or too small for the dtype): optax's ``d`` becomes NaN (0 / 0) for good,
    here it stays (the reference implementation skips such a step).

    ``state_dtype``: the slots stored as bfloat16 or float16 (see
    :func:`low_precision_state`); 8-bit state is refused (its step sums over the tree).
    """
    check_learning_rate(learning_rate)
    check(UNIT, b1=betas[0], b2=betas[1])
    b1, b2 = float(betas[0]), float(betas[1])
    beta3 = require("beta3", beta3, optional(UNIT))
    b3 = b2**0.5 if beta3 is None else float(beta3)
    check(POSITIVE, eps=eps, estim_lr0=estim_lr0, estim_lr_coef=estim_lr_coef)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    fragment = _FRAGMENTS[
        require("safeguard_warmup", safeguard_warmup, BOOL), require("one_pass", one_pass, BOOL)
    ]

    def host_step(state: ProdigyState, **_: Any):
        t = state.count + 1
        sched = learning_rate(state.count) if callable(learning_rate) else learning_rate
        bc = adam_step_scale(b1, b2, t, state.estim_lr)
        values = (float(sched), bc, b1, 1.0 - b1, b2, 1.0 - b2, b3, float(eps),
                  float(estim_lr0), float(estim_lr_coef), -float(weight_decay))  # fmt: skip
        return values, state._replace(count=t)

    fragment = Fragment(
        fragment.name, fragment.source, fragment.slots, fragment.scalars, host_step,
        fragment.needs_params, slot_init=fragment.slot_init,
        tree_sums=TreeSums(*(getattr(fragment.tree_sums, f) for f in
                             ("state", "terms", "statements", "outputs", "after")),
                           start=(float(estim_lr0), 0.0)),
    )  # fmt: skip
    tx = elementwise(fragment, init=lambda m, v, s, x0, d, r: ProdigyState(m, v, s, x0, d, r, 0))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class Prodigy(Optimizer):
    """Prodigy (the maths is :func:`netcl_optim.prodigy`, optax.contrib's rule)::

        dlr = d lr sqrt(1 - b2^t) / (1 - b1^t)
        m <- b1 m + (1 - b1) d g;   v <- b2 v + (1 - b2) (d g)^2;   s <- b3 s + dlr d g / d0
        d' = max(d, coef r / ||s||_1),  r <- b3 r + (d / d0) dlr <g, x0 - x>
        x <- x - wd dlr x - dlr m / (sqrt(v) + d' eps)

    Args:
      params: parameters or param groups (the sums run over each group).
      lr: the schedule's multiplier of ``d``, > 0 (default 1.0).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      beta3: the decay of ``s`` and ``r``, in [0, 1) or None for ``sqrt(b2)``.
      eps: > 0 (default 1e-8), scaled by ``d``.
      estim_lr0: the first ``d`` (``d0``), > 0 (default 1e-6).
      estim_lr_coef: multiplies each estimate of ``d`` (``d_coef``), > 0 (default 1.0).
      weight_decay: decoupled, scaled by ``dlr``, >= 0 (default 0).
      safeguard_warmup: ``s`` accumulates ``d g`` without the learning rate (default False).
      one_pass: keyword-only; the ``eps`` term reads the step's ``d``, and the update kernel
        sums for the next step: one pass over the group (default False: optax's rule).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``s``, ``p0`` (shaped like
    the parameter) and ``d``, ``d_numerator`` (0-d arrays: the group's values, the same for
    every parameter of a group that steps together; a parameter that skipped steps keeps
    its own). ``optimizer.state[p]["d"]`` is the estimate for logging (one read).
    """

    hyperparameters = (
        torch_lr(1.0),
        BETAS,
        Hyperparameter("beta3", None, optional(UNIT)),
        Hyperparameter("eps", 1e-8, POSITIVE),
        Hyperparameter("estim_lr0", 1e-6, POSITIVE),
        Hyperparameter("estim_lr_coef", 1.0, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("safeguard_warmup", False, BOOL),
        KEYWORD_ONLY,
        Hyperparameter("one_pass", False, BOOL),
    )
    torch_state = (PRODIGY_STATE,)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        beta3: float | None,
        eps: float,
        estim_lr0: float,
        estim_lr_coef: float,
        weight_decay: float,
        safeguard_warmup: bool,
        one_pass: bool,
    ) -> GradientTransformation:
        return prodigy(lr, betas, beta3, eps, estim_lr0, estim_lr_coef, weight_decay,
                       safeguard_warmup, one_pass=one_pass)  # fmt: skip
