"""stochastic_rounding: bfloat16 params and state written with stochastic rounding."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation
from .._validation import int_in, require
from ._combining import elementwise

# The params' new value p + u, rounded to bfloat16 at random: its low 16 bits plus 16 random
# bits, truncated (up with probability low / 2^16: torchao's bf16_stochastic_round), and the
# update made exactly that value minus p, so that the step's store (round to nearest even)
# writes it. Other params dtypes: nothing (the kernel defines PARAMS_BF16 for bfloat16).
_ROUND = """
#ifdef PARAMS_BF16
const uint4 sr_bits = philox4x32_10(
    (uint4)((uint)idx, (uint)(idx >> 32), WORD16(t_lo, t_hi), 0x53520000u),
    (uint2)(WORD16(key0_lo, key0_hi), WORD16(key1_lo, key1_hi)));
const float sr_x = p + u;
const float sr_r = as_float((as_uint(sr_x) + (sr_bits.x & 0xffffu)) & 0xffff0000u);
u = ISNAN(sr_x) ? u : sr_r - p;
#endif
"""

SEED = int_in(0, 2**64)


class StochasticRoundingState(NamedTuple):
    """The number of steps (the generator's counter is ``count + 1``)."""

    count: int


def _halves(word: int) -> tuple[float, float]:
    return float(word & 0xFFFF), float(word >> 16)


def stochastic_rounding(seed: int = 0) -> GradientTransformation:
    """Write bfloat16 params, and the chain's bfloat16 state, with stochastic rounding (the
    last transform of a chain run by :func:`netcl_optim.step` or a stateful optimizer)::

        t <- t + 1;  r <- p + u rounded to bfloat16 up or down, up with probability
        (its distance from the value below) / (the gap between them);  u <- r - p

    and every state slot stored as bfloat16 (``low_precision_state(tx, "bfloat16")``) is
    rounded the same way from its float32 value. Params and state of other dtypes are
    written as without it (float16 state rounds to nearest even).

    The random bits are Philox-4x32-10 of (element index, t) under ``seed`` (one draw for
    the params, another for up to 8 state slots): the same bits whether the tree is
    packed, stepped leaf by leaf, sharded or resumed from a checkpoint. Rounding in
    expectation keeps the small updates that round to nearest even would drop (bfloat16
    has 8 significant bits). ``tx.update`` alone returns bfloat16 updates, which
    ``apply_updates`` adds rounding to nearest even: step with :func:`netcl_optim.step`.
    8-bit state is quantized as without it.
    """
    key = require("seed", seed, SEED)
    key0, key1 = key & 0xFFFFFFFF, key >> 32

    def host_step(state: StochasticRoundingState, **_: Any):
        t = state.count + 1
        return (*_halves(key0), *_halves(key1), *_halves(t & 0xFFFFFFFF)), state._replace(count=t)

    fragment = Fragment(
        "stochastic_rounding",
        _ROUND,
        scalars=("key0_lo", "key0_hi", "key1_lo", "key1_hi", "t_lo", "t_hi"),
        host_step=host_step,
        needs_params=True,
        element_index=True,
        rounds_state=True,
    )
    return elementwise(fragment, init=lambda: StochasticRoundingState(count=0))
