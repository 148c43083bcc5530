// Fused conv (3x3 pad 1 or 1x1) + BN/bias epilogue as an implicit GEMM on tensor cores (WMMA),
// plus the CUDA-core fp32 kernel. Instantiated per dtype in conv_{fp16,bf16,tf32,fp32}.cu so the
// heavy template instances compile in parallel.
//
// GEMM view (NHWC): A[m][kk] = x[pixel(m) + tap(kk)], kk = (r * R + s) * C + c; B[kk][n] =
// weight_krsc[n][kk]; rows m are output pixels, or with pool the 4 pixels of each 2x2 window in
// consecutive rows (m = 4 * pooled_pixel + 2 * dy + dx), so a 16-row fragment holds 4 whole
// windows and the pool is a max over rows in the epilogue; odd trailing rows/columns, which
// nn.MaxPool2d(2) drops, are never computed.
//
// CTA tile BM x BN, reduction step BK = 64 bytes of the storage type (32 fp16/bf16, 16 fp32),
// two shared-memory stages filled with cp.async (16-byte copies, zero-filled at the padding and
// the edges) while the tensor cores work on the other; 8 warps, each owning a (BM / WARPS_M) x
// (BN / WARPS_N) block of 16x16 accumulator fragments. The epilogue stages one fragment at a
// time through shared memory (per warp), applies scale/shift/ReLU/pool or bias + statistics on
// the fp32 values, and writes the storage type.
//
// Statistics (kStats): each CTA sums, per output channel, d = z - z0 and d * d over its valid
// rows, z0 being the channel's z in the CTA's first GEMM row: a value of the same distribution,
// so the sums stay of the order of the spread however far the mean is from 0 (sums of z and
// z * z lose a channel whose mean is 1e4 times its spread to cancellation). The CTA writes z0
// and the two sums; the host forms each tile's mean z0 + S1 / n and m2 = S2 - S1^2 / n in fp64
// and merges the tiles with Chan's formula. Tile means rounded to fp32 here would each be off by
// up to half an ulp of the mean; emulated on the CPU (2697 rows, 24 channels, tiles of 64 and 128
// rows) that put the merged variance off by up to 4e-3 of itself at mean 1e4 and spread 0.01
// (2e-5 at spread 1), against 1e-7 with the sums. Every sum has one fixed order (no atomics),
// so the statistics are deterministic.
#pragma once

#include <mma.h>

#include "common.cuh"
#include "launch.h"

namespace vgg_kernels::cuda {

namespace wmma = nvcuda::wmma;

// Tensor-core fragment types for a storage type: m16n16k16 for fp16/bf16, m16n16k8 tf32 for fp32.
template <typename T>
struct MmaTraits {
  static constexpr int kK = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename Frag>
  static __device__ __forceinline__ void round_operands(Frag&) {}
};

template <>
struct MmaTraits<float> {
  static constexpr int kK = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename Frag>
  static __device__ __forceinline__ void round_operands(Frag& frag) {
#pragma unroll
    for (int i = 0; i < frag.num_elements; ++i) frag.x[i] = wmma::__float_to_tf32(frag.x[i]);
  }
};

// GEMM rows per CTA of every tensor-core tile shape below: the row tile of the statistics
// buffers (conv_stats_rows_per_cta).
constexpr int kTensorCoreBM = 128;

template <typename T, int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  static constexpr int BK = 4 * kChunk;                             // 64 bytes per tile row
  static constexpr int kChunksPerRow = BK / kChunk;
  // Row pitch of BK + 16 bytes: 80-byte rows keep WMMA's 32-byte alignment (16 rows = 1280 B)
  // and spread a fragment's 16 rows over distinct banks.
  static constexpr int kLds = BK + kChunk;
  static constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  static constexpr int kFragsM = kWarpM / 16, kFragsN = kWarpN / 16;
  static constexpr int kStageElems = (BM + BN) * kLds;
  static constexpr int kPipeBytes = 2 * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kScratchLd = 20;  // floats per row of a warp's 16x16 epilogue scratch
  static constexpr int kEpilogueBytes = WARPS_M * WARPS_N * 16 * kScratchLd * 4;
  static constexpr int kSmemBytes = kPipeBytes > kEpilogueBytes ? kPipeBytes : kEpilogueBytes;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // tile rows one copy pass covers
  static constexpr int kAChunks = BM / kRowsPerPass;             // 16-byte copies per thread (A)
  static constexpr int kBChunks = BN / kRowsPerPass;
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile must be whole fragments");
  static_assert(BM % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "copy passes must tile");
  static_assert(kThreads % BK == 0, "scalar loads assume a fixed column per thread");
};

// Where GEMM row m reads its input: offset of its image in x, top-left tap coordinates.
struct RowInfo {
  int64_t image_offset;
  int ih0, iw0;
  bool valid;
};

template <bool kPool>
__device__ __forceinline__ RowInfo decode_row(const ConvParams& p, int64_t m) {
  int64_t n, oh, ow;
  if (kPool) {
    const int64_t window = m >> 2;
    const int q = static_cast<int>(m & 3);
    const int64_t pw = window % p.out_w;
    const int64_t rest = window / p.out_w;
    oh = 2 * (rest % p.out_h) + (q >> 1);
    ow = 2 * pw + (q & 1);
    n = rest / p.out_h;
  } else {
    ow = m % p.w;
    const int64_t rest = m / p.w;
    oh = rest % p.h;
    n = rest / p.h;
  }
  const int pad = p.r / 2;
  RowInfo info;
  info.image_offset = n * p.h * p.w * p.c;
  info.ih0 = static_cast<int>(oh) - pad;
  info.iw0 = static_cast<int>(ow) - pad;
  info.valid = m < p.rows;
  return info;
}

__device__ __forceinline__ bool inside(int i, int64_t size) {
  return i >= 0 && static_cast<int64_t>(i) < size;
}

// Stores 8 consecutive channels (16-byte stores when the row is aligned and complete).
template <typename T>
__device__ __forceinline__ void store_channels8(T* dst, const float (&v)[8], int valid,
                                                bool aligned) {
  if (aligned && valid == 8) {
    if constexpr (sizeof(T) == 2) {
      alignas(16) T packed[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) packed[t] = Convert<T>::from_float(v[t]);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
    } else {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    return;
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) {  // unrolled and predicated: v stays in registers
    if (t < valid) dst[t] = Convert<T>::from_float(v[t]);
  }
}

// kVec: c is a multiple of the 16-byte chunk and x is 16-byte aligned, so each chunk of the
// reduction lies inside one tap and copies with cp.async; else element-wise loads (the 3-channel
// first layer, odd test shapes).
template <typename T, typename Cfg, bool kPool, bool kStats, bool kVec>
__global__ void __launch_bounds__(Cfg::kThreads, 2) conv_bn_relu_kernel(const ConvParams p) {
  using Mma = MmaTraits<T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, kLds = Cfg::kLds;
  constexpr int kChunk = Cfg::kChunk;
  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  // kStats: per channel of the tile, z0 and the sums of d = z - z0 and d * d, one row of sums per
  // warp row (each entry has a single writer thread, so no atomics and a fixed order); 2.5 KB at
  // most, within the 48 KB of static shared memory with the 40 KB pipeline
  constexpr int kStatRows = kStats ? Cfg::WARPS_M : 1, kStatCols = kStats ? BN : 1;
  __shared__ float stat_z0[kStatCols];
  __shared__ float stat_s1[kStatRows][kStatCols];
  __shared__ float stat_s2[kStatRows][kStatCols];
  T* stages = reinterpret_cast<T*>(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * BN;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int ktiles = static_cast<int>((p.kdim + BK - 1) / BK);

  if constexpr (kStats) {
    for (int i = tid; i < kStatRows * kStatCols; i += Cfg::kThreads) {
      stat_s1[i / kStatCols][i % kStatCols] = 0.0f;
      stat_s2[i / kStatCols][i % kStatCols] = 0.0f;
    }
  }

  // ---- tile loaders. Vectorised: thread tid copies chunk column tid % 4 of rows
  // tid / 4 + j * kRowsPerPass; its (tap, channel) position advances by BK per tile.
  const int chunk_col = tid % Cfg::kChunksPerRow;
  const int row0 = tid / Cfg::kChunksPerRow;
  // Only the A rows' decoded positions are kept across tiles (B rows are recomputed: at 128
  // registers per thread every kept value is a spill candidate).
  RowInfo a_rows[kVec ? Cfg::kAChunks : 1];
  int a_c = chunk_col * kChunk, a_s = 0, a_r = 0;  // channel, tap column, tap row of the chunk
  int64_t b_kk = chunk_col * kChunk;
  if constexpr (kVec) {
#pragma unroll
    for (int j = 0; j < Cfg::kAChunks; ++j) {
      a_rows[j] = decode_row<kPool>(p, m_block + row0 + j * Cfg::kRowsPerPass);
    }
    while (a_c >= p.c) {  // c < BK: the first chunk may already be past the first tap
      a_c -= static_cast<int>(p.c);
      if (++a_s == p.r) {
        a_s = 0;
        ++a_r;
      }
    }
  }

  auto load_tile = [&](int stage, int kt) {
    T* As = stages + stage * Cfg::kStageElems;
    T* Bs = As + BM * kLds;
    if constexpr (kVec) {
      const bool k_ok = a_r < p.r;
#pragma unroll
      for (int j = 0; j < Cfg::kAChunks; ++j) {
        const RowInfo& row = a_rows[j];
        const int ih = row.ih0 + a_r, iw = row.iw0 + a_s;
        const bool ok = k_ok && row.valid && inside(ih, p.h) && inside(iw, p.w);
        const T* src = ok ? x + row.image_offset + (static_cast<int64_t>(ih) * p.w + iw) * p.c + a_c
                          : x;
        cp_async_16(As + (row0 + j * Cfg::kRowsPerPass) * kLds + chunk_col * kChunk, src, ok);
      }
#pragma unroll
      for (int j = 0; j < Cfg::kBChunks; ++j) {
        const int64_t n = n_block + row0 + j * Cfg::kRowsPerPass;
        const bool ok = n < p.k && b_kk < p.kdim;
        const T* src = ok ? weight + n * p.kdim + b_kk : weight;
        cp_async_16(Bs + (row0 + j * Cfg::kRowsPerPass) * kLds + chunk_col * kChunk, src, ok);
      }
      a_c += BK;
      while (a_c >= p.c) {
        a_c -= static_cast<int>(p.c);
        if (++a_s == p.r) {
          a_s = 0;
          ++a_r;
        }
      }
      b_kk += BK;
    } else {
      // Thread tid loads column tid % BK of rows tid / BK + i * (kThreads / BK).
      const int col = tid % BK;
      const int64_t kk = static_cast<int64_t>(kt) * BK + col;
      const bool k_ok = kk < p.kdim;
      const int64_t tap = k_ok ? kk / p.c : 0;
      const int64_t c = kk - tap * p.c;
      const int tap_r = static_cast<int>(tap / p.r), tap_s = static_cast<int>(tap % p.r);
      const T zero = Convert<T>::from_float(0.0f);
      for (int row = tid / BK; row < BM; row += Cfg::kThreads / BK) {
        const RowInfo info = decode_row<kPool>(p, m_block + row);
        const int ih = info.ih0 + tap_r, iw = info.iw0 + tap_s;
        const bool ok = k_ok && info.valid && inside(ih, p.h) && inside(iw, p.w);
        As[row * kLds + col] =
            ok ? x[info.image_offset + (static_cast<int64_t>(ih) * p.w + iw) * p.c + c] : zero;
      }
      for (int row = tid / BK; row < BN; row += Cfg::kThreads / BK) {
        const int64_t n = n_block + row;
        Bs[row * kLds + col] = (k_ok && n < p.k) ? weight[n * p.kdim + kk] : zero;
      }
    }
  };

  // ---- main loop: two stages; tile kt + 1 is in flight while tile kt is multiplied.
  typename Mma::FragC acc[Cfg::kFragsM][Cfg::kFragsN];
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  load_tile(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) load_tile((kt + 1) & 1, kt + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* As = stages + (kt & 1) * Cfg::kStageElems;
    const T* Bs = As + BM * kLds;
#pragma unroll
    for (int ks = 0; ks < BK; ks += Mma::kK) {
      typename Mma::FragB b[Cfg::kFragsN];
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) {
        wmma::load_matrix_sync(b[j], Bs + (warp_n * Cfg::kWarpN + j * 16) * kLds + ks, kLds);
        Mma::round_operands(b[j]);
      }
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i) {
        typename Mma::FragA a;
        wmma::load_matrix_sync(a, As + (warp_m * Cfg::kWarpM + i * 16) * kLds + ks, kLds);
        Mma::round_operands(a);
#pragma unroll
        for (int j = 0; j < Cfg::kFragsN; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue, one 16x16 fragment at a time through this warp's scratch.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * Cfg::kScratchLd;
  T* y = static_cast<T*>(p.y);
  const bool aligned8 = p.k % 8 == 0;
  if constexpr (kStats) {
    // z0: row 0 of the tile (always valid: no CTA starts past the last row) from the warps that
    // hold it, computed as the stores below compute z
    if (warp_m == 0) {
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j) {
        wmma::store_matrix_sync(scratch, acc[0][j], Cfg::kScratchLd, wmma::mem_row_major);
        __syncwarp();
        if (lane < 16) {
          const int n_local = warp_n * Cfg::kWarpN + j * 16 + lane;
          const int64_t n = n_block + n_local;
          stat_z0[n_local] =
              p.shift != nullptr && n < p.k ? scratch[lane] + p.shift[n] : scratch[lane];
        }
        __syncwarp();
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], Cfg::kScratchLd, wmma::mem_row_major);
      __syncwarp();
      const int64_t m0 = m_block + warp_m * Cfg::kWarpM + i * 16;
      const int n_local = warp_n * Cfg::kWarpN + j * 16;
      const int64_t n0 = n_block + n_local;
      if constexpr (kPool) {
        // Lane: window lane / 8 (rows 4w .. 4w + 3), channels 2 * (lane % 8) + {0, 1}.
        const int win = lane >> 3;
        const int col = (lane & 7) * 2;
        if (m0 + 4 * win < p.rows) {
          const int64_t pooled = (m0 >> 2) + win;
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            const int64_t n = n0 + col + t;
            if (n < p.k) {
              const float scale = p.scale[n], shift = p.shift[n];
              float best = fmaf(scratch[4 * win * Cfg::kScratchLd + col + t], scale, shift);
#pragma unroll
              for (int q = 1; q < 4; ++q) {
                const float v = scratch[(4 * win + q) * Cfg::kScratchLd + col + t];
                best = max_nan(best, fmaf(v, scale, shift));
              }
              // the max of the ReLUs, NaN kept (relu_nan commutes with max_nan)
              y[pooled * p.k + n] = Convert<T>::from_float(relu_nan(best));
            }
          }
        }
      } else {
        // Lane: row lane / 2, channels 8 * (lane % 2) .. + 7.
        const int row = lane >> 1;
        const int col0 = (lane & 1) * 8;
        const int64_t m = m0 + row;
        const bool row_ok = m < p.rows;
        const int64_t nc = n0 + col0;
        const int valid = nc >= p.k ? 0 : static_cast<int>(p.k - nc < 8 ? p.k - nc : 8);
        float v[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float acc_v = scratch[row * Cfg::kScratchLd + col0 + t];
          if (t >= valid) {
            v[t] = 0.0f;
          } else if constexpr (kStats) {
            v[t] = p.shift != nullptr ? acc_v + p.shift[nc + t] : acc_v;
          } else {
            v[t] = relu_nan(fmaf(acc_v, p.scale[nc + t], p.shift[nc + t]));
          }
        }
        if (row_ok) store_channels8(y + m * p.k + nc, v, valid, aligned8);
        if constexpr (kStats) {
          // Column sums of d = z - z0 over the fragment's 16 rows (lanes with the same lane % 2
          // share columns), added by lanes 0 and 1 to this warp row's sums.
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int col = n_local + col0 + t;
            float s = row_ok && t < valid ? v[t] - stat_z0[col] : 0.0f;
            float sq = s * s;
#pragma unroll
            for (int offset = 2; offset < 32; offset <<= 1) {
              s += __shfl_xor_sync(0xffffffffu, s, offset);
              sq += __shfl_xor_sync(0xffffffffu, sq, offset);
            }
            if (lane < 2) {
              stat_s1[warp_m][col] += s;
              stat_s2[warp_m][col] += sq;
            }
          }
        }
      }
      __syncwarp();
    }
  }
  if constexpr (kStats) {
    __syncthreads();
    for (int i = tid; i < BN; i += Cfg::kThreads) {
      const int64_t n = n_block + i;
      if (n < p.k) {
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int w = 0; w < kStatRows; ++w) {
          s1 += stat_s1[w][i];
          s2 += stat_s2[w][i];
        }
        const int64_t out = static_cast<int64_t>(blockIdx.x) * p.k + n;
        p.tile_shift[out] = stat_z0[i];
        p.tile_sum[out] = s1;
        p.tile_sumsq[out] = s2;
      }
    }
  }
}

template <typename T, typename Cfg>
cudaError_t launch_conv_tiles(const ConvParams& p, ConvMode mode, cudaStream_t stream) {
  const bool vec = p.c % Cfg::kChunk == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  // x: one CTA per BM GEMM rows (pixels, or 4 per pooled pixel); y: per BN output channels.
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, Cfg::BM)),
                  static_cast<unsigned>(ceil_div(p.k, Cfg::BN)));
  const dim3 block(Cfg::kThreads);
  VK_BOOL_SWITCH(vec, kVec, [&] {
    if (mode == ConvMode::kStats) {
      conv_bn_relu_kernel<T, Cfg, false, true, kVec><<<grid, block, 0, stream>>>(p);
    } else if (p.pool) {
      conv_bn_relu_kernel<T, Cfg, true, false, kVec><<<grid, block, 0, stream>>>(p);
    } else {
      conv_bn_relu_kernel<T, Cfg, false, false, kVec><<<grid, block, 0, stream>>>(p);
    }
  });
  return cudaGetLastError();
}

// 128 x 128 tiles, or 128 x 64 when k <= 64 (VGG's first block) so no half-empty column tiles.
template <typename T>
cudaError_t launch_conv_tensor_cores(const ConvParams& p, ConvMode mode, cudaStream_t stream) {
  if (p.k <= 64) {
    return launch_conv_tiles<T, TileConfig<T, kTensorCoreBM, 64, 4, 2>>(p, mode, stream);
  }
  return launch_conv_tiles<T, TileConfig<T, kTensorCoreBM, 128, 2, 4>>(p, mode, stream);
}

}  // namespace vgg_kernels::cuda
