"""lora feature."""
