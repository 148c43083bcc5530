// Hopper (sm_90a) inference kernel: the implicit GEMM of conv_bn_relu.cuh on warpgroup MMA.
//
// CTA tile 128 GEMM rows (pixels, or 4 per pooled pixel) x 128 output channels (64 when the
// layer has at most 64, 256 for wide layers with enough CTAs; see channel_tile), reduction step
// 64 elements = one 128-byte row per tile row. Two warpgroups each own 64 rows and issue
// wgmma.m64n{64,128,256}k16 with both operands read from shared memory through matrix
// descriptors; the
// tiles are stored in the 128-byte swizzled layout those descriptors name (16-byte chunk j of
// row r at chunk j ^ (r % 8)), filled by 16-byte cp.async copies that zero-fill the padding.
// Five stages (four for 256 channels): tile kt + 3 (kt + 2) is in flight while tile kt is
// multiplied and tile kt - 1's MMAs drain. The epilogue works on the accumulator registers
// directly: BN scale/shift, ReLU, and the 2x2 max-pool as a shuffle across the four lanes that
// hold a window's rows (NaN kept).
//
// Used for fp16/bf16 inference when C and K are multiples of 8 on an sm_90a build; everything
// else takes the WMMA kernel.
#include "conv_bn_relu.cuh"
#include "wgmma.cuh"

namespace vgg_kernels::cuda {
namespace {

using namespace wgmma;

constexpr int kBM = 128, kBK = 64;  // the channel tile BN (64, 128 or 256) is a template parameter
constexpr int kThreads = 256;       // two warpgroups
constexpr int kRowBytes = kBK * 2;                      // 128: one swizzle row
[[maybe_unused]] constexpr int kTileBytes = kBM * kRowBytes;  // A (pixels); B follows
constexpr int kChunksPerRow = kRowBytes / 16;  // 8
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 32
[[maybe_unused]] constexpr int kRowChunks = kBM / kRowsPerPass;  // A copies per thread

// Pipeline depth per channel tile: five stages (48-160 KB); four for 256 channels (192 KB).
template <int BN>
struct ChannelTile {
  static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma tiles of 64, 128 or 256 channels");
  static constexpr int kStageBytes = (kBM + BN) * kRowBytes;
  static constexpr int kStages = BN == 256 ? 4 : 5;
  static constexpr int kAhead = kStages - 2;  // tiles loaded ahead of the multiplied one
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align to 1 KB
};

// The kernel's body exists in sm_90a compilations only (wgmma is arch-specific); other targets
// get an empty kernel that the host never launches (see wgmma_runs_here).
template <typename T, int BN, bool kPool>
__global__ void __launch_bounds__(kThreads, 1) conv_wgmma_kernel(const ConvParams p) {
  using Tile = ChannelTile<BN>;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBChunks = BN / kRowsPerPass;  // B copies per thread
  constexpr int kAccumulators = BN / 2;        // fp32 registers: 64 x BN over 128 threads
  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (smem_base - static_cast<uint32_t>(
                                                    __cvta_generic_to_shared(smem_raw)));

  const int tid = threadIdx.x;
  const int wg = tid / 128;  // warpgroup: rows 64 * wg .. + 63 of the tile
  const int warp = (tid % 128) / 32, lane = tid % 32;
  const int64_t m_block = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.y) * BN;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int ktiles = static_cast<int>((p.kdim + kBK - 1) / kBK);

  // ---- loader: thread tid copies chunk column tid % 8 of rows tid / 8 + 32 j of A and B.
  const int chunk_col = tid % kChunksPerRow;
  const int row0 = tid / kChunksPerRow;
  RowInfo a_rows[kRowChunks];
#pragma unroll
  for (int j = 0; j < kRowChunks; ++j) {
    a_rows[j] = decode_row<kPool>(p, m_block + row0 + j * kRowsPerPass);
  }
  constexpr int kChunk = 8;  // elements per 16-byte copy
  int a_c = chunk_col * kChunk, a_s = 0, a_r = 0;  // channel, tap column, tap row of the chunk
  while (a_c >= p.c) {
    a_c -= static_cast<int>(p.c);
    if (++a_s == p.r) {
      a_s = 0;
      ++a_r;
    }
  }
  int64_t b_kk = chunk_col * kChunk;

  auto load_tile = [&](int stage) {
    unsigned char* a_tile = smem + stage * Tile::kStageBytes;
    unsigned char* b_tile = a_tile + kTileBytes;
    const bool k_ok = a_r < p.r;
#pragma unroll
    for (int j = 0; j < kRowChunks; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const RowInfo& info = a_rows[j];
      const int ih = info.ih0 + a_r, iw = info.iw0 + a_s;
      const bool ok = k_ok && info.valid && inside(ih, p.h) && inside(iw, p.w);
      const T* src =
          ok ? x + info.image_offset + (static_cast<int64_t>(ih) * p.w + iw) * p.c + a_c : x;
      cp_async_16(a_tile + swizzled(row, chunk_col), src, ok);
    }
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const int row = row0 + j * kRowsPerPass;
      const int64_t n = n_block + row;
      const bool ok = n < p.k && b_kk < p.kdim;
      const T* src = ok ? weight + n * p.kdim + b_kk : weight;
      cp_async_16(b_tile + swizzled(row, chunk_col), src, ok);
    }
    a_c += kBK;
    while (a_c >= p.c) {
      a_c -= static_cast<int>(p.c);
      if (++a_s == p.r) {
        a_s = 0;
        ++a_r;
      }
    }
    b_kk += kBK;
  };

  float acc[kAccumulators];
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) acc[i] = 0.0f;

  // ktiles >= 1: kdim = r * r * c >= 8
  mma_pipeline<Tile::kAhead>(
      acc, ktiles, [&](int kt) { load_tile(kt % Tile::kStages); },
      [&](int kt) {
        const int stage = kt % Tile::kStages;
        const uint32_t a_addr = smem_base + stage * Tile::kStageBytes + wg * 64 * kRowBytes;
        const uint32_t b_addr = smem_base + stage * Tile::kStageBytes + kTileBytes;
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks) {  // 16 elements = 32 bytes along the swizzled row
          WgmmaOp<T, BN>::mma(acc, smem_descriptor(a_addr + 32 * ks),
                              smem_descriptor(b_addr + 32 * ks));
        }
      });

  // ---- epilogue on the registers: accumulator element 4 j + 2 h + e is row
  // 16 warp + lane / 4 + 8 h of this warpgroup's 64, channel 8 j + 2 (lane % 4) + e.
  T* y = static_cast<T*>(p.y);
  const int64_t m_warp = m_block + wg * 64 + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int64_t n = n_block + 8 * j + 2 * (lane % 4);
    const bool n_ok = n < p.k;  // k % 8 == 0: both channels of the pair are in range or not
    const float scale0 = n_ok ? p.scale[n] : 0.0f, scale1 = n_ok ? p.scale[n + 1] : 0.0f;
    const float shift0 = n_ok ? p.shift[n] : 0.0f, shift1 = n_ok ? p.shift[n + 1] : 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m_warp + 8 * h;
      float v0 = fmaf(acc[4 * j + 2 * h], scale0, shift0);
      float v1 = fmaf(acc[4 * j + 2 * h + 1], scale1, shift1);
      if constexpr (kPool) {
        // rows 4 q .. 4 q + 3 (one window) sit in lanes 16 (lane / 16) + 4 i + lane % 4; the
        // ReLU of the window's max is the max of its ReLUs (NaN kept by both)
        v0 = max_nan(v0, __shfl_xor_sync(0xffffffffu, v0, 4));
        v1 = max_nan(v1, __shfl_xor_sync(0xffffffffu, v1, 4));
        v0 = max_nan(v0, __shfl_xor_sync(0xffffffffu, v0, 8));
        v1 = max_nan(v1, __shfl_xor_sync(0xffffffffu, v1, 8));
        if ((lane & 12) == 0 && n_ok && m < p.rows) {
          store_pair(y + (m >> 2) * p.k + n, relu_nan(v0), relu_nan(v1));
        }
      } else if (n_ok && m < p.rows) {
        store_pair(y + m * p.k + n, relu_nan(v0), relu_nan(v1));
      }
    }
  }
#endif
}

__global__ void wgmma_probe_kernel(int* built_for_sm90a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *built_for_sm90a = 1;
#else
  *built_for_sm90a = 0;
#endif
}

}  // namespace

// Whether the current device runs this build's sm_90a code: a compute capability 9.0 device and
// a build with 9.0a among its targets, which a one-off probe kernel tells apart from a plain 9.0
// build (cached per device; not probed while the stream is being captured into a graph).
bool wgmma_runs_here(cudaStream_t stream) {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
        capture != cudaStreamCaptureStatusNone) {
      return false;
    }
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    int answer = 0;
    if (major == 9 && minor == 0) {
      int* flag = nullptr;
      if (cudaMalloc(&flag, sizeof(int)) == cudaSuccess) {
        wgmma_probe_kernel<<<1, 1, 0, stream>>>(flag);
        const bool read = cudaMemcpyAsync(&answer, flag, sizeof(int), cudaMemcpyDeviceToHost,
                                          stream) == cudaSuccess &&
                          cudaStreamSynchronize(stream) == cudaSuccess;
        if (!read) answer = 0;
        cudaFree(flag);
      }
      cudaGetLastError();  // a build without sm_90 code fails the probe launch: not an error
    }
    cached[device] = answer == 1 ? 1 : 2;
  }
  return cached[device] == 1;
}

namespace {

template <typename T, int BN, bool kPool>
cudaError_t launch_wgmma(const ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_wgmma_kernel<T, BN, kPool>;
  constexpr int kSmem = ChannelTile<BN>::kSmemBytes;
  // More than the default 48 KB of dynamic shared memory (set per device: cheap to repeat).
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kBM)),
                  static_cast<unsigned>(ceil_div(p.k, BN)));
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wgmma_dtype(const ConvParams& p, int forced_tile, cudaStream_t stream) {
  switch (channel_tile(ceil_div(p.rows, kBM), p.k, forced_tile)) {
    case 64:
      return p.pool ? launch_wgmma<T, 64, true>(p, stream) : launch_wgmma<T, 64, false>(p, stream);
    case 256:
      return p.pool ? launch_wgmma<T, 256, true>(p, stream)
                    : launch_wgmma<T, 256, false>(p, stream);
    default:
      return p.pool ? launch_wgmma<T, 128, true>(p, stream)
                    : launch_wgmma<T, 128, false>(p, stream);
  }
}

}  // namespace

bool conv_wgmma_supported(const ConvParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat32 || p.c % 8 != 0 || p.k % 8 != 0) return false;
  const auto address = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (address(p.x) % 16 != 0 || address(p.weight) % 16 != 0 || address(p.y) % 4 != 0) {
    return false;
  }
  return wgmma_runs_here(stream);
}

cudaError_t launch_conv_wgmma(const ConvParams& p, DType dtype, int channel_tile,
                              cudaStream_t stream) {
  return dtype == DType::kBFloat16
             ? launch_wgmma_dtype<__nv_bfloat16>(p, channel_tile, stream)
             : launch_wgmma_dtype<__half>(p, channel_tile, stream);
}

}  // namespace vgg_kernels::cuda
