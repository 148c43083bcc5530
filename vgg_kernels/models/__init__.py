"""VGG models: FusedVGG (torchvision's module tree, fused execution) and VGGFeatures (feature
maps at named taps)."""

from vgg_kernels.models.features import LPIPS_TAPS, VGGFeatures, layer_names
from vgg_kernels.models.vgg import CONFIGS, TORCHVISION_NAMES, FusedVGG, make_eager_vgg

__all__ = ["CONFIGS", "LPIPS_TAPS", "TORCHVISION_NAMES", "FusedVGG", "VGGFeatures",
           "layer_names", "make_eager_vgg"]
