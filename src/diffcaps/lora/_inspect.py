"""Recognising a LoRA file from its header alone, for ``python -m diffcaps inspect``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from diffcaps.lora._adapters import ADAPTER_METADATA_KEY
from diffcaps.lora._formats import TEXT_ENCODER_PREFIXES, LoRAService

__all__ = ["lora_recogniser"]

_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".down.weight")
_ADAPTER_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".down.weight", ".up.weight"),
    (".lokr_w1", ".lokr_w2"),
    (".hada_w1_a", ".hada_w2_a"),
)
"""Suffix pairs only adapter files hold: a LoRA file is told from a checkpoint by structure
(a down/up pair must also be shaped as a low-rank factorisation)."""
_KINDS = {".lokr_": "LoKr (LyCORIS)", ".hada_": "LoHa (LyCORIS)"}


def _ranks(tensors: dict[str, Any]) -> str:
    ranks = sorted({info.shape[0] for key, info in tensors.items()
                    if key.endswith(_DOWN_SUFFIXES) and not key.startswith(TEXT_ENCODER_PREFIXES)})
    if not ranks:
        return ""
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def _kind(keys: Iterable[str]) -> str:
    counts = Counter(next((kind for marker, kind in _KINDS.items() if marker in key), "LoRA") for key in keys)
    return counts.most_common(1)[0][0]


def _low_rank(down: Any, up: Any) -> bool:
    # a LoRA pair is down [rank, in…] and up [out, rank…] with the rank below the layer's widths
    if len(down.shape) < 2 or len(up.shape) < 2:
        return False
    rank = down.shape[0]
    return bool(rank == up.shape[1] and rank < max(down.shape[1], up.shape[0]))


def _adapter_shaped(tensors: dict[str, Any]) -> bool:
    for key, info in tensors.items():
        for first, second in _ADAPTER_PAIRS:
            partner = tensors.get(key.replace(first, second, 1)) if first in key else None
            if partner is None:
                continue
            if first.startswith((".lokr_", ".hada_")) or _low_rank(info, partner):
                return True
    return False


def _declared(cls: type[Any]) -> object:
    declared = getattr(cls, "declared_capabilities", None)
    return declared() if callable(declared) else None


def lora_recogniser(model_classes: Iterable[type[Any]]) -> Callable[[Any], Any]:
    """A ``diffcaps.weights`` recogniser for LoRA files of any of these classes' declared formats.

    It reads the header only: the format, the adapter kind, ranks, whether alphas are stored,
    and how many tensors are for text encoders (which diffcaps reports and skips). A file whose
    tensors do not come in adapter pairs (down/up, LoKr, LoHa factors) is no LoRA file, whatever
    its names look like.
    """
    services = [(cls, service) for cls in model_classes
                if isinstance(service := getattr(_declared(cls), "lora", None), LoRAService)]

    def recognise(header: Any) -> Any:
        from diffcaps.weights import Recognition

        keys = list(header.tensors)
        if not _adapter_shaped(dict(header.tensors)):
            return Recognition(kind="lora", matched=False,
                               rows=(("lora", "no adapter tensor pairs (lora_A/B, lora_down/up, LoKr, LoHa)"),))
        for cls, service in services:
            fmt = service.detect(keys)
            if fmt is None:
                continue
            text = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
            rows = [("model", cls.__name__), ("format", fmt.name), ("adapter", _kind(keys))]
            ranks = _ranks(dict(header.tensors))
            if ranks:
                rows.append(("rank", ranks))
            alphas = sum(k.endswith(".alpha") and not k.startswith(TEXT_ENCODER_PREFIXES) for k in keys)
            rows.append(("alpha", f"{alphas} stored" if alphas else "none stored (scale 1)"))
            if ADAPTER_METADATA_KEY in header.metadata:
                rows.append(("peft config", "in the header (lora_adapter_metadata)"))
            if text:
                rows.append(("text encoder", f"{len(text)} tensor(s), skipped when loading"))
            return Recognition(kind="lora", matched=True, rows=tuple(rows))
        formats = ", ".join(name for _, s in services for name in s.entries())
        return Recognition(kind="lora", matched=False, rows=(("lora", f"in none of the formats {formats}"),))

    return recognise
