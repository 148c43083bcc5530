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
  // z = acc + bias[k]; store z; per-channel count, mean and sum of squared deviations of z
  // (conv_bn_stats)
  kBiasStats = 1,
  // y = acc * scale[k] + shift[k], no ReLU, no pool (conv_linear: the input gradient as a conv
  // with flipped weights)
  kScaleShift = 2,
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
  // The weight as pack_direct / pack_winograd read it: (k, c, r, r) by element strides, any
  // memory format (contiguous, as nn.Conv2d keeps it, or channels_last).
  int64_t stride_wk, stride_wc, stride_wr, stride_ws;
  const float* packed_weight;  // from pack_direct / pack_winograd
  const float* scale;          // kScaleShiftReLU/kScaleShift: scale; kBiasStats: unused
  const float* shift;          // kScaleShiftReLU/kScaleShift: shift; kBiasStats: bias or null
  float* y;                    // NHWC output (n, out_h, out_w, k)
  // kScaleShiftReLU with pool, both nullable (the input gradient's forward): the
  // full-resolution activation (n, h, w, k), and per pooled output the uint8 window code: the
  // row-major position of the window's first maximum, or 255 where it is not positive.
  float* activation;
  uint8_t* codes;
};

// How a conv is split into independent work items for the glue's parallel loop.
struct ConvPlan {
  int64_t items;            // work items, processed in any order on any thread
  int64_t scratch_floats;   // per-thread scratch (floats, 64-byte aligned by the caller)
  int64_t packed_floats;    // size of the packed weight buffer
  int64_t panels;           // weight panels of panel_width output channels (K rounded up)
};

// The training block's BN + ReLU (+ 2x2 max-pool) backward over NHWC fp32 tensors (see
// ops_cpu.cpp, bn_relu_backward): per-channel vectors zero-padded to a multiple of the vector
// width; the pre-activation ((z - hi) - lo) * scale + beta rounded op by op, as bn_relu_pool.
struct BnBackwardArgs {
  int64_t n, k, h, w, out_h, out_w;
  bool pool;
  const float* z;        // (n, h, w, k)
  const float* grad_y;   // (n, out_h, out_w, k)
  const float* hi;       // the batch mean as hi + lo
  const float* lo;
  const float* invstd;
  const float* scale;    // gamma * invstd
  const float* beta;
  const float* mean_g;   // apply pass: sum g / count and sum g xhat / count
  const float* mean_gx;
  float* grad_z;         // apply pass output (n, h, w, k)
};

// The ReLU (+ 2x2 max-pool) backward of a folded block (see ops_cpu.cpp, relu_pool_backward):
// g is grad_y where the output y > 0 (no pool), or grad_y at each window's code position plus
// grad_a where the tapped activation > 0 (pool); grad_pre = g * scale.
struct MaskedGradientArgs {
  int64_t n, k, h, w, out_h, out_w;
  bool pool;
  const float* grad_y;   // (n, out_h, out_w, k)
  const float* y;        // without pool: the block's output (n, h, w, k)
  const uint8_t* codes;  // with pool: (n, out_h, out_w, k)
  const float* grad_a;   // with pool, nullable: a tapped activation's gradient (n, h, w, k)
  const float* act;      //   and that activation
  const float* scale;    // zero-padded to whole vectors
  float* grad_pre;       // (n, h, w, k)
};

// The weight gradient of a 3x3 conv (stride 1, padding 1) by Winograd F(3x3, 2x2): each 2x2
// block of the output gradient g (tile t) and the 4x4 input patch under it give
// dW[k][c] += A^T [(G g_t G^T) .* (B^T x_t B)] A, with B^T the forward F(2x2, 3x3)'s. The sum
// over tiles is 16 GEMMs, M[xi] (c x k) += V[xi]^T (c x tiles) W[xi] (tiles x k), over tile
// chunks [t0, t0 + count) into buffers the glue owns (see ops_cpu.cpp, conv_wgrad).
struct WgradArgs {
  int64_t n, c, k, h, w;    // batch, input channels, output channels, height, width
  int64_t tiles_h, tiles_w; // ceil(h / 2), ceil(w / 2)
  int64_t panels;           // output-channel panels (k rounded up to the panel width)
  const float* x;           // NHWC input (n, h, w, c)
  const float* grad;        // NHWC output gradient (n, h, w, k)
  int64_t t0, count;        // the chunk of tiles in the buffers below
  float* v;                 // [16][count][c]: B^T x B per tile and input channel
  float* g;                 // [16][panels][count][panel width]: G g G^T, zero past k
  float* m;                 // [16][c][panels * panel width]: the chunks' sum so far
  float* dw;                // (k, c, 3, 3) contiguous: A^T M A
};

// y = x W^T + bias for a few rows of x (a classifier at small batch): every weight row is read
// once for all rows of x, where a GEMM library packs the whole weight first (measured: a
// 25088 -> 4096 Linear at batch 4 reads 411 MB at 9.5 GB/s through oneDNN/MKL). Row-major,
// unit stride along the input features.
struct LinearArgs {
  int64_t m, in, out;    // rows of x, input features, output features
  const float* x;        // (m, in), row stride ldx
  int64_t ldx;
  const float* w;        // (out, in), row stride ldw
  int64_t ldw;
  const float* bias;     // (out,) or null
  float* y;              // (m, out), row stride ldy
  int64_t ldy;
};

// Per-channel statistics of z (kBiasStats): a work item's 3 * k doubles, (count, mean, m2) per
// channel in three rows of k, where m2 is the sum of squared deviations from the mean. An item
// sums z - z0 and (z - z0)^2 in fp32 around its first pixel's z0 (a value of the same
// distribution: no cancellation however large the mean is against the spread) and merges its
// (count, mean, m2) into its rows with Chan's formula in fp64; the glue merges the items' in
// item order (deterministic whichever thread ran which item). Never E[z^2] - E[z]^2.
inline void merge_moments(double* count, double* mean, double* m2, double count_b,
                          double mean_b, double m2_b) {
  if (count_b == 0.0) return;
  const double total = *count + count_b;
  const double delta = mean_b - *mean;
  *mean += delta * (count_b / total);
  *m2 += m2_b + delta * delta * (*count * count_b / total);
  *count = total;
}

// Entry points of one instruction-set build. `stats` (kBiasStats only) points at this item's
// 3 * k doubles (see merge_moments), zero on entry. A run
// returns false when its input held a non-finite value that its algorithm cannot carry through
// (Winograd's transforms turn one Inf into Inf - Inf = NaN where the convolution gives +-Inf):
// its outputs are then wrong and the glue runs the direct algorithm instead. pack_winograd
// returns false for a non-finite weight, for the same reason.
struct KernelTable {
  const char* isa;     // "avx512", "avx2" or "generic"
  int64_t panel_width; // output channels per packed weight panel
  // The three algorithms: direct, Winograd F(2x2, 3x3) and Winograd F(4x4, 3x3).
  ConvPlan (*plan_direct)(const ConvArgs& args);
  ConvPlan (*plan_winograd)(const ConvArgs& args);
  ConvPlan (*plan_winograd4)(const ConvArgs& args);
  // Pack the weight (strides in args) into panels [begin, end).
  void (*pack_direct)(const ConvArgs& args, const float* weight, float* packed, int64_t begin,
                      int64_t end);
  bool (*pack_winograd)(const ConvArgs& args, const float* weight, float* packed,
                        int64_t begin, int64_t end);
  bool (*pack_winograd4)(const ConvArgs& args, const float* weight, float* packed,
                         int64_t begin, int64_t end);
  bool (*run_direct)(const ConvArgs& args, int64_t item, float* scratch, double* stats);
  bool (*run_winograd)(const ConvArgs& args, int64_t item, float* scratch, double* stats);
  bool (*run_winograd4)(const ConvArgs& args, int64_t item, float* scratch, double* stats);
  // BN backward, rows [begin, end) of the (n * out_h) output rows (input rows without pool,
  // pairs of input rows with it, the trailing odd one included in its image's last pair).
  // Reduce: adds sum g, sum g * xhat to sums[0 .. k), sums[k .. 2k) (fp64; fp32 within a row).
  // Apply: writes grad_z = scale * (g - mean_g - xhat * mean_gx) and adds it to sums[0 .. k)
  // (the conv bias's gradient). `row` is k_pad floats of scratch.
  void (*bn_backward_reduce)(const BnBackwardArgs& args, int64_t begin, int64_t end,
                             double* sums, float* row);
  void (*bn_backward_apply)(const BnBackwardArgs& args, int64_t begin, int64_t end,
                            double* sums, float* row);
  // Masked gradient, input rows [begin, end) of the n * h rows: writes grad_pre and adds g to
  // sums[0 .. k) (fp64; fp32 within a row). `row` is k_pad floats of scratch.
  void (*masked_gradient)(const MaskedGradientArgs& args, int64_t begin, int64_t end,
                          double* sums, float* row);
  // Winograd weight gradient (WgradArgs): transforms of the chunk's tiles [begin, end) (false
  // when a transformed value is not finite: the glue falls back to another algorithm); the
  // chunk's GEMMs, item = (xi, block of kWgradRows input channels, panel), `accumulate` adding
  // to M (every chunk after the first); A^T M A for input channels [begin, end).
  bool (*wgrad_transform_input)(const WgradArgs& args, int64_t begin, int64_t end);
  bool (*wgrad_transform_grad)(const WgradArgs& args, int64_t begin, int64_t end);
  int64_t (*wgrad_items)(const WgradArgs& args);
  void (*wgrad_gemm)(const WgradArgs& args, int64_t item, bool accumulate);
  void (*wgrad_output)(const WgradArgs& args, int64_t begin, int64_t end);
  // Output features [begin, end) of a LinearArgs product, all m rows.
  void (*linear_rows)(const LinearArgs& args, int64_t begin, int64_t end);
};

// nullptr where the build has no such variant (the AVX ones outside x86-64 GCC/Clang).
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

}  // namespace vgg_kernels::cpu
