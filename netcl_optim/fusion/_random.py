"""The counter-based generator of the kernels: Philox-4x32-10 (Salmon, Moraes, Dror and
Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's ``philox4x32_10``)
and a standard normal from its output, as OpenCL C helpers that codegen puts in the
preamble of a kernel whose fragment asks for ``element_index``.

A draw is a pure function of a 64-bit key and a 128-bit counter, so each element's noise
depends only on (seed, element index, step), never on how the work is launched.

Speed on CPU devices (PoCL): a kernel is fast only when the work-item loop vectorises, and
one call that is not inlined (a helper the compiler keeps out of line, or a libm builtin
such as ``log``/``cospi``, which PoCL runs one lane at a time) keeps the whole kernel scalar,
~100x off the memory floor. So the helpers are forced inline and the normals use no builtin
but ``sqrt``: their ``log`` (and the double path's ``cos``) are branch-free polynomials.
"""

from __future__ import annotations

# Unrolled, with ulong products for the 32 x 32 -> 64-bit multiplies (vpmuludq once
# vectorised; mul_hi is a call PoCL does not vectorise), always inlined (see above).
_PHILOX = """\
#define RNG_INLINE static inline __attribute__((always_inline))
/* Philox-4x32-10 (Random123's philox4x32_10): 10 rounds, the key bumped between rounds */
#define PHILOX_ROUND(c, k) { \\
    const ulong p0 = (ulong)0xD2511F53u * c.x, p1 = (ulong)0xCD9E8D57u * c.z; \\
    c = (uint4)((uint)(p1 >> 32) ^ c.y ^ k.x, (uint)p1, (uint)(p0 >> 32) ^ c.w ^ k.y, (uint)p0); }
#define PHILOX_BUMP(k) (k += (uint2)(0x9E3779B9u, 0xBB67AE85u))
RNG_INLINE uint4 philox4x32_10(uint4 c, uint2 k)
{
    PHILOX_ROUND(c, k); PHILOX_BUMP(k); PHILOX_ROUND(c, k); PHILOX_BUMP(k);
    PHILOX_ROUND(c, k); PHILOX_BUMP(k); PHILOX_ROUND(c, k); PHILOX_BUMP(k);
    PHILOX_ROUND(c, k); PHILOX_BUMP(k); PHILOX_ROUND(c, k); PHILOX_BUMP(k);
    PHILOX_ROUND(c, k); PHILOX_BUMP(k); PHILOX_ROUND(c, k); PHILOX_BUMP(k);
    PHILOX_ROUND(c, k); PHILOX_BUMP(k); PHILOX_ROUND(c, k);
    return c;
}
/* a 32-bit word from two 16-bit halves held exactly in real scalars */
#define WORD16(lo, hi) ((uint)(lo) | ((uint)(hi) << 16))
"""

_NORMAL = {
    # Inversion: z = Phi^-1(u) for u = (r.x + 1/2) / 2^32, i.e. the midpoints of 2^32 equal
    # cells (|z| <= 6.34). With y = |2u - 1| = (2m + 1) / 2^32 (m from the low 31 bits), z =
    # sign(u - 1/2) sqrt(2) erfinv(y), erfinv by Giles's single-precision
    # approximation (M. Giles, "Approximating the erfinv function", GPU Computing Gems, 2010):
    # w = -log(1 - y^2), then a polynomial in w - 2.5 (w < 5: Giles's) or in sqrt(w) - 3 (the
    # tails: refitted here to reach w = 23, |z| = 6.34, where Giles's stops at float's
    # 1 - 2^-24; rel. error < 3e-7), both evaluated and one selected, so no branch.
    # 1 - y^2 = q (1 + y), q = 1 - y held as (2^32 - (2m + 1)) / 2^32 up to one rounding,
    # so the tails keep their precision. log: Cephes's logf (rel. error < 1e-7), inlined.
    "float": """\
RNG_INLINE float rng_log(float v) /* v normal, > 0: log(v) as Cephes's logf */
{
    const uint iv = as_uint(v);
    const float m = as_float((iv & 0x007FFFFFu) | 0x3F000000u); /* v = m 2^e, m in [1/2, 1) */
    const int lo = m < 0.70710678f; /* to x = m' - 1, m' in [sqrt(1/2), sqrt(2)): exact */
    const float e = (float)((int)(iv >> 23) - 126 - lo);
    const float x = lo ? m + m - 1.0f : m - 1.0f;
    const float z = x * x;
    float p = 7.0376836292e-2f;
    p = p * x - 1.1514610310e-1f;
    p = p * x + 1.1676998740e-1f;
    p = p * x - 1.2420140846e-1f;
    p = p * x + 1.4249322787e-1f;
    p = p * x - 1.6668057665e-1f;
    p = p * x + 2.0000714765e-1f;
    p = p * x - 2.4999993993e-1f;
    p = p * x + 3.3333331174e-1f;
    float r = x * z * p;
    r += -2.12194440e-4f * e; /* log 2 = 0.693359375 - 2.12194440e-4 */
    r += -0.5f * z;
    return (x + r) + 0.693359375f * e;
}
/* N(0, 1) from r.x by inversion (see _random.py) */
RNG_INLINE float philox_normal(uint4 r)
{
    /* u - 1/2 = +-(2m + 1) / 2^33: m the low 31 bits, complemented below one half */
    const uint a = ((r.x ^ (((r.x >> 31) - 1u) & 0x7FFFFFFFu)) << 1) | 1u; /* 2m + 1 */
    const float y = (float)a * 0x1p-32f, q = (float)(0u - a) * 0x1p-32f; /* y, 1 - y */
    const float w = -rng_log(q * (1.0f + y));
    const float c = w - 2.5f; /* centre: w < 5 */
    float p = 2.81022636e-08f;
    p = p * c + 3.43273939e-07f;
    p = p * c - 3.5233877e-06f;
    p = p * c - 4.39150654e-06f;
    p = p * c + 0.00021858087f;
    p = p * c - 0.00125372503f;
    p = p * c - 0.00417768164f;
    p = p * c + 0.246640727f;
    p = p * c + 1.50140941f;
    const float s = SQRT(w) - 3.0f; /* tails */
    float t = 2.9375617e-05f;
    t = t * s - 1.2551958e-04f;
    t = t * s - 4.207854e-05f;
    t = t * s + 1.2559316e-03f;
    t = t * s - 3.5379543e-03f;
    t = t * s + 5.782256e-03f;
    t = t * s - 7.6634656e-03f;
    t = t * s + 9.431105e-03f;
    t = t * s + 1.0016772f;
    t = t * s + 2.8329773f;
    const float z = 1.41421356f * ((w < 5.0f ? p : t) * y);
    return as_float(as_uint(z) ^ (~r.x & 0x80000000u)); /* negative below one half */
}
""",
    # Box-Muller in double, with log and cos(pi x) inlined (libm's builtins are calls, which
    # PoCL runs one lane at a time): log by 2 atanh((m - 1) / (m + 1)) and cos by Taylor
    # series after exact reductions, each within ~2 ulp.
    "double": """\
RNG_INLINE double rng_log_d(double v) /* v normal, > 0 */
{
    const ulong iv = as_ulong(v);
    const double m1 = as_double((iv & 0x000FFFFFFFFFFFFFUL) | 0x3FF0000000000000UL);
    const int hi = m1 > 1.4142135623730951; /* to m in [sqrt(1/2), sqrt(2)): exact */
    const double m = hi ? m1 * 0.5 : m1;
    const double e = (double)((long)(iv >> 52) - 1023 + hi);
    const double s = (m - 1.0) / (m + 1.0), z = s * s; /* |s| < 0.1716 */
    double p = 1.0 / 25.0;
    p = p * z + 1.0 / 23.0;
    p = p * z + 1.0 / 21.0;
    p = p * z + 1.0 / 19.0;
    p = p * z + 1.0 / 17.0;
    p = p * z + 1.0 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    /* log 2 = 0.693145751953125 + 1.428606820309417232e-6 (Cephes's split: e * the first
       is exact) */
    return (e * 1.428606820309417232e-6 + (2.0 * s) * (p * z) + 2.0 * s) + e * 0.693145751953125;
}
RNG_INLINE double rng_cospi_d(double x) /* cos(pi x), x in [0, 2) */
{
    const double a = x > 1.0 ? 2.0 - x : x;          /* [0, 1], exact */
    const double b = a > 0.5 ? 1.0 - a : a;          /* [0, 1/2], exact; the sign below */
    const int near = b <= 0.25;
    const double t = 3.141592653589793 * (near ? b : 0.5 - b); /* |t| <= pi/4 */
    const double z = t * t;
    double c = -1.0 / 6402373705728000.0;            /* cos: down to t^18 / 18! */
    c = c * z + 1.0 / 20922789888000.0;
    c = c * z - 1.0 / 87178291200.0;
    c = c * z + 1.0 / 479001600.0;
    c = c * z - 1.0 / 3628800.0;
    c = c * z + 1.0 / 40320.0;
    c = c * z - 1.0 / 720.0;
    c = c * z + 1.0 / 24.0;
    c = c * z - 0.5;
    c = c * z + 1.0;
    double n = 1.0 / 121645100408832000.0;           /* sin: down to t^19 / 19! */
    n = n * z - 1.0 / 355687428096000.0;
    n = n * z + 1.0 / 1307674368000.0;
    n = n * z - 1.0 / 6227020800.0;
    n = n * z + 1.0 / 39916800.0;
    n = n * z - 1.0 / 362880.0;
    n = n * z + 1.0 / 5040.0;
    n = n * z - 1.0 / 120.0;
    n = n * z + 1.0 / 6.0;
    const double sine = t - t * z * n;
    const double r = near ? c : sine;
    return a > 0.5 ? -r : r;
}
/* N(0, 1) from all four words: 53-bit uniforms (r.x:r.y, r.z:r.w), exact in double */
RNG_INLINE double philox_normal(uint4 r)
{
    const ulong a = ((((ulong)r.x) << 32) | r.y) >> 11, b = ((((ulong)r.z) << 32) | r.w) >> 11;
    const double u1 = (double)(a + 1) * 0x1p-53;
    const double u2 = (double)b * 0x1p-53;
    return SQRT(-2.0 * rng_log_d(u1)) * rng_cospi_d(2.0 * u2);
}
""",
}


def random_helpers(real: str) -> str:
    """The helpers' OpenCL C for compute type ``real`` (``float`` or ``double``)."""
    return _PHILOX + _NORMAL[real]
