"""scale_by_adam and scale_by_rms, with torch's placement of eps."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation
from .._validation import NON_NEGATIVE, POSITIVE, UNIT, check
from ._combining import elementwise

# torch: exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2);
# denom = sqrt(v) / sqrt(bc2) + eps; update = (m / bc1) / denom (reciprocals from the host:
# one division per element keeps the kernel memory-bound even in cache)
_ADAM = """
mu = LERP(mu, u, one_minus_b1);
nu = nu * b2 + one_minus_b2 * u * u;
u = (mu * inv_bc1) / (SQRT(nu) * inv_sqrt_bc2 + eps);
"""
# optax with eps_root: sqrt(nu_hat + eps_root) + eps
_ADAM_EPS_ROOT = """
mu = LERP(mu, u, one_minus_b1);
nu = nu * b2 + one_minus_b2 * u * u;
u = (mu * inv_bc1) / (SQRT(nu * inv_bc2 + eps_root) + eps);
"""


class ScaleByAdamState(NamedTuple):
    """Step count and the first (``mu``) and second (``nu``) moment estimates."""

    count: int
    mu: Any
    nu: Any


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's scaling: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``u <- (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)`` (torch's eps placement;
    with ``eps_root``, ``sqrt(v / (1-b2^t) + eps_root) + eps`` as optax). See :func:`adam`.

    Device: two slots (``mu``, ``nu``) packed per dtype; bias corrections are computed on
    the host from the step count and passed as kernel arguments.
    """
    check(UNIT, b1=b1, b2=b2)
    check(POSITIVE, eps=eps)
    check(NON_NEGATIVE, eps_root=eps_root)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)

    def host_step(state: ScaleByAdamState, **_: Any):
        t = state.count + 1
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        values = (1.0 - b1, b2, 1.0 - b2, 1.0 / bc1, 1.0 / bc2, 1.0 / math.sqrt(bc2), eps, eps_root)
        return values, state._replace(count=t)

    fragment = Fragment(
        "scale_by_adam",
        _ADAM_EPS_ROOT if eps_root else _ADAM,
        slots=("mu", "nu"),
        nonnegative=("nu",),
        scalars=(
            "one_minus_b1",
            "b2",
            "one_minus_b2",
            "inv_bc1",
            "inv_bc2",
            "inv_sqrt_bc2",
            "eps",
            "eps_root",
        ),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda mu, nu: ScaleByAdamState(count=0, mu=mu, nu=nu))


# torch RMSprop: square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha); avg = sqrt(v) + eps
_RMS = """
nu = nu * alpha + one_minus_alpha * u * u;
u = u / (SQRT(nu) + eps);
"""
# centered: grad_avg.lerp_(g, 1 - alpha); avg = sqrt(v - gavg^2) + eps
_RMS_CENTERED = """
nu = nu * alpha + one_minus_alpha * u * u;
mu = LERP(mu, u, one_minus_alpha);
u = u / (SQRT(nu - mu * mu) + eps);
"""


class ScaleByRmsState(NamedTuple):
    """Running average of squared updates."""

    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """Running averages of updates (``mu``) and squared updates (``nu``), for centered RMS."""

    mu: Any
    nu: Any


def scale_by_rms(
    alpha: float = 0.99, eps: float = 1e-8, centered: bool = False
) -> GradientTransformation:
    """RMSProp's scaling (torch): ``v <- alpha v + (1-alpha) g^2``, ``u <- g / (sqrt(v) + eps)``;
    ``centered`` keeps ``m <- alpha m + (1-alpha) g`` and uses ``sqrt(v - m^2) + eps``.
    No bias correction; buffers start at zero. See :func:`rmsprop`.
    """
    check(UNIT, alpha=alpha)
    check(POSITIVE, eps=eps)
    values = (float(alpha), 1.0 - float(alpha), float(eps))
    scalars = ("alpha", "one_minus_alpha", "eps")
    if centered:
        fragment = Fragment(
            "scale_by_stddev",
            _RMS_CENTERED,
            slots=("mu", "nu"),
            nonnegative=("nu",),
            scalars=scalars,
            host_step=lambda state, **_: (values, state),
        )
        return elementwise(fragment, init=lambda mu, nu: ScaleByRStdDevState(mu=mu, nu=nu))
    fragment = Fragment(
        "scale_by_rms",
        _RMS,
        slots=("nu",),
        nonnegative=("nu",),
        scalars=scalars,
        host_step=lambda state, **_: (values, state),
    )
    return elementwise(fragment, init=lambda nu: ScaleByRmsState(nu=nu))
