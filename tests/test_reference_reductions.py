"""The issue #16 references (tests/reference_reductions.py) against their oracles in float64:
optax 0.2.8 for the per-tensor / per-axis transforms and aliases, torch.optim.Adafactor for the
torch rule. 30 steps on mixed trees (matrices, a leaf that optax's adafactor factors, a
vector, a 0-d leaf, 3-D leaves) plus all-zero param / update leaves."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import reference_reductions as rr

STEPS = 30
RTOL, ATOL = 1e-10, 1e-13

BASE_SHAPES = {"w": (6, 4), "wide": (3, 130), "v": (5,), "s": (), "t3": (2, 3, 4)}
FACTOR_SHAPES = {
    **BASE_SHAPES,
    "tall": (130, 5),
    "sq": (128, 129),
    "c1": (129, 2, 130),  # d1 = 0 < d0 = 2
    "c2": (130, 3, 129),  # d1 = 2 > d0 = 0
}


@pytest.fixture(scope="module")
def optax_x64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", old)


def _tree(shapes, rng, scale=1.0):
    return {k: scale * rng.standard_normal(s) for k, s in shapes.items()}


def _problem(shapes, seed=0, zero_leaves=False):
    """(params0, grads_seq); with zero_leaves an all-zero param leaf ``zp`` and a leaf ``zg``
    whose updates are always zero."""
    rng = np.random.default_rng(seed)
    shapes = dict(shapes)
    if zero_leaves:
        shapes.update(zp=(3, 4), zg=(4,))
    params = _tree(shapes, rng)
    grads = [_tree(shapes, rng, scale=0.5 + rng.random()) for _ in range(STEPS)]
    if zero_leaves:
        params["zp"] = np.zeros(shapes["zp"])
        for g in grads:
            g["zg"] = np.zeros(shapes["zg"])
    return params, grads


def _run_optax(optax_tx, params, grads_seq):
    import jax.numpy as jnp

    p = ref.tree_map(jnp.asarray, params)
    state = optax_tx.init(p)
    out_p, out_u = [], []
    for g in grads_seq:
        u, state = optax_tx.update(ref.tree_map(jnp.asarray, g), state, p)
        p = ref.tree_map(lambda a, b: a + b, p, u)
        out_u.append(ref.tree_map(np.asarray, u))
        out_p.append(ref.tree_map(np.asarray, p))
    return out_p, out_u, state


def _close(got, want):
    for a, b in zip(ref.tree_leaves(got), ref.tree_leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        assert np.all(np.isfinite(a))
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))  # p + u cancels to ~0
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * scale)


def _compare(optax_tx, ref_tx, params, grads):
    want_p, want_u, want_state = _run_optax(optax_tx, params, grads)
    got_p, got_u, got_state = ref.run_transform(ref_tx, params, grads)
    for k in range(len(grads)):
        _close(got_u[k], want_u[k])
        _close(got_p[k], want_p[k])
    return got_state, want_state


# ---------------------------------------------------------------------------- stateless + aliases


def _stateless_cases(optax):
    return [
        ("trust_ratio", optax.scale_by_trust_ratio(), rr.scale_by_trust_ratio()),
        ("trust_ratio-args", optax.scale_by_trust_ratio(0.5, 0.01, 1e-3),
         rr.scale_by_trust_ratio(0.5, 0.01, 1e-3)),
        ("block_norm", optax.scale_by_param_block_norm(), rr.scale_by_param_block_norm()),
        ("block_norm-big", optax.scale_by_param_block_norm(2.0),
         rr.scale_by_param_block_norm(2.0)),
        ("block_rms", optax.scale_by_param_block_rms(), rr.scale_by_param_block_rms()),
        ("block_rms-big", optax.scale_by_param_block_rms(0.9), rr.scale_by_param_block_rms(0.9)),
        ("clip_block_rms", optax.clip_by_block_rms(0.6), rr.clip_by_block_rms(0.6)),
        ("centralize", optax.centralize(), rr.centralize()),
        ("normalize", optax.normalize_by_update_norm(), rr.normalize_by_update_norm()),
        ("normalize-args", optax.normalize_by_update_norm(-0.3, 1e-2),
         rr.normalize_by_update_norm(-0.3, 1e-2)),
    ]  # fmt: skip


def _alias_cases(optax):
    sched = lambda c: 0.05 / (1.0 + 0.1 * c)  # noqa: E731
    return [
        ("lamb", optax.lamb(0.01), rr.lamb_tx(0.01)),
        ("lamb-wd", optax.lamb(0.02, 0.8, 0.99, 1e-4, 1e-8, weight_decay=0.1),
         rr.lamb_tx(0.02, 0.8, 0.99, 1e-4, 1e-8, weight_decay=0.1)),
        ("lars", optax.lars(0.1), rr.lars_tx(0.1)),
        ("lars-args", optax.lars(0.2, 1e-2, trust_coefficient=0.02, eps=1e-4, momentum=0.8,
                                 nesterov=True),
         rr.lars_tx(0.2, 1e-2, trust_coefficient=0.02, eps=1e-4, momentum=0.8, nesterov=True)),
        ("lars-schedule", optax.lars(sched), rr.lars_tx(sched)),
        ("fromage", optax.fromage(0.05), rr.fromage_tx(0.05)),
        ("fromage-min_norm", optax.fromage(0.1, min_norm=0.0), rr.fromage_tx(0.1, min_norm=0.0)),
        ("fromage-schedule", optax.fromage(sched), rr.fromage_tx(sched)),
        ("novograd", optax.novograd(0.01), rr.novograd_tx(0.01)),
        ("novograd-args", optax.novograd(0.03, 0.8, 0.5, 1e-4, 1e-6, weight_decay=0.05),
         rr.novograd_tx(0.03, 0.8, 0.5, 1e-4, 1e-6, weight_decay=0.05)),
        ("scale_by_novograd", optax.scale_by_novograd(), rr.scale_by_novograd()),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(10))
def test_stateless_matches_optax(optax_x64, index):
    _name, optax_tx, ref_tx = _stateless_cases(optax_x64)[index]
    params, grads = _problem(BASE_SHAPES, seed=index, zero_leaves=True)
    _compare(optax_tx, ref_tx, params, grads)


@pytest.mark.parametrize("index", range(11))
def test_alias_matches_optax(optax_x64, index):
    _name, optax_tx, ref_tx = _alias_cases(optax_x64)[index]
    params, grads = _problem(BASE_SHAPES, seed=100 + index, zero_leaves=True)
    _compare(optax_tx, ref_tx, params, grads)


def test_novograd_state_layout(optax_x64):
    params, grads = _problem(BASE_SHAPES, seed=7, zero_leaves=True)
    got, want = _compare(optax_x64.scale_by_novograd(), rr.scale_by_novograd(), params, grads)
    assert got["count"] == int(want.count) == STEPS
    for k in params:
        assert got["nu"][k].shape == ()  # one scalar per leaf
        np.testing.assert_allclose(got["nu"][k], np.asarray(want.nu[k]), rtol=RTOL)
        np.testing.assert_allclose(got["mu"][k], np.asarray(want.mu[k]), rtol=RTOL, atol=ATOL)
    assert got["nu"]["zg"] == 0.0


def test_trust_ratio_zero_norm_is_one(optax_x64):
    """optax: ratio 1 where ||p|| == 0 or ||u|| == 0 (never 0/0); min_norm floors first."""
    import jax.numpy as jnp

    leaves = {"zp": (np.zeros((2, 3)), np.ones((2, 3))), "zu": (np.ones(3), np.zeros(3)),
              "both": (np.zeros(()), np.zeros(()))}  # fmt: skip
    for min_norm in (0.0, 1e-6):
        for p, u in leaves.values():
            got, _ = rr.scale_by_trust_ratio(min_norm).update(u, (), p)
            want, _ = optax_x64.scale_by_trust_ratio(min_norm).update(
                jnp.asarray(u), None, jnp.asarray(p)
            )
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, np.asarray(want), rtol=RTOL, atol=0)


# ---------------------------------------------------------------------------- adaptive clipping


AGC_SHAPES = {"w": (6, 4), "row": (1, 5), "col": (5, 1), "v": (5,), "s": (), "t3": (2, 3, 4),
              "hwio": (3, 3, 2, 4), "dhwio": (2, 2, 2, 3, 2)}  # fmt: skip


@pytest.mark.parametrize("clipping", [0.02, 0.3, 5.0])
def test_agc_in_out_matches_optax(optax_x64, clipping):
    params, grads = _problem(AGC_SHAPES, seed=3, zero_leaves=True)
    grads = grads[:5]
    _compare(optax_x64.adaptive_grad_clip(clipping), rr.adaptive_grad_clip(clipping),
             params, grads)  # fmt: skip


def test_agc_out_in_is_torch_layout(optax_x64):
    """out_in: units along axis 0, the norm over the other axes (timm's unitwise_norm); equals
    in_out on the transposed (HWIO) leaf, and optax with axis=(1, ..)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    transposes = {(6, 4): (1, 0), (4, 2, 3, 3): (2, 3, 1, 0)}
    for shape, perm in transposes.items():
        p, g = rng.standard_normal(shape), rng.standard_normal(shape)
        got, _ = rr.adaptive_grad_clip(0.2, layout="out_in").update(g, (), p)
        via_t, _ = rr.adaptive_grad_clip(0.2).update(g.transpose(perm), (), p.transpose(perm))
        back = np.argsort(perm)
        np.testing.assert_allclose(got, via_t.transpose(back), rtol=RTOL)
        axis = tuple(range(1, len(shape)))
        want, _ = optax_x64.adaptive_grad_clip(0.2, axis=axis).update(
            jnp.asarray(g), None, jnp.asarray(p)
        )
        np.testing.assert_allclose(got, np.asarray(want), rtol=RTOL)
        assert not np.allclose(got, g)  # some unit was clipped
    col_p, col_g = rng.standard_normal((5, 1)), rng.standard_normal((5, 1))
    got, _ = rr.adaptive_grad_clip(0.2, layout="out_in").update(col_g, (), col_p)
    want = np.where(np.abs(col_g) < 0.2 * np.maximum(np.abs(col_p), 1e-3), col_g,
                    col_g * 0.2 * np.maximum(np.abs(col_p), 1e-3) / np.abs(col_g))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_unitwise_axes_layouts():
    assert rr.unitwise_axes((6, 4)) == (0,)
    assert rr.unitwise_axes((2, 3, 4)) == (0,)
    assert rr.unitwise_axes((3, 3, 2, 4)) == (0, 1, 2)
    assert rr.unitwise_axes((1, 5)) is None and rr.unitwise_axes(()) is None
    assert rr.unitwise_axes((6, 4), "out_in") == (1,)
    assert rr.unitwise_axes((4, 2, 3, 3), "out_in") == (1, 2, 3)
    assert rr.unitwise_axes((5,), "out_in") is None
    with pytest.raises(ValueError, match="Invalid layout"):
        rr.unitwise_axes((2, 2), "oi")
    with pytest.raises(ValueError, match="Invalid shape"):
        rr.unitwise_axes((2,) * 6)


# ---------------------------------------------------------------------------- sm3


def test_sm3_matches_optax(optax_x64):
    shapes = {k: s for k, s in FACTOR_SHAPES.items() if s != ()}  # optax raises on 0-d
    params, grads = _problem(shapes, seed=11)
    for b1, b2 in ((0.9, 1.0), (0.5, 0.95)):
        got, want = _compare(optax_x64.scale_by_sm3(b1, b2), rr.scale_by_sm3(b1, b2),
                             params, grads)  # fmt: skip
        for k, shape in shapes.items():
            mu = got["mu"][k]
            assert [m.shape for m in mu] == ([shape] if len(shape) < 2 else
                                             [(n,) for n in shape])  # fmt: skip
            for a, b in zip(mu, want.mu[k], strict=True):
                np.testing.assert_allclose(a, np.asarray(b), rtol=RTOL)
    _compare(optax_x64.sm3(0.05), rr.sm3_tx(0.05), params, grads)
    _compare(optax_x64.sm3(0.05, momentum=0.0), rr.sm3_tx(0.05, momentum=0.0), params, grads)


def test_sm3_scalar_leaf_is_a_one_element_vector(optax_x64):
    rng = np.random.default_rng(12)
    p0 = rng.standard_normal(())
    grads = [rng.standard_normal(()) for _ in range(STEPS)]
    got, _, _ = ref.run_transform(rr.sm3_tx(0.05), p0, grads)
    want, _, _ = _run_optax(optax_x64.sm3(0.05), p0.reshape(1), [g.reshape(1) for g in grads])
    _close([x.reshape(1) for x in got], want)


def test_sm3_zero_gradient_gives_zero(optax_x64):
    params, grads = _problem({"w": (6, 4)}, seed=13, zero_leaves=True)
    _compare(optax_x64.sm3(0.05), rr.sm3_tx(0.05), params, grads)


# ---------------------------------------------------------------------------- adafactor (optax)


def test_factored_dims_choice():
    assert rr.factored_dims((130, 5), True, 128) is None
    assert rr.factored_dims((128, 129), True, 128) == (0, 1)
    assert rr.factored_dims((129, 2, 130), True, 128) == (0, 2)
    assert rr.factored_dims((130, 3, 129), True, 128) == (2, 0)
    assert rr.factored_dims((130, 130), False, 128) is None
    assert rr.factored_dims((200,), True, 1) is None


def test_factored_rms_matches_optax(optax_x64):
    params, grads = _problem(FACTOR_SHAPES, seed=21)
    got, want = _compare(optax_x64.scale_by_factored_rms(), rr.scale_by_factored_rms(),
                         params, grads)  # fmt: skip
    assert got["count"] == int(want.count)
    for key in ("v_row", "v_col", "v"):
        for k in params:
            np.testing.assert_allclose(got[key][k], np.asarray(getattr(want, key)[k]),
                                       rtol=RTOL)  # fmt: skip
    assert got["v_row"]["sq"].shape == (128,) and got["v_col"]["sq"].shape == (129,)
    assert got["v_row"]["c2"].shape == (3, 129) and got["v_col"]["c2"].shape == (130, 3)
    assert got["v"]["tall"].shape == (130, 5) and got["v_row"]["tall"].shape == (1,)


def _adafactor_kwargs():
    sched = lambda c: 0.02 / (1.0 + 0.05 * c)  # noqa: E731
    return [
        {},
        {"learning_rate": 0.01},
        {"learning_rate": sched, "momentum": 0.9, "weight_decay_rate": 1e-3},
        {"learning_rate": 0.05, "min_dim_size_to_factor": 4, "decay_rate": 0.7,
         "decay_offset": -3, "multiply_by_parameter_scale": False, "clipping_threshold": None,
         "eps": 1e-20},
        {"learning_rate": 0.02, "factored": False, "clipping_threshold": 2.0},
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(5))
def test_adafactor_alias_matches_optax(optax_x64, index):
    kw = _adafactor_kwargs()[index]
    params, grads = _problem(FACTOR_SHAPES, seed=30 + index, zero_leaves=True)
    _compare(optax_x64.adafactor(**kw), rr.adafactor_optax_tx(**kw), params, grads)


def test_decay_rate_is_float32_like_optax(optax_x64):
    import jax.numpy as jnp
    from optax._src import factorized

    for i in range(STEPS):
        want = float(factorized._decay_rate_pow(jnp.asarray(i, jnp.int32), 0.8))
        assert rr.decay_rate_pow(i, 0.8) == want


# ---------------------------------------------------------------------------- torch Adafactor


TORCH_SHAPES = {"w": (6, 4), "wide": (3, 130), "v": (5,), "s": (), "t3": (2, 3, 4),
                "c": (3, 5, 7)}  # fmt: skip


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"learning_rate": 0.5, "beta2_decay": -0.5, "eps": (1e-6, 1e-2), "d": 2.0},
        {"learning_rate": 0.05, "weight_decay": 0.1, "maximize": True},
    ],
)
def test_adafactor_torch_matches_torch(hp):
    torch = pytest.importorskip("torch")
    params, grads = _problem(TORCH_SHAPES, seed=40, zero_leaves=True)
    for g in grads:  # a tiny gradient: mean(row_var) and var fall under the eps1 clamps
        g["tiny"] = 1e-5 * g["w"][:4, :3]
    params["tiny"] = params["w"][:4, :3].copy()
    names = list(params)
    tensors = [torch.tensor(params[k], dtype=torch.float64) for k in names]
    kw = {"lr": hp.get("learning_rate", 1e-2), "foreach": False,
          **{k: v for k, v in hp.items() if k != "learning_rate"}}  # fmt: skip
    opt = torch.optim.Adafactor(tensors, **kw)
    states = {k: {} for k in names}
    mine = {k: params[k] for k in names}
    for g in grads:
        for t, k in zip(tensors, names, strict=True):
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        for t, k in zip(tensors, names, strict=True):
            mine[k], states[k] = rr.adafactor(mine[k], g[k], states[k], **hp)
            assert np.all(np.isfinite(mine[k]))
            np.testing.assert_allclose(mine[k], t.detach().numpy(), rtol=RTOL, atol=ATOL)
    for t, k in zip(tensors, names, strict=True):
        theirs = opt.state[t]
        assert states[k]["step"] == int(theirs["step"]) == STEPS
        for key in ("row_var", "col_var", "variance"):
            assert (key in states[k]) == (key in theirs and theirs[key] is not None)
            if key in states[k]:
                np.testing.assert_allclose(states[k][key], theirs[key].numpy(), rtol=RTOL)
    assert states["c"]["row_var"].shape == (3, 5, 1)
    assert states["c"]["col_var"].shape == (3, 1, 7)


def test_adafactor_torch_eps1_follows_param_dtype():
    """eps1=None is finfo(p.dtype).eps: with float32 p and gradients under it the clamps
    decide the step, and the reference (float64 maths, float32 eps1) tracks torch in float32."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(41)
    for shape in ((4, 3), (5,)):
        p = rng.standard_normal(shape).astype(np.float32)
        t = torch.tensor(p)
        opt = torch.optim.Adafactor([t], lr=0.1, foreach=False)
        mine, state = p, {}
        for _ in range(5):
            g = (1e-9 * rng.standard_normal(shape)).astype(np.float32)
            t.grad = torch.tensor(g)
            opt.step()
            mine, state = rr.adafactor(mine.astype(np.float32), g, state, learning_rate=0.1)
            np.testing.assert_allclose(mine, t.numpy(), rtol=1e-5)
        moved = np.abs(mine - p).max()
        assert moved > 1e-4  # the eps1 clamp made a visible step
