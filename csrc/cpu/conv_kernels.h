// ATen-free interface between the CPU op glue (ops_cpu.cpp) and the ISA-specific conv kernels
// (conv_kernels_{avx512,avx2,generic}.cpp, all instantiating conv_kernels_impl.h).
//
// The kernel files include no torch header: each is compiled for one instruction set (a
// `#pragma GCC target` region) and must not emit inline torch functions that another file
// could link against. The glue owns threads (at::parallel_for) and memory; a kernel processes
// one work item with the scratch buffer it is given.
#pragma once

#include <cstdint>

namespace vgg_kernels::cpu {

// What the conv epilogue does with the fp32 accumulator `acc` of output channel k.
enum class Epilogue : int {
  // y = maxpool2x2?(relu(acc * scale[k] + shift[k]))          (conv_bn_relu_infer)
  kScaleShiftReLU = 0,
  // z = acc + bias[k]; store z; per-channel sum and sum of squares of z  (conv_bn_stats)
  kBiasStats = 1,
};

// One convolution: stride 1, kernel r x r (3 with padding 1, or 1 without), NHWC fp32.
struct ConvArgs {
  int64_t n, c, h, w, k;  // batch, input channels, input (= conv output) height/width, outputs
  int r;                  // 3 or 1
  bool pool;              // 2x2/2 max-pool (floor) after the ReLU; kScaleShiftReLU only
  int64_t out_h, out_w;   // h, w, or h / 2, w / 2 with pool
  Epilogue epilogue;
  int64_t threads;        // threads the glue will run items on (to size the work items)
  // Input. Direct algorithm: NHWC with a zero border of r / 2 pixels, i.e. (n, x_h, x_w, c)
  // with x_h = h + 2 * (r / 2). Winograd: the unpadded NHWC input (x_h = h, x_w = w).
  const float* x;
  int64_t x_h, x_w;
  const float* packed_weight;  // from pack_direct / pack_winograd
  const float* scale;          // kScaleShiftReLU: scale; kBiasStats: unused
  const float* shift;          // kScaleShiftReLU: shift; kBiasStats: bias (may be null)
  float* y;                    // NHWC output (n, out_h, out_w, k)
};

// How a conv is split into independent work items for the glue's parallel loop.
struct ConvPlan {
  int64_t items;            // work items, processed in any order on any thread
  int64_t scratch_floats;   // per-thread scratch (floats, 64-byte aligned by the caller)
  int64_t packed_floats;    // size of the packed weight buffer
  int64_t panels;           // weight panels of panel_width output channels (K rounded up)
};

// Entry points of one instruction-set build. `sums` (kBiasStats only) points at this thread's
// 2 * k doubles: sum, then sum of squares, accumulated across the items the thread runs.
struct KernelTable {
  const char* isa;     // "avx512", "avx2" or "generic"
  int64_t panel_width; // output channels per packed weight panel
  ConvPlan (*plan_direct)(const ConvArgs& args);
  ConvPlan (*plan_winograd)(const ConvArgs& args);
  // Pack weight (KRSC: (k, r, r, c) contiguous, i.e. a channels_last (k, c, r, r) tensor) into
  // panels [begin, end).
  void (*pack_direct)(const ConvArgs& args, const float* weight, float* packed, int64_t begin,
                      int64_t end);
  void (*pack_winograd)(const ConvArgs& args, const float* weight, float* packed,
                        int64_t begin, int64_t end);
  void (*run_direct)(const ConvArgs& args, int64_t item, float* scratch, double* sums);
  void (*run_winograd)(const ConvArgs& args, int64_t item, float* scratch, double* sums);
};

// nullptr where the build has no such variant (the AVX ones outside x86-64 GCC/Clang).
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

}  // namespace vgg_kernels::cpu
