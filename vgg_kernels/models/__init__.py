"""VGG models built from fused blocks."""

from vgg_kernels.models.vgg import CONFIGS, TORCHVISION_NAMES, FusedVGG, make_eager_vgg

__all__ = ["CONFIGS", "TORCHVISION_NAMES", "FusedVGG", "make_eager_vgg"]
