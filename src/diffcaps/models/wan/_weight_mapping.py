"""Wan's original single-file layout (Wan-AI's ``diffusion_pytorch_model*.safetensors``, ComfyUI's repacks), as data.

``WAN_WEIGHTS`` is what ``WanCapabilities.weight_mapping`` holds: a rename table (Wan has
no fused tensors, so every rule renames one tensor), the prefixes ComfyUI and others add
(``model.diffusion_model.``, ``diffusion_model.``) and four variants. Depth, widths, patch
size and channels are read from the file's shapes; the head count cannot be (Wan's q/k norms
span all heads), so it follows Wan's one head width, :data:`HEAD_DIM`.

The original ``norm3`` is the cross-attention norm, diffusers' ``norm2``; the original
``norm2`` (before the feed-forward) has no weights, so it never appears in a file.
"""

from __future__ import annotations

from typing import Final

from diffcaps.weights.spec import (
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
    WeightMapper,
    WeightVariant,
)

__all__ = ["HEAD_DIM", "WAN_WEIGHTS", "attention_heads"]

HEAD_DIM: Final = 128
"""Every Wan release uses 128-wide heads: 1.3B 1536 = 12 × 128, TI2V-5B 3072 = 24 × 128, 14B 5120 = 40 × 128."""

_ATTN: Final = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                ("norm_k", "norm_k"))


def _block_rules() -> tuple[Rule, ...]:
    rules = [Rule("blocks.{n}.modulation", "blocks.{n}.scale_shift_table")]
    for original, model in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        rules += [Rule(f"blocks.{{n}}.{original}.{a}.{{p}}", f"blocks.{{n}}.{model}.{b}.{{p}}") for a, b in _ATTN]
    rules += [
        # Wan 2.1 I2V: keys and values of the CLIP image tokens
        Rule("blocks.{n}.cross_attn.k_img.{p}", "blocks.{n}.attn2.add_k_proj.{p}"),
        Rule("blocks.{n}.cross_attn.v_img.{p}", "blocks.{n}.attn2.add_v_proj.{p}"),
        Rule("blocks.{n}.cross_attn.norm_k_img.{p}", "blocks.{n}.attn2.norm_added_k.{p}"),
        Rule("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),
        Rule("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
        Rule("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
    ]
    return tuple(rules)


_RULES: Final = (
    Rule("patch_embedding.{p}", "patch_embedding.{p}"),
    Rule("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    Rule("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    Rule("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    Rule("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    Rule("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    # Wan 2.1 I2V / FLF2V: the CLIP image-token embedder (LayerNorm, Linear, GELU, Linear, LayerNorm)
    Rule("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    Rule("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    Rule("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    Rule("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
    Rule("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    *_block_rules(),
    Rule("head.head.{p}", "proj_out.{p}"),
    Rule("head.modulation", "scale_shift_table"),
)


def attention_heads(width: int) -> int:
    """The head count of a Wan model ``width`` wide: ``width / HEAD_DIM`` (``ValueError`` if not whole)."""
    if width % HEAD_DIM:
        raise ValueError(f"width {width} is not a multiple of Wan's head width {HEAD_DIM}")
    return width // HEAD_DIM


def _patch(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return frames, height, width


def _out_channels(rows: int, frames: int, height: int, width: int) -> int:
    cells = frames * height * width
    if rows % cells:
        raise ValueError(f"head.head has {rows} rows, not a multiple of the patch volume {cells}")
    return rows // cells


def _qk_norm(present: bool) -> str | None:
    return "rms_norm_across_heads" if present else None


_PATCH: Final = "patch_embedding.weight"
_WIDTH: Final = Dim(_PATCH, 0)
_PATCH_DIMS: Final = (Dim(_PATCH, 2), Dim(_PATCH, 3), Dim(_PATCH, 4))
_IMAGE: Final = "img_emb.proj.1.weight"
_IMAGE_POSITIONS: Final = "img_emb.emb_pos"
_MARKER: Final = "head.modulation"

_CONFIG: Final[dict[str, ConfigReader]] = {
    "patch_size": Derived(_patch, _PATCH_DIMS),
    "num_attention_heads": Derived(attention_heads, (_WIDTH,)),
    "attention_head_dim": Const(HEAD_DIM),
    "in_channels": Dim(_PATCH, 1),
    "out_channels": Derived(_out_channels, (Dim("head.head.weight", 0), *_PATCH_DIMS)),
    "text_dim": Dim("text_embedding.0.weight", 1),
    "freq_dim": Dim("time_embedding.0.weight", 1),
    "ffn_dim": Dim("blocks.0.ffn.0.weight", 0),
    "num_layers": BlockCount("blocks.{n}"),
    "cross_attn_norm": Present("blocks.0.norm3.weight"),
    "qk_norm": Derived(_qk_norm, (Present("blocks.0.self_attn.norm_q.weight"),)),
    "eps": Const(1e-6),
    "image_dim": Const(None),
    "added_kv_proj_dim": Const(None),
    "rope_max_seq_len": Const(1024),
    "pos_embed_seq_len": Const(None),
}
_I2V_CONFIG: Final[dict[str, ConfigReader]] = {
    **_CONFIG,
    "image_dim": Dim(_IMAGE, 1),
    "added_kv_proj_dim": Dim("blocks.0.cross_attn.k_img.weight", 1),
}
_FLF2V_CONFIG: Final[dict[str, ConfigReader]] = {**_I2V_CONFIG, "pos_embed_seq_len": Dim(_IMAGE_POSITIONS, 1)}

_VARIANT_DOC: Final = " The head count is the width over Wan's head width of 128 (a width that is not a multiple is an error)."

WAN_WEIGHTS: Final = WeightMapper(
    family="Wan",
    rules=_RULES,
    prefixes=("model.diffusion_model.", "diffusion_model."),
    layer_counts={"blocks": "num_layers"},
    tensor_classes=(
        ("modulation", ("modulation",)),
        ("norms", ("norm",)),
        ("attention", ("attn",)),
        ("MLP", ("ffn",)),
        ("embeddings", ("embedding", "time_projection", "img_emb")),
        ("output", ("head.",)),
    ),
    variants=(
        WeightVariant(
            name="wan-flf2v",
            description="Wan 2.1 FLF2V 14B: I2V with positions for the first and last frames' image tokens."
                        + _VARIANT_DOC,
            conditions=(Has(_MARKER), Has(_IMAGE), Has(_IMAGE_POSITIONS)),
            config=_FLF2V_CONFIG,
        ),
        WeightVariant(
            name="wan-i2v",
            description="Wan 2.1 I2V 14B (480p/720p): CLIP image tokens through img_emb and k_img/v_img."
                        + _VARIANT_DOC,
            conditions=(Has(_MARKER), Has(_IMAGE), Lacks(_IMAGE_POSITIONS)),
            config=_I2V_CONFIG,
        ),
        WeightVariant(
            name="wan-ti2v",
            description="Wan 2.2 TI2V 5B: text and image to video on 48-channel latents, per-token timesteps."
                        + _VARIANT_DOC,
            conditions=(Has(_MARKER), Lacks(_IMAGE), DimIs(_PATCH, 1, 48, "input channels")),
            config=_CONFIG,
        ),
        WeightVariant(
            name="wan-i2v-a14b",
            description="Wan 2.2 I2V A14B expert (high or low noise): image latents concatenated, no CLIP tokens."
                        + _VARIANT_DOC,
            conditions=(Has(_MARKER), Lacks(_IMAGE), DimIs(_PATCH, 1, 36, "input channels")),
            config=_CONFIG,
        ),
        WeightVariant(
            name="wan-t2v",
            description="Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 T2V A14B experts: text to video on 16-channel latents."
                        + _VARIANT_DOC,
            conditions=(Has(_MARKER), Lacks(_IMAGE), DimIs(_PATCH, 1, 16, "input channels")),
            config=_CONFIG,
        ),
    ),
)
