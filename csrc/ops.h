// Device entry points behind the checked ops of vgg_kernels.cpp. Arguments arrive validated
// (shapes, devices, dtypes); each implementation converts to channels_last itself. Semantics
// (vgg_kernels/backends/__init__.py has the whole contract):
//   conv_bn_relu_infer  y = maxpool2x2?(relu(conv(x, weight) * scale + shift)), NaN kept
//   conv_bn_stats       z = conv(x, weight) + bias, and the batch mean and biased variance of
//                       the fp32 z per channel (fp64 results), combined robustly (no
//                       E[z^2] - E[z]^2)
//   bn_relu_pool        y = maxpool2x2?(relu(pre)), pre = (z - mean) * scale + beta, with the
//                       mean as hi + lo floats: ((z - hi) - lo) * scale + beta rounded op by op
//                       (no FMA); scale = gamma * invstd
//   bn_relu_backward    its backward with batch statistics: the mask and pool maxima from the
//                       same pre as bn_relu_pool, xhat = (z - mean) * invstd, and
//                       grad_z = scale * (g - (sum g + xhat * sum g xhat) / count), and
//                       grad_bias = sum of grad_z per channel (the conv bias's gradient)
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace vgg_kernels {

namespace cpu {
at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor bn_relu_pool(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& beta, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& beta, bool pool);
// The folded block's gradient path (CPU only): the inference block with its pool's extra
// outputs (the full-resolution activation and the uint8 window codes), the conv's input
// gradient (a conv with the weights flipped and transposed), and the ReLU/pool backward
// of a folded block (see vgg_kernels/backends/reference.py, relu_pool_backward_reference).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_infer_outputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, bool pool, bool activation, bool codes);
at::Tensor conv_dgrad(const at::Tensor& grad, const at::Tensor& weight);
// Packed weights kept across calls (vgg_kernels.freeze): the layout the inference block would
// pack `weight` in for `x`, the weight packed in a layout (nullopt: a packed value is not
// finite), and the inference block on a packed weight.
int64_t conv_weight_layout(const at::Tensor& x, const at::Tensor& weight, bool pool);
std::optional<at::Tensor> pack_conv_weight(const at::Tensor& weight, int64_t layout);
at::Tensor conv_bn_relu_infer_packed(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, int64_t layout,
                                     const at::Tensor& scale, const at::Tensor& shift,
                                     bool pool);
// The weight gradient (K, C, 3, 3) fp32 of a 3x3 conv (stride 1, padding 1) from its input x
// and output gradient grad, by Winograd F(3x3, 2x2); nullopt when a transform meets a
// non-finite value (the caller then runs another algorithm, which carries it as PyTorch does).
std::optional<at::Tensor> conv_wgrad(const at::Tensor& grad, const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> relu_pool_backward(
    const at::Tensor& grad_y, const at::Tensor& mask, const std::optional<at::Tensor>& grad_a,
    const std::optional<at::Tensor>& act, const at::Tensor& scale, bool pool, int64_t n,
    int64_t k, int64_t h, int64_t w);
// x W^T + bias for a 2-D fp32 x of few rows, each weight element read once (LinearArgs).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);
// "avx512", "avx2" or "generic": the conv kernel variant the next call will use.
std::string isa();
}  // namespace cpu

#ifdef VGG_KERNELS_WITH_CUDA
namespace cuda {
at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor bn_relu_pool(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& beta, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& beta, bool pool);
// The gencode targets this build carries, e.g. "sm_90a".
std::string archs();
// Whether the current device runs the Hopper wgmma inference kernel (VGG_KERNELS_NATIVE_WGMMA=1).
bool wgmma_available();
// The kernel the last conv_bn_relu_infer call on a CUDA tensor ran: "wmma", "narrow", "wgmma",
// "halo" or "halo-t"; "" before the first.
std::string last_infer_kernel();
}  // namespace cuda
#endif

}  // namespace vgg_kernels
