"""Pure-numpy reference for bitsandbytes-compatible 8-bit block-quantized optimizer state.

Pinned to bitsandbytes 0.50.2 (wheel ``bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64``)
and its **CPU backend** (``bitsandbytes/backends/cpu/ops.py`` + ``libbitsandbytes_cpu.so``).
``tests/test_reference_8bit.py`` checks it bit-for-bit against the installed package.

Layout (identical to bnb's ``opt.state[p]``): ``state1``/``state2`` are uint8 codes with the
parameter's shape, ``absmax1``/``absmax2`` are float32 of shape ``(ceil(n / 256),)`` (one scale
per 256-element block of the flattened tensor; the last block may be short), ``step`` is an int.
state1 always uses the SIGNED dynamic map (also for RMSprop/Adagrad, whose state is >= 0);
only Adam's state2 uses the UNSIGNED map.

Precision: everything is float32, as bnb's CPU backend computes in fp32 torch ops. Python-side
scalars (``1 - beta1``, ``-lr / (1 - beta1**t)``, ``sqrt(1 - beta2**t)``, ...) are computed in
float64 and rounded to float32 when applied, exactly like torch does for a Python scalar
operand of a float32 tensor op. Where torch's CPU kernel fuses (``add_(x, alpha=a)`` ->
``fma(x, a, self)``; ``addcmul_(t1, t2, value=v)`` -> ``fma(v * t1, t2, self)``) we use an exact
float32 FMA emulation. ``addcdiv_`` is ``self + (v * t1) / t2`` without FMA (verified on torch
2.13.0+cpu, AVX512 capability).

sqrt: torch's CPU ``Tensor.sqrt`` for float32 goes through MKL VML and is NOT correctly rounded
(about 17% of random inputs differ by 1 ulp from IEEE sqrt on the test machine). The reference
uses correctly rounded ``np.sqrt`` by default; pass ``sqrt=`` (e.g. a wrapper around
``torch.sqrt``) to reproduce a given torch build bit-for-bit.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 256
_F32 = np.float32
_LUT_SIZE = 65536

__all__ = [
    "BLOCK",
    "NAMES",
    "dequantize_blocks",
    "dynamic_map",
    "init_state",
    "quantize_blocks",
    "step_8bit",
    "step_fp32_state",
]

NAMES = ("adam", "adamw", "lion", "rmsprop", "adagrad", "sgd")


# --------------------------------------------------------------------------- maps


# float32 bit patterns of bnb 0.50.2 ``create_dynamic_map(signed=True/False)`` (256 each).
# Hard-coded because the values depend on torch's CPU ``linspace`` float32 rounding
# (FMA-contracted, vectorized two-sided formula); re-deriving them in numpy with plain
# float32 or float64 arithmetic is off by 1 ulp in a few dozen entries.
# fmt: off
_SIGNED_BITS = (
    0xBF7E3333, 0xBF7A999A, 0xBF770000, 0xBF736666, 0xBF6FCCCD, 0xBF6C3333, 0xBF68999A, 0xBF650000,
    0xBF616666, 0xBF5DCCCD, 0xBF5A3333, 0xBF56999A, 0xBF530000, 0xBF4F6666, 0xBF4BCCCD, 0xBF483333,
    0xBF44999A, 0xBF410000, 0xBF3D6666, 0xBF39CCCD, 0xBF363334, 0xBF32999A, 0xBF2F0000, 0xBF2B6666,
    0xBF27CCCD, 0xBF243334, 0xBF20999A, 0xBF1D0000, 0xBF196666, 0xBF15CCCD, 0xBF123334, 0xBF0E999A,
    0xBF0B0000, 0xBF076666, 0xBF03CCCC, 0xBF003333, 0xBEF93332, 0xBEF20000, 0xBEEACCCC, 0xBEE3999A,
    0xBEDC6666, 0xBED53333, 0xBECE0000, 0xBEC6CCCC, 0xBEBF999A, 0xBEB86666, 0xBEB13333, 0xBEAA0000,
    0xBEA2CCCC, 0xBE9B999A, 0xBE946666, 0xBE8D3334, 0xBE860000, 0xBE7D9999, 0xBE6F3333, 0xBE60CCCD,
    0xBE526666, 0xBE440000, 0xBE35999A, 0xBE273333, 0xBE18CCCD, 0xBE0A6666, 0xBDF80000, 0xBDDB3334,
    0xBDC9EB85, 0xBDC428F7, 0xBDBE6667, 0xBDB8A3D7, 0xBDB2E148, 0xBDAD1EB8, 0xBDA75C2A, 0xBDA1999A,
    0xBD9BD70A, 0xBD96147B, 0xBD9051EB, 0xBD8A8F5D, 0xBD84CCCD, 0xBD7E147B, 0xBD728F5D, 0xBD670A3D,
    0xBD5B851F, 0xBD500000, 0xBD447AE1, 0xBD38F5C3, 0xBD2D70A3, 0xBD21EB85, 0xBD166667, 0xBD0AE148,
    0xBCFEB852, 0xBCE7AE15, 0xBCD0A3D7, 0xBCB9999A, 0xBCA28F5D, 0xBC8B851F, 0xBC68F5C3, 0xBC3AE148,
    0xBC1F3B64, 0xBC160418, 0xBC0CCCCD, 0xBC039581, 0xBBF4BC6A, 0xBBE24DD3, 0xBBCFDF3B, 0xBBBD70A4,
    0xBBAB020D, 0xBB989374, 0xBB8624DD, 0xBB676C8A, 0xBB428F5C, 0xBB1DB22D, 0xBAF1A9FC, 0xBAA7EF9D,
    0xBA7765FF, 0xBA59E83E, 0xBA3C6A80, 0xBA1EECC1, 0xBA016F01, 0xB9C7E283, 0xB98CE705, 0xB923D70B,
    0xB8BA1F4B, 0xB88AEFB3, 0xB8378034, 0xB7B24206, 0xB70205FF, 0xB65A1A94, 0xB513A3B7, 0x00000000,
    0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
    0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
    0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
    0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
    0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
    0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
    0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
    0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
    0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
    0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
    0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
    0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
    0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
    0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
    0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
    0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333, 0x3F800000,
)
# fmt: on

# fmt: off
_UNSIGNED_BITS = (
    0x00000000, 0x34AE7BAA, 0x35500998, 0x360E9B38, 0x3692CCF6, 0x36DE4C51, 0x3714E5D5, 0x3783126E,
    0x37E171A0, 0x381FE868, 0x384F1800, 0x387E479A, 0x3896BB99, 0x38AE5364, 0x38C5EB31, 0x3906594B,
    0x394154CA, 0x397C5049, 0x399BA5E4, 0x39B923A2, 0x39D6A163, 0x39F41F22, 0x3A08CE71, 0x3A178D50,
    0x3A264C30, 0x3A350B10, 0x3A43C9EF, 0x3A5288D0, 0x3A6147AF, 0x3A70068E, 0x3A7EC56E, 0x3A958106,
    0x3ABA5E35, 0x3ADF3B64, 0x3B020C4A, 0x3B147AE1, 0x3B26E978, 0x3B395810, 0x3B4BC6A7, 0x3B5E3540,
    0x3B70A3D7, 0x3B818937, 0x3B8AC082, 0x3B93F7CF, 0x3B9D2F1A, 0x3BA66666, 0x3BAF9DB2, 0x3BB8D4FD,
    0x3BC20C4A, 0x3BCB4395, 0x3BD47AE1, 0x3BDDB22E, 0x3BE6E978, 0x3BF020C5, 0x3BF9580F, 0x3C0147AE,
    0x3C05E354, 0x3C0A7EF9, 0x3C0F1AA0, 0x3C13B645, 0x3C1851EB, 0x3C1CED92, 0x3C218937, 0x3C2F5C2A,
    0x3C466667, 0x3C5D70A3, 0x3C747AE2, 0x3C85C28F, 0x3C9147AF, 0x3C9CCCCD, 0x3CA851EB, 0x3CB3D70B,
    0x3CBF5C29, 0x3CCAE147, 0x3CD66667, 0x3CE1EB87, 0x3CED70A3, 0x3CF8F5C3, 0x3D023D70, 0x3D080000,
    0x3D0DC28F, 0x3D13851F, 0x3D1947AF, 0x3D1F0A3D, 0x3D24CCCD, 0x3D2A8F5C, 0x3D3051EB, 0x3D36147B,
    0x3D3BD70A, 0x3D41999A, 0x3D475C28, 0x3D4D1EB8, 0x3D52E147, 0x3D58A3D7, 0x3D5E6667, 0x3D6428F7,
    0x3D69EB87, 0x3D6FAE15, 0x3D7570A3, 0x3D7B3333, 0x3D807AE2, 0x3D835C2A, 0x3D863D71, 0x3D891EB8,
    0x3D8C0000, 0x3D8EE148, 0x3D91C290, 0x3D94A3D7, 0x3D97851F, 0x3D9A6667, 0x3D9D47AF, 0x3DA028F6,
    0x3DA30A3E, 0x3DA5EB85, 0x3DA8CCCD, 0x3DABAE15, 0x3DAE8F5C, 0x3DB170A4, 0x3DB451EB, 0x3DB73333,
    0x3DBA147B, 0x3DBCF5C3, 0x3DBFD70B, 0x3DC2B852, 0x3DC5999A, 0x3DC87AE2, 0x3DCB5C29, 0x3DD40000,
    0x3DE26666, 0x3DF0CCCD, 0x3DFF3333, 0x3E06CCCC, 0x3E0E0000, 0x3E153334, 0x3E1C6666, 0x3E23999A,
    0x3E2ACCCC, 0x3E320000, 0x3E393334, 0x3E406666, 0x3E47999A, 0x3E4ECCCC, 0x3E560000, 0x3E5D3334,
    0x3E646666, 0x3E6B999A, 0x3E72CCCC, 0x3E7A0000, 0x3E809999, 0x3E843333, 0x3E87CCCD, 0x3E8B6666,
    0x3E8F0000, 0x3E92999A, 0x3E963333, 0x3E99CCCC, 0x3E9D6666, 0x3EA10000, 0x3EA4999A, 0x3EA83333,
    0x3EABCCCC, 0x3EAF6666, 0x3EB30000, 0x3EB6999A, 0x3EBA3333, 0x3EBDCCCC, 0x3EC16666, 0x3EC50000,
    0x3EC8999A, 0x3ECC3333, 0x3ECFCCCC, 0x3ED36666, 0x3ED70000, 0x3EDA999A, 0x3EDE3333, 0x3EE1CCCC,
    0x3EE56666, 0x3EE90000, 0x3EEC999A, 0x3EF03333, 0x3EF3CCCC, 0x3EF76666, 0x3EFB0000, 0x3EFE9999,
    0x3F01199A, 0x3F02E666, 0x3F04B333, 0x3F068000, 0x3F084CCC, 0x3F0A199A, 0x3F0BE666, 0x3F0DB334,
    0x3F0F8000, 0x3F114CCD, 0x3F13199A, 0x3F14E666, 0x3F16B334, 0x3F188000, 0x3F1A4CCD, 0x3F1C199A,
    0x3F1DE666, 0x3F1FB334, 0x3F218000, 0x3F234CCD, 0x3F25199A, 0x3F26E666, 0x3F28B334, 0x3F2A8000,
    0x3F2C4CCD, 0x3F2E199A, 0x3F2FE666, 0x3F31B334, 0x3F338000, 0x3F354CCD, 0x3F37199A, 0x3F38E666,
    0x3F3AB334, 0x3F3C8000, 0x3F3E4CCD, 0x3F40199A, 0x3F41E666, 0x3F43B334, 0x3F458000, 0x3F474CCC,
    0x3F49199A, 0x3F4AE666, 0x3F4CB334, 0x3F4E8000, 0x3F504CCC, 0x3F52199A, 0x3F53E666, 0x3F55B334,
    0x3F578000, 0x3F594CCC, 0x3F5B199A, 0x3F5CE666, 0x3F5EB334, 0x3F608000, 0x3F624CCC, 0x3F64199A,
    0x3F65E666, 0x3F67B334, 0x3F698000, 0x3F6B4CCC, 0x3F6D199A, 0x3F6EE666, 0x3F70B334, 0x3F728000,
    0x3F744CCC, 0x3F76199A, 0x3F77E666, 0x3F79B334, 0x3F7B8000, 0x3F7D4CCC, 0x3F7F199A, 0x3F800000,
)
# fmt: on


def dynamic_map(signed: bool = True) -> np.ndarray:
    """Exactly bnb ``functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``.

    Construction: for i = 0..6, ``means = (b[:-1] + b[1:]) / 2`` with
    ``b = torch.linspace(0.1, 1, k, dtype=float32)``, ``k = 2**i + 1`` (signed) or
    ``2**(i+1) + 1`` (unsigned), scaled by ``10**(-6 + i)`` in float32 (plus the negatives when
    signed); then 0 and 1.0 are appended and all sorted.  Signed: 127 negative values
    (min -0.99297), code 127 == 0.0, 128 positive values up to code 255 == 1.0.  Unsigned:
    code 0 == 0.0 (next 3.25e-7), code 255 == 1.0.
    """
    bits = _SIGNED_BITS if signed else _UNSIGNED_BITS
    return np.array(bits, dtype=np.uint32).view(_F32).copy()


# --------------------------------------------------------------------------- quantization


def _quantize_lut(qmap: np.ndarray) -> np.ndarray:
    """``build_quantize_lut`` of bnb's cpu_ops.cpp: 65536 bins on [-1, 1] -> code index.

    ``mid[i] = 0.5f * (code[i] + code[i+1])``; bin value ``v_j = -1 + (2f * j) / 65535``;
    the code index is the number of midpoints strictly below ``v_j`` (so a bin value exactly
    on a midpoint takes the LOWER code).
    """
    code = np.asarray(qmap, dtype=_F32)
    mid = (_F32(0.5) * (code[:-1] + code[1:])).astype(_F32)
    j = np.arange(_LUT_SIZE).astype(_F32)
    frac = ((_F32(2.0) * j).astype(_F32) / _F32(_LUT_SIZE - 1)).astype(_F32)
    val = (_F32(-1.0) + frac).astype(_F32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


_LUT_CACHE: dict[bytes, np.ndarray] = {}


def _lut_for(qmap: np.ndarray) -> np.ndarray:
    key = np.asarray(qmap, dtype=_F32).tobytes()
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = _quantize_lut(qmap)
    return _LUT_CACHE[key]


def quantize_blocks(
    x: np.ndarray, qmap: np.ndarray, signed: bool = True, block: int = BLOCK, sign_fix: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of bnb ``quantize_blockwise`` on CPU fp32 (``cquantize_blockwise_cpu_fp32`` ->
    ``quantize_cpu_impl<float>`` in csrc/cpu_ops.cpp, 0.50.2 build, LUT version).

    Per block of ``block`` elements of the flattened input:
      * ``absmax = max(0, |x_i|)`` over the block, NaNs ignored (``std::max(acc, fabs(x))``);
        an inf makes absmax inf.
      * ``absmax == 0``: every code of the block is 0 (NOT the zero code 127/0 of the map).
      * else ``v = clamp(x * (1f / absmax), -1, 1)`` (reciprocal, then multiply),
        ``j = (uint16)(((v + 1) * 0.5) * 65535 + 0.5)`` (truncation), ``code = LUT[j]``.
        NaN ``v`` (NaN input, or inf/inf) gives ``j = 0`` -> code 0.
    Tie rule: nearest code by LUT, i.e. the input is first rounded to one of 65536 uniform bins
    of width 2/65535 ~ 3.05e-5, then mapped to the code nearest that bin centre, a bin centre
    exactly on a midpoint between two codes taking the lower code.  Consequences: codes are not
    the true nearest for |v| below ~3e-5 (the dynamic map's fine codes near 0 are unreachable),
    and an exact 0 input in a block with absmax > 0 becomes bin 32768 (v = +1.5259e-5) -> code 131
    (signed map, value 2.125e-5) instead of code 127 (0.0); with the unsigned map it becomes
    the code nearest 1.5259e-5.

    ``signed`` is accepted for API symmetry; the CPU path depends only on ``qmap``.
    ``sign_fix=True`` applies the CUDA kernel's fix (kOptimizerStatic8bit2StateBlockwise: if
    ``signbit(qmap[c]) != signbit(x)`` then ``c += 1`` if x > 0 else ``c -= 1``); bnb's CPU
    backend does NOT do this and it is not pinned by any test here.
    """
    xf = np.asarray(x, dtype=_F32).reshape(-1)
    n = xf.size
    nb = -(-n // block)
    pad = np.zeros(nb * block, dtype=_F32)
    pad[:n] = xf
    b = pad.reshape(nb, block)
    a = np.abs(b)
    absmax = np.where(np.isnan(a), _F32(0), a).max(axis=1).astype(_F32)
    safe = np.where(absmax == 0, _F32(1), absmax)
    inv = (_F32(1.0) / safe).astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (b * inv[:, None]).astype(_F32)
        v = np.clip(v, _F32(-1.0), _F32(1.0))  # NaN stays NaN
        t = ((v + _F32(1.0)) * _F32(0.5)).astype(_F32)
        jf = ((t * _F32(_LUT_SIZE - 1)).astype(_F32) + _F32(0.5)).astype(_F32)
    nanm = np.isnan(jf)
    j = np.where(nanm, _F32(0), jf).astype(np.uint16)
    codes = _lut_for(qmap)[j]
    codes[absmax == 0] = 0
    if sign_fix and signed:
        q = np.asarray(qmap, dtype=_F32)[codes]
        bad = (np.signbit(q) != np.signbit(b)) & ~np.isnan(b) & (absmax[:, None] != 0)
        step = np.where(b > 0, 1, -1)
        codes = np.where(bad, (codes.astype(np.int16) + step).clip(0, 255), codes).astype(np.uint8)
    return codes.reshape(-1)[:n].reshape(np.shape(x)), absmax


def dequantize_blocks(
    codes: np.ndarray, absmax: np.ndarray, qmap: np.ndarray, block: int = BLOCK
) -> np.ndarray:
    """Mirror of bnb ``dequantize_blockwise`` on CPU fp32 (``dequantizeBlockwise8bitCpu<float>``):
    ``out[i] = qmap[codes[i]] * absmax[i // block]`` in float32."""
    c = np.asarray(codes).reshape(-1)
    q = np.asarray(qmap, dtype=_F32)[c]
    scale = np.repeat(np.asarray(absmax, dtype=_F32), block)[: c.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return (q * scale).astype(_F32).reshape(np.shape(codes))


# --------------------------------------------------------------------------- fp32 primitives


def _fma32(x, y, z) -> np.ndarray:
    """Exactly rounded float32 ``x * y + z`` (x, y, z float32; product exact in float64;
    TwoSum + sticky correction avoids double rounding)."""
    x64 = np.asarray(x, dtype=_F32).astype(np.float64)
    y64 = np.asarray(y, dtype=_F32).astype(np.float64)
    z64 = np.asarray(z, dtype=_F32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = x64 * y64
        s = p + z64
        bb = s - p
        e = (p - (s - bb)) + (z64 - bb)
        s32 = s.astype(_F32)
        up = np.nextafter(s32, _F32(np.inf)).astype(np.float64)
        dn = np.nextafter(s32, _F32(-np.inf)).astype(np.float64)
        s32d = s32.astype(np.float64)
        ismid = ((s == (s32d + up) / 2) | (s == (s32d + dn) / 2)) & (e != 0) & np.isfinite(e)
        s = np.where(ismid, np.nextafter(s, s + e), s)
    return s.astype(_F32)


def _f(v: float) -> np.float32:
    return _F32(v)


def init_state(name: str, shape, quantized: bool = True) -> dict:
    """Fresh state as bnb's ``init_state`` (zeros; step 0)."""
    n = int(np.prod(shape))
    nb = -(-n // BLOCK)
    two = name in ("adam", "adamw")
    if quantized:
        st = {"step": 0, "state1": np.zeros(shape, np.uint8), "absmax1": np.zeros(nb, _F32)}
        if two:
            st.update(state2=np.zeros(shape, np.uint8), absmax2=np.zeros(nb, _F32))
    else:
        st = {"step": 0, "state1": np.zeros(shape, _F32)}
        if two:
            st["state2"] = np.zeros(shape, _F32)
    return st


def _hyper(name: str, hyper: dict):
    """Defaults = bnb 0.50.2 constructor defaults. rmsprop: betas = (alpha, momentum)."""
    d = {
        "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
        "lion": dict(lr=1e-4, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0),
        "rmsprop": dict(lr=1e-2, betas=(0.99, 0.0), eps=1e-8, weight_decay=0.0),
        "adagrad": dict(lr=1e-2, betas=(0.0, 0.0), eps=1e-10, weight_decay=0.0),
        "sgd": dict(lr=None, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0),
    }[name].copy()
    d.update(hyper)
    if name == "rmsprop" and "alpha" in hyper:
        d["betas"] = (hyper["alpha"], hyper.get("momentum", 0.0))
    if name == "sgd" and "momentum" in hyper:
        d["betas"] = (hyper["momentum"], hyper.get("dampening", 0.0))
    return d


def _update_fp32(name, p, g, s1, s2, step, h, sqrt):
    """One fp32 step of ``_optimizer_update_8bit_blockwise_cpu`` on dequantized states.
    Returns (new_p, new_s1, new_s2). All float32."""
    lr, (b1, b2), eps, wd = h["lr"], h["betas"][:2], h["eps"], h["weight_decay"]
    g = (np.asarray(g, _F32) * _F32(1.0)).astype(_F32)  # gnorm_scale = 1.0
    p = np.asarray(p, _F32).copy()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if name in ("adam", "adamw"):
            s1 = _fma32(g, _f(1.0 - b1), (s1 * _f(b1)).astype(_F32))
            s2 = _fma32((_f(1.0 - b2) * g).astype(_F32), g, (s2 * _f(b2)).astype(_F32))
            c1 = 1.0 - b1**step
            c2 = math.sqrt(1.0 - b2**step)
            denom = ((sqrt(s2) / _f(c2)).astype(_F32) + _f(eps)).astype(_F32)
            if wd > 0.0:
                p = (p * _f(1.0 - lr * wd)).astype(_F32)
            p = (p + ((_f(-lr / c1) * s1).astype(_F32) / denom).astype(_F32)).astype(_F32)
        elif name == "sgd":  # bnb "momentum"
            g = _fma32(p, _f(wd), g)  # unconditional grad.add_(p, alpha=wd)
            s1 = g.copy() if step == 1 else _fma32(g, _f(1.0), (s1 * _f(b1)).astype(_F32))
            p = _fma32(s1, _f(-lr), p)
        elif name == "lion":
            if wd > 0.0:
                p = (p * _f(1.0 - lr * wd)).astype(_F32)
            u = np.sign(((s1 * _f(b1)).astype(_F32) + (g * _f(1.0 - b1)).astype(_F32)).astype(_F32))
            p = _fma32(u.astype(_F32), _f(-lr), p)
            s1 = _fma32(g, _f(1.0 - b2), (s1 * _f(b2)).astype(_F32))
        elif name == "rmsprop":
            g = _fma32(p, _f(wd), g)
            s1 = _fma32((_f(1.0 - b1) * g).astype(_F32), g, (s1 * _f(b1)).astype(_F32))
            den = (sqrt(s1) + _f(eps)).astype(_F32)
            p = (p + ((_f(-lr) * g).astype(_F32) / den).astype(_F32)).astype(_F32)
        elif name == "adagrad":
            g = _fma32(p, _f(wd), g)
            s1 = _fma32((_f(1.0) * g).astype(_F32), g, s1)
            den = (sqrt(s1) + _f(eps)).astype(_F32)
            p = (p + ((_f(-lr) * g).astype(_F32) / den).astype(_F32)).astype(_F32)
        else:
            raise ValueError(name)
    return p, s1, s2


def _np_sqrt(x):
    return np.sqrt(x).astype(_F32)


def step_8bit(name: str, p, g, state: dict, hyper: dict, sqrt=_np_sqrt):
    """One bnb 8-bit blockwise step (CPU backend, bitsandbytes 0.50.2), float32 throughout.

    ``state`` keys as bnb's ``opt.state[p]``: ``state1``, ``absmax1`` (+ ``state2``,
    ``absmax2`` for adam/adamw), ``step`` (count of completed steps). Order, as
    ``_optimizer_update_8bit_blockwise_cpu``: dequantize (qmap1 signed, qmap2 unsigned) ->
    fp32 update (the parameter update uses the UNQUANTIZED new state) -> requantize with
    new per-block absmax.  No non-finite handling: NaN/inf flow through the fp32 math and
    then quantize as documented in ``quantize_blocks``.  Weight decay: adam/adamw/lion
    ``p *= 1 - lr*wd`` (only if wd > 0) BEFORE the update (the CUDA kernel decays after);
    sgd/rmsprop/adagrad add ``wd * p`` to the gradient (always executed, even for wd = 0).
    Adam eps: ``denom = sqrt(v) / sqrt(1 - b2^t) + eps`` (the CUDA kernel uses
    ``sqrt(v) + sqrt(1 - b2^t) * eps``). RMSprop ignores momentum (betas[1]); SGD ignores
    dampening. Returns (new_p float32, new_state).
    """
    h = _hyper(name, hyper)
    q1 = dynamic_map(True)
    st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    st["step"] = int(st.get("step", 0)) + 1
    s1 = dequantize_blocks(st["state1"], st["absmax1"], q1)
    s2 = None
    if name in ("adam", "adamw"):
        q2 = dynamic_map(False)
        s2 = dequantize_blocks(st["state2"], st["absmax2"], q2)
    newp, s1, s2 = _update_fp32(name, p, g, s1, s2, st["step"], h, sqrt)
    st["state1"], st["absmax1"] = quantize_blocks(s1, q1, True)
    if s2 is not None:
        st["state2"], st["absmax2"] = quantize_blocks(s2, q2, False)
    return newp.reshape(np.shape(p)), st


def step_fp32_state(name: str, p, g, state: dict, hyper: dict, sqrt=_np_sqrt):
    """Same update formula as ``step_8bit`` but with float32 ``state1``/``state2`` kept
    unquantized (for measuring quantization error).  NOTE: this is not bnb's own 32-bit
    path (``_optimizer_update_32bit_cpu``), which for adam uses ``sqrt(v) + eps*sqrt(1-b2^t)``
    and step ``-lr*sqrt(1-b2^t)/(1-b1^t)``, and adds ``wd*p`` only when wd > 0."""
    h = _hyper(name, hyper)
    st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    st["step"] = int(st.get("step", 0)) + 1
    s1 = np.asarray(st["state1"], _F32)
    s2 = np.asarray(st["state2"], _F32) if name in ("adam", "adamw") else None
    newp, s1, s2 = _update_fp32(name, p, g, s1, s2, st["step"], h, sqrt)
    st["state1"] = s1
    if s2 is not None:
        st["state2"] = s2
    return newp.reshape(np.shape(p)), st


# --------------------------------------------------------------------------- nearest rule
# The rule of netcl_optim's 8-bit state kernel (round to the nearest map value, with the
# sign fix of bnb's CUDA optimizer kernels), written independently of the library.


def _fmax_abs(block: np.ndarray) -> np.float32:
    """Largest ``|x|`` of ``block`` with NaNs ignored (``fmax`` drops a NaN operand); +0.0
    for an empty or all-NaN block."""
    return _F32(np.fmax.reduce(np.abs(block), initial=_F32(0.0)))


def _nearest_codes(v: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """Nearest map index of each float32 ``v`` (NaN -> 0) by float64 distance, with the
    tie band of the float32 midpoint (see :func:`quantize_nearest`)."""
    m64 = qmap.astype(np.float64)
    v64 = v.astype(np.float64)
    nan = np.isnan(v64)
    v64 = np.where(nan, 0.0, v64)
    # the two map values around v: ``below`` <= v < ``above`` (clamped to the map's ends)
    above = np.clip(np.searchsorted(m64, v64, side="right"), 1, 255)
    below = above - 1
    d_below = np.abs(v64 - m64[below])  # exact: float32 operands of nearby magnitude
    d_above = np.abs(m64[above] - v64)
    code = np.where(d_above < d_below, above, below)  # an exact tie takes the lower code
    # The kernel compares v with float32((a + b) * 0.5); where float32(a + b) is inexact
    # that midpoint is off the exact one, and a v in between (or on the float32 midpoint)
    # goes by the float32 midpoint: above iff v is farther from ``a`` than the midpoint.
    a, b = qmap[below], qmap[above]
    mid32 = ((a + b).astype(_F32) * _F32(0.5)).astype(_F32).astype(np.float64)
    exact_mid = (m64[below] + m64[above]) / 2.0
    lo_edge, hi_edge = np.minimum(mid32, exact_mid), np.maximum(mid32, exact_mid)
    band = (v64 >= lo_edge) & (v64 <= hi_edge)
    in_range = v64 >= m64[below]  # below the map's first value: always code 0
    by_mid32 = np.where(v64 - m64[below] > mid32 - m64[below], above, below)
    code = np.where(band & in_range, by_mid32, code)
    code = np.where(in_range, code, below)
    code = np.where(v64 >= m64[255], 255, code)  # on or above the map's last value (or inf)
    return np.where(nan, 0, code).astype(np.int64)


def quantize_nearest(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """netcl_optim's 8-bit quantization of ``x`` (flattened, float32): ``(codes, absmax)``,
    ``codes`` flat ``uint8``, ``absmax`` float32 with one value per 256-element block (the
    last block may be short), codes indexing ``dynamic_map(signed)``.

    Per block, in float32: ``absmax = max |x|`` ignoring NaN (0 if there is none). A block
    with ``absmax == 0`` takes the zero code everywhere (127 signed, 0 unsigned; NaNs too).
    Otherwise ``inv = 1 / absmax`` and ``v = x * inv`` (both scaled by 2^64 first where
    ``absmax < 2^-100``; each rounded to float32; an inf in
    the block gives ``inv = 0``, so ``v`` is 0, or NaN for the inf itself) and the code is
    the map value nearest to ``v``:

    * below the map's first value: code 0; above its last: code 255; NaN ``v``: code 0.
    * between map values ``a = map[k]`` <= v < ``b = map[k + 1]``: ``k + 1`` iff
      ``v > float32(float32(a + b) * 0.5)``. That is the nearest value by distance, except
      that the midpoint is the float32-rounded one: a ``v`` exactly on it, or between it and
      the exact midpoint, goes by the float32 midpoint (so a tie takes the LOWER code).
      Implemented as a float64 distance search (exact for these operands) with that band
      handled explicitly.

    Sign fix (signed map only, bnb's CUDA ``kOptimizerStatic8bit2StateBlockwise``): an
    ``x > 0`` whose code's map value has its sign bit set takes the next code up; an
    ``x < 0`` whose code's value has a clear sign bit (including 0.0, code 127) the next code
    down. NaN ``x`` is neither. (The unsigned map has no negative values: a negative ``x``
    simply takes code 0.)
    """
    qmap = dynamic_map(signed)
    zero_code = 127 if signed else 0
    flat = np.asarray(x, dtype=_F32).reshape(-1)
    n = flat.size
    nb = -(-n // BLOCK)
    codes = np.empty(n, np.uint8)
    absmax = np.empty(nb, _F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for k in range(nb):
            blk = flat[k * BLOCK : (k + 1) * BLOCK]
            amax = _fmax_abs(blk)
            absmax[k] = amax
            if amax == 0:
                codes[k * BLOCK : k * BLOCK + blk.size] = zero_code
                continue
            # a subnormal-range absmax (< 2^-100) and the block are scaled by 2^64 first, so
            # that the reciprocal is finite (exact: a power of two)
            pre = _F32(2.0**64) if amax < _F32(2.0**-100) else _F32(1.0)
            inv = np.divide(_F32(1.0), np.multiply(amax, pre, dtype=_F32), dtype=_F32)
            v = np.multiply(np.multiply(blk, pre, dtype=_F32), inv, dtype=_F32)
            c = _nearest_codes(v, qmap)
            if signed:
                neg = np.signbit(qmap[c])
                c = c + ((blk > 0) & neg) - ((blk < 0) & ~neg)
            codes[k * BLOCK : k * BLOCK + blk.size] = c.astype(np.uint8)
    return codes, absmax


def dequantize_nearest(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    """Values of ``codes`` (any shape) under ``absmax`` (one per 256-element block of the
    flattened codes): ``map[code] * absmax[block]`` in float32, shaped like ``codes``."""
    c = np.asarray(codes).reshape(-1)
    qmap = dynamic_map(signed)
    out = np.empty(c.size, _F32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(-(-c.size // BLOCK)):
            sl = slice(k * BLOCK, (k + 1) * BLOCK)
            out[sl] = np.multiply(qmap[c[sl]], _F32(absmax[k]), dtype=_F32)
    return out.reshape(np.shape(codes))
