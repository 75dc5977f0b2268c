"""LoRA files in each trainer's own key layout, built from seeded tensors, with their expected effect.

Nothing here calls diffcaps' converters: every file is written the way its trainer names
tensors, and the expected update of every model module (``W + scale · up @ down`` and its
LoKr/LoHa counterparts) is computed here from the seeded tensors and an independent table of
which original (BFL) module covers which rows of which diffusers module.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from diffcaps.io import save_safetensors

Deltas = dict[str, Tensor]

# Original (BFL) module → the diffusers modules whose rows it holds, in order. Written from the
# public BFL / diffusers module layouts, independently of diffcaps' own tables.
_TOP = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # output halves swapped
}
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def bfl_modules(num_double: int, num_single: int, guidance: bool = True) -> dict[str, list[str]]:
    """BFL module name → diffusers module paths (row order) for a model of this depth."""
    table = {k: v for k, v in _TOP.items() if guidance or not k.startswith("guidance_in")}
    for i in range(num_double):
        table.update({f"double_blocks.{i}.{k}": [f"transformer_blocks.{i}.{p}" for p in v] for k, v in _DOUBLE.items()})
    for i in range(num_single):
        table.update({f"single_blocks.{i}.{k}": [f"single_transformer_blocks.{i}.{p}" for p in v]
                      for k, v in _SINGLE.items()})
    return table


def linear(model: nn.Module, path: str) -> nn.Linear:
    """The linear module at ``path`` (the base layer, when a peft layer wraps it)."""
    found = model.get_submodule(path)
    found = getattr(found, "base_layer", found)
    assert isinstance(found, nn.Linear)
    return found


def module(model: nn.Module, path: str) -> Any:
    """Any module, for reading attributes a test knows are there (peft layers, norms)."""
    return model.get_submodule(path)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear module of a plain (adapter-free) model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@attrs.define
class LoraFile:
    """A file's tensors and what loading it must do to the model.

    The expected updates are computed when first asked for (a benchmark at full width only
    needs the tensors).
    """

    tensors: dict[str, Tensor]
    _deltas: Deltas = attrs.field(factory=dict, alias="deltas")
    _bias_deltas: Deltas = attrs.field(factory=dict, alias="bias_deltas")
    replaced: dict[str, Tensor] = attrs.field(factory=dict)
    """Parameter name → its value while the adapter is loaded."""
    in_channels: int | None = None
    """The model's input width while the adapter is loaded, when the file widens it."""
    skipped: set[str] = attrs.field(factory=set)
    metadata: dict[str, str] | None = None
    pending: list[Callable[[], None]] = attrs.field(factory=list)

    def _resolve(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    @property
    def deltas(self) -> Deltas:
        """Module path → expected weight update (fp64), at adapter weight 1."""
        self._resolve()
        return self._deltas

    @property
    def bias_deltas(self) -> Deltas:
        """Module path → expected bias update (fp64), at adapter weight 1."""
        self._resolve()
        return self._bias_deltas

    def expect(self, path: str, delta: Tensor, *, bias: bool = False) -> None:
        """Record the expected weight (or bias) update of the module at ``path``."""
        (self._bias_deltas if bias else self._deltas)[path] = delta

    def save(self, path: Path, dtype: torch.dtype | None = None) -> Path:
        tensors = self.tensors if dtype is None else {k: v.to(dtype) for k, v in self.tensors.items()}
        save_safetensors(tensors, path, metadata=self.metadata)
        return path


class Seeded:
    """Seeded small random tensors."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.1) -> Tensor:
        return torch.randn(*shape, generator=self.generator) * scale


def _rows(model: nn.Module, targets: list[str]) -> list[int]:
    return [linear(model, t).out_features for t in targets]


def _swap(t: Tensor) -> Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def place(file: LoraFile, model: nn.Module, targets: list[str], delta: Callable[[], Tensor],
          bias: Tensor | None = None, *, swap: bool = False) -> None:
    """Record the expected update of a (possibly fused) module on its diffusers targets."""
    sizes = _rows(model, targets)

    def compute() -> None:
        full = delta()
        cut = bias
        if swap:
            full = _swap(full)
            cut = _swap(cut) if cut is not None else None
        for target, part in zip(targets, torch.split(full, sizes)):
            file.expect(target, part)
        if cut is not None:
            for target, part in zip(targets, torch.split(cut, sizes)):
                file.expect(target, part, bias=True)

    file.pending.append(compute)


def _is_final_modulation(name: str) -> bool:
    # BFL's final adaLN modulation stores (shift, scale); diffusers' norm_out.linear (scale, shift)
    return name == "final_layer.adaLN_modulation.1"


def lora_delta(down: Tensor, up: Tensor, scale: float) -> Tensor:
    return scale * (up.double() @ down.double())


def _kron(w1: Tensor, w2: Tensor | tuple[Tensor, Tensor], scale: float) -> Tensor:
    right = w2[0].double() @ w2[1].double() if isinstance(w2, tuple) else w2.double()
    return scale * torch.kron(w1.double(), right)


def _hadamard(parts: dict[str, Tensor], scale: float) -> Tensor:
    return (parts["hada_w1_a"].double() @ parts["hada_w1_b"].double()) * \
        (parts["hada_w2_a"].double() @ parts["hada_w2_b"].double()) * scale


def kohya_style(model: nn.Module, *, seed: int, key: Callable[[str], str], down: str = "lora_down",
                up: str = "lora_up", alpha: bool = True, rank: int = 4, modules: list[str] | None = None,
                block_diagonal: bool = False, num_double: int = 2, num_single: int = 2,
                vary_rank: bool = True) -> LoraFile:
    """A file on BFL module names (kohya, ComfyUI): fused qkv/linear1 as one LoRA each."""
    rand = Seeded(seed)
    table = bfl_modules(num_double, num_single)
    file = LoraFile(tensors={})
    for index, (bfl, targets) in enumerate(table.items()):
        if modules is not None and bfl not in modules:
            continue
        module_in = linear(model, targets[0]).in_features
        rows = sum(_rows(model, targets))
        if block_diagonal and len(targets) > 1:
            r = rank * len(targets)
            d = rand(r, module_in)
            u = torch.zeros(rows, r)
            start = 0
            for j, size in enumerate(_rows(model, targets)):
                u[start:start + size, j * rank:(j + 1) * rank] = rand(size, rank)
                start += size
        else:
            r = rank + index % 3 if vary_rank else rank
            d, u = rand(r, module_in), rand(rows, r)
        name = key(bfl)
        file.tensors[f"{name}.{down}.weight"] = d
        file.tensors[f"{name}.{up}.weight"] = u
        scale = 1.0
        if alpha:
            a = float(r + 1 + index % 2)
            file.tensors[f"{name}.alpha"] = torch.tensor(a)
            scale = a / r
        place(file, model, targets, partial(lora_delta, d, u, scale), swap=bfl == "final_layer.adaLN_modulation.1")
    return file


def diffusers_style(model: nn.Module, *, seed: int, key: Callable[[str], str], down: str = "lora_A",
                    up: str = "lora_B", alpha_every: int = 0, rank: int = 4,
                    paths: list[str] | None = None, vary_rank: bool = True) -> LoraFile:
    """A file on diffusers module paths (diffusers/PEFT, OneTrainer): one LoRA per module."""
    rand = Seeded(seed)
    file = LoraFile(tensors={})
    for index, (path, linear) in enumerate(linears(model).items()):
        if paths is not None and path not in paths:
            continue
        r = rank + index % 2 if vary_rank else rank
        d, u = rand(r, linear.in_features), rand(linear.out_features, r)
        file.tensors[f"{key(path)}.{down}.weight"] = d
        file.tensors[f"{key(path)}.{up}.weight"] = u
        scale = 1.0
        if alpha_every and index % alpha_every == 0:
            a = float(2 * r)
            file.tensors[f"{key(path)}.alpha"] = torch.tensor(a)
            scale = a / r
        place(file, model, [path], partial(lora_delta, d, u, scale))
    return file


def xlabs_file(model: nn.Module, *, seed: int, doubles: list[int], singles: list[int], prefix: str = "",
               rank: int = 4) -> LoraFile:
    """XLabs x-flux: qkv_lora1/2 and proj_lora1/2 per double block, qkv_lora/proj_lora per single block."""
    rand = Seeded(seed)
    file = LoraFile(tensors={})
    inner = linear(model, "transformer_blocks.0.attn.to_q").out_features
    double = {"qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
              "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
              "proj_lora1": ["attn.to_out.0"], "proj_lora2": ["attn.to_add_out"]}
    single = {"qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"], "proj_lora": ["proj_out"]}
    for kind, blocks, table, model_prefix in (("double", doubles, double, "transformer_blocks"),
                                              ("single", singles, single, "single_transformer_blocks")):
        for i in blocks:
            for name, parts in table.items():
                targets = [f"{model_prefix}.{i}.{p}" for p in parts]
                module_in = linear(model, targets[0]).in_features
                d, u = rand(rank, module_in), rand(len(parts) * inner, rank)
                base = f"{prefix}{kind}_blocks.{i}.processor.{name}"
                file.tensors[f"{base}.down.weight"] = d
                file.tensors[f"{base}.up.weight"] = u
                place(file, model, targets, partial(lora_delta, d, u, 1.0))
    return file


def bfl_control_file(model: nn.Module, *, seed: int, in_channels: int, prefix: str = "",
                     rank: int = 4, num_double: int = 2, num_single: int = 2) -> LoraFile:
    """BFL control LoRA: lora_A/lora_B (+ lora_B.bias) on BFL names, full norm scales, a wider img_in."""
    rand = Seeded(seed)
    file = LoraFile(tensors={}, in_channels=in_channels)
    for bfl, targets in bfl_modules(num_double, num_single).items():
        module_in = linear(model, targets[0]).in_features
        if bfl == "img_in":
            module_in = in_channels
        rows = sum(_rows(model, targets))
        a, b, bias = rand(rank, module_in), rand(rows, rank), rand(rows)
        file.tensors[f"{prefix}{bfl}.lora_A.weight"] = a
        file.tensors[f"{prefix}{bfl}.lora_B.weight"] = b
        file.tensors[f"{prefix}{bfl}.lora_B.bias"] = bias
        place(file, model, targets, partial(lora_delta, a, b, 1.0), bias.double(),
              swap=bfl == "final_layer.adaLN_modulation.1")
    for i in range(num_double):
        for bfl, norm in DOUBLE_NORMS.items():
            scale = 1.0 + rand(module(model, f"transformer_blocks.{i}.{norm}").weight.shape[0])
            file.tensors[f"{prefix}double_blocks.{i}.{bfl}.scale"] = scale
            file.replaced[f"transformer_blocks.{i}.{norm}.weight"] = scale
    for i in range(num_single):
        for bfl, norm in SINGLE_NORMS.items():
            scale = 1.0 + rand(module(model, f"single_transformer_blocks.{i}.{norm}").weight.shape[0])
            file.tensors[f"{prefix}single_blocks.{i}.{bfl}.scale"] = scale
            file.replaced[f"single_transformer_blocks.{i}.{norm}.weight"] = scale
    return file


def fal_kontext_file(model: nn.Module, *, seed: int, rank: int = 4) -> LoraFile:
    """fal's Kontext LoRAs: PEFT on a BFL-named model (``base_model.model.``), with lora_B biases."""
    rand = Seeded(seed)
    file = LoraFile(tensors={})
    for bfl, targets in bfl_modules(2, 2).items():
        if not bfl.startswith(("double_blocks", "single_blocks", "final_layer.linear")):
            continue
        module_in = linear(model, targets[0]).in_features
        rows = sum(_rows(model, targets))
        a, b, bias = rand(rank, module_in), rand(rows, rank), rand(rows)
        file.tensors[f"base_model.model.{bfl}.lora_A.weight"] = a
        file.tensors[f"base_model.model.{bfl}.lora_B.weight"] = b
        file.tensors[f"base_model.model.{bfl}.lora_B.bias"] = bias
        place(file, model, targets, partial(lora_delta, a, b, 1.0), bias.double())
    return file


def lokr_file(model: nn.Module, *, seed: int, key: Callable[[str], str], modules: dict[str, list[str]],
              w1_rows: dict[str, int], decompose: bool, alpha: float | None = 3.0, rank: int = 2) -> LoraFile:
    """LyCORIS LoKr: ``lokr_w1`` [a, b] ⊗ ``lokr_w2`` [c, d] (w2 as ``w2_a @ w2_b`` when decomposed)."""
    rand = Seeded(seed)
    file = LoraFile(tensors={})
    for name, targets in modules.items():
        rows = sum(_rows(model, targets))
        cols = linear(model, targets[0]).in_features
        a = w1_rows.get(name, 2)
        b = 2
        c, d = rows // a, cols // b
        w1 = rand(a, b, scale=1.0)
        file.tensors[f"{key(name)}.lokr_w1"] = w1
        if decompose:
            w2a, w2b = rand(c, rank), rand(rank, d)
            file.tensors[f"{key(name)}.lokr_w2_a"] = w2a
            file.tensors[f"{key(name)}.lokr_w2_b"] = w2b
            w2: Tensor | tuple[Tensor, Tensor] = (w2a, w2b)
            scale = alpha / rank if alpha is not None else 1.0
        else:
            w2 = rand(c, d)
            file.tensors[f"{key(name)}.lokr_w2"] = w2
            scale = 1.0  # LyCORIS applies no alpha when both factors are full
        if alpha is not None:
            file.tensors[f"{key(name)}.alpha"] = torch.tensor(alpha)
        place(file, model, targets, partial(_kron, w1, w2, scale), swap=_is_final_modulation(name))
    return file


def loha_file(model: nn.Module, *, seed: int, key: Callable[[str], str], modules: dict[str, list[str]],
              alpha: float = 3.0, rank: int = 2) -> LoraFile:
    """LyCORIS LoHa: ``(hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b) · alpha / rank``."""
    rand = Seeded(seed)
    file = LoraFile(tensors={})
    for name, targets in modules.items():
        rows = sum(_rows(model, targets))
        cols = linear(model, targets[0]).in_features
        parts = {"hada_w1_a": rand(rows, rank, scale=0.5), "hada_w1_b": rand(rank, cols, scale=0.5),
                 "hada_w2_a": rand(rows, rank, scale=0.5), "hada_w2_b": rand(rank, cols, scale=0.5)}
        for suffix, tensor in parts.items():
            file.tensors[f"{key(name)}.{suffix}"] = tensor
        file.tensors[f"{key(name)}.alpha"] = torch.tensor(alpha)
        place(file, model, targets, partial(_hadamard, parts, alpha / rank), swap=_is_final_modulation(name))
    return file


def text_encoder_keys(file: LoraFile, prefix: str, seed: int = 99) -> None:
    """Add a text-encoder LoRA module the way trainers write one (it must be reported as skipped)."""
    rand = Seeded(seed)
    for suffix, tensor in ((".lora_down.weight", rand(4, 16)), (".lora_up.weight", rand(16, 4)),
                           (".alpha", torch.tensor(4.0))):
        key = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj{suffix}"
        file.tensors[key] = tensor
        file.skipped.add(key)
