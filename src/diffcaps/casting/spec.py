"""What a model author declares for layerwise casting: the module patterns kept in full precision."""

from diffcaps.casting._service import LayerwiseCasting as LayerwiseCasting

__all__ = ["LayerwiseCasting"]
