"""bitsandbytes' 8-bit optimizers, on any OpenCL device: Adam8bit, AdamW8bit, Lion8bit,
RMSprop8bit, Adagrad8bit, SGD8bit, with bitsandbytes' names, defaults and state dicts.

Each is one of our rules with ``state_bits=8`` (see :func:`netcl_optim.low_precision_state`):
its state in bitsandbytes' layout (per parameter of at least ``min_8bit_size`` elements,
``uint8`` codes and one float32 absmax per 256-element block; smaller parameters keep float32
state), the step one fused launch per packed group. State dicts are bitsandbytes' (``state1``,
``state2``, ``absmax1``, ``qmap1``, ... nested under ``__bnb_optimizer_quant_state__``, an int
``step``), so a bitsandbytes optimizer's state dict loads here and ours there.

Where bitsandbytes differs from itself (its CUDA and CPU backends), these follow its CPU
backend's order of operations: decoupled weight decay before the update (Adam8bit, AdamW8bit,
Lion8bit), coupled ``g + wd p`` for RMSprop8bit, Adagrad8bit and SGD8bit, ``eps`` added after
the bias correction. The codes are the nearest ones (bitsandbytes' CUDA search and sign fix;
its CPU backend uses a 65536-bin table that can pick a neighbouring code).
"""

from __future__ import annotations

__all__ = ["Adagrad8bit", "Adam8bit", "AdamW8bit", "Lion8bit", "RMSprop8bit", "SGD8bit"]

from collections.abc import Mapping
from typing import Any, ClassVar

from .._base import GradientTransformation
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, Rule, real
from ..stateful._declaration import (
    BETAS,
    EPS,
    KEYWORD_ONLY,
    Hyperparameter,
    TorchKeyword,
    torch_lr,
)
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._adaptive import ScaleByAdamState, ScaleByRmsState
from ._shared import DECAY_COUNT
from .adagrad import LR_DECAY_STEP, ScaleByRssState, adagrad
from .adam import adamw
from .lion import ScaleByLionState, lion
from .rmsprop import rmsprop
from .sgd import TraceState, sgd


def _only(value: Any, what: str) -> Rule:
    """A hyperparameter bitsandbytes accepts but that has one value here (``what``: why)."""
    return Rule(what, lambda v: v if v == value and type(v) is type(value) else None)


def _zero(what: str) -> Rule:
    return Rule(what, lambda v: 0.0 if real(v) == 0 else None)


# bitsandbytes' constructor arguments with one value here
_ARGS = TorchKeyword("args", None, unsupported="bitsandbytes' config object has no use here")
_PAGED = TorchKeyword("is_paged", False, optional=False, unsupported="paged memory is CUDA's")
_BITS32 = Hyperparameter("optim_bits", 32, _only(32, "32, as bitsandbytes (state_bits=8 is set)"))
_BITS8 = Hyperparameter("optim_bits", 8, _only(8, "8, as bitsandbytes"))
_AMSGRAD = Hyperparameter(
    "amsgrad", False, _only(False, "False: bitsandbytes has no 8-bit AMSGrad")
)


class _EightBit(Optimizer):
    """What the six share: 8-bit state by default, bitsandbytes' state dict layout, and its
    group keys that are not hyperparameters here dropped on load."""

    # bitsandbytes' group keys that are no hyperparameter here, as it saves them
    bnb_keys: ClassVar[dict[str, Any]] = {}

    @classmethod
    def exported_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {**cls.bnb_keys, **group}

    storage_defaults: ClassVar[dict[str, Any]] = {"state_bits": 8}
    bnb_layout = True
    torch_step = True
    ignored_on_load = ("alpha", "t_alpha", "t_beta3", "optim_bits", "args", "is_paged",
                       "max_unorm", "skip_zeros", "percentile_clipping", "block_wise")  # fmt: skip


ADAM_STATES = torch_state(ScaleByAdamState, mu="state1", nu="state2", count="state1")


class Adam8bit(_EightBit):
    """bitsandbytes' ``Adam8bit``: Adam with 8-bit state and decoupled weight decay::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2      (then stored in 8 bits)
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` (:func:`adamw`)
    with ``state_bits=8``: ``m`` on the signed map, ``v`` on the unsigned one.

    Args:
      params: parameters or param groups.
      lr: > 0 (default 1e-3). betas: default (0.9, 0.999). eps: > 0 (default 1e-8).
      weight_decay: decoupled, >= 0 (default 0; bitsandbytes decays Adam8bit decoupled).
      amsgrad: False only. optim_bits: 32 only (bitsandbytes' rule). args: None only.
      min_8bit_size: parameters smaller than this keep float32 state (default 4096).
      is_paged: False only.

    State per parameter (bitsandbytes' keys): ``step``, ``state1``, ``state2`` (codes, or
    float32 below ``min_8bit_size``), ``absmax1``, ``absmax2``, ``qmap1``, ``qmap2``.
    """

    hyperparameters = (
        torch_lr(1e-3), BETAS, EPS, Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        _AMSGRAD, _BITS32, _ARGS, KEYWORD_ONLY, _PAGED,
    )  # fmt: skip
    torch_state = (ADAM_STATES, DECAY_COUNT)
    bnb_keys: ClassVar[dict[str, Any]] = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
        optim_bits: int,
    ) -> GradientTransformation:  # fmt: skip
        return adamw(lr, betas[0], betas[1], eps, weight_decay)


class AdamW8bit(Adam8bit):
    """bitsandbytes' ``AdamW8bit``: :class:`Adam8bit` with ``weight_decay=1e-2``."""

    hyperparameters = (
        torch_lr(1e-3), BETAS, EPS, Hyperparameter("weight_decay", 1e-2, NON_NEGATIVE),
        _AMSGRAD, _BITS32, _ARGS, KEYWORD_ONLY, _PAGED,
    )  # fmt: skip


class Lion8bit(_EightBit):
    """bitsandbytes' ``Lion8bit``: :func:`lion` (decoupled decay) with its momentum stored in
    8 bits (signed map)::

        u <- sign((1 - b1) g + b1 m);  m <- (1 - b2) g + b2 m;  p <- p - lr (u + wd p)

    Args: lr (default 1e-4), betas (default (0.9, 0.99)), weight_decay (default 0), optim_bits
    (32 only), args (None), min_8bit_size (4096), is_paged (False). State: ``step``,
    ``state1``, ``absmax1``, ``qmap1``.
    """

    hyperparameters = (
        torch_lr(1e-4), Hyperparameter("betas", (0.9, 0.99), BETAS.rule),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE), _BITS32, _ARGS, KEYWORD_ONLY, _PAGED,
    )  # fmt: skip
    torch_state = (torch_state(ScaleByLionState, mu="state1", count="state1"), DECAY_COUNT)
    ignored_on_load = (*_EightBit.ignored_on_load, "eps")  # (bitsandbytes keeps eps=0)
    bnb_keys: ClassVar[dict[str, Any]] = {"eps": 0.0}

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], weight_decay: float, optim_bits: int,
    ) -> GradientTransformation:  # fmt: skip
        return lion(lr, betas[0], betas[1], weight_decay=weight_decay)


class RMSprop8bit(_EightBit):
    """bitsandbytes' ``RMSprop8bit``: :func:`rmsprop` (coupled decay) with its square average
    in 8 bits on the signed map, as bitsandbytes keeps one-state optimizers::

        g <- g + wd p;  s <- alpha s + (1 - alpha) g^2;  p <- p - lr g / (sqrt(s) + eps)

    Args: lr (default 1e-2), alpha (in (0, 1), default 0.99), eps (1e-8), weight_decay (0),
    momentum (0 only: bitsandbytes' CPU backend ignores it; ``RMSprop(state_bits=8)`` has
    it), centered (False only), args, min_8bit_size. State: ``step``, ``state1``,
    ``absmax1``, ``qmap1``.
    """

    hyperparameters = (
        torch_lr(1e-2), Hyperparameter("alpha", 0.99, UNIT), EPS,
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("momentum", 0.0, _zero("0: RMSprop8bit keeps one state; "
                                              "RMSprop(state_bits=8) has momentum")),
        Hyperparameter("centered", False, _only(False, "False, as bitsandbytes")),
        _ARGS, KEYWORD_ONLY,
    )  # fmt: skip
    torch_state = (torch_state(ScaleByRmsState, nu="state1"), DECAY_COUNT)
    signed_8bit = True
    ignored_on_load = (*_EightBit.ignored_on_load, "betas")

    @classmethod
    def exported_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {**group, "betas": (group["alpha"], group["momentum"])}

    @classmethod
    def imported_group(cls, group: Mapping[str, Any]) -> Mapping[str, Any]:
        if "alpha" in group or "betas" not in group:
            return group
        alpha, momentum = group["betas"]  # bitsandbytes' (alpha, momentum)
        return {**group, "alpha": alpha, "momentum": momentum}

    @staticmethod
    def functional(
        lr: Any, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
    ) -> GradientTransformation:  # fmt: skip
        if alpha == 0:
            raise ValueError("Invalid alpha: 0.0 (RMSprop8bit needs alpha > 0, as bitsandbytes)")
        return rmsprop(lr, alpha, eps, weight_decay)


class Adagrad8bit(_EightBit):
    """bitsandbytes' ``Adagrad8bit``: :func:`adagrad` (torch's rule, coupled decay) with its
    sum of squares in 8 bits on the signed map::

        g <- g + wd p;  s <- s + g^2;  p <- p - lr g / (sqrt(s) + eps)

    Args: lr (default 1e-2), lr_decay (0 only), weight_decay (0), initial_accumulator_value
    (0 only), eps (1e-10), optim_bits (8 only), args, min_8bit_size. State: ``step``,
    ``state1``, ``absmax1``, ``qmap1``.
    """

    hyperparameters = (
        torch_lr(1e-2), Hyperparameter("lr_decay", 0.0, _zero("0, as bitsandbytes")),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("initial_accumulator_value", 0.0, _zero("0, as bitsandbytes")),
        Hyperparameter("eps", 1e-10, POSITIVE), _BITS8, _ARGS, KEYWORD_ONLY,
    )  # fmt: skip
    torch_state = (
        torch_state(ScaleByRssState, sum_of_squares="state1", count="state1"),
        LR_DECAY_STEP,
        DECAY_COUNT,
    )
    signed_8bit = True
    ignored_on_load = (*_EightBit.ignored_on_load, "betas")
    bnb_keys: ClassVar[dict[str, Any]] = {"betas": (0.0, 0.0)}

    @staticmethod
    def functional(
        lr: Any, lr_decay: float, weight_decay: float, initial_accumulator_value: float,
        eps: float, optim_bits: int,
    ) -> GradientTransformation:  # fmt: skip
        return adagrad(lr, 0.0, weight_decay, 0.0, eps)


class SGD8bit(_EightBit):
    """bitsandbytes' ``SGD8bit``: :func:`sgd` with momentum (torch's rule: the buffer starts
    at the first gradient) and its momentum buffer in 8 bits on the signed map::

        g <- g + wd p;  b <- g (first step), else momentum b + (1 - dampening) g
        p <- p - lr (g + momentum b if nesterov else b)

    Args: lr (default 1e-3; bitsandbytes requires it), momentum (> 0, default 0 as
    bitsandbytes': give it), dampening (0), weight_decay (0), nesterov (False), args,
    min_8bit_size. State: ``step``, ``state1``, ``absmax1``, ``qmap1``.
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("momentum", 0.0, Rule("a finite number > 0 (SGD8bit keeps momentum)",
                                             POSITIVE.convert)),
        Hyperparameter("dampening", 0.0, NON_NEGATIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        Hyperparameter("nesterov", False, _only(False, "False: SGD(nesterov=True, "
                                                      "state_bits=8) has it")),
        _ARGS, KEYWORD_ONLY,
    )  # fmt: skip
    torch_state = (torch_state(TraceState, trace="state1", count="state1"), DECAY_COUNT)
    signed_8bit = True
    ignored_on_load = (*_EightBit.ignored_on_load, "betas", "eps")

    @classmethod
    def exported_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {**group, "betas": (group["momentum"], 0.0), "eps": 0.0}

    @classmethod
    def imported_group(cls, group: Mapping[str, Any]) -> Mapping[str, Any]:
        if "momentum" in group or "betas" not in group:
            return group
        return {**group, "momentum": group["betas"][0]}  # bitsandbytes' (momentum, 0)

    @staticmethod
    def functional(
        lr: Any, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    ) -> GradientTransformation:  # fmt: skip
        return sgd(lr, momentum, dampening, weight_decay)
