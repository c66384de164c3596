"""LambdaLR: a closed form given by the user, ``lr = base_lr * lr_lambda(last_epoch)``."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Sequence
from typing import Any, cast

from .._validation import BOOL, NON_NEGATIVE, Rule, invalid, require
from ._lr_scheduler import LRScheduler, SupportsParamGroups, lr_groups


def _factor(value: Any) -> float | None:
    as_bool = BOOL.convert(value)  # a bool counts as 0 or 1
    return NON_NEGATIVE.convert(value if as_bool is None else float(as_bool))


_FACTOR = Rule("a finite number >= 0, the factor of the base lr", _factor)


def _lambda_factor(value: Any, epoch: int, group: int) -> float:
    """``value``, returned by ``lr_lambda(epoch)`` for param group ``group``, as a factor."""
    return require(f"lr_lambda({epoch})", value, _FACTOR, f"param_groups[{group}]")


class LambdaLR(LRScheduler):
    """``lr = base_lr * lr_lambda(last_epoch)``.

    Args:
      optimizer: the optimizer.
      lr_lambda: a function of the epoch returning a factor, or a list of such functions,
        one per param group.
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: a list of the wrong length. TypeError: a non-callable ``lr_lambda``.

    Every factor must be a finite real number >= 0 (a Python or numpy number, or a 0-d
    array; not a string): otherwise :meth:`step` (and construction, which performs the
    initial step) raises ``ValueError`` (negative, nan, inf) or ``TypeError`` (not a real
    number) naming the epoch, the param group and the value, and changes nothing.

    ``state_dict()`` saves the ``__dict__`` of callable objects, not plain functions or
    lambdas (as torch).
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        n = len(lr_groups(optimizer))
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise invalid("lr_lambda", lr_lambda, f"a function or a list of {n} functions")
            fns = list(lr_lambda)
        else:
            fns = [cast("Callable[[int], float]", lr_lambda)] * n
        for fn in fns:
            if not callable(fn):
                raise invalid("lr_lambda", fn, "callable", error=TypeError)
        self.lr_lambdas: list[Callable[[int], float]] = fns
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        epoch = self.last_epoch
        return [
            base * _lambda_factor(fn(epoch), epoch, i)
            for i, (fn, base) in enumerate(zip(self.lr_lambdas, self.base_lrs, strict=True))
        ]

    def state_dict(self) -> dict[str, Any]:
        state = {
            k: copy.deepcopy(v)
            for k, v in self.__dict__.items()
            if k not in ("optimizer", "lr_lambdas")
        }
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType) else copy.deepcopy(fn.__dict__)
            for fn in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", [None] * len(self.lr_lambdas))
        super().load_state_dict(state)
        for fn, attrs in zip(self.lr_lambdas, saved, strict=True):
            if attrs is not None:
                fn.__dict__.update(copy.deepcopy(attrs))
