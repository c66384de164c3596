"""The test table: every functional transform and optimizer, its kwargs and its reference.

A ``Case`` names a factory of ``netcl_optim`` by string (so this module imports without the
package), the kwargs it is called with, and the float64 reference transform from
``reference.py`` built from the same kwargs. Optimizer rows also give the equivalent explicit
chain (``parts``) and, where it exists, the ``torch.optim`` class with torch-named kwargs and an
optax factory. ``ERRORS`` lists ``(factory, kwargs, exception, message regex)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import reference as ref


def inverse_time(count: int) -> float:
    """A learning-rate schedule: 0.05 / (1 + count / 2)."""
    return 0.05 / (1.0 + count / 2.0)


def halving(count: int) -> float:
    return 0.5**count


def cosine(count: int) -> float:
    return 1e-2 * 0.5 * (1.0 + math.cos(math.pi * min(count, 10) / 10))


@dataclass(frozen=True)
class Case:
    id: str
    factory: str  # attribute of netcl_optim
    kwargs: dict[str, Any]
    reference: Callable[..., ref.Transform]  # called with the same kwargs
    needs_params: bool = False
    reduction: bool = False  # couples the leaves (global norm)
    # Optimizers only: the same maths as an explicit chain of (factory, kwargs) building blocks.
    parts: tuple[tuple[str, dict[str, Any]], ...] | None = None
    torch: tuple[str, dict[str, Any]] | None = None  # torch.optim class and its kwargs
    optax: Callable[[Any], Any] | None = None  # optax module -> optax transform

    def make(self, no: Any) -> Any:
        return getattr(no, self.factory)(**self.kwargs)

    def make_reference(self) -> ref.Transform:
        return self.reference(**self.kwargs)

    def make_parts(self, no: Any) -> list[Any]:
        assert self.parts is not None
        return [getattr(no, name)(**kw) for name, kw in self.parts]


def _lr(lr):
    return ("scale_by_learning_rate", {"learning_rate": lr})


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
]  # fmt: skip


OPTIMIZERS: list[Case] = [
    Case("sgd", "sgd", {"learning_rate": 0.1}, ref.sgd_tx,
         parts=(_lr(0.1),), torch=("SGD", {"lr": 0.1}),
         optax=lambda optax: optax.sgd(0.1)),
    Case("sgd-momentum", "sgd", {"learning_rate": 0.05, "momentum": 0.9}, ref.sgd_tx,
         parts=(("trace", {"decay": 0.9}), _lr(0.05)),
         torch=("SGD", {"lr": 0.05, "momentum": 0.9}),
         optax=lambda optax: optax.sgd(0.05, momentum=0.9)),
    Case("sgd-dampening-wd_coupled", "sgd",
         {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
         ref.sgd_tx, needs_params=True,
         parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                ("trace", {"decay": 0.9, "dampening": 0.5}), _lr(0.05)),
         torch=("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01})),
    Case("sgd-nesterov-wd_coupled", "sgd",
         {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
         ref.sgd_tx, needs_params=True,
         parts=(("add_decayed_weights", {"weight_decay": 1e-3}),
                ("trace", {"decay": 0.9, "nesterov": True}), _lr(0.05)),
         torch=("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3})),
    Case("sgd-no_momentum-dampening_ignored", "sgd",
         {"learning_rate": 0.1, "momentum": 0.0, "dampening": 0.5}, ref.sgd_tx,
         parts=(_lr(0.1),), torch=("SGD", {"lr": 0.1, "dampening": 0.5})),
    Case("momentum", "momentum", {"learning_rate": 0.05}, ref.momentum_tx,
         parts=(("trace", {"decay": 0.9}), _lr(0.05)),
         torch=("SGD", {"lr": 0.05, "momentum": 0.9}),
         optax=lambda optax: optax.sgd(0.05, momentum=0.9)),
    Case("momentum-nesterov-wd_coupled", "momentum",
         {"learning_rate": 0.02, "momentum": 0.8, "weight_decay": 1e-2, "nesterov": True},
         ref.momentum_tx, needs_params=True,
         parts=(("add_decayed_weights", {"weight_decay": 1e-2}),
                ("trace", {"decay": 0.8, "nesterov": True}), _lr(0.02)),
         torch=("SGD", {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2})),
    Case("adam", "adam", {}, ref.adam_tx,
         parts=(("scale_by_adam", {}), _lr(1e-3)),
         torch=("Adam", {"lr": 1e-3}),
         optax=lambda optax: optax.adam(1e-3)),
    Case("adam-wd_coupled", "adam",
         {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
         ref.adam_tx, needs_params=True,
         parts=(("add_decayed_weights", {"weight_decay": 0.1}),
                ("scale_by_adam", {"b1": 0.8, "b2": 0.99, "eps": 1e-6}), _lr(1e-2)),
         torch=("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1})),
    Case("adam-schedule", "adam", {"learning_rate": cosine}, ref.adam_tx,
         parts=(("scale_by_adam", {}), _lr(cosine))),
    Case("adamw-wd_decoupled", "adamw", {}, ref.adamw_tx, needs_params=True,
         parts=(("scale_by_adam", {}), ("add_decayed_weights", {"weight_decay": 0.01}), _lr(1e-3)),
         torch=("AdamW", {"lr": 1e-3}),
         optax=lambda optax: optax.adamw(1e-3, weight_decay=0.01)),
    Case("adamw-wd_decoupled-custom", "adamw",
         {"learning_rate": 3e-2, "b1": 0.5, "b2": 0.9, "eps": 1e-4, "weight_decay": 0.1},
         ref.adamw_tx, needs_params=True,
         parts=(("scale_by_adam", {"b1": 0.5, "b2": 0.9, "eps": 1e-4}),
                ("add_decayed_weights", {"weight_decay": 0.1}), _lr(3e-2)),
         torch=("AdamW", {"lr": 3e-2, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.1}),
         optax=lambda optax: optax.adamw(3e-2, 0.5, 0.9, 1e-4, weight_decay=0.1)),
    Case("rmsprop", "rmsprop", {}, ref.rmsprop_tx,
         parts=(("scale_by_rms", {}), _lr(1e-3)),
         torch=("RMSprop", {"lr": 1e-3})),
    Case("rmsprop-centered-momentum-wd_coupled", "rmsprop",
         {"learning_rate": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01,
          "momentum": 0.9, "centered": True},
         ref.rmsprop_tx, needs_params=True,
         parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                ("scale_by_rms", {"alpha": 0.9, "eps": 1e-6, "centered": True}),
                ("trace", {"decay": 0.9}), _lr(1e-2)),
         torch=("RMSprop", {"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01,
                            "momentum": 0.9, "centered": True})),
]  # fmt: skip

CASES: list[Case] = TRANSFORMS + OPTIMIZERS
CASE_IDS: list[str] = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


# (factory, kwargs, exception, message regex): invalid hyperparameters at construction.
ERRORS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
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
