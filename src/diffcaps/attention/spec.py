"""What a model author declares for attention backends: ``AttentionSupport``.

``attention: AttentionSupport = capability(AttentionSupport(modules=ModuleTypes((MyAttention,))))``
declares the attention module classes and, optionally, the backends they may run (all of them
by default; ``sdpa`` must be among them). Each module's kernel must call
:func:`diffcaps.layers.module_attention`, which runs the backend the feature set on it.
"""

from diffcaps.attention._service import AttentionSupport as AttentionSupport

__all__ = ["AttentionSupport"]
