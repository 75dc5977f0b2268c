"""What a model author declares for layerwise casting, and what casting acts on.

A model names the modules that keep full precision (regular expressions searched in module
names) in a :class:`LayerwiseCasting`::

    layerwise_casting: LayerwiseCasting = capability(LayerwiseCasting(skip_patterns=("norm",)))

Only :data:`CASTABLE_LAYERS` are ever cast; :data:`GENERIC_SKIP_PATTERNS` are skipped for every
model; :func:`cast_layers` lists the layers a set of patterns leaves to cast.
"""

from diffcaps.casting._layers import (
    CASTABLE_LAYERS as CASTABLE_LAYERS,
    GENERIC_SKIP_PATTERNS as GENERIC_SKIP_PATTERNS,
    cast_layers as cast_layers,
)
from diffcaps.casting._service import LayerwiseCasting as LayerwiseCasting

__all__ = ["CASTABLE_LAYERS", "GENERIC_SKIP_PATTERNS", "LayerwiseCasting", "cast_layers"]
