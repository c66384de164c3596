"""What a stateful optimizer class declares, once: its hyperparameters (torch's group keys,
defaults, validation rules), torch's implementation keywords it accepts, the rules across
hyperparameters and the functional optimizer it builds per param group.

A class lists them in torch's constructor order (:data:`KEYWORD_ONLY` where torch has ``*``);
:class:`Declaration` compiles that list into the constructor's signature and the checks of a
param group, with one message style (:mod:`netcl_optim._validation`)::

    Invalid eps: -1.0 (must be a finite number > 0) in param_groups[1]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Rule,
    ScheduledValue,
    invalid,
    pair,
    require,
    tuple_of,
)
from ..fusion import storage_dtype


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: torch's group key ``name``, its ``default`` and the ``rule`` its
    value follows (raising ``ValueError`` for any invalid value, as torch does).

    ``scheduled``: a value LR schedulers set (torch's ``lr``): ``rule`` holds where the user
    gives it (constructor, :meth:`add_param_group`); in a group (at a step, on load, through
    ``opt.lr``) 0 is valid too, as a warmup starts at 0, and the functional builder gets it as
    a :class:`~netcl_optim._validation.ScheduledValue` (which the aliases accept at 0).
    ``argument``: a constructor argument (Momentum's ``dampening`` is a group key only).
    """

    name: str
    default: Any
    rule: Rule
    scheduled: bool = False
    argument: bool = True

    def check(self, value: Any, where: str = "", in_group: bool = False) -> Any:
        """``value`` converted by the rule (a float, a bool, a tuple); raises ValueError."""
        rule = NON_NEGATIVE if self.scheduled and in_group else self.rule
        converted = require(self.name, value, rule.value_errors(), where)
        return ScheduledValue(converted) if self.scheduled else converted


_NONE_OR_BOOL = Rule("None or a bool", BOOL.convert).value_errors()


@dataclass(frozen=True)
class TorchKeyword:
    """One of torch's implementation keywords (``foreach``, ``fused``, ``capturable``,
    ``differentiable``): accepted and validated so that torch code runs unchanged, and not
    kept in the param groups. It changes nothing: every step is one fused kernel already.
    ``optional``: ``None`` is valid; ``unsupported``: why ``True`` is an error ("" if not)."""

    name: str
    default: bool | None
    optional: bool = True
    unsupported: str = ""

    def check(self, value: Any, where: str = "") -> None:
        if value is None and self.optional:
            return
        flag = require(self.name, value, _NONE_OR_BOOL if self.optional else BOOL, where)
        if flag and self.unsupported:
            place = f" in {where}" if where else ""
            raise ValueError(f"{self.name}=True is not supported: {self.unsupported}{place}")


@dataclass(frozen=True)
class Requirement:
    """A rule across hyperparameters, blamed on ``name``: ``holds(**values)`` (the converted
    values of a group, by name) must be true, else ``Invalid <name>: <value> (must be
    <must>)``."""

    name: str
    must: str
    holds: Callable[..., bool]

    def check(self, where: str = "", **values: Any) -> None:
        if not self.holds(**values):
            raise invalid(self.name, values[self.name], self.must, where)


class _KeywordOnly:
    def __repr__(self) -> str:
        return "KEYWORD_ONLY"


KEYWORD_ONLY = _KeywordOnly()
"""In a class's ``hyperparameters``: those after it are keyword-only (torch's ``*``)."""

Entry = Hyperparameter | TorchKeyword | _KeywordOnly

# torch's names shared by several classes
BETAS = Hyperparameter("betas", (0.9, 0.999), pair(UNIT, "a pair (beta1, beta2), each in [0, 1)"))
BETAS3 = tuple_of(3, UNIT, "a triple (beta1, beta2, beta3), each in [0, 1)")  # Adan, AdEMAMix
EPS = Hyperparameter("eps", 1e-8, POSITIVE)
MAXIMIZE = Hyperparameter("maximize", False, BOOL)
FOREACH = TorchKeyword("foreach", None)
FUSED = TorchKeyword("fused", None)
CAPTURABLE = TorchKeyword("capturable", False)
DIFFERENTIABLE = TorchKeyword(
    "differentiable",
    False,
    optional=False,
    unsupported="netcl_optim does not record an autograd graph",
)


STATE_DTYPE, STATE_BITS, MIN_8BIT_SIZE = "state_dtype", "state_bits", "min_8bit_size"
STOCHASTIC_ROUNDING = "stochastic_rounding"


@dataclass(frozen=True)
class Storage:
    """How a group stores its optimizer state (every class's keyword-only arguments and
    group keys ``state_dtype``, ``state_bits``, ``min_8bit_size``; see
    :func:`netcl_optim.low_precision_state`): ``dtype`` a name (``"bfloat16"``) or None
    (float32), ``bits`` 32 or 8, ``min_8bit_size`` the smallest parameter stored in 8 bits;
    ``stochastic_rounding``: bfloat16 params written with stochastic rounding (see
    :func:`netcl_optim.stochastic_rounding`, seed 0)."""

    dtype: str | None = None
    bits: int = 32
    min_8bit_size: int = 4096
    stochastic_rounding: bool = False

    @staticmethod
    def of(
        group: Mapping[str, Any], where: str = "", defaults: Mapping[str, Any] | None = None
    ) -> Storage:
        """A group's storage, checked (ValueError naming ``where``); a key the group does
        not set takes its value from ``defaults`` (the class's)."""
        defaults = defaults or STORAGE_DEFAULTS
        dtype, bits, size, rounding = (group.get(k, defaults[k]) for k in STORAGE_DEFAULTS)
        place = f" in {where}" if where else ""
        try:
            name = storage_dtype(dtype)
        except ValueError as err:
            raise ValueError(f"{err}{place}") from None
        if isinstance(bits, bool) or bits not in (8, 32):
            raise invalid(STATE_BITS, bits, "8 or 32", where)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise invalid(MIN_8BIT_SIZE, size, "an int >= 0", where)
        if bits == 8 and name is not None:
            raise ValueError(
                f"state_bits=8 and state_dtype={dtype!r}{place}: 8-bit state has its own "
                "layout (leave state_dtype None)"
            )
        if not isinstance(rounding, (bool, np.bool_)):
            raise invalid(STOCHASTIC_ROUNDING, rounding, "a bool", where)
        return Storage(None if name is None else str(name), int(bits), int(size), bool(rounding))


STORAGE_DEFAULTS = {STATE_DTYPE: None, STATE_BITS: 32, MIN_8BIT_SIZE: 4096,
                    STOCHASTIC_ROUNDING: False}  # fmt: skip


def torch_lr(default: float) -> Hyperparameter:
    """torch's ``lr``: > 0 when given, scheduled (see :class:`Hyperparameter`)."""
    return Hyperparameter("lr", default, POSITIVE, scheduled=True)


def _annotation(entry: Hyperparameter | TorchKeyword) -> Any:
    if isinstance(entry, TorchKeyword):
        return bool | None if entry.optional else bool
    if isinstance(entry.default, bool):
        return bool
    if isinstance(entry.default, int):
        return int
    if entry.default is None:
        return Any
    if isinstance(entry.default, str):
        return str
    if isinstance(entry.default, tuple):
        return tuple[tuple(str if isinstance(x, str) else float for x in entry.default)]
    return float


def as_stored(value: Any) -> Any:
    """A group value as kept: a list (a pair from a checkpoint's JSON) as a tuple."""
    return tuple(value) if isinstance(value, list) else value


class Declaration:
    """A class's declaration, compiled: its constructor signature, its group keys (the
    hyperparameters), the torch keywords it accepts and the checks of a group."""

    def __init__(
        self,
        owner: str,
        entries: Sequence[Entry],
        requirements: Sequence[Requirement],
        functional: Callable[..., Any],
        storage_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.owner = owner
        self.hyperparameters = tuple(e for e in entries if isinstance(e, Hyperparameter))
        self.keywords = tuple(e for e in entries if isinstance(e, TorchKeyword))
        self.requirements = tuple(requirements)
        self.names = tuple(h.name for h in self.hyperparameters)
        names = [e.name for e in entries if not isinstance(e, _KeywordOnly)]
        if len(set(names)) != len(names):
            raise TypeError(f"{owner} declares a hyperparameter twice: {names}")
        wanted = set(inspect.signature(functional).parameters)
        if wanted != set(self.names):
            raise TypeError(
                f"{owner}.functional takes {sorted(wanted)}, but {owner} declares the "
                f"hyperparameters {sorted(self.names)}"
            )
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters = [inspect.Parameter("self", kind), inspect.Parameter("params", kind)]
        for e in entries:
            if isinstance(e, _KeywordOnly):
                kind = inspect.Parameter.KEYWORD_ONLY
            elif not isinstance(e, Hyperparameter) or e.argument:
                parameters.append(
                    inspect.Parameter(e.name, kind, default=e.default, annotation=_annotation(e))
                )
        self.storage_defaults = {**STORAGE_DEFAULTS, **(storage_defaults or {})}
        for name, default in self.storage_defaults.items():
            if name not in names:
                kind = inspect.Parameter.KEYWORD_ONLY
                annotation = {STATE_DTYPE: Any, STOCHASTIC_ROUNDING: bool}.get(name, int)
                parameters.append(
                    inspect.Parameter(name, kind, default=default, annotation=annotation)
                )
        self.signature = inspect.Signature(parameters, return_annotation=None)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The constructor's arguments: ``(params, defaults)``, torch keywords checked, the
        defaults not yet (see :meth:`validate`)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{self.owner}(): {err}") from None
        bound.apply_defaults()
        values = bound.arguments
        for k in self.keywords:
            k.check(values[k.name])
        defaults = {
            h.name: as_stored(values[h.name]) if h.argument else h.default
            for h in self.hyperparameters
        }
        storage = Storage.of({k: values[k] for k in self.storage_defaults})
        # (kept in the groups only where not the class's default: torch's keys otherwise)
        stored = (storage.dtype, storage.bits, storage.min_8bit_size, storage.stochastic_rounding)
        for k, v in zip(STORAGE_DEFAULTS, stored, strict=True):
            if v != self.storage_defaults[k]:
                defaults[k] = v
        return values["params"], defaults

    def storage(self, group: Mapping[str, Any], where: str = "") -> Storage:
        """How ``group`` stores its state (its keys over the class's defaults), checked."""
        return Storage.of(group, where, self.storage_defaults)

    def pop_keywords(self, group: dict[str, Any], where: str) -> None:
        """Check and remove the torch keywords a param group sets (they change nothing)."""
        for k in self.keywords:
            if k.name in group:
                k.check(group.pop(k.name), where)

    def validate(
        self, group: Mapping[str, Any], where: str = "", in_group: bool = False
    ) -> dict[str, Any]:
        """The group's hyperparameters, checked and converted (what the functional builder
        takes); raises ValueError naming the first invalid one and ``where``."""
        values = {}
        for h in self.hyperparameters:
            if h.name not in group:
                raise ValueError(f"{where or 'the param group'} has no {h.name!r}")
            values[h.name] = h.check(group[h.name], where, in_group)
        for r in self.requirements:
            r.check(where, **values)
        self.storage(group, where)
        return values
