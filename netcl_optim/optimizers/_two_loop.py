"""L-BFGS's two-loop recursion on the device (Nocedal & Wright, Algorithm 7.4), shared by
torch's ``LBFGS`` and optax's ``scale_by_lbfgs``: the product of a vector with the inverse
Hessian approximation of the stored pairs, every scalar kept in the registers of a
:class:`~netcl_optim.fusion._vectors.Vectors`."""

from __future__ import annotations

from collections.abc import Sequence

import pyopencl.array as cla

from ..fusion._vectors import Coef, Vectors, coef


def two_loop(
    vectors: Vectors,
    v: cla.Array,
    pairs: Sequence[tuple[cla.Array, cla.Array]],
    rho: Sequence[Coef],
    gamma: Coef,
    alpha: int,
    beta: int,
) -> None:
    """``v <- H v`` in place, for the pairs ``(s_i, y_i)`` (oldest first), ``rho_i =
    1 / (y_i . s_i)`` and ``H_0 = gamma I``::

        for i = k-1 .. 0:  alpha_i = (s_i . v) * rho_i;  v -= alpha_i y_i
        v *= gamma
        for i = 0 .. k-1:  beta = (y_i . v) * rho_i;  v += (alpha_i - beta) s_i

    ``alpha_i`` is left in register ``alpha + i`` and the last ``beta`` in register
    ``beta``. Each ``v -= ...`` and ``v += ...`` runs in the pass of the next dot product:
    ``4k + 3`` launches, ``2k + 1`` passes over ``v``, no host sync.
    """
    k = len(pairs)
    if k == 0:
        vectors.scale(v, v, gamma)
        return
    vectors.dot(v, pairs[k - 1][0], alpha + k - 1, times=rho[k - 1])
    for i in range(k - 2, -1, -1):
        step = (pairs[i + 1][1], coef(minus=alpha + i + 1))
        vectors.dot(v, pairs[i][0], alpha + i, times=rho[i], axpy=step)
    vectors.axpy(v, pairs[0][1], coef(minus=alpha))
    vectors.scale(v, v, gamma)
    vectors.dot(v, pairs[0][1], beta, times=rho[0])
    for i in range(1, k):
        step = (pairs[i - 1][0], coef(plus=alpha + i - 1, minus=beta))
        vectors.dot(v, pairs[i][1], beta, times=rho[i], axpy=step)
    vectors.axpy(v, pairs[k - 1][0], coef(plus=alpha + k - 1, minus=beta))
