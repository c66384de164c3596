"""Long float32 runs against torch.optim: the step-dependent host scalars (NAdam's
``mu_product``, RAdam's rectification, ASGD's ``eta``/``mu``) must be computed as torch
computes them for the trajectories to stay together over thousands of steps (issue 15).

One row id of ``tests/optimizer_table.py`` per case; add a row's id to ``LONG`` (its row must
name a ``torch`` class)."""

from __future__ import annotations

import numpy as np
import pytest
from optimizer_table import BY_ID

import netcl_optim as no

STEPS = 2000
LONG = [
    "nadam",
    "nadam-wd_coupled",
    "nadam-wd_decoupled",
    "radam",
    "radam-wd_coupled",
    "radam-wd_decoupled",
    "asgd",
    "asgd-wd_coupled",
]
SHAPES = {"w": (16, 9), "b": (7,)}


def _problem(seed: int = 0):
    """Start values and targets; the gradient is ``p - target`` plus fixed noise, so the
    params converge and rounding differences would show as drift."""
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    target = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    noise = {k: 0.1 * rng.standard_normal((STEPS, *s)).astype(np.float32)
             for k, s in SHAPES.items()}  # fmt: skip
    return p0, target, noise


@pytest.mark.parametrize("row_id", LONG)
def test_long_float32_parity_with_torch(cl_queue, row_id: str):
    torch = pytest.importorskip("torch")
    row = BY_ID[row_id]
    p0, target, noise = _problem()
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    topt = row.make_torch(torch, list(tparams.values()), foreach=False)
    tx = row.make(no)
    params = no.to_device(p0, cl_queue)
    state = tx.init(params)
    for k in range(STEPS):
        grads = {}
        for key, tp in tparams.items():
            g = (tp.detach().numpy() - target[key] + noise[key][k]).astype(np.float32)
            tp.grad = torch.from_numpy(g)
        topt.step()
        host = no.to_host(params)
        grads = {key: (host[key] - target[key] + noise[key][k]).astype(np.float32)
                 for key in SHAPES}  # fmt: skip
        params, state = no.step(tx, params, no.to_device(grads, cl_queue), state)
    got = no.to_host(params)
    for key, tp in tparams.items():
        want = tp.detach().numpy()
        moved = np.max(np.abs(want - p0[key]))
        np.testing.assert_allclose(
            got[key], want, rtol=1e-4, atol=1e-5 * moved, err_msg=f"{row_id}: {key}"
        )
    if row.torch == "NAdam":  # torch's float32 product, bit for bit
        b1, psi = row.full()["b1"], row.full()["momentum_decay"]
        for tp in tparams.values():
            want_prod = float(topt.state[tp]["mu_product"])
            assert no.optimizers.nadam.mu_product(b1, psi, STEPS) == want_prod
