"""offload feature."""
