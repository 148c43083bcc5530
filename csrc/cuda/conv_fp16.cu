// Tensor-core conv kernels for fp16 storage, fp16 tensor-core products, fp32 accumulation.
#include "conv_bn_relu.cuh"

namespace vgg_kernels::cuda {

cudaError_t launch_conv_fp16(const ConvParams& p, ConvMode mode, cudaStream_t stream) {
  return launch_conv_tensor_cores<__half>(p, mode, stream);
}

}  // namespace vgg_kernels::cuda
