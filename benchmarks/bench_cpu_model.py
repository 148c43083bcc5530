"""CPU benchmark: FusedVGG on the native C++ kernels against torchvision's VGG eager with the same
weights, in one process with torch's default threads.

    python benchmarks/bench_cpu_model.py [--batch 4] [--resolution 112] [--repeats 10]
                                         [--mode eval|train] [--config D]
                                         [--out benchmarks/results/]

Eval mode (default; FusedVGG('D') against vgg16_bn): the bar eager / fused >= 1.25 at batch 4,
112x112, fp32. Variants, timed in interleaved rounds (one call of each per round, so load from
other processes hits all alike):
    eager           torchvision's model as users run it (NCHW; oneDNN conv, then BN, ReLU, pool)
    eager_cl        the same in channels_last
    eager_folded    BN folded into the conv by hand (torch.nn.utils.fusion), NCHW (eval only)
    fused           FusedVGG.from_torchvision(model) on backend 'auto' (native on the CPU)
    fused_frozen    the same after vgg_kernels.freeze (its own copy): the packed conv weights
                    kept across calls (eval only)
    fused_fold_cached  the same model with each block's BN fold (its K scales and shifts,
                    computed afresh on every call) memoized instead: what a fold cache would
                    save (eval only; the ratio fused_fold_cached / fused is the fold's cost)
Train mode (--mode train, default config A: vgg11_bn): one SGD step (momentum 0.9, cross-entropy,
torchvision's classifier) per call, the same bar, at batch 32, 32x32 and batch 4, 112x112; also
timed: the head alone (avgpool + classifier forward, backward and SGD step on the features'
output), which every variant runs alike, and the ratio of the steps less it.
Prints a table and writes ``<cpu-slug>-<yyyymmdd>-<sha>-cpu_model-b<batch>-r<resolution>.json``
(``cpu_train`` in train mode; environment, every raw sample, medians, ratios, max error against
a float64 eager run: the logits in eval mode, the first conv's weight gradient after one step in
train mode) into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vgg_kernels  # noqa: E402
from vgg_kernels import FusedVGG  # noqa: E402
from vgg_kernels.backends import native, resolve_backend  # noqa: E402
from vgg_kernels.bench.environment import cpu_name, git_commit, slugify  # noqa: E402


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _randomise(model: nn.Module) -> None:
    """Non-trivial BN statistics and conv biases (torchvision's init leaves BN an identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Conv2d):
            m.bias.data.uniform_(-0.1, 0.1)


def _fold_bn(model: nn.Module) -> nn.Module:
    """Copy of a torchvision VGG with every Conv2d + BatchNorm2d pair fused into one Conv2d."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model)
    layers, features = [], list(folded.features)
    i = 0
    while i < len(features):
        if (isinstance(features[i], nn.Conv2d) and i + 1 < len(features)
                and isinstance(features[i + 1], nn.BatchNorm2d)):
            layers.append(fuse_conv_bn_eval(features[i], features[i + 1]))
            i += 2
        else:
            layers.append(features[i])
            i += 1
    folded.features = nn.Sequential(*layers)
    return folded


def _with_fold_cache(fn):
    """``fn`` run with ``vgg_kernels.layers._fold`` memoized per (conv, bn) pair for the call."""
    from vgg_kernels import layers

    fold, memo = layers._fold, {}

    def cached(conv, bn, device):
        key = (id(conv), id(bn))
        if key not in memo:
            memo[key] = fold(conv, bn, device)
        return memo[key]

    def call():
        layers._fold = cached
        try:
            return fn()
        finally:
            layers._fold = fold
    return call


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median_s": statistics.median(ordered), "min_s": ordered[0],
            "p20_s": quantile(0.2), "p80_s": quantile(0.8)}


def _train_variants(models: dict[str, tuple[nn.Module, torch.Tensor]], x: torch.Tensor):
    """One SGD step per call of each model (train mode, its own optimizer and batch), and the
    error of each one's first-step first-conv weight gradient against a float64 eager step."""
    target = torch.randint(0, 1000, (x.shape[0],))

    def step_of(model: nn.Module, inputs: torch.Tensor, optimizer):
        def step():
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), target).backward()
            optimizer.step()
        return step

    def probe_of(model: nn.Module) -> nn.Module:
        """A copy in train mode with dropout off: the same function on every variant."""
        probe = copy.deepcopy(model).train()
        for module in probe.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        return probe

    oracle = probe_of(models["eager"][0]).double()
    nn.functional.cross_entropy(oracle(x.double()), target).backward()
    want = oracle.features[0].weight.grad
    variants, errors = {}, {}
    for name, (model, inputs) in models.items():
        model.train()
        probe = probe_of(model)
        nn.functional.cross_entropy(probe(inputs), target).backward()
        got = probe.features[0].weight.grad.double()
        errors[name] = float((got - want).abs().max() / want.abs().max())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        variants[name] = step_of(model, inputs, optimizer)
    # The part every variant shares: torchvision's head (avgpool, classifier) on the features'
    # output, forward, backward and its SGD step (the classifier holds most of the parameters)
    eager = models["eager"][0]
    with torch.no_grad():
        features = eager.features(x)
    head = nn.Sequential(copy.deepcopy(eager.avgpool), nn.Flatten(1),
                         copy.deepcopy(eager.classifier)).train()
    variants["head"] = step_of(head, features, torch.optim.SGD(head.parameters(), lr=0.01,
                                                                momentum=0.9))
    errors["head"] = None
    return variants, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="eval: inference; train: one SGD step per call")
    parser.add_argument("--config", default=None,
                        help="torchvision name (default vgg16_bn in eval mode, vgg11_bn in train)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="directory (or .json path) for the result file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    import torchvision

    train = args.mode == "train"
    model_name = args.config or ("vgg11_bn" if train else "vgg16_bn")
    eager = getattr(torchvision.models, model_name)(weights=None).eval()
    _randomise(eager)
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused = FusedVGG.from_torchvision(eager).eval()
    backend = resolve_backend("auto", torch.device("cpu"), torch.float32,
                              "conv_bn_relu_train" if train else "conv_bn_relu_infer").name
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    if train:
        variants, errors = _train_variants(
            {"eager": (eager, x), "eager_cl": (eager_cl, x_cl), "fused": (fused, x)}, x)
    else:
        folded = _fold_bn(eager)
        frozen = vgg_kernels.freeze(FusedVGG.from_torchvision(eager).eval())
        variants = {
            "eager": lambda: eager(x),
            "eager_cl": lambda: eager_cl(x_cl),
            "eager_folded": lambda: folded(x),
            "fused": lambda: fused(x),
            "fused_frozen": lambda: frozen(x),
            "fused_fold_cached": _with_fold_cache(lambda: fused(x)),
        }
        with torch.no_grad():
            oracle = copy.deepcopy(eager).double()(x.double())
            errors = {name: float((fn().double() - oracle).abs().max() / oracle.abs().max())
                      for name, fn in variants.items()}

    with torch.set_grad_enabled(train):
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        load_before = _load_average()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                began = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - began)
        load_after = _load_average()

    commit, dirty = git_commit()
    stats = {name: _summary(s) for name, s in samples.items()}
    fused_median = stats["fused"]["median_s"]
    ratios = {f"{name}_over_fused": stats[name]["median_s"] / fused_median
              for name in variants if name not in ("fused", "head")}
    if "head" in stats:  # the features' forward + backward alone: the step less the shared head
        head_median = stats["head"]["median_s"]
        ratios["features_eager_over_fused"] = ((stats["eager"]["median_s"] - head_median)
                                               / (fused_median - head_median))
    result = {
        "suite": "cpu_model",
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit[:7] if commit else "unknown",
            "tree_dirty": dirty,
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "native": native.build_info(),
            "backend": backend,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "config": {"model": f"{model_name} / FusedVGG.from_torchvision", "mode": args.mode,
                   "dtype": "float32", "batch": args.batch, "resolution": args.resolution,
                   "repeats": args.repeats, "warmup": args.warmup,
                   **({"step": "SGD(lr=0.01, momentum=0.9), cross-entropy"} if train else {})},
        "max_relative_error_vs_float64": errors,
        "samples_s": samples,
        "stats": stats,
        "ratios": ratios,
        "bar": {"eager_over_fused_at_least": 1.25,
                "met": ratios["eager_over_fused"] >= 1.25},
    }

    print(f"{model_name} {args.mode}, batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"fp32, {torch.get_num_threads()} threads, backend {backend} "
          f"({result['environment']['native'].get('cpu', 'n/a')})")
    print(f"{'variant':<18}{'median s':>10}{'p20 s':>9}{'p80 s':>9}{'eager/x':>9}{'max err':>10}")
    for name in variants:
        s = stats[name]
        error = "n/a" if errors[name] is None else f"{errors[name]:.1e}"
        print(f"{name:<18}{s['median_s']:>10.4f}{s['p20_s']:>9.4f}{s['p80_s']:>9.4f}"
              f"{stats['eager']['median_s'] / s['median_s']:>9.2f}{error:>10}")
    if "fused_frozen" in stats:
        print(f"vgg_kernels.freeze: fused / fused_frozen = "
              f"{1 / ratios['fused_frozen_over_fused']:.3f}")
    if "fused_fold_cached" in stats:
        print(f"BN fold on every call: fused_fold_cached / fused = "
              f"{ratios['fused_fold_cached_over_fused']:.3f}")
    print(f"eager / fused = {ratios['eager_over_fused']:.2f} (bar 1.25: "
          f"{'met' if result['bar']['met'] else 'NOT met'}); eager_cl / fused = "
          f"{ratios['eager_cl_over_fused']:.2f}")
    if "features_eager_over_fused" in ratios:
        print(f"head (avgpool + classifier forward, backward and SGD step, shared by every "
              f"variant): {stats['head']['median_s']:.4f} s; the step less the head: eager / "
              f"fused = {ratios['features_eager_over_fused']:.2f}")

    out = Path(args.out)
    if out.suffix != ".json":
        slug = slugify(cpu_name())
        day = datetime.date.today().strftime("%Y%m%d")
        suite = "cpu_train" if train else "cpu_model"
        shape = f"b{args.batch}-r{args.resolution}"
        out = out / f"{slug}-{day}-{result['environment']['commit']}-{suite}-{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
