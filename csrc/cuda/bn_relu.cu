// Training-mode BN + ReLU (+ 2x2 max-pool) forward and backward over NHWC tensors.
//
// Forward: y = maxpool2x2?(relu(pre)), pre = (z - mean) * scale + beta with scale = gamma *
// invstd, one pass, 8 channels per thread where k allows (16-byte loads); NaN kept by the ReLU
// and the pool, as in PyTorch.
// Backward, one reduction pass and one elementwise pass (the reference's formula):
//   g      = grad_y routed through the pool (to the first maximum of each 2x2 window in
//            row-major order, as PyTorch's max-pool) and the ReLU mask (pre > 0);
//   pass 1 = per-channel sum g (grad_beta) and sum g * xhat (grad_gamma), xhat = (z - mean) *
//            invstd, fp32 per block, fp64 across blocks;
//   pass 2 = grad_z = scale * (g - (sum g + xhat * sum g xhat) / count).
// The mean arrives as hi + lo floats (bn_centered in common.cuh). Forward and backward compute
// pre with the one bn_pre of common.cuh (each op rounded, as the reference's unfused PyTorch
// ops) and the window's activations as relu(pre) rounded to the storage type, so the backward's
// mask and maxima (and their ties) are the forward's.
#include "common.cuh"
#include "launch.h"

namespace vgg_kernels::cuda {
namespace {

// ---- forward ----------------------------------------------------------------------------------

// One thread per (output pixel, group of kVec channels); consecutive threads take consecutive
// channel groups, so loads and stores coalesce along k.
template <typename T, bool kPool, int kVec>
__global__ void bn_relu_pool_kernel(const BnReluParams p) {
  const T* z = static_cast<const T*>(p.z);
  T* y = static_cast<T*>(p.y);
  const int64_t groups = p.k / kVec;
  const int64_t total = p.n * p.out_h * p.out_w * groups;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k0 = (idx % groups) * kVec;
    const int64_t pixel = idx / groups;
    float out[kVec];
    if constexpr (!kPool) {
      alignas(16) T in[kVec];
      if constexpr (kVec > 1) {
        *reinterpret_cast<uint4*>(in) = *reinterpret_cast<const uint4*>(z + pixel * p.k + k0);
      } else {
        in[0] = z[pixel * p.k + k0];
      }
#pragma unroll
      for (int t = 0; t < kVec; ++t) {
        out[t] = Convert<T>::to_float(Convert<T>::from_float(relu_nan(
            bn_pre(Convert<T>::to_float(in[t]), p.mean_hi[k0 + t], p.mean_lo[k0 + t],
                   p.scale[k0 + t], p.beta[k0 + t]))));
      }
    } else {
      const int64_t pw = pixel % p.out_w;
      const int64_t rest = pixel / p.out_w;
      const int64_t ph = rest % p.out_h, n = rest / p.out_h;
      const int64_t corner = ((n * p.h + 2 * ph) * p.w + 2 * pw) * p.k + k0;
      const int64_t offsets[4] = {0, p.k, p.w * p.k, p.w * p.k + p.k};
#pragma unroll
      for (int t = 0; t < kVec; ++t) out[t] = 0.0f;  // below every activation (NaN aside)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        alignas(16) T in[kVec];
        if constexpr (kVec > 1) {
          *reinterpret_cast<uint4*>(in) =
              *reinterpret_cast<const uint4*>(z + corner + offsets[q]);
        } else {
          in[0] = z[corner + offsets[q]];
        }
#pragma unroll
        for (int t = 0; t < kVec; ++t) {
          const float act = Convert<T>::to_float(Convert<T>::from_float(relu_nan(
              bn_pre(Convert<T>::to_float(in[t]), p.mean_hi[k0 + t], p.mean_lo[k0 + t],
                     p.scale[k0 + t], p.beta[k0 + t]))));
          out[t] = max_nan(out[t], act);
        }
      }
    }
    alignas(16) T packed[kVec];
#pragma unroll
    for (int t = 0; t < kVec; ++t) packed[t] = Convert<T>::from_float(out[t]);
    if constexpr (kVec > 1) {
      *reinterpret_cast<uint4*>(y + pixel * p.k + k0) = *reinterpret_cast<const uint4*>(packed);
    } else {
      y[pixel * p.k + k0] = packed[0];
    }
  }
}

// Grid for a grid-stride loop over `total` items: enough blocks to fill the GPU several times.
unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = ceil_div(total, threads);
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T>
cudaError_t bn_relu_pool_typed(const BnReluParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.k % kVec == 0 && reinterpret_cast<uintptr_t>(p.z) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.y) % 16 == 0;
  const int64_t total = p.n * p.out_h * p.out_w * (vec ? p.k / kVec : p.k);
  const int threads = 256;
  VK_BOOL_SWITCH(p.pool, kPool, [&] {
    if (vec) {
      bn_relu_pool_kernel<T, kPool, kVec><<<grid_for(total, threads), threads, 0, stream>>>(p);
    } else {
      bn_relu_pool_kernel<T, kPool, 1><<<grid_for(total, threads), threads, 0, stream>>>(p);
    }
  });
  return cudaGetLastError();
}

// ---- backward ---------------------------------------------------------------------------------

struct ChannelParams {
  float mean_hi, mean_lo, invstd, scale, beta;
};

__device__ __forceinline__ ChannelParams channel_params(const BnReluBackwardParams& p,
                                                        int64_t k) {
  return {p.mean_hi[k], p.mean_lo[k], p.invstd[k], p.scale[k], p.beta[k]};
}

// xhat = (z - mean) * invstd, each op rounded as the reference's.
__device__ __forceinline__ float xhat_of(float z, const ChannelParams& c) {
  return __fmul_rn(bn_centered(z, c.mean_hi, c.mean_lo), c.invstd);
}

// The forward's pre-activation, bit for bit (bn_relu_pool_kernel computes it with bn_pre too).
__device__ __forceinline__ float pre_of(float z, const ChannelParams& c) {
  return bn_pre(z, c.mean_hi, c.mean_lo, c.scale, c.beta);
}

// For the 2x2 window whose top-left element is z[corner]: which of the 4 (row-major) holds the
// first maximum of the activations relu(pre) rounded to T (the values bn_relu_pool_kernel
// pools), and that element's xhat and pre.
template <typename T>
__device__ __forceinline__ int window_argmax(const T* z, int64_t corner, int64_t row_stride,
                                             int64_t k, const ChannelParams& c, float* xhat,
                                             float* pre) {
  const int64_t offsets[4] = {0, k, row_stride, row_stride + k};
  int best = 0;
  float best_act = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float zq = Convert<T>::to_float(z[corner + offsets[q]]);
    const float pr = pre_of(zq, c);
    const float act = Convert<T>::to_float(Convert<T>::from_float(relu_nan(pr)));
    if (q == 0 || act > best_act) {
      best = q;
      best_act = act;
      *xhat = xhat_of(zq, c);
      *pre = pr;
    }
  }
  return best;
}

// Pass 1. Block (32, 8): threadIdx.x picks the channel (coalesced along k), threadIdx.y and the
// grid stride walk the cells: pixels, or 2x2 windows with pool (elements outside every window
// have g = 0 and add nothing).
template <typename T, bool kPool>
__global__ void bn_relu_backward_reduce_kernel(const BnReluBackwardParams p) {
  const int64_t k = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const T* z = static_cast<const T*>(p.z);
  const T* grad_y = static_cast<const T*>(p.grad_y);
  float sum_g = 0.0f, sum_gx = 0.0f;
  if (k < p.k) {
    const ChannelParams c = channel_params(p, k);
    const int64_t cells = kPool ? p.n * p.out_h * p.out_w : p.n * p.h * p.w;
    for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
         cell < cells; cell += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      float xhat, pre;
      if constexpr (kPool) {
        const int64_t pw = cell % p.out_w;
        const int64_t rest = cell / p.out_w;
        const int64_t ph = rest % p.out_h, n = rest / p.out_h;
        const int64_t corner = ((n * p.h + 2 * ph) * p.w + 2 * pw) * p.k + k;
        window_argmax<T>(z, corner, p.w * p.k, p.k, c, &xhat, &pre);
      } else {
        const float zc = Convert<T>::to_float(z[cell * p.k + k]);
        xhat = xhat_of(zc, c);
        pre = pre_of(zc, c);
      }
      if (pre > 0.0f) {
        const float g = Convert<T>::to_float(grad_y[cell * p.k + k]);
        sum_g += g;
        sum_gx += g * xhat;
      }
    }
  }
  __shared__ float partial_g[8][33];
  __shared__ float partial_gx[8][33];
  partial_g[threadIdx.y][threadIdx.x] = sum_g;
  partial_gx[threadIdx.y][threadIdx.x] = sum_gx;
  __syncthreads();
  if (threadIdx.y == 0 && k < p.k) {
#pragma unroll
    for (int i = 1; i < 8; ++i) {
      sum_g += partial_g[i][threadIdx.x];
      sum_gx += partial_gx[i][threadIdx.x];
    }
    atomicAdd(p.sum_g + k, static_cast<double>(sum_g));
    atomicAdd(p.sum_gx + k, static_cast<double>(sum_gx));
  }
}

// Pass 2: one thread per element of z (consecutive threads on consecutive channels).
template <typename T, bool kPool>
__global__ void bn_relu_backward_apply_kernel(const BnReluBackwardParams p) {
  const T* z = static_cast<const T*>(p.z);
  const T* grad_y = static_cast<const T*>(p.grad_y);
  T* grad_z = static_cast<T*>(p.grad_z);
  const int64_t total = p.n * p.h * p.w * p.k;
  const float inv_count = 1.0f / static_cast<float>(p.n * p.h * p.w);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % p.k;
    const int64_t pixel = idx / p.k;
    const ChannelParams c = channel_params(p, k);
    const float zv = Convert<T>::to_float(z[idx]);
    const float xhat = xhat_of(zv, c);
    float g = 0.0f;
    if constexpr (kPool) {
      const int64_t w = pixel % p.w;
      const int64_t rest = pixel / p.w;
      const int64_t h = rest % p.h, n = rest / p.h;
      if (h < 2 * p.out_h && w < 2 * p.out_w) {
        const int64_t ph = h / 2, pw = w / 2;
        const int64_t corner = ((n * p.h + 2 * ph) * p.w + 2 * pw) * p.k + k;
        float best_xhat, best_pre;
        const int best = window_argmax<T>(z, corner, p.w * p.k, p.k, c, &best_xhat, &best_pre);
        if (best == static_cast<int>((h % 2) * 2 + (w % 2)) && best_pre > 0.0f) {
          g = Convert<T>::to_float(grad_y[((n * p.out_h + ph) * p.out_w + pw) * p.k + k]);
        }
      }
    } else if (pre_of(zv, c) > 0.0f) {
      g = Convert<T>::to_float(grad_y[idx]);
    }
    const float mean_g = static_cast<float>(p.sum_g[k]) * inv_count;
    const float mean_gx = static_cast<float>(p.sum_gx[k]) * inv_count;
    grad_z[idx] = Convert<T>::from_float(c.scale * (g - mean_g - xhat * mean_gx));
  }
}

template <typename T>
cudaError_t bn_relu_backward_typed(const BnReluBackwardParams& p, cudaStream_t stream) {
  const int64_t cells = p.pool ? p.n * p.out_h * p.out_w : p.n * p.h * p.w;
  // Pass 1 grid: x walks the cells (up to 1024 blocks of 8 cells), y the 32-channel slabs.
  const dim3 reduce_block(32, 8);
  const int64_t cell_blocks = ceil_div(cells, 8);
  const dim3 reduce_grid(static_cast<unsigned>(cell_blocks < 1024 ? cell_blocks : 1024),
                         static_cast<unsigned>(ceil_div(p.k, 32)));
  const int64_t total = p.n * p.h * p.w * p.k;
  const int threads = 256;
  VK_BOOL_SWITCH(p.pool, kPool, [&] {
    bn_relu_backward_reduce_kernel<T, kPool><<<reduce_grid, reduce_block, 0, stream>>>(p);
    bn_relu_backward_apply_kernel<T, kPool><<<grid_for(total, threads), threads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bn_relu_pool(const BnReluParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return bn_relu_pool_typed<__half>(p, stream);
    case DType::kBFloat16:
      return bn_relu_pool_typed<__nv_bfloat16>(p, stream);
    default:
      return bn_relu_pool_typed<float>(p, stream);
  }
}

cudaError_t launch_bn_relu_backward(const BnReluBackwardParams& p, DType dtype,
                                    cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return bn_relu_backward_typed<__half>(p, stream);
    case DType::kBFloat16:
      return bn_relu_backward_typed<__nv_bfloat16>(p, stream);
    default:
      return bn_relu_backward_typed<float>(p, stream);
  }
}

#define VK_STRINGIFY_(x) #x
#define VK_STRINGIFY(x) VK_STRINGIFY_(x)

const char* compiled_archs() { return VK_STRINGIFY(__CUDA_ARCH_LIST__); }

}  // namespace vgg_kernels::cuda
