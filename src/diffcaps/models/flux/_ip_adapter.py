"""IP-Adapter for Flux, read from the XLabs (x-flux) file layout.

An XLabs file holds an image projection — ``ip_adapter_proj_model.proj`` and ``.norm`` (or the
same under ``image_proj.``) — that turns a CLIP image embedding into ``tokens`` tokens, and,
for every double block N, ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj``,
which map those tokens to that block's image-prompt keys and values. The block's image query
(after ``norm_q``, before RoPE) attends to them; the result times the adapter's scale is
added to the image stream after the block's feed-forward. Single blocks take no image prompt.

Loaded, the adapters become submodules of the model instance, named as diffusers names them,
so a state dict with adapters loaded has diffusers' keys:

- ``encoder_hid_proj`` (:class:`ImagePromptProjections`): ``image_projection_layers.i``, one
  :class:`ImageProjection` per adapter in load order. The model hands it the joint attention
  kwargs; it turns ``ip_adapter_image_embeds`` into ``ip_hidden_states``.
- ``transformer_blocks.N.attn.processor`` (:class:`ImagePromptAttention`): ``to_k_ip.i``,
  ``to_v_ip.i`` and each adapter's scale in that block.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.errors import CheckpointError, FormatError, IPAdapterError, ShapeError
from diffcaps.layers import attention as attend
from diffcaps.models.flux._attention import PROCESSOR, FluxAttention

__all__ = [
    "FLUX_IP_ADAPTER",
    "FluxIPAdapter",
    "ImageProjection",
    "ImagePromptAttention",
    "ImagePromptProjections",
    "XLabsIPAdapter",
    "read_xlabs",
]

IMAGE_EMBEDS: Final = "ip_adapter_image_embeds"
"""The joint attention kwarg carrying one image embedding tensor per adapter (diffusers' name)."""
IP_HIDDEN_STATES: Final = "ip_hidden_states"
"""The kwarg the double blocks' image-prompt attention reads: the projected image tokens."""
PROJECTION_SLOT: Final = "encoder_hid_proj"
"""The model attribute holding the image projections (the name the Flux forward looks up)."""

PROJECTION_PREFIXES: Final = ("ip_adapter_proj_model.", "image_proj.")
PROJECTION_KEYS: Final = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_BLOCK_KEY: Final = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")
_BLOCK_PARTS: Final = ("k.weight", "k.bias", "v.weight", "v.bias")


def _block_key(index: int, part: str) -> str:
    kind, param = part.split(".")
    return f"double_blocks.{index}.processor.ip_adapter_double_stream_{kind}_proj.{param}"


@attrs.frozen
class XLabsIPAdapter:
    """The tensors of an XLabs Flux IP-Adapter file, sorted into the projection and the blocks."""

    source: str
    prefix: str
    projection: Mapping[str, Tensor]
    """``proj.weight``, ``proj.bias``, ``norm.weight``, ``norm.bias``."""
    blocks: Mapping[int, Mapping[str, Tensor]]
    """Double-block index → ``k.weight``, ``k.bias``, ``v.weight``, ``v.bias``."""

    @property
    def width(self) -> int:
        """The width of the image tokens (the projection's norm size)."""
        return self.projection["norm.weight"].shape[0]

    @property
    def embed_dim(self) -> int:
        """The image embedding size the projection takes."""
        return self.projection["proj.weight"].shape[1]

    @property
    def tokens(self) -> int:
        """How many image tokens one embedding becomes."""
        return self.projection["proj.weight"].shape[0] // self.width

    def key(self, name: str) -> str:
        """The file's key for a projection tensor."""
        return self.prefix + name


def read_xlabs(tensors: Mapping[str, Tensor], source: str) -> XLabsIPAdapter:
    """Sort a file's tensors into an :class:`XLabsIPAdapter`; keys outside the layout are an error."""
    prefixes = [p for p in PROJECTION_PREFIXES if any(key.startswith(p) for key in tensors)]
    matches = {key: match for key in tensors if (match := _BLOCK_KEY.fullmatch(key))}
    if not prefixes and not matches:
        shown = ", ".join(sorted(tensors)[:5]) or "no tensors"
        raise FormatError(
            f"{source}: not an XLabs Flux IP-Adapter: expected {PROJECTION_PREFIXES[0]}proj.weight (or "
            f"{PROJECTION_PREFIXES[1]}proj.weight) and double_blocks.N.processor."
            f"ip_adapter_double_stream_{{k,v}}_proj.{{weight,bias}} keys, found {shown}"
        )
    if len(prefixes) > 1:
        raise CheckpointError(f"holds two image projections ({' and '.join(p + '*' for p in prefixes)}); "
                              "expected one", path=source)
    prefix = prefixes[0] if prefixes else PROJECTION_PREFIXES[0]
    projection_keys = {prefix + name for name in PROJECTION_KEYS}
    unexpected = [key for key in tensors if key not in projection_keys and key not in matches]
    missing = [key for key in sorted(projection_keys) if key not in tensors]
    if unexpected or missing:
        raise CheckpointError.key_mismatch(source, missing=missing, unexpected=unexpected)
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, match in matches.items():
        index, kind, param = match.groups()
        blocks.setdefault(int(index), {})[f"{kind}.{param}"] = tensors[key]
    projection = {name: tensors[prefix + name] for name in PROJECTION_KEYS}
    return XLabsIPAdapter(source=source, prefix=prefix, projection=projection, blocks=blocks)


def _double_attention(model: nn.Module) -> list[FluxAttention]:
    blocks = model.get_submodule("transformer_blocks")
    attentions: list[FluxAttention] = []
    for block in blocks.children():
        attention = block.get_submodule("attn")
        if not isinstance(attention, FluxAttention):
            raise TypeError(f"expected a FluxAttention as each double block's attn, got {type(attention).__name__}")
        attentions.append(attention)
    return attentions


def _expect_shape(adapter: XLabsIPAdapter, key: str, tensor: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ShapeError(f"{key} has shape {tuple(tensor.shape)}, expected {shape} ({what})", path=adapter.source)
    if not tensor.is_floating_point():
        raise CheckpointError(f"{key} holds {tensor.dtype}, expected floating-point weights", path=adapter.source)
    wide = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor  # torch has no isfinite for fp8
    if not bool(torch.isfinite(wide).all()):
        bad = "NaN" if bool(torch.isnan(wide).any()) else "infinite"
        raise CheckpointError(f"{key} holds {bad} values", path=adapter.source)


def check_fits(adapter: XLabsIPAdapter, attentions: Sequence[FluxAttention]) -> None:
    """Raise unless ``adapter`` has well-shaped weights for exactly the model's double blocks."""
    depth = len(attentions)
    beyond = sorted(index for index in adapter.blocks if index >= depth)
    if beyond:
        raise CheckpointError(
            f"has IP-Adapter weights for double block(s) {', '.join(map(str, beyond))}; the model has "
            f"{depth} double blocks (0–{depth - 1})", path=adapter.source,
        )
    missing = [_block_key(index, part) for index in range(depth) for part in _BLOCK_PARTS
               if part not in adapter.blocks.get(index, {})]
    if missing:
        raise CheckpointError.key_mismatch(adapter.source, missing=missing)

    norm_weight, proj_weight = adapter.projection["norm.weight"], adapter.projection["proj.weight"]
    width = norm_weight.shape[0] if norm_weight.ndim == 1 else 0
    if not width or proj_weight.ndim != 2 or not proj_weight.shape[0] or not proj_weight.shape[1] or \
            proj_weight.shape[0] % width:
        raise ShapeError(
            f"{adapter.key('proj.weight')} {tuple(proj_weight.shape)} and {adapter.key('norm.weight')} "
            f"{tuple(norm_weight.shape)}: expected (tokens × width, embed_dim) and (width,)", path=adapter.source,
        )
    tokens, embed_dim = adapter.tokens, adapter.embed_dim
    expected = {"proj.weight": (tokens * width, embed_dim), "proj.bias": (tokens * width,),
                "norm.weight": (width,), "norm.bias": (width,)}
    for name, shape in expected.items():
        _expect_shape(adapter, adapter.key(name), adapter.projection[name], shape, "the image projection")
    for index, attention in enumerate(attentions):
        inner = attention.heads * attention.head_dim
        what = f"the model's attention width {inner} × image token width {width}"
        for part in _BLOCK_PARTS:
            shape = (inner, width) if part.endswith("weight") else (inner,)
            _expect_shape(adapter, _block_key(index, part), adapter.blocks[index][part], shape, what)


def _copy(tensor: Tensor, like: Tensor) -> Tensor:
    return tensor.detach().to(device=like.device, dtype=like.dtype, copy=True)


def _filled(module: nn.Module, state: Mapping[str, Tensor], like: Tensor) -> None:
    module.load_state_dict({name: _copy(t, like) for name, t in state.items()}, assign=True)


class ImageProjection(nn.Module):
    """One adapter's image projection: an embedding → ``tokens`` layer-normed tokens of ``width``."""

    def __init__(self, embed_dim: int, width: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.image_embeds = nn.Linear(embed_dim, tokens * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: Tensor) -> Tensor:
        """[batch, images, embed_dim] → [batch, images, tokens, width]."""
        projected: Tensor = self.image_embeds(embeds.to(self.image_embeds.weight.dtype))
        tokens: Tensor = self.norm(projected.reshape(*projected.shape[:-1], self.tokens, -1))
        return tokens


class ImagePromptProjections(nn.Module):
    """The image projections of the loaded adapters, in load order; held as the model's ``encoder_hid_proj``.

    The Flux forward passes it the joint attention kwargs; it returns a copy in which
    ``ip_adapter_image_embeds`` (one tensor per adapter, [batch, images, embed_dim] or
    [batch, embed_dim]) is replaced by ``ip_hidden_states`` (the projected tokens).
    """

    def __init__(self) -> None:
        super().__init__()
        self.image_projection_layers = nn.ModuleList()
        self.adapter_names: list[str] = []

    def forward(self, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """The kwargs the attention layers get, with the image embeddings projected."""
        names = ", ".join(map(repr, self.adapter_names))
        embeds = None if kwargs is None else kwargs.get(IMAGE_EMBEDS)
        if embeds is None:
            raise IPAdapterError(
                f"IP-Adapter(s) {names} are loaded: pass joint_attention_kwargs={{{IMAGE_EMBEDS!r}: [...]}} "
                f"with one image embedding tensor per adapter, in load order (or unload them)"
            )
        if isinstance(embeds, Tensor) or not isinstance(embeds, Sequence) or len(embeds) != len(self.adapter_names):
            got = f"a list of {len(embeds)}" if isinstance(embeds, Sequence) else type(embeds).__name__
            raise IPAdapterError(f"{IMAGE_EMBEDS} must be a list with one tensor per loaded IP-Adapter "
                                 f"({len(self.adapter_names)}: {names}), got {got}")
        projected = [self._project(name, layer, embed)
                     for name, layer, embed in zip(self.adapter_names, self.image_projection_layers, embeds)]
        assert kwargs is not None
        rewritten = {key: value for key, value in kwargs.items() if key != IMAGE_EMBEDS}
        rewritten[IP_HIDDEN_STATES] = projected
        return rewritten

    @staticmethod
    def _project(name: str, layer: nn.Module, embed: object) -> Tensor:
        assert isinstance(layer, ImageProjection)
        embed_dim = layer.image_embeds.in_features
        if not isinstance(embed, Tensor) or embed.ndim not in (2, 3) or embed.shape[-1] != embed_dim:
            got = f"shape {tuple(embed.shape)}" if isinstance(embed, Tensor) else type(embed).__name__
            raise IPAdapterError(f"image embedding for IP-Adapter {name!r}: expected a tensor "
                                 f"[batch, images, {embed_dim}] or [batch, {embed_dim}], got {got}")
        out: Tensor = layer(embed if embed.ndim == 3 else embed[:, None])
        return out


class ImagePromptAttention(nn.Module):
    """A double block's image-prompt attention; held as its attention's ``processor``.

    Called with the image query [batch, tokens, heads, head_dim] and the attention kwargs,
    it returns the sum over adapters of scale × attention of the query to that adapter's
    image-token keys and values, [batch, tokens, heads × head_dim].
    """

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.to_k_ip = nn.ModuleList()
        self.to_v_ip = nn.ModuleList()
        self.scale: list[float] = []

    def forward(self, query: Tensor, ip_hidden_states: Sequence[Tensor] | None = None, **_: Any) -> Tensor:
        """The image-prompt residual for this block."""
        if ip_hidden_states is None or len(ip_hidden_states) != len(self.scale):
            got = "none" if ip_hidden_states is None else str(len(ip_hidden_states))
            raise IPAdapterError(f"this block holds {len(self.scale)} IP-Adapter(s) but got {got} "
                                 f"projected image prompts ({IP_HIDDEN_STATES})")
        batch = query.shape[0]
        total: Tensor | None = None
        for tokens, scale, to_k, to_v in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
            if tokens.shape[0] != batch:
                raise IPAdapterError(f"image embeddings have batch size {tokens.shape[0]}, the hidden states "
                                     f"{batch}: pass one image embedding per sample")
            key: Tensor = to_k(tokens)
            value: Tensor = to_v(tokens)
            key = key.reshape(batch, -1, self.heads, self.head_dim)
            value = value.reshape(batch, -1, self.heads, self.head_dim)
            attended = attend(query, key, value).flatten(2, 3).to(query.dtype)
            term = scale * attended
            total = term if total is None else total + term
        assert total is not None
        return total


@attrs.frozen
class _Prepared:
    """An adapter's modules, built and filled, not yet attached."""

    projection: ImageProjection
    keys: list[nn.Linear]
    values: list[nn.Linear]


def _linear(weight: Tensor, bias: Tensor, like: Tensor) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0])
    _filled(layer, {"weight": weight, "bias": bias}, like)
    return layer


def _prepare(adapter: XLabsIPAdapter, attentions: Sequence[FluxAttention], training: bool) -> _Prepared:
    like = attentions[0].norm_q.weight
    with torch.device("meta"):
        projection = ImageProjection(adapter.embed_dim, adapter.width, adapter.tokens)
    p = adapter.projection
    _filled(projection, {"image_embeds.weight": p["proj.weight"], "image_embeds.bias": p["proj.bias"],
                         "norm.weight": p["norm.weight"], "norm.bias": p["norm.bias"]}, like)
    keys, values = [], []
    for index, attention in enumerate(attentions):
        part = adapter.blocks[index]
        like = attention.norm_q.weight
        keys.append(_linear(part["k.weight"], part["k.bias"], like).train(training))
        values.append(_linear(part["v.weight"], part["v.bias"], like).train(training))
    return _Prepared(projection=projection.train(training), keys=keys, values=values)


def _projections(model: nn.Module) -> ImagePromptProjections | None:
    found = dict(model.named_children()).get(PROJECTION_SLOT)
    if found is None or isinstance(found, ImagePromptProjections):
        return found
    raise IPAdapterError(f"the model's {PROJECTION_SLOT} is a {type(found).__name__}, not IP-Adapter projections")


def _processor(attention: FluxAttention) -> ImagePromptAttention | None:
    found = dict(attention.named_children()).get(PROCESSOR)
    if found is None or isinstance(found, ImagePromptAttention):
        return found
    raise IPAdapterError(f"a double block's attention already has a {PROCESSOR} ({type(found).__name__})")


def _loaded_processors(model: nn.Module) -> list[ImagePromptAttention]:
    processors = [_processor(attention) for attention in _double_attention(model)]
    loaded = [p for p in processors if p is not None]
    if len(loaded) != len(processors):
        raise IPAdapterError("IP-Adapter state is inconsistent: some double blocks lack their image-prompt attention")
    return loaded


@final
@attrs.frozen
class FluxIPAdapter:
    """Flux's IP-Adapter: XLabs files; image prompts attended by the double blocks.

    Runtime state lives on the model instance: ``encoder_hid_proj`` and each double block's
    ``attn.processor`` (see the module docstring); both are removed when the last adapter is.
    """

    layouts: tuple[str, ...] = ("xlabs",)

    def entries(self) -> tuple[str, ...]:
        """The file layouts read."""
        return self.layouts

    def adapter_names(self, model: nn.Module) -> tuple[str, ...]:
        """The loaded adapters, in load order."""
        projections = _projections(model)
        return () if projections is None else tuple(projections.adapter_names)

    def block_count(self, model: nn.Module) -> int:
        """The number of double blocks."""
        return len(_double_attention(model))

    def scales(self, model: nn.Module) -> dict[str, tuple[float, ...]]:
        """Adapter name → its scale in each double block."""
        names = self.adapter_names(model)
        processors = _loaded_processors(model) if names else []
        return {name: tuple(p.scale[slot] for p in processors) for slot, name in enumerate(names)}

    def load(self, model: nn.Module, tensors: Mapping[str, Tensor], *, adapter_name: str, source: str) -> None:
        """Check an XLabs file against the model, then attach it as the last adapter at scale 1.0."""
        attentions = _double_attention(model)
        if not attentions:
            raise IPAdapterError("the model has no double blocks to take an image prompt")
        projections = _projections(model)
        processors = [_processor(a) for a in attentions]
        adapter = read_xlabs(tensors, source)
        check_fits(adapter, attentions)
        prepared = _prepare(adapter, attentions, model.training)
        # Everything is checked and built: from here on nothing fails.
        if projections is None:
            projections = ImagePromptProjections().train(model.training)
            model.add_module(PROJECTION_SLOT, projections)
        projections.image_projection_layers.append(prepared.projection)
        projections.adapter_names.append(adapter_name)
        for attention, processor, key, value in zip(attentions, processors, prepared.keys, prepared.values):
            if processor is None:
                processor = ImagePromptAttention(attention.heads, attention.head_dim).train(model.training)
                attention.add_module(PROCESSOR, processor)
            processor.to_k_ip.append(key)
            processor.to_v_ip.append(value)
            processor.scale.append(1.0)

    def set_scales(self, model: nn.Module, scales: Mapping[str, Sequence[float]]) -> None:
        """Set the named adapters' per-block scales."""
        names = self.adapter_names(model)
        processors = _loaded_processors(model)
        for name, values in scales.items():
            slot = names.index(name)
            for processor, value in zip(processors, values, strict=True):
                processor.scale[slot] = float(value)

    def unload(self, model: nn.Module, adapter_names: Collection[str]) -> None:
        """Remove the named adapters; the last one out removes every module IP-Adapter added."""
        projections = _projections(model)
        if projections is None:
            return
        slots = sorted((projections.adapter_names.index(name) for name in set(adapter_names)), reverse=True)
        if len(slots) == len(projections.adapter_names):
            delattr(model, PROJECTION_SLOT)
            for attention in _double_attention(model):
                if PROCESSOR in dict(attention.named_children()):
                    delattr(attention, PROCESSOR)
            return
        processors = _loaded_processors(model)
        for slot in slots:
            del projections.image_projection_layers[slot]
            del projections.adapter_names[slot]
            for processor in processors:
                del processor.to_k_ip[slot], processor.to_v_ip[slot], processor.scale[slot]


FLUX_IP_ADAPTER: Final = FluxIPAdapter()
"""The IP-Adapter support Flux declares."""
