"""The torch-like stateful layer: Parameter, the Optimizer base class, LR schedulers,
gradient clipping and AMPGradScaler.

The optimizer classes live in :mod:`netcl_optim.optimizers` (one file per family), above the
machinery here; ``netcl_optim.stateful.Adam`` and the like still work (looked up lazily).
"""

from __future__ import annotations

from typing import Any

from ._clip import clip_grad_norm as clip_grad_norm
from ._clip import clip_grad_norm_ as clip_grad_norm_
from ._clip import clip_grad_norm_device as clip_grad_norm_device
from ._clip import clip_grad_value_ as clip_grad_value_
from ._clip import clip_grads_with_norm_ as clip_grads_with_norm_
from ._clip import get_total_norm as get_total_norm
from ._grad_scaler import AMPGradScaler as AMPGradScaler
from ._lambda_lr import LambdaLR as LambdaLR
from ._lr_scheduler import LRScheduler as LRScheduler
from ._optimizer import Optimizer as Optimizer
from ._parameter import Parameter as Parameter
from ._plateau import ReduceLROnPlateau as ReduceLROnPlateau
from ._schedulers import CosineAnnealingLR as CosineAnnealingLR
from ._schedulers import ExponentialLR as ExponentialLR
from ._schedulers import LinearLR as LinearLR
from ._schedulers import MultiStepLR as MultiStepLR
from ._schedulers import OneCycleLR as OneCycleLR
from ._schedulers import StepLR as StepLR
from ._schedulers import WarmupCosine as WarmupCosine

__all__ = [
    "AMPGradScaler",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "OneCycleLR",
    "Optimizer",
    "Parameter",
    "ReduceLROnPlateau",
    "StepLR",
    "WarmupCosine",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_norm_device",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]


def __getattr__(name: str) -> Any:
    # the optimizer classes sit above this package: look them up when asked for
    import netcl_optim

    value = getattr(netcl_optim, name, None)
    if isinstance(value, type) and issubclass(value, Optimizer):
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
