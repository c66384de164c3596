"""Stochastic rounding of bfloat16 state: with ``stochastic_rounding`` in the chain (or
``stochastic_rounding=True`` on a class), every slot stored as bfloat16 is its float32 value
rounded up or down at random, the bits from Philox-4x32-10 of (element index, t,
0x53530000) under the seed (two slots per word), checked against a numpy reference; it is
unbiased, the same packed and leaf by leaf, in every kernel of a rule that runs several,
and a stateful optimizer resumes it bit for bit."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import optree
import pytest
import reference as ref
from test_functional import snapshot
from test_low_precision import _stateful_resumes

import netcl_optim as no
from netcl_optim import stateful as S

BF16 = np.dtype(ml_dtypes.bfloat16)
SEED = 2**33 + 5


def state_bits(values: np.ndarray, t: int, slot: int, first: int, seed: int = SEED) -> np.ndarray:
    """The reference: float32 ``values`` (flattened in the packed order from element
    ``first``) stochastically rounded to bfloat16 with slot ``slot``'s 16 random bits."""
    x = np.asarray(values, np.float32).reshape(-1)
    idx = np.arange(x.size, dtype=np.uint64) + np.uint64(first)
    words = ref.philox4x32_10(
        [idx & 0xFFFFFFFF, idx >> np.uint64(32), np.uint64(t), np.uint64(0x53530000 + slot // 8)],
        [seed & 0xFFFFFFFF, seed >> 32],
    )
    word = words[slot % 8 // 2].astype(np.uint64)
    r = word & 0xFFFF if slot % 2 == 0 else word >> np.uint64(16)
    bits = x.view(np.uint32).astype(np.uint64)
    up = ((bits + r) >> np.uint64(16)).astype(np.uint16)
    out = np.where(np.isnan(x), x.astype(BF16).view(np.uint16), up)
    return out.view(BF16).reshape(np.shape(values))


def _to_device_like(host: Any, like: Any) -> Any:
    """``host`` values, on the device where ``like`` has device arrays (in their dtypes)."""
    return optree.tree_map(
        lambda h, d: no.to_device(np.asarray(h).astype(d.dtype)) if hasattr(d, "get") else h,
        host, like, none_is_leaf=True,
    )  # fmt: skip


def test_bfloat16_state_is_rounded_stochastically_as_the_reference():
    """Adam with bfloat16 state (float32 params): each step's new mu and nu are the float32
    step's, from the same stored state, rounded with the reference's bits (mu: word 0's low
    half, nu: its high half); the params move by the unrounded float32 state."""
    rng = np.random.default_rng(3)
    host = {"b": rng.standard_normal(300).astype(np.float32),
            "w": rng.standard_normal((40, 50)).astype(np.float32)}  # fmt: skip
    first = {"b": 0, "w": 300}  # (optree sorts dict keys: "b" is packed first)
    tx32 = no.adam(1e-2)
    tx = no.chain(no.low_precision_state(no.adam(1e-2), "bfloat16"), no.stochastic_rounding(SEED))
    p = p32 = no.pack(no.to_device(host))
    s = tx.init(p)
    for t in range(1, 4):
        g = no.pack(no.to_device({k: rng.standard_normal(v.shape).astype(np.float32)
                                  for k, v in host.items()}))  # fmt: skip
        adam = snapshot(s)[0][0]  # (ScaleByAdamState: count, mu, nu)
        s32 = tx32.init(p32)
        s32 = _to_device_like(
            (s32[0]._replace(count=adam.count, mu={k: v.astype(np.float32) for k, v in
             adam.mu.items()}, nu={k: v.astype(np.float32) for k, v in adam.nu.items()}),
             *snapshot(s32)[1:]), s32)  # fmt: skip
        p32, s32 = no.step(tx32, p32, g, s32)
        p, s = no.step(tx, p, g, s)
        assert no.to_host(p)["w"].tobytes() == no.to_host(p32)["w"].tobytes()
        want32 = snapshot(s32)[0]
        got = snapshot(s)[0][0]
        for j, slot in enumerate(("mu", "nu")):
            for k in host:
                want = state_bits(getattr(want32, slot)[k], t, j, first[k])
                assert (
                    getattr(got, slot)[k].view(np.uint16).tobytes()
                    == want.view(np.uint16).tobytes()
                ), (slot, k, t)
        p32 = p


def test_unbiased_and_packed_equals_leaf_by_leaf():
    """A step of an eighth of the gap above 1 (2^-10) rounds about an eighth of the
    elements up, where round to nearest even keeps them all at 1; a tree stepped leaf by
    leaf draws the same bits as packed."""
    n = 100_000
    tx = no.chain(no.low_precision_state(no.trace(1.0), "bfloat16"), no.stochastic_rounding(9))
    tx_rne = no.low_precision_state(no.trace(1.0), "bfloat16")
    ones, tiny = np.ones(n, np.float32), np.full(n, 2.0**-10, np.float32)
    results = []
    for packed in (True, False):
        params = no.to_device({"a": np.zeros(n, np.float32), "b": np.zeros(7, np.float32)})
        if packed:
            params = no.pack(params)
        s = tx.init(params)
        for g in (ones, tiny):
            grads = no.to_device({"a": g, "b": g[:7]})
            _, s = tx.update(grads, s, params)
        results.append(snapshot(s)[0].trace)
    up = float((results[0]["a"].astype(np.float32) > 1).mean())
    assert abs(up - 1 / 8) < 0.01, up
    for k in ("a", "b"):
        assert results[0][k].view(np.uint16).tobytes() == results[1][k].view(np.uint16).tobytes()
    s = tx_rne.init(no.pack(no.to_device({"a": np.zeros(n, np.float32)})))
    for g in (ones, tiny):
        _, s = tx_rne.update(no.to_device({"a": g}), s)
    assert np.all(snapshot(s).trace["a"].astype(np.float32) == 1)


def test_rules_of_several_kernels_round_all_their_state():
    """LAMB runs two kernels (its Adam moments, then the trust ratio over their output): the
    first kernel's bfloat16 moments are rounded stochastically too: each is one of the two
    bfloat16 neighbours of its float32 value, and some differ from round to nearest even."""
    rng = np.random.default_rng(4)
    host = {"w": rng.standard_normal((60, 70)).astype(np.float32)}
    g = no.pack(no.to_device({"w": rng.standard_normal((60, 70)).astype(np.float32)}))
    params = no.pack(no.to_device(host))
    sr = no.chain(no.low_precision_state(no.lamb(1e-2), "bfloat16"), no.stochastic_rounding(3))
    rne = no.low_precision_state(no.lamb(1e-2), "bfloat16")
    f32 = no.lamb(1e-2)
    with no.count_launches() as c:
        _, s_sr = no.step(sr, params, g, sr.init(params))
    assert c.launches >= 2
    _, s_rne = no.step(rne, params, g, rne.init(params))
    _, s_32 = no.step(f32, params, g, f32.init(params))
    for a, b, x in zip(optree.tree_leaves(snapshot(s_sr)[0]), optree.tree_leaves(snapshot(s_rne)),
                       optree.tree_leaves(snapshot(s_32)), strict=True):  # fmt: skip
        if not (isinstance(a, np.ndarray) and a.dtype == BF16):
            continue
        x = np.asarray(x, np.float32)
        down = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # toward zero
        away = ((x.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32)
        got = a.astype(np.float32)
        assert np.all((got == down) | (got == away))
        assert np.any(a.view(np.uint16) != b.view(np.uint16))


@pytest.mark.parametrize("cls", ["AdamW", "SGD"])
def test_stateful_stochastic_rounding_of_state_equals_functional_and_resumes(
    cl_queue, cls, tmp_path
):
    rng = np.random.default_rng(15)
    shapes = [(70, 100), (100,)]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]

    def fresh():
        return [S.Parameter(no.to_device(np.ones(s, np.float32), cl_queue)) for s in shapes]

    kwargs = {"lr": 1e-3, "momentum": 0.9} if cls == "SGD" else {"lr": 1e-3}
    functional = getattr(no, cls.lower())(1e-3, **({"momentum": 0.9} if cls == "SGD" else {}))
    tx = no.chain(no.low_precision_state(functional, "bfloat16"), no.stochastic_rounding())
    _stateful_resumes(
        cl_queue, tmp_path, fresh,
        lambda ps: getattr(no, cls)(ps, **kwargs, state_dtype="bfloat16",
                                    stochastic_rounding=True),
        lambda ps: getattr(no, cls)(ps, **kwargs), tx, grads, 3,
    )  # fmt: skip
