"""cache feature."""
