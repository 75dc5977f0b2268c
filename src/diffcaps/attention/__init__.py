"""Attention backends: ``enable(model, AttentionConfig(backend="math"))``, ``disable``, ``active``,
and ``with backend(model, "flex"):`` for a scoped switch.

Backends: ``sdpa`` (default), ``math`` (reference: explicit softmax in float32), ``flex``
(``torch.nn.attention.flex_attention``), the pinned SDPA kernels ``sdpa_flash``,
``sdpa_efficient`` and ``sdpa_cudnn`` (CUDA), and the third-party kernels ``flash``
(flash-attn), ``sage`` (sageattention) and ``xformers`` (CUDA). A backend whose package or
device is missing is refused with :class:`~diffcaps.errors.AttentionError` before anything
changes. Context parallelism runs with ``sdpa`` and ``math`` only. What a model declares is in
:mod:`diffcaps.attention.spec`.
"""

from diffcaps.attention._backends import BACKENDS as BACKENDS, BackendName as BackendName
from diffcaps.attention._config import AttentionConfig as AttentionConfig
from diffcaps.attention._functions import (
    active as active,
    backend as backend,
    disable as disable,
    enable as enable,
)

__all__ = ["AttentionConfig", "BACKENDS", "BackendName", "active", "backend", "disable", "enable"]
