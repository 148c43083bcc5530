// Hopper (sm_90a) inference kernel for 3x3 convolutions that reads each input pixel from L2 once
// per 64-channel block instead of once per tap.
//
// The implicit GEMM of conv_wgmma.cu copies a fresh A tile for every (tap, channel block) step,
// so every input pixel crosses from L2 to shared memory nine times per output tile: a 128 x BN
// tile reads (128 + BN) * 2 bytes per 2 * 128 * BN FLOPs, 0.0234 B/FLOP for BN = 64: 18.6 TB/s
// of L2 reads at the 796 TFLOP/s bf16 peak measured on an H200 (the benchmarks' peak.l2_read
// measures what L2 delivers). Here a CTA computes a 16 x 8 block of output
// positions (two warpgroups, eight output rows each) and copies the block's 18 x 10 input halo
// once per 64 channels; the nine taps are nine A descriptors into that one copy, shifted by
// whole pixels. Per 64-channel block a CTA reads 180 pixels of A instead of 9 x 128 (6.4x
// fewer) plus the same nine B tiles: 0.0103 B/FLOP for a 128 x 64 tile (2.3x less), 0.0090 for
// 128 x 128 (1.7x), 0.0084 for 128 x 256 (1.4x, where the weights dominate).
//
// Shifting a descriptor by one pixel needs a layout with no address-based swizzle: A lives in
// the unswizzled K-major layout, as eight planes (one per 16-byte chunk of 8 channels) of 16
// bytes per halo pixel. Eight consecutive pixels of a plane are one 8 x 16-byte core matrix,
// which is exactly a wgmma row group for eight output positions in a row; the next row group
// (the next output row) starts 10 pixels later, the second K column of a k16 step one plane
// later. B (the weights of one tap and channel block, BN x 64) keeps the 128-byte swizzled
// layout, in a ring of stages: step t = 9 * channel block + tap multiplies stage t % kStages
// while steps t + 1 .. t + kAhead are in flight. The halo has two buffers: channel block b + 1's
// halo is copied with the first tap of b + 1, during b's taps, into the buffer b - 1 used.
//
// The same halo feeds a second orientation (VGG_KERNELS_NATIVE_WGMMA=halo-t): the pixels as the
// N operand and 64 output channels as M, D (channels x pixels) = W x X^T, for a 16 x 16 block of
// output positions (each warpgroup an 8-column half: N = 16 rows x 8 = 128, the next row group
// 18 pixels on). With the pixels as M, a layer with 64 output channels runs wgmma.m64n64k16,
// whose two shared-memory operands (4 KB per 32 tensor-core cycles) take all of the SM's 128
// B/cycle of shared-memory bandwidth before the copies into it; m64n128k16 with 64 channels as M
// reads 6 KB per 64 cycles. Per 64-channel block a CTA reads 324 halo pixels and nine 64 x 64
// weight tiles for 256 x 64 outputs: 0.0061 B/FLOP. The accumulator holds a 2x2 window's four
// values in one thread (rows j, j + 1 of the N index, columns e = 0, 1), so the pool is three
// max_nan and one ReLU; a shuffle with the lane holding the neighbouring channel makes each store
// 4 bytes.
//
// Layers with C == 64 (one channel block) take a persistent, weight-resident form of the second
// orientation (conv_wgmma_halo_resident_kernel, below).
//
// Used for fp16/bf16 3x3 inference with C a multiple of 64 and K a multiple of 8 when
// VGG_KERNELS_NATIVE_WGMMA=halo or halo-t; other layers take conv_wgmma.cu's kernel.
#include "conv_bn_relu.cuh"
#include "wgmma.cuh"

namespace vgg_kernels::cuda {
namespace {

using namespace wgmma;

constexpr int kThreads = 256;   // two warpgroups
constexpr int kBK = 64;         // channels per block: one 128-byte row of a weight tile
constexpr int kChunks = kBK / 8;  // 16-byte chunks per pixel and block
constexpr int kTaps = 9;
constexpr int kRowsPerPass = kThreads / kChunks;  // 32 weight rows per copy pass

// Where a CTA's outputs and halo lie, per orientation. kPixelsN = false: pixels are the M
// operand, a 16 x 8 block, warpgroup g owns rows 8g .. 8g + 7 (8 row groups of 8 pixels);
// true: pixels are the N operand, a 16 x 16 block, warpgroup g owns columns 8g .. 8g + 7 (16 row
// groups). Plane pitch: halo pixels + 1, odd, so the 8 chunks of one pixel (8 threads' 16-byte
// stores, one store phase) land in 8 distinct 4-bank groups.
template <bool kPixelsN>
struct HaloShape {
  static constexpr int kTileH = 16, kTileW = kPixelsN ? 16 : 8;
  static constexpr int kHaloW = kTileW + 2;
  static constexpr int kPixels = (kTileH + 2) * kHaloW;  // 180 or 324
  static constexpr int kPlaneBytes = (kPixels + 1) * 16;   // leading byte offset of the operand
  static constexpr int kBytes = kChunks * kPlaneBytes;     // one buffer: 23168 or 41600
  static constexpr int kCopies = (kPixels * kChunks + kThreads - 1) / kThreads;  // per thread
  static constexpr int kGroupBytes = kHaloW * 16;  // stride byte offset: the next output row
  static constexpr int kGroups = kPixelsN ? 16 : 8;  // row groups of 8 pixels per warpgroup
  // first halo pixel of warpgroup wg's operand for tap (r, s)
  static __device__ __forceinline__ int first_pixel(int wg, int r, int s) {
    return kPixelsN ? r * kHaloW + 8 * wg + s : (8 * wg + r) * kHaloW + s;
  }
};

// Shared memory: a ring of weight tiles (BN rows x 64 channels, 128-byte swizzled), one per
// (channel block, tap) step, then two halo buffers.
template <int BN, bool kPixelsN>
struct HaloTile {
  static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma tiles of 64, 128 or 256 channels");
  static_assert(!kPixelsN || BN == 64, "with the pixels as N, 64 channels are M");
  using Shape = HaloShape<kPixelsN>;
  static constexpr int kBBytes = BN * kBK * 2;  // one weight stage, 1024-byte multiple
  static constexpr int kStages = BN == 256 ? 4 : 5;
  static constexpr int kAhead = kStages - 2;  // steps loaded ahead of the multiplied one
  // The halo buffer for block b + 1 is refilled at step 9 (b + 1) - kAhead, after the barrier
  // that follows every MMA up to step 9 (b + 1) - kAhead - 2; block b - 1's last MMA was step
  // 9 b - 1, so kAhead <= 8 keeps the refill behind it.
  static_assert(kAhead <= kTaps - 1, "a halo buffer is refilled only after its MMAs drained");
  // weight stages, two halo buffers, slack to align the stages to 1 KB: 86, 126 and 174 KB
  // (pixels as M, 64, 128 and 256 channels), 122 KB (pixels as N)
  static constexpr int kSmemBytes = kStages * kBBytes + 2 * Shape::kBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than a Hopper CTA can have");
  static constexpr int kN = kPixelsN ? 8 * Shape::kGroups : BN;  // the MMA's N
};

// Output tiles: kTileH x kTileW conv outputs of one image; with pool, over the 2 * out_h x
// 2 * out_w positions the pooled output needs (odd trailing rows and columns are not computed).
struct HaloGrid {
  int64_t tiles_h, tiles_w, num_n, ctas;
};

template <bool kPixelsN>
HaloGrid halo_grid(const ConvParams& p, int bn) {
  using Shape = HaloShape<kPixelsN>;
  const int64_t rows = p.pool ? 2 * p.out_h : p.h, cols = p.pool ? 2 * p.out_w : p.w;
  HaloGrid g;
  g.tiles_h = ceil_div(rows, Shape::kTileH);
  g.tiles_w = ceil_div(cols, Shape::kTileW);
  g.num_n = ceil_div(p.k, bn);
  g.ctas = p.n * g.tiles_h * g.tiles_w * g.num_n;
  return g;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Epilogue of the pixels-as-N orientation, on the accumulator registers (64 channels x 128
// pixels per warpgroup): element 4 j + 2 h + e is channel n_block + 16 warp + lane / 4 + 8 h,
// output row oh0 + j, column ow0 + 8 wg + 2 (lane % 4) + e. Lanes l and l ^ 4 hold channels c
// and c + 1 (c even) of the same two columns; one shuffle gives each a channel pair for one
// column, stored as 4 bytes.
template <typename T, bool kPool>
__device__ __forceinline__ void store_pixels_n(const float (&acc)[64], const ConvParams& p,
                                               int64_t image, int oh0, int ow0, int64_t n_block,
                                               int wg, int warp, int lane) {
  T* y = static_cast<T*>(p.y);
  const int ow = ow0 + 8 * wg + 2 * (lane % 4);  // + e
  const bool odd = (lane & 4) != 0;              // this lane's channel is the pair's second
  float scale[2], shift[2];
  bool n_ok[2];
  int64_t pair[2];  // the pair's first channel
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n_block + 16 * warp + lane / 4 + 8 * h;
    pair[h] = odd ? n - 1 : n;
    n_ok[h] = pair[h] < p.k;  // k % 8 == 0: both channels of the pair are in range or not
    scale[h] = n_ok[h] ? p.scale[n] : 0.0f;
    shift[h] = n_ok[h] ? p.shift[n] : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < 16; j += kPool ? 2 : 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const auto pre = [&](int row, int e) {  // before the ReLU
        return fmaf(acc[4 * row + 2 * h + e], scale[h], shift[h]);
      };
      if constexpr (kPool) {
        // the window: rows j, j + 1 (oh0 + j is even), columns e = 0, 1, all in this thread; the
        // ReLU of its max is the max of its ReLUs (NaN kept by both)
        const float m = relu_nan(max_nan(max_nan(pre(j, 0), pre(j, 1)),
                                         max_nan(pre(j + 1, 0), pre(j + 1, 1))));
        const float partner = __shfl_xor_sync(0xffffffffu, m, 4);
        const int ph = (oh0 + j) / 2, pw = ow / 2;
        if (!odd && n_ok[h] && ph < p.out_h && pw < p.out_w) {
          store_pair(y + ((image * p.out_h + ph) * p.out_w + pw) * p.k + pair[h], m, partner);
        }
      } else {
        // the even lane stores column e = 0, the odd lane column e = 1
        const float v0 = relu_nan(pre(j, 0)), v1 = relu_nan(pre(j, 1));
        const float partner = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
        const int e = odd ? 1 : 0;
        if (n_ok[h] && oh0 + j < p.h && ow + e < p.w) {
          store_pair(y + ((image * p.h + oh0 + j) * p.w + ow + e) * p.k + pair[h],
                     odd ? partner : v0, odd ? v1 : partner);
        }
      }
    }
  }
}
#endif

// The kernel's body exists in sm_90a compilations only (see conv_wgmma.cu).
template <typename T, int BN, bool kPixelsN, bool kPool>
__global__ void __launch_bounds__(kThreads, 1)
    conv_wgmma_halo_kernel(const ConvParams p, const int64_t tiles_h, const int64_t tiles_w) {
  using Tile = HaloTile<BN, kPixelsN>;
  using Shape = typename Tile::Shape;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBCopies = BN / kRowsPerPass;  // weight copies per thread and step
  constexpr int kAccumulators = Tile::kN / 2;  // fp32 registers: 64 x N over 128 threads
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (smem_base - raw_base);
  unsigned char* halo_smem = smem + Tile::kStages * Tile::kBBytes;
  const uint32_t halo_base = smem_base + Tile::kStages * Tile::kBBytes;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int warp = (tid % 128) / 32, lane = tid % 32;
  // CTAs of one output tile (all its channel tiles) are consecutive: its halo is read from L2.
  const int64_t num_n = (p.k + BN - 1) / BN;
  const int64_t tile = blockIdx.x / num_n;
  const int64_t n_block = static_cast<int64_t>(blockIdx.x % num_n) * BN;
  const int64_t image = tile / (tiles_h * tiles_w);
  const int64_t spatial = tile % (tiles_h * tiles_w);
  const int oh0 = static_cast<int>(spatial / tiles_w) * Shape::kTileH;
  const int ow0 = static_cast<int>(spatial % tiles_w) * Shape::kTileW;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int steps = kTaps * static_cast<int>(p.c / kBK);

  // ---- halo copies: thread tid copies chunks tid + 256 j (pixel = chunk / 8, plane = chunk % 8,
  // so 8 consecutive threads read one pixel's 128 contiguous bytes); the element offset of each
  // in x for channel block 0, or -1 outside the image (zero fill).
  int64_t halo_src[Shape::kCopies];
#pragma unroll
  for (int j = 0; j < Shape::kCopies; ++j) {
    const int index = tid + j * kThreads;
    const int pixel = index / kChunks, plane = index % kChunks;
    const int ih = oh0 - 1 + pixel / Shape::kHaloW, iw = ow0 - 1 + pixel % Shape::kHaloW;
    const bool ok = index < Shape::kPixels * kChunks && inside(ih, p.h) && inside(iw, p.w);
    halo_src[j] = ok ? ((image * p.h + ih) * p.w + iw) * p.c + plane * 8 : -1;
  }
  // ---- weight copies: chunk column tid % 8 of rows tid / 8 + 32 j
  const int chunk_col = tid % kChunks;
  const int row0 = tid / kChunks;

  auto load_step = [&](int t) {
    const int tap = t % kTaps, block = t / kTaps;
    if (tap == 0) {  // the block's halo, into buffer block % 2
      unsigned char* halo = halo_smem + (block & 1) * Shape::kBytes;
#pragma unroll
      for (int j = 0; j < Shape::kCopies; ++j) {
        const int index = tid + j * kThreads;
        if (index < Shape::kPixels * kChunks) {
          const int pixel = index / kChunks, plane = index % kChunks;
          const bool ok = halo_src[j] >= 0;
          cp_async_16(halo + plane * Shape::kPlaneBytes + pixel * 16,
                      ok ? x + halo_src[j] + static_cast<int64_t>(block) * kBK : x, ok);
        }
      }
    }
    unsigned char* w_tile = smem + (t % Tile::kStages) * Tile::kBBytes;
    const int64_t kk = static_cast<int64_t>(tap) * p.c + static_cast<int64_t>(block) * kBK +
                       chunk_col * 8;
#pragma unroll
    for (int j = 0; j < kBCopies; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const int64_t n = n_block + row;
      const bool ok = n < p.k;
      cp_async_16(w_tile + swizzled(row, chunk_col), ok ? weight + n * p.kdim + kk : weight, ok);
    }
  };

  float acc[kAccumulators];
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) acc[i] = 0.0f;

  // steps >= 9 (C >= 64)
  mma_pipeline<Tile::kAhead>(acc, steps, load_step, [&](int s) {
    const int tap = s % kTaps, block = s / kTaps;
    const uint32_t pixels = halo_base + (block & 1) * Shape::kBytes +
                            Shape::first_pixel(wg, tap / 3, tap % 3) * 16;
    const uint32_t weights = smem_base + (s % Tile::kStages) * Tile::kBBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {  // k16 step ks: planes 2 ks and 2 ks + 1
      const uint64_t pixel_desc = plain_descriptor(pixels + 2 * ks * Shape::kPlaneBytes,
                                                   Shape::kPlaneBytes, Shape::kGroupBytes);
      const uint64_t weight_desc = smem_descriptor(weights + 32 * ks);
      if constexpr (kPixelsN) {
        WgmmaOp<T, Tile::kN>::mma(acc, weight_desc, pixel_desc);
      } else {
        WgmmaOp<T, Tile::kN>::mma(acc, pixel_desc, weight_desc);
      }
    }
  });

  // ---- epilogue on the registers: accumulator element 4 j + 2 h + e is M row 16 warp + lane / 4
  // + 8 h of this warpgroup's 64 and N column 8 j + 2 (lane % 4) + e.
  if constexpr (kPixelsN) {
    store_pixels_n<T, kPool>(acc, p, image, oh0, ow0, n_block, wg, warp, lane);
  } else {
    // M: output row oh0 + 8 wg + 2 warp + h, column ow0 + lane / 4; N: channel
    // n_block + 8 j + 2 (lane % 4) + e
    T* y = static_cast<T*>(p.y);
    const int oh = oh0 + 8 * wg + 2 * warp;  // + h
    const int ow = ow0 + lane / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int64_t n = n_block + 8 * j + 2 * (lane % 4);
      const bool n_ok = n < p.k;  // k % 8 == 0: both channels of the pair are in range or not
      const float scale0 = n_ok ? p.scale[n] : 0.0f, scale1 = n_ok ? p.scale[n + 1] : 0.0f;
      const float shift0 = n_ok ? p.shift[n] : 0.0f, shift1 = n_ok ? p.shift[n + 1] : 0.0f;
      float v0[2], v1[2];  // before the ReLU
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        v0[h] = fmaf(acc[4 * j + 2 * h], scale0, shift0);
        v1[h] = fmaf(acc[4 * j + 2 * h + 1], scale1, shift1);
      }
      if constexpr (kPool) {
        // a window's rows are h = 0, 1 of one thread (oh is even), its columns lanes 4 i, 4 i + 4;
        // the ReLU of its max is the max of its ReLUs (NaN kept by both)
        float m0 = max_nan(v0[0], v0[1]), m1 = max_nan(v1[0], v1[1]);
        m0 = max_nan(m0, __shfl_xor_sync(0xffffffffu, m0, 4));
        m1 = max_nan(m1, __shfl_xor_sync(0xffffffffu, m1, 4));
        const int ph = oh / 2, pw = ow / 2;
        if ((lane & 4) == 0 && n_ok && ph < p.out_h && pw < p.out_w) {
          store_pair(y + ((image * p.out_h + ph) * p.out_w + pw) * p.k + n, relu_nan(m0),
                     relu_nan(m1));
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (n_ok && oh + h < p.h && ow < p.w) {
            store_pair(y + ((image * p.h + oh + h) * p.w + ow) * p.k + n, relu_nan(v0[h]),
                       relu_nan(v1[h]));
          }
        }
      }
    }
  }
#endif
}

// Layers with C == 64 have one channel block: nine steps per output tile, too few to hide a
// CTA's pipeline fill and epilogue when one CTA fills the SM. With the pixels as N they run on
// a persistent kernel instead: each CTA keeps the nine 64 x 64 weight tiles of its 64 output
// channels in shared memory (72 KB) and walks tiles t = blockIdx.x, + gridDim.x, ...; tile t + 1's
// halo is copied into the other halo buffer while tile t's 36 MMAs (9 taps x 4 k16 steps,
// issued back to back as one group) and epilogue run. Tiles are ordered channel block first,
// so a CTA reloads its weights only where its walk crosses into the next 64 channels.
struct ResidentTile {
  using Shape = HaloShape<true>;
  static constexpr int kWeightTileBytes = 64 * kBK * 2;              // one tap: 8 KB
  static constexpr int kWeightBytes = kTaps * kWeightTileBytes;      // 72 KB
  static constexpr int kSmemBytes = kWeightBytes + 2 * Shape::kBytes + 1024;  // 154 KB
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than a Hopper CTA can have");
};

template <typename T, bool kPool>
__global__ void __launch_bounds__(kThreads, 1)
    conv_wgmma_halo_resident_kernel(const ConvParams p, const int64_t tiles_h,
                                    const int64_t tiles_w) {
  using Shape = HaloShape<true>;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (smem_base - raw_base);
  unsigned char* halo_smem = smem + ResidentTile::kWeightBytes;
  const uint32_t halo_base = smem_base + ResidentTile::kWeightBytes;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int warp = (tid % 128) / 32, lane = tid % 32;
  const int64_t pixel_tiles = p.n * tiles_h * tiles_w;
  const int64_t num_tiles = pixel_tiles * ((p.k + 63) / 64);
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int chunk_col = tid % kChunks;
  const int row0 = tid / kChunks;

  // the 64 x 64 weight tile of every tap for output channels n_block .. + 63 (C == 64: the
  // tap's reduction slice is the whole 128-byte row)
  auto load_weights = [&](int64_t n_block) {
#pragma unroll
    for (int tap = 0; tap < kTaps; ++tap) {
#pragma unroll
      for (int j = 0; j < 64 / kRowsPerPass; ++j) {
        const int row = row0 + j * kRowsPerPass;
        const int64_t n = n_block + row;
        const bool ok = n < p.k;
        cp_async_16(smem + tap * ResidentTile::kWeightTileBytes + swizzled(row, chunk_col),
                    ok ? weight + n * p.kdim + tap * kBK + chunk_col * 8 : weight, ok);
      }
    }
  };
  // tile t's input halo into buffer `buffer` (zero outside the image)
  auto load_halo = [&](int64_t t, int buffer) {
    const int64_t pixel_tile = t % pixel_tiles;
    const int64_t image = pixel_tile / (tiles_h * tiles_w);
    const int64_t spatial = pixel_tile % (tiles_h * tiles_w);
    const int ih0 = static_cast<int>(spatial / tiles_w) * Shape::kTileH - 1;
    const int iw0 = static_cast<int>(spatial % tiles_w) * Shape::kTileW - 1;
    unsigned char* halo = halo_smem + buffer * Shape::kBytes;
#pragma unroll
    for (int j = 0; j < Shape::kCopies; ++j) {
      const int index = tid + j * kThreads;
      if (index < Shape::kPixels * kChunks) {
        const int pixel = index / kChunks, plane = index % kChunks;
        const int ih = ih0 + pixel / Shape::kHaloW, iw = iw0 + pixel % Shape::kHaloW;
        const bool ok = inside(ih, p.h) && inside(iw, p.w);
        cp_async_16(halo + plane * Shape::kPlaneBytes + pixel * 16,
                    ok ? x + ((image * p.h + ih) * p.w + iw) * kBK + plane * 8 : x, ok);
      }
    }
  };

  int64_t t = blockIdx.x;
  if (t >= num_tiles) return;
  load_weights(t / pixel_tiles * 64);
  load_halo(t, 0);
  cp_async_commit();
  float acc[64];
  for (int k = 0; t < num_tiles; ++k, t += gridDim.x) {
    const int buffer = k & 1;
    cp_async_wait<0>();  // this thread's copies of tile t's halo (and weights) landed
    fence_proxy_async();
    __syncthreads();  // everyone's copies; every warpgroup is done with tile t - 1
    const int64_t next = t + gridDim.x;
    const bool same_weights = next < num_tiles && next / pixel_tiles == t / pixel_tiles;
    if (same_weights) load_halo(next, buffer ^ 1);  // in flight during this tile
    cp_async_commit();

#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    wgmma_fence();
    fence_accumulators(acc);
    const uint32_t halo = halo_base + buffer * Shape::kBytes;
#pragma unroll
    for (int tap = 0; tap < kTaps; ++tap) {
      const uint32_t pixels = halo + Shape::first_pixel(wg, tap / 3, tap % 3) * 16;
      const uint32_t weights = smem_base + tap * ResidentTile::kWeightTileBytes;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        WgmmaOp<T, 128>::mma(acc, smem_descriptor(weights + 32 * ks),
                             plain_descriptor(pixels + 2 * ks * Shape::kPlaneBytes,
                                              Shape::kPlaneBytes, Shape::kGroupBytes));
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(acc);

    const int64_t pixel_tile = t % pixel_tiles;
    const int64_t spatial = pixel_tile % (tiles_h * tiles_w);
    store_pixels_n<T, kPool>(acc, p, pixel_tile / (tiles_h * tiles_w),
                             static_cast<int>(spatial / tiles_w) * Shape::kTileH,
                             static_cast<int>(spatial % tiles_w) * Shape::kTileW,
                             t / pixel_tiles * 64, wg, warp, lane);
    if (next < num_tiles && !same_weights) {  // the walk enters the next 64 output channels
      __syncthreads();  // every warpgroup's MMAs on the old weights are done
      load_weights(next / pixel_tiles * 64);
      load_halo(next, buffer ^ 1);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
#endif
}

template <typename T, bool kPool>
cudaError_t launch_halo_resident(const ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_wgmma_halo_resident_kernel<T, kPool>;
  constexpr int kSmem = ResidentTile::kSmemBytes;
  const HaloGrid grid = halo_grid<true>(p, 64);
  if (grid.ctas == 0) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (status == cudaSuccess) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  if (status != cudaSuccess) return status;
  const int64_t ctas = grid.ctas < sms ? grid.ctas : sms;  // one per SM (154 KB each)
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p, grid.tiles_h,
                                                                    grid.tiles_w);
  return cudaGetLastError();
}

template <typename T, int BN, bool kPixelsN, bool kPool>
cudaError_t launch_halo(const ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_wgmma_halo_kernel<T, BN, kPixelsN, kPool>;
  constexpr int kSmem = HaloTile<BN, kPixelsN>::kSmemBytes;
  const HaloGrid grid = halo_grid<kPixelsN>(p, BN);
  if (grid.ctas == 0) return cudaSuccess;
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(grid.ctas), kThreads, kSmem, stream>>>(p, grid.tiles_h,
                                                                         grid.tiles_w);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_halo_dtype(const ConvParams& p, bool pixels_n, int forced_tile,
                              cudaStream_t stream) {
  if (pixels_n && p.c == kBK) {
    return p.pool ? launch_halo_resident<T, true>(p, stream)
                  : launch_halo_resident<T, false>(p, stream);
  }
  if (pixels_n) {
    return p.pool ? launch_halo<T, 64, true, true>(p, stream)
                  : launch_halo<T, 64, true, false>(p, stream);
  }
  const HaloGrid tiles = halo_grid<false>(p, 1);
  switch (channel_tile(p.n * tiles.tiles_h * tiles.tiles_w, p.k, forced_tile)) {
    case 64:
      return p.pool ? launch_halo<T, 64, false, true>(p, stream)
                    : launch_halo<T, 64, false, false>(p, stream);
    case 256:
      return p.pool ? launch_halo<T, 256, false, true>(p, stream)
                    : launch_halo<T, 256, false, false>(p, stream);
    default:
      return p.pool ? launch_halo<T, 128, false, true>(p, stream)
                    : launch_halo<T, 128, false, false>(p, stream);
  }
}

}  // namespace

bool conv_wgmma_halo_supported(const ConvParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat32 || p.r != 3 || p.c % kBK != 0 || p.k % 8 != 0) return false;
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (address(p.x) % 16 != 0 || address(p.weight) % 16 != 0 || address(p.y) % 4 != 0) {
    return false;
  }
  // one grid dimension, for the most CTAs either orientation launches
  if (halo_grid<false>(p, 64).ctas >= (int64_t{1} << 31) ||
      halo_grid<true>(p, 64).ctas >= (int64_t{1} << 31)) {
    return false;
  }
  return wgmma_runs_here(stream);
}

cudaError_t launch_conv_wgmma_halo(const ConvParams& p, DType dtype, bool pixels_n,
                                   int channel_tile, cudaStream_t stream) {
  return dtype == DType::kBFloat16
             ? launch_halo_dtype<__nv_bfloat16>(p, pixels_n, channel_tile, stream)
             : launch_halo_dtype<__half>(p, pixels_n, channel_tile, stream);
}

}  // namespace vgg_kernels::cuda
