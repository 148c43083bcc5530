// Device helpers shared by the CUDA kernels: element conversions, cp.async, compile-time switches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Turns a runtime bool into a constexpr one for a templated body (flash-attention's idiom).
#define VK_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                   \
    }                                         \
  }()

namespace vgg_kernels::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Storage type <-> fp32 (round to nearest even), explicit because torch builds with
// __CUDA_NO_HALF_CONVERSIONS__.
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// max(a, b) that is NaN when either operand is, as nn.MaxPool2d and torch.relu give (fmaxf
// returns the other operand). max.NaN is one instruction (FMNMX.NAN) on compute capability 8.0+,
// the oldest target the build allows: no more than the fmaxf it replaces.
__device__ __forceinline__ float max_nan(float a, float b) {
  float result;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(result) : "f"(a), "f"(b));
  return result;
}

// ReLU that keeps NaN (torch.relu(NaN) is NaN; fmaxf(NaN, 0) is 0). Since max_nan is
// associative and relu_nan(v) = max_nan(v, 0), relu_nan(max_nan(a, b)) equals
// max_nan(relu_nan(a), relu_nan(b)): a pooled ReLU can take the max first.
__device__ __forceinline__ float relu_nan(float v) { return max_nan(v, 0.0f); }

// z * scale + shift rounded like PyTorch's unfused ops (a multiply, then an add: no FMA
// contraction), so a 2x2 window ties and breaks ties exactly as the reference does.
__device__ __forceinline__ float scale_shift_unfused(float z, float scale, float shift) {
  return __fadd_rn(__fmul_rn(z, scale), shift);
}

// relu(z * scale + shift) as scale_shift_unfused, NaN kept.
__device__ __forceinline__ float bn_relu_unfused(float z, float scale, float shift) {
  return relu_nan(scale_shift_unfused(z, scale, shift));
}

// z - mean with the batch mean as the unevaluated sum hi + lo of two floats (hi = fp32(mean),
// lo = fp32(mean - hi)): z - hi is exact for z near the mean, so (z - hi) - lo is z's deviation
// to fp32 precision even where the mean is 1e4 or more times the spread.
__device__ __forceinline__ float bn_centered(float z, float mean_hi, float mean_lo) {
  return __fsub_rn(__fsub_rn(z, mean_hi), mean_lo);
}

// The training block's pre-activation (z - mean) * scale + beta (scale = gamma * invstd): the
// reference's bn_pre_reference, each op rounded (no FMA). bn_relu_pool and bn_relu_backward
// both take their ReLU mask and 2x2 maxima from it, so they agree on every mask bit and tie.
__device__ __forceinline__ float bn_pre(float z, float mean_hi, float mean_lo, float scale,
                                        float beta) {
  return __fadd_rn(__fmul_rn(bn_centered(z, mean_hi, mean_lo), scale), beta);
}

// 16-byte global -> shared copy that bypasses L1; zero-fills when !valid (src is not read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace vgg_kernels::cuda
