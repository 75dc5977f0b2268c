"""The LoRA formats Wan users have, as name tables over the model's own modules.

One table maps Wan's original module names (``blocks.N.self_attn.q``, ``blocks.N.cross_attn.k_img``,
``blocks.N.ffn.0``, ``img_emb.proj.1``, ``head.head``, …) to diffcaps' (diffusers') module
paths. It is derived from the single-file table of ``_weight_mapping.py`` (which maps tensors;
LoRA files name modules, so each rule is taken one component up), over the modules of the
model in hand, so any depth, width and variant maps. The formats:

- ``wan-original``: the original names as Wan-AI's, Kijai's and ComfyUI's files use them, with
  ``diffusion_model.`` / ``model.diffusion_model.`` / no prefix, ``lora_down``/``lora_A`` pairs,
  ``.alpha``, and ``.diff`` / ``.diff_b`` (whole-weight and bias differences, on linears,
  norms, the patch embedding and ``modulation``). diffusers' names under ``diffusion_model.``
  (ai-toolkit writes them so for ComfyUI) are read too.
- ``musubi``: musubi-tuner's (kohya) ``lora_unet_blocks_0_self_attn_q.lora_down.weight``.
- ``lycoris``: LoKr and LoHa on any of those names, or LyCORIS' own ``lycoris_<diffusers name>``.
- ``diffusers``: diffusers/PEFT, on the model's own module paths.

**``.diff_b`` under adapter weights.** A ``.diff_b`` beside a LoRA pair of the same module
becomes that LoRA's bias: it scales with the adapter's ``set_adapters`` weight, goes off with
``disable`` and folds in with ``fuse``, as ComfyUI's LoRA strength and diffusers'
``lora_B.bias`` treat it. A ``.diff``, and a ``.diff_b`` with no pair (norms, ``modulation``,
bias-only modules), is a parameter patch: added in full while the adapter is loaded, whatever
its weight, and taken away by ``unload``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Final

import attrs
from torch import Tensor, nn

from diffcaps.lora.spec import (
    LORA_SUFFIXES,
    ConvertedAdapter,
    DiffusersLayout,
    KeyFormat,
    LoRAService,
    LoRAWeights,
    ModulePlacement,
    ParamPatch,
    Resolver,
    TargetWeights,
    diffusers_peft,
    model_linears,
    module_table,
    table_resolver,
)
from diffcaps.models.wan._weight_mapping import WAN_WEIGHTS
from diffcaps.weights.spec import KeyPattern

__all__ = ["WAN_LORA", "WAN_LORA_FORMATS", "original_table"]

_COMFY_PREFIXES: Final = ("model.diffusion_model.", "diffusion_model.", "")
_DIFFUSERS_ROOTS: Final = ("blocks.", "condition_embedder.", "proj_out.", "patch_embedding.")
_ORIGINAL_NAME: Final = re.compile(
    r"^(?:model\.)?(?:diffusion_model\.)?(?:blocks\.\d+\.(?:self_attn|cross_attn|ffn|modulation|norm3)"
    r"|text_embedding\.|time_embedding\.|time_projection\.|head\.|img_emb\.)"
)


@attrs.frozen
class _ModuleRule:
    """A weight-mapping rule at module level: original module pattern → model module pattern.

    ``param`` is set for a rule that names a bare parameter (``blocks.{n}.modulation`` →
    ``blocks.{n}.scale_shift_table``): the file's ``.diff`` patches that parameter of ``model``.
    """

    original: KeyPattern
    model: KeyPattern
    param: str | None = None


def _module_rules() -> tuple[_ModuleRule, ...]:
    rules: list[_ModuleRule] = []
    for rule in WAN_WEIGHTS.rules:
        original, model = rule.original[0].text, rule.model[0].text
        if original.endswith(".{p}") and model.endswith(".{p}"):
            rules.append(_ModuleRule(KeyPattern(original[:-4]), KeyPattern(model[:-4])))
        else:
            module, _, param = model.rpartition(".")
            rules.append(_ModuleRule(KeyPattern(original), KeyPattern(module), param))
    return tuple(rules)


_RULES: Final = _module_rules()


def _own_modules(model: nn.Module) -> dict[str, nn.Module]:
    linears: dict[str, nn.Module] = dict(model_linears(model))
    others = {path: module for path, module in model.named_modules()
              if not any(part in path for part in (".base_layer", "lora_", "hada_", "lokr_"))}
    return {**others, **linears}


def original_table(model: nn.Module) -> dict[str, ModulePlacement]:
    """Original (Wan) module name → placement on ``model``, for every module the model has.

    A module's placement lets the file's ``weight``/``bias`` differences patch its own
    parameters; a ``modulation`` name patches the block's ``scale_shift_table``.
    """
    modules = _own_modules(model)
    table: dict[str, ModulePlacement] = {}
    for rule in _RULES:
        for path, module in modules.items():
            found = rule.model.match(path)
            if found is None:
                continue
            name = rule.original.format(dict(found))
            if rule.param is not None:
                table[name] = ModulePlacement(targets=(path,), params={"weight": rule.param})
            else:
                own = {n for n, _ in module.named_parameters(recurse=False)}
                table[name] = ModulePlacement(targets=(path,), params={p: p for p in ("weight", "bias") if p in own})
    return table


def _chain(*resolvers: Callable[[nn.Module], Resolver]) -> Callable[[nn.Module], Resolver]:
    def build(model: nn.Module) -> Resolver:
        built = [make(model) for make in resolvers]

        def resolve(name: str) -> ModulePlacement | str | None:
            for candidate in built:
                placement = candidate(name)
                if placement is not None:
                    return placement
            return None

        return resolve

    return build


# --- bias differences beside a LoRA pair become the LoRA's bias -------------------------------

def _fold_bias(converted: ConvertedAdapter) -> ConvertedAdapter:
    targets: dict[str, TargetWeights] = dict(converted.targets)
    patches: dict[str, ParamPatch] = {}
    for name, patch in converted.patches.items():
        module = name.removesuffix(".bias")
        lora = targets.get(module)
        if (name == module or patch.mode != "add" or not patch.source.endswith(".diff_b")
                or not isinstance(lora, LoRAWeights) or lora.scale == 0 or lora.bias is not None):
            patches[name] = patch
            continue
        # the LoRA's bias is added as scale · bias: store it so that weight 1 adds diff_b
        targets[module] = attrs.evolve(lora, bias=patch.value.float() / lora.scale)
    return attrs.evolve(converted, targets=targets, patches=patches)


@attrs.frozen(kw_only=True)
class _FoldingBias:
    """A key format whose ``.diff_b`` beside a LoRA pair becomes that LoRA's bias."""

    format: KeyFormat

    @property
    def name(self) -> str:
        """The wrapped format's name."""
        return self.format.name

    def detect(self, keys: Collection[str]) -> bool:
        """Whether a file with these tensor names is in this format."""
        return self.format.detect(keys)

    def convert(self, tensors: Mapping[str, Tensor], *, model: nn.Module,
                metadata: Mapping[str, str]) -> ConvertedAdapter:
        """The file's tensors in canonical form for ``model``, bias differences folded."""
        return _fold_bias(self.format.convert(tensors, model=model, metadata=metadata))


# --- formats ----------------------------------------------------------------------------------

_LYCORIS_ENDINGS: Final = (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a", ".hada_w1_a", ".hada_w2_a")


def _is_lycoris(keys: Collection[str]) -> bool:
    return any(k.endswith(_LYCORIS_ENDINGS) for k in keys)


def _is_musubi(keys: Collection[str]) -> bool:
    return any(k.startswith("lora_unet_") for k in keys)


def _is_original(keys: Collection[str]) -> bool:
    return any(k.startswith(("diffusion_model.", "model.diffusion_model.")) or _ORIGINAL_NAME.match(k)
               for k in keys)


_original = table_resolver(original_table, _COMFY_PREFIXES)
_diffusers_under_comfy = table_resolver(module_table, ("model.diffusion_model.", "diffusion_model."))
_musubi = table_resolver(original_table, ("lora_unet_",), flatten=True)
_lycoris_native = table_resolver(module_table, ("lycoris_",), flatten=True)

DIFFUSERS: Final = diffusers_peft(roots=_DIFFUSERS_ROOTS)
ORIGINAL: Final = _FoldingBias(format=KeyFormat(
    name="wan-original", detector=_is_original, resolver=_chain(_original, _diffusers_under_comfy)))
MUSUBI: Final = KeyFormat(name="musubi", detector=_is_musubi, resolver=_musubi, suffixes=dict(LORA_SUFFIXES))
LYCORIS: Final = KeyFormat(name="lycoris", detector=_is_lycoris,
                           resolver=_chain(_musubi, _lycoris_native, _original, _diffusers_under_comfy,
                                           DIFFUSERS.resolver))

WAN_LORA_FORMATS: Final = (LYCORIS, MUSUBI, ORIGINAL, DIFFUSERS)
"""Tried in this order: the most specific key patterns first."""

WAN_LORA: Final = LoRAService(
    formats=WAN_LORA_FORMATS,
    layouts=(DiffusersLayout(name="diffusers", prefix="transformer"),),
)
"""The LoRA service of ``WanTransformer3DModel``."""
