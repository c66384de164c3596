"""Sharpness-aware minimisation (Foret et al., 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization"): optax.contrib's functional ``sam`` (with ``SAMState``)
and ``normalize``, and a stateful ``SAM`` wrapping one of our stateful optimizers with the
interface of the widely used reference implementation (davda54/sam: ``first_step``,
``second_step``, ``step(closure)``)."""

from __future__ import annotations

__all__ = ["SAM", "NormalizeState", "SAMState", "normalize", "sam"]

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import pyopencl.array as cla

from .._base import (
    EmptyState,
    Fragment,
    GradientTransformation,
    OpaquePlan,
    OptState,
    Part,
    Reduction,
    TreeSums,
    as_transform,
)
from .._packing import allocate_like, pack
from .._state_check import NamedTupleSpec, check_state, register, spec_of
from .._validation import BOOL, NON_NEGATIVE, at_least, invalid, require
from ..fusion import execute, init_leaf_values, queue_of_leaves, run_parts
from ..stateful._groups import as_param_groups
from ..stateful._optimizer import Optimizer
from ..transforms._averaging import check_like, copy_
from ..transforms._combining import chain, elementwise

# ---------------------------------------------------------------------------- normalize

NormalizeState = EmptyState

_TREE_NORM = Reduction("sumsq", "norm", outputs=("tree_norm",))


def normalize() -> GradientTransformation:
    """optax.contrib's ``normalize``: ``u <- u / ||u||``, the norm over the whole tree of
    updates (no epsilon: a zero tree gives NaN, as in optax). The adversarial step of SAM
    is ``chain(normalize(), sgd(rho))``.

    The norm is summed in float64 where the device has it (optax: in the updates' dtype),
    then rounded to the updates' dtype. Device: one sum-of-squares reduction (a partials
    launch per packed dtype group, one finish), the division fused into the next kernel;
    no host sync.
    """
    return elementwise(Fragment("normalize", "u = u / tree_norm;", reduction=_TREE_NORM))


# ---------------------------------------------------------------------------- functional


class SAMState(NamedTuple):
    """optax.contrib's ``SAMState``: the steps since the last outer update (a host int in
    ``[0, sync_period)``; optax: a device int), the outer optimizer's state, the
    adversarial optimizer's state, and ``cache``: the params at the start of the period,
    from which the outer update is taken (``None`` in opaque mode)."""

    steps_since_sync: int
    opt_state: OptState
    adv_state: OptState
    cache: Any


class _CacheSlot(NamedTuple):
    """The first adversarial step's slot: in, the params; out, their copy (the cache)."""

    cache: Any


class _NowSlot(NamedTuple):
    """The outer step's slot: in, the current (perturbed) params; out, their copy."""

    now: Any


# -u: the adversarial optimizer's update points downhill; SAM climbs
_ASCEND = elementwise(Fragment("sam_ascend", "u = -u;"))
# the same, copying the params (the slot's input) into a fresh cache in the same kernel
_ASCEND_AND_CACHE = elementwise(
    Fragment("sam_ascend_cache", "u = -u;", slots=("cache",)), init=_CacheSlot
)
# the outer update, taken at the cache (p), as an update of the current params (now):
# optax's c - p + u
_FROM_CACHE = elementwise(
    Fragment("sam_from_cache", "u = (p - now) + u;", slots=("now",), needs_params=True),
    init=_NowSlot,
)


def _copy_tree(params: Any) -> Any:
    """A packed copy of ``params`` (the tree itself when it has no leaves)."""
    return pack(params) if optree.tree_leaves(params) else params


def _sam_spec(outer: GradientTransformation, adv: GradientTransformation) -> NamedTupleSpec:
    """The state's structure: a ``SAMState`` holding the two inner optimizers' states."""
    return NamedTupleSpec(SAMState, {"opt_state": spec_of(outer), "adv_state": spec_of(adv)})


def _steps(value: Any, period: int) -> int:
    steps = require("state.steps_since_sync", value, at_least(0), "sam")
    if steps >= period:
        raise invalid("state.steps_since_sync", value, f"< sync_period = {period}", "sam")
    return steps


def sam(
    optimizer: GradientTransformation,
    adv_optimizer: GradientTransformation,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
) -> GradientTransformation:
    """optax.contrib's SAM (same signature but ``batch_axis_name``, same semantics)::

        t = steps_since_sync (a host int);  cache = params when t == 0
        t < sync_period - 1 (adversarial):  u = -adv_optimizer(g, at params)
        t == sync_period - 1 (outer):       u = (cache - params) + optimizer(g, at cache)
                                            adv state re-initialised (reset_state)

    so that ``apply_updates`` climbs along the adversarial updates and, every
    ``sync_period`` steps, lands on ``cache + optimizer's update`` with the gradient taken
    at the perturbed params. Defaults as optax: ``sync_period=2`` (one ascent, one outer
    step), ``reset_state=True``. The paper's SAM is ``sam(sgd(lr), chain(normalize(),
    sgd(rho)))``. The outer optimizer's state only advances at the outer steps, the
    adversarial one's only at the others. As optax, with ``sync_period=1`` each outer
    update is taken at the previous step's params (optax's cache is replaced after it is
    read).

    ``opaque_mode=True``: each ``update`` runs the ``sync_period - 1`` adversarial steps
    itself and returns the outer update from ``params``; call it as ``update(grads, state,
    params, grad_fn=grad_fn)``, with ``grad_fn(params, i)`` returning the gradients (device
    arrays like the params) at the ``i``-th adversarial point. optax's
    ``batch_axis_name`` (a ``pmean`` of those gradients) has no counterpart: average them
    in ``grad_fn``. Other extra arguments go to both inner optimizers (optax passes none).

    Differences: ``steps_since_sync`` is a host int and the choice between the two kinds
    of step is made on the host: only the update used is computed (optax computes both
    and selects with ``c * a + (1 - c) * b``, which also carries a NaN or inf of the unused
    one, e.g. a zero gradient's normalisation, into the result). ``init`` copies the params
    into ``cache`` (optax keeps the tree itself), and each period's cache is a copy
    written by the first adversarial kernel, so a donated step never overwrites it.

    Device: an adversarial step is the adversarial optimizer's kernel(s) with the negation
    (and, at the period's first step, the cache's copy) fused in; an outer step is the
    outer optimizer's kernel(s) with ``(cache - params) + u`` fused in (its slot writes a
    copy of the params, unused unless ``sync_period == 1``). No host sync.
    """
    period = require("sync_period", sync_period, at_least(1))
    reset = require("reset_state", reset_state, BOOL)
    opaque = require("opaque_mode", opaque_mode, BOOL)
    outer = as_transform(optimizer, "sam: optimizer")
    adv = as_transform(adv_optimizer, "sam: adv_optimizer")
    ascend = chain(adv, _ASCEND)
    ascend_and_cache = chain(adv, _ASCEND_AND_CACHE)
    outer_from_cache = chain(outer, _FROM_CACHE)

    def init(params: Any) -> SAMState:
        cache = None if opaque else _copy_tree(params)
        return SAMState(0, outer.init(params), adv.init(params), cache)

    def transparent(
        updates: Any, state: SAMState, params: Any, steps: int, extra_args: dict[str, Any]
    ) -> tuple[Any, SAMState]:
        check_like(params, state.cache, "params", "state.cache", "sam")
        first, last = steps == 0, steps == period - 1
        run = {"apply": False, "inplace": False, "extra_args": extra_args}
        if last:
            slot = _NowSlot(params)
            out, (opt_state, slot) = execute(
                outer_from_cache, updates, (state.opt_state, slot), state.cache, **run
            )
            adv_state = adv.init(params) if reset else state.adv_state
            cache = slot.now if first else state.cache
        elif first:
            out, (adv_state, cached) = execute(
                ascend_and_cache, updates, (state.adv_state, _CacheSlot(params)), params, **run
            )
            opt_state, cache = state.opt_state, cached.cache
        else:
            out, (adv_state, _) = execute(
                ascend, updates, (state.adv_state, EmptyState()), params, **run
            )
            opt_state, cache = state.opt_state, state.cache
        return out, SAMState((steps + 1) % period, opt_state, adv_state, cache)

    def opaque_update(
        updates: Any,
        state: SAMState,
        params: Any,
        grad_fn: Callable[[Any, int], Any] | None,
        extra_args: dict[str, Any],
    ) -> tuple[Any, SAMState]:
        if grad_fn is None or not callable(grad_fn):
            raise ValueError(
                "sam: opaque_mode=True needs grad_fn: call update(grads, state, params, "
                f"grad_fn=grad_fn), grad_fn(params, i) -> grads (got {grad_fn!r})"
            )
        adv_params, adv_updates, adv_state = params, updates, state.adv_state
        for i in range(period - 1):
            adv_params, (adv_state, _) = execute(
                ascend, adv_updates, (adv_state, EmptyState()), adv_params,
                apply=True, inplace=False, extra_args=extra_args,
            )  # fmt: skip
            adv_updates = grad_fn(adv_params, i)
            check_like(adv_updates, params, f"grad_fn(params, {i})", "params", "sam")
        if reset:
            adv_state = adv.init(params)
        out, opt_state = outer.update(adv_updates, state.opt_state, params, **extra_args)
        return out, SAMState(0, opt_state, adv_state, None)

    def update(
        updates: Any, state: SAMState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SAMState]:
        check_state(tx, state)
        grad_fn = extra_args.pop("grad_fn", None)
        if params is None:
            raise ValueError("sam needs params: call update(updates, state, params)")
        check_like(updates, params, "updates", "params", "sam")
        steps = _steps(state.steps_since_sync, period)
        if opaque:
            return opaque_update(updates, state, params, grad_fn, extra_args)
        return transparent(updates, state, params, steps, extra_args)

    tx = GradientTransformation(init, update, OpaquePlan("sam", (outer, adv)))
    return register(tx, lambda: _sam_spec(outer, adv))


# ---------------------------------------------------------------------------- stateful

_EPS = 1e-12  # davda54's: scale = rho / (grad_norm + 1e-12)


def _perturbation(adaptive: bool) -> Fragment:
    """``old_p <- p;  p <- p + e_w``, ``e_w = (p * p if adaptive else 1) * g * scale``,
    ``scale = rho / (||(|p| if adaptive else 1) * g|| + eps)``: the norm over the whole
    tree from a pre-pass (tree sums), kept in ``grad_norm`` (a value per leaf)."""
    term = "(p * u) * (p * u)" if adaptive else "u * u"
    e_w = "((p * p) * u) * scale" if adaptive else "u * scale"
    sums = TreeSums(
        state=("grad_norm",),
        terms=(term,),
        statements=(("grad_norm", "SQRT(s0)"), ("scale", "rho / (grad_norm + eps)")),
        outputs=("scale",),
        after=False,
    )
    return Fragment(
        "sam_perturb_adaptive" if adaptive else "sam_perturb",
        f"old_p = p;\nu = {e_w};",
        slots=("old_p",),
        scalars=("rho", "eps"),
        needs_params=True,
        tree_sums=sums,
    )


_PERTURB = {False: _perturbation(False), True: _perturbation(True)}
_SAM_KEYS = ("rho", "adaptive")


def _check_base(base_optimizer: Any) -> type[Optimizer]:
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise TypeError(
            "Invalid base_optimizer: "
            f"{base_optimizer!r} (must be a netcl_optim stateful optimizer class, e.g. "
            "netcl_optim.SGD: SAM builds it over its own param groups)"
        )
    declaration = getattr(base_optimizer, "_declaration", None)
    if declaration is None:
        raise TypeError(
            f"Invalid base_optimizer: {base_optimizer.__name__} (an abstract optimizer class: "
            "it declares no hyperparameters)"
        )
    clash = [k for k in _SAM_KEYS if k in declaration.names]
    if clash:
        raise TypeError(
            f"Invalid base_optimizer: {base_optimizer.__name__} (its hyperparameter "
            f"{clash[0]!r} would clash with SAM's)"
        )
    return base_optimizer


def _sam_values(group: Mapping[str, Any], where: str) -> tuple[float, bool]:
    """A group's ``rho`` (a finite number >= 0) and ``adaptive`` (a bool), checked."""
    rho = require("rho", group["rho"], NON_NEGATIVE, where)
    adaptive = require("adaptive", group["adaptive"], BOOL, where)
    return rho, adaptive


class SAM:
    """Sharpness-aware minimisation around a stateful optimizer, as davda54/sam's
    ``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)``::

        first_step:   s = rho / (||w * g|| + 1e-12)        (w = |p| if adaptive else 1,
                      old_p <- p;  p <- p + w^2 * g * s      the norm over all params)
        (the caller computes the gradients at the perturbed params)
        second_step:  p <- old_p;  base_optimizer.step()
        step(closure): first_step(zero_grad=True); closure(); second_step()

    ``base_optimizer`` is a class (``netcl_optim.SGD``, ``Adam``, ...), built over SAM's
    param groups with ``**kwargs``; ``param_groups`` are the base optimizer's (holding
    ``rho`` and ``adaptive`` too), so LR schedulers drive it. ``rho`` >= 0 (``adaptive``:
    ASAM, Kwon et al., 2021, where ``rho`` is usually larger, e.g. 2.0). Params without a
    grad are neither perturbed nor restored (davda54 too).

    Differences from davda54: the norm is the root of one sum of squares over all params
    (summed in float64 where the device has it, the root and ``scale`` in the params'
    precision; davda54: the norm of the per-tensor norms) and
    ``rho / (norm + 1e-12)`` is a division (torch's ``rho / tensor`` multiplies by a
    reciprocal): the same value to an ulp or so. Every group must hold the same ``rho`` and
    ``adaptive`` (the perturbation is one step over all groups; davda54 allows one per
    group): ``ValueError`` otherwise. ``step`` returns the closure's loss (at the perturbed
    params); davda54 returns ``None``. A closure that raises leaves the params restored.
    ``state_dict()`` is the base optimizer's (davda54's holds SAM's ``old_p`` and drops
    the base optimizer's state); refused between ``first_step`` and ``second_step``.

    Device: ``first_step`` is one pass summing the squares (per packed dtype group), a
    one-work-item finish and one fused launch per packed dtype group that saves the params
    and adds the perturbation in place (the norm never leaves the device); ``second_step``
    restores the saved params with one device copy per group and dtype (exact: a copy, as
    davda54's), then the base optimizer's step. Several param groups are one tree over
    separate buffers: ``first_step`` then launches per parameter (the result is the same).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        base_cls = _check_base(base_optimizer)
        rho = require("rho", rho, NON_NEGATIVE)
        adaptive = require("adaptive", adaptive, BOOL)
        groups = [dict(g) for g in as_param_groups(params)]
        for gi, group in enumerate(groups):
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
            _sam_values(group, f"param_groups[{gi}]")
        self.base_optimizer = base_cls(groups, **kwargs)
        self.base_optimizer.defaults.update(rho=rho, adaptive=adaptive)
        self._saved = [self._buffers(g) for g in self.base_optimizer.param_groups]
        self._trees: dict[tuple, tuple[list, list, Any]] = {}
        self._perturbed: list[tuple[int, int]] | None = None

    @staticmethod
    def _buffers(group: Mapping[str, Any]) -> list[cla.Array]:
        """Where ``first_step`` saves a group's params: packed per dtype like them."""
        data = [p.data for p in group["params"]]
        return allocate_like(data, queue_of_leaves(data)) if data else []

    # ------------------------------------------------------------------ torch's surface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.base_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base_optimizer.defaults

    @property
    def lr(self) -> float:
        return self.base_optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.base_optimizer.lr = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """The base optimizer's ``add_param_group`` (``rho`` and ``adaptive`` default to
        SAM's), after checking the group's ``rho`` and ``adaptive``."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.add_param_group between first_step and second_step")
        if isinstance(param_group, Mapping):
            group = {k: param_group.get(k, self.defaults[k]) for k in _SAM_KEYS}
            _sam_values(group, f"param_groups[{len(self.param_groups)}]")
        self.base_optimizer.add_param_group(param_group)
        self._saved.append(self._buffers(self.param_groups[-1]))

    # ------------------------------------------------------------------ steps

    def _members(self) -> list[tuple[int, int]]:
        """``(group, index)`` of every parameter with a grad, in order."""
        return [
            (gi, i)
            for gi, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if p.grad is not None
        ]

    def _shared_values(self) -> tuple[float, bool]:
        values = {_sam_values(g, f"param_groups[{gi}]") for gi, g in enumerate(self.param_groups)}
        if len(values) > 1:
            found = ", ".join(f"rho={r}, adaptive={a}" for r, a in sorted(values))
            raise ValueError(
                f"SAM: every param group must have the same rho and adaptive (the "
                f"perturbation is one step over all groups); found {found}"
            )
        return values.pop()

    def _tree(self, members: list[tuple[int, int]]) -> tuple[list, list, Any]:
        """The saved-params views and the norm's per-leaf state of ``members`` (cached, so
        that the in-place launches are reused)."""
        key = tuple(members)
        found = self._trees.get(key)
        if found is None:
            params = [self.param_groups[gi]["params"][i] for gi, i in members]
            saved = [self._saved[gi][i] for gi, i in members]
            grad_norm = init_leaf_values([p.data for p in params], 1)[0]
            found = self._trees[key] = (params, saved, grad_norm)
        return found

    def first_step(self, zero_grad: bool = False) -> None:
        """Save the params and climb to ``p + e_w`` (see the class). Raises, with nothing
        changed, when no parameter has a grad, after a first step without its second, or
        for a bad grad, ``rho`` or ``adaptive``."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step twice: call second_step first")
        rho, adaptive = self._shared_values()
        members = self._members()
        if not members:
            raise ValueError("SAM.first_step: no parameter has a grad (run the backward first)")
        params, saved, grad_norm = self._tree(members)
        part = Part(_PERTURB[adaptive], (rho, _EPS), (saved,), (grad_norm,))
        grads = [p.grad for p in params]
        run_parts([part], grads, [p.data for p in params], apply=True, inplace=True)
        self._perturbed = members
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        members, self._perturbed = self._perturbed, None
        if members:
            params, saved, _ = self._tree(members)
            copy_([p.data for p in params], saved)

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the params saved by :meth:`first_step` (bit for bit), then step the base
        optimizer with the grads now held (those at the perturbed params)."""
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step without first_step")
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``first_step(zero_grad=True)``, ``closure()`` (forward and backward at the
        perturbed params), ``second_step()``; returns the closure's value."""
        if closure is None or not callable(closure):
            raise ValueError(
                "Sharpness Aware Minimization requires closure (a callable that runs the "
                f"forward and backward passes), but it was not provided (got {closure!r})"
            )
        self.first_step(zero_grad=True)
        try:
            loss = closure()
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups hold ``rho`` and ``adaptive``)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.state_dict between first_step and second_step")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` into the base optimizer; each group's ``rho`` and
        ``adaptive`` (SAM's defaults where absent) are checked first, nothing changes on
        an error."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.load_state_dict between first_step and second_step")
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            raise ValueError("a state dict has 'param_groups': a list of param group dicts")
        values = []
        for gi, group in enumerate(groups):
            mine = {k: group.get(k, self.defaults[k]) for k in _SAM_KEYS}
            values.append(_sam_values(mine, f"loaded param_groups[{gi}]"))
        stripped = dict(state_dict)
        stripped["param_groups"] = [
            {k: v for k, v in g.items() if k not in _SAM_KEYS} for g in groups
        ]
        self.base_optimizer.load_state_dict(stripped)
        for group, (rho, adaptive) in zip(self.param_groups, values, strict=True):
            group["rho"], group["adaptive"] = rho, adaptive

    def __repr__(self) -> str:
        return f"SAM ({self.base_optimizer!r}\n)"
