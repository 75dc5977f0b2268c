"""Quantized weights: GGUF and ComfyUI scaled-fp8 files loaded packed, torchao applied on load or after.

``weights.load_single_file(Model, "x.gguf", torch_dtype=torch.bfloat16)`` keeps a GGUF file's
tensors packed and decodes each layer's weight at its forward; ``active(model)`` says which
schemes and packed types a model holds. What a model declares (the schemes it accepts, the
modules never quantized) is in :mod:`diffcaps.quantization.spec`.
"""

from diffcaps.quantization._functions import active as active
from diffcaps.quantization._service import SCHEMES as SCHEMES, Scheme as Scheme

__all__ = ["SCHEMES", "Scheme", "active"]
