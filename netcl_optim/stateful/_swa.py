"""torch.optim.swa_utils' counterparts for our parameters: ``AveragedParams`` (torch's
``AveragedModel`` over a list of :class:`Parameter`), the averaging functions
``get_ema_multi_avg_fn``, ``get_swa_multi_avg_fn``, ``get_ema_avg_fn``, ``get_swa_avg_fn``,
and the ``SWALR`` scheduler.

The averaging functions return small :class:`AveragingFunction` objects: callable the torch
way (on lists of device arrays, or one array), and recognised by :class:`AveragedParams`,
which runs them as one fused launch per packed group and dtype. Any other callable is
called as torch calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._base import Part
from .._packing import pack
from .._validation import BOOL, CLOSED_UNIT, NON_NEGATIVE, at_least, invalid, one_of, require
from ..fusion import run_parts, set_value
from ..transforms._averaging import (
    _INCREMENTAL,
    _RUNNING_MEAN,
    check_like,
    copy_,
    ema_,
    lerp_,
    running_mean_,
)
from ._lr_scheduler import LRScheduler, SupportsParamGroups, lr_groups, per_group
from ._parameter import Parameter

# ---------------------------------------------------------------------------- averaging functions


@dataclass(frozen=True)
class AveragingFunction:
    """An averaging rule of torch's ``swa_utils`` (what ``get_*_avg_fn`` return).

    ``kind``: ``"ema"`` (``decay``) or ``"swa"``; ``multi``: torch's ``multi_avg_fn`` form
    (``fn(averaged_list, current_list, num_averaged)``, in place, returns ``None``) or its
    ``avg_fn`` form (``fn(averaged, current, num_averaged)`` returns the new average).

    The rules are torch's: the multi forms are its ``lerp``, ``avg + w (current - avg)``
    with ``w = 1 - decay`` (EMA) or ``1 / (n + 1)`` (SWA); torch's lerp switches to
    ``current - (current - avg) (1 - w)`` for ``w >= 0.5`` and its vectorised CPU loop uses
    a fused multiply-add, so these agree with torch to an ulp or so per update. The
    ``avg_fn`` forms are exact: ``decay avg + (1 - decay) current`` (EMA) and ``avg +
    (current - avg) / (n + 1)`` (SWA). torch's SWA lerp weight ``1 / (n + 1)`` is a float32
    tensor (``n_averaged`` is a long tensor), for float64 params too; ours is a float64
    scalar for float64 params.
    """

    kind: str
    multi: bool
    decay: float = 0.0

    def weight(self, num_averaged: int) -> float:
        return 1.0 - self.decay if self.kind == "ema" else 1.0 / (num_averaged + 1)

    def average_(self, averaged: list[cla.Array], current: list[cla.Array], n: int) -> None:
        """The in-place update of ``averaged`` (one launch per packed run and dtype)."""
        if self.kind == "swa" and not self.multi:
            running_mean_(averaged, current, n + 1)
        elif self.kind == "ema" and not self.multi:
            ema_(averaged, current, self.decay)
        else:
            lerp_(averaged, current, self.weight(n))

    def __call__(self, averaged: Any, current: Any, num_averaged: Any) -> Any:
        n = _count(num_averaged)
        if self.multi:
            avg, cur = check_like(list(averaged), list(current), "averaged", "current", "avg_fn")
            if avg:
                self.average_(avg, cur, n)
            return None
        check_like(averaged, current, "averaged", "current", "avg_fn")
        if self.kind == "swa":  # avg + (current - avg) / (n + 1), fresh
            part = Part(_RUNNING_MEAN, (float(n + 1),), ())
            out, _ = run_parts([part], current, averaged, apply=True, inplace=False)
            return out
        part = Part(_INCREMENTAL, (1.0 - self.decay, self.decay), ())  # decay avg + (1-decay) cur
        out, _ = run_parts([part], current, averaged, apply=False, inplace=False)
        return out


def _count(num_averaged: Any) -> int:
    if isinstance(num_averaged, cla.Array):
        raise TypeError("num_averaged: a device array (must be a host integer)")
    if isinstance(num_averaged, np.ndarray) and num_averaged.ndim == 0:
        num_averaged = num_averaged[()]
    return require("num_averaged", num_averaged, at_least(0))


def _decay(decay: float) -> float:
    return require("decay", decay, CLOSED_UNIT.value_errors())


def get_ema_multi_avg_fn(decay: float = 0.999) -> AveragingFunction:
    """torch's EMA over lists: ``avg <- avg + (1 - decay) (current - avg)`` (``decay`` in
    [0, 1], ``ValueError`` otherwise)."""
    return AveragingFunction("ema", True, _decay(decay))


def get_swa_multi_avg_fn() -> AveragingFunction:
    """torch's running mean over lists: ``avg <- avg + (current - avg) / (n + 1)`` as a lerp
    with weight ``1 / (n + 1)``."""
    return AveragingFunction("swa", True)


def get_ema_avg_fn(decay: float = 0.999) -> AveragingFunction:
    """torch's EMA of one array: returns ``decay avg + (1 - decay) current``."""
    return AveragingFunction("ema", False, _decay(decay))


def get_swa_avg_fn() -> AveragingFunction:
    """torch's running mean of one array: returns ``avg + (current - avg) / (n + 1)``."""
    return AveragingFunction("swa", False)


# ---------------------------------------------------------------------------- AveragedParams


def _data(params: Iterable[Any], what: str) -> list[cla.Array]:
    out = []
    for i, p in enumerate(params):
        x = p if isinstance(p, cla.Array) else getattr(p, "data", None)
        if not isinstance(x, cla.Array):
            raise TypeError(f"{what}[{i}] is a {type(p).__name__}, not a Parameter")
        out.append(x)
    return out


class AveragedParams:
    """torch's ``AveragedModel`` for a list of :class:`Parameter` (or device arrays).

    ``params``: its own packed copy (one buffer per dtype) as a list of :class:`Parameter`;
    ``n_averaged``: how many updates it has averaged (a host int). The first
    :meth:`update_parameters` copies the values, each later one averages them in:

    * default (neither function): the running (SWA) mean, ``avg + (current - avg) / (n +
      1)`` (torch's rule on CPU; on CUDA torch uses the lerp of ``get_swa_multi_avg_fn``);
    * ``multi_avg_fn`` / ``avg_fn`` from :func:`get_ema_multi_avg_fn` & co.: fused (see
      :class:`AveragingFunction`);
    * any other callable: called as torch calls it (``multi_avg_fn`` once per dtype with
      lists of device arrays and ``n_averaged``; ``avg_fn`` per parameter, its result
      copied in).

    ``use_buffers`` is accepted and kept (a list of parameters has no buffers). Giving both
    functions is a ``ValueError`` (torch: an AssertionError).

    Device: an update is one launch per dtype and packed run of the given parameters (an
    optimizer's group); the first one a device copy per run. No read-back.
    """

    def __init__(
        self,
        params: Iterable[Any],
        avg_fn: Callable[..., Any] | None = None,
        multi_avg_fn: Callable[..., Any] | None = None,
        use_buffers: bool = False,
    ) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("AveragedParams: give avg_fn or multi_avg_fn, not both")
        for name, fn in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
            if fn is not None and not callable(fn):
                raise invalid(name, fn, "a callable or None", error=TypeError)
        self.use_buffers = require("use_buffers", use_buffers, BOOL)
        data = _data(list(params), "params")
        self.params = [Parameter(x) for x in (pack(data) if data else [])]
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.n_averaged = 0

    def _rule(self) -> AveragingFunction | None:
        """The fused rule, or ``None`` for a user's function."""
        fn = self.multi_avg_fn if self.multi_avg_fn is not None else self.avg_fn
        if fn is None:
            return get_swa_avg_fn()
        return fn if isinstance(fn, AveragingFunction) else None

    def update_parameters(self, params: Iterable[Any]) -> None:
        """Average the current values of ``params`` (shaped and typed like the ones given at
        construction, in the same order) in; checked first, nothing changes on an error."""
        current = _data(list(params), "params")
        mine = [p.data for p in self.params]
        if len(current) != len(mine):
            raise ValueError(
                f"update_parameters: {len(current)} params, the average holds {len(mine)}"
            )
        check_like(current, mine, "params", "the averaged params", "update_parameters")
        if mine:
            if self.n_averaged == 0:
                copy_(mine, current)
            else:
                self._average(mine, current)
        self.n_averaged += 1

    def _average(self, mine: list[cla.Array], current: list[cla.Array]) -> None:
        rule = self._rule()
        n = self.n_averaged
        if rule is not None:
            rule.average_(mine, current, n)
        elif self.multi_avg_fn is not None:
            for dtype in dict.fromkeys(x.dtype for x in mine):
                idx = [i for i, x in enumerate(mine) if x.dtype == dtype]
                self.multi_avg_fn([mine[i] for i in idx], [current[i] for i in idx], n)
        else:
            assert self.avg_fn is not None
            for avg, cur in zip(mine, current, strict=True):
                _assign(avg, self.avg_fn(avg, cur, n))

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {i: {"averaged_param": numpy array}}, "param_groups": [{"params":
        [0, ...]}], "n_averaged": n, "use_buffers": bool}`` (``no.save`` stores it)."""
        return {
            "state": {i: {"averaged_param": p.data.get()} for i, p in enumerate(self.params)},
            "param_groups": [{"params": list(range(len(self.params)))}],
            "n_averaged": self.n_averaged,
            "use_buffers": self.use_buffers,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (bit for bit); checked first."""
        if not isinstance(state_dict, Mapping) or not {"state", "n_averaged"} <= set(state_dict):
            raise ValueError("an AveragedParams state dict has 'state' and 'n_averaged'")
        n = require("n_averaged", state_dict["n_averaged"], at_least(0), "the state dict")
        state = state_dict["state"]
        if not isinstance(state, Mapping) or set(state) != set(range(len(self.params))):
            raise ValueError(
                f"the state dict's 'state' must hold one entry per parameter "
                f"(0..{len(self.params) - 1})"
            )
        values = []
        for i, p in enumerate(self.params):
            entry = state[i]
            v = entry.get("averaged_param") if isinstance(entry, Mapping) else None
            v = v.get() if isinstance(v, cla.Array) else v
            if not isinstance(v, np.ndarray) or v.shape != p.shape or v.dtype.kind not in "iuf":
                raise ValueError(
                    f"the state dict's state[{i}]['averaged_param'] does not fit the parameter "
                    f"{p.dtype}{list(p.shape)}"
                )
            values.append(v)
        for p, v in zip(self.params, values, strict=True):
            set_value(p.data, v)
        self.n_averaged = n

    def __repr__(self) -> str:
        return f"AveragedParams({len(self.params)} params, n_averaged={self.n_averaged})"


def _assign(avg: cla.Array, value: Any) -> None:
    """Write a user's ``avg_fn`` result into ``avg``."""
    if isinstance(value, cla.Array):
        if value.shape != avg.shape or value.dtype != avg.dtype:
            raise ValueError(
                f"avg_fn returned {value.dtype}{list(value.shape)} for a parameter "
                f"{avg.dtype}{list(avg.shape)}"
            )
        if value.nbytes:
            cl.enqueue_copy(avg.queue, avg.base_data, value.base_data, byte_count=value.nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                            src_offset=value.offset, dst_offset=avg.offset)  # fmt: skip
        return
    set_value(avg, np.broadcast_to(np.asarray(value), avg.shape))


# ---------------------------------------------------------------------------- SWALR


def _cosine_anneal(t: float) -> float:
    return (1 - math.cos(math.pi * t)) / 2


def _linear_anneal(t: float) -> float:
    return t


_ANNEAL = {"cos": _cosine_anneal, "linear": _linear_anneal}


class SWALR(LRScheduler):
    """torch's ``SWALR``: anneals each group's ``lr`` to ``swa_lr`` over ``anneal_epochs``
    steps (``"cos"`` or ``"linear"``), then keeps it there. torch's formula, bit for bit::

        s = steps since construction (0 at construction; max(1, s) if anneal_epochs == 0)
        t = clamp(s / max(1, anneal_epochs), 0, 1);  t' the same for s - 1
        alpha(t) = (1 - cos(pi t)) / 2  or  t
        lr0 = swa_lr if alpha(t') == 1 else (lr - alpha(t') swa_lr) / (1 - alpha(t'))
        lr <- swa_lr alpha(t) + lr0 (1 - alpha(t))

    It reads the group's current ``lr`` (not a closed form of ``last_epoch``, unlike our
    other schedulers), as torch does; it writes ``group["swa_lr"]`` into each group.

    Args:
      optimizer: the optimizer (anything with ``param_groups``).
      swa_lr: a number >= 0, or one per group.
      anneal_epochs: an integer >= 0 (default 10).
      anneal_strategy: ``"cos"`` (default) or ``"linear"``.
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: a bad argument; nothing changed.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        swa_lr: float | list[float],
        anneal_epochs: int = 10,
        anneal_strategy: str = "cos",
        last_epoch: int = -1,
    ) -> None:
        groups = lr_groups(optimizer)
        swa_lrs = per_group("swa_lr", swa_lr, len(groups), NON_NEGATIVE)
        self.anneal_strategy = require(
            "anneal_strategy", anneal_strategy, one_of("cos", "linear").value_errors()
        )
        self.anneal_epochs = require("anneal_epochs", anneal_epochs, at_least(0).value_errors())
        require("last_epoch", last_epoch, at_least(-1))
        old = [group.get("swa_lr", _ABSENT) for group in groups]
        for group, value in zip(groups, swa_lrs, strict=True):
            group["swa_lr"] = value
        self._step_count = 0
        try:
            super().__init__(optimizer, last_epoch)
        except BaseException:
            for group, value in zip(groups, old, strict=True):
                if value is _ABSENT:
                    group.pop("swa_lr", None)
                else:
                    group["swa_lr"] = value
            raise

    def step(self) -> None:
        self._step_count += 1
        try:
            super().step()
        except BaseException:
            self._step_count -= 1
            raise

    @staticmethod
    def _initial_lr(lr: float, swa_lr: float, alpha: float) -> float:
        if alpha == 1:
            return swa_lr
        return (lr - alpha * swa_lr) / (1 - alpha)

    def get_lr(self) -> list[float]:
        anneal = _ANNEAL[self.anneal_strategy]
        step = self._step_count - 1
        if self.anneal_epochs == 0:
            step = max(1, step)
        prev_alpha = anneal(max(0, min(1, (step - 1) / max(1, self.anneal_epochs))))
        alpha = anneal(max(0, min(1, step / max(1, self.anneal_epochs))))
        out = []
        for group in self.optimizer.param_groups:
            lr0 = self._initial_lr(group["lr"], group["swa_lr"], prev_alpha)
            out.append(group["swa_lr"] * alpha + lr0 * (1 - alpha))
        return out


_ABSENT = object()

__all__ = [
    "SWALR",
    "AveragedParams",
    "AveragingFunction",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
]
