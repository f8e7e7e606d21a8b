"""Properties of every config file: it builds, owns its `runlocal` variant, and imports
nothing outside the configs package but ml_collections."""

from __future__ import annotations

import ast
import importlib
import pathlib

import ml_collections
import pytest

from configs import base

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def _flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _flat_keys(v, f"{prefix}{k}.")
    return keys


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports (``from configs import x`` counts as ``configs.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports would hide where they point
                names.add("." * node.level + (node.module or ""))
            elif node.module == "configs":
                names |= {f"configs.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


def test_configs_exist():
    assert len(CONFIGS) >= 10 and "quickstart" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_variant_builds_and_only_shrinks(name):
    """Every file has its own `runlocal`: the same keys as the full config (no key meant
    for another model), the same model family, and a shorter run."""
    module = importlib.import_module(f"configs.{name}")
    full = module.get_config()
    small = module.get_config("runlocal")
    assert isinstance(small, ml_collections.ConfigDict)
    assert full.to_dict() == module.get_config("").to_dict()
    assert _flat_keys(small.to_dict()) == _flat_keys(full.to_dict())
    assert small.model.name == full.model.name
    # Fewer steps; a compression config has none (tests/experiments/test_compress.py checks it).
    if "total_steps" in full:
        assert small.total_steps < full.total_steps
    assert not small.progress_bar


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_a_value_error(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match=r"config variant 'quick' is unknown.*\['runlocal'\]"):
        module.get_config("quick")


def test_configs_import_only_ml_collections_and_configs():
    """Dependencies point one way: a config never imports the code that runs it
    (experiments, sparsejax, ...). Besides ml_collections, a config imports `configs.base`
    or another config file it extends (SET extends RigL)."""
    allowed = {"__future__", "ml_collections", "configs.base"}
    allowed |= {f"configs.{name}" for name in CONFIGS}
    for path in sorted(CONFIG_DIR.glob("*.py")):
        extra = _imports(path) - allowed
        assert not extra, f"configs/{path.name} imports {sorted(extra)}"


def test_import_check_sees_upward_imports(tmp_path):
    """The check above would catch the import it is there to forbid."""
    path = tmp_path / "bad.py"
    path.write_text(
        "import ml_collections\nfrom experiments.sparse_ift import KEEP_DENSE\n"
        "from configs import base, rigl_mnist1d\nimport numpy as np\n"
    )
    assert _imports(path) == {
        "ml_collections",
        "experiments.sparse_ift",
        "configs.base",
        "configs.rigl_mnist1d",
        "numpy",
    }


def test_shrink_for_runlocal_leaves_the_model_alone():
    config = base.get_base_config()
    model = config.model.to_dict()
    base.shrink_for_runlocal(config)
    assert config.model.to_dict() == model
    assert (config.total_steps, config.batch_size, config.eval_every_steps) == (20, 32, 10)


def test_sparse_ift_keep_dense_matches_the_model():
    """The config writes out the model's dense leaf names instead of importing them."""
    from configs import sparse_ift_mnist1d
    from experiments import sparse_ift

    assert sparse_ift_mnist1d.KEEP_DENSE == sparse_ift.KEEP_DENSE
    assert tuple(sparse_ift_mnist1d.get_config().sparsity.keep_dense) == sparse_ift.KEEP_DENSE
