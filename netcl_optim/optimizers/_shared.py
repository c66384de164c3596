"""What the optimizer families share: the chain every alias builds around its core
(``maximize``, weight decay, learning rate) and torch's count for weight decay's state."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree

from .. import _validation
from .._base import GradientTransformation, ScalarOrSchedule
from .._validation import BOOL, NON_NEGATIVE, check, require
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import chain
from ..transforms._scaling import scale, scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import AddDecayedWeightsState, add_decayed_weights

# add_decayed_weights counts its updates (for a weight_decay schedule): torch's step count
DECAY_COUNT = torch_state(AddDecayedWeightsState, count=STEP)


def ascent(maximize: bool) -> list[GradientTransformation]:
    """The head of a chain for torch's ``maximize``: ``[scale(-1.0)]`` (``u <- -u``, fused
    into the step's kernel; ``u * -1`` only flips the sign, bit for bit torch's ``-grad``)
    when ``maximize``, else nothing."""
    return [scale(-1.0)] if require("maximize", maximize, BOOL) else []


def check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
    """A float learning rate >= 0, or a schedule (checked when evaluated)."""
    _validation.learning_rate("learning_rate", learning_rate)


def optimizer_chain(
    *core: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    mask: Any = None,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """``chain([scale(-1)], [add_decayed_weights], *core, [add_decayed_weights],
    scale_by_learning_rate)``: the negation for ``maximize``, torch's coupled L2 decay
    (``g + wd p``) before ``core`` or the decoupled one (``u + wd p``) after it (``mask`` for
    either), what is zero or off left out, its state stored as ``state_dtype`` or in
    ``state_bits`` (see :func:`netcl_optim.low_precision_state`). Checks the learning rate
    and the weight decay."""
    _validation.learning_rate("learning_rate", learning_rate)
    check(NON_NEGATIVE, weight_decay=weight_decay)
    decay = [add_decayed_weights(weight_decay, mask)] if weight_decay else []
    before, after = ([], decay) if require("decoupled", decoupled, BOOL) else (decay, [])
    tx = chain(*ascent(maximize), *before, *core, *after, scale_by_learning_rate(learning_rate))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


# The host scalars of an optax-style two-moment rule (AdaBelief; optax's Adam, which
# optimistic_adam_v2 uses): the bias corrections' reciprocals, the next step's for nesterov.
MOMENT_SCALARS = (
    "one_minus_b1",
    "b1",
    "one_minus_b2",
    "b2",
    "inv_bc1",
    "inv_bc1_next",
    "inv_bc2",
    "eps",
    "eps_root",
)


def moment_host_step(b1: float, b2: float, eps: float, eps_root: float) -> Any:
    """The ``host_step`` giving :data:`MOMENT_SCALARS` for a state with a ``count``."""

    def host_step(state: Any, **_: Any) -> tuple[tuple[float, ...], Any]:
        t = state.count + 1
        values = (
            1.0 - b1,
            b1,
            1.0 - b2,
            b2,
            1.0 / (1.0 - b1**t),
            1.0 / (1.0 - b1 ** (t + 1)),
            1.0 / (1.0 - b2**t),
            eps,
            eps_root,
        )
        return values, state._replace(count=t)

    return host_step


def adam_step_scale(b1: float, b2: float, t: int, tree: Any) -> float:
    """optax.contrib's ``sqrt(1 - b2^t) / (1 - b1^t)`` (Prodigy, D-Adaptation) in the
    precision of the state ``tree``'s arrays, as jax computes it: float64 where they are
    float64, else float32."""
    wide = any(getattr(x, "dtype", None) == np.float64 for x in optree.tree_leaves(tree))
    dt = np.float64 if wide else np.float32
    with np.errstate(all="ignore"):
        return float(np.sqrt(dt(1) - dt(b2) ** dt(t)) / (dt(1) - dt(b1) ** dt(t)))
