"""save / load: atomic .npz checkpoints of stateful optimizers and functional states."""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_table import OPTIMIZERS, STATEFUL, Optimizer, ids

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim._checkpoint import load, save
from netcl_optim._packing import contiguous_run
from netcl_optim.fusion import count_launches

SHAPES = [(3, 4), (5,), (2, 1, 3), ()]  # a 0-d leaf too


class Pair(NamedTuple):
    left: Any
    right: Any


def dev(x, queue):
    return no.to_device(np.asarray(x), queue)


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def params_host(params):
    return [p.data.get() for p in params]


def random_grads(rng, shapes, steps):
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("row", STATEFUL, ids=ids(STATEFUL))
def test_stateful_resume_is_bitwise(cl_queue, tmp_path, row: Optimizer):
    """Checkpoint after k steps (optimizer + params), rebuild from the files, go on: the same
    bits as the uninterrupted run."""
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, 8)
    grads[2][1] = None
    params = [S.Parameter(dev(p, cl_queue)) for p in p0]
    opt = row.make_stateful(no, [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}])

    def step(ps, o, gs):
        for p, g in zip(ps, gs, strict=True):
            p.grad = None if g is None else dev(g, cl_queue)
        o.step()

    for gs in grads[:4]:
        step(params, opt, gs)
    save(tmp_path / "opt.npz", opt)
    save(tmp_path / "params.npz", [p.data for p in params])
    for gs in grads[4:]:
        step(params, opt, gs)

    saved = load(tmp_path / "params.npz", queue=cl_queue)
    resumed = [S.Parameter(a) for a in saved]
    opt2 = row.make_stateful(no, [{"params": resumed[:2]}, {"params": resumed[2:]}])
    assert load(tmp_path / "opt.npz", opt2) is opt2
    assert opt2.param_groups[1]["lr"] == 0.02
    for gs in grads[4:]:
        step(resumed, opt2, gs)
    assert [bits(a) for a in params_host(resumed)] == [bits(a) for a in params_host(params)]


@pytest.mark.parametrize("row", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_functional_resume_is_bitwise(cl_queue, tmp_path, row: Optimizer):
    """A functional (params, state) pytree saved after k steps and loaded continues bit for
    bit; the state keeps its structure (NamedTuples, int counts) and stays packed."""
    rng = np.random.default_rng(8)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, 7)
    tx = row.make(no)
    params = no.pack([dev(p, cl_queue) for p in p0])
    state = tx.init(params)
    for gs in grads[:3]:
        params, state = no.step(tx, params, [dev(g, cl_queue) for g in gs], state)
    save(tmp_path / "ckpt.npz", {"params": params, "opt_state": state, "epoch": 3})
    loaded = load(tmp_path / "ckpt.npz", queue=cl_queue)
    assert loaded["epoch"] == 3
    assert optree.tree_structure(loaded["opt_state"]) == optree.tree_structure(state)
    for a, b in zip(optree.tree_leaves(loaded["opt_state"]), optree.tree_leaves(state),
                    strict=True):  # fmt: skip
        assert type(a) is type(b)
    p2, s2 = loaded["params"], loaded["opt_state"]
    assert contiguous_run(p2) is not None
    for gs in grads[3:]:
        g = no.pack([dev(x, cl_queue) for x in gs])
        params, state = no.step(tx, params, g, state)
        with count_launches() as c:
            p2, s2 = no.step(tx, p2, g, s2)
        # params, grads and every slot packed: one launch (a segmented rule: a constant)
        assert c.launches <= row.segmented if row.segmented else c.launches == 1
    assert [bits(a.get()) for a in p2] == [bits(a.get()) for a in params]


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, {"a": np.arange(3.0)})
    first = path.read_bytes()
    with pytest.raises(TypeError, match="cannot store"):
        save(path, {"a": np.arange(3.0), "bad": object()})
    assert path.read_bytes() == first  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    save(str(path), {"a": np.arange(4.0)})  # replaced in place
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    np.testing.assert_array_equal(load(path)["a"], np.arange(4.0))
    with np.load(path, allow_pickle=False) as data:  # no pickled entry anywhere
        assert all(data[name].dtype != object for name in data.files)


def test_save_rejects_object_arrays(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        save(tmp_path / "x.npz", [np.array([{}, 1], dtype=object)])
    assert os.listdir(tmp_path) == []


def test_pytree_of_every_leaf_kind(cl_queue, tmp_path):
    tree = {
        0: Pair(left=np.float32(1.5), right=[None, (1, 2.5, "s")]),
        "nested": {"t": (np.arange(6, dtype=np.int32).reshape(2, 3), True, None)},
        2.5: [float("inf"), -0.0, 10**30, np.float64(0.1)],
        None: np.empty((0, 3), np.float16),
        "dev": [dev(np.array([1.0, 2.0], np.float32), cl_queue), dev(np.zeros((0,)), cl_queue)],
    }
    path = tmp_path / "tree.npz"
    save(path, tree)
    out = load(path, queue=cl_queue)
    assert list(out) == [0, "nested", 2.5, None, "dev"]
    assert isinstance(out[0], Pair) and type(out[0].left) is np.float32 and out[0].left == 1.5
    assert out[0].right == [None, (1, 2.5, "s")]
    assert out["nested"]["t"][1] is True and out["nested"]["t"][2] is None
    np.testing.assert_array_equal(out["nested"]["t"][0], tree["nested"]["t"][0])
    assert out["nested"]["t"][0].dtype == np.int32
    assert out[2.5][0] == math.inf and math.copysign(1, out[2.5][1]) == -1
    assert out[2.5][2] == 10**30 and type(out[2.5][3]) is np.float64
    assert out[None].shape == (0, 3) and out[None].dtype == np.float16
    assert isinstance(out["dev"][0], no._device.Array)
    np.testing.assert_array_equal(out["dev"][0].get(), [1.0, 2.0])
    assert out["dev"][1].shape == (0,)


@settings(max_examples=15)
@given(
    leaves=st.lists(
        st.one_of(
            st.floats(allow_nan=False, width=32),
            st.integers(-(2**40), 2**40),
            st.none(),
            st.text(max_size=5),
            st.lists(st.floats(-1e3, 1e3, width=32), max_size=7).map(
                lambda v: np.array(v, np.float32)
            ),
        ),
        max_size=6,
    )
)
def test_host_pytrees_round_trip(tmp_path_factory, leaves):
    path = tmp_path_factory.mktemp("h") / "t.npz"
    by_index = dict(enumerate(leaves))
    tree = {"list": leaves, "tuple": tuple(leaves), "pair": Pair(leaves, by_index)}
    save(path, tree)
    out = load(path)
    flat_in, spec_in = optree.tree_flatten(tree, none_is_leaf=True)
    flat_out, spec_out = optree.tree_flatten(out, none_is_leaf=True)
    assert spec_in == spec_out
    for a, b in zip(flat_in, flat_out, strict=True):
        assert type(a) is type(b)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and bits(a) == bits(b)
        else:
            assert a == b


def test_load_errors(cl_queue, tmp_path):
    save(tmp_path / "tree.npz", [np.ones(2)])
    params = [S.Parameter(dev(np.ones(2, np.float32), cl_queue))]
    with pytest.raises(ValueError, match="functional pytree"):
        load(tmp_path / "tree.npz", S.SGD(params))
    np.savez(tmp_path / "other.npz", x=np.ones(2))
    with pytest.raises(ValueError, match="not a netcl_optim checkpoint"):
        load(tmp_path / "other.npz")
    opt = S.Adam(params)
    save(tmp_path / "adam.npz", opt)
    other = [S.Parameter(dev(np.ones(2, np.float32), cl_queue)) for _ in range(2)]
    with pytest.raises(ValueError, match="size"):
        load(tmp_path / "adam.npz", S.Adam(other))


def test_load_without_optimizer_returns_the_state_dict(cl_queue, tmp_path):
    params = [S.Parameter(dev(np.ones(2, np.float32), cl_queue))]
    opt = S.RMSProp(params, lr=0.1, momentum=0.5)
    params[0].grad = dev(np.ones(2, np.float32), cl_queue)
    opt.step()
    save(tmp_path / "opt.npz", opt)
    sd = load(tmp_path / "opt.npz")
    want = opt.state_dict()
    assert sd["param_groups"] == want["param_groups"]
    assert sd["state"].keys() == want["state"].keys() == {0}
    assert sd["state"][0]["step"] == 1.0
    for key in ("square_avg", "momentum_buffer"):
        assert bits(sd["state"][0][key]) == bits(want["state"][0][key])
