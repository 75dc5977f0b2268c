"""IP-Adapter: condition a model on image embeddings, held by the model, several at once.

``load(model, "ip_adapter.safetensors", adapter_name="style")`` adds an adapter; the forward
then takes ``joint_attention_kwargs={"ip_adapter_image_embeds": [embeds, ...]}`` with one
image embedding per loaded adapter, in load order, as diffusers' pipelines pass it.
``set_scale`` sets the strengths, ``unload`` restores the model exactly. The implementation
is per model (``models/<name>/_ip_adapter.py``, implementing :mod:`diffcaps.ip_adapter.spec`); this
package never names a model class.
"""

from diffcaps.ip_adapter._api import (
    Source as Source,
    adapter_names as adapter_names,
    get_scales as get_scales,
    load as load,
    set_scale as set_scale,
    unload as unload,
)
from diffcaps.ip_adapter._scale import AdapterScale as AdapterScale, Scale as Scale

__all__ = [
    "AdapterScale",
    "Scale",
    "Source",
    "adapter_names",
    "get_scales",
    "load",
    "set_scale",
    "unload",
]
