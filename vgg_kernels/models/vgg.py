"""VGG configurations A, A-LRN, B, C, D, E (Simonyan & Zisserman) as FusedVGG, torchvision's
module tree with a fused executor, plus the plain eager model with the same layout
(``make_eager_vgg``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from vgg_kernels.backends import check_backend_name
from vgg_kernels.checks import autocast_dtype, dtype_name
from vgg_kernels.fusion import fuse
from vgg_kernels.layers import _tracing

# An int is a 3x3 conv with that many output channels, (k, 1) a 1x1 conv, "M" a 2x2/2 max-pool,
# "LRN" LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2).
CONFIGS: dict[str, list[Any]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
          512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}

# The batch from which FusedVGG folds its first Linear on a 1x1 feature map (see
# FusedVGG._folded_first_linear): the fold costs one pass over the 103M weights, the GEMMs it
# saves two per sample (forward and two backward products of 25088 x 4096).
FOLD_MIN_BATCH = 16

# torchvision's model names -> (config, batch_norm)
TORCHVISION_NAMES: dict[str, tuple[str, bool]] = {
    f"vgg{depth}{suffix}": (config, suffix == "_bn")
    for depth, config in (("11", "A"), ("13", "B"), ("16", "D"), ("19", "E"))
    for suffix in ("", "_bn")
}


def parse_config(config: str, batch_norm: bool | None = None) -> tuple[str, bool]:
    """Map ``'D'``, ``'d'``, ``'vgg16'`` or ``'vgg16_bn'`` to (config letter, batch_norm).

    A torchvision name fixes ``batch_norm``; passing a contradicting ``batch_norm`` is an error.
    """
    if not isinstance(config, str):
        raise TypeError(f"config must be a str such as 'D' or 'vgg16_bn' (got "
                        f"{type(config).__name__})")
    if config in TORCHVISION_NAMES:
        letter, bn = TORCHVISION_NAMES[config]
        if batch_norm is not None and batch_norm != bn:
            raise ValueError(f"config {config!r} implies batch_norm={bn} "
                             f"(got batch_norm={batch_norm})")
        return letter, bn
    letter = config.upper()
    if letter not in CONFIGS:
        names = sorted(CONFIGS) + sorted(TORCHVISION_NAMES)
        raise ValueError(f"config must be one of {names} (got {config!r})")
    return letter, True if batch_norm is None else bool(batch_norm)


def _layer_specs(config: str):
    """Yield ("conv", (out_channels, kernel, pool_follows)), ("lrn", None) or ("pool", None)."""
    items = CONFIGS[config]
    for i, item in enumerate(items):
        if item == "M":
            yield "pool", None
        elif item == "LRN":
            yield "lrn", None
        else:
            out, k = item if isinstance(item, tuple) else (item, 3)
            nxt = items[i + 1] if i + 1 < len(items) else None
            yield "conv", (out, k, nxt == "M")


def _make_lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


def _make_classifier(num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(4096, num_classes),
    )


def _init_weights(model: nn.Module) -> None:
    """torchvision's VGG initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


def _check_common_args(num_classes: int, dropout: float) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int (got {num_classes!r})")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1] (got {dropout!r})")


def make_layers(config: str, batch_norm: bool) -> list[nn.Module]:
    """torchvision's ``features`` layer list for a config letter: Conv2d (3x3 padding 1, or
    1x1), BatchNorm2d when ``batch_norm``, ReLU(inplace=True), LocalResponseNorm, and
    MaxPool2d(2, 2), in torchvision's order (so its indices and state_dict keys)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for kind, arg in _layer_specs(config):
        if kind == "conv":
            out, k, _ = arg
            layers.append(nn.Conv2d(in_ch, out, k, padding=k // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out
        elif kind == "lrn":
            layers.append(_make_lrn())
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return layers


def first_conv(features: nn.Module) -> nn.Conv2d | None:
    """The first ``nn.Conv2d`` of a ``features`` container (None if it holds none)."""
    return next((m for m in features.modules() if isinstance(m, nn.Conv2d)), None)


def halving_pools(features: nn.Module) -> int:
    """How many 2x2/2 max-pools ``features`` holds: an input must be at least 2 ** that wide
    and high."""
    def halves(m: nn.Module) -> bool:
        return isinstance(m, nn.MaxPool2d) and m.kernel_size in (2, (2, 2)) and (
            m.stride in (2, (2, 2)) or m.stride is None)

    return sum(1 for m in features.modules() if halves(m))


class FusedVGG(nn.Module):
    """VGG whose every conv + BN + ReLU (+ following max-pool) runs as one fused block.

    ``FusedVGG('D')`` is torchvision's ``vgg16_bn``; ``FusedVGG('D', batch_norm=False)`` or
    ``FusedVGG('vgg16')`` its ``vgg16``. It is torchvision's module tree after
    ``vgg_kernels.fuse``: ``features`` holds the same ``Conv2d``, ``BatchNorm2d``, ``ReLU`` and
    ``MaxPool2d`` modules at the same indices (a ``FusedSequential``, which executes the runs
    fused, in any slice), then ``avgpool`` and ``classifier``; parameter and buffer names,
    state_dict keys, hooks and feature extraction are torchvision's. A-LRN and C follow the same
    layout rules. Edits work as on torchvision's model: a new first conv, a cut ``features``.

    Input: (N, C, H, W) with C the first conv's ``in_channels`` (3) and H, W at least 2 ** (the
    max-pools in ``features``); it is converted to channels_last once.
    Output: (N, num_classes) logits.
    """

    def __init__(self, config: str = "D", *, batch_norm: bool | None = None,
                 num_classes: int = 1000, dropout: float = 0.5, init_weights: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        self.config, self.batch_norm = parse_config(config, batch_norm)
        _check_common_args(num_classes, dropout)
        check_backend_name(backend)
        self.features = nn.Sequential(*make_layers(self.config, self.batch_norm))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = _make_classifier(num_classes, dropout)
        if init_weights:
            _init_weights(self)
        fuse(self, backend=backend)

    @property
    def backend(self) -> str:
        """The kernels ``features`` runs on: ``'auto'``, ``'triton'``, ``'native'`` or
        ``'reference'`` (settable)."""
        return getattr(self.features, "backend", "auto")

    @backend.setter
    def backend(self, name: str) -> None:
        fuse(self, backend=check_backend_name(name))

    @classmethod
    def from_torchvision(cls, model: nn.Module, *, backend: str = "auto") -> FusedVGG:
        """Convert one of torchvision's eight VGGs: weights, BN buffers and options, device and
        dtype, each parameter's ``requires_grad`` and each module's train/eval mode."""
        features = getattr(model, "features", None)
        classifier = getattr(model, "classifier", None)
        if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Sequential):
            raise TypeError(f"model must be a torchvision VGG (got {type(model).__name__})")
        convs = [m for m in features if isinstance(m, nn.Conv2d)]
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in features)
        by_depth = {8: "A", 10: "B", 13: "D", 16: "E"}
        if len(convs) not in by_depth:
            raise ValueError(f"model must be a torchvision VGG with 8, 10, 13 or 16 convs "
                             f"(got {len(convs)})")
        last = classifier[-1]
        dropout = next((m.p for m in classifier if isinstance(m, nn.Dropout)), 0.5)
        fused = cls(by_depth[len(convs)], batch_norm=has_bn, num_classes=last.out_features,
                    dropout=dropout, init_weights=False, backend=backend)
        ours = dict(fused.named_modules())
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d) and name in ours:
                ours[name].eps, ours[name].momentum = module.eps, module.momentum
        reference = next(iter(model.parameters()))
        fused.to(device=reference.device, dtype=reference.dtype)
        fused.load_state_dict(model.state_dict(), strict=True)
        for theirs, param in zip(model.parameters(), fused.parameters(), strict=True):
            param.requires_grad_(theirs.requires_grad)
        for name, module in model.named_modules():
            if name in ours:
                ours[name].training = module.training
        return fused

    # -- forward ----------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` naming what is wrong with a model input, judged
        from the modules there now (the first conv's channels, the pools in ``features``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (got {x.dtype})")
        conv = first_conv(self.features)
        channels = conv.in_channels if conv is not None else x.shape[1] if x.dim() > 1 else 0
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor (N, {channels}, H, W); got {x.dim()}-D "
                             f"shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"x must have {channels} channels, the first conv's in_channels "
                             f"(got {x.shape[1]})")
        parameter = next(self.parameters(), None)
        if parameter is not None:
            if x.device != parameter.device:
                raise ValueError(f"x must be on the model's device {parameter.device} (got "
                                 f"{x.device})")
            # under torch.autocast the convolutions and linear layers cast their operands
            if x.dtype != parameter.dtype and autocast_dtype(x.device) is None:
                raise TypeError(f"x must be {dtype_name(parameter.dtype)} like the model's "
                                f"parameters (got {dtype_name(x.dtype)}); cast one of them, or "
                                f"run the model under torch.autocast")
        pools = halving_pools(self.features)
        least = 2 ** pools
        if x.shape[2] < least or x.shape[3] < least:
            raise ValueError(f"x must be at least {least}x{least} for the {pools} 2x2 "
                             f"max-pools in features; got {x.shape[2]}x{x.shape[3]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing():  # tracers record torchvision's graph: modules and flatten only
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))
        self.check_input(x)
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        folded = self._folded_first_linear(x)
        if folded is not None:
            return folded
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def _folded_first_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The classifier on a 1x1 feature map (inputs of 32 to 63 pixels: CIFAR-sized), where
        AdaptiveAvgPool2d((7, 7)) copies each channel 49 times and the first Linear's weight
        meets 49 copies of one value: ``W x`` is ``(W summed over its 49 positions per channel)
        v``, with the same gradients (autograd broadcasts the sum's over the 49). One pass over
        W replaces three GEMMs 49 times larger than the folded ones, so from a batch of
        FOLD_MIN_BATCH (on a 2-core Zen 4, batch 32: 0.75 -> 0.60 s per VGG11-BN SGD step).
        None where the model is not in that form, or hooks need the modules called."""
        first = self.classifier[0] if len(self.classifier) else None
        if (x.shape[2:] != (1, 1) or x.shape[0] < FOLD_MIN_BATCH
                or type(self.avgpool) is not nn.AdaptiveAvgPool2d
                or self.avgpool.output_size not in ((7, 7), 7)
                or type(first) is not nn.Linear or first.in_features != x.shape[1] * 49
                or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                       or getattr(m, "_backward_pre_hooks", None)
                       for m in (self.avgpool, self.classifier, first))):
            return None
        weight = first.weight.view(first.out_features, x.shape[1], 49).sum(-1)
        y = torch.nn.functional.linear(torch.flatten(x, 1), weight, first.bias)
        for module in list(self.classifier)[1:]:
            y = module(y)
        return y

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles the plain eager model over the same modules (the
        fused executor is Python); ``torch.export`` keeps working on the model itself."""
        plain = nn.Sequential(OrderedDict([
            ("features", nn.Sequential(OrderedDict(self.features._modules))),
            ("avgpool", self.avgpool),
            ("flatten", nn.Flatten(1)),
            ("classifier", self.classifier),
        ]))
        return plain


def make_eager_vgg(config: str = "D", *, batch_norm: bool | None = None,
                   num_classes: int = 1000, dropout: float = 0.5,
                   init_weights: bool = True) -> nn.Module:
    """The plain eager model (Conv2d, BatchNorm2d, ReLU, MaxPool2d modules) with torchvision's
    layout and state_dict keys, for every config including A-LRN and C. Loads a FusedVGG's
    state_dict with ``strict=True``."""
    letter, bn = parse_config(config, batch_norm)
    _check_common_args(num_classes, dropout)
    model = nn.Sequential(OrderedDict([
        ("features", nn.Sequential(*make_layers(letter, bn))),
        ("avgpool", nn.AdaptiveAvgPool2d((7, 7))),
        ("flatten", nn.Flatten(1)),
        ("classifier", _make_classifier(num_classes, dropout)),
    ]))
    if init_weights:
        _init_weights(model)
    return model
