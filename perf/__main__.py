"""Run the performance suite: python -m perf [--quick] [--json] [--soak-minutes M] [--only NAMES].

Each benchmark of :mod:`perf.registry` runs as its own process (``python -m perf.bench_x
--json``), as many times as its entry says; every figure is the median over those runs and
every ratio the median of the ratios measured within each run (ours and the peer side by side
in the same run).  Progress goes to stderr; the table (or, with ``--json``, the JSON) to
stdout.  The results go to ``perf/results/latest.json`` (``quick.json`` under ``--quick``, so
a pull request's quick run does not overwrite the full figures), with the machine, the date
and the commit, and the plots to ``perf/results/*.png``.

The full suite fits in 15 minutes on a 2-core machine by running the soak for
``--soak-minutes`` (default 3) instead of the 10 of ``python -m perf.soak``; ``--quick`` (about
two minutes) runs the handoff, latency, encoder, ABR and feedback benchmarks once each, short.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from perf._report import git_commit, machine
from perf.registry import SUITE_SOAK_MINUTES, Entry, entries
from perf.suite import Figure, Reading, aggregate, fits, table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "perf" / "results"


class RunOutcome(msgspec.Struct, kw_only=True):
    """One run of one benchmark: its JSON lines, or why it failed."""

    seconds: float
    lines: list[dict[str, Any]]
    error: str | None = None
    load_average: list[float] = msgspec.field(default_factory=list)
    """The machine's 1, 5 and 15 minute load averages as the run started: how shared it was."""


def _progress(message: str) -> None:
    sys.stderr.write(f"[perf {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def run_once(entry: Entry, args: tuple[str, ...], log: Path, samples: Path | None) -> RunOutcome:
    """One run of ``entry`` as a process; its stderr goes to ``log``."""
    command = [sys.executable, "-m", entry.module, *args, "--json"]
    if samples is not None and entry.samples_flag:
        command += [entry.samples_flag, str(samples)]
    started, load = time.monotonic(), [round(x, 2) for x in os.getloadavg()]
    with log.open("wb") as stderr:
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                # A fresh local cluster for every run: without this, ray.init() joins whatever
                # cluster `ray start` last left in /tmp/ray on this machine (someone else's).
                env={**os.environ, "RAY_ADDRESS": "local"},
                stdout=subprocess.PIPE,
                stderr=stderr,
                timeout=entry.timeout_s,
            )
        except subprocess.TimeoutExpired:
            return RunOutcome(
                seconds=time.monotonic() - started,
                lines=[],
                error=f"stopped after {entry.timeout_s:.0f} s",
                load_average=load,
            )
    seconds = time.monotonic() - started
    lines = []
    for text in done.stdout.decode(errors="replace").splitlines():
        if text.startswith("{"):
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    error = None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
        error = f"exit {done.returncode}: {tail[0][:300]}"
    elif not lines:
        error = "printed no JSON"
    return RunOutcome(seconds=seconds, lines=lines, error=error, load_average=load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two-minute subset")
    parser.add_argument("--json", action="store_true", help="print the results' JSON")
    parser.add_argument(
        "--soak-minutes",
        type=float,
        default=SUITE_SOAK_MINUTES,
        metavar="M",
        help=f"the soak's length in the full suite (default {SUITE_SOAK_MINUTES:g})",
    )
    parser.add_argument("--only", metavar="NAMES", help="comma-separated benchmarks to run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        metavar="M",
        help="drop repeats (never a benchmark's first run) to finish within M minutes"
        " (default 15, --quick 2)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="run a failed run again up to N times (default 0: a failure is a finding, not"
        " noise; every failure is reported either way)",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="FILE",
        help="run nothing: recompute FILE's figures from the raw lines it keeps, with this"
        " checkout's extractors (after an extractor is added or fixed), and rewrite it",
    )
    args = parser.parse_args(argv)
    if args.rescore is not None:
        rescore(args.rescore, json_out=args.json)
        return
    if not args.soak_minutes > 0:
        parser.error(f"--soak-minutes must be positive, not {args.soak_minutes}")
    if args.retries < 0:
        parser.error(f"--retries must be at least 0, not {args.retries}")
    chosen = entries(soak_minutes=args.soak_minutes)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - {e.name for e in chosen}
        if unknown:
            parser.error(
                f"unknown benchmark(s) {', '.join(sorted(unknown))}:"
                f" choose from {', '.join(e.name for e in chosen)}"
            )
        chosen = [e for e in chosen if e.name in wanted]
    if args.quick:
        chosen = [e for e in chosen if e.quick is not None and e.repeats_quick > 0]
    args.out.mkdir(parents=True, exist_ok=True)
    budget_s = 60 * (args.budget_minutes or (2.0 if args.quick else 15.0))
    planned_done = 0.0
    skipped: dict[str, int] = {}

    began, date = time.monotonic(), datetime.datetime.now(datetime.UTC)
    host = machine()
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    raw: dict[str, Any] = {}
    samples: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kz-perf-") as tmp:
        for index, entry in enumerate(chosen, 1):
            run_args = entry.quick if args.quick and entry.quick is not None else entry.full
            repeats = entry.repeats_quick if args.quick else entry.repeats
            readings: list[list[Reading]] = []
            outcomes: list[RunOutcome] = []
            tries = 0
            for run in range(1, repeats + 1):
                rest = sum(e.cost_s for e in chosen[index:])
                if run > 1 and not fits(
                    elapsed_s=time.monotonic() - began,
                    planned_done_s=planned_done,
                    next_s=entry.cost_s,
                    rest_s=rest,
                    budget_s=budget_s,
                ):
                    skipped[entry.name] = repeats - run + 1
                    _progress(f"  {entry.name}: skipping runs {run}-{repeats} to stay in budget")
                    break
                for attempt in range(args.retries + 1):
                    tries += 1
                    _progress(f"{index}/{len(chosen)} {entry.name}: run {run}/{repeats} ...")
                    log = Path(tmp) / f"{entry.name}-{tries}.log"
                    sample_file = Path(tmp) / f"{entry.name}-{tries}.samples.json"
                    outcome = run_once(entry, run_args, log, sample_file)
                    outcomes.append(outcome)
                    if outcome.error is None:
                        break
                    _progress(f"  {entry.name} run {run} FAILED: {outcome.error}")
                    sys.stderr.write(log.read_text(errors="replace")[-3000:] + "\n")
                    if attempt < args.retries:
                        _progress(f"  {entry.name} run {run}: trying again")
                planned_done += entry.cost_s * (attempt + 1)
                if outcome.error is not None:
                    continue
                readings.append(entry.extract(outcome.lines))
                if sample_file.exists():
                    samples.setdefault(entry.name, []).append(json.loads(sample_file.read_text()))
                _progress(f"  {entry.name} run {run} done in {outcome.seconds:.0f} s")
            errors = [o.error for o in outcomes if o.error is not None]
            if len(readings) < repeats - skipped.get(entry.name, 0):
                failures[entry.name] = (
                    f"{repeats - skipped.get(entry.name, 0) - len(readings)} of {repeats} runs failed"
                    f" ({len(errors)} tries): {errors[0]}"
                )
            elif errors:
                _progress(f"  {entry.name}: {len(errors)} failed tries, every run done on a retry")
            figures += aggregate(entry.name, readings)
            raw[entry.name] = {
                "module": entry.module,
                "args": list(run_args),
                "runs": [msgspec.to_builtins(o) for o in outcomes],
                # What the plots are drawn from (latency samples, the soak's series).
                "samples": samples.get(entry.name, []),
            }

    plots = [] if args.no_plots else _plots(args.out, raw, samples, args.quick)
    result = {
        "mode": "quick" if args.quick else "full",
        "date": date.isoformat(timespec="seconds"),
        **git_commit(str(ROOT)),
        "machine": host,
        "load_average_after": machine()["load_average"],
        "seconds": round(time.monotonic() - began, 1),
        "soak_minutes": None if args.quick else args.soak_minutes,
        "figures": msgspec.to_builtins(figures),
        "failures": failures,
        "budget_s": budget_s,
        "repeats_skipped_for_budget": skipped,
        "plots": [p.name for p in plots],
        "benchmarks": raw,
    }
    out = args.out / ("quick.json" if args.quick else "latest.json")
    if args.only and out.exists():
        result = _merged(json.loads(out.read_text()), result, [e.name for e in chosen])
        figures = [msgspec.convert(f, Figure) for f in result["figures"]]
    out.write_text(json.dumps(result, indent=1) + "\n")
    _progress(f"wrote {out} after {time.monotonic() - began:.0f} s")
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(table(figures, failures))
        for name, count in skipped.items():
            print(f"{name}: {count} repeat(s) dropped to stay within {budget_s / 60:g} minutes")
    if failures:
        sys.exit(1)


def rescore(path: Path, *, json_out: bool) -> None:
    """Recompute the figures of the results in ``path`` from its stored raw lines.

    Every run's JSON lines are kept in the results (``benchmarks[name].runs``), so a figure
    whose extractor changed is recomputed from what was measured, without measuring again.
    """
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"perf: cannot read results {path}: {error}")
    by_name = {e.name: e for e in entries(soak_minutes=result.get("soak_minutes") or 1.0)}
    figures: list[Figure] = []
    for name, bench in result.get("benchmarks", {}).items():
        entry = by_name.get(name)
        if entry is None:
            _progress(f"{name}: not in this checkout's registry, its figures are dropped")
            continue
        readings = [
            entry.extract(run["lines"]) for run in bench.get("runs", []) if run["error"] is None
        ]
        figures += aggregate(name, readings)
    result["figures"] = msgspec.to_builtins(figures)
    result["rescored"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **git_commit(str(ROOT)),
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    _progress(f"rescored {path}: {len(figures)} figures")
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(table(figures, result.get("failures", {})))


def _merged(previous: dict[str, Any], new: dict[str, Any], rerun: list[str]) -> dict[str, Any]:
    """``--only``: the previous results with the re-run benchmarks' figures replaced.

    ``updates`` records which benchmarks were re-run, when and at which commit, so the file
    says which figures come from which run.
    """
    kept = [f for f in previous.get("figures", []) if f["benchmark"] not in rerun]
    update = {k: new[k] for k in ("date", "commit", "dirty", "machine", "seconds")}
    return {
        **previous,
        "figures": kept + new["figures"],
        "failures": {
            **{k: v for k, v in previous.get("failures", {}).items() if k not in rerun},
            **new["failures"],
        },
        "benchmarks": {
            **{k: v for k, v in previous.get("benchmarks", {}).items() if k not in rerun},
            **new["benchmarks"],
        },
        "plots": sorted(set(previous.get("plots", [])) | set(new["plots"])),
        "updates": [*previous.get("updates", []), {"benchmarks": rerun, **update}],
    }


def _plots(
    out: Path, raw: dict[str, Any], samples: dict[str, list[Any]], quick: bool
) -> list[Path]:
    """Every plot whose data this run gathered; none if matplotlib is not installed."""
    try:
        from perf import plots
    except ImportError:  # pragma: no cover - the module itself imports nothing optional
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _progress("matplotlib is not installed (pip install '.[perf]'): no plots")
        return []
    suffix = "-quick" if quick else ""
    made: list[Path] = []
    if samples.get("latency"):
        pooled: dict[str, list[float]] = {}
        for run in samples["latency"]:
            for arm, values in run.items():
                pooled.setdefault(arm, []).extend(values)
        made.append(
            plots.latency_distributions(
                pooled,
                out / f"latency{suffix}.png",
                f"Capture-to-decode latency, 720p30 1.5 Mbps, {len(samples['latency'])} runs pooled",
            )
        )
    fanout_rows = [
        line
        for run in raw.get("fanout", {}).get("runs", [])
        if run["error"] is None  # a failed try's rows are not the run's
        for line in run["lines"]
        if line.get("benchmark") == "fanout"
    ]
    if fanout_rows:
        made.append(plots.fanout_viewers(fanout_rows, out / f"fanout{suffix}.png"))
    if "abr" in raw:
        made.append(plots.abr_steps(out / f"abr{suffix}.png"))
    if samples.get("soak"):
        series = samples["soak"][-1]
        minutes = series[-1]["t_s"] / 60 if series else 0
        made.append(
            plots.soak_memory(
                series, out / f"soak{suffix}.png", f"Soak, {minutes:.1f} min: RSS per process kind"
            )
        )
    return made


if __name__ == "__main__":
    main()
