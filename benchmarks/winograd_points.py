"""The fp32 accuracy of Winograd F(4x4, 3x3) and F(6x6, 3x3) for several sets of interpolation
points, against a float64 conv and next to PyTorch's own fp32 conv: the measurement behind the
points the CPU kernel uses (csrc/cpu/conv_kernels_impl.h, 0, +-2/3, +-3/2) and behind its
largest tile being F(4x4).

    python benchmarks/winograd_points.py [--seed 1]

For each point set the transforms are built exactly (Toom-Cook, in fractions), rounded to fp32,
and applied in fp32 with torch.einsum to VGG-like layers (ReLU'd input, Kaiming weights); the
error is max |y - y64| / max |y64|. The project's rule admits at most 2x PyTorch's error + 2e-6.
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import torch
import torch.nn.functional as F


def _pm(*values) -> list[Fraction]:
    return [Fraction(0)] + [s * Fraction(v) for v in values for s in (1, -1)]


# F(m x m, 3x3) takes m + 1 finite points (and infinity)
POINT_SETS = {
    "F4: 0, +-1, +-2 (Lavin)": _pm(1, 2),
    "F4: 0, +-1/2, +-2": _pm(Fraction(1, 2), 2),
    "F4: 0, +-1, +-1/2": _pm(1, Fraction(1, 2)),
    "F4: 0, +-2/3, +-3/2": _pm(Fraction(2, 3), Fraction(3, 2)),
    "F4: 0, +-3/4, +-4/3": _pm(Fraction(3, 4), Fraction(4, 3)),
    "F6: 0, +-1/2, +-1, +-2": _pm(Fraction(1, 2), 1, 2),
    "F6: 0, +-2/3, +-1, +-3/2": _pm(Fraction(2, 3), 1, Fraction(3, 2)),
    "F6: 0, +-1/2, +-2/3, +-3/2": _pm(Fraction(1, 2), Fraction(2, 3), Fraction(3, 2)),
    "F6: 0, +-3/4, +-4/3, +-1/2": _pm(Fraction(3, 4), Fraction(4, 3), Fraction(1, 2)),
}


def _polymul(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def transforms(points: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T, G, B^T) of F(m x m, 3x3) with the m + 1 finite ``points`` and infinity, exact,
    then rounded to fp32."""
    p = [Fraction(x) for x in points]
    m = len(p) - 1
    at = [[q ** i for q in p] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, q in enumerate(p):
        norm = Fraction(1)
        for other in p[:j] + p[j + 1:]:
            norm *= q - other
        g.append([q ** k / norm for k in range(3)])
    g.append([Fraction(0), Fraction(0), Fraction(1)])
    bt = []
    for j in range(len(p)):
        poly = [Fraction(1)]
        for other in p[:j] + p[j + 1:]:
            poly = _polymul(poly, [-other, Fraction(1)])
        bt.append(poly + [Fraction(0)])
    poly = [Fraction(1)]
    for other in p:
        poly = _polymul(poly, [-other, Fraction(1)])
    bt.append(poly)

    def as_tensor(rows):
        return torch.tensor([[float(x) for x in row] for row in rows], dtype=torch.float32)

    return as_tensor(at), as_tensor(g), as_tensor(bt)


def winograd(x: torch.Tensor, w: torch.Tensor, at, g, bt) -> torch.Tensor:
    """Valid 3x3 conv of x (already padded; H - 2, W - 2 multiples of the tile m) in x's
    dtype, by F(m x m, 3x3) with the given transforms."""
    tile = at.shape[0]
    at, g, bt = (m.to(x.dtype) for m in (at, g, bt))
    n, _, h, width = x.shape
    u = torch.einsum("ij,kcjl,ml->kcim", g, w.to(x.dtype), g)
    tiles = x.unfold(2, tile + 2, tile).unfold(3, tile + 2, tile)
    v = torch.einsum("ij,nctujl,ml->nctuim", bt, tiles, bt)
    m = torch.einsum("kcim,nctuim->nktuim", u, v)
    y = torch.einsum("ij,nktujl,ml->nktuim", at, m, at)
    th, tw = (h - 2) // tile, (width - 2) // tile
    return y.permute(0, 1, 2, 4, 3, 5).reshape(n, w.shape[0], th * tile, tw * tile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    layers = [(64, 64, 36), (256, 256, 24), (512, 512, 12)]  # sizes: multiples of 4 and 6
    cases = []
    for c, k, size in layers:
        x = torch.relu(torch.randn(2, c, size + 2, size + 2))
        w = torch.randn(k, c, 3, 3) * (2.0 / (9 * c)) ** 0.5
        exact = F.conv2d(x.double(), w.double())
        scale = exact.abs().max()
        torch_error = ((F.conv2d(x, w).double() - exact).abs().max() / scale).item()
        cases.append((x, w, exact, scale, torch_error))
    header = "points".ljust(30) + "".join(f"C={c:<4d}".rjust(12) for c, _, _ in layers)
    print(header)
    print("PyTorch fp32 conv".ljust(30) + "".join(f"{e:12.2e}" for *_, e in cases))
    print("rule: 2x PyTorch + 2e-6".ljust(30)
          + "".join(f"{2 * e + 2e-6:12.2e}" for *_, e in cases))
    for name, points in POINT_SETS.items():
        matrices = transforms(points)
        errors = [((winograd(x, w, *matrices).double() - exact).abs().max() / scale).item()
                  for x, w, exact, scale, _ in cases]
        print(name.ljust(30) + "".join(f"{e:12.2e}" for e in errors))


if __name__ == "__main__":
    main()
