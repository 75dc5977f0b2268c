"""diffcaps: typed diffusion transformer models whose features are declared capabilities.

A model is a ``torch.nn.Module`` deriving from :class:`Model`; what it can do is the
:class:`Capabilities` instance on its ``capabilities`` class attribute. Features are used
through functions that take the model first (``diffcaps.lora.load_adapter(model, ...)``).
"""

from diffcaps.services import ModuleNames as ModuleNames, ModuleTypes as ModuleTypes
from diffcaps.capabilities import Capabilities as Capabilities, capability as capability
from diffcaps.config import ModelConfig as ModelConfig
from diffcaps.metadata import CapabilityRow as CapabilityRow, ModelMetadata as ModelMetadata
from diffcaps.model import Model as Model
from diffcaps.models import register_model as register_model
from diffcaps.auto import AutoModel as AutoModel

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "Capabilities",
    "CapabilityRow",
    "Model",
    "ModelConfig",
    "ModelMetadata",
    "ModuleNames",
    "ModuleTypes",
    "__version__",
    "capability",
    "register_model",
]
