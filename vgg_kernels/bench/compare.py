"""``compare OLD NEW``: the change of every tracked figure, and whether any regressed.

Rule (spread-aware, so that noise alone does not fail): each figure has a value and a spread
[low, high] from the 20th/80th percentiles of its samples (see ``results.tracked_figures``).
With threshold ``t``:

- lower-is-better (ms, MiB): regression when ``new.low > old.high * (1 + t)`` — even the fast end
  of the new spread is slower than the slow end of the old one by more than ``t``; improvement
  when ``new.high * (1 + t) < old.low``.
- higher-is-better (speedup, images/s): regression when ``new.high * (1 + t) < old.low``;
  improvement when ``new.low > old.high * (1 + t)``.
- otherwise: ``same`` when the medians differ by at most ``t``, else ``noise`` (the medians moved
  by more than ``t`` but the spreads do not separate).
- a geometric mean over a different number of layers in the two files is ``incomparable`` (not a
  failure; the layers themselves are judged one by one).

Default ``t``: 5% for GPU results, 25% for CPU results (shared, small CPUs are noisy).
Figures present in only one file are listed as missing/new and do not fail by default: backends
come and go with the machine (the native extension built or not, ``--no-compile``), so a missing
case is a different run, not a slower one; ``--fail-on-missing`` makes them fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vgg_kernels.bench.results import Figure, tracked_figures
from vgg_kernels.bench.table import format_table

DEFAULT_THRESHOLD = {"cuda": 0.05, "cpu": 0.25}


@dataclass(frozen=True)
class Change:
    """One tracked figure in both files."""

    key: str
    old: Figure
    new: Figure
    verdict: str  # "regression", "improvement", "noise", "same", "incomparable"

    @property
    def ratio(self) -> float:
        """new / old median value."""
        return self.new.value / self.old.value if self.old.value else float("inf")


@dataclass
class Comparison:
    """Everything ``compare`` found."""

    changes: list[Change]
    missing: list[str]  # in OLD only
    added: list[str]  # in NEW only
    threshold: float
    notes: list[str]

    @property
    def regressions(self) -> list[Change]:
        """Changes judged regressions."""
        return [c for c in self.changes if c.verdict == "regression"]


def default_threshold(new: dict[str, Any]) -> float:
    """5% when the new result ran on a GPU, 25% on a CPU."""
    device_type = new.get("environment", {}).get("device_type", "cuda")
    return DEFAULT_THRESHOLD.get(device_type, DEFAULT_THRESHOLD["cuda"])


def judge(old: Figure, new: Figure, threshold: float) -> str:
    """The verdict for one figure under the rule in this module's docstring; ``incomparable``
    for aggregates over different numbers of cases (a geomean missing a layer)."""
    if old.basis != new.basis:
        return "incomparable"
    factor = 1.0 + threshold
    if old.better == "lower":
        worse, better = new.low > old.high * factor, new.high * factor < old.low
    else:
        worse, better = new.high * factor < old.low, new.low > old.high * factor
    if worse:
        return "regression"
    if better:
        return "improvement"
    if old.value and abs(new.value / old.value - 1.0) <= threshold:
        return "same"
    return "noise"


def compare_results(old: dict[str, Any], new: dict[str, Any],
                    threshold: float | None = None) -> Comparison:
    """Compare two loaded result files (same schema version; see ``results.load_result``)."""
    t = default_threshold(new) if threshold is None else threshold
    if t < 0:
        raise ValueError(f"threshold must be >= 0 (got {t})")
    old_figures, new_figures = tracked_figures(old), tracked_figures(new)
    changes = [Change(key, old_figures[key], new_figures[key],
                      judge(old_figures[key], new_figures[key], t))
               for key in sorted(old_figures.keys() & new_figures.keys())]
    notes = []
    old_env, new_env = old.get("environment", {}), new.get("environment", {})
    for field in ("device_name", "torch", "triton", "cuda", "driver"):
        if old_env.get(field) != new_env.get(field):
            notes.append(f"environment differs: {field} {old_env.get(field)!r} -> "
                         f"{new_env.get(field)!r}")
    for name, result in (("old", old), ("new", new)):
        if result.get("interrupted"):
            notes.append(f"the {name} run was interrupted ({result['interrupted']}): its "
                         f"geomeans cover only the layers it finished")
    return Comparison(changes, sorted(old_figures.keys() - new_figures.keys()),
                      sorted(new_figures.keys() - old_figures.keys()), t, notes)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def format_comparison(result: Comparison, *, only_changes: bool = False) -> str:
    """The table of changes, then missing/new figures and a one-line summary."""
    rows = []
    for c in result.changes:
        if only_changes and c.verdict == "same":
            continue
        rows.append([c.key, f"{_fmt(c.old.value)} [{_fmt(c.old.low)}, {_fmt(c.old.high)}]",
                     f"{_fmt(c.new.value)} [{_fmt(c.new.low)}, {_fmt(c.new.high)}]",
                     c.old.unit, f"{(c.ratio - 1) * 100:+.1f}%",
                     c.verdict.upper() if c.verdict == "regression" else c.verdict])
    lines = [format_table(["figure", "old [p20..p80]", "new [p20..p80]", "unit", "change",
                           "verdict"], rows)] if rows else []
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"missing in new (not a failure by default): {key}" for key in result.missing]
    lines += [f"new figure (no baseline): {key}" for key in result.added]
    counts = {v: sum(1 for c in result.changes if c.verdict == v)
              for v in ("regression", "improvement", "noise", "same", "incomparable")}
    lines.append(
        f"{len(result.changes)} figures compared at threshold {result.threshold:.0%}: "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
        + f"; {len(result.missing)} missing, {len(result.added)} new")
    return "\n".join(lines)
