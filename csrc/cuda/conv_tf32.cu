// Tensor-core conv kernels for fp32 storage, multiplied as tf32 on tensor cores (when
// torch.backends.cudnn.allow_tf32, as cuDNN does).
#include "conv_bn_relu.cuh"

namespace vgg_kernels::cuda {

cudaError_t launch_conv_tf32(const ConvParams& p, ConvMode mode, cudaStream_t stream) {
  return launch_conv_tensor_cores<float>(p, mode, stream);
}

}  // namespace vgg_kernels::cuda
