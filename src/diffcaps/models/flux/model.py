"""``FluxTransformer2DModel``: the Flux denoiser, with the state-dict names diffusers uses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, final, overload

import attrs
import torch
from torch import Tensor, nn

from diffcaps.attention.spec import AttentionSupport
from diffcaps.cache.spec import CacheSupport
from diffcaps.capabilities import Capabilities, capability
from diffcaps.casting.spec import LayerwiseCasting
from diffcaps.checkpointing.spec import GradientCheckpointing
from diffcaps.errors import InputError
from diffcaps.layers import AdaLayerNormContinuous, RotaryEmbedding
from diffcaps.lora.spec import LoRAService
from diffcaps.model import Model
from diffcaps.models.flux._attention import FLUX_QKV_FUSION, FluxAttention
from diffcaps.models.flux._blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from diffcaps.models.flux._cache import FLUX_CACHE
from diffcaps.models.flux._config import FluxConfig
from diffcaps.models.flux._context_parallel import FLUX_CONTEXT_PARALLEL
from diffcaps.models.flux._embeddings import TimeTextEmbedding
from diffcaps.models.flux._lora import FLUX_LORA
from diffcaps.models.flux._ip_adapter import FLUX_IP_ADAPTER, FluxIPAdapter
from diffcaps.models.flux._weight_mapping import FLUX_WEIGHTS
from diffcaps.offload.spec import GroupOffloading
from diffcaps.parallel.spec import ContextParallelPlan
from diffcaps.quantization.spec import QuantizationSupport
from diffcaps.services import ModuleNames, ModuleTypes
from diffcaps.weights.spec import WeightMapper

__all__ = ["FluxCapabilities", "FluxOutput", "FluxTransformer2DModel"]

FLUX_BLOCKS = ModuleTypes((FluxTransformerBlock, FluxSingleTransformerBlock))


@final
@attrs.frozen(kw_only=True)
class FluxCapabilities(Capabilities):
    """Everything Flux declares."""

    gradient_checkpointing: GradientCheckpointing = capability(GradientCheckpointing(blocks=FLUX_BLOCKS))
    group_offloading: GroupOffloading = capability(
        GroupOffloading(block_lists=("transformer_blocks", "single_transformer_blocks"))
    )
    no_split_modules: ModuleTypes = capability(FLUX_BLOCKS)
    layerwise_casting: LayerwiseCasting = capability(LayerwiseCasting(skip_patterns=("pos_embed", "norm")))
    repeated_blocks: ModuleTypes = capability(FLUX_BLOCKS)
    context_parallel: ContextParallelPlan = capability(FLUX_CONTEXT_PARALLEL)
    weight_mapping: WeightMapper = capability(FLUX_WEIGHTS)
    lora: LoRAService = capability(FLUX_LORA)
    quantization: QuantizationSupport = capability(
        QuantizationSupport(keep=ModuleNames(("x_embedder", "context_embedder", "time_text_embed", "norm_out")))
    )
    cache: CacheSupport = capability(FLUX_CACHE)
    ip_adapter: FluxIPAdapter = capability(FLUX_IP_ADAPTER)
    attention: AttentionSupport = capability(
        AttentionSupport(modules=ModuleTypes((FluxAttention,)), qkv_fusion=FLUX_QKV_FUSION)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class FluxOutput:
    """The model's output: ``sample`` has the input's shape with ``out_channels`` features.

    (A dataclass rather than attrs: ``torch.compile`` traces dataclass construction.)
    """

    sample: Tensor


def _shown(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return f"{value!r:.60} ({type(value).__name__})"


def _expect(ok: bool, name: str, expected: str, value: object) -> None:
    # Callers pass shape and dtype comparisons only; the message is built when one fails.
    if not ok:
        raise InputError(f"forward argument {name!r}: expected {expected}, got {_shown(value)}")


def _check_inputs(config: FluxConfig, hidden_states: object, encoder_hidden_states: object,
                  pooled_projections: object, timestep: object, img_ids: object, txt_ids: object,
                  guidance: object) -> None:
    """Refuse arguments whose shape or dtype the model cannot take, naming the argument.

    The conditioning vectors (pooled text, timestep, guidance) may have batch 1: they broadcast.
    """
    tensor = "a float tensor"
    x = hidden_states
    _expect(isinstance(x, Tensor) and x.is_floating_point() and x.ndim == 3 and x.shape[2] == config.in_channels,
            "hidden_states", f"{tensor} [batch, image_tokens, {config.in_channels}]", x)
    assert isinstance(x, Tensor)
    batch, image_tokens = x.shape[0], x.shape[1]
    sizes = f"batch 1 or {batch}"
    e = encoder_hidden_states
    _expect(isinstance(e, Tensor) and e.is_floating_point() and e.ndim == 3
            and e.shape[2] == config.joint_attention_dim and e.shape[0] == batch,
            "encoder_hidden_states", f"{tensor} [{batch}, text_tokens, {config.joint_attention_dim}]", e)
    assert isinstance(e, Tensor)
    p = pooled_projections
    _expect(isinstance(p, Tensor) and p.is_floating_point() and p.ndim == 2
            and p.shape[1] == config.pooled_projection_dim and p.shape[0] in (1, batch),
            "pooled_projections", f"{tensor} [batch, {config.pooled_projection_dim}] ({sizes})", p)
    steps: list[tuple[str, object]] = [("timestep", timestep)]
    if config.guidance_embeds:
        _expect(guidance is not None, "guidance", "a tensor [batch] (this model embeds guidance)", guidance)
        steps.append(("guidance", guidance))
    for name, t in steps:
        _expect(isinstance(t, Tensor) and not t.is_complex() and t.dtype != torch.bool and t.ndim == 1
                and t.shape[0] in (1, batch), name, f"a real tensor [batch] ({sizes})", t)
    for name, ids, tokens, stream in (("img_ids", img_ids, image_tokens, "hidden_states"),
                                      ("txt_ids", txt_ids, e.shape[1], "encoder_hidden_states")):
        _expect(isinstance(ids, Tensor) and ids.ndim in (2, 3) and ids.shape[-1] == 3 and ids.shape[-2] == tokens,
                name, f"a tensor [{tokens}, 3] (one (t, h, w) id per token of {stream})", ids)


def _residual_index(index: int, count: int, samples: int, repeat: bool) -> int:
    if repeat:
        return index % samples
    return index // math.ceil(count / samples)


@final
class FluxTransformer2DModel(Model[FluxConfig, FluxCapabilities]):
    """The Flux transformer: 2-D RoPE, double-stream then single-stream blocks, AdaLN output."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__(config)
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.out_channels = config.output_channels
        self.inner_dim = dim
        self.pos_embed = RotaryEmbedding(config.axes_dims_rope)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, guidance=config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * self.out_channels)

    @overload
    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None,
                controlnet_block_samples: list[Tensor] | None = None,
                controlnet_single_block_samples: list[Tensor] | None = None,
                return_dict: Literal[True] = True, controlnet_blocks_repeat: bool = False) -> FluxOutput: ...

    @overload
    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None,
                controlnet_block_samples: list[Tensor] | None = None,
                controlnet_single_block_samples: list[Tensor] | None = None,
                *, return_dict: Literal[False], controlnet_blocks_repeat: bool = False) -> tuple[Tensor]: ...

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[Tensor] | None = None,
        controlnet_single_block_samples: list[Tensor] | None = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> FluxOutput | tuple[Tensor]:
        """Predict the flow for packed latents ``hidden_states`` [batch, image_tokens, in_channels].

        ``timestep`` and ``guidance`` are in [0, 1] and scaled by 1000 here; ``img_ids`` and
        ``txt_ids`` are 2-D [tokens, 3] position ids (a leading batch dim is dropped). With
        IP-Adapters loaded (:mod:`diffcaps.ip_adapter`), ``joint_attention_kwargs`` carries
        ``ip_adapter_image_embeds``: one image embedding tensor per adapter, in load order.
        """
        _check_inputs(self.config, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                      img_ids, txt_ids, guidance)
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb: Tensor = self.time_text_embed(timestep, guidance, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)

        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary: tuple[Tensor, Tensor] = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        # A feature may attach ``encoder_hid_proj`` (IP-Adapter does): it rewrites the attention
        # kwargs, e.g. projecting ``ip_adapter_image_embeds`` into image tokens, once per forward.
        kwargs_projection: nn.Module | None = getattr(self, "encoder_hid_proj", None)
        if kwargs_projection is not None:
            joint_attention_kwargs = kwargs_projection(joint_attention_kwargs)
        elif joint_attention_kwargs:
            raise InputError(
                f"forward argument 'joint_attention_kwargs' {sorted(joint_attention_kwargs)} was passed, but "
                "nothing loaded in this model reads them: load an IP-Adapter first (diffcaps.ip_adapter.load) for "
                "'ip_adapter_image_embeds'; LoRA weights are set with diffcaps.lora.set_adapters, not 'scale'"
            )

        double_count = len(self.transformer_blocks)
        for index, block in enumerate(self.transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, temb, rotary, joint_attention_kwargs
            )
            if controlnet_block_samples:
                at = _residual_index(index, double_count, len(controlnet_block_samples), controlnet_blocks_repeat)
                hidden_states = hidden_states + controlnet_block_samples[at]

        single_count = len(self.single_transformer_blocks)
        for index, block in enumerate(self.single_transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, temb, rotary, joint_attention_kwargs
            )
            if controlnet_single_block_samples:
                at = _residual_index(index, single_count, len(controlnet_single_block_samples), False)
                hidden_states = hidden_states + controlnet_single_block_samples[at]

        output: Tensor = self.proj_out(self.norm_out(hidden_states, temb))
        return FluxOutput(sample=output) if return_dict else (output,)
