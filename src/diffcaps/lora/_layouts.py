"""Writing adapters: the diffusers/PEFT layout, and the save function."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from torch import Tensor, nn

from diffcaps.errors import LoRAError
from diffcaps.io import save_safetensors
from diffcaps.lora import _peft
from diffcaps.lora._tensors import ADAPTER_METADATA_KEY
from diffcaps.lora._service import LoHaWeights, LoKrWeights, LoRAService, LoRAWeights, TargetWeights
from diffcaps.lora._state import get_state
from diffcaps.protocols import SupportsLoRA, require

__all__ = ["PeftLayout", "save_adapter", "weights_of"]


def _common(values: Mapping[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


@attrs.frozen(kw_only=True)
class PeftLayout:
    """diffusers' layout: ``{prefix}.{module}.lora_A.weight`` / ``lora_B.weight`` (/ ``lora_B.bias``).

    The peft config (rank and alpha per module, ``lora_bias``) goes into the header entry
    ``lora_adapter_metadata``, which diffusers reads back; replaced parameters are written
    under their own names.
    """

    name: str = "diffusers"
    prefix: str = "transformer"

    def export(self, targets: Mapping[str, TargetWeights], patches: Mapping[str, Tensor], *,
               model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and header metadata of a file holding this adapter."""
        tensors: dict[str, Tensor] = {}
        ranks: dict[str, float] = {}
        alphas: dict[str, float] = {}
        has_bias = False
        for path, w in targets.items():
            if not isinstance(w, LoRAWeights):
                raise LoRAError(f"the {self.name} layout holds LoRA adapters; {path} is {w.kind}")
            key = f"{self.prefix}.{path}"
            tensors[f"{key}.lora_A.weight"] = w.down
            tensors[f"{key}.lora_B.weight"] = w.up
            if w.bias is not None:
                tensors[f"{key}.lora_B.bias"] = w.bias
                has_bias = True
            ranks[path], alphas[path] = w.rank, w.scale * w.rank
        for name, value in patches.items():
            tensors[f"{self.prefix}.{name}"] = value
        metadata = {"format": "pt"}
        if targets:
            r, alpha = _common(ranks), _common(alphas)
            config: dict[str, Any] = {
                "r": int(r),
                "lora_alpha": alpha,
                "rank_pattern": {"^" + re.escape(p): int(v) for p, v in ranks.items() if v != r},
                "alpha_pattern": {"^" + re.escape(p): v for p, v in alphas.items() if v != alpha},
                # a regex of exact paths: a list would let peft match ``proj_out`` by suffix
                "target_modules": "^(?:" + "|".join(re.escape(p) for p in sorted(targets)) + ")$",
                "lora_bias": has_bias,
                "use_dora": False,
            }
            packed = {f"{self.prefix}.{k}": v for k, v in config.items()}
            metadata[ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        return tensors, metadata


def weights_of(layer: _peft.PeftLayer, name: str, rank: int) -> TargetWeights:
    """Adapter ``name`` of a peft layer in canonical form, at weight 1 and its loaded rank."""
    any_layer: Any = layer
    scale = _peft.unit_scale(layer, name)
    kind = _peft.kind_of(layer)
    if kind == "lora":
        b = any_layer.lora_B[name]
        return LoRAWeights(down=any_layer.lora_A[name].weight.detach()[:rank],
                           up=b.weight.detach()[:, :rank], scale=scale,
                           bias=b.bias.detach() if b.bias is not None else None)
    if kind == "lokr":
        factors = [_lokr_factor(any_layer, label, name) for label in ("lokr_w1", "lokr_w2")]
        return LoKrWeights(w1=factors[0], w2=factors[1], scale=scale)
    return LoHaWeights(w1_a=any_layer.hada_w1_a[name].detach(), w1_b=any_layer.hada_w1_b[name].detach(),
                       w2_a=any_layer.hada_w2_a[name].detach(), w2_b=any_layer.hada_w2_b[name].detach(),
                       scale=scale)


def _lokr_factor(layer: Any, label: str, name: str) -> Tensor | tuple[Tensor, Tensor]:
    if name in getattr(layer, label):
        full: Tensor = getattr(layer, label)[name].detach()
        return full
    return getattr(layer, f"{label}_a")[name].detach(), getattr(layer, f"{label}_b")[name].detach()


def save_adapter(
    model: SupportsLoRA,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    layout: str = "diffusers",
) -> Path:
    """Write adapter ``adapter_name`` to a safetensors file in ``layout`` (``"diffusers"`` or ``"kohya"``).

    The file holds the adapter as loaded (its own rank and alpha, without any weight set by
    ``set_adapters`` and without hotswap padding), and the parameters it replaced.
    """
    model, service = require(model, "lora")
    state = get_state(model)
    if state is None or adapter_name not in state.adapters:
        raise LoRAError(f"no adapter named {adapter_name!r} is loaded")
    writer = service.layout(layout)
    if writer is None:
        raise LoRAError(f"unknown layout {layout!r}; this model writes {', '.join(l.name for l in service.layouts)}")
    record = state.adapters[adapter_name]
    targets = {p: weights_of(_peft.layer_at(model, p), adapter_name, record.ranks[p]) for p in record.targets}
    patches = {patch.path: patch.installed.detach() for patch in record.patches}
    tensors, metadata = writer.export(targets, patches, model=model)
    out = Path(path)
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, out, metadata=metadata)
    return out
