"""The digits example: its MLP kernels against numpy, and short training runs."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import netcl_optim as no
from netcl_optim.examples import digits
from netcl_optim.examples._mlp import MLP, NAMES


def numpy_mlp(p: dict, x: np.ndarray, y: np.ndarray, seed: float = 1.0):
    """float64 reference: logits, per-row losses and the gradients of seed * mean loss."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float64)
    pre = x @ p["w1"] + p["b1"]
    h = np.maximum(pre, 0)
    z = h @ p["w2"] + p["b2"]
    zs = z - z.max(1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(1, keepdims=True))
    rows = np.arange(len(y))
    losses = -logp[rows, y]
    dz = np.exp(logp)
    dz[rows, y] -= 1
    dz *= seed / len(y)
    dh = dz @ p["w2"].T * (pre > 0)
    grads = {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ dz, "b2": dz.sum(0)}
    return z, losses, grads


def _batch(queue, n=50, dtype=np.float32):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return x, y, cla.to_device(queue, x.astype(dtype)), cla.to_device(queue, y)


@pytest.mark.parametrize("packed", [False, True], ids=["own-arrays", "optimizer-packed"])
def test_mlp_kernels_match_numpy(cl_queue, packed):
    model = MLP(seed=1, queue=cl_queue)
    if packed:  # the optimizer re-homes .data into views at offsets of one buffer
        no.AdamW(model.parameters(), lr=1e-3)
    x, y, xd, yd = _batch(cl_queue)
    off, rows = 7, 33
    losses = cla.zeros(cl_queue, (50,), np.float32)
    correct = cla.zeros(cl_queue, (50,), np.int32)
    logits = model.forward(xd, off, rows).get()
    grads = model.backward(yd, losses=losses, correct=correct, loss_scale=4.0)
    p = {k: v.get() for k, v in model.params().items()}
    z, ref_losses, ref_grads = numpy_mlp(p, x[off : off + rows], y[off : off + rows], 4.0)

    np.testing.assert_allclose(logits, z, rtol=1e-4, atol=1e-5)
    host_losses = losses.get()
    np.testing.assert_allclose(host_losses[off : off + rows], ref_losses, rtol=1e-4, atol=1e-6)
    assert not host_losses[:off].any() and not host_losses[off + rows :].any()
    np.testing.assert_array_equal(
        correct.get()[off : off + rows], z.argmax(1) == y[off : off + rows]
    )
    for k, ref in ref_grads.items():
        got = grads[k].get()
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max(), err_msg=k)
        assert model.parameters()[NAMES.index(k)].grad is grads[k]  # written to .grad


def test_mlp_explicit_params_and_grads_tree(cl_queue):
    model = MLP(seed=2, queue=cl_queue)
    params = no.pack(no.to_device({k: v.get() for k, v in model.params().items()}, cl_queue))
    grads = model.zero_grads_tree()
    x, y, xd, yd = _batch(cl_queue, n=20)
    model.forward(xd, params=params)
    out = model.backward(yd, grads=grads)
    assert out is grads and all(p.grad is None for p in model.parameters())
    _, _, ref = numpy_mlp({k: v.get() for k, v in params.items()}, x, y)
    for k in ref:
        np.testing.assert_allclose(grads[k].get(), ref[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_mlp_half_activations_close_to_numpy(cl_queue):
    model = MLP(seed=1, queue=cl_queue, half_activations=True)
    x, y, xd, yd = _batch(cl_queue, dtype=np.float16)
    model.forward(xd)
    grads = model.backward(yd, loss_scale=1024.0)
    p = {k: v.get() for k, v in model.params().items()}
    _, _, ref = numpy_mlp(p, x.astype(np.float16).astype(np.float32), y, 1024.0)
    for k in ref:  # half storage of activations: ~1e-3 relative error
        err = np.abs(grads[k].get() - ref[k]).max() / np.abs(ref[k]).max()
        assert err < 1e-2, (k, err)


def test_mlp_rejects_bad_input(cl_queue):
    model = MLP(queue=cl_queue)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(cla.zeros(cl_queue, (4,), np.int32))
    with pytest.raises(ValueError, match="shape"):
        model.forward(cla.zeros(cl_queue, (4, 63), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        model.forward(cla.zeros(cl_queue, (4, 64), np.float16))
    with pytest.raises(ValueError, match="outside"):
        model.forward(cla.zeros(cl_queue, (4, 64), np.float32), offset=2, rows=3)


@pytest.fixture(scope="module")
def two_epochs():
    """The default (stateful AdamW) run and its functional twin, 2 epochs each."""
    args = ["--epochs", "2", "--no-progress"]
    return digits.main(args), digits.main([*args, "--functional"])


def test_two_epochs_learn(two_epochs):
    for r in two_epochs:
        assert r["losses"][1] < r["losses"][0] < np.log(10)
        # measured 0.91 after 2 epochs (0.87 after one); chance is 0.1
        assert r["test_accuracy"] > 0.85
        assert r["steps"] == 2 * 45 and r["step_ms"] > 0 and r["device"]
        assert r["lrs"][0] == pytest.approx(2e-3) and r["lrs"][1] == pytest.approx(1e-3)


def test_functional_run_matches_stateful(two_epochs):
    stateful, functional = two_epochs
    assert functional["functional"] and not stateful["functional"]
    np.testing.assert_allclose(functional["losses"], stateful["losses"], rtol=1e-5)
    for k, v in stateful["params"].items():  # clipping coefficients differ in the last bits
        np.testing.assert_allclose(functional["params"][k], v, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("optimizer", sorted(digits.OPTIMIZERS))
def test_every_optimizer_one_epoch(optimizer):
    r = digits.main(["--optimizer", optimizer, "--epochs", "1", "--no-progress"])
    assert np.isfinite(r["losses"][0]) and r["losses"][0] < np.log(10)
    assert r["test_accuracy"] > 0.6, r["test_accuracy"]  # measured 0.80-0.89


def test_amp_run_scales_and_learns():
    r = digits.main(["--amp", "--epochs", "2", "--no-progress"])
    assert r["amp"] and len(r["scales"]) == 2 and all(s > 0 for s in r["scales"])
    assert 0 <= r["skipped_steps"] < r["steps"] // 10
    assert r["losses"][1] < r["losses"][0] and r["test_accuracy"] > 0.85


@pytest.mark.parametrize(
    "argv", [["--epochs", "0"], ["--optimizer", "lion"], ["--amp", "--functional"]]
)
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        digits.main(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-bits", "8"],
        ["--state-dtype", "bfloat16"],
        ["--state-bits", "8", "--min-8bit-size", "0", "--functional"],
    ],
    ids=["8bit", "bfloat16", "8bit-all-functional"],
)
def test_low_precision_state_two_epochs_learn(argv):
    r = digits.main([*argv, "--epochs", "2", "--no-progress"])
    assert r["state_bits"] == (8 if "8" in argv else 32)
    assert r["state_dtype"] == ("bfloat16" if "bfloat16" in argv else "float32")
    assert r["losses"][1] < r["losses"][0] < np.log(10)
    # measured 0.914 after 2 epochs in all three, as with float32 state (0.914)
    assert r["test_accuracy"] > 0.85, r["test_accuracy"]
