"""Lookahead (Zhang et al., 2019, "Lookahead Optimizer: k steps forward, 1 step back"): optax's
functional ``lookahead`` (with ``LookaheadParams`` and ``LookaheadState``) and a stateful
``Lookahead`` that wraps any of our stateful optimizers (torch-optimizer's signature)."""

from __future__ import annotations

__all__ = ["Lookahead", "LookaheadParams", "LookaheadState", "lookahead"]

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyopencl.array as cla

from .._base import Fragment, GradientTransformation, OpaquePlan, OptState, as_transform
from .._packing import pack
from .._state_check import check_state, register, wrapper
from .._validation import BOOL, CLOSED_UNIT, at_least, invalid, require
from ..fusion import execute, set_value
from ..stateful._optimizer import Optimizer
from ..transforms._averaging import check_like, copy_, lerp_
from ..transforms._combining import chain, elementwise

# ---------------------------------------------------------------------------- functional

# optax's merged step (p: the fast params, u: the fast optimizer's update, slow: the slow
# params in, the slow params' update out): d = f + u - s; slow_u = a d; fast_u = u - (1-a) d
_SYNC = """
const real d = p + u - slow;
slow = slow_step_size * d;
u = u - one_minus_slow_step_size * d;
"""


class LookaheadState(NamedTuple):
    """optax's ``LookaheadState``: the fast optimizer's state and the number of fast steps
    since the last synchronisation (a host int, in ``[0, sync_period)``)."""

    fast_state: Any
    steps_since_sync: int


class LookaheadParams(NamedTuple):
    """optax's ``LookaheadParams``: the fast params (compute gradients with these) and the
    slow params (evaluate with these)."""

    fast: Any
    slow: Any

    @classmethod
    def init_synced(cls, params: Any) -> LookaheadParams:
        """Both halves ``params`` itself (optax: the same tree twice; our pure steps write
        fresh buffers, so sharing is safe until a donated step)."""
        return cls(fast=params, slow=params)


class _SlowSlot(NamedTuple):
    """The slow params, as the sync fragment's slot (in: the params, out: their update)."""

    slow: Any


def _sync_transform(slow_step_size: float) -> GradientTransformation:
    def host_step(state: _SlowSlot, **_: Any) -> tuple[tuple[float, float], _SlowSlot]:
        return (slow_step_size, 1.0 - slow_step_size), state

    fragment = Fragment(
        "lookahead_sync",
        _SYNC,
        slots=("slow",),
        scalars=("slow_step_size", "one_minus_slow_step_size"),
        host_step=host_step,
        needs_params=True,
    )
    return elementwise(fragment, init=_SlowSlot)


# between syncs: the fast update passes, the slow params' update is zero
_HOLD = elementwise(Fragment("lookahead_hold", "slow = 0;", slots=("slow",)), init=_SlowSlot)


def _lookahead_params(params: Any) -> LookaheadParams:
    if params is None or not hasattr(params, "fast") or not hasattr(params, "slow"):
        raise ValueError(
            "lookahead needs params: call update(updates, state, params) with "
            f"LookaheadParams(fast, slow), not {type(params).__name__}"
        )
    check_like(params.fast, params.slow, "params.fast", "params.slow", "lookahead")
    return params


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: float,
    reset_state: bool = False,
) -> GradientTransformation:
    """optax's Lookahead wrapper (same signature and semantics). Params are
    :class:`LookaheadParams`; compute the gradients at ``params.fast``::

        u <- fast_optimizer(g);   t <- steps_since_sync
        not a sync step (t < sync_period - 1):  fast_u = u;  slow_u = 0
        sync step:  d = fast + u - slow;  slow_u = a d;  fast_u = u - (1 - a) d

    so that ``apply_updates`` gives ``slow' = slow + a (fast + u - slow)`` and ``fast' ~=
    slow'`` every ``sync_period`` steps (``a = slow_step_size``). ``reset_state``: the fast
    optimizer's state restarts (its ``init`` at ``params.fast``) after each sync. ``init``
    takes ``LookaheadParams`` or the fast params alone (optax too).

    As optax, the fast params after a sync are ``fast + fast_u``, equal to the slow params
    up to rounding (an ulp or so); the stateful :class:`Lookahead` copies them (``fast =
    slow`` exactly), so the two agree bit for bit on the slow params and up to rounding on
    the fast ones after the first sync.

    Device: the fast optimizer's step and the sync are one fused kernel when the fast
    optimizer is fusible (one launch per dtype for packed trees); whether a step syncs is
    decided on the host from ``steps_since_sync`` (no read-back).
    """
    period = require("sync_period", sync_period, at_least(1))
    a = require("slow_step_size", slow_step_size, CLOSED_UNIT)
    reset = require("reset_state", reset_state, BOOL)
    fast = as_transform(fast_optimizer, "lookahead: fast_optimizer")
    with_sync = chain(fast, _sync_transform(a))
    without_sync = chain(fast, _HOLD)

    def init(params: Any) -> LookaheadState:
        fast_params = getattr(params, "fast", None)
        return LookaheadState(fast.init(params if fast_params is None else fast_params), 0)

    def update(
        updates: Any, state: LookaheadState, params: Any = None, **extra_args: Any
    ) -> tuple[LookaheadParams, OptState]:
        check_state(tx, state)
        params = _lookahead_params(params)
        check_like(updates, params.fast, "updates", "params.fast", "lookahead")
        sync = state.steps_since_sync == period - 1
        combined = with_sync if sync else without_sync
        fast_updates, (fast_state, slot) = execute(
            combined,
            updates,
            (state.fast_state, _SlowSlot(params.slow)),
            params.fast,
            apply=False,
            inplace=False,
            extra_args=extra_args,
        )
        if sync and reset:
            fast_state = fast.init(params.fast)
        steps = (state.steps_since_sync + 1) % period
        return LookaheadParams(fast_updates, slot.slow), LookaheadState(fast_state, steps)

    tx = GradientTransformation(init, update, OpaquePlan("lookahead", (fast,)))
    return register(tx, wrapper(LookaheadState, "fast_state", fast))


# ---------------------------------------------------------------------------- stateful


class Lookahead:
    """Lookahead around a stateful optimizer (torch-optimizer's ``Lookahead(optimizer, k=5,
    alpha=0.5)``, with the paper's schedule)::

        every step: the inner optimizer's step (the fast params)
        every k-th step:  slow <- slow + alpha (fast - slow);  fast <- slow

    The slow params start as a copy of the params (at construction; for a group added later,
    at :meth:`add_param_group`). ``k >= 1``; ``alpha`` in [0, 1] (1: the inner optimizer
    alone). ``param_groups`` (and ``state``, ``defaults``'s keys but ``k`` and ``alpha``)
    are the inner optimizer's, so LR schedulers drive it directly.

    Differences: torch-optimizer 0.3.0 syncs at steps 1, k+1, 2k+1, ... and makes its slow
    copy from the params after the first step (that first sync changes nothing), and it
    writes ``fast = alpha fast + (1 - alpha) slow`` (the same value up to rounding). optax's
    :func:`lookahead` syncs at steps k, 2k, ... as here, with the same slow params bit for
    bit; its fast params after a sync differ from the slow ones by rounding (see there).

    ``state_dict()`` is the inner optimizer's with a ``"lookahead"`` entry: ``k``,
    ``alpha``, ``steps_since_sync`` and ``slow`` (index -> numpy array, indices counting
    the parameters across groups as in ``"state"``); :meth:`load_state_dict` restores all of
    it, bit for bit, after checking everything (nothing changes on an error).

    Device: the inner step's launches; on a sync step, one launch per group and dtype (the
    slow update) and one device copy per group and dtype (``fast <- slow``). No read-back.
    """

    def __init__(self, optimizer: Any, k: int = 5, alpha: float = 0.5) -> None:
        _check_optimizer(optimizer)
        self.k = require("k", k, at_least(1))
        self.alpha = require("alpha", alpha, CLOSED_UNIT)
        self.optimizer = optimizer
        self.steps_since_sync = 0
        self._slow: list[list[cla.Array]] = [_copy_of(g) for g in optimizer.param_groups]

    # ------------------------------------------------------------------ torch's surface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, **self.optimizer.defaults}

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    @property
    def slow_params(self) -> list[cla.Array]:
        """The slow params, one device array per parameter (groups in order): evaluate with
        these. Live views: the next sync changes them."""
        return [x for group in self._slow for x in group]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """The inner optimizer's ``add_param_group``; the new group's slow params start as
        a copy of its params."""
        self.optimizer.add_param_group(param_group)
        self._slow.append(_copy_of(self.optimizer.param_groups[-1]))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The inner optimizer's step (returns its result), then every ``k``-th step the
        sync. An error in the inner step changes nothing here."""
        loss = self.optimizer.step(closure)
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.k:
            self._sync()
            self.steps_since_sync = 0
        return loss

    def _sync(self) -> None:
        for group, slow in zip(self.optimizer.param_groups, self._slow, strict=True):
            fast = [p.data for p in group["params"]]
            if fast:
                lerp_(slow, fast, self.alpha)
                copy_(fast, slow)

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"lookahead"`` (see the class)."""
        out = self.optimizer.state_dict()
        out["lookahead"] = {
            "k": self.k,
            "alpha": self.alpha,
            "steps_since_sync": self.steps_since_sync,
            "slow": {i: x.get() for i, x in enumerate(self.slow_params)},
        }
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`: the inner optimizer's part and the slow params, the
        step counter, ``k`` and ``alpha``. Everything is checked first (``ValueError``,
        nothing changed)."""
        if not isinstance(state_dict, Mapping) or "lookahead" not in state_dict:
            raise ValueError("a Lookahead state dict has a 'lookahead' entry")
        k, alpha, steps, slow = self._checked(state_dict["lookahead"])
        self.optimizer.load_state_dict({k_: v for k_, v in state_dict.items() if k_ != "lookahead"})
        for x, value in zip(self.slow_params, slow, strict=True):
            set_value(x, value)
        self.k, self.alpha, self.steps_since_sync = k, alpha, steps

    def _checked(self, entry: Any) -> tuple[int, float, int, list[np.ndarray]]:
        where = "the state dict's 'lookahead'"
        if not isinstance(entry, Mapping) or not {"k", "alpha", "steps_since_sync", "slow"} <= set(
            entry
        ):
            raise ValueError(f"{where} needs k, alpha, steps_since_sync and slow")
        k = require("k", entry["k"], at_least(1), where)
        alpha = require("alpha", entry["alpha"], CLOSED_UNIT, where)
        steps = require("steps_since_sync", entry["steps_since_sync"], at_least(0), where)
        if steps >= k:
            raise invalid("steps_since_sync", steps, f"< k = {k}", where)
        slow = entry["slow"]
        params = self.slow_params
        if not isinstance(slow, Mapping) or set(slow) != set(range(len(params))):
            raise ValueError(
                f"{where}['slow'] must hold one array per parameter (0..{len(params) - 1})"
            )
        values = []
        for i, x in enumerate(params):
            v = slow[i]
            v = v.get() if isinstance(v, cla.Array) else np.asarray(v)
            if v.shape != x.shape or v.dtype.kind not in "iuf":
                raise ValueError(
                    f"{where}['slow'][{i}] is {v.dtype}{list(v.shape)}; the parameter is "
                    f"{x.dtype}{list(x.shape)}"
                )
            values.append(v)
        return k, alpha, steps, values

    def __repr__(self) -> str:
        return f"Lookahead (k: {self.k}, alpha: {self.alpha},\n{self.optimizer!r}\n)"


_OPTIMIZER_API = ("param_groups", "step", "zero_grad", "state_dict", "load_state_dict")


def _check_optimizer(optimizer: Any) -> None:
    """A stateful optimizer: ours (an :class:`Optimizer`, ``ZeroRedundancyOptimizer``) or
    anything with their methods and param groups of parameters."""
    if isinstance(optimizer, Optimizer):
        return
    if all(hasattr(optimizer, name) for name in _OPTIMIZER_API) and isinstance(
        optimizer.param_groups, list
    ):
        return
    raise TypeError(
        f"Lookahead wraps a netcl_optim stateful optimizer, not {type(optimizer).__name__}"
    )


def _copy_of(group: Mapping[str, Any]) -> list[cla.Array]:
    """A packed copy of a param group's values (one buffer per dtype)."""
    data = [p.data for p in group["params"]]
    return pack(data) if data else []
