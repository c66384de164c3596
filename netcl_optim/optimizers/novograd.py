"""NovoGrad (Ginsburg et al., 2019, "Stochastic Gradient Methods with Layer-wise Adaptive
Moments for Training of Deep Networks"): the functional ``scale_by_novograd`` and
``novograd`` (optax's names, signatures and defaults) and the stateful ``NovoGrad``. Its
second moment is one number per leaf (a layer): the first rule here whose state is not
shaped like the params."""

from __future__ import annotations

__all__ = ["NovoGrad", "ScaleByNovogradState", "novograd", "scale_by_novograd"]

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule, SegmentReduction
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ..fusion import storage_dtype
from ..stateful._declaration import BETAS, KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ._shared import ascent, check_learning_rate


class ScaleByNovogradState(NamedTuple):
    """The number of updates, the first moment ``mu`` (shaped like the params) and ``nu``,
    one number per leaf (0-d arrays): the EMA of the leaf's ``||g||^2``."""

    count: int
    mu: Any
    nu: Any


# torch-optimizer's NovoGrad keeps "exp_avg" and the per-parameter scalar "exp_avg_sq"
NOVOGRAD_MOMENTS = torch_state(ScaleByNovogradState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")

# nu <- keep nu + add ||g||^2 per leaf (keep = 0, add = 1 at the first step), in the finish
_NU = SegmentReduction(
    terms=("u * u",),
    outputs=("nu_now",),
    finish=("nu",),
    state=("nu",),
    update=("add * s0 + keep * nu",),
)
_MU = "mu = b1 * mu + u / (SQRT(nu_now + eps_root) + eps);\nu = mu;\n"
_MU_DECAY = "mu = b1 * mu + (u / (SQRT(nu_now + eps_root) + eps) + weight_decay * p);\nu = mu;\n"


def scale_by_novograd(
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mu_dtype: Any = None,
) -> GradientTransformation:
    """NovoGrad's scaling (optax's ``scale_by_novograd``, same signature and defaults)::

        nu <- ||g||^2 at the first step, then b2 nu + (1 - b2) ||g||^2   (one per leaf)
        m  <- b1 m + g / (sqrt(nu + eps_root) + eps) + weight_decay * p
        u  <- m

    ``||g||`` is each leaf's norm, computed on the device in the same step (a reduction
    launch and a finishing launch that also updates ``nu``; see ``fusion/_segments.py``);
    ``nu`` is stored in the state's dtype (float32 for float16 and float32 leaves). A zero
    ``weight_decay`` is left out (optax adds ``0 * p``). ``mu_dtype``: the
    first moment stored as ``mu_dtype`` (float32, bfloat16, float16).
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root, weight_decay=weight_decay)
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)
    wd = float(weight_decay)

    def host_step(state: ScaleByNovogradState, **_: Any):
        first = state.count == 0
        keep, add = (0.0, 1.0) if first else (b2, 1.0 - b2)
        return (keep, add, b1, eps, eps_root, wd), state._replace(count=state.count + 1)

    fragment = Fragment(
        "scale_by_novograd",
        _MU_DECAY if wd else _MU,
        slots=("mu",),
        scalars=("keep", "add", "b1", "eps", "eps_root", "weight_decay"),
        host_step=host_step,
        needs_params=bool(wd),
        segment_reduction=_NU,
    )
    tx = elementwise(fragment, init=lambda mu, nu: ScaleByNovogradState(0, mu, nu))
    return low_precision_state(tx, mu_dtype, slots=("mu",))


def _novograd(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    check_learning_rate(learning_rate)
    return chain(
        *ascent(maximize),
        scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
        scale_by_learning_rate(learning_rate),
    )


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """NovoGrad (optax's ``novograd``: its signature, defaults and order of operations)::

        g  <- -g                                        (if maximize)
        nu <- ||g||^2 at the first step, then b2 nu + (1 - b2) ||g||^2   (per leaf)
        m  <- b1 m + g / (sqrt(nu + eps_root) + eps) + weight_decay * p
        p  <- p - lr * m

    ``chain(scale_by_novograd, scale_by_learning_rate)``. torch.optim has no NovoGrad;
    torch-optimizer's (``NovoGrad``) adds ``(1 - b1)`` to the gradient term and decays
    inside the normalised gradient, so its numbers differ.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _novograd(learning_rate, b1, b2, eps, eps_root, weight_decay, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class NovoGrad(Optimizer):
    """NovoGrad (the maths is :func:`netcl_optim.novograd`, optax's rule)::

        g  <- -g                                        (if maximize)
        nu <- ||g||^2 at the first step, then b2 nu + (1 - b2) ||g||^2   (per parameter)
        m  <- b1 m + g / (sqrt(nu + eps_root) + eps) + weight_decay * p
        p  <- p - lr * m

    torch.optim has no NovoGrad; torch-optimizer's differs (see :func:`novograd`).

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3).
      betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.25), optax's).
      eps: added to the denominator, > 0 (default 1e-6, optax's ``novograd``).
      weight_decay: added to the normalised gradient, >= 0 (default 0).
      eps_root: added to ``nu`` under the root, >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step``, ``exp_avg`` (m, shaped like the parameter) and
    ``exp_avg_sq`` (nu, a 0-d array), as torch-optimizer's NovoGrad.
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("betas", (0.9, 0.25), BETAS.rule),
        Hyperparameter("eps", 1e-6, POSITIVE),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        Hyperparameter("eps_root", 0.0, NON_NEGATIVE),
        MAXIMIZE,
    )
    torch_state = (NOVOGRAD_MOMENTS,)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        eps_root: float,
        maximize: bool,
    ) -> GradientTransformation:
        return _novograd(lr, betas[0], betas[1], eps, eps_root, weight_decay, maximize)
