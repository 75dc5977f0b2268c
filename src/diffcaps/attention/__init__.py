"""Attention backends: ``enable(model, AttentionConfig(backend="math"))``, ``disable``, ``active``,
and ``with backend(model, "flex"):`` for a scoped switch.

Backends: ``sdpa`` (default), ``math`` (reference: explicit softmax in float32), ``flex``
(``torch.nn.attention.flex_attention``), the pinned SDPA kernels ``sdpa_flash``,
``sdpa_efficient`` and ``sdpa_cudnn`` (CUDA), and the third-party kernels ``flash``
(flash-attn), ``sage`` (sageattention) and ``xformers`` (CUDA). A backend whose package or
device is missing is refused with :class:`~diffcaps.errors.AttentionError` before anything
changes. Context parallelism runs with ``sdpa`` and ``math`` only.

QKV fusion: ``fuse_qkv(model)`` runs each declared group of query/key/value projections as one
matmul, ``unfuse_qkv(model)`` splits them back exactly, ``qkv_fused(model)`` says which is in
force; the state dict keeps the unfused layout throughout. What a model declares is in
:mod:`diffcaps.attention.spec`.
"""

from diffcaps.attention._backends import BACKENDS as BACKENDS, BackendName as BackendName
from diffcaps.attention._config import AttentionConfig as AttentionConfig
from diffcaps.attention._fusion import fuse_qkv as fuse_qkv, qkv_fused as qkv_fused, unfuse_qkv as unfuse_qkv
from diffcaps.attention._functions import (
    active as active,
    backend as backend,
    disable as disable,
    enable as enable,
)

__all__ = [
    "AttentionConfig",
    "BACKENDS",
    "BackendName",
    "active",
    "backend",
    "disable",
    "enable",
    "fuse_qkv",
    "qkv_fused",
    "unfuse_qkv",
]
