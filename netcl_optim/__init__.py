"""netcl_optim: optax-style optimizers over pyopencl arrays, fused into one kernel per step,
with a torch-like stateful API on top."""

from __future__ import annotations

from ._alias import adam as adam
from ._alias import adamw as adamw
from ._alias import momentum as momentum
from ._alias import rmsprop as rmsprop
from ._alias import sgd as sgd
from ._base import EmptyState as EmptyState
from ._base import Fragment as Fragment
from ._base import GradientTransformation as GradientTransformation
from ._base import Reduction as Reduction
from ._device import default_queue as default_queue
from ._device import set_default_queue as set_default_queue
from ._device import to_device as to_device
from ._device import to_host as to_host
from ._packing import pack as pack
from .fusion._programs import clear_kernel_caches as clear_kernel_caches
from .fusion._runner import count_launches as count_launches
from .transforms._adaptive import ScaleByAdamState as ScaleByAdamState
from .transforms._adaptive import ScaleByRmsState as ScaleByRmsState
from .transforms._adaptive import ScaleByRStdDevState as ScaleByRStdDevState
from .transforms._adaptive import scale_by_adam as scale_by_adam
from .transforms._adaptive import scale_by_rms as scale_by_rms
from .transforms._clipping import clip as clip
from .transforms._clipping import clip_by_global_norm as clip_by_global_norm
from .transforms._combining import chain as chain
from .transforms._combining import elementwise as elementwise
from .transforms._combining import identity as identity
from .transforms._combining import named_chain as named_chain
from .transforms._hyperparams import InjectHyperparamsState as InjectHyperparamsState
from .transforms._hyperparams import inject_hyperparams as inject_hyperparams
from .transforms._masking import MaskedState as MaskedState
from .transforms._masking import masked as masked
from .transforms._momentum import TraceState as TraceState
from .transforms._momentum import trace as trace
from .transforms._plateau import ReduceLROnPlateauState as ReduceLROnPlateauState
from .transforms._plateau import reduce_on_plateau as reduce_on_plateau
from .transforms._scaling import ScaleByScheduleState as ScaleByScheduleState
from .transforms._scaling import scale as scale
from .transforms._scaling import scale_by_learning_rate as scale_by_learning_rate
from .transforms._scaling import scale_by_schedule as scale_by_schedule
from .transforms._update import apply_updates as apply_updates
from .transforms._update import step as step
from .transforms._weight_decay import AddDecayedWeightsState as AddDecayedWeightsState
from .transforms._weight_decay import add_decayed_weights as add_decayed_weights

__version__ = "0.1.0"
