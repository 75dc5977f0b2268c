"""parallel feature."""
