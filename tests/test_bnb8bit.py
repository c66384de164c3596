"""bitsandbytes' 8-bit optimizers (Adam8bit, AdamW8bit, Lion8bit, RMSprop8bit, Adagrad8bit,
SGD8bit): their names, defaults and errors; their state dicts load into bitsandbytes and
bitsandbytes' into ours; one step from the same state gives bitsandbytes' numbers (its CPU
backend: a 65536-bin quantization table where we take the nearest code, and MKL's square
root, so the codes may differ by a neighbour), and 50 steps stay close to it."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import netcl_optim as no

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")

SHAPES = [(70, 100), (5003,), (100,)]  # two quantized (>= 4096 elements), one float32
CLASSES = {
    "Adam8bit": {},
    "AdamW8bit": {},
    "Lion8bit": {},
    "RMSprop8bit": {},
    "Adagrad8bit": {},
    "SGD8bit": {"lr": 0.01, "momentum": 0.9},
}


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy().copy()
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_numpy(v) for v in x)
    return x


def _to_torch(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, dict):
        return {k: _to_torch(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_torch(v) for v in x]
    return x


def _problem(seed=0, steps=10):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[(0.1 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]
             for _ in range(steps)]  # fmt: skip
    return params, grads


def _run_bnb(name, kw, params, grads):
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = getattr(bnb.optim, name)(tp, **kw)
    for g in grads:
        for t, x in zip(tp, g, strict=True):
            t.grad = torch.from_numpy(x.copy())
        opt.step()
    return tp, opt


def _run_ours(opt, params, grads):
    for g in grads:
        for p, x in zip(params, g, strict=True):
            p.grad = no.to_device(x)
        opt.step()


@pytest.mark.parametrize("name", CLASSES)
def test_signature_and_defaults_are_bitsandbytes(name):
    ours = inspect.signature(getattr(no, name)).parameters
    theirs = inspect.signature(getattr(bnb.optim, name)).parameters
    for key, p in theirs.items():
        if key in ("self", "params") or p.default is inspect.Parameter.empty:
            continue
        assert key in ours, f"{name} lacks {key}"
        default = ours[key].default
        assert default == p.default or (default, p.default) == (1e-3, inspect.Parameter.empty)


@pytest.mark.parametrize("name", CLASSES)
def test_one_step_from_bitsandbytes_state(cl_queue, name):
    kw = CLASSES[name]
    params, grads = _problem()
    tp, topt = _run_bnb(name, kw, params, grads[:-1])
    ours = [no.Parameter(no.to_device(t.detach().numpy().copy(), cl_queue)) for t in tp]
    opt = getattr(no, name)(ours, **kw)
    opt.load_state_dict(_to_numpy(topt.state_dict()))
    before = [p.data.get() for p in ours]
    _run_ours(opt, ours, grads[-1:])
    for t, x in zip(tp, grads[-1], strict=True):
        t.grad = torch.from_numpy(x.copy())
    topt.step()
    sd = opt.state_dict()
    for j, (p, t, b) in enumerate(zip(ours, tp, before, strict=True)):
        want = t.detach().numpy()
        moved = np.abs(want - b).max()
        # (Lion's sign(.) can flip on an element whose momentum moved by a code)
        tol = 2.1 * kw.get("lr", 1e-4) if name == "Lion8bit" else 1e-3 * moved + 1e-7
        assert np.abs(p.data.get() - want).max() <= tol, (name, j)
        theirs = topt.state[t]
        mine = sd["state"][j]["__bnb_optimizer_quant_state__"]
        for s in ("1", "2"):
            if "state" + s not in theirs:
                continue
            a, b_ = mine["state" + s], theirs["state" + s].numpy()
            if a.dtype != np.uint8:  # float32 state (a small parameter)
                np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)
                continue
            qmap = mine["qmap" + s]
            absmax = np.repeat(mine["absmax" + s], 256)[: a.size].reshape(a.shape)
            np.testing.assert_allclose(mine["absmax" + s], theirs["absmax" + s].numpy(),
                                       rtol=1e-5)  # fmt: skip
            np.testing.assert_array_equal(qmap, theirs["qmap" + s].numpy())
            assert (a == b_).mean() > 0.95, (name, s, (a == b_).mean())
            # where the codes differ, the values are a few codes apart at most
            gap = np.abs(qmap[a] - qmap[b_]) * absmax
            assert np.all(gap <= 0.02 * absmax + 1e-12), (name, s, gap.max())


@pytest.mark.parametrize("name", CLASSES)
def test_fifty_steps_stay_close_and_state_dicts_cross_load(cl_queue, name):
    kw = CLASSES[name]
    params, grads = _problem(steps=50)
    tp, _ = _run_bnb(name, kw, params, grads)
    ours = [no.Parameter(no.to_device(p.copy(), cl_queue)) for p in params]
    opt = getattr(no, name)(ours, **kw)
    _run_ours(opt, ours, grads)
    for p, t, p0 in zip(ours, tp, params, strict=True):
        moved = np.abs(t.detach().numpy() - p0).max()
        err = np.abs(p.data.get() - t.detach().numpy()).max()
        assert err <= 0.15 * moved + 1e-6, (name, err, moved)
    # ours -> bitsandbytes: it loads and steps
    sd = _to_torch(opt.state_dict())
    sd.pop("optimizer")
    tp2 = [torch.nn.Parameter(torch.from_numpy(p.data.get())) for p in ours]
    topt2 = getattr(bnb.optim, name)(tp2, **kw)
    topt2.load_state_dict(sd)
    for t, x in zip(tp2, grads[0], strict=True):
        t.grad = torch.from_numpy(x.copy())
    topt2.step()
    state = topt2.state[tp2[0]]
    assert state["state1"].dtype == torch.uint8 and state["step"] == 51


def test_foreign_or_misshaped_bitsandbytes_dicts_are_refused(cl_queue):
    params, grads = _problem(steps=3)
    _, lion = _run_bnb("Lion8bit", {}, params, grads)
    ours = [no.Parameter(no.to_device(p.copy(), cl_queue)) for p in params]
    opt = no.Adam8bit(ours)
    _run_ours(opt, ours, grads[:1])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"eps|lacks"):  # (its eps=0 is refused first)
        opt.load_state_dict(_to_numpy(lion.state_dict()))
    _, adam = _run_bnb("Adam8bit", {}, [p[:50] for p in params], [[g[:50] for g in s]
                                                                     for s in grads])  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(_to_numpy(adam.state_dict()))
    after = opt.state_dict()
    for k, v in before["state"][0]["__bnb_optimizer_quant_state__"].items():
        np.testing.assert_array_equal(after["state"][0]["__bnb_optimizer_quant_state__"][k], v)


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("Adam8bit", {"amsgrad": True}, "amsgrad"),
        ("Adam8bit", {"optim_bits": 8}, "optim_bits"),
        ("Adam8bit", {"is_paged": True}, "paged"),
        ("Adam8bit", {"state_bits": 4}, "state_bits"),
        ("Adam8bit", {"state_bits": 8, "state_dtype": "bfloat16"}, "own layout"),
        ("SGD8bit", {"lr": 0.1}, "momentum"),
        ("RMSprop8bit", {"centered": True}, "centered"),
        ("RMSprop8bit", {"momentum": 0.9}, "momentum"),
        ("Adagrad8bit", {"lr_decay": 0.1}, "lr_decay"),
        ("Adagrad8bit", {"initial_accumulator_value": 0.1}, "initial_accumulator_value"),
    ],
)
def test_constructor_errors(cl_queue, name, kw, match):
    p = no.Parameter(no.to_device(np.ones(5000, np.float32), cl_queue))
    with pytest.raises(ValueError, match=match):
        getattr(no, name)([p], **kw)
