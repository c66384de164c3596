"""low_precision_state: any transform with its element-wise state stored in fewer bytes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .._base import GradientTransformation, StagePlan
from .._validation import BOOL, at_least, invalid, require
from ..fusion import EightBit, current_rule, slot_storage, storage_dtype


def _stages(tx: GradientTransformation) -> Iterator[str]:
    """The kinds of the stages (transforms with kernels of their own) ``tx`` is made of."""
    if isinstance(tx.plan, StagePlan):
        yield tx.plan.kind
    for child in getattr(tx.plan, "children", ()):
        yield from _stages(child)


def low_precision_state(
    tx: GradientTransformation,
    state_dtype: Any = None,
    *,
    state_bits: int = 32,
    min_8bit_size: int = 4096,
    slots: Sequence[str] | None = None,
    signed: bool = False,
) -> GradientTransformation:
    """``tx`` with the state its element-wise rules keep per parameter element (its slots:
    Adam's ``mu`` and ``nu``, a momentum's ``trace``, ...) stored as ``state_dtype``:
    ``"float32"`` (the default, as ``None``), ``"float16"`` or ``"bfloat16"``, all slots or
    only those named in ``slots`` (optax's ``mu_dtype``: ``slots=("mu",)``). The math stays
    float32: each step loads the state, updates it in float32, uses the float32 value for
    the update and stores it rounded to nearest even. Counts and per-leaf values keep their
    dtype. Bit for bit the same updates as ``tx`` with its state rounded to ``state_dtype``
    at ``init`` and after every step.

    bfloat16 arrays hold ``ml_dtypes.bfloat16`` values (on the device: 16-bit words; on the
    host, ``to_host`` gives ``ml_dtypes.bfloat16`` arrays). float64 params keep float64
    state (their math is float64). Rules with kernels of their own store theirs alike:
    Adafactor's row and column EMAs and its ``v`` (slots ``v_row``, ``v_col``, ``v``),
    SM3's accumulators and momentum (``mu``, ``nu``); ``state_bits=8`` refuses them
    (ValueError here: their state is not element-wise).

    ``state_bits=8``: the slots are block-quantized in bitsandbytes' layout (a
    :class:`QuantizedState` per parameter of at least ``min_8bit_size`` elements: ``uint8``
    codes and one float32 absmax per 256-element block; smaller parameters keep float32
    state): bitsandbytes' signed dynamic map, or its unsigned one for the slots the rule
    declares non-negative (Adam's ``nu``; ``signed=True``: the signed map for every slot, as
    bitsandbytes' one-state optimizers). Each step dequantizes, runs the rule in float32,
    writes the params from the unquantized new state and stores ``absmax`` and the nearest
    codes (the sign of a non-zero signed value kept), one launch per packed tree. A rule
    that keeps state and reads values per leaf (LAMB, LARS, NovoGrad) raises ValueError at
    its first 8-bit step; parts of a chain without state run as they are.
    """
    bits = require("state_bits", state_bits, at_least(0))
    if bits not in (8, 32):
        raise invalid("state_bits", state_bits, "8 or 32")
    min_size = require("min_8bit_size", min_8bit_size, at_least(0))
    force_signed = require("signed", signed, BOOL)
    dtype = storage_dtype(state_dtype)
    if bits == 8 and dtype is not None:
        raise ValueError(
            f"state_bits=8 and state_dtype={state_dtype!r}: 8-bit state has its own layout "
            "(leave state_dtype None)"
        )
    storage: Any = EightBit(min_size, force_signed) if bits == 8 else dtype
    if storage is None:
        return tx
    stages = sorted(set(_stages(tx))) if bits == 8 else []
    if stages:
        raise ValueError(
            f"state_bits=8: {', '.join(stages)} keeps its state in float32, float16 or "
            "bfloat16 (its state is not element-wise: 8-bit block quantization serves the "
            "element-wise rules' slots); use state_dtype"
        )
    names = None if slots is None else frozenset(slots)

    def init(params: Any) -> Any:
        outer = current_rule()  # (an enclosing low_precision_state's, for the other slots)

        def rule(name: str) -> Any:
            if names is None or name in names:
                return storage
            return outer(name) if outer is not None else None

        with slot_storage(rule):
            return tx.init(params)

    # (the same update: its state spec, registered by update, is tx's)
    return GradientTransformation(init, tx.update, tx.plan)
