"""Optimizer: torch.optim's stateful contract over the functional chains, run in place.

Each param group keeps its parameters packed (one buffer per dtype), its optimizer state as
named packed buffers (torch's key names: ``exp_avg``, ``momentum_buffer``, ...) and a host
step count per parameter. A step builds (and caches) the group's functional chain from its
hyperparameters, assembles the chain's state from the buffers and the counts, and runs
:func:`netcl_optim.transforms._update.step_`: one fused kernel launch per group and dtype.
"""

from __future__ import annotations

import abc
import copy
import math
import numbers
import operator
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyopencl.array as cla

from .._base import GradientTransformation
from .._device import check_float_dtype, queue_of, state_dtype
from .._packing import (
    DONATED,
    Block,
    DonatedArray,
    DonatedArrayError,
    c_strides,
    contiguous_run,
    first_shared,
    layout,
    pack,
    same_memory,
)
from .._validation import ScheduledValue
from ..transforms._adaptive import ScaleByAdamState, ScaleByRmsState, ScaleByRStdDevState
from ..transforms._momentum import TraceState
from ..transforms._update import step_

# (functional state type, slot field) -> torch's state key
_SLOT_KEYS: dict[tuple[type, str], str] = {
    (TraceState, "trace"): "momentum_buffer",
    (ScaleByAdamState, "mu"): "exp_avg",
    (ScaleByAdamState, "nu"): "exp_avg_sq",
    (ScaleByRmsState, "nu"): "square_avg",
    (ScaleByRStdDevState, "nu"): "square_avg",
    (ScaleByRStdDevState, "mu"): "grad_avg",
}

# torch implementation flags: dropped on load when they do not change the maths
_TORCH_FLAGS_IGNORED = ("foreach", "differentiable", "fused", "capturable", "param_names")
_TORCH_FLAGS_FALSE = ("maximize", "amsgrad")

_PLAN_CACHE_SIZE = 32


def _is_param(p: Any) -> bool:
    return hasattr(p, "data") and hasattr(p, "grad") and not isinstance(p, (cla.Array, Mapping))


def _slot_key(cls: type, field: str) -> str:
    key = _SLOT_KEYS.get((cls, field))
    if key is None:
        raise TypeError(f"stateful optimizers do not know the state slot {cls.__name__}.{field}")
    return key


def _slot_keys(template: Any) -> list[str]:
    """torch names of the slots in a state ``template`` (from ``tx.init([])``), in order."""
    keys: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            for f in node._fields:
                v = getattr(node, f)
                if isinstance(v, list):
                    k = _slot_key(type(node), f)
                    if k not in keys:
                        keys.append(k)
                else:
                    walk(v)
        elif isinstance(node, (tuple, list)):
            for c in node:
                walk(c)
        elif isinstance(node, dict):
            for c in node.values():
                walk(c)

    walk(template)
    return keys


def _assemble(node: Any, slots: Mapping[str, list], counts: Mapping[str | None, int]) -> Any:
    """The chain's state for a cohort: the template's slot lists replaced by the cohort's
    buffers, its counts by the cohort's counts (a state's ``count`` is the count of its first
    slot's buffer, or the torch step count for a state without slots)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        own = [_slot_key(cls, f) for f in node._fields if isinstance(getattr(node, f), list)]
        values = []
        for f in node._fields:
            v = getattr(node, f)
            if isinstance(v, list):
                values.append(slots[_slot_key(cls, f)])
            elif f == "count":
                values.append(counts[own[0] if own else None])
            else:
                values.append(_assemble(v, slots, counts))
        return cls(*values)
    if isinstance(node, tuple):
        return tuple(_assemble(c, slots, counts) for c in node)
    if isinstance(node, dict):
        return {k: _assemble(v, slots, counts) for k, v in node.items()}
    return node


def with_lr(
    factory: Callable[..., GradientTransformation], lr: Any, *args: Any
) -> GradientTransformation:
    """``factory(lr, *args)``, also for ``lr == 0``: a group's lr was validated when set, and
    a scheduler may drive it to 0 (a warmup's start), which the aliases accept from a
    :class:`ScheduledValue`."""
    return factory(ScheduledValue(float(lr)), *args)


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


# ---------------------------------------------------------------------------- validators


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.generic)):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def check_lr(lr: Any, prefix: str = "", positive: bool = True) -> None:
    f = _number(lr)
    if f is None or not math.isfinite(f) or (f <= 0 if positive else f < 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{prefix}Invalid learning rate (lr): {lr!r}; must be a finite number {need}"
        )


def check_eps(eps: Any, prefix: str = "") -> None:
    f = _number(eps)
    if f is None or not (0 < f < math.inf):
        raise ValueError(
            f"{prefix}Invalid epsilon value (eps): {eps!r}; must be a finite number > 0"
        )


def check_non_negative(name: str, value: Any, prefix: str = "") -> None:
    f = _number(value)
    if f is None or not (0 <= f < math.inf):
        raise ValueError(f"{prefix}Invalid {name} value: {value!r}; must be a finite number >= 0")


def check_unit(name: str, value: Any, prefix: str = "") -> None:
    f = _number(value)
    if f is None or not (0 <= f < 1):
        raise ValueError(f"{prefix}Invalid {name} value: {value!r}; must be in [0, 1)")


def check_bool(name: str, value: Any, prefix: str = "") -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{prefix}Invalid {name} value: {value!r}; must be a bool")


def check_betas(betas: Any, prefix: str = "") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{prefix}Invalid betas: {betas!r}; must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        f = _number(b)
        if f is None or not (0 <= f < 1):
            raise ValueError(f"{prefix}Invalid beta parameter at index {i}: {b!r}")


# ---------------------------------------------------------------------------- param groups


_NONE_TYPE = type(None)


class _Group:
    """Internal record of one param group: packed views, per-param counts, named buffers."""

    def __init__(self, params: list[Any], queue: Any) -> None:
        n = len(params)
        self.params = params
        self.queue = queue
        self.data = [p.data for p in params]  # the packed views: identity is the fast check
        self.shapes = [d.shape for d in self.data]
        self.dtypes = [d.dtype for d in self.data]
        self.strides = [
            c_strides(s, d.itemsize) for s, d in zip(self.shapes, self.dtypes, strict=True)
        ]
        self.context = self.data[0].context if n else None
        self.steps = [0] * n
        self.counts: dict[str, list[int]] = {}
        self.bufs: dict[str, list[cla.Array]] = {}
        self.blocks: dict[str, list[Block]] = {}
        self.grad_views: list[cla.Array] | None = None
        self.grad_blocks: list[Block] = []

    def _allocate(self, dtype_of: Callable[[np.dtype], np.dtype]) -> tuple[list, list[Block]]:
        """Zeroed views packed per dtype, and the packed block of each dtype."""
        views: list[Any] = [None] * len(self.params)
        blocks = []
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, d in enumerate(self.dtypes):
            by_dtype.setdefault(d, []).append(i)
        for dtype, idx in by_dtype.items():
            lay = layout(tuple(self.shapes[i] for i in idx), dtype_of(dtype))
            block = lay.allocate(self.queue)
            block.fill(self.queue, 0)
            blocks.append(block)
            for i, v in zip(idx, block.views, strict=True):
                views[i] = v
        return views, blocks

    def ensure(self, key: str) -> None:
        """Create the zeroed state buffer ``key`` (packed per dtype) if it is missing."""
        if key not in self.bufs:
            self.bufs[key], self.blocks[key] = self._allocate(state_dtype)
            self.counts[key] = [0] * len(self.params)

    def ensure_grads(self) -> None:
        if self.grad_views is None:
            self.grad_views, self.grad_blocks = self._allocate(lambda d: d)

    def reset(self) -> None:
        """Forget all state (counts 0, buffers zeroed, as freshly created)."""
        self.steps = [0] * len(self.params)
        for key, blocks in self.blocks.items():
            self.counts[key] = [0] * len(self.params)
            for block in blocks:
                block.fill(self.queue, 0)

    def has_state(self, i: int) -> bool:
        return self.steps[i] > 0 or any(c[i] for c in self.counts.values())

    def cohorts(self, members: list[int], keys: list[str]) -> list[list[int]]:
        """``members`` grouped by their counts (normally one cohort: the whole group)."""
        columns = [self.steps] + [self.counts[k] for k in keys]
        if len(members) == len(self.params) and all(min(c) == max(c) for c in columns):
            return [members]
        by: dict[tuple[int, ...], list[int]] = {}
        for i in members:
            by.setdefault(tuple(c[i] for c in columns), []).append(i)
        return list(by.values())


def _check_unshared(groups: list[list[Any]]) -> None:
    """Raise ``ValueError`` naming two parameters whose ``.data`` share memory (tied weights,
    overlapping views): each parameter gets its own in-place update, so shared memory would
    be written twice, with two states. ``groups``: the ``.data`` of each group's parameters
    (anything but a live device array is skipped)."""
    found = [
        [
            (i, d)
            for i, d in enumerate(arrays)
            if isinstance(d, cla.Array) and type(d) is not DonatedArray
        ]
        for arrays in groups
    ]
    pair = first_shared([([d for _, d in f], True) for f in found])
    if pair is None:
        return
    (ga, ja), (gb, jb) = pair
    (ia, a), (ib, b) = found[ga][ja], found[gb][jb]
    names = f"param_groups[{ga}]['params'][{ia}] and param_groups[{gb}]['params'][{ib}]"
    if same_memory(a, b):
        raise ValueError(
            f"{names} are one array (tied weights): the optimizer would step it twice, with "
            "two states. Pass the shared parameter once and accumulate both gradients into "
            "its .grad (as torch's autograd does for a shared weight)"
        )
    raise ValueError(
        f"{names} overlap in memory (views of one buffer): each parameter needs memory of "
        "its own, as the optimizer updates each in place"
    )


def _as_param_groups(params: Any) -> list[Mapping[str, Any]]:
    what = "params argument given to the optimizer should be an iterable of parameters or dicts"
    if isinstance(params, cla.Array) or _is_param(params):
        raise TypeError(f"{what}, but got a single {type(params).__name__}: pass a list")
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{what}, but got a set, whose order changes between runs: use a list")
    if isinstance(params, Mapping):
        raise TypeError(f"{what}, but got a dict: pass a list of param group dicts")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{what}, but got {type(params).__name__}") from None
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(items[0], Mapping):
        return [{"params": items}]
    for j, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"{what}: item {j} is a {type(item).__name__} among param groups")
    return items


class Optimizer(abc.ABC):
    """Base class of the stateful optimizers (torch.optim's contract).

    Subclasses set ``_hyper`` (the group keys the chain depends on), ``_state_keys`` (torch
    state keys, in torch's order), ``_required_keys``, ``_has_step`` (whether torch keeps
    ``"step"``) and implement ``_build(group)`` (the functional alias) and
    ``_validate(group, prefix, positive_lr)``.

    Args:
      params: an iterable (list, generator) of parameters (objects with ``.data`` and
        ``.grad`` device arrays, e.g. :class:`Parameter`) or of param group dicts
        (``{"params": [...], "lr": ..., ...}``; missing keys come from ``defaults``).
      defaults: the hyperparameters of a group that does not set them.

    Packing: each group's parameters are copied into one contiguous buffer per dtype and
    their ``.data`` rebound to views there (values unchanged; arrays that already lie back to
    back are kept). The optimizer state is packed the same way, so a step of a group whose
    grads are packed too (see :meth:`zero_grad`) is one kernel launch per dtype.

    Shared memory is an error (``ValueError`` naming both parameters, nothing changed): two
    parameters over one array (tied weights) or over overlapping views of one buffer, in one
    group or in two, at construction, in :meth:`add_param_group`, and at a step after a
    ``.data`` was rebound. Each parameter has its own update and state, so a shared array
    would be stepped twice (torch does that silently, and warns that a parameter given twice
    will become an error). For tied weights pass the shared parameter once and accumulate
    the gradients of all its uses into its ``.grad``: one update with the summed gradient,
    as torch's autograd gives a weight used twice. One parameter object twice is refused too.
    """

    _hyper: tuple[str, ...] = ()
    _state_keys: tuple[str, ...] = ()
    _required_keys: tuple[str, ...] = ()
    _has_step: bool = True
    _decoupled: bool | None = None  # torch's Adam/AdamW flag, for the Adam family

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.defaults: dict[str, Any] = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._groups: list[_Group] = []
        self._ids: set[int] = set()
        self._context: Any = None
        self._plans: OrderedDict[tuple, tuple[GradientTransformation, Any, list[str]]] = (
            OrderedDict()
        )
        for group in _as_param_groups(params):
            self.add_param_group(group)

    # ------------------------------------------------------------------ subclass hooks

    @abc.abstractmethod
    def _build(self, group: Mapping[str, Any]) -> GradientTransformation:
        """The functional optimizer (an ``_alias`` chain) for the group's hyperparameters."""

    @abc.abstractmethod
    def _validate(self, group: Mapping[str, Any], prefix: str, positive_lr: bool) -> None:
        """Raise ValueError naming the first invalid hyperparameter of ``group``."""

    def _normalize(self, group: dict[str, Any]) -> dict[str, Any]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        return group

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group: ``{"params": [...], <hyperparameter>: value, ...}``; keys it does not
        set come from ``defaults``. Its parameters are packed (``.data`` re-homed)."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params'")
        gi = len(self.param_groups)
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, (cla.Array,)) or _is_param(params):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of parameters in sets changes between runs: use a list"
            )
        else:
            try:
                params = list(params)
            except TypeError:
                raise TypeError(
                    f"param_groups[{gi}]['params'] must be an iterable of parameters, got "
                    f"{type(params).__name__}"
                ) from None
        seen: set[int] = set()
        for j, p in enumerate(params):
            if isinstance(p, cla.Array):
                raise TypeError(
                    f"param_groups[{gi}]['params'][{j}] is a bare pyopencl Array: wrap it in "
                    "netcl_optim.Parameter (an object with .data and .grad)"
                )
            if not _is_param(p):
                raise TypeError(
                    f"optimizer can only optimize objects with .data and .grad (e.g. "
                    f"Parameter), but param_groups[{gi}]['params'][{j}] is a "
                    f"{type(p).__name__}"
                )
            if not isinstance(p.data, cla.Array):
                raise TypeError(
                    f"param_groups[{gi}]['params'][{j}].data is a {type(p.data).__name__}, "
                    "not a pyopencl.array.Array"
                )
            if type(p.data) is DonatedArray:
                raise DonatedArrayError(f"param_groups[{gi}]['params'][{j}].data {DONATED}")
            if id(p) in seen:
                raise ValueError(f"param_groups[{gi}]['params'][{j}] appears twice in the group")
            seen.add(id(p))
        if seen & self._ids:
            raise ValueError("some parameters appear in more than one parameter group")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        group = self._normalize(group)
        self._validate(group, f"param_groups[{gi}]: " if gi else "", True)

        arrays = [p.data for p in params]
        queue = queue_of(arrays)
        context = self._context if self._context is not None else queue.context
        for j, d in enumerate(arrays):
            if d.context != context or queue.context != context:
                raise ValueError(
                    f"param_groups[{gi}]['params'][{j}] belongs to another OpenCL context than "
                    "the optimizer's other parameters"
                )
            check_float_dtype(d.dtype, queue, f"param_groups[{gi}]['params'][{j}]")
            if not d.flags.c_contiguous:
                raise ValueError(f"param_groups[{gi}]['params'][{j}].data is not C-contiguous")
        _check_unshared([[p.data for p in rec.params] for rec in self._groups] + [arrays])

        # pack: one buffer per dtype, unless the arrays already lie back to back
        by_dtype: dict[np.dtype, list[int]] = {}
        for j, d in enumerate(arrays):
            by_dtype.setdefault(d.dtype, []).append(j)
        for idx in by_dtype.values():
            xs = [arrays[j] for j in idx]
            if contiguous_run(xs) is not None:
                continue
            for j, view in zip(idx, pack(xs, queue), strict=True):
                arrays[j] = view
        originals = [p.data for p in params]
        for p, d in zip(params, arrays, strict=True):
            if p.data is not d:
                try:
                    p.data = d
                except AttributeError:
                    for q, original in zip(params, originals, strict=True):
                        if q is p:
                            break
                        q.data = original  # as they were: nothing changed on error
                    raise TypeError(
                        f"cannot rebind .data of a {type(p).__name__}: the optimizer packs "
                        "its parameters' data"
                    ) from None

        self._context = context
        rec = _Group(params, queue)
        group["params"] = list(rec.params)
        self.param_groups.append(group)
        self._groups.append(rec)
        self._ids |= seen

    @property
    def lr(self) -> float:
        """The learning rate of group 0; setting it sets every group's ``"lr"``."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        check_lr(value, positive=False)
        for group in self.param_groups:
            group["lr"] = value

    # ------------------------------------------------------------------ step

    def _plan(
        self, group: Mapping[str, Any], gi: int
    ) -> tuple[GradientTransformation, Any, list[str]]:
        """The group's chain (cached by its hyperparameters), state template and slot keys."""
        try:
            key = tuple(_freeze(group[k]) for k in self._hyper)
        except KeyError as err:
            raise ValueError(f"param_groups[{gi}] has no {err.args[0]!r}") from None
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        check_lr(group["lr"], f"param_groups[{gi}]: ", positive=False)
        try:
            tx = self._build(group)
        except (ValueError, TypeError) as err:
            raise type(err)(f"param_groups[{gi}]: {err}") from None
        template = tx.init([])
        plan = (tx, template, _slot_keys(template))
        self._plans[key] = plan
        if len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    @staticmethod
    def _members_fast(rec: _Group) -> list[int] | None:
        """The common case of :meth:`_members` as list comparisons: every param has a grad,
        ``.data`` is still the packed view, and every grad is a C-contiguous device array
        shaped, typed and placed like its param. ``None``: check one by one."""
        params = rec.params
        grads = [p.grad for p in params]
        if _NONE_TYPE in set(map(type, grads)):
            return None
        if not all(map(operator.is_, [p.data for p in params], rec.data)):
            return None
        try:
            if [g.shape for g in grads] != rec.shapes or [g.dtype for g in grads] != rec.dtypes:
                return None
            if [g.strides for g in grads] != rec.strides:
                return None
            contexts = [g.context for g in grads]
        except (AttributeError, DonatedArrayError):
            return None
        if contexts.count(rec.context) != len(contexts):
            return None
        return list(range(len(params)))

    def _members(self, group: Mapping[str, Any], rec: _Group, gi: int) -> list[int]:
        """Indices of the group's params with a grad, all checked (raises before any launch)."""
        params = group["params"]
        if len(params) != len(rec.params) or any(
            a is not b for a, b in zip(params, rec.params, strict=True)
        ):
            raise ValueError(
                f"param_groups[{gi}]['params'] was changed: use add_param_group to add parameters"
            )
        fast = self._members_fast(rec)
        if fast is not None:
            return fast
        members = []
        views = rec.grad_views
        rebound = False
        for i, p in enumerate(rec.params):
            g = p.grad
            if g is None:
                continue
            members.append(i)
            d = p.data
            if d is rec.data[i] and views is not None and g is views[i]:
                continue  # packed data and packed grad: checked when they were made
            rebound = rebound or d is not rec.data[i]
            where = f"parameter {i} of param group {gi}"
            bad: BaseException | None = None
            if type(d) is DonatedArray or type(g) is DonatedArray:
                which = "data" if type(d) is DonatedArray else "grad"
                bad = DonatedArrayError(f"{where}: .{which} {DONATED}")
            elif not isinstance(d, cla.Array):
                bad = TypeError(f"{where}: .data is a {type(d).__name__}, not a device array")
            elif d.shape != rec.shapes[i]:
                bad = ValueError(
                    f"{where}: .data has shape {d.shape}, but the optimizer has {rec.shapes[i]}"
                )
            elif d.dtype != rec.dtypes[i]:
                bad = TypeError(
                    f"{where}: .data has dtype {d.dtype}, but the optimizer has {rec.dtypes[i]}"
                )
            elif d.context != rec.context:
                bad = ValueError(f"{where}: .data belongs to another OpenCL context")
            elif not d.flags.c_contiguous:
                bad = ValueError(f"{where}: .data is not C-contiguous")
            elif not isinstance(g, cla.Array):
                bad = TypeError(
                    f"{where}: .grad is a {type(g).__name__}, not a pyopencl.array.Array"
                )
            elif g.context != d.context:
                bad = ValueError(f"{where}: .grad belongs to another OpenCL context than .data")
            elif g.shape != d.shape:
                bad = ValueError(f"{where}: .grad has shape {g.shape}, but .data has {d.shape}")
            elif g.dtype != d.dtype:
                bad = TypeError(f"{where}: .grad has dtype {g.dtype}, but .data has {d.dtype}")
            elif not g.flags.c_contiguous:
                bad = ValueError(f"{where}: .grad is not C-contiguous")
            if bad is not None:
                raise bad
        if rebound:  # a .data set since the packing: it must not share memory either
            _check_unshared([[p.data for p in r.params] for r in self._groups])
        return members

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter whose ``.grad`` is not ``None``; returns
        ``closure()`` (called first) or ``None``.

        Everything is checked before anything is launched: a bad grad or hyperparameter
        raises with no parameter modified. Parameters without a grad are skipped and their
        step counts do not advance (torch).

        Device:
          One fused kernel launch per param group and dtype when the group's grads are packed
          (one per parameter otherwise; one more set per distinct step count, which happens
          only when some parameters skipped steps). No host sync, no allocation after the
          first step.
        """
        loss = None
        if closure is not None:
            loss = closure()
        work = []
        for gi, (group, rec) in enumerate(zip(self.param_groups, self._groups, strict=True)):
            members = self._members(group, rec, gi)
            if members:
                work.append((rec, members, self._plan(group, gi)))
        for rec, members, (tx, template, keys) in work:
            for k in keys:
                rec.ensure(k)
            for cohort in rec.cohorts(members, keys):
                self._run(rec, cohort, tx, template, keys)
        return loss

    @staticmethod
    def _run(
        rec: _Group, cohort: list[int], tx: GradientTransformation, template: Any, keys: list[str]
    ) -> None:
        i0 = cohort[0]
        counts: dict[str | None, int] = {None: rec.steps[i0]}
        for k in keys:
            counts[k] = rec.counts[k][i0]
        if len(cohort) == len(rec.params):
            slots = {k: rec.bufs[k] for k in keys}
            params = [p.data for p in rec.params]
            grads = [p.grad for p in rec.params]
            step_(tx, params, grads, _assemble(template, slots, counts))
            rec.steps = [s + 1 for s in rec.steps]
            for k in keys:
                rec.counts[k] = [c + 1 for c in rec.counts[k]]
            return
        slots = {k: [rec.bufs[k][i] for i in cohort] for k in keys}
        params = [rec.params[i].data for i in cohort]
        grads = [rec.params[i].grad for i in cohort]
        step_(tx, params, grads, _assemble(template, slots, counts))
        for i in cohort:
            rec.steps[i] += 1
            for k in keys:
                rec.counts[k][i] += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set every grad to ``None`` (default), or zero it on the device.

        With ``set_to_none=False`` every parameter's ``.grad`` becomes its view in the group's
        packed gradient buffer (created on first use), filled with zeros: one fill per group
        and dtype, no host round trip. Grads written in place there stay packed, so the next
        step is one launch. Unlike torch, a ``None`` grad also gets a zeroed buffer, so that
        parameter takes part in the next step.
        """
        for rec in self._groups:
            if set_to_none:
                for p in rec.params:
                    p.grad = None
                continue
            rec.ensure_grads()
            assert rec.grad_views is not None
            for p, v in zip(rec.params, rec.grad_views, strict=True):
                if p.grad is not v:
                    p.grad = v
            for block in rec.grad_blocks:
                block.fill(rec.queue, 0)

    # ------------------------------------------------------------------ state

    def _param_state(self, rec: _Group, i: int, host: bool) -> dict[str, Any]:
        if not rec.has_state(i):
            return {}
        entry: dict[str, Any] = {}
        if self._has_step:
            entry["step"] = float(rec.steps[i])
        for k in self._state_keys:
            counts = rec.counts.get(k)
            if counts is not None and counts[i] > 0:
                v = rec.bufs[k][i]
                entry[k] = v.get() if host else v
        return entry

    @property
    def state(self) -> defaultdict[Any, dict[str, Any]]:
        """A torch-like view: parameter -> {torch key: device array (a view of the packed
        state, live), or ``"step"``: float}; parameters without state are absent."""
        out: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for rec in self._groups:
            for i, p in enumerate(rec.params):
                entry = self._param_state(rec, i, host=False)
                if entry:
                    out[p] = entry
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {key: numpy array or "step": float}},
        "param_groups": [{hyperparameters..., "params": [index, ...]}]}``; indices count
        parameters across groups in order; parameters without state are absent.

        The class is recorded, so that :meth:`load_state_dict` of another class refuses it:
        ``"optimizer": "AdamW"`` (ignored by torch), and in Adam's and AdamW's groups torch's
        ``"decoupled_weight_decay"`` flag (False and True).

        Device: one read-back per state array (a host sync).
        """
        state: dict[int, dict[str, Any]] = {}
        groups = []
        start = 0
        for group, rec in zip(self.param_groups, self._groups, strict=True):
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            if self._decoupled is not None:
                packed["decoupled_weight_decay"] = self._decoupled
            n = len(rec.params)
            packed["params"] = list(range(start, start + n))
            for i in range(n):
                entry = self._param_state(rec, i, host=True)
                if entry:
                    state[start + i] = entry
            groups.append(packed)
            start += n
        return {"state": state, "param_groups": groups, "optimizer": type(self).__name__}

    def _check_origin(self, state_dict: Mapping[str, Any], groups: list[Mapping[str, Any]]) -> None:
        """Refuse the state dict of another optimizer class, naming both.

        Ours name their class. torch's (and ours saved before the name was) are told apart
        by their hyperparameter names and Adam/AdamW's ``decoupled_weight_decay`` flag; torch
        has no Momentum: its SGD dicts load into Momentum when undampened (the same maths;
        Momentum's validation refuses a dampening).
        """
        name = type(self).__name__
        origin = state_dict.get("optimizer")
        if origin is not None and not isinstance(origin, str):
            raise ValueError(
                f"loaded state dict has an invalid 'optimizer' entry: {origin!r} (must be the "
                "name of the optimizer class that saved it)"
            )
        if origin is not None and origin != name:
            raise ValueError(
                f"loaded state dict is {origin}'s, not {name}'s: load it into the class that "
                f"saved it ({origin})"
            )
        classes = _optimizer_classes()
        known = {k for cls in classes for k in cls._hyper}
        for gi, saved in enumerate(groups):
            keys = set(saved) & known
            flag = saved.get("decoupled_weight_decay")
            flag = None if flag is None else bool(flag)
            if (flag is None or flag == self._decoupled) and (
                origin is not None or keys <= set(self._hyper)
            ):
                continue
            like = sorted(  # the classes with exactly these hyperparameters (and flag)
                {
                    c.__name__
                    for c in classes
                    if set(c._hyper) == keys and flag in (None, c._decoupled)
                }
            )
            what = f"hyperparameters {sorted(keys)}"
            if flag is not None:
                what += f", decoupled_weight_decay={flag}"
            whose = " or ".join(f"{n}'s" for n in like) or "another optimizer's"
            raise ValueError(f"loaded param_groups[{gi}] is {whose}, not {name}'s ({what})")

    def _import_group(self, saved: Mapping[str, Any], gi: int) -> dict[str, Any]:
        prefix = f"loaded param_groups[{gi}]: "
        group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
        for k in _TORCH_FLAGS_IGNORED:
            group.pop(k, None)
        for k in _TORCH_FLAGS_FALSE:
            if group.pop(k, False):
                raise ValueError(f"{prefix}{k}=True is not supported by {type(self).__name__}")
        group.pop("decoupled_weight_decay", None)  # the class: checked by _check_origin
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        group = self._normalize(group)
        self._validate(group, prefix, False)
        return group

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (ours, or torch.optim's with tensors as numpy arrays).

        Checks everything first (the optimizer class that saved it, group count and sizes,
        state keys, shapes, steps, the hyperparameters) and raises ``ValueError`` with nothing
        changed: an AdamW's state dict is refused by an Adam, and so on. Saved groups'
        hyperparameters (``lr`` included) replace the current ones; arrays are cast to the
        state dtype; parameters absent from ``"state"`` start afresh.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("a state dict has the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise ValueError(
                f"loaded 'param_groups' is a {type(saved_groups).__name__}, not a list of "
                "param group dicts"
            )
        saved_groups = list(saved_groups)
        for gi, saved in enumerate(saved_groups):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(
                    f"loaded param_groups[{gi}] is not a param group dict (with a list 'params')"
                )
        if not isinstance(state_dict["state"], Mapping):
            raise ValueError(
                f"loaded 'state' is a {type(state_dict['state']).__name__}, not a dict of "
                "parameter index -> state"
            )
        self._check_origin(state_dict, saved_groups)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"has {len(self.param_groups)}"
            )
        where: dict[int, tuple[int, int]] = {}
        for gi, (saved, rec) in enumerate(zip(saved_groups, self._groups, strict=True)):
            ids = saved["params"]
            if len(ids) != len(rec.params):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size "
                    f"of optimizer's group: param_groups[{gi}] has {len(ids)} parameters, the "
                    f"optimizer's has {len(rec.params)}"
                )
            for i, pid in enumerate(ids):
                where[_index(pid)] = (gi, i)
        new_groups = [self._import_group(saved, gi) for gi, saved in enumerate(saved_groups)]

        staged = []
        for pid, entry in state_dict["state"].items():
            idx = _index(pid)
            if idx not in where:
                raise ValueError(f"loaded state refers to parameter {pid!r}, which is in no group")
            gi, i = where[idx]
            staged.append((gi, i, *self._import_entry(entry, self._groups[gi], i, idx)))

        for group, rec, new in zip(self.param_groups, self._groups, new_groups, strict=True):
            group.clear()
            group.update(new)
            group["params"] = list(rec.params)
            rec.reset()
        for gi, i, step, arrays in staged:
            rec = self._groups[gi]
            rec.steps[i] = step
            for k, a in arrays.items():
                rec.ensure(k)
                if a.size:
                    rec.bufs[k][i].set(a)
                rec.counts[k][i] = max(step, 1)

    def _import_entry(
        self, entry: Any, rec: _Group, i: int, pid: int
    ) -> tuple[int, dict[str, np.ndarray]]:
        where = f"loaded state of parameter {pid}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
        unknown = set(entry) - {"step", *self._state_keys}
        if unknown:
            raise ValueError(
                f"{where} has keys {sorted(unknown)} that {type(self).__name__} does not use"
            )
        arrays = {}
        for k in self._state_keys:
            v = entry.get(k)
            if v is None:  # absent (torch may also hold None before a first step)
                continue
            a = v.get() if isinstance(v, cla.Array) else np.asarray(v)
            if a.shape != rec.shapes[i]:
                raise ValueError(f"{where}: {k!r} has shape {a.shape}, expected {rec.shapes[i]}")
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{where}: {k!r} has dtype {a.dtype}, not a float array")
            arrays[k] = np.require(a, dtype=state_dtype(rec.dtypes[i]), requirements="C")
        if entry and self._required_keys:
            missing = [k for k in ("step", *self._required_keys) if entry.get(k) is None]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
        step = 1 if arrays else 0
        if entry.get("step") is not None:
            s = np.asarray(entry["step"])
            f = float(s) if s.size == 1 and s.dtype.kind in "fiu" else -1.0
            if not (f >= 0 and f == int(f)):
                raise ValueError(f"{where}: invalid step {entry['step']!r}")
            step = int(f)
        return step, arrays

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        lines.append(")")
        return "\n".join(lines)


def _optimizer_classes() -> list[type[Optimizer]]:
    """Every subclass of :class:`Optimizer` defined so far (ours and the user's)."""
    found: list[type[Optimizer]] = []
    todo = list(Optimizer.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def _index(pid: Any) -> int:
    if isinstance(pid, bool):
        raise ValueError(f"invalid parameter index {pid!r} in the state dict")
    if isinstance(pid, (numbers.Integral, np.integer)):
        return int(pid)
    if isinstance(pid, str) and pid.isdigit():
        return int(pid)
    raise ValueError(f"invalid parameter index {pid!r} in the state dict")
