"""``WanTransformer3DModel``: the Wan 2.1 / 2.2 video denoiser, with the state-dict names diffusers uses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, final, overload

import attrs
import torch
from torch import Tensor, nn

from diffcaps.attention.spec import AttentionSupport
from diffcaps.cache.spec import CacheSupport
from diffcaps.capabilities import Capabilities, capability
from diffcaps.casting.spec import LayerwiseCasting
from diffcaps.checkpointing.spec import GradientCheckpointing
from diffcaps.errors import InputError
from diffcaps.layers import FP32LayerNorm, modulate, modulation_table, table_modulation
from diffcaps.lora.spec import LoRAService
from diffcaps.model import Model
from diffcaps.models.wan._attention import WAN_QKV_FUSION, WanCrossAttention, WanSelfAttention
from diffcaps.models.wan._blocks import MODULATIONS, WanTransformerBlock
from diffcaps.models.wan._cache import WAN_CACHE
from diffcaps.models.wan._config import WanConfig
from diffcaps.models.wan._context_parallel import WAN_CONTEXT_PARALLEL
from diffcaps.models.wan._embeddings import WanRotaryEmbedding, WanTimeTextImageEmbedding
from diffcaps.models.wan._lora import WAN_LORA
from diffcaps.models.wan._weight_mapping import WAN_WEIGHTS
from diffcaps.offload.spec import GroupOffloading
from diffcaps.parallel.spec import ContextParallelPlan
from diffcaps.quantization.spec import QuantizationSupport
from diffcaps.services import ModuleNames, ModuleTypes
from diffcaps.weights.spec import WeightMapper

__all__ = ["WanCapabilities", "WanOutput", "WanTransformer3DModel"]

WAN_BLOCKS = ModuleTypes((WanTransformerBlock,))


@final
@attrs.frozen(kw_only=True)
class WanCapabilities(Capabilities):
    """Everything Wan declares."""

    gradient_checkpointing: GradientCheckpointing = capability(GradientCheckpointing(blocks=WAN_BLOCKS))
    group_offloading: GroupOffloading = capability(GroupOffloading(block_lists=("blocks",)))
    no_split_modules: ModuleTypes = capability(WAN_BLOCKS)
    layerwise_casting: LayerwiseCasting = capability(
        LayerwiseCasting(skip_patterns=("patch_embedding", "condition_embedder", "norm"))
    )
    keep_in_fp32: ModuleNames = capability(
        ModuleNames(("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"))
    )
    repeated_blocks: ModuleTypes = capability(WAN_BLOCKS)
    context_parallel: ContextParallelPlan = capability(WAN_CONTEXT_PARALLEL)
    cache: CacheSupport = capability(WAN_CACHE)
    attention: AttentionSupport = capability(
        AttentionSupport(modules=ModuleTypes((WanSelfAttention, WanCrossAttention)), qkv_fusion=WAN_QKV_FUSION)
    )
    weight_mapping: WeightMapper = capability(WAN_WEIGHTS)
    lora: LoRAService = capability(WAN_LORA)
    quantization: QuantizationSupport = capability(
        QuantizationSupport(keep=ModuleNames(("patch_embedding", "condition_embedder", "norm_out", "proj_out")))
    )


@dataclasses.dataclass(frozen=True, slots=True)
class WanOutput:
    """The model's output: ``sample`` is [batch, out_channels, frames, height, width].

    (A dataclass rather than attrs: ``torch.compile`` traces dataclass construction.)
    """

    sample: Tensor


@final
class WanTransformer3DModel(Model[WanConfig, WanCapabilities]):
    """The Wan transformer: Conv3d patches, 3-D RoPE, one list of self/cross-attention blocks.

    One class for every Wan 2.1 / 2.2 transformer: text-to-video, image-to-video (an image
    embedder and ``add_k_proj``/``add_v_proj`` in each cross-attention), TI2V (per-token
    timesteps) and the A14B experts (two models of this class).
    """

    unused_tensors: ClassVar[ModuleNames | None] = ModuleNames(("norm_added_q",))
    """Folders saved by older diffusers hold an image-to-video query norm that was never used."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__(config)
        dim = config.inner_dim
        self.rope = WanRotaryEmbedding(config.rope_axes, config.patch_size, config.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim, config.freq_dim, config.text_dim, config.image_dim, config.pos_embed_seq_len, MODULATIONS
        )
        self.blocks = nn.ModuleList(
            WanTransformerBlock(dim, config.ffn_dim, config.num_attention_heads, cross_attn_norm=config.cross_attn_norm,
                                eps=config.eps, added_kv_proj_dim=config.added_kv_proj_dim)
            for _ in range(config.num_layers)
        )
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.output_channels * math.prod(config.patch_size))
        self.scale_shift_table = modulation_table(2, dim)

    @overload
    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None, return_dict: Literal[True] = True,
                attention_kwargs: dict[str, Any] | None = None) -> WanOutput: ...

    @overload
    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None, *, return_dict: Literal[False],
                attention_kwargs: dict[str, Any] | None = None) -> tuple[Tensor]: ...

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> WanOutput | tuple[Tensor]:
        """Predict the flow for video latents ``hidden_states`` [batch, in_channels, frames, height, width].

        ``timestep`` is [batch], or [batch, tokens] for per-token timesteps (Wan 2.2 TI2V; one
        per patch, in token order). ``encoder_hidden_states`` are the text encoder's tokens
        [batch, text, text_dim], of any length (diffusers requires 512 when an image is
        given; diffcaps takes the image tokens separately and does not). ``encoder_hidden_states_image``
        are the image encoder's tokens [batch, image, image_dim] for an image-to-video model.
        ``attention_kwargs`` must be empty: LoRA weights are set with ``diffcaps.lora.set_adapters``.
        """
        if attention_kwargs:
            raise InputError(f"attention_kwargs {sorted(attention_kwargs)} were passed, but nothing in this model "
                            "reads them; LoRA weights are set with diffcaps.lora.set_adapters, not 'scale'")
        if hidden_states.ndim != 5:
            raise InputError(f"hidden_states must be [batch, channels, frames, height, width], "
                             f"got {list(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        patch = self.config.patch_size
        grid = [size // p for size, p in zip(hidden_states.shape[2:], patch)]
        rotary: tuple[Tensor, Tensor] = self.rope(hidden_states)
        tokens: Tensor = self.patch_embedding(hidden_states)
        hidden_states = tokens.flatten(2).transpose(1, 2).contiguous()
        if timestep.ndim == 2 and timestep.shape[1] != hidden_states.shape[1]:
            raise InputError(f"per-token timestep has {timestep.shape[1]} entries per sample, the latents "
                             f"have {hidden_states.shape[1]} tokens")
        temb, projected, text, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        projected = projected.reshape(*projected.shape[:-1], MODULATIONS, -1)
        if image is not None:
            # Views of one [image; text] tensor, the layout diffusers uses: a low-precision matmul
            # rounds differently on a strided input, so this keeps bf16 outputs bit-equal to it.
            context = torch.cat([image, text], dim=1)
            image, text = context[:, : image.shape[1]], context[:, image.shape[1]:]
        for block in self.blocks:
            hidden_states = block(hidden_states, text, projected, rotary, image)

        shift, scale = table_modulation(self.scale_shift_table, temb.unsqueeze(-2))
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = modulate(self.norm_out(hidden_states.float()), shift, scale).type_as(hidden_states)
        out: Tensor = self.proj_out(hidden_states)
        frames, height, width = grid
        out = out.reshape(batch, frames, height, width, *patch, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        sample = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return WanOutput(sample=sample) if return_dict else (sample,)
