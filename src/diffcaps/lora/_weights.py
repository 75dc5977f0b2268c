"""Adapter weights by exact module-path prefix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from diffcaps.errors import LoRAError

__all__ = ["check_prefixes", "prefix_matches", "weight_for"]


def prefix_matches(prefix: str, path: str) -> bool:
    """Whether ``prefix`` names ``path`` or a module containing it (``""`` names every module).

    Matching is on whole path components: ``transformer_blocks.1`` matches
    ``transformer_blocks.1.attn.to_q`` but not ``transformer_blocks.10`` nor
    ``single_transformer_blocks.1``.
    """
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def weight_for(weight: float | Mapping[str, float], path: str) -> float:
    """The weight of the module at ``path``: the value of the longest matching prefix, else 1."""
    if not isinstance(weight, Mapping):
        return float(weight)
    best: str | None = None
    for prefix in weight:
        if prefix_matches(prefix, path) and (best is None or len(prefix) > len(best)):
            best = prefix
    return float(weight[best]) if best is not None else 1.0


def check_prefixes(weight: float | Mapping[str, float], paths: Iterable[str], adapter: str) -> None:
    """Raise ``LoRAError`` for a prefix that names none of the model's modules."""
    if not isinstance(weight, Mapping):
        return
    known = list(paths)
    for prefix in weight:
        if not any(prefix_matches(prefix, path) for path in known):
            raise LoRAError(f"weight for adapter {adapter!r}: {prefix!r} is the path of no module of the model "
                            "(prefixes match whole dotted components)")
