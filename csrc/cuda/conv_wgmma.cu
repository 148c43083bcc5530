// Hopper (sm_90a) inference kernel: the implicit GEMM of conv_bn_relu.cuh on warpgroup MMA.
//
// CTA tile 128 GEMM rows (pixels, or 4 per pooled pixel) x 128 output channels (64 when the
// layer has at most 64, 256 for wide layers with enough CTAs; see channel_tile), reduction step
// 64 elements = one 128-byte row per tile row. Two warpgroups each own 64 rows and issue
// wgmma.m64n{64,128,256}k16 with both operands read from shared memory through matrix
// descriptors; the
// tiles are stored in the 128-byte swizzled layout those descriptors name (16-byte chunk j of
// row r at chunk j ^ (r % 8)), filled by 16-byte cp.async copies that zero-fill the padding.
// Five stages (four for 256 channels): tile kt + 3 (kt + 2) is in flight while tile kt is
// multiplied and tile kt - 1's MMAs drain. The epilogue works on the accumulator registers directly: BN scale/shift, ReLU, and
// the 2x2 max-pool as a shuffle across the four lanes that hold a window's rows.
//
// Used for fp16/bf16 inference when C and K are multiples of 8 on an sm_90a build; everything
// else takes the WMMA kernel.
#include "conv_bn_relu.cuh"

namespace vgg_kernels::cuda {
namespace {

constexpr int kBM = 128, kBK = 64;  // the channel tile BN (64, 128 or 256) is a template parameter
constexpr int kThreads = 256;       // two warpgroups
constexpr int kRowBytes = kBK * 2;                      // 128: one swizzle row
[[maybe_unused]] constexpr int kTileBytes = kBM * kRowBytes;  // A (pixels); B follows
constexpr int kChunksPerRow = kRowBytes / 16;  // 8
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 32
[[maybe_unused]] constexpr int kRowChunks = kBM / kRowsPerPass;  // A copies per thread

// Pipeline depth per channel tile: five stages (48-160 KB); four for 256 channels (192 KB).
template <int BN>
struct ChannelTile {
  static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma tiles of 64, 128 or 256 channels");
  static constexpr int kStageBytes = (kBM + BN) * kRowBytes;
  static constexpr int kStages = BN == 256 ? 4 : 5;
  static constexpr int kAhead = kStages - 2;  // tiles loaded ahead of the multiplied one
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align to 1 KB
};

// The device code below exists in sm_90a compilations only (wgmma is arch-specific); other
// targets get an empty kernel that the host never launches (see wgmma_runs_here).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// D (64 x N fp32, N / 2 registers per thread) += A (64 x 16, K-major) * B (16 x N, K-major).
#define VK_WGMMA_M64N128K16(TYPE)                                                                  \
  __device__ __forceinline__ static void mma(float (&d)[64], uint64_t desc_a,                      \
                                           uint64_t desc_b) {                                      \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                          \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                   \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "         \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "         \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "        \
        "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                            \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),      \
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),               \
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),            \
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),            \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),            \
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),            \
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),            \
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),            \
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),            \
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),            \
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                    \
        : "l"(desc_a), "l"(desc_b), "r"(1));                                                       \
  }

#define VK_WGMMA_M64N256K16(TYPE)                                                                  \
  __device__ __forceinline__ static void mma(float (&d)[128], uint64_t desc_a,                     \
                                           uint64_t desc_b) {                                      \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                              \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {"                          \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                                       \
        "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "                             \
        "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                             \
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                             \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "                             \
        "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "                             \
        "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, "                             \
        "%84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                             \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "                     \
        "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, "                 \
        "%120, %121, %122, %123, %124, %125, %126, %127"                                           \
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                                       \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),      \
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),               \
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),            \
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),            \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),            \
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),            \
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),            \
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),            \
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),            \
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),            \
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]),            \
          "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),            \
          "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]),            \
          "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),            \
          "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),            \
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),            \
          "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),         \
          "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]),      \
          "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]),      \
          "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),      \
          "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),      \
          "+f"(d[127])                                                                             \
        : "l"(desc_a), "l"(desc_b), "r"(1));                                                       \
  }

#define VK_WGMMA_M64N64K16(TYPE)                                                                   \
  __device__ __forceinline__ static void mma(float (&d)[32], uint64_t desc_a,                      \
                                           uint64_t desc_b) {                                      \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {"                           \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                   \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "        \
        "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                            \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),      \
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),               \
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),            \
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),            \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),            \
          "+f"(d[31])                                                                              \
        : "l"(desc_a), "l"(desc_b), "r"(1));                                                       \
  }

template <typename T, int BN>
struct WgmmaOp;

template <>
struct WgmmaOp<__nv_bfloat16, 256> {
  VK_WGMMA_M64N256K16("bf16")
};
template <>
struct WgmmaOp<__half, 256> {
  VK_WGMMA_M64N256K16("f16")
};
template <>
struct WgmmaOp<__nv_bfloat16, 128> {
  VK_WGMMA_M64N128K16("bf16")
};
template <>
struct WgmmaOp<__half, 128> {
  VK_WGMMA_M64N128K16("f16")
};
template <>
struct WgmmaOp<__nv_bfloat16, 64> {
  VK_WGMMA_M64N64K16("bf16")
};
template <>
struct WgmmaOp<__half, 64> {
  VK_WGMMA_M64N64K16("f16")
};

#undef VK_WGMMA_M64N256K16
#undef VK_WGMMA_M64N128K16
#undef VK_WGMMA_M64N64K16

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma fence or wait.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major tile in the 128-byte swizzled layout: 8-row groups 1024 bytes
// apart (stride byte offset), leading byte offset unused by this layout (encoded as 1).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Two adjacent channels as one 4-byte store (dst is 4-byte aligned: k and n are even).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float v0, float v1) {
  union {
    T half[2];
    uint32_t word;
  } pair;
  pair.half[0] = Convert<T>::from_float(v0);
  pair.half[1] = Convert<T>::from_float(v1);
  *reinterpret_cast<uint32_t*>(dst) = pair.word;
}

__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int BN, bool kPool>
__global__ void __launch_bounds__(kThreads, 1) conv_wgmma_kernel(const ConvParams p) {
  using Tile = ChannelTile<BN>;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBChunks = BN / kRowsPerPass;  // B copies per thread
  constexpr int kAccumulators = BN / 2;        // fp32 registers: 64 x BN over 128 threads
  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (smem_base - static_cast<uint32_t>(
                                                    __cvta_generic_to_shared(smem_raw)));

  const int tid = threadIdx.x;
  const int wg = tid / 128;  // warpgroup: rows 64 * wg .. + 63 of the tile
  const int warp = (tid % 128) / 32, lane = tid % 32;
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * BN;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int ktiles = static_cast<int>((p.kdim + kBK - 1) / kBK);

  // ---- loader: thread tid copies chunk column tid % 8 of rows tid / 8 + 32 j of A and B.
  const int chunk_col = tid % kChunksPerRow;
  const int row0 = tid / kChunksPerRow;
  RowInfo a_rows[kRowChunks];
#pragma unroll
  for (int j = 0; j < kRowChunks; ++j) {
    a_rows[j] = decode_row<kPool>(p, m_block + row0 + j * kRowsPerPass);
  }
  constexpr int kChunk = 8;  // elements per 16-byte copy
  int a_c = chunk_col * kChunk, a_s = 0, a_r = 0;  // channel, tap column, tap row of the chunk
  while (a_c >= p.c) {
    a_c -= static_cast<int>(p.c);
    if (++a_s == p.r) {
      a_s = 0;
      ++a_r;
    }
  }
  int64_t b_kk = chunk_col * kChunk;

  auto load_tile = [&](int stage) {
    unsigned char* a_tile = smem + stage * Tile::kStageBytes;
    unsigned char* b_tile = a_tile + kTileBytes;
    const bool k_ok = a_r < p.r;
#pragma unroll
    for (int j = 0; j < kRowChunks; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const RowInfo& info = a_rows[j];
      const int ih = info.ih0 + a_r, iw = info.iw0 + a_s;
      const bool ok = k_ok && info.valid && inside(ih, p.h) && inside(iw, p.w);
      const T* src =
          ok ? x + info.image_offset + (static_cast<int64_t>(ih) * p.w + iw) * p.c + a_c : x;
      cp_async_16(a_tile + swizzled(row, chunk_col), src, ok);
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const int64_t n = n_block + row;
      const bool ok = n < p.k && b_kk < p.kdim;
      const T* src = ok ? weight + n * p.kdim + b_kk : weight;
      cp_async_16(b_tile + swizzled(row, chunk_col), src, ok);
    }
    a_c += kBK;
    while (a_c >= p.c) {
      a_c -= static_cast<int>(p.c);
      if (++a_s == p.r) {
        a_s = 0;
        ++a_r;
      }
    }
    b_kk += kBK;
  };

  float acc[kAccumulators];
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int t = 0; t < Tile::kAhead; ++t) {
    if (t < ktiles) load_tile(t);
    cp_async_commit();  // one group per tile, empty past the end, so the counts stay uniform
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Tile::kAhead - 1>();  // this thread's copies of tile kt have landed
    fence_proxy_async();
    __syncthreads();  // everyone's copies of tile kt; everyone's MMAs of tile kt - 2 are done
    const int stage = kt % Tile::kStages;
    const uint32_t a_addr = smem_base + stage * Tile::kStageBytes + wg * 64 * kRowBytes;
    const uint32_t b_addr = smem_base + stage * Tile::kStageBytes + kTileBytes;
    wgmma_fence();
    fence_accumulators(acc);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {  // 16 elements = 32 bytes along the swizzled row
      WgmmaOp<T, BN>::mma(acc, smem_descriptor(a_addr + 32 * ks),
                          smem_descriptor(b_addr + 32 * ks));
    }
    wgmma_commit();
    // Stage (kt + kAhead) % kStages held tile kt - 2, whose MMAs every warpgroup finished
    // before the barrier above (each waited for all but its newest group last iteration).
    if (kt + Tile::kAhead < ktiles) load_tile((kt + Tile::kAhead) % Tile::kStages);
    cp_async_commit();
    wgmma_wait<1>();
    fence_accumulators(acc);
  }
  wgmma_wait<0>();
  fence_accumulators(acc);
  cp_async_wait<0>();

  // ---- epilogue on the registers: accumulator element 4 j + 2 h + e is row
  // 16 warp + lane / 4 + 8 h of this warpgroup's 64, channel 8 j + 2 (lane % 4) + e.
  T* y = static_cast<T*>(p.y);
  const int64_t m_warp = m_block + wg * 64 + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int64_t n = n_block + 8 * j + 2 * (lane % 4);
    const bool n_ok = n < p.k;  // k % 8 == 0: both channels of the pair are in range or not
    const float scale0 = n_ok ? p.scale[n] : 0.0f, scale1 = n_ok ? p.scale[n + 1] : 0.0f;
    const float shift0 = n_ok ? p.shift[n] : 0.0f, shift1 = n_ok ? p.shift[n + 1] : 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m_warp + 8 * h;
      float v0 = fmaxf(fmaf(acc[4 * j + 2 * h], scale0, shift0), 0.0f);
      float v1 = fmaxf(fmaf(acc[4 * j + 2 * h + 1], scale1, shift1), 0.0f);
      if constexpr (kPool) {
        // rows 4 q .. 4 q + 3 (one window) sit in lanes 16 (lane / 16) + 4 i + lane % 4
        v0 = fmaxf(v0, __shfl_xor_sync(0xffffffffu, v0, 4));
        v1 = fmaxf(v1, __shfl_xor_sync(0xffffffffu, v1, 4));
        v0 = fmaxf(v0, __shfl_xor_sync(0xffffffffu, v0, 8));
        v1 = fmaxf(v1, __shfl_xor_sync(0xffffffffu, v1, 8));
        if ((lane & 12) == 0 && n_ok && m < p.rows) store_pair(y + (m >> 2) * p.k + n, v0, v1);
      } else if (n_ok && m < p.rows) {
        store_pair(y + m * p.k + n, v0, v1);
      }
    }
  }
#endif
}

__global__ void wgmma_probe_kernel(int* built_for_sm90a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *built_for_sm90a = 1;
#else
  *built_for_sm90a = 0;
#endif
}

}  // namespace

// Whether the current device runs this build's sm_90a code: a compute capability 9.0 device and
// a build with 9.0a among its targets, which a one-off probe kernel tells apart from a plain 9.0
// build (cached per device; not probed while the stream is being captured into a graph).
bool wgmma_runs_here(cudaStream_t stream) {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
        capture != cudaStreamCaptureStatusNone) {
      return false;
    }
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    int answer = 0;
    if (major == 9 && minor == 0) {
      int* flag = nullptr;
      if (cudaMalloc(&flag, sizeof(int)) == cudaSuccess) {
        wgmma_probe_kernel<<<1, 1, 0, stream>>>(flag);
        const bool read = cudaMemcpyAsync(&answer, flag, sizeof(int), cudaMemcpyDeviceToHost,
                                          stream) == cudaSuccess &&
                          cudaStreamSynchronize(stream) == cudaSuccess;
        if (!read) answer = 0;
        cudaFree(flag);
      }
      cudaGetLastError();  // a build without sm_90 code fails the probe launch: not an error
    }
    cached[device] = answer == 1 ? 1 : 2;
  }
  return cached[device] == 1;
}

namespace {

template <typename T, int BN, bool kPool>
cudaError_t launch_wgmma(const ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_wgmma_kernel<T, BN, kPool>;
  constexpr int kSmem = ChannelTile<BN>::kSmemBytes;
  // More than the default 48 KB of dynamic shared memory (set per device: cheap to repeat).
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kBM)),
                  static_cast<unsigned>(ceil_div(p.k, BN)));
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// The channel tile: 64 where the layer has at most 64 channels (no half-empty tiles); 256 where
// the grid still fills at least four waves of CTAs, as a 128 x 256 tile reads 25% fewer operand
// bytes per FLOP from L2 than 128 x 128 ((BM + BN) / (BM * BN): 0.0117 against 0.0156 in
// bf16); else 128. `forced` (64, 128 or 256; 0 for this choice) overrides it.
int channel_tile(const ConvParams& p, int forced) {
  if (forced != 0) return forced;
  if (p.k <= 64) return 64;
  if (p.k >= 256) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        ceil_div(p.rows, kBM) * ceil_div(p.k, 256) >= 4 * static_cast<int64_t>(sms)) {
      return 256;
    }
  }
  return 128;
}

template <typename T>
cudaError_t launch_wgmma_dtype(const ConvParams& p, int forced_tile, cudaStream_t stream) {
  switch (channel_tile(p, forced_tile)) {
    case 64:
      return p.pool ? launch_wgmma<T, 64, true>(p, stream) : launch_wgmma<T, 64, false>(p, stream);
    case 256:
      return p.pool ? launch_wgmma<T, 256, true>(p, stream)
                    : launch_wgmma<T, 256, false>(p, stream);
    default:
      return p.pool ? launch_wgmma<T, 128, true>(p, stream)
                    : launch_wgmma<T, 128, false>(p, stream);
  }
}

}  // namespace

bool conv_wgmma_supported(const ConvParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat32 || p.c % 8 != 0 || p.k % 8 != 0) return false;
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (address(p.x) % 16 != 0 || address(p.weight) % 16 != 0 || address(p.y) % 4 != 0) {
    return false;
  }
  return wgmma_runs_here(stream);
}

cudaError_t launch_conv_wgmma(const ConvParams& p, DType dtype, int channel_tile,
                              cudaStream_t stream) {
  return dtype == DType::kBFloat16
             ? launch_wgmma_dtype<__nv_bfloat16>(p, channel_tile, stream)
             : launch_wgmma_dtype<__half>(p, channel_tile, stream);
}

}  // namespace vgg_kernels::cuda
