"""weights feature."""
