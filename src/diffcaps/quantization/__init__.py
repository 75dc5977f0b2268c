"""Quantized weights: GGUF and ComfyUI scaled-fp8 files loaded packed, torchao applied on load or after.

``weights.load_single_file(Model, "x.gguf", torch_dtype=torch.bfloat16)`` keeps a GGUF file's
tensors packed and decodes each layer's weight at its forward (a scaled-fp8 file likewise);
``enable(model, Int8WeightOnlyConfig())`` quantizes a loaded model's linear layers with torchao,
skipping the modules the model keeps; ``active(model)`` reports what a model holds and
``disable(model)`` turns packed layers back into dense ones (torchao's change is one-way).
What a model declares (the schemes it accepts, the modules never quantized) is in
:mod:`diffcaps.quantization.spec`.
"""

from diffcaps.quantization._functions import (
    QuantizationReport as QuantizationReport,
    active as active,
    disable as disable,
    enable as enable,
)
from diffcaps.quantization._service import SCHEMES as SCHEMES, Scheme as Scheme

__all__ = ["QuantizationReport", "SCHEMES", "Scheme", "active", "disable", "enable"]
