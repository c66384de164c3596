"""How a step's state slots are stored: the dtype each new slot gets at ``init``.

Kernels read each slot's storage from its arrays (``_fused``), so a transform's update is the
same code whatever its state's dtype; only ``init`` (and the stateful layer's fresh buffers)
choose it, under :func:`slot_storage`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import numpy as np

from .._device import BFLOAT16, STATE_STORAGE, state_dtype


class EightBit(NamedTuple):
    """A slot stored in 8 bits, block-quantized (see ``_quantized``): params of at least
    ``min_size`` elements; ``signed``: the signed map even where the rule declares the slot
    non-negative (bitsandbytes' one-state optimizers)."""

    min_size: int = 4096
    signed: bool = False


# slot name -> its storage (None: the state dtype), while an init runs
Rule = Callable[[str], "np.dtype | EightBit | None"]
_RULE: contextvars.ContextVar[Rule | None] = contextvars.ContextVar("slot_storage", default=None)

_NAMES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}


def storage_dtype(value: object, what: str = "state_dtype") -> np.dtype | None:
    """``value`` (None, a name such as ``"bfloat16"``, a numpy or ml_dtypes dtype) as a state
    storage dtype, or None; ValueError naming ``what`` for anything else."""
    if value is None:
        return None
    try:
        dtype = _NAMES[value] if isinstance(value, str) else np.dtype(cast(Any, value))
    except (KeyError, TypeError):
        dtype = None
    if dtype not in STATE_STORAGE:
        raise ValueError(
            f"Invalid {what}: {value!r} (must be None, float32, float16 or bfloat16: "
            "the dtype the optimizer state is stored as; math stays float32)"
        )
    return dtype


@contextlib.contextmanager
def slot_storage(rule: Rule) -> Iterator[None]:
    """Slots created inside (``init_slots`` with names) are stored as ``rule(name)``."""
    token = _RULE.set(rule)
    try:
        yield
    finally:
        _RULE.reset(token)


def current_rule() -> Rule | None:
    """The active rule (None outside ``slot_storage``)."""
    return _RULE.get()


def slot_rule(name: str) -> np.dtype | EightBit | None:
    """How the active rule stores a new slot ``name`` (None: the state dtype)."""
    rule = _RULE.get()
    return rule(name) if rule is not None else None


def slot_dtype_of(name: str) -> Callable[[np.dtype], np.dtype]:
    """The dtype of a new slot ``name`` for params of a given dtype, under the active rule:
    the state dtype (float32; float64 for float64 params), or the rule's (float64 params
    keep float64 state: their math is float64)."""
    wanted = slot_rule(name)
    if wanted is None or isinstance(wanted, EightBit):
        return state_dtype

    def dtype_of(dtype: np.dtype) -> np.dtype:
        return state_dtype(dtype) if dtype == np.float64 else wanted

    return dtype_of
