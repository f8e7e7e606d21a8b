"""Format names, the layer kinds that take each, and the factorize spec.

A *factorize spec* says how chosen layers' weights are factorized, by parameter path:
``{"hidden_1": {"format": "tt_matrix", "rank": 0.1, "in_shape": (4, 8, 8)}}``. One
entry builds a layer (`Factorized` takes the `LAYER_KEYS`) and converts a trained
dense layer's params to it (`factorize_params` / `densify_params` take the
`CONVERSION_KEYS` too), so the spec a model is built from also converts its
checkpoint. `check_factorize_spec` validates either use, once, before anything is
built.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from tensornets import contract as contract_lib

__all__ = [
    "CONVERSION_KEYS",
    "FORMATS",
    "LAYER_FORMATS",
    "LAYER_KEYS",
    "SPEC_KEYS",
    "canonical_format",
    "check_contraction",
    "check_factorize_spec",
    "check_low_rank_shapes",
    "check_rank_dropout",
]

FORMATS = ("cp", "tucker", "tt", "tt_matrix", "tubal", "low_rank")
# The formats each layer kind takes: a t-product layer maps tubes of a dense input, and a
# conv or embedding has no such input; a convolution's low-rank form is not implemented
# (its nearest relatives here are "cp" and Tucker-2).
LAYER_FORMATS = {
    "dense": FORMATS,
    "conv": ("cp", "tucker", "tt", "tt_matrix"),
    "embed": ("tt", "tt_matrix", "low_rank"),
}
LAYER_KEYS = (
    "contraction",
    "format",
    "in_shape",
    "init_variance",
    "out_shape",
    "rank",
    "rank_dropout",
)
CONVERSION_KEYS = ("feature_group_count", "kernel_size", "kind", "n_iter_max", "to")
SPEC_KEYS = tuple(sorted(LAYER_KEYS + CONVERSION_KEYS))

_ALIASES = {"ttm": "tt_matrix", "tt-matrix": "tt_matrix", "parafac": "cp"}
_KIND_CLASSES = {"dense": "nn.Dense", "conv": "nn.Conv", "embed": "nn.Embed"}
_KIND_WORDS = {"dense": "dense", "conv": "conv", "embed": "embedding"}


def _check_kind(kind: Any, where: str = "") -> str:
    if kind not in LAYER_FORMATS:
        raise ValueError(f"{where}kind must be one of {tuple(LAYER_FORMATS)}, got {kind!r}")
    return kind


def canonical_format(fmt: Any, kind: str | None = None, where: str = "") -> str:
    """The canonical name of a format, checked against the formats a layer kind takes.

    Args:
      fmt: a name in `FORMATS` or an alias ("ttm", "tt-matrix", "parafac"), any case.
      kind: "dense" | "conv" | "embed": accept only the formats that layer takes
        (`LAYER_FORMATS`); None accepts every format.
      where: what the messages start with, e.g. ``"spec['fc']: "``.

    Returns:
      The name in `FORMATS`.

    Raises:
      ValueError: naming the format, for an unknown one or one the layer kind does not
        take (then also the layers that do take it).
    """
    name = _ALIASES.get(fmt.lower(), fmt.lower()) if isinstance(fmt, str) else fmt
    if name not in FORMATS:
        raise ValueError(f"{where}format must be one of {FORMATS}, got {fmt!r}")
    if kind is None:
        return name
    allowed = LAYER_FORMATS[_check_kind(kind, where)]
    if name not in allowed:
        takers = [k for k, formats in LAYER_FORMATS.items() if name in formats]
        raise ValueError(
            f"{where}format must be one of {allowed} for an {_KIND_CLASSES[kind]}, got {fmt!r}: "
            f"it is for {' and '.join(_KIND_WORDS[k] for k in takers)} kernels only "
            f"({', '.join(_KIND_CLASSES[k] for k in takers)})"
        )
    return name


def check_contraction(contraction: Any, where: str = "") -> str:
    """Checks a layer's ``contraction`` (how it multiplies by its factorized weight).

    The layers check it when they are set up, before anything is contracted, so the
    message names the layer's attribute (the contraction helpers call it ``method``).

    Args:
      contraction: one of `tensornets.contract.METHODS`: "auto" (fewer FLOPs),
        "factorized" or "dense".
      where: what the message starts with, e.g. ``"spec['fc']: "``.

    Returns:
      ``contraction``.

    Raises:
      ValueError: naming ``contraction``, its value and the allowed values.
    """
    if not isinstance(contraction, str) or contraction not in contract_lib.METHODS:
        raise ValueError(
            f"{where}contraction must be one of {contract_lib.METHODS}, got {contraction!r}"
        )
    return contraction


def check_rank_dropout(rank_dropout: Any, where: str = "") -> float:
    """Checks a layer's tensor dropout rate ``rank_dropout``, a float in [0, 1).

    The layers check it when they are set up (at init too, where nothing is dropped),
    so the message names the layer's attribute (`tensornets.regularizers` calls it
    ``rate``).

    Args:
      rank_dropout: the drop probability of each component.
      where: what the message starts with, e.g. ``"spec['fc']: "``.

    Returns:
      ``rank_dropout`` as a float.

    Raises:
      ValueError: naming ``rank_dropout`` and its value (not a real number, a bool,
        NaN, or outside [0, 1)).
    """
    if (
        isinstance(rank_dropout, bool)
        or not isinstance(rank_dropout, numbers.Real)
        or not 0.0 <= rank_dropout < 1.0
    ):
        raise ValueError(f"{where}rank_dropout must be a float in [0, 1), got {rank_dropout!r}")
    return float(rank_dropout)


def check_low_rank_shapes(in_shape: Any, out_shape: Any, where: str = "") -> None:
    """Refuses ``in_shape`` / ``out_shape`` for "low_rank", which factorizes the matrix itself.

    Raises:
      ValueError: naming both shapes, when either is given.
    """
    if in_shape is not None or out_shape is not None:
        raise ValueError(
            f"{where}format 'low_rank' factorizes the (in, out) matrix itself; in_shape / "
            f"out_shape do not apply (use 'cp' to tensorize), got in_shape={in_shape!r}, "
            f"out_shape={out_shape!r}"
        )


def check_factorize_spec(
    spec: Any,
    *,
    name: str = "spec",
    keys: Sequence[str] = SPEC_KEYS,
    required: Sequence[str] = ("format", "rank"),
    kinds: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Validates a factorize spec ``{path: {"format": ..., "rank": ..., ...}}``.

    Checks what can be checked before any shape is known: every entry is a mapping
    with the ``required`` keys and no others than ``keys``, names a known format that
    its layer kind takes (the kind from ``kinds``, or the entry's own "kind"), and,
    for "low_rank", no ``in_shape`` / ``out_shape``; a ``contraction`` or
    ``rank_dropout`` it gives is valid (`check_contraction`, `check_rank_dropout`).
    Ranks and factorizations are checked against the layer's shapes when it is built
    or converted.

    Args:
      spec: the mapping from a module path ("block/fc") to its entry.
      name: the argument's name, as the messages show it ("spec", "factorize").
      keys: the keys an entry may have: `SPEC_KEYS` (conversion) or `LAYER_KEYS`
        (building `Factorized` layers).
      required: the keys every entry needs.
      kinds: optional ``{path: "dense" | "conv" | "embed"}``: the layers there are;
        each path of ``spec`` must be one of them.

    Returns:
      ``{path: dict(entry)}`` in the order of ``spec`` (entries are not changed).

    Raises:
      ValueError: naming the entry (``name[path]``) and the offending key or value.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{name} must be a mapping {{path: {{'format': ..., 'rank': ...}}}}, got {spec!r}"
        )
    checked = {}
    for path, entry in spec.items():
        where = f"{name}[{path!r}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping with 'format' and 'rank', got {entry!r}")
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; known: {sorted(keys)}")
        for key in required:
            if key not in entry:
                raise ValueError(f"{where} needs {key!r}")
        kind = entry.get("kind")
        if kind is not None:
            _check_kind(kind, f"{where}: ")
        if kinds is not None:
            if path not in kinds:
                raise ValueError(
                    f"{name} names {path!r}, which is not one of the layers {sorted(kinds)}"
                )
            kind = kinds[path]
        if "format" in entry:
            fmt = canonical_format(entry["format"], kind, f"{where}: ")
            if fmt == "low_rank":
                check_low_rank_shapes(entry.get("in_shape"), entry.get("out_shape"), f"{where}: ")
        if "contraction" in entry:
            check_contraction(entry["contraction"], f"{where}: ")
        if "rank_dropout" in entry:
            check_rank_dropout(entry["rank_dropout"], f"{where}: ")
        checked[path] = dict(entry)
    return checked
