"""Pin tests/reference_8bit.py to the real bitsandbytes CPU backend (skips without bnb)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

import reference_8bit as R  # noqa: E402

N = 5003  # >= min_8bit_size 4096, not a multiple of 256 (20 blocks, last one 139 long)


def torch_sqrt(x):
    """torch's CPU float32 sqrt (MKL VML, not correctly rounded) to match bnb bit-for-bit."""
    return torch.sqrt(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bnb(signed):
    ours = R.dynamic_map(signed)
    theirs = F.create_dynamic_map(signed=signed).numpy()
    assert ours.dtype == np.float32 and ours.shape == (256,)
    np.testing.assert_array_equal(_bits(ours), _bits(theirs))


def _quant_inputs(rng, signed):
    q = R.dynamic_map(signed)
    out = []
    for trial in range(12):
        n = 5000 + 37 * trial
        x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** rng.uniform(-8, 3))
        if not signed:
            x = np.abs(x) ** 2
        x[rng.integers(0, n, 50)] = 0.0  # zeros inside non-zero blocks
        x[512:768] = 0.0  # an all-zero block (absmax 0)
        k = rng.integers(0, n, 300)
        x[k] = q[rng.integers(0, 256, 300)]  # exact code values
        mids = (q[:-1] + q[1:]) / np.float32(2)  # exact midpoints (ties)
        k = rng.integers(0, n, 300)
        x[k] = mids[rng.integers(0, 255, 300)]
        x[:256] = np.concatenate([[np.float32(1.0)], mids, []])[:256]  # block 0: absmax 1, all ties
        out.append(x.astype(np.float32))
    # dense sweep of the LUT bin boundaries with absmax 1 per block
    j = np.arange(1, 65536, dtype=np.float64)
    thr = ((j - 0.5) / 32767.5 - 1).astype(np.float32)
    sweep = [thr]
    for d in (np.float32(2), np.float32(-2)):
        v = thr
        for _ in range(2):
            v = np.nextafter(v, d)
            sweep.append(v)
    s = np.concatenate(sweep)
    s = np.abs(s) if not signed else s
    s = np.clip(s, -1, 1)
    chunks = [np.concatenate([[np.float32(1.0)], s[i : i + 255]]) for i in range(0, s.size, 255)]
    out.append(np.concatenate(chunks).astype(np.float32))
    # non-finite
    x = rng.standard_normal(1000).astype(np.float32)
    x[3] = np.nan
    x[300] = np.inf
    x[600:610] = np.nan
    x[610:856] = 0.0
    out.append(x)
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_dequantize_equal_bnb(signed):
    rng = np.random.default_rng(123 + signed)
    q = R.dynamic_map(signed)
    qt = torch.from_numpy(q.copy())
    for x in _quant_inputs(rng, signed):
        codes_t, qs = F.quantize_blockwise(torch.from_numpy(x), code=qt, blocksize=256)
        codes, absmax = R.quantize_blocks(x, q, signed, block=256)
        np.testing.assert_array_equal(codes, codes_t.numpy())
        np.testing.assert_array_equal(_bits(absmax), _bits(qs.absmax.numpy()))
        deq_t = F.dequantize_blockwise(codes_t, absmax=qs.absmax, code=qt, blocksize=256).numpy()
        deq = R.dequantize_blocks(codes, absmax, q, block=256)
        np.testing.assert_array_equal(_bits(deq), _bits(deq_t))


def test_zero_in_nonzero_block_is_not_zero_code():
    q = R.dynamic_map(True)
    x = np.full(256, 0.5, np.float32)
    x[7] = 0.0
    codes, _ = R.quantize_blocks(x, q, True)
    assert codes[7] == 131 and q[127] == 0.0


CASES = {
    "adam": ("Adam8bit", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    "adamw": ("AdamW8bit", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)),
    "lion": ("Lion8bit", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)),
    "rmsprop": ("RMSprop8bit", dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-2)),
    "adagrad": ("Adagrad8bit", dict(lr=1e-2, eps=1e-10, weight_decay=1e-2)),
    "sgd": ("SGD8bit", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_50_steps_equal_bnb(name):
    cls_name, hyper = CASES[name]
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(N).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = getattr(bnb.optim, cls_name)([param], **hyper)
    p = p0.copy()
    state = R.init_state(name, p.shape)
    two = name in ("adam", "adamw")
    for t in range(50):
        g = (rng.standard_normal(N) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        p, state = R.step_8bit(name, p, g, state, hyper, sqrt=torch_sqrt)
        st = opt.state[param]
        assert st["state1"].dtype == torch.uint8
        assert st["step"] == state["step"] == t + 1
        msg = f"{name} step {t + 1}"
        np.testing.assert_array_equal(state["state1"], st["state1"].numpy(), err_msg=msg)
        np.testing.assert_array_equal(_bits(state["absmax1"]), _bits(st["absmax1"].numpy()))
        if two:
            np.testing.assert_array_equal(state["state2"], st["state2"].numpy(), err_msg=msg)
            np.testing.assert_array_equal(_bits(state["absmax2"]), _bits(st["absmax2"].numpy()))
        np.testing.assert_array_equal(_bits(p), _bits(param.detach().numpy()), err_msg=msg)


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_state_variant_close_to_8bit(name):
    _, hyper = CASES[name]
    rng = np.random.default_rng(3)
    p8 = p32 = rng.standard_normal(N).astype(np.float32)
    s8, s32 = R.init_state(name, (N,)), R.init_state(name, (N,), quantized=False)
    for _ in range(10):
        g = rng.standard_normal(N).astype(np.float32)
        p8, s8 = R.step_8bit(name, p8, g, s8, hyper)
        p32, s32 = R.step_fp32_state(name, p32, g, s32, hyper)
    assert s32["state1"].dtype == np.float32
    np.testing.assert_allclose(p8, p32, atol=0.05)
