"""Groups of training runs side by side: final metrics over seeds, differences between groups.

    python -m experiments.compare --group "bsr=runs/bsmlp/bsr_coo_s*" \\
        --group "masked=runs/bsmlp/masked_coo_s*" [--metric test_accuracy]

A group is ``NAME=PATTERN``: the workdirs (`experiments.main` runs, each with its
``metrics.jsonl``) matching the glob, typically one config over seeds. For every group this
prints the number of runs, the final step, the final ``--metric``, ``test_loss`` and
``sparsity`` as mean ± 95% Student-t interval over the runs (`experiments.stats`), and the
speed: the median over all runs of the logged ``steps_per_second`` intervals except each
run's first (it holds the compilation). Then every other group is compared with the first:
the difference of the metric's means with its Welch 95% interval, "within noise" when that
interval contains zero (with three seeds a wide interval says little; it is printed), and no
verdict when a group has a single run.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import sys
from collections.abc import Sequence

from experiments import stats
from experiments.plot import read_metrics

EXIT_BAD_INPUT = 2


def _final(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(values[-1]) if values else math.nan


def summarize(workdirs: Sequence[str], metric: str = "test_accuracy") -> dict:
    """Final values and speed of a group of runs.

    Args:
      workdirs: the runs' folders.
      metric: the metric compared (logged by every evaluation).

    Returns:
      ``{"runs", "steps", metric, "test_loss", "sparsity", "steps_per_second"}``: the
      per-run final values (lists; ``steps`` the final logged step of each run), and the
      median steps per second over every run's logged intervals after its first.

    Raises:
      ValueError: no workdir, or one without metrics (from `read_metrics`).
    """
    if not workdirs:
        raise ValueError("a group needs at least one workdir")
    out = {"runs": list(workdirs), "steps": [], metric: [], "test_loss": [], "sparsity": []}
    speeds = []
    for w in workdirs:
        rows = read_metrics(w)
        out["steps"].append(rows[-1]["step"])
        for key in (metric, "test_loss", "sparsity"):
            out[key].append(_final(rows, key))
        speeds += [r["steps_per_second"] for r in rows[1:] if r.get("steps_per_second")]
    out["steps_per_second"] = statistics.median(speeds) if speeds else math.nan
    return out


def compare(groups: dict[str, Sequence[str]], metric: str = "test_accuracy") -> list[str]:
    """The report's lines for ``{name: workdirs}`` (the first group is the baseline)."""
    summaries = {name: summarize(dirs, metric) for name, dirs in groups.items()}
    lines = [
        f"| group | runs | final step | {metric} | test_loss | sparsity | steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        steps = "/".join(str(x) for x in sorted(set(s["steps"])))
        lines.append(
            f"| {name} | {len(s['runs'])} | {steps} | {stats.fmt(s[metric])} "
            f"| {stats.fmt(s['test_loss'], scale=1.0, digits=3)} "
            f"| {stats.fmt(s['sparsity'], scale=1.0, digits=4)} | {s['steps_per_second']:.2f} |"
        )
    names = list(summaries)
    base = summaries[names[0]]
    for name in names[1:]:
        s = summaries[name]
        d, lo, hi = stats.diff_ci(s[metric], base[metric])
        if min(len(s[metric]), len(base[metric])) < 2:
            verdict = "no interval: a group has one run"
        else:
            verdict = "within noise" if lo <= 0 <= hi else "differs"
        speed = s["steps_per_second"] / base["steps_per_second"]
        lines.append(
            f"{name} - {names[0]}: {metric} {100 * d:+.2f}, 95% CI [{100 * lo:+.2f}, "
            f"{100 * hi:+.2f}] ({verdict}); speed {speed:.2f}x"
        )
    return lines


def _parse_group(text: str) -> tuple[str, list[str]]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise ValueError(f"--group must be NAME=PATTERN, got {text!r}")
    # Folders only: a run's log file next to its workdir often matches the same pattern.
    dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
    if not dirs:
        raise ValueError(f"--group {text!r}: no workdir (folder) matches {pattern!r}")
    return name, dirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, help="NAME=GLOB (repeat)")
    parser.add_argument("--metric", default="test_accuracy", help="the compared metric")
    args = parser.parse_args(argv)
    try:
        groups = dict(_parse_group(g) for g in args.group)
        lines = compare(groups, args.metric)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
