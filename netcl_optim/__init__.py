"""netcl_optim: optax-style optimizers over pyopencl arrays, fused into one kernel per step,
with a torch-like stateful API on top."""

from __future__ import annotations

import types as _types

from . import schedules as schedules
from . import stateful as stateful
from ._base import PARAMS as PARAMS
from ._base import EmptyState as EmptyState
from ._base import Fragment as Fragment
from ._base import GradientTransformation as GradientTransformation
from ._base import Reduction as Reduction
from ._base import SegmentReduction as SegmentReduction
from ._base import TreeSums as TreeSums
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import load as load
from ._checkpoint import save as save
from ._device import default_queue as default_queue
from ._device import set_default_queue as set_default_queue
from ._device import to_device as to_device
from ._device import to_host as to_host
from ._packing import DonatedArrayError as DonatedArrayError
from ._packing import pack as pack
from .amp import DynamicLossScaleState as DynamicLossScaleState
from .amp import dynamic_loss_scale as dynamic_loss_scale
from .amp import loss_scale_of as loss_scale_of
from .amp import scale_loss as scale_loss
from .amp import unscale_grads as unscale_grads
from .fusion import QuantizedSlice as QuantizedSlice
from .fusion import QuantizedState as QuantizedState
from .fusion import clear_kernel_caches as clear_kernel_caches
from .fusion import count_launches as count_launches

# the optimizer families: one line each (a family's module lists its names in __all__)
from .optimizers.adabelief import *  # noqa: F403
from .optimizers.adadelta import *  # noqa: F403
from .optimizers.adafactor import *  # noqa: F403
from .optimizers.adagrad import *  # noqa: F403
from .optimizers.adam import *  # noqa: F403
from .optimizers.adamax import *  # noqa: F403
from .optimizers.adan import *  # noqa: F403
from .optimizers.ademamix import *  # noqa: F403
from .optimizers.adopt import *  # noqa: F403
from .optimizers.asgd import *  # noqa: F403
from .optimizers.bnb8bit import *  # noqa: F403
from .optimizers.cocob import *  # noqa: F403
from .optimizers.dadapt import *  # noqa: F403
from .optimizers.dog import *  # noqa: F403
from .optimizers.fromage import *  # noqa: F403
from .optimizers.lamb import *  # noqa: F403
from .optimizers.lars import *  # noqa: F403
from .optimizers.lbfgs import *  # noqa: F403
from .optimizers.linesearch import *  # noqa: F403
from .optimizers.lion import *  # noqa: F403
from .optimizers.lookahead import *  # noqa: F403
from .optimizers.madgrad import *  # noqa: F403
from .optimizers.muon import *  # noqa: F403
from .optimizers.nadam import *  # noqa: F403
from .optimizers.noisy_sgd import *  # noqa: F403
from .optimizers.novograd import *  # noqa: F403
from .optimizers.optimistic import *  # noqa: F403
from .optimizers.polyak import *  # noqa: F403
from .optimizers.prodigy import *  # noqa: F403
from .optimizers.radam import *  # noqa: F403
from .optimizers.rmsprop import *  # noqa: F403
from .optimizers.rprop import *  # noqa: F403
from .optimizers.sam import *  # noqa: F403
from .optimizers.schedule_free import *  # noqa: F403
from .optimizers.sgd import *  # noqa: F403
from .optimizers.sign import *  # noqa: F403
from .optimizers.sm3 import *  # noqa: F403
from .optimizers.torch_lbfgs import *  # noqa: F403
from .optimizers.yogi import *  # noqa: F403
from .optimizers.zoom_linesearch import *  # noqa: F403
from .schedules import Schedule as Schedule
from .schedules import constant_schedule as constant_schedule
from .schedules import cosine_decay_schedule as cosine_decay_schedule
from .schedules import cosine_onecycle_schedule as cosine_onecycle_schedule
from .schedules import exponential_decay as exponential_decay
from .schedules import join_schedules as join_schedules
from .schedules import linear_onecycle_schedule as linear_onecycle_schedule
from .schedules import linear_schedule as linear_schedule
from .schedules import piecewise_constant_schedule as piecewise_constant_schedule
from .schedules import piecewise_interpolate_schedule as piecewise_interpolate_schedule
from .schedules import polynomial_schedule as polynomial_schedule
from .schedules import sgdr_schedule as sgdr_schedule
from .schedules import warmup_constant_schedule as warmup_constant_schedule
from .schedules import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from .stateful import CosineAnnealingLR as CosineAnnealingLR
from .stateful import ExponentialLR as ExponentialLR
from .stateful import LambdaLR as LambdaLR
from .stateful import LinearLR as LinearLR
from .stateful import LRScheduler as LRScheduler
from .stateful import MultiStepLR as MultiStepLR
from .stateful import OneCycleLR as OneCycleLR
from .stateful import Optimizer as Optimizer
from .stateful import Parameter as Parameter
from .stateful import ReduceLROnPlateau as ReduceLROnPlateau
from .stateful import StepLR as StepLR
from .stateful import WarmupCosine as WarmupCosine
from .stateful._clip import clip_grad_norm as clip_grad_norm
from .stateful._clip import clip_grad_norm_ as clip_grad_norm_
from .stateful._clip import clip_grad_norm_device as clip_grad_norm_device
from .stateful._clip import clip_grad_value_ as clip_grad_value_
from .stateful._clip import clip_grads_with_norm_ as clip_grads_with_norm_
from .stateful._clip import get_total_norm as get_total_norm
from .stateful._grad_scaler import AMPGradScaler as AMPGradScaler
from .stateful._swa import SWALR as SWALR
from .stateful._swa import AveragedParams as AveragedParams
from .stateful._swa import AveragingFunction as AveragingFunction
from .stateful._swa import get_ema_avg_fn as get_ema_avg_fn
from .stateful._swa import get_ema_multi_avg_fn as get_ema_multi_avg_fn
from .stateful._swa import get_swa_avg_fn as get_swa_avg_fn
from .stateful._swa import get_swa_multi_avg_fn as get_swa_multi_avg_fn
from .transforms._adaptive import ScaleByAdamState as ScaleByAdamState
from .transforms._adaptive import ScaleByRmsState as ScaleByRmsState
from .transforms._adaptive import ScaleByRStdDevState as ScaleByRStdDevState
from .transforms._adaptive import scale_by_adam as scale_by_adam
from .transforms._adaptive import scale_by_rms as scale_by_rms
from .transforms._averaging import incremental_update as incremental_update
from .transforms._averaging import periodic_update as periodic_update
from .transforms._blocks import adaptive_grad_clip as adaptive_grad_clip
from .transforms._blocks import centralize as centralize
from .transforms._blocks import clip_by_block_rms as clip_by_block_rms
from .transforms._blocks import normalize_by_update_norm as normalize_by_update_norm
from .transforms._blocks import scale_by_param_block_norm as scale_by_param_block_norm
from .transforms._blocks import scale_by_param_block_rms as scale_by_param_block_rms
from .transforms._blocks import scale_by_trust_ratio as scale_by_trust_ratio
from .transforms._clipping import clip as clip
from .transforms._clipping import clip_by_global_norm as clip_by_global_norm
from .transforms._clipping import global_norm as global_norm
from .transforms._combining import chain as chain
from .transforms._combining import elementwise as elementwise
from .transforms._combining import identity as identity
from .transforms._combining import named_chain as named_chain
from .transforms._factored import FactoredState as FactoredState
from .transforms._factored import scale_by_factored_rms as scale_by_factored_rms
from .transforms._hyperparams import InjectHyperparamsState as InjectHyperparamsState
from .transforms._hyperparams import inject_hyperparams as inject_hyperparams
from .transforms._masking import MaskedState as MaskedState
from .transforms._masking import masked as masked
from .transforms._momentum import TraceState as TraceState
from .transforms._momentum import trace as trace
from .transforms._monitor import MonitorState as MonitorState
from .transforms._monitor import SnapshotState as SnapshotState
from .transforms._monitor import leaf_norms as leaf_norms
from .transforms._monitor import measure_with_ema as measure_with_ema
from .transforms._monitor import monitor as monitor
from .transforms._monitor import snapshot as snapshot
from .transforms._monitor import update_param_ratio as update_param_ratio
from .transforms._plateau import ReduceLROnPlateauState as ReduceLROnPlateauState
from .transforms._plateau import reduce_on_plateau as reduce_on_plateau
from .transforms._rounding import StochasticRoundingState as StochasticRoundingState
from .transforms._rounding import stochastic_rounding as stochastic_rounding
from .transforms._scaling import ScaleByScheduleState as ScaleByScheduleState
from .transforms._scaling import scale as scale
from .transforms._scaling import scale_by_learning_rate as scale_by_learning_rate
from .transforms._scaling import scale_by_schedule as scale_by_schedule
from .transforms._schedule_free import ScheduleFreeState as ScheduleFreeState
from .transforms._schedule_free import schedule_free as schedule_free
from .transforms._schedule_free import schedule_free_eval_params as schedule_free_eval_params
from .transforms._storage import low_precision_state as low_precision_state
from .transforms._update import apply_updates as apply_updates
from .transforms._update import step as step
from .transforms._weight_decay import AddDecayedWeightsState as AddDecayedWeightsState
from .transforms._weight_decay import add_decayed_weights as add_decayed_weights
from .transforms._wrappers import ApplyIfFiniteState as ApplyIfFiniteState
from .transforms._wrappers import MultiSteps as MultiSteps
from .transforms._wrappers import MultiStepsState as MultiStepsState
from .transforms._wrappers import PartitionState as PartitionState
from .transforms._wrappers import apply_if_finite as apply_if_finite
from .transforms._wrappers import multi_transform as multi_transform
from .transforms._wrappers import partition as partition
from .transforms._wrappers import weight_decay_mask as weight_decay_mask
from .transforms._wrappers import zero_nans as zero_nans

__all__ = sorted(
    name
    for name, value in globals().items()
    if not name.startswith("_")
    and name != "annotations"
    and (not isinstance(value, _types.ModuleType) or name in ("schedules", "stateful"))
)

__version__ = "0.2.0"
