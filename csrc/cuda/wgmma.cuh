// Hopper warpgroup-MMA building blocks shared by the sm_90a inference kernels (conv_wgmma.cu,
// conv_wgmma_halo.cu): the wgmma instructions for 64, 128 and 256 output channels with both
// operands in shared memory, their fences, shared-memory matrix descriptors, and the host's
// choice of channel tile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace vgg_kernels::cuda {
namespace wgmma {

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

// The multistage main loop of the sm_90a kernels, for `steps` >= 1 reduction steps. Step s
// waits for its copies (one cp.async group per step, issued kAhead steps before by load(s)),
// runs multiply(s) (the step's wgmma instructions, committed as one group), issues step
// s + kAhead's copies and waits for all but the newest MMA group. The stage that step
// s + kAhead fills was last read by step s - 2, whose MMAs every warpgroup finished before this
// step's barrier. A do-while: a loop that may run zero times leaves a path that zeroes the
// accumulators again before the final wait, and ptxas then serializes every MMA (C7515).
template <int kAhead, int N, class Load, class Multiply>
__device__ __forceinline__ void mma_pipeline(float (&acc)[N], int steps, Load&& load,
                                             Multiply&& multiply) {
#pragma unroll
  for (int t = 0; t < kAhead; ++t) {
    if (t < steps) load(t);
    cp_async_commit();  // one group per step, empty past the end, so the counts stay uniform
  }
  int s = 0;
  do {
    cp_async_wait<kAhead - 1>();  // this thread's copies for step s have landed
    fence_proxy_async();
    __syncthreads();  // everyone's copies of step s; everyone's MMAs of step s - 2 are done
    wgmma_fence();
    fence_accumulators(acc);
    multiply(s);
    wgmma_commit();
    if (s + kAhead < steps) load(s + kAhead);
    cp_async_commit();
    wgmma_wait<1>();
    fence_accumulators(acc);
  } while (++s < steps);
  wgmma_wait<0>();
  fence_accumulators(acc);
  cp_async_wait<0>();
}

// Matrix descriptor of a K-major tile in the 128-byte swizzled layout: 8-row groups 1024 bytes
// apart (stride byte offset), leading byte offset unused by this layout (encoded as 1).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Matrix descriptor of a K-major operand in the unswizzled layout: core matrices of 8 rows x
// 16 bytes, each row 16 bytes after the previous one; the second 8-element K column of a k16
// step `k_column_bytes` after the first (leading byte offset), the next 8 rows
// `row_group_bytes` after these (stride byte offset). Any 16-byte aligned start works, so a
// descriptor can start at any row of a larger tile.
__device__ __forceinline__ uint64_t plain_descriptor(uint32_t smem_addr, uint32_t k_column_bytes,
                                                     uint32_t row_group_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((k_column_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((row_group_bytes >> 4) & 0x3FFF) << 32);
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

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of 128-byte rows stored in the
// 128-byte swizzled layout (the tile starts on a 1024-byte boundary).
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The channel tile: 64 where the layer has at most 64 channels (no half-empty tiles); 256 where
// the grid still fills at least four waves of CTAs, as a 128 x 256 tile reads 25% fewer operand
// bytes per FLOP from L2 than 128 x 128 ((BM + BN) / (BM * BN): 0.0117 against 0.0156 in
// bf16); else 128. `row_tiles` counts the grid's 128-row tiles; `forced` (64, 128 or 256; 0 for
// this choice) overrides it.
inline int channel_tile(int64_t row_tiles, int64_t k, int forced) {
  if (forced != 0) return forced;
  if (k <= 64) return 64;
  if (k >= 256) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        row_tiles * ceil_div(k, 256) >= 4 * static_cast<int64_t>(sms)) {
      return 256;
    }
  }
  return 128;
}

}  // namespace wgmma
}  // namespace vgg_kernels::cuda
