"""Noisy SGD (Neelakantan et al., 2015, "Adding Gradient Noise Improves Learning for Very
Deep Networks"): the functional ``add_noise`` and ``noisy_sgd`` (optax's names, signatures
and defaults), the stateful ``NoisySGD`` and the torch-style key of its state.

The noise comes from a counter-based generator on the device (Philox-4x32-10, keyed by the
seed, counter (element index, step)): a run is reproducible, a resumed run continues bit for
bit, and a packed tree, its leaves stepped one by one and ZeRO's shards draw the same bits.
"""

from __future__ import annotations

__all__ = ["AddNoiseState", "NoisySGD", "add_noise", "noisy_sgd"]

import math
from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import NON_NEGATIVE, check, int_in, require
from ..stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from ..stateful._optimizer import Optimizer
from ..stateful._torch_state import STEP, torch_state
from ..transforms._combining import elementwise
from ..transforms._storage import low_precision_state
from ._shared import DECAY_COUNT, optimizer_chain

# optax: u <- u + sqrt(eta / t^gamma) N(0, 1). The normal is drawn from Philox-4x32-10 with
# key (seed's low, high 32 bits) and counter (element index's low, high 32 bits, t, 0); the
# key and t come as 16-bit halves, exact in any real scalar.
_NOISE = """
const uint4 bits = philox4x32_10(
    (uint4)((uint)idx, (uint)(idx >> 32), WORD16(t_lo, t_hi), 0u),
    (uint2)(WORD16(key0_lo, key0_hi), WORD16(key1_lo, key1_hi)));
u = u + noise_std * philox_normal(bits);
"""

SEED = int_in(0, 2**64)
_INT32_MAX = 2**31 - 1  # optax counts in int32 (numerics.safe_increment stops there)


class AddNoiseState(NamedTuple):
    """The number of updates (the noise's step ``t`` is ``count + 1``). optax's also holds
    the jax key it splits every step; here the seed stays in the transform, and the step
    count is the generator's counter."""

    count: int


# the step count is torch's "step"
NOISE_COUNT = torch_state(AddNoiseState, count=STEP)


def _seed(key: Any, seed: Any) -> int:
    """optax's ``key``/``seed`` pair as one integer seed (0 when neither is given)."""
    if seed is not None:
        if key is not None:
            raise ValueError("Only one of seed or key can be specified.")
        return require("seed", seed, SEED)
    return 0 if key is None else require("key", key, SEED)


def _halves(word: int) -> tuple[float, float]:
    return float(word & 0xFFFF), float(word >> 16)


def add_noise(
    eta: float, gamma: float, key: int | None = None, *, seed: int | None = None
) -> GradientTransformation:
    """Gradient noise (optax's ``add_noise``, same signature)::

        t <- t + 1;  u <- u + sqrt(eta / t^gamma) * N(0, 1)

    ``key`` is an integer seed in [0, 2^64) (``seed``: optax's deprecated spelling of it;
    neither given: 0, where optax warns). optax draws its noise with ``jax.random`` from a
    key it splits every step; here each element's normal is a pure function of (seed,
    element index, t): Philox-4x32-10 (Random123's, the key the seed's two 32-bit halves, the
    counter (index low, index high, t, 0)), then a normal in the compute type: for float16 and
    float32 the inverse normal CDF of a 32-bit uniform (Giles' erfinv approximation, within
    4e-7 relative; |z| up to 6.3), for float64 Box-Muller from two 53-bit uniforms. The element
    index is the element's position among the tree's leaves of its dtype, back to back in
    tree order. So the noise is not optax's numbers, only its distribution; the rest of the
    rule (``t``, the variance schedule) is optax's, and with ``eta=0`` the result is.

    Device: no slot; the standard deviation, the seed and ``t`` come from the host.
    """
    check(NON_NEGATIVE, eta=eta, gamma=gamma)
    eta, gamma = float(eta), float(gamma)
    key0, key1 = (s := _seed(key, seed)) & 0xFFFFFFFF, s >> 32

    def host_step(state: AddNoiseState, **_: Any):
        t = state.count + 1 if state.count < _INT32_MAX else state.count
        std = math.sqrt(eta / float(t) ** gamma)
        values = (std, *_halves(key0), *_halves(key1), *_halves(t))
        return values, state._replace(count=t)

    fragment = Fragment(
        "add_noise",
        _NOISE,
        scalars=("noise_std", "key0_lo", "key0_hi", "key1_lo", "key1_hi", "t_lo", "t_hi"),
        host_step=host_step,
        element_index=True,
    )
    return elementwise(fragment, init=lambda: AddNoiseState(count=0))


def _noisy_sgd(
    learning_rate: ScalarOrSchedule,
    eta: float,
    gamma: float,
    seed: int,
    weight_decay: float,
    maximize: bool,
) -> GradientTransformation:
    return optimizer_chain(
        add_noise(eta, gamma, seed),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def noisy_sgd(
    learning_rate: ScalarOrSchedule,
    eta: float = 0.01,
    gamma: float = 0.55,
    key: int | None = None,
    *,
    seed: int | None = None,
    maximize: bool = False,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """SGD with annealed Gaussian gradient noise (optax's ``noisy_sgd``: its signature,
    defaults and order of operations)::

        g <- -g                                         (if maximize)
        t <- t + 1;  p <- p - lr * (g + sqrt(eta / t^gamma) * N(0, 1))

    ``chain(add_noise(eta, gamma, key), scale_by_learning_rate)``. ``key``: an integer seed
    (see :func:`add_noise` for the generator and how it differs from optax's ``jax.random``
    noise). torch.optim has no noisy SGD.

    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`).
    """
    tx = _noisy_sgd(learning_rate, eta, gamma, _seed(key, seed), 0.0, maximize)
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


class NoisySGD(Optimizer):
    """SGD with annealed Gaussian gradient noise (the maths is :func:`netcl_optim.noisy_sgd`,
    optax's rule)::

        g <- -g                                         (if maximize)
        g <- g + weight_decay * p
        t <- t + 1;  p <- p - lr * (g + sqrt(eta / t^gamma) * N(0, 1))

    torch.optim has no noisy SGD: torch-style names, optax's noise defaults. The noise is a
    pure function of (seed, element index, t) (see :func:`netcl_optim.add_noise`), so a run
    is reproducible and a resumed run continues bit for bit.

    Args:
      params: parameters or param groups.
      lr: learning rate, > 0 (default 1e-3, torch's SGD's).
      eta: the noise's variance at t = 1, >= 0 (default 0.01, optax's).
      gamma: the variance decays as ``t^-gamma``, >= 0 (default 0.55, optax's).
      seed: the generator's seed, an int in [0, 2^64) (default 0).
      weight_decay: coupled L2 decay (``g + wd p``, torch's SGD's), >= 0 (default 0).
      maximize: maximize the objective (step along the gradient; default False).

    State per parameter: ``step`` (t).
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("eta", 0.01, NON_NEGATIVE),
        Hyperparameter("gamma", 0.55, NON_NEGATIVE),
        Hyperparameter("seed", 0, SEED),
        Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_state = (NOISE_COUNT, DECAY_COUNT)
    torch_step = True

    @staticmethod
    def functional(
        lr: Any, eta: float, gamma: float, seed: int, weight_decay: float, maximize: bool
    ) -> GradientTransformation:
        return _noisy_sgd(lr, eta, gamma, seed, weight_decay, maximize)
