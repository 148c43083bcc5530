// fp32 conv kernels on CUDA cores, for torch.backends.cudnn.allow_tf32 = False (full fp32
// products, as cuDNN then gives). The same implicit GEMM as conv_bn_relu.cuh, as a classic
// shared-memory SGEMM: 64 x 64 CTA tiles, 16-deep reduction steps, 4 x 4 outputs per thread. A
// thread's 4 rows are one 2x2 window in pool mode, so the pool is a max over its registers.
// Statistics as in conv_bn_relu.cuh: per-CTA sums of d = z - z0, z0 the tile's first row.
#include "conv_bn_relu.cuh"

namespace vgg_kernels::cuda {
namespace {

constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;
static_assert(kSimtThreads / 16 == kSimtBK, "the column sums take one operand-tile row per tr");

template <bool kPool, bool kStats>
__global__ void __launch_bounds__(kSimtThreads) conv_fp32_simt_kernel(const ConvParams p) {
  __shared__ float As[kSimtBK][kSimtBM + 4];
  __shared__ float Bs[kSimtBK][kSimtBN + 4];
  __shared__ float stat_z0[kStats ? kSimtBN : 1];
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;    // computes rows 4 tr .. + 3, columns 4 tc .. + 3
  const int lc = tid % kSimtBK, lr = tid / kSimtBK;  // loads column lc of rows lr + 16 i
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * kSimtBM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * kSimtBN;
  const float* x = static_cast<const float*>(p.x);
  const float* weight = static_cast<const float*>(p.weight);

  RowInfo rows[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) rows[i] = decode_row<kPool>(p, m_block + lr + 16 * i);

  float acc[4][4] = {};
  const int64_t ktiles = (p.kdim + kSimtBK - 1) / kSimtBK;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int64_t kk = kt * kSimtBK + lc;
    const bool k_ok = kk < p.kdim;
    const int64_t tap = k_ok ? kk / p.c : 0;
    const int64_t c = kk - tap * p.c;
    const int tap_r = static_cast<int>(tap / p.r), tap_s = static_cast<int>(tap % p.r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const RowInfo& info = rows[i];
      const int ih = info.ih0 + tap_r, iw = info.iw0 + tap_s;
      const bool ok = k_ok && info.valid && inside(ih, p.h) && inside(iw, p.w);
      As[lc][lr + 16 * i] =
          ok ? x[info.image_offset + (static_cast<int64_t>(ih) * p.w + iw) * p.c + c] : 0.0f;
      const int64_t n = n_block + lr + 16 * i;
      Bs[lc][lr + 16 * i] = (k_ok && n < p.k) ? weight[n * p.kdim + kk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kSimtBK; ++q) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = As[q][4 * tr + i];
        b[i] = Bs[q][4 * tc + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  float* y = static_cast<float*>(p.y);
  if constexpr (kPool) {
    const int64_t m0 = m_block + 4 * tr;
    if (m0 < p.rows) {
      const int64_t pooled = m0 >> 2;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n_block + 4 * tc + j;
        if (n >= p.k) continue;
        const float scale = p.scale[n], shift = p.shift[n];
        float best = fmaf(acc[0][j], scale, shift);
#pragma unroll
        for (int i = 1; i < 4; ++i) best = max_nan(best, fmaf(acc[i][j], scale, shift));
        y[pooled * p.k + n] = relu_nan(best);  // the max of the ReLUs, NaN kept
      }
    }
    return;
  }
  if constexpr (kStats) {
    // z0: row 0 of the tile (always valid), held by the threads with tr == 0
    if (tr == 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n_block + 4 * tc + j;
        stat_z0[4 * tc + j] = p.shift != nullptr && n < p.k ? acc[0][j] + p.shift[n] : acc[0][j];
      }
    }
    __syncthreads();
  }
  float col_s1[4] = {}, col_s2[4] = {};  // kStats: sums of d = z - z0 and d * d per column
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m_block + 4 * tr + i;
    if (m >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n_block + 4 * tc + j;
      if (n >= p.k) continue;
      float v;
      if constexpr (kStats) {
        v = p.shift != nullptr ? acc[i][j] + p.shift[n] : acc[i][j];
        const float d = v - stat_z0[4 * tc + j];
        col_s1[j] += d;
        col_s2[j] += d * d;
      } else {
        v = relu_nan(fmaf(acc[i][j], p.scale[n], p.shift[n]));
      }
      y[m * p.k + n] = v;
    }
  }
  if constexpr (kStats) {
    // The 16 threads of a column (tr = 0 .. 15) add up in a fixed order, through the operand
    // tiles (free since the main loop's last barrier): no atomics, deterministic sums.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      As[tr][4 * tc + j] = col_s1[j];
      Bs[tr][4 * tc + j] = col_s2[j];
    }
    __syncthreads();
    if (tid < kSimtBN && n_block + tid < p.k) {
      float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
      for (int r = 0; r < kSimtBK; ++r) {
        s1 += As[r][tid];
        s2 += Bs[r][tid];
      }
      const int64_t out = static_cast<int64_t>(blockIdx.x) * p.k + n_block + tid;
      p.tile_shift[out] = stat_z0[tid];
      p.tile_sum[out] = s1;
      p.tile_sumsq[out] = s2;
    }
  }
}

}  // namespace

int conv_stats_rows_per_cta(DType dtype, bool tf32) {
  return dtype == DType::kFloat32 && !tf32 ? kSimtBM : kTensorCoreBM;
}

cudaError_t launch_conv_fp32(const ConvParams& p, ConvMode mode, cudaStream_t stream) {
  // x: one CTA per 64 GEMM rows; y: per 64 output channels.
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kSimtBM)),
                  static_cast<unsigned>(ceil_div(p.k, kSimtBN)));
  if (mode == ConvMode::kStats) {
    conv_fp32_simt_kernel<false, true><<<grid, kSimtThreads, 0, stream>>>(p);
  } else if (p.pool) {
    conv_fp32_simt_kernel<true, false><<<grid, kSimtThreads, 0, stream>>>(p);
  } else {
    conv_fp32_simt_kernel<false, false><<<grid, kSimtThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace vgg_kernels::cuda
