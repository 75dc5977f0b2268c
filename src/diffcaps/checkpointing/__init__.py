"""checkpointing feature."""
