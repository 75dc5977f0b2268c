"""What a model author implements for IP-Adapter: the protocol the feature functions drive."""

from diffcaps.ip_adapter._service import IPAdapterSupport as IPAdapterSupport

__all__ = ["IPAdapterSupport"]
