"""Optimizer: torch.optim's stateful contract over the functional chains, run in place.

Each param group keeps its parameters packed (one buffer per dtype), its optimizer state as
named packed buffers (torch's key names: ``exp_avg``, ``momentum_buffer``, ...) and a host
step count per parameter. A step builds (and caches) the group's functional chain from its
hyperparameters, assembles the chain's state from the buffers and the counts, and runs
:func:`netcl_optim.transforms._update.step_`: one fused kernel launch per group and dtype.

A subclass only declares itself (see :class:`Optimizer`); the optimizers are in
:mod:`netcl_optim.optimizers`, one file per family.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, overload

from .._base import GradientTransformation
from ..fusion import EightBit, element_origin, storage_dtype
from ..transforms._combining import chain as chain_of
from ..transforms._rounding import StochasticRoundingState, stochastic_rounding
from ..transforms._storage import low_precision_state
from ..transforms._update import step_
from . import _state_dict
from ._declaration import Declaration, Entry, Requirement, Storage, as_stored
from ._groups import (
    Group,
    as_param_groups,
    check_placement,
    check_unshared,
    group_params,
    pack_params,
)
from ._torch_state import (
    STEP,
    TorchState,
    assemble,
    key_shapes,
    keys_of,
    nonnegative_keys,
    per_leaf_shape,
    slot_starts,
    torch_state,
)

_CHAIN_CACHE_SIZE = 32
_BUILDING_SHARDS: contextvars.ContextVar[bool] = contextvars.ContextVar("shards", default=False)


@contextlib.contextmanager
def building_shards() -> Any:
    """Optimizers built inside are ZeRO's inner ones: their parameters are 1-D slices of the
    real ones, whose shapes :meth:`Optimizer.check_params` checked before."""
    token = _BUILDING_SHARDS.set(True)
    try:
        yield
    finally:
        _BUILDING_SHARDS.reset(token)


def shards_building() -> bool:
    """Whether an optimizer is being built inside :func:`building_shards`."""
    return _BUILDING_SHARDS.get()


# stochastic_rounding=True: its generator counts the parameter's steps
ROUNDING_COUNT = torch_state(StochasticRoundingState, count=STEP)


class _Chain(NamedTuple):
    """A group's functional optimizer, its state template, the torch keys it keeps, the
    non-zero start values of their fresh buffers and the shapes of those not shaped like
    their parameter (see ``key_shapes``)."""

    tx: GradientTransformation
    template: Any
    keys: list[str]
    starts: dict[str, float]
    shapes: dict[str, Any]
    # how each slot key's buffers are stored, where not in the state dtype: the group's
    # state_dtype, or 8 bits (EightBit); never values per leaf or a stage's state
    storage: dict[str, Any] = {}  # noqa: RUF012 (a NamedTuple field's default)

    def dtype_of(self, key: str) -> Any:
        """How ``key``'s buffers are stored: a dtype, an ``EightBit``, or None (the state
        dtype)."""
        return self.storage.get(key)


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


class Optimizer(abc.ABC):
    """Base class of the stateful optimizers (torch.optim's contract).

    A subclass declares, as class attributes, and nothing else:

    - ``hyperparameters``: the constructor's parameters after ``params``, in torch's order:
      each :class:`~netcl_optim.stateful._declaration.Hyperparameter` (torch's group key,
      default, validation rule) and each torch implementation keyword it accepts
      (``FOREACH``, ``FUSED``, ``CAPTURABLE``, ``DIFFERENTIABLE``), with ``KEYWORD_ONLY``
      where torch has ``*``;
    - ``requirements``: rules across hyperparameters (``Requirement``), if any;
    - ``functional(**hyperparameters)``: a static method building the functional optimizer of
      one group from its checked hyperparameters, by name;
    - ``torch_state``: the ``torch_state(...)`` mappings of the states its chains keep,
      ``torch_step`` (whether torch keeps a per-parameter ``"step"``) and ``torch_marks``
      (group flags naming the class in torch's dicts, e.g. ``decoupled_weight_decay``).

    From these follow the constructor (a real signature: ``inspect.signature(Adam)``), the
    validation of every group (``Invalid eps: 0.0 (must be a finite number > 0) in
    param_groups[1]``), each group's chain, :meth:`state_dict` and :meth:`load_state_dict`.

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

    hyperparameters: ClassVar[tuple[Entry, ...]] = ()
    requirements: ClassVar[tuple[Requirement, ...]] = ()
    torch_state: ClassVar[tuple[TorchState, ...]] = ()
    torch_step: ClassVar[bool] = True
    torch_marks: ClassVar[Mapping[str, bool]] = MappingProxyType({})
    # per-parameter host scalars torch stores (NAdam's "mu_product"): key -> fn(group, step),
    # exported in state dicts and recomputed (not read) on load
    torch_scalars: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    # state_bits=8: every slot with the signed map (bitsandbytes' one-state optimizers)
    signed_8bit: ClassVar[bool] = False
    # state dicts in bitsandbytes' layout (8-bit state nested, an int step)
    bnb_layout: ClassVar[bool] = False
    # a loaded group's keys that are no hyperparameter here (bitsandbytes' "alpha" of Adam8bit)
    ignored_on_load: ClassVar[tuple[str, ...]] = ()
    # the defaults of state_dtype, state_bits and min_8bit_size (bitsandbytes' classes: 8)
    storage_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    # compiled from the declaration by __init_subclass__
    _declaration: ClassVar[Declaration]
    _torch_states: ClassVar[dict[type, TorchState]]
    _state_keys: ClassVar[tuple[str, ...]]

    @staticmethod
    @abc.abstractmethod
    def functional(**hyperparameters: Any) -> GradientTransformation:
        """The functional optimizer of one param group, from its checked hyperparameters."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.hyperparameters or getattr(cls.functional, "__isabstractmethod__", False):
            return  # an abstract intermediate class
        cls._declaration = Declaration(
            cls.__name__, cls.hyperparameters, cls.requirements, cls.functional,
            cls.storage_defaults,
        )  # fmt: skip
        cls._torch_states = {s.type: s for s in (*cls.torch_state, ROUNDING_COUNT)}
        keys: list[str] = []
        for s in cls.torch_state:
            keys += [k for k in s.keys if k not in keys]
        cls._state_keys = tuple(keys)
        if "__init__" not in cls.__dict__:
            cls.__init__ = _constructor(cls)  # type: ignore[method-assign]

    # (for type checkers) the base's constructor, called by the generated ones and by the
    # subclasses' own; and a concrete optimizer's, generated from its declaration by
    # _constructor: (params, *hyperparameters, **hyperparameters and storage keywords)
    @overload
    def __init__(self, params: Any, defaults: Mapping[str, Any]) -> None: ...
    @overload
    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None: ...
    def __init__(self, params: Any, defaults: Mapping[str, Any]) -> None:
        self.defaults: dict[str, Any] = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._groups: list[Group] = []
        self._ids: set[int] = set()
        self._context: Any = None
        self._chains: OrderedDict[tuple, _Chain] = OrderedDict()
        for group in as_param_groups(params):
            self.add_param_group(group)

    # ------------------------------------------------------------------ groups

    @classmethod
    def check_params(cls, param_groups: Sequence[Mapping[str, Any]], **defaults: Any) -> None:
        """Raise if this class cannot take a parameter of its shape (Muon: matrices only);
        nothing here. ``ZeroRedundancyOptimizer`` calls it on the real parameters before it
        builds the optimizer over their 1-D slices."""
        return None

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group: ``{"params": [...], <hyperparameter>: value, ...}``; keys it does not
        set come from ``defaults``. Its parameters are packed (``.data`` re-homed)."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params'")
        gi = len(self.param_groups)
        where = f"param_groups[{gi}]"
        group = dict(param_group)
        params = group_params(group["params"], gi)
        ids = {id(p) for p in params}
        if ids & self._ids:
            raise ValueError("some parameters appear in more than one parameter group")
        declaration = self._declaration
        declaration.pop_keywords(group, where)
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        for k in declaration.names:
            group[k] = as_stored(group[k])
        declaration.validate(group, where)

        arrays = [p.data for p in params]
        queue = check_placement(arrays, gi, self._context)
        check_unshared([[p.data for p in rec.params] for rec in self._groups] + [arrays])
        pack_params(params, queue)

        self._context = queue.context
        rec = Group(params, queue)
        group["params"] = list(rec.params)
        self.param_groups.append(group)
        self._groups.append(rec)
        self._ids |= ids

    @property
    def lr(self) -> float:
        """The learning rate of group 0; setting it sets every group's ``"lr"``."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for h in self._declaration.hyperparameters:
            if h.name == "lr":
                h.check(value, in_group=True)
        for group in self.param_groups:
            group["lr"] = value

    # ------------------------------------------------------------------ step

    def _chain(self, gi: int) -> _Chain:
        """Group ``gi``'s chain, built (after checking every hyperparameter) and cached by
        its hyperparameters' values."""
        group = self.param_groups[gi]
        try:
            key = tuple(_freeze(group[k]) for k in self._declaration.names)
        except KeyError as err:
            raise ValueError(f"param_groups[{gi}] has no {err.args[0]!r}") from None
        storage = self._declaration.storage(group, f"param_groups[{gi}]")
        key = (*key, storage)
        chain = self._chains.get(key)
        if chain is not None:
            self._chains.move_to_end(key)
            return chain
        values = self._declaration.validate(group, f"param_groups[{gi}]", in_group=True)
        tx = _stored(self.functional(**values), storage, self.signed_8bit)
        template = tx.init([])
        keys = keys_of(template, self._torch_states, type(self).__name__)
        starts = slot_starts(tx, self._torch_states)
        shapes = key_shapes(tx, self._torch_states)
        slot_storage = {}
        if storage.bits == 8:
            nonnegative = nonnegative_keys(tx, self._torch_states)
            for k in keys:
                if k not in shapes:
                    signed = self.signed_8bit or k not in nonnegative
                    slot_storage[k] = EightBit(storage.min_8bit_size, signed)
        elif storage.dtype is not None:  # (a value per leaf, as NovoGrad's, stays float32)
            slot_storage = {
                k: storage_dtype(storage.dtype)
                for k in keys
                if k not in shapes or shapes[k] is not per_leaf_shape
            }
        chain = _Chain(tx, template, keys, starts, shapes, slot_storage)
        self._chains[key] = chain
        if len(self._chains) > _CHAIN_CACHE_SIZE:
            self._chains.popitem(last=False)
        return chain

    @classmethod
    def exported_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """A group as :meth:`state_dict` saves it (bitsandbytes' classes add its keys)."""
        return group

    @classmethod
    def imported_group(cls, group: Mapping[str, Any]) -> Mapping[str, Any]:
        """A loaded group before it is checked (bitsandbytes' classes read its keys)."""
        return group

    def quantized_keys(self, key: str) -> tuple[str, str]:
        """The state dict keys of 8-bit ``key``'s absmax and map (its codes are under
        ``key``): ``<key>_absmax``, ``<key>_qmap``; bitsandbytes' ``absmax1``, ``qmap1`` for
        ``state1``."""
        if self.bnb_layout and key.startswith("state"):
            return "absmax" + key[5:], "qmap" + key[5:]
        return key + "_absmax", key + "_qmap"

    def _state_shapes(self, rec: Group) -> dict[str, Any]:
        """The shapes of the group ``rec``'s keys not shaped like their parameter."""
        gi = next(k for k, r in enumerate(self._groups) if r is rec)
        return self._chain(gi).shapes

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
        self._check_step()
        loss = None
        if closure is not None:
            loss = closure()
        work = []
        for gi, (group, rec) in enumerate(zip(self.param_groups, self._groups, strict=True)):
            members, rebound = rec.members(group, gi)
            if rebound:  # a .data set since the packing: it must not share memory either
                check_unshared([[p.data for p in r.params] for r in self._groups])
            if members:
                work.append((rec, members, self._chain(gi)))
        for rec, members, chain in work:
            for k in chain.keys:
                rec.ensure(k, chain.starts.get(k, 0.0), chain.shapes.get(k), chain.dtype_of(k))
            for cohort in rec.cohorts(members, chain.keys):
                self._run(rec, cohort, chain)
        return loss

    def _run(self, rec: Group, cohort: list[int], chain: _Chain) -> None:
        i0 = cohort[0]
        counts = {STEP: rec.steps[i0]}
        for k in chain.keys:
            counts[k] = rec.counts[k][i0]
        whole = len(cohort) == len(rec.params)
        if whole:
            buffers = {k: rec.bufs[k] for k in chain.keys}
            params = [p.data for p in rec.params]
            grads = [p.grad for p in rec.params]
        else:
            buffers = {k: [rec.bufs[k][i] for i in cohort] for k in chain.keys}
            params = [rec.params[i].data for i in cohort]
            grads = [rec.params[i].grad for i in cohort]
        state = assemble(chain.template, self._torch_states, buffers, counts)
        with contextlib.ExitStack() as stack:
            if rec.element_origins:
                stack.enter_context(element_origin(rec.element_origins))
            stack.enter_context(rec.sliced())  # ZeRO: values per leaf over the whole leaves
            step_(chain.tx, params, grads, state, **self._step_args(rec))
        if whole:
            rec.steps = [s + 1 for s in rec.steps]
            for k in chain.keys:
                rec.counts[k] = [c + 1 for c in rec.counts[k]]
            return
        for i in cohort:
            rec.steps[i] += 1
            for k in chain.keys:
                rec.counts[k][i] += 1

    def _check_step(self) -> None:
        """Raise if the optimizer cannot step now, whatever the grads (schedule-free's eval
        mode); ``step`` and ZeRO's checks call it before anything changes."""
        return None

    def _step_args(self, rec: Group) -> dict[str, Any]:
        """Extra arguments of the group ``rec``'s step, which its fragments' ``host_step``
        receive (a class whose rule reads per-group host values, e.g. schedule-free's)."""
        return {}

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

    @property
    def state(self) -> defaultdict[Any, dict[str, Any]]:
        """A torch-like view: parameter -> {torch key: device array (a view of the packed
        state, live), or ``"step"``: float}; parameters without state are absent."""
        out: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for rec in self._groups:
            for i, p in enumerate(rec.params):
                entry = _state_dict.param_state(self, rec, i, host=False)
                if entry:
                    out[p] = entry
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {key: numpy array or "step": float}},
        "param_groups": [{hyperparameters..., "params": [index, ...]}]}``; indices count
        parameters across groups in order; parameters without state are absent.

        The class is recorded, so that :meth:`load_state_dict` of another class refuses it:
        ``"optimizer": "AdamW"`` (ignored by torch), and in each group the class's
        ``torch_marks`` (Adam's and AdamW's ``"decoupled_weight_decay"``: False and True).

        Device: one read-back per state array (a host sync).
        """
        return _state_dict.export(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (ours, or torch.optim's with tensors as numpy arrays).

        Checks everything first (the optimizer class that saved it, group count and sizes,
        state keys, shapes, steps, the hyperparameters) and raises ``ValueError`` with nothing
        changed: an AdamW's state dict is refused by an Adam, and so on. Saved groups'
        hyperparameters (``lr`` included) replace the current ones; arrays are cast to the
        state dtype; parameters absent from ``"state"`` start afresh. torch's implementation
        flags (``foreach``, ``fused``, ...) are dropped; ``amsgrad=True`` is refused.
        """
        _state_dict.load(self, state_dict, _declared_classes())

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, group in enumerate(getattr(self, "param_groups", [])):  # [] if half-built
            lines.append(f"Parameter Group {gi}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        lines.append(")")
        return "\n".join(lines)


def _constructor(cls: type[Optimizer]) -> Callable[..., None]:
    """``cls.__init__`` with the declared signature: binds the arguments, checks the torch
    keywords and the hyperparameters, and builds the optimizer with them as ``defaults``."""
    declaration = cls._declaration

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        params, defaults = declaration.bind((self, *args), kwargs)
        values = declaration.validate(defaults)
        # (refused here by the rules that keep float32 state)
        _stored(cls.functional(**values), declaration.storage(defaults), cls.signed_8bit)
        Optimizer.__init__(self, params, defaults)

    __init__.__signature__ = declaration.signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"See :class:`{cls.__name__}`."
    return __init__


def _stored(tx: GradientTransformation, storage: Storage, signed: bool) -> GradientTransformation:
    """``tx`` with its state stored as ``storage`` says (and bfloat16 params rounded
    stochastically where it says so)."""
    tx = low_precision_state(
        tx, storage.dtype, state_bits=storage.bits, min_8bit_size=storage.min_8bit_size,
        signed=signed,
    )  # fmt: skip
    return chain_of(tx, stochastic_rounding()) if storage.stochastic_rounding else tx


def _declared_classes() -> list[type[Optimizer]]:
    """Every declared subclass of :class:`Optimizer` defined so far (ours and the user's)."""
    found: list[type[Optimizer]] = []
    todo = list(Optimizer.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in found if hasattr(c, "_declaration")]
