// ATen-free interface between the CUDA op glue (ops_cuda.cpp, host compiler) and the kernels
// (*.cu, nvcc). The .cu files include no torch header, which keeps nvcc's work to the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vgg_kernels::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One implicit-GEMM convolution over NHWC tensors (stride 1, kernel r x r, padding r / 2).
// GEMM rows are output pixels (with pool: 4 consecutive rows are one 2x2 window, so the pool is
// a max over 4 rows of a tile), columns are output channels, the reduction is r * r * c long in
// (tap, channel) order, matching the KRSC weight.
struct ConvParams {
  const void* x;       // (n, h, w, c), dtype
  const void* weight;  // (k, r, r, c) = KRSC, dtype
  const float* scale;  // infer: (k,) fp32
  const float* shift;  // infer: (k,) fp32; stats: conv bias (k,) fp32 or nullptr
  void* y;             // infer: (n, out_h, out_w, k); stats: z (n, h, w, k); dtype
  // stats: three (row_tiles, k) fp32 row-major buffers, R = conv_stats_rows_per_cta() GEMM rows
  // per CTA and row_tiles = ceil(rows / R). For row tile t (rows [t R, min(t R + R, rows))) and
  // channel n: tile_shift holds z0, the fp32 z of the tile's first row, tile_sum and tile_sumsq
  // the sums over the tile's rows of d = z - z0 and of d * d. The kernel writes every entry; the
  // host turns them into per-tile means and m2 and merges those with Chan's formula, in fp64.
  float* tile_shift;
  float* tile_sum;
  float* tile_sumsq;
  int64_t n, h, w, c, k, out_h, out_w;
  int r;
  bool pool;
  int64_t rows;  // GEMM rows: n * h * w, or 4 * n * out_h * out_w with pool
  int64_t kdim;  // r * r * c
};

enum class ConvMode : int {
  kInfer = 0,  // y = maxpool2x2?(relu(acc * scale + shift)), NaN kept
  kStats = 1,  // z = acc + bias, with per-CTA per-channel shifted sums of the fp32 z
};

// GEMM rows per CTA (R above) of the stats-mode kernel that the launcher for `dtype` runs; for
// kFloat32, tf32 tells launch_conv_tf32 (true) from launch_conv_fp32 (false) apart.
int conv_stats_rows_per_cta(DType dtype, bool tf32);

// fp16 / bf16 on tensor cores; fp32 on tensor cores as tf32 (allow_tf32) or on CUDA cores.
// Every launcher returns cudaGetLastError() after its launch.
cudaError_t launch_conv_fp16(const ConvParams& p, ConvMode mode, cudaStream_t stream);
cudaError_t launch_conv_bf16(const ConvParams& p, ConvMode mode, cudaStream_t stream);
cudaError_t launch_conv_tf32(const ConvParams& p, ConvMode mode, cudaStream_t stream);
cudaError_t launch_conv_fp32(const ConvParams& p, ConvMode mode, cudaStream_t stream);

// Hopper inference kernel (conv_wgmma.cu): fp16/bf16, c and k multiples of 8, 16-byte aligned
// x and weight, on a compute capability 9.0 device running this build's sm_90a code.
bool conv_wgmma_supported(const ConvParams& p, DType dtype, cudaStream_t stream);
bool wgmma_runs_here(cudaStream_t stream);
// channel_tile: 64, 128 or 256 output channels per CTA, or 0 to choose from the shape.
cudaError_t launch_conv_wgmma(const ConvParams& p, DType dtype, int channel_tile,
                              cudaStream_t stream);
// Hopper 3x3 inference kernel that copies each input tile's halo once per 64 channels
// (conv_wgmma_halo.cu): fp16/bf16, r == 3, c a multiple of 64, k a multiple of 8, alignment as
// above, on a device running sm_90a code. pixels_n: the pixels are the MMA's N operand (64
// output channels per CTA as M; channel_tile is ignored), else its M operand.
bool conv_wgmma_halo_supported(const ConvParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_conv_wgmma_halo(const ConvParams& p, DType dtype, bool pixels_n,
                                   int channel_tile, cudaStream_t stream);

// Inference kernel for 3x3 layers with few input channels (conv_narrow.cu): fp16/bf16, r == 3,
// 1 <= c <= kNarrowMaxChannels, k a multiple of 8, y 16-byte aligned; any compute capability
// the extension builds for. For the launch, p.weight is the KRSC weight flattened to (k, 9 c)
// and zero-padded to (k, kNarrowWeightPitch), 16-byte aligned (the check does not read it).
constexpr int kNarrowMaxChannels = 7;
constexpr int kNarrowWeightPitch = 64;
bool conv_narrow_supported(const ConvParams& p, DType dtype);
cudaError_t launch_conv_narrow(const ConvParams& p, DType dtype, cudaStream_t stream);

// y = maxpool2x2?(relu((z - mean) * scale + beta)), scale = gamma * invstd, rounded op by op
// (bn_pre in common.cuh); z (n, h, w, k) NHWC, y (n, out_h, out_w, k). The mean comes as the sum
// of two floats, mean_hi = fp32(mean) and mean_lo = fp32(mean - mean_hi), so z - mean keeps
// fp32 precision where the mean is large against the spread.
struct BnReluParams {
  const void* z;
  const float* mean_hi;  // (k,) each, fp32
  const float* mean_lo;
  const float* scale;
  const float* beta;
  void* y;
  int64_t n, h, w, k, out_h, out_w;
  bool pool;
};
cudaError_t launch_bn_relu_pool(const BnReluParams& p, DType dtype, cudaStream_t stream);

// Backward of maxpool2x2?(relu(gamma * (z - mean) * invstd + beta)) with batch statistics,
// given scale = gamma * invstd as bn_relu_pool used it: its ReLU mask and pool maxima come from
// the same pre (bn_pre in common.cuh); the mean as in BnReluParams.
struct BnReluBackwardParams {
  const void* grad_y;    // (n, out_h, out_w, k)
  const void* z;         // (n, h, w, k)
  const float* mean_hi;  // (k,) each, fp32
  const float* mean_lo;
  const float* invstd;
  const float* scale;
  const float* beta;
  double* sum_g;         // (k,) fp64, zero on entry: sum of g (= grad_beta)
  double* sum_gx;        // (k,) fp64, zero on entry: sum of g * xhat (= grad_gamma)
  void* grad_z;          // (n, h, w, k)
  int64_t n, h, w, k, out_h, out_w;
  bool pool;
};
cudaError_t launch_bn_relu_backward(const BnReluBackwardParams& p, DType dtype,
                                    cudaStream_t stream);

// Compute capabilities the device code was compiled for, e.g. "900" or "800,900".
const char* compiled_archs();

}  // namespace vgg_kernels::cuda
