"""Our GEMM's bfloat16 products (``gemm(..., bfloat16=True)``, ``gram(...)``): torch's
bfloat16 matmul, ``op(a)``, ``op(b)`` rounded to bfloat16, float32 sums by pairs of ``k``
(``k + 1`` first, as AVX-512's ``vdpbf16ps``), the epilogue in float32, the output rounded.
Every case is compared bit for bit with numpy doing the same operations
(``reference_muon.bf16_pairs_product``), natively where the device has AVX-512 BF16 and with
the portable kernel (``NETCL_OPTIM_NATIVE_BF16=0``)."""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest
import reference_muon as rm

from netcl_optim.fusion import _gemm
from netcl_optim.fusion._gemm import TILES, gemm, gram, native_bf16

RNG = np.random.default_rng(77)
F32 = np.dtype(np.float32)


@pytest.fixture(params=["native", "portable"])
def path(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv(_gemm.NATIVE_BF16_ENV, "0")
    return request.param


def _want(a, b, alpha=1.0, beta=0.0, c=None):
    a16, b16 = (rm.bf16_round(x) for x in (a, b))
    return rm.bf16_epilogue(rm.bf16_pairs_product(a16, b16), alpha, beta, c)


@pytest.mark.parametrize(
    "m, n, k", [(1, 1, 1), (1, 37, 5), (29, 1, 6), (9, 50, 33), (16, 48, 64), (17, 97, 2)]
)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True)])
def test_products_match_the_pairwise_rule(cl_queue, path, m, n, k, trans_a, trans_b):
    a = RNG.standard_normal((2, m, k)).astype(np.float32)
    b = RNG.standard_normal((2, k, n)).astype(np.float32)
    c = RNG.standard_normal((2, m, n)).astype(np.float32)
    a_in = np.ascontiguousarray(np.swapaxes(a, -1, -2)) if trans_a else a
    b_in = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if trans_b else b
    out = gemm(
        cl_queue, cla.to_device(cl_queue, a_in), cla.to_device(cl_queue, b_in),
        trans_a=trans_a, trans_b=trans_b, alpha=0.75, beta=-1.25,
        c=cla.to_device(cl_queue, c), bfloat16=True,
    )  # fmt: skip
    np.testing.assert_array_equal(out.get(), _want(a, b, 0.75, -1.25, c))


def test_every_tile_and_both_paths_give_the_same_bits(cl_queue, monkeypatch):
    a = RNG.standard_normal((23, 70)).astype(np.float32)
    b = RNG.standard_normal((70, 131)).astype(np.float32)
    ad, bd = cla.to_device(cl_queue, a), cla.to_device(cl_queue, b)
    want = _want(a, b)
    for native in ("1", "0"):
        monkeypatch.setenv(_gemm.NATIVE_BF16_ENV, native)
        for tile in TILES[F32]:
            np.testing.assert_array_equal(gemm(cl_queue, ad, bd, tile=tile, bfloat16=True).get(),
                                          want, err_msg=f"{tile} native={native}")  # fmt: skip


def test_gram_is_the_products_upper_triangle_mirrored(cl_queue, path):
    for shape in ((3, 40, 70), (1, 9)):
        x = RNG.standard_normal(shape).astype(np.float32)
        xd = cla.to_device(cl_queue, x)
        got = gram(cl_queue, xd, bfloat16=True).get()
        full = _want(x, np.swapaxes(x, -1, -2))
        upper = np.triu(np.ones(full.shape[-2:], bool))
        np.testing.assert_array_equal(got[..., upper], full[..., upper])
        np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))


def test_rounding_ties_to_even_and_keeps_specials(cl_queue, path):
    """K = 1, b = 1: the output is the input rounded to bfloat16 (twice: the same)."""
    values = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, 0.0],
        np.float32,
    )
    expected = np.array([1, 1 + 2**-6, -1, np.inf, -np.inf, np.inf, -np.inf, np.nan, 0], np.float32)
    a = values.reshape(-1, 1)
    out = gemm(cl_queue, cla.to_device(cl_queue, a), cla.to_device(cl_queue, np.ones((1, 1),
               np.float32)), bfloat16=True).get().ravel()  # fmt: skip
    np.testing.assert_array_equal(out, expected)


def test_bfloat16_needs_float32_and_our_kernels(cl_queue):
    x = cla.zeros(cl_queue, (4, 4), np.float32)
    with pytest.raises(ValueError, match="bfloat16=True is not available with CLBlast"):
        gemm(cl_queue, x, x, tile="clblast", bfloat16=True)
    if cl_queue.device.double_fp_config:
        y = cla.zeros(cl_queue, (4, 4), np.float64)
        with pytest.raises(ValueError, match="takes float32 arrays"):
            gemm(cl_queue, y, y, bfloat16=True)
        with pytest.raises(ValueError, match="takes float32 arrays"):
            gram(cl_queue, y, bfloat16=True)


def test_the_native_instruction_is_used_where_the_host_has_it(cl_queue, monkeypatch):
    """A CPU device with 16-lane vectors on a host with ``avx512_bf16`` runs ``vdpbf16ps``;
    anything else, or ``NETCL_OPTIM_NATIVE_BF16=0``, the portable kernel."""
    device = cl_queue.device
    expected = (
        bool(device.type & cl.device_type.CPU)
        and device.native_vector_width_float >= 16
        and "avx512_bf16" in _gemm._host_cpu_flags()
    )
    assert native_bf16(device) is expected
    monkeypatch.setenv(_gemm.NATIVE_BF16_ENV, "0")
    assert native_bf16(device) is False
