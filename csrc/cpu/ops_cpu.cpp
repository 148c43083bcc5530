// CPU implementations of the four ops (fp32, NHWC): conv work split over at::parallel_for
// (OpenMP in torch's builds), conv kernels from the best instruction-set variant this CPU runs
// (conv_kernels_impl.h), and the two elementwise training ops as plain loops.
//
// Environment knobs, read on every call (tests switch them):
//   VGG_KERNELS_CPU_ISA   avx512 | avx2 | generic   (default: the best this CPU supports)
//   VGG_KERNELS_CPU_CONV  direct | winograd | auto   (default auto, see choose_winograd)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../ops.h"
#include "conv_kernels.h"

namespace vgg_kernels::cpu {
namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma");
  }
  if (std::strcmp(feature, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return std::strcmp(feature, "generic") == 0;
}

const KernelTable& kernel_table() {
  static const KernelTable* const best = [] {
    if (kernels_avx512() != nullptr && cpu_has("avx512")) return kernels_avx512();
    if (kernels_avx2() != nullptr && cpu_has("avx2")) return kernels_avx2();
    return kernels_generic();
  }();
  const char* asked = std::getenv("VGG_KERNELS_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return *best;
  const std::string name(asked);
  const KernelTable* table = name == "avx512"  ? kernels_avx512()
                             : name == "avx2"  ? kernels_avx2()
                             : name == "generic" ? kernels_generic()
                                                 : nullptr;
  TORCH_CHECK(table != nullptr || name == "avx512" || name == "avx2",
              "environment variable VGG_KERNELS_CPU_ISA must be avx512, avx2 or generic (got '",
              name, "')");
  TORCH_CHECK(table != nullptr && cpu_has(name.c_str()),
              "environment variable VGG_KERNELS_CPU_ISA asks for ", name,
              " kernels, which this build or CPU does not have");
  return *table;
}

// Winograd F(2x2, 3x3) does 2.25x fewer multiplies but pays for transforms and a 16/9 larger
// packed weight. Measured on a 2-core Zen 4 at batch 4, channels_last weights (direct vs
// Winograd, BN/ReLU/pool included): VGG16 at 112x112 18.1 vs 9.9 ms (64 -> 64, 112x112),
// 19.8 vs 11.9 ms (512 -> 512, 14x14), 7.0 vs 6.0 ms (7x7); at 56x56 -> 64 channels it wins from
// 4 input channels up (0.59 vs 0.51 ms at c = 4, 2.77 vs 1.40 ms at c = 32). Only the 3-channel
// first layer is faster direct (1.5 vs 2.1 ms): its 27-long reduction needs no transform.
bool choose_winograd(int64_t c, int r) {
  const char* asked = std::getenv("VGG_KERNELS_CPU_CONV");
  const std::string mode = asked == nullptr ? "auto" : asked;
  TORCH_CHECK(mode == "auto" || mode == "direct" || mode == "winograd" || mode.empty(),
              "environment variable VGG_KERNELS_CPU_CONV must be auto, direct or winograd (got '",
              mode, "')");
  if (r != 3) return false;
  if (mode == "direct") return false;
  if (mode == "winograd") return true;
  return c >= 4;
}

// A (panels * panel_width,) fp32 copy of a per-channel vector, zero past k, so the kernels load
// whole vectors at the channel tail.
at::Tensor padded_channels(const at::Tensor& t, int64_t panels, int64_t panel_width) {
  at::Tensor out = at::zeros({panels * panel_width}, t.options().dtype(at::kFloat));
  out.narrow(0, 0, t.size(0)).copy_(t);
  return out;
}

struct PreparedConv {
  ConvArgs args;
  ConvPlan plan;
  bool winograd;
  bool weights_finite;  // false: a Winograd-transformed weight is not finite (run direct)
  const KernelTable* table;
  at::Tensor x, weight, packed, scale, shift;  // keep the buffers the args point into alive
};

// `winograd`: whether choose_winograd may pick the Winograd algorithm (false: direct).
PreparedConv prepare_conv(const at::Tensor& x_in, const at::Tensor& weight_in, bool pool,
                          Epilogue epilogue, bool winograd = true) {
  PreparedConv prep;
  prep.table = &kernel_table();
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  // Any memory format: the packers read the weight through its strides (no copy).
  prep.weight = weight_in.to(at::kFloat);
  ConvArgs& a = prep.args;
  a.n = x.size(0);
  a.c = x.size(1);
  a.h = x.size(2);
  a.w = x.size(3);
  a.k = prep.weight.size(0);
  a.r = static_cast<int>(prep.weight.size(2));
  a.stride_wk = prep.weight.stride(0);
  a.stride_wc = prep.weight.stride(1);
  a.stride_wr = prep.weight.stride(2);
  a.stride_ws = prep.weight.stride(3);
  a.pool = pool;
  a.out_h = pool ? a.h / 2 : a.h;
  a.out_w = pool ? a.w / 2 : a.w;
  a.epilogue = epilogue;
  a.threads = at::get_num_threads();
  prep.winograd = winograd && choose_winograd(a.c, a.r);
  if (prep.winograd || a.r == 1) {
    prep.x = x;
    a.x_h = a.h;
    a.x_w = a.w;
  } else {
    // Zero border of one pixel, so the direct kernel's taps need no bounds checks.
    prep.x = at::zeros({a.n, a.h + 2, a.w + 2, a.c}, x.options());
    prep.x.narrow(1, 1, a.h).narrow(2, 1, a.w).copy_(x.permute({0, 2, 3, 1}));
    a.x_h = a.h + 2;
    a.x_w = a.w + 2;
  }
  a.x = prep.x.data_ptr<float>();
  prep.plan = prep.winograd ? prep.table->plan_winograd(a) : prep.table->plan_direct(a);
  prep.packed = at::empty({prep.plan.packed_floats}, x.options());
  const float* w = prep.weight.data_ptr<float>();
  float* packed = prep.packed.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, prep.plan.panels, 1, [&](int64_t begin, int64_t end) {
    if (prep.winograd) {
      if (!prep.table->pack_winograd(prep.args, w, packed, begin, end)) finite = false;
    } else {
      prep.table->pack_direct(prep.args, w, packed, begin, end);
    }
  });
  prep.weights_finite = finite;
  a.packed_weight = packed;
  return prep;
}

// Runs every work item of `prep`; `stats` (nullable) holds threads x 3 x k doubles (see
// merge_moments). Threads take items from a shared counter rather than fixed ranges: on a shared
// machine one descheduled thread then delays the op by an item, not by half of it. Returns false
// when an item could not carry a non-finite input through its algorithm (Winograd), or the
// packed weights are not finite: the outputs are then wrong and the caller runs direct.
bool run_conv(const PreparedConv& prep, double* stats) {
  if (!prep.weights_finite) return false;
  const auto run = prep.winograd ? prep.table->run_winograd : prep.table->run_direct;
  const int64_t scratch_floats = prep.plan.scratch_floats;
  const int64_t k = prep.args.k;
  const int64_t items = prep.plan.items;
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1,
                   [&](int64_t, int64_t) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    double* thread_stats = stats == nullptr ? nullptr : stats + at::get_thread_num() * 3 * k;
    for (int64_t item = next.fetch_add(1); item < items && ok; item = next.fetch_add(1)) {
      if (!run(prep.args, item, scratch.data(), thread_stats)) ok = false;
    }
  });
  return ok;
}

at::Tensor empty_nhwc(int64_t n, int64_t c, int64_t h, int64_t w, const at::Tensor& like) {
  return at::empty({n, c, h, w}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// Runs the conv of `x` and `weight` with `epilogue`; `setup` points the prepared args at the
// epilogue's vectors and output. Winograd's transforms cannot carry an infinity through
// (Inf - Inf = NaN where the convolution gives +-inf): when the input or the weights are not
// finite, the conv runs again with the direct algorithm, whose sums are the convolution's.
template <typename Setup>
void run_with_fallback(const at::Tensor& x, const at::Tensor& weight, bool pool,
                       Epilogue epilogue, double* stats, int64_t stats_doubles,
                       const Setup& setup) {
  PreparedConv prep = prepare_conv(x, weight, pool, epilogue);
  setup(prep);
  if (run_conv(prep, stats) || !prep.winograd) return;
  if (stats != nullptr) std::fill(stats, stats + stats_doubles, 0.0);
  PreparedConv direct = prepare_conv(x, weight, pool, epilogue, /*winograd=*/false);
  setup(direct);
  run_conv(direct, stats);
}

}  // namespace

std::string isa() { return kernel_table().isa; }

at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  at::Tensor y = empty_nhwc(n, weight.size(0), pool ? h / 2 : h, pool ? w / 2 : w, x);
  run_with_fallback(x, weight, pool, Epilogue::kScaleShiftReLU, nullptr, 0,
                    [&](PreparedConv& prep) {
    const int64_t width = prep.table->panel_width;
    prep.scale = padded_channels(scale, prep.plan.panels, width);
    prep.shift = padded_channels(shift, prep.plan.panels, width);
    prep.args.scale = prep.scale.data_ptr<float>();
    prep.args.shift = prep.shift.data_ptr<float>();
    prep.args.y = y.data_ptr<float>();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t k = weight.size(0);
  at::Tensor z = empty_nhwc(x.size(0), k, x.size(2), x.size(3), x);
  const int64_t threads = at::get_num_threads();
  // Per-thread fp64 (count, mean, m2) rows, merged below: see merge_moments.
  at::Tensor partial = at::zeros({threads, 3, k}, x.options().dtype(at::kDouble));
  double* stats = partial.data_ptr<double>();
  run_with_fallback(x, weight, false, Epilogue::kBiasStats, stats, partial.numel(),
                    [&](PreparedConv& prep) {
    if (bias.has_value()) {
      prep.shift = padded_channels(*bias, prep.plan.panels, prep.table->panel_width);
      prep.args.shift = prep.shift.data_ptr<float>();
    } else {
      prep.args.shift = nullptr;
    }
    prep.args.scale = nullptr;
    prep.args.y = z.data_ptr<float>();
  });
  // fp64 results: the mean's low bits matter when it is large against the spread (split_mean)
  at::Tensor mean = at::empty({k}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({k}, x.options().dtype(at::kDouble));
  double* mean_p = mean.data_ptr<double>();
  double* var_p = var.data_ptr<double>();
  for (int64_t c = 0; c < k; ++c) {
    double count = 0.0, mu = 0.0, m2 = 0.0;
    for (int64_t t = 0; t < threads; ++t) {
      const double* row = stats + t * 3 * k;
      merge_moments(&count, &mu, &m2, row[c], row[k + c], row[2 * k + c]);
    }
    mean_p[c] = mu;
    var_p[c] = count > 0.0 ? m2 / count : 0.0;
  }
  return {z, mean, var};
}

namespace {

// The batch mean per channel as an unevaluated sum hi + lo of two floats (hi = fp32(mean),
// lo = fp32(mean - hi)): z - hi is exact for z near the mean (Sterbenz), so (z - hi) - lo is z's
// deviation to fp32 precision even where the mean is 1e4 or more times the spread, where one
// fp32 mean alone would be off by half its ulp.
struct SplitMean {
  std::vector<float> hi, lo;
};

SplitMean split_mean(const at::Tensor& mean_in) {
  const at::Tensor mean = mean_in.to(at::kDouble).contiguous();
  const double* m = mean.data_ptr<double>();
  SplitMean split{std::vector<float>(mean.numel()), std::vector<float>(mean.numel())};
  for (int64_t c = 0; c < mean.numel(); ++c) {
    split.hi[c] = static_cast<float>(m[c]);
    split.lo[c] = static_cast<float>(m[c] - static_cast<double>(split.hi[c]));
  }
  return split;
}

inline float centered(float z, float hi, float lo) {
  const float rough = z - hi;
  return rough - lo;
}

// The training block's pre-activation (z - mean) * scale + beta, scale = gamma * invstd, as
// centered(), a multiply and an add, each rounded in fp32 (this file is compiled with
// -ffp-contract=off, csrc/build.py, so no FMA contracts them). bn_relu_pool and
// bn_relu_backward both take their ReLU mask and pool maxima from this one expression, so they
// agree on every mask.
inline float bn_pre(float z, float hi, float lo, float scale, float beta) {
  const float scaled = centered(z, hi, lo) * scale;
  return scaled + beta;
}

// ReLU that keeps NaN (as torch.relu): std::max(v, 0) returns v when v is NaN.
inline float relu(float v) { return std::max(v, 0.0f); }

// max that is NaN when either operand is (nn.MaxPool2d's semantics).
inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

}  // namespace

at::Tensor bn_relu_pool(const at::Tensor& z_in, const at::Tensor& mean_in,
                        const at::Tensor& scale_in, const at::Tensor& beta_in, bool pool) {
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const SplitMean mean = split_mean(mean_in);
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor beta = beta_in.to(at::kFloat).contiguous();
  const int64_t n = z.size(0), k = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t oh = pool ? h / 2 : h, ow = pool ? w / 2 : w;
  at::Tensor y = empty_nhwc(n, k, oh, ow, z);
  const float* zp = z.data_ptr<float>();
  const float* hi = mean.hi.data();
  const float* lo = mean.lo.data();
  const float* sp = scale.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // One output row (n, oh) per iteration: reads its one or two input rows once.
  at::parallel_for(0, n * oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / oh, r = row % oh;
      float* out = yp + row * ow * k;
      if (!pool) {
        const float* in = zp + row * w * k;
        for (int64_t col = 0; col < w; ++col) {
          for (int64_t c = 0; c < k; ++c) {
            out[col * k + c] = relu(bn_pre(in[col * k + c], hi[c], lo[c], sp[c], bp[c]));
          }
        }
        continue;
      }
      const float* top = zp + ((b * h + 2 * r) * w) * k;
      const float* bottom = top + w * k;
      for (int64_t col = 0; col < ow; ++col) {
        const float* t0 = top + 2 * col * k;
        const float* b0 = bottom + 2 * col * k;
        float* o = out + col * k;
        for (int64_t c = 0; c < k; ++c) {
          const float v00 = relu(bn_pre(t0[c], hi[c], lo[c], sp[c], bp[c]));
          const float v01 = relu(bn_pre(t0[k + c], hi[c], lo[c], sp[c], bp[c]));
          const float v10 = relu(bn_pre(b0[c], hi[c], lo[c], sp[c], bp[c]));
          const float v11 = relu(bn_pre(b0[k + c], hi[c], lo[c], sp[c], bp[c]));
          o[c] = max_nan(max_nan(v00, v01), max_nan(v10, v11));
        }
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const at::Tensor& scale_in, const at::Tensor& beta_in,
    bool pool) {
  const at::Tensor z = z_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const SplitMean mean = split_mean(mean_in);
  const at::Tensor invstd = invstd_in.to(at::kFloat).contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor beta = beta_in.to(at::kFloat).contiguous();
  const int64_t n = z.size(0), k = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t oh = pool ? h / 2 : h, ow = pool ? w / 2 : w;
  const float* zp = z.data_ptr<float>();
  const float* gp = grad_y.data_ptr<float>();
  const float* hi = mean.hi.data();
  const float* lo = mean.lo.data();
  const float* ip = invstd.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();

  // g(element) = gradient reaching the BN output: grad_y through the pool (to the first maximum
  // of each 2x2 window in row-major order, as PyTorch's max-pool does) times the ReLU mask, both
  // from bn_pre as bn_relu_pool computed them. Calls visit(h, w, c, g, xhat) for every element
  // of rows [h0, h1) of image b with g != 0 or `all` set; elements a floor-mode pool never reads
  // get g = 0.
  auto for_each_element = [&](int64_t b, int64_t h0, int64_t h1, bool all, auto&& visit) {
    for (int64_t hh = h0; hh < h1; ++hh) {
      for (int64_t ww = 0; ww < w; ++ww) {
        const float* zrow = zp + ((b * h + hh) * w + ww) * k;
        const bool in_window = !pool || (hh < 2 * oh && ww < 2 * ow);
        for (int64_t c = 0; c < k; ++c) {
          const float xhat = centered(zrow[c], hi[c], lo[c]) * ip[c];
          float g = 0.0f;
          if (in_window && bn_pre(zrow[c], hi[c], lo[c], sp[c], bp[c]) > 0.0f) {
            if (!pool) {
              g = gp[((b * h + hh) * w + ww) * k + c];
            } else {
              const int64_t ph = hh / 2, pw = ww / 2;
              const float* corner = zp + ((b * h + 2 * ph) * w + 2 * pw) * k + c;
              const int64_t offsets[4] = {0, k, w * k, w * k + k};
              int best = 0;
              float best_value = 0.0f;
              for (int q = 0; q < 4; ++q) {
                const float act = relu(bn_pre(corner[offsets[q]], hi[c], lo[c], sp[c], bp[c]));
                if (q == 0 || act > best_value) {
                  best = q;
                  best_value = act;
                }
              }
              const int mine = static_cast<int>((hh % 2) * 2 + (ww % 2));
              if (best == mine) g = gp[((b * oh + ph) * ow + pw) * k + c];
            }
          }
          if (g != 0.0f || all) visit(hh, ww, c, g, xhat);
        }
      }
    }
  };

  // Pass 1: per-channel sum of g and of g * xhat (fp64 per-thread partials).
  const int64_t rows = n * h;
  at::Tensor partial = at::zeros({at::get_num_threads(), 2, k}, z.options().dtype(at::kDouble));
  double* partial_p = partial.data_ptr<double>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    double* sum_g = partial_p + at::get_thread_num() * 2 * k;
    double* sum_gx = sum_g + k;
    for (int64_t row = begin; row < end; ++row) {
      for_each_element(row / h, row % h, row % h + 1, false,
                       [&](int64_t, int64_t, int64_t c, float g, float xhat) {
                         sum_g[c] += g;
                         sum_gx[c] += static_cast<double>(g) * xhat;
                       });
    }
  });
  const at::Tensor sums = partial.sum(0);
  const at::Tensor grad_beta = sums[0].to(at::kFloat).contiguous();
  const at::Tensor grad_gamma = sums[1].to(at::kFloat).contiguous();

  // Pass 2: grad_z = scale * (g - (sum g + xhat * sum g xhat) / count), scale = gamma * invstd.
  const double count = static_cast<double>(n * h * w);
  std::vector<float> mean_g(k), mean_gx(k);
  const double* sums_p = sums.data_ptr<double>();
  for (int64_t c = 0; c < k; ++c) {
    mean_g[c] = static_cast<float>(sums_p[c] / count);
    mean_gx[c] = static_cast<float>(sums_p[k + c] / count);
  }
  at::Tensor grad_z = empty_nhwc(n, k, h, w, z);
  float* out = grad_z.data_ptr<float>();
  // and per-thread fp64 sums of grad_z: the conv bias's gradient, from the same pass
  at::Tensor bias_partial = at::zeros({at::get_num_threads(), k}, partial.options());
  double* bias_p = bias_partial.data_ptr<double>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    double* sum_z = bias_p + at::get_thread_num() * k;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h;
      for_each_element(b, row % h, row % h + 1, true,
                       [&](int64_t hh, int64_t ww, int64_t c, float g, float xhat) {
                         const float value = sp[c] * (g - mean_g[c] - xhat * mean_gx[c]);
                         out[((b * h + hh) * w + ww) * k + c] = value;
                         sum_z[c] += value;
                       });
    }
  });
  return {grad_z, grad_gamma, grad_beta, bias_partial.sum(0).to(at::kFloat)};
}

}  // namespace vgg_kernels::cpu
