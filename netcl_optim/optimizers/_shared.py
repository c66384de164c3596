"""What the optimizer families share: torch's ``maximize`` as the head of a chain, and
torch's count for weight decay's state."""

from __future__ import annotations

from .._base import GradientTransformation
from .._validation import BOOL, require
from ..stateful._torch_state import STEP, torch_state
from ..transforms._scaling import scale
from ..transforms._weight_decay import AddDecayedWeightsState

# add_decayed_weights counts its updates (for a weight_decay schedule): torch's step count
DECAY_COUNT = torch_state(AddDecayedWeightsState, count=STEP)


def ascent(maximize: bool) -> list[GradientTransformation]:
    """The head of a chain for torch's ``maximize``: ``[scale(-1.0)]`` (``u <- -u``, fused
    into the step's kernel; ``u * -1`` only flips the sign, bit for bit torch's ``-grad``)
    when ``maximize``, else nothing."""
    return [scale(-1.0)] if require("maximize", maximize, BOOL) else []
