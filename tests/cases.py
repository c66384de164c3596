"""The functional test table: every building-block transform with its kwargs and float64
reference (``TRANSFORMS``), the optimizer rows of ``optimizer_table.py`` beside them (``CASES``),
and invalid hyperparameters (``ERRORS``: ``(factory, kwargs, exception, message regex)``).

A ``Case`` names a factory of ``netcl_optim`` by string (so this module imports without the
package), the kwargs it is called with, and the reference transform of ``reference.py`` built from
the same kwargs.
"""

from __future__ import annotations

from typing import Any

import reference as ref
import reference_reductions as rr
from optimizer_table import OPTIMIZERS, Case


def inverse_time(count: int) -> float:
    """A learning-rate schedule: 0.05 / (1 + count / 2)."""
    return 0.05 / (1.0 + count / 2.0)


def halving(count: int) -> float:
    return 0.5**count


TRANSFORMS: list[Case] = [
    Case("identity", "identity", {}, ref.identity),
    Case("scale", "scale", {"step_size": 0.5}, ref.scale),
    Case("scale-negative", "scale", {"step_size": -3.0}, ref.scale),
    Case("scale_by_learning_rate", "scale_by_learning_rate", {"learning_rate": 0.1},
         ref.scale_by_learning_rate),
    Case("scale_by_learning_rate-no_flip", "scale_by_learning_rate",
         {"learning_rate": 0.3, "flip_sign": False}, ref.scale_by_learning_rate),
    Case("scale_by_learning_rate-schedule", "scale_by_learning_rate",
         {"learning_rate": inverse_time}, ref.scale_by_learning_rate),
    Case("scale_by_schedule", "scale_by_schedule", {"step_size_fn": halving},
         ref.scale_by_schedule),
    Case("trace", "trace", {"decay": 0.9}, ref.trace),
    Case("trace-nesterov", "trace", {"decay": 0.8, "nesterov": True}, ref.trace),
    Case("trace-dampening", "trace", {"decay": 0.7, "dampening": 0.4}, ref.trace),
    Case("ema", "ema", {"decay": 0.9}, ref.ema),
    Case("ema-no_debias", "ema", {"decay": 0.5, "debias": False}, ref.ema),
    Case("scale_by_adam", "scale_by_adam", {}, ref.scale_by_adam),
    Case("scale_by_adam-custom", "scale_by_adam",
         {"b1": 0.5, "b2": 0.9, "eps": 1e-4, "eps_root": 1e-6}, ref.scale_by_adam),
    Case("scale_by_rms", "scale_by_rms", {}, ref.scale_by_rms),
    Case("scale_by_rms-centered", "scale_by_rms", {"alpha": 0.9, "eps": 1e-6, "centered": True},
         ref.scale_by_rms),
    Case("add_decayed_weights", "add_decayed_weights", {"weight_decay": 0.1},
         ref.add_decayed_weights, needs_params=True),
    Case("clip", "clip", {"max_delta": 0.5}, ref.clip),
    Case("clip_by_global_norm", "clip_by_global_norm", {"max_norm": 1.0},
         ref.clip_by_global_norm, reduction=True),
    # a value per leaf (or per row) of the same step: segment reductions
    Case("scale_by_trust_ratio", "scale_by_trust_ratio", {}, rr.scale_by_trust_ratio,
         needs_params=True),
    Case("scale_by_trust_ratio-custom", "scale_by_trust_ratio",
         {"min_norm": 1e-2, "trust_coefficient": 0.5, "eps": 1e-3}, rr.scale_by_trust_ratio,
         needs_params=True),
    Case("scale_by_param_block_norm", "scale_by_param_block_norm", {},
         rr.scale_by_param_block_norm, needs_params=True, param_scale=1e-3),
    Case("scale_by_param_block_rms", "scale_by_param_block_rms", {"min_scale": 0.05},
         rr.scale_by_param_block_rms, needs_params=True, param_scale=1e-3),
    Case("clip_by_block_rms", "clip_by_block_rms", {"threshold": 0.5}, rr.clip_by_block_rms),
    Case("centralize", "centralize", {}, rr.centralize),
    Case("adaptive_grad_clip", "adaptive_grad_clip", {"clipping": 0.05},
         rr.adaptive_grad_clip, needs_params=True),
    Case("adaptive_grad_clip-out_in", "adaptive_grad_clip",
         {"clipping": 0.1, "eps": 1e-2, "layout": "out_in"}, rr.adaptive_grad_clip,
         needs_params=True),
    Case("normalize_by_update_norm", "normalize_by_update_norm", {"scale_factor": 2.0},
         rr.normalize_by_update_norm, reduction=True),
]  # fmt: skip


CASES: list[Case] = TRANSFORMS + OPTIMIZERS
CASE_IDS: list[str] = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


# (factory, kwargs, exception, message regex): invalid hyperparameters at construction.
ERRORS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("adafactor", {"decay_rate": float("nan")}, ValueError, "decay_rate"),
    ("adafactor", {"clipping_threshold": -1.0}, ValueError, "clipping_threshold"),
    ("adafactor", {"momentum": 1.5}, ValueError, "momentum"),
    ("adafactor", {"decay_offset": 1.5}, ValueError, "decay_offset"),
    ("adafactor", {"dtype_momentum": "float16"}, ValueError, "dtype_momentum"),
    ("scale_by_factored_rms", {"epsilon": -1.0}, ValueError, "epsilon"),
    ("scale_by_factored_rms", {"eps1": -1.0}, ValueError, "eps1"),
    ("scale_by_factored_rms", {"min_dim_size_to_factor": 1.5}, ValueError,
     "min_dim_size_to_factor"),
    ("sm3", {"learning_rate": 0.1, "momentum": 1.5}, ValueError, "momentum"),
    ("scale_by_sm3", {"eps": -1.0}, ValueError, "eps"),
    ("sgd", {"learning_rate": -0.1}, ValueError, "learning_rate"),
    ("sgd", {"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ("sgd", {"learning_rate": 0.1, "momentum": -0.5}, ValueError, "momentum"),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "dampening": -0.1}, ValueError, "dampening"),
    ("sgd", {"learning_rate": 0.1, "weight_decay": -1.0}, ValueError, "weight_decay"),
    ("sgd", {"learning_rate": 0.1, "nesterov": True}, ValueError, "(?i)nesterov"),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
     ValueError, "(?i)nesterov"),
    ("momentum", {"learning_rate": -1.0}, ValueError, "learning_rate"),
    ("momentum", {"learning_rate": 0.1, "momentum": -0.9}, ValueError, "momentum"),
    ("momentum", {"learning_rate": 0.1, "momentum": 0.0, "nesterov": True}, ValueError,
     "(?i)nesterov"),
    ("momentum", {"learning_rate": 0.1, "weight_decay": -1e-4}, ValueError, "weight_decay"),
    ("adam", {"learning_rate": -1e-3}, ValueError, "learning_rate"),
    ("adam", {"b1": 1.0}, ValueError, "b1"),
    ("adam", {"b1": -0.1}, ValueError, "b1"),
    ("adam", {"b2": 1.0}, ValueError, "b2"),
    ("adam", {"b2": 1.5}, ValueError, "b2"),
    ("adam", {"eps": 0.0}, ValueError, "eps"),
    ("adam", {"eps": -1e-8}, ValueError, "eps"),
    ("adam", {"weight_decay": -0.1}, ValueError, "weight_decay"),
    ("adamw", {"learning_rate": -1e-3}, ValueError, "learning_rate"),
    ("adamw", {"b1": 1.0}, ValueError, "b1"),
    ("adamw", {"b2": -0.5}, ValueError, "b2"),
    ("adamw", {"eps": 0.0}, ValueError, "eps"),
    ("adamw", {"weight_decay": -0.01}, ValueError, "weight_decay"),
    ("rmsprop", {"learning_rate": -1e-3}, ValueError, "learning_rate"),
    ("rmsprop", {"alpha": 1.0}, ValueError, "alpha"),
    ("rmsprop", {"alpha": -0.1}, ValueError, "alpha"),
    ("rmsprop", {"eps": 0.0}, ValueError, "eps"),
    ("rmsprop", {"momentum": -0.1}, ValueError, "momentum"),
    ("rmsprop", {"weight_decay": -0.1}, ValueError, "weight_decay"),
    ("scale_by_adam", {"b1": 1.0}, ValueError, "b1"),
    ("scale_by_adam", {"b2": 1.0}, ValueError, "b2"),
    ("scale_by_adam", {"eps": 0.0}, ValueError, "eps"),
    ("scale_by_adam", {"eps": -1.0}, ValueError, "eps"),
    ("scale_by_rms", {"alpha": 1.0}, ValueError, "alpha"),
    ("scale_by_rms", {"eps": 0.0}, ValueError, "eps"),
    ("trace", {"decay": 0.9, "dampening": -0.5}, ValueError, "dampening"),
    ("add_decayed_weights", {"weight_decay": -0.1}, ValueError, "weight_decay"),
]  # fmt: skip
