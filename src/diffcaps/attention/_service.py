"""The attention service: which modules attend, which backends they may run, and which of
their projections fuse."""

from __future__ import annotations

from typing import final

import attrs

from diffcaps import checks
from diffcaps.attention._backends import BACKENDS, BackendName
from diffcaps.attention._qkv import QKVFusion
from diffcaps.services import ModuleTypes

__all__ = ["AttentionSupport"]


def _backends(value: object) -> tuple[BackendName, ...]:
    backends: tuple[BackendName, ...] = checks.choices(value, BACKENDS, "attention backends", ValueError)
    if "sdpa" not in backends:
        raise ValueError("AttentionSupport must list 'sdpa', the default every model runs")
    return backends


def _fusion_of_attention(instance: AttentionSupport, _: attrs.Attribute[QKVFusion | None],
                         value: QKVFusion | None) -> None:
    if value is None:
        return
    stray = [t.__name__ for t in value.modules.types if not issubclass(t, instance.modules.types)]
    if stray:
        raise ValueError(f"QKV fusion names {', '.join(stray)}, which are not among the declared attention "
                         f"modules ({', '.join(instance.modules.entries())})")


@final
@attrs.frozen(kw_only=True)
class AttentionSupport:
    """Declares a model's attention modules, the backends they may run (``sdpa`` among them) and,
    optionally, the projections that :func:`diffcaps.attention.fuse_qkv` fuses.

    The modules' kernels must call :func:`diffcaps.layers.module_attention`: that is where the
    backend set on a module is read. Modules of a ``qkv_fusion`` must project through
    :func:`diffcaps.attention.spec.project_qkv`: that is where a fused group is run.
    """

    modules: ModuleTypes
    backends: tuple[BackendName, ...] = attrs.field(default=BACKENDS, converter=_backends)
    qkv_fusion: QKVFusion | None = attrs.field(
        default=None, validator=[attrs.validators.optional(attrs.validators.instance_of(QKVFusion)), _fusion_of_attention]
    )

    def entries(self) -> tuple[str, ...]:
        """The attention module classes, the backends, then the fused projection groups."""
        fusion = () if self.qkv_fusion is None else self.qkv_fusion.entries()
        return (*self.modules.entries(), *self.backends, *fusion)
