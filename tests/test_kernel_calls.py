"""Fused kernels call no OpenCL library function: on PoCL (the default CPU device) a builtin
such as ``sign``, ``fabs``, ``isnan`` or ``cbrt`` is a call, and one call keeps the whole kernel
from being vectorised; the step then runs several times slower than the memory allows
(benchmarks/README.md, "Library calls"). Fragments use the preamble's inline forms instead
(``SIGN``, ``FABS``, ``ISNAN``, ``CBRT``, ``SQRT``, ``LERP``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cases import CASE_IDS, CASES

import netcl_optim as no
from netcl_optim.fusion import walk
from netcl_optim.fusion._codegen import preamble
from netcl_optim.fusion._random import random_helpers

# what a fragment may call: the preamble's inline helpers and reinterpreting casts
ALLOWED = {"SQRT", "LERP", "SIGN", "FABS", "ISNAN", "CBRT", "WORD16", "philox4x32_10",
           "philox_normal", "as_float", "as_uint", "as_int", "as_double", "as_ulong"}  # fmt: skip
# the preamble's own helpers may use these compiler intrinsics and casts, nothing else
PREAMBLE_ALLOWED = ALLOWED | {"__builtin_sqrtf", "__builtin_sqrt", "__attribute__",
                              "always_inline", "PHILOX_ROUND", "PHILOX_BUMP", "RNG_INLINE",
                              "if", "for", "while", "return", "sizeof"}  # fmt: skip
_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


def _calls(source: str) -> set[str]:
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)  # comments
    source = re.sub(r"//[^\n]*", "", source)
    defined = set(re.findall(r"#define\s+(\w+)\(", source))  # macro definitions
    defined |= set(re.findall(r"\b(?:float|double|uint4|real|uint|uchar|ushort)\s+(\w+)\s*\(",
                              source))  # functions  # fmt: skip
    return {name for name in _CALL.findall(source) if name not in defined}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fragments_call_no_library_function(case):
    sources = [t.plan.source for t in walk(case.make(no)) if hasattr(t.plan, "source")]
    for source in sources:
        assert _calls(source) <= ALLOWED, (case.id, _calls(source) - ALLOWED)


@pytest.mark.parametrize("real", ["float", "double"])
def test_the_preamble_helpers_call_no_library_function(real):
    source = preamble(real, real == "double") + random_helpers("float")
    assert _calls(source) <= PREAMBLE_ALLOWED, _calls(source) - PREAMBLE_ALLOWED


@pytest.mark.parametrize("mode", ["inplace", "pure"])
def test_low_precision_state_kernels_call_no_library_function(mode):
    """bfloat16 and 8-bit state: the conversions, the block maximum and the nearest-code
    lookup are inline (a builtin max, min or fabs would be a call)."""
    from netcl_optim.fusion._codegen import KernelSpec, fused_source
    from netcl_optim.fusion._quantized_codegen import blockwise_source

    frags = [t.plan for t in walk(no.adamw(1e-3)) if hasattr(t.plan, "source")]
    keys = tuple(f.key for f in frags)
    f32 = np.dtype(np.float32)
    for make, tiling, storage in ((fused_source, "", ("bf16", "float")),
                                  (blockwise_source, "blocks", ("q8s", "q8u")),
                                  (blockwise_source, "blocks", ("q8s", "bf16"))):  # fmt: skip
        spec = KernelSpec(keys, f32, mode, True, True, "double", tiling, None, storage)
        source = make(frags, spec)[0]
        start = source.index("__kernel")
        body = source[source.index("{", start) :]  # (after the kernel's name and arguments)
        helpers = source[:start]
        inline = {"BF16_LOAD", "BF16_RNE", "Q8_SIGNED", "Q8_UNSIGNED", "Q8_MAGNITUDE"}
        assert _calls(body) <= ALLOWED | inline | {"get_global_id", "if", "for"}, _calls(body)
        allowed = PREAMBLE_ALLOWED | {"BF16_LOAD", "Q8_NEAREST", "Q8_MAGNITUDE"}
        assert _calls(helpers) <= allowed, _calls(helpers) - allowed


def test_the_float64_noise_calls_no_library_function():
    """The float64 normal (Box-Muller) inlines its log and cos(pi x): float64 noise
    vectorises on PoCL too."""
    assert _calls(random_helpers("double")) <= PREAMBLE_ALLOWED, (
        _calls(random_helpers("double")) - PREAMBLE_ALLOWED
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inline_forms_equal_the_builtins(cl_queue, dtype):
    """SIGN, FABS and ISNAN give OpenCL's sign, fabs and isnan bit for bit (signed zeros,
    infinities, NaN, subnormals); CBRT is within 1 ulp of the exact cube root."""
    import pyopencl as cl
    import pyopencl.array as cla

    from netcl_optim._device import has_fp64

    if dtype == np.float64 and not has_fp64(cl_queue.device):
        pytest.skip("the device has no fp64")
    real = "double" if dtype == np.float64 else "float"
    tiny = np.finfo(dtype).smallest_subnormal
    special = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, tiny, -tiny, 8.0, -27.0]
    rng = np.random.default_rng(0)
    big = np.finfo(dtype).max
    uint = np.uint32 if dtype == np.float32 else np.uint64
    top = (np.asarray(big, dtype).view(uint) - np.arange(2000, dtype=uint)).view(dtype)
    any_bits = rng.integers(0, np.iinfo(uint).max, 20000, dtype=uint, endpoint=True).view(dtype)
    spread = rng.standard_normal(5000) * 10.0 ** rng.uniform(-30, 30, 5000)
    x = np.concatenate([np.asarray(special, dtype), spread.astype(dtype), top, -top, any_bits])
    outs = ["SIGN(x)", "sign(x)", "FABS(x)", "fabs(x)", "(real)ISNAN(x)", "(real)isnan(x)",
            "CBRT(x)"]  # fmt: skip
    body = " ".join(f"o[{len(outs)} * i + {k}] = {e};" for k, e in enumerate(outs))
    src = (preamble(real, real == "double") + "__kernel void k(__global const real *a, "
           "__global real *o) { const size_t i = get_global_id(0); const real x = a[i]; "
           + body + " }")  # fmt: skip
    kernel = cl.Program(cl_queue.context, src).build().k
    a = cla.to_device(cl_queue, x)
    out = cla.zeros(cl_queue, len(outs) * x.size, dtype)
    kernel(cl_queue, x.shape, None, a.data, out.data)
    o = out.get().reshape(-1, len(outs))
    for k in (0, 2, 4):  # ours against the builtin, bit for bit
        assert o[:, k].tobytes() == o[:, k + 1].tobytes(), outs[k]
    cbrt, ok = o[:, 6], np.isfinite(x) & (x != 0)
    exact = np.cbrt(x[ok].astype(np.longdouble))
    ulps = np.abs(cbrt[ok] - exact) / np.spacing(np.abs(cbrt[ok]))
    assert ulps.max() <= 1.0
    assert cbrt[~ok].tobytes() == x[~ok].tobytes()  # zeros, infinities, NaN as given


def test_float64_noise_log_and_cos_are_accurate(cl_queue):
    """The inline log (within 2 ulp) and cos(pi x) (within 1e-15) of the float64 normal, over
    its whole range of uniforms (down to 2^-53), against long double."""
    import pyopencl as cl
    import pyopencl.array as cla

    from netcl_optim._device import has_fp64

    if not has_fp64(cl_queue.device):
        pytest.skip("the device has no fp64")
    body = ("__kernel void k(__global const double *x, __global double *lo, __global double "
            "*co) { const size_t i = get_global_id(0); lo[i] = rng_log_d(x[i]); "
            "co[i] = rng_cospi_d(2.0 * x[i]); }")  # fmt: skip
    src = preamble("double", True) + random_helpers("double") + body
    kernel = cl.Program(cl_queue.context, src).build().k
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(1 << 16), 2.0 ** -rng.uniform(0, 53, 1 << 14),
                        [2.0**-53, 1.0 - 2.0**-53, 0.25, 0.5, 0.75, 1.0]])  # fmt: skip
    xd = cla.to_device(cl_queue, x)
    lo, co = cla.empty_like(xd), cla.empty_like(xd)
    kernel(cl_queue, x.shape, None, xd.data, lo.data, co.data)
    want_log = np.log(x.astype(np.longdouble))
    nz = want_log != 0
    ulps = np.abs(lo.get()[nz] - want_log[nz]) / np.spacing(np.abs(want_log[nz]).astype(float))
    assert ulps.max() <= 2.0
    assert lo.get()[~nz].tolist() == [0.0]  # log(1)
    want_cos = np.cos(2 * np.pi * x.astype(np.longdouble))
    assert np.max(np.abs(co.get() - want_cos)) <= 1e-15
