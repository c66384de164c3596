"""Schedule-free training (Defazio et al., 2024, "The Road Less Scheduled"): the functional
``schedule_free_adamw`` and ``schedule_free_sgd`` (optax.contrib's names, defaults and order of
operations, over the wrapper ``schedule_free`` of ``transforms/_schedule_free.py``) and the
stateful ``AdamWScheduleFree``, ``SGDScheduleFree`` and ``RAdamScheduleFree``
(facebookresearch ``schedulefree``'s signatures, defaults, order of operations,
``train()``/``eval()`` and state keys).

Three sequences: ``z`` (the base optimizer's iterates), ``x`` (their weighted average, where
to evaluate) and ``y = (1 - b1) z + b1 x`` (where the gradient is taken). The params hold
``y`` while training; ``x`` is never stored.
"""

from __future__ import annotations

__all__ = [
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "schedule_free_adamw",
    "schedule_free_sgd",
]

import abc
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pyopencl.array as cla

from .. import _validation
from .._base import (
    PARAMS,
    Fragment,
    GradientTransformation,
    Part,
    ScalarOrSchedule,
)
from .._device import to_device
from .._packing import pack
from .._validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Rule,
    at_least,
    check,
    invalid,
    require,
)
from ..fusion import host_value, is_eight_bit, run_parts
from ..stateful._declaration import EPS, FOREACH, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._schedule_free import B1, schedule_free
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights

# ============================================================================ functional

# optax's scale_by_rms(decay=b2, eps, eps_in_sqrt=False, bias_correction=True), its order:
#   nu = (1 - b2) g^2 + b2 nu;  u = 1 / (sqrt(nu / (1 - b2^t)) + eps) * g
# (XLA divides by the scalar 1 - b2^t as a product with its reciprocal: so does this)
_RMS_BIAS_CORRECTED = """
nu = one_minus_b2 * (u * u) + b2 * nu;
u = ((real)1 / (SQRT(nu * (wide ? inv_bc2_f64 : inv_bc2_f32)) + eps)) * u;
"""
# a compile-time test of real's precision: 2^-280 is 0 in float and not in double
_WIDE = "const int wide = (real)0x1p-140f * (real)0x1p-140f != (real)0;\n"


class ScaleByRmsWithCountState(NamedTuple):
    """optax's ``scale_by_rms(..., bias_correction=True)`` state: the step count and the
    second moment ``nu``."""

    count: int
    nu: Any


def _scale_by_rms_bias_corrected(b2: float, eps: float) -> GradientTransformation:
    """optax's ``scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)``
    in its order: ``nu <- (1 - b2) g^2 + b2 nu``, ``u <- g / (sqrt(nu / (1 - b2^t)) + eps)``
    (as ``1 / (...) * g``; ``1 - b2^t`` from the host)."""
    check(UNIT, b2=b2)
    check(POSITIVE, eps=eps)
    b2, eps = float(b2), float(eps)

    def host_step(state: ScaleByRmsWithCountState, **_: Any):
        t = state.count + 1
        # optax: 1 - b2^t in the default float (float32 pow of the int count; float64
        # under jax_enable_x64, then cast to the leaf's dtype)
        f32 = np.float32
        inv_bc2_f32 = float(f32(1.0) / (f32(1.0) - f32(b2) ** f32(t)))
        inv_bc2_f64 = 1.0 / (1.0 - b2**t)
        return (1.0 - b2, b2, inv_bc2_f32, inv_bc2_f64, eps), state._replace(count=t)

    fragment = Fragment(
        "scale_by_rms_bias_corrected",
        _WIDE + _RMS_BIAS_CORRECTED,
        slots=("nu",),
        nonnegative=("nu",),
        scalars=("one_minus_b2", "b2", "inv_bc2_f32", "inv_bc2_f64", "eps"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda nu: ScaleByRmsWithCountState(count=0, nu=nu))


def _warmup(learning_rate: ScalarOrSchedule, warmup_steps: int | None) -> ScalarOrSchedule:
    """optax's ``warmup_constant_schedule(0, learning_rate, warmup_steps)`` when
    ``warmup_steps`` is given (an int >= 1; its values in float32, as optax computes them),
    else ``learning_rate``."""
    _validation.learning_rate("learning_rate", learning_rate)
    if warmup_steps is None:
        return learning_rate
    steps = require("warmup_steps", warmup_steps, at_least(1))
    if callable(learning_rate):
        raise invalid("learning_rate", learning_rate, "a number when warmup_steps is given")
    peak = float(learning_rate)
    f32 = np.float32

    def schedule(count: int) -> float:
        """optax's values, in float32 (its schedules of an int32 count, even under
        jax_enable_x64)."""
        if count >= steps:
            return float(f32(peak))
        frac = f32(1.0) - f32(max(count, 0)) / f32(steps)
        return float(f32(-peak) * frac + f32(peak))

    return schedule


def schedule_free_adamw(
    learning_rate: float = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Schedule-free AdamW (optax.contrib's ``schedule_free_adamw``, its signature, defaults
    and order)::

        v <- (1 - b2) g^2 + b2 v;  u = g / (sqrt(v / (1 - b2^t)) + eps)
        u <- -lr_t (u + weight_decay * y)
        then schedule_free(., learning_rate, b1, weight_lr_power)

    ``warmup_steps``: a linear warmup from 0 (``lr_t = lr min(t, warmup) / warmup``); the
    base chain counts ``t`` from 0 (its first step moves ``z`` by nothing) while the
    averaging weight uses ``lr(t)`` from 1, as optax. The stateful
    :class:`AdamWScheduleFree` (schedulefree's rule) starts its warmup at ``lr / warmup``
    and computes in torch's order.

    ``state_dtype``, ``state_bits`` (keyword-only, as every alias here): how the state is
    stored, every slot (``z`` and ``nu``; see :func:`low_precision_state`). optax's
    positional ``state_dtype`` stores ``z`` only: ``schedule_free(..., state_dtype=)`` does.

    Device: one fused kernel per packed tree; state ``z`` and ``nu`` (and host numbers).
    """
    lr = _warmup(learning_rate, warmup_steps)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    base = chain(_scale_by_rms_bias_corrected(b2, eps), *decay, scale_by_learning_rate(lr))
    tx = schedule_free(base, lr, b1, weight_lr_power)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


def schedule_free_sgd(
    learning_rate: float = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
    *,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Schedule-free SGD (optax.contrib's ``schedule_free_sgd``: signature, defaults, order)::

        u <- -lr_t (g + weight_decay * y)          (the decay only when given)
        then schedule_free(., learning_rate, b1, weight_lr_power)

    ``warmup_steps``, ``state_dtype``, ``state_bits``: as :func:`schedule_free_adamw`.
    Device: one fused kernel per packed tree; state ``z`` (and host numbers)."""
    lr = _warmup(learning_rate, warmup_steps)
    decay = []
    if weight_decay is not None:
        check(NON_NEGATIVE, weight_decay=weight_decay)
        decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    base = chain(*decay, scale_by_learning_rate(lr))
    tx = schedule_free(base, lr, b1, weight_lr_power)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


# ============================================================================ stateful

# schedulefree's step, in its (for-loop path's) order, per element; the host scalars from
# the group's k, lr, lr_max and weight_sum (see _group_step):
#   v <- v b2 + (1 - b2) g g;  g <- g / (sqrt(v / bc2) + eps)     (AdamW; RAdam when rho_t > 4)
#   g <- g + decay y                                            (only where decay != 0)
#   y <- lerp(y, z, ck);  y <- y + lr (b1 (1 - ck) - 1) g;  z <- z - lr g
# The new y is written as y + (y_new - y) (the executor's apply; exact whenever y_new is
# within a factor 2 of y). torch's CPU lerp and add use fused multiply-adds and its sqrt is
# MKL's: parity with schedulefree is to float32 rounding, not bit for bit.
_SF_MOVE = """
real y = FABS(ck) < 0.5f ? p + ck * (z - p) : z - (z - p) * (1 - ck);
y = y + y_lr * g;
z = z - lr * g;
u = y - p;
"""
_SF_SECOND_MOMENT = "exp_avg_sq = exp_avg_sq * b2 + one_minus_b2 * u * u;\n"
_SF_ADAM_SCALE = "real g = u / (SQRT(exp_avg_sq / bc2) + eps);\n"
_SF_RADAM_SCALE = "real g = adaptive != 0 ? u / (SQRT(exp_avg_sq / bc2) + eps) : u;\n"
_SF_PLAIN = "real g = u;\n"
_SF_DECAY = "g = g + decay * p;\n"
# train() and eval(): p <- lerp(p, z, w) (torch's lerp), z read as the updates (or, stored in
# 16 bits, as a slot, with the params as the updates: storing a 16-bit value loaded from
# 16 bits gives the same bits)
_SWAP = """
const real w = weight;
u = (FABS(w) < 0.5f ? p + w * (u - p) : u - (u - p) * (1 - w)) - p;
"""
_SWAP_SLOT = """
const real w = weight;
u = (FABS(w) < 0.5f ? p + w * (z - p) : z - (z - p) * (1 - w)) - p;
"""
_SWAP_FRAGMENT = Fragment("schedule_free_swap", _SWAP, scalars=("weight",), needs_params=True)
_SWAP_SLOT_FRAGMENT = Fragment("schedule_free_swap_slot", _SWAP_SLOT, slots=("z",),
                               scalars=("weight",), needs_params=True)  # fmt: skip

# the keyword argument that carries a group's host values to its step's host_step
_GROUP_VALUES = "schedule_free_group_values"


class ScheduleFreeAdamState(NamedTuple):
    """A stateful schedule-free Adam's per-parameter state: steps, ``z`` and the second
    moment (schedulefree's keys ``z`` and ``exp_avg_sq``)."""

    count: int
    z: Any
    exp_avg_sq: Any


class ScheduleFreeSGDState(NamedTuple):
    """A stateful schedule-free SGD's per-parameter state: steps and ``z``."""

    count: int
    z: Any


SF_ADAM_KEYS = torch_state(ScheduleFreeAdamState, z="z", exp_avg_sq="exp_avg_sq", count="z")
SF_SGD_KEYS = torch_state(ScheduleFreeSGDState, z="z", count="z")


def _torch_order_step(kind: str, b2: float, eps: float, decay: float) -> GradientTransformation:
    """The stateful classes' fused step (``kind``: "adamw", "radam" or "sgd"), schedulefree's
    order; only for their ``step`` (its per-group values come from there)."""
    scale = {"adamw": _SF_ADAM_SCALE, "radam": _SF_RADAM_SCALE, "sgd": _SF_PLAIN}[kind]
    moment = "" if kind == "sgd" else _SF_SECOND_MOMENT
    source = moment + scale + (_SF_DECAY if decay else "") + _SF_MOVE
    fixed = (b2, 1.0 - b2, eps, decay)

    def host_step(state: Any, **extra_args: Any) -> tuple[tuple[float, ...], Any]:
        values = extra_args.get(_GROUP_VALUES)
        if values is None:
            raise RuntimeError(
                "the schedule-free stateful rule runs only inside its optimizer's step()"
            )
        return (*fixed, *values), state._replace(count=state.count + 1)

    slots = ("z",) if kind == "sgd" else ("z", "exp_avg_sq")
    fragment = Fragment(
        f"schedule_free_{kind}_torch",
        source,
        slots=slots,
        scalars=("b2", "one_minus_b2", "eps", "decay", "bc2", "ck", "y_lr", "lr", "adaptive"),
        host_step=host_step,
        needs_params=True,
        slot_init=(PARAMS,) + (0.0,) * (len(slots) - 1),
        nonnegative=() if kind == "sgd" else ("exp_avg_sq",),
    )
    if kind == "sgd":
        return elementwise(fragment, init=lambda z: ScheduleFreeSGDState(count=0, z=z))
    return elementwise(
        fragment, init=lambda z, v: ScheduleFreeAdamState(count=0, z=z, exp_avg_sq=v)
    )


# the per-group host entries (schedulefree's), with their start values
_HOST_ENTRIES = {"k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0,
                 "scheduled_lr": 0.0}  # fmt: skip
_HOST_RULES = {
    "k": at_least(0).value_errors(),
    "train_mode": BOOL.value_errors(),
    "weight_sum": NON_NEGATIVE.value_errors(),
    "lr_max": _validation.number("a number >= -1", lambda f: -1 <= f < math.inf).value_errors(),
    "scheduled_lr": NON_NEGATIVE.value_errors(),
}


def _betas(value: Any) -> tuple[float, float] | None:
    """A pair ``(b1, b2)``, b1 in (0, 1] and b2 in [0, 1), as floats; else None."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return None
    b1, b2 = B1.convert(value[0]), UNIT.convert(value[1])
    return None if b1 is None or b2 is None else (b1, b2)


_SF_BETAS = Hyperparameter(
    "betas",
    (0.9, 0.999),
    Rule(
        "a pair (beta1, beta2), beta1 in (0, 1], beta2 in [0, 1)",
        _betas,
    ).value_errors(),
)


def _weight(k: int, r: float, lr_max: float, power: float) -> float:
    """schedulefree's averaging weight ``(k+1)^r lr_max^power`` (Python floats)."""
    return ((k + 1) ** r) * (lr_max**power)


def _ckp1(weight: float, weight_sum: float) -> float:
    try:
        return weight / weight_sum
    except ZeroDivisionError:
        return 0.0


class _ScheduleFreeOptimizer(Optimizer):
    """What the three schedule-free classes share: the group's host entries (schedulefree's
    ``k``, ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``: in the param groups,
    so in state dicts, as theirs), ``train()``/``eval()`` and the step's check of the mode.

    A new optimizer is in eval mode (as schedulefree's): call :meth:`train` before training
    and :meth:`eval` before evaluating or saving; :meth:`step` in eval mode raises
    RuntimeError (schedulefree: Exception) and changes nothing.
    """

    torch_step = False
    _pending: Mapping[int, tuple[float, ...]] = MappingProxyType({})

    @staticmethod
    def _b1(group: Mapping[str, Any]) -> float:
        return float(group["betas"][0])

    @abc.abstractmethod
    def _group_step(self, group: Mapping[str, Any]) -> tuple[tuple[float, ...], dict]:
        """The step's kernel values ``(bc2, ck, y_lr, lr, adaptive)`` and the group's new host
        entries, computed as schedulefree does (Python floats)."""

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        group = dict(param_group)
        for key, start in _HOST_ENTRIES.items():
            group.setdefault(key, start)
        _check_host_entries(group, f"param_groups[{len(self.param_groups)}]")
        super().add_param_group(group)

    # ------------------------------------------------------------------ modes

    def train(self) -> None:
        """Set the params to ``y`` (``p <- lerp(p, z, 1 - b1)``) in every group in eval mode;
        parameters that have no ``z`` yet are left as they are. One launch per packed group."""
        self._swap(True)

    def eval(self) -> None:
        """Set the params to ``x`` (``p <- lerp(p, z, 1 - 1/b1)``) in every group in train
        mode. One launch per packed group."""
        self._swap(False)

    def _swap(self, train: bool) -> None:
        for gi, group in enumerate(self.param_groups):  # (all checked before any swap)
            self._declaration.validate(group, f"param_groups[{gi}]", in_group=True)
            _check_host_entries(group, f"param_groups[{gi}]")
        for group, rec in zip(self.param_groups, self._groups, strict=True):
            if bool(group["train_mode"]) == train:
                continue
            b1 = self._b1(group)
            weight = 1.0 - b1 if train else 1.0 - 1.0 / b1
            zs, counts = rec.bufs.get("z"), rec.counts.get("z")
            members = [i for i, c in enumerate(counts or ()) if c > 0]
            if zs is not None and members:
                params = [rec.params[i].data for i in members]
                z = zs if len(members) == len(zs) else [zs[i] for i in members]
                _lerp_towards(params, z, weight, rec.queue)
            group["train_mode"] = train

    # ------------------------------------------------------------------ step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One schedule-free step of every parameter with a grad (schedulefree's rule and
        order, see the class); returns ``closure()``. Raises RuntimeError when any group is
        in eval mode (call :meth:`train` first), with nothing changed (schedulefree checks
        group 0 only, and steps a group added later in eval mode as if its params held y).
        Every group's ``k`` advances (as schedulefree's), whether or not its parameters have
        grads.

        Device: one fused kernel per packed group (``y``, ``z`` and the second moment)."""
        self._check_step()
        loss = None
        if closure is not None:
            loss = closure()
        for gi, group in enumerate(self.param_groups):  # (hyperparameters: checked below)
            _check_host_entries(group, f"param_groups[{gi}]")
        planned = [self._group_step(group) for group in self.param_groups]
        self._pending = {id(rec): values for rec, (values, _) in zip(self._groups, planned,
                                                                     strict=True)}  # fmt: skip
        try:
            super().step()
        finally:
            self._pending = {}
        for group, (_, entries) in zip(self.param_groups, planned, strict=True):
            group.update(entries)
        return loss

    def _check_step(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}.step() with param_groups[{gi}] in eval mode: call "
                    "optimizer.train() before training steps (and optimizer.eval() before "
                    "evaluating or saving)"
                )

    def _step_args(self, rec: Any) -> dict[str, Any]:
        return {_GROUP_VALUES: self._pending[id(rec)]}

    # ------------------------------------------------------------------ state

    @classmethod
    def exported_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """A saved group holds ``foreach: None`` too: schedulefree's step reads it (ours
        drops it on load)."""
        return {**group, "foreach": None}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """:meth:`Optimizer.load_state_dict`, with the groups' host entries (``k``,
        ``train_mode``, ...) checked first and restored (those a dict lacks start afresh).
        The params are not touched: load the params saved with the state dict (saved in the
        same mode)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if isinstance(groups, (list, tuple)):
            for gi, saved in enumerate(groups):
                if isinstance(saved, Mapping):
                    entries = {k: saved[k] for k in _HOST_ENTRIES if k in saved}
                    _check_host_entries(entries, f"loaded param_groups[{gi}]")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, start in _HOST_ENTRIES.items():
                group.setdefault(key, start)
            group["k"] = int(group["k"])
            group["train_mode"] = bool(group["train_mode"])


def _lerp_towards(params: list[Any], z: list[Any], weight: float, queue: Any) -> None:
    """``p <- lerp(p, z, weight)`` in place, one launch per packed run; ``z`` unchanged (8-bit
    ``z`` is dequantized on the host first: a swap is rare)."""
    if all(isinstance(b, cla.Array) and b.dtype == p.dtype for b, p in zip(z, params, strict=True)):
        run_parts([Part(_SWAP_FRAGMENT, (weight,), ())], z, params, apply=True, inplace=True)
    elif any(is_eight_bit(b) for b in z):
        values = [
            host_value(b).reshape(p.shape).astype(p.dtype) for b, p in zip(z, params, strict=True)
        ]
        z_now = pack([to_device(v, queue) for v in values])
        run_parts([Part(_SWAP_FRAGMENT, (weight,), ())], z_now, params, apply=True, inplace=True)
    else:
        part = Part(_SWAP_SLOT_FRAGMENT, (weight,), (z,))
        run_parts([part], params, params, apply=True, inplace=True)


def _check_host_entries(group: Mapping[str, Any], where: str) -> None:
    for key, rule in _HOST_RULES.items():
        if key in group:
            require(key, group[key], rule, where)


def _warmup_lr(group: Mapping[str, Any], k: int) -> float:
    warmup = group["warmup_steps"]
    sched = (k + 1) / warmup if k < warmup else 1.0
    return group["lr"] * sched


def _adam_like_step(group: Mapping[str, Any], lr: float, k: int, adaptive: float) -> tuple:
    """schedulefree's per-group arithmetic after the step's ``lr`` is known."""
    b1, b2 = group["betas"]
    lr_max = max(lr, group["lr_max"])
    weight = _weight(k, group["r"], lr_max, group["weight_lr_power"])
    weight_sum = group["weight_sum"] + weight
    ckp1 = _ckp1(weight, weight_sum)
    bc2 = 1 - b2 ** (k + 1)
    values = (bc2, ckp1, lr * (b1 * (1 - ckp1) - 1), lr, adaptive)
    entries = {"k": k + 1, "lr_max": lr_max, "weight_sum": weight_sum, "scheduled_lr": lr}
    return values, entries


class AdamWScheduleFree(_ScheduleFreeOptimizer):
    """Schedule-free AdamW (facebookresearch ``schedulefree``'s ``AdamWScheduleFree``: its
    signature, defaults, keys and its for-loop path's order of operations), per step ``k``
    (from 0) of a group::

        lr_k = lr min(1, (k + 1) / warmup_steps);  lr_max = max(lr_max, lr_k)
        w = (k + 1)^r lr_max^weight_lr_power;  W <- W + w;  ck = w / W (0 where 0/0)
        v <- b2 v + (1 - b2) g^2;  g <- g / (sqrt(v / (1 - b2^(k+1))) + eps)
        g <- g + weight_decay y                    (decay at y)
        y <- lerp(y, z, ck) + lr_k (b1 (1 - ck) - 1) g;  z <- z - lr_k g

    The functional :func:`schedule_free_adamw` (optax's) computes the same sequences in
    another order (x rebuilt from y), starts its warmup at 0 and has no ``r``.

    Call :meth:`train` before training and :meth:`eval` before evaluating or saving: a new
    optimizer is in eval mode, and :meth:`step` raises there. The params hold ``y`` in train
    mode and ``x`` in eval mode; the mode is kept in the groups (``train_mode``), with
    schedulefree's ``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr``, so state dicts load
    both ways. State per parameter: ``z`` (the params' copy at the first step) and
    ``exp_avg_sq``.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 0.0025).
      betas: ``(b1, b2)``, b1 in (0, 1], b2 in [0, 1) (default (0.9, 0.999)).
      eps: > 0 (default 1e-8).
      weight_decay: >= 0, at y (default 0).
      warmup_steps: linear warmup, an int >= 0 (default 0).
      r: polynomial weighting power, >= 0 (default 0).
      weight_lr_power: >= 0 (default 2).
      foreach: accepted and ignored (every step is one fused kernel).
    """

    hyperparameters = (
        torch_lr(0.0025),
        _SF_BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("warmup_steps", 0, at_least(0)),
        Hyperparameter("r", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_lr_power", 2.0, NON_NEGATIVE),
        FOREACH,
    )
    torch_state = (SF_ADAM_KEYS,)

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        warmup_steps: int,
        r: float,
        weight_lr_power: float,
    ) -> GradientTransformation:
        return _torch_order_step("adamw", betas[1], eps, weight_decay)

    def _group_step(self, group: Mapping[str, Any]) -> tuple[tuple[float, ...], dict]:
        k = group["k"]
        return _adam_like_step(group, _warmup_lr(group, k), k, 1.0)


class SGDScheduleFree(_ScheduleFreeOptimizer):
    """Schedule-free SGD (``schedulefree``'s ``SGDScheduleFree``: signature, defaults, keys,
    order), per step ``k`` of a group::

        lr_k = lr min(1, (k + 1) / warmup_steps);  lr_max = max(lr_max, lr_k)
        w = (k + 1)^r lr_max^weight_lr_power;  W <- W + w;  ck = w / W (0 where 0/0)
        g <- g + weight_decay y
        y <- lerp(y, z, ck) + lr_k (momentum (1 - ck) - 1) g;  z <- z - lr_k g

    The functional :func:`schedule_free_sgd` is optax's order (see
    :class:`AdamWScheduleFree` for the modes and state dicts). State per parameter: ``z``.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1.0).
      momentum: in (0, 1) (default 0.9; schedulefree's check).
      weight_decay: >= 0 (default 0).
      warmup_steps: an int >= 0 (default 0).
      r: >= 0 (default 0).
      weight_lr_power: >= 0 (default 2).
      foreach: accepted and ignored.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("momentum", 0.9, _validation.OPEN_UNIT),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("warmup_steps", 0, at_least(0)),
        Hyperparameter("r", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_lr_power", 2.0, NON_NEGATIVE),
        FOREACH,
    )
    torch_state = (SF_SGD_KEYS,)

    @staticmethod
    def functional(
        lr: Any,
        momentum: float,
        weight_decay: float,
        warmup_steps: int,
        r: float,
        weight_lr_power: float,
    ) -> GradientTransformation:
        return _torch_order_step("sgd", 0.0, 1.0, weight_decay)

    @staticmethod
    def _b1(group: Mapping[str, Any]) -> float:
        return float(group["momentum"])

    def _group_step(self, group: Mapping[str, Any]) -> tuple[tuple[float, ...], dict]:
        k = group["k"]
        lr = _warmup_lr(group, k)
        lr_max = max(lr, group["lr_max"])
        weight = _weight(k, group["r"], lr_max, group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        ckp1 = _ckp1(weight, weight_sum)
        values = (1.0, ckp1, lr * (group["momentum"] * (1 - ckp1) - 1), lr, 1.0)
        entries = {"k": k + 1, "lr_max": lr_max, "weight_sum": weight_sum, "scheduled_lr": lr}
        return values, entries


class RAdamScheduleFree(_ScheduleFreeOptimizer):
    """Schedule-free RAdam (``schedulefree``'s ``RAdamScheduleFree``: signature, defaults,
    keys, order), per step ``k`` of a group, ``t = k + 1``::

        rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
        rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
               if rho_t > 4, else 0 (silent_sgd_phase) or 1
        lr_k = lr rect; then as AdamWScheduleFree, with g <- g / (sqrt(v / (1 - b2^t)) + eps)
        only where rho_t > 4 (an SGD step before)

    No warmup argument (the rectification is one). See :class:`AdamWScheduleFree` for the
    modes and state dicts. State per parameter: ``z`` and ``exp_avg_sq``.

    Args:
      params: parameters or param groups.
      lr: > 0 (default 0.0025).
      betas: b1 in (0, 1], b2 in [0, 1) (default (0.9, 0.999)).
      eps: > 0 (default 1e-8).
      weight_decay: >= 0 (default 0).
      r: >= 0 (default 0).
      weight_lr_power: >= 0 (default 2).
      foreach: accepted and ignored.
      silent_sgd_phase: lr 0 while rho_t <= 4 (default True).
    """

    hyperparameters = (
        torch_lr(0.0025),
        _SF_BETAS,
        EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("r", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_lr_power", 2.0, NON_NEGATIVE),
        FOREACH,
        Hyperparameter("silent_sgd_phase", True, BOOL),
    )
    torch_state = (SF_ADAM_KEYS,)

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        r: float,
        weight_lr_power: float,
        silent_sgd_phase: bool,
    ) -> GradientTransformation:
        return _torch_order_step("radam", betas[1], eps, weight_decay)

    def _group_step(self, group: Mapping[str, Any]) -> tuple[tuple[float, ...], dict]:
        k = group["k"]
        step = k + 1
        b2 = group["betas"][1]
        beta2_t = b2**step
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t)
        if rho_t > 4.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5  # fmt: skip
        else:
            rect = float(not group["silent_sgd_phase"])
        return _adam_like_step(group, group["lr"] * rect, k, 1.0 if rho_t > 4.0 else 0.0)
