"""Float64 numpy references of optax 0.2.8's ``scale_by_lbfgs`` and
``scale_by_backtracking_linesearch`` (optax's order of operations), on flat vectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LBFGSRef:
    """``scale_by_lbfgs(memory_size, scale_init_precond)`` on flat float64 vectors."""

    n: int
    memory_size: int = 10
    scale_init_precond: bool = True
    count: int = 0
    params: np.ndarray = field(init=False)
    updates: np.ndarray = field(init=False)
    dw: np.ndarray = field(init=False)
    du: np.ndarray = field(init=False)
    rho: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        m = self.memory_size
        self.params, self.updates = np.zeros(self.n), np.zeros(self.n)
        self.dw, self.du, self.rho = np.zeros((m, self.n)), np.zeros((m, self.n)), np.zeros(m)

    def update(self, u: np.ndarray, w: np.ndarray) -> np.ndarray:
        m, k = self.memory_size, self.count
        prev, start = (k - 1) % m, k % m
        if k > 0:
            dw, du = w - self.params, u - self.updates
            vdot = du @ dw
            weight = 0.0 if vdot == 0 else 1.0 / vdot
        else:
            dw, du, vdot, weight = np.zeros(self.n), np.zeros(self.n), 0.0, 0.0
        self.dw[prev], self.du[prev], self.rho[prev] = dw, du, weight
        if not self.scale_init_precond:
            gamma = 1.0
        elif k > 0:
            sq = du @ du
            gamma = vdot / sq if sq > 0 else 1.0
        else:
            with np.errstate(divide="ignore"):
                gamma = min(1.0, 1.0 / np.sqrt(u @ u))
        v = u.copy()
        order = [(start + j) % m for j in range(m)]
        alphas = {}
        for i in reversed(order):
            alphas[i] = self.rho[i] * (self.dw[i] @ v)
            v = v - alphas[i] * self.du[i]
        v = gamma * v
        for i in order:
            beta = self.rho[i] * (self.du[i] @ v)
            v = v + (alphas[i] - beta) * self.dw[i]
        self.count += 1
        self.params, self.updates = w.copy(), u.copy()
        return v


@dataclass
class BacktrackingRef:
    """``scale_by_backtracking_linesearch`` in float64; ``value_fn(w) -> value``."""

    max_backtracking_steps: int
    slope_rtol: float = 1e-4
    decrease_factor: float = 0.8
    increase_factor: float = 1.5
    max_learning_rate: float = 1.0
    atol: float = 0.0
    rtol: float = 0.0
    learning_rate: float = 1.0
    value: float = np.inf
    steps: int = 0

    def update(
        self, u: np.ndarray, w: np.ndarray, value: float, grad: np.ndarray,
        value_fn: Callable[[np.ndarray], float],
    ) -> np.ndarray:  # fmt: skip
        slope = u @ grad
        lr = min(self.increase_factor * self.learning_rate, self.max_learning_rate)
        error, trials, new_value = np.inf, 0, value
        while not (error <= self.atol) and trials <= self.max_backtracking_steps:
            if trials > 0:
                lr = self.decrease_factor * lr
            new_value = value_fn(w + lr * u)
            error = new_value - (1.0 + self.rtol) * value - lr * self.slope_rtol * slope
            error = np.inf if np.isnan(error) else max(error, 0.0)
            trials += 1
        self.learning_rate = 0.0 if np.isinf(error) else lr
        self.value, self.steps = new_value, trials
        return self.learning_rate * u


def run_lbfgs(
    w0: np.ndarray, value_and_grad: Callable, iterations: int, *, memory_size: int = 10,
    learning_rate: float | None = None, linesearch: BacktrackingRef | None = None,
) -> list[np.ndarray]:  # fmt: skip
    """The iterates of ``lbfgs(learning_rate, memory_size, linesearch=...)`` (float64)."""
    opt = LBFGSRef(w0.size, memory_size)
    w, out = w0.copy(), []
    for _ in range(iterations):
        value, g = value_and_grad(w)
        d = opt.update(g, w)
        d = -d if learning_rate is None else -learning_rate * d
        if linesearch is not None:
            d = linesearch.update(d, w, value, g, lambda x: value_and_grad(x)[0])
        w = w + d
        out.append(w.copy())
    return out
