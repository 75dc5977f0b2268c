"""What a model author declares for LoRA: the service, its formats and their building blocks."""

from diffcaps.lora._service import LoRAService as LoRAService

__all__ = ["LoRAService"]
