// CPU implementations of the four ops (fp32, NHWC): conv work split over at::parallel_for
// (OpenMP in torch's builds), conv kernels from the best instruction-set variant this CPU runs
// (conv_kernels_impl.h), and the two elementwise training ops as plain loops.
//
// Environment knobs, read on every call (tests switch them):
//   VGG_KERNELS_CPU_ISA   avx512 | avx2 | generic   (default: the best this CPU supports)
//   VGG_KERNELS_CPU_CONV  direct | winograd | winograd4 | auto   (default auto, see
//                         choose_algorithm; winograd is F(2x2, 3x3), winograd4 F(4x4, 3x3))
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>
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

enum class Algorithm { kDirect, kWinograd2, kWinograd4 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether F(4x4, 3x3) beats F(2x2, 3x3) on this conv: its weight transform writes 36 / 16 as
// many values, once per call, while its GEMMs do 2.25 / 4 as many multiplies per output pixel,
// so it needs pixels (P = N * H * W) to pay, the more the wider the layer. Measured on a 2-core
// Zen 4 (python benchmarks/profile_cpu_convs.py forward; ms, F(2x2) / F(4x4) / oneDNN's conv
// alone): 64 -> 64 at batch 4, 112x112 with pool 7.09 / 4.92 / 9.18; 128 -> 128 at 56x56 with
// pool 5.62 / 4.38 / 8.84; 256 -> 256 at 28x28 (P 3136) 5.68 / 4.79 / 9.35; 128 -> 128 at 32x32
// (P 4096) 2.52 / 2.00; but 256 -> 256 at 16x16 (P 1024) 2.88 / 3.86, 512 -> 512 at 14x14
// 9.22 / 15.38 / 11.90, and at batch 1, 28x28 8.84 / 12.80.
bool winograd4_pays(const ConvArgs& a) {
  const int64_t pixels = a.n * a.h * a.w;
  return pixels >= 8192 || (pixels >= 2048 && a.c * a.k < 512 * 512);
}

Algorithm choose_algorithm(const ConvArgs& a) {
  const char* asked = std::getenv("VGG_KERNELS_CPU_CONV");
  const std::string mode = asked == nullptr ? "auto" : asked;
  TORCH_CHECK(mode == "auto" || mode == "direct" || mode == "winograd" || mode == "winograd4" ||
                  mode.empty(),
              "environment variable VGG_KERNELS_CPU_CONV must be auto, direct, winograd or "
              "winograd4 (got '", mode, "')");
  if (a.r != 3 || mode == "direct") return Algorithm::kDirect;
  if (mode == "winograd") return Algorithm::kWinograd2;
  if (mode == "winograd4") return Algorithm::kWinograd4;
  if (a.c < 4) return Algorithm::kDirect;
  return winograd4_pays(a) ? Algorithm::kWinograd4 : Algorithm::kWinograd2;
}


// A (panels * panel_width,) fp32 copy of a per-channel vector, zero past k, so the kernels load
// whole vectors at the channel tail.
at::Tensor padded_channels(const at::Tensor& t, int64_t panels, int64_t panel_width) {
  at::Tensor out = at::zeros({panels * panel_width}, t.options().dtype(at::kFloat));
  out.narrow(0, 0, t.size(0)).copy_(t);
  return out;
}

// A buffer of at least `floats` floats that the calling thread reuses from call to call (it
// grows, and is freed with the thread). The packed weights of a wide layer pass glibc's largest
// mmap threshold (32 MB: 512 -> 512 channels in F(4x4) pack 37.7 MB), so a fresh buffer per
// call was a fresh mapping whose page faults cost 7 ms per call on the 2-core Zen 4 (measured:
// allocating and touching 37.7 MB against touching it again, 7.2 against 0.8 ms). It holds
// scratch only: nothing in it outlives the call that filled it.
float* thread_buffer(std::vector<float>& buffer, int64_t floats) {
  if (static_cast<int64_t>(buffer.size()) < floats) {
    std::vector<float>().swap(buffer);  // free first: the old and new never coexist
    buffer.resize(static_cast<size_t>(floats));
  }
  return buffer.data();
}

float* packed_workspace(int64_t floats) {
  thread_local std::vector<float> buffer;
  return thread_buffer(buffer, floats);
}

float* item_scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  return thread_buffer(buffer, floats);
}

struct PreparedConv {
  ConvArgs args;
  ConvPlan plan;
  Algorithm algorithm;
  bool weights_finite;  // false: a Winograd-transformed weight is not finite (run direct)
  const KernelTable* table;
  at::Tensor x, weight, scale, shift, packed;  // keep the buffers the args point into alive
};

ConvPlan plan_for(const KernelTable& table, Algorithm algorithm, const ConvArgs& a) {
  return algorithm == Algorithm::kWinograd4   ? table.plan_winograd4(a)
         : algorithm == Algorithm::kWinograd2 ? table.plan_winograd(a)
                                              : table.plan_direct(a);
}

// Packs `weight` (strides in `a`) for `algorithm` into `packed` (plan.panels panels, in
// parallel); false when a Winograd-transformed value is not finite.
bool pack_for(const KernelTable& table, Algorithm algorithm, const ConvArgs& a,
              const ConvPlan& plan, const float* weight, float* packed) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, plan.panels, 1, [&](int64_t begin, int64_t end) {
    if (algorithm == Algorithm::kWinograd4) {
      if (!table.pack_winograd4(a, weight, packed, begin, end)) finite = false;
    } else if (algorithm == Algorithm::kWinograd2) {
      if (!table.pack_winograd(a, weight, packed, begin, end)) finite = false;
    } else {
      table.pack_direct(a, weight, packed, begin, end);
    }
  });
  return finite;
}

// The packed weight's layout: which kernel table (instruction set) and algorithm packed it.
int64_t layout_of(const KernelTable* table, Algorithm algorithm) {
  const int64_t isa = table == kernels_avx512() ? 2 : table == kernels_avx2() ? 1 : 0;
  return isa * 4 + static_cast<int64_t>(algorithm);
}

// `winograd`: whether choose_algorithm may pick a Winograd algorithm (false: direct).
// `dgrad`: convolve with the weight transposed (its input channels as outputs) and flipped in
// space, the conv whose output is the input gradient of a conv with `weight_in` (the packers
// read it through negative strides: no copy).
// `prepacked` (defined): the weight already packed in layout `prepacked_layout` (pack_weight);
// used when that is the layout this call chooses, else the weight is packed as usual.
PreparedConv prepare_conv(const at::Tensor& x_in, const at::Tensor& weight_in, bool pool,
                          Epilogue epilogue, bool winograd = true, bool dgrad = false,
                          const at::Tensor& prepacked = {}, int64_t prepacked_layout = -1) {
  PreparedConv prep;
  prep.table = &kernel_table();
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  // Any memory format: the packers read the weight through its strides (no copy).
  prep.weight = weight_in.to(at::kFloat);
  const at::Tensor& wt = prep.weight;
  ConvArgs& a = prep.args;
  a.n = x.size(0);
  a.c = x.size(1);
  a.h = x.size(2);
  a.w = x.size(3);
  a.k = dgrad ? wt.size(1) : wt.size(0);
  a.r = static_cast<int>(wt.size(2));
  a.stride_wk = dgrad ? wt.stride(1) : wt.stride(0);
  a.stride_wc = dgrad ? wt.stride(0) : wt.stride(1);
  a.stride_wr = dgrad ? -wt.stride(2) : wt.stride(2);
  a.stride_ws = dgrad ? -wt.stride(3) : wt.stride(3);
  a.pool = pool;
  a.out_h = pool ? a.h / 2 : a.h;
  a.out_w = pool ? a.w / 2 : a.w;
  a.epilogue = epilogue;
  a.threads = at::get_num_threads();
  a.activation = nullptr;
  a.codes = nullptr;
  prep.algorithm = winograd ? choose_algorithm(a) : Algorithm::kDirect;
  const bool transformed = prep.algorithm != Algorithm::kDirect;
  if (transformed || a.r == 1) {
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
  prep.plan = plan_for(*prep.table, prep.algorithm, a);
  if (prepacked.defined() && !dgrad && prepacked_layout == layout_of(prep.table, prep.algorithm) &&
      prepacked.numel() == prep.plan.packed_floats) {
    prep.packed = prepacked;
    prep.weights_finite = true;  // pack_weight packs finite weights only
    a.packed_weight = prepacked.data_ptr<float>();
    return prep;
  }
  // the calling thread's workspace: valid until its next prepare_conv (see run_with_fallback)
  float* packed = packed_workspace(prep.plan.packed_floats);
  // dgrad: tap (r, s) reads the weight's tap (R - 1 - r, R - 1 - s)
  const float* w = prep.weight.data_ptr<float>() +
                   (dgrad ? (a.r - 1) * (wt.stride(2) + wt.stride(3)) : 0);
  prep.weights_finite = pack_for(*prep.table, prep.algorithm, a, prep.plan, w, packed);
  a.packed_weight = packed;
  return prep;
}

// Runs every work item of `prep`; `stats` (nullable) receives 3 x k doubles, the (count, mean,
// m2) rows of merge_moments. Threads take items from a shared counter rather than fixed ranges:
// on a shared machine one descheduled thread then delays the op by an item, not by half of it.
// Which thread runs which item varies, so each item keeps its own statistics and they are
// merged here in item order: the same rounding, so the same bits, on every run. Returns false
// when an item could not carry a non-finite input through its algorithm (Winograd), or the
// packed weights are not finite: the outputs are then wrong and the caller runs direct.
bool run_conv(const PreparedConv& prep, double* stats) {
  if (!prep.weights_finite) return false;
  const auto run = prep.algorithm == Algorithm::kWinograd4 ? prep.table->run_winograd4
                   : prep.algorithm == Algorithm::kWinograd2 ? prep.table->run_winograd
                                                             : prep.table->run_direct;
  const int64_t scratch_floats = prep.plan.scratch_floats;
  const int64_t k = prep.args.k;
  const int64_t items = prep.plan.items;
  std::vector<double> item_stats(stats == nullptr ? 0 : static_cast<size_t>(items * 3 * k));
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1,
                   [&](int64_t, int64_t) {
    float* scratch = item_scratch(scratch_floats);
    for (int64_t item = next.fetch_add(1); item < items && ok; item = next.fetch_add(1)) {
      double* own = stats == nullptr ? nullptr : item_stats.data() + item * 3 * k;
      if (!run(prep.args, item, scratch, own)) ok = false;
    }
  });
  if (stats != nullptr && ok) {
    for (int64_t item = 0; item < items; ++item) {
      const double* row = item_stats.data() + item * 3 * k;
      for (int64_t c = 0; c < k; ++c) {
        merge_moments(stats + c, stats + k + c, stats + 2 * k + c, row[c], row[k + c],
                      row[2 * k + c]);
      }
    }
  }
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
                       const Setup& setup, bool dgrad = false, const at::Tensor& prepacked = {},
                       int64_t prepacked_layout = -1) {
  PreparedConv prep = prepare_conv(x, weight, pool, epilogue, /*winograd=*/true, dgrad,
                                   prepacked, prepacked_layout);
  setup(prep);
  if (run_conv(prep, stats) || prep.algorithm == Algorithm::kDirect) return;
  if (stats != nullptr) std::fill(stats, stats + stats_doubles, 0.0);
  PreparedConv direct = prepare_conv(x, weight, pool, epilogue, /*winograd=*/false, dgrad);
  setup(direct);
  run_conv(direct, stats);
}

}  // namespace

std::string isa() { return kernel_table().isa; }

namespace {

// The scale/shift epilogues: kScaleShiftReLU (with pool, and the pool's extra outputs where
// `activation`/`codes` are defined) or kScaleShift.
at::Tensor run_scale_shift(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& shift, bool pool, Epilogue epilogue,
                           const at::Tensor& activation, const at::Tensor& codes,
                           bool dgrad = false, const at::Tensor& prepacked = {},
                           int64_t prepacked_layout = -1) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t k = dgrad ? weight.size(1) : weight.size(0);
  at::Tensor y = empty_nhwc(n, k, pool ? h / 2 : h, pool ? w / 2 : w, x);
  run_with_fallback(x, weight, pool, epilogue, nullptr, 0, [&](PreparedConv& prep) {
    const int64_t width = prep.table->panel_width;
    prep.scale = padded_channels(scale, prep.plan.panels, width);
    prep.shift = padded_channels(shift, prep.plan.panels, width);
    prep.args.scale = prep.scale.data_ptr<float>();
    prep.args.shift = prep.shift.data_ptr<float>();
    prep.args.y = y.data_ptr<float>();
    prep.args.activation = activation.defined() ? activation.data_ptr<float>() : nullptr;
    prep.args.codes = codes.defined() ? codes.data_ptr<uint8_t>() : nullptr;
  }, dgrad, prepacked, prepacked_layout);
  return y;
}

}  // namespace

at::Tensor conv_bn_relu_infer(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scale, const at::Tensor& shift, bool pool) {
  return run_scale_shift(x, weight, scale, shift, pool, Epilogue::kScaleShiftReLU, {}, {});
}

int64_t conv_weight_layout(const at::Tensor& x, const at::Tensor& weight, bool pool) {
  ConvArgs a{};
  a.n = x.size(0);
  a.c = x.size(1);
  a.h = x.size(2);
  a.w = x.size(3);
  a.k = weight.size(0);
  a.r = static_cast<int>(weight.size(2));
  a.pool = pool;
  a.threads = at::get_num_threads();
  return layout_of(&kernel_table(), choose_algorithm(a));
}

std::optional<at::Tensor> pack_conv_weight(const at::Tensor& weight_in, int64_t layout) {
  const KernelTable* table = &kernel_table();
  const int64_t algorithm = layout % 4;
  TORCH_CHECK(layout >= 0 && algorithm <= 2 &&
                  layout == layout_of(table, static_cast<Algorithm>(algorithm)),
              "layout ", layout, " is not a layout of the ", table->isa,
              " kernels this process runs (see conv_weight_layout)");
  const at::Tensor weight = weight_in.to(at::kFloat);
  ConvArgs a{};
  a.c = weight.size(1);
  a.k = weight.size(0);
  a.r = static_cast<int>(weight.size(2));
  a.stride_wk = weight.stride(0);
  a.stride_wc = weight.stride(1);
  a.stride_wr = weight.stride(2);
  a.stride_ws = weight.stride(3);
  a.n = 1;
  a.h = a.w = 4;
  a.out_h = a.out_w = 4;
  a.threads = at::get_num_threads();
  const auto kind = static_cast<Algorithm>(algorithm);
  const ConvPlan plan = plan_for(*table, kind, a);
  at::Tensor packed = at::empty({plan.packed_floats}, weight.options());
  if (!pack_for(*table, kind, a, plan, weight.data_ptr<float>(), packed.data_ptr<float>())) {
    return std::nullopt;
  }
  return packed;
}

at::Tensor conv_bn_relu_infer_packed(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, int64_t layout,
                                     const at::Tensor& scale, const at::Tensor& shift,
                                     bool pool) {
  return run_scale_shift(x, weight, scale, shift, pool, Epilogue::kScaleShiftReLU, {}, {},
                         /*dgrad=*/false, packed, layout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_infer_outputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, bool pool, bool activation, bool codes) {
  const int64_t n = x.size(0), k = weight.size(0), h = x.size(2), w = x.size(3);
  const at::Tensor act = activation ? empty_nhwc(n, k, h, w, x) : at::Tensor();
  const at::Tensor code =
      codes ? at::empty({n, k, h / 2, w / 2},
                        x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast))
            : at::Tensor();
  at::Tensor y = run_scale_shift(x, weight, scale, shift, pool, Epilogue::kScaleShiftReLU, act,
                                 code);
  const at::Tensor empty = at::empty({0}, x.options());
  return {y, act.defined() ? act : empty,
          code.defined() ? code : at::empty({0}, x.options().dtype(at::kByte))};
}

at::Tensor conv_dgrad(const at::Tensor& grad, const at::Tensor& weight) {
  const int64_t c = weight.size(1);
  const at::Tensor ones = at::ones({c}, grad.options().dtype(at::kFloat));
  return run_scale_shift(grad, weight, ones, at::zeros_like(ones), false, Epilogue::kScaleShift,
                         {}, {}, /*dgrad=*/true);
}

// Bytes of transformed input and output gradient per tile chunk of the Winograd weight gradient
// (two buffers of 16 values per tile and channel): the tiles are processed in chunks that fit,
// their GEMMs adding to M in chunk order.
constexpr int64_t kWgradChunkBytes = 16 << 20;

std::optional<at::Tensor> conv_wgrad(const at::Tensor& grad_in, const at::Tensor& x_in) {
  const KernelTable& table = kernel_table();
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  WgradArgs a;
  a.n = x.size(0);
  a.c = x.size(1);
  a.h = x.size(2);
  a.w = x.size(3);
  a.k = grad.size(1);
  a.tiles_h = ceil_div(a.h, 2);
  a.tiles_w = ceil_div(a.w, 2);
  a.panels = ceil_div(a.k, table.panel_width);
  a.x = x.data_ptr<float>();
  a.grad = grad.data_ptr<float>();
  const int64_t tiles = a.n * a.tiles_h * a.tiles_w;
  const int64_t per_tile = 16 * (a.c + a.panels * table.panel_width);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(
      tiles, kWgradChunkBytes / static_cast<int64_t>(sizeof(float)) / per_tile));
  thread_local std::vector<float> transformed, sums;
  float* v = thread_buffer(transformed, chunk * per_tile);
  a.v = v;
  a.g = v + 16 * chunk * a.c;
  a.m = thread_buffer(sums, 16 * a.c * a.panels * table.panel_width);
  at::Tensor dw = at::empty({a.k, a.c, 3, 3}, x.options());
  a.dw = dw.data_ptr<float>();
  const int64_t items = table.wgrad_items(a);
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    a.t0 = t0;
    a.count = std::min(chunk, tiles - t0);
    std::atomic<bool> finite{true};
    at::parallel_for(0, a.count, 16, [&](int64_t begin, int64_t end) {
      if (!table.wgrad_transform_input(a, begin, end)) finite = false;
      if (!table.wgrad_transform_grad(a, begin, end)) finite = false;
    });
    if (!finite) return std::nullopt;  // Inf - Inf in a transform: the caller's algorithm
    const bool accumulate = t0 > 0;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) table.wgrad_gemm(a, item, accumulate);
    });
  }
  at::parallel_for(0, a.c, 8, [&](int64_t begin, int64_t end) {
    table.wgrad_output(a, begin, end);
  });
  return dw;
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in) {
  const KernelTable& table = kernel_table();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  LinearArgs a;
  a.m = x.size(0);
  a.in = x.size(1);
  a.out = weight.size(0);
  a.x = x.data_ptr<float>();
  a.ldx = a.in;
  a.w = weight.data_ptr<float>();
  a.ldw = a.in;
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.ldy = a.out;
  if (a.m == 0 || a.out == 0) return y;
  at::parallel_for(0, ceil_div(a.out, 2), 8, [&](int64_t begin, int64_t end) {
    table.linear_rows(a, 2 * begin, std::min(a.out, 2 * end));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t k = weight.size(0);
  at::Tensor z = empty_nhwc(x.size(0), k, x.size(2), x.size(3), x);
  // fp64 (count, mean, m2) rows: see merge_moments and run_conv
  at::Tensor partial = at::zeros({3, k}, x.options().dtype(at::kDouble));
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
    const double count = stats[c];
    mean_p[c] = stats[k + c];
    var_p[c] = count > 0.0 ? stats[2 * k + c] / count : 0.0;
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
  const KernelTable& table = kernel_table();
  const int64_t n = z.size(0), k = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t width = table.panel_width;
  const int64_t panels = ceil_div(k, width);
  // per-channel vectors zero-padded to whole vectors (the kernels load them whole)
  const SplitMean mean = split_mean(mean_in);
  const at::Tensor hi = padded_channels(at::from_blob(const_cast<float*>(mean.hi.data()), {k},
                                                      z.options()), panels, width);
  const at::Tensor lo = padded_channels(at::from_blob(const_cast<float*>(mean.lo.data()), {k},
                                                      z.options()), panels, width);
  const at::Tensor invstd = padded_channels(invstd_in, panels, width);
  const at::Tensor scale = padded_channels(scale_in, panels, width);
  const at::Tensor beta = padded_channels(beta_in, panels, width);
  BnBackwardArgs args{};
  args.n = n;
  args.k = k;
  args.h = h;
  args.w = w;
  args.out_h = pool ? h / 2 : h;
  args.out_w = pool ? w / 2 : w;
  args.pool = pool;
  args.z = z.data_ptr<float>();
  args.grad_y = grad_y.data_ptr<float>();
  args.hi = hi.data_ptr<float>();
  args.lo = lo.data_ptr<float>();
  args.invstd = invstd.data_ptr<float>();
  args.scale = scale.data_ptr<float>();
  args.beta = beta.data_ptr<float>();
  const int64_t rows = n * args.out_h;
  const int64_t threads = at::get_num_threads();

  // Pass 1: per-thread fp64 sums of g and g * xhat (parallel_for's static split: the same
  // partial sums, added in the same order, on every run).
  at::Tensor partial = at::zeros({threads, 2, k}, z.options().dtype(at::kDouble));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(2 * panels * width));
    table.bn_backward_reduce(args, begin, end, partial.data_ptr<double>() +
                                                   at::get_thread_num() * 2 * k, row.data());
  });
  const at::Tensor sums = partial.sum(0);
  const double count = static_cast<double>(n * h * w);
  const at::Tensor mean_g = padded_channels(sums[0] / count, panels, width);
  const at::Tensor mean_gx = padded_channels(sums[1] / count, panels, width);

  // Pass 2: grad_z, and per-thread fp64 sums of it (the conv bias's gradient).
  args.mean_g = mean_g.data_ptr<float>();
  args.mean_gx = mean_gx.data_ptr<float>();
  at::Tensor grad_z = empty_nhwc(n, k, h, w, z);
  args.grad_z = grad_z.data_ptr<float>();
  at::Tensor bias_partial = at::zeros({threads, k}, partial.options());
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(panels * width));
    table.bn_backward_apply(args, begin, end, bias_partial.data_ptr<double>() +
                                                  at::get_thread_num() * k, row.data());
  });
  return {grad_z, sums[1].to(at::kFloat), sums[0].to(at::kFloat),
          bias_partial.sum(0).to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> relu_pool_backward(
    const at::Tensor& grad_y_in, const at::Tensor& mask_in,
    const std::optional<at::Tensor>& grad_a_in, const std::optional<at::Tensor>& act_in,
    const at::Tensor& scale_in, bool pool, int64_t n, int64_t k, int64_t h, int64_t w) {
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mask = mask_in.contiguous(at::MemoryFormat::ChannelsLast);
  const bool tapped = grad_a_in.has_value() && act_in.has_value();
  const at::Tensor grad_a =
      tapped ? grad_a_in->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor act = tapped ? act_in->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const KernelTable& table = kernel_table();
  const int64_t panels = ceil_div(k, table.panel_width);
  const at::Tensor scale = padded_channels(scale_in, panels, table.panel_width);
  at::Tensor grad_pre = empty_nhwc(n, k, h, w, grad_y);
  MaskedGradientArgs args{};
  args.n = n;
  args.k = k;
  args.h = h;
  args.w = w;
  args.out_h = pool ? h / 2 : h;
  args.out_w = pool ? w / 2 : w;
  args.pool = pool;
  args.grad_y = grad_y.data_ptr<float>();
  args.y = pool ? nullptr : mask.data_ptr<float>();
  args.codes = pool ? mask.data_ptr<uint8_t>() : nullptr;
  args.grad_a = tapped ? grad_a.data_ptr<float>() : nullptr;
  args.act = tapped ? act.data_ptr<float>() : nullptr;
  args.scale = scale.data_ptr<float>();
  args.grad_pre = grad_pre.data_ptr<float>();
  // per-thread fp64 sums of g (the shift's gradient), parallel_for's static split: the same
  // partial sums in the same order on every run
  at::Tensor partial = at::zeros({at::get_num_threads(), k}, grad_y.options().dtype(at::kDouble));
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(panels * table.panel_width));
    table.masked_gradient(args, begin, end,
                          partial.data_ptr<double>() + at::get_thread_num() * k, row.data());
  });
  return {grad_pre, partial.sum(0).to(at::kFloat)};
}

}  // namespace vgg_kernels::cpu
