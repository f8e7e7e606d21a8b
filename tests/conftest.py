"""Suite-wide test settings.

Hypothesis draws its examples from a fixed seed per test by default, so a run (and CI) is
reproducible: the examples that pass here are the ones CI runs. Set
``HYPOTHESIS_PROFILE=explore`` to draw fresh random examples, e.g. when changing a
property's code.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
