// Device entry points behind the checked ops of vgg_kernels.cpp. Arguments arrive validated
// (shapes, devices, dtypes); each implementation converts to channels_last itself.
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
at::Tensor bn_relu_pool(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                        bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool pool);
// "avx512", "avx2" or "generic": the conv kernel variant the next call will use.
std::string isa();
}  // namespace cpu

#ifdef VGG_KERNELS_WITH_CUDA
namespace cuda {
at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor bn_relu_pool(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                        bool pool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool pool);
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
