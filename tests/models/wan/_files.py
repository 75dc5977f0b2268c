"""Wan files for the single-file and LoRA tests: tiny seeded models and LoRA files in each trainer's names.

Nothing here calls diffcaps' Wan tables: the original names below are written from Wan-AI's
published module layout (``wan/modules/model.py``), and every file's expected effect
(``W + scale · up @ down``, its LoKr/LoHa counterparts, and the ``.diff``/``.diff_b``
differences) is computed here from the seeded tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from diffcaps.models.wan import WanConfig, WanTransformer3DModel

# Wan's single files carry 128-wide heads; two heads keep the models small.
T2V = WanConfig(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=24,
                freq_dim=32, ffn_dim=64, num_layers=2)
I2V = attrs.evolve(T2V, in_channels=36, image_dim=20, added_kv_proj_dim=256, num_layers=3)
FLF2V = attrs.evolve(I2V, pos_embed_seq_len=10, num_layers=1)
TI2V = attrs.evolve(T2V, in_channels=48, out_channels=48, cross_attn_norm=False)
I2V_A14B = attrs.evolve(T2V, in_channels=36)
VARIANTS: dict[str, WanConfig] = {"wan-t2v": T2V, "wan-i2v": I2V, "wan-flf2v": FLF2V, "wan-ti2v": TI2V,
                                  "wan-i2v-a14b": I2V_A14B}

# Original module name → diffusers module path (Wan-AI's layout against diffusers').
_TOP_LINEARS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_IMAGE_LINEARS = {
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_IMAGE_BLOCK_LINEARS = {"cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj"}


def block_linears(config: WanConfig) -> dict[str, str]:
    """Original name → diffusers path of every linear inside the blocks."""
    names = {**_BLOCK_LINEARS, **(_IMAGE_BLOCK_LINEARS if config.image_dim is not None else {})}
    return {f"blocks.{i}.{o}": f"blocks.{i}.{d}" for i in range(config.num_layers) for o, d in names.items()}


def top_linears(config: WanConfig) -> dict[str, str]:
    """Original name → diffusers path of every linear outside the blocks."""
    return {**_TOP_LINEARS, **(_IMAGE_LINEARS if config.image_dim is not None else {})}


def seeded_model(config: WanConfig, seed: int = 0) -> WanTransformer3DModel:
    """A Wan model with seeded weights of a sane size (norm weights near 1)."""
    model = WanTransformer3DModel(config)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn(tensor.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.1 * values
        else:
            state[name] = values * (tensor[0].numel() ** -0.5 if tensor.ndim > 1 else 0.1)
    model.load_state_dict(state)
    return model.eval()


def inputs(config: WanConfig, seed: int = 1, text: int = 5) -> dict[str, Tensor]:
    """Seeded forward inputs: 2 frames of 4×4 latents (8 tokens), ``text`` text tokens, image tokens for I2V."""
    generator = torch.Generator().manual_seed(seed)
    found = {
        "hidden_states": torch.randn(1, config.in_channels, 2, 4, 4, generator=generator),
        "timestep": torch.tensor([411.0]),
        "encoder_hidden_states": torch.randn(1, text, config.text_dim, generator=generator),
    }
    if config.image_dim is not None:
        found["encoder_hidden_states_image"] = torch.randn(1, 3, config.image_dim, generator=generator)
    return found


def run(model: Any, config: WanConfig, **kwargs: Any) -> Tensor:
    """The model's prediction on ``inputs(config)``."""
    with torch.no_grad():
        out: Tensor = model(**inputs(config, **kwargs), return_dict=False)[0]
    return out


# --- LoRA files ---------------------------------------------------------------------------------

@attrs.define
class LoraFile:
    """A file's tensors and what loading it at adapter weight ``w`` must do to the model.

    ``deltas`` and ``bias_deltas`` scale with the adapter weight; ``patches`` (parameter →
    difference) are added in full whatever the weight.
    """

    tensors: dict[str, Tensor] = attrs.field(factory=dict)
    deltas: dict[str, Tensor] = attrs.field(factory=dict)
    bias_deltas: dict[str, Tensor] = attrs.field(factory=dict)
    patches: dict[str, Tensor] = attrs.field(factory=dict)

    def copy(self) -> dict[str, Tensor]:
        """The tensors, cloned (diffusers' Wan converter scales its input in place)."""
        return {k: v.clone() for k, v in self.tensors.items()}


def _shape(model: WanTransformer3DModel, path: str) -> tuple[int, int]:
    weight = model.get_parameter(f"{path}.weight")
    return weight.shape[0], weight.shape[1]


def lora_file(model: WanTransformer3DModel, names: dict[str, str], key: Callable[[str], str], *,
              down: str = "lora_down", up: str = "lora_up", rank: int = 4, alpha: float | None = 8.0,
              diff_b: bool = False, seed: int = 3) -> LoraFile:
    """A LoRA pair on each module of ``names`` (file name → model path), keyed ``key(name).<down>.weight``.

    With ``alpha`` the scale is ``alpha / rank``, else 1; ``diff_b`` adds a bias difference to
    every module, which scales with the adapter as the low-rank update does.
    """
    generator = torch.Generator().manual_seed(seed)
    file = LoraFile()
    for name, path in names.items():
        out_features, in_features = _shape(model, path)
        a = torch.randn(rank, in_features, generator=generator) * 0.1
        b = torch.randn(out_features, rank, generator=generator) * 0.1
        file.tensors[f"{key(name)}.{down}.weight"] = a
        file.tensors[f"{key(name)}.{up}.weight"] = b
        scale = 1.0
        if alpha is not None:
            file.tensors[f"{key(name)}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        file.deltas[path] = scale * (b.double() @ a.double())
        if diff_b:
            bias = torch.randn(out_features, generator=generator) * 0.1
            file.tensors[f"{key(name)}.diff_b"] = bias
            file.bias_deltas[path] = bias.double()
    return file


def lokr_file(model: WanTransformer3DModel, names: dict[str, str], key: Callable[[str], str], *,
              alpha: float = 2.0, seed: int = 4) -> LoraFile:
    """LyCORIS LoKr: ``w1`` full, ``w2`` as a rank-2 product, scale ``alpha / 2``."""
    generator = torch.Generator().manual_seed(seed)
    file = LoraFile()
    for name, path in names.items():
        out_features, in_features = _shape(model, path)
        w1 = torch.randn(2, 4, generator=generator) * 0.3
        w2_a = torch.randn(out_features // 2, 2, generator=generator) * 0.3
        w2_b = torch.randn(2, in_features // 4, generator=generator) * 0.3
        file.tensors.update({f"{key(name)}.lokr_w1": w1, f"{key(name)}.lokr_w2_a": w2_a,
                             f"{key(name)}.lokr_w2_b": w2_b, f"{key(name)}.alpha": torch.tensor(alpha)})
        file.deltas[path] = alpha / 2 * torch.kron(w1.double(), w2_a.double() @ w2_b.double())
    return file


def loha_file(model: WanTransformer3DModel, names: dict[str, str], key: Callable[[str], str], *,
              rank: int = 2, alpha: float = 3.0, seed: int = 5) -> LoraFile:
    """LyCORIS LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, scale ``alpha / rank``."""
    generator = torch.Generator().manual_seed(seed)
    file = LoraFile()
    for name, path in names.items():
        out_features, in_features = _shape(model, path)
        parts = {
            "hada_w1_a": torch.randn(out_features, rank, generator=generator) * 0.3,
            "hada_w1_b": torch.randn(rank, in_features, generator=generator) * 0.3,
            "hada_w2_a": torch.randn(out_features, rank, generator=generator) * 0.3,
            "hada_w2_b": torch.randn(rank, in_features, generator=generator) * 0.3,
        }
        file.tensors.update({f"{key(name)}.{role}": t for role, t in parts.items()})
        file.tensors[f"{key(name)}.alpha"] = torch.tensor(alpha)
        p = {role: t.double() for role, t in parts.items()}
        file.deltas[path] = alpha / rank * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    return file


def merged_state(model: WanTransformer3DModel, file: LoraFile, weight: float = 1.0) -> dict[str, Tensor]:
    """The model's state with the file's expected effect added in fp64, at this adapter weight."""
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for path, delta in file.deltas.items():
        merged[f"{path}.weight"] = (merged[f"{path}.weight"].double() + weight * delta).float()
    for path, delta in file.bias_deltas.items():
        merged[f"{path}.bias"] = (merged[f"{path}.bias"].double() + weight * delta).float()
    for name, delta in file.patches.items():
        merged[name] = (merged[name].double() + delta.double()).float()
    return merged


def reference(config: WanConfig, state: dict[str, Tensor]) -> WanTransformer3DModel:
    """A plain model (no adapters) holding ``state``."""
    model = WanTransformer3DModel(config)
    model.load_state_dict(state)
    return model.eval()


def plain_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict under plain parameter names: peft's ``base_layer`` looked through, adapter tensors left out."""
    state: dict[str, Tensor] = model.state_dict()
    adapter_parts = (".lora_", ".lokr_", ".hada_")
    return {k.replace(".base_layer", ""): v for k, v in state.items() if not any(p in k for p in adapter_parts)}
