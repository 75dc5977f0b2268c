"""Tiny seeded diffusers pipeline folders built offline: the demo's and the tests' pipelines.

Every component is a small randomly initialised model seeded from ``seed`` (CLIP and T5 text
encoders, a 2-level VAE, a word-level tokenizer over a fixed vocabulary), so a folder is the
same on every machine and no download is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.wan import WanConfig, WanTransformer3DModel

__all__ = [
    "TINY_FLUX_CONFIG",
    "TINY_VOCABULARY",
    "TINY_WAN_I2V_CONFIG",
    "TINY_WAN_T2V_CONFIG",
    "tiny_flux_pipeline_folder",
    "tiny_tokenizer",
    "tiny_wan_pipeline_folder",
]

TINY_VOCABULARY: tuple[str, ...] = (
    "[PAD]", "[UNK]", "</s>", "<s>",
    *"a an the of in on with and photo painting picture drawing cat dog bird fish red blue green "
     "yellow black white house tree sky sea mountain city street forest small big old new".split(),
)
"""The words the tiny tokenizers know (anything else is ``[UNK]``)."""

TINY_FLUX_CONFIG = FluxConfig(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    in_channels=16,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
"""A FLUX.1-dev-shaped transformer, 32 wide, sized to the tiny text encoders (T5 width 32,
CLIP width 32) and VAE (4 latent channels, packed 2×2 into 16)."""


def tiny_tokenizer(max_length: int) -> Any:
    """A word-level fast tokenizer over :data:`TINY_VOCABULARY` (``transformers`` object)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_VOCABULARY)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    options: dict[str, Any] = {"tokenizer_object": tokenizer, "pad_token": "[PAD]", "unk_token": "[UNK]",
                               "eos_token": "</s>", "bos_token": "<s>", "model_max_length": max_length}
    fast: Any = PreTrainedTokenizerFast
    return fast(**options)


def _text_encoders(width: int, pooled: int) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocabulary = len(TINY_VOCABULARY)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=pooled, intermediate_size=2 * pooled, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=vocabulary, max_position_embeddings=77, projection_dim=pooled,
        pad_token_id=0, eos_token_id=2, bos_token_id=3,
    ))
    t5_options: dict[str, Any] = {
        "d_model": width, "d_ff": 2 * width, "num_layers": 2, "num_heads": 2, "d_kv": width // 2,
        "vocab_size": vocabulary, "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0,
    }
    t5: Any = T5EncoderModel(T5Config(**t5_options))
    clip_model: Any = clip
    return clip_model.eval(), t5.eval()


def _vae(latent_channels: int) -> Any:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    options: dict[str, Any] = {
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels, "block_out_channels": (16, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1, "norm_num_groups": 8, "use_quant_conv": False, "use_post_quant_conv": False,
        "shift_factor": 0.0609, "scaling_factor": 1.5035,
    }
    return AutoencoderKL(**options).eval()


def _flow_scheduler() -> Any:
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def tiny_flux_pipeline_folder(path: str | os.PathLike[str], *, config: FluxConfig = TINY_FLUX_CONFIG,
                              seed: int = 0, text_tokens: int = 32) -> Path:
    """Write a ``FluxPipeline`` folder with seeded tiny components; returns its path.

    The transformer is a diffcaps model saved in diffusers' layout, so diffusers' own
    ``FluxTransformer2DModel`` loads it too. ``text_tokens`` is the T5 tokenizer's length
    (pass it as ``max_sequence_length`` when generating). Needs diffusers and transformers.
    """
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    packed = config.out_channels or config.in_channels
    if packed % 4:
        raise ValueError(f"out_channels (else in_channels) must be 4 × the VAE's latent channels, got {packed}")
    torch.manual_seed(seed)
    clip, t5 = _text_encoders(config.joint_attention_dim, config.pooled_projection_dim)
    vae = _vae(packed // 4)
    transformer = FluxTransformer2DModel.from_config(config).eval()
    folder = Path(path)
    pipeline = FluxPipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=clip, tokenizer=tiny_tokenizer(77),
        text_encoder_2=t5, tokenizer_2=tiny_tokenizer(text_tokens),
        transformer=None,  # pyright: ignore[reportArgumentType]
    )
    _save_without_transformer(pipeline, folder)
    transformer.save_pretrained(folder / "transformer")
    _name_transformer(folder, "FluxTransformer2DModel")
    return folder


_WAN_LATENT_CHANNELS = 4
_WAN_TEXT_WIDTH = 16
_WAN_IMAGE_WIDTH = 20

TINY_WAN_T2V_CONFIG = WanConfig(
    num_attention_heads=2, attention_head_dim=12, in_channels=_WAN_LATENT_CHANNELS,
    out_channels=_WAN_LATENT_CHANNELS, text_dim=_WAN_TEXT_WIDTH, freq_dim=32, ffn_dim=40, num_layers=2,
    rope_max_seq_len=32,
)
"""A Wan 2.1 text-to-video transformer, 24 wide, sized to the tiny UMT5 (width 16) and Wan VAE
(4 latent channels, 8× spatial and 4× temporal compression)."""

TINY_WAN_I2V_CONFIG = attrs.evolve(
    TINY_WAN_T2V_CONFIG, in_channels=2 * _WAN_LATENT_CHANNELS + 4, image_dim=_WAN_IMAGE_WIDTH,
    added_kv_proj_dim=24,
)
"""The image-to-video twin: latents, a 4-channel first-frame mask and the image's latents in;
CLIP vision tokens (width 20) through the added key/value projections."""


def _umt5(width: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    options: dict[str, Any] = {
        "d_model": width, "d_ff": 2 * width, "num_layers": 2, "num_heads": 2, "d_kv": width // 2,
        "vocab_size": len(TINY_VOCABULARY), "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0,
    }
    encoder: Any = UMT5EncoderModel(UMT5Config(**options))
    return encoder.eval()


def _wan_vae(latent_channels: int) -> Any:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    options: dict[str, Any] = {
        "base_dim": 3, "z_dim": latent_channels, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": [0.1 * i for i in range(latent_channels)],
        "latents_std": [1.0 + 0.1 * i for i in range(latent_channels)],
    }
    return AutoencoderKLWan(**options).eval()


def _clip_vision(width: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder: Any = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
        image_size=32, patch_size=8, projection_dim=width,
    ))
    processor: Any = CLIPImageProcessor(crop_size=32, size=32)
    return encoder.eval(), processor


def tiny_wan_pipeline_folder(path: str | os.PathLike[str], *, image_to_video: bool = False,
                             seed: int = 0, text_tokens: int = 512) -> Path:
    """Write a ``WanPipeline`` folder (``image_to_video``: ``WanImageToVideoPipeline``) with seeded tiny components.

    The transformer is a diffcaps Wan (:data:`TINY_WAN_T2V_CONFIG` or :data:`TINY_WAN_I2V_CONFIG`)
    saved in diffusers' layout; the text encoder a 2-layer UMT5, the VAE a 4-channel Wan VAE
    (sizes multiples of 16, frames 4k+1), and for image-to-video a 2-layer CLIP vision encoder
    on 32×32 crops. ``text_tokens`` is the tokenizer's length (diffusers' Wan image-to-video
    attention needs 512). Needs diffusers and transformers.
    """
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    config = TINY_WAN_I2V_CONFIG if image_to_video else TINY_WAN_T2V_CONFIG
    parts: dict[str, Any] = {
        "tokenizer": tiny_tokenizer(text_tokens), "text_encoder": _umt5(_WAN_TEXT_WIDTH),
        "vae": _wan_vae(_WAN_LATENT_CHANNELS), "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
    if image_to_video:
        parts["image_encoder"], parts["image_processor"] = _clip_vision(_WAN_IMAGE_WIDTH)
    transformer = WanTransformer3DModel.from_config(config).eval()
    pipeline_class: Any = WanImageToVideoPipeline if image_to_video else WanPipeline
    folder = Path(path)
    _save_without_transformer(pipeline_class(transformer=None, **parts), folder)
    transformer.save_pretrained(folder / "transformer")
    _name_transformer(folder, "WanTransformer3DModel")
    return folder


def _save_without_transformer(pipeline: Any, folder: Path) -> None:
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that the (absent) transformer is not saved
    try:
        pipeline.save_pretrained(folder)
    finally:
        logging.set_verbosity(level)


def _name_transformer(folder: Path, class_name: str) -> None:
    import json

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
