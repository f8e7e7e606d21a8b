"""experiments.compare: final metrics over seeds and the differences between groups of runs."""

from __future__ import annotations

import json

import pytest

from experiments import compare, stats


def _run(path, accuracies, speeds):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for i, (acc, sps) in enumerate(zip(accuracies, speeds)):
            row = {"step": 100 * (i + 1), "test_accuracy": acc, "test_loss": 1.0 - acc}
            f.write(json.dumps({**row, "sparsity": 0.9, "steps_per_second": sps}) + "\n")
    return str(path)


def test_summary_takes_final_values_and_the_median_speed_after_the_first_interval(tmp_path):
    a = _run(tmp_path / "a", [0.1, 0.5], [1.0, 10.0])
    b = _run(tmp_path / "b", [0.2, 0.7], [2.0, 12.0])
    s = compare.summarize([a, b])
    assert s["test_accuracy"] == [0.5, 0.7] and s["steps"] == [200, 200]
    # The first interval of each run (compilation) is left out: median of 10 and 12.
    assert s["steps_per_second"] == 11.0


def test_compare_says_within_noise_only_when_the_interval_holds_zero(tmp_path):
    def group(name, accuracies, speed):
        return [
            _run(tmp_path / f"{name}{i}", [0.1, a], [1.0, speed]) for i, a in enumerate(accuracies)
        ]

    masked, close, far = [0.6, 0.61, 0.62], [0.605, 0.615, 0.625], [0.8, 0.801, 0.802]
    lines = compare.compare(
        {
            "masked": group("m", masked, 2.0),
            "bsr": group("c", close, 8.0),
            "far": group("f", far, 2.0),
        }
    )
    assert lines[2] == (
        f"| masked | 3 | 200 | {stats.fmt(masked)} | {stats.fmt([0.4, 0.39, 0.38], 1.0, 3)} "
        "| 0.9000 ± 0.0000 | 2.00 |"
    )
    _, lo, hi = stats.diff_ci(close, masked)
    assert lo < 0 < hi
    assert lines[5].startswith("bsr - masked: test_accuracy +0.50, 95% CI [")
    assert lines[5].endswith("(within noise); speed 4.00x")
    assert (
        lines[6].startswith("far - masked: test_accuracy +19.10, 95% CI [+16.65, +21.55]")
        and "(differs)" in lines[6]
    )


def test_bad_groups_are_refused_with_the_argument(tmp_path, capsys):
    assert compare.main(["--group", "nameonly"]) == compare.EXIT_BAD_INPUT
    assert "--group must be NAME=PATTERN, got 'nameonly'" in capsys.readouterr().err
    assert compare.main(["--group", f"x={tmp_path}/none*"]) == compare.EXIT_BAD_INPUT
    assert "no workdir (folder) matches" in capsys.readouterr().err
    _run(tmp_path / "run_s0", [0.5], [1.0])
    (tmp_path / "run_s0.log").write_text("a log, not a run")
    assert compare.main(["--group", f"x={tmp_path}/run_s0*"]) == 0  # the log is skipped


def test_single_runs_get_no_verdict(tmp_path):
    a, b = (
        _run(tmp_path / "a", [0.1, 0.5], [1.0, 2.0]),
        _run(tmp_path / "b", [0.1, 0.6], [1.0, 6.0]),
    )
    line = compare.compare({"a": [a], "b": [b]})[-1]
    assert line == (
        "b - a: test_accuracy +10.00, 95% CI [+10.00, +10.00] "
        "(no interval: a group has one run); speed 3.00x"
    )
    with pytest.raises(ValueError, match="at least one workdir"):
        compare.summarize([])
