// CUDA implementations of the four ops: layout conversion, allocation, the current stream and
// device, and the choice of kernel (tensor cores for fp16/bf16, tf32 or CUDA cores for fp32 by
// torch.backends.cudnn.allow_tf32). Compiled by the host compiler; kernels live in *.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

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

// A per-channel mean (any float dtype; conv_bn_stats gives fp64) as the unevaluated sum hi + lo
// of two fp32 vectors, hi = fp32(mean) and lo = fp32(mean - hi), as reference.split_mean: the
// kernels' (z - hi) - lo is z's deviation to fp32 precision where the mean is large against the
// spread, where one fp32 mean alone would be off by half its ulp.
std::pair<at::Tensor, at::Tensor> split_mean(const at::Tensor& mean) {
  const at::Tensor wide = mean.to(at::kDouble);
  const at::Tensor hi = wide.to(at::kFloat).contiguous();
  return {hi, (wide - hi.to(at::kDouble)).to(at::kFloat).contiguous()};
}

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

// The inference kernels. VGG_KERNELS_NATIVE_WGMMA picks among them for fp16/bf16 (read per
// call, so one process can time every kernel): unset, empty or 0: the WMMA kernel; =1: the
// Hopper wgmma kernel where it applies (conv_wgmma.cu); =halo: also, for 3x3 layers with C a
// multiple of 64, the kernel that copies each input halo once per channel block
// (conv_wgmma_halo.cu) with the pixels as the MMA's M operand; =halo-t: the same with the pixels
// as N; =auto: the fastest of those that apply, timed on the first call per shape (below). In
// every mode but auto, 3x3 layers with at most 7 input channels take the short-reduction kernel
// (conv_narrow.cu) unless a wgmma kernel runs them (padded to 8 channels) or
// VGG_KERNELS_NATIVE_NARROW=0. fp32 always runs on the WMMA (tf32) or CUDA-core kernel.
enum class InferKernel : int { kWmma, kNarrow, kWgmma, kHalo, kHaloT };

const char* kernel_name(InferKernel kernel) {
  switch (kernel) {
    case InferKernel::kNarrow:
      return "narrow";
    case InferKernel::kWgmma:
      return "wgmma";
    case InferKernel::kHalo:
      return "halo";
    case InferKernel::kHaloT:
      return "halo-t";
    default:
      return "wmma";
  }
}

enum class WgmmaMode { kOff, kPlain, kHalo, kHaloT, kAuto };

WgmmaMode wgmma_mode() {
  const char* value = std::getenv("VGG_KERNELS_NATIVE_WGMMA");
  if (value == nullptr || *value == '\0') return WgmmaMode::kOff;
  const std::string text(value);
  if (text == "0") return WgmmaMode::kOff;
  if (text == "1") return WgmmaMode::kPlain;
  if (text == "halo") return WgmmaMode::kHalo;
  if (text == "halo-t") return WgmmaMode::kHaloT;
  TORCH_CHECK(text == "auto",
              "environment variable VGG_KERNELS_NATIVE_WGMMA must be 0, 1, halo, halo-t or auto "
              "(got '", text, "')");
  return WgmmaMode::kAuto;
}

// VGG_KERNELS_NATIVE_WGMMA_TILE=64|128|256 fixes the wgmma kernels' output channels per CTA
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
// RGB first layer) off the short-reduction kernel; unset, empty or 1: it may run them.
bool narrow_enabled() {
  const char* value = std::getenv("VGG_KERNELS_NATIVE_NARROW");
  if (value == nullptr || *value == '\0') return true;
  const std::string text(value);
  TORCH_CHECK(text == "0" || text == "1",
              "environment variable VGG_KERNELS_NATIVE_NARROW must be 0 or 1 (got '", text, "')");
  return text == "1";
}

// The WMMA kernel family (and the CUDA-core fp32 kernel), for inference and the training forward.
// fp32 runs as tf32 when `tf32`: cuDNN's switch for convolutions (allow_tf32), which callers
// pass so that fp32 results match cuDNN's.
void launch_wmma(const ConvParams& p, at::ScalarType dtype, ConvMode mode, cudaStream_t stream,
                 bool tf32) {
  cudaError_t status;
  switch (dtype) {
    case at::kHalf:
      status = launch_conv_fp16(p, mode, stream);
      break;
    case at::kBFloat16:
      status = launch_conv_bf16(p, mode, stream);
      break;
    default:
      status = tf32 ? launch_conv_tf32(p, mode, stream) : launch_conv_fp32(p, mode, stream);
  }
  C10_CUDA_CHECK(status);
}

// The wgmma kernel copies 16-byte chunks of 8 channels, so it takes C multiples of 8. A layer
// with fewer channels (the RGB first layer) gets its input and weights zero-padded to 8 for it:
// 16-byte copies instead of the WMMA kernel's per-element loads, for 8/C times the (small)
// tensor-core work.
constexpr int64_t kWgmmaChannels = 8;

// One inference call in the kernels' layouts: x NHWC (channels_last), weight KRSC in x's dtype,
// fp32 scale and shift, the output y.
struct InferCall {
  at::Tensor x, weight_krsc, scale, shift, y;
  bool pool;
};

ConvParams infer_params(const at::Tensor& x, const at::Tensor& weight_krsc,
                        const InferCall& call) {
  ConvParams p = conv_params(x, weight_krsc, call.pool);
  p.scale = call.scale.data_ptr<float>();
  p.shift = call.shift.data_ptr<float>();
  p.y = call.y.data_ptr();
  return p;
}

bool applies(InferKernel kernel, const InferCall& call, cudaStream_t stream) {
  if (kernel == InferKernel::kWmma) return true;
  if (call.x.scalar_type() == at::kFloat) return false;
  const ConvParams p = infer_params(call.x, call.weight_krsc, call);
  const DType type = dtype_of(call.x);
  switch (kernel) {
    case InferKernel::kNarrow:
      return narrow_enabled() && conv_narrow_supported(p, type);
    case InferKernel::kWgmma:
      return p.c < kWgmmaChannels ? p.k % kWgmmaChannels == 0 && wgmma_runs_here(stream)
                                  : conv_wgmma_supported(p, type, stream);
    default:
      return conv_wgmma_halo_supported(p, type, stream);
  }
}

void run(InferKernel kernel, const InferCall& call, cudaStream_t stream) {
  const DType type = dtype_of(call.x);
  ConvParams p = infer_params(call.x, call.weight_krsc, call);
  switch (kernel) {
    case InferKernel::kNarrow: {
      // the flattened (k, 9 c) weight, zero-padded to the kernel's row pitch
      const at::Tensor padded = at::constant_pad_nd(call.weight_krsc.reshape({p.k, p.kdim}),
                                                    {0, kNarrowWeightPitch - p.kdim})
                                    .contiguous();
      p.weight = padded.data_ptr();
      C10_CUDA_CHECK(launch_conv_narrow(p, type, stream));
      return;
    }
    case InferKernel::kWgmma:
      if (p.c < kWgmmaChannels) {
        const int64_t extra = kWgmmaChannels - p.c;
        // pad the channel (last) dimension of the NHWC views; back to NCHW-shaped channels_last
        const at::Tensor x = at::constant_pad_nd(call.x.permute({0, 2, 3, 1}), {0, extra})
                                 .contiguous()
                                 .permute({0, 3, 1, 2});
        const at::Tensor weight = at::constant_pad_nd(call.weight_krsc, {0, extra}).contiguous();
        C10_CUDA_CHECK(launch_conv_wgmma(infer_params(x, weight, call), type,
                                         wgmma_tile_override(), stream));
        return;
      }
      C10_CUDA_CHECK(launch_conv_wgmma(p, type, wgmma_tile_override(), stream));
      return;
    case InferKernel::kHalo:
    case InferKernel::kHaloT:
      C10_CUDA_CHECK(launch_conv_wgmma_halo(p, type, kernel == InferKernel::kHaloT,
                                            wgmma_tile_override(), stream));
      return;
    default:
      launch_wmma(p, call.x.scalar_type(), ConvMode::kInfer, stream,
                  at::globalContext().allowTF32CuDNN());
  }
}

InferKernel first_applying(std::initializer_list<InferKernel> order, const InferCall& call,
                           cudaStream_t stream) {
  for (const InferKernel kernel : order) {
    if (applies(kernel, call, stream)) return kernel;
  }
  return InferKernel::kWmma;
}

// VGG_KERNELS_NATIVE_WGMMA=auto, as torch.backends.cudnn.benchmark does for cuDNN: the first
// call per (device, shape, dtype, pool, switches) runs every kernel that applies once, then
// three more times under CUDA events, and keeps the one with the shortest run; later calls run
// the kept one. A kernel whose launch fails leaves the race with a warning. A call during CUDA
// graph capture cannot be timed: it runs the kernel the default mode would, unless a choice is
// already kept.
struct TuneKey {
  int device;
  int64_t n, c, h, w, k;
  int r;
  bool pool, narrow;
  int dtype, tile;
  bool operator==(const TuneKey& o) const {
    return device == o.device && n == o.n && c == o.c && h == o.h && w == o.w && k == o.k &&
           r == o.r && pool == o.pool && narrow == o.narrow && dtype == o.dtype && tile == o.tile;
  }
};

struct TuneKeyHash {
  size_t operator()(const TuneKey& key) const {
    size_t seed = 0;
    for (const int64_t v : {static_cast<int64_t>(key.device), key.n, key.c, key.h, key.w, key.k,
                            static_cast<int64_t>(key.r), static_cast<int64_t>(key.pool),
                            static_cast<int64_t>(key.narrow), static_cast<int64_t>(key.dtype),
                            static_cast<int64_t>(key.tile)}) {
      seed ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
    }
    return seed;
  }
};

std::mutex tune_mutex;
std::unordered_map<TuneKey, InferKernel, TuneKeyHash> tuned_kernels;

// The shortest of three timed runs (after one untimed run), in milliseconds.
float time_runs(InferKernel kernel, const InferCall& call, cudaStream_t stream) {
  struct Events {  // destroyed on every path, a throwing launch included
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
      if (start != nullptr) cudaEventDestroy(start);
      if (stop != nullptr) cudaEventDestroy(stop);
    }
  } events;
  C10_CUDA_CHECK(cudaEventCreate(&events.start));
  C10_CUDA_CHECK(cudaEventCreate(&events.stop));
  run(kernel, call, stream);
  float best = std::numeric_limits<float>::infinity();
  for (int i = 0; i < 3; ++i) {
    C10_CUDA_CHECK(cudaEventRecord(events.start, stream));
    run(kernel, call, stream);
    C10_CUDA_CHECK(cudaEventRecord(events.stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(events.stop));
    float ms = 0.0f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, events.start, events.stop));
    best = std::min(best, ms);
  }
  return best;
}

InferKernel tuned_kernel(const InferCall& call, cudaStream_t stream) {
  const TuneKey key{static_cast<int>(call.x.get_device()), call.x.size(0), call.x.size(1),
                    call.x.size(2), call.x.size(3), call.weight_krsc.size(0),
                    static_cast<int>(call.weight_krsc.size(1)), call.pool, narrow_enabled(),
                    static_cast<int>(call.x.scalar_type()), wgmma_tile_override()};
  {
    const std::lock_guard<std::mutex> lock(tune_mutex);
    const auto found = tuned_kernels.find(key);
    if (found != tuned_kernels.end()) return found->second;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    return first_applying({InferKernel::kNarrow, InferKernel::kWmma}, call, stream);
  }
  InferKernel best = InferKernel::kWmma;
  float best_ms = std::numeric_limits<float>::infinity();
  for (const InferKernel kernel : {InferKernel::kWmma, InferKernel::kNarrow, InferKernel::kWgmma,
                                   InferKernel::kHalo, InferKernel::kHaloT}) {
    if (!applies(kernel, call, stream)) continue;
    float ms;
    try {
      ms = time_runs(kernel, call, stream);
    } catch (const c10::Error& error) {
      // a kernel that cannot launch here (its error is not sticky: the context still works)
      // leaves the race, with one warning that says why
      TORCH_WARN("vgg_kernels: VGG_KERNELS_NATIVE_WGMMA=auto leaves out the ", kernel_name(kernel),
                 " kernel, which failed: ", error.what_without_backtrace());
      continue;
    }
    if (ms < best_ms) {
      best_ms = ms;
      best = kernel;
    }
  }
  const std::lock_guard<std::mutex> lock(tune_mutex);
  tuned_kernels[key] = best;
  return best;
}

InferKernel choose(const InferCall& call, cudaStream_t stream) {
  if (call.x.scalar_type() == at::kFloat) return InferKernel::kWmma;
  switch (wgmma_mode()) {
    case WgmmaMode::kPlain:
      return first_applying({InferKernel::kWgmma, InferKernel::kNarrow}, call, stream);
    case WgmmaMode::kHalo:
      return first_applying({InferKernel::kHalo, InferKernel::kWgmma, InferKernel::kNarrow},
                            call, stream);
    case WgmmaMode::kHaloT:
      return first_applying({InferKernel::kHaloT, InferKernel::kWgmma, InferKernel::kNarrow},
                            call, stream);
    case WgmmaMode::kAuto:
      return tuned_kernel(call, stream);
    default:
      return first_applying({InferKernel::kNarrow}, call, stream);
  }
}

std::atomic<int> last_kernel{-1};

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

std::string last_infer_kernel() {
  const int kernel = last_kernel.load();
  return kernel < 0 ? "" : kernel_name(static_cast<InferKernel>(kernel));
}

at::Tensor conv_bn_relu_infer(const at::Tensor& x_in, const at::Tensor& weight,
                              const at::Tensor& scale_in, const at::Tensor& shift_in, bool pool) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  InferCall call;
  call.x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  call.weight_krsc = weight.to(x_in.scalar_type()).permute({0, 2, 3, 1}).contiguous();
  call.scale = fp32_vector(scale_in);
  call.shift = fp32_vector(shift_in);
  call.pool = pool;
  const int64_t h = call.x.size(2), w = call.x.size(3);
  call.y = empty_nhwc(call.x.size(0), call.weight_krsc.size(0), pool ? h / 2 : h,
                      pool ? w / 2 : w, call.x);
  const InferKernel kernel = choose(call, stream);
  run(kernel, call, stream);
  last_kernel.store(static_cast<int>(kernel));
  return call.y;
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
  // One row of shifted sums per row tile of the kernel launch_wmma runs (see ConvParams); the
  // tf32 switch is read once, so the buffers' tiling and the launched kernel agree.
  const bool tf32 = at::globalContext().allowTF32CuDNN();
  const int64_t tile_rows = conv_stats_rows_per_cta(dtype_of(x), tf32);
  const int64_t row_tiles = (p.rows + tile_rows - 1) / tile_rows;
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat);
  at::Tensor tile_shift = at::empty({row_tiles, p.k}, fp32);
  at::Tensor tile_sum = at::empty({row_tiles, p.k}, fp32);
  at::Tensor tile_sumsq = at::empty({row_tiles, p.k}, fp32);
  p.y = z.data_ptr();
  p.tile_shift = tile_shift.data_ptr<float>();
  p.tile_sum = tile_sum.data_ptr<float>();
  p.tile_sumsq = tile_sumsq.data_ptr<float>();
  launch_wmma(p, x.scalar_type(), ConvMode::kStats, c10::cuda::getCurrentCUDAStream(), tf32);
  // In fp64 (deterministic ATen reductions): each tile's mean_t = z0 + S1 / n_t and
  // m2_t = S2 - S1^2 / n_t (>= 0 but for rounding; clamp_min keeps NaN), then Chan's parallel
  // formula: mean = sum n_t mean_t / N, M2 = sum m2_t + sum n_t (mean_t - mean)^2, var = M2 / N.
  const int64_t last_rows = p.rows - (row_tiles - 1) * tile_rows;
  at::Tensor counts = at::full({row_tiles, 1}, static_cast<double>(tile_rows),
                               x.options().dtype(at::kDouble));
  counts.narrow(0, row_tiles - 1, 1).fill_(static_cast<double>(last_rows));
  const at::Tensor sums = tile_sum.to(at::kDouble);
  const at::Tensor means = tile_shift.to(at::kDouble) + sums / counts;
  const at::Tensor m2 = (tile_sumsq.to(at::kDouble) - sums.square() / counts).clamp_min(0.0);
  const double total = static_cast<double>(p.rows);
  const at::Tensor mean = (counts * means).sum(0) / total;
  const at::Tensor spread = m2.sum(0) + (counts * (means - mean).square()).sum(0);
  return {z, mean, spread / total};  // fp64: the mean's low bits matter (split_mean)
}

at::Tensor bn_relu_pool(const at::Tensor& z_in, const at::Tensor& mean_in,
                        const at::Tensor& scale_in, const at::Tensor& beta_in, bool pool) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto [mean_hi, mean_lo] = split_mean(mean_in);
  const at::Tensor scale = fp32_vector(scale_in), beta = fp32_vector(beta_in);
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
  p.mean_hi = mean_hi.data_ptr<float>();
  p.mean_lo = mean_lo.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.y = y.data_ptr();
  C10_CUDA_CHECK(launch_bn_relu_pool(p, dtype_of(z), c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const at::Tensor& scale_in, const at::Tensor& beta_in,
    bool pool) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto [mean_hi, mean_lo] = split_mean(mean_in);
  const at::Tensor invstd = fp32_vector(invstd_in);
  const at::Tensor scale = fp32_vector(scale_in), beta = fp32_vector(beta_in);
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
  p.mean_hi = mean_hi.data_ptr<float>();
  p.mean_lo = mean_lo.data_ptr<float>();
  p.invstd = invstd.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.sum_g = sum_g.data_ptr<double>();
  p.sum_gx = sum_gx.data_ptr<double>();
  p.grad_z = grad_z.data_ptr();
  C10_CUDA_CHECK(launch_bn_relu_backward(p, dtype_of(z), c10::cuda::getCurrentCUDAStream()));
  // the conv bias's gradient: a reduction of grad_z (the native CUDA path is the fallback;
  // the Triton backend takes it from its reduction pass's sums)
  at::Tensor grad_bias = grad_z.sum({0, 2, 3}, /*keepdim=*/false, at::kFloat);
  return {grad_z, sum_gx.to(at::kFloat), sum_g.to(at::kFloat), grad_bias};
}

}  // namespace vgg_kernels::cuda
