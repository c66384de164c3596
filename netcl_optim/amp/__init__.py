"""Mixed precision: dynamic loss scaling, functional (``dynamic_loss_scale``) and stateful
(``AMPGradScaler``, defined in ``netcl_optim.stateful`` and re-exported here lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._loss_scale import DynamicLossScaleState as DynamicLossScaleState
from ._loss_scale import dynamic_loss_scale as dynamic_loss_scale
from ._loss_scale import loss_scale_of as loss_scale_of
from ._loss_scale import scale_loss as scale_loss
from ._loss_scale import unscale_grads as unscale_grads

if TYPE_CHECKING:  # (for type checkers; at run time, __getattr__ imports it when asked for)
    from ..stateful._grad_scaler import AMPGradScaler as AMPGradScaler

__all__ = [
    "AMPGradScaler",
    "DynamicLossScaleState",
    "dynamic_loss_scale",
    "loss_scale_of",
    "scale_loss",
    "unscale_grads",
]


def __getattr__(name: str) -> Any:
    # the stateful layer sits above amp/: import it only when asked for
    if name == "AMPGradScaler":
        from ..stateful._grad_scaler import AMPGradScaler

        return AMPGradScaler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
