"""What a model author declares for attention: ``AttentionSupport``, and for QKV fusion
``QKVFusion`` of ``QKVGroup`` s, with ``project_qkv`` for the modules to call.

``attention: AttentionSupport = capability(AttentionSupport(modules=ModuleTypes((MyAttention,))))``
declares the attention module classes and, optionally, the backends they may run (all of them
by default; ``sdpa`` must be among them). Each module's kernel must call
:func:`diffcaps.layers.module_attention`, which runs the backend the feature set on it.

QKV fusion (:func:`diffcaps.attention.fuse_qkv`) is declared in the same row::

    QKV = QKVGroup(("to_q", "to_k", "to_v"), fused="to_qkv")
    AttentionSupport(modules=ModuleTypes((MyAttention,)),
                     qkv_fusion=QKVFusion(modules=ModuleTypes((MyAttention,)), groups=(QKV,)))

and each declared module projects through ``query, key, value = project_qkv(self, x, QKV)``:
three ``nn.Linear`` calls, or one through the fused layer while fused. A group's projections
must be plain ``nn.Linear`` of one input, dtype and device.
"""

from diffcaps.attention._qkv import QKVFusion as QKVFusion, QKVGroup as QKVGroup, project_qkv as project_qkv
from diffcaps.attention._service import AttentionSupport as AttentionSupport

__all__ = ["AttentionSupport", "QKVFusion", "QKVGroup", "project_qkv"]
