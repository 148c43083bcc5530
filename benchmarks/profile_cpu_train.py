"""Where a CPU training step of the conv blocks goes: torch.profiler's per-op totals for
FusedVGG (native kernels) and torchvision's eager model, same weights, one process.

    python benchmarks/profile_cpu_train.py [--config vgg11_bn] [--batch 4] [--resolution 112]

Each model's ``features`` runs forward, backward (of the mean square of its output) and an SGD
step over its parameters, ``--steps`` times after ``--warmup``; the classifier is left out (both
models run it alike, and ``bench_cpu_model.py --mode train`` times it as ``head``). Prints the
milliseconds per step and the ops that took the most self time.
"""

from __future__ import annotations

import argparse

import torch

from vgg_kernels import FusedVGG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="vgg11_bn", help="torchvision VGG name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12, help="ops listed per model")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.resolution < 32:
        parser.error("--steps and --batch must be positive and --resolution at least 32")

    import torchvision

    torch.manual_seed(0)
    eager = getattr(torchvision.models, args.config)(weights=None).train()
    fused = FusedVGG.from_torchvision(eager).train()
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    for name, model in (("fused", fused), ("eager", eager)):
        features = model.features
        optimizer = torch.optim.SGD(features.parameters(), lr=0.01, momentum=0.9)

        def step(features=features, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            features(x).square().mean().backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        with torch.profiler.profile() as profile:
            for _ in range(args.steps):
                step()
        averages = profile.key_averages()
        total_ms = sum(event.self_cpu_time_total for event in averages) / 1000 / args.steps
        print(f"{name}: {args.config} features, batch {args.batch}, {args.resolution}x"
              f"{args.resolution}: {total_ms:.0f} ms per step (forward, backward, SGD)")
        for event in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"  {event.key:<44}{event.self_cpu_time_total / 1000 / args.steps:>9.1f} ms"
                  f"{event.count / args.steps:>7.0f} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
