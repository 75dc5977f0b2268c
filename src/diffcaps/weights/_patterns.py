"""``KeyPattern``: a tensor name with ``{name}`` placeholders, compiled once to a regex.

This is the one implementation of the ``{name}`` pattern language that weight-mapping
rules, block counts and LoRA key tables share.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, final

import attrs

__all__ = ["KeyPattern"]

_PLACEHOLDER: Final = re.compile(r"\{(\w+)\}")


def _names(pattern: KeyPattern) -> tuple[str, ...]:
    found = tuple(_PLACEHOLDER.findall(pattern.text))
    if len(set(found)) != len(found):
        raise ValueError(f"pattern {pattern.text!r} repeats a placeholder")
    return found


def _head(pattern: KeyPattern) -> str | None:
    first = pattern.text.split(".", 1)[0]
    return None if _PLACEHOLDER.search(first) else first


def _compile(pattern: KeyPattern) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern.text)
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^.]+)" for i, p in enumerate(parts))
    return re.compile(body + r"(?=\.|$)")


@final
@attrs.frozen
class KeyPattern:
    """A tensor name with ``{name}`` placeholders, each matching one dotted component.

    ``KeyPattern("double_blocks.{n}.img_attn.qkv.{p}")`` matches
    ``double_blocks.0.img_attn.qkv.weight`` with ``n="0"``, ``p="weight"``; ``format`` goes
    the other way. ``head`` is the literal first component (``None`` when it is a
    placeholder), for indexing many patterns by it.
    """

    text: str
    names: tuple[str, ...] = attrs.field(init=False, default=attrs.Factory(_names, takes_self=True))
    head: str | None = attrs.field(init=False, default=attrs.Factory(_head, takes_self=True))
    _regex: re.Pattern[str] = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(_compile, takes_self=True)
    )

    def match(self, key: str) -> tuple[tuple[str, str], ...] | None:
        """The placeholder values, in pattern order, if the whole of ``key`` matches; else ``None``."""
        found = self._regex.fullmatch(key)
        return None if found is None else tuple((name, found.group(name)) for name in self.names)

    def match_start(self, key: str) -> tuple[tuple[str, str], ...] | None:
        """Like :meth:`match`, for the leading dotted components of ``key`` (``a.{n}`` matches ``a.3.b``)."""
        found = self._regex.match(key)
        return None if found is None else tuple((name, found.group(name)) for name in self.names)

    def format(self, values: Mapping[str, str]) -> str:
        """The key these placeholder values give."""
        return self.text.format_map(values)
