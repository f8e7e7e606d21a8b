"""The written form of a paper table: its Markdown page and its figure.

`experiments.reproduce.run_table` computes a table's per-seed values and claims, then
calls `markdown` (NAME.md) and `plot` (NAME.png). Values are shown as mean ± 95% CI over
seeds (`experiments.stats`), multiplied by the table's ``scale``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from experiments import stats
from experiments.tables.base import Table

__all__ = ["command", "markdown", "plot"]


def command(name: str, seeds: int, quick: bool) -> str:
    """The command line that reproduces table ``name`` with ``seeds`` seeds (and ``--quick``)."""
    cmd = f"python -m experiments.reproduce --table={name} --workdir=runs/tables --seeds={seeds}"
    return cmd + (" --quick" if quick else "")


def markdown(
    table: Table,
    rows: list[str],
    cols: list,
    results: dict,
    claims: list[stats.Claim],
    seeds: int,
    quick: bool,
    elapsed: float,
    extra_rows: dict[str, dict],
) -> str:
    """The Markdown page of a table: title, command, notes, the values, extra tables, claims.

    Args:
      table: the table (title, notes, column format, metric and scale).
      rows: row labels, in order.
      cols: column values, in order.
      results: ``results[(row, col)]`` = per-seed values; a missing key is an empty cell.
      claims: the checked claims, one line each.
      seeds: number of seeds (for the caption and the command).
      quick: whether the quick version ran.
      elapsed: seconds the run took.
      extra_rows: ``extra_rows[title][(row, col)]`` = a number (printed with 3 decimals) or a
        per-seed list (mean ± CI); each title is one more table with ``title`` as caption,
        over the table's rows and columns, or over its own (in key order) when none of its
        keys' columns is one of the table's (e.g. per-layer statistics).

    Returns:
      The page, ending in a newline.
    """
    header = "| method | " + " | ".join(table.col_format(c) for c in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    lines = [
        f"# {table.name}: {table.title}",
        "",
        f"Command: `{command(table.name, seeds, quick)}` ({elapsed / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores{', quick mode' if quick else ''}).",
        "",
        table.notes(quick),
        "",
        f"{table.metric}, mean ± 95% CI over {seeds} seeds; columns: {table.col_label}.",
        "",
        header,
        rule,
    ]
    for row in rows:
        cells = [
            stats.fmt(results[(row, c)], scale=table.scale) if (row, c) in results else ""
            for c in cols
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for title, values in extra_rows.items():
        # An extra table whose keys name none of the table's columns (e.g. per-layer
        # statistics) gets its own columns and rows, in the order its keys come.
        own_cols = not any(c in cols for _, c in values)
        extra_cols = list(dict.fromkeys(c for _, c in values)) if own_cols else cols
        extra_labels = [r for r in rows if any((r, c) in values for c in extra_cols)]
        extra_labels += [r for r in dict.fromkeys(r for r, _ in values) if r not in rows]
        heading = [str(c) for c in extra_cols] if own_cols else None
        lines += ["", f"{title}:", ""]
        if heading is None:
            lines += [header, rule]
        else:
            lines += ["| | " + " | ".join(heading) + " |", "|---|" + "---|" * len(heading)]
        show = lambda v: (  # noqa: E731
            stats.fmt(v, scale=table.scale) if isinstance(v, list) else f"{v:.3f}"
        )
        for row in extra_labels:
            cells = [show(values[(row, c)]) if (row, c) in values else "" for c in extra_cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims", ""]
    lines += [f"- {c.line()}" for c in claims]
    return "\n".join(lines) + "\n"


def plot(table: Table, rows: list[str], cols: list, results: dict, path: str, seeds: int) -> None:
    """Writes the table's figure to ``path`` (PNG): one line per row, mean ± 95% CI error bars.

    Args:
      table: the table (column format and label, metric, scale).
      rows: row labels, in order; a row with no value in any column is left out.
      cols: column values, evenly spaced on the x axis.
      results: ``results[(row, col)]`` = per-seed values.
      path: the PNG file to write.
      seeds: number of seeds (for the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(rows) > 10:
        # The default cycle repeats after 10 colors; tab20 has 20, in pairs of one hue, so
        # rows 2k+1 and 2k+2 (e.g. one method from scratch and fine-tuned) share a hue.
        ax.set_prop_cycle(color=plt.cm.tab20((np.arange(len(rows)) + 1) % 20))
    positions = np.arange(len(cols))
    for row in rows:
        pts = [
            (i, *stats.mean_ci(results[(row, c)]))
            for i, c in enumerate(cols)
            if (row, c) in results
        ]
        if not pts:
            continue
        xs, means, halves = zip(*pts, strict=True)
        halves = [0.0 if math.isnan(h) else h for h in halves]
        ax.errorbar(
            xs,
            table.scale * np.array(means),
            yerr=table.scale * np.array(halves),
            marker="o",
            capsize=3,
            label=row,
        )
    ax.set_xticks(positions, [table.col_format(c) for c in cols])
    ax.set_xlabel(table.col_label)
    ax.set_ylabel(table.metric)
    if table.scale == 100.0:
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ax.set_title(f"{table.name}: mean ± 95% CI over {seeds} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
