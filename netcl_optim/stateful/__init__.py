"""The torch-like stateful layer: Parameter, the optimizers and the LR schedulers.

The optimizer classes live in :mod:`netcl_optim.optimizers` (one file per family), over the
machinery here; they are imported last, once that machinery is loaded.
"""

from __future__ import annotations

from ._clip import clip_grad_norm as clip_grad_norm
from ._clip import clip_grad_norm_device as clip_grad_norm_device
from ._grad_scaler import AMPGradScaler as AMPGradScaler
from ._lr_scheduler import CosineAnnealingLR as CosineAnnealingLR
from ._lr_scheduler import ExponentialLR as ExponentialLR
from ._lr_scheduler import LambdaLR as LambdaLR
from ._lr_scheduler import LinearLR as LinearLR
from ._lr_scheduler import LRScheduler as LRScheduler
from ._lr_scheduler import MultiStepLR as MultiStepLR
from ._lr_scheduler import OneCycleLR as OneCycleLR
from ._lr_scheduler import ReduceLROnPlateau as ReduceLROnPlateau
from ._lr_scheduler import StepLR as StepLR
from ._lr_scheduler import WarmupCosine as WarmupCosine
from ._optimizer import Optimizer as Optimizer
from ._parameter import Parameter as Parameter

# isort: split
from ..optimizers.adam import Adam as Adam
from ..optimizers.adam import AdamW as AdamW
from ..optimizers.rmsprop import RMSProp as RMSProp
from ..optimizers.rmsprop import RMSprop as RMSprop
from ..optimizers.sgd import SGD as SGD
from ..optimizers.sgd import Momentum as Momentum

__all__ = [
    "SGD",
    "AMPGradScaler",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "Momentum",
    "MultiStepLR",
    "OneCycleLR",
    "Optimizer",
    "Parameter",
    "RMSProp",
    "RMSprop",
    "ReduceLROnPlateau",
    "StepLR",
    "WarmupCosine",
    "clip_grad_norm",
    "clip_grad_norm_device",
]
