// CUDA implementations of the four ops: layout conversion, allocation, the current stream and
// device, and the choice of kernel (tensor cores for fp16/bf16, tf32 or CUDA cores for fp32 by
// torch.backends.cudnn.allow_tf32). Compiled by the host compiler; kernels live in *.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "../ops.h"
#include "launch.h"

namespace vgg_kernels::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

at::Tensor empty_nhwc(int64_t n, int64_t c, int64_t h, int64_t w, const at::Tensor& like) {
  return at::empty({n, c, h, w}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor fp32_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Inputs in the kernels' layouts: x NHWC, weight KRSC in x's dtype.
ConvParams conv_params(const at::Tensor& x, const at::Tensor& weight_krsc, bool pool) {
  ConvParams p{};
  p.x = x.data_ptr();
  p.weight = weight_krsc.data_ptr();
  p.n = x.size(0);
  p.c = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.k = weight_krsc.size(0);
  p.r = static_cast<int>(weight_krsc.size(1));
  p.pool = pool;
  p.out_h = pool ? p.h / 2 : p.h;
  p.out_w = pool ? p.w / 2 : p.w;
  p.rows = pool ? 4 * p.n * p.out_h * p.out_w : p.n * p.h * p.w;
  p.kdim = static_cast<int64_t>(p.r) * p.r * p.c;
  return p;
}

// VGG_KERNELS_NATIVE_WGMMA=1 runs fp16/bf16 inference on the Hopper wgmma kernel where it
// applies; =halo also runs 3x3 layers with C a multiple of 64 on the kernel that copies each
// input halo once per channel block (conv_wgmma_halo.cu), with the pixels as the MMA's M
// operand; =halo-t the same with the pixels as N; unset, empty or 0: the WMMA kernel. Read per
// call, so one process can time every kernel.
enum class WgmmaMode { kOff, kPlain, kHalo, kHaloT };

WgmmaMode wgmma_mode() {
  const char* value = std::getenv("VGG_KERNELS_NATIVE_WGMMA");
  if (value == nullptr || *value == '\0') return WgmmaMode::kOff;
  const std::string text(value);
  if (text == "0") return WgmmaMode::kOff;
  if (text == "1") return WgmmaMode::kPlain;
  if (text == "halo") return WgmmaMode::kHalo;
  TORCH_CHECK(text == "halo-t",
              "environment variable VGG_KERNELS_NATIVE_WGMMA must be 0, 1, halo or halo-t (got '",
              text, "')");
  return WgmmaMode::kHaloT;
}

bool wgmma_requested() { return wgmma_mode() != WgmmaMode::kOff; }

// VGG_KERNELS_NATIVE_WGMMA_TILE=64|128|256 fixes the wgmma kernel's output channels per CTA
// (for tests and timing); unset, the kernel chooses from the shape.
int wgmma_tile_override() {
  const char* value = std::getenv("VGG_KERNELS_NATIVE_WGMMA_TILE");
  if (value == nullptr || *value == '\0') return 0;
  const std::string text(value);
  TORCH_CHECK(text == "64" || text == "128" || text == "256",
              "environment variable VGG_KERNELS_NATIVE_WGMMA_TILE must be 64, 128 or 256 (got '",
              text, "')");
  return std::stoi(text);
}

// VGG_KERNELS_NATIVE_NARROW=0 keeps fp16/bf16 3x3 layers with at most 7 input channels (the
// RGB first layer) off the kernel for short reductions (conv_narrow.cu); unset, empty or 1: they
// run on it, unless VGG_KERNELS_NATIVE_WGMMA pads them to 8 channels for the wgmma kernel.
bool narrow_enabled() {
  const char* value = std::getenv("VGG_KERNELS_NATIVE_NARROW");
  if (value == nullptr || *value == '\0') return true;
  const std::string text(value);
  TORCH_CHECK(text == "0" || text == "1",
              "environment variable VGG_KERNELS_NATIVE_NARROW must be 0 or 1 (got '", text, "')");
  return text == "1";
}

void launch_conv(const ConvParams& p, at::ScalarType dtype, ConvMode mode) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const WgmmaMode wgmma = mode == ConvMode::kInfer && dtype != at::kFloat ? wgmma_mode()
                                                                          : WgmmaMode::kOff;
  if (wgmma != WgmmaMode::kOff) {
    const DType type = dtype == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
    if ((wgmma == WgmmaMode::kHalo || wgmma == WgmmaMode::kHaloT) &&
        conv_wgmma_halo_supported(p, type, stream)) {
      C10_CUDA_CHECK(launch_conv_wgmma_halo(p, type, wgmma == WgmmaMode::kHaloT,
                                            wgmma_tile_override(), stream));
      return;
    }
    if (conv_wgmma_supported(p, type, stream)) {
      C10_CUDA_CHECK(launch_conv_wgmma(p, type, wgmma_tile_override(), stream));
      return;
    }
  }
  cudaError_t status;
  switch (dtype) {
    case at::kHalf:
      status = launch_conv_fp16(p, mode, stream);
      break;
    case at::kBFloat16:
      status = launch_conv_bf16(p, mode, stream);
      break;
    default:
      // cuDNN's switch for convolutions; our kernels follow it so fp32 results match.
      status = at::globalContext().allowTF32CuDNN() ? launch_conv_tf32(p, mode, stream)
                                                    : launch_conv_fp32(p, mode, stream);
  }
  C10_CUDA_CHECK(status);
}

}  // namespace

std::string archs() { return compiled_archs(); }

bool wgmma_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();  // no usable GPU here: not an error for this query
    return false;
  }
  return wgmma_runs_here(c10::cuda::getCurrentCUDAStream());
}

// The wgmma kernel copies 16-byte chunks of 8 channels, so it takes C multiples of 8. A layer
// with fewer channels (the RGB first layer) gets its input and weights zero-padded to 8 when
// that kernel is asked for and runs here: 16-byte copies instead of the WMMA kernel's per-element
// loads, for 8/C times the (small) tensor-core work.
namespace {

constexpr int64_t kWgmmaChannels = 8;

bool pads_for_wgmma(const at::Tensor& x, const at::Tensor& weight_krsc) {
  return x.scalar_type() != at::kFloat && x.size(1) < kWgmmaChannels &&
         weight_krsc.size(0) % kWgmmaChannels == 0 && wgmma_requested() &&
         wgmma_runs_here(c10::cuda::getCurrentCUDAStream());
}

}  // namespace

at::Tensor conv_bn_relu_infer(const at::Tensor& x_in, const at::Tensor& weight,
                              const at::Tensor& scale_in, const at::Tensor& shift_in, bool pool) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor weight_krsc = weight.to(x_in.scalar_type()).permute({0, 2, 3, 1}).contiguous();
  at::Tensor x;
  if (pads_for_wgmma(x_in, weight_krsc)) {
    const int64_t extra = kWgmmaChannels - x_in.size(1);
    // pad the channel (last) dimension of the NHWC views, straight from x_in's layout; back to
    // an NCHW-shaped channels_last x
    x = at::constant_pad_nd(x_in.permute({0, 2, 3, 1}), {0, extra}).contiguous().permute(
        {0, 3, 1, 2});
    weight_krsc = at::constant_pad_nd(weight_krsc, {0, extra}).contiguous();
  } else {
    x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const at::Tensor scale = fp32_vector(scale_in), shift = fp32_vector(shift_in);
  ConvParams p = conv_params(x, weight_krsc, pool);
  at::Tensor y = empty_nhwc(p.n, p.k, p.out_h, p.out_w, x);
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  p.y = y.data_ptr();
  // (a layer padded to 8 channels for the wgmma kernel above has left this kernel's domain)
  if (x.scalar_type() != at::kFloat && p.r == 3 && p.c <= kNarrowMaxChannels &&
      narrow_enabled()) {
    // the flattened (k, 9 c) weight, zero-padded to the kernel's row pitch
    const at::Tensor padded = at::constant_pad_nd(weight_krsc.reshape({p.k, p.kdim}),
                                                  {0, kNarrowWeightPitch - p.kdim})
                                  .contiguous();
    ConvParams narrow = p;
    narrow.weight = padded.data_ptr();
    const DType type = dtype_of(x);
    if (conv_narrow_supported(narrow, type)) {
      C10_CUDA_CHECK(launch_conv_narrow(narrow, type, c10::cuda::getCurrentCUDAStream()));
      return y;
    }
  }
  launch_conv(p, x.scalar_type(), ConvMode::kInfer);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight_krsc = weight.to(x.scalar_type()).permute({0, 2, 3, 1}).contiguous();
  at::Tensor bias_f;
  ConvParams p = conv_params(x, weight_krsc, false);
  if (bias.has_value()) {
    bias_f = fp32_vector(*bias);
    p.shift = bias_f.data_ptr<float>();
  }
  at::Tensor z = empty_nhwc(p.n, p.k, p.h, p.w, x);
  // fp64 accumulators across CTAs, returned in fp32 like the CPU kernels' sums
  at::Tensor sum = at::zeros({p.k}, x.options().dtype(at::kDouble));
  at::Tensor sumsq = at::zeros({p.k}, x.options().dtype(at::kDouble));
  p.y = z.data_ptr();
  p.sum = sum.data_ptr<double>();
  p.sumsq = sumsq.data_ptr<double>();
  launch_conv(p, x.scalar_type(), ConvMode::kStats);
  return {z, sum.to(at::kFloat), sumsq.to(at::kFloat)};
}

at::Tensor bn_relu_pool(const at::Tensor& z_in, const at::Tensor& scale_in,
                        const at::Tensor& shift_in, bool pool) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor scale = fp32_vector(scale_in), shift = fp32_vector(shift_in);
  BnReluParams p{};
  p.n = z.size(0);
  p.k = z.size(1);
  p.h = z.size(2);
  p.w = z.size(3);
  p.pool = pool;
  p.out_h = pool ? p.h / 2 : p.h;
  p.out_w = pool ? p.w / 2 : p.w;
  at::Tensor y = empty_nhwc(p.n, p.k, p.out_h, p.out_w, z);
  p.z = z.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  p.y = y.data_ptr();
  C10_CUDA_CHECK(launch_bn_relu_pool(p, dtype_of(z), c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const at::Tensor& gamma_in, const at::Tensor& beta_in,
    bool pool) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mean = fp32_vector(mean_in), invstd = fp32_vector(invstd_in);
  const at::Tensor gamma = fp32_vector(gamma_in), beta = fp32_vector(beta_in);
  BnReluBackwardParams p{};
  p.n = z.size(0);
  p.k = z.size(1);
  p.h = z.size(2);
  p.w = z.size(3);
  p.pool = pool;
  p.out_h = pool ? p.h / 2 : p.h;
  p.out_w = pool ? p.w / 2 : p.w;
  at::Tensor sum_g = at::zeros({p.k}, z.options().dtype(at::kDouble));
  at::Tensor sum_gx = at::zeros({p.k}, z.options().dtype(at::kDouble));
  at::Tensor grad_z = empty_nhwc(p.n, p.k, p.h, p.w, z);
  p.grad_y = grad_y.data_ptr();
  p.z = z.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.invstd = invstd.data_ptr<float>();
  p.gamma = gamma.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.sum_g = sum_g.data_ptr<double>();
  p.sum_gx = sum_gx.data_ptr<double>();
  p.grad_z = grad_z.data_ptr();
  C10_CUDA_CHECK(launch_bn_relu_backward(p, dtype_of(z), c10::cuda::getCurrentCUDAStream()));
  return {grad_z, sum_gx.to(gamma_in.scalar_type()), sum_g.to(beta_in.scalar_type())};
}

}  // namespace vgg_kernels::cuda
