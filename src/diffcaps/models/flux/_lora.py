"""The LoRA formats Flux reads and writes, as name tables over the model's own modules.

One table maps the original (BFL) module names — which kohya, ComfyUI, BFL's control LoRAs,
fal's Kontext LoRAs and XLabs use — to diffcaps' (diffusers') module paths, with the fused
modules' row sizes read from the model. Every original-layout format is that table plus a
key prefix; the diffusers-named formats look module paths up directly. Block counts and
widths always come from the model in hand, never from constants.

The table is derived from the single-file checkpoint table of ``_weight_mapping.py`` (which
maps tensors; LoRA files name modules, so each rule is taken one component up).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.errors import LoRAError
from diffcaps.lora.spec import (
    LORA_SUFFIXES,
    DiffusersLayout,
    InputWidening,
    KeyFormat,
    LoRAService,
    LoRAWeights,
    ModulePlacement,
    Resolver,
    TargetWeights,
    diffusers_peft,
    join_lora,
    model_linears,
    module_table,
    table_resolver,
)
from diffcaps.models.flux._weight_mapping import FLUX_WEIGHTS
from diffcaps.weights.spec import SWAP_HALVES, KeyPattern

__all__ = ["FLUX_LORA", "FLUX_LORA_FORMATS", "bfl_table"]

BFL_ROOTS: Final = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                    "guidance_in.", "final_layer.")
DIFFUSERS_ROOTS: Final = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                          "time_text_embed.", "norm_out.", "proj_out.")
_COMFY_PREFIXES: Final = ("model.diffusion_model.", "diffusion_model.", "")
_LINEAR: Final = {"weight": "weight", "bias": "bias"}

@attrs.frozen
class _ModuleRule:
    """A weight-mapping rule at module level: original module pattern → model module pattern(s)."""

    original: KeyPattern
    model: tuple[KeyPattern, ...]
    params: Mapping[str, str]
    swap: bool


def _module_rules() -> tuple[_ModuleRule, ...]:
    # The single-file key table maps tensors (``….qkv.{p}``, ``….query_norm.scale``); LoRA
    # files name modules, so each rule is taken one component up.
    rules: list[_ModuleRule] = []
    for rule in FLUX_WEIGHTS.rules:
        originals = [p.text for p in rule.original]
        models = [p.text for p in rule.model]
        if len(originals) != 1:
            continue
        if originals[0].endswith(".{p}") and all(m.endswith(".{p}") for m in models):
            rules.append(_ModuleRule(KeyPattern(originals[0][:-4]), tuple(KeyPattern(m[:-4]) for m in models),
                                     _LINEAR, rule.transform == SWAP_HALVES))
            continue
        module, _, param = originals[0].rpartition(".")
        if len(models) == 1 and "{" not in param:
            model_module, _, model_param = models[0].rpartition(".")
            rules.append(_ModuleRule(KeyPattern(module), (KeyPattern(model_module),), {param: model_param}, False))
    return tuple(rules)


_RULES: Final = _module_rules()


def _linear_placement(linears: Mapping[str, nn.Linear], targets: tuple[str, ...], swap: bool = False
                      ) -> ModulePlacement | None:
    if not all(t in linears for t in targets):
        return None
    sizes = tuple(linears[t].out_features for t in targets) if len(targets) > 1 else None
    return ModulePlacement(targets=targets, sizes=sizes, swap_halves=swap, params=_LINEAR)


def bfl_table(model: nn.Module) -> dict[str, ModulePlacement]:
    """Original (BFL) module name → placement on ``model``, for every module the model has.

    Derived from Flux's single-file key table (``FLUX_WEIGHTS``): block numbers are those of
    the model's own modules, and a fused module's row sizes are its targets' output sizes.
    """
    linears = model_linears(model)
    norms = {path for path, module in model.named_modules() if isinstance(module, nn.RMSNorm)}
    table: dict[str, ModulePlacement] = {}
    for rule in _RULES:
        candidates = linears if rule.params is _LINEAR else norms
        for path in candidates:
            found = rule.model[0].match(path)
            if found is None:
                continue
            values = dict(found)
            targets = tuple(m.format(values) for m in rule.model)
            name = rule.original.format(values)
            if rule.params is _LINEAR:
                placement = _linear_placement(linears, targets, rule.swap)
                if placement is not None:
                    table[name] = placement
            else:
                table[name] = ModulePlacement(targets=targets, params=rule.params)
    return table


def _rooted(keys: Collection[str], prefixes: Collection[str], roots: tuple[str, ...]) -> bool:
    for key in keys:
        for prefix in prefixes:
            if key.startswith(prefix) and key[len(prefix):].startswith(roots):
                return True
    return False


# --- resolvers: a file's module name → placement --------------------------------------------

def _dotted_bfl(prefixes: Collection[str]) -> Callable[[nn.Module], Resolver]:
    return table_resolver(bfl_table, tuple(prefixes))


_kohya = table_resolver(bfl_table, ("lora_unet_",), flatten=True)
_onetrainer = table_resolver(module_table, ("lora_transformer_",), flatten=True)
_lycoris_diffusers = table_resolver(module_table, ("lycoris_",), flatten=True)


_XLABS_NAME: Final = re.compile(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)$")
_XLABS_DOUBLE: Final = {("qkv", "1"): "img_attn.qkv", ("qkv", "2"): "txt_attn.qkv",
                        ("proj", "1"): "img_attn.proj", ("proj", "2"): "txt_attn.proj"}


def _xlabs(model: nn.Module) -> Resolver:
    table = bfl_table(model)
    linears = model_linears(model)

    def resolve(name: str) -> ModulePlacement | None:
        match = _XLABS_NAME.match(name)
        if match is None:
            return None
        kind, index, which, stream = match.groups()
        if kind == "double":
            bfl = _XLABS_DOUBLE.get((which, stream))
            return table.get(f"double_blocks.{index}.{bfl}") if bfl else None
        if stream:
            return None
        if which == "proj":
            return table.get(f"single_blocks.{index}.linear2")
        # the single block's qkv LoRA acts on the attention part of linear1 only
        block = f"single_transformer_blocks.{index}.attn"
        return _linear_placement(linears, (f"{block}.to_q", f"{block}.to_k", f"{block}.to_v"))

    return resolve


def _lycoris(model: nn.Module) -> Resolver:
    chain = [_kohya(model), _onetrainer(model), _lycoris_diffusers(model),
             _dotted_bfl(("base_model.model.", *_COMFY_PREFIXES))(model), DIFFUSERS.resolver(model)]

    def resolve(name: str) -> ModulePlacement | str | None:
        for candidate in chain:
            placement = candidate(name)
            if placement is not None:
                return placement
        return None

    return resolve


# --- detectors -----------------------------------------------------------------------------

_LYCORIS_ENDINGS: Final = (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a", ".hada_w1_a", ".hada_w2_a")
_XLABS_KEY: Final = re.compile(r"(?:^|\.)(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora\d?\.(down|up)\.weight$")


def _is_xlabs(keys: Collection[str]) -> bool:
    return any(_XLABS_KEY.search(k) for k in keys)


def _is_lycoris(keys: Collection[str]) -> bool:
    return any(k.endswith(_LYCORIS_ENDINGS) for k in keys)


def _is_kohya(keys: Collection[str]) -> bool:
    return any(k.startswith("lora_unet_") for k in keys) or (
        bool(keys) and all(k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys))


def _is_onetrainer(keys: Collection[str]) -> bool:
    return any(k.startswith("lora_transformer_") for k in keys)


def _is_fal_kontext(keys: Collection[str]) -> bool:
    return _rooted(keys, ("base_model.model.",), BFL_ROOTS)


def _is_bfl_control(keys: Collection[str]) -> bool:
    return _rooted(keys, ("",), BFL_ROOTS) and any(k.endswith(("query_norm.scale", "key_norm.scale")) for k in keys)


def _is_comfyui(keys: Collection[str]) -> bool:
    return _rooted(keys, _COMFY_PREFIXES, BFL_ROOTS)


_LORA_ONLY: Final = dict(LORA_SUFFIXES)

DIFFUSERS = diffusers_peft(roots=DIFFUSERS_ROOTS)
KOHYA = KeyFormat(name="kohya", detector=_is_kohya, resolver=_kohya, suffixes=_LORA_ONLY)
COMFYUI = KeyFormat(name="comfyui", detector=_is_comfyui, resolver=_dotted_bfl(_COMFY_PREFIXES))
ONETRAINER = KeyFormat(name="onetrainer", detector=_is_onetrainer, resolver=_onetrainer, suffixes=_LORA_ONLY)
XLABS = KeyFormat(name="xlabs", detector=_is_xlabs, resolver=_xlabs,
                  suffixes={"down.weight": "down", "up.weight": "up"})
BFL_CONTROL = KeyFormat(name="bfl-control", detector=_is_bfl_control, resolver=_dotted_bfl(("",)),
                        suffixes=_LORA_ONLY, raw_params=frozenset({"scale"}))
FAL_KONTEXT = KeyFormat(name="fal-kontext", detector=_is_fal_kontext, resolver=_dotted_bfl(("base_model.model.",)),
                        suffixes=_LORA_ONLY)
LYCORIS = KeyFormat(name="lycoris", detector=_is_lycoris, resolver=_lycoris)

FLUX_LORA_FORMATS: Final = (XLABS, LYCORIS, KOHYA, ONETRAINER, FAL_KONTEXT, BFL_CONTROL, COMFYUI, DIFFUSERS)
"""Tried in this order: the most specific key patterns first."""


# --- writing kohya files --------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class KohyaLayout:
    """sd-scripts' layout: ``lora_unet_<original name with _>.lora_down/lora_up.weight`` and ``.alpha``.

    Modules that Flux splits (qkv, linear1) are written fused, as sd-scripts does: a shared
    down matrix when the parts share one, else stacked downs and a block-diagonal up.
    """

    name: str = "kohya"

    def export(self, targets: Mapping[str, TargetWeights], patches: Mapping[str, Tensor], *,
               model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and header metadata of a file holding this adapter."""
        if patches:
            raise LoRAError(f"the kohya layout cannot hold replaced parameters ({', '.join(sorted(patches)[:3])})")
        tensors: dict[str, Tensor] = {}
        placed: set[str] = set()
        for bfl, placement in bfl_table(model).items():
            parts = [targets.get(t) for t in placement.targets]
            if all(p is None for p in parts) or placement.params is not _LINEAR:
                continue
            loras: list[LoRAWeights | None] = []
            for target, part in zip(placement.targets, parts):
                if part is not None and not isinstance(part, LoRAWeights):
                    raise LoRAError(f"the kohya layout holds LoRA adapters; {target} is {part.kind}")
                if part is not None and part.bias is not None:
                    raise LoRAError(f"the kohya layout has no bias updates; {target} has one")
                loras.append(part)
            joined = join_lora(loras, placement.sizes or (placement_rows(loras),))
            up = SWAP_HALVES.forward((joined.up,))[0] if placement.swap_halves else joined.up
            key = "lora_unet_" + bfl.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = joined.down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(joined.scale * joined.rank, dtype=torch.float32)
            placed.update(t for t, p in zip(placement.targets, parts) if p is not None)
        left = sorted(set(targets) - placed)
        if left:
            raise LoRAError(f"the kohya layout has no name for {', '.join(left[:4])}")
        return tensors, {"format": "pt", "ss_network_module": "networks.lora_flux"}


def placement_rows(parts: list[LoRAWeights | None]) -> int:
    """Rows of the one present part."""
    return next(p.shape[0] for p in parts if p is not None)


def _widen_flux_config(config: Any, in_channels: int) -> Any:
    return attrs.evolve(config, in_channels=in_channels, out_channels=config.output_channels)


FLUX_LORA: Final = LoRAService(
    formats=FLUX_LORA_FORMATS,
    layouts=(DiffusersLayout(name="diffusers", prefix="transformer"), KohyaLayout()),
    widenable=(InputWidening(module="x_embedder", update_config=_widen_flux_config),),
)
"""The LoRA service of ``FluxTransformer2DModel``."""
