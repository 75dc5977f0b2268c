"""compile feature."""
