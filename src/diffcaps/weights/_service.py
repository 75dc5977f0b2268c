"""The weight-mapping service: how a model's original single-file layout maps onto its own.

A model folder declares its mapping as data: ordered :class:`Rule` s (key patterns on both
sides, plus a tensor transform), the prefixes seen in the wild, and :class:`WeightVariant`
rules. :class:`WeightMapper` runs that one declaration both ways: original → model when a
checkpoint is loaded or converted, model → original when one is saved. It knows nothing of
any particular model.

Key patterns are literal text with ``{name}`` placeholders, each standing for one dotted
component (``double_blocks.{n}.img_attn.qkv.{p}``). All the patterns of one rule use the
same placeholders, so the tensors that a rule fuses or splits are grouped by their values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, final

import attrs
from torch import Tensor

from diffcaps.errors import CheckpointError, ShapeError
from diffcaps.weights._patterns import KeyPattern
from diffcaps.weights._transforms import IDENTITY, Inverted, Shape, Transform
from diffcaps.weights._variants import TensorSpec, WeightVariant

__all__ = ["Identification", "MappingPlan", "Rule", "Step", "WeightMapper"]

Layout = Literal["original", "diffusers"]
Direction = Literal["to_model", "to_original"]

def _patterns(value: str | Sequence[str]) -> tuple[KeyPattern, ...]:
    return tuple(KeyPattern(v) for v in ((value,) if isinstance(value, str) else value))


@final
@attrs.frozen
class Rule:
    """Tensors named ``original`` in the original layout are ``model`` in the model's.

    ``transform`` turns the original-side tensors into the model-side ones (and back); the
    default only renames. Rules are tried in order and the first match wins.
    """

    original: tuple[KeyPattern, ...] = attrs.field(converter=_patterns)
    model: tuple[KeyPattern, ...] = attrs.field(converter=_patterns)
    transform: Transform = IDENTITY

    def __attrs_post_init__(self) -> None:
        if (len(self.original), len(self.model)) != self.transform.arity():
            raise ValueError(
                f"rule {self.describe()}: {self.transform.describe()} takes {self.transform.arity()[0]} "
                f"original and gives {self.transform.arity()[1]} model tensor(s)"
            )
        names = {frozenset(p.names) for p in (*self.original, *self.model)}
        if len(names) != 1:
            raise ValueError(f"rule {self.describe()}: every pattern must use the same placeholders")

    def side(self, direction: Direction) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...], Transform]:
        """(source patterns, target patterns, transform) when mapping in ``direction``."""
        if direction == "to_model":
            return self.original, self.model, self.transform
        return self.model, self.original, Inverted(self.transform)

    def describe(self) -> str:
        """``a, b → c (split 1:1:1 on dim 0)``."""
        left = ", ".join(p.text for p in self.original)
        right = ", ".join(p.text for p in self.model)
        return f"{left} → {right} ({self.transform.describe()})"


@final
@attrs.frozen
class Step:
    """One unit of work in a plan: read ``sources``, transform, get ``targets``."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: Transform = IDENTITY

    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The target tensors (possibly views of the sources: copy what you keep)."""
        return self.transform.forward(tensors)

    def shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The target shapes for these source shapes (``ValueError`` when they do not fit)."""
        return self.transform.forward_shapes(shapes)


@final
@attrs.frozen
class MappingPlan:
    """How one set of keys maps onto another: the steps, and the keys that could not be used."""

    steps: tuple[Step, ...]
    unused: tuple[str, ...] = ()
    """Source keys that no rule matches, or outside the expected prefix."""
    missing: tuple[str, ...] = ()
    """Source keys that a rule needs beside keys that are present (a fused group cut short)."""

    def target_specs(self, specs: Mapping[str, TensorSpec], *, path: str | None = None) -> dict[str, TensorSpec]:
        """Shape and dtype of every target, from the sources' header entries alone."""
        targets: dict[str, TensorSpec] = {}
        for step in self.steps:
            sources = [specs[key] for key in step.sources]
            try:
                shapes = step.shapes([s.shape for s in sources])
            except ValueError as exc:
                found = ", ".join(f"{k} {list(s.shape)}" for k, s in zip(step.sources, sources, strict=True))
                raise ShapeError(f"{found}: cannot {step.transform.describe()} ({exc})", path=path) from None
            for key, shape in zip(step.targets, shapes, strict=True):
                targets[key] = TensorSpec(shape=shape, dtype=sources[0].dtype)
        return targets

    def producer(self) -> dict[str, Step]:
        """Target key → the step that makes it."""
        return {target: step for step in self.steps for target in step.targets}


@final
@attrs.frozen(kw_only=True)
class Identification:
    """What a checkpoint is: its variant, layout and prefix, the config it implies, its plan."""

    variant: WeightVariant
    layout: Layout
    prefix: str
    config: Mapping[str, Any]
    plan: MappingPlan
    """File keys → model keys."""
    original: Mapping[str, TensorSpec]
    """The file's tensors as the original layout names them, without prefix."""


@attrs.frozen
class _Entry:
    rule: int
    slot: int
    pattern: KeyPattern


@attrs.frozen
class _Index:
    """The patterns of one side, looked up by their literal first component."""

    by_head: Mapping[str, tuple[_Entry, ...]]
    wild: tuple[_Entry, ...]

    @classmethod
    def build(cls, entries: Sequence[_Entry]) -> _Index:
        heads = {e.pattern.head for e in entries if e.pattern.head is not None}
        by_head = {h: tuple(e for e in entries if e.pattern.head in (h, None)) for h in heads}
        return cls(by_head=by_head, wild=tuple(e for e in entries if e.pattern.head is None))

    def match(self, key: str) -> tuple[_Entry, tuple[tuple[str, str], ...]] | None:
        for entry in self.by_head.get(key.split(".", 1)[0], self.wild):
            values = entry.pattern.match(key)
            if values is not None:
                return entry, values
        return None


def _index(rules: Sequence[Rule], direction: Direction) -> _Index:
    entries = [
        _Entry(number, slot, pattern)
        for number, rule in enumerate(rules)
        for slot, pattern in enumerate(rule.side(direction)[0])
    ]
    return _Index.build(entries)


def _check_variants(instance: object, attribute: attrs.Attribute[tuple[WeightVariant, ...]],
                    value: tuple[WeightVariant, ...]) -> None:
    names = [v.name for v in value]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")


def _labels(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


def _prefixes(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(value) - {""}, key=len, reverse=True))


def _tensor_classes(value: Iterable[tuple[str, Iterable[str]]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((label, tuple(words)) for label, words in value)


@final
@attrs.frozen(kw_only=True)
class WeightMapper:
    """A model's original single-file layout, declared as data and run both ways.

    ``family`` names the checkpoints in messages (``"Flux"``); ``prefixes`` are wrappers
    the original layout may carry (``"model.diffusion_model."``); ``layer_counts`` maps a
    label to the config key that counts those layers, for ``inspect``; ``tensor_classes``
    are (label, words), tried in order: a tensor whose original-layout name holds one of the
    words is in that class when ``inspect`` reports a quantized file's types class by class.
    """

    family: str
    rules: tuple[Rule, ...]
    variants: tuple[WeightVariant, ...] = attrs.field(validator=_check_variants)
    prefixes: tuple[str, ...] = attrs.field(default=(), converter=_prefixes)
    layer_counts: Mapping[str, str] = attrs.field(factory=dict, converter=_labels, eq=False, hash=False)
    tensor_classes: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(default=(), converter=_tensor_classes)
    _to_model: _Index = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(lambda m: _index(m.rules, "to_model"), takes_self=True)
    )
    _to_original: _Index = attrs.field(
        init=False, repr=False, eq=False,
        default=attrs.Factory(lambda m: _index(m.rules, "to_original"), takes_self=True),
    )

    def entries(self) -> tuple[str, ...]:
        """The variant names, sorted (the metadata row)."""
        return tuple(sorted(v.name for v in self.variants))

    def variant(self, name: str) -> WeightVariant:
        """The variant called ``name`` (``CheckpointError`` listing the known ones otherwise)."""
        for candidate in self.variants:
            if candidate.name == name:
                return candidate
        raise CheckpointError(f"unknown {self.family} variant {name!r}; known variants: {', '.join(self.entries())}")

    # --- key mapping -------------------------------------------------------------------

    def plan(self, keys: Iterable[str], direction: Direction, *, strip: str = "", add: str = "") -> MappingPlan:
        """Map ``keys`` in ``direction``: ``to_model`` (original → model) or ``to_original``.

        Keys must start with ``strip`` (which is removed before matching; others are unused);
        ``add`` is put before every target key.
        """
        index = self._to_model if direction == "to_model" else self._to_original
        groups: dict[tuple[int, tuple[tuple[str, str], ...]], list[str | None]] = {}
        unused: list[str] = []
        for key in keys:
            found = index.match(key[len(strip):]) if key.startswith(strip) else None
            if found is None:
                unused.append(key)
                continue
            entry, values = found
            slots = groups.setdefault((entry.rule, values), [None] * len(self.rules[entry.rule].side(direction)[0]))
            slots[entry.slot] = key
        steps: list[Step] = []
        missing: list[str] = []
        made: set[str] = set()
        for (number, values), slots in groups.items():
            sources, targets, transform = self.rules[number].side(direction)
            if any(slot is None for slot in slots):
                given = dict(values)
                missing.extend(strip + p.format(given) for p, s in zip(sources, slots, strict=True) if s is None)
                unused.extend(s for s in slots if s is not None)
                continue
            names = tuple(add + p.format(dict(values)) for p in targets)
            if made.intersection(names):
                raise ValueError(f"two rules give {sorted(made.intersection(names))}: the rule table overlaps")
            made.update(names)
            steps.append(Step(tuple(s for s in slots if s is not None), names, transform))
        return MappingPlan(steps=tuple(steps), unused=tuple(unused), missing=tuple(missing))

    def original_names(self, model_keys: Iterable[str], *, prefix: str = "") -> list[str]:
        """The original-layout names of these model keys (a key with none is kept as is)."""
        names: dict[str, None] = {}
        for key in model_keys:
            found = self._to_original.match(key)
            if found is None:
                names[key] = None
                continue
            entry, values = found
            for pattern in self.rules[entry.rule].original:
                names[prefix + pattern.format(dict(values))] = None
        return list(names)

    def convert(self, state: Mapping[str, Tensor], direction: Direction, *, strip: str = "",
                add: str = "") -> dict[str, Tensor]:
        """Map a whole state dict at once (``CheckpointError`` if any key has no place)."""
        plan = self.plan(state, direction, strip=strip, add=add)
        if plan.unused or plan.missing:
            raise CheckpointError.key_mismatch("state dict", missing=plan.missing, unexpected=plan.unused)
        return {
            key: tensor
            for step in plan.steps
            for key, tensor in zip(step.targets, step.run([state[k] for k in step.sources]), strict=True)
        }

    # --- identification ----------------------------------------------------------------

    def _layout(self, keys: Collection[str]) -> tuple[Layout, str, int]:
        best: tuple[int, int, Layout, str] = (0, 0, "original", "")
        sides: tuple[tuple[Layout, _Index], ...] = (("original", self._to_model), ("diffusers", self._to_original))
        for layout, index in sides:
            for rank, prefix in enumerate(("", *self.prefixes)):
                hits = sum(1 for k in keys if k.startswith(prefix) and index.match(k[len(prefix):]))
                if hits > best[0]:
                    best = (hits, -rank, layout, prefix)
        return best[2], best[3], best[0]

    def identify(self, tensors: Mapping[str, TensorSpec], *, variant: str | None = None,
                 path: str | None = None) -> Identification:
        """Recognise a checkpoint from its header: layout, prefix, variant and config.

        ``variant`` skips detection and checks the file against that variant's rules,
        explaining any conflict. Raises ``CheckpointError`` naming the rules tried.
        """
        layout, prefix, hits = self._layout(tensors.keys())
        if layout == "original":
            plan = self.plan(tensors, "to_model", strip=prefix)
            original = {k[len(prefix):]: spec for k, spec in tensors.items() if k.startswith(prefix)}
        else:
            stripped = {k[len(prefix):]: spec for k, spec in tensors.items() if k.startswith(prefix)}
            back = self.plan(stripped, "to_original")
            original = back.target_specs(stripped, path=path)
            plan = MappingPlan(
                steps=tuple(Step((prefix + k,), (k,)) for k in stripped),
                unused=tuple(k for k in tensors if not k.startswith(prefix)),
            )
        chosen = self._choose(original, variant, hits=hits, total=len(tensors), path=path)
        try:
            config = chosen.read_config(original)
        except ValueError as exc:
            raise CheckpointError(f"{self.family} {chosen.name} checkpoint, but {exc}", path=path) from None
        return Identification(variant=chosen, layout=layout, prefix=prefix, config=config, plan=plan,
                              original=original)

    def _choose(self, original: Mapping[str, TensorSpec], name: str | None, *, hits: int, total: int,
                path: str | None) -> WeightVariant:
        matching = [v for v in self.variants if not v.failures(original)]
        if name is not None:
            wanted = self.variant(name)
            failures = wanted.failures(original)
            if not failures:
                return wanted
            looks = f"; the file looks like {matching[0].name}" if matching else ""
            raise CheckpointError(
                f"asked for {self.family} variant {name!r}, which needs {wanted.describe()}; "
                f"but {'; '.join(failures)}{looks}",
                path=path,
            )
        if matching:
            return matching[0]
        tried = "\n".join(
            f"  {v.name}: looked for {', '.join(v.keys())} ({v.describe()}) — {'; '.join(v.failures(original))}"
            for v in self.variants
        )
        layout = (
            f"{hits} of its {total} tensors fit the {self.family} layouts"
            if hits else f"none of its {total} tensors fits the original or diffusers {self.family} layout"
        )
        sample = ", ".join(sorted(original)[:5]) or "(no tensors)"
        raise CheckpointError(
            f"not a recognised {self.family} checkpoint: {layout} (first keys: {sample}).\n"
            f"Variant rules tried:\n{tried}",
            path=path,
        )
