"""The stateful test table: every optimizer class with torch-named kwargs, its float64
reference rule (``reference.py``), the functional alias it wraps and the torch.optim class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import reference as ref


@dataclass(frozen=True)
class Row:
    id: str
    cls: str  # attribute of netcl_optim.stateful
    kwargs: dict[str, Any]  # torch-named, as given to the class (defaults left out)

    def hyper(self) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in (torch names)."""
        return {**DEFAULTS[self.cls], **self.kwargs}

    def make(self, stateful: Any, params: Any) -> Any:
        return getattr(stateful, self.cls)(params, **self.kwargs)


DEFAULTS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 1e-2, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "nesterov": False},
    "Momentum": {"lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4,
                 "nesterov": False},
    "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    "RMSProp": {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False},
}  # fmt: skip

ROWS: list[Row] = [
    Row("sgd", "SGD", {"lr": 0.1}),
    Row("sgd-momentum", "SGD", {"lr": 0.05, "momentum": 0.9}),
    Row("sgd-dampening-wd_coupled", "SGD",
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}),
    Row("sgd-nesterov-wd_coupled", "SGD",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    Row("momentum", "Momentum", {}),
    Row("momentum-nesterov", "Momentum",
        {"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-2, "nesterov": True}),
    Row("adam", "Adam", {"lr": 1e-2}),
    Row("adam-wd_coupled", "Adam",
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    Row("adamw-wd_decoupled", "AdamW", {"lr": 1e-2}),
    Row("adamw-wd_decoupled-custom", "AdamW",
        {"lr": 3e-2, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.1}),
    Row("rmsprop", "RMSProp", {"lr": 1e-2}),
    Row("rmsprop-momentum", "RMSProp", {"lr": 1e-2, "momentum": 0.9}),
    Row("rmsprop-centered-momentum-wd_coupled", "RMSProp",
        {"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01, "momentum": 0.9,
         "centered": True}),
]  # fmt: skip
ROW_IDS = [r.id for r in ROWS]


def reference_rule(row_or_cls: Row | str, hyper: dict[str, Any]):
    """``(rule, kwargs)``: the float64 torch-style rule of ``reference.py`` and its kwargs."""
    cls = row_or_cls.cls if isinstance(row_or_cls, Row) else row_or_cls
    h = dict(hyper)
    if cls in ("SGD", "Momentum"):
        return ref.sgd, h
    if cls in ("Adam", "AdamW"):
        b1, b2 = h.pop("betas")
        return (ref.adam if cls == "Adam" else ref.adamw), {**h, "b1": b1, "b2": b2}
    return ref.rmsprop, h


def functional(no: Any, cls: str, hyper: dict[str, Any]) -> Any:
    """The functional alias the class wraps, built from torch-named hyperparameters."""
    h = hyper
    if cls == "SGD":
        return no.sgd(h["lr"], h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"])
    if cls == "Momentum":
        return no.momentum(h["lr"], h["momentum"], h["weight_decay"], h["nesterov"])
    if cls in ("Adam", "AdamW"):
        fn = no.adam if cls == "Adam" else no.adamw
        return fn(h["lr"], h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"])
    return no.rmsprop(h["lr"], h["alpha"], h["eps"], h["weight_decay"], h["momentum"],
                      h["centered"])  # fmt: skip


def torch_optimizer(torch: Any, cls: str, params: list, hyper: dict[str, Any]) -> Any:
    name = {"SGD": "SGD", "Momentum": "SGD", "Adam": "Adam", "AdamW": "AdamW",
            "RMSProp": "RMSprop"}[cls]  # fmt: skip
    return getattr(torch.optim, name)(params, **hyper)


def random_grads(rng: np.random.Generator, shapes: list[tuple[int, ...]], steps: int,
                 dtype: Any = np.float32) -> list[list[np.ndarray]]:  # fmt: skip
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
