"""Single-file checkpoints: a model's original layout, declared as data and mapped both ways.

``load_single_file(FluxTransformer2DModel, "flux1-dev.safetensors")`` recognises the variant,
builds the model on the meta device and fills it straight from the memory-mapped file;
``save_single_file(model, path)`` writes the original layout back; ``convert`` turns a
checkpoint into a diffusers folder and back without loading a model.
"""

from diffcaps.weights._convert import Conversion as Conversion, convert as convert
from diffcaps.weights._inspect import (
    FileReport as FileReport,
    Recogniser as Recogniser,
    Recognition as Recognition,
    checkpoint_recogniser as checkpoint_recogniser,
    inspect_file as inspect_file,
)
from diffcaps.weights._service import (
    Identification as Identification,
    KeyPattern as KeyPattern,
    MappingPlan as MappingPlan,
    Rule as Rule,
    Step as Step,
    WeightMapper as WeightMapper,
)
from diffcaps.weights._single_file import (
    UnexpectedTensorsWarning as UnexpectedTensorsWarning,
    load_single_file as load_single_file,
    save_single_file as save_single_file,
)
from diffcaps.weights._transforms import (
    IDENTITY as IDENTITY,
    SWAP_HALVES as SWAP_HALVES,
    Identity as Identity,
    Inverted as Inverted,
    Reorder as Reorder,
    Split as Split,
    Transform as Transform,
)
from diffcaps.weights._variants import (
    BlockCount as BlockCount,
    Condition as Condition,
    ConfigReader as ConfigReader,
    Const as Const,
    Derived as Derived,
    Dim as Dim,
    DimIs as DimIs,
    Has as Has,
    Lacks as Lacks,
    Present as Present,
    TensorSpec as TensorSpec,
    WeightVariant as WeightVariant,
)

__all__ = [
    "IDENTITY",
    "SWAP_HALVES",
    "BlockCount",
    "Condition",
    "Conversion",
    "ConfigReader",
    "Const",
    "Derived",
    "Dim",
    "DimIs",
    "FileReport",
    "Has",
    "Identification",
    "Identity",
    "Inverted",
    "KeyPattern",
    "Lacks",
    "MappingPlan",
    "Present",
    "Recogniser",
    "Recognition",
    "Reorder",
    "Rule",
    "Split",
    "Step",
    "TensorSpec",
    "Transform",
    "UnexpectedTensorsWarning",
    "WeightMapper",
    "WeightVariant",
    "checkpoint_recogniser",
    "convert",
    "inspect_file",
    "load_single_file",
    "save_single_file",
]
