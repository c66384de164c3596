"""Muon (netcl_optim/optimizers/muon.py): the functional ``scale_by_muon``/``muon`` (optax
contrib's rule), the stateful ``Muon`` (torch 2.13's, and Keller Jordan's reference variant)
and ``MuonWithAuxAdam``, against the float64 references of tests/reference_muon.py (params
float64, tight), torch.optim.Muon and optax.contrib.muon (float32, at tolerances justified
below); state dicts interchange with torch's; resumed = straight and packed = separate, bit
for bit; bad input raises, naming the problem, with nothing changed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from jax_x64 import jax_x64
from reference_muon import (
    optax_adamw_step,
    optax_muon_step,
    reference_muon_step,
    torch_muon_step,
)

import netcl_optim as no
from netcl_optim.optimizers._muon_layout import MuonDimensionNumbers, matrix_view, ns_schedule
from netcl_optim.optimizers.muon import (
    Muon,
    MuonState,
    MuonWithAuxAdam,
    muon,
    scale_by_muon,
)

NS = (3.4445, -4.775, 2.0315)
# float64 params against the float64 references: the stage accumulates in double; five
# iterations with |a| ~ 3.4 amplify rounding by ~1e2-1e3, far below these
F64 = {"rtol": 1e-9, "atol": 1e-11}
STEPS = 4
# ours vs torch.optim.Muon after 3 steps, in units of lr (bfloat16 NS in torch)
WORST_TORCH_GAP = 0.1


@pytest.fixture(scope="module")
def queue(cl_queue):
    if not ("cl_khr_fp64" in cl_queue.device.extensions or cl_queue.device.double_fp_config):
        pytest.skip("no fp64 on this device")
    return cl_queue


def _grads(shapes: dict, steps: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]


def _params(shapes: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def _dev(tree: dict, queue, dtype=np.float64) -> dict:
    return no.pack(no.to_device({k: np.asarray(v, dtype) for k, v in tree.items()}, queue))


def _host(tree: dict) -> dict:
    return {k: v.get() for k, v in tree.items()}


def _stateful_params(values: list[np.ndarray], queue, dtype=np.float64) -> list:
    return [no.Parameter(no.to_device(np.asarray(v, dtype), queue)) for v in values]


def _set_grads(params: list, grads: list[np.ndarray], queue) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = no.to_device(np.asarray(g, p.data.dtype), queue)


# ---------------------------------------------------------------------------- functional

OPTAX_SHAPES = {"square": (6, 6), "wide": (3, 8), "tall": (9, 4), "bias": (5,), "scalar": ()}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": False, "weight_decay": 0.1, "adam_weight_decay": 0.05},
        {"adaptive": True, "consistent_rms": 0.2, "beta": 0.9},
        {"ns_coeffs": "dion", "adam_learning_rate": 0.003, "adam_eps_root": 1e-6},
    ],
    ids=["default", "plain-decay", "adaptive-rms", "dion"],
)
def test_muon_matches_the_float64_reference(queue, kwargs):
    """optax's muon: matrices (square, wide, tall) by scale_by_muon + shape scale + decay,
    the rest by optax's adamw(nesterov=True), step after step."""
    lr = 0.02
    params = _params(OPTAX_SHAPES, 0)
    tx = muon(lr, **kwargs)
    p = _dev(params, queue)
    state = tx.init(p)
    table = kwargs.get("ns_coeffs", NS)
    schedule = ns_schedule(
        [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
         (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)] if table == "dion" else table,
        5, allow_table=True,
    )  # fmt: skip
    ref = {k: v.copy() for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(_grads(OPTAX_SHAPES, STEPS, 1)):
        u, state = tx.update(_dev(g, queue), state, p)
        p = no.apply_updates(p, u)
        for k, x in ref.items():
            if x.ndim == 2:
                ref[k], mom[k] = optax_muon_step(
                    x, g[k], mom[k], t, matrix_view(x.shape, MuonDimensionNumbers()),
                    lr, schedule, kwargs.get("beta", 0.95), 1e-8,
                    kwargs.get("weight_decay", 0.0), kwargs.get("nesterov", True),
                    kwargs.get("adaptive", False), kwargs.get("consistent_rms"),
                )  # fmt: skip
            else:
                ref[k], mom[k], nu[k] = optax_adamw_step(
                    x, g[k], mom[k], nu[k], t, kwargs.get("adam_learning_rate", lr),
                    eps_root=kwargs.get("adam_eps_root", 0.0),
                    weight_decay=kwargs.get("adam_weight_decay", 0.0),
                    nesterov=kwargs.get("nesterov", True),
                )  # fmt: skip
        for k in ref:
            np.testing.assert_allclose(p[k].get(), ref[k], **F64, err_msg=f"{k} step {t}")


@pytest.mark.parametrize(
    "shape, dims",
    [
        ((5, 6, 4), MuonDimensionNumbers(1, 2)),  # a batch of [in, out] matrices
        ((6, 5, 4), MuonDimensionNumbers(0, -1)),  # batch axis in the middle
        ((3, 3, 4, 8), MuonDimensionNumbers((0, 1, 2), 3)),  # a flax conv kernel
    ],
    ids=["batched", "middle-batch", "conv-hwio"],
)
def test_scale_by_muon_with_dimension_numbers(queue, shape, dims):
    """N-D leaves through MuonDimensionNumbers (other axes batched); the state is optax's
    MuonState (count, mu, ns_coeffs) in the chain's first slot."""
    params = _params({"w": shape}, 2)
    tx = scale_by_muon(beta=0.9, weight_dimension_numbers={"w": dims})
    p = _dev(params, queue)
    state = tx.init(p)
    assert isinstance(state[0], MuonState) and state[0].count == 0 and state[0].ns_coeffs == NS
    view = matrix_view(shape, dims)
    mu = np.zeros(shape)
    for t, g in enumerate(_grads({"w": shape}, STEPS, 3)):
        u, state = tx.update(_dev(g, queue), state, p)
        # the reference from a zero param with learning rate -1 gives scale * O: divide
        want, mu = optax_muon_step(np.zeros(shape), g["w"], mu, t, view, -1.0, beta=0.9)
        scale = math.sqrt(max(1, view.fan_out / view.fan_in))
        np.testing.assert_allclose(u["w"].get(), want / scale, **F64, err_msg=f"step {t}")
        np.testing.assert_allclose(state[0].mu["w"].get(), mu, **F64)
    assert state[0].count == STEPS


def test_muon_layout_keyword_routes_nd_leaves(queue):
    """Our ``layout=`` extension: every ndim >= 2 leaf to Muon, [out, in] shape scale."""
    shapes = {"w": (8, 3), "conv": (4, 2, 3, 3), "b": (4,)}
    params = _params(shapes, 4)
    tx = muon(0.01, layout="out_in")
    p = _dev(params, queue)
    state = tx.init(p)
    g = _grads(shapes, 1, 5)[0]
    u, state = tx.update(_dev(g, queue), state, p)
    for k in ("w", "conv"):
        view = matrix_view(shapes[k], "out_in")
        want, _ = optax_muon_step(params[k], g[k], np.zeros(shapes[k]), 0, view, 0.01)
        np.testing.assert_allclose(params[k] + u[k].get(), want, **F64, err_msg=k)
    want, _, _ = optax_adamw_step(params["b"], g["b"], 0 * g["b"], 0 * g["b"], 0, 0.01)
    np.testing.assert_allclose(params["b"] + u["b"].get(), want, **F64)


def test_muon_packed_and_separate_give_the_same_bits(cl_queue):
    shapes = {"a": (6, 4), "b": (6, 4), "c": (4, 7), "v": (3,)}
    params = _params(shapes, 6)
    tx = muon(0.02, weight_decay=0.1)
    host = {k: np.float32(v) for k, v in params.items()}
    packed = no.pack(no.to_device(host, cl_queue))
    separate = {k: no.to_device(v, cl_queue) for k, v in host.items()}
    s1, s2 = tx.init(packed), tx.init(separate)
    for g in _grads(shapes, 3, 7):
        g32 = {k: np.float32(v) for k, v in g.items()}
        packed, s1 = no.step(tx, packed, no.pack(no.to_device(g32, cl_queue)), s1)
        separate, s2 = no.step(
            tx, separate, {k: no.to_device(v, cl_queue) for k, v in g32.items()}, s2
        )
    for k in shapes:
        assert packed[k].get().tobytes() == separate[k].get().tobytes(), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_muon_matches_optax(cl_queue, dtype):
    """optax.contrib.muon, float32 (jax's float32 matmuls on the CPU accumulate in another
    order: ~1e-6 relative on O, the NS iteration amplifies it ~10x) and float64."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    if dtype == np.float64 and not cl_queue.device.double_fp_config:
        pytest.skip("no fp64 on this device")
    shapes = {"w": (6, 4), "wide": (3, 8), "b": (4,)}
    params = {k: np.asarray(v, dtype) for k, v in _params(shapes, 8).items()}
    grads = [{k: np.asarray(v, dtype) for k, v in g.items()} for g in _grads(shapes, 3, 9)]
    kwargs = {"weight_decay": 0.1, "adaptive": True}
    tx = muon(0.02, **kwargs)
    p = no.pack(no.to_device(params, cl_queue))
    state = tx.init(p)
    for g in grads:
        p, state = no.step(tx, p, no.pack(no.to_device(g, cl_queue)), state)
    with jax_x64(dtype == np.float64):
        otx = optax.contrib.muon(0.02, **kwargs)
        jp = {k: jnp.asarray(v) for k, v in params.items()}
        ost = otx.init(jp)
        for g in grads:
            u, ost = otx.update({k: jnp.asarray(v) for k, v in g.items()}, ost, jp)
            jp = optax.apply_updates(jp, u)
        want = {k: np.asarray(v) for k, v in jp.items()}
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else F64
    for k in shapes:
        np.testing.assert_allclose(p[k].get(), want[k], **tol, err_msg=k)


# ---------------------------------------------------------------------------- stateful


TORCH_SHAPES = [(6, 6), (3, 8), (9, 4)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": False, "weight_decay": 0.0, "momentum": 0.9},
        {"adjust_lr_fn": "match_rms_adamw", "lr": 0.02},
        {"adjust_lr_fn": "spectral_unclamped", "layout": "in_out", "ns_steps": 3},
    ],
    ids=["default", "plain", "match-rms", "spectral-in-out"],
)
def test_stateful_torch_variant_matches_the_float64_reference(queue, kwargs):
    values = [np.random.default_rng(i).standard_normal(s) for i, s in enumerate(TORCH_SHAPES)]
    params = _stateful_params(values, queue)
    opt = Muon(params, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "layout"}
    layout = kwargs.get("layout", "out_in")
    ref = [v.copy() for v in values]
    bufs = [np.zeros_like(v) for v in values]
    for t in range(STEPS):
        grads = [np.random.default_rng(100 + 10 * t + i).standard_normal(v.shape)
                 for i, v in enumerate(values)]  # fmt: skip
        _set_grads(params, grads, queue)
        opt.step()
        for i, (x, g) in enumerate(zip(ref, grads, strict=True)):
            view = matrix_view(x.shape, layout)
            ref[i], bufs[i] = torch_muon_step(x, g, bufs[i], view, **ref_kwargs)
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.data.get(), ref[i], **F64, err_msg=f"{i} step {t}")
            buf = opt.state[p]["momentum_buffer"].get()
            np.testing.assert_allclose(buf, bufs[i], **F64)
            assert set(opt.state[p]) == {"momentum_buffer"}  # torch's keys: no "step"


@pytest.mark.parametrize("nesterov", [True, False])
def test_stateful_reference_variant_matches_keller_jordan(queue, nesterov):
    """Keller Jordan's SingleDeviceMuon: 2-D, a conv weight flattened to (out, -1) with the
    matrix shape's scale (not KellerJordan/Muon#63's), a batch of matrices (3-D)."""
    shapes = [(8, 3), (4, 2, 3, 3), (16, 3, 1, 1), (3, 5, 4)]
    values = [np.random.default_rng(20 + i).standard_normal(s) for i, s in enumerate(shapes)]
    params = _stateful_params(values, queue)
    opt = Muon(params, lr=0.02, weight_decay=0.01, nesterov=nesterov, variant="reference")
    ref = [v.copy() for v in values]
    bufs = [np.zeros_like(v) for v in values]
    for t in range(3):
        grads = [np.random.default_rng(200 + 10 * t + i).standard_normal(s)
                 for i, s in enumerate(shapes)]  # fmt: skip
        _set_grads(params, grads, queue)
        opt.step()
        for i, (x, g) in enumerate(zip(ref, grads, strict=True)):
            ref[i], bufs[i] = reference_muon_step(
                x, g, bufs[i], matrix_view(x.shape, "out_in"), lr=0.02, weight_decay=0.01,
                nesterov=nesterov,
            )  # fmt: skip
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.data.get(), ref[i], **F64, err_msg=f"{i} step {t}")


def _torch_pair(torch, values, **kwargs):
    tparams = [torch.nn.Parameter(torch.from_numpy(np.float32(v))) for v in values]
    return tparams, torch.optim.Muon(tparams, **kwargs)


def test_stateful_matches_torch_muon(cl_queue):
    """torch.optim.Muon (float32 params) orthogonalises in bfloat16; we iterate in float32.
    Checked three ways: ours against the float64 reference (float32 rounding only: 2e-5);
    torch against the same reference with its bfloat16 roundings emulated (1e-5 at these
    small sizes: the emulation rounds as torch does, up to the float32 accumulation order,
    which flips a bfloat16 rounding now and then; at 64x64 that reaches ~2e-4); so ours
    minus torch is the reference's bfloat16 error (ref - ref_bf16) up to those two
    tolerances. That error itself is ~1-4% of lr * ratio * O per step (measured: see
    WORST_TORCH_GAP), which a plain tolerance between the two would have to allow."""
    torch = pytest.importorskip("torch")
    values = [np.random.default_rng(30 + i).standard_normal(s) for i, s in enumerate(TORCH_SHAPES)]
    kwargs = {"lr": 0.02, "weight_decay": 0.1}
    params = _stateful_params(values, cl_queue, np.float32)
    opt = Muon(params, **kwargs)
    tparams, topt = _torch_pair(torch, values, **kwargs)
    ref = [np.float64(np.float32(v)) for v in values]
    ref_bf = [x.copy() for x in ref]
    bufs = [np.zeros_like(v) for v in values]
    bufs_bf = [np.zeros_like(v) for v in values]
    worst = 0.0
    for t in range(3):
        grads = [np.float32(np.random.default_rng(300 + 10 * t + i).standard_normal(v.shape))
                 for i, v in enumerate(values)]  # fmt: skip
        _set_grads(params, grads, cl_queue)
        for tp, g in zip(tparams, grads, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        for i, g in enumerate(grads):
            view = matrix_view(values[i].shape, "out_in")
            ref[i], bufs[i] = torch_muon_step(ref[i], np.float64(g), bufs[i], view, **kwargs)
            ref_bf[i], bufs_bf[i] = torch_muon_step(
                ref_bf[i], np.float64(g), bufs_bf[i], view, bf16=True, **kwargs
            )
            ours, theirs = params[i].data.get(), tparams[i].detach().numpy()
            np.testing.assert_allclose(ours, ref[i], rtol=2e-5, atol=2e-6)
            np.testing.assert_allclose(theirs, ref_bf[i], rtol=1e-5, atol=2e-6)
            worst = max(worst, float(np.max(np.abs(ours - theirs))))
            gap = (ours - theirs) - (ref[i] - ref_bf[i])
            assert np.max(np.abs(gap) / (1 + np.abs(ref[i]))) < 3e-5
    assert 0 < worst < WORST_TORCH_GAP * kwargs["lr"]


def test_stateful_bfloat16_iteration_is_closer_to_torch(cl_queue):
    """``ns_dtype="bfloat16"`` iterates in torch's precision: what is left of the gap to
    ``torch.optim.Muon`` is float32 summation order (oneDNN's blocking against our pairs),
    a fraction of the float32 iteration's gap (measured 3-20x smaller)."""
    torch = pytest.importorskip("torch")
    values = [np.random.default_rng(50 + i).standard_normal(s) for i, s in enumerate(TORCH_SHAPES)]
    kwargs = {"lr": 0.02, "weight_decay": 0.1}
    ours = {d: _stateful_params(values, cl_queue, np.float32) for d in (None, "bfloat16")}
    opts = {d: Muon(ps, ns_dtype=d, **kwargs) for d, ps in ours.items()}
    tparams, topt = _torch_pair(torch, values, **kwargs)
    for t in range(3):
        grads = [np.float32(np.random.default_rng(500 + 10 * t + i).standard_normal(v.shape))
                 for i, v in enumerate(values)]  # fmt: skip
        for d, ps in ours.items():
            _set_grads(ps, grads, cl_queue)
            opts[d].step()
        for tp, g in zip(tparams, grads, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    gap = {
        d: max(float(np.max(np.abs(p.data.get() - tp.detach().numpy())))
               for p, tp in zip(ps, tparams, strict=True))
        for d, ps in ours.items()
    }  # fmt: skip
    assert gap["bfloat16"] < gap[None] / 2, gap
    assert opts["bfloat16"].param_groups[0]["ns_dtype"] == "bfloat16"


def _to_torch_state(torch, sd):
    return {
        "state": {i: {k: torch.from_numpy(np.array(v)) for k, v in e.items()}
                  for i, e in sd["state"].items()},
        "param_groups": [{k: v for k, v in g.items()
                          if k not in ("variant", "layout", "ns_dtype", "optimizer")}
                         for g in sd["param_groups"]],
    }  # fmt: skip


def test_state_dict_interchange_with_torch(cl_queue):
    torch = pytest.importorskip("torch")
    values = [np.random.default_rng(40 + i).standard_normal(s) for i, s in enumerate(TORCH_SHAPES)]
    grads = [np.float32(np.random.default_rng(41 + i).standard_normal(s))
             for i, s in enumerate(TORCH_SHAPES)]  # fmt: skip
    params = _stateful_params(values, cl_queue, np.float32)
    opt = Muon(params, lr=0.02)
    _set_grads(params, grads, cl_queue)
    opt.step()
    ours = opt.state_dict()
    assert {k for e in ours["state"].values() for k in e} == {"momentum_buffer"}
    # ours -> torch: torch's Muon takes it and steps from our buffers
    tparams, topt = _torch_pair(torch, [p.data.get() for p in params], lr=0.02)
    topt.load_state_dict(_to_torch_state(torch, ours))
    for i, tp in enumerate(tparams):
        np.testing.assert_array_equal(
            topt.state[tp]["momentum_buffer"].numpy(), ours["state"][i]["momentum_buffer"]
        )
    # torch -> ours: a fresh Muon loads torch's dict (tensors as numpy) and keeps its values
    tparams[0].grad = torch.from_numpy(grads[0])
    for tp, g in zip(tparams, grads, strict=True):
        tp.grad = torch.from_numpy(g.copy())
    topt.step()
    theirs = topt.state_dict()
    loaded = {
        "state": {i: {k: v.numpy() for k, v in e.items()} for i, e in theirs["state"].items()},
        "param_groups": theirs["param_groups"],
    }
    fresh = Muon(_stateful_params([tp.detach().numpy() for tp in tparams], cl_queue, np.float32))
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["lr"] == 0.02 and fresh.param_groups[0]["variant"] == "torch"
    for i, p in enumerate(fresh.param_groups[0]["params"]):
        np.testing.assert_array_equal(
            fresh.state[p]["momentum_buffer"].get(), loaded["state"][i]["momentum_buffer"]
        )


def _run(opt, params, grads, queue):
    for g in grads:
        _set_grads(params, g, queue)
        opt.step()


def test_resume_is_bit_for_bit(cl_queue, tmp_path):
    shapes = [(6, 4), (4, 6), (5, 5)]
    values = [np.random.default_rng(50 + i).standard_normal(s) for i, s in enumerate(shapes)]
    grads = [[np.random.default_rng(500 + 10 * t + i).standard_normal(s)
              for i, s in enumerate(shapes)] for t in range(5)]  # fmt: skip
    straight_params = _stateful_params(values, cl_queue, np.float32)
    straight = Muon(straight_params, lr=0.02)
    _run(straight, straight_params, grads, cl_queue)
    first_params = _stateful_params(values, cl_queue, np.float32)
    first = Muon(first_params, lr=0.02)
    _run(first, first_params, grads[:3], cl_queue)
    no.save(tmp_path / "muon.npz", first)
    resumed_params = _stateful_params([p.data.get() for p in first_params], cl_queue, np.float32)
    resumed = no.load(tmp_path / "muon.npz", Muon(resumed_params, lr=1.0))
    assert resumed.param_groups[0]["lr"] == 0.02
    _run(resumed, resumed_params, grads[3:], cl_queue)
    for a, b in zip(straight_params, resumed_params, strict=True):
        assert a.data.get().tobytes() == b.data.get().tobytes()


def test_one_host_read_per_step(cl_queue, monkeypatch):
    """The non-finite check's flag is the step's only read from the device."""
    import pyopencl as cl

    params = _stateful_params([np.ones((8, 8)), np.ones((4, 9))], cl_queue, np.float32)
    opt = Muon(params)
    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad.fill(0.5)
    opt.step()
    reads = []
    enqueue_copy = cl.enqueue_copy

    def counting_copy(queue, dest, src, **kwargs):
        if isinstance(dest, np.ndarray):
            reads.append(dest.nbytes)
        return enqueue_copy(queue, dest, src, **kwargs)

    monkeypatch.setattr(cl, "enqueue_copy", counting_copy)
    opt.step()
    assert len(reads) == 1 and reads[0] <= 16  # (the flag: a couple of numbers)


# ---------------------------------------------------------------------------- errors


def test_constructor_errors_name_the_problem(cl_queue):
    mats = _stateful_params([np.ones((3, 2)), np.ones(3)], cl_queue, np.float32)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*\(3,\)"):
        Muon(mats)
    with pytest.raises(ValueError, match=r"2D.*param_groups\[0\]\['params'\]\[0\]"):
        Muon(_stateful_params([np.ones((2, 3, 4))], cl_queue, np.float32))
    Muon(_stateful_params([np.ones((2, 3, 4))], cl_queue, np.float32), variant="reference")
    ok = _stateful_params([np.ones((3, 2))], cl_queue, np.float32)
    for bad, match in [
        ({"ns_coefficients": (3.4, -4.7)}, "ns_coefficients.*exactly 3"),
        ({"ns_steps": 100}, "ns_steps"),
        ({"adjust_lr_fn": "foo"}, "adjust_lr_fn"),
        ({"lr": -1.0}, "lr"),
        ({"variant": "reference", "adjust_lr_fn": "match_rms_adamw"}, "adjust_lr_fn"),
        ({"layout": "rows"}, "layout"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            Muon(ok, **bad)
    with pytest.raises(ValueError, match="exactly 3"):
        scale_by_muon(ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="Not enough coeffs"):
        scale_by_muon(ns_coeffs=((1.0, 2.0, 3.0),) * 6, ns_steps=5)
    with pytest.raises(ValueError, match="preset"):
        muon(0.1, ns_coeffs="fast")
    with pytest.raises(ValueError, match="ns_dtype"):
        muon(0.1, ns_dtype="bf16")
    with pytest.raises(ValueError, match="ns_dtype"):
        scale_by_muon(ns_dtype="float64")


@pytest.mark.parametrize("where", ["grad", "momentum"])
def test_non_finite_step_raises_and_changes_nothing(cl_queue, where):
    values = [np.random.default_rng(60 + i).standard_normal(s) for i, s in enumerate(TORCH_SHAPES)]
    params = _stateful_params(values, cl_queue, np.float32)
    opt = Muon(params, lr=0.02)
    grads = [np.float32(np.random.default_rng(61 + i).standard_normal(s))
             for i, s in enumerate(TORCH_SHAPES)]  # fmt: skip
    _set_grads(params, grads, cl_queue)
    opt.step()
    if where == "grad":
        grads[2][1, 1] = np.nan
    else:
        sd = opt.state_dict()
        sd["state"][1]["momentum_buffer"][0, 0] = np.inf
        opt.load_state_dict(sd)
    before = [p.data.get() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].get() for p in params]
    _set_grads(params, grads, cl_queue)
    index = 2 if where == "grad" else 1
    name = "gradient" if where == "grad" else "momentum_buffer"
    with pytest.raises(
        FloatingPointError, match=rf"{name} of param_groups\[0\]\['params'\]\[{index}\]"
    ):
        opt.step()
    for p, x, b in zip(params, before, bufs, strict=True):
        assert p.data.get().tobytes() == x.tobytes()
        assert opt.state[p]["momentum_buffer"].get().tobytes() == b.tobytes()


# ---------------------------------------------------------------------------- MuonWithAuxAdam


def _torch_adamw(p, g, m, v, t, lr, betas, eps, wd):
    m = m + (1 - betas[0]) * (g - m)
    v = betas[1] * v + (1 - betas[1]) * g * g
    bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    return p * (1 - lr * wd) - lr * (m / bc1) / (np.sqrt(v) / math.sqrt(bc2) + eps), m, v


def test_muon_with_aux_adam_routes_and_round_trips(queue, tmp_path):
    shapes = [(8, 3), (4, 2, 3, 3), (4,), (3,)]
    values = [np.random.default_rng(70 + i).standard_normal(s) for i, s in enumerate(shapes)]
    params = _stateful_params(values, queue)
    opt = MuonWithAuxAdam(params, lr=0.02, weight_decay=0.01, adam_weight_decay=0.1)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    ref = [v.copy() for v in values]
    m = [np.zeros_like(v) for v in values]
    v2 = [np.zeros_like(v) for v in values]
    grads = [[np.random.default_rng(700 + 10 * t + i).standard_normal(s)
              for i, s in enumerate(shapes)] for t in range(4)]  # fmt: skip
    for t, gs in enumerate(grads[:2]):
        _set_grads(params, gs, queue)
        opt.step()
        for i, g in enumerate(gs):
            if len(shapes[i]) >= 2:
                view = matrix_view(shapes[i], "out_in")
                ref[i], m[i] = reference_muon_step(ref[i], g, m[i], view, 0.02, 0.01)
            else:
                ref[i], m[i], v2[i] = _torch_adamw(ref[i], g, m[i], v2[i], t + 1, 3e-4,
                                                   (0.9, 0.95), 1e-10, 0.1)  # fmt: skip
    for p, want in zip(params, ref, strict=True):
        np.testing.assert_allclose(p.data.get(), want, **F64)
    # an LR scheduler drives both optimizers' groups
    scheduler = no.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()
    assert opt.muon.param_groups[0]["lr"] == 0.01 and opt.adam.param_groups[0]["lr"] == 1.5e-4
    opt.param_groups[0]["lr"] = 0.02
    opt.param_groups[1]["lr"] = 1e-3
    assert opt.adam.param_groups[0]["lr"] == 1e-3
    # checkpoint, load into a fresh one, continue: bit for bit the straight run
    no.save(tmp_path / "aux.npz", opt)
    copy = _stateful_params([p.data.get() for p in params], queue)
    resumed = no.load(tmp_path / "aux.npz", MuonWithAuxAdam(copy, lr=1.0, adam_lr=1.0))
    assert [g["lr"] for g in resumed.param_groups] == [0.02, 1e-3]
    assert [g["use_muon"] for g in resumed.param_groups] == [True, False]
    # a state dict whose groups do not fit is refused, both parts unchanged
    bad = opt.state_dict()
    bad["param_groups"][1]["use_muon"] = True
    before = [p.data.get() for p in copy], resumed.state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[1\] has use_muon=True"):
        resumed.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["momentum_buffer"] = bad["state"][0]["momentum_buffer"] + 1.0
    bad["state"][2]["exp_avg"] = bad["state"][2]["exp_avg"][:2]  # (AdamW's part fails)
    with pytest.raises(ValueError):
        resumed.load_state_dict(bad)
    after = resumed.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [0.02, 1e-3]
    for i, entry in before[1]["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(after["state"][i][key], value)
    _run(opt, params, grads[2:], queue)
    _run(resumed, copy, grads[2:], queue)
    for a, b in zip(params, copy, strict=True):
        assert a.data.get().tobytes() == b.data.get().tobytes()


def test_muon_with_aux_adam_takes_keller_jordan_groups(cl_queue):
    mats = _stateful_params([np.ones((4, 3)), np.ones((3, 3))], cl_queue, np.float32)
    vecs = _stateful_params([np.ones(3)], cl_queue, np.float32)
    opt = MuonWithAuxAdam([
        {"params": vecs, "use_muon": False, "lr": 1e-3, "betas": (0.8, 0.9)},
        {"params": mats, "use_muon": True, "lr": 0.05, "momentum": 0.9},
    ])  # fmt: skip
    groups = opt.param_groups
    assert [g["use_muon"] for g in groups] == [False, True]
    assert groups[0]["betas"] == (0.8, 0.9) and groups[0]["eps"] == 1e-10
    assert groups[1]["momentum"] == 0.9 and groups[1]["variant"] == "reference"
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAuxAdam([{"params": vecs}, {"params": mats}])
    with pytest.raises(ValueError, match="momentum"):
        MuonWithAuxAdam([{"params": vecs, "use_muon": False, "momentum": 0.9}])
    opt.zero_grad(set_to_none=False)
    opt.step()  # zero grads: AdamW's and Muon's updates of zeros are finite
    assert all(np.isfinite(p.data.get()).all() for p in mats + vecs)


def test_bfloat16_params_keep_their_momentum_unnormalised():
    """pytorch#190597: torch 2.13's Muon with bfloat16 params and ``nesterov=False``
    normalises the momentum buffer itself in place (its norm ends near 1). Here the buffer is
    the EMA of the gradients, whatever the params' dtype."""
    import ml_dtypes

    rng = np.random.default_rng(190597)
    p = no.Parameter(no.to_device(rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)))
    opt = no.Muon([p], lr=0.02, nesterov=False)
    want = np.zeros((16, 8), np.float64)
    for _ in range(3):
        g = (10 * rng.standard_normal((16, 8))).astype(ml_dtypes.bfloat16)
        p.grad = no.to_device(g)
        opt.step()
        want = want + 0.05 * (g.astype(np.float64) - want)
    buf = opt.state[p]["momentum_buffer"].get().astype(np.float64)
    np.testing.assert_allclose(buf, want, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(want) > 5  # (far from the 1 of a normalised buffer)
