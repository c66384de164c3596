"""Data parallel on N ranks, each with 1/N of every batch, equals one process on the full
batch (to float32 rounding): a small MLP, gradients in NumPy, Adam on the device."""

from __future__ import annotations

import numpy as np
from _util import COMM, RANK, SIZE, check, log, run

import netcl_optim as no
import netcl_optim.distributed as dist


def grads_of(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Mean squared error of a one-hidden-layer tanh MLP, averaged over the batch."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    err = (h @ p["w2"] + p["b2"] - y) * (2.0 / len(x))
    dh = (err @ p["w2"].T) * (1 - h * h)
    g = {"w2": h.T @ err, "b2": err.sum(0), "w1": x.T @ dh, "b1": dh.sum(0)}
    return {k: v.astype(np.float32) for k, v in g.items()}


def main() -> None:
    rng = np.random.default_rng(0)
    batch = 32 * SIZE
    x = rng.standard_normal((20, batch, 6)).astype(np.float32)
    y = rng.standard_normal((20, batch, 2)).astype(np.float32)
    init = {
        "w1": (rng.standard_normal((6, 16)) * 0.4).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "w2": (rng.standard_normal((16, 2)) * 0.4).astype(np.float32),
        "b2": np.zeros(2, np.float32),
    }
    lo, hi = RANK * batch // SIZE, (RANK + 1) * batch // SIZE

    tx = no.adam(1e-2)
    dp_tx = no.chain(dist.allreduce_gradients(comm=COMM), tx)
    ref = no.pack(no.to_device(init))
    dp = dist.broadcast_parameters(no.to_device(init), COMM)
    ref_state, dp_state = tx.init(ref), dp_tx.init(dp)
    worst_grad = worst_param = 0.0
    for step in range(20):
        g_full = grads_of(no.to_host(ref), x[step], y[step])
        g_half = grads_of(no.to_host(dp), x[step, lo:hi], y[step, lo:hi])
        if step == 0:
            mean = no.to_host(dist.allreduce(no.to_device(g_half), COMM))
            for k in g_full:
                err = float(np.abs(mean[k] - g_full[k]).max())
                worst_grad = max(worst_grad, err)
                check(np.allclose(mean[k], g_full[k], rtol=1e-5, atol=1e-6), f"grad {k}: {err}")
        ref, ref_state = no.step(tx, ref, no.to_device(g_full), ref_state)
        dp, dp_state = no.step(dp_tx, dp, no.to_device(g_half), dp_state)
    a, b = no.to_host(ref), no.to_host(dp)
    for k in a:
        err = float(np.abs(a[k] - b[k]).max())
        worst_param = max(worst_param, err)
        check(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"param {k} after 20 steps: {err}")
    log(f"max |mean grad - full-batch grad| {worst_grad:.2e}; max |dp - single| {worst_param:.2e}")


run(main)
