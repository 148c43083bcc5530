// The one schema and binding file of vgg_kernels._C: op schemas (TORCH_LIBRARY), input checks
// whose messages name the argument, and dispatch to the CPU (csrc/cpu/) and CUDA (csrc/cuda/)
// implementations. The semantics of every op are those of vgg_kernels/backends/reference.py;
// fake (meta) kernels for torch.compile live in vgg_kernels/backends/native.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"

namespace vgg_kernels {
namespace {

// VGG_KERNELS_TEST_SLOWDOWN=<factor> (for tests only): a CPU op spins, at its end, until it has
// taken `factor` times its own time. The CPU regression gate's tests use it to show that a
// slower kernel fails the gate (vgg_kernels/bench/gate.py).
class TestSlowdown {
 public:
  explicit TestSlowdown(bool cpu)
      : start_(std::chrono::steady_clock::now()), factor_(cpu ? read_factor() : 1.0) {}
  ~TestSlowdown() {
    if (factor_ <= 1.0) return;
    const auto spent = std::chrono::steady_clock::now() - start_;
    const auto until = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    spent * factor_);
    while (std::chrono::steady_clock::now() < until) {
    }
  }

 private:
  static double read_factor() {
    const char* text = std::getenv("VGG_KERNELS_TEST_SLOWDOWN");
    return text == nullptr ? 1.0 : std::atof(text);
  }
  std::chrono::steady_clock::time_point start_;
  double factor_;
};

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += (i ? ", " : "") + std::to_string(t.size(i));
  }
  return s + (t.dim() == 1 ? ",)" : ")");
}

void check_storage_dtype(const at::Tensor& t, const char* name) {
  if (t.is_cuda()) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
                name, " must be float32, float16 or bfloat16 on CUDA (got ", t.scalar_type(),
                ")");
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 on the CPU (got ",
                t.scalar_type(), ")");
  }
}

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-D tensor (N, C, H, W) (got ", t.dim(),
              "-D shape ", shape_str(t), ")");
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), name, " must be a CPU or CUDA tensor (got ",
              t.device(), ")");
  check_storage_dtype(t, name);
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ",
              ref.device(), " (got ", t.device(), ")");
}

void check_channel_vector(const at::Tensor& t, const char* name, int64_t k,
                          const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, name, " must have shape (", k, ",) (got ",
              shape_str(t), ")");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor (got ", t.scalar_type(), ")");
  check_same_device(t, name, ref, ref_name);
}

void check_pool_size(const at::Tensor& t, const char* name, bool pool) {
  TORCH_CHECK(!pool || t.size(0) == 0 || (t.size(2) >= 2 && t.size(3) >= 2), name,
              " must be at least 2x2 for the fused 2x2 max-pool (got ", t.size(2), "x",
              t.size(3), ")");
}

// x: (N, C, H, W); weight: (K, C, R, R) with R in {1, 3}.
void check_conv(const at::Tensor& x, const at::Tensor& weight) {
  check_activation(x, "x");
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (K, C, R, R) (got ", weight.dim(),
              "-D shape ", shape_str(weight), ")");
  TORCH_CHECK(weight.size(2) == weight.size(3) && (weight.size(2) == 1 || weight.size(2) == 3),
              "weight must have kernel size 3x3 or 1x1 (got ", weight.size(2), "x",
              weight.size(3), ")");
  TORCH_CHECK(x.size(1) == weight.size(1), "x must have ", weight.size(1),
              " channels to match weight (got ", x.size(1), ")");
  TORCH_CHECK(x.size(1) > 0, "x must have at least 1 channel (got 0)");
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least 1 output channel (got 0)");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "weight must be a floating-point tensor (got ", weight.scalar_type(), ")");
  check_same_device(weight, "weight", x, "x");
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t k, bool pool) {
  const int64_t h = x.size(2), w = x.size(3);
  return {x.size(0), k, pool ? h / 2 : h, pool ? w / 2 : w};
}

at::Tensor empty_channels_last(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor stats_zeros(int64_t k, const at::Tensor& like) {
  return at::zeros({k}, like.options().dtype(at::kFloat));
}

// The inference block's arguments: the conv's, a scale and shift per output channel, and an
// input the pool can halve.
void check_infer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                 const at::Tensor& shift, bool pool) {
  check_conv(x, weight);
  const int64_t k = weight.size(0);
  check_channel_vector(scale, "scale", k, x, "x");
  check_channel_vector(shift, "shift", k, x, "x");
  check_pool_size(x, "x", pool);
}

at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool) {
  const TestSlowdown slowdown(x.is_cpu());
  check_infer(x, weight, scale, shift, pool);
  const int64_t k = weight.size(0);
  if (x.numel() == 0) return empty_channels_last(output_shape(x, k, pool), x);
#ifdef VGG_KERNELS_WITH_CUDA
  if (x.is_cuda()) return cuda::conv_bn_relu_infer(x, weight, scale, shift, pool);
#endif
  TORCH_CHECK(x.is_cpu(), "x is a CUDA tensor but vgg_kernels._C was built without CUDA kernels");
  return cpu::conv_bn_relu_infer(x, weight, scale, shift, pool);
}

// The layout (kernel variant and algorithm) the CPU inference block would pack `weight` in for
// input `x`: a key for packed weights kept across calls (vgg_kernels.freeze).
int64_t conv_weight_layout(const at::Tensor& x, const at::Tensor& weight, bool pool) {
  check_conv(x, weight);
  TORCH_CHECK(x.is_cpu(), "conv_weight_layout runs CPU tensors (got ", x.device(), ")");
  return cpu::conv_weight_layout(x, weight, pool);
}

// `weight` packed in `layout` (1-D fp32), or an empty tensor when a packed value is not finite
// (Winograd's transform of an infinite weight): such a weight is packed on every call instead.
at::Tensor pack_conv_weight(const at::Tensor& weight, int64_t layout) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) &&
                  (weight.size(2) == 1 || weight.size(2) == 3),
              "weight must be a (K, C, 3, 3) or (K, C, 1, 1) tensor (got shape ",
              shape_str(weight), ")");
  TORCH_CHECK(weight.is_cpu() && weight.scalar_type() == at::kFloat,
              "weight must be a float32 CPU tensor (got ", weight.scalar_type(), " on ",
              weight.device(), ")");
  std::optional<at::Tensor> packed = cpu::pack_conv_weight(weight, layout);
  return packed.has_value() ? *packed : at::empty({0}, weight.options());
}

// conv_bn_relu_infer on the CPU with `weight` already packed in `layout` (pack_conv_weight);
// where this call chooses another layout, or the input is not finite, it packs as usual.
at::Tensor conv_bn_relu_infer_packed(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, int64_t layout,
                                     const at::Tensor& scale, const at::Tensor& shift,
                                     bool pool) {
  const TestSlowdown slowdown(x.is_cpu());
  check_infer(x, weight, scale, shift, pool);
  const int64_t k = weight.size(0);
  TORCH_CHECK(x.is_cpu(), "conv_bn_relu_infer_packed runs CPU tensors (got ", x.device(), ")");
  TORCH_CHECK(packed.dim() == 1 && packed.is_cpu() && packed.scalar_type() == at::kFloat &&
                  packed.is_contiguous(),
              "packed must be a contiguous 1-D float32 CPU tensor from pack_conv_weight");
  if (x.numel() == 0) return empty_channels_last(output_shape(x, k, pool), x);
  return cpu::conv_bn_relu_infer_packed(x, weight, packed, layout, scale, shift, pool);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const TestSlowdown slowdown(x.is_cpu());
  check_conv(x, weight);
  const int64_t k = weight.size(0);
  if (bias.has_value()) check_channel_vector(*bias, "bias", k, x, "x");
  if (x.numel() == 0) {
    const at::Tensor zeros = at::zeros({k}, x.options().dtype(at::kDouble));
    return {empty_channels_last(output_shape(x, k, false), x), zeros, zeros.clone()};
  }
#ifdef VGG_KERNELS_WITH_CUDA
  if (x.is_cuda()) return cuda::conv_bn_stats(x, weight, bias);
#endif
  TORCH_CHECK(x.is_cpu(), "x is a CUDA tensor but vgg_kernels._C was built without CUDA kernels");
  return cpu::conv_bn_stats(x, weight, bias);
}

at::Tensor bn_relu_pool(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& beta, bool pool) {
  const TestSlowdown slowdown(z.is_cpu());
  check_activation(z, "z");
  const int64_t k = z.size(1);
  check_channel_vector(mean, "mean", k, z, "z");
  check_channel_vector(scale, "scale", k, z, "z");
  check_channel_vector(beta, "beta", k, z, "z");
  check_pool_size(z, "z", pool);
  if (z.numel() == 0) return empty_channels_last(output_shape(z, k, pool), z);
#ifdef VGG_KERNELS_WITH_CUDA
  if (z.is_cuda()) return cuda::bn_relu_pool(z, mean, scale, beta, pool);
#endif
  TORCH_CHECK(z.is_cpu(), "z is a CUDA tensor but vgg_kernels._C was built without CUDA kernels");
  return cpu::bn_relu_pool(z, mean, scale, beta, pool);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& beta, bool pool) {
  const TestSlowdown slowdown(z.is_cpu());
  check_activation(z, "z");
  const int64_t k = z.size(1);
  check_pool_size(z, "z", pool);
  const auto expected = output_shape(z, k, pool);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(expected), "grad_y must have shape ",
              at::IntArrayRef(expected), " (got ", grad_y.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(grad_y.scalar_type()),
              "grad_y must be a floating-point tensor (got ", grad_y.scalar_type(), ")");
  check_same_device(grad_y, "grad_y", z, "z");
  check_channel_vector(mean, "mean", k, z, "z");
  check_channel_vector(invstd, "invstd", k, z, "z");
  check_channel_vector(scale, "scale", k, z, "z");
  check_channel_vector(beta, "beta", k, z, "z");
  if (z.numel() == 0) {
    return {empty_channels_last(z.sizes(), z), stats_zeros(k, z), stats_zeros(k, z),
            stats_zeros(k, z)};
  }
  const at::Tensor grad = grad_y.to(z.scalar_type());
#ifdef VGG_KERNELS_WITH_CUDA
  if (z.is_cuda()) return cuda::bn_relu_backward(grad, z, mean, invstd, scale, beta, pool);
#endif
  TORCH_CHECK(z.is_cpu(), "z is a CUDA tensor but vgg_kernels._C was built without CUDA kernels");
  return cpu::bn_relu_backward(grad, z, mean, invstd, scale, beta, pool);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_infer_outputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, bool pool, bool activation, bool codes) {
  const TestSlowdown slowdown(x.is_cpu());
  check_infer(x, weight, scale, shift, pool);
  TORCH_CHECK(pool || !(activation || codes),
              "activation and codes are outputs of a pooled block (got pool=False)");
  TORCH_CHECK(!activation || (x.size(2) % 2 == 0 && x.size(3) % 2 == 0),
              "x must have even H and W for the activation next to the pool (got ", x.size(2),
              "x", x.size(3), ")");
  TORCH_CHECK(x.is_cpu(), "conv_bn_relu_infer_outputs runs CPU tensors (got ", x.device(), ")");
  return cpu::conv_bn_relu_infer_outputs(x, weight, scale, shift, pool, activation, codes);
}

at::Tensor conv_dgrad(const at::Tensor& grad, const at::Tensor& weight) {
  const TestSlowdown slowdown(grad.is_cpu());
  check_activation(grad, "grad");
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (K, C, R, R) (got ", weight.dim(),
              "-D shape ", shape_str(weight), ")");
  TORCH_CHECK(weight.size(2) == weight.size(3) && (weight.size(2) == 1 || weight.size(2) == 3),
              "weight must have kernel size 3x3 or 1x1 (got ", weight.size(2), "x",
              weight.size(3), ")");
  TORCH_CHECK(grad.size(1) == weight.size(0), "grad must have ", weight.size(0),
              " channels to match weight (got ", grad.size(1), ")");
  check_same_device(weight, "weight", grad, "grad");
  TORCH_CHECK(grad.is_cpu(), "conv_dgrad runs CPU tensors (got ", grad.device(), ")");
  if (grad.numel() == 0) {
    return empty_channels_last({grad.size(0), weight.size(1), grad.size(2), grad.size(3)}, grad);
  }
  return cpu::conv_dgrad(grad, weight);
}

// The weight gradient (K, C, 3, 3) of a 3x3 conv (stride 1, padding 1), CPU fp32: Winograd
// F(3x3, 2x2), or ATen's convolution backward where a transform meets a non-finite value
// (which ATen's sums carry through as PyTorch does).
at::Tensor conv_wgrad(const at::Tensor& grad, const at::Tensor& x) {
  const TestSlowdown slowdown(grad.is_cpu());
  check_activation(grad, "grad");
  check_activation(x, "x");
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(2) == x.size(2) &&
                  grad.size(3) == x.size(3),
              "grad must have x's batch, height and width ", shape_str(x), " (got ",
              shape_str(grad), ")");
  check_same_device(x, "x", grad, "grad");
  TORCH_CHECK(grad.is_cpu(), "conv_wgrad runs CPU tensors (got ", grad.device(), ")");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "conv_wgrad runs float32 tensors (got grad ", grad.scalar_type(), ", x ",
              x.scalar_type(), ")");
  const int64_t k = grad.size(1), c = x.size(1);
  if (grad.numel() == 0 || x.numel() == 0) return at::zeros({k, c, 3, 3}, x.options());
  std::optional<at::Tensor> dw = cpu::conv_wgrad(grad, x);
  if (dw.has_value()) return *dw;
  const at::Tensor shape_only = at::empty({k, c, 3, 3}, x.options());
  return std::get<1>(at::convolution_backward(grad, x, shape_only, std::nullopt, {1, 1}, {1, 1},
                                              {1, 1}, false, {0, 0}, 1,
                                              {false, true, false}));
}

// nn.Linear's forward, x (M, in) W^T + bias, CPU fp32, for a few rows (a classifier at small
// batch; vgg_kernels/layers.py sends it M <= LINEAR_MAX_ROWS).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  const TestSlowdown slowdown(x.is_cpu());
  TORCH_CHECK(x.dim() == 2, "x must be a 2-D tensor (rows, in_features) (got ", x.dim(),
              "-D shape ", shape_str(x), ")");
  TORCH_CHECK(weight.dim() == 2, "weight must be a 2-D tensor (out_features, in_features) (got ",
              weight.dim(), "-D shape ", shape_str(weight), ")");
  TORCH_CHECK(x.size(1) == weight.size(1), "x must have ", weight.size(1),
              " features to match weight (got ", x.size(1), ")");
  check_same_device(weight, "weight", x, "x");
  TORCH_CHECK(x.is_cpu(), "linear runs CPU tensors (got ", x.device(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "linear runs float32 tensors (got x ", x.scalar_type(), ", weight ",
              weight.scalar_type(), ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                weight.size(0), ",) (got ", shape_str(*bias), ")");
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias must be float32 (got ",
                bias->scalar_type(), ")");
    check_same_device(*bias, "bias", x, "x");
  }
  return cpu::linear(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> relu_pool_backward(
    const at::Tensor& grad_y, const at::Tensor& mask, const std::optional<at::Tensor>& grad_a,
    const std::optional<at::Tensor>& act, const at::Tensor& scale, bool pool,
    at::IntArrayRef shape) {
  const TestSlowdown slowdown(grad_y.is_cpu());
  TORCH_CHECK(shape.size() == 4, "shape must be (N, K, H, W) (got ", shape, ")");
  const int64_t n = shape[0], k = shape[1], h = shape[2], w = shape[3];
  const std::vector<int64_t> out = {n, k, pool ? h / 2 : h, pool ? w / 2 : w};
  check_activation(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(out), "grad_y must have shape ",
              at::IntArrayRef(out), " (got ", grad_y.sizes(), ")");
  TORCH_CHECK(mask.sizes() == at::IntArrayRef(out), "mask must have shape ",
              at::IntArrayRef(out), " (got ", mask.sizes(), ")");
  TORCH_CHECK(pool ? mask.scalar_type() == at::kByte : mask.scalar_type() == at::kFloat,
              "mask must be ", pool ? "the pool's uint8 codes" : "the float32 output",
              " (got ", mask.scalar_type(), ")");
  check_same_device(mask, "mask", grad_y, "grad_y");
  TORCH_CHECK(grad_a.has_value() == act.has_value(),
              "grad_a and act must be given together (a tapped activation and its gradient)");
  if (grad_a.has_value()) {
    for (const auto& [tensor, name] : {std::pair{*grad_a, "grad_a"}, std::pair{*act, "act"}}) {
      TORCH_CHECK(tensor.sizes() == at::IntArrayRef({n, k, h, w}), name, " must have shape ",
                  at::IntArrayRef({n, k, h, w}), " (got ", tensor.sizes(), ")");
      TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32 (got ",
                  tensor.scalar_type(), ")");
      check_same_device(tensor, name, grad_y, "grad_y");
    }
  }
  check_channel_vector(scale, "scale", k, grad_y, "grad_y");
  TORCH_CHECK(grad_y.is_cpu(), "relu_pool_backward runs CPU tensors (got ", grad_y.device(), ")");
  return cpu::relu_pool_backward(grad_y, mask, grad_a, act, scale, pool, n, k, h, w);
}

// "cpu=<isa> cuda=<archs>|none": what this build runs (vgg_kernels/backends/native.py reads it).
std::string build_info() {
  std::string info = "cpu=" + cpu::isa();
#ifdef VGG_KERNELS_WITH_CUDA
  info += " cuda=" + cuda::archs();
#else
  info += " cuda=none";
#endif
  return info;
}

// Whether VGG_KERNELS_NATIVE_WGMMA=1 runs fp16/bf16 inference on the current CUDA device's
// Hopper kernel (compute capability 9.0 and a build with 9.0a among its targets).
bool cuda_wgmma_available() {
#ifdef VGG_KERNELS_WITH_CUDA
  return cuda::wgmma_available();
#else
  return false;
#endif
}

// The kernel the last CUDA inference call ran (see cuda::last_infer_kernel); "" without CUDA.
std::string cuda_last_infer_kernel() {
#ifdef VGG_KERNELS_WITH_CUDA
  return cuda::last_infer_kernel();
#else
  return "";
#endif
}

}  // namespace
}  // namespace vgg_kernels

TORCH_LIBRARY(vgg_kernels, m) {
  m.def("conv_bn_relu_infer(Tensor x, Tensor weight, Tensor scale, Tensor shift, bool pool) "
        "-> Tensor");
  m.def("conv_bn_stats(Tensor x, Tensor weight, Tensor? bias) "
        "-> (Tensor z, Tensor mean, Tensor var)");
  m.def("bn_relu_pool(Tensor z, Tensor mean, Tensor scale, Tensor beta, bool pool) -> Tensor");
  m.def("bn_relu_backward(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor scale, "
        "Tensor beta, bool pool) "
        "-> (Tensor grad_z, Tensor grad_gamma, Tensor grad_beta, Tensor grad_bias)");
  m.def("conv_bn_relu_infer_outputs(Tensor x, Tensor weight, Tensor scale, Tensor shift, "
        "bool pool, bool activation, bool codes) -> (Tensor y, Tensor activation, Tensor codes)");
  m.def("conv_weight_layout(Tensor x, Tensor weight, bool pool) -> int");
  m.def("pack_conv_weight(Tensor weight, int layout) -> Tensor");
  m.def("conv_bn_relu_infer_packed(Tensor x, Tensor weight, Tensor packed, int layout, "
        "Tensor scale, Tensor shift, bool pool) -> Tensor");
  m.def("conv_dgrad(Tensor grad, Tensor weight) -> Tensor");
  m.def("conv_wgrad(Tensor grad, Tensor x) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("relu_pool_backward(Tensor grad_y, Tensor mask, Tensor? grad_a, Tensor? act, "
        "Tensor scale, bool pool, int[] shape) -> (Tensor grad_pre, Tensor grad_shift)");
  m.def("build_info() -> str", &vgg_kernels::build_info);
  m.def("cuda_wgmma_available() -> bool", &vgg_kernels::cuda_wgmma_available);
  m.def("cuda_last_infer_kernel() -> str", &vgg_kernels::cuda_last_infer_kernel);
}

TORCH_LIBRARY_IMPL(vgg_kernels, CPU, m) {
  m.impl("conv_bn_relu_infer", &vgg_kernels::conv_bn_relu_infer);
  m.impl("conv_bn_stats", &vgg_kernels::conv_bn_stats);
  m.impl("bn_relu_pool", &vgg_kernels::bn_relu_pool);
  m.impl("bn_relu_backward", &vgg_kernels::bn_relu_backward);
  m.impl("conv_bn_relu_infer_outputs", &vgg_kernels::conv_bn_relu_infer_outputs);
  m.impl("conv_weight_layout", &vgg_kernels::conv_weight_layout);
  m.impl("pack_conv_weight", &vgg_kernels::pack_conv_weight);
  m.impl("conv_bn_relu_infer_packed", &vgg_kernels::conv_bn_relu_infer_packed);
  m.impl("conv_dgrad", &vgg_kernels::conv_dgrad);
  m.impl("conv_wgrad", &vgg_kernels::conv_wgrad);
  m.impl("relu_pool_backward", &vgg_kernels::relu_pool_backward);
  m.impl("linear", &vgg_kernels::linear);
}

#ifdef VGG_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(vgg_kernels, CUDA, m) {
  m.impl("conv_bn_relu_infer", &vgg_kernels::conv_bn_relu_infer);
  m.impl("conv_bn_stats", &vgg_kernels::conv_bn_stats);
  m.impl("bn_relu_pool", &vgg_kernels::bn_relu_pool);
  m.impl("bn_relu_backward", &vgg_kernels::bn_relu_backward);
}
#endif

// `import vgg_kernels._C` runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "vgg_kernels ops, registered under torch.ops.vgg_kernels",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
