// The CPU conv kernels for any CPU, with the compiler's portable 4-lane vectors (SSE2 on x86-64,
// NEON on AArch64): the fallback when neither AVX2 nor AVX-512 is there. Register tile: 4 pixels
// x 16 channels.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "conv_kernels.h"

namespace vgg_kernels::cpu::generic {

struct Vec {
  typedef float V __attribute__((vector_size(16)));
  static constexpr int kWidth = 4;
  static inline V zero() { return V{0.0f, 0.0f, 0.0f, 0.0f}; }
  static inline V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V bcast(float s) { return V{s, s, s, s}; }
  static inline V fma(V a, V b, V c) { return a * b + c; }
  static inline V add(V a, V b) { return a + b; }
  static inline V sub(V a, V b) { return a - b; }
  static inline V mul(V a, V b) { return a * b; }
  static inline V max(V a, V b) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] > b[i] ? a[i] : b[i];
    return r;
  }
  // x where a == b (where a > b), else y
  static inline V select_eq(V a, V b, V x, V y) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] == b[i] ? x[i] : y[i];
    return r;
  }
  static inline V select_gt(V a, V b, V x, V y) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] > b[i] ? x[i] : y[i];
    return r;
  }
  static inline V select_nan(V a, V b) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] != a[i] ? a[i] : b[i];
    return r;
  }
};

constexpr int kRows = 4;
constexpr int kPanelVectors = 4;

#include "conv_kernels_impl.h"

constexpr KernelTable kTable = make_table("generic");

}  // namespace vgg_kernels::cpu::generic

namespace vgg_kernels::cpu {
const KernelTable* kernels_generic() { return &generic::kTable; }
}  // namespace vgg_kernels::cpu
