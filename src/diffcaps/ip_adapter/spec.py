"""What a model author implements for IP-Adapter: the protocol the feature functions drive.

IP-Adapter differs too much between architectures for one shared implementation, so a model
folder provides an object satisfying :class:`IPAdapterSupport` (plain data; the modules it
builds live on the model instance) and declares it in its capabilities::

    ip_adapter: IPAdapterSupport = capability(MY_IP_ADAPTER)

``diffcaps.ip_adapter.load``/``set_scale``/``unload`` check the user's arguments and call it.
"""

from diffcaps.ip_adapter._service import IPAdapterSupport as IPAdapterSupport

__all__ = ["IPAdapterSupport"]
