"""One Muon step of each variant as a float64 numpy function (params, gradient and momentum
in, params and momentum out): torch 2.13's ``Muon.step``, optax contrib's ``muon`` (its
``scale_by_muon`` chain, and the AdamW it routes other leaves to) and Keller Jordan's
reference ``muon_update``/``SingleDeviceMuon.step``. The Newton–Schulz iteration
``X <- aX + (bA + cA^2)X, A = X X^T`` runs per matrix of a ``[..., M, N]`` stack, on ``X^T``
when ``M > N``. ``bf16=True`` rounds to bfloat16 where torch and the reference do (their
input, norm, and each product/sum), to bring the float64 result near their bits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from netcl_optim.optimizers._muon_layout import (
    MatrixView,
    optax_shape_scale,
    reference_shape_scale,
    torch_lr_ratio,
)

Rounding = Callable[[np.ndarray], np.ndarray]


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), returned as float64."""
    bits = np.asarray(x, np.float64).astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _exact(x: np.ndarray) -> np.ndarray:
    return x


def to_matrices(x: np.ndarray, view: MatrixView) -> np.ndarray:
    """The leaf as its ``batch_shape + (M, N)`` stack (a copy)."""
    stack = np.transpose(x, view.permutation)
    return np.array(stack.reshape((*view.batch_shape, view.rows, view.cols)), np.float64)


def from_matrices(stack: np.ndarray, view: MatrixView) -> np.ndarray:
    """Inverse of ``to_matrices``."""
    permuted_shape = tuple(view.shape[a] for a in view.permutation)
    inverse = np.argsort(view.permutation)
    return np.transpose(stack.reshape(permuted_shape), inverse)


def newton_schulz(
    stack: np.ndarray,
    schedule: Sequence[tuple[float, float, float]],
    eps: float,
    normalize: str,
    rnd: Rounding = _exact,
    fused_addmm: bool = True,
) -> np.ndarray:
    """Orthogonalise each ``[M, N]`` matrix of ``stack``: transpose when ``M > N``, divide by
    ``max(||X||_F, eps)`` (``normalize="clamp"``, torch) or ``||X||_F + eps`` (``"add"``,
    optax and the reference), then one iteration per ``(a, b, c)`` of ``schedule``.
    ``rnd`` rounds each stored intermediate; ``fused_addmm`` rounds ``bA + cA^2`` and
    ``aX + BX`` once each (torch's ``addmm``), else after each operation (the reference)."""
    x = rnd(np.asarray(stack, np.float64))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = np.swapaxes(x, -1, -2)
    norm = rnd(np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True)))
    denom = np.maximum(norm, rnd(np.float64(eps))) if normalize == "clamp" else rnd(norm + eps)
    x = rnd(x / denom)
    for a, b, c in schedule:
        gram = rnd(x @ np.swapaxes(x, -1, -2))
        if fused_addmm:
            update = rnd(b * gram + c * (gram @ gram))
            x = rnd(a * x + update @ x)
        else:
            update = rnd(rnd(b * gram) + rnd(c * rnd(gram @ gram)))
            x = rnd(rnd(a * x) + rnd(update @ x))
    return np.swapaxes(x, -1, -2) if transposed else x


def torch_muon_step(
    param: np.ndarray,
    grad: np.ndarray,
    buf: np.ndarray,
    view: MatrixView,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """torch 2.13 ``Muon``: ``buf <- lerp(buf, g, 1-mu)``; ``u = lerp(g, buf, mu)`` (nesterov)
    or ``buf``; ``O = NS(u)`` (clamped norm); ``p <- p(1 - lr*wd) - lr*ratio*O`` (decay with
    the unadjusted lr)."""
    buf = buf + (1.0 - momentum) * (grad - buf)
    update = grad + momentum * (buf - grad) if nesterov else buf
    ortho = newton_schulz(
        to_matrices(update, view), [tuple(ns_coefficients)] * ns_steps, eps, "clamp",
        bf16_round if bf16 else _exact, fused_addmm=True,
    )  # fmt: skip
    adjusted = lr * torch_lr_ratio(view, adjust_lr_fn)
    return param * (1.0 - lr * weight_decay) - adjusted * from_matrices(ortho, view), buf


def reference_muon_step(
    param: np.ndarray,
    grad: np.ndarray,
    buf: np.ndarray,
    view: MatrixView,
    lr: float = 0.02,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    bf16: bool = False,
    issue_63_scale: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Keller Jordan's ``muon_update`` + ``SingleDeviceMuon.step``: as torch's with
    ``X /= ||X|| + 1e-7``, its fixed coefficients, every op rounded (``bf16``) and the scale
    ``max(1, M/N)**0.5`` of the matrix view. ``issue_63_scale`` reproduces
    KellerJordan/Muon#63 (the scale from the leaf's last two dims). Its nesterov line
    ``grad.lerp_(momentum, beta)`` also overwrites ``p.grad`` in place (not modelled)."""
    buf = buf + (1.0 - momentum) * (grad - buf)
    update = grad + momentum * (buf - grad) if nesterov else buf
    ortho = newton_schulz(
        to_matrices(update, view), [(3.4445, -4.775, 2.0315)] * ns_steps, 1e-7, "add",
        bf16_round if bf16 else _exact, fused_addmm=False,
    )  # fmt: skip
    scale = reference_shape_scale(view)
    if issue_63_scale:
        scale = max(1, grad.shape[-2] / grad.shape[-1]) ** 0.5
    ortho = from_matrices(ortho, view) * scale
    return param * (1.0 - lr * weight_decay) - lr * ortho, buf


def optax_muon_step(
    param: np.ndarray,
    grad: np.ndarray,
    mu: np.ndarray,
    count: int,
    view: MatrixView,
    learning_rate: float,
    schedule: Sequence[tuple[float, float, float]] = ((3.4445, -4.775, 2.0315),) * 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    adaptive: bool = False,
    consistent_rms: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """optax contrib ``muon`` on a Muon leaf, ``count`` = steps done before this one:
    ``mu <- (1-b)g + b*mu``; ``m_hat = b*mu/(1-b^(t+1)) + (1-b)*g/(1-b^t)`` (nesterov) or
    ``mu/(1-b^t)``; ``O = NS(m_hat)`` per matrix (``||X|| + eps``); ``adaptive``:
    ``O <- <m_hat, O> O`` over the whole leaf; ``O *= shape scale``;
    ``p <- p - lr*(O + wd*p)``."""
    mu = (1.0 - beta) * grad + beta * mu
    t = count + 1
    if nesterov:
        m_hat = beta * (mu / (1.0 - beta ** (t + 1))) + (1.0 - beta) * (grad / (1.0 - beta**t))
    else:
        m_hat = mu / (1.0 - beta**t)
    ortho = from_matrices(newton_schulz(to_matrices(m_hat, view), schedule, eps, "add"), view)
    if adaptive:
        ortho = np.sum(m_hat * ortho) * ortho
    update = ortho * optax_shape_scale(view, consistent_rms) + weight_decay * param
    return param - learning_rate * update, mu


def optax_adamw_step(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    count: int,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``adamw(..., nesterov=True)`` optax ``muon`` gives non-Muon leaves (Muon's eps)."""
    m = (1.0 - b1) * grad + b1 * m
    v = (1.0 - b2) * grad * grad + b2 * v
    t = count + 1
    if nesterov:
        m_hat = b1 * (m / (1.0 - b1 ** (t + 1))) + (1.0 - b1) * (grad / (1.0 - b1**t))
    else:
        m_hat = m / (1.0 - b1**t)
    v_hat = v / (1.0 - b2**t)
    update = m_hat / (np.sqrt(v_hat + eps_root) + eps) + weight_decay * param
    return param - learning_rate * update, m, v


def muon_tx(
    learning_rate: float,
    ns_coeffs=(3.4445, -4.775, 2.0315),
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    adaptive: bool = False,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: float | None = None,
    consistent_rms: float | None = None,
):
    """optax contrib's ``muon`` as a reference transform (tests/reference.py's Transform):
    2-D leaves by :func:`optax_muon_step`'s rule, the rest by optax's adamw(nesterov)."""
    import optree
    from reference import Transform, tree_map

    from netcl_optim.optimizers._muon_layout import MuonDimensionNumbers, matrix_view, ns_schedule

    schedule = ns_schedule(ns_coeffs, ns_steps, allow_table=True)
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate

    def init(params):
        zeros = tree_map(lambda x: np.zeros(np.shape(x), np.float64), params)
        return {"count": 0, "mu": zeros, "nu": tree_map(np.copy, zeros)}

    def leaf(g, mu, nu, p, t):
        g = np.asarray(g, np.float64)
        p = np.zeros_like(g) if p is None else np.asarray(p, np.float64)
        if g.ndim == 2:
            view = matrix_view(g.shape, MuonDimensionNumbers())
            mu = (1.0 - beta) * g + beta * mu
            if nesterov:
                m_hat = beta * (mu / (1.0 - beta ** (t + 1))) + (1.0 - beta) * (g / (1.0 - beta**t))
            else:
                m_hat = mu / (1.0 - beta**t)
            o = from_matrices(newton_schulz(to_matrices(m_hat, view), schedule, eps, "add"), view)
            if adaptive:
                o = np.sum(m_hat * o) * o
            u = o * optax_shape_scale(view, consistent_rms)
            if weight_decay:
                u = u + weight_decay * p
            return -learning_rate * u, mu, nu
        mu = (1.0 - adam_b1) * g + adam_b1 * mu
        nu = (1.0 - adam_b2) * (g * g) + adam_b2 * nu
        if nesterov:
            m_hat = adam_b1 * (mu / (1.0 - adam_b1 ** (t + 1))) + (1.0 - adam_b1) * (
                g / (1.0 - adam_b1**t)
            )
        else:
            m_hat = mu / (1.0 - adam_b1**t)
        u = m_hat / (np.sqrt(nu / (1.0 - adam_b2**t) + adam_eps_root) + eps)
        if adam_weight_decay:
            u = u + adam_weight_decay * p
        return -adam_lr * u, mu, nu

    def update(u, state, params=None):
        t = state["count"] + 1
        leaves, treedef = optree.tree_flatten(u, none_is_leaf=False)
        mus = treedef.flatten_up_to(state["mu"])
        nus = treedef.flatten_up_to(state["nu"])
        ps = [None] * len(leaves) if params is None else treedef.flatten_up_to(params)
        out = [leaf(g, m, n, p, t) for g, m, n, p in zip(leaves, mus, nus, ps, strict=True)]
        unflat = lambda i: optree.tree_unflatten(treedef, [o[i] for o in out])  # noqa: E731
        return unflat(0), {"count": t, "mu": unflat(1), "nu": unflat(2)}

    return Transform(init, update)


def bf16_pairs_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (``[..., M, K] @ [..., K, N]``, bfloat16 values) as our bfloat16 GEMM and
    AVX-512's ``vdpbf16ps`` sum it: in float32, by pairs of ``k``, ``k + 1`` first, each
    product exact and each sum rounded once. Returned as float32."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    acc = np.zeros((*a.shape[:-1], b.shape[-1]), np.float32)
    for k in range(0, a.shape[-1], 2):
        for kk in (k + 1, k):
            if kk < a.shape[-1]:
                term = a[..., :, kk, None] * b[..., None, kk, :]  # (exact: 8-bit mantissas)
                acc = (acc.astype(np.float64) + term).astype(np.float32)
    return acc


def bf16_epilogue(acc: np.ndarray, alpha: float, beta: float, d: np.ndarray | None) -> np.ndarray:
    """The GEMM's bfloat16 output: ``alpha * acc (+ beta * d)`` in float32, then rounded."""
    y = np.float32(alpha) * acc
    if beta != 0:
        y = y + np.float32(beta) * np.asarray(d, np.float32)
    return bf16_round(y).astype(np.float32)


def newton_schulz_bf16(
    stack: np.ndarray, schedule: Sequence[tuple[float, float, float]], eps: float, normalize: str
) -> np.ndarray:
    """Our ``ns_dtype="bfloat16"`` iteration, operation for operation (float32 arithmetic,
    bfloat16 storage): ``M`` rounded, the norm of the rounded values (float64 sum) rounded,
    ``X = bf16(M / bf16(denom))``, then per ``(a, b, c)``: ``A = bf16(X X^T)``, ``B =
    bf16(c A A + b A)``, ``X = bf16(B X + a X)``, products by :func:`bf16_pairs_product`."""
    x = bf16_round(stack).astype(np.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2))
    sumsq = np.sum(x.astype(np.float64) ** 2, axis=(-2, -1), keepdims=True)
    norm = bf16_round(np.sqrt(sumsq).astype(np.float32)).astype(np.float32)
    if normalize == "clamp":
        denom = bf16_round(np.maximum(norm, np.float32(eps))).astype(np.float32)
    else:
        denom = bf16_round(norm + np.float32(eps)).astype(np.float32)
    x = bf16_round(x / denom).astype(np.float32)
    for a, b, c in schedule:
        xt = np.swapaxes(x, -1, -2)
        gram = bf16_epilogue(bf16_pairs_product(x, xt), 1.0, 0.0, None)
        poly = bf16_epilogue(bf16_pairs_product(gram, gram), c, b, gram)
        x = bf16_epilogue(bf16_pairs_product(poly, x), 1.0, a, x)
    return np.swapaxes(x, -1, -2) if transposed else x
