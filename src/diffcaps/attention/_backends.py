"""The attention backends: each one's kernel, and what it needs (package, device) to run.

Every kernel takes and returns [batch, seq, heads, head_dim] tensors and an optional mask that
broadcasts to [batch, heads, query_seq, key_seq] (boolean: keep ``True``; float: added to the
logits), as :func:`diffcaps.layers.attention` does.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, Final, Literal, cast, get_args

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from diffcaps.errors import AttentionError
from diffcaps.layers import AttentionKernel

__all__ = ["BACKENDS", "BackendName", "kernel_for", "missing"]

BackendName = Literal[
    "sdpa", "math", "flex", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash", "sage", "xformers"
]
"""The name of an attention backend."""

BACKENDS: Final[tuple[BackendName, ...]] = get_args(BackendName)
"""Every backend there is, in the order they are listed."""

RING_SAFE: Final[frozenset[str]] = frozenset({"sdpa", "math"})
"""Backends context parallelism runs with (its ring merge computes each block's log-sum-exp itself)."""

Run = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def _heads_first(*tensors: Tensor) -> list[Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _math(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    """The reference: explicit softmax over float32 logits."""
    q, k, v = _heads_first(query.float(), key.float(), value.float())
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).to(query.dtype)


def _flex(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _heads_first(query, key, value)
    if mask is None:
        out: Any = flex_attention(q, k, v)
        return cast(Tensor, out).transpose(1, 2)
    full = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        entry = full[b, h, q_idx, kv_idx]
        if entry.dtype == torch.bool:
            return torch.where(entry, score, float("-inf"))
        return score + entry

    masked: Any = flex_attention(q, k, v, score_mod=score_mod)
    return cast(Tensor, masked).transpose(1, 2)


def _pinned(backend: Any) -> Run:
    def run(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        from torch.nn.attention import sdpa_kernel

        q, k, v = _heads_first(query, key, value)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)

    return run


def _no_mask(name: str, mask: Tensor | None) -> None:
    if mask is not None:
        raise AttentionError(f"the {name!r} attention backend takes no mask; use 'sdpa', 'math' or 'flex' "
                             "for a model that passes one")


def _flash(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    _no_mask("flash", mask)
    out: Tensor = importlib.import_module("flash_attn").flash_attn_func(query, key, value)
    return out


def _sage(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    _no_mask("sage", mask)
    out: Tensor = importlib.import_module("sageattention").sageattn(query, key, value, tensor_layout="NHD")
    return out


def _xformers(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    bias = None
    if mask is not None:
        full = mask.expand(query.shape[0], query.shape[2], query.shape[1], key.shape[1])
        bias = torch.zeros(full.shape, dtype=query.dtype, device=query.device).masked_fill(~full, float("-inf")) \
            if full.dtype == torch.bool else full.to(query.dtype)
    out: Tensor = importlib.import_module("xformers.ops").memory_efficient_attention(query, key, value, attn_bias=bias)
    return out


@attrs.frozen
class _Backend:
    run: Run | None  # None: plain SDPA, no kernel set on the modules
    package: str | None = None
    install: str = ""
    cuda: bool = False


def _sdp(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


_TABLE: Final[dict[str, _Backend]] = {
    "sdpa": _Backend(None),
    "math": _Backend(_math),
    "flex": _Backend(_flex),
    "sdpa_flash": _Backend(_pinned(_sdp("FLASH_ATTENTION")), cuda=True),
    "sdpa_efficient": _Backend(_pinned(_sdp("EFFICIENT_ATTENTION")), cuda=True),
    "sdpa_cudnn": _Backend(_pinned(_sdp("CUDNN_ATTENTION")), cuda=True),
    "flash": _Backend(_flash, package="flash_attn", install="pip install flash-attn", cuda=True),
    "sage": _Backend(_sage, package="sageattention", install="pip install sageattention", cuda=True),
    "xformers": _Backend(_xformers, package="xformers", install="pip install xformers", cuda=True),
}


_cudnn_available: Callable[[], bool] = torch.backends.cudnn.is_available  # unannotated in torch


def missing(name: str) -> str | None:
    """What ``name`` lacks on this machine (a package to install, a CUDA device), or ``None``."""
    backend = _TABLE[name]
    if backend.package is not None and importlib.util.find_spec(backend.package) is None:
        return f"the {backend.package!r} package is not installed ({backend.install})"
    if backend.cuda and not torch.cuda.is_available():
        return "it runs on CUDA devices only, and torch sees none"
    if name == "sdpa_cudnn" and not _cudnn_available():
        return "torch was built without cuDNN"
    return None


def kernel_for(name: str) -> AttentionKernel | None:
    """The kernel the modules run for backend ``name`` (``None`` for plain SDPA)."""
    run = _TABLE[name].run
    return None if run is None else AttentionKernel(name, run, context_parallel=name in RING_SAFE)
