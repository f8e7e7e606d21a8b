"""Training curves of one or more runs, read from their ``metrics.jsonl``, in one PNG.

    python -m experiments.plot --workdir=runs/rigl                       # runs/rigl/curves.png
    python -m experiments.plot --workdir=runs/rigl --workdir=runs/set --out=rigl_vs_set.png

One panel a quantity: training loss, training accuracy, test accuracy, sparsity, and the mask
flip rate where a run logs one (``mask_flip_rate``: the straight-through N:M methods of
`sparsejax.algorithms.nm_ste`). One line a run, labelled by its workdir's name. Steps are the
x axis; a ``null`` value (a non-finite metric) leaves a gap.

Bad input (a workdir without ``metrics.jsonl``, a row that is not a metrics record, several
workdirs without ``--out``) ends the program with one ``error: ...`` line on stderr and exit
status 2, before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "PANELS",
    "default_out",
    "make_figure",
    "plot_runs",
    "read_metrics",
    "run_labels",
]

# (metrics key, panel title, always drawn). The optional panels appear only when some run
# logs the key.
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("train_loss", "training loss", True),
    ("train_accuracy", "training accuracy", True),
    ("test_accuracy", "test accuracy", True),
    ("sparsity", "sparsity (fraction of zero weights)", True),
    ("mask_flip_rate", "mask flip rate (EMA over ~100 steps)", False),
)

_METRICS_FILE = "metrics.jsonl"
_DEFAULT_NAME = "curves.png"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` (as `experiments.train` writes them), in file order.

    Args:
      workdir: a training run's output folder.

    Returns:
      One dict a line, each with an int ``step``; a ``null`` (non-finite) value is None.

    Raises:
      ValueError: naming the path if ``metrics.jsonl`` is missing or holds no row, or the path
        and line number of a line that is not a JSON object with an integer ``step``.
    """
    path = os.path.join(os.fspath(workdir), _METRICS_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"workdir={workdir!r} has no {_METRICS_FILE} ({path!r} does not exist); is it the "
            "workdir of a training run (python -m experiments.main --workdir=...)?"
        )
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except ValueError as error:  # JSONDecodeError and undecodable bytes
                raise ValueError(
                    f"{path}, line {number}: not a JSON metrics row ({error}): {line[:80]!r}"
                ) from None
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(
                    f"{path}, line {number}: a metrics row is a JSON object with an integer "
                    f"'step', got {line[:80]!r}"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metrics row yet (the run logs one per evaluation)")
    return rows


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each run's legend label: its workdir's name, or the whole path when two names clash."""
    names = [os.path.basename(os.path.normpath(os.fspath(w))) for w in workdirs]
    if len(set(names)) == len(names):
        return names
    # runs/rigl/seed0 and runs/set/seed0 would both be "seed0".
    return [os.path.normpath(os.fspath(w)) for w in workdirs]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over the rows that carry it; None becomes NaN (a gap)."""
    steps, values = [], []
    for row in rows:
        if key not in row:
            continue
        value = row[key]
        if value is not None and not isinstance(value, (int, float)):
            continue
        steps.append(row["step"])
        values.append(math.nan if value is None else float(value))
    return steps, values


def make_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """The curves of ``runs``, one panel a quantity of `PANELS`, one line a run.

    Pure: builds a matplotlib ``Figure`` on the Agg canvas (no pyplot, no global state, no
    display needed) and writes nothing.

    Args:
      runs: label -> metrics rows (as `read_metrics` returns), in legend order.

    Returns:
      The figure: one axes a panel (the always-drawn ones, then the optional ones some run
      carries), titled as in `PANELS`, each with one line a run that has the key, labelled.

    Raises:
      ValueError: if ``runs`` is empty.
    """
    if not runs:
        raise ValueError("runs is empty: give at least one run's metrics rows")
    panels = [
        (key, title)
        for key, title, always in PANELS
        if always or any(key in row for rows in runs.values() for row in rows)
    ]
    columns = min(len(panels), 3)
    rows_of_panels = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows_of_panels), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(rows_of_panels, columns, index + 1)
        for label, rows in runs.items():
            steps, values = _series(rows, key)
            if steps:
                # Markers too: a run logs a few rows only (one per evaluation).
                axes.plot(steps, values, marker="o", markersize=3, label=label)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    return figure


def default_out(workdirs: Sequence[str]) -> str:
    """``W/curves.png`` for one workdir ``W``.

    Raises:
      ValueError: for several workdirs (which of them would own the figure is not clear).
    """
    if len(workdirs) != 1:
        raise ValueError(
            f"out is required with several workdirs ({len(workdirs)} given): say where the "
            "figure goes, e.g. --out=curves.png"
        )
    return os.path.join(os.fspath(workdirs[0]), _DEFAULT_NAME)


def plot_runs(workdirs: Sequence[str], out: str | None = None) -> str:
    """Draws the curves of the runs in ``workdirs`` (see `make_figure`) into the PNG ``out``.

    Args:
      workdirs: training run folders, each with a ``metrics.jsonl``; their names label the lines.
      out: the PNG's path; None means `default_out` (``W/curves.png`` for a single run).

    Returns:
      The path written (``out``).

    Raises:
      ValueError: for no workdirs, a workdir as in `read_metrics`, several workdirs without
        ``out``, or an ``out`` whose folder does not exist; nothing is written then.
    """
    if isinstance(workdirs, (str, os.PathLike)):
        workdirs = [workdirs]
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("workdirs is empty: give at least one training run's folder")
    out = default_out(workdirs) if out is None else os.fspath(out)
    # Read first: a workdir that is not a run is the more telling error.
    runs = dict(zip(run_labels(workdirs), [read_metrics(w) for w in workdirs], strict=True))
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"out={out!r}: its folder {folder!r} does not exist")
    make_figure(runs).savefig(out, format="png", dpi=100)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

# The same exit status as experiments.main for bad input.
EXIT_BAD_INPUT = 2


def _define_flags() -> None:
    # Defined only when run as a program: importing `plot_runs` next to experiments.main
    # (which owns a --workdir flag too) must not collide in absl's global flag registry.
    flags.DEFINE_multi_string(
        "workdir", None, "A training run's folder (holding metrics.jsonl); repeat for several."
    )
    flags.DEFINE_string(
        "out", None, "Where the PNG goes; default WORKDIR/curves.png (required with several runs)."
    )
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    """``python -m experiments.plot``: `plot_runs` of the ``--workdir`` flags into ``--out``."""
    if len(argv) > 1:
        print(f"error: unexpected arguments: {list(argv[1:])}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        path = plot_runs(flags.FLAGS.workdir, flags.FLAGS.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(path)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
