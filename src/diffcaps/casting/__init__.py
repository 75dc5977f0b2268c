"""casting feature."""
