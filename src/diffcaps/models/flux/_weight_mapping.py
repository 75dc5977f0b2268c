"""Flux's original single-file layout (Black Forest Labs' ``flux1-*.safetensors``), as data.

``FLUX_WEIGHTS`` is what ``FluxCapabilities.weight_mapping`` holds: the rename table, the
fused tensors that split (``qkv`` in three, single blocks' ``linear1`` into q, k, v and the
4× MLP), the output norm whose shift/scale halves swap, and the four variants. Every size
is read from the file — block counts, width, heads, text and pooled widths — so a Flux-layout
file of any depth or width maps.
"""

from __future__ import annotations

from typing import Final

from diffcaps.weights.spec import (
    SWAP_HALVES,
    BlockCount,
    ConfigReader,
    Const,
    Derived,
    Dim,
    DimIs,
    Has,
    Lacks,
    Present,
    Rule,
    Split,
    WeightMapper,
    WeightVariant,
)

__all__ = ["FLUX_WEIGHTS", "rope_axes"]

_QKV = Split(ratios=(1, 1, 1))
_QKV_MLP = Split(ratios=(1, 1, 1, 4))  # Flux's single blocks: q, k, v, then an MLP 4× the width

_RULES: Final = (
    Rule("time_in.in_layer.{p}", "time_text_embed.timestep_embedder.linear_1.{p}"),
    Rule("time_in.out_layer.{p}", "time_text_embed.timestep_embedder.linear_2.{p}"),
    Rule("vector_in.in_layer.{p}", "time_text_embed.text_embedder.linear_1.{p}"),
    Rule("vector_in.out_layer.{p}", "time_text_embed.text_embedder.linear_2.{p}"),
    Rule("guidance_in.in_layer.{p}", "time_text_embed.guidance_embedder.linear_1.{p}"),
    Rule("guidance_in.out_layer.{p}", "time_text_embed.guidance_embedder.linear_2.{p}"),
    Rule("txt_in.{p}", "context_embedder.{p}"),
    Rule("img_in.{p}", "x_embedder.{p}"),
    # double-stream blocks
    Rule("double_blocks.{n}.img_mod.lin.{p}", "transformer_blocks.{n}.norm1.linear.{p}"),
    Rule("double_blocks.{n}.txt_mod.lin.{p}", "transformer_blocks.{n}.norm1_context.linear.{p}"),
    Rule(
        "double_blocks.{n}.img_attn.qkv.{p}",
        ("transformer_blocks.{n}.attn.to_q.{p}", "transformer_blocks.{n}.attn.to_k.{p}",
         "transformer_blocks.{n}.attn.to_v.{p}"),
        _QKV,
    ),
    Rule(
        "double_blocks.{n}.txt_attn.qkv.{p}",
        ("transformer_blocks.{n}.attn.add_q_proj.{p}", "transformer_blocks.{n}.attn.add_k_proj.{p}",
         "transformer_blocks.{n}.attn.add_v_proj.{p}"),
        _QKV,
    ),
    Rule("double_blocks.{n}.img_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_q.weight"),
    Rule("double_blocks.{n}.img_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_k.weight"),
    Rule("double_blocks.{n}.txt_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_added_q.weight"),
    Rule("double_blocks.{n}.txt_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_added_k.weight"),
    Rule("double_blocks.{n}.img_attn.proj.{p}", "transformer_blocks.{n}.attn.to_out.0.{p}"),
    Rule("double_blocks.{n}.txt_attn.proj.{p}", "transformer_blocks.{n}.attn.to_add_out.{p}"),
    Rule("double_blocks.{n}.img_mlp.0.{p}", "transformer_blocks.{n}.ff.net.0.proj.{p}"),
    Rule("double_blocks.{n}.img_mlp.2.{p}", "transformer_blocks.{n}.ff.net.2.{p}"),
    Rule("double_blocks.{n}.txt_mlp.0.{p}", "transformer_blocks.{n}.ff_context.net.0.proj.{p}"),
    Rule("double_blocks.{n}.txt_mlp.2.{p}", "transformer_blocks.{n}.ff_context.net.2.{p}"),
    # single-stream blocks
    Rule("single_blocks.{n}.modulation.lin.{p}", "single_transformer_blocks.{n}.norm.linear.{p}"),
    Rule(
        "single_blocks.{n}.linear1.{p}",
        ("single_transformer_blocks.{n}.attn.to_q.{p}", "single_transformer_blocks.{n}.attn.to_k.{p}",
         "single_transformer_blocks.{n}.attn.to_v.{p}", "single_transformer_blocks.{n}.proj_mlp.{p}"),
        _QKV_MLP,
    ),
    Rule("single_blocks.{n}.linear2.{p}", "single_transformer_blocks.{n}.proj_out.{p}"),
    Rule("single_blocks.{n}.norm.query_norm.scale", "single_transformer_blocks.{n}.attn.norm_q.weight"),
    Rule("single_blocks.{n}.norm.key_norm.scale", "single_transformer_blocks.{n}.attn.norm_k.weight"),
    # output
    Rule("final_layer.linear.{p}", "proj_out.{p}"),
    # BFL stores (shift, scale); the model's AdaLayerNormContinuous reads (scale, shift)
    Rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", SWAP_HALVES),
)


def rope_axes(head_dim: int) -> tuple[int, ...]:
    """RoPE axes (t, h, w) for a head width: Flux's (16, 56, 56) at 128, in proportion elsewhere.

    RoPE has no weights, so a file cannot say; this keeps each axis even and the sum exact.
    """
    spatial = head_dim * 7 // 16 // 2 * 2
    return head_dim - 2 * spatial, spatial, spatial


def _heads(width: int, head_dim: int) -> int:
    if head_dim <= 0 or width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head width {head_dim}")
    return width // head_dim


def _out_channels(out_features: int, in_channels: int) -> int | None:
    return None if out_features == in_channels else out_features


_MARKER: Final = "double_blocks.0.img_attn.norm.key_norm.scale"
_GUIDANCE: Final = "guidance_in.in_layer.weight"
_HEAD_DIM: Final = Dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)
_IN_CHANNELS: Final = Dim("img_in.weight", 1)

_CONFIG: Final[dict[str, ConfigReader]] = {
    "patch_size": Const(1),
    "in_channels": _IN_CHANNELS,
    "out_channels": Derived(_out_channels, (Dim("final_layer.linear.weight", 0), _IN_CHANNELS)),
    "num_layers": BlockCount("double_blocks.{n}"),
    "num_single_layers": BlockCount("single_blocks.{n}"),
    "attention_head_dim": _HEAD_DIM,
    "num_attention_heads": Derived(_heads, (Dim("img_in.weight", 0), _HEAD_DIM)),
    "joint_attention_dim": Dim("txt_in.weight", 1),
    "pooled_projection_dim": Dim("vector_in.in_layer.weight", 1),
    "guidance_embeds": Present(_GUIDANCE),
    "axes_dims_rope": Derived(rope_axes, (_HEAD_DIM,)),
}

FLUX_WEIGHTS: Final = WeightMapper(
    family="Flux",
    rules=_RULES,
    prefixes=("model.diffusion_model.", "diffusion_model."),
    layer_counts={"double blocks": "num_layers", "single blocks": "num_single_layers"},
    tensor_classes=(
        ("modulation", ("_mod.", "modulation")),
        ("norms", ("norm", ".scale")),
        ("attention", ("attn",)),
        ("MLP", ("mlp", "linear1", "linear2")),
        ("embeddings", ("_in.",)),
        ("output", ("final_layer",)),
    ),
    variants=(
        WeightVariant(
            name="flux-dev",
            description="FLUX.1 [dev], guidance-distilled (also Kontext [dev])",
            conditions=(Has(_MARKER), Has(_GUIDANCE), DimIs("img_in.weight", 1, 64, "input channels")),
            config=_CONFIG,
        ),
        WeightVariant(
            name="flux-schnell",
            description="FLUX.1 [schnell], timestep-distilled, no guidance embedder",
            conditions=(Has(_MARKER), Lacks(_GUIDANCE), DimIs("img_in.weight", 1, 64, "input channels")),
            config=_CONFIG,
        ),
        WeightVariant(
            name="flux-fill",
            description="FLUX.1 Fill [dev], in/outpainting: image, mask and masked-image latents",
            conditions=(Has(_MARKER), DimIs("img_in.weight", 1, 384, "input channels")),
            config=_CONFIG,
        ),
        WeightVariant(
            name="flux-depth",
            description="FLUX.1 Depth [dev] (Canny [dev] has the same shapes): image and control latents",
            conditions=(Has(_MARKER), DimIs("img_in.weight", 1, 128, "input channels")),
            config=_CONFIG,
        ),
    ),
)
