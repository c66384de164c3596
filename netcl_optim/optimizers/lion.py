"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the functional
``scale_by_lion`` and ``lion`` (optax's names and defaults), the stateful ``Lion``
(lion-pytorch's signature and defaults) and the key of its momentum in a state dict."""

from __future__ import annotations

__all__ = ["Lion", "ScaleByLionState", "lion", "scale_by_lion"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, UNIT, check
from ..fusion import storage_dtype
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# optax: sign((1 - b1) g + b1 m), then m <- (1 - b2) g + b2 m; a NaN stays NaN (OpenCL's
# sign() would make it 0)
_LION = """
const real c = one_minus_b1 * u + b1 * mu;
mu = one_minus_b2 * u + b2 * mu;
u = ISNAN(c) ? c : SIGN(c);
"""


class ScaleByLionState(NamedTuple):
    """The number of updates and the momentum ``mu`` (shaped like the params)."""

    count: int
    mu: Any


# lion-pytorch keeps the momentum as "exp_avg" (and no step count)
LION_MOMENTUM = torch_state(ScaleByLionState, mu="exp_avg", count="exp_avg")


def scale_by_lion(
    b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None
) -> GradientTransformation:
    """Lion's scaling (optax's ``scale_by_lion``, its default ``mode="hard"``)::

        u <- sign((1 - b1) g + b1 m);  m <- (1 - b2) g + b2 m

    The momentum starts at zero; a NaN in ``(1 - b1) g + b1 m`` gives a NaN update (as
    ``jnp.sign``). ``mu_dtype``:
    the first moment stored as ``mu_dtype`` (float32, bfloat16, float16); optax's
    ``"smooth"`` and ``"refined"`` modes are not offered.

    Device: one slot (``mu``), fused like every element-wise transform.
    """
    check(UNIT, b1=b1, b2=b2)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    b1, b2 = float(b1), float(b2)

    def host_step(state: ScaleByLionState, **_: Any):
        return (1.0 - b1, b1, 1.0 - b2, b2), state._replace(count=state.count + 1)

    fragment = Fragment(
        "scale_by_lion",
        _LION,
        slots=("mu",),
        scalars=("one_minus_b1", "b1", "one_minus_b2", "b2"),
        host_step=host_step,
    )
    tx = elementwise(fragment, init=lambda mu: ScaleByLionState(count=0, mu=mu))
    return low_precision_state(tx, mu_dtype, slots=("mu",))


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: float = 1e-3,
    mask: Any = None,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Lion with decoupled weight decay (optax's ``lion``)::

        g <- -g                                         (if maximize)
        u <- sign((1 - b1) g + b1 m);  m <- (1 - b2) g + b2 m
        p <- p - lr * (u + weight_decay * p)

    ``chain(scale_by_lion, add_decayed_weights(weight_decay, mask), scale_by_learning_rate)``,
    with optax's signature and defaults (``mu_dtype``: see :func:`scale_by_lion`). Lion wants
    a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    return optimizer_chain(
        scale_by_lion(b1, b2, mu_dtype),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        decoupled=True,
        mask=mask,
        maximize=maximize,
        state_dtype=state_dtype,
        state_bits=state_bits,
    )


class Lion(Optimizer):
    """Lion (lion-pytorch's ``Lion``; the maths is :func:`netcl_optim.lion`)::

        g <- -g                                         (if maximize)
        u <- sign((1 - b1) g + b1 m);  m <- (1 - b2) g + b2 m
        p <- p - lr * (u + weight_decay * p)

    torch.optim has no Lion. lion-pytorch decays first (``p <- p * (1 - lr wd)``, then
    ``p <- p - lr u``), which rounds differently from optax's order used here.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-4).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.99)).
      weight_decay: decoupled decay, >= 0 (default 0; the functional ``lion``'s is 1e-3).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``exp_avg`` (the momentum), as lion-pytorch.
    """

    hyperparameters = (
        torch_lr(1e-4),
        Hyperparameter("betas", (0.9, 0.99), BETAS.rule),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (LION_MOMENTUM, DECAY_COUNT)
    torch_step = False

    @staticmethod
    def functional(
        lr: Any, betas: tuple[float, float], weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return lion(lr, betas[0], betas[1], weight_decay=weight_decay, maximize=maximize)
