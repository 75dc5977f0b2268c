"""ip_adapter feature."""
