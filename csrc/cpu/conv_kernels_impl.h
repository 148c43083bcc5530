// Body of the CPU conv kernels, instantiated once per instruction set. Included by
// conv_kernels_{avx512,avx2,generic}.cpp inside `namespace vgg_kernels::cpu::<isa>` after they
// define:
//   struct Vec          one SIMD register of fp32: V, kWidth, zero, load, store, bcast,
//                       fma(a, b, c) = a * b + c, add, sub, mul, max (b where either is NaN,
//                       as x86 maxps), select_nan(a, b) (a where a is NaN, else b),
//                       select_eq / select_gt(a, b, x, y) (x where a == b / a > b, else y)
//   kRows, kPanelVectors  the register tile: kRows output pixels x kPanelVectors vectors of
//                       output channels (kPanelWidth = kPanelVectors * kWidth channels)
// and after including <algorithm>, <cstdint>, <cstring>. No header may be included from here:
// everything below is compiled for that file's instruction set only.
//
// Both algorithms are GEMMs over NHWC data whose rows are output pixels (or Winograd tiles) and
// whose columns are output channels, with the BN/ReLU/pool (or bias/statistics) epilogue applied
// to the fp32 accumulator while the tile is still in cache:
//   direct    implicit GEMM on a zero-padded input; reduction over r*r taps x c channels.
//   winograd  F(2x2, 3x3): 16 GEMMs of (tiles x c) x (c x k) in the transformed domain, 2.25x
//             fewer multiplies than direct. Each 4x4 input tile gives a 2x2 output block, which
//             is exactly one 2x2 pooling window, so the pool fuses into the output transform.
//   winograd4 F(4x4, 3x3): 36 GEMMs, 4x fewer multiplies than direct; each 6x6 input tile
//             gives a 4x4 output block, four whole pooling windows.

constexpr int64_t kPanelWidth = kPanelVectors * Vec::kWidth;
// Blocking (measured on a 2-core Zen 4, VGG16's 3x3 layers at batch 4, 112x112: depth blocks of
// 64/128/256, Winograd blocks of 24/48/96 tiles and channel chunks of 128/256 all land within 5%
// of each other, the run-to-run noise, so these are the middle choices):
// output channels a work item computes (a multiple of kPanelWidth), which bounds its scratch;
constexpr int64_t kChannelChunk = 256;
// Winograd tiles per work item: 48 tiles x 512 channels keeps one transformed-input slab (96 KB)
// in L2 while the 16 GEMMs reuse it across weight panels;
constexpr int64_t kWinogradTiles = 8 * kRows;
// reduction depth per pass over a weight panel: 128 x 64 fp32 weights = 32 KB, about L1's size.
constexpr int64_t kDepthBlock = 128;

using V = typename Vec::V;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t panels_of(const ConvArgs& args) { return ceil_div(args.k, kPanelWidth); }

// Output-channel panels per work item: up to kChannelChunk channels, fewer when that leaves under
// 4 items per thread (VGG's 7x7 layers at batch 4 have 64 Winograd tiles: 2 tile blocks x 2
// chunks left one of 2 threads with a third of the work).
inline int64_t chunk_panels_of(const ConvArgs& args, int64_t row_blocks) {
  int64_t chunk = std::min(panels_of(args), std::max<int64_t>(1, kChannelChunk / kPanelWidth));
  while (chunk > 1 && row_blocks * ceil_div(panels_of(args), chunk) < 4 * args.threads) {
    chunk = ceil_div(chunk, 2);
  }
  return chunk;
}

// Stores the first `count` lanes of `value` (count < kWidth at the channel tail).
inline void store_partial(float* out, V value, int64_t count) {
  float lanes[Vec::kWidth];
  Vec::store(lanes, value);
  std::memcpy(out, lanes, sizeof(float) * static_cast<size_t>(count));
}

inline void store_lanes(float* out, V value, int64_t count) {
  if (count >= Vec::kWidth) {
    Vec::store(out, value);
  } else {
    store_partial(out, value, count);
  }
}

// ---------------------------------------------------------------------------------------------
// Register-tiled GEMM: out[i][0:kPanelWidth] (+)= sum over c < depth of
// a[i * lda + c] * b[c * kPanelWidth : +kPanelWidth], for i < M. `b` is one packed weight panel
// (or one tap of it); rows of `a` are M pixels (stride lda). With `accumulate` the tile adds to
// `out`: the direct conv sums its r*r taps that way, so no fp32 sum runs longer than c terms
// (one 9*c-long running sum had 4x torch's error at c = 130).
template <int M>
void micro_tile(const float* a, int64_t lda, int64_t depth, const float* b, float* out,
                int64_t ldc, bool accumulate) {
  V acc[M][kPanelVectors];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) acc[i][v] = Vec::zero();
  }
  for (int64_t c = 0; c < depth; ++c) {
    V bv[kPanelVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) bv[v] = Vec::load(b + v * Vec::kWidth);
    b += kPanelWidth;
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const V ai = Vec::bcast(a[i * lda + c]);
#pragma GCC unroll 8
      for (int v = 0; v < kPanelVectors; ++v) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) {
      float* o = out + i * ldc + v * Vec::kWidth;
      Vec::store(o, accumulate ? Vec::add(Vec::load(o), acc[i][v]) : acc[i][v]);
    }
  }
}

using MicroTileFn = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t, bool);

template <int... Ms>
struct MicroTileTable {
  static constexpr MicroTileFn fns[sizeof...(Ms)] = {&micro_tile<Ms + 1>...};
};

template <int... Is>
constexpr const MicroTileFn* micro_tiles(std::integer_sequence<int, Is...>) {
  return MicroTileTable<Is...>::fns;
}

// micro_tile<m> for 1 <= m <= kRows (the row tail of a block).
inline MicroTileFn micro_tile_for(int64_t m) {
  return micro_tiles(std::make_integer_sequence<int, kRows>{})[m - 1];
}

// Runs the GEMM for `rows` rows of `a` (stride lda) against panels [p0, p1), writing
// out[row * ldc + (p - p0) * kPanelWidth + j]. The reduction runs over `ntaps` taps (offsets into
// `a`) of `depth` values each, in blocks of kDepthBlock so that the weight block in use
// (kDepthBlock x kPanelWidth floats) stays in L1 while every row block of the panel passes over
// it; partial sums accumulate in `out`, which stays in L1/L2.
inline void gemm_rows(const float* a, int64_t rows, int64_t lda, const int64_t* taps, int ntaps,
                      int64_t depth, const float* packed, int64_t panel_stride, int64_t p0,
                      int64_t p1, float* out, int64_t ldc) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* b = packed + p * panel_stride;
    float* out_p = out + (p - p0) * kPanelWidth;
    for (int t = 0; t < ntaps; ++t) {
      for (int64_t d0 = 0; d0 < depth; d0 += kDepthBlock) {
        const int64_t dn = std::min(kDepthBlock, depth - d0);
        const float* bt = b + (t * depth + d0) * kPanelWidth;
        const bool accumulate = t > 0 || d0 > 0;
        for (int64_t i = 0; i < rows; i += kRows) {
          const int64_t m = std::min<int64_t>(kRows, rows - i);
          micro_tile_for(m)(a + i * lda + taps[t] + d0, lda, dn, bt, out_p + i * ldc, ldc,
                            accumulate);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue helpers on one vector of channels [kg, kg + kWidth), `count` of them valid.

// Whether every lane of v is finite (x - x is 0 for finite x, NaN for an infinity or NaN).
inline bool all_finite(V v) {
  float lanes[Vec::kWidth];
  Vec::store(lanes, Vec::sub(v, v));
  bool finite = true;
  for (int i = 0; i < Vec::kWidth; ++i) finite = finite && lanes[i] == 0.0f;
  return finite;
}

// ReLU that keeps NaN, as torch.relu does: Vec::max returns its second operand when either is
// NaN (x86 maxps), so the value goes second.
inline V relu(V v) { return Vec::max(Vec::zero(), v); }

// max(a, b) that is NaN when either is (nn.MaxPool2d's semantics).
inline V max_nan(V a, V b) { return Vec::select_nan(a, Vec::max(a, b)); }

inline V max4_nan(V a, V b, V c, V d) { return max_nan(max_nan(a, b), max_nan(c, d)); }

// The pool's extra outputs (ConvArgs::activation, ::codes) for one vector of channels of a 2x2
// window: the four activations a[q] (row-major) at NHWC offsets full[q] in the activation, and
// the code at pooled offset `pooled`.
inline void store_pool_extras(const ConvArgs& args, const V (&a)[4], const int64_t (&full)[4],
                              int64_t pooled, V best, int64_t lanes) {
  if (args.activation != nullptr) {
    for (int q = 0; q < 4; ++q) store_lanes(args.activation + full[q], a[q], lanes);
  }
  if (args.codes == nullptr) return;
  V code = Vec::bcast(255.0f);
  for (int q = 3; q >= 0; --q) code = Vec::select_eq(a[q], best, Vec::bcast(q), code);
  code = Vec::select_gt(best, Vec::zero(), code, Vec::bcast(255.0f));
  float lanes_out[Vec::kWidth];
  Vec::store(lanes_out, code);
  for (int64_t j = 0; j < std::min<int64_t>(lanes, Vec::kWidth); ++j) {
    args.codes[pooled + j] = static_cast<uint8_t>(lanes_out[j]);
  }
}

inline V bn_relu(V acc, const ConvArgs& args, int64_t kg) {
  return relu(Vec::fma(acc, Vec::load(args.scale + kg), Vec::load(args.shift + kg)));
}

// kScaleShiftReLU, or kScaleShift (no ReLU).
inline V epilogue(V acc, const ConvArgs& args, int64_t kg) {
  const V affine = Vec::fma(acc, Vec::load(args.scale + kg), Vec::load(args.shift + kg));
  return args.epilogue == Epilogue::kScaleShift ? affine : relu(affine);
}

inline V add_bias(V acc, const ConvArgs& args, int64_t kg) {
  return args.shift == nullptr ? acc : Vec::add(acc, Vec::load(args.shift + kg));
}

// An item's statistics: per channel of its chunk, z0 (its first pixel's z) and fp32 sums of
// z - z0 and (z - z0)^2 over its pixels (see merge_moments). Full vectors: lanes past k hold
// zeros from the zero-padded weight panels and bias.
struct ItemStats {
  float* shift;
  float* sum;
  float* sumsq;
  int64_t count = 0;  // pixels added (the same for every channel of the item)

  ItemStats(float* scratch, int64_t kc)
      : shift(scratch), sum(scratch + kc), sumsq(scratch + 2 * kc) {
    std::fill(scratch, scratch + 3 * kc, 0.0f);
  }

  // z of one pixel, channels [kk, kk + kWidth) of the chunk; `first` on the item's first pixel.
  void add(int64_t kk, V z, bool first) {
    if (first) Vec::store(shift + kk, z);
    const V d = Vec::sub(z, Vec::load(shift + kk));
    Vec::store(sum + kk, Vec::add(Vec::load(sum + kk), d));
    Vec::store(sumsq + kk, Vec::fma(d, d, Vec::load(sumsq + kk)));
  }

  // Merges channels [0, kvalid) into the thread's (count, mean, m2) rows at channel k0.
  void flush(const ConvArgs& args, int64_t k0, int64_t kvalid, double* stats) const {
    if (count == 0) return;
    const double n = static_cast<double>(count);
    for (int64_t j = 0; j < kvalid; ++j) {
      const double s = sum[j];
      const double m2 = std::max(static_cast<double>(sumsq[j]) - s * (s / n), 0.0);
      const int64_t k = k0 + j;
      merge_moments(stats + k, stats + args.k + k, stats + 2 * args.k + k, n, shift[j] + s / n,
                    m2);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Direct algorithm. Work item = (image, row group, channel chunk); a row group is one output row,
// or the two conv rows under one pooled row.

struct DirectGeometry {
  int64_t rows, groups, cols, chunk_panels, chunks;
};

inline DirectGeometry direct_geometry(const ConvArgs& args) {
  DirectGeometry g;
  g.rows = args.pool ? 2 : 1;
  g.groups = args.pool ? args.out_h : args.h;
  g.cols = args.pool ? 2 * args.out_w : args.w;
  g.chunk_panels = chunk_panels_of(args, args.n * g.groups);
  g.chunks = ceil_div(panels_of(args), g.chunk_panels);
  return g;
}

ConvPlan plan_direct(const ConvArgs& args) {
  const DirectGeometry g = direct_geometry(args);
  const int64_t chunk = g.chunk_panels * kPanelWidth;
  ConvPlan plan;
  plan.items = args.n * g.groups * g.chunks;
  plan.scratch_floats = g.rows * g.cols * chunk + 3 * chunk;
  plan.panels = panels_of(args);
  plan.packed_floats = plan.panels * args.r * args.r * args.c * kPanelWidth;
  return plan;
}

// Packing reads 16-channel runs of each filter tap and writes whole panel rows.
constexpr int64_t kPackChannels = 16;

// The weight of output channel k, input channel c, tap (r, s).
inline float weight_at(const ConvArgs& args, const float* weight, int64_t k, int64_t c,
                       int64_t r, int64_t s) {
  return weight[k * args.stride_wk + c * args.stride_wc + r * args.stride_wr +
                s * args.stride_ws];
}

// packed[p][tap][c][j] = weight[p * kPanelWidth + j][c][tap] (0 past k).
void pack_direct(const ConvArgs& args, const float* weight, float* packed, int64_t begin,
                 int64_t end) {
  const int64_t taps = static_cast<int64_t>(args.r) * args.r;
  const int64_t c_total = args.c;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t k0 = p * kPanelWidth;
    float* out = packed + p * taps * c_total * kPanelWidth;
    for (int64_t tap = 0; tap < taps; ++tap) {
      for (int64_t c0 = 0; c0 < c_total; c0 += kPackChannels) {
        const int64_t c1 = std::min(c_total, c0 + kPackChannels);
        for (int64_t c = c0; c < c1; ++c) {
          float* row = out + (tap * c_total + c) * kPanelWidth;
          for (int64_t j = 0; j < kPanelWidth; ++j) {
            const int64_t k = k0 + j;
            row[j] = k < args.k ? weight_at(args, weight, k, c, tap / args.r, tap % args.r)
                                : 0.0f;
          }
        }
      }
    }
  }
}

bool run_direct(const ConvArgs& args, int64_t item, float* scratch, double* stats) {
  const DirectGeometry g = direct_geometry(args);
  const int64_t chunk = item % g.chunks;
  const int64_t group = (item / g.chunks) % g.groups;
  const int64_t n = item / (g.chunks * g.groups);
  const int64_t p0 = chunk * g.chunk_panels;
  const int64_t p1 = std::min(panels_of(args), p0 + g.chunk_panels);
  const int64_t kc = (p1 - p0) * kPanelWidth;  // scratch row stride
  const int64_t k0 = p0 * kPanelWidth;
  const int64_t kvalid = std::min(args.k, p1 * kPanelWidth) - k0;
  const int64_t c = args.c;

  // Output pixel (h, w) reads padded input rows h + i (i < r), columns w .. w + r - 1: in NHWC
  // each such kernel row is r * c contiguous floats, in the packed (i, j, c) order. So the
  // reduction is r taps of depth r * c (for the 3-channel first layer 3 x 9 instead of 9 x 3:
  // 4.1 -> 2.2 ms single-threaded at batch 4, 112x112).
  int64_t taps[3];
  for (int i = 0; i < args.r; ++i) taps[i] = i * args.x_w * c;
  const int64_t depth = args.r * c;
  const int64_t panel_stride = args.r * depth * kPanelWidth;
  for (int64_t row = 0; row < g.rows; ++row) {
    const int64_t h = group * g.rows + row;
    const float* a = args.x + (n * args.x_h + h) * args.x_w * c;
    gemm_rows(a, g.cols, c, taps, args.r, depth, args.packed_weight, panel_stride, p0, p1,
              scratch + row * g.cols * kc, kc);
  }

  if (args.epilogue == Epilogue::kScaleShiftReLU && args.pool) {
    const float* top = scratch;
    const float* bottom = scratch + g.cols * kc;
    float* y = args.y + ((n * args.out_h + group) * args.out_w) * args.k + k0;
    for (int64_t pw = 0; pw < args.out_w; ++pw) {
      for (int64_t kk = 0; kk < kvalid; kk += Vec::kWidth) {
        const int64_t kg = k0 + kk;
        const int64_t left = 2 * pw * kc + kk, right = left + kc;
        const V a[4] = {bn_relu(Vec::load(top + left), args, kg),
                        bn_relu(Vec::load(top + right), args, kg),
                        bn_relu(Vec::load(bottom + left), args, kg),
                        bn_relu(Vec::load(bottom + right), args, kg)};
        const V m = max4_nan(a[0], a[1], a[2], a[3]);
        store_lanes(y + pw * args.k + kk, m, kvalid - kk);
        if (args.activation != nullptr || args.codes != nullptr) {
          const int64_t corner = ((n * args.h + 2 * group) * args.w + 2 * pw) * args.k + kg;
          const int64_t full[4] = {corner, corner + args.k, corner + args.w * args.k,
                                   corner + args.w * args.k + args.k};
          store_pool_extras(args, a, full,
                            ((n * args.out_h + group) * args.out_w + pw) * args.k + kg, m,
                            kvalid - kk);
        }
      }
    }
    return true;
  }
  const int64_t h = group;
  float* y = args.y + ((n * args.out_h + h) * args.out_w) * args.k + k0;
  if (args.epilogue != Epilogue::kBiasStats) {
    for (int64_t w = 0; w < g.cols; ++w) {
      for (int64_t kk = 0; kk < kvalid; kk += Vec::kWidth) {
        store_lanes(y + w * args.k + kk,
                    epilogue(Vec::load(scratch + w * kc + kk), args, k0 + kk), kvalid - kk);
      }
    }
    return true;
  }
  ItemStats item_stats(scratch + g.rows * g.cols * kc, kc);
  for (int64_t w = 0; w < g.cols; ++w) {
    for (int64_t kk = 0; kk < kvalid; kk += Vec::kWidth) {
      const V z = add_bias(Vec::load(scratch + w * kc + kk), args, k0 + kk);
      store_lanes(y + w * args.k + kk, z, kvalid - kk);
      item_stats.add(kk, z, w == 0);
    }
  }
  item_stats.count = g.cols;
  item_stats.flush(args, k0, kvalid, stats);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3). Tile (ti, tj) of an image produces output rows 2ti, 2ti + 1 and columns
// 2tj, 2tj + 1 from input rows 2ti - 1 .. 2ti + 2 (zero outside). With pool the tile grid is the
// pooled grid (floor semantics: a trailing odd row/column is never computed).
//
// Transforms (Lavin & Gray 2016): V = B^T d B, U = G g G^T, Y = A^T (U .* V) A with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// Transformed weights: packed[xi][p][c][j] (xi = 4 * row + column of the 4x4 tile).
// Per item scratch: V [16][block_tiles][c], M [16][block_tiles][chunk], stats [3][chunk].

struct WinogradGeometry {
  int64_t tiles_h, tiles_w, tiles, block_tiles, blocks, chunk_panels, chunks;
};

// The 3x3 filters of weight panel p for input channels [c0, c0 + cn), per tap: g[cc][tap][j]
// for output channel p * kPanelWidth + j (zero past k). The Winograd packers transform these.
inline void gather_filters(const ConvArgs& args, const float* weight, int64_t p, int64_t c0,
                           int64_t cn, float (&g)[kPackChannels][9][kPanelWidth]) {
  const int64_t k0 = p * kPanelWidth;
  for (int64_t j = 0; j < kPanelWidth; ++j) {
    const bool valid = k0 + j < args.k;
    for (int tap = 0; tap < 9; ++tap) {
      for (int64_t cc = 0; cc < cn; ++cc) {
        g[cc][tap][j] = valid ? weight_at(args, weight, k0 + j, c0 + cc, tap / 3, tap % 3) : 0.0f;
      }
    }
  }
}

bool pack_winograd(const ConvArgs& args, const float* weight, float* packed, int64_t begin,
                   int64_t end) {
  // The sum of every transformed weight is finite iff they all are (or it overflowed, which
  // only sends the conv to the direct algorithm).
  V check = Vec::zero();
  const int64_t c_total = args.c;
  const int64_t xi_stride = panels_of(args) * c_total * kPanelWidth;
  const V half = Vec::bcast(0.5f);
  float g[kPackChannels][9][kPanelWidth];  // the panel's filters for 16 channels, per tap
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c0 = 0; c0 < c_total; c0 += kPackChannels) {
      const int64_t cn = std::min(kPackChannels, c_total - c0);
      gather_filters(args, weight, p, c0, cn, g);
      for (int64_t cc = 0; cc < cn; ++cc) {
        float* out = packed + (p * c_total + c0 + cc) * kPanelWidth;
        for (int64_t j = 0; j < kPanelWidth; j += Vec::kWidth) {
          V t[4][3];  // G g, one filter column at a time
          for (int col = 0; col < 3; ++col) {
            const V g0 = Vec::load(g[cc][col] + j), g1 = Vec::load(g[cc][3 + col] + j);
            const V g2 = Vec::load(g[cc][6 + col] + j);
            t[0][col] = g0;
            t[1][col] = Vec::mul(half, Vec::add(Vec::add(g0, g1), g2));
            t[2][col] = Vec::mul(half, Vec::add(Vec::sub(g0, g1), g2));
            t[3][col] = g2;
          }
          for (int row = 0; row < 4; ++row) {  // (G g) G^T
            const V u0 = t[row][0];
            const V u1 = Vec::mul(half, Vec::add(Vec::add(t[row][0], t[row][1]), t[row][2]));
            const V u2 = Vec::mul(half, Vec::add(Vec::sub(t[row][0], t[row][1]), t[row][2]));
            const V u3 = t[row][2];
            Vec::store(out + (4 * row + 0) * xi_stride + j, u0);
            Vec::store(out + (4 * row + 1) * xi_stride + j, u1);
            Vec::store(out + (4 * row + 2) * xi_stride + j, u2);
            Vec::store(out + (4 * row + 3) * xi_stride + j, u3);
            check = Vec::add(check, Vec::add(Vec::add(u0, u1), Vec::add(u2, u3)));
          }
        }
      }
    }
  }
  return all_finite(check);
}

// V = B^T d B on registers (any element type supporting + and -: vectors and scalars).
template <typename T>
inline void input_transform(T (&d)[4][4], T (&v)[16]) {
  T t[4][4];
  for (int j = 0; j < 4; ++j) {
    t[0][j] = d[0][j] - d[2][j];
    t[1][j] = d[1][j] + d[2][j];
    t[2][j] = d[2][j] - d[1][j];
    t[3][j] = d[1][j] - d[3][j];
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i + 0] = t[i][0] - t[i][2];
    v[4 * i + 1] = t[i][1] + t[i][2];
    v[4 * i + 2] = t[i][2] - t[i][1];
    v[4 * i + 3] = t[i][1] - t[i][3];
  }
}

inline V vsub(V a, V b) { return Vec::sub(a, b); }
inline V vadd(V a, V b) { return Vec::add(a, b); }
inline float vsub(float a, float b) { return a - b; }
inline float vadd(float a, float b) { return a + b; }
inline V vneg(V x) { return Vec::sub(Vec::zero(), x); }
inline float vneg(float x) { return -x; }

inline void input_transform_vec(V (&d)[4][4], V (&v)[16]) {
  V t[4][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[0][j] = vsub(d[0][j], d[2][j]);
    t[1][j] = vadd(d[1][j], d[2][j]);
    t[2][j] = vsub(d[2][j], d[1][j]);
    t[3][j] = vsub(d[1][j], d[3][j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    v[4 * i + 0] = vsub(t[i][0], t[i][2]);
    v[4 * i + 1] = vadd(t[i][1], t[i][2]);
    v[4 * i + 2] = vsub(t[i][2], t[i][1]);
    v[4 * i + 3] = vsub(t[i][1], t[i][3]);
  }
}

// Transforms tiles [t0, t0 + count) into vt[xi][i][c] (row stride c, xi stride block_tiles * c).

// Y = A^T m A: the 2x2 outputs of one tile, one vector of channels.
inline void output_transform(const V (&m)[16], V (&y)[2][2]) {
  V s[2][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    s[0][j] = vadd(vadd(m[j], m[4 + j]), m[8 + j]);
    s[1][j] = vsub(vsub(m[4 + j], m[8 + j]), m[12 + j]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    y[i][0] = vadd(vadd(s[i][0], s[i][1]), s[i][2]);
    y[i][1] = vsub(vsub(s[i][1], s[i][2]), s[i][3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Winograd F(4x4, 3x3): a 6x6 input tile gives a 4x4 output block (four 2x2 pooling windows),
// 36 GEMMs of (tiles x c) x (c x k): 2.25 multiplies per output and channel pair against
// F(2x2)'s 4 and direct's 9. Tile (ti, tj) produces output rows 4ti .. 4ti + 3 and columns
// 4tj .. 4tj + 3 from input rows 4ti - 1 .. 4ti + 4 (zero outside); outputs past h, w (or past
// the pooled grid, floor semantics) are computed and dropped.
//
// Interpolation points 0, +-2/3, +-3/2 and infinity (Toom-Cook; the matrices below are the exact
// fractions rounded to fp32). The fp32 output error against a float64 conv, as a fraction of
// the output's largest magnitude (python benchmarks/winograd_points.py; C = 64 and 512): Lavin
// & Gray's 0, +-1, +-2 7.0e-6 and 6.8e-6; 0, +-1/2, +-2 2.8e-6 and 3.1e-6; these 1.2e-6 and
// 1.8e-6, where PyTorch's own fp32 conv gave 2.1e-7 and 2.7e-7. Only these (and 0, +-3/4,
// +-4/3) stay within the project's rule: at most 2x PyTorch's error + 2e-6.
//   B^T rows: [1, 0, -97/36, 0, 1, 0], [0, -3/2, -9/4, 2/3, 1, 0], [0, 3/2, -9/4, -2/3, 1, 0],
//             [0, -2/3, -4/9, 3/2, 1, 0], [0, 2/3, -4/9, -3/2, 1, 0], [0, 1, 0, -97/36, 0, 1]
//   G rows:   [1, 0, 0], [-81/130, -27/65, -18/65], [-81/130, 27/65, -18/65],
//             [8/65, 12/65, 18/65], [8/65, -12/65, 18/65], [0, 0, 1]
//   A^T rows: [1, 1, 1, 1, 1, 0], [0, 2/3, -2/3, 3/2, -3/2, 0], [0, 4/9, 4/9, 9/4, 9/4, 0],
//             [0, 8/27, -8/27, 27/8, -27/8, 1]
// Transformed weights: packed[xi][p][c][j] (xi = 6 * row + column of the 6x6 tile).
// Per item scratch: V [36][block_tiles][c], M [36][block_tiles][chunk], stats [3][chunk].

// Winograd tiles per F(4x4) work item: each covers 16 outputs (F(2x2): 4), so 2 * kRows tiles
// cover as many outputs as F(2x2)'s 8 * kRows while the 36 transformed slabs stay near L2's size.
constexpr int64_t kWinograd4Tiles = 2 * kRows;

inline V vmulc(float c, V x) { return Vec::mul(Vec::bcast(c), x); }
inline V vfmac(float c, V x, V acc) { return Vec::fma(Vec::bcast(c), x, acc); }
inline float vmulc(float c, float x) { return c * x; }
inline float vfmac(float c, float x, float acc) { return c * x + acc; }

// out = B^T in for six values (a column or a row of the tile); T is V or float.
template <typename T>
inline void winograd4_input_1d(const T (&in)[6], T (&out)[6]) {
  constexpr float k97_36 = 2.69444442f, k9_4 = 2.25f, k4_9 = 0.444444448f;
  constexpr float k3_2 = 1.5f, k2_3 = 0.666666687f;
  out[0] = vadd(vfmac(-k97_36, in[2], in[0]), in[4]);
  const T s12 = vfmac(-k9_4, in[2], in[4]);
  const T t12 = vfmac(-k2_3, in[3], vmulc(k3_2, in[1]));
  out[1] = vsub(s12, t12);
  out[2] = vadd(s12, t12);
  const T s34 = vfmac(-k4_9, in[2], in[4]);
  const T t34 = vfmac(-k3_2, in[3], vmulc(k2_3, in[1]));
  out[3] = vsub(s34, t34);
  out[4] = vadd(s34, t34);
  out[5] = vadd(vfmac(-k97_36, in[3], in[1]), in[5]);
}

// V = B^T d B: the 36 transformed values of one tile (d row-major, v[6 * row + column]).
template <typename T>
inline void winograd4_input(const T (&d)[6][6], T (&v)[36]) {
  T t[6][6];
#pragma GCC unroll 6
  for (int j = 0; j < 6; ++j) {  // columns: t[.][j] = B^T d[.][j]
    const T column[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]};
    T out[6];
    winograd4_input_1d(column, out);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) t[i][j] = out[i];
  }
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {  // rows: v[i][.] = t[i][.] B
    T out[6];
    winograd4_input_1d(t[i], out);
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) v[6 * i + j] = out[j];
  }
}

// out = A^T in: four outputs from six values.
inline void winograd4_output_1d(const V (&in)[6], V (&out)[4]) {
  constexpr float k2_3 = 0.666666687f, k3_2 = 1.5f, k4_9 = 0.444444448f, k9_4 = 2.25f;
  constexpr float k8_27 = 0.296296299f, k27_8 = 3.375f;
  const V sum12 = Vec::add(in[1], in[2]), dif12 = Vec::sub(in[1], in[2]);
  const V sum34 = Vec::add(in[3], in[4]), dif34 = Vec::sub(in[3], in[4]);
  out[0] = Vec::add(Vec::add(in[0], sum12), sum34);
  out[1] = vfmac(k3_2, dif34, vmulc(k2_3, dif12));
  out[2] = vfmac(k9_4, sum34, vmulc(k4_9, sum12));
  out[3] = Vec::add(vfmac(k27_8, dif34, vmulc(k8_27, dif12)), in[5]);
}

// Y = A^T m A: the 4x4 outputs of one tile, one vector of channels.
inline void winograd4_output(const V (&m)[36], V (&y)[4][4]) {
  V s[4][6];
#pragma GCC unroll 6
  for (int j = 0; j < 6; ++j) {
    const V column[6] = {m[j], m[6 + j], m[12 + j], m[18 + j], m[24 + j], m[30 + j]};
    V out[4];
    winograd4_output_1d(column, out);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) s[i][j] = out[i];
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) winograd4_output_1d(s[i], y[i]);
}

bool pack_winograd4(const ConvArgs& args, const float* weight, float* packed, int64_t begin,
                    int64_t end) {
  constexpr float kG[6][3] = {
      {1.0f, 0.0f, 0.0f},
      {-0.623076916f, -0.41538462f, -0.27692309f},
      {-0.623076916f, 0.41538462f, -0.27692309f},
      {0.123076923f, 0.184615389f, 0.27692309f},
      {0.123076923f, -0.184615389f, 0.27692309f},
      {0.0f, 0.0f, 1.0f}};
  V check = Vec::zero();
  const int64_t c_total = args.c;
  const int64_t xi_stride = panels_of(args) * c_total * kPanelWidth;
  float g[kPackChannels][9][kPanelWidth];  // the panel's filters for 16 channels, per tap
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c0 = 0; c0 < c_total; c0 += kPackChannels) {
      const int64_t cn = std::min(kPackChannels, c_total - c0);
      gather_filters(args, weight, p, c0, cn, g);
      for (int64_t cc = 0; cc < cn; ++cc) {
        float* out = packed + (p * c_total + c0 + cc) * kPanelWidth;
        for (int64_t j = 0; j < kPanelWidth; j += Vec::kWidth) {
          V f[3][3];
          for (int tap = 0; tap < 9; ++tap) f[tap / 3][tap % 3] = Vec::load(g[cc][tap] + j);
          V t[6][3];  // G g
          for (int i = 0; i < 6; ++i) {
            for (int col = 0; col < 3; ++col) {
              t[i][col] = vfmac(kG[i][2], f[2][col],
                                vfmac(kG[i][1], f[1][col], vmulc(kG[i][0], f[0][col])));
            }
          }
          for (int i = 0; i < 6; ++i) {  // (G g) G^T
            for (int col = 0; col < 6; ++col) {
              const V u = vfmac(kG[col][2], t[i][2],
                                vfmac(kG[col][1], t[i][1], vmulc(kG[col][0], t[i][0])));
              Vec::store(out + (6 * i + col) * xi_stride + j, u);
              check = Vec::add(check, u);
            }
          }
        }
      }
    }
  }
  return all_finite(check);
}

// ---------------------------------------------------------------------------------------------
// Both Winograd algorithms, by output tile M (2: F(2x2, 3x3); 4: F(4x4, 3x3)): an (M + 2)^2
// input tile gives an M x M output block, (M / 2)^2 whole 2x2 pooling windows. Tile (ti, tj)
// produces output rows M ti .. M ti + M - 1 from input rows M ti - 1 .. M ti + M (zero
// outside); with pool the tile grid covers the pooled grid (floor semantics: a trailing odd
// row/column is never computed), and outputs past it, or past h and w, are dropped.

template <int M>
constexpr int kTileIn = M + 2;
template <int M>
constexpr int kTerms = (M + 2) * (M + 2);  // transformed values (GEMMs) per tile

template <int M>
inline WinogradGeometry winograd_geometry(const ConvArgs& args) {
  WinogradGeometry g;
  g.tiles_h = args.pool ? ceil_div(args.out_h, M / 2) : ceil_div(args.h, M);
  g.tiles_w = args.pool ? ceil_div(args.out_w, M / 2) : ceil_div(args.w, M);
  g.tiles = args.n * g.tiles_h * g.tiles_w;
  // Equal blocks of at most kWinogradTiles (kWinograd4Tiles) tiles, a multiple of kRows: 100
  // tiles make 36 + 36 + 28, not 48 + 48 + 4. (Keeping VGG16's 64-tile 7x7 layers in one
  // block, so the 16.8 MB of transformed 512 x 512 weights stream once instead of twice,
  // measured the same.)
  const int64_t blocks = ceil_div(g.tiles, M == 2 ? kWinogradTiles : kWinograd4Tiles);
  g.block_tiles = ceil_div(ceil_div(g.tiles, blocks), kRows) * kRows;
  g.blocks = ceil_div(g.tiles, g.block_tiles);
  g.chunk_panels = chunk_panels_of(args, g.blocks);
  g.chunks = ceil_div(panels_of(args), g.chunk_panels);
  return g;
}

template <int M>
ConvPlan plan_winograd_tiles(const ConvArgs& args) {
  const WinogradGeometry g = winograd_geometry<M>(args);
  const int64_t chunk = g.chunk_panels * kPanelWidth;
  ConvPlan plan;
  plan.items = g.blocks * g.chunks;
  plan.scratch_floats = kTerms<M> * g.block_tiles * (args.c + chunk) + 3 * chunk;
  plan.panels = panels_of(args);
  plan.packed_floats = kTerms<M> * plan.panels * args.c * kPanelWidth;
  return plan;
}

// Transforms tiles [t0, t0 + count) into vt[xi][i][c] (row stride c, xi stride block_tiles * c).
// Returns whether every transformed value is finite, which holds iff every input value is: an
// infinity gives +-inf or (Inf - Inf) NaN in some transformed value, never a finite one.
template <int M>
bool winograd_input_tiles(const ConvArgs& args, const WinogradGeometry& g, int64_t t0,
                          int64_t count, float* vt) {
  constexpr int kIn = kTileIn<M>;
  V check = Vec::zero();
  float check_tail = 0.0f;
  const int64_t c = args.c;
  const int64_t xi_stride = g.block_tiles * c;
  const int64_t cv = c - c % Vec::kWidth;  // channels done with full vectors
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = t0 + i;
    const int64_t tj = t % g.tiles_w;
    const int64_t ti = (t / g.tiles_w) % g.tiles_h;
    const int64_t n = t / (g.tiles_w * g.tiles_h);
    const float* rows[kIn];
    bool col_ok[kIn];
    for (int r = 0; r < kIn; ++r) {
      const int64_t ih = M * ti - 1 + r;
      rows[r] = (ih >= 0 && ih < args.h) ? args.x + ((n * args.h + ih) * args.w) * c : nullptr;
      const int64_t iw = M * tj - 1 + r;
      col_ok[r] = iw >= 0 && iw < args.w;
    }
    const int64_t iw0 = M * tj - 1;
    float* out = vt + i * c;
    for (int64_t ch = 0; ch < cv; ch += Vec::kWidth) {
      V d[kIn][kIn];
#pragma GCC unroll 6
      for (int r = 0; r < kIn; ++r) {
#pragma GCC unroll 6
        for (int s = 0; s < kIn; ++s) {
          d[r][s] = (rows[r] != nullptr && col_ok[s])
                        ? Vec::load(rows[r] + (iw0 + s) * c + ch)
                        : Vec::zero();
        }
      }
      V v[kTerms<M>];
      if constexpr (M == 2) {
        input_transform_vec(d, v);
      } else {
        winograd4_input(d, v);
      }
#pragma GCC unroll 36
      for (int xi = 0; xi < kTerms<M>; ++xi) {
        Vec::store(out + xi * xi_stride + ch, v[xi]);
        check = Vec::add(check, v[xi]);
      }
    }
    for (int64_t ch = cv; ch < c; ++ch) {
      float d[kIn][kIn];
      for (int r = 0; r < kIn; ++r) {
        for (int s = 0; s < kIn; ++s) {
          d[r][s] = (rows[r] != nullptr && col_ok[s]) ? rows[r][(iw0 + s) * c + ch] : 0.0f;
        }
      }
      float v[kTerms<M>];
      if constexpr (M == 2) {
        input_transform(d, v);
      } else {
        winograd4_input(d, v);
      }
      for (int xi = 0; xi < kTerms<M>; ++xi) {
        out[xi * xi_stride + ch] = v[xi];
        check_tail += v[xi];
      }
    }
  }
  return all_finite(check) && check_tail - check_tail == 0.0f;
}

template <int M>
bool run_winograd_tiles(const ConvArgs& args, int64_t item, float* scratch, double* stats) {
  constexpr int kXi = kTerms<M>;
  const WinogradGeometry g = winograd_geometry<M>(args);
  // chunk-major: consecutive items (on both threads) share one channel chunk's weights
  const int64_t chunk = item / g.blocks;
  const int64_t block = item % g.blocks;
  const int64_t t0 = block * g.block_tiles;
  const int64_t count = std::min(g.block_tiles, g.tiles - t0);
  const int64_t panels = panels_of(args);
  const int64_t p0 = chunk * g.chunk_panels;
  const int64_t p1 = std::min(panels, p0 + g.chunk_panels);
  const int64_t kc = (p1 - p0) * kPanelWidth;
  const int64_t k0 = p0 * kPanelWidth;
  const int64_t kvalid = std::min(args.k, p1 * kPanelWidth) - k0;
  const int64_t c = args.c;

  float* vt = scratch;
  const int64_t tiles = g.block_tiles;  // scratch row count
  float* mt = vt + kXi * tiles * c;
  if (!winograd_input_tiles<M>(args, g, t0, count, vt)) return false;  // the glue runs direct

  const int64_t tap0 = 0;
  const int64_t panel_stride = c * kPanelWidth;
  for (int xi = 0; xi < kXi; ++xi) {
    gemm_rows(vt + xi * tiles * c, count, c, &tap0, 1, c,
              args.packed_weight + xi * panels * panel_stride, panel_stride, p0, p1,
              mt + xi * tiles * kc, kc);
  }

  const bool with_stats = args.epilogue == Epilogue::kBiasStats;
  ItemStats item_stats(mt + kXi * tiles * kc, kc);
  const int64_t xi_stride = tiles * kc;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = t0 + i;
    const int64_t tj = t % g.tiles_w;
    const int64_t ti = (t / g.tiles_w) % g.tiles_h;
    const int64_t n = t / (g.tiles_w * g.tiles_h);
    const float* m_tile = mt + i * kc;
    for (int64_t kk = 0; kk < kvalid; kk += Vec::kWidth) {
      const int64_t kg = k0 + kk;
      const int64_t lanes = kvalid - kk;
      V m[kXi];
#pragma GCC unroll 36
      for (int xi = 0; xi < kXi; ++xi) m[xi] = Vec::load(m_tile + xi * xi_stride + kk);
      V y[M][M];
      if constexpr (M == 2) {
        output_transform(m, y);
      } else {
        winograd4_output(m, y);
      }
      if (!with_stats && args.pool) {
        for (int wr = 0; wr < M / 2; ++wr) {
          const int64_t ph = M / 2 * ti + wr;
          if (ph >= args.out_h) break;
          for (int wc = 0; wc < M / 2; ++wc) {
            const int64_t pw = M / 2 * tj + wc;
            if (pw >= args.out_w) break;
            const V a[4] = {bn_relu(y[2 * wr][2 * wc], args, kg),
                            bn_relu(y[2 * wr][2 * wc + 1], args, kg),
                            bn_relu(y[2 * wr + 1][2 * wc], args, kg),
                            bn_relu(y[2 * wr + 1][2 * wc + 1], args, kg)};
            const V best = max4_nan(a[0], a[1], a[2], a[3]);
            const int64_t pooled = ((n * args.out_h + ph) * args.out_w + pw) * args.k + kg;
            store_lanes(args.y + pooled, best, lanes);
            if (args.activation != nullptr || args.codes != nullptr) {
              const int64_t corner = ((n * args.h + 2 * ph) * args.w + 2 * pw) * args.k + kg;
              const int64_t full[4] = {corner, corner + args.k, corner + args.w * args.k,
                                       corner + args.w * args.k + args.k};
              store_pool_extras(args, a, full, pooled, best, lanes);
            }
          }
        }
        continue;
      }
      for (int r = 0; r < M; ++r) {
        const int64_t oh = M * ti + r;
        if (oh >= args.h) break;
        for (int s = 0; s < M; ++s) {
          const int64_t ow = M * tj + s;
          if (ow >= args.w) break;
          float* out = args.y + ((n * args.out_h + oh) * args.out_w + ow) * args.k + kg;
          if (with_stats) {
            const V z = add_bias(y[r][s], args, kg);
            store_lanes(out, z, lanes);
            item_stats.add(kk, z, i == 0 && r == 0 && s == 0);
            if (kk == 0) ++item_stats.count;
          } else {
            store_lanes(out, epilogue(y[r][s], args, kg), lanes);
          }
        }
      }
    }
  }
  if (with_stats) item_stats.flush(args, k0, kvalid, stats);
  return true;
}

// ---------------------------------------------------------------------------------------------
// BN + ReLU (+ pool) backward of the training block. Per vector of channels: xhat and the
// pre-activation from z exactly as bn_relu_pool computes them (a subtraction of hi, of lo, a
// multiply by scale and an add of beta, each rounded: explicit intrinsics, no FMA), the ReLU
// mask from pre > 0, and with pool each window's first maximum in row-major order.

// The first `count` lanes of p (count < kWidth at the channel tail), zeros past them.
inline V load_lanes(const float* p, int64_t count) {
  if (count >= Vec::kWidth) return Vec::load(p);
  float lanes[Vec::kWidth] = {};
  std::memcpy(lanes, p, sizeof(float) * static_cast<size_t>(count));
  return Vec::load(lanes);
}

struct BnChannels {
  V hi, lo, invstd, scale, beta;
};

inline BnChannels bn_channels(const BnBackwardArgs& a, int64_t c) {
  return {Vec::load(a.hi + c), Vec::load(a.lo + c), Vec::load(a.invstd + c),
          Vec::load(a.scale + c), Vec::load(a.beta + c)};
}

inline V bn_centered(V z, const BnChannels& p) { return Vec::sub(Vec::sub(z, p.hi), p.lo); }

inline V bn_pre(V centered, const BnChannels& p) {
  return Vec::add(Vec::mul(centered, p.scale), p.beta);
}

// For one vector of channels of one window (or one pixel without pool): the gradients g[q]
// reaching the BN output and xhat[q] at the window's positions q (row-major; `count` of them:
// 4 with pool, 1 without).
template <int kCount>
inline void bn_gradients(const V (&z)[kCount], V grad, const BnChannels& p, V (&g)[kCount],
                         V (&xhat)[kCount]) {
  V act[kCount];
  for (int q = 0; q < kCount; ++q) {
    const V centered = bn_centered(z[q], p);
    xhat[q] = Vec::mul(centered, p.invstd);
    act[q] = relu(bn_pre(centered, p));
  }
  if (kCount == 1) {
    g[0] = Vec::select_gt(act[0], Vec::zero(), grad, Vec::zero());
    return;
  }
  V best = act[0];
  V index = Vec::zero();
  for (int q = 1; q < kCount; ++q) {
    index = Vec::select_gt(act[q], best, Vec::bcast(static_cast<float>(q)), index);
    best = Vec::select_gt(act[q], best, act[q], best);
  }
  const V routed = Vec::select_gt(best, Vec::zero(), grad, Vec::zero());
  for (int q = 0; q < kCount; ++q) {
    g[q] = Vec::select_eq(index, Vec::bcast(static_cast<float>(q)), routed, Vec::zero());
  }
}

// Visits every channel vector of output row `row` (an input row, or with pool a pair of input
// rows and the image's trailing odd row when `row` is its last pair): visit(count, offsets of
// the count positions in z, offset in grad_y or -1 (no gradient: outside every window), c).
template <typename Visit>
inline void bn_row(const BnBackwardArgs& a, int64_t row, Visit&& visit) {
  const int64_t k = a.k;
  const int64_t b = row / a.out_h, r = row % a.out_h;
  if (!a.pool) {
    for (int64_t col = 0; col < a.w; ++col) {
      const int64_t at = ((b * a.h + r) * a.w + col) * k;
      visit(1, at, at, col);
    }
    return;
  }
  for (int64_t col = 0; col < a.out_w; ++col) {
    const int64_t corner = ((b * a.h + 2 * r) * a.w + 2 * col) * k;
    visit(4, corner, ((b * a.out_h + r) * a.out_w + col) * k, col);
  }
  // positions no window reads: the trailing odd column of both rows, and the trailing odd row
  const int64_t last_row = r == a.out_h - 1 && a.h % 2 ? 2 * r + 2 : 2 * r + 1;
  for (int64_t hh = 2 * r; hh <= last_row; ++hh) {
    const int64_t first_col = hh < 2 * a.out_h ? 2 * a.out_w : 0;
    for (int64_t col = first_col; col < a.w; ++col) {
      visit(0, ((b * a.h + hh) * a.w + col) * k, -1, col);
    }
  }
}

inline void bn_backward_reduce(const BnBackwardArgs& a, int64_t begin, int64_t end, double* sums,
                               float* row_sums) {
  const int64_t k = a.k, kpad = ceil_div(k, Vec::kWidth) * Vec::kWidth;
  for (int64_t row = begin; row < end; ++row) {
    std::fill(row_sums, row_sums + 2 * kpad, 0.0f);
    bn_row(a, row, [&](int count, int64_t at, int64_t grad_at, int64_t) {
      if (count == 0) return;  // g = 0: nothing to add
      for (int64_t c = 0; c < k; c += Vec::kWidth) {
        const int64_t lanes = k - c;
        const BnChannels p = bn_channels(a, c);
        const V grad = load_lanes(a.grad_y + grad_at + c, lanes);
        V acc_g = Vec::load(row_sums + c), acc_gx = Vec::load(row_sums + kpad + c);
        if (count == 1) {
          V z[1] = {load_lanes(a.z + at + c, lanes)}, g[1], xhat[1];
          bn_gradients<1>(z, grad, p, g, xhat);
          acc_g = Vec::add(acc_g, g[0]);
          acc_gx = Vec::fma(g[0], xhat[0], acc_gx);
        } else {
          const int64_t offsets[4] = {0, k, a.w * k, a.w * k + k};
          V z[4], g[4], xhat[4];
          for (int q = 0; q < 4; ++q) z[q] = load_lanes(a.z + at + offsets[q] + c, lanes);
          bn_gradients<4>(z, grad, p, g, xhat);
          for (int q = 0; q < 4; ++q) {
            acc_g = Vec::add(acc_g, g[q]);
            acc_gx = Vec::fma(g[q], xhat[q], acc_gx);
          }
        }
        Vec::store(row_sums + c, acc_g);
        Vec::store(row_sums + kpad + c, acc_gx);
      }
    });
    for (int64_t c = 0; c < k; ++c) {
      sums[c] += row_sums[c];
      sums[k + c] += row_sums[kpad + c];
    }
  }
}

inline void bn_backward_apply(const BnBackwardArgs& a, int64_t begin, int64_t end, double* sums,
                              float* row_sums) {
  const int64_t k = a.k;
  for (int64_t row = begin; row < end; ++row) {
    std::fill(row_sums, row_sums + ceil_div(k, Vec::kWidth) * Vec::kWidth, 0.0f);
    bn_row(a, row, [&](int count, int64_t at, int64_t grad_at, int64_t) {
      for (int64_t c = 0; c < k; c += Vec::kWidth) {
        const int64_t lanes = k - c;
        const BnChannels p = bn_channels(a, c);
        const V mean_g = Vec::load(a.mean_g + c), mean_gx = Vec::load(a.mean_gx + c);
        V acc = Vec::load(row_sums + c);
        auto finish = [&](V g, V xhat, int64_t offset) {
          // grad_z = scale * (g - mean_g - xhat * mean_gx)
          const V value = Vec::mul(p.scale, Vec::sub(Vec::sub(g, mean_g),
                                                     Vec::mul(xhat, mean_gx)));
          store_lanes(a.grad_z + offset + c, value, lanes);
          acc = Vec::add(acc, value);
        };
        if (count == 4) {
          const int64_t offsets[4] = {0, k, a.w * k, a.w * k + k};
          V z[4], g[4], xhat[4];
          for (int q = 0; q < 4; ++q) z[q] = load_lanes(a.z + at + offsets[q] + c, lanes);
          bn_gradients<4>(z, load_lanes(a.grad_y + grad_at + c, lanes), p, g, xhat);
          for (int q = 0; q < 4; ++q) finish(g[q], xhat[q], at + offsets[q]);
        } else {
          V z[1] = {load_lanes(a.z + at + c, lanes)}, g[1], xhat[1];
          if (count == 1) {
            bn_gradients<1>(z, load_lanes(a.grad_y + grad_at + c, lanes), p, g, xhat);
          } else {  // no window reads this position: no gradient reaches it
            g[0] = Vec::zero();
            xhat[0] = Vec::mul(bn_centered(z[0], p), p.invstd);
          }
          finish(g[0], xhat[0], at);
        }
        Vec::store(row_sums + c, acc);
      }
    });
    for (int64_t c = 0; c < k; ++c) sums[c] += row_sums[c];
  }
}

// ---------------------------------------------------------------------------------------------
// A folded block's ReLU (+ pool) backward, one input row at a time (see MaskedGradientArgs).

// The first `count` lanes of p as floats (count < kWidth at the channel tail), 255 past them.
inline V load_codes(const uint8_t* p, int64_t count) {
  float lanes[Vec::kWidth];
  const int64_t valid = std::min<int64_t>(count, Vec::kWidth);
  for (int64_t j = 0; j < Vec::kWidth; ++j) lanes[j] = j < valid ? p[j] : 255.0f;
  return Vec::load(lanes);
}

inline void masked_gradient(const MaskedGradientArgs& a, int64_t begin, int64_t end,
                            double* sums, float* row_sums) {
  const int64_t k = a.k;
  for (int64_t row = begin; row < end; ++row) {
    std::fill(row_sums, row_sums + ceil_div(k, Vec::kWidth) * Vec::kWidth, 0.0f);
    const int64_t b = row / a.h, hh = row % a.h;
    for (int64_t col = 0; col < a.w; ++col) {
      const int64_t full = ((b * a.h + hh) * a.w + col) * k;
      const bool in_window = a.pool && hh < 2 * a.out_h && col < 2 * a.out_w;
      const int64_t pooled = ((b * a.out_h + hh / 2) * a.out_w + col / 2) * k;
      const V mine = Vec::bcast(static_cast<float>((hh % 2) * 2 + (col % 2)));
      for (int64_t c = 0; c < k; c += Vec::kWidth) {
        const int64_t lanes = k - c;
        V g = Vec::zero();
        if (!a.pool) {
          g = Vec::select_gt(load_lanes(a.y + full + c, lanes), Vec::zero(),
                             load_lanes(a.grad_y + full + c, lanes), Vec::zero());
        } else {
          if (in_window) {
            g = Vec::select_eq(load_codes(a.codes + pooled + c, lanes), mine,
                               load_lanes(a.grad_y + pooled + c, lanes), Vec::zero());
          }
          if (a.grad_a != nullptr) {
            g = Vec::add(g, Vec::select_gt(load_lanes(a.act + full + c, lanes), Vec::zero(),
                                           load_lanes(a.grad_a + full + c, lanes), Vec::zero()));
          }
        }
        store_lanes(a.grad_pre + full + c, Vec::mul(g, Vec::load(a.scale + c)), lanes);
        Vec::store(row_sums + c, Vec::add(Vec::load(row_sums + c), g));
      }
    }
    for (int64_t c = 0; c < k; ++c) sums[c] += row_sums[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient by Winograd F(3x3, 2x2) (see WgradArgs): per tile, V = B^T x B with the forward
// F(2x2, 3x3)'s B^T (input_transform) and W = G g G^T with
//   G = [1 0; 1/2 1/2; 1/2 -1/2; 0 -1],
// summed over tiles as 16 GEMMs into M, then dW = A^T M A with A^T = [1 1 1 0; 0 1 -1 0;
// 0 1 1 1]: 16 multiplies per tile and channel pair where the direct sum takes 36 (2x2 output
// gradients times 3x3 taps), 2.25x fewer. (The points are 0, +-1 and infinity, as the forward's:
// their fp32 error against a float64 weight gradient was 3-5e-7 of its largest magnitude on
// VGG-sized layers, PyTorch's own 5e-7 to 1.4e-6.)

// Input channels per GEMM work item: the rows of the GEMM's register tiles.
constexpr int64_t kWgradRows = 8 * kRows;

// The 4x4 input patch of tile t (global index), loaded as in winograd_input_tiles<2>.
inline void wgrad_tile_rows(const WgradArgs& a, int64_t t, const float* (&rows)[4],
                            bool (&col_ok)[4], int64_t& iw0) {
  const int64_t tj = t % a.tiles_w;
  const int64_t ti = (t / a.tiles_w) % a.tiles_h;
  const int64_t n = t / (a.tiles_w * a.tiles_h);
  for (int r = 0; r < 4; ++r) {
    const int64_t ih = 2 * ti - 1 + r;
    rows[r] = (ih >= 0 && ih < a.h) ? a.x + ((n * a.h + ih) * a.w) * a.c : nullptr;
    const int64_t iw = 2 * tj - 1 + r;
    col_ok[r] = iw >= 0 && iw < a.w;
  }
  iw0 = 2 * tj - 1;
}

bool wgrad_transform_input(const WgradArgs& a, int64_t begin, int64_t end) {
  V check = Vec::zero();
  float check_tail = 0.0f;
  const int64_t c = a.c;
  const int64_t xi_stride = a.count * c;
  const int64_t cv = c - c % Vec::kWidth;
  for (int64_t i = begin; i < end; ++i) {
    const float* rows[4];
    bool col_ok[4];
    int64_t iw0;
    wgrad_tile_rows(a, a.t0 + i, rows, col_ok, iw0);
    float* out = a.v + i * c;
    for (int64_t ch = 0; ch < cv; ch += Vec::kWidth) {
      V d[4][4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          d[r][s] = (rows[r] != nullptr && col_ok[s]) ? Vec::load(rows[r] + (iw0 + s) * c + ch)
                                                      : Vec::zero();
        }
      }
      V v[16];
      input_transform_vec(d, v);
#pragma GCC unroll 16
      for (int xi = 0; xi < 16; ++xi) {
        Vec::store(out + xi * xi_stride + ch, v[xi]);
        check = Vec::add(check, v[xi]);
      }
    }
    for (int64_t ch = cv; ch < c; ++ch) {
      float d[4][4];
      for (int r = 0; r < 4; ++r) {
        for (int s = 0; s < 4; ++s) {
          d[r][s] = (rows[r] != nullptr && col_ok[s]) ? rows[r][(iw0 + s) * c + ch] : 0.0f;
        }
      }
      float v[16];
      input_transform(d, v);
      for (int xi = 0; xi < 16; ++xi) {
        out[xi * xi_stride + ch] = v[xi];
        check_tail += v[xi];
      }
    }
  }
  return all_finite(check) && check_tail - check_tail == 0.0f;
}

// (G g) for two values, as four: g0, (g0 + g1) / 2, (g0 - g1) / 2, -g1.
template <typename T>
inline void wgrad_grad_1d(T g0, T g1, T (&out)[4]) {
  out[0] = g0;
  out[1] = vmulc(0.5f, vadd(g0, g1));
  out[2] = vmulc(0.5f, vsub(g0, g1));
  out[3] = vneg(g1);
}

bool wgrad_transform_grad(const WgradArgs& a, int64_t begin, int64_t end) {
  V check = Vec::zero();
  const int64_t k = a.k;
  const int64_t xi_stride = a.panels * a.count * kPanelWidth;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = a.t0 + i;
    const int64_t tj = t % a.tiles_w;
    const int64_t ti = (t / a.tiles_w) % a.tiles_h;
    const int64_t n = t / (a.tiles_w * a.tiles_h);
    const float* rows[2];
    bool col_ok[2];
    for (int r = 0; r < 2; ++r) {
      const int64_t oh = 2 * ti + r;
      rows[r] = oh < a.h ? a.grad + ((n * a.h + oh) * a.w) * k : nullptr;
      col_ok[r] = 2 * tj + r < a.w;
    }
    for (int64_t kk = 0; kk < a.panels * kPanelWidth; kk += Vec::kWidth) {
      const int64_t lanes = std::min<int64_t>(Vec::kWidth, k - kk);
      V d[2][2];
      for (int r = 0; r < 2; ++r) {
        for (int s = 0; s < 2; ++s) {
          d[r][s] = (lanes > 0 && rows[r] != nullptr && col_ok[s])
                        ? load_lanes(rows[r] + (2 * tj + s) * k + kk, lanes)
                        : Vec::zero();
        }
      }
      V column[2][4];  // G applied down each of the two columns
      for (int s = 0; s < 2; ++s) wgrad_grad_1d(d[0][s], d[1][s], column[s]);
      float* out = a.g + ((kk / kPanelWidth) * a.count + i) * kPanelWidth + kk % kPanelWidth;
      for (int r = 0; r < 4; ++r) {
        V row[4];
        wgrad_grad_1d(column[0][r], column[1][r], row);
        for (int s = 0; s < 4; ++s) {
          Vec::store(out + (4 * r + s) * xi_stride, row[s]);
          check = Vec::add(check, row[s]);
        }
      }
    }
  }
  return all_finite(check);
}

// out[i][0:kPanelWidth] (+)= sum over d < depth of a[d * lda + i] * b[d * kPanelWidth : ...]:
// micro_tile with the rows of `a` along its fast axis (V is stored tile-major: a tile's input
// channels are contiguous).
template <int M>
void micro_tile_columns(const float* a, int64_t lda, int64_t depth, const float* b, float* out,
                        int64_t ldc, bool accumulate) {
  V acc[M][kPanelVectors];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) acc[i][v] = Vec::zero();
  }
  for (int64_t d = 0; d < depth; ++d) {
    V bv[kPanelVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) bv[v] = Vec::load(b + v * Vec::kWidth);
    b += kPanelWidth;
    const float* ad = a + d * lda;
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const V ai = Vec::bcast(ad[i]);
#pragma GCC unroll 8
      for (int v = 0; v < kPanelVectors; ++v) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVectors; ++v) {
      float* o = out + i * ldc + v * Vec::kWidth;
      Vec::store(o, accumulate ? Vec::add(Vec::load(o), acc[i][v]) : acc[i][v]);
    }
  }
}

template <int... Ms>
struct ColumnTileTable {
  static constexpr MicroTileFn fns[sizeof...(Ms)] = {&micro_tile_columns<Ms + 1>...};
};

template <int... Is>
constexpr const MicroTileFn* column_tiles(std::integer_sequence<int, Is...>) {
  return ColumnTileTable<Is...>::fns;
}

int64_t wgrad_items(const WgradArgs& a) {
  return 16 * ceil_div(a.c, kWgradRows) * a.panels;
}

// Item = (xi, block of kWgradRows input channels, panel): the block's rows of M[xi] for the
// panel, over the chunk's tiles in kDepthBlock steps (a fixed order: the same bits every run).
void wgrad_gemm(const WgradArgs& a, int64_t item, bool accumulate) {
  const int64_t blocks = ceil_div(a.c, kWgradRows);
  const int64_t p = item % a.panels;
  const int64_t c0 = ((item / a.panels) % blocks) * kWgradRows;
  const int64_t xi = item / (a.panels * blocks);
  const int64_t rows = std::min(kWgradRows, a.c - c0);
  const int64_t ldm = a.panels * kPanelWidth;
  const float* v = a.v + xi * a.count * a.c + c0;
  const float* g = a.g + (xi * a.panels + p) * a.count * kPanelWidth;
  float* out = a.m + (xi * a.c + c0) * ldm + p * kPanelWidth;
  for (int64_t d0 = 0; d0 < a.count; d0 += kDepthBlock) {
    const int64_t dn = std::min(kDepthBlock, a.count - d0);
    const bool add = accumulate || d0 > 0;
    for (int64_t i = 0; i < rows; i += kRows) {
      const int64_t m = std::min<int64_t>(kRows, rows - i);
      column_tiles(std::make_integer_sequence<int, kRows>{})[m - 1](
          v + d0 * a.c + i, a.c, dn, g + d0 * kPanelWidth, out + i * ldm, ldm, add);
    }
  }
}

void wgrad_output(const WgradArgs& a, int64_t begin, int64_t end) {
  const int64_t ldm = a.panels * kPanelWidth;
  const int64_t xi_stride = a.c * ldm;
  for (int64_t c = begin; c < end; ++c) {
    for (int64_t kk = 0; kk < a.k; kk += Vec::kWidth) {
      const int64_t lanes = std::min<int64_t>(Vec::kWidth, a.k - kk);
      V m[16];
#pragma GCC unroll 16
      for (int xi = 0; xi < 16; ++xi) m[xi] = Vec::load(a.m + xi * xi_stride + c * ldm + kk);
      V s[3][4];  // A^T m: rows
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        s[0][j] = Vec::add(Vec::add(m[j], m[4 + j]), m[8 + j]);
        s[1][j] = Vec::sub(m[4 + j], m[8 + j]);
        s[2][j] = Vec::add(Vec::add(m[4 + j], m[8 + j]), m[12 + j]);
      }
      float y[9][Vec::kWidth];
      for (int r = 0; r < 3; ++r) {  // (A^T m) A: columns
        Vec::store(y[3 * r + 0], Vec::add(Vec::add(s[r][0], s[r][1]), s[r][2]));
        Vec::store(y[3 * r + 1], Vec::sub(s[r][1], s[r][2]));
        Vec::store(y[3 * r + 2], Vec::add(Vec::add(s[r][1], s[r][2]), s[r][3]));
      }
      for (int64_t j = 0; j < lanes; ++j) {
        float* out = a.dw + ((kk + j) * a.c + c) * 9;
        for (int tap = 0; tap < 9; ++tap) out[tap] = y[tap][j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small-batch linear layer (LinearArgs). Per output feature j, kJ at a time, the dot products of
// its weight row with up to kLinearRows rows of x at once (one accumulator vector per pair), so
// each weight element is loaded once per call (the weight, 411 MB in VGG's first classifier
// layer, is what the time goes on); the input features run in blocks whose rows of x stay in
// L2 while the thread's weight rows stream past them, the blocks' partial sums adding up in y.
constexpr int kLinearRows = Vec::kWidth >= 16 ? 16 : 8;
// x floats per block: 512 KB of rows, half of a Zen 4's L2.
constexpr int64_t kLinearBlockFloats = 128 * 1024;

inline float lane_sum(V v) {
  float lanes[Vec::kWidth];
  Vec::store(lanes, v);
  float s = 0.0f;
  for (int l = 0; l < Vec::kWidth; ++l) s += lanes[l];
  return s;
}

// Rows [0, M) of x against weight rows j .. j + J of features [i0, i1), adding to (first: writing)
// y; `last` adds the bias.
template <int M, int J>
void linear_tile(const LinearArgs& a, const float* x, float* y, int64_t j, int64_t i0,
                 int64_t i1, bool first, bool last) {
  V acc[J][M];
#pragma GCC unroll 4
  for (int r = 0; r < J; ++r) {
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[r][m] = Vec::zero();
  }
  int64_t i = i0;
  for (; i + Vec::kWidth <= i1; i += Vec::kWidth) {
    V w[J];
#pragma GCC unroll 4
    for (int r = 0; r < J; ++r) w[r] = Vec::load(a.w + (j + r) * a.ldw + i);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const V xv = Vec::load(x + m * a.ldx + i);
#pragma GCC unroll 4
      for (int r = 0; r < J; ++r) acc[r][m] = Vec::fma(xv, w[r], acc[r][m]);
    }
  }
  for (int r = 0; r < J; ++r) {
    const float* w = a.w + (j + r) * a.ldw;
    for (int m = 0; m < M; ++m) {
      float s = lane_sum(acc[r][m]);
      for (int64_t t = i; t < i1; ++t) s += x[m * a.ldx + t] * w[t];
      float* out = y + m * a.ldy + j + r;
      if (!first) s += *out;
      if (last && a.bias != nullptr) s += a.bias[j + r];
      *out = s;
    }
  }
}

template <int M>
void linear_rows_of(const LinearArgs& a, const float* x, float* y, int64_t begin, int64_t end) {
  constexpr int kJ = 2 * M <= kLinearRows ? 2 : 1;
  const int64_t block = std::max<int64_t>(Vec::kWidth, kLinearBlockFloats / M / Vec::kWidth *
                                                           Vec::kWidth);
  for (int64_t i0 = 0; i0 < a.in || i0 == 0; i0 += block) {
    const int64_t i1 = std::min(a.in, i0 + block);
    const bool first = i0 == 0, last = i1 >= a.in;
    int64_t j = begin;
    for (; j + kJ <= end; j += kJ) linear_tile<M, kJ>(a, x, y, j, i0, i1, first, last);
    for (; j < end; ++j) linear_tile<M, 1>(a, x, y, j, i0, i1, first, last);
    if (last) break;
  }
}

using LinearRowsFn = void (*)(const LinearArgs&, const float*, float*, int64_t, int64_t);

template <int... Ms>
struct LinearRowsTable {
  static constexpr LinearRowsFn fns[sizeof...(Ms)] = {&linear_rows_of<Ms + 1>...};
};

template <int... Is>
constexpr const LinearRowsFn* linear_rows_table(std::integer_sequence<int, Is...>) {
  return LinearRowsTable<Is...>::fns;
}

void linear_rows(const LinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kLinearRows) {
    const int64_t rows = std::min<int64_t>(kLinearRows, a.m - m0);
    linear_rows_table(std::make_integer_sequence<int, kLinearRows>{})[rows - 1](
        a, a.x + m0 * a.ldx, a.y + m0 * a.ldy, begin, end);
  }
}

constexpr KernelTable make_table(const char* isa) {
  return KernelTable{isa,
                     kPanelWidth,
                     &plan_direct,
                     &plan_winograd_tiles<2>,
                     &plan_winograd_tiles<4>,
                     &pack_direct,
                     &pack_winograd,
                     &pack_winograd4,
                     &run_direct,
                     &run_winograd_tiles<2>,
                     &run_winograd_tiles<4>,
                     &bn_backward_reduce,
                     &bn_backward_apply,              &masked_gradient,
                     &wgrad_transform_input,          &wgrad_transform_grad,
                     &wgrad_items,  &wgrad_gemm,      &wgrad_output,
                     &linear_rows};
}
