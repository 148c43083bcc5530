"""vgg_kernels: fused conv + BatchNorm + ReLU (+ max-pool) kernels and a drop-in VGG for PyTorch."""

from vgg_kernels import ops
from vgg_kernels.backends import BACKEND_ENV, BackendFallbackWarning, available_backends
from vgg_kernels.fusion import FusionReport, freeze, fuse, fusion_report, unfreeze
from vgg_kernels.layers import FusedConvBNReLU, FusedSequential
from vgg_kernels.models import CONFIGS, FusedVGG, VGGFeatures, make_eager_vgg

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV",
    "BackendFallbackWarning",
    "CONFIGS",
    "FusedConvBNReLU",
    "FusedSequential",
    "FusedVGG",
    "FusionReport",
    "VGGFeatures",
    "available_backends",
    "freeze",
    "fuse",
    "fusion_report",
    "make_eager_vgg",
    "ops",
    "unfreeze",
    "__version__",
]
