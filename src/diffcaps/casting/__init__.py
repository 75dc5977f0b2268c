"""Layerwise casting: store weights low (fp8, bf16), compute in full precision, layer by layer.

``enable(model, LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))`` switches it on,
``active(model)`` gives the config in force (``None`` when off), ``disable(model)`` upcasts the
weights again.
"""

from diffcaps.casting._config import LayerwiseCastingConfig as LayerwiseCastingConfig
from diffcaps.casting._functions import active as active, disable as disable, enable as enable

__all__ = ["LayerwiseCastingConfig", "active", "disable", "enable"]
