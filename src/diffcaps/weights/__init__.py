"""Single-file checkpoints: a model's original layout, declared as data and mapped both ways.

``load_single_file(FluxTransformer2DModel, "flux1-dev.safetensors")`` recognises the variant,
builds the model on the meta device and fills it straight from the memory-mapped file;
``save_single_file(model, path)`` writes the original layout back; ``convert`` turns a
checkpoint into a diffusers folder and back without loading a model; ``inspect_file`` says
what a file is from its header. What a model author declares (rules, transforms, variants)
is in :mod:`diffcaps.weights.spec`.
"""

from diffcaps.weights._convert import ConversionReport as ConversionReport, convert as convert
from diffcaps.weights._inspect import (
    FileReport as FileReport,
    Recogniser as Recogniser,
    Recognition as Recognition,
    checkpoint_recogniser as checkpoint_recogniser,
    inspect_file as inspect_file,
)
from diffcaps.weights._single_file import (
    UnexpectedTensorsWarning as UnexpectedTensorsWarning,
    load_single_file as load_single_file,
    save_single_file as save_single_file,
)

__all__ = [
    "ConversionReport",
    "FileReport",
    "Recogniser",
    "Recognition",
    "UnexpectedTensorsWarning",
    "checkpoint_recogniser",
    "convert",
    "inspect_file",
    "load_single_file",
    "save_single_file",
]
