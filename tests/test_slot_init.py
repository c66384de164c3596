"""Declared slot start values (``Fragment.slot_init``): ``init`` fills each slot with its
value, a stateful optimizer's fresh buffers hold it (after a load and a reset too), and the
kernels of Adagrad's and Yogi's scaling read the slot (no first-step flag)."""

from __future__ import annotations

import numpy as np
import pytest

import netcl_optim as no
import netcl_optim.stateful as S
from netcl_optim._base import Fragment
from netcl_optim.fusion import dequantize, quantize
from netcl_optim.optimizers.adagrad import scale_by_rss
from netcl_optim.optimizers.yogi import scale_by_yogi


def _params(queue):
    return [
        no.to_device(np.arange(6, dtype=np.float32).reshape(2, 3), queue),
        no.to_device(np.ones(4, np.float32), queue),
    ]


def test_fragment_slot_init_checks_and_defaults():
    frag = Fragment("f", "", slots=("a", "b"))
    assert frag.slot_starts == (0.0, 0.0)
    declared = Fragment("f", "", slots=("a", "b"), slot_init=(1, 2))
    assert declared.slot_starts == (1.0, 2.0)
    assert declared.key == frag.key  # allocation only: the same kernel
    with pytest.raises(ValueError, match="slot_init"):
        Fragment("f", "", slots=("a", "b"), slot_init=(1.0,))


@pytest.mark.parametrize(
    ("tx", "fields", "start", "dropped"),
    [
        (scale_by_rss(0.25, 1e-7), ("sum_of_squares",), 0.25, "s0"),
        (scale_by_yogi(initial_accumulator_value=1e-3), ("mu", "nu"), 1e-3, "fresh"),
    ],
    ids=["scale_by_rss", "scale_by_yogi"],
)
def test_init_holds_declared_start_and_kernel_has_no_flag(cl_queue, tx, fields, start, dropped):
    fragment = tx.plan
    assert fragment.slot_init == (start,) * len(fields)
    assert dropped not in fragment.scalars and dropped not in fragment.source
    assert "initial" not in fragment.scalars
    state = tx.init(_params(cl_queue))
    for name in fields:
        for leaf in getattr(state, name):
            np.testing.assert_array_equal(leaf.get(), np.float32(start))


def _buffers(opt, key):
    return [b.get() for b in opt._groups[0].bufs[key]]


@pytest.mark.parametrize(
    ("cls", "kwargs", "keys", "start"),
    [
        (S.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}, ("sum",), 0.5),
        (S.Yogi, {"lr": 0.1, "initial_accumulator_value": 0.01}, ("exp_avg", "exp_avg_sq"), 0.01),
    ],
    ids=["Adagrad", "Yogi"],
)
def test_stateful_fresh_buffers_hold_start(cl_queue, cls, kwargs, keys, start):
    params = [S.Parameter(a) for a in _params(cl_queue)]
    opt = cls(params, **kwargs)
    # the first parameter steps; the second, without a grad, keeps fresh buffers
    params[0].grad = no.to_device(np.full((2, 3), 0.5, np.float32), cl_queue)
    opt.step()
    for k in keys:
        np.testing.assert_array_equal(_buffers(opt, k)[1], np.float32(start))
    saved = opt.state_dict()
    assert set(saved["state"]) == {0}

    fresh = cls([S.Parameter(a) for a in _params(cl_queue)], **kwargs)
    fresh.load_state_dict(saved)
    for k in keys:
        got = _buffers(fresh, k)
        np.testing.assert_array_equal(got[0], saved["state"][0][k])
        np.testing.assert_array_equal(got[1], np.float32(start))  # absent: starts afresh

    opt._groups[0].reset()
    for k in keys:
        for b in _buffers(opt, k):
            np.testing.assert_array_equal(b, np.float32(start))


def test_adagrad_loads_torch_fresh_state(cl_queue):
    """torch's fresh Adagrad state (step 0, sum = initial_accumulator_value) resumes as torch."""
    torch = pytest.importorskip("torch")
    w = np.linspace(-1, 1, 6, dtype=np.float32)
    g = np.linspace(0.5, -0.3, 6, dtype=np.float32)
    tp = torch.nn.Parameter(torch.tensor(w))
    topt = torch.optim.Adagrad([tp], lr=0.1, initial_accumulator_value=0.3)
    sd = topt.state_dict()
    state = {0: {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in sd["state"][0].items()}}
    p = S.Parameter(no.to_device(w.copy(), cl_queue))
    opt = S.Adagrad([p], lr=0.1, initial_accumulator_value=0.3)
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    tp.grad = torch.tensor(g)
    topt.step()
    p.grad = no.to_device(g.copy(), cl_queue)
    opt.step()
    np.testing.assert_allclose(p.data.get(), tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        opt.state_dict()["state"][0]["sum"], topt.state[tp]["sum"].numpy(), rtol=1e-6
    )


def _copy_slot():
    """A rule whose slot starts as a copy of the params: ``z += u``, the update is ``z``."""
    from typing import NamedTuple

    from netcl_optim.transforms._combining import elementwise

    class CopyState(NamedTuple):
        z: object

    frag = Fragment("copy_start", "z = z + u;\nu = z;", slots=("z",), slot_init=(no.PARAMS,))
    assert frag.slot_starts == (no.PARAMS,)
    return elementwise(frag, init=CopyState)


@pytest.mark.parametrize("storage", [{}, {"state_dtype": "bfloat16"}, {"state_bits": 8}])
def test_slot_that_starts_at_the_params(cl_queue, storage):
    """``slot_init=(PARAMS,)``: ``init`` copies the params' values into the slot, stored as
    the storage rule says (rounded to nearest even, or quantized, as any stored value)."""
    host = {"a": np.arange(5000, dtype=np.float32) / 7, "b": np.ones((2, 3), np.float32)}
    params = no.pack(no.to_device(host, cl_queue))
    tx = _copy_slot()
    if storage:
        tx = no.low_precision_state(tx, storage.get("state_dtype"),
                                    state_bits=storage.get("state_bits", 32))  # fmt: skip
    state = tx.init(params)
    z = state.z
    for k, v in host.items():
        if storage.get("state_bits") == 8 and v.size >= 4096:
            want = dequantize(*quantize(v, True), True).reshape(v.shape)
            got = dequantize(z[k].codes.get(), z[k].absmax.get(), True)
            assert np.array_equal(got, want)
        else:
            got = z[k].get()
            assert np.array_equal(got, v.astype(got.dtype)), k
    u, _ = tx.update(no.to_device({k: np.ones_like(v) for k, v in host.items()}, cl_queue),
                     state, params)  # fmt: skip
    assert np.array_equal(no.to_host(u)["b"], np.full((2, 3), 2, np.float32))
