"""Triton kernels of the training block and of the input gradient (the ``@triton.jit``
functions only, no torch; launched by ``train.py``):

- ``bn_relu_pool_kernel``: normalise + ReLU (+ 2x2 max-pool) of the training forward, one pass
  over z;
- ``bn_relu_backward_reduce_kernel`` and ``bn_relu_backward_apply_kernel``: the BN + ReLU
  (+ pool) backward as one reduction pass (per-block partial sums, added up deterministically
  by the launcher) and one elementwise pass;
- ``relu_pool_backward_kernel``: the backward of a block without batch statistics (folded BN,
  or no BN): the gradient reaching the conv output, and its per-channel partial sums (the conv
  bias gradient);
- ``conv_dgrad_kernel``: the input gradient, an implicit GEMM of the output-side gradient with
  the flipped, transposed weights, whose operand loads can apply the ReLU mask and route the
  pooled gradient (a frozen block's whole backward in one kernel);
- ``conv_wgrad_kernel``: the weight gradient, a GEMM reducing over N*H*W, split over pixels
  into per-split partial sums (added up by the launcher) so that small layers fill the GPU.

Every tensor is NHWC (channels_last) and contiguous; per-channel vectors are fp32. The
pre-activation of the training block is ``fma((z - mean_hi) - mean_lo, scale, beta)`` in the
forward and in both backward passes alike, so they agree on every ReLU mask and pool maximum.
"""

import triton
import triton.language as tl

from vgg_kernels.backends.triton.kernels import _relu


@triton.jit
def _bn_pre(z, hi, lo, scale, beta):
    """The training block's pre-activation: z less the batch mean (hi + lo, two floats: z - hi
    is exact near the mean), times gamma * invstd, plus beta."""
    return tl.fma((z - hi) - lo, scale, beta)


@triton.jit
def _channel_vectors(cols, col_ok, hi_ptr, lo_ptr, scale_ptr, beta_ptr):
    hi = tl.load(hi_ptr + cols, mask=col_ok, other=0.0)
    lo = tl.load(lo_ptr + cols, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
    return hi[None, :], lo[None, :], scale[None, :], beta[None, :]


@triton.jit
def _window(z_ptr, n, ph, pw, cols, ok, H, W, K):
    """The 2x2 window of pooled pixel (n, ph, pw): z at its four positions in row-major order
    (fp32), and the NHWC offset of the first."""
    base = ((n * H + 2 * ph) * W + 2 * pw) * K
    offsets = base[:, None] + cols[None, :]
    z00 = tl.load(z_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    z01 = tl.load(z_ptr + offsets + K, mask=ok, other=0.0).to(tl.float32)
    z10 = tl.load(z_ptr + offsets + W * K, mask=ok, other=0.0).to(tl.float32)
    z11 = tl.load(z_ptr + offsets + W * K + K, mask=ok, other=0.0).to(tl.float32)
    return z00, z01, z10, z11, offsets


@triton.jit
def _first_max(a0, a1, a2, a3):
    """Which of four activations (row-major window order) PyTorch's max-pool routes the gradient
    to: the first maximum."""
    best = a0
    index = tl.zeros(a0.shape, dtype=tl.int32)
    index = tl.where(a1 > best, 1, index)
    best = tl.maximum(best, a1)
    index = tl.where(a2 > best, 2, index)
    best = tl.maximum(best, a2)
    index = tl.where(a3 > best, 3, index)
    return index


@triton.jit
def _pixels(pid, P, BLOCK_P: tl.constexpr):
    rows = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return rows, rows < P


@triton.jit
def bn_relu_pool_kernel(
    z_ptr, hi_ptr, lo_ptr, scale_ptr, beta_ptr, y_ptr,
    N, H, W, K, HO, WO,
    POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = maxpool2x2?(relu(pre(z))) over (N, H, W, K) z; y is (N, HO, WO, K). Program (i, j):
    BLOCK_P output pixels by BLOCK_K channels. The activations are rounded to y's type before
    the pool takes their maximum, as PyTorch's unfused ops do; NaN propagates."""
    pixels, pixel_ok = _pixels(tl.program_id(0), N * HO * WO, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = pixel_ok[:, None] & col_ok[None, :]
    hi, lo, scale, beta = _channel_vectors(cols, col_ok, hi_ptr, lo_ptr, scale_ptr, beta_ptr)
    dtype = y_ptr.dtype.element_ty
    if POOL:
        n = pixels // (HO * WO)
        ph = (pixels // WO) % HO
        pw = pixels % WO
        z00, z01, z10, z11, _ = _window(z_ptr, n, ph, pw, cols, ok, H, W, K)
        a00 = _relu(_bn_pre(z00, hi, lo, scale, beta)).to(dtype).to(tl.float32)
        a01 = _relu(_bn_pre(z01, hi, lo, scale, beta)).to(dtype).to(tl.float32)
        a10 = _relu(_bn_pre(z10, hi, lo, scale, beta)).to(dtype).to(tl.float32)
        a11 = _relu(_bn_pre(z11, hi, lo, scale, beta)).to(dtype).to(tl.float32)
        nan = tl.where(a00 != a00, a00, 0.0) + tl.where(a01 != a01, a01, 0.0) \
            + tl.where(a10 != a10, a10, 0.0) + tl.where(a11 != a11, a11, 0.0)
        y = tl.maximum(tl.maximum(a00, a01), tl.maximum(a10, a11)) + nan
    else:
        z = tl.load(z_ptr + pixels[:, None] * K + cols[None, :], mask=ok, other=0.0)
        y = _relu(_bn_pre(z.to(tl.float32), hi, lo, scale, beta))
    tl.store(y_ptr + pixels[:, None] * K + cols[None, :], y.to(dtype), mask=ok)


@triton.jit
def _bn_gradient(grad_y_ptr, z_ptr, n, h, w, pixel_ok, cols, col_ok, H, W, K, HO, WO, hi, lo,
                 scale, beta, POOL: tl.constexpr, DTYPE: tl.constexpr):
    """g (the gradient reaching the BN output through the pool and the ReLU mask) and z at
    pixels (n, h, w) x cols, fp32."""
    ok = pixel_ok[:, None] & col_ok[None, :]
    offsets = ((n * H + h) * W + w)[:, None] * K + cols[None, :]
    z = tl.load(z_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if POOL:
        ph = h // 2
        pw = w // 2
        inside = pixel_ok & (h < 2 * HO) & (w < 2 * WO)
        window_ok = inside[:, None] & col_ok[None, :]
        z00, z01, z10, z11, _ = _window(z_ptr, n, ph, pw, cols, window_ok, H, W, K)
        a00 = _relu(_bn_pre(z00, hi, lo, scale, beta)).to(DTYPE).to(tl.float32)
        a01 = _relu(_bn_pre(z01, hi, lo, scale, beta)).to(DTYPE).to(tl.float32)
        a10 = _relu(_bn_pre(z10, hi, lo, scale, beta)).to(DTYPE).to(tl.float32)
        a11 = _relu(_bn_pre(z11, hi, lo, scale, beta)).to(DTYPE).to(tl.float32)
        mine = ((h % 2) * 2 + (w % 2))[:, None]
        routed = window_ok & (_first_max(a00, a01, a10, a11) == mine)
        grad = tl.load(grad_y_ptr + ((n * HO + ph) * WO + pw)[:, None] * K + cols[None, :],
                       mask=routed, other=0.0).to(tl.float32)
    else:
        grad = tl.load(grad_y_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    g = tl.where(_bn_pre(z, hi, lo, scale, beta) > 0.0, grad, 0.0)
    return g, z


@triton.jit
def bn_relu_backward_reduce_kernel(
    grad_y_ptr, z_ptr, hi_ptr, lo_ptr, invstd_ptr, scale_ptr, beta_ptr, partial_ptr,
    N, H, W, K, HO, WO,
    POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-channel partial sums over BLOCK_P pixels: sum g, sum g * xhat and sum xhat, written
    to partial[s, program, k] for s = 0, 1, 2 (no atomics: the launcher adds the programs' rows
    in a fixed order, so two runs are bit-identical)."""
    pid = tl.program_id(0)
    pixels, pixel_ok = _pixels(pid, N * H * W, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    hi, lo, scale, beta = _channel_vectors(cols, col_ok, hi_ptr, lo_ptr, scale_ptr, beta_ptr)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)[None, :]
    n = pixels // (H * W)
    h = (pixels // W) % H
    w = pixels % W
    g, z = _bn_gradient(grad_y_ptr, z_ptr, n, h, w, pixel_ok, cols, col_ok, H, W, K, HO, WO,
                        hi, lo, scale, beta, POOL, z_ptr.dtype.element_ty)
    ok = pixel_ok[:, None] & col_ok[None, :]
    xhat = tl.where(ok, ((z - hi) - lo) * invstd, 0.0)
    rows = tl.num_programs(0) * K
    out = partial_ptr + pid.to(tl.int64) * K + cols
    tl.store(out, tl.sum(g, axis=0), mask=col_ok)
    tl.store(out + rows, tl.sum(g * xhat, axis=0), mask=col_ok)
    tl.store(out + 2 * rows, tl.sum(xhat, axis=0), mask=col_ok)


@triton.jit
def bn_relu_backward_apply_kernel(
    grad_y_ptr, z_ptr, hi_ptr, lo_ptr, invstd_ptr, scale_ptr, beta_ptr, mean_g_ptr,
    mean_gx_ptr, grad_z_ptr,
    N, H, W, K, HO, WO,
    POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_z = scale * (g - mean g - xhat * mean(g xhat)) over (N, H, W, K)."""
    pixels, pixel_ok = _pixels(tl.program_id(0), N * H * W, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    hi, lo, scale, beta = _channel_vectors(cols, col_ok, hi_ptr, lo_ptr, scale_ptr, beta_ptr)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)[None, :]
    mean_g = tl.load(mean_g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    mean_gx = tl.load(mean_gx_ptr + cols, mask=col_ok, other=0.0)[None, :]
    n = pixels // (H * W)
    h = (pixels // W) % H
    w = pixels % W
    g, z = _bn_gradient(grad_y_ptr, z_ptr, n, h, w, pixel_ok, cols, col_ok, H, W, K, HO, WO,
                        hi, lo, scale, beta, POOL, z_ptr.dtype.element_ty)
    xhat = ((z - hi) - lo) * invstd
    grad_z = scale * (g - mean_g - xhat * mean_gx)
    ok = pixel_ok[:, None] & col_ok[None, :]
    tl.store(grad_z_ptr + pixels[:, None] * K + cols[None, :],
             grad_z.to(grad_z_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_gradient(grad_y_ptr, mask_ptr, grad_a_ptr, act_ptr, n, h, w, pixel_ok, cols, col_ok,
                     H, W, K, HO, WO, POOL: tl.constexpr, TAPPED: tl.constexpr):
    """The gradient reaching a folded block's pre-activation (before its per-channel scale) at
    pixels (n, h, w) x cols, fp32. Without POOL, mask_ptr is the block's output y and the
    gradient is grad_y where y > 0. With POOL, mask_ptr holds one uint8 code per pooled output:
    the window position (0..3, row-major) the pool took its maximum from, or 255 where that
    maximum is not positive (no gradient passes the ReLU); TAPPED adds the gradient of the
    full-resolution activation act (a feature tap), grad_a where act > 0."""
    ok = pixel_ok[:, None] & col_ok[None, :]
    if POOL:
        ph = h // 2
        pw = w // 2
        inside = pixel_ok & (h < 2 * HO) & (w < 2 * WO)
        pooled = ((n * HO + ph) * WO + pw)[:, None] * K + cols[None, :]
        window_ok = inside[:, None] & col_ok[None, :]
        code = tl.load(mask_ptr + pooled, mask=window_ok, other=255).to(tl.int32)
        routed = window_ok & (code == ((h % 2) * 2 + (w % 2))[:, None])
        g = tl.load(grad_y_ptr + pooled, mask=routed, other=0.0).to(tl.float32)
        if TAPPED:
            full = ((n * H + h) * W + w)[:, None] * K + cols[None, :]
            act = tl.load(act_ptr + full, mask=ok, other=0.0).to(tl.float32)
            grad_a = tl.load(grad_a_ptr + full, mask=ok & (act > 0.0), other=0.0)
            g += grad_a.to(tl.float32)
    else:
        full = ((n * H + h) * W + w)[:, None] * K + cols[None, :]
        y = tl.load(mask_ptr + full, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_y_ptr + full, mask=ok & (y > 0.0), other=0.0).to(tl.float32)
    return g


@triton.jit
def relu_pool_backward_kernel(
    grad_y_ptr, mask_ptr, grad_a_ptr, act_ptr, scale_ptr, grad_pre_ptr, partial_ptr,
    N, H, W, K, HO, WO,
    POOL: tl.constexpr, TAPPED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_pre = scale * g (``_masked_gradient``) over (N, H, W, K), the gradient of a folded
    block's conv output, and per-program partial sums of g (the conv bias gradient without BN)
    at partial[program, k]."""
    pid = tl.program_id(0)
    pixels, pixel_ok = _pixels(pid, N * H * W, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    n = pixels // (H * W)
    h = (pixels // W) % H
    w = pixels % W
    g = _masked_gradient(grad_y_ptr, mask_ptr, grad_a_ptr, act_ptr, n, h, w, pixel_ok, cols,
                         col_ok, H, W, K, HO, WO, POOL, TAPPED)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    ok = pixel_ok[:, None] & col_ok[None, :]
    tl.store(grad_pre_ptr + pixels[:, None] * K + cols[None, :],
             (g * scale).to(grad_pre_ptr.dtype.element_ty), mask=ok)
    tl.store(partial_ptr + pid.to(tl.int64) * K + cols, tl.sum(g, axis=0), mask=col_ok)


@triton.jit
def conv_dgrad_kernel(
    # the output-side gradient: a tensor (PROLOGUE 0), or its sources (``_masked_gradient``)
    g_ptr, mask_ptr, grad_a_ptr, act_ptr, scale_ptr,
    # flipped, transposed weights (C, K, R, R) by strides; the input gradient (N, H, W, C)
    w_ptr, out_ptr,
    N, H, W, K, C, HO, WO,
    stride_wc, stride_wk, stride_wr, stride_ws,
    R: tl.constexpr, PROLOGUE: tl.constexpr, POOL: tl.constexpr, TAPPED: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile (BLOCK_M input pixels x BLOCK_N input channels) of the input gradient of a
    stride-1 conv (3x3 pad 1 or 1x1): ``grad_x[q, c] = sum over taps t and k of
    G[q + offset(t), k] * w_t[c, k, t]``, the forward conv of G with the weights flipped in
    space and transposed (w_t[c, k, r, s] = w[k, c, R-1-r, R-1-s]), fp32 accumulation.

    PROLOGUE 0: G is the tensor at g_ptr (N, H, W, K) (a training block's grad_z); 1: G is
    computed in the operand load, ``scale * _masked_gradient(...)``, from the block's grad_y
    (g_ptr), its mask (output y or pool codes, mask_ptr) and, with TAPPED, a tapped
    activation's gradient: a frozen block's ReLU, pool and scale backward, fused."""
    PAD: tl.constexpr = R // 2
    pid = tl.program_id(0)
    num_n = tl.cdiv(C, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * H * W
    n = rows // (H * W)
    oh = ((rows // W) % H).to(tl.int32)
    ow = (rows % W).to(tl.int32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    offs_k = tl.arange(0, BLOCK_K)
    w_col = w_ptr + cols.to(tl.int64) * stride_wc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    for t in range(0, R * R * num_k):
        tap = t // num_k
        ks = (t % num_k) * BLOCK_K + offs_k
        k_ok = ks < K
        r = tap // R
        s = tap % R
        ih = oh + r - PAD
        iw = ow + s - PAD
        pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if PROLOGUE == 0:
            a_ptrs = g_ptr + ((n * H + ih) * W + iw)[:, None] * K + ks[None, :]
            if EVEN_K:
                a = tl.load(a_ptrs, mask=pix_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            g = _masked_gradient(g_ptr, mask_ptr, grad_a_ptr, act_ptr, n, ih, iw, pix_ok, ks,
                                 k_ok, H, W, K, HO, WO, POOL, TAPPED)
            scale = tl.load(scale_ptr + ks, mask=k_ok, other=0.0)
            a = (g * scale[None, :]).to(w_ptr.dtype.element_ty)
        b_ptrs = w_col[None, :] + (ks * stride_wk)[:, None] + (r * stride_wr + s * stride_ws)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + rows[:, None] * C + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def conv_wgrad_kernel(
    g_ptr, x_ptr, partial_ptr,
    N, H, W, K, C, PIXELS_PER_SPLIT,
    R: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partial weight gradient of split ``program_id(1)``: for one tap and one (BLOCK_K output
    channels x BLOCK_C input channels) tile, ``sum over pixels p of G[p, k] * x[p + tap, c]``
    over that split's PIXELS_PER_SPLIT pixels, fp32, written to partial[split, tap, k, c] (the
    launcher adds the splits in a fixed order: deterministic, no atomics). G: (N, H, W, K);
    x: (N, H, W, C); taps of R x R, padding R // 2."""
    PAD: tl.constexpr = R // 2
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_c = tl.cdiv(C, BLOCK_C)
    num_k = tl.cdiv(K, BLOCK_K)
    tap = pid // (num_k * num_c)
    pid_k = (pid // num_c) % num_k
    pid_c = pid % num_c
    r = tap // R
    s = tap % R
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = ks < K
    c_ok = cs < C
    total = N * H * W
    first = split.to(tl.int64) * PIXELS_PER_SPLIT
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, PIXELS_PER_SPLIT, BLOCK_P):
        pixels = first + p0 + tl.arange(0, BLOCK_P)
        p_ok = (pixels < total) & (p0 + tl.arange(0, BLOCK_P) < PIXELS_PER_SPLIT)
        n = pixels // (H * W)
        h = ((pixels // W) % H).to(tl.int32)
        w = (pixels % W).to(tl.int32)
        ih = h + r - PAD
        iw = w + s - PAD
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g = tl.load(g_ptr + pixels[:, None] * K + ks[None, :],
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ((n * H + ih) * W + iw)[:, None] * C + cs[None, :],
                    mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=INPUT_PRECISION)
    out = partial_ptr + ((split.to(tl.int64) * R * R + tap) * K + ks[:, None]) * C + cs[None, :]
    tl.store(out, acc, mask=k_ok[:, None] & c_ok[None, :])
