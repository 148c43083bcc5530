// Inference kernel for 3x3 convolutions with few input channels (the RGB first layer), fp16/bf16.
//
// Such a layer is bound by writing its output: VGG's conv1_1 reads 3 channels and writes 64 per
// pixel, 11 GFLOP against 411 MB at batch 64 (27 FLOP per byte). So the kernel spends nothing
// on the input side that the output's stores have to wait for:
//
// - A CTA computes 8 x 16 output pixels by 64 channels. It copies the 10 x 18 x C input halo of
//   its tile into shared memory once; the 3 * 3 * C reduction (C <= 7, at most 63 long) is
//   flattened into 16-long steps of mma.sync.m16n8k16 (two for C = 3: 27 padded to 32, instead
//   of nine taps padded to 16 channels each), whose A fragments each thread gathers straight from
//   the halo: reduction index k is tap k / C, channel k % C, at a fixed offset from the pixel.
// - The CTA's 64 channels of weights stay in shared memory, copied once from a copy padded to 64
//   per output channel (zeros past 9 * C, so the padded steps add nothing).
// - The grid is persistent: each CTA walks tiles p, p + P, ... and loads the next tile's halo
//   into registers while it computes and stores the current one.
// - The epilogue applies the BN scale and shift and ReLU to the fp32 accumulators (and the 2x2
//   max-pool: a window's rows are the same element of the two m16 tiles, its columns lanes 4
//   apart; NaN kept), stages the tile per warp in shared memory and writes whole 16-byte chunks
//   of 8 channels, 512 contiguous bytes per warp store when K = 64.
//
// Warp w owns tile rows 2w and 2w + 1 (one m16 tile each: the 16 pixels of the row are the MMA's
// rows) by all 64 channels (eight n8 tiles). C is a template parameter, so the halo copy and the
// gather offsets are unrolled for it. mma.sync runs on every GPU the extension builds for
// (compute capability 8.0 or newer).
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace vgg_kernels::cuda {
namespace {

constexpr int kTileH = 8, kTileW = 16;  // conv output pixels per tile
constexpr int kHaloH = kTileH + 2, kHaloW = kTileW + 2;
constexpr int kHaloPixels = kHaloH * kHaloW;  // 180
constexpr int kMaxChannels = kNarrowMaxChannels;  // 9 * 7 = 63: at most four 16-long steps
static_assert(9 * kMaxChannels <= kNarrowWeightPitch, "the padded weight row holds 9 * C");
constexpr int kWeightPitch = kNarrowWeightPitch;  // padded weight row (elements) per channel
constexpr int kThreads = 128;
constexpr int kBN = 64;          // output channels per CTA
constexpr int kPitch = kBN + 8;  // staging row in elements: 144 bytes, rows 4 banks apart
constexpr int kWeightRow = kWeightPitch + 8;  // weight row in shared memory: 144 bytes, likewise
constexpr int kHaloSlots = (kHaloPixels + kThreads - 1) / kThreads;  // halo pixels per thread

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two storage elements in one register, the first in the low half (the MMA operand order).
__device__ __forceinline__ uint32_t pack(unsigned short low, unsigned short high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float low, float high) {
  const T l = Convert<T>::from_float(low), h = Convert<T>::from_float(high);
  return pack(*reinterpret_cast<const unsigned short*>(&l),
              *reinterpret_cast<const unsigned short*>(&h));
}

struct Tile {
  int image;
  int oh0, ow0;  // first conv output row and column
  bool valid;
};

// Tile t of the walk (32-bit: the host launches at most 2**31 - 1 tiles): image-major, then tile
// rows, then tile columns.
__device__ __forceinline__ Tile decode_tile(int t, int tiles_h, int tiles_w, int num_tiles) {
  Tile tile{};
  tile.valid = t < num_tiles;
  const int spatial = t % (tiles_h * tiles_w);
  tile.image = t / (tiles_h * tiles_w);
  tile.oh0 = (spatial / tiles_w) * kTileH;
  tile.ow0 = (spatial % tiles_w) * kTileW;
  return tile;
}

// CTAs per SM the register budget is set for: four (at most 128 registers) where the
// reduction is at most two steps, three (170) for three steps, two for four (no spills then)
constexpr int min_blocks(int channels) { return channels <= 3 ? 4 : channels <= 5 ? 3 : 2; }

template <typename T, int kC, bool kPool>
__global__ void __launch_bounds__(kThreads, min_blocks(kC))
    conv_narrow_kernel(const ConvParams p, const int tiles_h, const int tiles_w) {
  constexpr int kSteps = (9 * kC + 15) / 16;  // 16-long reduction steps
  // output pixels a warp stores per tile: 2 rows of 16, or 1 pooled row of 8
  constexpr int kRows = kPool ? 1 : 2, kCols = kPool ? kTileW / 2 : kTileW;
  __shared__ __align__(16) unsigned short halo[kHaloPixels * kC];
  __shared__ __align__(16) unsigned short weights[kBN * kWeightRow];
  __shared__ float scale_s[kBN], shift_s[kBN];
  __shared__ __align__(16) T stage_all[kThreads / 32][32 * kPitch];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // MMA fragment row group and column pair
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * kBN;
  const int num_tiles = static_cast<int>(p.n) * tiles_h * tiles_w;
  const int64_t out_h = kPool ? p.out_h : p.h, out_w = kPool ? p.out_w : p.w;
  const unsigned short* x = static_cast<const unsigned short*>(p.x);
  T* y = static_cast<T*>(p.y);

  // this CTA's 64 channels of the padded weight, rows past k zero: 16-byte chunks
  const uint4* weight_chunks = static_cast<const uint4*>(p.weight);
  for (int i = tid; i < kBN * kSteps * 2; i += kThreads) {
    const int row = i / (kSteps * 2), chunk = i % (kSteps * 2);
    const int64_t n = n_block + row;
    *reinterpret_cast<uint4*>(weights + row * kWeightRow + 8 * chunk) =
        n < p.k ? __ldg(weight_chunks + n * (kWeightPitch / 8) + chunk) : make_uint4(0, 0, 0, 0);
  }
  if (tid < kBN) {
    const int64_t n = n_block + tid;
    scale_s[tid] = n < p.k ? p.scale[n] : 0.0f;
    shift_s[tid] = n < p.k ? p.shift[n] : 0.0f;
  }
  // A fragments: reduction index k = 16 ks + 2 t4 + e + 8 j (e, j in {0, 1}) is input pixel
  // (row + k / C / 3, column + k / C % 3) of the halo, channel k % C: an offset from the output
  // pixel's halo position; -1 past the 9 * C real ones (those read as zero)
  int koff[kSteps][4];
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = 16 * ks + 2 * t4 + (i & 1) + 8 * (i >> 1);
      const int tap = k / kC, channel = k % kC;
      koff[ks][i] = k < 9 * kC ? ((tap / 3) * kHaloW + tap % 3) * kC + channel : -1;
    }
  }

  // The halo pixels this thread copies, hp = tid + kThreads * s: row hp / kHaloW and column
  // hp % kHaloW of the halo, at element offset slot_offset[s] from the halo's corner in x.
  int slot_offset[kHaloSlots];
#pragma unroll
  for (int s = 0; s < kHaloSlots; ++s) {
    const int hp = tid + kThreads * s;
    slot_offset[s] = (hp / kHaloW * static_cast<int>(p.w) + hp % kHaloW) * kC;
  }
  unsigned short next[kHaloSlots][kC];
  const auto load_halo = [&](int t) {
    const Tile tile = decode_tile(t, tiles_h, tiles_w, num_tiles);
    // element index of halo pixel (0, 0): input row oh0 - 1, column ow0 - 1
    const int64_t corner =
        ((static_cast<int64_t>(tile.image) * p.h + tile.oh0 - 1) * p.w + tile.ow0 - 1) * kC;
#pragma unroll
    for (int s = 0; s < kHaloSlots; ++s) {
      const int hp = tid + kThreads * s;
      const int ih = tile.oh0 - 1 + hp / kHaloW, iw = tile.ow0 - 1 + hp % kHaloW;
      const bool ok = tile.valid && hp < kHaloPixels && ih >= 0 && ih < p.h && iw >= 0 &&
                      iw < p.w;
#pragma unroll
      for (int ch = 0; ch < kC; ++ch) {
        next[s][ch] = ok ? __ldg(x + (corner + slot_offset[s] + ch)) : static_cast<unsigned short>(0);
      }
    }
  };

  // where this lane stores: channel chunk lane % 8 of staged pixels lane / 8 + 4 j
  const int chunk = lane % 8, first = lane / 8;
  const bool chunk_ok = n_block + 8 * chunk < p.k;
  T* stage = stage_all[warp];
  int t = blockIdx.x;
  load_halo(t);
  for (; t < num_tiles; t += gridDim.x) {
    const Tile tile = decode_tile(t, tiles_h, tiles_w, num_tiles);
    __syncthreads();  // every warp is done with the previous tile's halo
#pragma unroll
    for (int s = 0; s < kHaloSlots; ++s) {
      const int hp = tid + kThreads * s;
      if (hp < kHaloPixels) {
#pragma unroll
        for (int ch = 0; ch < kC; ++ch) halo[hp * kC + ch] = next[s][ch];
      }
    }
    __syncthreads();
    load_halo(t + gridDim.x);  // in flight during this tile's MMAs and stores

    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        // rows g and g + 8 of the m16 tile: columns g and g + 8 of tile row 2 warp + mt
        const int row_base = (2 * warp + mt) * kHaloW + g;
        unsigned short v[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[r][i] = koff[ks][i] < 0 ? static_cast<unsigned short>(0)
                                      : halo[(row_base + 8 * r) * kC + koff[ks][i]];
          }
        }
        a[mt][0] = pack(v[0][0], v[0][1]);
        a[mt][1] = pack(v[1][0], v[1][1]);
        a[mt][2] = pack(v[0][2], v[0][3]);
        a[mt][3] = pack(v[1][2], v[1][3]);
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        // B fragment: k = 16 ks + 2 t4 + {0, 1} (and + 8) of channel n_block + 8 nt + g
        const unsigned short* w = weights + (8 * nt + g) * kWeightRow + 16 * ks + 2 * t4;
        const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(w),
                               *reinterpret_cast<const uint32_t*>(w + 8)};
        mma_16816<T>(acc[0][nt], a[0], b);
        mma_16816<T>(acc[1][nt], a[1], b);
      }
    }

    // epilogue: accumulator (row r of m16 tile mt, n8 tile nt) element i is pixel column
    // g + 8 (i / 2) of tile row 2 warp + mt, channel 8 nt + 2 t4 + i % 2; staged row = the
    // warp's output pixel (row-major: kRows x kCols)
    if constexpr (kPool) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int ch = 8 * nt + 2 * t4;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float m[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            // window rows: the same element of the two m16 tiles; columns: lanes 4 apart. The
            // ReLU of the window's max is the max of its ReLUs (NaN kept by both).
            const float top =
                scale_shift_unfused(acc[0][nt][2 * half + e], scale_s[ch + e], shift_s[ch + e]);
            const float bottom =
                scale_shift_unfused(acc[1][nt][2 * half + e], scale_s[ch + e], shift_s[ch + e]);
            m[e] = max_nan(top, bottom);
            m[e] = max_nan(m[e], __shfl_xor_sync(0xffffffffu, m[e], 4));
          }
          if ((g & 1) == 0) {
            const int pooled = (g + 8 * half) / 2;
            *reinterpret_cast<uint32_t*>(stage + pooled * kPitch + ch) =
                pack_floats<T>(relu_nan(m[0]), relu_nan(m[1]));
          }
        }
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int ch = 8 * nt + 2 * t4;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int pixel = mt * kTileW + g + 8 * half;
            *reinterpret_cast<uint32_t*>(stage + pixel * kPitch + ch) = pack_floats<T>(
                bn_relu_unfused(acc[mt][nt][2 * half], scale_s[ch], shift_s[ch]),
                bn_relu_unfused(acc[mt][nt][2 * half + 1], scale_s[ch + 1], shift_s[ch + 1]));
          }
        }
      }
    }
    __syncwarp();
    // whole 16-byte chunks of 8 channels, 4 pixels x 8 chunks per warp store
    const int row0 = kPool ? tile.oh0 / 2 + warp : tile.oh0 + 2 * warp;
    const int col0 = kPool ? tile.ow0 / 2 : tile.ow0;
    const int64_t out_base =
        ((static_cast<int64_t>(tile.image) * out_h + row0) * out_w + col0) * p.k + n_block;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int j = 0; j < kCols / 4; ++j) {
        const int col = first + 4 * j;
        if (chunk_ok && row0 + r < out_h && col0 + col < out_w) {
          *reinterpret_cast<uint4*>(y + out_base + (r * out_w + col) * p.k + 8 * chunk) =
              *reinterpret_cast<const uint4*>(stage + (r * kCols + col) * kPitch + 8 * chunk);
        }
      }
    }
    __syncwarp();  // the stage is rewritten by the next tile
  }
}

template <typename T, int kC>
cudaError_t launch_channels(const ConvParams& p, cudaStream_t stream) {
  // conv output rows and columns the output needs (with the pool: 2 * out_h, 2 * out_w)
  const int64_t rows = p.pool ? 2 * p.out_h : p.h, cols = p.pool ? 2 * p.out_w : p.w;
  const int64_t tiles_h = ceil_div(rows, kTileH), tiles_w = ceil_div(cols, kTileW);
  const int64_t num_tiles = p.n * tiles_h * tiles_w;  // below 2**31 (conv_narrow_supported)
  if (num_tiles == 0) return cudaSuccess;
  auto kernel = p.pool ? conv_narrow_kernel<T, kC, true> : conv_narrow_kernel<T, kC, false>;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  }
  if (status != cudaSuccess) return status;
  const int64_t channel_blocks = ceil_div(p.k, kBN);
  // persistent: as many CTAs as fit on the GPU at once, over every channel block
  const int64_t resident =
      std::max<int64_t>(1, static_cast<int64_t>(sms) * per_sm / channel_blocks);
  const dim3 grid(static_cast<unsigned>(std::min(num_tiles, resident)),
                  static_cast<unsigned>(channel_blocks));
  kernel<<<grid, kThreads, 0, stream>>>(p, static_cast<int>(tiles_h), static_cast<int>(tiles_w));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const ConvParams& p, cudaStream_t stream) {
  switch (p.c) {
    case 1:
      return launch_channels<T, 1>(p, stream);
    case 2:
      return launch_channels<T, 2>(p, stream);
    case 3:
      return launch_channels<T, 3>(p, stream);
    case 4:
      return launch_channels<T, 4>(p, stream);
    case 5:
      return launch_channels<T, 5>(p, stream);
    case 6:
      return launch_channels<T, 6>(p, stream);
    default:
      return launch_channels<T, 7>(p, stream);
  }
}

}  // namespace

bool conv_narrow_supported(const ConvParams& p, DType dtype) {
  if (dtype == DType::kFloat32 || p.r != 3 || p.c < 1 || p.c > kMaxChannels || p.k % 8 != 0) {
    return false;
  }
  // the tile walk counts in 32 bits, and so do the input offsets inside a halo
  const int64_t tiles = p.n * ceil_div(p.h, kTileH) * ceil_div(p.w, kTileW);
  if (tiles >= (int64_t{1} << 31) || p.w * kHaloH * p.c >= (int64_t{1} << 31)) return false;
  // (p.weight is the caller's padded copy, 16-byte aligned by contract)
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  return address(p.y) % 16 == 0 && address(p.x) % 2 == 0;
}

cudaError_t launch_conv_narrow(const ConvParams& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, stream)
                                   : launch_dtype<__half>(p, stream);
}

}  // namespace vgg_kernels::cuda
