// The CPU conv kernels compiled for AVX2 + FMA; picked at run time when the
// CPU has them (ops_cpu.cpp). Register tile: 6 pixels x 16 channels = 12 ymm accumulators.
#include "conv_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace vgg_kernels::cpu::avx2 {

struct Vec {
  using V = __m256;
  static constexpr int kWidth = 8;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V bcast(float s) { return _mm256_set1_ps(s); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  // x where a == b (where a > b), else y
  static inline V select_eq(V a, V b, V x, V y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  static inline V select_gt(V a, V b, V x, V y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
  }
  static inline V select_nan(V a, V b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
};

constexpr int kRows = 6;
constexpr int kPanelVectors = 2;

#include "conv_kernels_impl.h"

constexpr KernelTable kTable = make_table("avx2");

}  // namespace vgg_kernels::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace vgg_kernels::cpu {
const KernelTable* kernels_avx2() { return &avx2::kTable; }
}  // namespace vgg_kernels::cpu

#else

namespace vgg_kernels::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace vgg_kernels::cpu

#endif
