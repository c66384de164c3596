"""bitsandbytes' dynamic quantization maps (``create_dynamic_map(signed, 7, 8)``), as the
float32 bit patterns of their 256 sorted values: the signed map (127 negative values, code
127 is 0.0, code 255 is 1.0) for state that may be negative, the unsigned one (code 0 is 0.0,
code 255 is 1.0) for non-negative state. The values are torch's float32 ``linspace``
midpoints scaled by powers of ten; they are kept as bits so that every device and checkpoint
reads the same codes (tests/test_reference_8bit.py checks them against bitsandbytes)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

# fmt: off
SIGNED_BITS = (
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
UNSIGNED_BITS = (
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


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of the signed or unsigned map (float32, sorted ascending)."""
    return np.array(SIGNED_BITS if signed else UNSIGNED_BITS, dtype=np.uint32).view(np.float32)


ZERO_CODE = {True: 127, False: 0}  # the code of 0.0 in each map


# The nearest code by one table lookup (the kernels'): a bucket of |v| (its exponent from
# 2^-23 and the top 8 bits of its mantissa; bucket 0 below 2^-23, |v| clamped below 2) gives,
# per side of zero, a word: the code of the bucket's lowest value, and where a midpoint lies
# inside the bucket, a flag and the midpoint's low 15 bits: the values past it take the next
# code (no bucket holds two midpoints: ``bucket_words`` checks).
BUCKET_EXPONENT = 104  # biased exponent of 2^-23
BUCKETS = 24 * 256 + 1
SPLIT = 1 << 8  # a word's flag: a midpoint inside the bucket; its low 15 bits from bit 9


def midpoints(signed: bool) -> np.ndarray:
    """Each code's upper midpoint ``(map[c] + map[c + 1]) * 0.5`` in float32 (+inf for 255):
    a value above it rounds to ``c + 1``, one on it to ``c``."""
    m = dynamic_map(signed)
    mid = np.full(256, np.inf, np.float32)
    mid[:255] = ((m[:255] + m[1:]) * np.float32(0.5)).astype(np.float32)
    return mid


def nearest_codes(v: np.ndarray, signed: bool) -> np.ndarray:
    """The nearest code of each float32 ``v`` by binary search: the largest ``c`` with
    ``map[c] <= v`` (0 if none, and for NaN), then ``c + 1`` where ``v > midpoints[c]``."""
    m, mid = dynamic_map(signed), midpoints(signed)
    v = np.asarray(v, np.float32)
    lo = np.clip(np.searchsorted(m, v, side="right").astype(np.int64) - 1, 0, 255)
    lo = np.where(np.isnan(v), 0, lo)
    with np.errstate(invalid="ignore"):
        return np.where(v > mid[lo], lo + 1, lo)


def _magnitude_bits(bits: np.ndarray) -> np.ndarray:
    return np.minimum(bits.astype(np.uint32) & np.uint32(0x7FFFFFFF), np.uint32(0x3FFFFFFF))


def _bucket(bits: np.ndarray) -> np.ndarray:
    ab = _magnitude_bits(bits)
    e = ab >> 23
    return np.where(e < BUCKET_EXPONENT, 0, ((e - BUCKET_EXPONENT) << 8) + ((ab >> 15) & 255) + 1)


def bucket_words(signed: bool) -> np.ndarray:
    """``(2, BUCKETS)`` uint32: per side of zero (positive, negative) and bucket, the code of
    its lowest value, and the midpoint inside it if any (see ``SPLIT``); checked to give
    :func:`nearest_codes` at every value where either rule can change (each map value and
    midpoint, their float32 neighbours, each bucket's edges)."""
    index = np.arange(BUCKETS - 1, dtype=np.uint32)
    starts = np.zeros(BUCKETS, np.uint32)  # each bucket's smallest |v| (bits)
    starts[1:] = ((index >> 8) + BUCKET_EXPONENT) << 23 | ((index & 255) << 15)
    ends = np.append(starts[1:] - 1, np.uint32(0x3FFFFFFF))  # and largest
    words = np.stack([
        nearest_codes(starts.view(np.float32), signed),  # positive: the smallest v
        nearest_codes(-ends.view(np.float32), signed),  # negative: the smallest v is -end
    ]).astype(np.uint32)  # fmt: skip
    for mid in midpoints(signed)[:255]:
        bits = np.array([mid], np.float32).view(np.uint32)
        b = int(_bucket(bits)[0])
        if b == 0 or _magnitude_bits(bits)[0] != bits[0] & 0x7FFFFFFF:
            continue  # (no midpoint below 2^-23 or at 2 and above)
        side = int(bits[0] >> 31)
        words[side, b] |= SPLIT | (int(bits[0] & 0x7FFF) << 9)
    _check(words, signed)
    return words


def bucketed_codes(v: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The kernels' rule on the host: the bucket's code, plus one past its midpoint."""
    v = np.asarray(v, np.float32)
    bits = v.view(np.uint32)
    negative = (bits >> 31).astype(bool)
    w = np.where(negative, words[1][_bucket(bits)], words[0][_bucket(bits)])
    low, split = _magnitude_bits(bits) & 0x7FFF, w >> 9
    past = (w & SPLIT).astype(bool) & np.where(negative, low < split, low > split)
    return np.where(np.isnan(v), 0, (w & 255) + past).astype(np.int64)


def _check(words: np.ndarray, signed: bool) -> None:
    index = np.arange(BUCKETS - 1, dtype=np.uint32)
    starts = ((index >> 8) + BUCKET_EXPONENT) << 23 | ((index & 255) << 15)
    probe = np.concatenate([dynamic_map(signed), midpoints(signed)[:255],
                            starts.view(np.float32), (starts - 1).view(np.float32)])  # fmt: skip
    probe = np.concatenate([probe, -probe]).astype(np.float32)
    near = [np.nextafter(probe, np.float32(np.inf)), np.nextafter(probe, np.float32(-np.inf))]
    probe = np.concatenate(
        [probe, *near, np.float32(cast(Any, [np.nan, np.inf, -np.inf, 2.5, -2.5, 0]))]
    )
    if not np.array_equal(bucketed_codes(probe, words), nearest_codes(probe, signed)):
        raise AssertionError("a quantization bucket holds two midpoints")
