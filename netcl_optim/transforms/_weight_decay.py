"""add_decayed_weights: ``u + weight_decay * p``."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, check
from ._combining import elementwise

_DECAY = "u = u + weight_decay * p;"


class AddDecayedWeightsState(NamedTuple):
    """Update count (for a ``weight_decay`` schedule)."""

    count: int


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None
) -> GradientTransformation:
    """``u <- u + weight_decay * p`` (needs params). ``weight_decay`` may be a schedule.

    ``mask`` (a pytree of bools like the params, or a callable of params) applies the decay
    only where it is True; see :func:`masked`.
    """
    check(NON_NEGATIVE, weight_decay=weight_decay)

    def host_step(state: AddDecayedWeightsState, **_: Any):
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
        return (float(wd),), AddDecayedWeightsState(state.count + 1)

    tx = elementwise(
        Fragment(
            "add_decayed_weights",
            _DECAY,
            scalars=("weight_decay",),
            host_step=host_step,
            needs_params=True,
        ),
        init=lambda: AddDecayedWeightsState(count=0),
    )
    if mask is None:
        return tx
    from ._masking import masked

    return masked(tx, mask)
