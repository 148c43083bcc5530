// Hopper (sm_90a) inference kernel for 3x3 convolutions that reads each input pixel from L2 once
// per 64-channel block instead of once per tap.
//
// The implicit GEMM of conv_wgmma.cu copies a fresh A tile for every (tap, channel block) step,
// so every input pixel crosses from L2 to shared memory nine times per output tile: a 128 x BN
// tile reads (128 + BN) * 2 bytes per 2 * 128 * BN FLOPs, 0.0234 B/FLOP for BN = 64, which is
// more than L2 can feed at the tensor cores' rate. Here a CTA computes a 16 x 8 block of output
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
// Used for fp16/bf16 3x3 inference with C a multiple of 64 and K a multiple of 8 when
// VGG_KERNELS_NATIVE_WGMMA=halo; other layers take conv_wgmma.cu's kernel.
#include "conv_bn_relu.cuh"
#include "wgmma.cuh"

namespace vgg_kernels::cuda {
namespace {

using namespace wgmma;

constexpr int kThreads = 256;            // two warpgroups
constexpr int kTileH = 16, kTileW = 8;   // output positions per CTA; warpgroup g: rows 8g .. 8g + 7
constexpr int kHaloW = kTileW + 2;       // 10
constexpr int kHaloPixels = (kTileH + 2) * kHaloW;  // 180
constexpr int kBK = 64;                  // channels per block: one 128-byte row of B
constexpr int kChunks = kBK / 8;         // 16-byte chunks per pixel and block
constexpr int kTaps = 9;
// Plane pitch in pixels: odd, so the 8 chunks of one pixel (8 threads' 16-byte stores, one
// store phase) land in 8 distinct 4-bank groups: plane c starts at bank 4 * (181 * c mod 8).
constexpr int kPlanePixels = kHaloPixels + 1;
constexpr int kPlaneBytes = kPlanePixels * 16;   // 2896: leading byte offset of A
constexpr int kHaloBytes = kChunks * kPlaneBytes;  // 23168 per buffer
constexpr int kHaloCopies = (kHaloPixels * kChunks + kThreads - 1) / kThreads;  // 6 per thread
constexpr int kRowGroupBytes = kHaloW * 16;      // 160: stride byte offset of A (next output row)
constexpr int kRowsPerPass = kThreads / kChunks;  // 32 rows of B per copy pass

template <int BN>
struct HaloTile {
  static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma tiles of 64, 128 or 256 channels");
  static constexpr int kBBytes = BN * kBK * 2;  // one B stage, 1024-byte multiple
  static constexpr int kStages = BN == 256 ? 4 : 5;
  static constexpr int kAhead = kStages - 2;  // steps loaded ahead of the multiplied one
  // The halo buffer for block b + 1 is refilled at step 9 (b + 1) - kAhead, after the barrier
  // that follows every MMA up to step 9 (b + 1) - kAhead - 2; block b - 1's last MMA was step
  // 9 b - 1, so kAhead <= 8 keeps the refill behind it.
  static_assert(kAhead <= kTaps - 1, "a halo buffer is refilled only after its MMAs drained");
  // B stages, two halo buffers, slack to align the B stages to 1 KB: 86, 126 and 174 KB
  static constexpr int kSmemBytes = kStages * kBBytes + 2 * kHaloBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than a Hopper CTA can have");
};

// Output tiles: kTileH x kTileW conv outputs of one image; with pool, over the 2 * out_h x
// 2 * out_w positions the pooled output needs (odd trailing rows and columns are not computed).
struct HaloGrid {
  int64_t tiles_h, tiles_w, num_n, ctas;
};

HaloGrid halo_grid(const ConvParams& p, int bn) {
  const int64_t rows = p.pool ? 2 * p.out_h : p.h, cols = p.pool ? 2 * p.out_w : p.w;
  HaloGrid g;
  g.tiles_h = ceil_div(rows, kTileH);
  g.tiles_w = ceil_div(cols, kTileW);
  g.num_n = ceil_div(p.k, bn);
  g.ctas = p.n * g.tiles_h * g.tiles_w * g.num_n;
  return g;
}

// The kernel's body exists in sm_90a compilations only (see conv_wgmma.cu).
template <typename T, int BN, bool kPool>
__global__ void __launch_bounds__(kThreads, 1)
    conv_wgmma_halo_kernel(const ConvParams p, const int64_t tiles_h, const int64_t tiles_w) {
  using Tile = HaloTile<BN>;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBCopies = BN / kRowsPerPass;  // B copies per thread and step
  constexpr int kAccumulators = BN / 2;        // fp32 registers: 64 x BN over 128 threads
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
  const int oh0 = static_cast<int>(spatial / tiles_w) * kTileH;
  const int ow0 = static_cast<int>(spatial % tiles_w) * kTileW;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int steps = kTaps * static_cast<int>(p.c / kBK);

  // ---- halo copies: thread tid copies chunks tid + 256 j (pixel = chunk / 8, plane = chunk % 8,
  // so 8 consecutive threads read one pixel's 128 contiguous bytes); the element offset of each
  // in x for channel block 0, or -1 outside the image (zero fill).
  int64_t halo_src[kHaloCopies];
#pragma unroll
  for (int j = 0; j < kHaloCopies; ++j) {
    const int index = tid + j * kThreads;
    const int pixel = index / kChunks, plane = index % kChunks;
    const int ih = oh0 - 1 + pixel / kHaloW, iw = ow0 - 1 + pixel % kHaloW;
    const bool ok = index < kHaloPixels * kChunks && inside(ih, p.h) && inside(iw, p.w);
    halo_src[j] = ok ? ((image * p.h + ih) * p.w + iw) * p.c + plane * 8 : -1;
  }
  // ---- B copies: chunk column tid % 8 of rows tid / 8 + 32 j
  const int chunk_col = tid % kChunks;
  const int row0 = tid / kChunks;

  auto load_step = [&](int t) {
    const int tap = t % kTaps, block = t / kTaps;
    if (tap == 0) {  // the block's halo, into buffer block % 2
      unsigned char* halo = halo_smem + (block & 1) * kHaloBytes;
#pragma unroll
      for (int j = 0; j < kHaloCopies; ++j) {
        const int index = tid + j * kThreads;
        if (index < kHaloPixels * kChunks) {
          const int pixel = index / kChunks, plane = index % kChunks;
          const bool ok = halo_src[j] >= 0;
          cp_async_16(halo + plane * kPlaneBytes + pixel * 16,
                      ok ? x + halo_src[j] + static_cast<int64_t>(block) * kBK : x, ok);
        }
      }
    }
    unsigned char* b_tile = smem + (t % Tile::kStages) * Tile::kBBytes;
    const int64_t kk = static_cast<int64_t>(tap) * p.c + static_cast<int64_t>(block) * kBK +
                       chunk_col * 8;
#pragma unroll
    for (int j = 0; j < kBCopies; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const int64_t n = n_block + row;
      const bool ok = n < p.k;
      cp_async_16(b_tile + swizzled(row, chunk_col), ok ? weight + n * p.kdim + kk : weight, ok);
    }
  };

  float acc[kAccumulators];
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int t = 0; t < Tile::kAhead; ++t) {
    if (t < steps) load_step(t);
    cp_async_commit();  // one group per step, empty past the end, so the counts stay uniform
  }
  // steps >= 9 (C >= 64), so a do-while: a loop that may run zero times leaves a path that
  // zeroes the accumulators again before the final wait, and ptxas then serializes every MMA
  // (C7515)
  int s = 0;
  do {
    cp_async_wait<Tile::kAhead - 1>();  // this thread's copies for step s (and its halo) landed
    fence_proxy_async();
    __syncthreads();  // everyone's copies of step s; everyone's MMAs of step s - 2 are done
    const int tap = s % kTaps, block = s / kTaps;
    // first A row of this warpgroup for the tap: halo pixel (8 wg + tap / 3, tap % 3)
    const uint32_t a_addr = halo_base + (block & 1) * kHaloBytes +
                            ((wg * 8 + tap / 3) * kHaloW + tap % 3) * 16;
    const uint32_t b_addr = smem_base + (s % Tile::kStages) * Tile::kBBytes;
    wgmma_fence();
    fence_accumulators(acc);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {  // k16 step ks: planes 2 ks and 2 ks + 1
      WgmmaOp<T, BN>::mma(acc,
                          plain_descriptor(a_addr + 2 * ks * kPlaneBytes, kPlaneBytes,
                                           kRowGroupBytes),
                          smem_descriptor(b_addr + 32 * ks));
    }
    wgmma_commit();
    if (s + Tile::kAhead < steps) load_step(s + Tile::kAhead);
    cp_async_commit();
    wgmma_wait<1>();
    fence_accumulators(acc);
  } while (++s < steps);
  wgmma_wait<0>();
  fence_accumulators(acc);
  cp_async_wait<0>();

  // ---- epilogue on the registers: accumulator element 4 j + 2 h + e is row 16 warp + lane / 4
  // + 8 h of this warpgroup's 64, i.e. output row oh0 + 8 wg + 2 warp + h, column
  // ow0 + lane / 4; channel 8 j + 2 (lane % 4) + e.
  T* y = static_cast<T*>(p.y);
  const int oh = oh0 + 8 * wg + 2 * warp;  // + h
  const int ow = ow0 + lane / 4;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int64_t n = n_block + 8 * j + 2 * (lane % 4);
    const bool n_ok = n < p.k;  // k % 8 == 0: both channels of the pair are in range or not
    const float scale0 = n_ok ? p.scale[n] : 0.0f, scale1 = n_ok ? p.scale[n + 1] : 0.0f;
    const float shift0 = n_ok ? p.shift[n] : 0.0f, shift1 = n_ok ? p.shift[n + 1] : 0.0f;
    float v0[2], v1[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      v0[h] = fmaxf(fmaf(acc[4 * j + 2 * h], scale0, shift0), 0.0f);
      v1[h] = fmaxf(fmaf(acc[4 * j + 2 * h + 1], scale1, shift1), 0.0f);
    }
    if constexpr (kPool) {
      // a window's rows are h = 0, 1 of one thread (oh is even), its columns lanes 4 i and 4 i + 4
      float m0 = fmaxf(v0[0], v0[1]), m1 = fmaxf(v1[0], v1[1]);
      m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 4));
      m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 4));
      const int ph = oh / 2, pw = ow / 2;
      if ((lane & 4) == 0 && n_ok && ph < p.out_h && pw < p.out_w) {
        store_pair(y + ((image * p.out_h + ph) * p.out_w + pw) * p.k + n, m0, m1);
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (n_ok && oh + h < p.h && ow < p.w) {
          store_pair(y + ((image * p.h + oh + h) * p.w + ow) * p.k + n, v0[h], v1[h]);
        }
      }
    }
  }
#endif
}

template <typename T, int BN, bool kPool>
cudaError_t launch_halo(const ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_wgmma_halo_kernel<T, BN, kPool>;
  constexpr int kSmem = HaloTile<BN>::kSmemBytes;
  const HaloGrid grid = halo_grid(p, BN);
  if (grid.ctas == 0) return cudaSuccess;
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(grid.ctas), kThreads, kSmem, stream>>>(p, grid.tiles_h,
                                                                         grid.tiles_w);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_halo_dtype(const ConvParams& p, int forced_tile, cudaStream_t stream) {
  const HaloGrid tiles = halo_grid(p, 1);
  switch (channel_tile(p.n * tiles.tiles_h * tiles.tiles_w, p.k, forced_tile)) {
    case 64:
      return p.pool ? launch_halo<T, 64, true>(p, stream) : launch_halo<T, 64, false>(p, stream);
    case 256:
      return p.pool ? launch_halo<T, 256, true>(p, stream) : launch_halo<T, 256, false>(p, stream);
    default:
      return p.pool ? launch_halo<T, 128, true>(p, stream) : launch_halo<T, 128, false>(p, stream);
  }
}

}  // namespace

bool conv_wgmma_halo_supported(const ConvParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat32 || p.r != 3 || p.c % kBK != 0 || p.k % 8 != 0) return false;
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (address(p.x) % 16 != 0 || address(p.weight) % 16 != 0 || address(p.y) % 4 != 0) {
    return false;
  }
  if (halo_grid(p, 64).ctas >= (int64_t{1} << 31)) return false;  // one grid dimension
  return wgmma_runs_here(stream);
}

cudaError_t launch_conv_wgmma_halo(const ConvParams& p, DType dtype, int channel_tile,
                                   cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? launch_halo_dtype<__nv_bfloat16>(p, channel_tile, stream)
                                   : launch_halo_dtype<__half>(p, channel_tile, stream);
}

}  // namespace vgg_kernels::cuda
