"""Fit a least-squares model with the functional API: ``python -m netcl_optim.examples.quickstart``.

The gradient is computed on the host here to keep the example tiny; the optimizer step runs
on the default OpenCL device as one fused kernel.
"""

from __future__ import annotations

import numpy as np

import netcl_optim as no


def main(steps: int = 200) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    true_w = rng.standard_normal(8).astype(np.float32)
    y = x @ true_w + 0.5
    params = no.pack(no.to_device({"w": np.zeros(8, np.float32), "b": np.zeros(1, np.float32)}))
    tx = no.chain(no.clip_by_global_norm(10.0), no.adamw(learning_rate=5e-2, weight_decay=0.0))
    state = tx.init(params)
    for _ in range(steps):
        host = no.to_host(params)
        err = x @ host["w"] + host["b"] - y
        grads = {
            "w": (x.T @ err / len(x)).astype(np.float32),
            "b": np.array([err.mean()], np.float32),
        }
        params, state = no.step(tx, params, no.to_device(grads), state)
    host = no.to_host(params)
    loss = float(np.mean((x @ host["w"] + host["b"] - y) ** 2))
    print(f"device: {no.default_queue().device.name.strip()}")
    print(
        f"loss after {steps} AdamW steps: {loss:.2e}; max |w - w*| = "
        f"{np.abs(host['w'] - true_w).max():.2e}"
    )
    return loss


if __name__ == "__main__":
    main()
