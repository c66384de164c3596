"""Float64 numpy reference of torch.optim.LBFGS (torch 2.13's algorithm; torch 2.14's
``maximize``), both line-search settings, for tests/test_lbfgs_torch.py.

Written from torch/optim/lbfgs.py: the same operations in the same order on flat numpy
vectors. Where torch holds a 0-d tensor the reference holds an ``np.float64`` and where it
holds a Python number a Python number, so that ``number / tensor`` can be torch's
``tensor.reciprocal() * number`` (:func:`tdiv`); every other scalar operation rounds the
same in float64 either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

T = np.float64  # torch's 0-d float64 tensor


def tdiv(a: Any, b: Any) -> Any:
    """``a / b`` with torch's rule for a number over a tensor."""
    if isinstance(b, np.floating) and not isinstance(a, np.floating):
        return (T(1) / b) * a
    return a / b


def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """The clipped minimiser of the cubic through two points with slopes (torch's)."""
    if bounds is None:
        lo, hi = (x1, x2) if x1 <= x2 else (x2, x1)
    else:
        lo, hi = bounds
    d1 = g1 + g2 - tdiv(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if not d2_square >= 0:
        return (lo + hi) / 2.0
    d2 = np.sqrt(d2_square)
    if x1 <= x2:
        m = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        m = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(m, lo), hi)


def strong_wolfe(obj, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch's strong Wolfe line search; ``obj(x, t, d) -> (f, g)``. Returns
    ``(f, g, t, evaluations)``."""
    d_norm = T(np.max(np.abs(d)))
    f_new, g_new = obj(x, t, d)
    n_evals = 1
    gtd_new = T(g_new @ d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done, ls_iter = False, 0
    br = bf = bg = bd = None
    while ls_iter < max_ls:
        armijo_fails = f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev)
        if armijo_fails or (not abs(gtd_new) <= -c2 * gtd and gtd_new >= 0):
            br, bf, bg, bd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            br, bf, bg, done = [t], [f_new], [g_new], True
            break
        lo, hi = t + 0.01 * (t - t_prev), t * 10
        t_old = t
        t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(lo, hi))
        t_prev, f_prev, g_prev, gtd_prev = t_old, f_new, g_new, gtd_new
        f_new, g_new = obj(x, t, d)
        n_evals += 1
        gtd_new = T(g_new @ d)
        ls_iter += 1
    if ls_iter == max_ls:
        br, bf, bg = [0, t], [f, f_new], [g, g_new]
    insuf = False
    lo_i, hi_i = (0, 1) if bf[0] <= bf[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(br[1] - br[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(br[0], bf[0], bd[0], br[1], bf[1], bd[1])
        top, bottom = max(br), min(br)
        eps = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < eps:
            if insuf or t >= top or t <= bottom:
                t = top - eps if abs(t - top) < abs(t - bottom) else bottom + eps
                insuf = False
            else:
                insuf = True
        else:
            insuf = False
        f_new, g_new = obj(x, t, d)
        n_evals += 1
        gtd_new = T(g_new @ d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bf[lo_i]:
            br[hi_i], bf[hi_i], bg[hi_i], bd[hi_i] = t, f_new, g_new, gtd_new
            lo_i, hi_i = (0, 1) if bf[0] <= bf[1] else (1, 0)
            continue
        if abs(gtd_new) <= -c2 * gtd:
            done = True
        elif gtd_new * (br[hi_i] - br[lo_i]) >= 0:
            br[hi_i], bf[hi_i], bg[hi_i], bd[hi_i] = br[lo_i], bf[lo_i], bg[lo_i], bd[lo_i]
        br[lo_i], bf[lo_i], bg[lo_i], bd[lo_i] = t, f_new, g_new, gtd_new
    return bf[lo_i], bg[lo_i], br[lo_i], n_evals


class LBFGSReference:
    """torch.optim.LBFGS over one flat float64 vector ``x`` (updated in place).
    ``step(fg)``: ``fg(x) -> (loss, grad)``; returns the first loss. ``state``: torch's."""

    def __init__(self, x: np.ndarray, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None,
                 maximize=False):  # fmt: skip
        self.x = x
        self.lr, self.max_iter = lr, max_iter
        self.max_eval = max_iter * 5 // 4 if max_eval is None else max_eval
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.history_size, self.line_search_fn = history_size, line_search_fn
        self.maximize = maximize
        self.state: dict[str, Any] = {}

    def _eval(self, fg: Callable) -> tuple[float, np.ndarray]:
        f, g = fg(self.x)
        f, g = float(f), np.array(g, np.float64)
        return (-f, -g) if self.maximize else (f, g)

    def step(self, fg: Callable) -> float:
        st = self.state
        st.setdefault("func_evals", 0)
        st.setdefault("n_iter", 0)
        loss, flat_grad = self._eval(fg)
        orig = -loss if self.maximize else loss
        evals = 1
        st["func_evals"] += 1
        if T(np.max(np.abs(flat_grad))) <= self.tolerance_grad:
            return orig
        d, t = st.get("d"), st.get("t")
        old_dirs, old_stps, ro = st.get("old_dirs"), st.get("old_stps"), st.get("ro")
        h_diag, prev_g, prev_loss = st.get("H_diag"), st.get("prev_flat_grad"), st.get("prev_loss")
        n_iter = 0
        while n_iter < self.max_iter:
            n_iter += 1
            st["n_iter"] += 1
            if st["n_iter"] == 1:
                d = -flat_grad
                old_dirs, old_stps, ro, h_diag = [], [], [], 1
            else:
                y = flat_grad - prev_g
                s = d * t
                ys = T(y @ s)
                if ys > 1e-10:
                    if len(old_dirs) == self.history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(tdiv(1.0, ys))
                    h_diag = ys / T(y @ y)
                k = len(old_dirs)
                al = st.setdefault("al", [None] * self.history_size)
                q = -flat_grad
                for i in range(k - 1, -1, -1):
                    al[i] = T(old_stps[i] @ q) * ro[i]
                    q = q + (-al[i]) * old_dirs[i]
                d = q * h_diag
                for i in range(k):
                    be = T(old_dirs[i] @ d) * ro[i]
                    d = d + (al[i] - be) * old_stps[i]
            prev_g = flat_grad.copy()
            prev_loss = loss
            if st["n_iter"] == 1:
                t = min(1.0, tdiv(1.0, T(np.sum(np.abs(flat_grad))))) * self.lr
            else:
                t = self.lr
            gtd = T(flat_grad @ d)
            if gtd > -self.tolerance_change:
                break
            n_ls = 0
            if self.line_search_fn is not None:
                x_init = self.x.copy()

                def obj(x, t_, d_):
                    self.x[:] = x + t_ * d_
                    out = self._eval(fg)
                    self.x[:] = x
                    return out

                loss, flat_grad, t, n_ls = strong_wolfe(obj, x_init, t, d, loss, flat_grad, gtd,
                                                        max_ls=self.max_eval - evals)  # fmt: skip
                self.x[:] = self.x + t * d
                opt_cond = T(np.max(np.abs(flat_grad))) <= self.tolerance_grad
            else:
                self.x[:] = self.x + t * d
                opt_cond = False
                if n_iter != self.max_iter:
                    loss, flat_grad = self._eval(fg)
                    opt_cond = T(np.max(np.abs(flat_grad))) <= self.tolerance_grad
                    n_ls = 1
            evals += n_ls
            st["func_evals"] += n_ls
            if n_iter == self.max_iter or evals >= self.max_eval or opt_cond:
                break
            if T(np.max(np.abs(d * t))) <= self.tolerance_change:
                break
            if abs(loss - prev_loss) < self.tolerance_change:
                break
        st.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                  prev_flat_grad=prev_g, prev_loss=prev_loss)  # fmt: skip
        return orig
