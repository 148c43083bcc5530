// The CPU conv kernels compiled for AVX-512 (F, VL, DQ, BW) + FMA; picked at run time when the
// CPU has them (ops_cpu.cpp). Register tile: 6 pixels x 64 channels = 24 zmm accumulators.
#include "conv_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__clang__)
#pragma clang attribute push(                                             \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
// GCC 12 flags its own _mm512_undefined_ps() (inside _mm512_max_ps) as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vgg_kernels::cpu::avx512 {

struct Vec {
  using V = __m512;
  static constexpr int kWidth = 16;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V bcast(float s) { return _mm512_set1_ps(s); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  // x where a == b (where a > b), else y
  static inline V select_eq(V a, V b, V x, V y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x);
  }
  static inline V select_gt(V a, V b, V x, V y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  static inline V select_nan(V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), b, a);
  }
};

constexpr int kRows = 6;
constexpr int kPanelVectors = 4;

#include "conv_kernels_impl.h"

constexpr KernelTable kTable = make_table("avx512");

}  // namespace vgg_kernels::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace vgg_kernels::cpu {
const KernelTable* kernels_avx512() { return &avx512::kTable; }
}  // namespace vgg_kernels::cpu

#else

namespace vgg_kernels::cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace vgg_kernels::cpu

#endif
