"""SGD, Momentum, Adam, AdamW, RMSProp: torch-named stateful wrappers over the aliases.

Each class only validates, names the hyperparameters as torch does and builds the functional
alias of the same name (:mod:`netcl_optim._alias`, where the maths is) per param group; the
base class :class:`~netcl_optim.stateful._optimizer.Optimizer` runs it in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import _alias
from .._base import GradientTransformation
from ._optimizer import (
    Optimizer,
    check_betas,
    check_bool,
    check_eps,
    check_lr,
    check_non_negative,
    check_unit,
    with_lr,
)

Params = Iterable[Any]


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and coupled
    L2 weight decay (torch.optim.SGD; the maths is :func:`netcl_optim.sgd`)::

        g <- g + weight_decay * p                       (if weight_decay)
        b <- g (first step); b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b if nesterov else b        (if momentum)
        p <- p - lr * g

    Args:
      params: parameters (objects with ``.data``/``.grad`` device arrays) or param groups.
      lr: learning rate, > 0 (default 1e-2).
      momentum: momentum factor, >= 0 (default 0).
      dampening: dampening of the momentum, >= 0 (default 0; the first step is undamped).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    State per parameter (torch keys): ``momentum_buffer`` when momentum is used.

    Raises:
      ValueError: an invalid hyperparameter (the message names it).
    """

    _hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _state_keys = ("momentum_buffer",)
    _required_keys = ()
    _has_step = False

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        self._validate(defaults, "", True)
        super().__init__(params, defaults)

    def _validate(self, group: Mapping[str, Any], prefix: str, positive_lr: bool) -> None:
        check_lr(group["lr"], prefix, positive_lr)
        check_non_negative("momentum", group["momentum"], prefix)
        check_non_negative("dampening", group["dampening"], prefix)
        check_non_negative("weight_decay", group["weight_decay"], prefix)
        check_bool("nesterov", group["nesterov"], prefix)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{prefix}Nesterov momentum requires a momentum and zero dampening")

    def _build(self, group: Mapping[str, Any]) -> GradientTransformation:
        return with_lr(
            _alias.sgd,
            group["lr"],
            float(group["momentum"]),
            float(group["dampening"]),
            float(group["weight_decay"]),
            bool(group["nesterov"]),
        )


class Momentum(SGD):
    """Polyak (heavy-ball) momentum: :class:`SGD` with ``dampening=0`` and its own defaults
    (the maths is :func:`netcl_optim.momentum`)::

        g <- g + weight_decay * p;  b <- g (first step), then b <- momentum * b + g
        p <- p - lr * (g + momentum * b if nesterov else b)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-2).
      momentum: momentum factor, >= 0 (default 0.9).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 1e-4).
      nesterov: Nesterov momentum (needs ``momentum > 0``).

    Groups hold ``"dampening": 0.0`` too, so that its state dicts load into torch.optim.SGD
    and torch.optim.SGD's load into it; a nonzero dampening is a ``ValueError`` (use
    :class:`SGD`). Our own :class:`SGD`'s state dicts name their class and are refused.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": 0.0,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        self._validate(defaults, "", True)
        Optimizer.__init__(self, params, defaults)

    def _validate(self, group: Mapping[str, Any], prefix: str, positive_lr: bool) -> None:
        super()._validate(group, prefix, positive_lr)
        if group["dampening"] != 0:
            raise ValueError(
                f"{prefix}Invalid dampening value: {group['dampening']!r}; Momentum has none "
                "(use SGD)"
            )

    def _build(self, group: Mapping[str, Any]) -> GradientTransformation:
        if group["dampening"] != 0:
            raise ValueError(f"Invalid dampening value: {group['dampening']!r}; use SGD")
        return with_lr(
            _alias.momentum,
            group["lr"],
            float(group["momentum"]),
            float(group["weight_decay"]),
            bool(group["nesterov"]),
        )


class Adam(Optimizer):
    """Adam with coupled L2 weight decay (torch.optim.Adam; the maths is
    :func:`netcl_optim.adam`)::

        g <- g + weight_decay * p                       (if weight_decay)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).

    State per parameter (torch keys): ``step`` (a per-parameter count: a parameter without a
    grad does not advance), ``exp_avg``, ``exp_avg_sq``.
    """

    _hyper = ("lr", "betas", "eps", "weight_decay")
    _state_keys = ("exp_avg", "exp_avg_sq")
    _required_keys = ("exp_avg", "exp_avg_sq")
    _has_step = True
    _decoupled = False
    _alias_fn = staticmethod(_alias.adam)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        defaults = self._normalize(defaults)
        self._validate(defaults, "", True)
        super().__init__(params, defaults)

    def _validate(self, group: Mapping[str, Any], prefix: str, positive_lr: bool) -> None:
        check_lr(group["lr"], prefix, positive_lr)
        check_eps(group["eps"], prefix)
        check_betas(group["betas"], prefix)
        check_non_negative("weight_decay", group["weight_decay"], prefix)

    def _build(self, group: Mapping[str, Any]) -> GradientTransformation:
        b1, b2 = group["betas"]
        return with_lr(
            self._alias_fn,
            group["lr"],
            float(b1),
            float(b2),
            float(group["eps"]),
            float(group["weight_decay"]),
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW; the maths is
    :func:`netcl_optim.adamw`)::

        m, v, t as in Adam (no decay in the gradient)
        p <- p - lr * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: decoupled decay, >= 0 (default 0.01).
    """

    _decoupled = True
    _alias_fn = staticmethod(_alias.adamw)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class RMSProp(Optimizer):
    """RMSProp (torch.optim.RMSprop; the maths is :func:`netcl_optim.rmsprop`)::

        g <- g + weight_decay * p                       (if weight_decay)
        v <- alpha v + (1 - alpha) g^2
        d <- sqrt(v - m^2) + eps with m <- alpha m + (1 - alpha) g if centered, else sqrt(v) + eps
        b <- momentum b + g / d; p <- p - lr * b        (if momentum; b starts at 0)
        p <- p - lr * g / d                             (otherwise)

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      alpha: smoothing constant in [0, 1) (default 0.99).
      eps: added to the denominator, > 0 (default 1e-8).
      weight_decay: L2 penalty added to the gradient, >= 0 (default 0).
      momentum: momentum factor, >= 0 (default 0).
      centered: normalise by the estimated variance (default False).

    State per parameter (torch keys): ``step``, ``square_avg``, ``momentum_buffer`` (with
    momentum), ``grad_avg`` (centered).
    """

    _hyper = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    _state_keys = ("square_avg", "momentum_buffer", "grad_avg")
    _required_keys = ("square_avg",)
    _has_step = True

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "centered": centered,
        }
        self._validate(defaults, "", True)
        super().__init__(params, defaults)

    def _validate(self, group: Mapping[str, Any], prefix: str, positive_lr: bool) -> None:
        check_lr(group["lr"], prefix, positive_lr)
        check_eps(group["eps"], prefix)
        check_unit("alpha", group["alpha"], prefix)
        check_non_negative("weight_decay", group["weight_decay"], prefix)
        check_non_negative("momentum", group["momentum"], prefix)
        check_bool("centered", group["centered"], prefix)

    def _build(self, group: Mapping[str, Any]) -> GradientTransformation:
        return with_lr(
            _alias.rmsprop,
            group["lr"],
            float(group["alpha"]),
            float(group["eps"]),
            float(group["weight_decay"]),
            float(group["momentum"]),
            bool(group["centered"]),
        )
