"""Properties of the repository layout itself."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sparsejax", "tensornets", "pallas_kernels", "experiments", "configs")


def test_no_script_shadows_a_package():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a script named like one
    of our packages would be imported in its place by every other script there."""
    for folder in ("benchmarks", "experiments", "configs"):
        names = {p.stem for p in (ROOT / folder).glob("*.py")}
        clash = names.intersection(PACKAGES)
        assert not clash, f"{folder}/ has modules named like packages: {sorted(clash)}"
