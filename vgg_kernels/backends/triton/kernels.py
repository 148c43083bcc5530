"""The Triton kernels of the fused conv + folded BN + ReLU (+ 2x2/2 max-pool) inference op: the
``@triton.jit`` functions only, no torch, so that ``codegen`` can compile a fresh copy of them
for a GPU target while the interpreter is on. Launch, configs and autotuning live in
``conv_bn_relu.py``, whose docstring describes the two load paths.
"""

import triton
import triton.language as tl


@triton.jit
def _relu(v):
    """ReLU that keeps NaN, as torch.relu does (``tl.maximum(v, 0)``, like the GPU's max
    instruction, returns 0 for NaN)."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def _max_keep_nan(x, axis: tl.constexpr):
    """Max over ``axis`` that is NaN where any element is NaN (nn.MaxPool2d's semantics;
    ``tl.max`` skips NaN): the sum of the NaN elements, 0 where there are none, is added."""
    return tl.max(x, axis=axis) + tl.sum(tl.where(x != x, x, 0.0), axis=axis)


@triton.jit
def _bn_relu(acc, scale_ptr, shift_ptr, cols, col_ok):
    """Folded BN (per output channel scale and shift) and ReLU on an fp32 tile."""
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    return _relu(acc * scale[None, :] + shift[None, :])


@triton.jit
def _window_code(first, best):
    """The 2x2 windows' uint8 codes for the input gradient: ``first``, the position
    (row-major) of each window's first maximum, where PyTorch's max-pool routes the gradient,
    or 255 where that maximum ``best`` is not positive (the ReLU passes no gradient; NaN
    included). Both are taken from the activations as rounded to the output's type."""
    return tl.where(best > 0.0, first, 255).to(tl.uint8)


@triton.jit
def _tile_stats(z, row_ok, stats_ptr, pid_m, cols, col_ok, K, TILES):
    """A tile's share of the batch statistics, per channel: z0, its first row's value (a value
    of the distribution), and the sums of z - z0 and (z - z0)^2 over its valid rows, written to
    stats[s, pid_m, k] for s = 0, 1, 2. The launcher merges the tiles with Chan's formula in
    fp64: no E[z^2] - E[z]^2, no atomics."""
    rows = tl.arange(0, z.shape[0])
    z0 = tl.sum(tl.where((rows == 0)[:, None], z, 0.0), axis=0)
    d = tl.where(row_ok[:, None], z - z0[None, :], 0.0)
    out = stats_ptr + pid_m.to(tl.int64) * K + cols
    tl.store(out, z0, mask=col_ok)
    tl.store(out + TILES * K, tl.sum(d, axis=0), mask=col_ok)
    tl.store(out + 2 * TILES * K, tl.sum(d * d, axis=0), mask=col_ok)


@triton.jit
def _split_pixels(first, local, HO, WO, SPLIT32: tl.constexpr):
    """Image (int64), row and column of output pixels ``first + local`` in N, H, W order, for an
    int64 scalar ``first`` and int32 offsets ``local`` below 256. SPLIT32: one 64-bit division
    per tile and 32-bit ones per pixel (the launcher keeps HO * WO + 256 below 2**31), for the
    one-step row-segment tiles, where this is per-tile work that nothing amortizes; elsewhere a
    64-bit division per pixel (a called subroutine), which needs fewer registers: the 32-bit
    form made the gathered first-layer tiles spill."""
    hw = HO * WO
    if SPLIT32:
        image = first // hw
        within = (first - image * hw).to(tl.int32) + local
        carry = within // hw
        rem = within - carry * hw
        n = image + carry
    else:
        pixel = first + local
        n = pixel // hw
        rem = (pixel % hw).to(tl.int32)
    return n, rem // WO, rem % WO


@triton.jit
def _tile_rows(pid_m, M_TOTAL, HO, WO, POOL: tl.constexpr, BLOCK_M: tl.constexpr,
               SPLIT32: tl.constexpr):
    """Conv output positions (image n as int64, oh, ow) and validity of pointer tile ``pid_m``'s
    BLOCK_M rows: output pixels in N, H, W order; with POOL, BLOCK_M // 4 pooled pixels, row
    group ``p = row // (BLOCK_M // 4)`` holding window position (p // 2, p % 2). SPLIT32: see
    ``_split_pixels``."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    if POOL:
        local = rows % ROWS_OUT
    else:
        local = rows
    first = pid_m.to(tl.int64) * ROWS_OUT
    row_ok = first + local < M_TOTAL
    n, oh, ow = _split_pixels(first, local, HO, WO, SPLIT32)
    if POOL:
        window = rows // ROWS_OUT
        oh = oh * 2 + window // 2
        ow = ow * 2 + window % 2
    return n, oh, ow, row_ok


@triton.jit
def _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh, stride_xw,
                 q0, R: tl.constexpr, FLAT_K: tl.constexpr, SEGMENTS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Columns q0 .. q0 + BLOCK_K of the flattened reduction, q = (r * R + s) * C + c with
    C = FLAT_K a compile-time constant, so the split of q is constant per column.

    SEGMENTS: x is a contiguous (N, H, W, 4) copy of the input, zero-padded to 4 channels, by
    one row above and below, one column left and two right (H, W are its sizes). Kernel row r of
    conv output pixel (oh, ow) is then the 16 contiguous elements of padded pixels ow .. ow + 3
    in padded row oh + r: taps s = 0, 1, 2 and a fourth whose weights are zero. So q = 16 r +
    4 s + c, the loads need no bounds masks, and each row's 16 elements (8-byte aligned) load
    as wide vectors instead of one element at a time. The fourth tap holds a neighbouring
    pixel, which is zeroed after the load: its zero weights times an Inf or NaN there would
    give NaN in an output that F.conv2d keeps finite."""
    q = q0 + tl.arange(0, BLOCK_K)
    if SEGMENTS:
        r = q // 16
        # 64-bit image offset, 32-bit offsets inside the image; every row starts 4-aligned
        image = x_ptr + n * H * W * 4
        start = tl.multiple_of(((oh[:, None] + r[None, :]) * W + ow[:, None]) * 4, [4, 4])
        ptrs = image[:, None] + start + tl.max_contiguous(q % 16, 16)[None, :]
        rows = tl.load(ptrs, mask=row_ok[:, None] & (r < R)[None, :], other=0.0)
        return tl.where(((q % 16) < 4 * R)[None, :], rows, tl.zeros_like(rows))
    PAD: tl.constexpr = R // 2
    q_ok = q < R * R * FLAT_K
    tap = q // FLAT_K
    c = q % FLAT_K
    ih = oh[:, None] + (tap // R)[None, :] - PAD
    iw = ow[:, None] + (tap % R)[None, :] - PAD
    mask = row_ok[:, None] & q_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    # int64 image offset; in-image offsets fit in int32
    ptrs = (x_ptr + n[:, None] * stride_xn) + ih * stride_xh + iw * stride_xw \
        + c[None, :] * stride_xc
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws, q0,
                  R: tl.constexpr, FLAT_K: tl.constexpr, SEGMENTS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Rows q0 .. q0 + BLOCK_K of the flattened reduction of the weights, by output channel
    (with SEGMENTS, q = 16 r + 4 s + c, zero where s or c is padding)."""
    q = q0 + tl.arange(0, BLOCK_K)
    if SEGMENTS:
        r = q // 16
        s = (q % 16) // 4
        c = q % 4
        q_ok = (r < R) & (s < R) & (c < FLAT_K)
        offsets = c * stride_wc + r * stride_wr + s * stride_ws
    else:
        q_ok = q < R * R * FLAT_K
        tap = q // FLAT_K
        offsets = (q % FLAT_K) * stride_wc + (tap // R) * stride_wr + (tap % R) * stride_ws
    w_col = w_ptr + cols.to(tl.int64) * stride_wk
    return tl.load(w_col[None, :] + offsets[:, None], mask=q_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _store_rows(acc, y_ptr, a_ptr, code_ptr, pid_m, n, oh, ow, row_ok, cols, col_ok, M_TOTAL,
                K, HO, WO, stride_yn, stride_yc, stride_yh, stride_yw,
                POOL: tl.constexpr, STORE_ACTIVATION: tl.constexpr, STORE_CODES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT32: tl.constexpr):
    """Store pointer tile ``pid_m`` (rows as in ``_tile_rows``), max-pooled first with POOL.
    With POOL, STORE_ACTIVATION also stores the full-resolution activation (a feature tap;
    a_ptr: (N, 2 HO, 2 WO, K) contiguous) and STORE_CODES each window's ``_window_code``
    (code_ptr: uint8 (N, HO, WO, K) contiguous)."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    if POOL:
        if STORE_ACTIVATION or STORE_CODES:
            # the activations as stored: the tap, the pool and the codes all see the values
            # PyTorch's unfused ops round (and one tile stays live, not two)
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        if STORE_ACTIVATION:
            a_ptrs = a_ptr + (((n * 2 * HO + oh) * 2 * WO + ow) * K)[:, None] + cols[None, :]
            tl.store(a_ptrs, acc.to(a_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        first = pid_m.to(tl.int64) * ROWS_OUT
        local = tl.arange(0, ROWS_OUT)
        pixel_ok = first + local < M_TOTAL
        yn, yh, yw = _split_pixels(first, local, HO, WO, SPLIT32)
        # rows p * ROWS_OUT + j are the four window positions of pooled pixel j
        windows = tl.reshape(acc, (4, ROWS_OUT, BLOCK_N))
        acc = _max_keep_nan(windows, 0)
        if STORE_CODES:
            position = tl.min(tl.where(windows == acc[None, :, :],
                                       tl.arange(0, 4)[:, None, None], 4), axis=0)
            c_ptrs = code_ptr + (((yn * HO + yh) * WO + yw) * K)[:, None] + cols[None, :]
            tl.store(c_ptrs, _window_code(position, acc),
                     mask=pixel_ok[:, None] & col_ok[None, :])
    else:
        pixel_ok = row_ok
        yn = n
        yh = oh
        yw = ow
    y_ptrs = (y_ptr + yn[:, None] * stride_yn + (yh * stride_yh + yw * stride_yw)[:, None]
              + cols[None, :] * stride_yc)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=pixel_ok[:, None] & col_ok[None, :])


@triton.jit
def _epilogue(acc, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr, pid_m, n, oh, ow,
              row_ok, cols, col_ok, M_TOTAL, K, HO, WO,
              stride_yn, stride_yc, stride_yh, stride_yw,
              EPILOGUE: tl.constexpr, POOL: tl.constexpr, STORE_ACTIVATION: tl.constexpr,
              STORE_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              SPLIT32: tl.constexpr):
    """EPILOGUE 0 (inference): folded BN and ReLU, then ``_store_rows``. EPILOGUE 1 (the
    training forward; no POOL): z = acc + bias (shift_ptr) stored to y_ptr, and the tile's
    statistics (``_tile_stats``; BLOCK_M-row tiles, one per pid_m)."""
    if EPILOGUE == 1:
        bias = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        z = acc + bias[None, :]
        _store_rows(z, y_ptr, a_ptr, code_ptr, pid_m, n, oh, ow, row_ok, cols, col_ok, M_TOTAL,
                    K, HO, WO, stride_yn, stride_yc, stride_yh, stride_yw, False, False, False,
                    BLOCK_M, BLOCK_N, SPLIT32)
        _tile_stats(z, row_ok, stats_ptr, pid_m, cols, col_ok, K, tl.cdiv(M_TOTAL, BLOCK_M))
    else:
        acc = _bn_relu(acc, scale_ptr, shift_ptr, cols, col_ok)
        _store_rows(acc, y_ptr, a_ptr, code_ptr, pid_m, n, oh, ow, row_ok, cols, col_ok,
                    M_TOTAL, K, HO, WO, stride_yn, stride_yc, stride_yh, stride_yw, POOL,
                    STORE_ACTIVATION, STORE_CODES, BLOCK_M, BLOCK_N, SPLIT32)


@triton.jit
def _pointer_tile(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr,
    C, H, W, K, HO, WO, M_TOTAL,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    pid_m, pid_n,
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr, SEGMENTS: tl.constexpr,
    EVEN_C: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_ACTIVATION: tl.constexpr, STORE_CODES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile ``pid_m`` of BLOCK_M rows (see ``_tile_rows``) by BLOCK_N output channels, loaded
    through masked pointer gathers. FLAT_K is 0 (one reduction step per tap and channel block)
    or C, then a compile-time constant: the R*R*C reduction (R rows of 16 with SEGMENTS) is
    flattened into BLOCK_K-wide steps."""
    PAD: tl.constexpr = R // 2
    n, oh, ow, row_ok = _tile_rows(pid_m, M_TOTAL, HO, WO, POOL, BLOCK_M, SEGMENTS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        REDUCTION: tl.constexpr = R * 16 if SEGMENTS else R * R * FLAT_K
        for q0 in tl.static_range(0, REDUCTION, BLOCK_K):  # one step for C=3
            a = _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh,
                             stride_xw, q0, R, FLAT_K, SEGMENTS, BLOCK_K)
            b = _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws,
                              q0, R, FLAT_K, SEGMENTS, BLOCK_K)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        x_row = x_ptr + n * stride_xn  # int64 image offset; in-image offsets fit in int32
        w_col = w_ptr + cols.to(tl.int64) * stride_wk
        offs_k = tl.arange(0, BLOCK_K)
        # one loop over (tap, channel block) so the pipeliner overlaps loads across taps
        num_c = tl.cdiv(C, BLOCK_K)
        for t in range(0, R * R * num_c):
            tap = t // num_c
            c = (t % num_c) * BLOCK_K + offs_k
            r = tap // R
            s = tap % R
            ih = oh + r - PAD
            iw = ow + s - PAD
            pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_row[:, None] + (ih * stride_xh + iw * stride_xw)[:, None] \
                + c[None, :] * stride_xc
            b_ptrs = w_col[None, :] + (c * stride_wc)[:, None] + (r * stride_wr + s * stride_ws)
            if EVEN_C:
                a = tl.load(a_ptrs, mask=pix_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                c_ok = c < C
                a = tl.load(a_ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    _epilogue(acc, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr, pid_m, n, oh, ow,
              row_ok, cols, col_ok, M_TOTAL, K, HO, WO, stride_yn, stride_yc, stride_yh,
              stride_yw, EPILOGUE, POOL, STORE_ACTIVATION, STORE_CODES, BLOCK_M, BLOCK_N,
              SEGMENTS)


@triton.jit
def _flat_persistent_tiles(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr,
    H, W, K, HO, WO, M_TOTAL,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr, SEGMENTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_ACTIVATION: tl.constexpr, STORE_CODES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pointer tiles p, p + P, ... of a one-step flattened reduction (R*R*C <= BLOCK_K: the
    3-channel first layer; R*16 with SEGMENTS), with the next tile's input gather issued before
    this tile's product and store, so its latency hides behind them (a one-step reduction
    leaves the software pipeliner nothing to overlap inside a tile). The launcher makes P a
    multiple of the number of column blocks, so a program's column block, and its weights,
    never change: they are loaded once."""
    ROWS_OUT: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
    num_n = tl.cdiv(K, BLOCK_N)
    num_tiles = tl.cdiv(M_TOTAL, ROWS_OUT) * num_n
    step = tl.num_programs(0)
    first = tl.program_id(0)
    cols = (first % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    b = _flat_weights(w_ptr, cols, col_ok, stride_wk, stride_wc, stride_wr, stride_ws, 0,
                      R, FLAT_K, SEGMENTS, BLOCK_K)
    n, oh, ow, row_ok = _tile_rows(first // num_n, M_TOTAL, HO, WO, POOL, BLOCK_M, SEGMENTS)
    a = _flat_gather(x_ptr, n, oh, ow, row_ok, H, W, stride_xn, stride_xc, stride_xh, stride_xw,
                     0, R, FLAT_K, SEGMENTS, BLOCK_K)
    for tile_id in range(first, num_tiles, step):
        # the next tile's rows (all masked past the last tile) and gather, issued first
        n2, oh2, ow2, ok2 = _tile_rows((tile_id + step) // num_n, M_TOTAL, HO, WO, POOL,
                                       BLOCK_M, SEGMENTS)
        a_next = _flat_gather(x_ptr, n2, oh2, ow2, ok2, H, W, stride_xn, stride_xc, stride_xh,
                              stride_xw, 0, R, FLAT_K, SEGMENTS, BLOCK_K)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, input_precision=INPUT_PRECISION)
        _epilogue(acc, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr,
                  tile_id // num_n, n, oh, ow, row_ok, cols, col_ok, M_TOTAL, K, HO, WO,
                  stride_yn, stride_yc, stride_yh, stride_yw, EPILOGUE, POOL, STORE_ACTIVATION,
                  STORE_CODES, BLOCK_M, BLOCK_N, SEGMENTS)
        a = a_next
        n = n2
        oh = oh2
        ow = ow2
        row_ok = ok2


@triton.jit
def _store_tile_codes(rounded, code_ptr, image, ph0, pw0, cols, N, HO, WO, K,
                      BLOCK_I: tl.constexpr, OUT_H: tl.constexpr, OUT_W: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The ``_window_code`` of every window of a descriptor tile (rows (image, h, w)
    row-major, activations rounded to the output's type), stored through pointers at pooled
    position (image, ph0, pw0) onwards, clipped at the output's edges."""
    x = tl.reshape(rounded, (BLOCK_I * OUT_H, 2, OUT_W, 2, BLOCK_N))
    best = tl.max(tl.max(x, axis=3, keep_dims=True), axis=1, keep_dims=True)
    positions = (tl.arange(0, 2)[None, :, None, None, None] * 2
                 + tl.arange(0, 2)[None, None, None, :, None])
    first = tl.min(tl.min(tl.where(x == best, positions, 4), axis=3), axis=1)
    codes = tl.reshape(_window_code(first, tl.reshape(best, (BLOCK_I * OUT_H, OUT_W, BLOCK_N))),
                       (BLOCK_I * OUT_H * OUT_W, BLOCK_N))
    rows = tl.arange(0, BLOCK_I * OUT_H * OUT_W)
    n = image + rows // (OUT_H * OUT_W)
    ph = ph0 + (rows // OUT_W) % OUT_H
    pw = pw0 + rows % OUT_W
    ok = (n < N) & (ph < HO) & (pw < WO)
    offsets = ((n.to(tl.int64) * HO + ph) * WO + pw) * K
    tl.store(code_ptr + offsets[:, None] + cols[None, :], codes,
             mask=ok[:, None] & (cols < K)[None, :])


@triton.jit
def _tma_tiles(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr,
    N, C, H, W, K, HO, WO,
    stride_xn, stride_xh, stride_xw, stride_yn, stride_yh, stride_yw,
    R: tl.constexpr, POOL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    STORE_ACTIVATION: tl.constexpr, STORE_CODES: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Tiles (BLOCK_I images x BLOCK_H x BLOCK_W conv output positions, BLOCK_N output
    channels) loaded through tensor descriptors (TMA on Hopper and newer). Several images per
    tile keep small images from leaving most of a tile empty (14x14 in 2x16 blocks of 4 images
    fills 87.5% of the rows, one 16x16 block 77%). Program p computes tiles p, p + P, p + 2P,
    ... for a grid of P programs: one tile each when the grid covers every tile,
    several in a persistent grid, which builds its descriptors once. FLATTEN fuses the tile loop
    with the reduction loop into one software-pipelined loop, so the next tile's first loads are
    in flight during this tile's last steps and its epilogue (for one program per SM, where no
    other program fills that gap).

    Each (tap, channel block) step loads the input window shifted by the tap: the descriptor's
    out-of-bounds zero fill is the convolution's zero padding (negative coordinates included), so
    the loop has no index arithmetic and no masks. BLOCK_K divides C, so a weight tile never
    crosses into the next tap; weight rows past K load as zeros. The store clips the tile at the
    output's edges, which also gives MaxPool2d's floor for odd H and W.

    With POOL (and even H and W), STORE_ACTIVATION also stores the full-resolution activation
    through a descriptor of a_ptr ((N, H, W, K) contiguous), and STORE_CODES each window's
    ``_window_code`` to code_ptr (uint8 (N, HO, WO, K) contiguous).
    """
    PAD: tl.constexpr = R // 2
    BLOCK_M: tl.constexpr = BLOCK_I * BLOCK_H * BLOCK_W
    OUT_H: tl.constexpr = BLOCK_H // 2 if POOL else BLOCK_H  # output tile, pooled or not
    OUT_W: tl.constexpr = BLOCK_W // 2 if POOL else BLOCK_W
    # x: (N, H, W, C), w: (K, R*R*C), y: (N, HO, WO, K), all with unit channel stride
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C],
                                       strides=[stride_xn, stride_xh, stride_xw, 1],
                                       block_shape=[BLOCK_I, BLOCK_H, BLOCK_W, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, R * R * C], strides=[R * R * C, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[N, HO, WO, K],
                                       strides=[stride_yn, stride_yh, stride_yw, 1],
                                       block_shape=[BLOCK_I, OUT_H, OUT_W, BLOCK_N])
    if STORE_ACTIVATION:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[N, H, W, K],
                                           strides=[H * W * K, W * K, K, 1],
                                           block_shape=[BLOCK_I, BLOCK_H, BLOCK_W, BLOCK_N])
    rows_conv = 2 * HO if POOL else H  # conv output rows (columns) the output needs
    tiles_w = tl.cdiv(2 * WO if POOL else W, BLOCK_W)
    tiles_per_image = tl.cdiv(rows_conv, BLOCK_H) * tiles_w
    num_n = tl.cdiv(K, BLOCK_N)
    num_c = tl.cdiv(C, BLOCK_K)
    num_m = tl.cdiv(N, BLOCK_I) * tiles_per_image
    for tile_id in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0),
                            flatten=FLATTEN):
        # Tiles that share an input block run next to each other: it is read from L2.
        pid_m = tile_id // num_n
        image = (pid_m // tiles_per_image) * BLOCK_I  # the first of the tile's images
        tile = pid_m % tiles_per_image
        h0 = (tile // tiles_w) * BLOCK_H
        w0 = (tile % tiles_w) * BLOCK_W
        n0 = (tile_id % num_n) * BLOCK_N

        # The product is computed transposed, (channels x pixels) = w @ x^T, so that both
        # operands feed the tensor cores straight from the descriptors' shared-memory tiles.
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for t in range(0, R * R * num_c):
            tap = t // num_c
            c0 = (t % num_c) * BLOCK_K
            a = x_desc.load([image, h0 + tap // R - PAD, w0 + tap % R - PAD, c0])
            a = tl.reshape(a, (BLOCK_M, BLOCK_K))
            b = w_desc.load([n0, tap * C + c0])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(b, tl.trans(a), acc, input_precision=INPUT_PRECISION)

        acc = tl.trans(acc)
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = _bn_relu(acc, scale_ptr, shift_ptr, cols, cols < K)
        if POOL:
            if STORE_ACTIVATION:
                a_desc.store([image, h0, w0, n0],
                             tl.reshape(acc.to(a_ptr.dtype.element_ty),
                                        (BLOCK_I, BLOCK_H, BLOCK_W, BLOCK_N)))
            if STORE_CODES:
                _store_tile_codes(acc.to(y_ptr.dtype.element_ty).to(tl.float32), code_ptr,
                                  image, h0 // 2, w0 // 2, cols, N, HO, WO, K, BLOCK_I, OUT_H,
                                  OUT_W, BLOCK_N)
            # rows are (image, h, w) in the tile, row-major: max over the 2x2 windows
            acc = tl.reshape(acc, (BLOCK_I * OUT_H, 2, OUT_W, 2, BLOCK_N))
            acc = _max_keep_nan(_max_keep_nan(acc, 3), 1)
        out = tl.reshape(acc.to(y_ptr.dtype.element_ty), (BLOCK_I, OUT_H, OUT_W, BLOCK_N))
        y_desc.store([image, h0 * OUT_H // BLOCK_H, w0 * OUT_W // BLOCK_W, n0], out)


@triton.jit
def conv_bn_relu_fwd_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr,
    # sizes
    N, C, H, W, K, HO, WO, M_TOTAL,
    # strides (elements)
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yc, stride_yh, stride_yw,
    # meta-parameters
    R: tl.constexpr, POOL: tl.constexpr, FLAT_K: tl.constexpr, SEGMENTS: tl.constexpr,
    EVEN_C: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA_OK: tl.constexpr, EPILOGUE: tl.constexpr, STORE_ACTIVATION: tl.constexpr,
    STORE_CODES: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows x BLOCK_N output channels) tile of
    ``y = maxpool2x2?(relu(conv(x, w) * scale + shift))``.

    x: (N, C, H, W) by strides (channels_last: stride_xc == 1); w: (K, C, R, R) by strides
    (channels_last: stride_wc == 1); scale, shift: fp32 (K,); y: (N, K, HO, WO) by strides.
    M_TOTAL counts output (pooled) pixels. Padding is R // 2 on every side.
    SEGMENTS (with FLAT_K = C <= 4, R = 3): x is the row-segment copy ``_flat_gather``
    describes, H and W its padded sizes.
    USE_TMA (only with TMA_OK: channels_last x, w and y with 16-byte aligned strides) loads
    BLOCK_H x BLOCK_W spatial tiles of BLOCK_M // (BLOCK_H * BLOCK_W) images through tensor
    descriptors; otherwise rows are gathered through masked pointers. PROGRAMS_PER_SM > 0 makes
    the grid persistent (that many programs per SM, sized in ``_launch``, each looping over
    tiles); 0 runs one program per tile.

    EPILOGUE 0 is the inference block; with POOL (H and W even), STORE_ACTIVATION also writes
    the full-resolution activation to a_ptr and STORE_CODES each window's pool code to
    code_ptr (see ``_store_rows``). EPILOGUE 1 is the training forward's conv (pointer tiles,
    no POOL): z = conv + bias (shift_ptr) to y_ptr and each BLOCK_M-row tile's statistics to
    stats_ptr (``_tile_stats``).
    """
    if USE_TMA:
        tl.static_assert(TMA_OK, "USE_TMA needs TMA_OK")
        tl.static_assert(EPILOGUE == 0, "the descriptor tiles run the inference epilogue")
        tl.static_assert(BLOCK_M % (BLOCK_H * BLOCK_W) == 0,
                         "BLOCK_M must be a multiple of BLOCK_H * BLOCK_W")
        _tma_tiles(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr,
                   N, C, H, W, K, HO, WO,
                   stride_xn, stride_xh, stride_xw, stride_yn, stride_yh, stride_yw,
                   R, POOL, INPUT_PRECISION, UPCAST, STORE_ACTIVATION, STORE_CODES,
                   BLOCK_M // (BLOCK_H * BLOCK_W), BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K,
                   PROGRAMS_PER_SM == 1)
    else:
        num_n = tl.cdiv(K, BLOCK_N)
        # Programs that share an M tile run next to each other: the input tile is read from L2.
        # A persistent grid (PROGRAMS_PER_SM > 0) walks tiles p, p + P, ...; with a one-step
        # flattened reduction each program gathers the next tile's input ahead of time.
        REDUCTION: tl.constexpr = R * 16 if SEGMENTS else R * R * FLAT_K
        if PROGRAMS_PER_SM > 0 and FLAT_K and REDUCTION <= BLOCK_K:
            _flat_persistent_tiles(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr,
                                   stats_ptr, H, W, K, HO, WO,
                                   M_TOTAL, stride_xn, stride_xc, stride_xh, stride_xw,
                                   stride_wk, stride_wc, stride_wr, stride_ws,
                                   stride_yn, stride_yc, stride_yh, stride_yw,
                                   R, POOL, FLAT_K, SEGMENTS, INPUT_PRECISION, UPCAST,
                                   EPILOGUE, STORE_ACTIVATION, STORE_CODES,
                                   BLOCK_M, BLOCK_N, BLOCK_K)
        elif PROGRAMS_PER_SM > 0:
            rows_out: tl.constexpr = BLOCK_M // 4 if POOL else BLOCK_M
            num_tiles = tl.cdiv(M_TOTAL, rows_out) * num_n
            for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _pointer_tile(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr,
                              stats_ptr, C, H, W, K, HO, WO,
                              M_TOTAL, stride_xn, stride_xc, stride_xh, stride_xw,
                              stride_wk, stride_wc, stride_wr, stride_ws,
                              stride_yn, stride_yc, stride_yh, stride_yw,
                              tile_id // num_n, tile_id % num_n, R, POOL, FLAT_K, SEGMENTS,
                              EVEN_C, INPUT_PRECISION, UPCAST, EPILOGUE, STORE_ACTIVATION,
                              STORE_CODES, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            pid = tl.program_id(0)
            _pointer_tile(x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, a_ptr, code_ptr, stats_ptr,
                          C, H, W, K, HO, WO, M_TOTAL,
                          stride_xn, stride_xc, stride_xh, stride_xw,
                          stride_wk, stride_wc, stride_wr, stride_ws,
                          stride_yn, stride_yc, stride_yh, stride_yw,
                          pid // num_n, pid % num_n, R, POOL, FLAT_K, SEGMENTS, EVEN_C,
                          INPUT_PRECISION, UPCAST, EPILOGUE, STORE_ACTIVATION, STORE_CODES,
                          BLOCK_M, BLOCK_N, BLOCK_K)
