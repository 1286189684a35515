"""The suite's figures: what a benchmark run reports, and how repeated runs become one figure.

Pure (no benchmark runs here; :mod:`perf.registry` runs them): a benchmark's run yields
:class:`Reading` s, one per figure; :func:`aggregate` turns the readings of repeated runs into
:class:`Figure` s, each the median over the runs, its ratio the median of the ratios measured
in each run (ours and the peer in the same run, never a peer from another run), and whether
the issue's :class:`Target` is met, judged on those medians.  :func:`table` prints them.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

__all__ = ["Figure", "Reading", "Target", "aggregate", "fits", "table"]


class Target(msgspec.Struct, frozen=True):
    """A goal on one figure: ``on`` (our value or the ratio) ``op`` ``value``."""

    on: Literal["ours", "ratio"]
    op: Literal["<=", ">=", "<"]
    value: float

    def met(self, ours: float | None, ratio: float | None) -> bool | None:
        """Whether the goal is met; None where the value it is about was not measured."""
        subject = ours if self.on == "ours" else ratio
        if subject is None:
            return None
        if self.op == "<=":
            return subject <= self.value
        if self.op == ">=":
            return subject >= self.value
        return subject < self.value

    def text(self) -> str:
        return f"{'ratio' if self.on == 'ratio' else 'ours'} {self.op} {self.value:g}"


class Reading(msgspec.Struct, frozen=True, kw_only=True):
    """One figure as one run of a benchmark measured it."""

    name: str
    unit: str
    ours: float | None
    peer: float | None = None
    peer_name: str | None = None
    ratio: float | None = None
    """Ours against the peer, as the benchmark defines it for this figure (its docstring)."""
    target: Target | None = None


class Figure(msgspec.Struct, frozen=True, kw_only=True):
    """One figure of the suite: the median over ``runs`` runs."""

    benchmark: str
    name: str
    unit: str
    ours: float | None
    peer: float | None
    peer_name: str | None
    ratio: float | None
    target: str | None
    met: bool | None
    runs: int
    ours_each: list[float | None]
    ratio_each: list[float | None]


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def aggregate(benchmark: str, runs: Sequence[Sequence[Reading]]) -> list[Figure]:
    """The readings of each run (same names from run to run) as one figure per name.

    A figure missing from a run counts as not measured in it (None), so ``runs`` says how
    many runs measured it.  Order: as the figures first appear.
    """
    names: dict[str, Reading] = {}
    for readings in runs:
        for reading in readings:
            names.setdefault(reading.name, reading)
    figures = []
    for name, first in names.items():
        each = [next((r for r in readings if r.name == name), None) for readings in runs]
        ours_each = [r.ours if r else None for r in each]
        ratio_each = [r.ratio if r else None for r in each]
        ours, ratio = _median(ours_each), _median(ratio_each)
        figures.append(
            Figure(
                benchmark=benchmark,
                name=name,
                unit=first.unit,
                ours=ours,
                peer=_median(r.peer if r else None for r in each),
                peer_name=first.peer_name,
                ratio=ratio,
                target=first.target.text() if first.target else None,
                met=first.target.met(ours, ratio) if first.target else None,
                runs=sum(1 for v in ours_each if v is not None),
                ours_each=ours_each,
                ratio_each=ratio_each,
            )
        )
    return figures


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(figures: Sequence[Figure], failures: dict[str, str] | None = None) -> str:
    """The one table: figure, ours, peer, ratio, target, met?, runs; then what failed."""
    header = ("figure", "ours", "peer", "ratio", "target", "met?", "runs")
    rows = [
        (
            f"{f.name} ({f.unit})",
            _number(f.ours),
            f"{_number(f.peer)} {f.peer_name}" if f.peer is not None and f.peer_name else "-",
            _number(f.ratio),
            f.target or "-",
            {True: "yes", False: "NO", None: "-"}[f.met],
            str(f.runs),
        )
        for f in figures
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    for name, why in (failures or {}).items():
        lines.append(f"FAILED {name}: {why}")
    return "\n".join(lines)


def fits(
    *, elapsed_s: float, planned_done_s: float, next_s: float, rest_s: float, budget_s: float
) -> bool:
    """Whether one more repeat still leaves time for every benchmark's first run.

    ``planned_done_s`` is what the runs done so far would have taken on an idle machine
    (their ``cost_s``), ``elapsed_s`` what they took: their ratio (at least 1) is how loaded
    this machine is, and scales ``next_s`` (the repeat's planned cost) and ``rest_s`` (the
    first runs still to come).  Extra repeats are what the suite gives up on a loaded machine;
    every benchmark still runs once.
    """
    slowdown = max(1.0, elapsed_s / planned_done_s) if planned_done_s > 0 else 1.0
    return elapsed_s + slowdown * (next_s + rest_s) <= budget_s
