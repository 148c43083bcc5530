"""VGGFeatures: the feature maps of a VGG at named taps (relu1_2, conv3_3, pool4, ... or
torchvision's ``features`` indices), for perceptual losses, style transfer and feature
extraction. Only the layers up to the deepest tap run, as fused blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vgg_kernels.backends import check_backend_name
from vgg_kernels.fusion import fuse
from vgg_kernels.layers import run_modules
from vgg_kernels.models.vgg import CONFIGS, first_conv, make_layers, parse_config

# LPIPS's and most perceptual losses' taps: the last ReLU of each of VGG16's five stages.
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def layer_names(config: str, batch_norm: bool) -> list[str]:
    """The literature's name of every module of ``make_layers(config, batch_norm)``, by index:
    ``conv{stage}_{i}``, ``bn{stage}_{i}``, ``relu{stage}_{i}``, ``pool{stage}``, and ``lrn1``
    (A-LRN), with stages counted from 1 and separated by the pools."""
    names: list[str] = []
    stage, conv = 1, 0
    for item in CONFIGS[config]:
        if item == "M":
            names.append(f"pool{stage}")
            stage, conv = stage + 1, 0
        elif item == "LRN":
            names.append(f"lrn{stage}")
        else:
            conv += 1
            names.append(f"conv{stage}_{conv}")
            if batch_norm:
                names.append(f"bn{stage}_{conv}")
            names.append(f"relu{stage}_{conv}")
    return names


class VGGFeatures(nn.Module):
    """A VGG's ``features`` cut after its deepest tap, returning the maps at the taps.

    ``VGGFeatures('vgg16', taps=('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3'))`` returns a dict
    from each tap to its (N, C, H, W) map (channels_last) in the order given. Taps are the
    literature's names (``layer_names``: conv3_3, relu4_2, pool5, bn2_1 for BN configs, ...) or
    torchvision's ``features`` indices (``3`` or ``"3"``); the dict's keys are the taps as given.

    The modules are torchvision's (``self.features`` holds ``features[:deepest + 1]`` with the
    same indices and state_dict keys), so ``load_state_dict`` takes a torchvision VGG
    state_dict of the same config, with or without BN, strictly: every key this module holds
    must be there; keys of the layers it cut off (deeper features, the classifier) are ignored.

    By default the network is frozen, as perceptual losses use it: eval mode and parameters
    without gradients, so a backward computes only the input's gradient (the fused
    input-gradient path). ``trainable=True`` keeps torch's defaults (train mode, gradients).
    """

    def __init__(self, config: str = "vgg16", taps: Sequence[str | int] = LPIPS_TAPS, *,
                 batch_norm: bool | None = None, backend: str = "auto",
                 trainable: bool = False,
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        letter, bn = parse_config(config, batch_norm)
        self.config, self.batch_norm = letter, bn
        names = layer_names(letter, bn)
        if isinstance(taps, (str, int)):
            raise TypeError(f"taps must be a sequence of names or indices (got {taps!r}); "
                            f"for one tap write ({taps!r},)")
        if len(taps) == 0:
            raise ValueError("taps must name at least one layer")
        indices = [self._index_of(tap, names) for tap in taps]
        if len(set(indices)) != len(indices):
            raise ValueError(f"taps must be distinct layers (got {list(taps)})")
        self.taps = tuple(taps)
        self._positions = dict(zip(indices, (str(t) for t in taps), strict=True))
        self._keys = {str(t): t for t in taps}
        depth = max(indices) + 1
        check_backend_name(backend)
        self.backend = backend
        self.features = fuse(nn.Sequential(*make_layers(letter, bn)[:depth]), backend=backend)
        self.layer_names = tuple(names[:depth])
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=True)
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    @staticmethod
    def _index_of(tap: str | int, names: list[str]) -> int:
        if isinstance(tap, bool) or not isinstance(tap, (str, int)):
            raise TypeError(f"taps must be layer names or features indices (got {tap!r})")
        if isinstance(tap, int) or tap.isdigit():
            index = int(tap)
            if not 0 <= index < len(names):
                raise ValueError(f"tap {tap!r} must be a features index in [0, {len(names)})")
            return index
        if tap not in names:
            raise ValueError(f"tap {tap!r} must be one of {names} or a features index")
        return names.index(tap)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):
        """As ``nn.Module.load_state_dict``, also from a whole torchvision VGG state_dict: the
        keys of layers this module does not hold (deeper ``features``, ``classifier``) are
        dropped first; every key it holds must be present under ``strict``."""
        depth = len(self.features)

        def held(key: str) -> bool:
            parts = key.split(".")
            if parts[0] != "features":
                return parts[0] not in ("classifier", "avgpool")
            return len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < depth

        kept = OrderedDict((k, v) for k, v in state_dict.items() if held(k))
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            kept._metadata = metadata  # type: ignore[attr-defined]
        return super().load_state_dict(kept, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> dict[str | int, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
        conv = first_conv(self.features)
        channels = conv.in_channels if conv is not None else 3
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"x must be a 4-D tensor (N, {channels}, H, W) (got shape "
                             f"{tuple(x.shape)})")
        x = x.contiguous(memory_format=torch.channels_last)
        backend = getattr(self.features, "backend", self.backend)
        _, tapped = run_modules(list(self.features), x, backend, self._positions)
        return {self._keys[str(tap)]: tapped[str(tap)] for tap in self.taps}
